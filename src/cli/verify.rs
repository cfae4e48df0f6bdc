//! `genbackdoor verify`: does a suspect model carry my backdoor? (black-box, with a p-value)

use std::path::PathBuf;

use clap::Args;

use crate::verify::{verify_model, VerifySettings};

/// Arguments of `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The suspect model checkpoint, of any family (only queried, never inspected).
    #[arg(long)]
    pub model: PathBuf,
    /// The owner's key.
    #[arg(long)]
    pub key: PathBuf,
    /// Random triggers drawn for each trigger's null distribution (the smallest reachable
    /// p-value of one trigger is 1 / (queries + 1)). Default: 1000 for generators; for
    /// diffusion models as many as about 400,000 network evaluations under the trigger's
    /// sampler allow (1000 under DDIM-50 or `ddpm-100`, the default for a DDPM trigger; 100 under
    /// full `ddpm`).
    #[arg(long)]
    pub queries: Option<usize>,
    /// Triggered queries per statistic for set triggers (default 16 for generators' region
    /// and patch triggers, 4 starting noises for diffusion models).
    #[arg(long)]
    pub group: Option<usize>,
    /// Triggered queries of each set trigger (a diffusion stamp, a region or patch) for the
    /// target test of a random target, its mean and each output tested (at least `--group`;
    /// the rank test takes the first `--group`).
    #[arg(long, default_value_t = crate::verify::TARGET_OUTPUTS)]
    pub target_queries: usize,
    /// Significance level of the verdict.
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    /// Seed of the null triggers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Diffusion models: the sampler queried (`ddpm`, `ddpm-N`, `ddim` = 50 steps, `ddim-N`,
    /// `dpm++2m` = 20 steps, `dpm++2m-N`, `heun` = 25 steps, `heun-N`); default: the one the key's backdoor was trained for.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Print JSON instead of a verdict.
    #[arg(long)]
    pub json: bool,
}

/// Runs `verify`. Exit status 0 either way; the verdict is in the output.
pub fn run(a: VerifyArgs) -> anyhow::Result<()> {
    let (model, key) = super::model_and_key(&a.model, Some(&a.key), a.sampler.as_deref())?;
    let key = key.expect("a key was given");
    let defaults = VerifySettings::for_model(model.as_ref());
    let settings = VerifySettings {
        null_keys: a.queries,
        group: a.group.unwrap_or(defaults.group),
        target_outputs: a.target_queries,
        alpha: a.alpha,
        seed: a.seed,
    };
    let v = verify_model(model.as_ref(), &key, &settings)?;
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
        "  p (log-normal)   10^{:.1} (tail estimate, informative only)",
        v.log10_p_lognormal
    );
    if let Some(t) = &v.target_test {
        say!(
            "  rank test        p = {:.3e}; target test p = 10^{:.1} (agreement with the random target's {} squares: {:.3} for the mean of {} outputs, {:.3} for the best one)",
            v.rank_p_value,
            t.log10_p_value,
            t.squares,
            t.agreement,
            t.outputs,
            t.best_agreement
        );
    }
    if let Some(s) = &v.sampling {
        say!("  sampler          {s}");
    }
    say!("  test             {}", v.test);
    if let Some(c) = &v.caveat {
        say!("  caveat           {c}");
    }
    Ok(())
}
