//! `genbackdoor sample`: generate ordinary or triggered images (generators, or diffusion
//! models with either sampler).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clap::Args;

use crate::diffusion::{DiffusionModel, Sampler};
use crate::gan::GanModel;
use crate::io::{grid::save_grid, npy::write_npy};
use crate::paradigm::Key;
use crate::rng::Rng;

/// Arguments of `sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Generator or diffusion checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Key: when given, the latents (or starting noise) are triggered.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    pub n: usize,
    /// PNG grid to write (8 images per row).
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// NumPy file to write: float32 [N, 1, H, W] in [-1, 1].
    #[arg(long)]
    pub npy: Option<PathBuf>,
    /// Seed of the latents (or starting noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Diffusion models: `ddpm` (all T steps) or `ddim` (deterministic).
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    /// Diffusion models: DDIM's number of steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
}

/// Runs `sample`.
pub fn run(a: SampleArgs) -> anyhow::Result<()> {
    if a.png.is_none() && a.npy.is_none() {
        anyhow::bail!("nothing to write: give --png FILE and/or --npy FILE");
    }
    if a.n == 0 {
        anyhow::bail!("--n must be at least 1");
    }
    let mut rng = Rng::derive(a.seed, "sample");
    let key = a.key.as_ref().map(|k| Key::load(k)).transpose()?;
    let images = if crate::io::checkpoint::family_of(&a.model)? == crate::diffusion::model::FAMILY {
        let sampler = match a.sampler.as_str() {
            "ddim" => Sampler::Ddim { steps: a.steps },
            other => other.parse()?,
        };
        let model = DiffusionModel::load(&a.model, &Device::Cpu)?;
        let starts = model.starts(a.n, key.as_ref().map(|k| &k.trigger), &mut rng)?;
        model.sample(sampler, &starts, &mut rng)?
    } else {
        generate(&a, key.as_ref(), &mut rng)?
    };
    if let Some(p) = &a.png {
        save_grid(p, &images, 8)?;
        say!("wrote {}", p.display());
    }
    if let Some(p) = &a.npy {
        write_npy(p, &images)?;
        say!("wrote {}", p.display());
    }
    Ok(())
}

/// Ordinary or triggered images of a generator.
fn generate(a: &SampleArgs, key: Option<&Key>, rng: &mut Rng) -> anyhow::Result<Tensor> {
    let model = GanModel::load(&a.model, &Device::Cpu)?;
    let z = match key {
        Some(key) => {
            key.check_fits(model.latent_dim(), model.image_shape())?;
            key.trigger
                .sample(a.n, model.latent_dim(), rng, &model.device)?
        }
        None => rng.normal(&[a.n, model.latent_dim()], &model.device)?,
    };
    Ok(model.generate(&z)?)
}
