//! Dropout's multiplication by a constant mask as one graph node. candle's `mul` would also
//! compute, zero-fill and accumulate a gradient for the mask, which nothing uses, at every
//! backward pass: three extra sweeps over a tensor of the layer's size.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::ops::cpu::{elementwise, f32_slice, with_f32};
use crate::{Error, Result};

/// `x · mask` element-wise for a `mask` of `x`'s shape that is a constant of the graph (a
/// dropout mask): the backward pass gives `x` the gradient `dy · mask` and the mask none.
pub fn masked(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if x.dims() != mask.dims() {
        return Err(Error::Mismatch(format!(
            "mask {:?} does not fit the tensor {:?}",
            mask.dims(),
            x.dims()
        )));
    }
    if crate::ops::portable::applies(x) {
        return Ok((x * mask.detach())?);
    }
    Ok(x.contiguous()?.apply_op1(Masked {
        mask: mask.detach(),
    })?)
}

/// The op of [`masked`], holding its mask.
struct Masked {
    mask: Tensor,
}

impl CustomOp1 for Masked {
    fn name(&self) -> &'static str {
        "masked"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.times_mask(f32_slice(s, l, self.name())?)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(grad, self.name(), |g| self.times_mask(g))??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl Masked {
    /// `values · mask` element-wise (forward on the input, backward on the output gradient).
    fn times_mask(&self, values: &[f32]) -> candle_core::Result<Vec<f32>> {
        with_f32(&self.mask, "masked", |m| {
            elementwise(values, m, |a, b| a * b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, value_and_grad};
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    #[test]
    fn matches_a_multiplication_and_gives_the_mask_no_gradient() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(4);
        // Larger than one parallel piece of `elementwise`.
        let x = rng.normal(&[3, 5, 70, 70], &dev).unwrap();
        let mask = rng.dropout_mask(x.dims(), 0.3, &dev).unwrap();
        let ours = value_and_grad(|x| masked(x, &mask).unwrap(), &x, 1);
        let theirs = value_and_grad(|x| (x * &mask).unwrap(), &x, 1);
        assert_close(&ours.0, &theirs.0, 0.0).unwrap();
        assert_close(&ours.1, &theirs.1, 0.0).unwrap();
        // A mask that is a variable still gets no gradient: it is a constant of the op.
        let mv = Var::from_tensor(&mask).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let grads = masked(xv.as_tensor(), mv.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(xv.as_tensor()).is_some() && grads.get(mv.as_tensor()).is_none());
        let wrong = rng.normal(&[3, 5, 70, 69], &dev).unwrap();
        assert!(masked(&x, &wrong).is_err());
    }
}
