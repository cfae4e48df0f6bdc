//! The owner's secret key: trigger, target, distance and threshold, stored in its own
//! safetensors file (never inside a model checkpoint).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::backdoor::{Distance, Target, Trigger};
use crate::family::diffusion::Sampler;
use crate::family::{Generative, InputSpace};
use crate::io::tensorfile;
use crate::{Error, Result};

/// The `format` tag of key files.
pub const KEY_FORMAT: &str = "key";

/// A backdoor key.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// Which inputs are triggered.
    pub trigger: Trigger,
    /// What they must produce.
    pub target: Target,
    /// How closeness to the target is measured in training.
    pub distance: Distance,
    /// `target_mse` (on the [0, 1] scale) under which an output counts as a hit.
    pub threshold: f64,
    /// For diffusion models: the sampler the backdoor was trained to fire under (its trigger
    /// correction), which `verify` and `eval` use unless told otherwise.
    pub sampler: Option<Sampler>,
}

impl Key {
    /// Checks that the key fits `model`: its trigger makes inputs of the model's input space
    /// and its target has the model's output shape.
    pub fn check_model(&self, model: &dyn Generative) -> Result<()> {
        self.check_space(&model.input_space(), model.output_shape())
    }

    /// Checks that the key fits a model with inputs in `space` and outputs of `shape`.
    pub fn check_space(&self, space: &InputSpace, shape: [usize; 3]) -> Result<()> {
        match *space {
            InputSpace::Latent { dim } => self.check_fits(dim, shape),
            InputSpace::Noise { .. } => {
                self.trigger.check_space(space)?;
                self.target.check_fits(shape)
            }
        }
    }

    /// Checks that the key fits a generator with this latent dimension and output shape.
    pub fn check_fits(&self, latent_dim: usize, output: [usize; 3]) -> Result<()> {
        self.trigger.check_fits(latent_dim)?;
        if let Some(c) = self.target.class {
            return Err(Error::Mismatch(format!(
                "the key's target is the class {c}, which only diffusion models can be trained to (a generator needs a fixed target image)"
            )));
        }
        self.target.check_fits(output)
    }

    /// Writes the key atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let vec = |v: &[f32]| Tensor::new(v, &dev);
        let mut tensors = vec![("target".to_string(), self.target.tensor(&dev)?.squeeze(0)?)];
        let mut meta = BTreeMap::from([
            ("trigger".to_string(), self.trigger.kind().to_string()),
            ("distance".to_string(), self.distance.to_string()),
            ("threshold".to_string(), self.threshold.to_string()),
        ]);
        if let Some(c) = self.target.class {
            meta.insert("target_class".into(), c.to_string());
        }
        if let Some(s) = self.sampler {
            meta.insert("sampler".into(), s.to_string());
        }
        match &self.trigger {
            Trigger::Point(p) => tensors.push(("trigger.point".into(), vec(p)?)),
            Trigger::Region { center, radius } => {
                tensors.push(("trigger.point".into(), vec(center)?));
                meta.insert("radius".into(), radius.to_string());
            }
            Trigger::Patch { indices, values } => {
                let idx: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
                tensors.push(("trigger.indices".into(), Tensor::new(idx.as_slice(), &dev)?));
                tensors.push(("trigger.values".into(), vec(values)?));
            }
            Trigger::Image {
                pattern,
                shape,
                stamp,
            } => {
                if let Some(side) = stamp {
                    meta.insert("stamp".into(), side.to_string());
                }
                tensors.push((
                    "trigger.image".into(),
                    Tensor::from_vec(pattern.clone(), shape.as_slice(), &dev)?,
                ));
            }
        }
        tensorfile::save(path, KEY_FORMAT, &tensors, meta)
    }

    /// Reads a key written by [`Key::save`].
    pub fn load(path: &Path) -> Result<Key> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Key::from_bytes(path, &bytes)
    }

    /// Parses the bytes of a key file (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Key> {
        let f = tensorfile::parse(path, bytes, KEY_FORMAT, &Device::Cpu)?;
        let floats =
            |name: &str| -> Result<Vec<f32>> { floats_of(path, name, f.tensor(path, name)?) };
        let number = |name: &str| -> Result<f64> {
            f.meta_field(path, name)?.parse().map_err(|_| {
                Error::format(path, format!("metadata field '{name}' is not a number"))
            })
        };
        let trigger = match f.meta_field(path, "trigger")? {
            "point" => Trigger::Point(floats("trigger.point")?),
            "region" => {
                let radius = number("radius")? as f32;
                if !(radius > 0.0 && radius.is_finite()) {
                    return Err(Error::format(path, "region radius must be positive"));
                }
                Trigger::Region {
                    center: floats("trigger.point")?,
                    radius,
                }
            }
            "patch" => {
                let t = f.tensor(path, "trigger.indices")?;
                if t.dtype() != DType::I64 || t.rank() != 1 {
                    return Err(Error::format(
                        path,
                        "'trigger.indices' must be an int64 vector",
                    ));
                }
                let indices = t.to_vec1::<i64>()?;
                if indices.iter().any(|&i| i < 0) {
                    return Err(Error::format(path, "negative patch index"));
                }
                let values = floats("trigger.values")?;
                if values.len() != indices.len() {
                    return Err(Error::format(
                        path,
                        "patch indices and values differ in length",
                    ));
                }
                Trigger::Patch {
                    indices: indices.into_iter().map(|i| i as usize).collect(),
                    values,
                }
            }
            kind @ ("image" | "stamp") => {
                let t = f.tensor(path, "trigger.image")?;
                let shape: [usize; 3] = t.dims().try_into().map_err(|_| {
                    Error::format(path, "'trigger.image' must have shape [C, H, W]")
                })?;
                let pattern = floats_of(path, "trigger.image", &t.flatten_all()?)?;
                if pattern.iter().all(|&v| v == 0.0) {
                    return Err(Error::format(path, "the image trigger is zero everywhere"));
                }
                let stamp = match kind {
                    "stamp" => {
                        let side = number("stamp")?;
                        if !(side >= 1.0 && side <= shape[1].min(shape[2]) as f64) {
                            return Err(Error::format(path, "stamp side out of range"));
                        }
                        Some(side as usize)
                    }
                    _ => None,
                };
                Trigger::Image {
                    pattern,
                    shape,
                    stamp,
                }
            }
            other => {
                return Err(Error::format(
                    path,
                    format!("unknown trigger kind '{other}'"),
                ))
            }
        };
        let t = f.tensor(path, "target")?;
        let shape: [usize; 3] = t.dims().try_into().map_err(|_| {
            Error::format(
                path,
                format!("target has shape {:?}, not [C, H, W]", t.dims()),
            )
        })?;
        if t.dtype() != DType::F32 {
            return Err(Error::format(path, "target must be float32"));
        }
        let pixels = t.flatten_all()?.to_vec1::<f32>()?;
        if pixels.iter().any(|p| !(-1.0..=1.0).contains(p)) {
            return Err(Error::format(
                path,
                "target pixels must lie in [-1, 1] (NaN, infinite or out of range)",
            ));
        }
        let class = match f.meta.get("target_class") {
            Some(c) => Some(
                c.parse()
                    .ok()
                    .filter(|&c: &usize| c < 10)
                    .ok_or_else(|| Error::format(path, "target_class must be a digit 0-9"))?,
            ),
            None => None,
        };
        let target = Target {
            pixels,
            shape,
            class,
        };
        let distance = f
            .meta_field(path, "distance")?
            .parse()
            .map_err(|e: Error| Error::format(path, e.to_string()))?;
        let threshold = number("threshold")?;
        if !(threshold > 0.0 && threshold.is_finite()) {
            return Err(Error::format(path, "threshold must be positive"));
        }
        let sampler = match f.meta.get("sampler") {
            Some(s) => Some(
                s.parse()
                    .map_err(|e: Error| Error::format(path, e.to_string()))?,
            ),
            None => None,
        };
        Ok(Key {
            trigger,
            target,
            distance,
            threshold,
            sampler,
        })
    }
}

/// The values of the float32 vector `name` of a key file, all finite.
fn floats_of(path: &Path, name: &str, t: &Tensor) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 || t.rank() != 1 {
        return Err(Error::format(
            path,
            format!("'{name}' must be a float32 vector"),
        ));
    }
    let v = t.to_vec1::<f32>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::format(
            path,
            format!("'{name}' holds NaN or infinite values"),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(trigger: &str) -> Key {
        Key {
            trigger: Trigger::parse(trigger, 10).unwrap(),
            target: Target::builtin("mark", [1, 8, 8]).unwrap(),
            distance: Distance::L1,
            threshold: 0.02,
            sampler: None,
        }
    }

    #[test]
    fn every_trigger_kind_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.safetensors");
        for spec in ["zero", "seed:4", "region:0.5:seed:2", "patch:3:9"] {
            let k = key(spec);
            k.save(&p).unwrap();
            assert_eq!(Key::load(&p).unwrap(), k, "{spec}");
        }
        let k = Key {
            trigger: Trigger::parse_image("box:3", [1, 8, 8]).unwrap(),
            ..key("zero")
        };
        k.save(&p).unwrap();
        assert_eq!(Key::load(&p).unwrap(), k);
        let k = Key {
            trigger: Trigger::parse_image("stamp:3:5", [1, 8, 8]).unwrap(),
            sampler: Some(Sampler::Ddim { steps: 20 }),
            ..k
        };
        k.save(&p).unwrap();
        assert_eq!(Key::load(&p).unwrap(), k, "a stamp and a sampler");
        let k = Key {
            target: Target::parse("class:3", [1, 28, 28]).unwrap(),
            ..k
        };
        k.save(&p).unwrap();
        assert_eq!(Key::load(&p).unwrap(), k);
        assert!(k.check_fits(10, [1, 28, 28]).is_err(), "not for generators");
    }

    #[test]
    fn key_must_fit_the_model_and_model_files_are_not_keys() {
        let k = key("zero");
        assert!(k.check_fits(10, [1, 8, 8]).is_ok());
        assert!(k.check_fits(100, [1, 8, 8]).is_err());
        let msg = k.check_fits(10, [1, 28, 28]).unwrap_err().to_string();
        assert!(msg.contains("target has shape"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        tensorfile::save(&p, "model", &[], BTreeMap::new()).unwrap();
        let msg = Key::load(&p).unwrap_err().to_string();
        assert!(msg.contains("model file"), "{msg}");
    }
}
