//! `genbackdoor report`: one self-contained HTML page for a run directory.

use std::path::PathBuf;

use clap::Args;

/// Arguments of `report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The run directory (of train or inject; attack curves in it are included).
    pub run_dir: PathBuf,
}

/// Runs `report`.
pub fn run(a: ReportArgs) -> anyhow::Result<()> {
    let path = crate::report::write_report(&a.run_dir)?;
    say!("wrote {}", path.display());
    Ok(())
}
