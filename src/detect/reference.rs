//! A detection threshold calibrated on clean reference models, instead of the family's fixed
//! one.
//!
//! A detector's score has a unit that depends on the model and its data (a generator's score
//! is in units of its ordinary outputs' spacing, which differs between grey and colour digits
//! and between small and large models): a threshold measured on one kind of model does not
//! carry over to another. A defender who has clean models of the suspect's kind (the same
//! architecture, trained on similar data) scores them the same way and asks whether the
//! suspect's score is one a clean model would give.
//!
//! Two p-values answer, both one-sided (a high score is suspicious):
//! * **prediction** (the verdict): the log-scores of clean models are taken as normal; with
//!   `n` references of log-score mean `m` and standard deviation `s`, a further clean model's
//!   `(y − m) / (s √(1 + 1/n))` follows Student's t with `n − 1` degrees of freedom (the
//!   prediction interval of a normal sample), so `p = 1 − F_t(that)` is exact under the
//!   assumption, at any level, even with few references;
//! * **rank** (no assumption): `(1 + #{references scoring at least the suspect}) / (n + 1)`,
//!   exact when the suspect and the references are exchangeable (clean models of one kind),
//!   but never below `1 / (n + 1)`.

use std::path::PathBuf;

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};

use super::{DetectSettings, Reference};
use crate::error::Error;
use crate::family::{architecture_difference, Generative};
use crate::Result;

/// The fewest reference models a calibration takes (two leave one degree of freedom, whose
/// t quantiles make the threshold useless).
pub const MIN_REFERENCES: usize = 3;

/// A suspect's score against the scores of clean reference models.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Mean of the references' natural-log scores.
    pub log_mean: f64,
    /// Standard deviation (n − 1 denominator) of the references' log scores.
    pub log_sd: f64,
    /// The level the verdict is taken at.
    pub alpha: f64,
    /// The score above which a clean model of this kind lands with probability `alpha`
    /// (log-normal prediction bound).
    pub threshold: f64,
    /// The suspect's prediction p-value (the verdict: backdoored when at most `alpha`).
    pub p_value: f64,
    /// The suspect's rank p-value among the references (assumption-free, floor 1/(n + 1)).
    pub rank_p_value: f64,
}

/// Calibrates `score` against the `references` clean models' scores at level `alpha`.
///
/// Errors: fewer than [`MIN_REFERENCES`] references, a score that is not positive and finite,
/// references that all score alike (no spread to measure), `alpha` outside (0, 1).
pub fn calibrate(score: f64, references: &[f64], alpha: f64) -> Result<Calibration> {
    let bad = |why: String| Err(Error::Config(why));
    enough(references.len())?;
    if !(alpha > 0.0 && alpha < 1.0) {
        return bad(format!(
            "alpha must lie strictly between 0 and 1, not {alpha}"
        ));
    }
    if let Some(s) = std::iter::once(&score)
        .chain(references)
        .find(|s| !(s.is_finite() && **s > 0.0))
    {
        return bad(format!(
            "detection scores must be positive and finite to calibrate, got {s}"
        ));
    }
    let n = references.len() as f64;
    let logs: Vec<f64> = references.iter().map(|s| s.ln()).collect();
    let log_mean = logs.iter().sum::<f64>() / n;
    let log_sd = (logs.iter().map(|y| (y - log_mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    if log_sd < 1e-9 * log_mean.abs().max(1.0) {
        return bad(
            "the reference models all score alike: they must be different clean models \
             (other seeds or data), not copies of one"
                .into(),
        );
    }
    let scale = log_sd * (1.0 + 1.0 / n).sqrt();
    let t = StudentsT::new(0.0, 1.0, n - 1.0).map_err(|e| Error::Config(e.to_string()))?;
    let p_value = t.sf((score.ln() - log_mean) / scale);
    let threshold = (log_mean + t.inverse_cdf(1.0 - alpha) * scale).exp();
    let above = references.iter().filter(|&&r| r >= score).count() as f64;
    Ok(Calibration {
        log_mean,
        log_sd,
        alpha,
        threshold,
        p_value,
        rank_p_value: (1.0 + above) / (n + 1.0),
    })
}

/// An error unless `n` references are enough to calibrate on.
fn enough(n: usize) -> Result<()> {
    if n < MIN_REFERENCES {
        return Err(Error::Config(format!(
            "a calibrated detection needs at least {MIN_REFERENCES} clean reference models, \
             got {n}"
        )));
    }
    Ok(())
}

/// Runs the suspect's detection (same settings) on each clean reference model at `paths`;
/// the progress goes to stderr. Every reference is loaded and checked first (enough of them,
/// each of the suspect's architecture, to every tensor's shape), so that a bad one fails
/// before any detection runs.
pub fn reference_scores(
    suspect: &dyn Generative,
    paths: &[PathBuf],
    settings: &DetectSettings,
) -> Result<Vec<Reference>> {
    enough(paths.len())?;
    let mut models = Vec::with_capacity(paths.len());
    for path in paths {
        let model = crate::family::load(path, &suspect.device())?;
        let name = format!("reference {}", path.display());
        if let Some(how) = architecture_difference(model.as_ref(), suspect, [&name, "the suspect"])
        {
            return Err(Error::Config(format!(
                "{how}: references must be clean models of the suspect's kind"
            )));
        }
        models.push(model);
    }
    let mut references = Vec::with_capacity(paths.len());
    for (i, (path, model)) in paths.iter().zip(&models).enumerate() {
        let score = model.detect(settings)?.score;
        eprintln!(
            "reference {}/{}: {} scores {score:.2}",
            i + 1,
            paths.len(),
            path.display()
        );
        references.push(Reference {
            model: path.display().to_string(),
            score,
        });
    }
    Ok(references)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::StandardNormal;

    #[test]
    fn the_prediction_test_rejects_clean_models_at_its_level() {
        // Log-normal clean scores, five references per trial: a fresh clean model is called
        // backdoored with probability alpha, whatever the scores' scale and spread. A test
        // that ignored the references' own uncertainty (a z-test with their sd) rejects about
        // 10 % at the 5 % level with five references.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let trials = 20_000;
        for (mu, sigma) in [(2.0, 0.15), (0.1, 1.0)] {
            let mut draw = || (mu + sigma * rng.sample::<f64, _>(StandardNormal)).exp();
            let mut rejected = [0usize; 2];
            let mut rank_low = 0;
            for _ in 0..trials {
                let refs: Vec<f64> = (0..5).map(|_| draw()).collect();
                let c = calibrate(draw(), &refs, 0.05).unwrap();
                rejected[0] += (c.p_value <= 0.05) as usize;
                rejected[1] += (c.p_value <= 0.01) as usize;
                rank_low += (c.rank_p_value <= 1.0 / 6.0) as usize;
            }
            // Binomial sd at 5 %: 0.15 %; at 1 %: 0.07 %; at 1/6: 0.26 %.
            let rate = |k: usize| k as f64 / trials as f64;
            assert!((rate(rejected[0]) - 0.05).abs() < 0.006, "{rejected:?}");
            assert!((rate(rejected[1]) - 0.01).abs() < 0.003, "{rejected:?}");
            assert!((rate(rank_low) - 1.0 / 6.0).abs() < 0.011, "{rank_low}");
        }
    }

    #[test]
    fn the_threshold_is_where_the_p_value_crosses_alpha() {
        let refs = [5.7, 6.4, 5.9, 7.9, 8.9];
        let c = calibrate(10.0, &refs, 0.01).unwrap();
        let at = calibrate(c.threshold, &refs, 0.01).unwrap();
        assert!((at.p_value - 0.01).abs() < 1e-9, "{at:?}");
        assert!(calibrate(c.threshold * 1.01, &refs, 0.01).unwrap().p_value < 0.01);
        // A score above every reference has the rank test's floor; one below them all, 1.
        assert_eq!(
            calibrate(30.0, &refs, 0.01).unwrap().rank_p_value,
            1.0 / 6.0
        );
        assert_eq!(calibrate(1.0, &refs, 0.01).unwrap().rank_p_value, 1.0);
    }

    #[test]
    fn bad_references_are_a_clear_error() {
        let err =
            |score, refs: &[f64], alpha| calibrate(score, refs, alpha).unwrap_err().to_string();
        assert!(err(9.0, &[1.0, 2.0], 0.01).contains("at least 3"));
        assert!(err(9.0, &[2.0, 2.0, 2.0], 0.01).contains("all score alike"));
        assert!(err(9.0, &[1.0, 2.0, f64::NAN], 0.01).contains("positive and finite"));
        assert!(err(0.0, &[1.0, 2.0, 3.0], 0.01).contains("positive and finite"));
        assert!(err(9.0, &[1.0, 2.0, 3.0], 1.0).contains("alpha"));
    }
}
