//! Convolution and transposed convolution as `im2col`/`col2im` plus one gemm, with layers
//! whose tensor names match candle-nn's (and PyTorch's): `weight`, `bias`.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops::im2col::{col2im, im2col, Geometry};
use crate::{Error, Result};

/// `conv2d(x [n, c, h, w], weight [cout, c, k, k])` with `stride` and zero `pad`.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (cout, wc, k, k2) = weight.dims4()?;
    if wc != c || k != k2 {
        return Err(Error::Mismatch(format!(
            "conv2d: input {:?} and kernel {:?} do not fit",
            x.dims(),
            weight.dims()
        )));
    }
    let g = Geometry {
        c,
        h,
        w,
        k,
        stride,
        pad,
    };
    let cols = im2col(x, g)?.reshape((n * g.positions(), g.patch()))?;
    let y = cols.matmul(&weight.reshape((cout, g.patch()))?.t()?)?;
    Ok(y.reshape((n, g.positions(), cout))?
        .transpose(1, 2)?
        .reshape((n, cout, g.oh(), g.ow()))?)
}

/// `conv_transpose2d(x [n, cin, h, w], weight [cin, cout, k, k])`: the adjoint of
/// [`conv2d`], output side `(h − 1)·stride − 2·pad + k + out_pad`.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> Result<Tensor> {
    let (n, cin, h, w) = x.dims4()?;
    let (wc, cout, k, k2) = weight.dims4()?;
    if wc != cin || k != k2 || out_pad >= stride.max(1) || (h - 1) * stride + k + out_pad < 2 * pad
    {
        return Err(Error::Mismatch(format!(
            "conv_transpose2d: input {:?}, kernel {:?}, stride {stride}, pad {pad}, out_pad {out_pad} do not fit",
            x.dims(),
            weight.dims()
        )));
    }
    let side = |i: usize| (i - 1) * stride + k + out_pad - 2 * pad;
    let g = Geometry {
        c: cout,
        h: side(h),
        w: side(w),
        k,
        stride,
        pad,
    };
    g.validate()?;
    let rows = x
        .reshape((n, cin, h * w))?
        .transpose(1, 2)?
        .reshape((n * h * w, cin))?;
    let cols = rows.matmul(&weight.reshape((cin, g.patch()))?)?;
    col2im(&cols.reshape((n, h * w, g.patch()))?, g)
}

/// Which convolution a [`ConvLayer`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// [`conv2d`]; weight `[cout, cin, k, k]`.
    Forward,
    /// [`conv_transpose2d`] with this output padding; weight `[cin, cout, k, k]`.
    Transposed {
        /// Extra rows and columns at the bottom and right of the output.
        out_pad: usize,
    },
}

/// A convolution layer with square kernels, backed by [`conv2d`] or [`conv_transpose2d`],
/// whose tensors are named `weight` and `bias` like candle-nn's and PyTorch's.
pub struct ConvLayer {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
    kind: ConvKind,
}

impl ConvLayer {
    /// Creates the layer's tensors under `vb` (a `bias [cout]` only when `bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: ConvKind,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shape = match kind {
            ConvKind::Forward => (cout, cin, k, k),
            ConvKind::Transposed { .. } => (cin, cout, k, k),
        };
        let weight = vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(ConvLayer {
            weight,
            bias,
            stride,
            pad,
            kind,
        })
    }
}

impl ConvLayer {
    /// Multiply-adds of one forward pass over an `h × w` input image.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let d = self.weight.dims();
        let per_position = (d[0] * d[1] * d[2] * d[3]) as u64;
        match self.kind {
            ConvKind::Forward => {
                let out = |i: usize| (i + 2 * self.pad - d[2]) / self.stride + 1;
                per_position * (out(h) * out(w)) as u64
            }
            ConvKind::Transposed { .. } => per_position * (h * w) as u64,
        }
    }
}

impl Module for ConvLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (w, s, p) = (&self.weight, self.stride, self.pad);
        let y = match self.kind {
            ConvKind::Forward => conv2d(x, w, s, p),
            ConvKind::Transposed { out_pad } => conv_transpose2d(x, w, s, p, out_pad),
        }
        .map_err(candle_core::Error::wrap)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing;
    use crate::rng::Rng;
    use candle_core::Device;
    use proptest::prelude::*;

    /// Forward value and gradients (input, kernel) of `f` under a random linear loss.
    fn value_and_grads(
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
        x: &Tensor,
        w: &Tensor,
        seed: u64,
    ) -> (Tensor, Tensor, Tensor) {
        let (y, g) = testing::value_and_grads(|t| f(&t[0], &t[1]), &[x, w], seed);
        (y, g[0].clone(), g[1].clone())
    }

    fn close(a: &Tensor, b: &Tensor) -> std::result::Result<(), String> {
        testing::assert_close(a, b, 1e-4)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn conv2d_matches_candle_forward_and_backward(
            n in 1usize..4, c in 1usize..4, cout in 1usize..5, h in 2usize..10, w in 2usize..10,
            k in 1usize..6, stride in 1usize..4, pad in 0usize..3, seed in 0u64..1000,
        ) {
            prop_assume!(h + 2 * pad >= k && w + 2 * pad >= k && pad < k);
            // candle's own conv2d backward derives the output padding of its input gradient
            // from the height alone and fails when height and width leave different remainders.
            prop_assume!((h + 2 * pad - k) % stride == (w + 2 * pad - k) % stride);
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, c, h, w], &Device::Cpu).unwrap();
            let wt = rng.normal(&[cout, c, k, k], &Device::Cpu).unwrap();
            let ours = value_and_grads(|x, w| conv2d(x, w, stride, pad).unwrap(), &x, &wt, seed);
            let theirs = value_and_grads(|x, w| x.conv2d(w, pad, stride, 1, 1).unwrap(), &x, &wt, seed);
            close(&ours.0, &theirs.0).map_err(|e| TestCaseError::fail(format!("forward: {e}")))?;
            close(&ours.1, &theirs.1).map_err(|e| TestCaseError::fail(format!("input grad: {e}")))?;
            close(&ours.2, &theirs.2).map_err(|e| TestCaseError::fail(format!("kernel grad: {e}")))?;
        }

        #[test]
        fn conv_transpose2d_matches_candle_forward_and_backward(
            n in 1usize..4, cin in 1usize..4, cout in 1usize..5, h in 1usize..8, w in 1usize..8,
            k in 1usize..6, stride in 1usize..4, pad in 0usize..3, out_pad in 0usize..3, seed in 0u64..1000,
        ) {
            prop_assume!(out_pad < stride && pad < k && (h.min(w) - 1) * stride + k + out_pad > 2 * pad);
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, cin, h, w], &Device::Cpu).unwrap();
            let wt = rng.normal(&[cin, cout, k, k], &Device::Cpu).unwrap();
            let ours = value_and_grads(|x, w| conv_transpose2d(x, w, stride, pad, out_pad).unwrap(), &x, &wt, seed);
            let theirs = value_and_grads(|x, w| x.conv_transpose2d(w, pad, out_pad, stride, 1).unwrap(), &x, &wt, seed);
            close(&ours.0, &theirs.0).map_err(|e| TestCaseError::fail(format!("forward: {e}")))?;
            close(&ours.1, &theirs.1).map_err(|e| TestCaseError::fail(format!("input grad: {e}")))?;
            close(&ours.2, &theirs.2).map_err(|e| TestCaseError::fail(format!("kernel grad: {e}")))?;
        }
    }

    #[test]
    fn finite_differences_agree_with_the_gradient() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        let x = rng.normal(&[1, 2, 5, 5], &dev).unwrap();
        let wt = rng.normal(&[2, 3, 3, 3], &dev).unwrap();
        let f = |x: &Tensor, w: &Tensor| conv_transpose2d(x, w, 2, 1, 1).unwrap();
        let (_, gx, gw) = value_and_grads(f, &x, &wt, 7);
        let r = Rng::new(7).normal(f(&x, &wt).dims(), &dev).unwrap();
        let loss = |x: &Tensor, w: &Tensor| -> f64 {
            (f(x, w) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-2;
        for (t, g, is_x) in [(&x, &gx, true), (&wt, &gw, false)] {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in (0..v.len()).step_by(5) {
                let mut plus = v.clone();
                plus[i] += eps;
                let mut minus = v.clone();
                minus[i] -= eps;
                let tp = Tensor::from_vec(plus, t.dims(), &dev).unwrap();
                let tm = Tensor::from_vec(minus, t.dims(), &dev).unwrap();
                let (lp, lm) = if is_x {
                    (loss(&tp, &wt), loss(&tm, &wt))
                } else {
                    (loss(&x, &tp), loss(&x, &tm))
                };
                let fd = (lp - lm) / (2.0 * eps as f64);
                assert!(
                    (fd - gv[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()),
                    "{i}: fd {fd} vs {}",
                    gv[i]
                );
            }
        }
    }
}
