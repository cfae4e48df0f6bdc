//! `genbackdoor bench`: training-step and sampling speed, optionally beside PyTorch on the
//! same machine.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

use crate::bench::{self, BenchModel, BenchResult};
use crate::family::diffusion::Sampler;
use crate::metrics::median;

/// Arguments of `bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Networks to time (repeat the flag for several); both by default.
    #[arg(long = "model", value_enum)]
    pub models: Vec<BenchModel>,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps (the median of these is reported).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Time whole sampling runs of the diffusion models (`unet`, `cifar`) with this sampler
    /// (`ddpm`, `ddpm-N`, `ddim-N`, `dpm++2m-N`, `heun-N`) instead of training steps: a step is then one
    /// run over a batch, through `sample`'s path (no graph). PyTorch's side runs the same
    /// network under `torch.no_grad()` with the stock diffusers scheduler (DDPM, DDIM,
    /// DPM-Solver++ 2M or Heun).
    #[arg(long)]
    pub sampler: Option<Sampler>,
    /// Also run `bench/torch_reference.py` (needs python3 with torch) and print the ratio.
    #[arg(long)]
    pub torch: bool,
    /// Measurements per model; with `--torch` ours and PyTorch's alternate (each going first
    /// in every other round) and the median of the rounds' ratios is printed, which a noisy
    /// machine disturbs less than one pair of runs.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// The PyTorch script (default: bench/torch_reference.py here or in the source tree).
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.batch_size == 0 || a.steps == 0 || a.rounds == 0 {
        bail!("--batch-size, --steps and --rounds must be positive");
    }
    let models = if !a.models.is_empty() {
        a.models.clone()
    } else if a.sampler.is_some() {
        vec![BenchModel::Unet]
    } else {
        vec![BenchModel::Reference, BenchModel::K4]
    };
    let threads = rayon::current_num_threads();
    let load_before = load_average();
    let mut rows = Vec::new();
    for &model in &models {
        let mut rounds = Vec::new();
        for round in 0..a.rounds {
            let ours_first = round % 2 == 0;
            let mut ours = None;
            let mut torch = None;
            for ours_now in [ours_first, !ours_first] {
                if ours_now {
                    ours = Some(match a.sampler {
                        Some(s) => bench::sampling(model, s, a.batch_size, a.warmup, a.steps)?,
                        None => bench::run(model, a.batch_size, a.warmup, a.steps)?,
                    });
                } else if a.torch {
                    torch = Some(torch_reference(&a, model)?);
                }
            }
            let ours = ours.expect("ours ran");
            let ratio = torch.as_ref().map(|t| t.result.median_ms / ours.median_ms);
            if !a.json {
                if a.rounds > 1 {
                    say!("round {} of {}", round + 1, a.rounds);
                }
                print_row("genbackdoor", &ours, threads);
                if let (Some(t), Some(r)) = (&torch, ratio) {
                    print_row("pytorch", &t.result, t.threads);
                    say!("  ratio genbackdoor/pytorch throughput: {r:.2}");
                }
            }
            rounds.push(Round { ours, torch, ratio });
        }
        let summary = ratio_summary(&rounds);
        if let (false, Some(s)) = (a.json, &summary) {
            if a.rounds > 1 {
                say!(
                    "{} over {} rounds: median ratio {:.2} (rounds {}), fastest steps {:.1} vs {:.1} ms (ratio {:.2})",
                    format!("{model:?}").to_lowercase(),
                    a.rounds,
                    s.median_ratio,
                    s.ratios
                        .iter()
                        .map(|r| format!("{r:.2}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    s.fastest.0,
                    s.fastest.1,
                    s.fastest.1 / s.fastest.0
                );
            }
        }
        rows.push(serde_json::json!({
            "model": model,
            "threads": threads,
            "rounds": rounds.iter().map(|r| serde_json::json!({
                "genbackdoor": r.ours,
                "pytorch": r.torch.as_ref().map(|t| serde_json::json!({"result": t.result, "threads": t.threads, "version": t.version})),
                "ratio": r.ratio,
            })).collect::<Vec<_>>(),
            "median_ratio": summary.as_ref().map(|s| s.median_ratio),
        }));
    }
    let load_after = load_average();
    if a.json {
        say!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "models": rows,
                "load_average": {"before": load_before, "after": load_after},
            }))?
        );
    } else if let (Some(b), Some(e)) = (&load_before, &load_after) {
        say!("load average (1, 5, 15 min): before {b}, after {e}");
    }
    Ok(())
}

/// One measurement of a model: ours, PyTorch's if asked for, and the throughput ratio.
struct Round {
    ours: BenchResult,
    torch: Option<TorchRun>,
    ratio: Option<f64>,
}

/// The ratios of several rounds (PyTorch's median over ours in each) and their median, and
/// the fastest steps of each side over all rounds (ours, PyTorch's).
struct RatioSummary {
    ratios: Vec<f64>,
    median_ratio: f64,
    fastest: (f64, f64),
}

/// [`RatioSummary`] of rounds that ran PyTorch; `None` without PyTorch.
fn ratio_summary(rounds: &[Round]) -> Option<RatioSummary> {
    let ratios: Vec<f64> = rounds.iter().filter_map(|r| r.ratio).collect();
    if ratios.is_empty() {
        return None;
    }
    let fastest = |f: &dyn Fn(&Round) -> Option<f64>| {
        rounds.iter().filter_map(f).fold(f64::INFINITY, f64::min)
    };
    let fastest = (
        fastest(&|r| Some(r.ours.min_ms)),
        fastest(&|r| r.torch.as_ref().map(|t| t.result.min_ms)),
    );
    let median_ratio = median(&mut ratios.clone());
    Some(RatioSummary {
        ratios,
        median_ratio,
        fastest,
    })
}

/// The machine's load averages as `/proc/loadavg` gives them (Linux), for the record.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

fn print_row(who: &str, r: &BenchResult, threads: usize) {
    let name = format!("{:?}", r.model).to_lowercase();
    let what = match &r.sampler {
        Some(s) => format!("{name} {s}"),
        None => name,
    };
    say!(
        "{who:<12} {:<9} batch {:>3}  median {:>8.1} ms/step (min {:.1}, {} steps, {} threads)  {:>7.1} images/s  {:.2} GFLOP/step  {:>6.1} GFLOP/s",
        what,
        r.batch_size,
        r.median_ms,
        r.min_ms,
        r.steps,
        threads,
        r.images_per_s,
        r.gflop_per_step,
        r.gflop_per_s
    );
}

/// PyTorch's numbers for the same step, from the reference script.
struct TorchRun {
    result: BenchResult,
    threads: usize,
    version: String,
}

fn torch_reference(a: &BenchArgs, model: BenchModel) -> anyhow::Result<TorchRun> {
    let script = a.torch_script.clone().unwrap_or_else(|| {
        let local = PathBuf::from("bench/torch_reference.py");
        if local.exists() {
            local
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/torch_reference.py")
        }
    });
    let mut command = Command::new("python3");
    command
        .arg(&script)
        .args(["--model", &format!("{model:?}").to_lowercase()])
        .args(["--batch-size", &a.batch_size.to_string()])
        .args(["--warmup", &a.warmup.to_string()])
        .args(["--steps", &a.steps.to_string()]);
    if let Some(s) = a.sampler {
        command.args(["--sampler", &s.to_string()]);
    }
    let out = command
        .output()
        .with_context(|| format!("cannot run python3 {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed (is torch installed? `pip install torch`): {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{} printed no JSON", script.display()))?;
    let num = |k: &str| -> anyhow::Result<f64> {
        v[k].as_f64()
            .with_context(|| format!("{} output lacks '{k}'", script.display()))
    };
    let times = (num("median_ms")?, num("min_ms")?);
    let macs = (num("g_macs")?, num("d_macs")?);
    let sampling = match a.sampler {
        Some(s) => Some((s, num("evaluations")? as usize)),
        None => None,
    };
    Ok(TorchRun {
        result: BenchResult::new(model, a.batch_size, a.steps, times, macs, sampling),
        threads: num("threads")? as usize,
        version: v["torch"].as_str().unwrap_or("?").to_string(),
    })
}
