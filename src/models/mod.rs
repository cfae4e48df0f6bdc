//! Network definitions. Networks know nothing of backdoors: they map inputs to outputs.

pub mod classifier;
pub mod dcgan;
pub mod dcgan_k4;
pub mod diffusers_unet;
pub mod params;

pub use dcgan::{DcganConfig, Discriminator, Generator};
pub use diffusers_unet::{DiffusersConfig, DiffusersUnet};
pub use params::Params;

use crate::{Error, Result};

/// Checks an image channel count: the models make grey (1) or RGB (3) images.
pub fn check_channels(channels: usize) -> Result<()> {
    if matches!(channels, 1 | 3) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "channels must be 1 (grey) or 3 (RGB), not {channels}"
        )))
    }
}
