//! The PyTorch-example style MNIST DCGAN used to compare training speed with PyTorch
//! (`genbackdoor bench`, `bench/torch_reference.py`): 4×4 kernels, stride 2, padding 1.
//!
//! G: Linear 100→128·7·7 + BN + ReLU, ConvT 128→64 + BN + ReLU, ConvT 64→1 + tanh.
//! D: Conv 1→64 + LeakyReLU(0.2), Conv 64→128 + BN + LeakyReLU(0.2), Linear → 1.
//! Layers followed by BatchNorm have no bias; the others have one (PyTorch's default).

use candle_core::{Device, Module, Tensor};
use candle_nn::{linear, linear_no_bias, VarBuilder};

use crate::models::Params;
use crate::ops::{batch_norm, Activation, BatchNorm, ConvKind, ConvLayer, Dense};
use crate::Result;

/// Latent dimension of this model.
pub const LATENT_DIM: usize = 100;

/// Negative slope of the discriminator's LeakyReLU.
const SLOPE: f64 = 0.2;

/// The generator.
pub struct K4Generator {
    fc: Dense,
    bn0: BatchNorm,
    deconv1: ConvLayer,
    bn1: BatchNorm,
    deconv2: ConvLayer,
}

impl K4Generator {
    /// Creates the generator's variables in `params`.
    pub fn new(params: &Params, device: &Device) -> Result<Self> {
        let vb = params.builder(device);
        let up = |cin, cout, bias, name| {
            let kind = ConvKind::Transposed { out_pad: 0 };
            ConvLayer::new(kind, cin, cout, 4, 2, 1, bias, vb.pp(name))
        };
        Ok(K4Generator {
            fc: linear_no_bias(LATENT_DIM, 128 * 49, vb.pp("fc"))?.into(),
            bn0: batch_norm(128 * 49, vb.pp("bn0"))?,
            deconv1: up(128, 64, false, "deconv1")?,
            bn1: batch_norm(64, vb.pp("bn1"))?,
            deconv2: up(64, 1, true, "deconv2")?,
        })
    }

    /// Images `[n, 1, 28, 28]` for latents `[n, 100]`, with batch statistics.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let x = self.bn0.forward_leaky(&self.fc.forward(z)?, true, 0.0)?;
        let x = x.reshape((n, 128, 7, 7))?;
        let x = self
            .bn1
            .forward_leaky(&self.deconv1.forward(&x)?, true, 0.0)?;
        self.deconv2.forward_with(&x, Activation::Tanh)
    }

    /// Multiply-adds of one forward pass per image.
    pub fn macs(&self) -> u64 {
        self.fc_macs() + self.deconv1.macs(7, 7) + self.deconv2.macs(14, 14)
    }

    fn fc_macs(&self) -> u64 {
        (LATENT_DIM * 128 * 49) as u64
    }
}

/// The discriminator.
pub struct K4Discriminator {
    conv1: ConvLayer,
    conv2: ConvLayer,
    bn2: BatchNorm,
    fc: Dense,
}

impl K4Discriminator {
    /// Creates the discriminator's variables in `params`.
    pub fn new(params: &Params, device: &Device) -> Result<Self> {
        Self::build(params.builder(device))
    }

    /// The discriminator over `params`' existing weights as detached views
    /// ([`Params::frozen_builder`]) and its live running statistics: for the generator's
    /// step, which needs gradients for D's input only, while the batch statistics still
    /// move D's running ones as the live network's pass would.
    pub fn frozen(params: &Params, device: &Device) -> Result<Self> {
        Self::build(params.frozen_builder(device))
    }

    fn build(vb: VarBuilder) -> Result<Self> {
        let down = |cin, cout, bias, name| {
            ConvLayer::new(ConvKind::Forward, cin, cout, 4, 2, 1, bias, vb.pp(name))
        };
        Ok(K4Discriminator {
            conv1: down(1, 64, true, "conv1")?,
            conv2: down(64, 128, false, "conv2")?,
            bn2: batch_norm(128, vb.pp("bn2"))?,
            fc: linear(128 * 49, 1, vb.pp("fc"))?.into(),
        })
    }

    /// Logits `[n]` for images `[n, 1, 28, 28]`, with batch statistics.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward_leaky(x, SLOPE)?;
        let x = self
            .bn2
            .forward_leaky(&self.conv2.forward(&x)?, true, SLOPE)?;
        Ok(self.fc.forward_flat(&x)?.squeeze(1)?)
    }

    /// Multiply-adds of one forward pass per image.
    pub fn macs(&self) -> u64 {
        self.conv1.macs(28, 28) + self.conv2.macs(14, 14) + (128 * 49) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn shapes_and_sizes_match_the_pytorch_model() {
        let dev = Device::Cpu;
        let (pg, pd) = (Params::new(), Params::new());
        let g = K4Generator::new(&pg, &dev).unwrap();
        let d = K4Discriminator::new(&pd, &dev).unwrap();
        pg.init(&mut Rng::new(0)).unwrap();
        pd.init(&mut Rng::new(1)).unwrap();
        let x = g
            .forward(&Rng::new(2).normal(&[3, 100], &dev).unwrap())
            .unwrap();
        assert_eq!(x.dims(), &[3, 1, 28, 28]);
        assert_eq!(d.forward(&x).unwrap().dims(), &[3]);
        // Trainable parameters as PyTorch counts them (running statistics excluded).
        let trainable =
            |p: &Params| -> usize { p.trainable().iter().map(|v| v.elem_count()).sum() };
        assert_eq!(
            trainable(&pg),
            627_200 + 2 * 6272 + 131_072 + 128 + 1024 + 1
        );
        assert_eq!(trainable(&pd), 1024 + 64 + 131_072 + 256 + 6272 + 1);
        // 7·7·128·64·16 multiply-adds in the first transposed convolution alone.
        assert!(g.macs() > 6_422_528);
    }

    #[test]
    fn the_frozen_discriminator_moves_the_live_running_statistics_and_trains_nothing() {
        let dev = Device::Cpu;
        let pd = Params::new();
        let live = K4Discriminator::new(&pd, &dev).unwrap();
        let frozen = K4Discriminator::frozen(&pd, &dev).unwrap();
        pd.init(&mut Rng::new(1)).unwrap();
        let stats = || -> Vec<Vec<f32>> {
            pd.named()
                .iter()
                .filter(|(n, _)| n.starts_with("bn2.running_"))
                .map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap())
                .collect()
        };
        let restore = |s: &[Vec<f32>]| {
            let vars = pd.named();
            let running = vars.iter().filter(|(n, _)| n.starts_with("bn2.running_"));
            for ((_, v), s) in running.zip(s) {
                v.set(&Tensor::new(s.as_slice(), &dev).unwrap()).unwrap();
            }
        };
        let before = stats();
        let x = candle_core::Var::from_tensor(&Rng::new(2).normal(&[4, 1, 28, 28], &dev).unwrap())
            .unwrap();
        let r = Rng::new(3).normal(&[4], &dev).unwrap();
        let pass = |d: &K4Discriminator| {
            let y = d.forward(x.as_tensor()).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y.to_vec1::<f32>().unwrap(), grads, stats())
        };
        let (y_frozen, g_frozen, after_frozen) = pass(&frozen);
        restore(&before);
        let (y_live, g_live, after_live) = pass(&live);
        // The same logits and the same move of the running statistics, which the frozen
        // pass made on the live network's own tensors.
        assert_eq!(y_frozen, y_live);
        assert_ne!(after_frozen, before);
        assert_eq!(after_frozen, after_live);
        // The input's gradient is the same; no weight of D gets one from the frozen pass.
        let dx = |g: &candle_core::backprop::GradStore| g.get(x.as_tensor()).unwrap().clone();
        let diff = crate::ops::testing::max_abs_diff(&dx(&g_frozen), &dx(&g_live));
        assert!(diff < 1e-6, "{diff}");
        for v in pd.trainable() {
            assert!(g_frozen.get(v.as_tensor()).is_none());
            assert!(g_live.get(v.as_tensor()).is_some());
        }
    }
}
