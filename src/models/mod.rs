//! Network definitions. Networks know nothing of backdoors: they map inputs to outputs.

pub mod classifier;
pub mod dcgan;
pub mod dcgan_k4;
pub mod params;
pub mod unet;

pub use dcgan::{DcganConfig, Discriminator, Generator};
pub use params::Params;
pub use unet::{Unet, UnetConfig};
