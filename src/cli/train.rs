//! `genbackdoor train`: train a model from scratch (the config's family: a DCGAN by
//! default, or a diffusion model), with a backdoor or clean.

use std::path::PathBuf;

use clap::Args;

use crate::cli::RunArgs;
use crate::io::rundir::RunDir;
use crate::run::{Overrides, RunSpec};

/// Arguments of `train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// Key file to plant (default: the config's [backdoor] description; without one a
    /// secret random trigger and the built-in mark, saved as key.safetensors in the run).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Training data: a folder with an IDX pair or PNG images, or an IDX image file.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Images per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Continue an interrupted run (of any family, training or injection) from its last
    /// checkpoint, with its own config and key.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = [
        "config", "out", "force", "seed", "steps", "lambda", "key", "data", "limit", "batch_size",
    ])]
    pub resume: Option<PathBuf>,
}

/// Runs `train`.
pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    crate::cli::stop_on_ctrl_c();
    if let Some(dir) = &a.resume {
        let run = RunDir::open(dir)?;
        let metrics = crate::run::resume(&run, !a.run.quiet)?;
        a.run.report(&run.path, &metrics);
        return Ok(());
    }
    let overrides = Overrides {
        batch_size: a.batch_size,
        data: a.data.clone(),
        limit: a.limit,
        ..a.run.overrides()
    };
    let spec = RunSpec::train(a.run.config()?, &overrides, a.key.as_deref())?;
    let run = a.run.run_dir("train")?;
    let metrics = spec.execute(&run, !a.run.quiet)?;
    a.run.report(&run.path, &metrics);
    Ok(())
}
