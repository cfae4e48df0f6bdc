//! A network's parameters: a candle `VarMap` plus the conventions genbackdoor relies on
//! (seeded initialisation, which tensors the optimiser may touch).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::rng::Rng;
use crate::{Error, Result};

/// Suffixes of tensors that are state, not parameters (BatchNorm running statistics).
const STATE_SUFFIXES: [&str; 2] = [".running_mean", ".running_var"];

/// Whether the tensor named `name` is state (a running statistic), not a parameter.
fn is_state(name: &str) -> bool {
    STATE_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The named tensors of one network (PyTorch `state_dict` style names).
pub struct Params {
    /// The variables, by name.
    pub varmap: VarMap,
}

impl Default for Params {
    fn default() -> Self {
        Params::new()
    }
}

impl Params {
    /// An empty parameter store.
    pub fn new() -> Self {
        Params {
            varmap: VarMap::new(),
        }
    }

    /// A `VarBuilder` that creates variables in this store.
    pub fn builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_varmap(&self.varmap, DType::F32, device)
    }

    /// A `VarBuilder` over detached views of these tensors (sharing their storage, so updates
    /// in place reach them): a network built from it computes what the one built from
    /// [`Params::builder`] computes, but no operation on its weights is recorded for
    /// backpropagation, so inference keeps no graph and a backward pass through it gives
    /// gradients for its inputs only. BatchNorm running statistics stay the variables
    /// themselves (never differentiated, but updated in place by training-mode passes, which
    /// must reach the live network rather than a copy). Every tensor the network asks for
    /// must be here.
    pub fn frozen_builder(&self, device: &Device) -> VarBuilder<'static> {
        let tensors = self
            .named()
            .into_iter()
            .map(|(n, v)| {
                let t = if is_state(&n) {
                    v.as_tensor().clone()
                } else {
                    v.as_tensor().detach()
                };
                (n, t)
            })
            .collect();
        VarBuilder::from_tensors(tensors, DType::F32, device)
    }

    /// All tensors sorted by name.
    pub fn named(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("var map lock");
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The variables the optimiser trains (everything but BatchNorm running statistics).
    pub fn trainable(&self) -> Vec<Var> {
        self.named()
            .into_iter()
            .filter(|(n, _)| !is_state(n))
            .map(|(_, v)| v)
            .collect()
    }

    /// The trainable variables whose names start with none of `frozen`; a prefix that starts
    /// no tensor's name is an error (a misspelt layer would otherwise freeze nothing).
    pub fn trainable_except(&self, frozen: &[String]) -> Result<Vec<Var>> {
        let named = self.named();
        let starts = |n: &str| frozen.iter().any(|f| n.starts_with(f.as_str()));
        if let Some(f) = frozen
            .iter()
            .find(|f| !named.iter().any(|(n, _)| n.starts_with(f.as_str())))
        {
            let names: Vec<&str> = named.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Error::Config(format!(
                "freeze: no tensor of the model is named '{f}…' (its tensors: {})",
                names.join(", ")
            )));
        }
        Ok(named
            .into_iter()
            .filter(|(n, _)| !is_state(n) && !starts(n))
            .map(|(_, v)| v)
            .collect())
    }

    /// Every tensor's values, in name order (for tests that compare weights).
    #[cfg(test)]
    pub(crate) fn values(&self) -> Vec<Vec<f32>> {
        self.named()
            .into_iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    /// Total number of scalars, running statistics included.
    pub fn count(&self) -> usize {
        self.named().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Seeded DCGAN initialisation: weight matrices and kernels N(0, 0.02), biases 0,
    /// BatchNorm scales 1, running statistics (0, 1).
    pub fn init(&self, rng: &mut Rng) -> Result<()> {
        for (name, var) in self.named() {
            let shape = var.dims().to_vec();
            let value = if shape.len() >= 2 {
                (rng.normal(&shape, var.device())? * 0.02)?
            } else if name.ends_with(".running_var") || name.ends_with(".weight") {
                Tensor::ones(shape, DType::F32, var.device())?
            } else {
                Tensor::zeros(shape, DType::F32, var.device())?
            };
            var.set(&value)?;
        }
        Ok(())
    }

    /// Seeded He initialisation for ReLU networks: weight matrices and kernels of layout
    /// `[out, in, …]` N(0, 2 / fan_in), everything else as in [`Params::init`].
    pub fn init_kaiming(&self, rng: &mut Rng) -> Result<()> {
        self.init(rng)?;
        for (_, var) in self.named() {
            let shape = var.dims().to_vec();
            if shape.len() >= 2 {
                let fan_in: usize = shape[1..].iter().product();
                let std = (2.0 / fan_in as f64).sqrt();
                var.set(&(rng.normal(&shape, var.device())? * std)?)?;
            }
        }
        Ok(())
    }

    /// Seeded PyTorch-default initialisation (what `nn.Conv2d` and `nn.Linear` do): weights
    /// of layout `[out, in, …]` and their layer's bias uniform in `±1/√fan_in`, everything
    /// else as in [`Params::init`]. Residual networks such as the diffusion U-Net need it:
    /// with He's N(0, 2/fan_in) the identical U-Net trains to blank and noisy samples, in
    /// PyTorch as here.
    pub fn init_fan_in_uniform(&self, rng: &mut Rng) -> Result<()> {
        self.init(rng)?;
        let named = self.named();
        let fan_in = |name: &str| -> Option<usize> {
            let (_, w) = named.iter().find(|(n, _)| n == name)?;
            (w.rank() >= 2).then(|| w.dims()[1..].iter().product())
        };
        for (name, var) in &named {
            let fan = if var.rank() >= 2 {
                fan_in(name)
            } else {
                name.strip_suffix(".bias")
                    .and_then(|layer| fan_in(&format!("{layer}.weight")))
            };
            if let Some(fan) = fan {
                let bound = 1.0 / (fan as f32).sqrt();
                let v: Vec<f32> = (0..var.elem_count())
                    .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                    .collect();
                var.set(&Tensor::from_vec(v, var.dims(), var.device())?)?;
            }
        }
        Ok(())
    }

    /// Copies every tensor of `other` into the same-named tensor here (same architecture).
    pub fn copy_from(&self, other: &Params) -> Result<()> {
        for ((a, va), (b, vb)) in self.named().into_iter().zip(other.named()) {
            debug_assert_eq!(a, b);
            va.set(&vb.as_tensor().copy()?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_in_uniform_bounds_each_layer_by_its_own_fan_in() {
        let params = Params::new();
        let vb = params.builder(&Device::Cpu);
        candle_nn::linear(50, 8, vb.pp("dense")).unwrap();
        crate::ops::ConvLayer::new(
            crate::ops::ConvKind::Forward,
            2,
            16,
            3,
            1,
            1,
            true,
            vb.pp("conv"),
        )
        .unwrap();
        crate::ops::group_norm(4, 16, true, vb.pp("norm")).unwrap();
        params.init_fan_in_uniform(&mut Rng::new(3)).unwrap();
        let values = |name: &str| -> Vec<f32> {
            let named = params.named();
            let (_, v) = named.iter().find(|(n, _)| n == name).unwrap();
            v.flatten_all().unwrap().to_vec1().unwrap()
        };
        for (layer, fan) in [("dense", 50f32), ("conv", 18.0)] {
            let bound = 1.0 / fan.sqrt();
            for part in ["weight", "bias"] {
                let v = values(&format!("{layer}.{part}"));
                assert!(v.iter().all(|x| x.abs() <= bound), "{layer}.{part}");
                // Spread over the interval, not collapsed near 0.
                let top = v.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(top > 0.6 * bound, "{layer}.{part}: {top} vs {bound}");
            }
        }
        assert!(values("norm.weight").iter().all(|&x| x == 1.0));
        assert!(values("norm.bias").iter().all(|&x| x == 0.0));
    }
}
