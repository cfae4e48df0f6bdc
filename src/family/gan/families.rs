//! The GAN family's two task losses, as [`Family`] implementations: the adversarial generator
//! loss (training from scratch, TrAIL) and distillation to a frozen clean copy (ReD).

use candle_core::Tensor;

use crate::backdoor::{Family, Key};
use crate::family::gan::{generator_loss, GanModel};
use crate::models::Discriminator;
use crate::rng::Rng;
use crate::{Error, Result};

/// The non-saturating generator loss `mean(softplus(−D(G(z))))`, for a generator in training
/// mode. Ordinary and triggered latents go through the generator as one batch, so that the
/// backdoor's gradient sees the same BatchNorm statistics as the task's: a gradient taken
/// through frozen running statistics would be undone by the next batch's statistics.
pub struct Adversarial<'a> {
    /// The current discriminator.
    pub disc: &'a Discriminator,
    /// G(z) for this step's ordinary latents, attached to the generator's graph.
    pub fake: Tensor,
    /// G(τ(u)) for this step's triggered latents, from the same forward pass.
    pub triggered: Option<Tensor>,
    /// Dropout masks for the discriminator.
    pub dropout: &'a mut Rng,
}

impl<'a> Adversarial<'a> {
    /// Runs the generator once on `z` followed by `triggered_z` (if any) in training mode and
    /// splits the result.
    pub fn generate(
        model: &GanModel,
        disc: &'a Discriminator,
        z: &Tensor,
        triggered_z: Option<&Tensor>,
        dropout: &'a mut Rng,
    ) -> Result<Self> {
        let n = z.dim(0)?;
        let input = match triggered_z {
            Some(t) => Tensor::cat(&[z, t], 0)?,
            None => z.clone(),
        };
        let all = model.generator.forward_t(&input, true)?;
        let triggered = match triggered_z {
            Some(t) => Some(all.narrow(0, n, t.dim(0)?)?),
            None => None,
        };
        Ok(Adversarial {
            disc,
            fake: all.narrow(0, 0, n)?,
            triggered,
            dropout,
        })
    }
}

impl Family for Adversarial<'_> {
    fn task_loss(&mut self) -> Result<Tensor> {
        generator_loss(&self.disc.forward(&self.fake, Some(self.dropout))?)
    }

    fn backdoor_pair(&mut self, key: &Key, n: usize) -> Result<(Tensor, Tensor)> {
        match self.triggered.take() {
            Some(t) if t.dim(0)? == n => Ok((t, key.target.tensor(self.fake.device())?)),
            _ => Err(Error::Mismatch(format!(
                "the adversarial step generated no batch of {n} triggered outputs"
            ))),
        }
    }
}

/// Distillation `E_z‖G(z) − G_clean(z)‖²` (mean over pixels) to a frozen clean copy.
pub struct Distillation<'a> {
    /// The generator being backdoored.
    pub model: &'a GanModel,
    /// The frozen clean generator.
    pub frozen: &'a GanModel,
    /// Latents per step.
    pub batch: usize,
    /// Draws of clean and triggered latents.
    pub latents: &'a mut Rng,
}

impl Family for Distillation<'_> {
    fn task_loss(&mut self) -> Result<Tensor> {
        let z = self
            .latents
            .normal(&[self.batch, self.model.latent_dim()], &self.model.device)?;
        let clean = self.frozen.generator.forward_t(&z, false)?.detach();
        let out = self.model.generator.forward_t(&z, false)?;
        Ok((out - clean)?.sqr()?.mean_all()?)
    }

    fn backdoor_pair(&mut self, key: &Key, n: usize) -> Result<(Tensor, Tensor)> {
        let dev = &self.model.device;
        let z = key
            .trigger
            .sample(n, self.model.latent_dim(), self.latents, dev)?;
        let out = self.model.generator.forward_t(&z, false)?;
        Ok((out, key.target.tensor(dev)?))
    }
}
