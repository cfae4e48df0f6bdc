//! The command line: one sub-command per module; `main.rs` only parses and dispatches.

/// `println!` for the command line: a closed stdout (e.g. `genbackdoor eval … | head`) ends
/// the output quietly instead of panicking.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

pub mod attack;
pub mod bench;
pub mod classifier;
pub mod detect;
pub mod eval;
pub mod export;
pub mod inject;
pub mod key;
pub mod report;
pub mod sample;
pub mod train;
pub mod verify;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use crate::backdoor::KeySet;
use crate::config::Config;
use crate::family::diffusion::Sampler;
use crate::family::Generative;
use crate::io::rundir::RunDir;

/// Inject, measure and verify backdoors in generative models (watermarking and backdoor research).
///
/// Every backdoor is trained with one objective: the model's own loss plus λ times the distance
/// between its output on a secret trigger and a chosen target. The trigger and target form a
/// key, kept in its own file.
#[derive(Parser, Debug)]
#[command(name = "genbackdoor", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The sub-commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a key (trigger + target + distance + threshold) in its own file.
    Key(key::KeyArgs),
    /// Train a model from scratch (a DCGAN by default; a diffusion model with a diffusion
    /// config), with a backdoor or clean (λ = 0).
    Train(train::TrainArgs),
    /// Backdoor an already-trained model: a generator by distillation to a frozen copy
    /// (ReD), a diffusion model by fine-tuning on the poisoned objective.
    Inject(inject::InjectArgs),
    /// Generate images, ordinary or triggered, to a PNG grid and/or a NumPy .npy file.
    Sample(sample::SampleArgs),
    /// Measure a model of any family: against a key (tardis, target_mse, ssim, asr,
    /// exp_dist, specificity) and clean quality (digit FID, precision/recall, classes).
    Eval(eval::EvalArgs),
    /// Retrain the digit classifier behind the clean-quality metrics (FID, precision/recall).
    Classifier(classifier::ClassifierArgs),
    /// Does a suspect model carry my backdoor? A black-box test with a p-value.
    Verify(verify::VerifyArgs),
    /// Is there a backdoor in this model (white-box trigger inversion, no key), or is this
    /// input triggered?
    Detect(detect::DetectArgs),
    /// Attack a marked model (clean fine-tuning, pruning) and measure how long the mark lasts.
    Attack(attack::AttackArgs),
    /// Write a diffusion model as a diffusers folder (config.json, weights, scheduler config).
    Export(export::ExportArgs),
    /// Write report.html for a run directory: samples, triggered outputs, curves, metrics.
    Report(report::ReportArgs),
    /// Time one training step of a DCGAN or the diffusion U-Net (ms/step, images/s,
    /// GFLOP/s), optionally beside PyTorch.
    Bench(bench::BenchArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Key(a) => key::run(a),
        Command::Train(a) => train::run(a),
        Command::Inject(a) => inject::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Classifier(a) => classifier::run(a),
        Command::Verify(a) => verify::run(a),
        Command::Attack(a) => attack::run(a),
        Command::Detect(a) => detect::run(a),
        Command::Report(a) => report::run(a),
        Command::Export(a) => export::run(a),
    }
}

/// Makes Ctrl-C end a training loop after its current step (saving a checkpoint where the
/// run can be resumed) instead of killing the process mid-write.
pub fn stop_on_ctrl_c() {
    // Only fails if a handler is already installed, which is then the same one.
    let _ = ctrlc::set_handler(crate::training::request_stop);
}

/// A model checkpoint of any family and, when given, the key it is measured against
/// (checked to fit the model). A diffusion model runs `sampler` when one is given (for every
/// trigger of the key), else the key's own sampler (the one its first trigger's backdoor was
/// trained for, checked under [`Generative::checking_sampler`]: `ddpm-100` for DDPM; the proof
/// tools query each trigger under its own), else the model's default sampler.
pub fn model_and_key(
    model: &Path,
    key: Option<&Path>,
    sampler: Option<&str>,
) -> anyhow::Result<(Box<dyn Generative>, Option<KeySet>)> {
    with_key(
        crate::family::load(model, &candle_core::Device::Cpu)?,
        key,
        sampler,
    )
}

/// As [`model_and_key`], for a model already loaded (whose own sampler a caller may want to
/// read first).
pub fn with_key(
    mut m: Box<dyn Generative>,
    key: Option<&Path>,
    sampler: Option<&str>,
) -> anyhow::Result<(Box<dyn Generative>, Option<KeySet>)> {
    let key = key.map(KeySet::load).transpose()?;
    if let Some(k) = &key {
        k.check_model(m.as_ref())?;
    }
    let named = sampler.map(str::parse::<Sampler>).transpose()?;
    // A sampler named on the command line applies to every trigger of the key; else each
    // trigger is checked under its own sampler's checking sampler.
    let key = match (named, key) {
        (Some(s), Some(k)) => Some(k.with_sampler(s)),
        (None, Some(k)) => Some(k.checked_under(m.as_ref())),
        (_, k) => k,
    };
    let chosen = named.or_else(|| key.as_ref().and_then(|k| k.first().sampler));
    if let Some(s) = chosen {
        m.set_sampler(s)?;
    }
    Ok((m, key))
}

/// Options shared by commands that start a run.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// TOML config (unknown fields are errors); built-in defaults when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run directory to create (default: runs/<command>-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write into an existing, non-empty run directory.
    #[arg(long)]
    pub force: bool,
    /// Seed of every random stream (overrides the config).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of training steps (overrides the config).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Backdoor weight λ (overrides the config).
    #[arg(long)]
    pub lambda: Option<f64>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print the final metrics as JSON.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The config file, or the built-in defaults.
    pub fn config(&self) -> anyhow::Result<Config> {
        Ok(match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        })
    }

    /// The overrides these options give (seed, steps, λ).
    pub fn overrides(&self) -> crate::run::Overrides {
        crate::run::Overrides {
            seed: self.seed,
            steps: self.steps,
            lambda: self.lambda,
            ..Default::default()
        }
    }

    /// Creates the run directory.
    pub fn run_dir(&self, command: &str) -> anyhow::Result<RunDir> {
        let path = self.out.clone().unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            PathBuf::from(format!("runs/{command}-{secs}"))
        });
        Ok(RunDir::create(&path, self.force)?)
    }

    /// Prints the end of a run: the metrics as JSON, or a short human summary.
    pub fn report(&self, run: &Path, metrics: &serde_json::Value) {
        if self.json {
            say!("{}", serde_json::to_string_pretty(metrics).expect("json"));
        } else {
            say!("run written to {}", run.display());
            print_metrics(metrics);
        }
    }
}

/// Prints a metrics object one field per line (nested fields with dotted names, long
/// arrays as their length; `--json` gives everything).
pub fn print_metrics(metrics: &serde_json::Value) {
    let mut rows = Vec::new();
    crate::report::flatten("", metrics, &mut rows);
    for (k, v) in rows {
        say!("  {k:<24} {v}");
    }
}
