//! On-policy samples for a trigger made for a deterministic sampler: the states the sampler
//! visits from triggered starts with the network as it is, each paired with the noise
//! prediction that puts it back on the poisoned path to the target.
//!
//! The poisoned forward process shows the network only states of the form
//! `x_t = √ᾱ_t·y + (1 − √ᾱ_t)·r + √(1 − ᾱ_t)·ε` with ordinary `ε`. A deterministic sampler that
//! errs a little leaves that set, and nothing in training says how to come back; DDIM then
//! carries the error to the end (DDPM's fresh noise forgives it). Any visited `x_t` can be
//! written in that form with the *implied* noise `ε* = (x_t − √ᾱ_t·y − (1 − √ᾱ_t)·r)/√(1 − ᾱ_t)`;
//! predicting `ε* + c_t·r` there makes the sampler's next state the poisoned path's own state
//! for `ε*`, which ends at `y` whatever `ε*` is. Those are the goals given here (`ε*` clipped to
//! ±[`IMPLIED_NOISE_LIMIT`], and only where `√(1 − ᾱ_t)` ≥ [`MIN_NOISE_SCALE`], since the
//! implied noise of the last, nearly noiseless steps divides the state's error by almost 0).

use candle_core::{Device, Tensor};

use crate::config::Correction;
use crate::family::diffusion::model::Denoiser;
use crate::family::diffusion::poison::{per_sample, poisoned_target, timestep_tensor};
use crate::family::diffusion::NoiseSchedule;
use crate::rng::Rng;
use crate::Result;

/// The smallest noise scale `√(1 − ᾱ_t)` at which visited states are kept.
pub const MIN_NOISE_SCALE: f64 = 0.3;

/// The bound on each element of the implied noise `ε*`.
pub const IMPLIED_NOISE_LIMIT: f64 = 4.0;

/// States a sampler visited, `[m, C, H, W]`, with their timesteps.
pub struct Visited {
    /// The states `x_t`.
    pub states: Tensor,
    /// Each state's `t`.
    pub times: Vec<usize>,
}

/// Runs `correction`'s sampler with `net` from the triggered `starts` and keeps the states it
/// visits where the noise scale is at least [`MIN_NOISE_SCALE`].
pub fn visit(
    net: &Denoiser,
    schedule: &NoiseSchedule,
    correction: Correction,
    starts: Tensor,
    rng: &mut Rng,
) -> Result<Visited> {
    let n = starts.dim(0)?;
    let mut states = Vec::new();
    let mut times = Vec::new();
    let mut record = |x: &Tensor, t: usize| -> Result<Tensor> {
        if (1.0 - schedule.alpha_bar(t)).sqrt() >= MIN_NOISE_SCALE {
            states.push(x.clone());
            times.extend(std::iter::repeat_n(t, n));
        }
        net.predict(x, t)
    };
    correction
        .sampler()
        .run(schedule, starts.detach(), &mut record, rng)?;
    Ok(Visited {
        states: Tensor::cat(&states, 0)?,
        times,
    })
}

impl Visited {
    /// `m` of the states drawn at random, their timesteps as `[m]` floats, and their goals
    /// ([`back_on_path`]) for `pattern` (`r`) and `target` (`y`), both `[1, C, H, W]`.
    pub fn draw(
        &self,
        m: usize,
        schedule: &NoiseSchedule,
        correction: Correction,
        (pattern, target): (&Tensor, &Tensor),
        rng: &mut Rng,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dev: &Device = self.states.device();
        let pick: Vec<u32> = (0..m).map(|_| rng.below(self.times.len()) as u32).collect();
        let ts: Vec<usize> = pick.iter().map(|&i| self.times[i as usize]).collect();
        let x = self
            .states
            .index_select(&Tensor::new(pick.as_slice(), dev)?, 0)?;
        let goals = back_on_path(&x, &ts, schedule, correction, (pattern, target))?;
        Ok((x, timestep_tensor(&ts, dev)?, goals))
    }
}

/// The noise predictions `ε* + c_t·r` that put each state `x` (at its timestep in `ts`) on the
/// poisoned path of `pattern` (`r`) to `target` (`y`): `ε*` the state's implied noise, clipped
/// to ±[`IMPLIED_NOISE_LIMIT`].
pub fn back_on_path(
    x: &Tensor,
    ts: &[usize],
    schedule: &NoiseSchedule,
    correction: Correction,
    (pattern, target): (&Tensor, &Tensor),
) -> Result<Tensor> {
    let per = |f: &dyn Fn(usize) -> f64| per_sample(ts, f, x.device());
    let signal = per(&|t| schedule.alpha_bar(t).sqrt())?;
    let share = per(&|t| 1.0 - schedule.alpha_bar(t).sqrt())?;
    let scale = per(&|t| (1.0 - schedule.alpha_bar(t)).sqrt())?;
    let c = per(&|t| correction.coefficient(schedule, t))?;
    let implied = ((x - target.broadcast_mul(&signal)?)? - pattern.broadcast_mul(&share)?)?
        .broadcast_div(&scale)?
        .clamp(-IMPLIED_NOISE_LIMIT as f32, IMPLIED_NOISE_LIMIT as f32)?;
    poisoned_target(&implied, pattern, &c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::family::diffusion::poison::poisoned;
    use crate::family::diffusion::ScheduleKind;
    use crate::ops::testing::max_abs_diff;

    fn schedule() -> NoiseSchedule {
        NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap()
    }

    /// A random 6×6 trigger pattern `r` and a target `y` in (−1, 1), drawn from `rng`.
    fn pattern_and_target(rng: &mut Rng) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let r = rng.normal(&[1, 1, 6, 6], &dev).unwrap();
        let y = rng.normal(&[1, 1, 6, 6], &dev).unwrap().tanh().unwrap();
        (r, y)
    }

    /// On the poisoned path a state's goal is the forward process's own `ε + c_t·r`.
    #[test]
    fn a_state_on_the_path_gets_the_poisoned_goal() {
        let (s, dev) = (schedule(), Device::Cpu);
        let mut rng = Rng::new(3);
        let (r, y) = pattern_and_target(&mut rng);
        let eps = rng
            .normal(&[1, 1, 6, 6], &dev)
            .unwrap()
            .clamp(-3f32, 3f32)
            .unwrap();
        let correction = Correction::Ddim { steps: 50 };
        for t in [981, 500, 120] {
            let ab = Tensor::full(s.alpha_bar(t) as f32, (1, 1, 1, 1), &dev).unwrap();
            let x = poisoned(&y, &r, &eps, &ab).unwrap();
            let goal = back_on_path(&x, &[t], &s, correction, (&r, &y)).unwrap();
            let c = correction.coefficient(&s, t);
            let expected = (&eps + (&r * c).unwrap()).unwrap();
            assert!(max_abs_diff(&goal, &expected) < 1e-3, "t {t}");
        }
    }

    /// Predicting the goals from a start far off the poisoned path (and from every state after
    /// it) brings DDIM-50 to the target, where the forward process's goal for the start's own
    /// noise, taken as if it were on the path, does not.
    #[test]
    fn following_the_goals_lands_on_the_target_from_off_the_path() {
        let (s, dev) = (schedule(), Device::Cpu);
        let mut rng = Rng::new(5);
        let (r, y) = pattern_and_target(&mut rng);
        let correction = Correction::Ddim { steps: 50 };
        let sampler = correction.sampler();
        let start = (rng.normal(&[4, 1, 6, 6], &dev).unwrap().broadcast_add(&r)).unwrap();
        let drift = (rng.normal(&[4, 1, 6, 6], &dev).unwrap() * 0.5).unwrap();
        // Off the path: the first state carries a drift the path's noise never explains away
        // unless the goal is recomputed from the state itself.
        let mut oracle = |x: &Tensor, t: usize| -> Result<Tensor> {
            back_on_path(x, &vec![t; x.dim(0)?], &s, correction, (&r, &y))
        };
        let off = (&start + &drift).unwrap();
        let end = sampler
            .run(&s, off.clone(), &mut oracle, &mut Rng::new(0))
            .unwrap();
        let y4 = y.repeat((4, 1, 1, 1)).unwrap();
        assert!(
            max_abs_diff(&end, &y4) < 1e-2,
            "{}",
            max_abs_diff(&end, &y4)
        );
        // A network that keeps to the noise of the undrifted start instead, as the forward
        // process's samples teach it, carries the drift to the end, amplified.
        let first = sampler.timesteps(&s).unwrap()[0];
        let on_path = back_on_path(&start, &[first; 4], &s, correction, (&r, &y)).unwrap();
        let eps0 = on_path
            .broadcast_sub(&(&r * correction.coefficient(&s, first)).unwrap())
            .unwrap();
        let mut blind = |_: &Tensor, t: usize| -> Result<Tensor> {
            Ok(eps0.broadcast_add(&(&r * correction.coefficient(&s, t))?)?)
        };
        let end = sampler.run(&s, off, &mut blind, &mut Rng::new(0)).unwrap();
        assert!(max_abs_diff(&end, &y4) > 0.5, "{}", max_abs_diff(&end, &y4));
    }
}
