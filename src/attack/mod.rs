//! Persistence of a watermark under attacks a thief might run on a stolen model: clean
//! fine-tuning and magnitude pruning. Attacks see the model as a whole; each point of an
//! attack is measured with the same backdoor, quality and verification code as `eval`.

pub mod prune;

use crate::backdoor::KeySet;
use crate::digits::quality::QualityReference;
use crate::eval::{clean_quality, trigger_reports};
use crate::family::diffusion::Sampler;
use crate::family::{under_sampler, Generative};
use crate::metrics::persistence::PersistencePoint;
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
