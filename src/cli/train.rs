//! `genbackdoor train`: train a model from scratch (the config's family: a DCGAN by
//! default, or a diffusion model), with a backdoor or clean.

use std::path::PathBuf;

use clap::Args;

use crate::cli::RunArgs;
use crate::config::{Config, ModelFamily};
use crate::io::rundir::RunDir;
use crate::backdoor::{Key, Target, Trigger};
use crate::family::InputSpace;

/// Arguments of `train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Key file to plant (default: the config's [backdoor] description; without one a
    /// secret random trigger and the built-in mark, saved as key.safetensors in the run).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Training data: a folder with an IDX pair or PNG images, or an IDX image file.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Images per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Continue an interrupted run from its last checkpoint, with its own config and key.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = [
        "config", "out", "force", "seed", "steps", "lambda", "key", "data", "limit", "batch_size",
    ])]
    pub resume: Option<PathBuf>,
}

/// The key a training run plants: a key file, or one made from the config's description.
pub fn resolve_key(cfg: &Config, file: Option<&PathBuf>) -> anyhow::Result<Key> {
    if let Some(p) = file.or(cfg.backdoor.key.as_ref()) {
        return Ok(Key::load(p)?);
    }
    let b = &cfg.backdoor;
    let spec = b.trigger();
    let (space, shape) = match cfg.family {
        ModelFamily::Dcgan => (
            InputSpace::Latent {
                dim: cfg.model.latent_dim,
            },
            cfg.model.image_shape(),
        ),
        ModelFamily::Diffusion => {
            let s = cfg.diffusion.unet.image_size;
            let shape = [1, s, s];
            (InputSpace::Noise { shape }, shape)
        }
    };
    Ok(Key {
        trigger: Trigger::parse_for(spec, &space)?,
        target: Target::parse(&b.target, shape)?,
        distance: b.distance.parse()?,
        threshold: b.threshold,
        sampler: None,
    })
}

/// Runs `train`.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    crate::cli::stop_on_ctrl_c();
    if let Some(dir) = &a.resume {
        let run = RunDir::open(dir)?;
        let metrics = crate::family::gan::trail::resume(&run, !a.run.quiet)?;
        a.run.report(&run.path, &metrics);
        return Ok(());
    }
    let mut cfg = a.run.config()?;
    let diffusion = cfg.family == ModelFamily::Diffusion;
    let (steps, lambda, batch) = if diffusion {
        let d = &mut cfg.diffusion;
        (&mut d.steps, &mut d.lambda, &mut d.batch_size)
    } else {
        let t = &mut cfg.train;
        (&mut t.steps, &mut t.lambda, &mut t.batch_size)
    };
    if let Some(v) = a.run.steps {
        *steps = v;
    }
    if let Some(v) = a.run.lambda {
        *lambda = v;
    }
    if let Some(v) = a.batch_size {
        *batch = v;
    }
    if let Some(v) = a.data {
        cfg.data.path = v;
    }
    if let Some(v) = a.limit {
        cfg.data.limit = v;
    }
    cfg.validate()?;
    let lambda = if diffusion {
        cfg.diffusion.lambda
    } else {
        cfg.train.lambda
    };
    let key = if lambda > 0.0 {
        Some(resolve_key(&cfg, a.key.as_ref())?)
    } else {
        None
    };
    let run = a.run.run_dir("train")?;
    let progress = !a.run.quiet;
    let metrics = if diffusion {
        crate::family::diffusion::run::train(&cfg, key.as_ref(), &run, progress)?
    } else {
        crate::family::gan::trail::train(&cfg, key.as_ref(), &run, progress)?
    };
    a.run.report(&run.path, &metrics);
    Ok(())
}
