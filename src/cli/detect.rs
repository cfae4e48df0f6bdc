//! `genbackdoor detect`: is there a backdoor in this model (white-box, no key), or is this
//! input triggered?

use std::path::{Path, PathBuf};

use clap::Args;

use crate::detect::input::test_inputs;
use crate::detect::reference::reference_scores;
use crate::detect::DetectSettings;
use crate::io::npy::read_npy;
use crate::io::rundir::RunDir;

/// Arguments of `detect`.
#[derive(Args, Debug)]
pub struct DetectArgs {
    /// The model checkpoint (or diffusers folder) to inspect, of any family.
    #[arg(long)]
    pub model: PathBuf,
    /// Test these inputs instead of the model: a NumPy file of latents `[N, D]` or starting
    /// noise `[N, C, H, W]`; one verdict per input.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Where to write detect.json, detect.png (what the model makes of the inverted trigger;
    /// for a diffusion model, the images it returns most nearly from heavy noise) and
    /// detect-trigger.npy; default: the model's folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimisation steps of the trigger inversion (default: 150 for generators, 100 for
    /// diffusion models).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Clean models of the suspect's kind (same family, input and output shapes; other
    /// seeds or data) to calibrate the verdict on, instead of the family's fixed threshold:
    /// the same detection runs on each (at least 3), and the suspect is called backdoored
    /// when a clean model would score as high with probability at most --alpha.
    #[arg(long = "reference", value_name = "CLEAN_MODEL", num_args = 1..)]
    pub references: Vec<PathBuf>,
    /// Significance level of the input-level verdicts, and of a calibrated model-level one.
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    /// Seed of the search's random draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON instead of a verdict.
    #[arg(long)]
    pub json: bool,
}

/// Runs `detect`.
pub fn run(a: DetectArgs) -> anyhow::Result<()> {
    if a.steps == Some(0) {
        anyhow::bail!("--steps must be at least 1");
    }
    if !(a.alpha > 0.0 && a.alpha < 1.0) {
        anyhow::bail!("--alpha must lie strictly between 0 and 1, not {}", a.alpha);
    }
    if a.input.is_some() && !a.references.is_empty() {
        anyhow::bail!(
            "--reference calibrates the model-level verdict; --input tests inputs against \
             the model's own outputs and takes no references"
        );
    }
    let model = crate::family::load(&a.model, &candle_core::Device::Cpu)?;
    if let Some(path) = &a.input {
        let inputs = read_npy(path)?.to_device(&model.device())?;
        model
            .input_space()
            .check_batch(&inputs, &path.display().to_string())?;
        let verdicts = test_inputs(model.as_ref(), &inputs, a.alpha, a.seed)?;
        if a.json {
            say!("{}", serde_json::to_string_pretty(&verdicts)?);
            return Ok(());
        }
        for (i, v) in verdicts.iter().enumerate() {
            let verdict = if v.triggered { "TRIGGERED" } else { "ordinary" };
            say!(
                "input {:>3}: {verdict:<9} p = {:.2e} (input statistics {:.2e}, output {:.2e})",
                i + 1,
                v.p_value,
                v.p_input,
                v.p_output
            );
        }
        return Ok(());
    }
    let settings = DetectSettings {
        seed: a.seed,
        steps: a.steps,
    };
    // The references first: a bad one fails before the suspect's detection runs.
    let references = if a.references.is_empty() {
        None
    } else {
        Some(reference_scores(model.as_ref(), &a.references, &settings)?)
    };
    let mut detection = model.detect(&settings)?;
    if let Some(references) = references {
        detection = detection.calibrated(references, a.alpha)?;
    }
    let out = a.out.clone().unwrap_or_else(|| beside(&a.model));
    crate::detect::save(&detection, &RunDir::create(&out, true)?)?;
    if a.json {
        say!("{}", serde_json::to_string_pretty(&detection)?);
        return Ok(());
    }
    let verdict = if detection.backdoored {
        "BACKDOORED"
    } else {
        "no backdoor found"
    };
    say!(
        "{}: {verdict} (score {:.2}, threshold {:.2})",
        a.model.display(),
        detection.score,
        detection.threshold
    );
    say!("  method  {}", detection.method);
    if let Some(c) = &detection.calibration {
        say!(
            "  against {} clean references: p = {:.2e} (log-normal prediction, the verdict at \
             alpha {}), rank p = {:.3} (floor 1/{})",
            c.references.len(),
            c.test.p_value,
            c.test.alpha,
            c.test.rank_p_value,
            c.references.len() + 1
        );
    }
    crate::cli::print_metrics(&detection.details);
    say!(
        "  wrote   {} ({})",
        out.join("detect.png").display(),
        detection.shows
    );
    Ok(())
}

/// The folder of a model file, or a diffusers folder itself.
fn beside(model: &Path) -> PathBuf {
    if model.is_dir() {
        return model.to_path_buf();
    }
    match model.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
