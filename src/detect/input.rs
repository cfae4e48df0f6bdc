//! Input-level detection: is this latent or starting noise triggered?
//!
//! Two tests per input, combined by Bonferroni:
//!
//! * **the input itself** against N(0, I), in the spirit of DisDet (a cheap statistical test
//!   of the input noise): its sum of squares against χ²ₙ (two-sided, Wilson–Hilferty's normal
//!   approximation) and its sum against N(0, n), Bonferroni-combined. A trigger that shifts
//!   the starting noise (a stamp adds 4·S² to the expected sum of squares) or a hand-chosen
//!   latent (the zero vector) fails it; a random point trigger is an ordinary draw and passes.
//! * **what the model makes of it** (white-box, no key): the distance of its output from
//!   the nearest of the model's ordinary outputs, ranked among the same distances of fresh
//!   ordinary outputs (an exact rank p-value): a trigger's target is no ordinary output.

use candle_core::Tensor;
use serde::Serialize;

use crate::detect::nearest_distance;
use crate::family::Generative;
use crate::rng::Rng;
use crate::Result;

/// The verdict on one input.
#[derive(Debug, Clone, Serialize)]
pub struct InputVerdict {
    /// p-value of the input's own statistics under N(0, I).
    pub p_input: f64,
    /// Rank p-value of its output's distance from the model's ordinary outputs.
    pub p_output: f64,
    /// The two combined (Bonferroni): `min(1, 2·min(p_input, p_output))`.
    pub p_value: f64,
    /// Its output's mean squared distance from the nearest ordinary output.
    pub output_distance: f64,
    /// `p_value ≤ alpha`.
    pub triggered: bool,
}

/// Tests each row of `inputs` (a batch of the model's inputs) at level `alpha`; `seed` draws
/// the ordinary inputs the outputs are compared with (fewer for models that take many
/// network evaluations per image, e.g. a sampler's 50 steps).
pub fn test_inputs(
    model: &dyn Generative,
    inputs: &Tensor,
    alpha: f64,
    seed: u64,
) -> Result<Vec<InputVerdict>> {
    let space = model.input_space();
    space.check_batch(inputs, "the input")?;
    let (reference, held) = if model.evaluations_per_image() > 1 {
        (256, 199)
    } else {
        (1024, 999)
    };
    let mut rng = Rng::derive(seed, "detect-input");
    let dev = model.device();
    let ordinary = model.generate(&space.ordinary(reference, &mut rng, &dev)?, &mut rng)?;
    let fresh = model.generate(&space.ordinary(held, &mut rng, &dev)?, &mut rng)?;
    let null = nearest_distance(&fresh, &ordinary)?.to_vec1::<f32>()?;
    let outputs = model.generate(inputs, &mut rng)?;
    let distances = nearest_distance(&outputs, &ordinary)?.to_vec1::<f32>()?;
    let rows = inputs.flatten_from(1)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(distances)
        .map(|(x, d)| {
            let p_input = noise_p_value(x);
            let above = null.iter().filter(|&&n| n >= d).count();
            let p_output = (1 + above) as f64 / (null.len() + 1) as f64;
            let p_value = (2.0 * p_input.min(p_output)).min(1.0);
            InputVerdict {
                p_input,
                p_output,
                p_value,
                output_distance: d as f64,
                triggered: p_value <= alpha,
            }
        })
        .collect())
}

/// Two-sided p-value that `x` is a draw of N(0, I): its sum of squares against χ²ₙ and its
/// sum against N(0, n), the smaller doubled.
pub fn noise_p_value(x: &[f32]) -> f64 {
    let n = x.len() as f64;
    let squares: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    // Wilson–Hilferty: (χ²ₙ/n)^(1/3) is close to normal with mean 1 − 2/(9n).
    let var = 2.0 / (9.0 * n);
    let z_squares = ((squares / n).cbrt() - (1.0 - var)) / var.sqrt();
    let z_sum = sum / n.sqrt();
    let two_sided = |z: f64| libm::erfc(z.abs() / std::f64::consts::SQRT_2);
    (2.0 * two_sided(z_squares).min(two_sided(z_sum))).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_noise_passes_and_shifted_or_zero_inputs_fail() {
        let mut rng = Rng::new(3);
        // Under N(0, I) the p-value is about uniform: few of 200 draws fall under 0.01.
        let low = (0..200)
            .filter(|_| noise_p_value(&rng.normal_vec(784)) < 0.01)
            .count();
        assert!(low <= 6, "{low} of 200 ordinary draws rejected at 0.01");
        // An 8×8 stamp of ±2 on 28×28 noise (the default diffusion trigger).
        let mut x = rng.normal_vec(784);
        for (i, v) in x
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 28 < 8 && i / 28 < 8)
        {
            *v += if i % 2 == 0 { 2.0 } else { -2.0 };
        }
        assert!(noise_p_value(&x) < 1e-6, "{}", noise_p_value(&x));
        // The zero latent and a latent scaled by 1.5.
        assert!(noise_p_value(&[0.0; 100]) < 1e-12);
        let big: Vec<f32> = rng.normal_vec(100).iter().map(|v| v * 1.5).collect();
        assert!(noise_p_value(&big) < 1e-4, "{}", noise_p_value(&big));
    }
}
