//! Measuring any model against a key (and optionally a clean reference), and the images that
//! show it. Written once for every family: the model is a [`Generative`], the key's trigger
//! makes inputs in its input space.

pub mod specificity;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Serialize;

use crate::backdoor::{Key, KeySet};
use crate::digits::quality::{CleanQuality, QualityReference};
use crate::digits::DigitClassifier;
use crate::eval::specificity::{specificity, Specificity};
use crate::family::diffusion::Sampler;
use crate::family::{architecture_difference, Generative};
use crate::io::grid::save_grid;
use crate::metrics::{exp_dist, BackdoorMetrics};
use crate::rng::Rng;
use crate::{Error, Result};

/// The metrics of one model under one key.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The trigger's kind (point, region, patch, stamp, image).
    pub trigger: String,
    /// How the model made its images (a diffusion model's sampler), when there is a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<String>,
    /// Metrics of the triggered outputs.
    #[serde(flatten)]
    pub backdoor: BackdoorMetrics,
    /// Share of ordinary N(0, I) inputs whose output hits the target: ~0 for an image
    /// target; for a class target the share classified as that class (about 0.1, the
    /// class's natural rate, when the backdoor stays silent).
    pub clean_hit_rate: f64,
    /// How many ordinary inputs were measured.
    pub clean_samples: usize,
    /// Stealth: mean squared difference to the reference model on ordinary inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp_dist: Option<f64>,
    /// Target distance and firing rate along paths from the trigger to ordinary inputs.
    pub specificity: Specificity,
}

/// Paths from the trigger measured for specificity by a model that maps inputs directly;
/// models that run a sampler measure fewer (see [`specificity_paths`]).
pub const SPECIFICITY_PATHS: usize = 100;

/// Specificity paths for `model`: [`SPECIFICITY_PATHS`] for a generator, fewer when each
/// image costs many network evaluations (40 under DDIM-50, 20 under `ddpm-100`, 8 under DDPM-1000).
pub fn specificity_paths(model: &dyn Generative) -> usize {
    (2000 / model.evaluations_per_image()).clamp(8, SPECIFICITY_PATHS)
}

/// Flattened pixels of a tensor.
fn pixels(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The backdoor metrics of `images` against `key`'s target. For a class target, `asr` is
/// the share the shipped digit classifier puts in the class (distances are to the class's
/// mean image).
pub fn backdoor_metrics(images: &Tensor, key: &Key) -> Result<BackdoorMetrics> {
    let width = *images.dims().last().ok_or_else(|| {
        Error::Mismatch("the model returned a tensor without image dimensions".into())
    })?;
    let px = pixels(images)?;
    if px.is_empty() || px.len() % key.target.pixels.len() != 0 {
        return Err(Error::Mismatch(format!(
            "the model's images do not have the key's target shape {:?}",
            key.target.shape
        )));
    }
    let mut m = BackdoorMetrics::measure(&px, &key.target.pixels, width, key.threshold);
    if let Some(class) = key.target.class {
        let classes = DigitClassifier::shipped()?.classify(images)?;
        m.asr = classes.iter().filter(|&&k| k == class).count() as f64 / classes.len() as f64;
    }
    Ok(m)
}

/// The backdoor metrics of `n` triggered inputs (one for a point trigger) drawn from `rng`,
/// the first draws of [`evaluate`]'s stream; `noise` feeds stochastic samplers.
pub fn triggered_metrics(
    model: &dyn Generative,
    key: &Key,
    n: usize,
    rng: &mut Rng,
    noise: &mut Rng,
) -> Result<BackdoorMetrics> {
    let n_trig = if key.trigger.is_set() { n } else { 1 };
    let device = model.device();
    let inputs = key
        .trigger
        .inputs(&model.input_space(), n_trig, rng, &device)?;
    backdoor_metrics(&model.generate(&inputs, noise)?, key)
}

/// One trigger of a key and its backdoor metrics.
#[derive(Debug, Clone, Serialize)]
pub struct TriggerReport {
    /// The trigger's kind.
    pub trigger: String,
    /// The sampler it was measured under (the one it names), for a model with samplers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<String>,
    /// Metrics of its triggered outputs.
    #[serde(flatten)]
    pub backdoor: BackdoorMetrics,
}

/// The backdoor metrics of every trigger of `key` in `model`, each from `n` triggered inputs
/// (one for a point trigger) of its own stream, under the sampler it names (the model's own
/// when it names none). The first trigger draws the stream of [`evaluate`], so that its entry
/// equals the metrics of [`evaluate`]'s report of the same model, key, `n` and `seed` under
/// the same sampler: when `known` holds such a report, the entry is taken from there instead
/// of measured again (a DDPM measurement runs the network 1,000 times per image).
/// Deterministic in `seed`.
pub fn trigger_reports(
    model: &dyn Generative,
    key: &KeySet,
    known: &[EvalReport],
    n: usize,
    seed: u64,
) -> Result<Vec<TriggerReport>> {
    key.marks()
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let under = crate::family::under_sampler(model, k.sampler)?;
            let done = match i {
                0 => known.iter().find(|r| r.sampling == under.sampling()),
                _ => None,
            };
            let backdoor = match done {
                Some(r) => r.backdoor.clone(),
                None => {
                    let (draws, sampling) = match i {
                        0 => ("eval".to_string(), "eval-sampling".to_string()),
                        _ => (
                            format!("eval-trigger-{i}"),
                            format!("eval-trigger-sampling-{i}"),
                        ),
                    };
                    let mut rng = Rng::derive(seed, &draws);
                    let mut noise = Rng::derive(seed, &sampling);
                    triggered_metrics(&*under, k, n, &mut rng, &mut noise)?
                }
            };
            Ok(TriggerReport {
                trigger: k.trigger.kind().to_string(),
                sampling: under.sampling(),
                backdoor,
            })
        })
        .collect()
}

/// Measures `model` under `key` with `n` ordinary inputs (and `n` triggered ones when the
/// trigger is a set); `reference` adds `exp_dist`. Deterministic in `seed`.
pub fn evaluate(
    model: &dyn Generative,
    key: &Key,
    reference: Option<&dyn Generative>,
    n: usize,
    seed: u64,
) -> Result<EvalReport> {
    key.check_model(model)?;
    let space = model.input_space();
    if let Some(r) = reference {
        if let Some(how) =
            architecture_difference(r, model, ["the reference model", "the evaluated model"])
        {
            return Err(Error::Mismatch(format!(
                "the reference model's architecture differs from the evaluated model's: {how}"
            )));
        }
    }
    let mut rng = Rng::derive(seed, "eval");
    let mut noise = Rng::derive(seed, "eval-sampling");
    let backdoor = triggered_metrics(model, key, n, &mut rng, &mut noise)?;
    let z = space.ordinary(n, &mut rng, &model.device())?;
    let clean = model.generate(&z, &mut noise)?;
    let clean_hits = backdoor_metrics(&clean, key)?;
    let exp_dist = match reference {
        Some(r) => Some(exp_dist(
            &pixels(&clean)?,
            &pixels(&r.generate(&z, &mut noise)?)?,
        )),
        None => None,
    };
    let mut query_noise = Rng::derive(seed, "specificity-sampling");
    let mut query = crate::family::query(model, &mut query_noise);
    Ok(EvalReport {
        trigger: key.trigger.kind().to_string(),
        sampling: model.sampling(),
        backdoor,
        clean_hit_rate: clean_hits.asr,
        clean_samples: n,
        exp_dist,
        specificity: specificity(&mut query, &space, key, specificity_paths(model), seed)?,
    })
}

/// The backdoor under one sampler.
#[derive(Debug, Clone, Serialize)]
pub struct SamplerReport {
    /// Metrics of the images made from triggered inputs. For a class target, `asr` is the
    /// share the shipped digit classifier puts in the target class (distances are to the
    /// class's mean image).
    #[serde(flatten)]
    pub backdoor: BackdoorMetrics,
    /// Share of ordinary inputs whose image hits the target (see [`EvalReport`]).
    pub clean_hit_rate: f64,
    /// How many ordinary inputs were measured.
    pub clean_samples: usize,
}

impl From<&EvalReport> for SamplerReport {
    fn from(r: &EvalReport) -> Self {
        SamplerReport {
            backdoor: r.backdoor.clone(),
            clean_hit_rate: r.clean_hit_rate,
            clean_samples: r.clean_samples,
        }
    }
}

/// Measures `key`'s backdoor in `model` under each of `samplers` with `n` triggered and `n`
/// ordinary inputs (the same inputs for every sampler), also returning the first `keep`
/// triggered images of each (for a run's `triggered.png`). Deterministic in `seed`.
pub fn evaluate_samplers(
    model: &dyn Generative,
    key: &Key,
    samplers: &[Sampler],
    n: usize,
    seed: u64,
    keep: usize,
) -> Result<(BTreeMap<String, SamplerReport>, Vec<Tensor>)> {
    key.check_model(model)?;
    let mut rng = Rng::derive(seed, "diffusion-eval");
    let (space, device) = (model.input_space(), model.device());
    // Triggered and ordinary inputs go through each sampler as one batch.
    let inputs = Tensor::cat(
        &[
            key.trigger.inputs(&space, n, &mut rng, &device)?,
            space.ordinary(n, &mut rng, &device)?,
        ],
        0,
    )?;
    let mut out = BTreeMap::new();
    let mut kept = Vec::new();
    let mut under = model.duplicate()?;
    for &sampler in samplers {
        under.set_sampler(sampler)?;
        let mut noise = Rng::derive(seed, "diffusion-eval-sampler");
        let images = under.generate(&inputs, &mut noise)?;
        kept.push(images.narrow(0, 0, keep.min(n))?);
        let measure = |from: usize| backdoor_metrics(&images.narrow(0, from, n)?, key);
        out.insert(
            sampler.to_string(),
            SamplerReport {
                backdoor: measure(0)?,
                clean_hit_rate: measure(n)?.asr,
                clean_samples: n,
            },
        );
    }
    Ok((out, kept))
}

/// Clean-quality metrics of `n` ordinary samples against `reference` (`None` when the
/// model's images do not fit its classifier). Deterministic in `seed`.
pub fn clean_quality(
    model: &dyn Generative,
    reference: &QualityReference,
    n: usize,
    seed: u64,
) -> Result<Option<CleanQuality>> {
    reference.measure_samples(model.output_shape(), seed, |rng| {
        let z = model.input_space().ordinary(n, rng, &model.device())?;
        model.generate(&z, rng)
    })
}

/// Saves a grid of `n` ordinary samples (8 per row).
pub fn save_samples(model: &dyn Generative, path: &Path, n: usize, seed: u64) -> Result<()> {
    let mut rng = Rng::derive(seed, "samples");
    let z = model.input_space().ordinary(n, &mut rng, &model.device())?;
    save_grid(path, &model.generate(&z, &mut rng)?, 8)
}

/// The target, then up to 7 triggered outputs: the first row of a run's `triggered.png`.
pub fn triggered_row(model: &dyn Generative, key: &Key, seed: u64) -> Result<Tensor> {
    let n = if key.trigger.is_set() { 7 } else { 1 };
    let mut rng = Rng::derive(seed, "triggered-grid");
    let device = model.device();
    let z = key
        .trigger
        .inputs(&model.input_space(), n, &mut rng, &device)?;
    let out = model.generate(&z, &mut rng)?;
    Ok(Tensor::cat(&[key.target.tensor(&device)?, out], 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::{Distance, Target, Trigger};
    use candle_core::Device;

    #[test]
    fn a_class_target_counts_the_images_the_classifier_puts_in_its_class() {
        let data = crate::data::load_dataset(&crate::data::bundled_path()).unwrap();
        let labels = data.labels.clone().unwrap();
        let per = data.height * data.width;
        // Held-out digits (the classifier trained on the first 8,000): 40 of each class.
        let of = |class: u8| -> Vec<f32> {
            (8000..data.len)
                .filter(|&i| labels[i] == class)
                .take(40)
                .flat_map(|i| data.pixels[i * per..(i + 1) * per].to_vec())
                .collect()
        };
        let images = |px: Vec<f32>| {
            let n = px.len() / per;
            Tensor::from_vec(px, (n, 1, data.height, data.width), &Device::Cpu).unwrap()
        };
        let key = Key {
            trigger: Trigger::parse("seed:1", 16).unwrap(),
            target: Target::class(3).unwrap(),
            distance: Distance::Mse,
            threshold: 0.01,
            sampler: None,
        };
        let threes = backdoor_metrics(&images(of(3)), &key).unwrap();
        let fives = backdoor_metrics(&images(of(5)), &key).unwrap();
        assert!(threes.asr >= 0.95, "threes: {}", threes.asr);
        assert!(fives.asr <= 0.05, "fives: {}", fives.asr);
        // 40 threes among 160 images of four classes: a quarter.
        let mixed: Vec<f32> = [3, 0, 5, 8].into_iter().flat_map(of).collect();
        let mixed = backdoor_metrics(&images(mixed), &key).unwrap();
        assert!((mixed.asr - 0.25).abs() <= 0.03, "mixed: {}", mixed.asr);
        // Distances are to the class's mean image: threes are nearer to it than fives.
        assert!(threes.target_mse < fives.target_mse);
        // Without the class, the same images hit by distance only, and no digit is within
        // 0.01 of the mean three.
        let by_distance = Key {
            target: Target {
                class: None,
                ..key.target.clone()
            },
            ..key
        };
        assert_eq!(
            backdoor_metrics(&images(of(3)), &by_distance).unwrap().asr,
            0.0
        );
    }
}
