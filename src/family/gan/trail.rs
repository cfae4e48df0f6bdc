//! Training a DCGAN from scratch: clean (λ = 0) or with a backdoor (TrAIL: the generator
//! minimises its adversarial loss plus λ times the backdoor term; with `[train.rehearsal]`, also
//! at weights a rehearsed clean fine-tuning reaches, see [`super::rehearsal`]). Runs save a checkpoint
//! (both networks, both optimisers, every random stream and the step) every
//! `train.checkpoint_every` steps, and [`resume`] continues one exactly where it stopped.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::backdoor::{KeySet, Objective};
use crate::config::{Config, TRAIL_SET_BATCH};
use crate::data::{load_dataset, Batcher, Dataset};
use crate::family::gan::families::Adversarial;
use crate::family::gan::probe::Probe;
use crate::family::gan::rehearsal::Rehearsal;
use crate::family::gan::{discriminator_loss, GanModel};
use crate::family::Trained;
use crate::io::checkpoint;
use crate::io::rundir::{CsvLog, RunDir};
use crate::io::snapshot::{self, CHECKPOINT};
use crate::models::{Discriminator, Params};
use crate::optim::Adam;
use crate::rng::Rng;
use crate::training::{is_logged, run_loop, Clock, LoopSettings, Stepper, Steps};
use crate::{Error, Result};

/// Columns of `train.csv` after `step`.
const COLUMNS: [&str; 4] = ["d_loss", "g_loss", "backdoor_loss", "tardis"];

/// The family name stored in discriminator checkpoints.
const DISCRIMINATOR_FAMILY: &str = "dcgan-discriminator";

/// Every random stream of a run, in one serialisable value.
#[derive(Clone, Serialize, Deserialize)]
struct Streams {
    batches: Batcher,
    latents: Rng,
    dropout: Rng,
    trigger_latents: Rng,
}

/// A training run in progress: the networks, their optimisers, the data and the streams.
struct Trail<'a> {
    cfg: &'a Config,
    key: Option<&'a KeySet>,
    run: &'a RunDir,
    data: Dataset,
    model: GanModel,
    dparams: Params,
    disc: Discriminator,
    /// The same discriminator over detached views of its weights: the generator's step runs
    /// through it, so that its backward pass computes no gradient for D.
    frozen_disc: Discriminator,
    opt_g: Adam,
    opt_d: Adam,
    streams: Streams,
    probe: Option<Probe>,
    /// Training seconds across interruptions.
    clock: Clock,
}

impl<'a> Trail<'a> {
    /// A fresh run (step 0) per `cfg`.
    fn new(cfg: &'a Config, key: Option<&'a KeySet>, run: &'a RunDir) -> Result<Self> {
        cfg.validate()?;
        let dev = Device::Cpu;
        let t = &cfg.train;
        let mut data = load_dataset(&cfg.data_path())?;
        data.truncate(cfg.data.limit);
        data.check_shape(cfg.model.image_shape())?;
        if let Some(k) = key {
            k.check_fits(cfg.model.latent_dim, cfg.model.image_shape())?;
        }
        let model = GanModel::new(&cfg.model, &mut Rng::derive(cfg.seed, "init-g"), &dev)?;
        let dparams = Params::new();
        let disc = Discriminator::new(&cfg.model, &dparams, &dev)?;
        dparams.init(&mut Rng::derive(cfg.seed, "init-d"))?;
        let frozen_disc = Discriminator::frozen(&cfg.model, &dparams, &dev)?;
        let opt_g = Adam::with_betas(model.params.trainable(), t.lr_g, t.beta1, t.beta2);
        let opt_d = Adam::with_betas(dparams.trainable(), t.lr_d, t.beta1, t.beta2);
        let streams = Streams {
            batches: Batcher::new(data.len, t.batch_size, Rng::derive(cfg.seed, "batches")),
            latents: Rng::derive(cfg.seed, "latents"),
            dropout: Rng::derive(cfg.seed, "dropout"),
            trigger_latents: Rng::derive(cfg.seed, "trigger-latents"),
        };
        let probe = key.map(|k| Probe::new(k.first(), &model)).transpose()?;
        Ok(Trail {
            cfg,
            key,
            run,
            data,
            model,
            dparams,
            disc,
            frozen_disc,
            opt_g,
            opt_d,
            streams,
            probe,
            clock: Clock::default(),
        })
    }

    /// Restores the state saved by [`Stepper::checkpoint`]; returns its step.
    fn restore(&mut self, path: &Path) -> Result<usize> {
        let p = snapshot::restore(
            path,
            &[("g/", &self.model.params), ("d/", &self.dparams)],
            &mut [("adam_g", &mut self.opt_g), ("adam_d", &mut self.opt_d)],
            self.cfg.train.steps,
            "train",
        )?;
        self.streams = serde_json::from_str(&p.streams)
            .map_err(|e| Error::format(path, format!("random-stream state is invalid: {e}")))?;
        self.clock = Clock::resumed(p.seconds);
        Ok(p.step)
    }
}

impl Stepper for Trail<'_> {
    fn step(&mut self, step: usize) -> Result<Vec<Option<f64>>> {
        let (cfg, t, dev) = (self.cfg, &self.cfg.train, &self.model.device);
        let objective = Objective {
            lambda: t.lambda,
            backdoor_batch: cfg.backdoor.backdoor_batch_or(TRAIL_SET_BATCH),
        };
        self.opt_g
            .set_learning_rate(t.lr_schedule.at(t.lr_g, step, t.steps));
        self.opt_d
            .set_learning_rate(t.lr_schedule.at(t.lr_d, step, t.steps));
        let s = &mut self.streams;
        let real = self.data.batch(s.batches.next_batch(), dev)?;
        let n = real.dim(0)?;
        let z = s.latents.normal(&[n, cfg.model.latent_dim], dev)?;
        let triggered = match self.key {
            Some(k) => Some(objective.latent_batch(
                k,
                cfg.model.latent_dim,
                &mut s.trigger_latents,
                dev,
            )?),
            None => None,
        };
        let triggered = triggered.as_ref().map(|(z, goals)| (z, goals));
        let mut family = Adversarial::generate(
            &self.model,
            &self.frozen_disc,
            &z,
            triggered,
            &mut s.dropout,
        )?;

        let d_real = self.disc.forward(&real, Some(family.dropout))?;
        let d_fake = self
            .disc
            .forward(&family.fake.detach(), Some(family.dropout))?;
        let d_loss = discriminator_loss(&d_real, &d_fake)?;
        self.opt_d.backward_step(&d_loss)?;

        let terms = objective.evaluate(&mut family, self.key)?;
        let mut grads = terms.total.backward()?;
        if let (Some(k), Some(triggered)) = (self.key, triggered) {
            if t.rehearsal.due(step, t.steps) {
                let rehearsal = Rehearsal {
                    settings: &t.rehearsal,
                    batch: n,
                    triggered,
                    distance: k.distance(),
                };
                rehearsal.add_backdoor_gradient(
                    &self.model,
                    &mut Rng::derive(cfg.seed, &format!("rehearsal-{step}")),
                    &mut grads,
                    &self.model.params.trainable(),
                    t.lambda,
                )?;
            }
        }
        self.opt_g.step(&grads)?;
        let tardis = match &self.probe {
            Some(p) if is_logged(step, t.log_every, t.steps) => Some(p.tardis(&self.model)?),
            _ => None,
        };
        Ok(vec![
            Some(d_loss.to_scalar::<f32>()? as f64),
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
            streams: serde_json::to_string(&self.streams).expect("serialisable streams"),
            stage: "train".into(),
        };
        snapshot::save(
            &path,
            &[("g/", &self.model.params), ("d/", &self.dparams)],
            &[("adam_g", &self.opt_g), ("adam_d", &self.opt_d)],
            &progress,
        )?;
        Ok(Some(path))
    }
}

/// Trains a generator per `cfg` (with the backdoor of `key` when given and λ > 0) and writes
/// the config, key, log and checkpoints into `run`. Hands back the trained generator.
pub fn train(cfg: &Config, key: Option<&KeySet>, run: &RunDir, progress: bool) -> Result<Trained> {
    let key = key.filter(|_| cfg.train.lambda > 0.0);
    let trail = Trail::new(cfg, key, run)?;
    run.write_toml("config.toml", cfg)?;
    if let Some(k) = key {
        k.save(&run.file("key.safetensors"))?;
    }
    let log = CsvLog::for_steps(&run.file("train.csv"), &COLUMNS)?;
    drive(trail, log, 0, progress)
}

/// Continues the run in `run` from its last checkpoint (which the caller has
/// checked is there), with the config and key it was started with; hands back what
/// [`train`] would have.
pub fn resume(run: &RunDir, progress: bool) -> Result<Trained> {
    let cfg = Config::load(&run.file("config.toml"))?;
    let key = if cfg.train.lambda > 0.0 {
        Some(KeySet::load(&run.file("key.safetensors"))?)
    } else {
        None
    };
    let mut trail = Trail::new(&cfg, key.as_ref(), run)?;
    let step = trail.restore(&run.file(CHECKPOINT))?;
    let log = CsvLog::resume(&run.file("train.csv"), step)?;
    drive(trail, log, step, progress)
}

/// The persistence attack by fine-tuning: continues clean adversarial training (λ = 0) of
/// `marked` for `cfg.train.steps` steps, with the discriminator checkpoint `disc` when given
/// (else a fresh one). `measure(step, model)` runs before the first step and every `every`
/// steps; the loop's log goes to `finetune.csv` in `run`. Returns the fine-tuned generator.
pub fn finetune(
    cfg: &Config,
    marked: &GanModel,
    disc: Option<&Path>,
    run: &RunDir,
    every: usize,
    progress: bool,
    measure: &mut dyn FnMut(usize, &GanModel) -> Result<()>,
) -> Result<GanModel> {
    let mut cfg = cfg.clone();
    cfg.model = marked.generator.config().clone();
    let mut trail = Trail::new(&cfg, None, run)?;
    trail.model.params.copy_from(&marked.params)?;
    if let Some(p) = disc {
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        let (_, file): (serde_json::Value, _) =
            checkpoint::parse_family(p, &bytes, DISCRIMINATOR_FAMILY, &Device::Cpu)?;
        checkpoint::assign(p, &trail.dparams, &file)?;
    }
    measure(0, &trail.model)?;
    let steps = cfg.train.steps;
    let settings = LoopSettings {
        steps,
        first: 1,
        checkpoint_every: 0,
        log_every: cfg.train.log_every,
        columns: &COLUMNS,
        progress,
    };
    let mut log = CsvLog::for_steps(&run.file("finetune.csv"), &COLUMNS)?;
    let mut stepper = Steps(|i| {
        let values = trail.step(i)?;
        if i % every.max(1) == 0 || i == steps {
            measure(i, &trail.model)?;
        }
        Ok(values)
    });
    run_loop(&settings, &mut log, &mut stepper)?;
    Ok(trail.model)
}

/// Runs the steps after `done`, saves the discriminator and hands the generator back.
fn drive(mut trail: Trail, mut log: CsvLog, done: usize, progress: bool) -> Result<Trained> {
    let (cfg, run, key) = (trail.cfg, trail.run, trail.key);
    let t = &cfg.train;
    let settings = LoopSettings::resumable(
        t.steps,
        done,
        t.checkpoint_every,
        t.log_every,
        &COLUMNS,
        progress,
    );
    trail.clock.restart();
    run_loop(&settings, &mut log, &mut trail)?;
    // Across interruptions: the seconds before the resumed checkpoint plus this process's.
    let seconds = trail.clock.seconds();
    let summary = serde_json::json!({
        "mode": if key.is_some() { "trail" } else { "clean" },
        "steps": t.steps,
        "seconds": seconds,
        "lambda": t.lambda,
    });
    checkpoint::save_params(
        &run.file("discriminator.safetensors"),
        &trail.dparams,
        DISCRIMINATOR_FAMILY,
        "{}",
    )?;
    Ok(Trained {
        model: Box::new(trail.model),
        reference: None,
        summary,
    })
}
