//! Samplers: which timesteps are visited and one update `x_t → x_s` from the predicted noise.
//! The loop that joins a sampler to a network is [`Sampler::run`]; it sees the network only
//! as a function `(x_t, t) → ε̂`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::family::diffusion::NoiseSchedule;
use crate::rng::Rng;
use crate::{Error, Result};

/// A sampling procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// DDPM ancestral sampling over every one of the T steps, posterior variance β̃_t.
    Ddpm,
    /// DDIM with η = 0 (deterministic) over `steps` evenly spaced timesteps.
    Ddim {
        /// Number of network evaluations.
        steps: usize,
    },
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sampler::Ddpm => write!(f, "ddpm"),
            Sampler::Ddim { steps } => write!(f, "ddim-{steps}"),
        }
    }
}

impl std::str::FromStr for Sampler {
    type Err = Error;

    /// `ddpm`, `ddim` (50 steps) or `ddim-N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ddpm" => Ok(Sampler::Ddpm),
            "ddim" => Ok(Sampler::Ddim { steps: 50 }),
            _ => s
                .strip_prefix("ddim-")
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .map(|steps| Sampler::Ddim { steps })
                .ok_or_else(|| {
                    Error::Config(format!(
                        "unknown sampler '{s}': use ddpm, ddim (50 steps) or ddim-N"
                    ))
                }),
        }
    }
}

impl Sampler {
    /// A diffusion model's default sampler (samples, grids, clean quality, and `generate`
    /// unless another is set): DDIM with 50 steps, or T when the schedule has fewer.
    pub fn default_for(schedule: &NoiseSchedule) -> Sampler {
        Sampler::Ddim {
            steps: 50.min(schedule.steps()),
        }
    }

    /// The timesteps visited, from the noisiest down to 1; after the last comes t = 0.
    pub fn timesteps(&self, schedule: &NoiseSchedule) -> Result<Vec<usize>> {
        let total = schedule.steps();
        match *self {
            Sampler::Ddpm => Ok((1..=total).rev().collect()),
            Sampler::Ddim { steps } => {
                if steps == 0 || steps > total {
                    return Err(Error::Config(format!(
                        "DDIM needs between 1 and {total} steps, not {steps}"
                    )));
                }
                Ok((0..steps).rev().map(|i| 1 + i * total / steps).collect())
            }
        }
    }

    /// One update from `x_t` to `x_s` (`s < t`) given the predicted noise `eps`; DDPM draws its
    /// fresh noise from `rng` (none on the last step).
    pub fn update(
        &self,
        schedule: &NoiseSchedule,
        x: &Tensor,
        eps: &Tensor,
        t: usize,
        s: usize,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let (ab_t, ab_s) = (schedule.alpha_bar(t), schedule.alpha_bar(s));
        match self {
            Sampler::Ddpm => {
                let (beta, alpha) = (schedule.beta(t), schedule.alpha(t));
                let mean = ((x - (eps * (beta / (1.0 - ab_t).sqrt()))?)? / alpha.sqrt())?;
                if s == 0 {
                    return Ok(mean);
                }
                let var = (1.0 - ab_s) / (1.0 - ab_t) * beta;
                let z = rng.normal(x.dims(), x.device())?;
                Ok((mean + (z * var.sqrt())?)?)
            }
            Sampler::Ddim { .. } => {
                let x0 = ((x - (eps * (1.0 - ab_t).sqrt())?)? / ab_t.sqrt())?;
                Ok(((x0 * ab_s.sqrt())? + (eps * (1.0 - ab_s).sqrt())?)?)
            }
        }
    }

    /// Runs the sampler from `x_t` at the schedule's last step down to an image, asking
    /// `predict(x_t, t)` for the noise at each visited step.
    pub fn run(
        &self,
        schedule: &NoiseSchedule,
        start: Tensor,
        predict: &mut dyn FnMut(&Tensor, usize) -> Result<Tensor>,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let ts = self.timesteps(schedule)?;
        let mut x = start;
        for (i, &t) in ts.iter().enumerate() {
            let s = ts.get(i + 1).copied().unwrap_or(0);
            let eps = predict(&x, t)?;
            x = self.update(schedule, &x, &eps, t, s, rng)?;
        }
        Ok(x)
    }
}
