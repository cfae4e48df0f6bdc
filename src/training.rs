//! The training loop shared by every trainer: progress bar, per-step CSV log, periodic
//! checkpoints, a clean stop on Ctrl-C, and a stop with a clear error when a logged value
//! stops being finite.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::io::rundir::CsvLog;
use crate::{Error, Result};

/// Set when the user asks the run to stop (Ctrl-C); the loop ends after the current step.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Asks running loops to stop after their current step (called from the Ctrl-C handler).
pub fn request_stop() {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// One trainer as the loop drives it.
pub trait Stepper {
    /// Runs step `i` (1-based) and returns the values named in the loop's `columns`
    /// (`None` for a term the run does not have).
    fn step(&mut self, i: usize) -> Result<Vec<Option<f64>>>;

    /// Saves what is needed to continue after step `i`; returns the file written, or `None`
    /// for a trainer that cannot be resumed.
    fn checkpoint(&mut self, i: usize) -> Result<Option<PathBuf>>;
}

/// A trainer without checkpoints, from a step function.
pub struct Steps<F>(pub F);

impl<F: FnMut(usize) -> Result<Vec<Option<f64>>>> Stepper for Steps<F> {
    fn step(&mut self, i: usize) -> Result<Vec<Option<f64>>> {
        (self.0)(i)
    }

    fn checkpoint(&mut self, _: usize) -> Result<Option<PathBuf>> {
        Ok(None)
    }
}

/// How a loop runs and reports.
pub struct LoopSettings<'a> {
    /// Number of steps.
    pub steps: usize,
    /// The first step to run (1, or the step after a resumed checkpoint).
    pub first: usize,
    /// Save a checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
    /// Log every this many steps (the first and last step are always logged).
    pub log_every: usize,
    /// Names of the values a step returns (the CSV columns after `step`).
    pub columns: &'a [&'a str],
    /// Show a progress bar on the terminal.
    pub progress: bool,
}

/// Training seconds across interruptions: those before a resumed checkpoint plus this
/// process's since it (re)started training.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    earlier: f64,
    started: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            earlier: 0.0,
            started: Instant::now(),
        }
    }
}

impl Clock {
    /// Counts on from `earlier` seconds (a resumed checkpoint's), starting now.
    pub fn resumed(earlier: f64) -> Self {
        Clock {
            earlier,
            started: Instant::now(),
        }
    }

    /// Starts this process's count now (when the loop begins, after set-up).
    pub fn restart(&mut self) {
        self.started = Instant::now();
    }

    /// The seconds so far.
    pub fn seconds(&self) -> f64 {
        self.earlier + self.started.elapsed().as_secs_f64()
    }
}

impl<'a> LoopSettings<'a> {
    /// The settings of a resumable run of `steps` steps with `done` already done, saving a
    /// checkpoint every `checkpoint_every` steps (0: only after the last).
    pub fn resumable(
        steps: usize,
        done: usize,
        checkpoint_every: usize,
        log_every: usize,
        columns: &'a [&'a str],
        progress: bool,
    ) -> Self {
        LoopSettings {
            steps,
            first: done + 1,
            checkpoint_every: if checkpoint_every == 0 {
                steps
            } else {
                checkpoint_every
            },
            log_every,
            columns,
            progress,
        }
    }
}

/// Whether step `i` of `steps` writes a log row: every `log_every`-th, the first and the last.
/// Trainers use it to compute costly logged values (such as `tardis`) only when they are kept.
pub fn is_logged(i: usize, log_every: usize, steps: usize) -> bool {
    i.is_multiple_of(log_every) || i == 1 || i == steps
}

/// The bar of a long command over `len` units (`unit` names them after the count, e.g.
/// "points"; empty for steps), hidden unless `show`; `set_message` adds the current values.
pub fn progress_bar(len: usize, show: bool, unit: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}}{unit} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .expect("valid template"),
    );
    bar
}

/// Runs `stepper.step(i)` for `i = first..=steps`. A value that is NaN or infinite stops the
/// loop with [`Error::NonFinite`] (checkpoints already written stay as they are). A
/// checkpoint is written every `checkpoint_every` steps and when Ctrl-C stops the run
/// ([`Error::Interrupted`]). Returns the elapsed seconds.
pub fn run_loop(
    settings: &LoopSettings,
    log: &mut CsvLog,
    stepper: &mut dyn Stepper,
) -> Result<f64> {
    let bar = progress_bar(settings.steps, settings.progress, "");
    bar.set_position(settings.first.saturating_sub(1) as u64);
    let start = Instant::now();
    for i in settings.first..=settings.steps {
        let values = stepper.step(i).map_err(|e| match e {
            Error::NonFiniteOutput => Error::NonFinite {
                what: "the model's output".into(),
                value: f32::NAN,
                step: i,
            },
            e => e,
        })?;
        for (name, v) in settings.columns.iter().zip(&values) {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                bar.abandon();
                return Err(Error::NonFinite {
                    what: name.to_string(),
                    value: v as f32,
                    step: i,
                });
            }
        }
        if is_logged(i, settings.log_every, settings.steps) {
            let mut row = vec![i as f64];
            row.extend(values.iter().map(|v| v.unwrap_or(f64::NAN)));
            log.row(&row)?;
            let msg: Vec<String> = settings
                .columns
                .iter()
                .zip(&values)
                .filter_map(|(n, v)| v.map(|v| format!("{n} {v:.4}")))
                .collect();
            bar.set_message(msg.join("  "));
        }
        bar.inc(1);
        if INTERRUPTED.load(Ordering::SeqCst) {
            bar.abandon();
            let saved = stepper.checkpoint(i)?;
            return Err(Error::Interrupted { step: i, saved });
        }
        let every = settings.checkpoint_every;
        if every > 0 && (i % every == 0 || i == settings.steps) {
            stepper.checkpoint(i)?;
        }
    }
    bar.finish_and_clear();
    Ok(start.elapsed().as_secs_f64())
}

/// How the learning rate moves over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The base rate throughout.
    #[default]
    Constant,
    /// Cosine decay from the base rate to 1 % of it at the last step.
    Cosine,
}

impl LrSchedule {
    /// The rate at `step` (1-based) of `total`.
    pub fn at(&self, base: f64, step: usize, total: usize) -> f64 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Cosine => {
                let t = (step.saturating_sub(1)) as f64 / (total.max(2) - 1) as f64;
                base * (0.01 + 0.99 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
            }
        }
    }

    /// The rate at `step` of `total` when it first rises linearly from 0 over the first
    /// `warmup` fraction of the steps (0: no warm-up), then follows the schedule.
    pub fn warmed(&self, base: f64, step: usize, total: usize, warmup: f64) -> f64 {
        let rise = (warmup * total as f64).round() as usize;
        let factor = if step < rise {
            step as f64 / rise as f64
        } else {
            1.0
        };
        self.at(base, step, total) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_goes_from_base_to_one_percent() {
        let s = LrSchedule::Cosine;
        assert!((s.at(1.0, 1, 100) - 1.0).abs() < 1e-12);
        assert!((s.at(1.0, 100, 100) - 0.01).abs() < 1e-12);
        assert!(s.at(1.0, 30, 100) > s.at(1.0, 60, 100));
        assert_eq!(LrSchedule::Constant.at(0.5, 77, 100), 0.5);
    }

    #[test]
    fn warm_up_rises_linearly_then_follows_the_schedule() {
        let s = LrSchedule::Cosine;
        assert!((s.warmed(1.0, 1, 100, 0.1) - 0.1 * s.at(1.0, 1, 100)).abs() < 1e-12);
        assert!((s.warmed(1.0, 5, 100, 0.1) - 0.5 * s.at(1.0, 5, 100)).abs() < 1e-12);
        for step in [10, 11, 60, 100] {
            assert_eq!(s.warmed(1.0, step, 100, 0.1), s.at(1.0, step, 100));
        }
        assert_eq!(s.warmed(1.0, 1, 100, 0.0), s.at(1.0, 1, 100));
    }

    /// A trainer that records its checkpoints and diverges at a chosen step.
    struct Diverging {
        at: usize,
        saved: Vec<usize>,
    }

    impl Stepper for Diverging {
        fn step(&mut self, i: usize) -> Result<Vec<Option<f64>>> {
            Ok(vec![Some(if i == self.at { f64::INFINITY } else { 1.0 })])
        }
        fn checkpoint(&mut self, i: usize) -> Result<Option<PathBuf>> {
            self.saved.push(i);
            Ok(Some(PathBuf::from("c")))
        }
    }

    #[test]
    fn divergence_keeps_the_checkpoints_before_it_and_writes_none_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = CsvLog::create(&dir.path().join("l.csv"), &["step", "loss"]).unwrap();
        let settings = LoopSettings {
            steps: 50,
            first: 1,
            checkpoint_every: 10,
            log_every: 5,
            columns: &["loss"],
            progress: false,
        };
        let mut t = Diverging {
            at: 25,
            saved: vec![],
        };
        let err = run_loop(&settings, &mut log, &mut t).unwrap_err();
        assert!(matches!(err, Error::NonFinite { step: 25, .. }), "{err}");
        assert!(err.to_string().contains("last good checkpoint"), "{err}");
        assert_eq!(t.saved, vec![10, 20]);
        // A resumed loop starts after its checkpoint and saves at the end.
        let mut t = Diverging {
            at: 0,
            saved: vec![],
        };
        let settings = LoopSettings {
            first: 21,
            checkpoint_every: 20,
            ..settings
        };
        run_loop(&settings, &mut log, &mut t).unwrap();
        assert_eq!(t.saved, vec![40, 50]);
    }

    #[test]
    fn non_finite_values_stop_the_loop_with_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut log =
            CsvLog::create(&dir.path().join("l.csv"), &["step", "loss", "extra"]).unwrap();
        let settings = LoopSettings {
            steps: 10,
            first: 1,
            checkpoint_every: 0,
            log_every: 1,
            columns: &["loss", "extra"],
            progress: false,
        };
        let err = run_loop(
            &settings,
            &mut log,
            &mut Steps(|i| Ok(vec![Some(if i == 4 { f64::NAN } else { 1.0 }), None])),
        )
        .unwrap_err();
        assert!(matches!(err, Error::NonFinite { step: 4, .. }), "{err}");
        let rows = std::fs::read_to_string(dir.path().join("l.csv")).unwrap();
        assert_eq!(rows.lines().count(), 4, "three good rows kept: {rows}");
    }
}
