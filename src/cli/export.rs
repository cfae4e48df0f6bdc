//! `genbackdoor export`: write a diffusion model as a diffusers folder, for stock diffusers
//! code (`UNet2DModel.from_pretrained`, its schedulers) to load.

use std::path::PathBuf;

use candle_core::Device;
use clap::Args;

use crate::family::diffusion::diffusers::save_folder;
use crate::family::diffusion::DiffusionModel;
use crate::io::rundir::RunDir;

/// Arguments of `export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The diffusion model: a checkpoint of a diffusers network (the model.safetensors of an
    /// injection into a diffusers folder, or of a run trained with `[diffusion.diffusers]`) or
    /// a diffusers folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The diffusers folder to write: config.json, diffusion_pytorch_model.safetensors and
    /// scheduler_config.json (a DDPMScheduler of the model's noise schedule).
    #[arg(long)]
    pub out: PathBuf,
    /// Write into an existing, non-empty folder.
    #[arg(long)]
    pub force: bool,
}

/// Runs `export`.
pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let model = DiffusionModel::load(&a.model, &Device::Cpu)?;
    let dir = RunDir::create(&a.out, a.force)?;
    save_folder(&model, &dir.path)?;
    say!(
        "wrote the diffusers folder {} ({} tensors)",
        dir.path.display(),
        model.params.named().len()
    );
    Ok(())
}
