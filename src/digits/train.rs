//! Training the digit classifier deterministically from a seed on the labelled data set's
//! training split, and measuring it on the held-out split.

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::data::{Batcher, Dataset};
use crate::digits::{split, DigitClassifier};
use crate::models::classifier::ClassifierConfig;
use crate::optim::Adam;
use crate::rng::Rng;
use crate::{Error, Result};

/// How the classifier is trained.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifierTraining {
    /// Seed of the initialisation and the batch order.
    pub seed: u64,
    /// Adam steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
}

impl Default for ClassifierTraining {
    fn default() -> Self {
        ClassifierTraining {
            seed: 0,
            steps: 1500,
            batch_size: 64,
            lr: 1e-3,
        }
    }
}

/// The trained classifier's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifierReport {
    /// The settings it was trained with.
    pub training: ClassifierTraining,
    /// Images in the training split.
    pub train_images: usize,
    /// Images in the held-out split.
    pub test_images: usize,
    /// Accuracy on the training split.
    pub train_accuracy: f64,
    /// Accuracy on the held-out split.
    pub test_accuracy: f64,
}

/// Trains a classifier on `data`'s training split and measures it on the held-out split.
pub fn train_classifier(
    data: &Dataset,
    settings: &ClassifierTraining,
) -> Result<(DigitClassifier, ClassifierReport)> {
    let labels = data.labels.as_ref().ok_or_else(|| {
        Error::Config("training the digit classifier needs a data set with labels".into())
    })?;
    if data.height != data.width || data.channels != 1 {
        return Err(Error::Mismatch(format!(
            "the digit classifier takes square grey images, not {}",
            crate::data::shape_words(data.shape())
        )));
    }
    let (train, test) = split(data.len)?;
    let cfg = ClassifierConfig {
        image_size: data.height,
        ..ClassifierConfig::default()
    };
    let clf = DigitClassifier::new(&cfg)?;
    clf.params
        .init_kaiming(&mut Rng::derive(settings.seed, "classifier-init"))?;
    let mut opt = Adam::with_betas(clf.params.trainable(), settings.lr, 0.9, 0.999);
    let mut batches = Batcher::new(
        train.len(),
        settings.batch_size,
        Rng::derive(settings.seed, "classifier-batches"),
    );
    for step in 1..=settings.steps {
        let idx: Vec<usize> = batches
            .next_batch()
            .iter()
            .map(|&i| train.start + i)
            .collect();
        let x = data.batch(&idx, &Device::Cpu)?;
        let y: Vec<u32> = idx.iter().map(|&i| labels[i] as u32).collect();
        let y = Tensor::new(y.as_slice(), &Device::Cpu)?;
        let logits = clf.net.logits_from_features(&clf.net.features(&x)?)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            return Err(Error::NonFinite {
                what: "classifier loss".into(),
                value: l,
                step,
            });
        }
        opt.backward_step(&loss)?;
    }
    let train_idx: Vec<usize> = train.clone().collect();
    let test_idx: Vec<usize> = test.clone().collect();
    let report = ClassifierReport {
        training: settings.clone(),
        train_images: train.len(),
        test_images: test.len(),
        train_accuracy: clf.accuracy(data, &train_idx)?,
        test_accuracy: clf.accuracy(data, &test_idx)?,
    };
    Ok((clf, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_is_deterministic_in_its_seed() {
        let data = crate::data::load_dataset(&crate::data::bundled_path()).unwrap();
        let short = |seed| ClassifierTraining {
            seed,
            steps: 20,
            ..ClassifierTraining::default()
        };
        let weights = |clf: &DigitClassifier| clf.params.values();
        let (a, ra) = train_classifier(&data, &short(0)).unwrap();
        let (b, rb) = train_classifier(&data, &short(0)).unwrap();
        assert_eq!(weights(&a), weights(&b));
        assert_eq!(ra.test_accuracy, rb.test_accuracy);
        let (c, _) = train_classifier(&data, &short(1)).unwrap();
        assert_ne!(weights(&a), weights(&c));
    }

    #[test]
    fn colour_or_non_square_images_are_refused_by_shape() {
        let mut data = Dataset::from_bytes(4, [3, 8, 8], &[0; 4 * 3 * 64]);
        data.labels = Some(vec![0, 1, 2, 3]);
        let err = train_classifier(&data, &ClassifierTraining::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("square grey images, not 3×8×8 (RGB)"), "{err}");
    }
}
