//! `genbackdoor key`: create a key file.

use std::path::PathBuf;

use clap::Args;

use crate::backdoor::{KeyRecipe, Trigger};
use crate::family::InputSpace;

/// Arguments of `key`.
#[derive(Args, Debug)]
pub struct KeyArgs {
    /// Where to write the key (a safetensors file).
    #[arg(long)]
    pub out: PathBuf,
    /// Trigger. `random` (default): a secret random draw from the operating system's
    /// randomness, the kind verification's p-value is exact for (a N(0, I) latent for
    /// generators; with `--model` of a diffusion model, an 8×8 random stamp). For
    /// generators also `seed:S` (a N(0, I) latent from secret seed S), `zero`, `npy:PATH`,
    /// `region:R:POINT` (any z within radius R of POINT, e.g. region:0.5:seed:7) or
    /// `patch:K:S` (K latent coordinates forced to secret values drawn from seed S); for
    /// diffusion models an image pattern added to the starting noise: `stamp:S[:SEED]` (an
    /// S×S square of random ±2 values at a random place; `stamp:S:A:one[:SEED]` for values
    /// ±A of one random sign per channel, `stamp:S:A:mixed[:SEED]` for ±A of random signs),
    /// `box:S[:V]` (S×S corner square of
    /// value V, default 2), `png:PATH[:MASK]` or `blend:ALPHA:PATH`. `zero` and `box` are
    /// hand-chosen, for comparison with the literature: verification warns about them.
    #[arg(long, default_value = "random")]
    pub trigger: String,
    /// How many triggers the key holds, each drawn anew from `--trigger` (which must then
    /// draw at random, e.g. `random` or `stamp:S`) and all sent to the target; `verify`
    /// combines their tests, so that five triggers can prove ownership at p ≈ 1e-10.
    #[arg(long, default_value_t = 1)]
    pub triggers: usize,
    /// Diffusion models: the sampler each trigger is trained to fire under, in turn
    /// (comma-separated `ddpm`, `ddim-N`), e.g. `--triggers 2 --samplers ddpm,ddim-50`;
    /// default: the training run's correction.
    #[arg(long, value_delimiter = ',')]
    pub samplers: Vec<String>,
    /// A model checkpoint the key is for: its input space and image shape replace
    /// `--latent-dim` and `--image-size`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Target: `builtin:mark`, `builtin:box`, `builtin:checker`, `random` (a secret random
    /// pattern of 2×2 squares of ±1, whose signs `verify` tests directly: p far below the
    /// rank test's floor; `random:B` for B×B squares, `random:B:S` from secret seed S), a
    /// `.png` (read grey or RGB as the model's images are) or a `.npy` in [-1, 1].
    #[arg(long, default_value = "builtin:mark")]
    pub target: String,
    /// Latent dimension of the models this key is for.
    #[arg(long, default_value_t = 100)]
    pub latent_dim: usize,
    /// Side of the models' square output images (without --model).
    #[arg(long, default_value_t = 28)]
    pub image_size: usize,
    /// Channels of the models' images, 1 (grey) or 3 (RGB) (without --model).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Distance used in training: `mse` or `l1`.
    #[arg(long, default_value = "mse")]
    pub distance: String,
    /// `target_mse` under which a triggered output counts as a hit.
    #[arg(long, default_value_t = crate::config::DEFAULT_THRESHOLD)]
    pub threshold: f64,
    /// Overwrite an existing key file.
    #[arg(long)]
    pub force: bool,
}

/// Runs `key`.
pub fn run(a: KeyArgs) -> anyhow::Result<()> {
    if a.out.exists() && !a.force {
        anyhow::bail!(
            "{} already exists; pass --force to overwrite it (the old key would be lost)",
            a.out.display()
        );
    }
    if !(a.threshold > 0.0 && a.threshold.is_finite()) {
        anyhow::bail!("--threshold must be positive");
    }
    let (space, shape) = match &a.model {
        Some(p) => crate::family::space_of(p)?,
        None => {
            crate::models::check_channels(a.channels)?;
            let shape = [a.channels, a.image_size, a.image_size];
            let space = if Trigger::is_image_spec(&a.trigger) {
                InputSpace::Noise { shape }
            } else {
                InputSpace::Latent { dim: a.latent_dim }
            };
            (space, shape)
        }
    };
    let key = KeyRecipe {
        trigger: &a.trigger,
        triggers: a.triggers,
        samplers: &a.samplers,
        target: &a.target,
        distance: &a.distance,
        threshold: a.threshold,
    }
    .draw(space, shape)?;
    key.save(&a.out)?;
    say!(
        "key written to {} ({} {} trigger{}, target {:?}); keep it secret",
        a.out.display(),
        a.triggers,
        key.first().trigger.kind(),
        if a.triggers == 1 { "" } else { "s" },
        key.first().target.shape
    );
    Ok(())
}
