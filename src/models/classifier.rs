//! A small digit classifier (CNN) whose penultimate layer is the feature space of the
//! project's clean-quality metrics (MNIST FID, precision/recall) and whose predictions give
//! the class histogram of generated digits.

use candle_core::{Device, Module, Tensor};
use candle_nn::{linear, Linear};
use serde::{Deserialize, Serialize};

use crate::models::Params;
use crate::ops::{leaky_relu, ConvKind, ConvLayer};
use crate::{Error, Result};

/// Shape of the classifier. The defaults are the shipped network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierConfig {
    /// Side of the square grey input images; must be a multiple of 4.
    pub image_size: usize,
    /// Channels of the first convolution (doubled in the second).
    pub width: usize,
    /// Size of the penultimate (feature) layer.
    pub features: usize,
    /// Number of classes.
    pub classes: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            image_size: 28,
            width: 16,
            features: 64,
            classes: 10,
        }
    }
}

impl ClassifierConfig {
    /// Checks that the numbers describe a buildable network.
    pub fn validate(&self) -> Result<()> {
        if self.image_size == 0 || !self.image_size.is_multiple_of(4) {
            return Err(Error::Config(format!(
                "classifier image_size must be a positive multiple of 4, not {}",
                self.image_size
            )));
        }
        if self.width == 0 || self.features == 0 || self.classes < 2 {
            return Err(Error::Config(
                "classifier width and features must be positive and classes at least 2".into(),
            ));
        }
        Ok(())
    }
}

/// Two 5×5 stride-2 convolutions with ReLU, a dense feature layer with ReLU, and the logits.
pub struct Classifier {
    cfg: ClassifierConfig,
    conv1: ConvLayer,
    conv2: ConvLayer,
    fc1: Linear,
    fc2: Linear,
}

impl Classifier {
    /// Creates the classifier's variables in `params` (`conv1.weight`, `fc2.bias`, …).
    pub fn new(cfg: &ClassifierConfig, params: &Params, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let vb = params.builder(device);
        let (w, s) = (cfg.width, cfg.image_size / 4);
        Ok(Classifier {
            cfg: cfg.clone(),
            conv1: ConvLayer::new(ConvKind::Forward, 1, w, 5, 2, 2, true, vb.pp("conv1"))?,
            conv2: ConvLayer::new(ConvKind::Forward, w, 2 * w, 5, 2, 2, true, vb.pp("conv2"))?,
            fc1: linear(2 * w * s * s, cfg.features, vb.pp("fc1"))?,
            fc2: linear(cfg.features, cfg.classes, vb.pp("fc2"))?,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClassifierConfig {
        &self.cfg
    }

    /// Penultimate-layer features `[n, features]` of images `[n, 1, h, w]` in `[-1, 1]`.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let s = self.cfg.image_size;
        if (c, h, w) != (1, s, s) {
            return Err(Error::Mismatch(format!(
                "the digit classifier takes 1x{s}x{s} images, not {c}x{h}x{w}"
            )));
        }
        let x = leaky_relu(&self.conv1.forward(x)?, 0.0)?;
        let x = leaky_relu(&self.conv2.forward(&x)?, 0.0)?;
        leaky_relu(&self.fc1.forward(&x.flatten_from(1)?)?, 0.0)
    }

    /// Class logits `[n, classes]` from features.
    pub fn logits_from_features(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(features)?)
    }
}
