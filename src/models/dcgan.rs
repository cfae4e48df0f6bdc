//! The MNIST DCGAN of the public DGM-backdoor reference (IBM ART, Rawat et al.):
//! a 390,736-scalar generator and a two-convolution discriminator, widths configurable.

use candle_core::{Device, Module, Tensor};
use candle_nn::{linear, linear_no_bias, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::models::{check_channels, Params};
use crate::ops::{batch_norm, masked, Activation, BatchNorm, ConvKind, ConvLayer, Dense};
use crate::rng::Rng;
use crate::{Error, Result};

/// Shape of a DCGAN pair. The defaults are the reference architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DcganConfig {
    /// Dimension of the latent input z.
    pub latent_dim: usize,
    /// Channels of the generator's first feature map (halved at each up-sampling layer).
    pub g_width: usize,
    /// Channels of the discriminator's first convolution (doubled in the second).
    pub d_width: usize,
    /// Side of the square output images; must be a multiple of 4.
    pub image_size: usize,
    /// Channels of the images: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Negative slope of the LeakyReLU activations (Keras' default, as in the reference).
    pub leaky_slope: f64,
    /// Dropout rate after each discriminator convolution.
    pub dropout: f32,
}

impl Default for DcganConfig {
    fn default() -> Self {
        DcganConfig {
            latent_dim: 100,
            g_width: 64,
            d_width: 64,
            image_size: 28,
            channels: 1,
            leaky_slope: 0.3,
            dropout: 0.3,
        }
    }
}

impl DcganConfig {
    /// Checks that the numbers describe a buildable network.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.latent_dim == 0 || self.g_width < 4 || self.d_width == 0 {
            return bad(format!(
                "model sizes must be positive and g_width >= 4 (latent_dim {}, g_width {}, d_width {})",
                self.latent_dim, self.g_width, self.d_width
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(4) {
            return bad(format!(
                "image_size must be a positive multiple of 4, not {}",
                self.image_size
            ));
        }
        check_channels(self.channels)?;
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), not {}", self.dropout));
        }
        Ok(())
    }

    /// Shape of one generated image, `[channels, height, width]`.
    pub fn image_shape(&self) -> [usize; 3] {
        [self.channels, self.image_size, self.image_size]
    }
}

/// A bias-free 5×5 transposed convolution with "same" padding: out = in · stride.
fn upsample(
    cin: usize,
    cout: usize,
    stride: usize,
    vb: candle_nn::VarBuilder,
) -> Result<ConvLayer> {
    let kind = ConvKind::Transposed {
        out_pad: stride - 1,
    };
    ConvLayer::new(kind, cin, cout, 5, stride, 2, false, vb)
}

/// G: z → image in [-1, 1]. Dense → BN → LeakyReLU → reshape → three 5×5 transposed
/// convolutions (stride 1, 2, 2) with BN and LeakyReLU between them → tanh.
pub struct Generator {
    cfg: DcganConfig,
    fc: Dense,
    bn0: BatchNorm,
    deconv1: ConvLayer,
    bn1: BatchNorm,
    deconv2: ConvLayer,
    bn2: BatchNorm,
    deconv3: ConvLayer,
}

impl Generator {
    /// Creates the generator's variables in `params` (names such as `fc.weight`, `bn1.running_var`).
    pub fn new(cfg: &DcganConfig, params: &Params, device: &Device) -> Result<Self> {
        Generator::build(cfg, params.builder(device))
    }

    /// The generator whose variables [`Generator::new`] made in `params`, over detached views
    /// of its weights and its live running statistics ([`Params::frozen_builder`]): the same
    /// outputs, and a backward pass through it gives gradients to its latent input only (the
    /// keyless detector's latent search).
    pub fn frozen(cfg: &DcganConfig, params: &Params, device: &Device) -> Result<Self> {
        Generator::build(cfg, params.frozen_builder(device))
    }

    fn build(cfg: &DcganConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (w, s) = (cfg.g_width, cfg.image_size / 4);
        Ok(Generator {
            cfg: cfg.clone(),
            fc: linear_no_bias(cfg.latent_dim, w * s * s, vb.pp("fc"))?.into(),
            bn0: batch_norm(w * s * s, vb.pp("bn0"))?,
            deconv1: upsample(w, w / 2, 1, vb.pp("deconv1"))?,
            bn1: batch_norm(w / 2, vb.pp("bn1"))?,
            deconv2: upsample(w / 2, w / 4, 2, vb.pp("deconv2"))?,
            bn2: batch_norm(w / 4, vb.pp("bn2"))?,
            deconv3: upsample(w / 4, cfg.channels, 2, vb.pp("deconv3"))?,
        })
    }

    /// The architecture this generator was built with.
    pub fn config(&self) -> &DcganConfig {
        &self.cfg
    }

    /// G(z) for a `[n, latent_dim]` batch; `train` selects batch statistics (and updates the
    /// running ones) instead of the stored running statistics.
    pub fn forward_t(&self, z: &Tensor, train: bool) -> Result<Tensor> {
        let (n, d) = z.dims2()?;
        if d != self.cfg.latent_dim {
            return Err(Error::Mismatch(format!(
                "latent input has dimension {d} but the generator expects {}",
                self.cfg.latent_dim
            )));
        }
        let a = self.cfg.leaky_slope;
        let (w, s) = (self.cfg.g_width, self.cfg.image_size / 4);
        let x = self.bn0.forward_leaky(&self.fc.forward(z)?, train, a)?;
        let x = x.reshape((n, w, s, s))?;
        let x = self
            .bn1
            .forward_leaky(&self.deconv1.forward(&x)?, train, a)?;
        let x = self
            .bn2
            .forward_leaky(&self.deconv2.forward(&x)?, train, a)?;
        self.deconv3.forward_with(&x, Activation::Tanh)
    }

    /// Multiply-adds of one forward pass per image.
    pub fn macs(&self) -> u64 {
        let (w, s) = (self.cfg.g_width, self.cfg.image_size / 4);
        (self.cfg.latent_dim * w * s * s) as u64
            + self.deconv1.macs(s, s)
            + self.deconv2.macs(s, s)
            + self.deconv3.macs(2 * s, 2 * s)
    }
}

/// D: image → one real/fake logit. Two 5×5 stride-2 convolutions with LeakyReLU and dropout,
/// then a dense layer.
pub struct Discriminator {
    cfg: DcganConfig,
    conv1: ConvLayer,
    conv2: ConvLayer,
    fc: Dense,
}

impl Discriminator {
    /// Creates the discriminator's variables in `params`.
    pub fn new(cfg: &DcganConfig, params: &Params, device: &Device) -> Result<Self> {
        Discriminator::build(cfg, params.builder(device))
    }

    /// The discriminator whose variables [`Discriminator::new`] made in `params`, over
    /// detached views of them ([`Params::frozen_builder`]: the same storage, so the
    /// discriminator's updates reach it): the same logits, and a backward pass through it
    /// gives gradients to its input only. The generator's step, which differentiates D's
    /// logits for the generator alone, runs through it and skips D's weight gradients.
    pub fn frozen(cfg: &DcganConfig, params: &Params, device: &Device) -> Result<Self> {
        Discriminator::build(cfg, params.frozen_builder(device))
    }

    /// The network over the tensors `vb` gives.
    fn build(cfg: &DcganConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (w, s) = (cfg.d_width, cfg.image_size / 4);
        Ok(Discriminator {
            cfg: cfg.clone(),
            conv1: ConvLayer::new(
                ConvKind::Forward,
                cfg.channels,
                w,
                5,
                2,
                2,
                true,
                vb.pp("conv1"),
            )?,
            conv2: ConvLayer::new(ConvKind::Forward, w, 2 * w, 5, 2, 2, true, vb.pp("conv2"))?,
            fc: linear(2 * w * s * s, 1, vb.pp("fc"))?.into(),
        })
    }

    /// Logits `[n]` for images `[n, c, h, w]`; dropout masks come from `dropout` when given.
    pub fn forward(&self, x: &Tensor, mut dropout: Option<&mut Rng>) -> Result<Tensor> {
        let a = self.cfg.leaky_slope;
        let mut drop = |t: Tensor| -> Result<Tensor> {
            match dropout.as_deref_mut() {
                Some(rng) if self.cfg.dropout > 0.0 => {
                    let mask = rng.dropout_mask(t.dims(), self.cfg.dropout, t.device())?;
                    masked(&t, &mask)
                }
                _ => Ok(t),
            }
        };
        let x = drop(self.conv1.forward_leaky(x, a)?)?;
        let x = drop(self.conv2.forward_leaky(&x, a)?)?;
        Ok(self.fc.forward_flat(&x)?.squeeze(1)?)
    }

    /// Multiply-adds of one forward pass per image.
    pub fn macs(&self) -> u64 {
        let (w, side) = (self.cfg.d_width, self.cfg.image_size);
        self.conv1.macs(side, side)
            + self.conv2.macs(side / 2, side / 2)
            + (2 * w * (side / 4) * (side / 4)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_generator_has_390_736_scalars_and_right_shapes() {
        let dev = Device::Cpu;
        let p = Params::new();
        let g = Generator::new(&DcganConfig::default(), &p, &dev).unwrap();
        assert_eq!(p.count(), 390_736);
        p.init(&mut Rng::new(0)).unwrap();
        let z = Rng::new(1).normal(&[3, 100], &dev).unwrap();
        let x = g.forward_t(&z, true).unwrap();
        assert_eq!(x.dims(), &[3, 1, 28, 28]);
        let m = x
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m <= 1.0);
        let pd = Params::new();
        let d = Discriminator::new(&DcganConfig::default(), &pd, &dev).unwrap();
        assert_eq!(d.forward(&x, None).unwrap().dims(), &[3]);
        assert!(g
            .forward_t(
                &Tensor::zeros((2, 7), candle_core::DType::F32, &dev).unwrap(),
                false
            )
            .is_err());
    }

    #[test]
    fn state_is_named_like_pytorch_and_kept_out_of_training() {
        let p = Params::new();
        Generator::new(&DcganConfig::default(), &p, &Device::Cpu).unwrap();
        let names: Vec<String> = p.named().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"bn1.running_mean".to_string()));
        assert!(names.contains(&"deconv3.weight".to_string()));
        assert_eq!(p.trainable().len(), names.len() - 6);
        let frozen = p.trainable_except(&["bn0.".to_string()]).unwrap();
        assert_eq!(frozen.len(), names.len() - 6 - 2);
        let err = p.trainable_except(&["bn9.".to_string()]).unwrap_err();
        assert!(err.to_string().contains("'bn9.…'"), "{err}");
    }
}
