//! Fine-tuning-aware injection for TrAIL and ReD: the generator rehearses a thief's clean
//! fine-tuning and is pulled to keep its backdoor at the rehearsed weights (a first-order
//! version of "keep the backdoor loss low after simulated fine-tuning": the gradient taken at
//! the rehearsed weights is applied at the current ones, as first-order MAML does). The
//! gradient is taken as TrAIL trains, triggered latents in one training-mode batch with
//! ordinary ones, for ReD too (whose own steps run the generator in inference mode).
//!
//! The rehearsal copies what hurts a stolen generator most: a fresh Adam, and a discriminator
//! that has never seen the model (a freshly initialised one, not trained during the rehearsal),
//! whose first gradients move every weight by about the learning rate.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::backdoor::Distance;
use crate::config::{RehearsalConfig, TrainConfig};
use crate::family::gan::{generator_loss, GanModel};
use crate::models::{Discriminator, Params};
use crate::optim::{add_scaled, Adam};
use crate::rng::Rng;
use crate::Result;

/// What a rehearsal needs besides the model.
pub struct Rehearsal<'a> {
    /// How long and how hard to fine-tune.
    pub settings: &'a RehearsalConfig,
    /// Ordinary latents per rehearsed step.
    pub batch: usize,
    /// The step's triggered latents and the target images they are pulled to.
    pub triggered: (&'a Tensor, &'a Tensor),
    /// The key's distance.
    pub distance: Distance,
}

impl Rehearsal<'_> {
    /// Adds `weight` times the backdoor term's gradient at the rehearsed weights (see
    /// [`Rehearsal::backdoor_gradient`]) to the step's gradients `grads` of `vars`.
    pub fn add_backdoor_gradient(
        &self,
        model: &GanModel,
        rng: &mut Rng,
        grads: &mut GradStore,
        vars: &[Var],
        weight: f64,
    ) -> Result<()> {
        add_scaled(grads, &self.backdoor_gradient(model, rng)?, vars, weight)
    }

    /// Fine-tunes `model` cleanly for `settings.steps` steps, takes the gradient of the
    /// backdoor term there (triggered latents in one training-mode batch with ordinary ones,
    /// as in training) and puts every tensor of the model back as it was, BatchNorm running
    /// statistics included. Draws from `rng` only.
    pub fn backdoor_gradient(&self, model: &GanModel, rng: &mut Rng) -> Result<GradStore> {
        let saved = model.duplicate(&model.device)?;
        let gradient = self.rehearse(model, rng);
        model.params.copy_from(&saved.params)?;
        gradient
    }

    /// The rehearsal itself, leaving the model at the rehearsed weights.
    fn rehearse(&self, model: &GanModel, rng: &mut Rng) -> Result<GradStore> {
        let dev = &model.device;
        let dim = model.latent_dim();
        // A fresh discriminator of the shape the generator's config gives: its variables,
        // made in `dparams` and initialised, then the frozen view the thief's steps run through.
        let dparams = Params::new();
        Discriminator::new(model.generator.config(), &dparams, dev)?;
        dparams.init(rng)?;
        // (The thief's steps train the generator alone: D's weights need no gradient.)
        let disc = Discriminator::frozen(model.generator.config(), &dparams, dev)?;
        let s = self.settings;
        // A thief's Adam (its β), at the rehearsal's rate.
        let thief = TrainConfig::thief();
        let mut opt = Adam::with_betas(model.params.trainable(), s.lr, thief.beta1, thief.beta2);
        for _ in 0..s.steps {
            let z = rng.normal(&[self.batch, dim], dev)?;
            let fake = model.generator.forward_t(&z, true)?;
            opt.backward_step(&generator_loss(&disc.forward(&fake, Some(rng))?)?)?;
        }
        let (zt, goals) = self.triggered;
        let z = rng.normal(&[self.batch, dim], dev)?;
        let out = model
            .generator
            .forward_t(&Tensor::cat(&[&z, zt], 0)?, true)?
            .narrow(0, self.batch, zt.dim(0)?)?;
        Ok(self.distance.loss(&out, goals)?.backward()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::Target;

    fn tiny() -> (GanModel, crate::models::DcganConfig) {
        let cfg = crate::models::DcganConfig {
            latent_dim: 8,
            g_width: 16,
            d_width: 4,
            ..Default::default()
        };
        let model = GanModel::new(&cfg, &mut Rng::new(1), &candle_core::Device::Cpu).unwrap();
        (model, cfg)
    }

    #[test]
    fn a_rehearsal_leaves_the_model_as_it_was_and_gives_a_backdoor_gradient() {
        let (model, cfg) = tiny();
        let dev = &model.device;
        let zt = Rng::new(2).normal(&[2, 8], dev).unwrap();
        let goal = Target::builtin("mark", cfg.image_shape())
            .unwrap()
            .tensor(dev)
            .unwrap()
            .repeat((2, 1, 1, 1))
            .unwrap();
        let settings = RehearsalConfig {
            every: 1,
            steps: 3,
            ..Default::default()
        };
        crate::family::check_rehearsal(&model.params, settings, |s| {
            Rehearsal {
                settings: s,
                batch: 4,
                triggered: (&zt, &goal),
                distance: Distance::Mse,
            }
            .backdoor_gradient(&model, &mut Rng::new(3))
            .unwrap()
        });
    }
}
