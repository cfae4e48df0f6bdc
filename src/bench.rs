//! Speed benchmark: one full DCGAN training step (D step on real + fake, then G step,
//! both with Adam, with the losses of the GAN trainer), one clean step of the diffusion
//! trainer (its noising, U-Net pass and loss, Adam), or one whole sampling run of a diffusion
//! model over a batch (`sample`'s path: no graph), timed over many repetitions, with the
//! throughput it implies.
//!
//! FLOP counts are analytic: every convolution and dense layer costs 2 FLOP per multiply-add,
//! and each pass through a layer of a training step is counted three times (forward, input
//! gradient, weight gradient). Per training step that is `6·n·G + 18·n·D` with `G`, `D` the
//! multiply-adds of one image's forward pass: G runs forward and backward once; D runs on the
//! real and the fake batch in its own step and on the fake batch again in G's step. A sampling
//! run costs `2·n·G·E` for `E` network evaluations per image. Element-wise work is not counted.

use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::backdoor::Family;
use crate::config::DiffusionConfig;
use crate::family::diffusion::train::Denoising;
use crate::family::diffusion::{DiffusionModel, Sampler};
use crate::family::gan::{discriminator_loss, generator_loss};
use crate::metrics::median;
use crate::models::dcgan_k4::{K4Discriminator, K4Generator};
use crate::models::{DcganConfig, DiffusersConfig, Discriminator, Generator, Params};
use crate::optim::Adam;
use crate::rng::Rng;
use crate::Result;

/// The networks a benchmark can time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchModel {
    /// The reference DGM-backdoor DCGAN that `train` uses (5×5 kernels, dropout in D).
    Reference,
    /// The PyTorch-example DCGAN (4×4 kernels, BN in D) of the speed comparison.
    K4,
    /// The default diffusion U-Net (`train --config configs/ddpm.toml`, a small diffusers
    /// `UNet2DModel`): one noise-prediction step (random timesteps, MSE to the noise, Adam).
    Unet,
    /// The diffusers `UNet2DModel` of google/ddpm-cifar10-32 (35.7 M parameters, RGB 32×32;
    /// random weights): the same step as `unet`. Slow: use a small `--batch-size` (16).
    Cifar,
}

/// What one benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Which networks.
    pub model: BenchModel,
    /// Images per batch.
    pub batch_size: usize,
    /// Timed steps (after warm-up).
    pub steps: usize,
    /// The sampler of a sampling benchmark (a "step" is then one whole sampling run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    /// Median milliseconds per step.
    pub median_ms: f64,
    /// Fastest step in milliseconds.
    pub min_ms: f64,
    /// Generated images per second at the median step time.
    pub images_per_s: f64,
    /// Analytic FLOP per step, in billions.
    pub gflop_per_step: f64,
    /// Achieved GFLOP/s at the median step time.
    pub gflop_per_s: f64,
}

/// A generator/discriminator pair as the benchmark sees it.
trait Pair {
    fn latent_dim(&self) -> usize;
    fn generate(&self, z: &Tensor) -> Result<Tensor>;
    fn discriminate(&self, x: &Tensor, dropout: &mut Rng) -> Result<Tensor>;
    /// D's logits for the generator's step (the training loop's: without D's weight
    /// gradients where the network has a frozen view).
    fn discriminate_for_generator(&self, x: &Tensor, dropout: &mut Rng) -> Result<Tensor> {
        self.discriminate(x, dropout)
    }
    /// Forward multiply-adds per image of (G, D).
    fn macs(&self) -> (u64, u64);
}

/// The reference DCGAN: G, D, and D's frozen view for the generator's step (as in `train`).
struct Reference(Generator, Discriminator, Discriminator);

impl Pair for Reference {
    fn latent_dim(&self) -> usize {
        self.0.config().latent_dim
    }
    fn generate(&self, z: &Tensor) -> Result<Tensor> {
        self.0.forward_t(z, true)
    }
    fn discriminate(&self, x: &Tensor, dropout: &mut Rng) -> Result<Tensor> {
        self.1.forward(x, Some(dropout))
    }
    fn discriminate_for_generator(&self, x: &Tensor, dropout: &mut Rng) -> Result<Tensor> {
        self.2.forward(x, Some(dropout))
    }
    fn macs(&self) -> (u64, u64) {
        (self.0.macs(), self.1.macs())
    }
}

/// The PyTorch-example DCGAN: G, D, and D's frozen view for the generator's step.
struct K4(K4Generator, K4Discriminator, K4Discriminator);

impl Pair for K4 {
    fn latent_dim(&self) -> usize {
        crate::models::dcgan_k4::LATENT_DIM
    }
    fn generate(&self, z: &Tensor) -> Result<Tensor> {
        self.0.forward(z)
    }
    fn discriminate(&self, x: &Tensor, _: &mut Rng) -> Result<Tensor> {
        self.1.forward(x)
    }
    fn discriminate_for_generator(&self, x: &Tensor, _: &mut Rng) -> Result<Tensor> {
        self.2.forward(x)
    }
    fn macs(&self) -> (u64, u64) {
        (self.0.macs(), self.1.macs())
    }
}

/// Times `steps` training steps of `model` at `batch_size` after `warmup` untimed ones.
pub fn run(
    model: BenchModel,
    batch_size: usize,
    warmup: usize,
    steps: usize,
) -> Result<BenchResult> {
    if matches!(model, BenchModel::Unet | BenchModel::Cifar) {
        return unet(model, batch_size, warmup, steps);
    }
    let dev = Device::Cpu;
    let (pg, pd) = (Params::new(), Params::new());
    let pair: Box<dyn Pair> = match model {
        BenchModel::Reference => {
            let cfg = DcganConfig::default();
            Box::new(Reference(
                Generator::new(&cfg, &pg, &dev)?,
                Discriminator::new(&cfg, &pd, &dev)?,
                Discriminator::frozen(&cfg, &pd, &dev)?,
            ))
        }
        BenchModel::K4 => Box::new(K4(
            K4Generator::new(&pg, &dev)?,
            K4Discriminator::new(&pd, &dev)?,
            K4Discriminator::frozen(&pd, &dev)?,
        )),
        BenchModel::Unet | BenchModel::Cifar => unreachable!("handled above"),
    };
    pg.init(&mut Rng::new(1))?;
    pd.init(&mut Rng::new(2))?;
    let mut opt_g = Adam::with_betas(pg.trainable(), 2e-4, 0.5, 0.999);
    let mut opt_d = Adam::with_betas(pd.trainable(), 2e-4, 0.5, 0.999);
    let mut rng = Rng::new(3);
    let real = ((rng.normal(&[batch_size, 1, 28, 28], &dev)?.tanh())? * 0.9)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let start = Instant::now();
        let z = rng.normal(&[batch_size, pair.latent_dim()], &dev)?;
        let fake = pair.generate(&z)?;
        let d_real = pair.discriminate(&real, &mut rng)?;
        let d_fake = pair.discriminate(&fake.detach(), &mut rng)?;
        opt_d.backward_step(&discriminator_loss(&d_real, &d_fake)?)?;
        let g_loss = generator_loss(&pair.discriminate_for_generator(&fake, &mut rng)?)?;
        opt_g.backward_step(&g_loss)?;
        g_loss.to_scalar::<f32>()?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median_ms = median(&mut times);
    let (g, d) = pair.macs();
    let min_ms = times.first().copied().unwrap_or(f64::NAN);
    Ok(BenchResult::new(
        model,
        batch_size,
        steps,
        (median_ms, min_ms),
        (g as f64, d as f64),
        None,
    ))
}

/// The diffusion model `which` names (`Unet` or `Cifar`), with random weights.
fn diffusion_model(which: BenchModel) -> Result<DiffusionModel> {
    let mut arch = crate::family::diffusion::run::arch(&DiffusionConfig::default());
    match which {
        BenchModel::Unet => {}
        BenchModel::Cifar => arch.diffusers = DiffusersConfig::ddpm_cifar10(),
        other => {
            return Err(crate::Error::Config(format!(
                "`--model {}` is a GAN: only the diffusion models (unet, cifar) run a sampler",
                format!("{other:?}").to_lowercase()
            )))
        }
    }
    DiffusionModel::new(&arch, &mut Rng::new(1), &Device::Cpu)
}

/// Times `steps` whole runs of `sampler` from `batch_size` starting noises through the
/// diffusion model `which` (random weights), after `warmup` untimed ones: what `sample`,
/// `eval` and `verify` do per batch.
pub fn sampling(
    which: BenchModel,
    sampler: Sampler,
    batch_size: usize,
    warmup: usize,
    steps: usize,
) -> Result<BenchResult> {
    let model = diffusion_model(which)?;
    let mut rng = Rng::new(3);
    let starts = model.starts(batch_size, None, &mut rng)?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let start = Instant::now();
        model.sample(sampler, &starts, &mut rng)?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median_ms = median(&mut times);
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
    let evaluations = sampler.evaluations(&model.schedule)?;
    Ok(BenchResult::new(
        which,
        batch_size,
        steps,
        (median_ms, min_ms),
        (model.unet.macs() as f64, 0.0),
        Some((sampler, evaluations)),
    ))
}

/// Times `steps` noise-prediction steps of a diffusion U-Net (`Unet` or `Cifar`).
fn unet(which: BenchModel, batch_size: usize, warmup: usize, steps: usize) -> Result<BenchResult> {
    let model = diffusion_model(which)?;
    let dev = Device::Cpu;
    let mut opt = Adam::with_betas(model.params.trainable(), 2e-4, 0.9, 0.999);
    let mut rng = Rng::new(3);
    let [c, h, w] = model.image_shape();
    let x = rng.normal(&[batch_size, c, h, w], &dev)?.tanh()?;
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let start = Instant::now();
        // The trainer's clean step: noised images at random timesteps, through the U-Net once.
        let loss = Denoising::prepare(&model, &x, &[], &mut rng)?.task_loss()?;
        opt.backward_step(&loss)?;
        loss.to_scalar::<f32>()?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median_ms = median(&mut times);
    let min_ms = times.iter().copied().fold(f64::INFINITY, f64::min);
    // One network, forward and backward once: the `6·G` term (see the module docs).
    Ok(BenchResult::new(
        which,
        batch_size,
        steps,
        (median_ms, min_ms),
        (model.unet.macs() as f64, 0.0),
        None,
    ))
}

impl BenchResult {
    /// The derived numbers (images/s, FLOP per step and per second, see the module docs) of a
    /// measurement: `(median, min)` ms per step, the forward multiply-adds per image of
    /// `(G, D)`, and for a sampling run its sampler with the network evaluations per image
    /// (`None`: a training step). Used for our measurement and for PyTorch's alike.
    pub fn new(
        model: BenchModel,
        batch_size: usize,
        steps: usize,
        (median_ms, min_ms): (f64, f64),
        (g_macs, d_macs): (f64, f64),
        sampling: Option<(Sampler, usize)>,
    ) -> Self {
        let flop_per_image = match sampling {
            Some((_, evaluations)) => 2.0 * g_macs * evaluations as f64,
            None => 6.0 * g_macs + 18.0 * d_macs,
        };
        let gflop_per_step = flop_per_image * batch_size as f64 / 1e9;
        BenchResult {
            model,
            batch_size,
            steps,
            sampler: sampling.map(|(s, _)| s.to_string()),
            median_ms,
            min_ms,
            images_per_s: batch_size as f64 / median_ms * 1e3,
            gflop_per_step,
            gflop_per_s: gflop_per_step / median_ms * 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_benchmark_reports_consistent_numbers() {
        for model in [BenchModel::Reference, BenchModel::K4, BenchModel::Unet] {
            let r = run(model, 4, 1, 3).unwrap();
            assert_eq!(r.steps, 3);
            assert!(r.min_ms > 0.0 && r.min_ms <= r.median_ms);
            assert!((r.images_per_s - 4.0 / r.median_ms * 1e3).abs() < 1e-9);
            assert!(r.gflop_per_step > 0.0);
        }
        let s = sampling(BenchModel::Unet, "ddim-3".parse().unwrap(), 2, 0, 2).unwrap();
        assert_eq!(s.sampler.as_deref(), Some("ddim-3"));
        let unet = diffusion_model(BenchModel::Unet).unwrap();
        let expected = 2.0 * unet.unet.macs() as f64 * 3.0 * 2.0 / 1e9;
        assert!((s.gflop_per_step - expected).abs() < 1e-9 * expected);
        assert!(sampling(BenchModel::K4, "ddim-3".parse().unwrap(), 2, 0, 1).is_err());
    }
}
