//! `genbackdoor classifier`: (re)train the digit classifier behind the clean-quality metrics.

use std::path::PathBuf;

use clap::Args;

use crate::data::load_dataset;
use crate::digits::train::{train_classifier, ClassifierTraining};

/// Arguments of `classifier`.
#[derive(Args, Debug)]
pub struct ClassifierArgs {
    /// Labelled data (an IDX pair); the last 2000 images are held out for testing.
    #[arg(long, default_value = crate::data::BUNDLED_MNIST)]
    pub data: PathBuf,
    /// Where to write the weights (the shipped ones live at assets/digit-classifier.safetensors;
    /// rebuild the binary after overwriting them).
    #[arg(long, default_value = crate::digits::SHIPPED_PATH)]
    pub out: PathBuf,
    /// Seed of the initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Adam steps of 64 images.
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `classifier`: trains, writes the weights and `<out>.json` with the accuracies.
pub fn run(a: ClassifierArgs) -> anyhow::Result<()> {
    if a.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    let data = load_dataset(&a.data)?;
    let settings = ClassifierTraining {
        seed: a.seed,
        steps: a.steps,
        ..ClassifierTraining::default()
    };
    let (clf, report) = train_classifier(&data, &settings)?;
    clf.save(&a.out)?;
    let v = serde_json::to_value(&report)?;
    let text = serde_json::to_string_pretty(&v)?;
    crate::io::atomic::write_atomic(&a.out.with_extension("json"), text.as_bytes())?;
    if a.json {
        say!("{text}");
    } else {
        super::print_metrics(&v);
        say!("wrote {}", a.out.display());
    }
    Ok(())
}
