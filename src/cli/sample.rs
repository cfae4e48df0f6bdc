//! `genbackdoor sample`: generate ordinary or triggered images from a model of any family.

use std::path::PathBuf;

use clap::Args;

use crate::io::grid::save_grid;
use crate::io::npy::{read_npy, write_npy};
use crate::rng::Rng;

/// Arguments of `sample`.
#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Generator or diffusion checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Key: when given, the latents (or starting noise) are triggered by one of its triggers
    /// (`--trigger`).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Which trigger of the key (1 = the first), sampled under the sampler it was trained
    /// for unless `--sampler` names one.
    #[arg(long, default_value_t = 1, requires = "key")]
    pub trigger: usize,
    /// Number of images.
    #[arg(long, default_value_t = 64)]
    pub n: usize,
    /// PNG grid to write (8 images per row).
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// NumPy file to write: float32 [N, C, H, W] in [-1, 1].
    #[arg(long)]
    pub npy: Option<PathBuf>,
    /// NumPy file of the inputs to start from instead of drawn ones: float32 starting noise
    /// x_T `[N, C, H, W]` for a diffusion model (a trigger's pattern is added with --key), or
    /// latents `[N, D]` for a generator (without --key). N images, instead of --n.
    #[arg(long, conflicts_with = "n")]
    pub noise: Option<PathBuf>,
    /// Seed of the latents (or starting noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Diffusion models: `ddpm` (all T steps), `ddpm-N` (ancestral over N strided steps),
    /// `ddim` (deterministic, `--steps` steps),
    /// `ddim-N`, `dpm++2m` (DPM-Solver++ 2M, 20 steps), `dpm++2m-N`, `heun` (25 steps) or
    /// `heun-N`; default: the sampler that checks the key's trigger when a key is given
    /// (`ddpm-100` for a DDPM-trained one, its own sampler otherwise), else the model's
    /// default, `ddpm-100` (`ddpm` when T ≤ 100).
    #[arg(long)]
    pub sampler: Option<String>,
    /// Diffusion models: DDIM's number of steps (with `--sampler ddim`, or alone).
    #[arg(long)]
    pub steps: Option<usize>,
}

/// Runs `sample`.
pub fn run(a: SampleArgs) -> anyhow::Result<()> {
    if a.png.is_none() && a.npy.is_none() {
        anyhow::bail!("nothing to write: give --png FILE and/or --npy FILE");
    }
    if a.n == 0 {
        anyhow::bail!("--n must be at least 1");
    }
    let sampler = match (a.sampler.as_deref(), a.steps) {
        (Some("ddim") | None, Some(steps)) => Some(format!("ddim-{steps}")),
        (Some(_), Some(_)) => anyhow::bail!("--steps goes with --sampler ddim only"),
        (other, None) => other.map(str::to_string),
    };
    let (mut model, key) = super::model_and_key(&a.model, a.key.as_deref(), sampler.as_deref())?;
    let mark = match &key {
        Some(k) => {
            let marks = k.marks();
            let mark = a.trigger.checked_sub(1).and_then(|i| marks.get(i));
            let mark = mark.ok_or_else(|| {
                anyhow::anyhow!(
                    "--trigger {} is not in the key: it holds {} trigger(s), numbered from 1",
                    a.trigger,
                    marks.len()
                )
            })?;
            if let Some(s) = mark.sampler {
                model.set_sampler(s)?;
            }
            Some(mark)
        }
        None => None,
    };
    let mut rng = Rng::derive(a.seed, "sample");
    let (space, device) = (model.input_space(), model.device());
    let inputs = match (&a.noise, mark) {
        (Some(p), mark) => {
            let noise = read_npy(p)?.to_device(&device)?;
            space.check_batch(&noise, &p.display().to_string())?;
            match mark {
                Some(k) => k.trigger.onto(&noise)?,
                None => noise,
            }
        }
        (None, Some(k)) => k.trigger.inputs(&space, a.n, &mut rng, &device)?,
        (None, None) => space.ordinary(a.n, &mut rng, &device)?,
    };
    let images = model.generate(&inputs, &mut rng)?;
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
