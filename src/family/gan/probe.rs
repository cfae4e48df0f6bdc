//! The cheap backdoor probe a GAN trainer logs while training.

use candle_core::Tensor;

use crate::backdoor::Key;
use crate::family::gan::GanModel;
use crate::metrics::tardis;
use crate::Result;

/// Measures `tardis` at the trigger's anchor point during training (one forward pass).
pub struct Probe {
    z: Tensor,
    target: Vec<f32>,
}

impl Probe {
    /// A probe for `key` on `model`'s latent space.
    pub fn new(key: &Key, model: &GanModel) -> Result<Probe> {
        let dim = model.latent_dim();
        let z = Tensor::from_vec(key.trigger.anchor(dim), (1, dim), &model.device)?;
        Ok(Probe {
            z,
            target: key.target.pixels.clone(),
        })
    }

    /// `tardis` of the deployed model's output at the anchor.
    pub fn tardis(&self, model: &GanModel) -> Result<f64> {
        let out = model.generate(&self.z)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(tardis(&out, &self.target))
    }
}
