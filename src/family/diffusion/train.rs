//! Training a diffusion model with the unified objective: the denoising loss
//! `E‖ε_θ(√ᾱ_t·x_0 + √(1−ᾱ_t)·ε, t) − ε‖²` plus λ times the same loss on the poisoned
//! forward process, whose goal is `ε + c_t·r` ([`crate::family::diffusion::poison`]). Training from
//! scratch and injection into a trained clean model (`inject`) are the same loop from
//! different starting weights. With `[diffusion.rollout]`, a DDIM-corrected trigger's poisoned
//! samples also hold states its own sampler visited ([`crate::family::diffusion::rollout`]).

use candle_core::{Device, Tensor};

use crate::backdoor::{Family, Key, KeySet, Objective};
use crate::config::{DiffusionRollout, RehearsalConfig};
use crate::data::{Batcher, Dataset};
use crate::family::diffusion::poison::{
    noised, per_sample, poisoned, poisoned_target, timestep_tensor,
};
use crate::family::diffusion::rehearsal::Rehearsal;
use crate::family::diffusion::rollout::{self, Visited};
use crate::family::diffusion::{Correction, DiffusionModel};
use crate::io::rundir::{CsvLog, RunDir};
use crate::io::snapshot::{self, CHECKPOINT};
use crate::models::Params;
use crate::optim::{add_scaled, Adam};
use crate::rng::Rng;
use crate::training::{run_loop, Clock, LoopSettings, LrSchedule, Stepper, Steps};
use crate::{Error, Result};

/// Columns of `train.csv` after `step`.
pub const COLUMNS: [&str; 3] = ["denoise_loss", "backdoor_loss", "lr"];

/// One mark's share of a step's poisoned samples: the trigger pattern, the images the
/// triggered process must end at, and the correction that makes the trigger survive the
/// sampler it is made for.
pub struct Poison<'a> {
    /// `r`, `[1, C, H, W]`.
    pub pattern: &'a Tensor,
    /// `y` for each poisoned sample, `[n, C, H, W]`.
    pub targets: Tensor,
    /// How `c_t` is computed.
    pub correction: Correction,
}

/// One step's noise-prediction losses as a [`Family`]: the clean and the poisoned samples go
/// through the U-Net as one batch, and the objective reads the two parts.
pub struct Denoising {
    clean_out: Tensor,
    clean_goal: Tensor,
    poisoned: Option<(Tensor, Tensor)>,
    /// Poisoned samples that were given ready-made.
    ready: usize,
}

/// Per-sample timesteps uniform in 1..=T, as `[n]` floats, and `[n, 1, 1, 1]` tensors of
/// `f(t)` for each function asked for.
fn timesteps(
    model: &DiffusionModel,
    n: usize,
    rng: &mut Rng,
    fs: &[&dyn Fn(usize) -> f64],
) -> Result<(Tensor, Vec<Tensor>)> {
    let total = model.schedule.steps();
    let ts: Vec<usize> = (0..n).map(|_| 1 + rng.below(total)).collect();
    let dev = &model.device;
    let per = fs
        .iter()
        .map(|f| per_sample(&ts, f, dev))
        .collect::<Result<Vec<_>>>()?;
    Ok((timestep_tensor(&ts, dev)?, per))
}

impl Denoising {
    /// Noises the clean images `x0` (and builds the poisoned samples of each mark in
    /// `poisons`) and runs the network once on all of them.
    pub fn prepare(
        model: &DiffusionModel,
        x0: &Tensor,
        poisons: &[Poison],
        rng: &mut Rng,
    ) -> Result<Self> {
        Self::prepare_with(model, x0, poisons, Vec::new(), rng)
    }

    /// As [`Denoising::prepare`], with more poisoned samples given ready-made: each an input
    /// batch, its timesteps `[m]` and its goals (states a sampler visited,
    /// [`crate::family::diffusion::rollout`]).
    pub fn prepare_with(
        model: &DiffusionModel,
        x0: &Tensor,
        poisons: &[Poison],
        ready: Vec<(Tensor, Tensor, Tensor)>,
        rng: &mut Rng,
    ) -> Result<Self> {
        let s = &model.schedule;
        let n = x0.dim(0)?;
        let alpha_bar = |t: usize| s.alpha_bar(t);
        let (t, per) = timesteps(model, n, rng, &[&alpha_bar])?;
        let eps = rng.normal(x0.dims(), &model.device)?;
        let mut inputs = vec![noised(x0, &eps, &per[0])?];
        let mut times = vec![t];
        let mut goals = Vec::new();
        for p in poisons {
            let m = p.targets.dim(0)?;
            let c = |t: usize| p.correction.coefficient(s, t);
            let (tp, per) = timesteps(model, m, rng, &[&alpha_bar, &c])?;
            let e = rng.normal(p.targets.dims(), &model.device)?;
            inputs.push(poisoned(&p.targets, p.pattern, &e, &per[0])?);
            times.push(tp);
            goals.push(poisoned_target(&e, p.pattern, &per[1])?);
        }
        let extra = ready
            .iter()
            .map(|(x, _, _)| x.dim(0))
            .sum::<candle_core::Result<usize>>()?;
        for (x, t, goal) in ready {
            inputs.push(x);
            times.push(t);
            goals.push(goal);
        }
        let out = model
            .unet
            .forward(&Tensor::cat(&inputs, 0)?, &Tensor::cat(&times, 0)?)?;
        let poisoned = if goals.is_empty() {
            None
        } else {
            let g = Tensor::cat(&goals, 0)?;
            Some((out.narrow(0, n, g.dim(0)?)?, g))
        };
        Ok(Denoising {
            clean_out: out.narrow(0, 0, n)?,
            clean_goal: eps,
            poisoned,
            ready: extra,
        })
    }
}

impl Family for Denoising {
    fn task_loss(&mut self) -> Result<Tensor> {
        Ok((&self.clean_out - &self.clean_goal)?.sqr()?.mean_all()?)
    }

    fn backdoor_pair(&self) -> Option<(&Tensor, &Tensor)> {
        self.poisoned.as_ref().map(|(out, goal)| (out, goal))
    }

    fn extra_triggered(&self) -> usize {
        self.ready
    }
}

/// How one fitting run goes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Steps.
    pub steps: usize,
    /// Clean images per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub lr_schedule: LrSchedule,
    /// The objective's λ and poisoned samples per step.
    pub objective: Objective,
    /// The trigger correction.
    pub correction: Correction,
    /// On-policy samples for deterministic-sampler triggers.
    pub rollout: DiffusionRollout,
    /// Rehearsals of a thief's clean fine-tuning (fine-tuning-aware marks).
    pub rehearsal: RehearsalConfig,
    /// EMA decay of the saved weights (0: none).
    pub ema: f64,
    /// Log every this many steps.
    pub log_every: usize,
    /// Save the (EMA) model and the resumable checkpoint every this many steps (0: only at
    /// the end).
    pub checkpoint_every: usize,
    /// Seed of the run's random streams.
    pub seed: u64,
    /// What the run does, recorded in its checkpoint for `--resume`: `train` or `inject`.
    pub stage: &'static str,
}

/// `ema ← d·ema + (1 − d)·θ` for every tensor.
fn ema_update(ema: &Params, params: &Params, decay: f64) -> Result<()> {
    for ((_, e), (_, p)) in ema.named().into_iter().zip(params.named()) {
        e.set(&((e.as_tensor() * decay)? + (p.as_tensor() * (1.0 - decay))?)?)?;
    }
    Ok(())
}

/// What the poisoned samples must end at.
enum Goal {
    /// The key's fixed target image, `[1, C, H, W]`.
    Image(Tensor),
    /// A random training image of the target class each time: these indices of the data.
    Class(Vec<usize>),
}

impl Goal {
    /// The goal of `key`'s target on `data`; a class target needs labelled data holding it.
    fn new(key: &Key, data: &Dataset, device: &Device) -> Result<Goal> {
        let Some(class) = key.target.class else {
            return Ok(Goal::Image(key.target.tensor(device)?));
        };
        let labels = data.labels.as_ref().ok_or_else(|| {
            Error::Mismatch(format!(
                "the key's target is the class {class}, but the training data has no labels"
            ))
        })?;
        let pool: Vec<usize> = (0..data.len)
            .filter(|&i| labels[i] as usize == class)
            .collect();
        if pool.is_empty() {
            return Err(Error::Mismatch(format!(
                "the key's target is the class {class}, which the training data does not contain"
            )));
        }
        Ok(Goal::Class(pool))
    }

    /// `n` target images `[n, C, H, W]`.
    fn images(&self, n: usize, data: &Dataset, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        match self {
            Goal::Image(t) => Ok(t.repeat((n, 1, 1, 1))?),
            Goal::Class(pool) => {
                let idx: Vec<usize> = (0..n).map(|_| pool[rng.below(pool.len())]).collect();
                data.batch(&idx, device)
            }
        }
    }
}

/// The target image of a mark that rollouts train (a DDIM-corrected mark with an image
/// target), `None` for any other mark.
fn rollout_target<'g>(goal: &'g Goal, correction: &Correction) -> Option<&'g Tensor> {
    match (goal, correction) {
        (Goal::Image(target), Correction::Ddim { .. }) => Some(target),
        _ => None,
    }
}

/// A fitting run in progress.
struct Fit<'a> {
    plan: &'a Plan,
    model: &'a DiffusionModel,
    ema: DiffusionModel,
    opt: Adam,
    data: &'a Dataset,
    batches: Batcher,
    rng: Rng,
    key: Option<&'a KeySet>,
    /// Each mark's trigger pattern, the goal of its poisoned samples and its correction
    /// (with a key).
    marks: Vec<(Tensor, Goal, Correction)>,
    /// The states each mark's sampler last visited from its triggered starts (marks with
    /// on-policy samples only).
    visited: Vec<Option<Visited>>,
    run: &'a RunDir,
    /// Training seconds across interruptions.
    clock: Clock,
}

impl Stepper for Fit<'_> {
    fn step(&mut self, i: usize) -> Result<Vec<Option<f64>>> {
        let p = self.plan;
        let dev = &self.model.device;
        let x0 = self.data.batch(self.batches.next_batch(), dev)?;
        let key = self.key.filter(|_| p.objective.lambda > 0.0);
        let ready = match key {
            Some(k) => self.on_policy(k, i)?,
            None => Vec::new(),
        };
        let mut poisons = Vec::new();
        if let Some(k) = key {
            for (mark, (pattern, goal, correction)) in k.marks().iter().zip(&self.marks) {
                let n = p.objective.triggered_count(&mark.trigger);
                poisons.push(Poison {
                    pattern,
                    targets: goal.images(n, self.data, &mut self.rng, dev)?,
                    correction: *correction,
                });
            }
        }
        let mut family = Denoising::prepare_with(self.model, &x0, &poisons, ready, &mut self.rng)?;
        let terms = p.objective.evaluate(&mut family, key)?;
        let mut grads = terms.total.backward()?;
        if let Some(k) = key.filter(|_| p.rehearsal.due(i, p.steps)) {
            let rehearsal = Rehearsal {
                settings: &p.rehearsal,
                batch: p.batch_size,
                data: self.data,
                distance: k.distance(),
            };
            let rehearsed = rehearsal.backdoor_gradient(
                self.model,
                &poisons,
                &mut Rng::derive(p.seed, &format!("rehearsal-{i}")),
            )?;
            let vars = self.model.params.trainable();
            add_scaled(&mut grads, &rehearsed, &vars, p.objective.lambda)?;
        }
        let lr = p.lr_schedule.at(p.lr, i, p.steps);
        self.opt.set_learning_rate(lr);
        self.opt.step(&grads)?;
        if p.ema > 0.0 {
            ema_update(&self.ema.params, &self.model.params, p.ema)?;
        }
        Ok(vec![
            Some(terms.task as f64),
            terms.backdoor.map(|b| b as f64),
            Some(lr),
        ])
    }

    /// Saves the model so far (`model.safetensors`, the EMA weights when enabled) and the
    /// resumable state: both weight sets, Adam's moments, the random streams and the step.
    fn checkpoint(&mut self, step: usize) -> Result<Option<std::path::PathBuf>> {
        self.saved().save(&self.run.file("model.safetensors"))?;
        let path = self.run.file(CHECKPOINT);
        let progress = snapshot::Progress {
            step,
            seconds: self.seconds(),
            streams: serde_json::to_string(&(&self.batches, &self.rng))
                .expect("serialisable streams"),
            stage: self.plan.stage.into(),
        };
        snapshot::save(
            &path,
            &[("model/", &self.model.params), ("ema/", &self.ema.params)],
            &[("adam", &self.opt)],
            &progress,
        )?;
        Ok(Some(path))
    }
}

impl Fit<'_> {
    /// Training seconds so far, across interruptions.
    fn seconds(&self) -> f64 {
        self.clock.seconds()
    }

    /// Restores the state saved by [`Stepper::checkpoint`]; returns its step.
    fn restore(&mut self, path: &std::path::Path) -> Result<usize> {
        let p = snapshot::restore(
            path,
            &[("model/", &self.model.params), ("ema/", &self.ema.params)],
            &mut [("adam", &mut self.opt)],
            self.plan.steps,
            self.plan.stage,
        )?;
        (self.batches, self.rng) = serde_json::from_str(&p.streams)
            .map_err(|e| Error::format(path, format!("random-stream state is invalid: {e}")))?;
        self.clock = Clock::resumed(p.seconds);
        Ok(p.step)
    }

    /// Step `i`'s on-policy samples: for each mark with an image target and a deterministic
    /// sampler's correction, once the rollouts have begun, states its sampler visited from
    /// fresh triggered starts (run again every `rollout.every` steps with the saved network)
    /// and their goals.
    fn on_policy(&mut self, key: &KeySet, i: usize) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
        let r = &self.plan.rollout;
        if r.every == 0 || (i as f64) < r.start * self.plan.steps as f64 {
            return Ok(Vec::new());
        }
        let mut ready = Vec::new();
        for (j, (mark, (pattern, goal, correction))) in
            key.marks().iter().zip(&self.marks).enumerate()
        {
            let Some(target) = rollout_target(goal, correction) else {
                continue;
            };
            if self.visited[j].is_none() || i.is_multiple_of(r.every) {
                let starts = self
                    .model
                    .starts(r.starts, Some(&mark.trigger), &mut self.rng)?;
                let net = self.saved().frozen()?;
                let schedule = &self.model.schedule;
                self.visited[j] = Some(rollout::visit(
                    &net,
                    schedule,
                    *correction,
                    starts,
                    &mut self.rng,
                )?);
            }
            let visited = self.visited[j].as_ref().expect("visited just now");
            ready.push(visited.draw(
                r.samples,
                &self.model.schedule,
                *correction,
                (pattern, target),
                &mut self.rng,
            )?);
        }
        Ok(ready)
    }

    /// The weights that are saved: the EMA when there is one.
    fn saved(&self) -> &DiffusionModel {
        if self.plan.ema > 0.0 {
            &self.ema
        } else {
            self.model
        }
    }
}

impl<'a> Fit<'a> {
    /// A fitting run of `model` on `data`, with `key`'s backdoor when given: each mark with
    /// the correction of the sampler it names (the plan's when it names none).
    fn new(
        model: &'a DiffusionModel,
        data: &'a Dataset,
        key: Option<&'a KeySet>,
        plan: &'a Plan,
        run: &'a RunDir,
    ) -> Result<Self> {
        let shape = model.image_shape();
        data.check_shape(shape)?;
        let mut marks = Vec::new();
        for k in key.map_or(&[][..], |k| k.marks()) {
            k.trigger.check_fits_image(shape)?;
            k.target.check_fits(shape)?;
            let pattern = k.trigger.pattern(&model.device)?.expect("an image trigger");
            let correction = match k.sampler {
                Some(s) => Correction::for_sampler(s)?,
                None => plan.correction,
            };
            marks.push((pattern, Goal::new(k, data, &model.device)?, correction));
        }
        let rolled = |(_, goal, correction): &(Tensor, Goal, Correction)| {
            rollout_target(goal, correction).is_some()
        };
        if plan.rollout.every > 0 && key.is_some() && !marks.iter().any(rolled) {
            return Err(Error::Config(
                "[diffusion.rollout] trains DDIM-corrected triggers with an image target, and \
                 the key has none: set `every = 0` or give a mark the sampler ddim-N"
                    .into(),
            ));
        }
        Ok(Fit {
            plan,
            model,
            ema: model.duplicate()?,
            opt: Adam::with_betas(model.params.trainable(), plan.lr, 0.9, 0.999),
            data,
            batches: Batcher::new(data.len, plan.batch_size, Rng::derive(plan.seed, "batches")),
            rng: Rng::derive(plan.seed, "diffusion-noise"),
            key,
            visited: marks.iter().map(|_| None).collect(),
            marks,
            run,
            clock: Clock::default(),
        })
    }

    /// How the loop of this run goes.
    fn settings(&self, progress: bool) -> LoopSettings<'static> {
        let p = self.plan;
        LoopSettings::resumable(
            p.steps,
            0,
            p.checkpoint_every,
            p.log_every,
            &COLUMNS,
            progress,
        )
    }
}

/// A `train.csv`-style log named `name` in `run`.
fn log(run: &RunDir, name: &str) -> Result<CsvLog> {
    CsvLog::for_steps(&run.file(name), &COLUMNS)
}

/// Trains `model` per `plan` on `data` (with `key`'s backdoor when λ > 0), logging to
/// `train.csv` and saving `model.safetensors` and the resumable checkpoint in `run` every
/// `checkpoint_every` steps and at the end. Returns the saved model (the EMA when enabled)
/// and the training seconds.
pub fn fit(
    model: &DiffusionModel,
    data: &Dataset,
    key: Option<&KeySet>,
    plan: &Plan,
    run: &RunDir,
    progress: bool,
) -> Result<(DiffusionModel, f64)> {
    drive(Fit::new(model, data, key, plan, run)?, false, progress)
}

/// Continues the [`fit`] whose checkpoint is in `run` (same model architecture, data, key and
/// plan as it was started with) from its last checkpoint: `model`'s weights are replaced by
/// the saved ones, rows of `train.csv` after the checkpoint are dropped, and the result is
/// what the uninterrupted run would have given, bit for bit.
pub fn resume_fit(
    model: &DiffusionModel,
    data: &Dataset,
    key: Option<&KeySet>,
    plan: &Plan,
    run: &RunDir,
    progress: bool,
) -> Result<(DiffusionModel, f64)> {
    drive(Fit::new(model, data, key, plan, run)?, true, progress)
}

/// Runs `fit` to its last step, from its checkpoint when `resume`.
fn drive(mut fit: Fit, resume: bool, progress: bool) -> Result<(DiffusionModel, f64)> {
    let (done, mut log) = if resume {
        let step = fit.restore(&fit.run.file(CHECKPOINT))?;
        (step, CsvLog::resume(&fit.run.file("train.csv"), step)?)
    } else {
        (0, log(fit.run, "train.csv")?)
    };
    let settings = LoopSettings {
        first: done + 1,
        ..fit.settings(progress)
    };
    fit.clock.restart();
    run_loop(&settings, &mut log, &mut fit)?;
    let saved = fit.saved().duplicate()?;
    Ok((saved, fit.seconds()))
}

/// The persistence attack by fine-tuning: continues clean denoising training (no backdoor
/// term) of a copy of `marked` per `plan`, as a thief would. `measure(step, model)` runs on
/// the trained weights before the first step and every `every` steps (and after the last);
/// the loop's log goes to `finetune.csv` in `run`. Returns the fine-tuned model.
pub fn finetune(
    marked: &DiffusionModel,
    data: &Dataset,
    plan: &Plan,
    run: &RunDir,
    every: usize,
    progress: bool,
    measure: &mut dyn FnMut(usize, &DiffusionModel) -> Result<()>,
) -> Result<DiffusionModel> {
    let model = marked.duplicate()?;
    let mut fit = Fit::new(&model, data, None, plan, run)?;
    let settings = LoopSettings {
        checkpoint_every: 0,
        ..fit.settings(progress)
    };
    measure(0, &model)?;
    let steps = plan.steps;
    let mut stepper = Steps(|i| {
        let values = fit.step(i)?;
        if i % every.max(1) == 0 || i == steps {
            measure(i, fit.model)?;
        }
        Ok(values)
    });
    run_loop(&settings, &mut log(run, "finetune.csv")?, &mut stepper)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::{Distance, Target, Trigger};

    #[test]
    fn the_saved_weights_are_the_moving_average_of_the_trained_ones() {
        let dev = Device::Cpu;
        let arch = crate::family::diffusion::model::tiny_arch(50);
        let start = DiffusionModel::new(&arch, &mut Rng::new(0), &dev).unwrap();
        let bytes: Vec<u8> = (0..32 * 64).map(|i| (i * 37 % 256) as u8).collect();
        let data = Dataset::from_bytes(32, [1, 8, 8], &bytes);
        let plan = |steps, ema| Plan {
            steps,
            batch_size: 8,
            lr: 1e-2,
            lr_schedule: LrSchedule::Constant,
            objective: Objective {
                lambda: 0.0,
                backdoor_batch: 0,
            },
            correction: Correction::Ddpm,
            rollout: DiffusionRollout::default(),
            rehearsal: RehearsalConfig::default(),
            ema,
            log_every: 1,
            checkpoint_every: 0,
            seed: 4,
            stage: "train",
        };
        let weights = |m: &DiffusionModel| m.params.values();
        let train = |steps, ema| {
            let dir = tempfile::tempdir().unwrap();
            let run = RunDir::create(&dir.path().join("run"), false).unwrap();
            let model = start.duplicate().unwrap();
            let (saved, _) = fit(&model, &data, None, &plan(steps, ema), &run, false).unwrap();
            let on_disk = DiffusionModel::load(&run.file("model.safetensors"), &dev).unwrap();
            assert_eq!(
                weights(&on_disk),
                weights(&saved),
                "the file holds what is returned"
            );
            (weights(&model), weights(&saved))
        };
        let w0 = weights(&start);
        // Without EMA the trained weights themselves are saved.
        let (w1, saved) = train(1, 0.0);
        assert_eq!(saved, w1);
        assert_ne!(w1, w0);
        // One step with decay d saves d·θ₀ + (1 − d)·θ₁; two steps d²·θ₀ + d(1 − d)·θ₁ +
        // (1 − d)·θ₂ (the same stream, so the first step is the same).
        let d = 0.75f32;
        let (trained, ema) = train(1, d as f64);
        assert_eq!(trained, w1);
        let (w2, ema2) = train(2, d as f64);
        for (i, v) in ema.iter().enumerate() {
            for (j, e) in v.iter().enumerate() {
                let one = d * w0[i][j] + (1.0 - d) * w1[i][j];
                let two = d * one + (1.0 - d) * w2[i][j];
                assert!((e - one).abs() < 1e-6, "one step: {e} vs {one}");
                assert!(
                    (ema2[i][j] - two).abs() < 1e-6,
                    "two steps: {} vs {two}",
                    ema2[i][j]
                );
            }
        }
    }

    /// A key of one mark for 8×8 grey models: a 3×3 corner box to the built-in box target.
    fn box_key() -> KeySet {
        KeySet::one(Key {
            trigger: Trigger::parse_image("box:3", [1, 8, 8]).unwrap(),
            target: Target::builtin("box", [1, 8, 8]).unwrap(),
            distance: Distance::Mse,
            threshold: 0.01,
            sampler: None,
        })
    }

    /// Four steps of batch 4 with 2 poisoned samples per mark at λ = 1, constant rate 1e-3,
    /// no rollouts, rehearsals or EMA, logging every step.
    fn four_poisoned_steps() -> Plan {
        Plan {
            steps: 4,
            batch_size: 4,
            lr: 1e-3,
            lr_schedule: LrSchedule::Constant,
            objective: Objective {
                lambda: 1.0,
                backdoor_batch: 2,
            },
            correction: Correction::Ddpm,
            rollout: DiffusionRollout::default(),
            rehearsal: RehearsalConfig::default(),
            ema: 0.0,
            log_every: 1,
            checkpoint_every: 0,
            seed: 1,
            stage: "train",
        }
    }

    /// A DDPM- and a DDIM-corrected mark trained with rollouts: only the DDIM mark's sampler is
    /// run, from the configured number of triggered starts, once the rollouts have begun, and
    /// its visited states join the step's poisoned samples (the objective counts them).
    #[test]
    fn rollouts_visit_the_deterministic_triggers_path_only() {
        use crate::family::diffusion::rollout::MIN_NOISE_SCALE;
        use crate::family::diffusion::Sampler;
        let dev = Device::Cpu;
        let model = DiffusionModel::new(
            &crate::family::diffusion::model::tiny_arch(50),
            &mut Rng::new(0),
            &dev,
        )
        .unwrap();
        let bytes: Vec<u8> = (0..32 * 64).map(|i| (i * 37 % 256) as u8).collect();
        let data = Dataset::from_bytes(32, [1, 8, 8], &bytes);
        let mark = |trigger: &str, sampler| Key {
            trigger: Trigger::parse_image(trigger, [1, 8, 8]).unwrap(),
            target: Target::builtin("box", [1, 8, 8]).unwrap(),
            distance: Distance::Mse,
            threshold: 0.01,
            sampler: Some(sampler),
        };
        let key = KeySet::new(vec![
            mark("box:3", Sampler::Ddpm),
            mark("stamp:3:7", Sampler::Ddim { steps: 10 }),
        ])
        .unwrap();
        let plan = |every, start| Plan {
            rollout: DiffusionRollout {
                every,
                starts: 3,
                samples: 5,
                start,
            },
            ema: 0.9,
            ..four_poisoned_steps()
        };
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("run"), false).unwrap();
        // Rollouts asked for a key without a DDIM-corrected mark are an error, not a no-op.
        let ddpm_only = KeySet::one(mark("box:3", Sampler::Ddpm));
        let err = Fit::new(&model, &data, Some(&ddpm_only), &plan(2, 0.0), &run)
            .err()
            .expect("an error")
            .to_string();
        assert!(err.contains("[diffusion.rollout]"), "{err}");
        for (every, start, rolled) in [(2, 0.0, true), (2, 0.5, false), (0, 0.0, false)] {
            let plan = plan(every, start);
            let mut fit = Fit::new(&model, &data, Some(&key), &plan, &run).unwrap();
            let values = fit.step(1).unwrap();
            assert!(values[1].unwrap() > 0.0);
            assert!(fit.visited[0].is_none(), "the DDPM mark has no rollout");
            assert_eq!(
                fit.visited[1].is_some(),
                rolled,
                "every {every}, start {start}"
            );
            if let Some(v) = &fit.visited[1] {
                let sched = &model.schedule;
                let kept = Sampler::Ddim { steps: 10 }
                    .timesteps(sched)
                    .unwrap()
                    .into_iter()
                    .filter(|&t| (1.0 - sched.alpha_bar(t)).sqrt() >= MIN_NOISE_SCALE)
                    .count();
                assert!(kept > 0);
                assert_eq!(v.times.len(), 3 * kept);
                assert_eq!(v.states.dims(), &[3 * kept, 1, 8, 8]);
            }
        }
    }

    /// A step that rehearses moves the weights elsewhere than one that does not; before the
    /// rehearsals' start, or with them off, the step is the plain one bit for bit (the
    /// rehearsal draws from its own stream).
    #[test]
    fn a_rehearsing_step_adds_the_rehearsed_backdoor_gradient_and_nothing_else() {
        let dev = Device::Cpu;
        let arch = crate::family::diffusion::model::tiny_arch(50);
        let bytes: Vec<u8> = (0..32 * 64).map(|i| (i * 37 % 256) as u8).collect();
        let data = Dataset::from_bytes(32, [1, 8, 8], &bytes);
        let key = box_key();
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("run"), false).unwrap();
        let after_one_step = |every: usize, start: f64| -> Vec<f32> {
            let model = DiffusionModel::new(&arch, &mut Rng::new(0), &dev).unwrap();
            let plan = Plan {
                rehearsal: RehearsalConfig {
                    every,
                    steps: 2,
                    lr: 1e-2,
                    start,
                },
                ..four_poisoned_steps()
            };
            let mut fit = Fit::new(&model, &data, Some(&key), &plan, &run).unwrap();
            fit.step(1).unwrap();
            model.params.values().concat()
        };
        let plain = after_one_step(0, 0.0);
        assert_eq!(
            after_one_step(1, 0.5),
            plain,
            "step 1 of 4 is before the start"
        );
        let rehearsed = after_one_step(1, 0.0);
        let moved = rehearsed
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(moved > 1e-7, "the rehearsal changed nothing");
    }

    #[test]
    fn the_family_builds_clean_and_poisoned_goals() {
        let dev = Device::Cpu;
        let arch = crate::family::diffusion::model::tiny_arch(50);
        let model = DiffusionModel::new(&arch, &mut Rng::new(0), &dev).unwrap();
        let key = box_key();
        let pattern = key.first().trigger.pattern(&dev).unwrap().unwrap();
        let x0 = Rng::new(1).normal(&[5, 1, 8, 8], &dev).unwrap();
        let poison = Poison {
            pattern: &pattern,
            targets: key
                .first()
                .target
                .tensor(&dev)
                .unwrap()
                .repeat((3, 1, 1, 1))
                .unwrap(),
            correction: Correction::Ddpm,
        };
        let mut f = Denoising::prepare(&model, &x0, &[poison], &mut Rng::new(2)).unwrap();
        let obj = Objective {
            lambda: 1.0,
            backdoor_batch: 3,
        };
        let terms = obj.evaluate(&mut f, Some(&key)).unwrap();
        assert!(terms.task > 0.0 && terms.backdoor.unwrap() > 0.0);
        // The poisoned goals are ε + c_t·r with the correction's own c_t: over 3,000 poisoned
        // samples their mean is E_t[c_t]·r (ε has mean 0), which tells the DDPM correction
        // from the DDIM one (about twice as large) and from a missing one (0).
        let r = pattern.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for correction in [Correction::Ddpm, Correction::Ddim { steps: 10 }] {
            let m = 3000;
            let targets = Tensor::zeros((m, 1, 8, 8), candle_core::DType::F32, &dev).unwrap();
            let poison = Poison {
                pattern: &pattern,
                targets,
                correction,
            };
            let f = Denoising::prepare(&model, &x0, &[poison], &mut Rng::new(3)).unwrap();
            let (_, goal) = f.backdoor_pair().unwrap();
            let mean = goal.mean(0).unwrap().flatten_all().unwrap();
            let mean = mean.to_vec1::<f32>().unwrap();
            let steps = model.schedule.steps();
            let expected = (1..=steps)
                .map(|t| correction.coefficient(&model.schedule, t))
                .sum::<f64>()
                / steps as f64;
            let (mut on, mut count) = (0.0, 0);
            for (g, r) in mean.iter().zip(&r) {
                if *r == 0.0 {
                    assert!(g.abs() < 0.08, "{correction:?}: off the pattern {g}");
                } else {
                    on += (g / r) as f64;
                    count += 1;
                }
            }
            let got = on / count as f64;
            assert!(
                (got / expected - 1.0).abs() < 0.05,
                "{correction:?}: {got} vs {expected}"
            );
        }
        let mut clean = Denoising::prepare(&model, &x0, &[], &mut Rng::new(2)).unwrap();
        assert!(clean.backdoor_pair().is_none());
        assert!(obj.evaluate(&mut clean, Some(&key)).is_err());
        assert!(clean.task_loss().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
}
