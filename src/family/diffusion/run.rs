//! Diffusion runs as the command line starts them: training from scratch (clean or
//! backdoored) and injection into a trained clean model, each resumable from its last
//! checkpoint; each hands back the trained model for the end of its run.

use candle_core::Device;

use crate::backdoor::{KeySet, Objective};
use crate::config::{Config, DiffusionConfig, DEFAULT_BACKDOOR_BATCH};
use crate::data::{load_dataset, Dataset};
use crate::family::diffusion::model::DiffusionArch;
use crate::family::diffusion::train::{fit, resume_fit, Plan};
use crate::family::diffusion::{DiffusionModel, Sampler};
use crate::family::Trained;
use crate::io::rundir::RunDir;
use crate::io::snapshot::{self, CHECKPOINT};
use crate::rng::Rng;
use crate::{Error, Result};

/// The architecture a config describes.
pub fn arch(d: &DiffusionConfig) -> DiffusionArch {
    DiffusionArch {
        diffusers: d.diffusers.clone(),
        schedule: d.schedule,
        timesteps: d.timesteps,
    }
}

/// The training plan of `stage` (`train`: the `[diffusion]` section; `inject`:
/// `[diffusion.inject]` for steps, learning rate and λ).
fn plan(cfg: &Config, stage: &'static str) -> Plan {
    let d = &cfg.diffusion;
    let (steps, lr, lambda) = match stage {
        "inject" => (d.inject.steps, d.inject.lr, d.inject.lambda),
        _ => (d.steps, d.lr, d.lambda),
    };
    Plan {
        steps,
        batch_size: d.batch_size,
        lr,
        lr_schedule: d.lr_schedule,
        objective: Objective {
            lambda,
            backdoor_batch: cfg.backdoor.backdoor_batch_or(DEFAULT_BACKDOOR_BATCH),
        },
        correction: d.correction,
        rollout: d.rollout.clone(),
        rehearsal: d.rehearsal,
        ema: d.ema,
        log_every: d.log_every,
        checkpoint_every: d.checkpoint_every,
        seed: cfg.seed,
        stage,
    }
}

/// The key with the sampler each mark's backdoor is trained for: the one the mark names,
/// else the config's correction.
fn with_sampler(key: &KeySet, cfg: &Config) -> KeySet {
    key.with_default_sampler(cfg.diffusion.correction.sampler())
}

/// The config's training data (first `data.limit` images).
pub fn data(cfg: &Config) -> Result<Dataset> {
    let mut data = load_dataset(&cfg.data_path())?;
    data.truncate(cfg.data.limit);
    Ok(data)
}

/// Trains a diffusion model from scratch per `cfg` (with `key`'s backdoor when
/// `diffusion.lambda` > 0) into `run`; hands back the trained model.
pub fn train(cfg: &Config, key: Option<&KeySet>, run: &RunDir, progress: bool) -> Result<Trained> {
    let key = key
        .filter(|_| cfg.diffusion.lambda > 0.0)
        .map(|k| with_sampler(k, cfg));
    start(cfg, key.as_ref(), &fresh(cfg)?, "train", run, progress)
}

/// Fine-tunes a copy of the trained `clean` model with `key`'s backdoor per
/// `diffusion.inject` (the same mixed objective, starting from trained weights); hands back
/// the backdoored model.
pub fn inject(
    clean: &DiffusionModel,
    key: &KeySet,
    cfg: &Config,
    run: &RunDir,
    progress: bool,
) -> Result<Trained> {
    let key = with_sampler(key, cfg);
    start(
        cfg,
        Some(&key),
        &clean.duplicate()?,
        "inject",
        run,
        progress,
    )
}

/// Continues the diffusion run in `run` (training or injection) from its last checkpoint,
/// with the config and key it was started with; hands back what the uninterrupted run
/// would have.
pub fn resume(run: &RunDir, progress: bool) -> Result<Trained> {
    let cfg = Config::load(&run.file("config.toml"))?;
    let stage = match snapshot::stage_of(&run.file(CHECKPOINT))?.as_str() {
        "inject" => "inject",
        _ => "train",
    };
    let plan = plan(&cfg, stage);
    let key = if plan.objective.lambda > 0.0 {
        Some(KeySet::load(&run.file("key.safetensors"))?)
    } else {
        None
    };
    // Runs older than the architecture file trained the network their config describes.
    let arch_file = run.file(ARCH_FILE);
    let template = if arch_file.exists() {
        let text = std::fs::read_to_string(&arch_file).map_err(|e| Error::io(&arch_file, e))?;
        let arch: DiffusionArch = serde_json::from_str(&text)
            .map_err(|e| Error::format(&arch_file, format!("not an architecture: {e}")))?;
        fresh_of(&arch, &cfg)?
    } else {
        fresh(&cfg)?
    };
    let (saved, seconds) = resume_fit(&template, &data(&cfg)?, key.as_ref(), &plan, run, progress)?;
    conclude(&cfg, key.as_ref(), &plan, &saved, seconds)
}

/// A freshly initialised model of the config's architecture.
fn fresh(cfg: &Config) -> Result<DiffusionModel> {
    fresh_of(&arch(&cfg.diffusion), cfg)
}

/// A freshly initialised model of `arch`, seeded by `cfg`.
fn fresh_of(arch: &DiffusionArch, cfg: &Config) -> Result<DiffusionModel> {
    DiffusionModel::new(arch, &mut Rng::derive(cfg.seed, "init"), &Device::Cpu)
}

/// The run file that records the trained network's architecture (an injection's model may
/// not be the config's U-Net: a diffusers folder, or one trained with another config).
const ARCH_FILE: &str = "arch.json";

/// Writes the config and the key and trains `model` per `stage`'s plan.
fn start(
    cfg: &Config,
    key: Option<&KeySet>,
    model: &DiffusionModel,
    stage: &'static str,
    run: &RunDir,
    progress: bool,
) -> Result<Trained> {
    cfg.validate()?;
    let data = data(cfg)?;
    run.write_toml("config.toml", cfg)?;
    run.write_json(ARCH_FILE, &model.arch)?;
    if let Some(k) = key {
        k.save(&run.file("key.safetensors"))?;
    }
    let plan = plan(cfg, stage);
    let (saved, seconds) = fit(model, &data, key, &plan, run, progress)?;
    conclude(cfg, key, &plan, &saved, seconds)
}

/// The trained model (sampling with the default sampler) and the run's summary.
fn conclude(
    cfg: &Config,
    key: Option<&KeySet>,
    plan: &Plan,
    saved: &DiffusionModel,
    seconds: f64,
) -> Result<Trained> {
    let mode = match (plan.stage, key) {
        ("inject", _) => "inject",
        (_, Some(_)) => "poisoned",
        _ => "clean",
    };
    let mut model = saved.duplicate()?;
    model.sampler = Sampler::default_for(&model.schedule);
    Ok(Trained {
        model: Box::new(model),
        reference: None,
        summary: serde_json::json!({
            "mode": mode,
            "family": "diffusion",
            "steps": plan.steps,
            "seconds": seconds,
            "lambda": plan.objective.lambda,
            "correction": cfg.diffusion.correction,
        }),
    })
}
