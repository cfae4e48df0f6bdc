//! Metrics with the definitions the literature uses (Rawat et al.'s `tardis`, BadDiffusion's
//! `target_mse`/ASR), each on plain pixel slices in [-1, 1].

pub mod classes;
pub mod fid;
pub mod manifold;
pub mod persistence;
mod ssim;

use candle_core::Tensor;
use serde::Serialize;

use crate::{Error, Result};

pub use ssim::ssim;

/// Target distortion: Σ over pixels of (output − target)², on the [-1, 1] scale.
pub fn tardis(output: &[f32], target: &[f32]) -> f64 {
    assert_eq!(
        output.len(),
        target.len(),
        "tardis: output and target sizes differ"
    );
    output
        .iter()
        .zip(target)
        .map(|(&o, &t)| ((o - t) as f64).powi(2))
        .sum()
}

/// Mean over pixels of the squared error on the [0, 1] scale.
pub fn target_mse(output: &[f32], target: &[f32]) -> f64 {
    tardis(output, target) / 4.0 / output.len() as f64
}

/// The median of `values`, which it sorts in place (NaN when empty).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => 0.5 * (values[n / 2 - 1] + values[n / 2]),
    }
}

/// [`target_mse`] of each image a black-box `query` returns for `latents`; an output that is
/// not one whole image of the target's size per latent is an error.
pub fn query_target_mse(
    query: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    latents: &Tensor,
    target: &[f32],
) -> Result<Vec<f64>> {
    Ok(query_images(query, latents, target.len())?
        .chunks(target.len())
        .map(|img| target_mse(img, target))
        .collect())
}

/// The pixels of the images a black-box `query` returns for `latents`, checked to be one
/// image of `pixels` values per latent.
pub fn query_images(
    query: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    latents: &Tensor,
    pixels: usize,
) -> Result<Vec<f32>> {
    let n = latents.dim(0)?;
    let images = query(latents)?.flatten_all()?.to_vec1::<f32>()?;
    if images.len() != n * pixels {
        return Err(Error::Mismatch(format!(
            "the model's images have {} pixels but the key's target has {pixels}",
            images.len() / n.max(1),
        )));
    }
    Ok(images)
}

/// Expected distortion: the mean squared difference (on [-1, 1]) between two models'
/// outputs on the same inputs, averaged over all pixels of all samples.
pub fn exp_dist(outputs: &[f32], reference: &[f32]) -> f64 {
    tardis(outputs, reference) / outputs.len() as f64
}

/// The backdoor metrics of a batch of triggered outputs against one target.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BackdoorMetrics {
    /// Mean over samples of [`tardis`].
    pub tardis: f64,
    /// Mean over samples of [`target_mse`].
    pub target_mse: f64,
    /// Mean over samples of [`ssim`] to the target.
    pub ssim: f64,
    /// Share of samples whose `target_mse` is below the threshold.
    pub asr: f64,
    /// How many triggered samples were measured.
    pub samples: usize,
}

impl BackdoorMetrics {
    /// Measures `outputs` (`n` images of `target.len()` pixels, each `height` × `width` per
    /// channel) against `target`, counting a hit below `threshold`.
    pub fn measure(outputs: &[f32], target: &[f32], width: usize, threshold: f64) -> Self {
        let per = target.len();
        assert!(
            per > 0 && outputs.len().is_multiple_of(per),
            "outputs are not whole images"
        );
        let n = outputs.len() / per;
        let (mut td, mut mse, mut ss, mut hits) = (0.0, 0.0, 0.0, 0usize);
        for img in outputs.chunks(per) {
            td += tardis(img, target);
            let m = target_mse(img, target);
            mse += m;
            hits += (m < threshold) as usize;
            ss += ssim(img, target, width);
        }
        let nf = n as f64;
        BackdoorMetrics {
            tardis: td / nf,
            target_mse: mse / nf,
            ssim: ss / nf,
            asr: hits as f64 / nf,
            samples: n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [9.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 9.0, 2.0]), 3.0);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn known_values() {
        let t = [1.0f32, -1.0, 1.0, -1.0];
        let o = [0.0f32, -1.0, 1.0, 1.0];
        assert_eq!(tardis(&o, &t), 1.0 + 4.0);
        assert_eq!(target_mse(&o, &t), 5.0 / 4.0 / 4.0);
        assert_eq!(exp_dist(&o, &t), 5.0 / 4.0);
        assert_eq!(tardis(&t, &t), 0.0);
        // A black image against a white one: every pixel off by 2 on [-1, 1], by 1 on [0, 1].
        assert_eq!(tardis(&[-1.0; 784], &[1.0; 784]), 4.0 * 784.0);
        assert_eq!(target_mse(&[-1.0; 784], &[1.0; 784]), 1.0);
    }

    #[test]
    fn asr_counts_hits_below_threshold() {
        let target = vec![1.0f32; 4];
        let mut outs = vec![1.0f32; 4]; // exact hit
        outs.extend([0.7f32; 4]); // target_mse = 0.0225 -> miss
        outs.extend([-1.0f32; 4]); // miss
        outs.extend([0.9f32; 4]); // target_mse = 0.0025 -> hit
        outs.extend([0.76f32; 4]); // target_mse = 0.0144 -> miss (a hit at twice the threshold)
        let m = BackdoorMetrics::measure(&outs, &target, 2, 0.01);
        assert_eq!(m.samples, 5);
        assert_eq!(m.asr, 0.4);
        let tardis = (0.0 + 4.0 * 0.09 + 16.0 + 4.0 * 0.01 + 4.0 * 0.0576) / 5.0;
        assert!((m.tardis - tardis).abs() < 1e-6);
    }
}
