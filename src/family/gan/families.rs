//! The GAN family's two task losses, as [`Family`] implementations: the adversarial generator
//! loss (training from scratch, TrAIL) and distillation to a frozen clean copy (ReD).

use candle_core::Tensor;

use crate::backdoor::Family;
use crate::family::gan::{generator_loss, GanModel};
use crate::models::Discriminator;
use crate::rng::Rng;
use crate::Result;

/// The non-saturating generator loss `mean(softplus(−D(G(z))))`, for a generator in training
/// mode. Ordinary and triggered latents go through the generator as one batch, so that the
/// backdoor's gradient sees the same BatchNorm statistics as the task's: a gradient taken
/// through frozen running statistics would be undone by the next batch's statistics.
pub struct Adversarial<'a> {
    /// The current discriminator.
    pub disc: &'a Discriminator,
    /// G(z) for this step's ordinary latents, attached to the generator's graph.
    pub fake: Tensor,
    /// G(τ(u)) for this step's triggered latents, from the same forward pass, and the
    /// target image.
    pub triggered: Option<(Tensor, Tensor)>,
    /// Dropout masks for the discriminator.
    pub dropout: &'a mut Rng,
}

impl<'a> Adversarial<'a> {
    /// Runs the generator once on `z` followed by the triggered latents (if any, with the
    /// target images they are pulled to) in training mode and splits the result.
    pub fn generate(
        model: &GanModel,
        disc: &'a Discriminator,
        z: &Tensor,
        triggered: Option<(&Tensor, &Tensor)>,
        dropout: &'a mut Rng,
    ) -> Result<Self> {
        let n = z.dim(0)?;
        let input = match triggered {
            Some((t, _)) => Tensor::cat(&[z, t], 0)?,
            None => z.clone(),
        };
        let all = model.generator.forward_t(&input, true)?;
        let triggered = match triggered {
            Some((t, goals)) => Some((all.narrow(0, n, t.dim(0)?)?, goals.clone())),
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

    fn backdoor_pair(&self) -> Option<(&Tensor, &Tensor)> {
        self.triggered.as_ref().map(|(out, goal)| (out, goal))
    }
}

/// Distillation `E_z‖G(z) − G_clean(z)‖²` (mean over pixels) to a frozen clean copy.
pub struct Distillation {
    /// G(z) for this step's latents.
    out: Tensor,
    /// G_clean(z), detached.
    clean: Tensor,
    /// G(τ(u)) for this step's triggered latents, and their target images.
    triggered: Option<(Tensor, Tensor)>,
}

impl Distillation {
    /// Runs `model` and the frozen clean generator `frozen` on the latents `z`, then (with a
    /// key) `model` on the step's triggered latents, paired with their target images.
    pub fn generate(
        model: &GanModel,
        frozen: &GanModel,
        z: &Tensor,
        triggered: Option<(&Tensor, &Tensor)>,
    ) -> Result<Self> {
        let clean = frozen.generator.forward_t(z, false)?.detach();
        let out = model.generator.forward_t(z, false)?;
        let triggered = match triggered {
            Some((zt, goals)) => Some((model.generator.forward_t(zt, false)?, goals.clone())),
            None => None,
        };
        Ok(Distillation {
            out,
            clean,
            triggered,
        })
    }
}

impl Family for Distillation {
    fn task_loss(&mut self) -> Result<Tensor> {
        Ok((&self.out - &self.clean)?.sqr()?.mean_all()?)
    }

    fn backdoor_pair(&self) -> Option<(&Tensor, &Tensor)> {
        self.triggered.as_ref().map(|(out, goal)| (out, goal))
    }
}
