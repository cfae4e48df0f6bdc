//! Fine-tuning-aware training for diffusion backdoors (`[diffusion.rehearsal]`): every so
//! often the model rehearses a thief's continued clean denoising training (a fresh Adam on
//! clean batches, from a copy of its weights), and that step's update also follows the
//! backdoor term's gradient taken at the rehearsed weights — first-order, as the generators'
//! rehearsal of [`crate::family::gan::rehearsal`] — so that the mark holds where a thief's
//! training moves the model.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

use crate::backdoor::{Distance, Family};
use crate::config::RehearsalConfig;
use crate::data::Dataset;
use crate::family::diffusion::train::{Denoising, Poison};
use crate::family::diffusion::DiffusionModel;
use crate::optim::Adam;
use crate::rng::Rng;
use crate::{Error, Result};

/// What a rehearsal needs besides the model.
pub struct Rehearsal<'a> {
    /// How long and how hard to fine-tune.
    pub settings: &'a RehearsalConfig,
    /// Clean images per rehearsed step (the thief's batch).
    pub batch: usize,
    /// The clean images the thief trains on.
    pub data: &'a Dataset,
    /// The key's distance.
    pub distance: Distance,
}

impl Rehearsal<'_> {
    /// Fine-tunes `model` cleanly for `settings.steps` steps, takes the gradient of the
    /// backdoor term there (fresh poisoned samples of every mark in `poisons`, as a training
    /// step draws them) and puts every tensor of the model back as it was. Draws from `rng`
    /// only.
    pub fn backdoor_gradient(
        &self,
        model: &DiffusionModel,
        poisons: &[Poison],
        rng: &mut Rng,
    ) -> Result<GradStore> {
        let saved = model.duplicate()?;
        let gradient = self.rehearse(model, poisons, rng);
        model.params.copy_from(&saved.params)?;
        gradient
    }

    /// The rehearsal itself, leaving the model at the rehearsed weights.
    fn rehearse(
        &self,
        model: &DiffusionModel,
        poisons: &[Poison],
        rng: &mut Rng,
    ) -> Result<GradStore> {
        let dev = &model.device;
        // The thief's Adam (the β of genbackdoor's own diffusion training), fresh.
        let mut opt = Adam::with_betas(model.params.trainable(), self.settings.lr, 0.9, 0.999);
        for _ in 0..self.settings.steps {
            let x0 = self.clean_batch(self.batch, rng, dev)?;
            opt.backward_step(&Denoising::prepare(model, &x0, &[], rng)?.task_loss()?)?;
        }
        // One clean image rides along (the network's batch needs one); only the poisoned
        // samples' term is differentiated.
        let x0 = self.clean_batch(1, rng, dev)?;
        let step = Denoising::prepare(model, &x0, poisons, rng)?;
        let (out, goal) = step.backdoor_pair().ok_or_else(|| {
            Error::Mismatch("a rehearsal needs the step's poisoned samples".into())
        })?;
        Ok(self.distance.loss(out, goal)?.backward()?)
    }

    /// `n` training images drawn at random.
    fn clean_batch(&self, n: usize, rng: &mut Rng, dev: &Device) -> Result<Tensor> {
        let idx: Vec<usize> = (0..n).map(|_| rng.below(self.data.len)).collect();
        self.data.batch(&idx, dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::{Target, Trigger};
    use crate::family::diffusion::Correction;

    #[test]
    fn a_rehearsal_leaves_the_model_as_it_was_and_gives_a_backdoor_gradient() {
        let dev = Device::Cpu;
        let arch = crate::family::diffusion::tiny_arch(50);
        let model = DiffusionModel::new(&arch, &mut Rng::new(0), &dev).unwrap();
        let bytes: Vec<u8> = (0..16 * 64).map(|i| (i * 37 % 256) as u8).collect();
        let data = Dataset::from_bytes(16, [1, 8, 8], &bytes);
        let pattern = Trigger::parse_image("box:3", [1, 8, 8])
            .unwrap()
            .pattern(&dev)
            .unwrap()
            .unwrap();
        let target = Target::builtin("mark", [1, 8, 8])
            .unwrap()
            .tensor(&dev)
            .unwrap()
            .repeat((2, 1, 1, 1))
            .unwrap();
        let poisons = [Poison {
            pattern: &pattern,
            targets: target,
            correction: Correction::Ddpm,
        }];
        let settings = RehearsalConfig {
            every: 1,
            steps: 3,
            lr: 1e-2,
            ..Default::default()
        };
        crate::family::check_rehearsal(&model.params, settings, |s| {
            Rehearsal {
                settings: s,
                batch: 4,
                data: &data,
                distance: Distance::Mse,
            }
            .backdoor_gradient(&model, &poisons, &mut Rng::new(3))
            .unwrap()
        });
    }
}
