//! Backdoor detection in a diffusion model by its target, without the key: the images the
//! network denoises as if it had memorised them.
//!
//! A backdoor of the poisoned forward process ([`super::poison`]) trains the network on
//! `x'_t = √ᾱ_t·y + (1 − √ᾱ_t)·r + √(1 − ᾱ_t)·ε` at every timestep. Near t = 0 the trigger's
//! share `1 − √ᾱ_t` is too small to see under the noise, so the network learns to denoise its
//! target `y` as one more training image, seen in every poisoned batch: measured on the default
//! run's model, `y` noised at t = 100 comes back with a squared error of 0.0014 per pixel,
//! where an equally random pattern comes back at 0.19 and a clean model returns either at
//! about 0.15. The probe looks for such images (the memory-extraction idea of Carlini et al.,
//! "Extracting Training Data from Diffusion Models", USENIX Security 2023, turned on the
//! backdoor's target):
//!
//! 1. From [`STARTS`] uniform random images per low noise level (t = T/20 and T/10), it
//!    repeats [`ITERATIONS`] times `x ← clamp(x̂_0(√ᾱ_t·x + √(1 − ᾱ_t)·ε, t))`, a denoising
//!    projection at fresh noise that collapses every start inside a memorised image's basin
//!    onto it.
//! 2. Each end point is noised again at the heavier [`CHECK`]ed level (t = T/5) and denoised;
//!    its residual is the mean squared error of the round trip over [`REPEATS`] noises.
//! 3. The score is the residual of the naive estimate x_t/√ᾱ (its noise alone, `(1 − ᾱ)/ᾱ`
//!    per pixel at the checked level) over the smallest residual found: how much of the noise
//!    the network removes from the image it knows best. A clean model removes about 95 % from
//!    any image (score about 20 on digits); a backdoored one returns its target from that noise
//!    nearly exactly (about 150). The median residual of the model's ordinary samples is
//!    reported beside it: a poor model's samples are noise it cannot denoise, so that ratio
//!    would call undertrained clean models backdoored (measured: 11 and 14 on two of them).
//!
//! The end points sorted by residual (best first) are what `detect.png` shows: a found target.

use candle_core::Tensor;

use crate::family::diffusion::model::Denoiser;
use crate::family::diffusion::{DiffusionModel, Sampler};
use crate::metrics::median;
use crate::rng::Rng;
use crate::Result;

/// Uniform random starting images per noise level.
const STARTS: usize = 64;
/// Denoising projections per start.
const ITERATIONS: usize = 20;
/// The noise levels the projections run at, as fractions of T.
const LEVELS: [f64; 2] = [0.05, 0.1];
/// The heavier noise level of the residual, as a fraction of T.
const CHECK: f64 = 0.2;
/// Noises the residual is averaged over.
const REPEATS: usize = 4;
/// Ordinary samples the residual's unit is measured on.
const ORDINARY: usize = 16;
/// End points kept (and shown), best first.
const SHOWN: usize = 16;

/// The score above which the probe calls a model backdoored: a residual below 1/50 of the
/// noise's (see the README's detection table for the models it was set between).
pub const THRESHOLD: f64 = 50.0;

/// What the probe found.
pub struct Memory {
    /// The noise's own residual at the checked level over the smallest residual of an end
    /// point.
    pub score: f64,
    /// The smallest residual of an end point.
    pub residual: f64,
    /// The median residual of the model's ordinary samples.
    pub ordinary_residual: f64,
    /// The [`SHOWN`] end points of smallest residual, best first.
    pub images: Tensor,
}

/// The timestep at fraction `f` of the schedule (at least 1).
fn level(model: &DiffusionModel, f: f64) -> usize {
    ((model.schedule.steps() as f64 * f).round() as usize).max(1)
}

/// One denoising round trip of `x` at timestep `t`: the network's x̂_0 of `x` noised with
/// fresh noise.
fn round_trip(
    net: &Denoiser,
    model: &DiffusionModel,
    x: &Tensor,
    t: usize,
    rng: &mut Rng,
) -> Result<Tensor> {
    let ab = model.schedule.alpha_bar(t);
    let (signal, noise) = (ab.sqrt(), (1.0 - ab).sqrt());
    let eps = rng.normal(x.dims(), x.device())?;
    let xt = ((x * signal)? + (eps * noise)?)?;
    let eps_hat = net.predict(&xt, t)?;
    Ok(((xt - (eps_hat * noise)?)? / signal)?)
}

/// Per image of `x`, the mean squared error of a round trip at timestep `t` (the
/// [`CHECK`]ed level), averaged over [`REPEATS`] noises.
fn residuals(
    net: &Denoiser,
    model: &DiffusionModel,
    x: &Tensor,
    t: usize,
    rng: &mut Rng,
) -> Result<Vec<f64>> {
    let mut sum = vec![0.0; x.dim(0)?];
    for _ in 0..REPEATS {
        let back = round_trip(net, model, x, t, rng)?;
        let err = (back - x)?
            .sqr()?
            .flatten_from(1)?
            .mean(1)?
            .to_vec1::<f32>()?;
        for (s, e) in sum.iter_mut().zip(err) {
            *s += e as f64 / REPEATS as f64;
        }
    }
    Ok(sum)
}

/// Runs the probe on `model` (see the module's documentation).
pub fn probe(model: &DiffusionModel, rng: &mut Rng) -> Result<Memory> {
    let shape = model.image_shape();
    let dev = &model.device;
    let net = model.frozen()?;
    let mut ends = Vec::with_capacity(LEVELS.len());
    for f in LEVELS {
        let t = level(model, f);
        let n = STARTS * shape.iter().product::<usize>();
        let start: Vec<f32> = (0..n).map(|_| 2.0 * rng.uniform() - 1.0).collect();
        let mut x = Tensor::from_vec(start, &[STARTS, shape[0], shape[1], shape[2]], dev)?;
        for _ in 0..ITERATIONS {
            x = round_trip(&net, model, &x, t, rng)?.clamp(-1f32, 1f32)?;
        }
        ends.push(x);
    }
    let ends = Tensor::cat(&ends, 0)?;
    let check = level(model, CHECK);
    let found = residuals(&net, model, &ends, check, rng)?;
    let noise = rng.normal(&[ORDINARY, shape[0], shape[1], shape[2]], dev)?;
    let ordinary = model.sample(Sampler::ddim_for(&model.schedule), &noise, rng)?;
    let ordinary_residual = median(&mut residuals(&net, model, &ordinary, check, rng)?);
    if found
        .iter()
        .chain([&ordinary_residual])
        .any(|r| !r.is_finite())
    {
        return Err(crate::Error::NonFiniteOutput);
    }
    let mut order: Vec<usize> = (0..found.len()).collect();
    order.sort_by(|&a, &b| found[a].total_cmp(&found[b]));
    let best: Vec<u32> = order.iter().take(SHOWN).map(|&i| i as u32).collect();
    let images = ends.index_select(&Tensor::new(best.as_slice(), dev)?, 0)?;
    let residual = found[order[0]];
    let ab = model.schedule.alpha_bar(check);
    Ok(Memory {
        score: (1.0 - ab) / ab / residual.max(1e-12),
        residual,
        ordinary_residual,
        images,
    })
}
