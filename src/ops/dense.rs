//! Dense (fully connected) layers as one candle custom op: `y = x·Wᵀ + b` as gemm calls on
//! blocks of rows in parallel, and a backward pass that returns all three gradients (the
//! input's only when a variable depends on it). candle-nn's `Linear` goes through candle's
//! matmul, whose gradients run serially here or on rayon's pool beside candle's own.

use candle_core::{Layout, Module, Shape, Tensor};
use candle_nn::Linear;

use crate::ops::cpu::{
    activate, matmul, parallel_pieces, threads, with_f32, Activation, F32Op, F32Op3,
};
use crate::ops::portable;
use crate::{Error, Result};

const NAME: &str = "genbackdoor-dense";

/// A dense layer over the last dimension of its input, with candle-nn's and PyTorch's tensors
/// (`weight [out, in]`, optional `bias [out]`), so checkpoints do not change.
pub struct Dense {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl From<Linear> for Dense {
    /// The layer with the tensors of a candle-nn `Linear` (as `candle_nn::linear` creates them).
    fn from(l: Linear) -> Self {
        Dense {
            weight: l.weight().clone(),
            bias: l.bias().cloned(),
        }
    }
}

impl Dense {
    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The layer applied to `[n, …]` inputs flattened to `[n, in]` (the features of one
    /// sample in memory order), without a separate flattening node in the graph.
    pub fn forward_flat(&self, x: &Tensor) -> Result<Tensor> {
        let (out, inp) = self.weight.dims2()?;
        let n = x.dims().first().copied().unwrap_or(0);
        if x.rank() < 2 || x.elem_count() != n * inp {
            return Err(Error::Mismatch(format!(
                "{NAME}: input {:?} does not hold {inp} features per sample",
                x.dims()
            )));
        }
        self.apply(x, n, Shape::from((n, out)))
    }

    /// `x` as `rows × in` values (contiguous, in memory order) times `Wᵀ`, plus the bias, in
    /// the output shape `out`.
    fn apply(&self, x: &Tensor, rows: usize, out: Shape) -> Result<Tensor> {
        let bias = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(self.weight.dim(0)?, x.dtype(), x.device())?,
        };
        if portable::applies(x) {
            let y = x.reshape((rows, ()))?.matmul(&self.weight.t()?)?;
            return Ok(y.broadcast_add(&bias)?.reshape(out)?);
        }
        let op = F32Op::new(DenseOp { rows, out });
        Ok(x.contiguous()?
            .apply_op3(&self.weight.contiguous()?, &bias, op)?)
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (out, inp) = self.weight.dims2()?;
        let Some((&last, lead)) = x.dims().split_last() else {
            candle_core::bail!("{NAME}: a scalar input has no features");
        };
        if last != inp {
            candle_core::bail!(
                "{NAME}: input {:?} does not end in the layer's {inp} features",
                x.dims()
            );
        }
        let mut shape = lead.to_vec();
        shape.push(out);
        self.apply(x, x.elem_count() / inp, Shape::from(shape))
            .map_err(candle_core::Error::wrap)
    }
}

/// The kernel: `x` as `[rows, in]`, `weight [out, in]`, `bias [out]` → `[rows, out]` values in
/// the shape `out`.
struct DenseOp {
    rows: usize,
    out: Shape,
}

/// Rows of `n` per parallel piece: a few pieces per thread.
fn rows_per_piece(n: usize) -> usize {
    n.div_ceil(2 * threads()).max(1)
}

impl F32Op3 for DenseOp {
    const NAME: &'static str = NAME;

    fn forward(
        &self,
        [(x, l1), (w, l2), (b, _)]: [(&[f32], &Layout); 3],
        act: Option<Activation>,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, o) = (self.rows, b.len());
        let k = x.len() / n.max(1);
        if w.len() != o * k || x.len() != n * k {
            candle_core::bail!(
                "{NAME}: weight {:?} does not fit input {:?}",
                l2.dims(),
                l1.dims()
            );
        }
        // One piece per thread: gemm packs the whole weight for every piece.
        let rows = n.div_ceil(threads()).max(1);
        let (y, _) = parallel_pieces(n * o, rows * o, |i, ys| {
            let r = ys.len() / o;
            let xs = &x[i * rows * k..(i * rows + r) * k];
            matmul((r, o, k), (ys, (o, 1)), (xs, (k, 1)), (w, (1, k)), false);
            for row in ys.chunks_mut(o) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
            activate(act, ys);
        });
        Ok((y, self.out.clone()))
    }

    /// `dx = dy·W`, `dW = dyᵀ·x`, `db = Σ dy` over the rows.
    fn backward(
        &self,
        [x, weight, bias]: [&Tensor; 3],
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, o) = (self.rows, bias.elem_count());
        let k = x.elem_count() / n.max(1);
        let need_dx = x.track_op();
        let (dx, dw, db) = with_f32(x, NAME, |x| {
            with_f32(weight, NAME, |w| {
                with_f32(dy, NAME, |dy| {
                    let dx = need_dx.then(|| {
                        let rows = rows_per_piece(n);
                        let (dx, _) = parallel_pieces(n * k, rows * k, |i, dxs| {
                            let r = dxs.len() / k;
                            let dys = &dy[i * rows * o..(i * rows + r) * o];
                            matmul((r, k, o), (dxs, (k, 1)), (dys, (o, 1)), (w, (k, 1)), false);
                        });
                        dx
                    });
                    // Blocks of output features: rows of dW and entries of db.
                    let block = rows_per_piece(o);
                    let (dw, db) = parallel_pieces(o * k, block * k, |i, dws| {
                        let (a, r) = (i * block, dws.len() / k);
                        matmul(
                            (r, k, n),
                            (dws, (k, 1)),
                            (&dy[a..], (1, o)),
                            (x, (k, 1)),
                            false,
                        );
                        let mut db = vec![0f32; r];
                        for row in dy.chunks(o) {
                            db.iter_mut().zip(&row[a..a + r]).for_each(|(s, g)| *s += g);
                        }
                        db
                    });
                    (dx, dw, db.concat())
                })
            })
        })???;
        let dev = x.device();
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                .transpose()?,
            Some(Tensor::from_vec(dw, (o, k), dev)?),
            Some(Tensor::from_vec(db, o, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, check_finite_differences, value_and_grads};
    use crate::rng::Rng;
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(30))]
        /// Output and the gradients of input, weight and bias match candle-nn's `Linear`, for
        /// 2-D and 3-D inputs, with and without a bias.
        #[test]
        fn matches_candle_nn_linear(
            n in 1usize..20, extra in 1usize..4, inp in 1usize..40, out in 1usize..30,
            three_d in any::<bool>(), with_bias in any::<bool>(), seed in 0u64..1000,
        ) {
            let dev = Device::Cpu;
            let mut rng = Rng::new(seed);
            let shape: Vec<usize> = if three_d { vec![n, extra, inp] } else { vec![n, inp] };
            let x = rng.normal(&shape, &dev).unwrap();
            let w = rng.normal(&[out, inp], &dev).unwrap();
            let b = rng.normal(&[out], &dev).unwrap();
            let layer = |t: &[Tensor], ours: bool| {
                let l = Linear::new(t[1].clone(), t.get(2).cloned());
                if ours { Dense::from(l).forward(&t[0]).unwrap() } else { l.forward(&t[0]).unwrap() }
            };
            let inputs: &[&Tensor] = if with_bias { &[&x, &w, &b] } else { &[&x, &w] };
            let (y1, g1) = value_and_grads(|t| layer(t, true), inputs, seed);
            let (y2, g2) = value_and_grads(|t| layer(t, false), inputs, seed);
            assert_close(&y1, &y2, 1e-5).map_err(|e| TestCaseError::fail(format!("forward: {e}")))?;
            for (name, (p, q)) in ["dx", "dw", "db"].iter().zip(g1.iter().zip(&g2)) {
                assert_close(p, q, 1e-5).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
            }
        }
    }

    #[test]
    fn finite_differences_agree_with_the_gradient() {
        let mut rng = Rng::new(8);
        let dev = Device::Cpu;
        let (x, w, b) = (
            rng.normal(&[5, 7], &dev).unwrap(),
            rng.normal(&[3, 7], &dev).unwrap(),
            rng.normal(&[3], &dev).unwrap(),
        );
        check_finite_differences(
            |t| {
                Dense::from(Linear::new(t[1].clone(), Some(t[2].clone())))
                    .forward(&t[0])
                    .unwrap()
            },
            &[&x, &w, &b],
            9,
            4,
        );
    }

    #[test]
    fn flat_inputs_match_flattening_first() {
        let mut rng = Rng::new(4);
        let dev = Device::Cpu;
        let (x, w, b) = (
            rng.normal(&[6, 3, 2, 5], &dev).unwrap(),
            rng.normal(&[4, 30], &dev).unwrap(),
            rng.normal(&[4], &dev).unwrap(),
        );
        let layer = |t: &[Tensor]| Dense::from(Linear::new(t[1].clone(), Some(t[2].clone())));
        let (y1, g1) = value_and_grads(|t| layer(t).forward_flat(&t[0]).unwrap(), &[&x, &w, &b], 3);
        let (y2, g2) = value_and_grads(
            |t| layer(t).forward(&t[0].flatten_from(1).unwrap()).unwrap(),
            &[&x, &w, &b],
            3,
        );
        assert_close(&y1, &y2, 0.0).unwrap();
        for (p, q) in g1.iter().zip(&g2) {
            assert_close(p, q, 0.0).unwrap();
        }
        assert_eq!(g1[0].dims(), x.dims());
        assert!(layer(&[x.clone(), w.clone(), b.clone()])
            .forward_flat(&rng.normal(&[6, 29], &dev).unwrap())
            .is_err());
    }

    #[test]
    fn an_input_without_variables_gets_no_gradient_and_bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        let w = Var::from_tensor(&rng.normal(&[4, 6], &dev).unwrap()).unwrap();
        let layer = Dense::from(Linear::new(w.as_tensor().clone(), None));
        let x = rng.normal(&[9, 6], &dev).unwrap();
        let grads = layer
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_none() && grads.get(w.as_tensor()).is_some());
        assert!(layer.forward(&rng.normal(&[9, 5], &dev).unwrap()).is_err());
        assert!(layer.forward(&Tensor::new(1f32, &dev).unwrap()).is_err());
    }
}
