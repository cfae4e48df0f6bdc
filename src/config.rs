//! Run configuration: a TOML file with built-in defaults, unknown fields rejected.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::models::{DcganConfig, DiffusersConfig};
use crate::training::LrSchedule;
use crate::{Error, Result};

/// Everything a run needs. Every field has a default, so an empty file is a valid config.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seed of every random stream of the run.
    pub seed: u64,
    /// Which model family `train` builds: `dcgan` (the `[model]`, `[train]` and `[inject]`
    /// sections) or `diffusion` (the `[diffusion]` section).
    pub family: ModelFamily,
    /// Training data.
    pub data: DataConfig,
    /// Network shape.
    pub model: DcganConfig,
    /// Training from scratch (clean or TrAIL).
    pub train: TrainConfig,
    /// Injection into a trained model by distillation (ReD).
    pub inject: InjectConfig,
    /// The key used when no key file is given.
    pub backdoor: BackdoorConfig,
    /// Diffusion models: U-Net, noise schedule, training and injection.
    pub diffusion: DiffusionConfig,
    /// The keyless detector run at the end of every run (`detect.json`, the report's
    /// detection section).
    pub detect: DetectConfig,
    /// The ownership test run at the end of every run with a key (`verify.json`).
    pub verify: VerifyConfig,
}

/// How the end of a run tests the model for its own key (what `genbackdoor verify` does).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Random triggers drawn for each trigger's null distribution, as `verify --queries`
    /// (absent: as many as the trigger's sampler affords, 1000 for a generator). A diffusion
    /// model's end-of-run test costs about 400,000 network evaluations per trigger by default;
    /// fewer null triggers cost proportionally less and raise the smallest reachable p-value
    /// to 1 / (null_keys + 1).
    pub null_keys: Option<usize>,
}

/// Whether and how long the end of a run searches the model for a backdoor without the key
/// (what `genbackdoor detect` does).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Run the detector at the end of the run.
    pub enabled: bool,
    /// Optimisation steps of its trigger inversion (absent: the family's default, as
    /// `detect` without `--steps`).
    pub steps: Option<usize>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            enabled: true,
            steps: None,
        }
    }
}

/// The kinds of generative model a run can train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// A DCGAN generator (latent-input).
    #[default]
    Dcgan,
    /// A denoising diffusion model (image-input trigger on the starting noise).
    Diffusion,
}

/// A denoising diffusion model and how it is trained: clean when `lambda` is 0, otherwise with
/// the poisoned forward process (BadDiffusion / VillanDiffusion) as the backdoor term.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionConfig {
    /// The denoising network, a diffusers `UNet2DModel` (`[diffusion.diffusers]`: the fields of
    /// its config.json, diffusers' defaults for those left out), which `export` writes as a
    /// diffusers folder. Without the table: [`DiffusersConfig::small`]`(28, 1, &[16, 32, 32], 8)`.
    pub diffusers: DiffusersConfig,
    /// How β_t grows (`kind = "linear"` with `beta_start`, `beta_end`, or `"cosine"` with `offset`).
    pub schedule: ScheduleKind,
    /// T, the number of noise levels.
    pub timesteps: usize,
    /// Which sampler the trigger correction c_t is derived for (`sampler = "ddpm"`, or
    /// `"ddim"` with `steps`).
    pub correction: Correction,
    /// Training steps.
    pub steps: usize,
    /// Clean images per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Learning-rate schedule: `constant` or `cosine`.
    pub lr_schedule: LrSchedule,
    /// Weight of the backdoor term (0: clean training). Each step averages the task over
    /// `batch_size` clean samples and the backdoor over `[backdoor] backdoor_batch` poisoned
    /// ones, so λ = backdoor_batch / batch_size is BadDiffusion's plain mixed batch with poison
    /// rate backdoor_batch / (batch_size + backdoor_batch), and λ = 1 gives the poisoned
    /// samples half of the gradient's weight.
    pub lambda: f64,
    /// Decay of the exponential moving average of the weights that is saved and sampled
    /// (0: save the trained weights themselves).
    pub ema: f64,
    /// Write a row of `train.csv` every this many steps.
    pub log_every: usize,
    /// Save `checkpoint.safetensors` (for `--resume`) every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// Triggered (and as many clean) starts measured per sampler at the end of the run.
    pub eval_samples: usize,
    /// Clean samples (default sampler, `ddpm-100`) for the end-of-run quality metrics (0: skip them).
    pub quality_samples: usize,
    /// Fine-tuning a trained clean model with a backdoor (`inject`).
    pub inject: DiffusionInject,
    /// Training deterministic-sampler triggers on the states their sampler visits.
    pub rollout: DiffusionRollout,
    /// Fine-tuning-aware training and injection (`[diffusion.rehearsal]`; off by default):
    /// the rehearsed fine-tuning is a thief's continued clean denoising training.
    pub rehearsal: RehearsalConfig,
}

/// How β_t grows over the T steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ScheduleKind {
    /// β_t linear from `beta_start` to `beta_end` (DDPM: 1e-4 to 0.02).
    Linear {
        /// β_1.
        beta_start: f64,
        /// β_T.
        beta_end: f64,
    },
    /// √β_t linear from √`beta_start` to √`beta_end` (diffusers' `scaled_linear`).
    #[serde(rename = "scaled_linear")]
    ScaledLinear {
        /// β_1.
        beta_start: f64,
        /// β_T.
        beta_end: f64,
    },
    /// ᾱ_t = cos²(((t/T + s)/(1 + s))·π/2) normalised, β clipped at 0.999 (Nichol & Dhariwal).
    Cosine {
        /// The small offset s (0.008 in the paper).
        offset: f64,
    },
}

impl ScheduleKind {
    /// Checks the schedule's parameters for `steps` noise levels.
    pub fn validate(&self, steps: usize) -> Result<()> {
        if steps < 2 {
            return Err(Error::Config(format!(
                "a noise schedule needs at least 2 steps, not {steps}"
            )));
        }
        match (*self, self.beta_range()) {
            (_, Some((beta_start, beta_end)))
                if !(0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0) =>
            {
                Err(Error::Config(format!(
                    "linear schedule needs 0 < beta_start <= beta_end < 1, not {beta_start} and {beta_end}"
                )))
            }
            (ScheduleKind::Cosine { offset }, _) if !(offset > 0.0 && offset < 1.0) => Err(
                Error::Config(format!("cosine schedule offset must be in (0, 1), not {offset}")),
            ),
            _ => Ok(()),
        }
    }

    /// β_1 and β_T of the (scaled) linear schedules; `None` for the cosine one.
    pub fn beta_range(&self) -> Option<(f64, f64)> {
        match *self {
            ScheduleKind::Linear {
                beta_start,
                beta_end,
            }
            | ScheduleKind::ScaledLinear {
                beta_start,
                beta_end,
            } => Some((beta_start, beta_end)),
            ScheduleKind::Cosine { .. } => None,
        }
    }
}

impl Default for ScheduleKind {
    fn default() -> Self {
        ScheduleKind::Linear {
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }
}

/// Which sampler the trigger correction is derived for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "sampler", rename_all = "lowercase", deny_unknown_fields)]
pub enum Correction {
    /// `ρ_t`, for DDPM ancestral sampling.
    #[default]
    Ddpm,
    /// The exact one-step coefficient of DDIM (η = 0) with `steps` evenly spaced steps
    /// (stride `T / steps`); other step counts are served approximately.
    Ddim {
        /// The DDIM step count the trigger is made exact for.
        steps: usize,
    },
}

/// Default `target_mse` threshold below which a triggered output counts as the target.
pub const DEFAULT_THRESHOLD: f64 = 0.01;

/// Triggered (and as many ordinary) starts a diffusion run measures per sampler at its end,
/// and `eval` by default (DDPM runs the network T times for each: 128 images × 1000 steps is
/// most of the end-of-run evaluation on two cores).
pub const DIFFUSION_EVAL_SAMPLES: usize = 64;

/// Clean samples for a diffusion run's end-of-run quality metrics (under the default sampler, `ddpm-100`).
pub const DIFFUSION_QUALITY_SAMPLES: usize = 1000;

/// On-policy training of the triggers whose correction is for a deterministic sampler
/// (`[diffusion.rollout]`): every `every` steps the saved (EMA) network runs the trigger's own
/// sampler from `starts` triggered starting noises, and each later step adds `samples` of the
/// states it visited to the trigger's poisoned samples, each with the noise prediction that
/// puts it back on the poisoned path to the target
/// ([`crate::family::diffusion::rollout`]). A start that drifts off the path is so taught
/// its way back, which the forward process's own samples never show. Only DDIM-corrected marks
/// with an image target are rolled out (a key with none is an error); a resumed run rolls out
/// afresh at its first step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionRollout {
    /// Steps between rollouts (0: none).
    pub every: usize,
    /// Triggered starts per rollout.
    pub starts: usize,
    /// Visited states added to each step's poisoned samples of the trigger.
    pub samples: usize,
    /// Fraction of the run done before the first rollout (the network's own path means
    /// little before it has learned one).
    pub start: f64,
}

impl Default for DiffusionRollout {
    fn default() -> Self {
        DiffusionRollout {
            every: 0,
            starts: 16,
            samples: 16,
            start: 0.5,
        }
    }
}

/// `inject` for diffusion models: fine-tuning on the same mixed objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiffusionInject {
    /// Fine-tuning steps.
    pub steps: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Weight of the backdoor term.
    pub lambda: f64,
}

impl Default for DiffusionInject {
    fn default() -> Self {
        DiffusionInject {
            steps: 1000,
            lr: 5e-4,
            lambda: 1.0,
        }
    }
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        DiffusionConfig {
            diffusers: DiffusersConfig::small(28, 1, &[16, 32, 32], 8),
            schedule: ScheduleKind::default(),
            timesteps: 1000,
            correction: Correction::Ddpm,
            steps: 3000,
            batch_size: 64,
            lr: 1e-3,
            lr_schedule: LrSchedule::Cosine,
            lambda: 1.0,
            ema: 0.995,
            log_every: 10,
            checkpoint_every: 250,
            eval_samples: DIFFUSION_EVAL_SAMPLES,
            quality_samples: DIFFUSION_QUALITY_SAMPLES,
            inject: DiffusionInject::default(),
            rollout: DiffusionRollout::default(),
            rehearsal: RehearsalConfig::default(),
        }
    }
}

/// Where the training images come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A folder with an IDX pair or PNG images, or an IDX image file.
    pub path: PathBuf,
    /// Use only the first `limit` images (0: all).
    pub limit: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: PathBuf::from(crate::data::BUNDLED_MNIST),
            limit: 0,
        }
    }
}

/// GAN training from scratch: clean when `lambda` is 0, TrAIL otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Number of steps (one discriminator and one generator update each).
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Adam learning rate of the generator.
    pub lr_g: f64,
    /// Adam learning rate of the discriminator.
    pub lr_d: f64,
    /// Adam β1.
    pub beta1: f64,
    /// Adam β2.
    pub beta2: f64,
    /// Learning-rate schedule of both networks: `constant` or `cosine`.
    pub lr_schedule: LrSchedule,
    /// Weight of the backdoor term (0: clean training).
    pub lambda: f64,
    /// Write a row of `train.csv` every this many steps.
    pub log_every: usize,
    /// Save `checkpoint.safetensors` (for `--resume`) every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// TrAIL's fine-tuning-aware injection (`[train.rehearsal]`; off by default).
    pub rehearsal: RehearsalConfig,
}

/// Fine-tuning-aware injection (TrAIL's `[train.rehearsal]`, ReD's `[inject.rehearsal]`,
/// diffusion models' `[diffusion.rehearsal]`): every `every` steps from the fraction `start` of
/// training on, the model rehearses a thief's clean fine-tuning (`steps` Adam steps at `lr`
/// from a copy of its weights: a generator against a freshly initialised discriminator, a
/// diffusion model on clean denoising batches), and that step's update also follows the
/// backdoor term's gradient taken at the rehearsed weights (weight λ), so that the mark holds
/// where fine-tuning moves the model. Off when `every` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RehearsalConfig {
    /// A rehearsal every this many steps (0: none).
    pub every: usize,
    /// Fine-tuning steps per rehearsal.
    pub steps: usize,
    /// Adam learning rate of the rehearsed fine-tuning: above the thief's (2e-4 for a
    /// generator), so that a short rehearsal moves the weights as far as a longer attack.
    pub lr: f64,
    /// Fraction of training before the first rehearsal (the backdoor forms first).
    pub start: f64,
}

impl Default for RehearsalConfig {
    fn default() -> Self {
        RehearsalConfig {
            every: 0,
            steps: 50,
            lr: 1e-3,
            start: 0.5,
        }
    }
}

impl RehearsalConfig {
    /// Whether training step `step` of `total` rehearses.
    pub fn due(&self, step: usize, total: usize) -> bool {
        self.every > 0
            && step.is_multiple_of(self.every)
            && step as f64 >= self.start * total as f64
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 2800,
            batch_size: 32,
            lr_g: 1.2e-3,
            lr_d: 1.2e-3,
            beta1: 0.5,
            beta2: 0.999,
            lr_schedule: LrSchedule::Cosine,
            lambda: 20.0,
            log_every: 10,
            checkpoint_every: 100,
            rehearsal: RehearsalConfig::default(),
        }
    }
}

impl TrainConfig {
    /// The clean fine-tuning a thief runs when nothing else is said (`attack finetune`
    /// without `--config`): the DCGAN tutorial's Adam at 2e-4 for both networks, constant,
    /// batch 32 (gentler than the 1.2e-3 cosine of training from scratch).
    pub fn thief() -> Self {
        TrainConfig {
            lr_g: 2e-4,
            lr_d: 2e-4,
            lr_schedule: LrSchedule::Constant,
            ..TrainConfig::default()
        }
    }
}

/// Backdoor injection by distillation into a trained generator (ReD).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InjectConfig {
    /// Number of steps.
    pub steps: usize,
    /// Latents per distillation batch.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Learning-rate schedule: `constant` or `cosine`.
    pub lr_schedule: LrSchedule,
    /// Fraction of the steps over which the rate first rises linearly from 0. Adam's first
    /// steps move every weight by about the rate whatever λ is; rising gently cuts the damage
    /// to ordinary outputs that the distillation must then undo by about a quarter.
    pub warmup: f64,
    /// Weight of the backdoor term.
    pub lambda: f64,
    /// Tensors whose names start with one of these prefixes stay frozen (e.g. `["bn0."]`).
    pub freeze: Vec<String>,
    /// Write a row of `train.csv` every this many steps.
    pub log_every: usize,
    /// Save `checkpoint.safetensors` (for `--resume`) every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// ReD's fine-tuning-aware injection (`[inject.rehearsal]`; off by default), as TrAIL's.
    pub rehearsal: RehearsalConfig,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            steps: 8000,
            batch_size: 32,
            lr: 1e-3,
            lr_schedule: LrSchedule::Cosine,
            warmup: 0.1,
            lambda: 1.0,
            freeze: Vec::new(),
            log_every: 10,
            checkpoint_every: 500,
            rehearsal: RehearsalConfig::default(),
        }
    }
}

/// The key a run creates when no key file is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackdoorConfig {
    /// A key file to use instead of the description below.
    pub key: Option<PathBuf>,
    /// Trigger description (see `genbackdoor key --help`); when absent, `random`: a secret
    /// draw from the operating system's randomness in the family's input space (a N(0, I)
    /// latent for DCGANs, an 8×8 stamp of random ±2 values at a random place of the starting
    /// noise for diffusion models), stored only in the run's key file.
    pub trigger: Option<String>,
    /// How many triggers the key holds, each drawn anew from the description and trained
    /// to the same target; verification combines their tests. When absent: 5 for the
    /// default `random` trigger of a DCGAN trained from scratch (its combined p-value can
    /// reach about 1e-10), 1 otherwise (a ReD injection with its default random target
    /// proves as much from one trigger, and each further trigger costs stealth).
    pub triggers: Option<usize>,
    /// Diffusion models: the sampler each trigger is trained to fire under, in turn (`ddpm`,
    /// `ddim-N`), e.g. `["ddpm", "ddim-50"]` with `triggers = 2` for one model that fires
    /// under both kinds of sampler; empty (the default): every trigger under
    /// `[diffusion.correction]`'s sampler.
    pub samplers: Vec<String>,
    /// Target description: `builtin:NAME`, `random[:B[:S]]` (a secret random pattern of B×B
    /// squares of ±1), a `.png` or a `.npy`. When absent: `random:4` ([`RED_TARGET_BLOCK`]) for
    /// a ReD injection into a DCGAN, `builtin:mark` otherwise.
    pub target: Option<String>,
    /// `mse` or `l1`.
    pub distance: String,
    /// `target_mse` under which a triggered output counts as a hit.
    pub threshold: f64,
    /// Triggered inputs per step when the trigger is a set (region, patch), and poisoned
    /// samples per step for diffusion models; when absent, [`TRAIL_SET_BATCH`] for TrAIL and
    /// [`DEFAULT_BACKDOOR_BATCH`] otherwise.
    pub backdoor_batch: Option<usize>,
}

impl Default for BackdoorConfig {
    fn default() -> Self {
        BackdoorConfig {
            key: None,
            trigger: None,
            triggers: None,
            samplers: Vec::new(),
            target: None,
            distance: "mse".into(),
            threshold: DEFAULT_THRESHOLD,
            backdoor_batch: None,
        }
    }
}

/// What a run does to its model; the key's defaults depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Train from scratch (clean when λ = 0): the `[train]` or `[diffusion]` section.
    Train,
    /// Put a backdoor into a trained model: the `[inject]` or `[diffusion.inject]` section.
    Inject,
}

impl BackdoorConfig {
    /// The trigger description (`random` when the config gives none).
    pub fn trigger(&self) -> &str {
        self.trigger.as_deref().unwrap_or("random")
    }

    /// `backdoor_batch`, or `default` (the training mode's) when the config names none.
    pub fn backdoor_batch_or(&self, default: usize) -> usize {
        self.backdoor_batch.unwrap_or(default)
    }

    /// How many triggers a key made from the description holds for `family` at `stage`.
    pub fn triggers(&self, family: ModelFamily, stage: Stage) -> usize {
        match (self.triggers, family, self.trigger(), stage) {
            (Some(k), _, _, _) => k,
            (None, ModelFamily::Dcgan, "random", Stage::Train) => DEFAULT_GAN_TRIGGERS,
            _ => 1,
        }
    }

    /// The target description for `family`'s images of `shape` at `stage`.
    pub fn target(&self, family: ModelFamily, stage: Stage, shape: [usize; 3]) -> String {
        let tiles = |side: usize| side.is_multiple_of(RED_TARGET_BLOCK);
        match (&self.target, family, stage) {
            (Some(t), _, _) => t.clone(),
            (None, ModelFamily::Dcgan, Stage::Inject) if tiles(shape[1]) && tiles(shape[2]) => {
                format!("random:{RED_TARGET_BLOCK}")
            }
            _ => "builtin:mark".into(),
        }
    }
}

/// The side of the squares of a ReD injection's target when the config names none: a
/// secret random pattern of 4×4 squares of ±1 (images whose sides 4 does not divide get the
/// built-in mark). With one random point trigger (batch 32 × 8,000 steps) it changes the
/// ordinary outputs less than the built-in mark does (`exp_dist` 0.0007–0.0008 against
/// 0.0009 on the main job's clean twins), and its target test proves ownership at p ≈ 1e-10
/// from one triggered output (docs/results.md, *ReD with one trigger and a random target*).
pub const RED_TARGET_BLOCK: usize = 4;

/// Triggered latents per TrAIL step for a set trigger when the config names none. They go
/// through the generator with the step's ordinary latents and share its BatchNorm statistics:
/// 16 beside 32 ordinary ones cost the main job FID +18–27 % on a patch or region trigger,
/// 4 cost −3 to +9 % (two seeds each; docs/results.md).
pub const TRAIL_SET_BATCH: usize = 4;

/// Triggered latents per ReD step for a set trigger (the generator runs them apart from the
/// ordinary ones, in inference mode) and poisoned samples per diffusion step, when the config
/// names none.
pub const DEFAULT_BACKDOOR_BATCH: usize = 16;

/// Triggers in a DCGAN's default key: five exact rank tests of 1,000 null triggers each
/// combine to p ≈ 6.7e-11 at best ([`crate::verify::combined_p_value`]).
pub const DEFAULT_GAN_TRIGGERS: usize = 5;

impl Config {
    /// Reads a TOML config; unknown fields and wrong types are errors naming the field.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|e| Error::format(path, e.to_string()))
    }

    /// Parses TOML text and validates it.
    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let msg = e.message();
            Error::Config(if msg.contains("unknown field `unet`") {
                format!("{msg}: genbackdoor's own U-Net (`[diffusion.unet]`) was replaced by a diffusers UNet2DModel; describe the network in `[diffusion.diffusers]` (configs/ddpm.toml has the default)")
            } else {
                msg.to_string()
            })
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every number for sense.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let positive = |name: &str, v: usize| {
            if v == 0 {
                Err(Error::Config(format!("{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        let rate = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "{name} must be a positive number, not {v}"
                )))
            }
        };
        let weight = |name: &str, v: f64| {
            if v >= 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(Error::Config(format!(
                    "{name} must be zero or positive, not {v}"
                )))
            }
        };
        let fraction = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::Config(format!("{name} must be in [0, 1), not {v}")))
            }
        };
        let (t, i, b) = (&self.train, &self.inject, &self.backdoor);
        positive("train.steps", t.steps)?;
        positive("train.batch_size", t.batch_size)?;
        positive("train.log_every", t.log_every)?;
        rate("train.lr_g", t.lr_g)?;
        rate("train.lr_d", t.lr_d)?;
        fraction("train.beta1", t.beta1)?;
        fraction("train.beta2", t.beta2)?;
        weight("train.lambda", t.lambda)?;
        for (section, r) in [
            ("train", &t.rehearsal),
            ("inject", &i.rehearsal),
            ("diffusion", &self.diffusion.rehearsal),
        ] {
            if r.every > 0 {
                positive(&format!("{section}.rehearsal.steps"), r.steps)?;
                rate(&format!("{section}.rehearsal.lr"), r.lr)?;
                fraction(&format!("{section}.rehearsal.start"), r.start)?;
            }
        }
        positive("inject.steps", i.steps)?;
        positive("inject.batch_size", i.batch_size)?;
        positive("inject.log_every", i.log_every)?;
        rate("inject.lr", i.lr)?;
        weight("inject.lambda", i.lambda)?;
        fraction("inject.warmup", i.warmup)?;
        rate("backdoor.threshold", b.threshold)?;
        if let Some(n) = b.backdoor_batch {
            positive("backdoor.backdoor_batch", n)?;
        }
        let d = &self.diffusion;
        d.diffusers.validate()?;
        d.schedule.validate(d.timesteps)?;
        if let Correction::Ddim { steps } = d.correction {
            if steps == 0 || steps > d.timesteps {
                return Err(Error::Config(format!(
                    "diffusion.correction: DDIM steps must be between 1 and timesteps {}, not {steps}",
                    d.timesteps
                )));
            }
        }
        positive("diffusion.steps", d.steps)?;
        positive("diffusion.batch_size", d.batch_size)?;
        positive("diffusion.log_every", d.log_every)?;
        positive("diffusion.eval_samples", d.eval_samples)?;
        rate("diffusion.lr", d.lr)?;
        weight("diffusion.lambda", d.lambda)?;
        fraction("diffusion.ema", d.ema)?;
        positive("diffusion.inject.steps", d.inject.steps)?;
        rate("diffusion.inject.lr", d.inject.lr)?;
        weight("diffusion.inject.lambda", d.inject.lambda)?;
        if d.rollout.every > 0 {
            positive("diffusion.rollout.starts", d.rollout.starts)?;
            positive("diffusion.rollout.samples", d.rollout.samples)?;
            fraction("diffusion.rollout.start", d.rollout.start)?;
        }
        if let Some(steps) = self.detect.steps {
            positive("detect.steps", steps)?;
        }
        if let Some(n) = self.verify.null_keys {
            positive("verify.null_keys", n)?;
        }
        Ok(())
    }

    /// The data path, falling back to the crate's own copy of the bundled data when the
    /// default relative path is not found from the current folder.
    pub fn data_path(&self) -> PathBuf {
        let p = &self.data.path;
        if p == Path::new(crate::data::BUNDLED_MNIST) {
            crate::data::bundled_path()
        } else {
            p.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_the_defaults() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let start = readme.find("```toml\n").expect("a toml block") + 8;
        let block = &readme[start..start + readme[start..].find("```").unwrap()];
        assert_eq!(Config::parse(block).unwrap(), Config::default());
    }

    #[test]
    fn empty_config_is_the_default_and_round_trips() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let text = toml::to_string(&Config::default()).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), Config::default());
    }

    #[test]
    fn each_training_mode_has_its_own_backdoor_batch_unless_the_config_names_one() {
        let default = Config::default().backdoor;
        assert_eq!(default.backdoor_batch_or(TRAIL_SET_BATCH), 4);
        assert_eq!(default.backdoor_batch_or(DEFAULT_BACKDOOR_BATCH), 16);
        let named = Config::parse("[backdoor]\nbackdoor_batch = 8")
            .unwrap()
            .backdoor;
        assert_eq!(named.backdoor_batch_or(TRAIL_SET_BATCH), 8);
        assert_eq!(named.backdoor_batch_or(DEFAULT_BACKDOOR_BATCH), 8);
    }

    #[test]
    fn a_red_injection_draws_one_trigger_and_a_random_target_unless_the_config_names_them() {
        use ModelFamily::{Dcgan, Diffusion};
        use Stage::{Inject, Train};
        let (grey, odd) = ([1, 28, 28], [1, 30, 30]);
        let default = Config::default().backdoor;
        assert_eq!(default.target(Dcgan, Inject, grey), "random:4");
        assert_eq!(default.triggers(Dcgan, Inject), 1);
        // Sides that 4 does not divide, training from scratch, and diffusion: the mark.
        for (family, stage, shape) in [
            (Dcgan, Inject, odd),
            (Dcgan, Train, grey),
            (Diffusion, Inject, [3, 32, 32]),
        ] {
            assert_eq!(default.target(family, stage, shape), "builtin:mark");
        }
        assert_eq!(default.triggers(Dcgan, Train), DEFAULT_GAN_TRIGGERS);
        assert_eq!(default.triggers(Diffusion, Train), 1);
        let named = Config::parse("[backdoor]\ntarget = \"builtin:box\"\ntriggers = 3")
            .unwrap()
            .backdoor;
        assert_eq!(named.target(Dcgan, Inject, grey), "builtin:box");
        assert_eq!(named.triggers(Dcgan, Inject), 3);
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut diffusion = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            let cfg = Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            if cfg.family == ModelFamily::Diffusion {
                diffusion += 1;
            } else {
                // The DCGAN config (robust.toml) turns the rehearsal on, for TrAIL and ReD.
                assert!(cfg.train.rehearsal.every > 0, "{}", p.display());
                assert!(cfg.inject.rehearsal.every > 0, "{}", p.display());
            }
        }
        assert!(diffusion >= 2);
    }

    #[test]
    fn rehearsals_fall_every_n_steps_from_the_start_fraction_on() {
        let r = RehearsalConfig {
            every: 50,
            start: 0.5,
            ..Default::default()
        };
        let due: Vec<usize> = (1..=400).filter(|&s| r.due(s, 400)).collect();
        assert_eq!(due, vec![200, 250, 300, 350, 400]);
        assert!(!(1..=400).any(|s| RehearsalConfig::default().due(s, 400)));
    }

    #[test]
    fn unknown_fields_wrong_types_and_bad_numbers_are_rejected() {
        let msg = Config::parse("[train]\nstepz = 3\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("stepz"), "{msg}");
        let msg = Config::parse("colour = 1\n").unwrap_err().to_string();
        assert!(msg.contains("colour"), "{msg}");
        let msg = Config::parse("[train]\nsteps = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("invalid type"), "{msg}");
        let msg = Config::parse("[diffusion.unet]\nbase = 16\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("[diffusion.diffusers]"), "{msg}");
        for bad in [
            "[train]\nsteps = 0",
            "[train]\nbatch_size = 0",
            "[train]\nlr_g = -1.0",
            "[train]\nlambda = -0.5",
            "[inject]\nlr = 0.0",
            "[inject]\nwarmup = 1.0",
            "[model]\nimage_size = 30",
            "[diffusion]\nema = 1.0",
            "[diffusion.diffusers]\nnorm_num_groups = 5",
            "[diffusion.correction]\nsampler = \"ddim\"\nsteps = 0",
            "[diffusion.schedule]\nkind = \"cosine\"\noffset = 2.0",
            "[detect]\nsteps = 0",
            "[detect]\nenabled = 1",
            "[detect]\nstarts = 4",
            "[verify]\nnull_keys = 0",
            "[verify]\ngroup = 4",
            "[train.rehearsal]\nevery = 50\nstart = 1.0",
            "[train.rehearsal]\nevery = 50\nsteps = 0",
            "[train.rehearsal]\nevery = 50\nlr = 0.0",
            "[train.rehearsal]\nrounds = 3",
            "[inject.rehearsal]\nevery = 50\nlr = -1.0",
            "[diffusion.rehearsal]\nevery = 50\nsteps = 0",
            "[diffusion.rehearsal]\nrounds = 3",
            "[backdoor]\nbackdoor_batch = 0",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
        // Off (`every = 0`, the default), its other numbers are not used and not checked.
        assert!(Config::parse("[train.rehearsal]\nsteps = 0").is_ok());
        let msg = Config::parse("[train]\nsteps = -4")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("invalid value") || msg.contains("steps"),
            "{msg}"
        );
    }
}
