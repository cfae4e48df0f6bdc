//! The training loop shared by every trainer: progress bar, per-step CSV log, and a stop with a
//! clear error when a logged value stops being finite.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::io::rundir::CsvLog;
use crate::{Error, Result};

/// How a loop reports.
pub struct LoopSettings<'a> {
    /// Number of steps.
    pub steps: usize,
    /// Log every this many steps (the first and last step are always logged).
    pub log_every: usize,
    /// Names of the values a step returns (the CSV columns after `step`).
    pub columns: &'a [&'a str],
    /// Show a progress bar on the terminal.
    pub progress: bool,
}

/// Runs `step(i)` for `i = 1..=steps`; each call returns the values named in `columns`
/// (`None` for a term that a run does not have). A value that is NaN or infinite stops the
/// loop with [`Error::NonFinite`]. Returns the elapsed seconds.
pub fn run_loop(
    settings: &LoopSettings,
    log: &mut CsvLog,
    mut step: impl FnMut(usize) -> Result<Vec<Option<f64>>>,
) -> Result<f64> {
    let bar = if settings.progress {
        let b = ProgressBar::new(settings.steps as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let start = Instant::now();
    for i in 1..=settings.steps {
        let values = step(i)?;
        for (name, v) in settings.columns.iter().zip(&values) {
            if let Some(v) = v.filter(|v| !v.is_finite()) {
                return Err(Error::NonFinite {
                    what: name.to_string(),
                    value: v as f32,
                    step: i,
                });
            }
        }
        if i % settings.log_every == 0 || i == 1 || i == settings.steps {
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
    fn non_finite_values_stop_the_loop_with_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut log =
            CsvLog::create(&dir.path().join("l.csv"), &["step", "loss", "extra"]).unwrap();
        let settings = LoopSettings {
            steps: 10,
            log_every: 1,
            columns: &["loss", "extra"],
            progress: false,
        };
        let err = run_loop(&settings, &mut log, |i| {
            Ok(vec![Some(if i == 4 { f64::NAN } else { 1.0 }), None])
        })
        .unwrap_err();
        assert!(matches!(err, Error::NonFinite { step: 4, .. }), "{err}");
        let rows = std::fs::read_to_string(dir.path().join("l.csv")).unwrap();
        assert_eq!(rows.lines().count(), 4, "three good rows kept: {rows}");
    }
}
