//! Runs as the command line starts them: arguments and config file become one resolved
//! [`RunSpec`] (family, stage, the config with every override applied, the key), built here
//! and only here; [`RunSpec::execute`] hands it to the family's trainer, then writes the
//! end of the run the same way for every family ([`finish`]). The command-line modules parse
//! and print; they hold no family checks.

pub mod finish;

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::backdoor::{KeyRecipe, KeySet};
pub use crate::config::Stage;
use crate::config::{Config, ModelFamily};
use crate::detect::DetectSettings;
use crate::family::{diffusion, gan, InputSpace, Trained};
use crate::io::rundir::RunDir;
use crate::io::snapshot;
use crate::{Error, Result};

pub use finish::{FinishSettings, GENERATOR_EVAL_SAMPLES, GENERATOR_QUALITY_SAMPLES};

/// Command-line values that override the config (each `None` keeps the config's).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Seed of every random stream.
    pub seed: Option<u64>,
    /// Training steps of the stage.
    pub steps: Option<usize>,
    /// The backdoor weight λ of the stage.
    pub lambda: Option<f64>,
    /// Images per step (training from scratch).
    pub batch_size: Option<usize>,
    /// Learning rate (injection).
    pub lr: Option<f64>,
    /// Training data.
    pub data: Option<PathBuf>,
    /// Use only the first N images.
    pub limit: Option<usize>,
}

/// The settings of one stage of one family that overrides reach.
struct StageFields<'a> {
    steps: &'a mut usize,
    lambda: &'a mut f64,
    batch_size: Option<&'a mut usize>,
    lr: Option<&'a mut f64>,
}

/// The config section a family's stage reads.
fn stage_fields(cfg: &mut Config, family: ModelFamily, stage: Stage) -> StageFields<'_> {
    match (family, stage) {
        (ModelFamily::Dcgan, Stage::Train) => StageFields {
            steps: &mut cfg.train.steps,
            lambda: &mut cfg.train.lambda,
            batch_size: Some(&mut cfg.train.batch_size),
            lr: None,
        },
        (ModelFamily::Dcgan, Stage::Inject) => StageFields {
            steps: &mut cfg.inject.steps,
            lambda: &mut cfg.inject.lambda,
            batch_size: Some(&mut cfg.inject.batch_size),
            lr: Some(&mut cfg.inject.lr),
        },
        (ModelFamily::Diffusion, Stage::Train) => StageFields {
            steps: &mut cfg.diffusion.steps,
            lambda: &mut cfg.diffusion.lambda,
            batch_size: Some(&mut cfg.diffusion.batch_size),
            lr: None,
        },
        (ModelFamily::Diffusion, Stage::Inject) => StageFields {
            steps: &mut cfg.diffusion.inject.steps,
            lambda: &mut cfg.diffusion.inject.lambda,
            batch_size: None,
            lr: Some(&mut cfg.diffusion.inject.lr),
        },
    }
}

/// One resolved run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The config with every override applied (written to the run directory as it is).
    pub config: Config,
    /// The model family.
    pub family: ModelFamily,
    /// Training from scratch or injection.
    pub stage: Stage,
    /// The key planted (`None` for a clean run).
    pub key: Option<KeySet>,
    /// Injection: the trained model the backdoor goes into.
    pub model: Option<PathBuf>,
}

impl RunSpec {
    /// A training run: the config's family, the overrides applied to its section, and the
    /// key from `key_file`, `[backdoor] key` or the config's description when λ > 0.
    pub fn train(config: Config, o: &Overrides, key_file: Option<&Path>) -> Result<RunSpec> {
        let family = config.family;
        let mut config = apply(config, o, family, Stage::Train)?;
        fit_to_data(&mut config)?;
        let mut spec = RunSpec {
            config,
            family,
            stage: Stage::Train,
            key: None,
            model: None,
        };
        if spec.lambda() > 0.0 {
            spec.key = Some(resolve_key(&spec.config, key_file)?);
        }
        Ok(spec)
    }

    /// An injection of the key at `key` (else `[backdoor] key`, else one drawn from the
    /// config's description for the model's input space: by default one random trigger, and
    /// for a DCGAN a secret random target) into the trained model at `model`
    /// (anything [`crate::family::load`] reads), whose family decides the config section the
    /// overrides reach.
    pub fn inject(
        config: Config,
        o: &Overrides,
        model: &Path,
        key: Option<&Path>,
    ) -> Result<RunSpec> {
        let found = crate::family::family_of(model)?;
        let family = match found.as_str() {
            gan::FAMILY => ModelFamily::Dcgan,
            diffusion::model::FAMILY => ModelFamily::Diffusion,
            other => {
                return Err(Error::format(
                    model,
                    format!("holds a '{other}' model, which inject cannot backdoor"),
                ))
            }
        };
        let config = Config {
            family,
            ..apply(config, o, family, Stage::Inject)?
        };
        let key = key_for(&config, Stage::Inject, key, |_| {
            crate::family::space_of(model)
        })?;
        Ok(RunSpec {
            config,
            family,
            stage: Stage::Inject,
            key: Some(key),
            model: Some(model.to_path_buf()),
        })
    }

    /// λ, the backdoor weight of this run: the one place it is read from the config.
    pub fn lambda(&self) -> f64 {
        let mut cfg = self.config.clone();
        *stage_fields(&mut cfg, self.family, self.stage).lambda
    }

    /// Runs the spec into `run` (with a progress bar when `progress`) and finishes it;
    /// returns the metrics.
    pub fn execute(&self, run: &RunDir, progress: bool) -> Result<serde_json::Value> {
        let trained = self.fit(run, progress)?;
        finish(run, &trained, &self.config)
    }

    /// The family's trainer for this spec.
    fn fit(&self, run: &RunDir, progress: bool) -> Result<Trained> {
        let cfg = &self.config;
        let key = self.key.as_ref();
        match (self.family, self.stage, &self.model) {
            (ModelFamily::Dcgan, Stage::Train, _) => gan::trail::train(cfg, key, run, progress),
            (ModelFamily::Diffusion, Stage::Train, _) => {
                diffusion::run::train(cfg, key, run, progress)
            }
            (family, Stage::Inject, Some(path)) => {
                let key = key.expect("an injection has a key");
                match family {
                    ModelFamily::Dcgan => {
                        let clean = gan::GanModel::load(path, &Device::Cpu)?;
                        gan::red::inject(&clean, key, cfg, run, progress)
                    }
                    ModelFamily::Diffusion => {
                        let clean = diffusion::DiffusionModel::load(path, &Device::Cpu)?;
                        diffusion::run::inject(&clean, key, cfg, run, progress)
                    }
                }
            }
            (_, Stage::Inject, None) => Err(Error::Config(
                "an injection needs the trained model to backdoor".into(),
            )),
        }
    }
}

/// Continues the interrupted run in `run` (training or injection, of any family) from its
/// last checkpoint, with the config and key it was started with, and finishes it exactly as
/// the uninterrupted run would have.
pub fn resume(run: &RunDir, progress: bool) -> Result<serde_json::Value> {
    let config = run.file("config.toml");
    if !config.exists() {
        return Err(Error::Config(format!(
            "{} is not a run folder (it has no config.toml): nothing to resume",
            run.path.display()
        )));
    }
    let cfg = Config::load(&config)?;
    let checkpoint = run.file(snapshot::CHECKPOINT);
    if !checkpoint.exists() {
        return Err(Error::Config(format!(
            "{} holds no {}: the run stopped before its first checkpoint; start it again",
            run.path.display(),
            snapshot::CHECKPOINT
        )));
    }
    if run.file("metrics.json").exists() {
        return Err(Error::Config(format!(
            "the run in {} is already complete (it has its metrics.json)",
            run.path.display()
        )));
    }
    let trained = match (cfg.family, snapshot::stage_of(&checkpoint)?.as_str()) {
        (ModelFamily::Dcgan, "inject") => gan::red::resume(run, progress),
        (ModelFamily::Dcgan, _) => gan::trail::resume(run, progress),
        (ModelFamily::Diffusion, _) => diffusion::run::resume(run, progress),
    }?;
    finish(run, &trained, &cfg)
}

/// The end of every run: [`finish::finish`] with the key the run wrote at its start (the
/// trainer's: a diffusion key records the sampler its backdoor was trained for), measuring
/// as much as the config's family asks.
fn finish(run: &RunDir, trained: &Trained, cfg: &Config) -> Result<serde_json::Value> {
    let path = run.file("key.safetensors");
    let key = if path.exists() {
        Some(KeySet::load(&path)?)
    } else {
        None
    };
    let (eval_samples, quality_samples) = match cfg.family {
        ModelFamily::Dcgan => (GENERATOR_EVAL_SAMPLES, GENERATOR_QUALITY_SAMPLES),
        ModelFamily::Diffusion => (cfg.diffusion.eval_samples, cfg.diffusion.quality_samples),
    };
    let settings = FinishSettings {
        eval_samples,
        quality_samples,
        seed: cfg.seed,
        detect: cfg.detect.enabled.then_some(DetectSettings {
            seed: cfg.seed,
            steps: cfg.detect.steps,
        }),
        null_keys: cfg.verify.null_keys,
    };
    finish::finish(run, trained, key.as_ref(), settings)
}

/// `cfg` with the overrides applied to `family`'s `stage` section, validated.
fn apply(mut cfg: Config, o: &Overrides, family: ModelFamily, stage: Stage) -> Result<Config> {
    if let Some(v) = o.seed {
        cfg.seed = v;
    }
    if let Some(v) = &o.data {
        cfg.data.path = v.clone();
    }
    if let Some(v) = o.limit {
        cfg.data.limit = v;
    }
    let f = stage_fields(&mut cfg, family, stage);
    if let Some(v) = o.steps {
        *f.steps = v;
    }
    if let Some(v) = o.lambda {
        *f.lambda = v;
    }
    match (o.batch_size, f.batch_size) {
        (Some(v), Some(b)) => *b = v,
        (Some(_), None) => return Err(Error::Config(
            "--batch-size does not apply here (a diffusion injection uses [diffusion] batch_size)"
                .into(),
        )),
        _ => {}
    }
    match (o.lr, f.lr) {
        (Some(v), Some(l)) => *l = v,
        (Some(_), None) => {
            return Err(Error::Config(
                "--lr applies to inject only (training from scratch reads the config's rates)"
                    .into(),
            ))
        }
        _ => {}
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Sets the image shape of the model `cfg` trains from scratch (`channels` and `image_size`
/// of its family's section) to its data's: a model is built for the images it learns from.
fn fit_to_data(cfg: &mut Config) -> Result<()> {
    let shape = crate::data::image_shape(&cfg.data_path())?;
    let [c, h, w] = shape;
    if h != w {
        return Err(Error::Mismatch(format!(
            "the models make square images, but the data's are {}",
            crate::data::shape_words(shape)
        )));
    }
    match cfg.family {
        ModelFamily::Dcgan => (cfg.model.channels, cfg.model.image_size) = (c, h),
        ModelFamily::Diffusion => {
            let net = &mut cfg.diffusion.diffusers;
            (net.in_channels, net.out_channels) = (c, c);
            net.sample_size = crate::models::diffusers_unet::SampleSize::Side(h);
        }
    }
    cfg.validate()
}

/// The input space and image shape of the models `cfg` trains.
fn model_space(cfg: &Config) -> Result<(InputSpace, [usize; 3])> {
    Ok(match cfg.family {
        ModelFamily::Dcgan => (
            InputSpace::Latent {
                dim: cfg.model.latent_dim,
            },
            cfg.model.image_shape(),
        ),
        ModelFamily::Diffusion => {
            let d = &cfg.diffusion;
            let shape = d.diffusers.image_shape()?;
            (InputSpace::Noise { shape }, shape)
        }
    })
}

/// The key a training run plants: a key file, or one made from the config's description.
pub fn resolve_key(cfg: &Config, file: Option<&Path>) -> Result<KeySet> {
    key_for(cfg, Stage::Train, file, model_space)
}

/// A key file (`file`, else `[backdoor] key`), or one drawn from the config's description,
/// with `stage`'s defaults for what it leaves open, for the input space and image shape that
/// `space` gives.
fn key_for(
    cfg: &Config,
    stage: Stage,
    file: Option<&Path>,
    space: impl FnOnce(&Config) -> Result<(InputSpace, [usize; 3])>,
) -> Result<KeySet> {
    if let Some(p) = file.or(cfg.backdoor.key.as_deref()) {
        return KeySet::load(p);
    }
    let b = &cfg.backdoor;
    let (space, shape) = space(cfg)?;
    KeyRecipe {
        trigger: b.trigger(),
        triggers: b.triggers(cfg.family, stage),
        samplers: &b.samplers,
        target: &b.target(cfg.family, stage, shape),
        distance: &b.distance,
        threshold: b.threshold,
    }
    .draw(space, shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::{Key, Trigger};

    fn diffusion_config() -> Config {
        Config {
            family: ModelFamily::Diffusion,
            ..Config::default()
        }
    }

    #[test]
    fn overrides_reach_the_section_of_the_family_and_stage() {
        let o = Overrides {
            seed: Some(9),
            steps: Some(7),
            lambda: Some(0.5),
            batch_size: Some(3),
            limit: Some(100),
            ..Overrides::default()
        };
        let gan = RunSpec::train(Config::default(), &o, None).unwrap();
        let c = &gan.config;
        assert_eq!((c.seed, c.train.steps, c.train.batch_size), (9, 7, 3));
        assert_eq!((gan.lambda(), c.data.limit), (0.5, 100));
        assert_eq!(
            c.diffusion,
            Config::default().diffusion,
            "other sections stay"
        );
        let d = RunSpec::train(diffusion_config(), &o, None).unwrap();
        let c = &d.config;
        assert_eq!(
            (c.diffusion.steps, c.diffusion.batch_size, d.lambda()),
            (7, 3, 0.5)
        );
        assert_eq!(c.train, Config::default().train);
        // The default key is a fresh random draw in the family's input space: five distinct
        // N(0, I) latents for a DCGAN, one stamp for a diffusion model.
        let marks = gan.key.as_ref().unwrap().marks();
        assert_eq!(marks.len(), crate::config::DEFAULT_GAN_TRIGGERS);
        assert!(marks.iter().all(|k| k.trigger.kind() == "point"));
        assert_ne!(marks[0].trigger, marks[1].trigger);
        let stamp = d.key.as_ref().unwrap().marks();
        assert_eq!((stamp.len(), stamp[0].trigger.kind()), (1, "stamp"));
        assert_ne!(
            gan.key,
            RunSpec::train(Config::default(), &o, None).unwrap().key
        );
        // λ = 0: a clean run, no key; --lr is for injections only.
        let clean = Overrides {
            lambda: Some(0.0),
            ..Overrides::default()
        };
        assert!(RunSpec::train(Config::default(), &clean, None)
            .unwrap()
            .key
            .is_none());
        let lr = Overrides {
            lr: Some(1e-3),
            ..Overrides::default()
        };
        let msg = RunSpec::train(Config::default(), &lr, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--lr"), "{msg}");
        let bad = Overrides {
            steps: Some(0),
            ..Overrides::default()
        };
        assert!(RunSpec::train(Config::default(), &bad, None).is_err());
    }

    #[test]
    fn a_key_file_beats_the_config_key_which_beats_the_description() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let key = |spec: &str| {
            KeySet::one(Key {
                trigger: Trigger::parse(spec, 100).unwrap(),
                ..resolve_key(&Config::default(), None)
                    .unwrap()
                    .first()
                    .clone()
            })
        };
        key("seed:1").save(&a).unwrap();
        key("seed:2").save(&b).unwrap();
        let mut cfg = Config::default();
        cfg.backdoor.key = Some(b.clone());
        let from_config = resolve_key(&cfg, None).unwrap();
        assert_eq!(from_config, key("seed:2"));
        assert_eq!(resolve_key(&cfg, Some(&a)).unwrap(), key("seed:1"));
    }

    #[test]
    fn a_key_of_several_triggers_needs_a_description_that_draws_anew() {
        let mut cfg = Config::default();
        cfg.backdoor.triggers = Some(3);
        assert_eq!(resolve_key(&cfg, None).unwrap().marks().len(), 3);
        for fixed in ["zero", "seed:4"] {
            cfg.backdoor.trigger = Some(fixed.into());
            let msg = resolve_key(&cfg, None).unwrap_err().to_string();
            assert!(msg.contains("same trigger"), "{fixed}: {msg}");
        }
        // A hand-chosen description alone keeps its one trigger.
        cfg.backdoor.triggers = None;
        assert_eq!(resolve_key(&cfg, None).unwrap().marks().len(), 1);
        cfg.backdoor.triggers = Some(0);
        assert!(resolve_key(&cfg, None).is_err());
    }

    #[test]
    fn a_training_run_makes_images_of_its_data_s_shape() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..2u8 {
            image::RgbImage::from_pixel(12, 12, image::Rgb([i * 100, 30, 200]))
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        let o = Overrides {
            data: Some(dir.path().to_path_buf()),
            ..Overrides::default()
        };
        let d = RunSpec::train(diffusion_config(), &o, None).unwrap();
        let net = &d.config.diffusion.diffusers;
        assert_eq!(
            (net.in_channels, net.image_shape().unwrap()),
            (3, [3, 12, 12])
        );
        let key = d.key.unwrap();
        assert_eq!(key.first().target.shape, [3, 12, 12]);
        key.first().trigger.check_fits_image([3, 12, 12]).unwrap();
        let g = RunSpec::train(Config::default(), &o, None).unwrap();
        assert_eq!(g.config.model.image_shape(), [3, 12, 12]);
        // Non-square images, and sizes a model cannot make, are refused by name (the first
        // image decides the folder's shape).
        for ((w, h), words) in [
            ((12, 8), &["square", "3×8×12"][..]),
            ((10, 10), &["multiple of 4"]),
        ] {
            image::RgbImage::new(w, h)
                .save(dir.path().join("0.png"))
                .unwrap();
            let msg = RunSpec::train(Config::default(), &o, None)
                .unwrap_err()
                .to_string();
            assert!(words.iter().all(|w| msg.contains(w)), "{msg}");
        }
    }
}
