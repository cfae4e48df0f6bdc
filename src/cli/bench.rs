//! `genbackdoor bench`: training-step speed, optionally beside PyTorch on the same machine.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

use crate::bench::{self, BenchModel, BenchResult};

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
    /// Also run `bench/torch_reference.py` (needs python3 with torch) and print the ratio.
    #[arg(long)]
    pub torch: bool,
    /// The PyTorch script (default: bench/torch_reference.py here or in the source tree).
    #[arg(long)]
    pub torch_script: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `bench`.
pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.batch_size == 0 || a.steps == 0 {
        bail!("--batch-size and --steps must be positive");
    }
    let models = if a.models.is_empty() {
        vec![BenchModel::Reference, BenchModel::K4]
    } else {
        a.models.clone()
    };
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for &model in &models {
        let ours = bench::run(model, a.batch_size, a.warmup, a.steps)?;
        let torch = if a.torch {
            Some(torch_reference(&a, model)?)
        } else {
            None
        };
        if !a.json {
            print_row("genbackdoor", &ours, threads);
            if let Some(t) = &torch {
                print_row("pytorch", &t.result, t.threads);
                say!(
                    "  ratio genbackdoor/pytorch throughput: {:.2}",
                    t.result.median_ms / ours.median_ms
                );
            }
        }
        rows.push(serde_json::json!({
            "genbackdoor": ours,
            "threads": threads,
            "pytorch": torch.as_ref().map(|t| serde_json::json!({"result": t.result, "threads": t.threads, "version": t.version})),
            "ratio": torch.as_ref().map(|t| t.result.median_ms / ours.median_ms),
        }));
    }
    if a.json {
        say!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}

fn print_row(who: &str, r: &BenchResult, threads: usize) {
    say!(
        "{who:<12} {:<9} batch {:>3}  median {:>8.1} ms/step (min {:.1}, {} steps, {} threads)  {:>7.1} images/s  {:.2} GFLOP/step  {:>6.1} GFLOP/s",
        format!("{:?}", r.model).to_lowercase(),
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
    let out = Command::new("python3")
        .arg(&script)
        .args(["--model", &format!("{model:?}").to_lowercase()])
        .args(["--batch-size", &a.batch_size.to_string()])
        .args(["--warmup", &a.warmup.to_string()])
        .args(["--steps", &a.steps.to_string()])
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
    Ok(TorchRun {
        result: BenchResult::new(model, a.batch_size, a.steps, times, macs),
        threads: num("threads")? as usize,
        version: v["torch"].as_str().unwrap_or("?").to_string(),
    })
}
