//! GroupNorm, optionally followed by SiLU, as one fused kernel per direction: per (sample,
//! group) statistics, normalisation, the per-channel affine map and the activation in one
//! sweep forward, and the closed-form gradients in one sweep back. candle-nn's `GroupNorm`
//! and `silu` chain about a dozen tensor operations, each with its own buffer and backward
//! node; in the diffusion U-Net they took most of a training step. Tensor names are
//! PyTorch's and candle-nn's (`weight`, `bias`), so checkpoints do not change.

use candle_core::{Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops::cpu::{
    activate, lane_sum, ncs, parallel_map, parallel_pieces, wide, with_f32, Activation, F32Op,
    F32Op3,
};
use crate::ops::fastexp::sigmoid;
use crate::ops::portable;
use crate::Result;

const NAME: &str = "group-norm";

/// GroupNorm over dimension 1 of `[n, c, …]` inputs, with an optional SiLU after it.
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
}

/// A GroupNorm of `channels` in `groups` groups (eps 1e-5, PyTorch's default), followed by
/// SiLU when `silu`; its tensors are created under `vb`.
pub fn group_norm(groups: usize, channels: usize, silu: bool, vb: VarBuilder) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(crate::Error::Config(format!(
            "GroupNorm: {groups} groups do not divide {channels} channels"
        )));
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
        groups,
        eps: 1e-5,
        silu,
    })
}

impl GroupNorm {
    /// The same norm with `eps` instead of PyTorch's default 1e-5.
    pub fn with_eps(self, eps: f32) -> Self {
        GroupNorm { eps, ..self }
    }

    /// Its channels.
    pub(crate) fn channels(&self) -> usize {
        self.weight.elem_count()
    }

    /// The kernel's settings and the `(weight, bias)` tensors, for an op that normalises its
    /// own input with this norm (a convolution's, `ConvLayer::forward_normed`).
    pub(crate) fn parts(&self) -> (GroupNormOp, &Tensor, &Tensor) {
        let op = GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            silu: self.silu,
        };
        (op, &self.weight, &self.bias)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let c = self.channels();
        if x.rank() < 2 || x.dim(1)? != c {
            candle_core::bail!(
                "group-norm over {c} channels cannot take an input of shape {:?}",
                x.dims()
            );
        }
        if portable::applies(x) {
            let (w, b) = (&self.weight, &self.bias);
            return portable::group_norm(x, w, b, self.groups, self.eps, self.silu);
        }
        let (op, weight, bias) = self.parts();
        x.contiguous()?.apply_op3(weight, bias, F32Op::new(op))
    }
}

#[cfg(test)]
impl GroupNorm {
    /// A norm of the tensors `weight` and `bias` (a test's variables), eps 1e-5.
    pub(crate) fn of(weight: Tensor, bias: Tensor, groups: usize, silu: bool) -> Self {
        GroupNorm {
            weight,
            bias,
            groups,
            eps: 1e-5,
            silu,
        }
    }
}

/// The fused kernel's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
}

fn silu(z: f32) -> f32 {
    z * sigmoid(z)
}

impl GroupNormOp {
    /// Mean and inverse standard deviation of one (sample, group) block of rows of `s`
    /// values: f32 lane sums within a row, f64 across rows.
    #[inline(always)]
    fn stats(&self, block: &[f32], s: usize) -> (f32, f32) {
        let m = block.len() as f64;
        let total = |f: &dyn Fn(&[f32]) -> f32| block.chunks(s).map(|r| f(r) as f64).sum::<f64>();
        let mean = (total(&|r| lane_sum(r, r, |v, _| v)) / m) as f32;
        let var = total(&|r| lane_sum(r, r, |v, _| (v - mean) * (v - mean))) / m;
        (mean, 1.0 / (var as f32 + self.eps).sqrt())
    }

    /// The forward pass of whole images `xs` `[images, c, s]` (`c` the length of `gamma`),
    /// written to `out`, block by block through [`wide`].
    pub(crate) fn forward_images(
        &self,
        xs: &[f32],
        s: usize,
        (gamma, beta): (&[f32], &[f32]),
        act: Option<Activation>,
        out: &mut [f32],
    ) {
        let (c, cg) = (gamma.len(), gamma.len() / self.groups);
        for (image, out) in xs.chunks(c * s).zip(out.chunks_mut(c * s)) {
            let blocks = image.chunks(cg * s).zip(out.chunks_mut(cg * s));
            for ((xs, out), (gm, bt)) in blocks.zip(gamma.chunks(cg).zip(beta.chunks(cg))) {
                wide(
                    #[inline(always)]
                    move || self.forward_block(xs, s, (gm, bt), act, out),
                )
            }
        }
    }

    /// The backward pass of whole images `xs` `[images, c, s]` in place: `dz` holds their
    /// output gradient on entry and their input gradient on return. Returns each channel's
    /// `(Σ dz, Σ dz·x̂)` (the bias's and the weight's gradients), summed in image order.
    pub(crate) fn backward_images(
        &self,
        xs: &[f32],
        s: usize,
        (gamma, beta): (&[f32], &[f32]),
        dz: &mut [f32],
    ) -> Vec<(f32, f32)> {
        let (c, cg) = (gamma.len(), gamma.len() / self.groups);
        let mut totals = vec![(0f32, 0f32); c];
        for (image, dz) in xs.chunks(c * s).zip(dz.chunks_mut(c * s)) {
            let blocks = image.chunks(cg * s).zip(dz.chunks_mut(cg * s));
            let affine = gamma.chunks(cg).zip(beta.chunks(cg));
            for (((xs, dz), (gm, bt)), sums) in blocks.zip(affine).zip(totals.chunks_mut(cg)) {
                let block = wide(
                    #[inline(always)]
                    move || self.backward_block(xs, s, (gm, bt), dz),
                );
                for (t, b) in sums.iter_mut().zip(block) {
                    *t = (t.0 + b.0, t.1 + b.1);
                }
            }
        }
        totals
    }

    /// The forward pass of one (sample, group) block `xs` of rows of `s` values, with its
    /// channels' scales and shifts `(gamma, beta)`, written to `out`. Inlined into a
    /// [`wide`] call, so its loops use the widest vectors the CPU has.
    #[inline(always)]
    fn forward_block(
        &self,
        xs: &[f32],
        s: usize,
        (gamma, beta): (&[f32], &[f32]),
        act: Option<Activation>,
        out: &mut [f32],
    ) {
        let (mean, inv_std) = self.stats(xs, s);
        let rows = out.chunks_mut(s).zip(xs.chunks(s));
        for ((o, src), (&gm, &bt)) in rows.zip(gamma.iter().zip(beta)) {
            let (a, b) = (gm * inv_std, bt - gm * inv_std * mean);
            let pairs = o.iter_mut().zip(src);
            if self.silu {
                pairs.for_each(|(o, &v)| *o = silu(v * a + b));
            } else {
                pairs.for_each(|(o, &v)| *o = v * a + b);
            }
        }
        activate(act, out);
    }

    /// The input gradient of one (sample, group) block `xs` (rows of `s` values; its
    /// channels' `(gamma, beta)`), in place: `out` holds the block's output gradient on
    /// entry. Returns the block's channels' `(Σ dz, Σ dz·x̂)`. Inlined into a [`wide`] call,
    /// as [`GroupNormOp::forward_block`].
    #[inline(always)]
    fn backward_block(
        &self,
        xs: &[f32],
        s: usize,
        (gamma, beta): (&[f32], &[f32]),
        out: &mut [f32],
    ) -> Vec<(f32, f32)> {
        let (mean, inv_std) = self.stats(xs, s);
        let m = xs.len() as f32;
        let mut channel = Vec::with_capacity(gamma.len());
        let (mut sum_g, mut sum_gx) = (0f32, 0f32);
        let rows = out.chunks_mut(s).zip(xs.chunks(s));
        for ((o, xr), (&gm, &bt)) in rows.zip(gamma.iter().zip(beta)) {
            // o = dz first (dy through SiLU's derivative, or dy itself).
            if self.silu {
                for (o, &v) in o.iter_mut().zip(xr) {
                    let z = gm * (v - mean) * inv_std + bt;
                    let sg = sigmoid(z);
                    *o = *o * sg * (1.0 + z * (1.0 - sg));
                }
            }
            let xhat = |v: f32| (v - mean) * inv_std;
            let dbeta = lane_sum(o, o, |dz, _| dz);
            let dgamma = lane_sum(o, xr, |dz, v| dz * xhat(v));
            channel.push((dbeta, dgamma));
            sum_g += gm * dbeta;
            sum_gx += gm * dgamma;
            o.iter_mut().for_each(|dz| *dz *= gm);
        }
        for (o, &v) in out.iter_mut().zip(xs) {
            let xh = (v - mean) * inv_std;
            *o = inv_std / m * (m * *o - sum_g - xh * sum_gx);
        }
        channel
    }
}

impl F32Op3 for GroupNormOp {
    const NAME: &'static str = NAME;

    fn forward(
        &self,
        [(x, l1), (gamma, _), (beta, _)]: [(&[f32], &Layout); 3],
        act: Option<Activation>,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (n, c, s) = ncs(l1.shape());
        let (y, _) = parallel_pieces(n * c * s, c * s, |i, out| {
            self.forward_images(&x[i * c * s..][..c * s], s, (gamma, beta), act, out)
        });
        Ok((y, l1.shape().clone()))
    }

    /// With `z = γ·x̂ + β` and `dz = dy·silu'(z)` (or `dy`): `dβ = Σ dz`, `dγ = Σ dz·x̂` per
    /// channel, and per (sample, group) block of `m` values with `g = γ·dz`:
    /// `dx = σ⁻¹/m · (m·g − Σ g − x̂·Σ g·x̂)`.
    fn backward(
        &self,
        [x, gamma, beta]: [&Tensor; 3],
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, s) = ncs(x.shape());
        let gamma = gamma.to_vec1::<f32>()?;
        let beta = beta.to_vec1::<f32>()?;
        let (dx, per_sample) = with_f32(x, NAME, |x| {
            with_f32(dy, NAME, |dy| {
                parallel_pieces(n * c * s, c * s, |i, out| {
                    out.copy_from_slice(&dy[i * c * s..][..c * s]);
                    self.backward_images(&x[i * c * s..][..c * s], s, (&gamma, &beta), out)
                })
            })
        })??;
        // Per-channel totals over the samples, summed in sample order (thread-count independent).
        let totals = parallel_map(c, |ch| {
            per_sample.iter().fold((0f32, 0f32), |(b, w), sums| {
                (b + sums[ch].0, w + sums[ch].1)
            })
        });
        let dev = x.device();
        let dgamma = Tensor::from_vec(totals.iter().map(|t| t.1).collect(), c, dev)?;
        let dbeta = Tensor::from_vec(totals.iter().map(|t| t.0).collect(), c, dev)?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(dgamma),
            Some(dbeta),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Params;
    use crate::ops::testing::{assert_close, value_and_grads};
    use crate::rng::Rng;
    use candle_core::Device;
    use proptest::prelude::*;

    /// candle-nn's GroupNorm (and SiLU) with the same weight and bias.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
        let c = w.elem_count();
        let gn = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-5).unwrap();
        let y = gn.forward(x).unwrap();
        if silu {
            y.silu().unwrap()
        } else {
            y
        }
    }

    fn ours(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
        x.contiguous()
            .unwrap()
            .apply_op3(
                w,
                b,
                F32Op::new(GroupNormOp {
                    groups,
                    eps: 1e-5,
                    silu,
                }),
            )
            .unwrap()
    }

    /// The block kernels give the same bits compiled for the baseline (called here
    /// directly) and for AVX2 and FMA (called through [`wide`], as the op does), with and
    /// without SiLU: the wider instructions change no rounding.
    #[test]
    fn wide_and_baseline_blocks_give_the_same_bits() {
        let (cg, s) = (3, 37);
        let x: Vec<f32> = (0..cg * s)
            .map(|i| (i as f32 * 0.731).sin() * 3.0 + 0.2)
            .collect();
        let dy: Vec<f32> = (0..cg * s).map(|i| (i as f32 * 1.37).cos()).collect();
        let (gamma, beta) = ([0.7f32, 1.3, -0.4], [0.1f32, -0.6, 0.25]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for silu in [false, true] {
            let op = GroupNormOp {
                groups: 1,
                eps: 1e-5,
                silu,
            };
            let act = Some(Activation::LeakyRelu(0.2));
            let (mut base, mut fast) = (vec![0f32; cg * s], vec![0f32; cg * s]);
            op.forward_block(&x, s, (&gamma, &beta), act, &mut base);
            wide(
                #[inline(always)]
                || op.forward_block(&x, s, (&gamma, &beta), act, &mut fast),
            );
            assert_eq!(bits(&base), bits(&fast));
            base.copy_from_slice(&dy);
            fast.copy_from_slice(&dy);
            let sums = op.backward_block(&x, s, (&gamma, &beta), &mut base);
            let wide_sums = wide(
                #[inline(always)]
                || op.backward_block(&x, s, (&gamma, &beta), &mut fast),
            );
            assert_eq!(bits(&base), bits(&fast));
            assert_eq!(sums, wide_sums);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(30))]
        #[test]
        fn matches_candle_nn_forward_and_every_gradient(
            n in 1usize..4, groups in 1usize..4, per in 1usize..4, h in 1usize..7, w in 1usize..7,
            silu: bool, seed in 0u64..1000,
        ) {
            // A group of one value has no variance: its normalised value is 0 times
            // 1/√eps ≈ 316, and the kernel's fused affine form x·a + (b − mean·a) leaves a
            // cancellation error of about 1e-4 there (measured). No layer has groups of one.
            prop_assume!(per * h * w > 1);
            let c = groups * per;
            let mut rng = Rng::new(seed);
            let x = ((rng.normal(&[n, c, h, w], &Device::Cpu).unwrap() * 2.0).unwrap() + 0.5).unwrap();
            let gw = (rng.normal(&[c], &Device::Cpu).unwrap() + 1.0).unwrap();
            let gb = rng.normal(&[c], &Device::Cpu).unwrap();
            let inputs = [&x, &gw, &gb];
            let a = value_and_grads(|t| ours(&t[0], &t[1], &t[2], groups, silu), &inputs, seed);
            let b = value_and_grads(|t| reference(&t[0], &t[1], &t[2], groups, silu), &inputs, seed);
            assert_close(&a.0, &b.0, 1e-4).map_err(TestCaseError::fail)?;
            for (ga, gb) in a.1.iter().zip(&b.1) {
                assert_close(ga, gb, 2e-3).map_err(TestCaseError::fail)?;
            }
        }
    }

    #[test]
    fn finite_differences_agree_with_the_gradient() {
        let mut rng = Rng::new(3);
        let x = rng.normal(&[2, 4, 3, 3], &Device::Cpu).unwrap();
        let w = (rng.normal(&[4], &Device::Cpu).unwrap() + 1.0).unwrap();
        let b = rng.normal(&[4], &Device::Cpu).unwrap();
        crate::ops::testing::check_finite_differences(
            |t| ours(&t[0], &t[1], &t[2], 2, true),
            &[&x, &w, &b],
            3,
            2,
        );
    }

    #[test]
    fn layer_names_and_bad_shapes() {
        let params = Params::new();
        let gn = group_norm(2, 6, true, params.builder(&Device::Cpu).pp("norm")).unwrap();
        let names: Vec<String> = params.named().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["norm.bias", "norm.weight"]);
        let x = Rng::new(1).normal(&[2, 5, 3, 3], &Device::Cpu).unwrap();
        assert!(gn.forward(&x).is_err());
        assert!(group_norm(4, 6, false, params.builder(&Device::Cpu)).is_err());
    }
}
