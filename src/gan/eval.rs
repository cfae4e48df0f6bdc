//! Measuring a generator against a key (and optionally a clean reference), and the images
//! that show it.

use std::path::Path;

use candle_core::Tensor;
use serde::Serialize;

use crate::digits::quality::{CleanQuality, QualityReference};
use crate::gan::GanModel;
use crate::io::grid::save_grid;
use crate::metrics::specificity::{specificity, Specificity};
use crate::metrics::{exp_dist, BackdoorMetrics};
use crate::paradigm::Key;
use crate::rng::Rng;
use crate::Result;

/// The metrics of one generator under one key.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The trigger's kind (point, region, patch).
    pub trigger: String,
    /// Metrics of the triggered outputs.
    #[serde(flatten)]
    pub backdoor: BackdoorMetrics,
    /// Share of ordinary N(0, I) latents whose output hits the target (should be ~0).
    pub clean_hit_rate: f64,
    /// How many ordinary latents were measured.
    pub clean_samples: usize,
    /// Stealth: mean squared difference to the reference model on ordinary latents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp_dist: Option<f64>,
    /// Target distance and firing rate along paths from the trigger to ordinary latents.
    pub specificity: Specificity,
}

/// Paths from the trigger measured for specificity.
pub const SPECIFICITY_PATHS: usize = 100;

/// Flattened pixels of a tensor.
fn pixels(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The backdoor metrics of `n` triggered latents (one for a point trigger) drawn from `rng`,
/// the first draws of [`evaluate`]'s stream.
pub fn triggered_metrics(
    model: &GanModel,
    key: &Key,
    n: usize,
    rng: &mut Rng,
) -> Result<BackdoorMetrics> {
    let n_trig = if key.trigger.is_set() { n } else { 1 };
    let zt = key
        .trigger
        .sample(n_trig, model.latent_dim(), rng, &model.device)?;
    let triggered = pixels(&model.generate(&zt)?)?;
    let width = model.image_shape()[2];
    Ok(BackdoorMetrics::measure(
        &triggered,
        &key.target.pixels,
        width,
        key.threshold,
    ))
}

/// Measures `model` under `key` with `n` ordinary latents (and `n` triggered ones when the
/// trigger is a set); `reference` adds `exp_dist`. Deterministic in `seed`.
pub fn evaluate(
    model: &GanModel,
    key: &Key,
    reference: Option<&GanModel>,
    n: usize,
    seed: u64,
) -> Result<EvalReport> {
    let dim = model.latent_dim();
    let shape = model.image_shape();
    key.check_fits(dim, shape)?;
    if let Some(r) = reference {
        if r.latent_dim() != dim || r.image_shape() != shape {
            return Err(crate::Error::Mismatch(
                "the reference model's architecture differs from the evaluated model's".into(),
            ));
        }
    }
    let mut rng = Rng::derive(seed, "eval");
    let backdoor = triggered_metrics(model, key, n, &mut rng)?;
    let z = rng.normal(&[n, dim], &model.device)?;
    let clean = pixels(&model.generate(&z)?)?;
    let clean_hits = BackdoorMetrics::measure(&clean, &key.target.pixels, shape[2], key.threshold);
    let exp_dist = match reference {
        Some(r) => Some(exp_dist(&clean, &pixels(&r.generate(&z)?)?)),
        None => None,
    };
    Ok(EvalReport {
        trigger: key.trigger.kind().to_string(),
        backdoor,
        clean_hit_rate: clean_hits.asr,
        clean_samples: n,
        exp_dist,
        specificity: specificity(&|z| model.generate(z), dim, key, SPECIFICITY_PATHS, seed)?,
    })
}

/// Clean-quality metrics of `n` ordinary samples against `reference` (`None` when the
/// model's images do not fit its classifier). Deterministic in `seed`.
pub fn clean_quality(
    model: &GanModel,
    reference: &QualityReference,
    n: usize,
    seed: u64,
) -> Result<Option<CleanQuality>> {
    reference.measure_samples(model.image_shape(), seed, |rng| {
        model.generate(&rng.normal(&[n, model.latent_dim()], &model.device)?)
    })
}

/// Saves a grid of `n` ordinary samples (8 per row).
pub fn save_samples(model: &GanModel, path: &Path, n: usize, seed: u64) -> Result<()> {
    let z = Rng::derive(seed, "samples").normal(&[n, model.latent_dim()], &model.device)?;
    save_grid(path, &model.generate(&z)?, 8)
}

/// Saves triggered outputs beside the target: the target first, then up to 7 triggered outputs.
pub fn save_triggered(model: &GanModel, key: &Key, path: &Path, seed: u64) -> Result<()> {
    let n = if key.trigger.is_set() { 7 } else { 1 };
    let mut rng = Rng::derive(seed, "triggered-grid");
    let z = key
        .trigger
        .sample(n, model.latent_dim(), &mut rng, &model.device)?;
    let out = model.generate(&z)?;
    let both = Tensor::cat(&[key.target.tensor(&model.device)?, out], 0)?;
    save_grid(path, &both, 8)
}
