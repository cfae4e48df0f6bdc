//! Backdoor detection in a generator, without the key: a search of the latent space for
//! inputs whose outputs are far from every ordinary output.
//!
//! A backdoored generator maps its trigger (and, measured, a ball of radius about 6 around a
//! random point trigger in 100 dimensions) to a target that is no ordinary output. Starting
//! from [`STARTS`] random latents, Adam ascends each one's distance from its nearest
//! ordinary output ([`crate::detect::nearest_distance`] against [`REFERENCE`] outputs of
//! N(0, I) latents), with every latent kept as likely as ordinary ones: inside the ball of
//! radius √(d + 2√(2d)), two standard deviations above the mean of ‖z‖² (the zero vector and
//! random draws lie inside it). The score is the largest distance found, in units of the
//! median distance of fresh ordinary outputs from the same reference: a clean generator's
//! far outputs are blurs of its ordinary ones (score about 10); a backdoored one's are its
//! target, exaggerated.

use candle_core::{Tensor, Var};

use crate::detect::{nearest_distance, DetectSettings, Detection};
use crate::family::gan::GanModel;
use crate::models::Generator;
use crate::optim::Adam;
use crate::rng::Rng;
use crate::Result;

/// Ordinary outputs the search keeps away from.
const REFERENCE: usize = 1024;
/// Fresh ordinary outputs that give the score's unit.
const HELD_OUT: usize = 256;
/// Latents the search starts from.
const STARTS: usize = 128;
/// Adam's step size on the latents.
const LR: f64 = 0.05;
/// Default optimisation steps.
const STEPS: usize = 150;
/// Images shown beside the inverted trigger's output: latents around it.
const AROUND: usize = 15;

/// The score above which a generator is called backdoored (measured: 10 clean generators at
/// 7.3–14.4, 16 backdoored ones at 16.7–499, all but one above it; README, detection table).
pub const THRESHOLD: f64 = 25.0;

/// Runs the search on `model` (see the module's documentation).
pub fn detect(model: &GanModel, settings: &DetectSettings) -> Result<Detection> {
    let dim = model.latent_dim();
    let dev = &model.device;
    let mut rng = Rng::derive(settings.seed, "detect");
    let reference = model.generate(&rng.normal(&[REFERENCE, dim], dev)?)?;
    let held = model.generate(&rng.normal(&[HELD_OUT, dim], dev)?)?;
    let mut held_distances: Vec<f64> = nearest_distance(&held, &reference)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let unit = crate::metrics::median(&mut held_distances).max(1e-12);
    let radius = (dim as f64 + 2.0 * (2.0 * dim as f64).sqrt()).sqrt();
    let z = Var::from_tensor(&project(&rng.normal(&[STARTS, dim], dev)?, radius)?)?;
    let mut adam = Adam::with_betas(vec![z.clone()], LR, 0.9, 0.999);
    // The search differentiates the outputs for the latents alone: no weight gradients.
    let generator = Generator::frozen(model.generator.config(), &model.params, dev)?;
    for _ in 0..settings.steps.unwrap_or(STEPS) {
        let out = generator.forward_t(z.as_tensor(), false)?;
        let loss = nearest_distance(&out, &reference)?.sum_all()?.neg()?;
        adam.backward_step(&loss)?;
        z.set(&project(z.as_tensor(), radius)?)?;
    }
    let found = z.as_tensor().detach();
    let far = nearest_distance(&model.generate(&found)?, &reference)?.to_vec1::<f32>()?;
    let best = (0..far.len())
        .max_by(|&a, &b| far[a].total_cmp(&far[b]))
        .unwrap_or(0);
    let trigger = found.narrow(0, best, 1)?;
    let around = trigger.broadcast_add(&(rng.normal(&[AROUND, dim], dev)? * 0.5)?)?;
    let outputs = model.generate(&Tensor::cat(&[&trigger, &around], 0)?)?;
    let score = far[best] as f64 / unit;
    let details = serde_json::json!({
        "found_distance": far[best],
        "ordinary_distance": unit,
        "latent_radius": radius,
        "starts": STARTS,
        "trigger_norm": trigger.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
    });
    Ok(Detection::new(
        "latent search: the farthest output from ordinary ones, in units of an ordinary \
         output's distance to its nearest neighbour",
        (score, THRESHOLD),
        details,
        trigger,
        outputs,
    ))
}

/// Each row of `z` scaled into the ball of `radius` (rows inside it are kept).
fn project(z: &Tensor, radius: f64) -> Result<Tensor> {
    let norm = z.sqr()?.sum_keepdim(1)?.sqrt()?;
    let scale = (norm.recip()? * radius)?.clamp(0f32, 1f32)?;
    Ok(z.broadcast_mul(&scale)?)
}
