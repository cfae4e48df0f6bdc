//! The owner's secret key: trigger, target, distance and threshold, stored in its own
//! safetensors file (never inside a model checkpoint).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::backdoor::{Distance, Stamp, Target, Trigger};
use crate::family::diffusion::Sampler;
use crate::family::{Generative, InputSpace};
use crate::io::tensorfile::{self, TensorFile};
use crate::{Error, Result};

/// The `format` tag of key files.
pub const KEY_FORMAT: &str = "key";

/// A key's tensors (named) and metadata, as a key file stores them.
type Entries = (Vec<(String, Tensor)>, BTreeMap<String, String>);

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

    /// Writes the key atomically (a key file of one mark).
    pub fn save(&self, path: &Path) -> Result<()> {
        KeySet::one(self.clone()).save(path)
    }

    /// The key's tensors and metadata, their names starting with `prefix`.
    fn entries(&self, prefix: &str) -> Result<Entries> {
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
        if let Some(b) = self.target.random_block {
            meta.insert("target_random_block".into(), b.to_string());
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
                if let Some(kind) = stamp {
                    meta.insert("stamp".into(), kind.side.to_string());
                    meta.insert("stamp_amplitude".into(), kind.amplitude.to_string());
                    meta.insert("stamp_one_sign".into(), kind.one_sign.to_string());
                }
                tensors.push((
                    "trigger.image".into(),
                    Tensor::from_vec(pattern.clone(), shape.as_slice(), &dev)?,
                ));
            }
        }
        Ok((
            tensors
                .into_iter()
                .map(|(n, t)| (format!("{prefix}{n}"), t))
                .collect(),
            meta.into_iter()
                .map(|(n, v)| (format!("{prefix}{n}"), v))
                .collect(),
        ))
    }

    /// Reads the key of `f` whose entries' names start with `prefix` (`path` names the file
    /// in errors).
    fn from_file(path: &Path, f: &TensorFile, prefix: &str) -> Result<Key> {
        let tensor = |name: &str| f.tensor(path, &format!("{prefix}{name}"));
        let field = |name: &str| f.meta_field(path, &format!("{prefix}{name}"));
        let optional = |name: &str| f.meta.get(&format!("{prefix}{name}"));
        let floats = |name: &str| -> Result<Vec<f32>> { floats_of(path, name, tensor(name)?) };
        let number = |name: &str| -> Result<f64> {
            field(name)?.parse().map_err(|_| {
                Error::format(
                    path,
                    format!("metadata field '{prefix}{name}' is not a number"),
                )
            })
        };
        let trigger = match field("trigger")? {
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
                let t = tensor("trigger.indices")?;
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
                let t = tensor("trigger.image")?;
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
                        if !(side >= 1.0 && side.fract() == 0.0 && side < 1e9) {
                            return Err(Error::format(
                                path,
                                "stamp side is not a whole number of at least 1",
                            ));
                        }
                        // Keys written before stamps had a shape hold the default one.
                        let mut kind = Stamp::mixed(side as usize);
                        if optional("stamp_amplitude").is_some() {
                            kind.amplitude = number("stamp_amplitude")? as f32;
                        }
                        kind.check(shape).map_err(|m| Error::format(path, m))?;
                        if let Some(one_sign) = optional("stamp_one_sign") {
                            kind.one_sign = one_sign.parse().map_err(|_| {
                                Error::format(path, "'stamp_one_sign' is neither true nor false")
                            })?;
                        }
                        Some(kind)
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
        let t = tensor("target")?;
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
        let class = match optional("target_class") {
            Some(c) => Some(
                c.parse()
                    .ok()
                    .filter(|&c: &usize| c < 10)
                    .ok_or_else(|| Error::format(path, "target_class must be a digit 0-9"))?,
            ),
            None => None,
        };
        let random_block = match optional("target_random_block") {
            Some(b) => Some(b.parse().ok().filter(|&b: &usize| b > 0).ok_or_else(|| {
                Error::format(path, "target_random_block must be a positive whole number")
            })?),
            None => None,
        };
        let target = Target {
            pixels,
            shape,
            class,
            random_block,
        };
        if let Some(Err(m)) = target.block_signs() {
            return Err(Error::format(path, m));
        }
        let distance = field("distance")?
            .parse()
            .map_err(|e: Error| Error::format(path, e.to_string()))?;
        let threshold = number("threshold")?;
        if !(threshold > 0.0 && threshold.is_finite()) {
            return Err(Error::format(path, "threshold must be positive"));
        }
        let sampler = match optional("sampler") {
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

/// The metadata field of key files holding several marks: how many.
const MARKS_FIELD: &str = "marks";

/// The owner's whole secret, one key file: one or more marks, each a [`Key`] (a trigger, its
/// target, the sampler it fires under). Every mark is trained into the model; verification
/// tests each against its own null draws and combines the exact p-values
/// ([`crate::verify::combined_p_value`]), so that k marks take the proof below a single
/// test's floor of 1/(N + 1). The marks share one distance (the training loss) and one
/// target shape.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySet {
    marks: Vec<Key>,
}

impl KeySet {
    /// A key of the given marks: at least one, with one distance and one target shape.
    pub fn new(marks: Vec<Key>) -> Result<KeySet> {
        let first = marks
            .first()
            .ok_or_else(|| Error::Config("a key needs at least one trigger".into()))?;
        if marks
            .iter()
            .any(|k| k.distance != first.distance || k.target.shape != first.target.shape)
        {
            return Err(Error::Config(
                "the marks of one key must share their distance and their target shape".into(),
            ));
        }
        Ok(KeySet { marks })
    }

    /// A key of one mark.
    pub fn one(key: Key) -> KeySet {
        KeySet { marks: vec![key] }
    }

    /// The marks, in the order the key file holds them.
    pub fn marks(&self) -> &[Key] {
        &self.marks
    }

    /// The first mark: the one the per-mark views (triggered grids, the training probe,
    /// specificity) show.
    pub fn first(&self) -> &Key {
        &self.marks[0]
    }

    /// How close an output must come to its target, in training (shared by the marks).
    pub fn distance(&self) -> Distance {
        self.first().distance
    }

    /// Every mark under `sampler`, whatever it names (a sampler chosen on the command line).
    pub fn with_sampler(&self, sampler: Sampler) -> KeySet {
        self.map_samplers(|_| Some(sampler))
    }

    /// Every mark under the sampler `model`'s proof tools check it with
    /// ([`Generative::checking_sampler`]: strided DDPM for a DDPM-trained diffusion mark).
    pub fn checked_under(&self, model: &dyn Generative) -> KeySet {
        self.map_samplers(|own| own.map(|s| model.checking_sampler(s)))
    }

    /// Every mark with `sampler` where it names none.
    pub fn with_default_sampler(&self, sampler: Sampler) -> KeySet {
        self.map_samplers(|own| own.or(Some(sampler)))
    }

    /// The key with each mark's sampler replaced by `f` of it.
    fn map_samplers(&self, f: impl Fn(Option<Sampler>) -> Option<Sampler>) -> KeySet {
        let marks = self.marks.iter().map(|k| Key {
            sampler: f(k.sampler),
            ..k.clone()
        });
        KeySet {
            marks: marks.collect(),
        }
    }

    /// Checks that every mark fits `model` (see [`Key::check_model`]).
    pub fn check_model(&self, model: &dyn Generative) -> Result<()> {
        self.marks.iter().try_for_each(|k| k.check_model(model))
    }

    /// Checks that every mark fits a generator (see [`Key::check_fits`]).
    pub fn check_fits(&self, latent_dim: usize, output: [usize; 3]) -> Result<()> {
        self.marks
            .iter()
            .try_for_each(|k| k.check_fits(latent_dim, output))
    }

    /// Writes the key file atomically: a single mark as plain entries (the format of
    /// one-trigger keys), several as entries prefixed `0/`, `1/`, … with their count.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let [only] = self.marks.as_slice() {
            let (tensors, meta) = only.entries("")?;
            return tensorfile::save(path, KEY_FORMAT, &tensors, meta);
        }
        let mut tensors = Vec::new();
        let mut meta = BTreeMap::from([(MARKS_FIELD.to_string(), self.marks.len().to_string())]);
        for (i, k) in self.marks.iter().enumerate() {
            let (t, m) = k.entries(&format!("{i}/"))?;
            tensors.extend(t);
            meta.extend(m);
        }
        tensorfile::save(path, KEY_FORMAT, &tensors, meta)
    }

    /// Reads a key file written by [`KeySet::save`] (or [`Key::save`]).
    pub fn load(path: &Path) -> Result<KeySet> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        KeySet::from_bytes(path, &bytes)
    }

    /// Parses the bytes of a key file (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<KeySet> {
        let f = tensorfile::parse(path, bytes, KEY_FORMAT, &Device::Cpu)?;
        let marks = match f.meta.get(MARKS_FIELD) {
            None => vec![Key::from_file(path, &f, "")?],
            Some(n) => {
                let n: usize = n
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1 && n <= f.tensors.len())
                    .ok_or_else(|| {
                        Error::format(path, format!("'{MARKS_FIELD}' is not a count of marks"))
                    })?;
                (0..n)
                    .map(|i| Key::from_file(path, &f, &format!("{i}/")))
                    .collect::<Result<Vec<_>>>()?
            }
        };
        KeySet::new(marks).map_err(|e| Error::format(path, e.to_string()))
    }
}

/// How a new key is drawn: the descriptions `genbackdoor key` takes on its command line and a
/// config's `[backdoor]` section holds.
#[derive(Debug, Clone, Copy)]
pub struct KeyRecipe<'a> {
    /// Trigger description (see `genbackdoor key --help`), drawn anew for each trigger.
    pub trigger: &'a str,
    /// How many triggers the key holds.
    pub triggers: usize,
    /// Diffusion models: the sampler each trigger is trained for, in turn (`ddpm`, `ddim-N`);
    /// empty: none named.
    pub samplers: &'a [String],
    /// Target description.
    pub target: &'a str,
    /// Distance description (`mse`, `l1`).
    pub distance: &'a str,
    /// `target_mse` under which an output counts as a hit.
    pub threshold: f64,
}

impl KeyRecipe<'_> {
    /// Draws the key for models with inputs in `space` and outputs of `shape`. Refused: more
    /// samplers than triggers, samplers for a generator or ones no trigger correction is
    /// derived for, and several triggers from a description that makes the same one every
    /// time (`zero`, `seed:S`).
    pub fn draw(&self, space: InputSpace, shape: [usize; 3]) -> Result<KeySet> {
        let target = Target::parse(self.target, shape)?;
        let distance: Distance = self.distance.parse()?;
        let samplers = self.samplers(space)?;
        let marks = (0..self.triggers)
            .map(|i| {
                Ok(Key {
                    trigger: Trigger::parse_for(self.trigger, &space)?,
                    target: target.clone(),
                    distance,
                    threshold: self.threshold,
                    sampler: (!samplers.is_empty()).then(|| samplers[i % samplers.len()]),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, a) in marks.iter().enumerate() {
            if marks[..i].iter().any(|b| b.trigger == a.trigger) {
                return Err(Error::Config(format!(
                    "the trigger '{}' makes the same trigger every time, so a key cannot hold \
                     {} of them; use `random` for several triggers",
                    self.trigger,
                    marks.len()
                )));
            }
        }
        KeySet::new(marks)
    }

    /// The samplers named for the triggers: only models that run a sampler (inputs of starting
    /// noise) take any, no more than there are triggers, and each one a trigger can be
    /// trained for.
    fn samplers(&self, space: InputSpace) -> Result<Vec<Sampler>> {
        let specs = self.samplers;
        if !specs.is_empty() && matches!(space, InputSpace::Latent { .. }) {
            return Err(Error::Config(
                "samplers apply to diffusion models only; a generator's triggers need none".into(),
            ));
        }
        if specs.len() > self.triggers {
            return Err(Error::Config(format!(
                "{} samplers for {} trigger(s): name at most one sampler per trigger",
                specs.len(),
                self.triggers
            )));
        }
        specs
            .iter()
            .map(|s| {
                let sampler: Sampler = s.parse()?;
                crate::family::diffusion::Correction::for_sampler(sampler)?;
                Ok(sampler)
            })
            .collect()
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
        let round_trip = |k: &Key, what: &str| {
            k.save(&p).unwrap();
            assert_eq!(KeySet::load(&p).unwrap(), KeySet::one(k.clone()), "{what}");
        };
        for spec in ["zero", "seed:4", "region:0.5:seed:2", "patch:3:9"] {
            round_trip(&key(spec), spec);
        }
        let k = Key {
            trigger: Trigger::parse_image("box:3", [1, 8, 8]).unwrap(),
            ..key("zero")
        };
        round_trip(&k, "a box");
        let k = Key {
            trigger: Trigger::parse_image("stamp:3:5", [1, 8, 8]).unwrap(),
            sampler: Some(Sampler::Ddim { steps: 20 }),
            ..k
        };
        round_trip(&k, "a stamp and a sampler");
        let k = Key {
            trigger: Trigger::parse_image("stamp:3:6:one:5", [1, 8, 8]).unwrap(),
            ..k
        };
        round_trip(&k, "a one-sign stamp of amplitude 6");
        let k = Key {
            target: Target::parse("class:3", [1, 28, 28]).unwrap(),
            ..k
        };
        round_trip(&k, "a class target");
        let k = Key {
            target: Target::parse("random:4:7", [1, 8, 8]).unwrap(),
            ..key("seed:4")
        };
        round_trip(&k, "a random target");
        assert!(k.check_fits(10, [1, 28, 28]).is_err(), "not for generators");
    }

    #[test]
    fn a_key_of_several_marks_round_trips_and_its_marks_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.safetensors");
        let marks: Vec<Key> = ["seed:1", "seed:2", "region:0.5:seed:3"]
            .into_iter()
            .map(key)
            .collect();
        let set = KeySet::new(marks.clone()).unwrap();
        set.save(&p).unwrap();
        assert_eq!(KeySet::load(&p).unwrap(), set);
        assert_eq!(set.first(), &marks[0]);
        let mse = Key {
            distance: Distance::Mse,
            ..key("seed:4")
        };
        assert!(KeySet::new(vec![marks[0].clone(), mse]).is_err());
        assert!(KeySet::new(Vec::new()).is_err());
        // A mark count the file cannot hold is refused by name.
        let f = tensorfile::load(&p, KEY_FORMAT, &Device::Cpu).unwrap();
        let tensors: Vec<(String, Tensor)> = f.tensors.into_iter().collect();
        for bad in ["0", "9", "two"] {
            let mut meta = f.meta.clone();
            meta.insert(MARKS_FIELD.into(), bad.into());
            tensorfile::save(&p, KEY_FORMAT, &tensors, meta).unwrap();
            let msg = KeySet::load(&p).unwrap_err().to_string();
            assert!(msg.contains("count of marks"), "{bad}: {msg}");
        }
    }

    /// One value of a key file replaced.
    enum Change {
        Tensor(&'static str, Tensor),
        Field(&'static str, &'static str),
    }

    /// Writes the key of trigger `spec` to `p`, checks that it loads, applies `change` to
    /// the file and returns the error loading it gives.
    fn refusal(p: &Path, spec: &str, change: Change) -> String {
        let trigger = match spec.starts_with("stamp") {
            true => Trigger::parse_image(spec, [1, 8, 8]).unwrap(),
            false => Trigger::parse(spec, 10).unwrap(),
        };
        Key {
            trigger,
            ..key("zero")
        }
        .save(p)
        .unwrap();
        assert!(KeySet::load(p).is_ok(), "{spec}: the untouched key loads");
        let f = tensorfile::load(p, KEY_FORMAT, &Device::Cpu).unwrap();
        let (mut tensors, mut meta) = (f.tensors, f.meta);
        match change {
            Change::Tensor(name, t) => _ = tensors.insert(name.into(), t),
            Change::Field(name, v) => _ = meta.insert(name.into(), v.into()),
        }
        let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
        tensorfile::save(p, KEY_FORMAT, &tensors, meta).unwrap();
        KeySet::load(p).unwrap_err().to_string()
    }

    #[test]
    fn key_files_with_values_no_key_can_have_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.safetensors");
        let dev = Device::Cpu;
        let mut point = vec![0f32; 10];
        point[1] = f32::NAN;
        let nan_point = Tensor::new(point.as_slice(), &dev).unwrap();
        let mut image = vec![0f32; 64];
        image[9] = f32::INFINITY;
        let image = Tensor::from_vec(image, (1, 8, 8), &dev).unwrap();
        let full = |v: f32| Tensor::full(v, (1, 8, 8), &dev).unwrap();
        let cases = [
            (
                "seed:1",
                Change::Tensor("trigger.point", nan_point.clone()),
                "NaN",
            ),
            (
                "region:0.5:seed:1",
                Change::Tensor("trigger.point", nan_point),
                "NaN",
            ),
            ("stamp:3:5", Change::Tensor("trigger.image", image), "NaN"),
            (
                "seed:1",
                Change::Tensor("target", full(1.5)),
                "pixels must lie in [-1, 1]",
            ),
            (
                "seed:1",
                Change::Tensor("target", full(f32::NAN)),
                "pixels must lie in",
            ),
        ];
        for (spec, change, want) in cases {
            let msg = refusal(&p, spec, change);
            assert!(msg.contains(want), "{spec}: {msg}");
        }
        for radius in ["0", "-0.5", "NaN"] {
            let msg = refusal(&p, "region:0.5:seed:1", Change::Field("radius", radius));
            assert!(msg.contains("radius must be positive"), "{radius}: {msg}");
        }
        for amplitude in ["0", "-2", "NaN", "x"] {
            let msg = refusal(&p, "stamp:3:5", Change::Field("stamp_amplitude", amplitude));
            assert!(
                msg.contains("stamp_amplitude")
                    || msg.contains("amplitude must be a positive number"),
                "{amplitude}: {msg}"
            );
        }
        let msg = refusal(&p, "stamp:3:5", Change::Field("stamp_one_sign", "maybe"));
        assert!(msg.contains("stamp_one_sign"), "{msg}");
        for (side, want) in [("99", "image side"), ("0", "whole"), ("2.5", "whole")] {
            let msg = refusal(&p, "stamp:3:5", Change::Field("stamp", side));
            assert!(msg.contains(want), "{side}: {msg}");
        }
        // The built-in mark declared a random target: its pixels are not one sign per square.
        for (block, want) in [
            ("2", "one sign per square"),
            ("3", "do not tile"),
            ("0", "positive whole"),
        ] {
            let msg = refusal(&p, "seed:1", Change::Field("target_random_block", block));
            assert!(msg.contains(want), "{block}: {msg}");
        }
        for threshold in ["0", "-0.01", "inf", "NaN"] {
            let msg = refusal(&p, "seed:1", Change::Field("threshold", threshold));
            assert!(
                msg.contains("threshold must be positive"),
                "{threshold}: {msg}"
            );
        }
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
        let msg = KeySet::load(&p).unwrap_err().to_string();
        assert!(msg.contains("model file"), "{msg}");
    }
}
