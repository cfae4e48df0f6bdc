//! Backdoor detection in a diffusion model, without the key: trigger inversion after Elijah
//! (An et al., "Elijah: Eliminating Backdoors Injected in Diffusion Models via Distribution
//! Shift", AAAI 2024) and its uniformity test.
//!
//! A backdoor of the poisoned forward process ([`super::poison`]) makes the network answer a
//! start x_T = ε + r with ε̂ ≈ ε + c_T·r, where a clean one answers ≈ ε + r; and samples
//! from N(r, I) collapse onto the target. Two probes invert a shift r of the starting noise
//! (Adam on r, its norm kept under √(C·H·W), one noise image's):
//!
//! * **`ddpm`** — Elijah's loss: the batch mean of ε̂(ε + r, T) pulled to ½·r (DDPM's
//!   correction at T is ρ_T ≈ √(1 − ᾱ_T)/2); the samples are drawn with DDPM.
//! * **`ode`** — for backdoors trained for a deterministic sampler, whose c_T ≈ 1 leaves no
//!   shift at T to see: the spread of [`ROLLOUT`]-step DDIM samples from N(r, I),
//!   minimised through the sampler; the samples are drawn with the model's DDIM.
//!
//! Each probe then draws [`EVAL`] fresh samples from N(r, I) and from N(0, I) under its
//! sampler; its score is the ordinary samples' spread over the inverted ones' (Elijah's
//! uniformity, with pixel distances for LPIPS). The model's score is the larger; a clean
//! model's inverted shift leaves samples about as varied as ordinary ones (score ≈ 1), a
//! backdoor's collapses them onto its target.
//!
//! Measured (README, detection table): this does **not** find genbackdoor's own backdoors
//! (0 of 9 random-stamp models and a `box:8` one detected, 10 of 10 clean models passed): the
//! network answers a stamp only when nearly all of it is there, so neither loss has a
//! gradient towards it from a random start.

use candle_core::{Tensor, Var};

use crate::detect::{spread, spread_tensor, DetectSettings, Detection};
use crate::family::diffusion::{DiffusionModel, Sampler};
use crate::optim::Adam;
use crate::rng::Rng;
use crate::Result;

/// Starting noises per inversion step.
const BATCH: usize = 8;
/// DDIM steps of the `ode` probe's differentiable sampler.
const ROLLOUT: usize = 10;
/// Fresh samples (triggered and ordinary) each probe's score is measured on.
const EVAL: usize = 16;
/// Adam's step size on the shift (Elijah's).
const LR: f64 = 0.1;
/// Default optimisation steps (Elijah's).
const STEPS: usize = 100;

/// The score above which a diffusion model is called backdoored (clean models measured at
/// 1.02–1.08; a collapse onto the target at the true stamp scores about 300).
pub const THRESHOLD: f64 = 4.0;

/// One probe's inverted shift and the figures of its uniformity test.
struct Probe {
    name: &'static str,
    sampler: Sampler,
    shift: Tensor,
    shift_norm: f32,
    outputs: Tensor,
    score: f64,
    spread: f64,
    ordinary_spread: f64,
}

/// Runs both probes on `model` (see the module's documentation).
pub fn detect(model: &DiffusionModel, settings: &DetectSettings) -> Result<Detection> {
    let steps = settings.steps.unwrap_or(STEPS);
    let mut rng = Rng::derive(settings.seed, "detect");
    let ddim = Sampler::ddim_for(&model.schedule);
    let probes = [
        probe(model, "ddpm", Sampler::Ddpm, steps, &mut rng)?,
        probe(model, "ode", ddim, steps, &mut rng)?,
    ];
    let details = serde_json::json!(probes
        .iter()
        .map(|p| (
            p.name.to_string(),
            serde_json::json!({
                "score": p.score,
                "sampler": p.sampler.to_string(),
                "spread": p.spread,
                "ordinary_spread": p.ordinary_spread,
                "shift_norm": p.shift_norm,
            })
        ))
        .collect::<serde_json::Map<_, _>>());
    let [a, b] = probes;
    let best = if a.score >= b.score { a } else { b };
    Ok(Detection::new(
        "trigger inversion after Elijah (AAAI 2024): a shift r of the starting noise under \
         which samples collapse; score = ordinary samples' spread / samples from N(r, I)'s. \
         Measured: it does not find genbackdoor's own stamp or box backdoors (README)",
        (best.score, THRESHOLD),
        details,
        best.shift,
        best.outputs,
    ))
}

/// Inverts a shift with the probe `name`'s loss, then measures its uniformity under `sampler`.
fn probe(
    model: &DiffusionModel,
    name: &'static str,
    sampler: Sampler,
    steps: usize,
    rng: &mut Rng,
) -> Result<Probe> {
    let shape = model.image_shape();
    let dims = [1, shape[0], shape[1], shape[2]];
    let size: usize = shape.iter().product();
    let radius = (size as f64).sqrt();
    let dev = &model.device;
    // Elijah's start, −U(0, 1) per pixel, without its mean (see `constrain`).
    let start: Vec<f32> = (0..size).map(|_| -rng.uniform()).collect();
    let shift = Var::from_tensor(&constrain(&Tensor::from_vec(start, &dims, dev)?, radius)?)?;
    let noise = rng.normal(&[BATCH, shape[0], shape[1], shape[2]], dev)?;
    let last = model.schedule.steps();
    let rollout = Sampler::Ddim {
        steps: ROLLOUT.min(last),
    };
    let mut adam = Adam::with_betas(vec![shift.clone()], LR, 0.9, 0.999);
    // Frozen weights: the backward passes need the shift's gradient only.
    let net = model.frozen()?;
    for _ in 0..steps {
        let x = noise.broadcast_add(shift.as_tensor())?;
        let loss = if name == "ddpm" {
            let eps = net.predict(&x, last)?.mean_keepdim(0)?;
            (eps - (shift.as_tensor() * 0.5)?)?.abs()?.mean_all()?
        } else {
            let mut predict = |x: &Tensor, t: usize| net.predict(x, t);
            spread_tensor(&rollout.run(&model.schedule, x, &mut predict, rng)?)?
        };
        adam.backward_step(&loss)?;
        shift.set(&constrain(shift.as_tensor(), radius)?)?;
    }
    let shift = shift.as_tensor().detach();
    let fresh = rng.normal(&[EVAL, shape[0], shape[1], shape[2]], dev)?;
    let outputs = model.sample(sampler, &fresh.broadcast_add(&shift)?, rng)?;
    let ordinary = model.sample(sampler, &fresh, rng)?;
    let (s, o) = (spread(&outputs)?, spread(&ordinary)?);
    Ok(Probe {
        name,
        sampler,
        shift_norm: shift.sqr()?.sum_all()?.sqrt()?.to_scalar()?,
        shift,
        outputs,
        score: o / s.max(1e-12),
        spread: s,
        ordinary_spread: o,
    })
}

/// The shift `r` without its per-channel mean and scaled down to norm `radius` when longer.
/// GroupNorm-normalised U-Nets largely ignore a uniform shift (measured: ε̂ follows one by a
/// factor 0.35 where it follows a zero-mean pattern by 0.9), so a uniform shift would meet
/// Elijah's ½·r on clean models too; and a shift longer than one noise image's would only
/// saturate the samples.
fn constrain(r: &Tensor, radius: f64) -> Result<Tensor> {
    let centred = r.broadcast_sub(&r.mean_keepdim(3)?.mean_keepdim(2)?)?;
    let norm = centred.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
    Ok(if norm > radius {
        (centred * (radius / norm))?
    } else {
        centred
    })
}
