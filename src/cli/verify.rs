//! `genbackdoor verify`: does a suspect model carry my backdoor? (black-box, with a p-value)

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;

use crate::gan::GanModel;
use crate::paradigm::Key;
use crate::verify::{verify, VerifySettings};

/// Arguments of `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The suspect generator checkpoint (only queried, never inspected).
    #[arg(long)]
    pub model: PathBuf,
    /// The owner's key.
    #[arg(long)]
    pub key: PathBuf,
    /// Random triggers drawn for the null distribution (the smallest reachable p-value is
    /// 1 / (queries + 1)).
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// Triggered queries per statistic for region and patch triggers.
    #[arg(long, default_value_t = 16)]
    pub group: usize,
    /// Significance level of the verdict.
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    /// Seed of the null triggers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a verdict.
    #[arg(long)]
    pub json: bool,
}

/// Runs `verify`. Exit status 0 either way; the verdict is in the output.
pub fn run(a: VerifyArgs) -> anyhow::Result<()> {
    let model = GanModel::load(&a.model, &Device::Cpu)?;
    let key = Key::load(&a.key)?;
    key.check_fits(model.latent_dim(), model.image_shape())?;
    let settings = VerifySettings {
        null_keys: a.queries,
        group: a.group,
        alpha: a.alpha,
        seed: a.seed,
    };
    let v = verify(&|z| model.generate(z), model.latent_dim(), &key, &settings)?;
    if a.json {
        say!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let verdict = if v.carries_backdoor {
        "CARRIES the backdoor"
    } else {
        "no evidence of the backdoor"
    };
    say!(
        "{}: {verdict} (p = {:.3e}, alpha = {})",
        a.model.display(),
        v.p_value,
        v.alpha
    );
    say!(
        "  statistic        {:.4e} (median target_mse on the trigger)",
        v.statistic
    );
    say!(
        "  null             min {:.4e}, median {:.4e} over {} random triggers",
        v.null_min,
        v.null_median,
        v.null_keys
    );
    say!(
        "  p (log-normal)   {:.3e} (tail estimate, informative only)",
        v.p_value_lognormal
    );
    say!("  test             {}", v.test);
    if let Some(c) = &v.caveat {
        say!("  caveat           {c}");
    }
    Ok(())
}
