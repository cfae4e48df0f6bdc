//! `genbackdoor eval`: measure a model against a key.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;

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
    /// Number of latents (ordinary, and triggered for region/patch triggers).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
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
    if a.n == 0 {
        anyhow::bail!("--n must be at least 1");
    }
    if a.key.is_none() && a.reference.is_some() {
        anyhow::bail!("--reference needs --key (exp_dist is part of the backdoor metrics)");
    }
    let model = GanModel::load(&a.model, &Device::Cpu)?;
    let mut v = serde_json::json!({});
    if let Some(path) = &a.key {
        let key = Key::load(path)?;
        let reference = a
            .reference
            .as_ref()
            .map(|p| GanModel::load(p, &Device::Cpu))
            .transpose()?;
        v = serde_json::to_value(evaluate(&model, &key, reference.as_ref(), a.n, a.seed)?)?;
    }
    if a.quality_samples > 0 {
        let reference = QualityReference::bundled()?;
        if let Some(q) = clean_quality(&model, &reference, a.quality_samples, a.seed)? {
            v["quality"] = serde_json::to_value(q)?;
        }
    }
    if a.json {
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        super::print_metrics(&v);
    }
    Ok(())
}
