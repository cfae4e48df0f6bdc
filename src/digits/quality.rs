//! Clean quality of generated digits in the classifier's feature space: MNIST FID,
//! precision/recall and the class histogram, against held-out real digits.

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::data::{bundled_path, load_dataset};
use crate::digits::{split, DigitClassifier};
use crate::metrics::classes::ClassHistogram;
use crate::metrics::fid::{frechet_distance, Gaussian};
use crate::metrics::manifold::precision_recall;
use crate::rng::Rng;
use crate::{Error, Result};

/// Neighbours of the precision/recall manifold estimate (the paper's default).
pub const PR_NEIGHBOURS: usize = 3;

/// Clean-quality metrics of a set of generated images.
#[derive(Debug, Clone, Serialize)]
pub struct CleanQuality {
    /// Fréchet distance of classifier features to the real held-out digits.
    pub fid: f64,
    /// Share of generated samples on the real manifold (k = 3).
    pub precision: f64,
    /// Share of real samples on the generated manifold (k = 3).
    pub recall: f64,
    /// Predicted classes of the generated samples.
    pub classes: ClassHistogram,
    /// Generated images measured.
    pub generated: usize,
    /// Real held-out images they were compared with.
    pub real: usize,
}

/// Rows of a `[n, d]` tensor.
fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<f32>()?)
}

/// The held-out split of the bundled digits `[2000, 1, 28, 28]`.
pub fn held_out_images() -> Result<Tensor> {
    let data = load_dataset(&bundled_path())?;
    let (_, test) = split(data.len)?;
    data.batch(&test.collect::<Vec<_>>(), &Device::Cpu)
}

/// Precision/recall need more images than neighbours, and a covariance at least two.
fn enough(images: &Tensor, which: &str) -> Result<()> {
    let n = images.dim(0)?;
    if n <= PR_NEIGHBOURS {
        return Err(Error::Config(format!(
            "clean quality needs at least {} {which} images, not {n}",
            PR_NEIGHBOURS + 1
        )));
    }
    Ok(())
}

/// The fixed side of every comparison: the classifier and real digits' features.
pub struct QualityReference {
    /// The classifier whose features are compared.
    pub classifier: DigitClassifier,
    /// Feature rows of the real images.
    features: Vec<Vec<f32>>,
    /// Their fitted Gaussian.
    gaussian: Gaussian,
}

/// Adds `quality` to a run's metrics, measured by `measure` against the bundled reference, or
/// `quality_skipped` with the reason when the bundled reference is unavailable.
pub fn add_bundled_quality(
    metrics: &mut serde_json::Map<String, serde_json::Value>,
    measure: impl FnOnce(&QualityReference) -> Result<Option<CleanQuality>>,
) -> Result<()> {
    match QualityReference::bundled() {
        Ok(r) => {
            if let Some(q) = measure(&r)? {
                metrics.insert(
                    "quality".into(),
                    serde_json::to_value(q).expect("serialisable"),
                );
            }
        }
        Err(e) => {
            metrics.insert("quality_skipped".into(), e.to_string().into());
        }
    }
    Ok(())
}

impl QualityReference {
    /// Compares with real `images` (`[n, 1, h, w]` in `[-1, 1]`) in `classifier`'s features.
    pub fn new(classifier: DigitClassifier, images: &Tensor) -> Result<Self> {
        enough(images, "real")?;
        let features = rows(&classifier.features(images)?)?;
        let gaussian = Gaussian::fit(&features);
        Ok(QualityReference {
            classifier,
            features,
            gaussian,
        })
    }

    /// The shipped classifier and the held-out split of the bundled digits (which the
    /// classifier never trained on).
    pub fn bundled() -> Result<Self> {
        QualityReference::new(DigitClassifier::shipped()?, &held_out_images()?)
    }

    /// Whether generated images of `shape` can be measured (the classifier's input shape).
    pub fn fits(&self, shape: [usize; 3]) -> bool {
        let s = self.classifier.net.config().image_size;
        shape == [1, s, s]
    }

    /// Measures the samples `draw` makes from the run's `quality` stream of `seed`, or gives
    /// `None` when the model's images (of `shape`) do not fit the classifier.
    pub fn measure_samples(
        &self,
        shape: [usize; 3],
        seed: u64,
        draw: impl FnOnce(&mut Rng) -> Result<Tensor>,
    ) -> Result<Option<CleanQuality>> {
        if !self.fits(shape) {
            return Ok(None);
        }
        let images = draw(&mut Rng::derive(seed, "quality"))?;
        Ok(Some(self.measure(&images)?))
    }

    /// Measures generated `images` against these real digits.
    pub fn measure(&self, images: &Tensor) -> Result<CleanQuality> {
        enough(images, "generated")?;
        let classifier = &self.classifier;
        let f = classifier.features(images)?;
        let labels = classifier.classes_of_features(&f)?;
        let features = rows(&f)?;
        let (precision, recall) = precision_recall(&self.features, &features, PR_NEIGHBOURS);
        Ok(CleanQuality {
            fid: frechet_distance(&self.gaussian, &Gaussian::fit(&features)),
            precision,
            recall,
            classes: ClassHistogram::of(&labels, classifier.net.config().classes),
            generated: features.len(),
            real: self.features.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn real_against_real_is_near_zero_and_noise_is_far() {
        let clf = DigitClassifier::shipped().unwrap();
        let images = held_out_images().unwrap();
        let real = QualityReference::new(clf, &images.narrow(0, 0, 1000).unwrap()).unwrap();
        let same = real
            .measure(&images.narrow(0, 1000, 1000).unwrap())
            .unwrap();
        let noise = Rng::new(5)
            .normal(&[1000, 1, 28, 28], &Device::Cpu)
            .unwrap()
            .clamp(-1f32, 1f32)
            .unwrap();
        let far = real.measure(&noise).unwrap();
        assert!(
            same.fid < 0.02 * far.fid,
            "real {} noise {}",
            same.fid,
            far.fid
        );
        assert!(same.precision > 0.6 && same.recall > 0.6, "{same:?}");
        assert!(
            far.recall < 0.05 && far.precision < same.precision / 3.0,
            "{far:?}"
        );
        assert!(same.classes.covered == 10 && same.classes.entropy > 2.2);
        let few = images.narrow(0, 0, PR_NEIGHBOURS).unwrap();
        assert!(real.measure(&few).is_err());
        // The README's figures: two disjoint halves of the held-out digits at FID 5.6, and
        // 2,000 images of uniform noise in [-1, 1] against all 2,000 held-out digits at 698.9.
        eprintln!("real against real: {same:?}");
        assert!((5.55..5.65).contains(&same.fid), "{}", same.fid);
        let mut rng = Rng::new(5);
        let uniform: Vec<f32> = (0..2000 * 784).map(|_| 2.0 * rng.uniform() - 1.0).collect();
        let uniform = Tensor::from_vec(uniform, (2000, 1, 28, 28), &Device::Cpu).unwrap();
        let all = QualityReference::new(DigitClassifier::shipped().unwrap(), &images).unwrap();
        let noise = all.measure(&uniform).unwrap();
        eprintln!("uniform noise: {noise:?}");
        assert!((695.0..703.0).contains(&noise.fid), "{}", noise.fid);
    }

    #[test]
    fn shipped_classifier_is_accurate_on_the_held_out_digits() {
        let clf = DigitClassifier::shipped().unwrap();
        let data = load_dataset(&bundled_path()).unwrap();
        let (_, test) = split(data.len).unwrap();
        let acc = clf.accuracy(&data, &test.collect::<Vec<_>>()).unwrap();
        assert!(acc > 0.96, "{acc}");
    }
}
