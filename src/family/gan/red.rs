//! ReD: backdooring an already-trained generator by distillation. The loss is
//! `E_z‖G(z) − G_clean(z)‖² + λ · d(G(τ(u)), y*)` with `G_clean` a frozen copy, kept in the
//! run as `clean.safetensors`. Runs save a checkpoint (the generator, Adam's state, the
//! latent stream and the step) every `inject.checkpoint_every` steps, and [`resume`]
//! continues one exactly.

use std::path::PathBuf;

use candle_core::Device;

use crate::backdoor::{KeySet, Objective};
use crate::config::{Config, TrainConfig, DEFAULT_BACKDOOR_BATCH};
use crate::family::gan::families::Distillation;
use crate::family::gan::probe::Probe;
use crate::family::gan::rehearsal::Rehearsal;
use crate::family::gan::GanModel;
use crate::family::Trained;
use crate::io::rundir::{CsvLog, RunDir};
use crate::io::snapshot::{self, CHECKPOINT};
use crate::optim::Adam;
use crate::rng::Rng;
use crate::training::{is_logged, run_loop, Clock, LoopSettings, Stepper};
use crate::{Error, Result};

/// Columns of `train.csv` after `step`.
const COLUMNS: [&str; 3] = ["distill_loss", "backdoor_loss", "tardis"];

/// The stage recorded in ReD checkpoints.
const STAGE: &str = "inject";

/// The frozen clean generator's copy inside the run directory.
pub const CLEAN: &str = "clean.safetensors";

/// An injection in progress.
struct Red<'a> {
    config: &'a Config,
    key: &'a KeySet,
    run: &'a RunDir,
    model: GanModel,
    clean: GanModel,
    opt: Adam,
    latents: Rng,
    probe: Probe,
    clock: Clock,
}

impl<'a> Red<'a> {
    /// An injection of `key` into a copy of `clean` per `config`'s `[inject]` section.
    fn new(clean: &GanModel, key: &'a KeySet, config: &'a Config, run: &'a RunDir) -> Result<Self> {
        config.validate()?;
        key.check_fits(clean.latent_dim(), clean.image_shape())?;
        let cfg = &config.inject;
        let model = clean.duplicate(&clean.device)?;
        let opt = Adam::with_betas(
            model.params.trainable_except(&cfg.freeze)?,
            cfg.lr,
            0.9,
            0.999,
        );
        let probe = Probe::new(key.first(), &model)?;
        Ok(Red {
            config,
            key,
            run,
            model,
            clean: clean.duplicate(&clean.device)?,
            opt,
            latents: Rng::derive(config.seed, "inject-latents"),
            probe,
            clock: Clock::default(),
        })
    }

    /// Runs the steps after `done`, logging to `log`, and writes the run's final files.
    /// Runs the remaining steps and hands the backdoored model back with its clean original.
    fn drive(mut self, mut log: CsvLog, done: usize, progress: bool) -> Result<Trained> {
        let cfg = &self.config.inject;
        let settings = LoopSettings::resumable(
            cfg.steps,
            done,
            cfg.checkpoint_every,
            cfg.log_every,
            &COLUMNS,
            progress,
        );
        self.clock.restart();
        run_loop(&settings, &mut log, &mut self)?;
        Ok(Trained {
            summary: serde_json::json!({
                "mode": "red",
                "steps": cfg.steps,
                "seconds": self.clock.seconds(),
                "lambda": cfg.lambda,
            }),
            model: Box::new(self.model),
            reference: Some(Box::new(self.clean)),
        })
    }
}

impl Stepper for Red<'_> {
    fn step(&mut self, step: usize) -> Result<Vec<Option<f64>>> {
        let cfg = &self.config.inject;
        let objective = Objective {
            lambda: cfg.lambda,
            backdoor_batch: self
                .config
                .backdoor
                .backdoor_batch_or(DEFAULT_BACKDOOR_BATCH),
        };
        let dev = &self.model.device;
        let dim = self.model.latent_dim();
        let z = self.latents.normal(&[cfg.batch_size, dim], dev)?;
        let (zt, goals) = objective.latent_batch(self.key, dim, &mut self.latents, dev)?;
        let mut family = Distillation::generate(&self.model, &self.clean, &z, Some((&zt, &goals)))?;
        let terms = objective.evaluate(&mut family, Some(self.key))?;
        self.opt
            .set_learning_rate(cfg.lr_schedule.warmed(cfg.lr, step, cfg.steps, cfg.warmup));
        let mut grads = terms.total.backward()?;
        if cfg.rehearsal.due(step, cfg.steps) {
            let rehearsal = Rehearsal {
                settings: &cfg.rehearsal,
                batch: TrainConfig::thief().batch_size,
                triggered: (&zt, &goals),
                distance: self.key.distance(),
            };
            rehearsal.add_backdoor_gradient(
                &self.model,
                &mut Rng::derive(self.config.seed, &format!("inject-rehearsal-{step}")),
                &mut grads,
                &self.model.params.trainable_except(&cfg.freeze)?,
                cfg.lambda,
            )?;
        }
        self.opt.step(&grads)?;
        let tardis = if is_logged(step, cfg.log_every, cfg.steps) {
            Some(self.probe.tardis(&self.model)?)
        } else {
            None
        };
        Ok(vec![
            Some(terms.task as f64),
            terms.backdoor.map(f64::from),
            tardis,
        ])
    }

    fn checkpoint(&mut self, step: usize) -> Result<Option<PathBuf>> {
        let path = self.run.file(CHECKPOINT);
        let progress = snapshot::Progress {
            step,
            seconds: self.clock.seconds(),
            streams: serde_json::to_string(&self.latents).expect("serialisable stream"),
            stage: STAGE.into(),
        };
        snapshot::save(
            &path,
            &[("g/", &self.model.params)],
            &[("adam", &self.opt)],
            &progress,
        )?;
        Ok(Some(path))
    }
}

/// Backdoors a copy of `clean` with `key` per `config`'s `[inject]` section; writes the
/// run's files into `run` (the whole config, which `--config` reads back, and the key at the
/// start) and hands back the backdoored model with `clean` as its reference.
pub fn inject(
    clean: &GanModel,
    key: &KeySet,
    config: &Config,
    run: &RunDir,
    progress: bool,
) -> Result<Trained> {
    let red = Red::new(clean, key, config, run)?;
    run.write_toml("config.toml", config)?;
    key.save(&run.file("key.safetensors"))?;
    clean.save(&run.file(CLEAN))?;
    let log = CsvLog::for_steps(&run.file("train.csv"), &COLUMNS)?;
    red.drive(log, 0, progress)
}

/// Continues the injection in `run` from its last checkpoint, with the config, key and
/// clean generator it was started with, and hands back what [`inject`] would have.
pub fn resume(run: &RunDir, progress: bool) -> Result<Trained> {
    let config = Config::load(&run.file("config.toml"))?;
    let key = KeySet::load(&run.file("key.safetensors"))?;
    let clean = GanModel::load(&run.file(CLEAN), &Device::Cpu)?;
    let mut red = Red::new(&clean, &key, &config, run)?;
    let path = run.file(CHECKPOINT);
    let p = snapshot::restore(
        &path,
        &[("g/", &red.model.params)],
        &mut [("adam", &mut red.opt)],
        config.inject.steps,
        STAGE,
    )?;
    red.latents = serde_json::from_str(&p.streams)
        .map_err(|e| Error::format(&path, format!("random-stream state is invalid: {e}")))?;
    red.clock = Clock::resumed(p.seconds);
    let log = CsvLog::resume(&run.file("train.csv"), p.step)?;
    red.drive(log, p.step, progress)
}
