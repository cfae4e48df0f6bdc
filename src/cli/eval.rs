//! `genbackdoor eval`: measure a model of any family against a key.

use std::path::PathBuf;

use clap::Args;

use crate::digits::quality::QualityReference;
use crate::eval::{clean_quality, evaluate, trigger_reports};
use crate::family::diffusion::Sampler;

/// Arguments of `eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Model checkpoint to measure (a generator or a diffusion model).
    #[arg(long)]
    pub model: PathBuf,
    /// The key (without one, only clean quality is measured); the full metrics are its first
    /// trigger's, `triggers` gives every trigger's backdoor metrics.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// A clean reference model of the same architecture: adds `exp_dist`.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Number of inputs (ordinary, and triggered for set triggers). Default 1000 for
    /// generators, 64 for diffusion models (whose DDPM sampler runs the network T times per
    /// image).
    #[arg(long)]
    pub n: Option<usize>,
    /// Diffusion models: the samplers to measure the backdoor under (`ddpm`, `ddpm-N`, `ddim` = 50
    /// steps, `ddim-N`, `dpm++2m` = 20 steps, `dpm++2m-N`, `heun` = 25 steps, `heun-N`); repeat the flag for several. Default: the key's own sampler (the
    /// one its backdoor was trained for, `ddpm-100` for a DDPM-trained one), else the model's
    /// default, `ddpm-100`.
    #[arg(long = "sampler")]
    pub samplers: Vec<String>,
    /// Ordinary samples for clean quality (digit FID, precision/recall, class histogram),
    /// compared with the 2000 held-out real digits (digit-shaped models only); 0 skips it.
    /// Diffusion models draw them with the first `--sampler`, else the key's first
    /// trigger's, else the model's default (`ddpm-100`).
    #[arg(long, default_value_t = crate::run::GENERATOR_QUALITY_SAMPLES)]
    pub quality_samples: usize,
    /// Seed of the inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `eval`.
pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if a.n == Some(0) {
        anyhow::bail!("--n must be at least 1");
    }
    if a.key.is_none() && a.reference.is_some() {
        anyhow::bail!("--reference needs --key (exp_dist is part of the backdoor metrics)");
    }
    let samplers = a
        .samplers
        .iter()
        .map(|s| s.parse::<Sampler>())
        .collect::<Result<Vec<_>, _>>()?;
    let (mut model, key) = super::model_and_key(&a.model, a.key.as_deref(), None)?;
    if let Some(s) = samplers.first() {
        model.set_sampler(*s)?;
    }
    let mut v = serde_json::json!({});
    if a.quality_samples > 0 {
        let reference = QualityReference::bundled()?;
        if let Some(q) = clean_quality(model.as_ref(), &reference, a.quality_samples, a.seed)? {
            v["quality"] = serde_json::to_value(q)?;
        }
    }
    if let Some(key) = &key {
        let reference = a
            .reference
            .as_ref()
            .map(|p| crate::family::load(p, &candle_core::Device::Cpu))
            .transpose()?;
        let n = a.n.unwrap_or(if model.evaluations_per_image() > 1 {
            crate::config::DIFFUSION_EVAL_SAMPLES
        } else {
            crate::run::GENERATOR_EVAL_SAMPLES
        });
        let first = key.first();
        let measure =
            |m: &dyn crate::family::Generative| evaluate(m, first, reference.as_deref(), n, a.seed);
        // One report per sampler, the first under the sampler already set (flag or key).
        let mut reports = vec![measure(model.as_ref())?];
        for s in samplers.get(1..).unwrap_or(&[]) {
            model.set_sampler(*s)?;
            reports.push(measure(model.as_ref())?);
        }
        if key.marks().len() > 1 {
            let each = trigger_reports(model.as_ref(), key, &reports, n, a.seed)?;
            v["triggers"] = serde_json::to_value(each)?;
        }
        if model.sampling().is_none() {
            let report = serde_json::to_value(&reports[0])?;
            if let (Some(o), serde_json::Value::Object(r)) = (v.as_object_mut(), report) {
                o.extend(r);
            }
        } else {
            let mut by_sampler = serde_json::Map::new();
            for r in &reports {
                let name = r.sampling.clone().expect("a diffusion model has a sampler");
                by_sampler.insert(name, serde_json::to_value(r)?);
            }
            v["samplers"] = serde_json::Value::Object(by_sampler);
        }
    }
    if a.json {
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        super::print_metrics(&v);
    }
    Ok(())
}
