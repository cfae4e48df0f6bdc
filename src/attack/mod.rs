//! Persistence of a watermark under attacks a thief might run on a stolen model: clean
//! fine-tuning and magnitude pruning. Attacks see the model as a whole; each point of an
//! attack is measured with the same backdoor, quality and verification code as `eval`.

pub mod curve;
pub mod prune;

use crate::attack::curve::PersistencePoint;
use crate::digits::quality::QualityReference;
use crate::gan::eval::{clean_quality, triggered_metrics};
use crate::gan::GanModel;
use crate::paradigm::Key;
use crate::rng::Rng;
use crate::verify::{verify, VerifySettings};
use crate::Result;

/// What is measured at each point of an attack.
pub struct Measurement<'a> {
    /// The owner's key.
    pub key: &'a Key,
    /// Clean-quality reference (FID); `None` skips it.
    pub quality: Option<&'a QualityReference>,
    /// Ordinary samples for FID.
    pub quality_samples: usize,
    /// Null triggers for the verification p-value; 0 skips it.
    pub null_keys: usize,
    /// Seed of every sample.
    pub seed: u64,
}

impl Measurement<'_> {
    /// Measures `model` after `x` units of attack.
    pub fn at(&self, x: f64, model: &GanModel) -> Result<PersistencePoint> {
        // The triggered part of `evaluate` alone: the same draws, without its ordinary
        // samples and specificity paths.
        let mut rng = Rng::derive(self.seed, "eval");
        let b = triggered_metrics(model, self.key, 200, &mut rng)?;
        let fid = match self.quality {
            Some(q) => clean_quality(model, q, self.quality_samples, self.seed)?.map(|c| c.fid),
            None => None,
        };
        let p_value = if self.null_keys > 0 {
            let s = VerifySettings {
                null_keys: self.null_keys,
                seed: self.seed,
                ..VerifySettings::default()
            };
            Some(verify(&|z| model.generate(z), model.latent_dim(), self.key, &s)?.p_value)
        } else {
            None
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
