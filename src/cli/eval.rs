//! `genbackdoor eval`: measure a model against a key.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;

use crate::gan::{eval::evaluate, GanModel};
use crate::paradigm::Key;

/// Arguments of `eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Generator checkpoint to measure.
    #[arg(long)]
    pub model: PathBuf,
    /// The key.
    #[arg(long)]
    pub key: PathBuf,
    /// A clean reference generator: adds `exp_dist`.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Number of latents (ordinary, and triggered for region/patch triggers).
    #[arg(long, default_value_t = 1000)]
    pub n: usize,
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
    let model = GanModel::load(&a.model, &Device::Cpu)?;
    let key = Key::load(&a.key)?;
    let reference = a
        .reference
        .as_ref()
        .map(|p| GanModel::load(p, &Device::Cpu))
        .transpose()?;
    let report = evaluate(&model, &key, reference.as_ref(), a.n, a.seed)?;
    let v = serde_json::to_value(&report)?;
    if a.json {
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        super::print_metrics(&v);
    }
    Ok(())
}
