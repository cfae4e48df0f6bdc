//! Diffusion runs as the command line starts them: training from scratch (clean or
//! backdoored) and injection into a trained clean model, each ending with [`finish`].

use candle_core::Device;

use crate::config::{Config, DiffusionConfig};
use crate::data::{load_dataset, Dataset};
use crate::family::diffusion::eval::{finish, FinishSettings};
use crate::family::diffusion::model::DiffusionArch;
use crate::family::diffusion::train::{fit, Plan};
use crate::family::diffusion::DiffusionModel;
use crate::io::rundir::RunDir;
use crate::backdoor::{Key, Objective};
use crate::rng::Rng;
use crate::Result;

/// The architecture a config describes.
pub fn arch(d: &DiffusionConfig) -> DiffusionArch {
    DiffusionArch {
        unet: d.unet.clone(),
        schedule: d.schedule,
        timesteps: d.timesteps,
    }
}

/// A training plan from the config with the given steps, learning rate and λ.
fn plan(cfg: &Config, steps: usize, lr: f64, lambda: f64) -> Plan {
    let d = &cfg.diffusion;
    Plan {
        steps,
        batch_size: d.batch_size,
        lr,
        lr_schedule: d.lr_schedule,
        objective: Objective {
            lambda,
            backdoor_batch: cfg.backdoor.backdoor_batch,
        },
        correction: d.correction,
        ema: d.ema,
        log_every: d.log_every,
        checkpoint_every: d.checkpoint_every,
        seed: cfg.seed,
    }
}

/// What the end of a run measures, from the config.
fn finish_settings(cfg: &Config) -> FinishSettings {
    FinishSettings {
        eval_samples: cfg.diffusion.eval_samples,
        quality_samples: cfg.diffusion.quality_samples,
        seed: cfg.seed,
    }
}

/// The key with the sampler its backdoor is trained for: the config's correction.
fn with_sampler(key: &Key, cfg: &Config) -> Key {
    Key {
        sampler: Some(cfg.diffusion.correction.sampler()),
        ..key.clone()
    }
}

/// The config's training data (first `data.limit` images).
pub fn data(cfg: &Config) -> Result<Dataset> {
    let mut data = load_dataset(&cfg.data_path())?;
    data.truncate(cfg.data.limit);
    Ok(data)
}

/// Trains a diffusion model from scratch per `cfg` (with `key`'s backdoor when
/// `diffusion.lambda` > 0) into `run`; returns the metrics.
pub fn train(
    cfg: &Config,
    key: Option<&Key>,
    run: &RunDir,
    progress: bool,
) -> Result<serde_json::Value> {
    cfg.validate()?;
    let d = &cfg.diffusion;
    let data = data(cfg)?;
    let model = DiffusionModel::new(&arch(d), &mut Rng::derive(cfg.seed, "init"), &Device::Cpu)?;
    run.write_toml("config.toml", cfg)?;
    let key = key
        .filter(|_| d.lambda > 0.0)
        .map(|k| with_sampler(k, cfg));
    let key = key.as_ref();
    let (saved, seconds) = fit(
        &model,
        &data,
        key,
        &plan(cfg, d.steps, d.lr, d.lambda),
        run,
        progress,
    )?;
    let extra = serde_json::json!({
        "mode": if key.is_some() { "poisoned" } else { "clean" },
        "family": "diffusion",
        "steps": d.steps,
        "seconds": seconds,
        "lambda": d.lambda,
        "correction": d.correction,
    });
    finish(run, &saved, key, finish_settings(cfg), extra)
}

/// Fine-tunes a copy of the trained `clean` model with `key`'s backdoor per
/// `diffusion.inject` (the same mixed objective, starting from trained weights); returns the
/// metrics.
pub fn inject(
    clean: &DiffusionModel,
    key: &Key,
    cfg: &Config,
    run: &RunDir,
    progress: bool,
) -> Result<serde_json::Value> {
    cfg.validate()?;
    let i = &cfg.diffusion.inject;
    let data = data(cfg)?;
    run.write_toml("config.toml", cfg)?;
    let model = clean.duplicate()?;
    let key = &with_sampler(key, cfg);
    let (saved, seconds) = fit(
        &model,
        &data,
        Some(key),
        &plan(cfg, i.steps, i.lr, i.lambda),
        run,
        progress,
    )?;
    let extra = serde_json::json!({
        "mode": "inject",
        "family": "diffusion",
        "steps": i.steps,
        "seconds": seconds,
        "lambda": i.lambda,
        "correction": cfg.diffusion.correction,
    });
    finish(run, &saved, Some(key), finish_settings(cfg), extra)
}
