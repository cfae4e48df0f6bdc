//! The one objective every backdoor is trained with:
//! `L(θ) = L_task(θ) + λ · E_u[d(f_θ(τ(u)), y*)]`.

use candle_core::Tensor;

use crate::backdoor::{Key, Trigger};
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

    /// Evaluates the objective on a family; with no key (or λ = 0) only the task term counts.
    pub fn evaluate(&self, family: &mut dyn Family, key: Option<&Key>) -> Result<Terms> {
        let task = family.task_loss()?;
        let task_value = task.to_scalar::<f32>()?;
        match key {
            Some(k) if self.lambda > 0.0 => {
                let (out, goal) = family.backdoor_pair().ok_or_else(|| {
                    Error::Mismatch(
                        "the training step made no triggered outputs for the backdoor term".into(),
                    )
                })?;
                let n = self.triggered_count(&k.trigger);
                if out.dim(0)? != n {
                    return Err(Error::Mismatch(format!(
                        "the training step made {} triggered outputs; the objective draws {n}",
                        out.dim(0)?
                    )));
                }
                let backdoor = k.distance.loss(out, goal)?;
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
    use crate::backdoor::{Distance, Target};
    use crate::rng::Rng;
    use candle_core::{Device, Var};
    use candle_nn::Optimizer;

    /// A linear "generator" f(u) = W u whose task is to stay a copy of a reference map on
    /// ordinary inputs, which never use the first coordinate (the trigger's direction).
    struct Toy {
        w: Var,
        w0: Tensor,
        rng: Rng,
    }

    /// One step of the toy: its task loss and, with a key, `n` triggered outputs and the target.
    struct ToyStep {
        task: Tensor,
        pair: Option<(Tensor, Tensor)>,
    }

    impl Toy {
        fn step(&mut self, key: Option<&Key>, n: usize) -> Result<ToyStep> {
            let dev = Device::Cpu;
            let mask = Tensor::new(&[0f32, 1.0, 1.0], &dev)?;
            let u = self.rng.normal(&[16, 3], &dev)?.broadcast_mul(&mask)?;
            let diff = (u.matmul(&self.w.as_tensor().t()?)? - u.matmul(&self.w0.t()?)?)?;
            let pair = match key {
                Some(k) => {
                    let u = k.trigger.sample(n, 3, &mut self.rng, &dev)?;
                    let out = u.matmul(&self.w.as_tensor().t()?)?.reshape((n, 1, 2, 2))?;
                    Some((out, k.target.tensor(&dev)?))
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

    #[test]
    fn the_backdoor_term_pulls_the_triggered_output_to_the_target() {
        let dev = Device::Cpu;
        let w0 = Rng::new(1).normal(&[4, 3], &dev).unwrap();
        let key = Key {
            trigger: Trigger::Point(vec![1.0, 0.0, 0.0]),
            target: Target {
                pixels: vec![1.0, -1.0, 1.0, -1.0],
                shape: [1, 2, 2],
                class: None,
            },
            distance: Distance::Mse,
            threshold: 0.01,
            sampler: None,
        };
        let mut toy = Toy {
            w: Var::from_tensor(&w0.copy().unwrap()).unwrap(),
            w0,
            rng: Rng::new(2),
        };
        let obj = Objective {
            lambda: 1.0,
            backdoor_batch: 4,
        };
        let n = obj.triggered_count(&key.trigger);
        let eval = |toy: &mut Toy, obj: &Objective| {
            obj.evaluate(&mut toy.step(Some(&key), n).unwrap(), Some(&key))
        };
        let first = eval(&mut toy, &obj).unwrap();
        assert_eq!(first.task, 0.0);
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
        // A step without triggered outputs, or with the wrong number, cannot feed a backdoor term.
        let mut without = toy.step(None, n).unwrap();
        assert!(obj.evaluate(&mut without, Some(&key)).is_err());
        assert!(obj.evaluate(&mut without, None).is_ok());
        let mut short = toy.step(Some(&key), n + 1).unwrap();
        assert!(obj.evaluate(&mut short, Some(&key)).is_err());
    }
}
