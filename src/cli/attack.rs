//! `genbackdoor attack finetune|prune`: how long does a watermark survive what a thief might
//! do to a stolen model?

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::attack::prune::prune_magnitude;
use crate::attack::{CurveLog, Measurement};
use crate::backdoor::KeySet;
use crate::digits::quality::QualityReference;
use crate::family::diffusion::Sampler;
use crate::family::{CleanFinetune, Generative};
use crate::io::rundir::RunDir;
use crate::metrics::persistence::PersistencePoint;
use crate::verify::VerifySettings;

/// Arguments of `attack`.
#[derive(Args, Debug)]
pub struct AttackArgs {
    /// Which attack.
    #[command(subcommand)]
    pub attack: Attack,
}

/// The attacks.
#[derive(Subcommand, Debug)]
pub enum Attack {
    /// Continue the model's clean training (λ = 0) from the marked model: adversarial
    /// training for a generator, denoising training for a diffusion model.
    Finetune(FinetuneArgs),
    /// Zero the smallest-magnitude weights of every layer, at one or more fractions.
    Prune(PruneArgs),
}

/// Options shared by the attacks.
#[derive(Args, Debug)]
pub struct Common {
    /// The marked model checkpoint (a generator or a diffusion model).
    #[arg(long)]
    pub model: PathBuf,
    /// The owner's key (default: key.safetensors beside the model).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Where the curve (attack-<name>.json) goes (default: the model's folder, so that
    /// `genbackdoor report` of that run shows it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Null triggers per trigger for the verification p-value at each point (0: skip).
    /// Default: as `verify` (1000 for generators; fewer for diffusion models under slow
    /// samplers).
    #[arg(long)]
    pub null_keys: Option<usize>,
    /// Diffusion models: the sampler every point is measured under; default: the key's own.
    #[arg(long)]
    pub sampler: Option<String>,
    /// Ordinary samples for each point's FID (0: skip it). Default: as at the end of a
    /// training run (2,000 for generators, 1,000 samples of the model's default sampler,
    /// `ddpm-100`, for diffusion models).
    #[arg(long)]
    pub quality_samples: Option<usize>,
    /// Seed of the measurement samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the curve as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `attack finetune`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clean training steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Measure every this many steps.
    #[arg(long, default_value_t = 100)]
    pub every: usize,
    /// TOML config for the training settings (data, batch size, learning rates: `[train]`
    /// for generators, `[diffusion]` for diffusion models). Default: generators at a thief's
    /// Adam 2e-4, constant, batch 32; diffusion models at the `[diffusion]` defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start from this discriminator checkpoint (e.g. the run's discriminator.safetensors)
    /// instead of a fresh one; a thief usually has only the generator.
    #[arg(long)]
    pub discriminator: Option<PathBuf>,
}

/// Arguments of `attack prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    #[command(flatten)]
    pub common: Common,
    /// Fractions of each layer's weights to zero (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
    )]
    pub fraction: Vec<f64>,
}

/// Runs `attack`.
pub fn run(a: AttackArgs) -> anyhow::Result<()> {
    match a.attack {
        Attack::Finetune(f) => finetune(f),
        Attack::Prune(p) => prune(p),
    }
}

/// The model's folder (where its run's files are).
fn folder_of(model: &Path) -> PathBuf {
    match model.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The loaded model (under the key's sampler) and key, the output folder, the quality
/// reference and the model's ordinary sampler (which FID is measured under).
type Setup = (
    Box<dyn Generative>,
    KeySet,
    RunDir,
    QualityReference,
    Option<Sampler>,
);

/// Loads what an attack works on, per the common options.
fn setup(c: &Common) -> anyhow::Result<Setup> {
    let key_path = c
        .key
        .clone()
        .unwrap_or_else(|| folder_of(&c.model).join("key.safetensors"));
    let loaded = crate::family::load(&c.model, &candle_core::Device::Cpu)?;
    let ordinary = loaded
        .sampling()
        .map(|s| s.parse::<Sampler>())
        .transpose()?;
    let (model, key) = super::with_key(loaded, Some(&key_path), c.sampler.as_deref())?;
    let out = c.out.clone().unwrap_or_else(|| folder_of(&c.model));
    std::fs::create_dir_all(&out).map_err(|e| crate::Error::io(&out, e))?;
    Ok((
        model,
        key.expect("a key was given"),
        RunDir::open(&out)?,
        QualityReference::bundled()?,
        ordinary,
    ))
}

/// What each point of an attack on `model` measures, per the common options.
fn measurement<'a>(
    model: &dyn Generative,
    key: &'a KeySet,
    (quality, ordinary): (&'a QualityReference, Option<Sampler>),
    c: &Common,
) -> Measurement<'a> {
    let family_default = match ordinary {
        Some(_) => crate::config::DIFFUSION_QUALITY_SAMPLES,
        None => crate::run::GENERATOR_QUALITY_SAMPLES,
    };
    Measurement {
        key,
        quality: Some(quality),
        quality_samples: c.quality_samples.unwrap_or(family_default),
        quality_sampler: ordinary,
        verify: (c.null_keys != Some(0)).then_some(VerifySettings {
            null_keys: c.null_keys,
            seed: c.seed,
            ..VerifySettings::for_model(model)
        }),
        triggered: crate::eval::specificity_paths(model) * 2,
        seed: c.seed,
    }
}

/// Prints the finished curve (already on disk: [`CurveLog`] writes it after every point).
fn print_curve(log: &CurveLog, c: &Common) -> anyhow::Result<()> {
    let curve = log.curve();
    if c.json {
        say!("{}", serde_json::to_string_pretty(curve)?);
        return Ok(());
    }
    say!(
        "{:>10} {:>12} {:>6} {:>8} {:>6} {:>10} {:>10}",
        curve.x_label,
        "tardis",
        "asr",
        "key asr",
        "firing",
        "fid",
        "p"
    );
    for p in &curve.points {
        let opt = |v: Option<f64>, prec: usize| v.map_or("-".into(), |v| format!("{v:.prec$}"));
        say!(
            "{:>10} {:>12.4} {:>6.3} {:>8.3} {:>6} {:>10} {:>10}",
            p.x,
            p.tardis,
            p.asr,
            p.key_asr(),
            format!("{}/{}", p.triggers_firing(), p.triggers_asr.len()),
            opt(p.fid, 2),
            p.p_value.map_or("-".into(), |v| format!("{v:.2e}"))
        );
    }
    match curve.mark_gone_at {
        Some(x) => say!(
            "the mark is gone (key asr < 0.5) at {} = {x}",
            curve.x_label
        ),
        None => say!("the mark survived every level measured"),
    }
    say!("wrote {}", log.path().display());
    Ok(())
}

fn finetune(a: FinetuneArgs) -> anyhow::Result<()> {
    crate::cli::stop_on_ctrl_c();
    if a.steps == 0 || a.every == 0 {
        anyhow::bail!("--steps and --every must be at least 1");
    }
    let (model, key, run, quality, ordinary) = setup(&a.common)?;
    let mut cfg = match &a.config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config {
            train: crate::config::TrainConfig::thief(),
            ..Default::default()
        },
    };
    cfg.seed = a.common.seed;
    let m = measurement(model.as_ref(), &key, (&quality, ordinary), &a.common);
    let mut log = CurveLog::new(&run, "finetune", "steps");
    let attack = CleanFinetune {
        cfg: &cfg,
        steps: a.steps,
        every: a.every,
        discriminator: a.discriminator.as_deref(),
        progress: !a.common.quiet,
    };
    let tuned = model.finetune_clean(&attack, &run, &mut |step, g| {
        log.push(m.at(step as f64, g)?)
    })?;
    tuned.save(&run.file("finetuned.safetensors"))?;
    print_curve(&log, &a.common)
}

fn prune(a: PruneArgs) -> anyhow::Result<()> {
    if let Some(f) = a.fraction.iter().find(|f| !(0.0..=1.0).contains(*f)) {
        anyhow::bail!("--fraction values must lie in [0, 1], not {f}");
    }
    let (model, key, run, quality, ordinary) = setup(&a.common)?;
    let m = measurement(model.as_ref(), &key, (&quality, ordinary), &a.common);
    let mut log = CurveLog::new(&run, "prune", "fraction");
    let bar = crate::training::progress_bar(a.fraction.len(), !a.common.quiet, " points");
    for &f in &a.fraction {
        bar.set_message(format!("fraction {f}"));
        let pruned = model.duplicate()?;
        prune_magnitude(pruned.params(), f)?;
        log.push(match m.at(f, pruned.as_ref()) {
            Ok(p) => p,
            // Heavy pruning can break a model into overflow: the mark is gone there.
            Err(crate::Error::NonFiniteOutput) => PersistencePoint {
                x: f,
                tardis: f64::INFINITY,
                asr: 0.0,
                triggers_asr: vec![0.0; key.marks().len()],
                fid: None,
                p_value: None,
            },
            Err(e) => return Err(e.into()),
        })?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    print_curve(&log, &a.common)
}
