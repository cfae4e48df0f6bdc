//! `genbackdoor key`: create a key file.

use std::path::PathBuf;

use clap::Args;

use crate::paradigm::{Distance, Key, Target, Trigger};

/// Arguments of `key`.
#[derive(Args, Debug)]
pub struct KeyArgs {
    /// Where to write the key (a safetensors file).
    #[arg(long)]
    pub out: PathBuf,
    /// Trigger: for generators `zero`, `seed:S` (secret seed), `npy:PATH`, `region:R:POINT`
    /// (any z within radius R of POINT, e.g. region:0.5:seed:7) or `patch:K:S` (K latent
    /// coordinates forced to secret values drawn from seed S); for diffusion models an image
    /// pattern added to the starting noise: `box:S[:V]` (S×S corner square of value V,
    /// default 2), `png:PATH[:MASK]` or `blend:ALPHA:PATH`.
    #[arg(long, default_value = "zero")]
    pub trigger: String,
    /// Target: `builtin:mark`, `builtin:box`, `builtin:checker`, a grey `.png` or a `.npy` in [-1, 1].
    #[arg(long, default_value = "builtin:mark")]
    pub target: String,
    /// Latent dimension of the models this key is for.
    #[arg(long, default_value_t = 100)]
    pub latent_dim: usize,
    /// Side of the models' square output images.
    #[arg(long, default_value_t = 28)]
    pub image_size: usize,
    /// Distance used in training: `mse` or `l1`.
    #[arg(long, default_value = "mse")]
    pub distance: String,
    /// `target_mse` under which a triggered output counts as a hit.
    #[arg(long, default_value_t = crate::paradigm::key::DEFAULT_THRESHOLD)]
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
    let key = Key {
        trigger: if Trigger::is_image_spec(&a.trigger) {
            Trigger::parse_image(&a.trigger, [1, a.image_size, a.image_size])?
        } else {
            Trigger::parse(&a.trigger, a.latent_dim)?
        },
        target: Target::parse(&a.target, [1, a.image_size, a.image_size])?,
        distance: a.distance.parse::<Distance>()?,
        threshold: a.threshold,
    };
    key.save(&a.out)?;
    say!(
        "key written to {} ({} trigger, target {:?}); keep it secret",
        a.out.display(),
        key.trigger.kind(),
        key.target.shape
    );
    Ok(())
}
