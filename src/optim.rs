//! Adam (without weight decay) over candle variables, updated in place in one fused pass per
//! tensor. Its moments live in plain vectors, so a run can save them and resume exactly.
//!
//! candle-nn's `AdamW` computes the same update with about ten tensor operations per variable,
//! each allocating a new tensor, and keeps its state private.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};

use crate::ops::cpu::parallel_for_each;
use crate::{Error, Result};

/// Adam's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamSettings {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
}

/// Adam's state: the step count and both moments of every variable, in the order of the
/// variables given to [`Adam::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    /// Updates applied so far.
    pub step: u64,
    /// First moments.
    pub m: Vec<Vec<f32>>,
    /// Second moments.
    pub v: Vec<Vec<f32>>,
}

/// The Adam optimiser (PyTorch's `Adam` with `weight_decay = 0`).
pub struct Adam {
    vars: Vec<Var>,
    settings: AdamSettings,
    state: AdamState,
}

impl Adam {
    /// Adam over `vars` with zero moments.
    pub fn new(vars: Vec<Var>, settings: AdamSettings) -> Self {
        let zeros = |v: &Var| vec![0f32; v.elem_count()];
        let state = AdamState {
            step: 0,
            m: vars.iter().map(zeros).collect(),
            v: vars.iter().map(zeros).collect(),
        };
        Adam {
            vars,
            settings,
            state,
        }
    }

    /// Adam over `vars` with `eps = 1e-8`.
    pub fn with_betas(vars: Vec<Var>, lr: f64, beta1: f64, beta2: f64) -> Self {
        let settings = AdamSettings {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
        };
        Adam::new(vars, settings)
    }

    /// Number of variables it updates.
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether it updates no variable at all.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// Changes the learning rate (for schedules).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.settings.lr = lr;
    }

    /// Back-propagates `loss` and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// Applies one update from `grads`; variables without a gradient keep their value.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.state.step += 1;
        let s = self.settings;
        let t = self.state.step as i32;
        for ((var, m), v) in self
            .vars
            .iter()
            .zip(&mut self.state.m)
            .zip(&mut self.state.v)
        {
            if let Some(g) = grads.get(var) {
                let update = Update {
                    m: RefCell::new(m),
                    v: RefCell::new(v),
                    lr: s.lr as f32,
                    beta1: s.beta1 as f32,
                    beta2: s.beta2 as f32,
                    eps: s.eps as f32,
                    correction1: (1.0 - s.beta1.powi(t)) as f32,
                    correction2: (1.0 - s.beta2.powi(t)) as f32,
                };
                var.as_tensor().inplace_op2(&g.contiguous()?, &update)?;
            }
        }
        Ok(())
    }

    /// The current state (for checkpoints).
    pub fn state(&self) -> &AdamState {
        &self.state
    }

    /// Replaces the state by a saved one; the moments must fit the variables.
    pub fn load_state(&mut self, state: AdamState) -> Result<()> {
        let fits = |ms: &[Vec<f32>]| {
            ms.len() == self.vars.len()
                && ms
                    .iter()
                    .zip(&self.vars)
                    .all(|(m, v)| m.len() == v.elem_count())
        };
        if !fits(&state.m) || !fits(&state.v) {
            return Err(Error::Mismatch(
                "the saved optimiser state does not fit the model's parameters".into(),
            ));
        }
        self.state = state;
        Ok(())
    }
}

/// One in-place Adam update of a parameter tensor from its gradient.
struct Update<'a> {
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    correction1: f32,
    correction2: f32,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adam-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, src) else {
            candle_core::bail!("adam-update: parameters and gradients must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("adam-update: parameters and gradients must be contiguous");
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        if p.len() != g.len() || p.len() != m.len() {
            candle_core::bail!("adam-update: {} parameters, {} gradients", p.len(), g.len());
        }
        /// Values per parallel piece.
        const PIECE: usize = 1 << 14;
        let (b1, b2, lr, c1, c2, eps) = (
            self.beta1,
            self.beta2,
            self.lr,
            self.correction1,
            self.correction2,
            self.eps,
        );
        let pieces: Vec<_> = p
            .chunks_mut(PIECE)
            .zip(g.chunks(PIECE))
            .zip(m.chunks_mut(PIECE))
            .zip(v.chunks_mut(PIECE))
            .collect();
        parallel_for_each(pieces, move |(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            }
        });
        Ok(())
    }
}

/// Adds `weight` times `extra`'s gradient of each of `vars` to `grads` (a second objective's
/// gradient, taken elsewhere, joined to a step's own before the update).
pub fn add_scaled(
    grads: &mut GradStore,
    extra: &GradStore,
    vars: &[Var],
    weight: f64,
) -> Result<()> {
    for v in vars {
        if let Some(e) = extra.get(v) {
            let sum = match grads.get(v) {
                Some(g) => (g + (e * weight)?)?,
                None => (e * weight)?,
            };
            grads.insert(v, sum);
        }
    }
    Ok(())
}

/// Comparisons of tensors and gradients for the tests of modules that take gradients.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::backprop::GradStore;
    use candle_core::{Tensor, Var};

    /// The largest absolute difference between two tensors.
    fn max_gap(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .unwrap()
    }

    /// The largest absolute difference between two gradient stores over `vars` (each must
    /// hold a gradient of every one).
    pub fn gradient_gap(a: &GradStore, b: &GradStore, vars: &[Var]) -> f32 {
        vars.iter()
            .map(|v| max_gap(a.get(v).unwrap(), b.get(v).unwrap()))
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::Device;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    /// A loss with a non-trivial gradient for both variables.
    fn loss(a: &Var, b: &Var, x: &Tensor) -> Tensor {
        let y = x.matmul(a.as_tensor()).unwrap().tanh().unwrap();
        (y.sqr().unwrap().sum_all().unwrap()
            + (b.as_tensor() - 0.3)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap()
    }

    #[test]
    fn matches_candle_adamw_without_weight_decay() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        let x = rng.normal(&[6, 4], &dev).unwrap();
        let a0 = rng.normal(&[4, 3], &dev).unwrap();
        let b0 = rng.normal(&[7], &dev).unwrap();
        let fresh = || {
            (
                Var::from_tensor(&a0.copy().unwrap()).unwrap(),
                Var::from_tensor(&b0.copy().unwrap()).unwrap(),
            )
        };
        let (a1, b1) = fresh();
        let (a2, b2) = fresh();
        let s = AdamSettings {
            lr: 0.05,
            beta1: 0.5,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut ours = Adam::new(vec![a1.clone(), b1.clone()], s);
        let mut theirs = AdamW::new(
            vec![a2.clone(), b2.clone()],
            ParamsAdamW {
                lr: s.lr,
                beta1: s.beta1,
                beta2: s.beta2,
                eps: s.eps,
                weight_decay: 0.0,
            },
        )
        .unwrap();
        for _ in 0..25 {
            ours.backward_step(&loss(&a1, &b1, &x)).unwrap();
            theirs.backward_step(&loss(&a2, &b2, &x)).unwrap();
        }
        for (p, q) in [(&a1, &a2), (&b1, &b2)] {
            let d = crate::ops::testing::max_abs_diff(p.as_tensor(), q.as_tensor());
            // Same algebra, different rounding, compounded over 25 steps of a sizeable rate.
            assert!(d < 1e-4, "difference {d}");
        }
        assert_eq!(ours.state().step, 25);
        let before = loss(&a0_var(&a0), &a0_var(&b0), &x)
            .to_scalar::<f32>()
            .unwrap();
        let after = loss(&a1, &b1, &x).to_scalar::<f32>().unwrap();
        assert!(after < 0.5 * before, "{before} -> {after}");
    }

    fn a0_var(t: &Tensor) -> Var {
        Var::from_tensor(t).unwrap()
    }

    #[test]
    fn saved_state_resumes_the_same_trajectory() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(9);
        let x = rng.normal(&[5, 4], &dev).unwrap();
        let a0 = rng.normal(&[4, 2], &dev).unwrap();
        let b0 = rng.normal(&[3], &dev).unwrap();
        let s = AdamSettings {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
        };
        let (a, b) = (a0_var(&a0.copy().unwrap()), a0_var(&b0.copy().unwrap()));
        let mut straight = Adam::new(vec![a.clone(), b.clone()], s);
        for _ in 0..6 {
            straight.backward_step(&loss(&a, &b, &x)).unwrap();
        }
        let (c, d) = (a0_var(&a0.copy().unwrap()), a0_var(&b0.copy().unwrap()));
        let mut first = Adam::new(vec![c.clone(), d.clone()], s);
        for _ in 0..3 {
            first.backward_step(&loss(&c, &d, &x)).unwrap();
        }
        let mut second = Adam::new(vec![c.clone(), d.clone()], s);
        second.load_state(first.state().clone()).unwrap();
        for _ in 0..3 {
            second.backward_step(&loss(&c, &d, &x)).unwrap();
        }
        assert_eq!(
            a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            c.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let wrong = AdamState {
            step: 1,
            m: vec![vec![0.0; 3]],
            v: vec![vec![0.0; 3]],
        };
        assert!(second.load_state(wrong).is_err());
    }

    #[test]
    fn add_scaled_adds_the_weighted_gradient_and_fills_missing_ones() {
        let a = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[3f32], &Device::Cpu).unwrap();
        let mut grads = (a.as_tensor().sum_all().unwrap()).backward().unwrap();
        let extra = ((a.as_tensor() * 2.0).unwrap().sum_all().unwrap()
            + b.as_tensor().sum_all().unwrap())
        .unwrap()
        .backward()
        .unwrap();
        add_scaled(&mut grads, &extra, &[a.clone(), b.clone()], 0.5).unwrap();
        let got = |v: &Var| grads.get(v).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got(&a), vec![2.0, 2.0]);
        assert_eq!(got(&b), vec![0.5]);
    }
}
