//! What every GAN run writes at its end, and the cheap backdoor probe logged while training.

use candle_core::Tensor;

use crate::backdoor::Key;
use crate::digits::quality::add_bundled_quality;
use crate::eval::{clean_quality, evaluate, save_samples, save_triggered};
use crate::family::gan::GanModel;
use crate::io::report::write_report;
use crate::io::rundir::RunDir;
use crate::metrics::tardis;
use crate::verify::{verify_model, VerifySettings};
use crate::Result;

/// Latents measured by the end-of-run evaluation.
pub const EVAL_SAMPLES: usize = 1000;

/// Ordinary samples measured for clean quality (as many as the held-out real digits).
pub const QUALITY_SAMPLES: usize = crate::digits::HELD_OUT;

/// `train.csv`'s header: `step` then the loop's columns.
pub fn header<'a>(columns: &[&'a str]) -> Vec<&'a str> {
    let mut h = vec!["step"];
    h.extend_from_slice(columns);
    h
}

/// Measures `tardis` at the trigger's anchor point during training (one forward pass).
pub struct Probe {
    z: Tensor,
    target: Vec<f32>,
}

impl Probe {
    /// A probe for `key` on `model`'s latent space.
    pub fn new(key: &Key, model: &GanModel) -> Result<Probe> {
        let dim = model.latent_dim();
        let z = Tensor::from_vec(key.trigger.anchor(dim), (1, dim), &model.device)?;
        Ok(Probe {
            z,
            target: key.target.pixels.clone(),
        })
    }

    /// `tardis` of the deployed model's output at the anchor.
    pub fn tardis(&self, model: &GanModel) -> Result<f64> {
        let out = model.generate(&self.z)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(tardis(&out, &self.target))
    }
}

/// Writes the generator (the run wrote its key, in its own file, at its start), sample grids, `metrics.json` (clean
/// quality and the evaluation merged into `extra`), `verify.json` and `report.html`.
/// Returns the metrics.
pub fn finish(
    run: &RunDir,
    model: &GanModel,
    key: Option<&Key>,
    reference: Option<&GanModel>,
    seed: u64,
    mut extra: serde_json::Value,
) -> Result<serde_json::Value> {
    model.save(&run.file("model.safetensors"))?;
    save_samples(model, &run.file("samples.png"), 64, seed)?;
    let obj = extra.as_object_mut().expect("extra is an object");
    add_bundled_quality(obj, |r| clean_quality(model, r, QUALITY_SAMPLES, seed))?;
    if let Some(k) = key {
        save_triggered(model, k, &run.file("triggered.png"), seed)?;
        let reference = reference.map(|r| r as &dyn crate::family::Generative);
        let report = evaluate(model, k, reference, EVAL_SAMPLES, seed)?;
        if let serde_json::Value::Object(m) = serde_json::to_value(report).expect("serialisable") {
            obj.extend(m);
        }
        let settings = VerifySettings {
            seed,
            ..VerifySettings::default()
        };
        let v = verify_model(model, k, &settings)?;
        run.write_json("verify.json", &v)?;
    }
    run.write_json("metrics.json", &extra)?;
    write_report(&run.path)?;
    Ok(extra)
}
