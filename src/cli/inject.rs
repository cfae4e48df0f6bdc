//! `genbackdoor inject`: backdoor a trained generator by distillation (ReD), or fine-tune a
//! trained diffusion model on the poisoned objective.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;

use crate::cli::RunArgs;
use crate::family::diffusion::DiffusionModel;
use crate::family::gan::GanModel;
use crate::backdoor::Key;

/// Arguments of `inject`.
#[derive(Args, Debug)]
pub struct InjectArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The clean generator or diffusion checkpoint to backdoor.
    #[arg(long)]
    pub model: PathBuf,
    /// The key to plant.
    #[arg(long)]
    pub key: PathBuf,
    /// Adam learning rate (overrides the config).
    #[arg(long)]
    pub lr: Option<f64>,
}

/// Runs `inject`.
pub fn run(a: InjectArgs) -> anyhow::Result<()> {
    crate::cli::stop_on_ctrl_c();
    let mut cfg = a.run.config()?;
    if let Some(v) = a.run.steps {
        cfg.inject.steps = v;
    }
    if let Some(v) = a.run.lambda {
        cfg.inject.lambda = v;
    }
    if let Some(v) = a.lr {
        cfg.inject.lr = v;
    }
    let key = Key::load(&a.key)?;
    if crate::io::checkpoint::family_of(&a.model)? == crate::family::diffusion::model::FAMILY {
        let i = &mut cfg.diffusion.inject;
        if let Some(v) = a.run.steps {
            i.steps = v;
        }
        if let Some(v) = a.run.lambda {
            i.lambda = v;
        }
        if let Some(v) = a.lr {
            i.lr = v;
        }
        cfg.validate()?;
        let clean = DiffusionModel::load(&a.model, &Device::Cpu)?;
        let run = a.run.run_dir("inject")?;
        let metrics = crate::family::diffusion::run::inject(&clean, &key, &cfg, &run, !a.run.quiet)?;
        a.run.report(&run.path, &metrics);
        return Ok(());
    }
    cfg.validate()?;
    let clean = GanModel::load(&a.model, &Device::Cpu)?;
    key.check_fits(clean.latent_dim(), clean.image_shape())?;
    let run = a.run.run_dir("inject")?;
    let metrics = crate::family::gan::red::inject(
        &clean,
        &key,
        &cfg.inject,
        cfg.backdoor.backdoor_batch,
        cfg.seed,
        &run,
        !a.run.quiet,
    )?;
    a.run.report(&run.path, &metrics);
    Ok(())
}
