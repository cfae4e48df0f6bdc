//! What every run writes at its end, for any model family: the model, sample grids,
//! `metrics.json` (the trainer's summary, clean quality and the backdoor's measurement),
//! `verify.json` (the ownership test), `detect.json` (detection without the key) and
//! `report.html`.

use candle_core::Tensor;

use crate::backdoor::KeySet;
use crate::digits::quality::add_bundled_quality;
use crate::eval::{
    clean_quality, evaluate, evaluate_samplers, save_samples, trigger_reports, triggered_row,
    SamplerReport,
};
use crate::family::Trained;
use crate::io::grid::save_grid;
use crate::io::rundir::RunDir;
use crate::report::write_report;
use crate::verify::{verify_model, VerifySettings};
use crate::Result;

/// Inputs a generator's run measures the backdoor with at its end (and `eval` by default).
pub const GENERATOR_EVAL_SAMPLES: usize = 1000;

/// Ordinary samples for a generator's clean quality (as many as the held-out real digits).
pub const GENERATOR_QUALITY_SAMPLES: usize = crate::digits::HELD_OUT;

/// How much the end of a run measures.
#[derive(Debug, Clone, Copy)]
pub struct FinishSettings {
    /// Triggered and ordinary inputs for the backdoor metrics (per sampler).
    pub eval_samples: usize,
    /// Ordinary samples for the clean-quality metrics (0: none).
    pub quality_samples: usize,
    /// Seed of every input drawn.
    pub seed: u64,
    /// The keyless detection at the end (`None`: none, and no `detect.json`).
    pub detect: Option<crate::detect::DetectSettings>,
    /// Null triggers of the ownership test per trigger (`None`: as its sampler affords).
    pub null_keys: Option<usize>,
}

/// Writes `model.safetensors`, `samples.png` (64 ordinary samples under the model's own
/// sampling), `triggered.png` (the target and 7 triggered outputs under the key's sampler,
/// then a row of 8 per other sampler the family is measured with), `metrics.json`,
/// `verify.json`, `detect.json`/`detect.png` (see [`crate::detect`]) and `report.html` (the
/// run wrote its config and key at its start).
///
/// `metrics.json` holds the trainer's summary, clean quality, and, with a key, the
/// evaluation of its first trigger under the sampler the key names (ASR, distances, clean
/// hit rate, specificity, `exp_dist` against the reference), for models with several
/// samplers the backdoor under each in `samplers`, and for a key of several triggers each
/// trigger's backdoor metrics in `triggers`. `verify.json` tests every trigger. Returns the
/// metrics.
pub fn finish(
    run: &RunDir,
    trained: &Trained,
    key: Option<&KeySet>,
    settings: FinishSettings,
) -> Result<serde_json::Value> {
    let (model, seed) = (&*trained.model, settings.seed);
    model.save(&run.file("model.safetensors"))?;
    save_samples(model, &run.file("samples.png"), 64, seed)?;
    let mut metrics = trained.summary.clone();
    let obj = metrics
        .as_object_mut()
        .expect("a trainer's summary is an object");
    if settings.quality_samples > 0 {
        add_bundled_quality(obj, |r| {
            clean_quality(model, r, settings.quality_samples, seed)
        })?;
    }
    if let Some(key) = key {
        let key = &key.checked_under(model);
        let k = key.first();
        // The proof tools run under the sampler that checks the backdoor (the one it was
        // trained for; strided DDPM for DDPM).
        let under = crate::family::under_sampler(model, k.sampler)?;
        let n = settings.eval_samples;
        let report = evaluate(&*under, k, trained.reference.as_deref(), n, seed)?;
        let others: Vec<_> = model
            .eval_samplers()
            .into_iter()
            .filter(|s| Some(s.to_string()) != under.sampling())
            .collect();
        let (mut samplers, kept) = evaluate_samplers(model, k, &others, n, seed, 8)?;
        let mut rows = vec![triggered_row(&*under, k, seed)?];
        rows.extend(kept);
        // Each further trigger of the key after them, under its own sampler.
        for mark in &key.marks()[1..] {
            let own = crate::family::under_sampler(model, mark.sampler)?;
            rows.push(triggered_row(&*own, mark, seed)?);
        }
        save_grid(&run.file("triggered.png"), &Tensor::cat(&rows, 0)?, 8)?;
        if let Some(s) = under.sampling() {
            samplers.insert(s, SamplerReport::from(&report));
            obj.insert(
                "samplers".into(),
                serde_json::to_value(samplers).expect("serialisable"),
            );
        }
        if key.marks().len() > 1 {
            let each = trigger_reports(&*under, key, std::slice::from_ref(&report), n, seed)?;
            obj.insert(
                "triggers".into(),
                serde_json::to_value(each).expect("serialisable"),
            );
        }
        if let serde_json::Value::Object(m) = serde_json::to_value(report).expect("serialisable") {
            obj.extend(m);
        }
        let settings = VerifySettings {
            seed,
            null_keys: settings.null_keys,
            ..VerifySettings::for_model(&*under)
        };
        run.write_json("verify.json", &verify_model(&*under, key, &settings)?)?;
    }
    if let Some(detect) = &settings.detect {
        crate::detect::save(&model.detect(detect)?, run)?;
    }
    run.write_json("metrics.json", &metrics)?;
    write_report(&run.path)?;
    Ok(metrics)
}
