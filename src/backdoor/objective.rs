//! The one objective every backdoor is trained with:
//! `L(θ) = L_task(θ) + λ · E_u[d(f_θ(τ(u)), y*)]`.

use candle_core::Tensor;

use candle_core::Device;

use crate::backdoor::{KeySet, Trigger};
use crate::rng::Rng;
use crate::{Error, Result};

/// What a model family supplies to the objective for one training step, made by the family's
/// forward pass for that step (ordinary and triggered inputs go through the network together,
/// so that both terms see the same normalisation statistics). The trainer sees a family only
/// through this.
pub trait Family {
    /// The model's own loss for the step (adversarial, distillation, noise prediction…).
    fn task_loss(&mut self) -> Result<Tensor>;

    /// The step's `f_θ(τ(u))` for its [`Objective::triggered_count`] draws `u` of the key's
    /// trigger set, and the goal `y*` each is pulled towards: the key's target image for a
    /// generator; for a diffusion model the network's noise prediction on the poisoned
    /// forward process and its goal `ε + c_t·r`. `None` when the step made no triggered
    /// inputs (clean training).
    fn backdoor_pair(&self) -> Option<(&Tensor, &Tensor)>;

    /// Triggered outputs in [`Family::backdoor_pair`] beyond the objective's own draws: a
    /// diffusion trigger's on-policy samples (states its sampler visited), 0 for most families.
    fn extra_triggered(&self) -> usize {
        0
    }
}

/// The trade-off between the task and the backdoor.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    /// λ, the weight of the backdoor term (0 trains a clean model).
    pub lambda: f64,
    /// How many triggered inputs estimate the expectation when the trigger is a set
    /// (a single point needs only one).
    pub backdoor_batch: usize,
}

/// One evaluation of the objective.
pub struct Terms {
    /// `L_task + λ · L_backdoor`, differentiable.
    pub total: Tensor,
    /// The value of `L_task`.
    pub task: f32,
    /// The value of `L_backdoor` (`None` for a clean objective).
    pub backdoor: Option<f32>,
}

impl Objective {
    /// How many triggered inputs one evaluation draws for `trigger`.
    pub fn triggered_count(&self, trigger: &Trigger) -> usize {
        if trigger.is_set() {
            self.backdoor_batch.max(1)
        } else {
            1
        }
    }

    /// How many triggered inputs one evaluation draws for all of `key`'s marks together.
    pub fn triggered_total(&self, key: &KeySet) -> usize {
        key.marks()
            .iter()
            .map(|k| self.triggered_count(&k.trigger))
            .sum()
    }

    /// One step's triggered latents for a generator of latent dimension `dim`:
    /// [`Objective::triggered_count`] draws of each mark's trigger set from `rng`, in the
    /// key's order, with the target image each is pulled to, `[n, C, H, W]`.
    pub fn latent_batch(
        &self,
        key: &KeySet,
        dim: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let mut latents = Vec::new();
        let mut goals = Vec::new();
        for k in key.marks() {
            let n = self.triggered_count(&k.trigger);
            latents.push(k.trigger.sample(n, dim, rng, device)?);
            goals.push(k.target.tensor(device)?.repeat((n, 1, 1, 1))?);
        }
        Ok((Tensor::cat(&latents, 0)?, Tensor::cat(&goals, 0)?))
    }

    /// Evaluates the objective on a family; with no key (or λ = 0) only the task term counts.
    /// The backdoor term averages the key's distance over every mark's triggered outputs.
    pub fn evaluate(&self, family: &mut dyn Family, key: Option<&KeySet>) -> Result<Terms> {
        let task = family.task_loss()?;
        let task_value = task.to_scalar::<f32>()?;
        match key {
            Some(k) if self.lambda > 0.0 => {
                let (out, goal) = family.backdoor_pair().ok_or_else(|| {
                    Error::Mismatch(
                        "the training step made no triggered outputs for the backdoor term".into(),
                    )
                })?;
                let n = self.triggered_total(k) + family.extra_triggered();
                if out.dim(0)? != n {
                    return Err(Error::Mismatch(format!(
                        "the training step made {} triggered outputs; the objective draws {n}",
                        out.dim(0)?
                    )));
                }
                let backdoor = k.distance().loss(out, goal)?;
                let backdoor_value = backdoor.to_scalar::<f32>()?;
                Ok(Terms {
                    total: (task + (backdoor * self.lambda)?)?,
                    task: task_value,
                    backdoor: Some(backdoor_value),
                })
            }
            _ => Ok(Terms {
                total: task,
                task: task_value,
                backdoor: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::{Distance, Key, Target};
    use candle_core::Var;
    use candle_nn::Optimizer;

    /// A linear "generator" f(u) = W u whose task is to stay a copy of a reference map on
    /// ordinary inputs, which never use the first coordinate (the trigger's direction).
    struct Toy {
        w: Var,
        w0: Tensor,
        rng: Rng,
    }

    /// One step of the toy: its task loss and, with a key, the triggered outputs and goals.
    struct ToyStep {
        task: Tensor,
        pair: Option<(Tensor, Tensor)>,
    }

    impl Toy {
        fn step(&mut self, obj: &Objective, key: Option<&KeySet>) -> Result<ToyStep> {
            let dev = Device::Cpu;
            let mask = Tensor::new(&[0f32, 1.0, 1.0], &dev)?;
            let u = self.rng.normal(&[16, 3], &dev)?.broadcast_mul(&mask)?;
            let diff = (u.matmul(&self.w.as_tensor().t()?)? - u.matmul(&self.w0.t()?)?)?;
            let pair = match key {
                Some(k) => {
                    let (u, goals) = obj.latent_batch(k, 3, &mut self.rng, &dev)?;
                    let out = u.matmul(&self.w.as_tensor().t()?)?.reshape(goals.dims())?;
                    Some((out, goals))
                }
                None => None,
            };
            Ok(ToyStep {
                task: diff.sqr()?.mean_all()?,
                pair,
            })
        }
    }

    impl Family for ToyStep {
        fn task_loss(&mut self) -> Result<Tensor> {
            Ok(self.task.clone())
        }
        fn backdoor_pair(&self) -> Option<(&Tensor, &Tensor)> {
            self.pair.as_ref().map(|(o, g)| (o, g))
        }
    }

    /// A key of two marks on the trigger direction, e₁ → the target and −e₁ → its negative
    /// (a linear map can carry both).
    fn two_marks() -> KeySet {
        let mark = |sign: f32| Key {
            trigger: Trigger::Point(vec![sign, 0.0, 0.0]),
            target: Target {
                pixels: [1.0, -1.0, 1.0, -1.0].map(|p| sign * p).to_vec(),
                shape: [1, 2, 2],
                class: None,
                random_block: None,
            },
            distance: Distance::Mse,
            threshold: 0.01,
            sampler: None,
        };
        KeySet::new(vec![mark(1.0), mark(-1.0)]).unwrap()
    }

    #[test]
    fn the_backdoor_term_pulls_every_mark_to_its_target() {
        let dev = Device::Cpu;
        let w0 = Rng::new(1).normal(&[4, 3], &dev).unwrap();
        let key = two_marks();
        let mut toy = Toy {
            w: Var::from_tensor(&w0.copy().unwrap()).unwrap(),
            w0,
            rng: Rng::new(2),
        };
        let obj = Objective {
            lambda: 1.0,
            backdoor_batch: 4,
        };
        assert_eq!(
            obj.triggered_total(&key),
            2,
            "one draw of each point trigger"
        );
        let eval = |toy: &mut Toy, obj: &Objective| {
            obj.evaluate(&mut toy.step(obj, Some(&key)).unwrap(), Some(&key))
        };
        let first = eval(&mut toy, &obj).unwrap();
        assert_eq!(first.task, 0.0);
        // The total is the task plus λ times the backdoor term.
        let weighted = Objective { lambda: 2.5, ..obj };
        let mut shifted = toy.step(&obj, Some(&key)).unwrap();
        shifted.task = (shifted.task + 0.125).unwrap();
        let t = weighted.evaluate(&mut shifted, Some(&key)).unwrap();
        let total = t.total.to_scalar::<f32>().unwrap();
        let expected = t.task + 2.5 * t.backdoor.unwrap();
        assert!(
            (total - expected).abs() < 1e-5 * expected,
            "{total} vs {expected}"
        );
        let mut opt = candle_nn::SGD::new(vec![toy.w.clone()], 0.2).unwrap();
        for _ in 0..300 {
            let t = eval(&mut toy, &obj).unwrap();
            opt.backward_step(&t.total).unwrap();
        }
        let last = eval(&mut toy, &obj).unwrap();
        let (b0, b1) = (first.backdoor.unwrap(), last.backdoor.unwrap());
        assert!(b1 < b0 / 100.0, "{b0} -> {b1}");
        assert!(last.task < 1e-6, "the task is kept: {}", last.task);
        let clean = Objective {
            lambda: 0.0,
            backdoor_batch: 4,
        };
        assert!(eval(&mut toy, &clean).unwrap().backdoor.is_none());
        // Each mark's output is its own target: W·e₁ = y and W·(−e₁) = −y.
        let w = toy.w.as_tensor().to_vec2::<f32>().unwrap();
        for (row, y) in w.iter().zip([1.0f32, -1.0, 1.0, -1.0]) {
            assert!((row[0] - y).abs() < 0.01, "{w:?}");
        }
        // A step without triggered outputs, or with another number of them, cannot feed the
        // backdoor term.
        let mut without = toy.step(&obj, None).unwrap();
        assert!(obj.evaluate(&mut without, Some(&key)).is_err());
        assert!(obj.evaluate(&mut without, None).is_ok());
        let one = KeySet::one(key.first().clone());
        let mut short = toy.step(&obj, Some(&one)).unwrap();
        assert!(obj.evaluate(&mut short, Some(&key)).is_err());
    }
}
