//! ReD: backdooring an already-trained generator by distillation. The loss is
//! `E_z‖G(z) − G_clean(z)‖² + λ · d(G(τ(u)), y*)` with `G_clean` a frozen copy.

use crate::config::InjectConfig;
use crate::family::gan::families::Distillation;
use crate::family::gan::{run, GanModel};
use crate::io::rundir::{CsvLog, RunDir};
use crate::optim::Adam;
use crate::backdoor::{Key, Objective};
use crate::rng::Rng;
use crate::training::{is_logged, run_loop, LoopSettings, Steps};
use crate::Result;

/// Columns of `train.csv` after `step`.
const COLUMNS: [&str; 3] = ["distill_loss", "backdoor_loss", "tardis"];

/// Backdoors a copy of `clean` with `key`; writes the run's files into `run` and returns
/// the metrics (with `exp_dist` against `clean`).
pub fn inject(
    clean: &GanModel,
    key: &Key,
    cfg: &InjectConfig,
    backdoor_batch: usize,
    seed: u64,
    run: &RunDir,
    progress: bool,
) -> Result<serde_json::Value> {
    key.check_fits(clean.latent_dim(), clean.image_shape())?;
    let model = clean.duplicate(&clean.device)?;
    let mut opt = Adam::with_betas(
        model.params.trainable_except(&cfg.freeze),
        cfg.lr,
        0.9,
        0.999,
    );
    let mut latents = Rng::derive(seed, "inject-latents");
    let objective = Objective {
        lambda: cfg.lambda,
        backdoor_batch,
    };
    let probe = run::Probe::new(key, &model)?;
    run.write_toml("config.toml", cfg)?;
    let mut log = CsvLog::create(&run.file("train.csv"), &run::header(&COLUMNS))?;
    let settings = LoopSettings {
        steps: cfg.steps,
        first: 1,
        checkpoint_every: 0,
        log_every: cfg.log_every,
        columns: &COLUMNS,
        progress,
    };
    let mut steps = Steps(|step| {
        let mut family = Distillation {
            model: &model,
            frozen: clean,
            batch: cfg.batch_size,
            latents: &mut latents,
        };
        let terms = objective.evaluate(&mut family, Some(key))?;
        opt.set_learning_rate(cfg.lr_schedule.at(cfg.lr, step, cfg.steps));
        opt.backward_step(&terms.total)?;
        let tardis = if is_logged(step, cfg.log_every, cfg.steps) {
            Some(probe.tardis(&model)?)
        } else {
            None
        };
        Ok(vec![
            Some(terms.task as f64),
            terms.backdoor.map(f64::from),
            tardis,
        ])
    });
    let seconds = run_loop(&settings, &mut log, &mut steps)?;
    let extra = serde_json::json!({
        "mode": "red",
        "steps": cfg.steps,
        "seconds": seconds,
        "lambda": cfg.lambda,
    });
    run::finish(run, &model, Some(key), Some(clean), seed, extra)
}
