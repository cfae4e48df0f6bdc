//! Measuring a diffusion model against a key, per sampler, and what a diffusion run writes
//! at its end.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;

use crate::backdoor::Key;
use crate::digits::quality::add_bundled_quality;
use crate::eval::{backdoor_metrics, clean_quality, save_samples, specificity_paths};
use crate::family::diffusion::sampler::DPM_SOLVER_STEPS;
use crate::family::diffusion::{DiffusionModel, Sampler};
use crate::family::Generative;
use crate::io::grid::save_grid;
use crate::io::report::write_report;
use crate::io::rundir::RunDir;
use crate::metrics::specificity::specificity;
use crate::metrics::BackdoorMetrics;
use crate::rng::Rng;
use crate::verify::{verify_model, VerifySettings};
use crate::Result;

/// The samplers every run is measured with: DDPM over all T steps, DDIM with 50 steps (T when
/// T < 50) and DPM-Solver++ (2M) with 20 (T when T < 20).
pub fn eval_samplers(model: &DiffusionModel) -> [Sampler; 3] {
    [
        Sampler::Ddpm,
        Sampler::default_for(&model.schedule),
        Sampler::DpmSolver2m {
            steps: DPM_SOLVER_STEPS.min(model.schedule.steps()),
        },
    ]
}

/// Triggered (and as many clean) starts measured per sampler at the end of a run and by
/// `eval` (DDPM runs the network T times for each: 128 images × 1000 steps is most of the
/// end-of-run evaluation on two cores).
pub const EVAL_SAMPLES: usize = 64;

/// Clean samples for the quality metrics at the end of a run (DDIM-50).
pub const QUALITY_SAMPLES: usize = 1000;

/// The backdoor under one sampler.
#[derive(Debug, Clone, Serialize)]
pub struct SamplerReport {
    /// Metrics of the images sampled from triggered starts N(r, I). For a class target,
    /// `asr` is the share the shipped digit classifier puts in the target class (distances
    /// are to the class's mean image).
    #[serde(flatten)]
    pub backdoor: BackdoorMetrics,
    /// Share of clean starts N(0, I) whose image hits the target: ~0 for an image target;
    /// for a class target the share classified as that class (the class's natural rate,
    /// about 0.1, when the backdoor stays silent).
    pub clean_hit_rate: f64,
    /// How many clean starts were measured.
    pub clean_samples: usize,
}

/// Measures `key`'s backdoor in `model` under each sampler with `n` triggered and `n` clean
/// starts. Deterministic in `seed` (the same starts for every sampler).
pub fn evaluate(
    model: &DiffusionModel,
    key: &Key,
    samplers: &[Sampler],
    n: usize,
    seed: u64,
) -> Result<BTreeMap<String, SamplerReport>> {
    Ok(evaluate_keeping(model, key, samplers, n, seed, 0)?.0)
}

/// [`evaluate`], also returning the first `keep` triggered images of each sampler (for the
/// run's `triggered.png`, so that they need not be sampled a second time).
fn evaluate_keeping(
    model: &DiffusionModel,
    key: &Key,
    samplers: &[Sampler],
    n: usize,
    seed: u64,
    keep: usize,
) -> Result<(BTreeMap<String, SamplerReport>, Vec<Tensor>)> {
    key.check_model(model)?;
    let mut rng = Rng::derive(seed, "diffusion-eval");
    // Triggered and clean starts go through the sampler as one batch.
    let starts = Tensor::cat(
        &[
            model.starts(n, Some(&key.trigger), &mut rng)?,
            model.starts(n, None, &mut rng)?,
        ],
        0,
    )?;
    let mut out = BTreeMap::new();
    let mut kept = Vec::new();
    for &sampler in samplers {
        let mut noise = Rng::derive(seed, "diffusion-eval-sampler");
        let images = model.sample(sampler, &starts, &mut noise)?;
        kept.push(images.narrow(0, 0, keep.min(n))?);
        let measure = |from: usize| -> Result<BackdoorMetrics> {
            backdoor_metrics(&images.narrow(0, from, n)?, key)
        };
        let backdoor = measure(0)?;
        let clean_hits = measure(n)?;
        out.insert(
            sampler.to_string(),
            SamplerReport {
                backdoor,
                clean_hit_rate: clean_hits.asr,
                clean_samples: n,
            },
        );
    }
    Ok((out, kept))
}

/// How much the end of a run measures.
#[derive(Debug, Clone, Copy)]
pub struct FinishSettings {
    /// Triggered and clean starts per sampler.
    pub eval_samples: usize,
    /// Clean DDIM-50 samples for quality (0: none).
    pub quality_samples: usize,
    /// Seed of every start.
    pub seed: u64,
}

/// Writes the model (the run wrote its key at its start), `samples.png` (64 clean DDIM-50 samples), `triggered.png`
/// (the target, then triggered samples: a row per sampler of [`eval_samplers`]), `metrics.json`
/// (clean quality, the per-sampler backdoor metrics and specificity under the key's
/// sampler merged into `extra`), `verify.json` (the ownership test under the key's sampler)
/// and `report.html`. Returns the metrics.
pub fn finish(
    run: &RunDir,
    model: &DiffusionModel,
    key: Option<&Key>,
    settings: FinishSettings,
    mut extra: serde_json::Value,
) -> Result<serde_json::Value> {
    let seed = settings.seed;
    let mut model = model.duplicate()?;
    model.sampler = Sampler::default_for(&model.schedule);
    model.save(&run.file("model.safetensors"))?;
    save_samples(&model, &run.file("samples.png"), 64, seed)?;
    let obj = extra.as_object_mut().expect("extra is an object");
    if settings.quality_samples > 0 {
        add_bundled_quality(obj, |r| {
            clean_quality(&model, r, settings.quality_samples, seed)
        })?;
    }
    if let Some(k) = key {
        let samplers = eval_samplers(&model);
        let (report, kept) =
            evaluate_keeping(&model, k, &samplers, settings.eval_samples, seed, 8)?;
        // The target and 7 DDPM samples on the first row, 8 DDIM samples on the second.
        let first = kept[0].narrow(0, 0, kept[0].dim(0)?.min(7))?;
        let rows = [k.target.tensor(&model.device)?, first, kept[1].clone()];
        save_grid(&run.file("triggered.png"), &Tensor::cat(&rows, 0)?, 8)?;
        obj.insert("trigger".into(), k.trigger.kind().into());
        obj.insert(
            "samplers".into(),
            serde_json::to_value(report).expect("serialisable"),
        );
        // The proof tools run under the sampler the backdoor was trained for.
        if let Some(s) = k.sampler {
            model.set_sampler(s)?;
        }
        obj.insert("sampling".into(), model.sampler.to_string().into());
        let mut noise = Rng::derive(seed, "specificity-sampling");
        let mut query = crate::family::query(&model, &mut noise);
        let spec = specificity(
            &mut query,
            &model.input_space(),
            k,
            specificity_paths(&model),
            seed,
        )?;
        obj.insert(
            "specificity".into(),
            serde_json::to_value(spec).expect("serialisable"),
        );
        let settings = VerifySettings {
            seed,
            ..VerifySettings::for_model(&model)
        };
        run.write_json("verify.json", &verify_model(&model, k, &settings)?)?;
    }
    run.write_json("metrics.json", &extra)?;
    write_report(&run.path)?;
    Ok(extra)
}
