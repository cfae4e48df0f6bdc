//! Samplers: which timesteps are visited and one update `x_t → x_s` from the predicted noise.
//! The loop that joins a sampler to a network is [`Sampler::run`]; it sees the network only
//! as a function `(x_t, t) → ε̂`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::family::diffusion::NoiseSchedule;
use crate::rng::Rng;
use crate::{Error, Result};

/// DDIM's step count when none is given (`ddim`), and the end-of-run evaluation's.
pub const DDIM_STEPS: usize = 50;

/// Strided DDPM's step count in a model's default sampler (and in the one that checks a
/// DDPM-corrected backdoor): `ddpm-100`.
pub const DDPM_STRIDED_STEPS: usize = 100;

/// DPM-Solver++'s step count when none is given (`dpm++2m`), and the end-of-run evaluation's.
pub const DPM_SOLVER_STEPS: usize = 20;

/// Heun's step count when none is given (`heun`): 49 network evaluations, about DDIM-50's.
pub const HEUN_STEPS: usize = 25;

/// A sampling procedure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// DDPM ancestral sampling over every one of the T steps, posterior variance β̃_t.
    Ddpm,
    /// DDPM's ancestral sampling over `steps` evenly spaced timesteps, with the posterior
    /// variance of the step from each visited timestep to the next (DDIM with η = 1; stock
    /// diffusers' `DDPMScheduler` after `set_timesteps(steps)`): stochastic like DDPM, at the
    /// cost of an ODE sampler.
    #[serde(rename = "ddpm_strided")]
    DdpmStrided {
        /// Number of network evaluations.
        steps: usize,
    },
    /// DDIM with η = 0 (deterministic) over `steps` evenly spaced timesteps.
    Ddim {
        /// Number of network evaluations.
        steps: usize,
    },
    /// DPM-Solver++ (2M): the second-order multistep solver of the probability-flow ODE in
    /// data prediction (Lu et al. 2022; diffusers' `DPMSolverMultistepScheduler` with its
    /// defaults), over DDIM's timesteps; the first step and the last (to σ = 0) are first
    /// order.
    #[serde(rename = "dpm++2m")]
    DpmSolver2m {
        /// Number of network evaluations.
        steps: usize,
    },
    /// Heun's second-order method on the probability-flow ODE (Karras et al. 2022; diffusers'
    /// `HeunDiscreteScheduler`) over DDIM's timesteps: each step averages the noise predicted
    /// at its start and at the end of a DDIM (Euler) step, then takes that step with the
    /// average; the last step, to σ = 0, is first order. 2·steps − 1 network evaluations.
    Heun {
        /// Number of steps.
        steps: usize,
    },
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sampler::Ddpm => write!(f, "ddpm"),
            Sampler::DdpmStrided { steps } => write!(f, "ddpm-{steps}"),
            Sampler::Ddim { steps } => write!(f, "ddim-{steps}"),
            Sampler::DpmSolver2m { steps } => write!(f, "dpm++2m-{steps}"),
            Sampler::Heun { steps } => write!(f, "heun-{steps}"),
        }
    }
}

impl std::str::FromStr for Sampler {
    type Err = Error;

    /// `ddpm`, `ddpm-N`, `ddim` (50 steps), `ddim-N`, `dpm++2m` (20 steps), `dpm++2m-N`,
    /// `heun` (25 steps) or `heun-N`.
    fn from_str(s: &str) -> Result<Self> {
        let steps = |prefix: &str| {
            s.strip_prefix(prefix)
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
        };
        match s {
            "ddpm" => Ok(Sampler::Ddpm),
            "ddim" => Ok(Sampler::Ddim { steps: DDIM_STEPS }),
            "dpm++2m" => Ok(Sampler::DpmSolver2m {
                steps: DPM_SOLVER_STEPS,
            }),
            "heun" => Ok(Sampler::Heun { steps: HEUN_STEPS }),
            _ => steps("ddim-")
                .map(|steps| Sampler::Ddim { steps })
                .or_else(|| steps("ddpm-").map(|steps| Sampler::DdpmStrided { steps }))
                .or_else(|| steps("dpm++2m-").map(|steps| Sampler::DpmSolver2m { steps }))
                .or_else(|| steps("heun-").map(|steps| Sampler::Heun { steps }))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "unknown sampler '{s}': use ddpm, ddpm-N, ddim (50 steps), ddim-N, dpm++2m (20 steps), dpm++2m-N, heun (25 steps) or heun-N"
                    ))
                }),
        }
    }
}

impl Sampler {
    /// A diffusion model's default sampler (samples, grids, clean quality, and `generate`
    /// unless another is set): DDPM's ancestral step over [`DDPM_STRIDED_STEPS`] strided
    /// timesteps, or plain DDPM when the schedule has no more steps than that (the same
    /// sampler: `ddpm-T` is `ddpm`). The ODE samplers leave speckles on the small default
    /// U-Net and score worse (FID 26.3 under `ddim-50`, 14.3 under `ddpm-100`, docs/results.md).
    pub fn default_for(schedule: &NoiseSchedule) -> Sampler {
        match schedule.steps() {
            t if t <= DDPM_STRIDED_STEPS => Sampler::Ddpm,
            _ => Sampler::DdpmStrided {
                steps: DDPM_STRIDED_STEPS,
            },
        }
    }

    /// DDIM with [`DDIM_STEPS`] steps, or T when the schedule has fewer: the ODE sampler of
    /// the end-of-run evaluation and of the detector's probe.
    pub fn ddim_for(schedule: &NoiseSchedule) -> Sampler {
        Sampler::Ddim {
            steps: DDIM_STEPS.min(schedule.steps()),
        }
    }

    /// The sampler that checks (evaluates, verifies, attacks) a backdoor trained for this
    /// one: the default [`Sampler::default_for`] for DDPM, whose correction keeps the trigger's
    /// share under the strided ancestral step too and which costs a tenth of the network
    /// evaluations; every other sampler checks itself.
    pub fn checking(self, schedule: &NoiseSchedule) -> Sampler {
        match self {
            Sampler::Ddpm => Sampler::default_for(schedule),
            other => other,
        }
    }

    /// The timesteps visited, from the noisiest down to 1; after the last comes t = 0.
    pub fn timesteps(&self, schedule: &NoiseSchedule) -> Result<Vec<usize>> {
        let total = schedule.steps();
        match *self {
            Sampler::Ddpm => Ok((1..=total).rev().collect()),
            Sampler::DdpmStrided { steps }
            | Sampler::Ddim { steps }
            | Sampler::DpmSolver2m { steps }
            | Sampler::Heun { steps } => {
                if steps == 0 || steps > total {
                    return Err(Error::Config(format!(
                        "{self} needs between 1 and {total} steps, not {steps}"
                    )));
                }
                Ok((0..steps).rev().map(|i| 1 + i * total / steps).collect())
            }
        }
    }

    /// One update from `x_t` to `x_s` (`s < t`) given the predicted noise `eps`; DDPM (strided
    /// or not) draws its fresh noise from `rng` (none on the last step).
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
            Sampler::Ddpm | Sampler::DdpmStrided { .. } => {
                let (mean, var) = ddpm_posterior(schedule, x, eps, t, s)?;
                if s == 0 {
                    return Ok(mean);
                }
                let z = rng.normal(x.dims(), x.device())?;
                Ok((mean + (z * var.sqrt())?)?)
            }
            Sampler::Ddim { .. } | Sampler::DpmSolver2m { .. } | Sampler::Heun { .. } => {
                let x0 = ((x - (eps * (1.0 - ab_t).sqrt())?)? / ab_t.sqrt())?;
                Ok(((x0 * ab_s.sqrt())? + (eps * (1.0 - ab_s).sqrt())?)?)
            }
        }
    }

    /// DPM-Solver++ (2M) from `x_t` to `x_s` given the predicted noise `eps` at `t` and the
    /// previous step's data prediction and log-SNR λ = ln(√ᾱ / √(1 − ᾱ)) (`None` on the first
    /// step): the second-order (midpoint) multistep update, first order (DDIM) without a
    /// previous step and on the last step, to σ = 0. Returns `x_s` and this step's data
    /// prediction and λ, for the next.
    fn dpm_solver_2m(
        schedule: &NoiseSchedule,
        x: &Tensor,
        eps: &Tensor,
        (t, s): (usize, usize),
        previous: Option<(Tensor, f64)>,
    ) -> Result<(Tensor, (Tensor, f64))> {
        let ((a_t, sd_t), lambda_t) = (alpha_sigma(schedule, t), log_snr(schedule, t));
        let x0 = ((x - (eps * sd_t)?)? / a_t)?;
        if s == 0 {
            return Ok((x0.clone(), (x0, lambda_t)));
        }
        let (a_s, sd_s) = alpha_sigma(schedule, s);
        let h = log_snr(schedule, s) - lambda_t;
        let k = a_s * (-h).exp_m1();
        let mut next = ((x * (sd_s / sd_t))? - (&x0 * k)?)?;
        if let Some((x0_prev, lambda_prev)) = previous {
            let r0 = (lambda_t - lambda_prev) / h;
            let d1 = ((&x0 - x0_prev)? / r0)?;
            next = (next - (d1 * (0.5 * k))?)?;
        }
        Ok((next, (x0, lambda_t)))
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
        let mut previous = None;
        for (i, &t) in ts.iter().enumerate() {
            let s = ts.get(i + 1).copied().unwrap_or(0);
            let eps = predict(&x, t)?;
            x = match self {
                Sampler::DpmSolver2m { .. } => {
                    let (next, this) =
                        Self::dpm_solver_2m(schedule, &x, &eps, (t, s), previous.take())?;
                    previous = Some(this);
                    next
                }
                Sampler::Heun { .. } if s > 0 => {
                    let euler = self.update(schedule, &x, &eps, t, s, rng)?;
                    let mean = ((eps + predict(&euler, s)?)? * 0.5)?;
                    self.update(schedule, &x, &mean, t, s, rng)?
                }
                _ => self.update(schedule, &x, &eps, t, s, rng)?,
            };
        }
        Ok(x)
    }

    /// Network evaluations per image.
    pub fn evaluations(&self, schedule: &NoiseSchedule) -> Result<usize> {
        let n = self.timesteps(schedule)?.len();
        Ok(match self {
            Sampler::Heun { .. } => 2 * n - 1,
            _ => n,
        })
    }
}

/// DDPM's step from `x_t` to `x_s` (`s < t`) given the predicted noise `eps`: with the stride's
/// factor β = 1 − ᾱ_t/ᾱ_s (β_t itself when `s = t − 1`), the mean `(x_t − β/√(1 − ᾱ_t)·ε̂)/√(1 − β)`
/// and the posterior variance (1 − ᾱ_s)/(1 − ᾱ_t)·β (diffusers' `DDPMScheduler` with
/// `variance_type="fixed_small"`, no clipping, over all T steps or after `set_timesteps`).
pub fn ddpm_posterior(
    schedule: &NoiseSchedule,
    x: &Tensor,
    eps: &Tensor,
    t: usize,
    s: usize,
) -> Result<(Tensor, f64)> {
    let (ab_t, ab_s) = (schedule.alpha_bar(t), schedule.alpha_bar(s));
    let beta = match s + 1 == t {
        true => schedule.beta(t),
        false => 1.0 - ab_t / ab_s,
    };
    let mean = ((x - (eps * (beta / (1.0 - ab_t).sqrt()))?)? / (1.0 - beta).sqrt())?;
    Ok((mean, (1.0 - ab_s) / (1.0 - ab_t) * beta))
}

/// `(√ᾱ_t, √(1 − ᾱ_t))`: the signal and noise scales at `t`.
fn alpha_sigma(schedule: &NoiseSchedule, t: usize) -> (f64, f64) {
    let ab = schedule.alpha_bar(t);
    (ab.sqrt(), (1.0 - ab).sqrt())
}

/// The log signal-to-noise ratio λ_t = ln(√ᾱ_t / √(1 − ᾱ_t)).
fn log_snr(schedule: &NoiseSchedule, t: usize) -> f64 {
    let (a, sd) = alpha_sigma(schedule, t);
    a.ln() - sd.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::diffusion::ScheduleKind;

    #[test]
    fn names_round_trip_and_heun_evaluates_twice_per_step_but_the_last() {
        for (name, sampler) in [
            ("ddpm", Sampler::Ddpm),
            ("ddim", Sampler::Ddim { steps: 50 }),
            ("ddim-7", Sampler::Ddim { steps: 7 }),
            ("dpm++2m", Sampler::DpmSolver2m { steps: 20 }),
            ("heun", Sampler::Heun { steps: 25 }),
            ("heun-10", Sampler::Heun { steps: 10 }),
        ] {
            let parsed: Sampler = name.parse().unwrap();
            assert_eq!(parsed, sampler);
            assert_eq!(parsed.to_string().parse::<Sampler>().unwrap(), sampler);
        }
        for bad in ["heun-0", "heun-x", "euler", "ddim-"] {
            assert!(bad.parse::<Sampler>().is_err(), "{bad}");
        }
        let s = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
        let heun = Sampler::Heun { steps: 10 };
        assert_eq!(
            heun.timesteps(&s).unwrap(),
            Sampler::Ddim { steps: 10 }.timesteps(&s).unwrap()
        );
        assert_eq!(heun.evaluations(&s).unwrap(), 19);
        let mut calls = 0;
        let mut predict = |x: &Tensor, _: usize| {
            calls += 1;
            Ok(x.zeros_like()?)
        };
        let x = Tensor::ones(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        heun.run(&s, x, &mut predict, &mut Rng::new(0)).unwrap();
        assert_eq!(calls, 19);
        assert_eq!(Sampler::Ddpm.evaluations(&s).unwrap(), 1000);
    }

    #[test]
    fn the_default_is_strided_ddpm_and_a_ddpm_mark_is_checked_under_it() {
        let long = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
        let short = NoiseSchedule::new(ScheduleKind::default(), 40).unwrap();
        let strided = Sampler::DdpmStrided { steps: 100 };
        assert_eq!(Sampler::default_for(&long), strided);
        assert_eq!(strided.evaluations(&long).unwrap(), 100);
        // With T ≤ 100 steps, strided DDPM over all of them is DDPM itself.
        assert_eq!(Sampler::default_for(&short), Sampler::Ddpm);
        assert_eq!(Sampler::Ddpm.checking(&long), strided);
        assert_eq!(Sampler::Ddpm.checking(&short), Sampler::Ddpm);
        for own in [
            Sampler::Ddim { steps: 50 },
            Sampler::Heun { steps: 10 },
            strided,
        ] {
            assert_eq!(own.checking(&long), own, "{own}");
        }
    }
}
