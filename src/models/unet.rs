//! A small denoising U-Net ε_θ(x_t, t) for diffusion models: sinusoidal time embedding,
//! residual blocks with GroupNorm and SiLU, a down and an up path joined by skip connections,
//! and optional self-attention at the lowest resolution. It knows nothing of backdoors.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::models::check_channels;
use crate::ops::{group_norm, ConvKind, ConvLayer, Dense, GroupNorm};
use crate::{Error, Result};

/// Shape of a U-Net.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UnetConfig {
    /// Side of the square images (divisible by 2^(levels − 1)).
    pub image_size: usize,
    /// Channels of the images: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Channels of the first level.
    pub base: usize,
    /// Channel multiplier of each level (the number of levels).
    pub mults: Vec<usize>,
    /// Self-attention at the lowest resolution.
    pub attention: bool,
    /// GroupNorm groups (must divide every level's channels).
    pub groups: usize,
}

impl Default for UnetConfig {
    fn default() -> Self {
        UnetConfig {
            image_size: 28,
            channels: 1,
            base: 32,
            mults: vec![1, 2, 2],
            attention: true,
            groups: 8,
        }
    }
}

impl UnetConfig {
    /// Checks that the numbers describe a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.mults.is_empty() || self.base == 0 || self.groups == 0 {
            return bad("U-Net needs at least one level, base > 0 and groups > 0".into());
        }
        check_channels(self.channels)?;
        let down = 1 << (self.mults.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(down) {
            return bad(format!(
                "image_size {} must be a positive multiple of {down} for {} levels",
                self.image_size,
                self.mults.len()
            ));
        }
        if let Some(m) = self
            .mults
            .iter()
            .find(|&&m| m == 0 || !(m * self.base).is_multiple_of(self.groups))
        {
            return bad(format!(
                "every level's channels (base × mult, here {} × {m}) must be a positive multiple of groups {}",
                self.base, self.groups
            ));
        }
        Ok(())
    }

    /// Shape of one image, `[channels, height, width]`.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }

    /// Width of the time embedding.
    fn time_dim(&self) -> usize {
        4 * self.base
    }
}

/// Sinusoidal embedding `[n, dim]` of timesteps `t` (`[n]`, f32), as in the DDPM code.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10_000f32.ln()) * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.sin()?, args.cos()?], D::Minus1)?)
}

fn conv3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<ConvLayer> {
    ConvLayer::new(ConvKind::Forward, cin, cout, 3, stride, 1, true, vb)
}

/// GroupNorm → SiLU → conv, twice, with the time embedding added in between; a 1×1
/// convolution on the skip path when the width changes.
struct ResBlock {
    norm1: GroupNorm,
    conv1: ConvLayer,
    time: Dense,
    norm2: GroupNorm,
    conv2: ConvLayer,
    skip: Option<ConvLayer>,
}

impl ResBlock {
    fn new(cin: usize, cout: usize, cfg: &UnetConfig, vb: VarBuilder) -> Result<Self> {
        let g = cfg.groups;
        let skip = if cin == cout {
            None
        } else {
            Some(ConvLayer::new(
                ConvKind::Forward,
                cin,
                cout,
                1,
                1,
                0,
                true,
                vb.pp("skip"),
            )?)
        };
        Ok(ResBlock {
            norm1: group_norm(g.min(cin), cin, true, vb.pp("norm1"))?,
            conv1: conv3(cin, cout, 1, vb.pp("conv1"))?,
            time: linear(cfg.time_dim(), cout, vb.pp("time"))?.into(),
            norm2: group_norm(g, cout, true, vb.pp("norm2"))?,
            conv2: conv3(cout, cout, 1, vb.pp("conv2"))?,
            skip,
        })
    }

    /// Convolution multiply-adds over an `r × r` input.
    fn macs(&self, r: usize) -> u64 {
        self.conv1.macs(r, r)
            + self.conv2.macs(r, r)
            + self.skip.as_ref().map_or(0, |s| s.macs(r, r))
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // The projected embedding `[n, cout]` is added to every position in conv1's own sweep.
        let t = self.time.forward(temb)?;
        let h = self.conv1.forward_shifted(&self.norm1.forward(x)?, &t)?;
        let skip = match &self.skip {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        // The skip path is added in conv2's own sweep.
        self.conv2.forward_residual(&self.norm2.forward(&h)?, &skip)
    }
}

/// The pixels of the feature map `x` `[n, c, h, w]` after `norm`, as tokens `[n, hw, c]`.
/// Contiguous: candle 0.11's CPU matmul computes wrong values for a transposed 3-D left
/// operand times a batch-broadcast right one, which is what `Linear` makes of a 3-D input.
pub(crate) fn normed_tokens(norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    Ok(norm
        .forward(x)?
        .flatten_from(2)?
        .transpose(1, 2)?
        .contiguous()?)
}

/// Single-head self-attention over the pixels of a feature map, with a residual connection.
struct Attention {
    norm: GroupNorm,
    qkv: Dense,
    out: Dense,
}

impl Attention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Attention {
            norm: group_norm(groups, c, false, vb.pp("norm"))?,
            qkv: linear(c, 3 * c, vb.pp("qkv"))?.into(),
            out: linear(c, c, vb.pp("out"))?.into(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let tokens = normed_tokens(&self.norm, x)?;
        let qkv = self.qkv.forward(&tokens)?;
        let q = qkv.narrow(2, 0, c)?.contiguous()?;
        let k = qkv.narrow(2, c, c)?.contiguous()?;
        let v = qkv.narrow(2, 2 * c, c)?.contiguous()?;
        let scores = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? / (c as f64).sqrt())?;
        // Not `softmax_last_dim`: candle-nn 0.11 gives that fused kernel no backward pass, so
        // no gradient would reach the queries and keys.
        let attn = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let y = self.out.forward(&attn.matmul(&v)?)?; // [n, hw, c]
        let y = y.transpose(1, 2)?.reshape((n, c, h, w))?;
        Ok((x + y)?)
    }
}

/// The U-Net.
pub struct Unet {
    cfg: UnetConfig,
    time1: Dense,
    time2: Dense,
    conv_in: ConvLayer,
    down: Vec<(ResBlock, Option<ConvLayer>)>,
    mid1: ResBlock,
    mid_attn: Option<Attention>,
    mid2: ResBlock,
    up: Vec<(ResBlock, Option<ConvLayer>)>,
    norm_out: GroupNorm,
    conv_out: ConvLayer,
}

impl Unet {
    /// Creates the U-Net's tensors through `vb` (`down.0.res.conv1.weight`, …): new
    /// variables from [`crate::models::Params::builder`], or a frozen view from
    /// [`crate::models::Params::frozen_builder`].
    pub fn new(cfg: &UnetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let widths: Vec<usize> = cfg.mults.iter().map(|m| m * cfg.base).collect();
        let levels = widths.len();
        let mut down = Vec::new();
        let mut prev = cfg.base;
        for (i, &c) in widths.iter().enumerate() {
            let p = vb.pp(format!("down.{i}"));
            let res = ResBlock::new(prev, c, cfg, p.pp("res"))?;
            let sample = if i + 1 < levels {
                Some(conv3(c, c, 2, p.pp("downsample"))?)
            } else {
                None
            };
            down.push((res, sample));
            prev = c;
        }
        let last = widths[levels - 1];
        let mut up = Vec::new();
        for (i, &c) in widths.iter().enumerate().rev() {
            let p = vb.pp(format!("up.{i}"));
            let res = ResBlock::new(prev + c, c, cfg, p.pp("res"))?;
            let sample = if i > 0 {
                Some(conv3(c, c, 1, p.pp("upsample"))?)
            } else {
                None
            };
            up.push((res, sample));
            prev = c;
        }
        Ok(Unet {
            cfg: cfg.clone(),
            time1: linear(cfg.base, cfg.time_dim(), vb.pp("time.0"))?.into(),
            time2: linear(cfg.time_dim(), cfg.time_dim(), vb.pp("time.1"))?.into(),
            conv_in: conv3(cfg.channels, cfg.base, 1, vb.pp("conv_in"))?,
            down,
            mid1: ResBlock::new(last, last, cfg, vb.pp("mid.res1"))?,
            mid_attn: if cfg.attention {
                Some(Attention::new(last, cfg.groups, vb.pp("mid.attn"))?)
            } else {
                None
            },
            mid2: ResBlock::new(last, last, cfg, vb.pp("mid.res2"))?,
            up,
            norm_out: group_norm(cfg.groups, cfg.base, true, vb.pp("norm_out"))?,
            conv_out: conv3(cfg.base, cfg.channels, 1, vb.pp("conv_out"))?,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &UnetConfig {
        &self.cfg
    }

    /// Forward multiply-adds per image of the convolutions and the attention (the time
    /// embedding's small dense layers are left out).
    pub fn macs(&self) -> u64 {
        let s = self.cfg.image_size;
        let res = |i: usize| s >> i;
        let mut total = self.conv_in.macs(s, s) + self.conv_out.macs(s, s);
        for (i, ((d, ds), (u, us))) in self.down.iter().zip(self.up.iter().rev()).enumerate() {
            total += d.macs(res(i)) + u.macs(res(i));
            total += ds.as_ref().map_or(0, |c| c.macs(res(i), res(i)));
            total += us.as_ref().map_or(0, |c| c.macs(2 * res(i), 2 * res(i)));
        }
        let low = res(self.down.len() - 1);
        total += self.mid1.macs(low) + self.mid2.macs(low);
        if self.mid_attn.is_some() {
            let (l, c) = (
                (low * low) as u64,
                (*self.cfg.mults.last().expect("levels") * self.cfg.base) as u64,
            );
            total += 4 * c * c * l + 2 * l * l * c;
        }
        total
    }

    /// ε̂ `[n, c, s, s]` for noisy images `x` `[n, c, s, s]` at timesteps `t` (`[n]`, f32).
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (k, s) = (self.cfg.channels, self.cfg.image_size);
        if (c, h, w) != (k, s, s) || t.dims() != [n] {
            return Err(Error::Mismatch(format!(
                "the U-Net takes [n, {k}, {s}, {s}] images with [n] timesteps, not {:?} with {:?}",
                x.dims(),
                t.dims()
            )));
        }
        let temb = timestep_embedding(t, self.cfg.base)?;
        let temb = self.time2.forward(&self.time1.forward(&temb)?.silu()?)?;
        let mut h = self.conv_in.forward(x)?;
        let mut skips = Vec::new();
        for (res, sample) in &self.down {
            h = res.forward(&h, &temb)?;
            skips.push(h.clone());
            if let Some(d) = sample {
                h = d.forward(&h)?;
            }
        }
        h = self.mid1.forward(&h, &temb)?;
        if let Some(a) = &self.mid_attn {
            h = a.forward(&h)?;
        }
        h = self.mid2.forward(&h, &temb)?;
        for (res, sample) in &self.up {
            let skip = skips.pop().expect("one skip per level");
            h = res.forward(&Tensor::cat(&[&h, &skip], 1)?, &temb)?;
            if let Some(u) = sample {
                h = u.forward(&crate::ops::upsample2x(&h)?)?;
            }
        }
        Ok(self.conv_out.forward(&self.norm_out.forward(&h)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Params;
    use crate::rng::Rng;
    use candle_core::Device;

    #[test]
    fn shapes_names_and_gradients() {
        let cfg = UnetConfig {
            base: 8,
            groups: 4,
            ..UnetConfig::default()
        };
        let params = Params::new();
        let net = Unet::new(&cfg, params.builder(&Device::Cpu)).unwrap();
        params.init_kaiming(&mut Rng::new(1)).unwrap();
        let names: Vec<String> = params.named().into_iter().map(|(n, _)| n).collect();
        for n in [
            "down.0.res.conv1.weight",
            "mid.attn.qkv.weight",
            "up.2.upsample.bias",
            "conv_out.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "no {n} in {names:?}");
        }
        let x = Rng::new(2).normal(&[3, 1, 28, 28], &Device::Cpu).unwrap();
        let t = Tensor::new(&[1f32, 500.0, 999.0], &Device::Cpu).unwrap();
        let y = net.forward(&x, &t).unwrap();
        assert_eq!(y.dims(), &[3, 1, 28, 28]);
        // Every parameter receives a gradient.
        let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for v in params.trainable() {
            assert!(
                grads.get(v.as_tensor()).is_some(),
                "a parameter gets no gradient"
            );
        }
        // The time embedding matters.
        let t2 = Tensor::new(&[900f32, 10.0, 3.0], &Device::Cpu).unwrap();
        let y2 = net.forward(&x, &t2).unwrap();
        assert!(crate::ops::testing::max_abs_diff(&y, &y2) > 1e-4);
        assert!(net.forward(&x.narrow(2, 0, 14).unwrap(), &t).is_err());
        assert!(UnetConfig {
            groups: 5,
            ..cfg.clone()
        }
        .validate()
        .is_err());
        assert!(UnetConfig {
            image_size: 30,
            ..cfg
        }
        .validate()
        .is_err());
    }

    /// The attention block against a loop-by-loop computation of
    /// `x + out(softmax(q·kᵀ/√c)·v)`, and its input gradient (which flows through the
    /// queries, keys and values) against finite differences.
    #[test]
    fn attention_matches_an_explicit_computation_and_finite_differences() {
        let (n, c, h, w) = (3, 4, 2, 3);
        let params = Params::new();
        let attn = Attention::new(c, 2, params.builder(&Device::Cpu)).unwrap();
        params.init_kaiming(&mut Rng::new(4)).unwrap();
        let x = Rng::new(5).normal(&[n, c, h, w], &Device::Cpu).unwrap();
        let got = attn.forward(&x).unwrap();

        let vec = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let normed = vec(&attn.norm.forward(&x).unwrap());
        let (wq, bq) = (vec(attn.qkv.weight()), vec(attn.qkv.bias().unwrap()));
        let (wo, bo) = (vec(attn.out.weight()), vec(attn.out.bias().unwrap()));
        let l = h * w;
        let mut want = vec(&x);
        for s in 0..n {
            let token = |p: usize, ch: usize| normed[(s * c + ch) * l + p];
            // qkv[p][j] for j in 0..3c.
            let qkv: Vec<Vec<f32>> = (0..l)
                .map(|p| {
                    (0..3 * c)
                        .map(|j| bq[j] + (0..c).map(|i| wq[j * c + i] * token(p, i)).sum::<f32>())
                        .collect()
                })
                .collect();
            for p in 0..l {
                let scores: Vec<f32> = (0..l)
                    .map(|r| {
                        (0..c).map(|i| qkv[p][i] * qkv[r][c + i]).sum::<f32>() / (c as f32).sqrt()
                    })
                    .collect();
                let top = scores.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = scores.iter().map(|v| (v - top).exp()).collect();
                let z: f32 = e.iter().sum();
                let mixed: Vec<f32> = (0..c)
                    .map(|i| (0..l).map(|r| e[r] / z * qkv[r][2 * c + i]).sum())
                    .collect();
                for o in 0..c {
                    let y = bo[o] + (0..c).map(|i| wo[o * c + i] * mixed[i]).sum::<f32>();
                    want[(s * c + o) * l + p] += y;
                }
            }
        }
        let want = Tensor::from_vec(want, (n, c, h, w), &Device::Cpu).unwrap();
        crate::ops::testing::assert_close(&got, &want, 1e-5).unwrap();
        crate::ops::testing::check_finite_differences(
            |t| attn.forward(&t[0]).unwrap(),
            &[&x],
            6,
            1,
        );
    }
}
