//! `genbackdoor sample`: generate ordinary or triggered images.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;

use crate::gan::GanModel;
use crate::io::{grid::save_grid, npy::write_npy};
use crate::paradigm::Key;
use crate::rng::Rng;

/// Arguments of `sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Generator checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Key: when given, the latents are triggered.
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
    /// Seed of the latents.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `sample`.
pub fn run(a: SampleArgs) -> anyhow::Result<()> {
    if a.png.is_none() && a.npy.is_none() {
        anyhow::bail!("nothing to write: give --png FILE and/or --npy FILE");
    }
    if a.n == 0 {
        anyhow::bail!("--n must be at least 1");
    }
    let model = GanModel::load(&a.model, &Device::Cpu)?;
    let mut rng = Rng::derive(a.seed, "sample");
    let z = match &a.key {
        Some(k) => {
            let key = Key::load(k)?;
            key.check_fits(model.latent_dim(), model.image_shape())?;
            key.trigger
                .sample(a.n, model.latent_dim(), &mut rng, &model.device)?
        }
        None => rng.normal(&[a.n, model.latent_dim()], &model.device)?,
    };
    let images = model.generate(&z)?;
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
