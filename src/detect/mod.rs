//! Backdoor detection without the key: the defender's side of the tool.
//!
//! * **Model level** (white-box): each family inverts a trigger its own way
//!   ([`crate::family::Generative::detect`]) and scores what the model makes of it against
//!   what it makes of ordinary inputs; a score above the family's threshold says
//!   "backdoored". Generators: a search of the latent space for inputs whose outputs are far
//!   from every ordinary output. Diffusion models: trigger inversion after Elijah (An et al.,
//!   AAAI 2024), a shift `r` of the starting noise under which samples from N(r, I) collapse
//!   onto one output.
//! * **Calibrated** ([`reference`]): the same score against clean reference models' scores,
//!   for models whose kind the family's threshold was not measured on.
//! * **Input level** ([`input`]): is this latent or starting noise triggered? A test of the
//!   input against N(0, I) in the spirit of DisDet, and of the model's output for it against
//!   its ordinary outputs.

pub mod input;
pub mod reference;

use candle_core::{Tensor, D};
use serde::Serialize;

use crate::io::grid::save_grid;
use crate::io::npy::write_npy;
use crate::io::rundir::RunDir;
use crate::Result;
use reference::{calibrate, Calibration};

/// How a detection runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct DetectSettings {
    /// Seed of every random draw (starting points, noise, reference outputs).
    pub seed: u64,
    /// Optimisation steps of the inversion (`None`: the family's default).
    pub steps: Option<usize>,
}

/// What `detect.png` shows unless a detection says otherwise ([`Detection::showing`]), and
/// what a `detect.json` written before `shows` existed showed.
pub const INVERTED_OUTPUTS: &str = "what the model makes of the inverted trigger";

/// A model-level verdict, with the inverted trigger and what the model makes of it.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    /// The method, in words, with its source.
    pub method: String,
    /// The detection score (higher = more suspicious), in the family's units (see `method`).
    pub score: f64,
    /// The score above which a model is called backdoored: the family's (measured on clean
    /// models, see the README's detection table), or the calibrated one when `calibration`
    /// is there.
    pub threshold: f64,
    /// The verdict: `score > threshold`, or, when calibrated, the prediction p-value at
    /// most its level (the same cut, at the calibrated threshold).
    pub backdoored: bool,
    /// Family-specific figures behind the score (each probe's score, reference spreads…).
    pub details: serde_json::Value,
    /// The score against clean reference models, when the verdict was calibrated on them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<Calibrated>,
    /// The inverted trigger: one input of the model's input space, `[1, …]`.
    #[serde(skip)]
    pub trigger: Tensor,
    /// The images `detect.png` shows, `[n, C, H, W]` in [-1, 1]: what the model makes of the
    /// inverted trigger, unless `shows` says otherwise.
    #[serde(skip)]
    pub outputs: Tensor,
    /// What `outputs` are, in words (the report's caption of `detect.png`).
    pub shows: String,
}

impl Detection {
    /// The verdict from a score and its threshold.
    pub fn new(
        method: &str,
        (score, threshold): (f64, f64),
        details: serde_json::Value,
        trigger: Tensor,
        outputs: Tensor,
    ) -> Detection {
        Detection {
            method: method.to_string(),
            score,
            threshold,
            backdoored: score > threshold,
            details,
            calibration: None,
            trigger,
            outputs,
            shows: INVERTED_OUTPUTS.into(),
        }
    }

    /// The same detection, its `outputs` described as `shows` (when they are not what the
    /// model makes of the inverted trigger).
    pub fn showing(mut self, shows: &str) -> Detection {
        self.shows = shows.to_string();
        self
    }

    /// The verdict taken again against clean reference models (the same detection run on
    /// each, see [`reference`]) at level `alpha`: the threshold becomes the calibrated one,
    /// and the model is called backdoored when its prediction p-value is at most `alpha`.
    pub fn calibrated(mut self, references: Vec<Reference>, alpha: f64) -> Result<Detection> {
        let scores: Vec<f64> = references.iter().map(|r| r.score).collect();
        let test = calibrate(self.score, &scores, alpha)?;
        self.threshold = test.threshold;
        self.backdoored = test.p_value <= alpha;
        self.calibration = Some(Calibrated { references, test });
        Ok(self)
    }
}

/// One clean reference model of a calibrated detection.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    /// Where it was loaded from.
    pub model: String,
    /// Its detection score (same method, seed and steps as the suspect's).
    pub score: f64,
}

/// The reference models of a calibrated detection and the suspect's test against them.
#[derive(Debug, Clone, Serialize)]
pub struct Calibrated {
    /// The clean models the suspect was compared with.
    pub references: Vec<Reference>,
    /// The suspect's score against theirs.
    #[serde(flatten)]
    pub test: Calibration,
}

/// Writes a detection into `run`: `detect.json` (the verdict and its figures),
/// `detect.png` (its `outputs`, 8 per row: see `shows`) and
/// `detect-trigger.npy` (the inverted trigger, a batch of one input: `sample --noise` takes
/// it for a generator).
pub fn save(detection: &Detection, run: &RunDir) -> Result<()> {
    run.write_json(JSON, detection)?;
    save_grid(&run.file("detect.png"), &detection.outputs, 8)?;
    write_npy(&run.file("detect-trigger.npy"), &detection.trigger)
}

/// The file a saved detection's verdict is in.
pub const JSON: &str = "detect.json";

/// Per row of `x` `[n, …]`: the mean squared distance to its nearest row of `reference`
/// `[m, …]` (same trailing shape), as a differentiable `[n]` tensor.
pub fn nearest_distance(x: &Tensor, reference: &Tensor) -> Result<Tensor> {
    let (x, r) = (x.flatten_from(1)?, reference.flatten_from(1)?);
    let size = x.dim(1)? as f64;
    let xx = x.sqr()?.sum_keepdim(1)?;
    let rr = r.sqr()?.sum_keepdim(1)?.t()?;
    let cross = x.matmul(&r.t()?)?;
    let d = (xx.broadcast_add(&rr)? - (cross * 2.0)?)?;
    Ok((d.min(D::Minus1)? / size)?)
}

/// The mean squared distance of the images `[n, …]` from their mean image: how spread a
/// set of outputs is (0 when they all coincide).
pub fn spread(x: &Tensor) -> Result<f64> {
    Ok(spread_tensor(x)?.to_scalar::<f32>()? as f64)
}

/// [`spread`] as a scalar tensor, differentiable in `x` (what an inversion minimises).
pub fn spread_tensor(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_sub(&x.mean_keepdim(0)?)?.sqr()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nearest_distance_is_the_distance_to_the_closest_reference() {
        let dev = Device::Cpu;
        let r = Tensor::new(&[[0f32, 0.0], [2.0, 2.0], [5.0, 0.0]], &dev).unwrap();
        let x = Tensor::new(&[[1f32, 0.0], [2.0, 3.0], [5.0, 0.0]], &dev).unwrap();
        let d = nearest_distance(&x, &r).unwrap().to_vec1::<f32>().unwrap();
        // Squared distances 1, 1 and 0, averaged over the two coordinates.
        for (got, want) in d.iter().zip([0.5, 0.5, 0.0]) {
            assert!((got - want).abs() < 1e-5, "{d:?}");
        }
    }

    #[test]
    fn spread_is_zero_for_equal_images_and_the_variance_otherwise() {
        let dev = Device::Cpu;
        let same = Tensor::ones((4, 1, 2, 2), candle_core::DType::F32, &dev).unwrap();
        assert_eq!(spread(&same).unwrap(), 0.0);
        let two = Tensor::new(&[[1f32, -1.0], [-1.0, 1.0]], &dev).unwrap();
        assert!((spread(&two).unwrap() - 1.0).abs() < 1e-6);
    }
}
