//! BatchNorm whose training-mode pass is one fused kernel: batch statistics, normalisation
//! and affine map in three sequential sweeps, and the closed-form backward pass in two.
//! candle-nn's version chains about a dozen broadcast tensor operations, each with its own
//! buffer and its own backward node. Tensor names and running-statistics updates are
//! PyTorch's (`weight`, `bias`, `running_mean`, `running_var`; momentum 0.1, unbiased
//! running variance), so checkpoints are unchanged.

use std::sync::{Arc, Mutex};

use candle_core::{Layout, ModuleT, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::ops::cpu::{
    activate, lane_sum, ncs, parallel_pieces, per_channel_block, threads, with_f32, Activation,
    F32Op, F32Op3,
};
use crate::ops::{leaky_relu, portable};
use crate::Result;

const NAME: &str = "batch-norm-train";

/// Batch normalisation over dimension 1 of `[n, c, …]` inputs.
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f32,
    momentum: f64,
}

/// A BatchNorm over `num_features` channels with PyTorch's defaults (eps 1e-5, momentum 0.1),
/// its tensors created under `vb`.
pub fn batch_norm(num_features: usize, vb: VarBuilder) -> Result<BatchNorm> {
    let get = |name, init| vb.get_with_hints(num_features, name, init);
    Ok(BatchNorm {
        weight: get("weight", Init::Const(1.0))?,
        bias: get("bias", Init::Const(0.0))?,
        running_mean: Var::from_tensor(&get("running_mean", Init::Const(0.0))?)?,
        running_var: Var::from_tensor(&get("running_var", Init::Const(1.0))?)?,
        eps: 1e-5,
        momentum: 0.1,
    })
}

impl BatchNorm {
    /// Normalises with the batch's statistics and moves the running statistics towards them;
    /// then applies a LeakyReLU of slope `leaky`, if given, in the same graph node.
    fn forward_train(&self, x: &Tensor, leaky: Option<f32>) -> candle_core::Result<Tensor> {
        let (y, mean, var) = if portable::applies(x) {
            let (y, mean, var) = portable::batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
            (
                portable::activate(y, leaky.map(Activation::LeakyRelu))?,
                mean,
                var,
            )
        } else {
            self.fused_train(x, leaky)?
        };
        let m = (x.elem_count() / x.dim(1)?) as f64;
        let blend = |running: &Var, batch: Tensor, scale: f64| -> candle_core::Result<()> {
            running.set(
                &((running.as_tensor() * (1.0 - self.momentum))?
                    + (batch * (self.momentum * scale))?)?,
            )
        };
        blend(&self.running_mean, mean, 1.0)?;
        blend(&self.running_var, var, m / (m - 1.0).max(1.0))?;
        Ok(y)
    }

    /// The fused kernel's training pass: its output and the batch's per-channel mean and
    /// biased variance (`[c]`).
    fn fused_train(
        &self,
        x: &Tensor,
        leaky: Option<f32>,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let stats = Arc::new(Mutex::new(None));
        let op = BatchNormTrain {
            eps: self.eps,
            stats: stats.clone(),
        };
        let y = x.contiguous()?.apply_op3(
            &self.weight,
            &self.bias,
            F32Op::with_activation(op, leaky.map(Activation::LeakyRelu)),
        )?;
        let stats = stats.lock().expect("stats lock").clone();
        let Some(s) = stats else {
            candle_core::bail!("batch-norm: statistics were not computed");
        };
        let shape = self.running_mean.dims();
        let dev = x.device();
        Ok((
            y,
            Tensor::from_vec(s.mean, shape, dev)?,
            Tensor::from_vec(s.var, shape, dev)?,
        ))
    }

    /// Normalises with the running statistics through candle's own ops (the portable path;
    /// on the CPU, [`BatchNormEval`] computes the same in one sweep).
    fn forward_eval(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rank = x.rank();
        let per_channel = |v: &Tensor| portable::per_channel(v, rank);
        let mean = per_channel(&self.running_mean.as_detached_tensor())?;
        let std = per_channel(&(self.running_var.as_detached_tensor() + self.eps as f64)?.sqrt()?)?;
        x.broadcast_sub(&mean)?
            .broadcast_div(&std)?
            .broadcast_mul(&per_channel(&self.weight)?)?
            .broadcast_add(&per_channel(&self.bias)?)
    }
}

impl BatchNorm {
    /// [`ModuleT::forward_t`] followed by a LeakyReLU of slope `slope` (at least 0; 0 is a
    /// ReLU), fused into one graph node in training mode.
    pub fn forward_leaky(&self, x: &Tensor, train: bool, slope: f64) -> Result<Tensor> {
        Ok(self.forward_act(x, train, Some(slope as f32))?)
    }

    fn forward_act(
        &self,
        x: &Tensor,
        train: bool,
        leaky: Option<f32>,
    ) -> candle_core::Result<Tensor> {
        let c = self.running_mean.elem_count();
        if x.rank() < 2 || x.dim(1)? != c {
            candle_core::bail!(
                "batch-norm over {c} channels cannot take an input of shape {:?}",
                x.dims()
            );
        }
        if train {
            return self.forward_train(x, leaky);
        }
        if !portable::applies(x) {
            let op = BatchNormEval {
                mean: self.running_mean.as_tensor().to_vec1()?,
                inv_std: (self.running_var.as_detached_tensor() + self.eps as f64)?
                    .sqrt()?
                    .recip()?
                    .to_vec1()?,
            };
            let act = leaky.map(Activation::LeakyRelu);
            return x.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                F32Op::with_activation(op, act),
            );
        }
        let y = self.forward_eval(x)?;
        match leaky {
            Some(slope) => leaky_relu(&y, slope as f64).map_err(candle_core::Error::wrap),
            None => Ok(y),
        }
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(x, train, None)
    }
}

/// Per-channel batch statistics.
#[derive(Debug, Clone)]
struct Stats {
    mean: Vec<f32>,
    /// Biased (population) variance.
    var: Vec<f32>,
    inv_std: Vec<f32>,
}

/// The training-mode forward kernel; it leaves its statistics in `stats` for the running
/// averages and for its backward pass.
struct BatchNormTrain {
    eps: f32,
    stats: Arc<Mutex<Option<Stats>>>,
}

/// Per-channel `Σ term(channel, a, b)` over the samples and spatial positions of two
/// `[n, c, s]` arrays, in parallel over channel blocks: f32 within a row of `s` values, f64
/// across rows.
fn channel_sums(
    (a, b): (&[f32], &[f32]),
    (n, c, s): (usize, usize, usize),
    term: impl Fn(usize, f32, f32) -> f32 + Sync,
) -> Vec<f64> {
    per_channel_block(c, |chs| {
        let mut acc = vec![0f64; chs.len()];
        for i in 0..n {
            if s == 1 {
                // `[n, c]` data: one value per channel and sample, summed across channels at once.
                let r = i * c + chs.start..i * c + chs.end;
                for ((t, ch), (&x, &y)) in acc
                    .iter_mut()
                    .zip(chs.clone())
                    .zip(a[r.clone()].iter().zip(&b[r]))
                {
                    *t += term(ch, x, y) as f64;
                }
            } else {
                for (t, ch) in acc.iter_mut().zip(chs.clone()) {
                    let r = (i * c + ch) * s..(i * c + ch + 1) * s;
                    *t += lane_sum(&a[r.clone()], &b[r], |x, y| term(ch, x, y)) as f64;
                }
            }
        }
        acc
    })
}

/// `act(p[ch]·a + q[ch]·b + r[ch])` element-wise over two `[n, c, s]` arrays (no activation:
/// the identity), in parallel over blocks of samples.
fn channel_affine(
    (a, b): (&[f32], &[f32]),
    (n, c, s): (usize, usize, usize),
    [p, q, r]: [&[f32]; 3],
    act: Option<Activation>,
) -> Vec<f32> {
    let per_sample = c * s;
    let samples = n.div_ceil(4 * threads()).max(1);
    let (out, _) = parallel_pieces(a.len(), per_sample * samples, |piece_index, piece| {
        let start = piece_index * per_sample * samples;
        for (i, sample) in piece.chunks_mut(per_sample).enumerate() {
            let off = start + i * per_sample;
            let (a, b) = (&a[off..off + per_sample], &b[off..off + per_sample]);
            if s == 1 {
                for (j, o) in sample.iter_mut().enumerate() {
                    *o = p[j] * a[j] + q[j] * b[j] + r[j];
                }
            } else {
                for (ch, o) in sample.chunks_mut(s).enumerate() {
                    let (a, b) = (&a[ch * s..(ch + 1) * s], &b[ch * s..(ch + 1) * s]);
                    let (p, q, r) = (p[ch], q[ch], r[ch]);
                    for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                        *o = p * x + q * y + r;
                    }
                }
            }
        }
        // While the piece is still in this thread's cache.
        activate(act, piece);
    });
    out
}

/// The per-channel scale `γ·σ⁻¹` of the normalisation's affine map.
fn scale(gamma: &[f32], inv_std: &[f32]) -> Vec<f32> {
    gamma.iter().zip(inv_std).map(|(g, i)| g * i).collect()
}

/// `act(γ·(x − μ)·σ⁻¹ + β)` per channel of `[n, c, s]` data, for the statistics `mean` (μ)
/// and `inv_std` (σ⁻¹) a pass normalises with: the batch's in training, the running ones in
/// evaluation.
fn normalise(
    x: &[f32],
    dims: (usize, usize, usize),
    [gamma, beta]: [&[f32]; 2],
    [mean, inv_std]: [&[f32]; 2],
    act: Option<Activation>,
) -> Vec<f32> {
    let c = dims.1;
    let scale = scale(gamma, inv_std);
    let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
    channel_affine((x, x), dims, [&scale, &vec![0.0; c], &shift], act)
}

/// The affine map's gradients per channel, `(dγ, dβ) = (Σ dy·(x − μ)·σ⁻¹, Σ dy)`.
fn affine_gradients(
    (dy, x): (&[f32], &[f32]),
    dims: (usize, usize, usize),
    [mean, inv_std]: [&[f32]; 2],
) -> (Vec<f64>, Vec<f64>) {
    let dgamma = channel_sums((dy, x), dims, |ch, g, v| g * (v - mean[ch]) * inv_std[ch]);
    (dgamma, channel_sums((dy, dy), dims, |_, g, _| g))
}

/// The gradients of a batch-norm kernel's three inputs (x, γ, β).
type Gradients = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// [`Gradients`] from their values: `dx` shaped as `x`, the channel sums `(dγ, dβ)` as f32
/// (none for a frozen network's scale and shift).
fn gradients(
    x: &Tensor,
    dx: Vec<f32>,
    affine: Option<(Vec<f64>, Vec<f64>)>,
) -> candle_core::Result<Gradients> {
    let dev = x.device();
    let channel = |v: Vec<f64>| {
        let c = v.len();
        Tensor::from_vec(v.into_iter().map(|t| t as f32).collect(), c, dev)
    };
    let (dgamma, dbeta) = match affine {
        Some((dgamma, dbeta)) => (Some(channel(dgamma)?), Some(channel(dbeta)?)),
        None => (None, None),
    };
    Ok((Some(Tensor::from_vec(dx, x.shape(), dev)?), dgamma, dbeta))
}

impl F32Op3 for BatchNormTrain {
    const NAME: &'static str = NAME;

    fn forward(
        &self,
        [(x, l1), (gamma, _), (beta, _)]: [(&[f32], &Layout); 3],
        act: Option<Activation>,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let dims @ (n, _, s) = ncs(l1.shape());
        let m = (n * s) as f64;
        let mean: Vec<f32> = channel_sums((x, x), dims, |_, v, _| v)
            .into_iter()
            .map(|t| (t / m) as f32)
            .collect();
        let var: Vec<f32> = channel_sums((x, x), dims, |ch, v, _| (v - mean[ch]).powi(2))
            .into_iter()
            .map(|t| (t / m) as f32)
            .collect();
        let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let y = normalise(x, dims, [gamma, beta], [&mean, &inv_std], act);
        *self.stats.lock().expect("stats lock") = Some(Stats { mean, var, inv_std });
        Ok((y, l1.shape().clone()))
    }

    /// `dβ = Σ dy`, `dγ = Σ dy·x̂`, `dx = γ·σ⁻¹/m · (m·dy − dβ − x̂·dγ)` per channel.
    fn backward(&self, [x, gamma, _]: [&Tensor; 3], dy: &Tensor) -> candle_core::Result<Gradients> {
        let Some(st) = self.stats.lock().expect("stats lock").clone() else {
            candle_core::bail!("batch-norm: backward before forward");
        };
        let dims @ (n, c, s) = ncs(x.shape());
        let gamma = gamma.to_vec1::<f32>()?;
        let (dx, dgamma, dbeta) = with_f32(x, NAME, |x| {
            with_f32(dy, NAME, |dy| {
                let (dgamma, dbeta) = affine_gradients((dy, x), dims, [&st.mean, &st.inv_std]);
                // dx = k·(m·dy − dβ − x̂·dγ) with k = γ·σ⁻¹/m: linear in dy and x per channel.
                let m = (n * s) as f32;
                let (mut p, mut q, mut r) = (vec![0f32; c], vec![0f32; c], vec![0f32; c]);
                for ch in 0..c {
                    let (inv, db, dg) = (st.inv_std[ch], dbeta[ch] as f32, dgamma[ch] as f32);
                    let k = gamma[ch] * inv / m;
                    p[ch] = k * m;
                    q[ch] = -k * dg * inv;
                    r[ch] = -k * db + k * dg * inv * st.mean[ch];
                }
                let dx = channel_affine((dy, x), dims, [&p, &q, &r], None);
                (dx, dgamma, dbeta)
            })
        })??;
        gradients(x, dx, Some((dgamma, dbeta)))
    }
}

/// The evaluation-mode kernel: `γ·(x − μ)·σ⁻¹ + β` per channel with the running statistics
/// (`mean`, `inv_std`, constants of the pass), in one sweep forward and back. candle's own
/// ops take four broadcast operations forward and, backward, reductions of `[n, c, h, w]`
/// gradients on one thread: most of a ReD step's time outside gemm.
struct BatchNormEval {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl F32Op3 for BatchNormEval {
    const NAME: &'static str = NAME;

    fn forward(
        &self,
        [(x, l1), (gamma, _), (beta, _)]: [(&[f32], &Layout); 3],
        act: Option<Activation>,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let stats = [self.mean.as_slice(), &self.inv_std];
        let y = normalise(x, ncs(l1.shape()), [gamma, beta], stats, act);
        Ok((y, l1.shape().clone()))
    }

    /// `dx = γ·σ⁻¹·dy`, and `dγ = Σ dy·(x − μ)·σ⁻¹`, `dβ = Σ dy` per channel unless the
    /// scale and shift are no variable's (a frozen network's, as the convolutions skip theirs).
    fn backward(
        &self,
        [x, gamma, beta]: [&Tensor; 3],
        dy: &Tensor,
    ) -> candle_core::Result<Gradients> {
        let dims @ (_, c, _) = ncs(x.shape());
        let need_affine = gamma.track_op() || beta.track_op();
        let scale = scale(&gamma.to_vec1::<f32>()?, &self.inv_std);
        let (dx, affine) = with_f32(x, NAME, |x| {
            with_f32(dy, NAME, |dy| {
                let stats = [self.mean.as_slice(), &self.inv_std];
                let affine = need_affine.then(|| affine_gradients((dy, x), dims, stats));
                let zero = vec![0.0; c];
                let dx = channel_affine((dy, dy), dims, [&scale, &zero, &zero], None);
                (dx, affine)
            })
        })??;
        gradients(x, dx, affine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::assert_close;
    use crate::rng::Rng;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use proptest::prelude::*;

    /// Ours and candle-nn's BatchNorm over the same fresh tensors.
    fn pair(c: usize) -> (BatchNorm, candle_nn::BatchNorm, VarMap, VarMap) {
        let (a, b) = (VarMap::new(), VarMap::new());
        let dev = Device::Cpu;
        let ours = batch_norm(c, VarBuilder::from_varmap(&a, DType::F32, &dev)).unwrap();
        let cfg = candle_nn::BatchNormConfig {
            eps: 1e-5,
            remove_mean: true,
            affine: true,
            momentum: 0.1,
        };
        let theirs =
            candle_nn::batch_norm(c, cfg, VarBuilder::from_varmap(&b, DType::F32, &dev)).unwrap();
        (ours, theirs, a, b)
    }

    fn get(m: &VarMap, name: &str) -> Tensor {
        m.data().lock().unwrap()[name].as_tensor().clone()
    }

    /// Training- or evaluation-mode output and the gradients (input, scale, shift) of a random
    /// linear loss.
    fn run(
        bn: &dyn ModuleT,
        m: &VarMap,
        x: &Tensor,
        seed: u64,
        train: bool,
    ) -> (Tensor, Vec<Tensor>) {
        let xv = Var::from_tensor(&x.copy().unwrap()).unwrap();
        let y = bn.forward_t(xv.as_tensor(), train).unwrap();
        let r = Rng::new(seed).normal(y.dims(), &Device::Cpu).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |t: &Tensor| grads.get(t).unwrap().clone();
        let grads = vec![g(xv.as_tensor()), g(&get(m, "weight")), g(&get(m, "bias"))];
        (y, grads)
    }

    #[test]
    fn a_fused_leaky_relu_matches_the_separate_op() {
        let x = (Rng::new(6).normal(&[7, 3, 4, 4], &Device::Cpu).unwrap() * 2.0).unwrap();
        for (slope, train) in [(0.0, true), (0.3, true), (0.3, false)] {
            let (fused, _, a, _) = pair(3);
            let (apart, _, b, _) = pair(3);
            let f = crate::ops::testing::value_and_grad(
                |x| fused.forward_leaky(x, train, slope).unwrap(),
                &x,
                2,
            );
            let g = crate::ops::testing::value_and_grad(
                |x| leaky_relu(&apart.forward_t(x, train).unwrap(), slope).unwrap(),
                &x,
                2,
            );
            assert_close(&f.0, &g.0, 1e-6).unwrap();
            assert_close(&f.1, &g.1, 1e-6).unwrap();
            for name in ["running_mean", "running_var"] {
                assert_close(&get(&a, name), &get(&b, name), 0.0).unwrap();
            }
        }
    }

    #[test]
    fn finite_differences_agree_with_the_gradient() {
        let x = Rng::new(4).normal(&[4, 3, 2, 2], &Device::Cpu).unwrap();
        let gamma = Rng::new(5).normal(&[3], &Device::Cpu).unwrap();
        // The kernel itself, with the scale and shift as explicit inputs.
        crate::ops::testing::check_finite_differences(
            |t| {
                let op = BatchNormTrain {
                    eps: 1e-5,
                    stats: Arc::new(Mutex::new(None)),
                };
                t[0].apply_op3(&t[1], &t[2], F32Op::new(op)).unwrap()
            },
            &[&x, &gamma, &gamma.affine(0.5, 0.1).unwrap()],
            6,
            1,
        );
    }

    #[test]
    fn a_frozen_scale_and_shift_get_no_evaluation_gradient() {
        let dev = Device::Cpu;
        let x = Rng::new(9).normal(&[2, 3, 2, 2], &dev).unwrap();
        let dy = Rng::new(10).normal(&[2, 3, 2, 2], &dev).unwrap();
        let op = BatchNormEval {
            mean: vec![0.1, 0.2, 0.3],
            inv_std: vec![1.0, 2.0, 0.5],
        };
        let gamma = Tensor::new(&[1.0f32, -0.5, 2.0], &dev).unwrap();
        let beta = gamma.affine(0.3, 0.1).unwrap();
        let frozen = op.backward([&x, &gamma, &beta], &dy).unwrap();
        let live = Var::from_tensor(&gamma).unwrap();
        let tracked = op.backward([&x, live.as_tensor(), &beta], &dy).unwrap();
        assert!(frozen.1.is_none() && frozen.2.is_none());
        assert!(tracked.1.is_some() && tracked.2.is_some());
        assert_close(&frozen.0.unwrap(), &tracked.0.unwrap(), 0.0).unwrap();
    }

    #[test]
    fn finite_differences_agree_with_the_evaluation_gradient() {
        let x = Rng::new(7).normal(&[3, 2, 2, 3], &Device::Cpu).unwrap();
        let gamma = Rng::new(8).normal(&[2], &Device::Cpu).unwrap();
        crate::ops::testing::check_finite_differences(
            |t| {
                let op = BatchNormEval {
                    mean: vec![0.3, -0.2],
                    inv_std: vec![1.5, 0.7],
                };
                // (The fused activation's kink defeats finite differences; it is tested
                // against the separate op in `a_fused_leaky_relu_matches_the_separate_op`.)
                t[0].apply_op3(&t[1], &t[2], F32Op::new(op)).unwrap()
            },
            &[&x, &gamma, &gamma.affine(0.5, 0.1).unwrap()],
            9,
            1,
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(30))]
        #[test]
        fn matches_candle_nn_in_training_and_evaluation(
            n in 2usize..6, c in 1usize..5, h in 1usize..6, w in 1usize..6, flat in any::<bool>(),
            seed in 0u64..1000,
        ) {
            let dev = Device::Cpu;
            let mut rng = Rng::new(seed);
            let shape: Vec<usize> = if flat { vec![n, c] } else { vec![n, c, h, w] };
            let x = (rng.normal(&shape, &dev).unwrap() * 3.0).unwrap();
            let gamma = rng.normal(&[c], &dev).unwrap();
            let beta = rng.normal(&[c], &dev).unwrap();
            let (ours, theirs, a, b) = pair(c);
            for m in [&a, &b] {
                let data = m.data().lock().unwrap();
                data["weight"].set(&gamma).unwrap();
                data["bias"].set(&beta).unwrap();
            }
            let (y1, g1) = run(&ours, &a, &x, seed, true);
            let (y2, g2) = run(&theirs, &b, &x, seed, true);
            assert_close(&y1, &y2, 1e-4).map_err(|e| TestCaseError::fail(format!("forward: {e}")))?;
            for (what, (p, q)) in ["dx", "dgamma", "dbeta"].iter().zip(g1.iter().zip(&g2)) {
                assert_close(p, q, 1e-4).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
            }
            for name in ["running_mean", "running_var"] {
                assert_close(&get(&a, name), &get(&b, name), 1e-5).map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
            }
            // Evaluation mode, with the running statistics the training pass left.
            let (e1, g1) = run(&ours, &a, &x, seed + 1, false);
            let (e2, g2) = run(&theirs, &b, &x, seed + 1, false);
            assert_close(&e1, &e2, 1e-5).map_err(|e| TestCaseError::fail(format!("eval: {e}")))?;
            for (what, (p, q)) in ["dx", "dgamma", "dbeta"].iter().zip(g1.iter().zip(&g2)) {
                assert_close(p, q, 1e-4).map_err(|e| TestCaseError::fail(format!("eval {what}: {e}")))?;
            }
        }
    }
}
