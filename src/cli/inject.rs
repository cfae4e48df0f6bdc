//! `genbackdoor inject`: backdoor a trained generator by distillation (ReD), or fine-tune a
//! trained diffusion model on the poisoned objective.

use std::path::PathBuf;

use clap::Args;

use crate::cli::RunArgs;
use crate::io::rundir::RunDir;
use crate::run::{Overrides, RunSpec};

/// Arguments of `inject`.
#[derive(Args, Debug)]
pub struct InjectArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The clean generator or diffusion checkpoint to backdoor.
    #[arg(long, required_unless_present = "resume")]
    pub model: Option<PathBuf>,
    /// The key to plant (default: the config's [backdoor] description; without one a secret
    /// random trigger, with a secret random target of 4×4 squares for a generator and the
    /// built-in mark for a diffusion model, drawn for the model and saved as key.safetensors
    /// in the run)
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Adam learning rate (overrides the config).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Continue an interrupted injection from its last checkpoint, with its own config, key
    /// and clean model.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = [
        "config", "out", "force", "seed", "steps", "lambda", "model", "key", "lr",
    ])]
    pub resume: Option<PathBuf>,
}

/// Runs `inject`.
pub fn run(a: InjectArgs) -> anyhow::Result<()> {
    crate::cli::stop_on_ctrl_c();
    if let Some(dir) = &a.resume {
        let run = RunDir::open(dir)?;
        let metrics = crate::run::resume(&run, !a.run.quiet)?;
        a.run.report(&run.path, &metrics);
        return Ok(());
    }
    let Some(model) = &a.model else {
        anyhow::bail!("inject needs --model (or --resume RUN_DIR)");
    };
    let overrides = Overrides {
        lr: a.lr,
        ..a.run.overrides()
    };
    let spec = RunSpec::inject(a.run.config()?, &overrides, model, a.key.as_deref())?;
    let run = a.run.run_dir("inject")?;
    let metrics = spec.execute(&run, !a.run.quiet)?;
    a.run.report(&run.path, &metrics);
    Ok(())
}
