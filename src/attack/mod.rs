//! Persistence of a watermark under attacks a thief might run on a stolen model: clean
//! fine-tuning and magnitude pruning. Attacks see the model as a whole; each point of an
//! attack is measured with the same backdoor, quality and verification code as `eval`.

pub mod prune;

use crate::backdoor::KeySet;
use crate::digits::quality::QualityReference;
use crate::eval::{clean_quality, trigger_reports};
use crate::family::diffusion::Sampler;
use crate::family::{under_sampler, Generative};
use crate::io::rundir::RunDir;
use crate::metrics::persistence::{PersistenceCurve, PersistencePoint};
use crate::verify::{verify_model, VerifySettings};
use crate::Result;

/// What is measured at each point of an attack.
pub struct Measurement<'a> {
    /// The owner's key: every trigger's ASR is measured (the curve's tardis is the first
    /// trigger's), the p-value tests every trigger.
    pub key: &'a KeySet,
    /// Clean-quality reference (FID); `None` skips it.
    pub quality: Option<&'a QualityReference>,
    /// Ordinary samples for FID (0 skips it).
    pub quality_samples: usize,
    /// The sampler the FID's ordinary samples are drawn with (a diffusion model's ordinary
    /// default, `ddpm-100`, not full DDPM, whose 1,000 steps per image would make each point
    /// of a curve take half an hour); `None`: the model's current one.
    pub quality_sampler: Option<Sampler>,
    /// Null triggers for the verification p-value (and queries per statistic); `None`
    /// skips it.
    pub verify: Option<VerifySettings>,
    /// Triggered inputs measured for `asr` when the trigger is a set.
    pub triggered: usize,
    /// Seed of every sample.
    pub seed: u64,
}

impl Measurement<'_> {
    /// Measures `model` after `x` units of attack.
    pub fn at(&self, x: f64, model: &dyn Generative) -> Result<PersistencePoint> {
        // The triggered part of `evaluate` alone, for every trigger (the first with the same
        // draws as `evaluate`), without its ordinary samples and specificity paths.
        let triggers = trigger_reports(model, self.key, &[], self.triggered, self.seed)?;
        let first = &triggers[0].backdoor;
        let fid = match self.quality {
            Some(q) if self.quality_samples > 0 => {
                let ordinary = under_sampler(model, self.quality_sampler)?;
                clean_quality(&*ordinary, q, self.quality_samples, self.seed)?.map(|c| c.fid)
            }
            _ => None,
        };
        let p_value = match &self.verify {
            Some(s) => Some(verify_model(model, self.key, s)?.p_value),
            None => None,
        };
        Ok(PersistencePoint {
            x,
            tardis: first.tardis,
            asr: first.asr,
            triggers_asr: triggers.iter().map(|t| t.backdoor.asr).collect(),
            fid,
            p_value,
        })
    }
}

/// An attack's curve as it grows: written to its run folder (`attack-<name>.json`, atomically)
/// after every point, so that an attack stopped part-way keeps every point it measured.
pub struct CurveLog<'a> {
    run: &'a RunDir,
    curve: PersistenceCurve,
}

impl<'a> CurveLog<'a> {
    /// An empty curve of attack `attack` along `x_label`, stored in `run`.
    pub fn new(run: &'a RunDir, attack: &str, x_label: &str) -> Self {
        CurveLog {
            run,
            curve: PersistenceCurve::new(attack, x_label, Vec::new()),
        }
    }

    /// Appends a point and rewrites the curve's file with every point so far.
    pub fn push(&mut self, point: PersistencePoint) -> Result<()> {
        self.curve.push(point);
        let name = PersistenceCurve::file_name(&self.curve.attack);
        self.run.write_json(&name, &self.curve)
    }

    /// Where the curve is written.
    pub fn path(&self) -> std::path::PathBuf {
        self.run
            .file(&PersistenceCurve::file_name(&self.curve.attack))
    }

    /// The curve measured so far.
    pub fn curve(&self) -> &PersistenceCurve {
        &self.curve
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_on_disk_holds_every_point_measured_so_far() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::open(dir.path()).unwrap();
        let mut log = CurveLog::new(&run, "finetune", "steps");
        let log_path = log.path();
        let on_disk = || -> PersistenceCurve {
            assert_eq!(log_path, dir.path().join("attack-finetune.json"));
            let text = std::fs::read_to_string(&log_path).unwrap();
            serde_json::from_str(&text).unwrap()
        };
        for (i, asr) in [1.0, 0.25, 1.0].into_iter().enumerate() {
            log.push(PersistencePoint {
                x: 100.0 * i as f64,
                tardis: 1.0,
                asr,
                triggers_asr: vec![asr],
                fid: None,
                p_value: Some(1e-9),
            })
            .unwrap();
            assert_eq!(on_disk(), *log.curve());
            assert_eq!(on_disk().points.len(), i + 1);
        }
        assert_eq!(log.curve().mark_gone_at, Some(100.0));
    }
}
