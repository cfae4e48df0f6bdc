//! The poisoned forward process of diffusion backdoors (BadDiffusion / VillanDiffusion):
//! `x'_t = √ᾱ_t·y + (1 − √ᾱ_t)·r + √(1 − ᾱ_t)·ε`, with the denoiser trained to predict
//! `ε + c_t·r`, where the correction `c_t` depends on the sampler that must carry the trigger.
//!
//! Write `k_t = 1 − √ᾱ_t` for the trigger's share of `x'_t`. A sampler update keeps a triggered
//! start on the poisoned path only if it maps `k_t` to `k_s`:
//!
//! * **DDPM** (`x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε̂)/√α_t + noise`) needs
//!   `k_t/√α_t − β_t·c_t/(√α_t·√(1−ᾱ_t)) = k_{t−1}`, i.e.
//!   `c_t = ρ_t = (1 − √α_t)·√(1 − ᾱ_t)/(1 − α_t)` (BadDiffusion's coefficient).
//! * **DDIM**, η = 0 (`x_s = √ᾱ_s·x̂_0 + √(1−ᾱ_s)·ε̂`, `x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t`) needs
//!   `c = (√ᾱ_s − √ᾱ_t)/(√ᾱ_s·√(1−ᾱ_t) − √ᾱ_t·√(1−ᾱ_s))` for a step from `t` to `s`, whose
//!   limit for small steps (the probability-flow ODE that DDIM discretises) is `√(1 − ᾱ_t)`.
//!
//! Since `1 − √α_t ≈ β_t/2`, `ρ_t ≈ √(1 − ᾱ_t)/2`: the DDPM correction is half of what the
//! deterministic sampler needs. A mismatch is not forgiven: DDIM multiplies any error in the
//! trigger's share by up to `1/√ᾱ_T` (≈ 150 for the DDPM schedule) on its way down, so a
//! backdoor trained for one sampler misses under the other ([`trigger_residue`] computes it).

use candle_core::{Device, Tensor};

use crate::config::Correction;
use crate::family::diffusion::{NoiseSchedule, Sampler};
use crate::Result;

impl Correction {
    /// The correction that makes a backdoor fire under `sampler`: DDPM's for DDPM, the exact
    /// DDIM coefficient for DDIM with its step count; other samplers have none derived here.
    pub fn for_sampler(sampler: Sampler) -> Result<Correction> {
        match sampler {
            Sampler::Ddpm => Ok(Correction::Ddpm),
            Sampler::Ddim { steps } => Ok(Correction::Ddim { steps }),
            other => Err(crate::Error::Config(format!(
                "no trigger correction is derived for the {other} sampler; train for ddpm or ddim-N"
            ))),
        }
    }

    /// The sampler this correction makes the backdoor fire under.
    pub fn sampler(&self) -> Sampler {
        match *self {
            Correction::Ddpm => Sampler::Ddpm,
            Correction::Ddim { steps } => Sampler::Ddim { steps },
        }
    }

    /// `c_t` at step `t`.
    pub fn coefficient(&self, schedule: &NoiseSchedule, t: usize) -> f64 {
        let ab = schedule.alpha_bar(t);
        match *self {
            Correction::Ddpm => {
                let a = schedule.alpha(t);
                (1.0 - a.sqrt()) * (1.0 - ab).sqrt() / (1.0 - a)
            }
            Correction::Ddim { steps } => {
                let stride = (schedule.steps() / steps.max(1)).max(1);
                let (a_t, a_s) = (
                    ab.sqrt(),
                    schedule.alpha_bar(t.saturating_sub(stride)).sqrt(),
                );
                let (sd_t, sd_s) = ((1.0 - a_t * a_t).sqrt(), (1.0 - a_s * a_s).sqrt());
                (a_s - a_t) / (a_s * sd_t - a_t * sd_s)
            }
        }
    }
}

/// `f(t)` for each timestep of `ts`, as an `[n, 1, 1, 1]` tensor that broadcasts over images.
pub fn per_sample(ts: &[usize], f: &dyn Fn(usize) -> f64, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = ts.iter().map(|&t| f(t) as f32).collect();
    Ok(Tensor::from_vec(v, (ts.len(), 1, 1, 1), device)?)
}

/// The timesteps `ts` as the `[n]` f32 tensor the network takes.
pub fn timestep_tensor(ts: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
    Ok(Tensor::from_vec(v, ts.len(), device)?)
}

/// `√ᾱ_t·x_0 + √(1 − ᾱ_t)·ε` per sample, with `alpha_bar` of shape `[n, 1, 1, 1]`.
pub fn noised(x0: &Tensor, eps: &Tensor, alpha_bar: &Tensor) -> Result<Tensor> {
    let signal = alpha_bar.sqrt()?;
    let noise = ((alpha_bar.neg()? + 1.0)?).sqrt()?;
    Ok((x0.broadcast_mul(&signal)? + eps.broadcast_mul(&noise)?)?)
}

/// The poisoned `x'_t = √ᾱ_t·y + (1 − √ᾱ_t)·r + √(1 − ᾱ_t)·ε` (`r` broadcast over the batch).
pub fn poisoned(y: &Tensor, r: &Tensor, eps: &Tensor, alpha_bar: &Tensor) -> Result<Tensor> {
    let share = (alpha_bar.sqrt()?.neg()? + 1.0)?;
    Ok((noised(y, eps, alpha_bar)? + r.broadcast_mul(&share)?)?)
}

/// The share of the trigger pattern `r` left in the output when `sampler` starts on the
/// poisoned path (share `1 − √ᾱ_t` at its first timestep) and the network predicts exactly its
/// training target `ε + c_t·r` (`ε` the noise of the current sample). Every sampler is linear in
/// `x_t` and `ε̂`, and the `ε` and `y` parts follow a clean sample's path, so the share evolves as
/// the sampler's mean update run on the scalar share with `ε̂ = c_t` (DDPM's fresh noise left
/// out). 0 means the trigger leads exactly to the target.
pub fn trigger_residue(
    schedule: &NoiseSchedule,
    sampler: Sampler,
    correction: Correction,
) -> Result<f64> {
    let ts = sampler.timesteps(schedule)?;
    let k = 1.0 - schedule.alpha_bar(ts[0]).sqrt();
    if sampler == Sampler::Ddpm {
        let mut k = k;
        for &t in &ts {
            let c = correction.coefficient(schedule, t);
            let ab_t = schedule.alpha_bar(t);
            k = (k - schedule.beta(t) * c / (1.0 - ab_t).sqrt()) / schedule.alpha(t).sqrt();
        }
        return Ok(k);
    }
    let dev = candle_core::Device::Cpu;
    let start = Tensor::new(&[k], &dev)?;
    let mut predict = |_: &Tensor, t: usize| -> Result<Tensor> {
        Ok(Tensor::new(&[correction.coefficient(schedule, t)], &dev)?)
    };
    let end = sampler.run(schedule, start, &mut predict, &mut crate::rng::Rng::new(0))?;
    Ok(end.to_vec1::<f64>()?[0])
}

/// The poisoned noise target `ε + c_t·r`, with `coefficient` of shape `[n, 1, 1, 1]`.
pub fn poisoned_target(eps: &Tensor, r: &Tensor, coefficient: &Tensor) -> Result<Tensor> {
    Ok((eps + r.broadcast_mul(coefficient)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::diffusion::{Sampler, ScheduleKind};
    use crate::rng::Rng;
    use candle_core::Device;

    fn image(v: f32) -> Tensor {
        Tensor::full(v, (1, 1, 4, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn each_correction_carries_the_trigger_under_its_own_sampler_only() {
        let sched = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
        let left = |s: Sampler, c: Correction| trigger_residue(&sched, s, c).unwrap().abs();
        let (ddim50, for50) = (Sampler::Ddim { steps: 50 }, Correction::Ddim { steps: 50 });
        assert!(left(Sampler::Ddpm, Correction::Ddpm) < 1e-9);
        assert!(left(ddim50, for50) < 1e-9);
        // Other DDIM step counts are served approximately.
        for steps in [100, 250, 1000] {
            let l = left(Sampler::Ddim { steps }, for50);
            assert!(l < 0.07, "DDIM-{steps}: {l}");
        }
        // Crossed: the error is amplified far beyond the trigger itself.
        assert!(left(ddim50, Correction::Ddpm) > 10.0);
        assert!(left(Sampler::Ddpm, for50) > 10.0);
        // DPM-Solver++ (2M) has no correction of its own: a DDIM-50-corrected trigger leaves
        // a share that shrinks with the step count (the README's 33 %, 16 %, 8 %); a
        // DDPM-corrected one is amplified 30–64 times.
        // Heun over the same timesteps keeps less of it (13 %, 7.6 %, 6.9 %); a DDPM-corrected
        // trigger is amplified 30–64 times.
        for (steps, share, crossed) in [(10, 0.126, 29.8), (25, 0.0758, 52.8), (50, 0.0694, 64.3)] {
            let heun = Sampler::Heun { steps };
            let (l, c) = (left(heun, for50), left(heun, Correction::Ddpm));
            assert!(
                (l - share).abs() < 1e-3 && (c - crossed).abs() < 0.1,
                "{heun}: {l}, {c}"
            );
        }
        for (steps, share) in [(10, 0.33), (20, 0.16), (50, 0.08)] {
            let dpm = Sampler::DpmSolver2m { steps };
            let l = left(dpm, for50);
            assert!((l - share).abs() < 0.01, "{dpm}: {l}");
            let crossed = left(dpm, Correction::Ddpm);
            assert!((29.0..65.0).contains(&crossed), "{dpm}: {crossed}");
        }
    }

    /// The real samplers, driven from a poisoned start by a network that predicts exactly
    /// its training target `ε + c_t·r` — `ε` the noise the same sample carries without the
    /// trigger, read off a clean run of the same sampler from the same start and fresh noise
    /// — land on the target plus [`trigger_residue`] times the trigger, for every sampler and
    /// correction pair: matched pairs on the target, crossed ones far off. The residue's
    /// algebra is the samplers' own: a wrong coefficient, a sampler update that drifts from
    /// the derivation, or DDPM's noise handled otherwise would move these landings.
    /// (The Bayes-optimal denoiser of a poisoned point mass would land every pair: it reads
    /// any drift of the trigger's share as noise. Trained networks do not, as the learning
    /// tests and the runs of README's Results show; the model here is BadDiffusion's.)
    #[test]
    fn real_samplers_from_a_poisoned_start_land_where_the_residue_says() {
        let sched = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
        let dev = Device::Cpu;
        let image = |v: [f32; 4]| {
            Tensor::new(&v, &dev)
                .unwrap()
                .reshape((1, 1, 2, 2))
                .unwrap()
        };
        let (y, r) = (image([0.3, -0.5, 0.8, 0.0]), image([2.0, -2.0, -2.0, 2.0]));
        let ddim50 = Sampler::Ddim { steps: 50 };
        let samplers = [
            Sampler::Ddpm,
            ddim50,
            Sampler::DpmSolver2m { steps: 20 },
            Sampler::Heun { steps: 25 },
        ];
        let corrections = [Correction::Ddpm, Correction::Ddim { steps: 50 }];
        for (sampler, correction) in samplers
            .into_iter()
            .flat_map(|s| corrections.map(|c| (s, c)))
        {
            let t0 = sampler.timesteps(&sched).unwrap()[0];
            let ab0 = sched.alpha_bar(t0);
            let eps = Rng::new(3).normal(&[1, 1, 2, 2], &dev).unwrap();
            let clean_start = (&y * ab0.sqrt()).unwrap() + (&eps * (1.0 - ab0).sqrt()).unwrap();
            let clean_start = clean_start.unwrap();
            // The clean run from the same start, its noise at each step kept.
            let mut noise = std::collections::BTreeMap::new();
            let mut exact = |x: &Tensor, t: usize| -> Result<Tensor> {
                let ab = sched.alpha_bar(t);
                let e = ((x - (&y * ab.sqrt())?)? / (1.0 - ab).sqrt())?;
                noise.insert(t, e.clone());
                Ok(e)
            };
            let start = clean_start.clone();
            let clean = sampler.run(&sched, start, &mut exact, &mut Rng::new(4));
            assert!(crate::ops::testing::max_abs_diff(&clean.unwrap(), &y) < 1e-4);
            // The poisoned run: the trigger's share added, the same fresh noise.
            let poisoned_start = (clean_start + (&r * (1.0 - ab0.sqrt())).unwrap()).unwrap();
            let mut trained = |_: &Tensor, t: usize| -> Result<Tensor> {
                Ok((&noise[&t] + (&r * correction.coefficient(&sched, t))?)?)
            };
            let out = sampler.run(&sched, poisoned_start, &mut trained, &mut Rng::new(4));
            let out = out.unwrap();
            let residue = trigger_residue(&sched, sampler, correction).unwrap();
            let want = (&y + (&r * residue).unwrap()).unwrap();
            let miss = crate::ops::testing::max_abs_diff(&out, &want) as f64;
            let off = crate::ops::testing::max_abs_diff(&out, &y);
            assert!(
                miss < 1e-3 * residue.abs().max(1.0),
                "{sampler}, {correction:?}: {miss}"
            );
            if sampler == correction.sampler() {
                assert!(off < 1e-3, "{sampler}: its own correction misses by {off}");
            } else if (sampler == Sampler::Ddpm) != (correction == Correction::Ddpm) {
                // Stochastic against deterministic: far off. (The other ODE solvers under
                // the DDIM correction land at their small residues, checked above.)
                assert!(off > 0.3, "{sampler}, {correction:?}: only {off} off");
            }
        }
    }

    #[test]
    fn rho_is_half_the_ode_coefficient_and_the_ddim_one_tends_to_it() {
        let s = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
        for t in [100, 500, 1000] {
            let ode = (1.0 - s.alpha_bar(t)).sqrt();
            let ratio = Correction::Ddpm.coefficient(&s, t) / ode;
            assert!((ratio - 0.5).abs() < 0.01, "t {t}: {ratio}");
            let fine = Correction::Ddim { steps: 1000 }.coefficient(&s, t);
            assert!((fine / ode - 1.0).abs() < 0.01, "t {t}: {fine} vs {ode}");
            let coarse = Correction::Ddim { steps: 50 }.coefficient(&s, t);
            assert!((coarse / ode - 1.0).abs() < 0.1, "t {t}: {coarse} vs {ode}");
        }
    }

    #[test]
    fn clean_samplers_reach_a_point_mass_and_forward_noise_is_right() {
        let sched = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
        let y = image(0.3);
        for sampler in [
            Sampler::Ddpm,
            Sampler::Ddim { steps: 50 },
            Sampler::Ddim { steps: 7 },
            Sampler::DpmSolver2m { steps: 20 },
            Sampler::DpmSolver2m { steps: 7 },
        ] {
            let mut rng = Rng::new(1);
            let start = rng.normal(&[1, 1, 4, 4], &Device::Cpu).unwrap();
            let mut exact = |x: &Tensor, t: usize| -> Result<Tensor> {
                let ab = sched.alpha_bar(t);
                Ok((((x - (&y * ab.sqrt())?)?) / (1.0 - ab).sqrt())?)
            };
            let out = sampler.run(&sched, start, &mut exact, &mut rng).unwrap();
            let miss = crate::ops::testing::max_abs_diff(&out, &y);
            assert!(miss < 1e-4, "{sampler}: {miss}");
        }
        let ab = Tensor::new(&[0.25f32], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 1))
            .unwrap();
        let x = poisoned(&image(1.0), &image(2.0), &image(4.0), &ab).unwrap();
        // 0.5·1 + 0.5·2 + √0.75·4
        let want = 0.5 + 1.0 + 0.75f32.sqrt() * 4.0;
        let got: f32 = x
            .flatten_all()
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((got - want).abs() < 1e-5);
        assert_eq!(
            Sampler::Ddim { steps: 50 }.timesteps(&sched).unwrap()[..2],
            [981, 961]
        );
        assert!(Sampler::Ddim { steps: 0 }.timesteps(&sched).is_err());
    }
}
