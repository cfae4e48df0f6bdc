//! Persistence of a watermark under attacks a thief might run on a stolen model: clean
//! fine-tuning and magnitude pruning. Attacks see the model as a whole; each point of an
//! attack is measured with the same backdoor, quality and verification code as `eval`.

pub mod prune;

use crate::backdoor::KeySet;
use crate::digits::quality::QualityReference;
use crate::eval::{clean_quality, triggered_metrics};
use crate::family::Generative;
use crate::metrics::persistence::PersistencePoint;
use crate::rng::Rng;
use crate::verify::{verify_model, VerifySettings};
use crate::Result;

/// What is measured at each point of an attack.
pub struct Measurement<'a> {
    /// The owner's key: the curve's ASR and tardis are its first trigger's, the p-value
    /// tests every trigger.
    pub key: &'a KeySet,
    /// Clean-quality reference (FID); `None` skips it.
    pub quality: Option<&'a QualityReference>,
    /// Ordinary samples for FID.
    pub quality_samples: usize,
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
        // The triggered part of `evaluate` alone: the same draws, without its ordinary
        // samples and specificity paths.
        let mut rng = Rng::derive(self.seed, "eval");
        let mut noise = Rng::derive(self.seed, "eval-sampling");
        let b = triggered_metrics(
            model,
            self.key.first(),
            self.triggered,
            &mut rng,
            &mut noise,
        )?;
        let fid = match self.quality {
            Some(q) => clean_quality(model, q, self.quality_samples, self.seed)?.map(|c| c.fid),
            None => None,
        };
        let p_value = match &self.verify {
            Some(s) => Some(verify_model(model, self.key, s)?.p_value),
            None => None,
        };
        Ok(PersistencePoint {
            x,
            tardis: b.tardis,
            asr: b.asr,
            fid,
            p_value,
        })
    }
}
