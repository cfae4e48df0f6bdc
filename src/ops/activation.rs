//! LeakyReLU (ReLU at slope 0) as one fused kernel per direction. candle-nn's version builds
//! it from `maximum`, `minimum`, a multiply and an add, each with its own buffer and backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::ops::cpu::{activation_grad, elementwise, f32_slice, Activation};
use crate::Result;

/// `max(x, 0) + slope · min(x, 0)`, element-wise, differentiable.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    if crate::ops::portable::applies(x) {
        return Ok(crate::ops::portable::leaky_relu(x, slope)?);
    }
    Ok(x.contiguous()?.apply_op1(LeakyRelu {
        slope: slope as f32,
    })?)
}

/// The kernel of [`leaky_relu`].
struct LeakyRelu {
    slope: f32,
}

impl CustomOp1 for LeakyRelu {
    fn name(&self) -> &'static str {
        "leaky-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let act = Activation::LeakyRelu(self.slope);
        let y = elementwise(x, x, move |v, _| act.apply(v));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// `dy · (x > 0 ? 1 : slope)`: [`Activation::grad`] read at the input, whose sign is where
    /// the derivative switches for any slope (for the slopes of at least 0 that the fused
    /// layers take, the output's sign is the same).
    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(activation_grad(
            Activation::LeakyRelu(self.slope),
            x,
            grad,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, value_and_grad};
    use crate::rng::Rng;
    use candle_core::Device;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(30))]
        #[test]
        fn matches_candle_nn_forward_and_backward(
            n in 1usize..5, c in 1usize..6, side in 1usize..9, slope in 0.0f64..0.5, seed in 0u64..1000,
        ) {
            let x = Rng::new(seed).normal(&[n, c, side, side], &Device::Cpu).unwrap();
            let ours = value_and_grad(|x| leaky_relu(x, slope).unwrap(), &x, seed);
            let theirs = value_and_grad(|x| candle_nn::ops::leaky_relu(x, slope).unwrap(), &x, seed);
            assert_close(&ours.0, &theirs.0, 1e-6).map_err(TestCaseError::fail)?;
            assert_close(&ours.1, &theirs.1, 1e-6).map_err(TestCaseError::fail)?;
        }
    }

    #[test]
    fn finite_differences_agree_with_the_gradient() {
        // Values away from the kink at 0, where the derivative jumps.
        let x = Rng::new(2).normal(&[3, 7], &Device::Cpu).unwrap();
        let x = (x.sign().unwrap() * 0.2 + &x).unwrap();
        crate::ops::testing::check_finite_differences(
            |t| leaky_relu(&t[0], 0.3).unwrap(),
            &[&x],
            3,
            1,
        );
    }

    #[test]
    fn inputs_of_several_parallel_pieces_match_candle_nn() {
        let x = Rng::new(5).normal(&[3, 40_001], &Device::Cpu).unwrap();
        let ours = value_and_grad(|x| leaky_relu(x, 0.2).unwrap(), &x, 6);
        let theirs = value_and_grad(|x| candle_nn::ops::leaky_relu(x, 0.2).unwrap(), &x, 6);
        assert_close(&ours.0, &theirs.0, 1e-6).unwrap();
        assert_close(&ours.1, &theirs.1, 1e-6).unwrap();
    }

    #[test]
    fn non_contiguous_input_and_relu() {
        let x = Rng::new(1).normal(&[3, 4], &Device::Cpu).unwrap();
        let y = leaky_relu(&x.t().unwrap(), 0.0).unwrap();
        let r = x.t().unwrap().relu().unwrap();
        assert_close(&y, &r, 0.0).unwrap();
    }
}
