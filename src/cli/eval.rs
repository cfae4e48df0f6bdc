//! `genbackdoor eval`: measure a model against a key.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;

use crate::diffusion::eval::eval_samplers;
use crate::diffusion::{DiffusionModel, Sampler};
use crate::digits::quality::QualityReference;
use crate::gan::eval::{clean_quality, evaluate};
use crate::gan::GanModel;
use crate::paradigm::Key;

/// Arguments of `eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Generator checkpoint to measure.
    #[arg(long)]
    pub model: PathBuf,
    /// The key (without one, only clean quality is measured).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// A clean reference generator: adds `exp_dist`.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Number of latents (ordinary, and triggered for region/patch triggers); for diffusion
    /// models, triggered and clean starts per sampler. Default 1000 (generators), 100
    /// (diffusion models, whose DDPM sampler runs the network T times per image).
    #[arg(long)]
    pub n: Option<usize>,
    /// Diffusion models: the samplers to measure (`ddpm`, `ddim` = 50 steps, `ddim-N`);
    /// repeat the flag for several. Default: ddpm and ddim-50.
    #[arg(long = "sampler")]
    pub samplers: Vec<String>,
    /// Ordinary samples for clean quality (FID, precision/recall, class histogram), compared
    /// with the 2000 held-out real digits; 0 skips it.
    #[arg(long, default_value_t = crate::gan::run::QUALITY_SAMPLES)]
    pub quality_samples: usize,
    /// Seed of the latents.
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
    let v = if crate::io::checkpoint::family_of(&a.model)? == crate::diffusion::model::FAMILY {
        eval_diffusion(&a)?
    } else {
        eval_generator(&a)?
    };
    if a.json {
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        super::print_metrics(&v);
    }
    Ok(())
}

/// The per-sampler backdoor metrics and clean quality of a diffusion model.
fn eval_diffusion(a: &EvalArgs) -> anyhow::Result<serde_json::Value> {
    if a.reference.is_some() {
        anyhow::bail!("--reference (exp_dist) is measured for generators only");
    }
    let model = DiffusionModel::load(&a.model, &Device::Cpu)?;
    let samplers = if a.samplers.is_empty() {
        eval_samplers(&model).to_vec()
    } else {
        a.samplers
            .iter()
            .map(|s| s.parse::<Sampler>())
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut v = serde_json::json!({});
    if let Some(path) = &a.key {
        let key = Key::load(path)?;
        let n = a.n.unwrap_or(crate::diffusion::eval::EVAL_SAMPLES);
        let report = crate::diffusion::eval::evaluate(&model, &key, &samplers, n, a.seed)?;
        v["trigger"] = key.trigger.kind().into();
        v["samplers"] = serde_json::to_value(report)?;
    }
    if a.quality_samples > 0 {
        let reference = QualityReference::bundled()?;
        let q =
            crate::diffusion::eval::clean_quality(&model, &reference, a.quality_samples, a.seed)?;
        if let Some(q) = q {
            v["quality"] = serde_json::to_value(q)?;
        }
    }
    Ok(v)
}

/// The backdoor metrics (with specificity) and clean quality of a generator.
fn eval_generator(a: &EvalArgs) -> anyhow::Result<serde_json::Value> {
    let model = GanModel::load(&a.model, &Device::Cpu)?;
    let mut v = serde_json::json!({});
    if let Some(path) = &a.key {
        let key = Key::load(path)?;
        let reference = a
            .reference
            .as_ref()
            .map(|p| GanModel::load(p, &Device::Cpu))
            .transpose()?;
        let n = a.n.unwrap_or(1000);
        v = serde_json::to_value(evaluate(&model, &key, reference.as_ref(), n, a.seed)?)?;
    }
    if a.quality_samples > 0 {
        let reference = QualityReference::bundled()?;
        if let Some(q) = clean_quality(&model, &reference, a.quality_samples, a.seed)? {
            v["quality"] = serde_json::to_value(q)?;
        }
    }
    Ok(v)
}
