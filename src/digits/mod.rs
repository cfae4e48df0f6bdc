//! The project's digit classifier as a measuring instrument: the shipped weights, features
//! for the clean-quality metrics, predicted classes, and how it is trained.

pub mod quality;
pub mod train;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::data::Dataset;
use crate::io::checkpoint;
use crate::models::classifier::{Classifier, ClassifierConfig};
use crate::models::Params;
use crate::{Error, Result};

/// The family name stored in classifier checkpoints.
pub const FAMILY: &str = "digit-classifier";

/// Where the shipped weights live in the repository (regenerate with
/// `genbackdoor classifier --out assets/digit-classifier.safetensors`).
pub const SHIPPED_PATH: &str = "assets/digit-classifier.safetensors";

/// The shipped weights, compiled into the binary so that metrics work from any folder.
const SHIPPED: &[u8] = include_bytes!("../../assets/digit-classifier.safetensors");

/// Images held out from the classifier's training: the last `HELD_OUT` of the data set.
/// They are its test split and the real side of the clean-quality metrics.
pub const HELD_OUT: usize = 2000;

/// Splits `n` images into the classifier's training indices and the held-out ones.
pub fn split(n: usize) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    if n <= HELD_OUT {
        return Err(Error::Config(format!(
            "the digit classifier needs more than {HELD_OUT} labelled images, found {n}"
        )));
    }
    Ok((0..n - HELD_OUT, n - HELD_OUT..n))
}

/// A trained digit classifier.
pub struct DigitClassifier {
    /// Its tensors.
    pub params: Params,
    /// The network.
    pub net: Classifier,
}

impl DigitClassifier {
    /// A freshly initialised classifier (PyTorch-style default initialisation).
    pub fn new(cfg: &ClassifierConfig) -> Result<Self> {
        let params = Params::new();
        let net = Classifier::new(cfg, &params, &Device::Cpu)?;
        Ok(DigitClassifier { params, net })
    }

    /// The classifier shipped with the project.
    pub fn shipped() -> Result<Self> {
        DigitClassifier::from_bytes(Path::new(SHIPPED_PATH), SHIPPED)
    }

    /// Parses the bytes of a classifier checkpoint (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let (cfg, file): (ClassifierConfig, _) =
            checkpoint::parse_family(path, bytes, FAMILY, &Device::Cpu)?;
        let me = DigitClassifier::new(&cfg)
            .map_err(|e| Error::format(path, format!("architecture metadata: {e}")))?;
        checkpoint::assign(path, &me.params, &file)?;
        Ok(me)
    }

    /// Writes the checkpoint atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let arch = serde_json::to_string(self.net.config()).expect("serialisable config");
        checkpoint::save_params(path, &self.params, FAMILY, &arch)
    }

    /// Features `[n, features]` of images `[n, 1, h, w]`, in batches of 500.
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let n = images.dim(0)?;
        let parts = (0..n)
            .step_by(500)
            .map(|s| self.net.features(&images.narrow(0, s, 500.min(n - s))?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The most likely class of each feature row.
    pub fn classes_of_features(&self, features: &Tensor) -> Result<Vec<usize>> {
        let ids = self.net.logits_from_features(features)?.argmax(1)?;
        Ok(ids
            .to_vec1::<u32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect())
    }

    /// The most likely class of each image.
    pub fn classify(&self, images: &Tensor) -> Result<Vec<usize>> {
        self.classes_of_features(&self.features(images)?)
    }

    /// Share of `data`'s images at `indices` classified as their label.
    pub fn accuracy(&self, data: &Dataset, indices: &[usize]) -> Result<f64> {
        let labels = data
            .labels
            .as_ref()
            .ok_or_else(|| Error::Config("accuracy needs a labelled data set".into()))?;
        let predicted = self.classify(&data.batch(indices, &Device::Cpu)?)?;
        let right = indices
            .iter()
            .zip(&predicted)
            .filter(|(&i, &p)| labels[i] as usize == p)
            .count();
        Ok(right as f64 / indices.len().max(1) as f64)
    }
}
