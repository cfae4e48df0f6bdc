//! A trained denoising diffusion model: the U-Net, its noise schedule, checkpoints, and
//! sampling with either sampler from clean or triggered starts.

use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::backdoor::Trigger;
use crate::family::diffusion::diffusers;
use crate::family::diffusion::sampler::DPM_SOLVER_STEPS;
use crate::family::diffusion::{NoiseSchedule, Sampler, ScheduleKind};
use crate::family::{CleanFinetune, Generative, InputSpace};
use crate::io::checkpoint;
use crate::io::rundir::RunDir;
use crate::models::{DiffusersConfig, DiffusersUnet, Params};
use crate::rng::Rng;
use crate::{Error, Result};

/// The family name stored in diffusion checkpoints.
pub const FAMILY: &str = "ddpm-unet";

/// Images sampled together (one network call per sampler step).
const SAMPLE_BATCH: usize = 256;

/// Everything needed to rebuild a diffusion model from a checkpoint: the network and the
/// schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffusionArch {
    /// The network: a diffusers `UNet2DModel`, the one U-Net genbackdoor builds (the default
    /// diffusion model is [`DiffusersConfig::small`]; a diffusers folder brings its own).
    pub diffusers: DiffusersConfig,
    /// How β_t grows.
    pub schedule: ScheduleKind,
    /// T.
    pub timesteps: usize,
}

/// The network of a diffusion model: a diffusers `UNet2DModel` under diffusers' tensor names,
/// called with genbackdoor's timesteps.
pub struct Denoiser(Box<DiffusersUnet>);

impl Denoiser {
    /// The network `arch` describes, its tensors taken from `vb`.
    fn build(arch: &DiffusionArch, vb: VarBuilder) -> Result<Self> {
        Ok(Denoiser(Box::new(DiffusersUnet::new(&arch.diffusers, vb)?)))
    }

    /// ε̂ for noisy images `x` at genbackdoor's timesteps `t` (`[n]`, f32, 1 … T); the network
    /// is given diffusers' τ = t − 1, which reads the same ᾱ.
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.0.forward(x, &(t - 1.0)?)
    }

    /// ε̂ for a batch `x` all at timestep `t`.
    pub fn predict(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let ts = Tensor::full(t as f32, x.dim(0)?, x.device())?;
        self.forward(x, &ts)
    }

    /// Forward multiply-adds per image.
    pub fn macs(&self) -> u64 {
        self.0.macs()
    }

    /// `[channels, side, side]`, the shape of one image.
    pub fn image_shape(&self) -> [usize; 3] {
        self.0
            .config()
            .image_shape()
            .expect("checked when the network was built")
    }

    /// The diffusers network itself.
    pub fn network(&self) -> &DiffusersUnet {
        &self.0
    }
}

/// A denoiser ε_θ(x_t, t) with its schedule.
pub struct DiffusionModel {
    /// Its tensors.
    pub params: Params,
    /// The network.
    pub unet: Denoiser,
    /// The architecture and schedule it was built from.
    pub arch: DiffusionArch,
    /// The schedule's β_t and ᾱ_t.
    pub schedule: NoiseSchedule,
    /// Where its tensors live.
    pub device: Device,
    /// The sampler [`Generative::generate`] runs ([`Sampler::default_for`] unless set).
    pub sampler: Sampler,
}

impl DiffusionModel {
    /// The network of `arch` with uninitialised (zero) tensors.
    pub(crate) fn build(arch: &DiffusionArch, device: &Device) -> Result<Self> {
        let schedule = NoiseSchedule::new(arch.schedule, arch.timesteps)?;
        let params = Params::new();
        let unet = Denoiser::build(arch, params.builder(device))?;
        Ok(DiffusionModel {
            params,
            unet,
            arch: arch.clone(),
            sampler: Sampler::default_for(&schedule),
            schedule,
            device: device.clone(),
        })
    }

    /// A freshly initialised model (PyTorch's default initialisation, from `rng`).
    pub fn new(arch: &DiffusionArch, rng: &mut Rng, device: &Device) -> Result<Self> {
        let m = Self::build(arch, device)?;
        m.params.init_fan_in_uniform(rng)?;
        Ok(m)
    }

    /// Loads a checkpoint written by [`DiffusionModel::save`], or a diffusers folder.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if diffusers::is_folder(path) {
            return diffusers::load_folder(path, device);
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, &bytes, device)
    }

    /// Parses the bytes of a checkpoint (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8], device: &Device) -> Result<Self> {
        let (arch, file): (serde_json::Value, _) =
            checkpoint::parse_family(path, bytes, FAMILY, device)?;
        if arch.get("unet").is_some() {
            return Err(Error::format(
                path,
                "holds a model of genbackdoor's former own U-Net, which this version no longer builds: every diffusion model is now a diffusers UNet2DModel (`[diffusion.diffusers]`); train it again with this version",
            ));
        }
        let arch: DiffusionArch = serde_json::from_value(arch)
            .map_err(|e| Error::format(path, format!("architecture metadata is invalid: {e}")))?;
        let m = Self::build(&arch, device)
            .map_err(|e| Error::format(path, format!("architecture metadata: {e}")))?;
        checkpoint::assign(path, &m.params, &file)?;
        Ok(m)
    }

    /// Writes the checkpoint atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let arch = serde_json::to_string(&self.arch).expect("serialisable architecture");
        checkpoint::save_params(path, &self.params, FAMILY, &arch)
    }

    /// An independent copy (same architecture, values and sampler).
    pub fn duplicate(&self) -> Result<Self> {
        let mut m = Self::build(&self.arch, &self.device)?;
        m.params.copy_from(&self.params)?;
        m.sampler = self.sampler;
        Ok(m)
    }

    /// `[channels, side, side]`, the shape of one image.
    pub fn image_shape(&self) -> [usize; 3] {
        self.unet.image_shape()
    }

    /// The network over detached views of the weights ([`Params::frozen_builder`]): for
    /// sampling, which then records no graph (no activations kept, no bookkeeping), and for
    /// gradients with respect to inputs only. It shares the weights' storage, so it computes
    /// with their current values (an optimiser's update included).
    pub fn frozen(&self) -> Result<Denoiser> {
        Denoiser::build(&self.arch, self.params.frozen_builder(&self.device))
    }

    /// `n` starting points x_T ~ N(r, I): `r` the trigger's pattern, or 0 without a trigger.
    pub fn starts(&self, n: usize, trigger: Option<&Trigger>, rng: &mut Rng) -> Result<Tensor> {
        let space = self.input_space();
        match trigger {
            None => space.ordinary(n, rng, &self.device),
            Some(t) => t.inputs(&space, n, rng, &self.device),
        }
    }

    /// Runs `sampler` from `starts` (in batches), returning images; non-finite outputs are an
    /// error, never returned as images.
    pub fn sample(&self, sampler: Sampler, starts: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let n = starts.dim(0)?;
        let net = self.frozen()?;
        let mut parts = Vec::new();
        for s in (0..n).step_by(SAMPLE_BATCH) {
            let x = starts.narrow(0, s, SAMPLE_BATCH.min(n - s))?.detach();
            let mut predict = |x: &Tensor, t: usize| net.predict(x, t);
            parts.push(sampler.run(&self.schedule, x, &mut predict, rng)?);
        }
        let x = Tensor::cat(&parts, 0)?;
        crate::error::check_finite_output(&x)?;
        Ok(x.clamp(-1f32, 1f32)?)
    }
}

impl Generative for DiffusionModel {
    fn family(&self) -> &'static str {
        FAMILY
    }

    fn input_space(&self) -> InputSpace {
        InputSpace::Noise {
            shape: self.image_shape(),
        }
    }

    fn output_shape(&self) -> [usize; 3] {
        self.image_shape()
    }

    fn generate(&self, inputs: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.sample(self.sampler, inputs, rng)
    }

    fn sampling(&self) -> Option<String> {
        Some(self.sampler.to_string())
    }

    fn set_sampler(&mut self, sampler: Sampler) -> Result<()> {
        sampler.timesteps(&self.schedule)?;
        self.sampler = sampler;
        Ok(())
    }

    fn checking_sampler(&self, trained_for: Sampler) -> Sampler {
        trained_for.checking(&self.schedule)
    }

    /// The default sampler (strided DDPM), DDIM with 50 steps (T when T < 50) and
    /// DPM-Solver++ (2M) with 20 (T when T < 20).
    fn eval_samplers(&self) -> Vec<Sampler> {
        vec![
            Sampler::default_for(&self.schedule),
            Sampler::ddim_for(&self.schedule),
            Sampler::DpmSolver2m {
                steps: DPM_SOLVER_STEPS.min(self.schedule.steps()),
            },
        ]
    }

    fn evaluations_per_image(&self) -> usize {
        self.sampler.evaluations(&self.schedule).unwrap_or(1)
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn save(&self, path: &Path) -> Result<()> {
        DiffusionModel::save(self, path)
    }

    fn duplicate(&self) -> Result<Box<dyn Generative>> {
        Ok(Box::new(DiffusionModel::duplicate(self)?))
    }

    fn detect(&self, settings: &crate::detect::DetectSettings) -> Result<crate::detect::Detection> {
        super::detect::detect(self, settings)
    }

    fn finetune_clean(
        &self,
        attack: &CleanFinetune,
        run: &RunDir,
        measure: &mut dyn FnMut(usize, &dyn Generative) -> Result<()>,
    ) -> Result<Box<dyn Generative>> {
        if attack.discriminator.is_some() {
            return Err(Error::Config(
                "a diffusion model has no discriminator: fine-tuning continues its denoising training".into(),
            ));
        }
        let d = &attack.cfg.diffusion;
        let plan = crate::family::diffusion::train::Plan {
            steps: attack.steps,
            batch_size: d.batch_size,
            lr: d.lr,
            lr_schedule: crate::training::LrSchedule::Constant,
            objective: crate::backdoor::Objective {
                lambda: 0.0,
                backdoor_batch: 0,
            },
            correction: d.correction,
            rollout: Default::default(),
            rehearsal: Default::default(),
            ema: 0.0,
            log_every: d.log_every,
            checkpoint_every: 0,
            seed: attack.cfg.seed,
            stage: "finetune",
        };
        let data = crate::family::diffusion::run::data(attack.cfg)?;
        let tuned = crate::family::diffusion::train::finetune(
            self,
            &data,
            &plan,
            run,
            attack.every,
            attack.progress,
            &mut |step, m| measure(step, m),
        )?;
        Ok(Box::new(tuned))
    }
}

/// A tiny 8×8 model's architecture for unit tests.
#[cfg(test)]
pub(crate) fn tiny_arch(timesteps: usize) -> DiffusionArch {
    DiffusionArch {
        diffusers: DiffusersConfig {
            add_attention: false,
            ..DiffusersConfig::small(8, 1, &[4, 8], 2)
        },
        schedule: ScheduleKind::default(),
        timesteps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> DiffusionArch {
        tiny_arch(20)
    }

    #[test]
    fn checkpoints_round_trip_and_families_are_checked() {
        let dev = Device::Cpu;
        let m = DiffusionModel::new(&tiny(), &mut Rng::new(1), &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        m.save(&p).unwrap();
        let back = DiffusionModel::load(&p, &dev).unwrap();
        assert_eq!(back.arch, m.arch);
        let x = m.starts(3, None, &mut Rng::new(2)).unwrap();
        let a = m
            .sample(Sampler::Ddim { steps: 5 }, &x, &mut Rng::new(3))
            .unwrap();
        let b = back
            .sample(Sampler::Ddim { steps: 5 }, &x, &mut Rng::new(3))
            .unwrap();
        assert_eq!(crate::ops::testing::max_abs_diff(&a, &b), 0.0);
        assert_eq!(a.dims(), &[3, 1, 8, 8]);
        let ddpm = m.sample(Sampler::Ddpm, &x, &mut Rng::new(3)).unwrap();
        assert_eq!(ddpm.dims(), &[3, 1, 8, 8]);
        // A GAN checkpoint is not a diffusion model.
        let gan = crate::family::gan::GanModel::new(
            &crate::models::DcganConfig {
                latent_dim: 4,
                g_width: 4,
                d_width: 4,
                ..Default::default()
            },
            &mut Rng::new(0),
            &dev,
        )
        .unwrap();
        gan.save(&p).unwrap();
        let msg = DiffusionModel::load(&p, &dev).err().unwrap().to_string();
        assert!(msg.contains("dcgan-generator"), "{msg}");
        // A checkpoint of the former own U-Net is refused with a message that says so.
        checkpoint::save_params(&p, &m.params, FAMILY, r#"{"unet": {"base": 16}}"#).unwrap();
        let msg = DiffusionModel::load(&p, &dev).err().unwrap().to_string();
        assert!(msg.contains("former own U-Net"), "{msg}");
        // Triggered starts need an image trigger of the model's shape.
        let wrong = Trigger::parse_image("box:3", [1, 28, 28]).unwrap();
        assert!(m.starts(2, Some(&wrong), &mut Rng::new(0)).is_err());
        let t = Trigger::parse_image("box:3", [1, 8, 8]).unwrap();
        let s = m.starts(400, Some(&t), &mut Rng::new(0)).unwrap();
        let mean_corner = s
            .narrow(2, 5, 3)
            .unwrap()
            .narrow(3, 5, 3)
            .unwrap()
            .mean_all()
            .unwrap();
        assert!((mean_corner.to_scalar::<f32>().unwrap() - 2.0).abs() < 0.05);
    }

    #[test]
    fn a_ddpm_mark_is_checked_under_strided_ddpm_and_other_marks_under_their_own() {
        use crate::backdoor::{Distance, Key, KeySet, Target};
        let dev = Device::Cpu;
        let m = DiffusionModel::new(&tiny_arch(1000), &mut Rng::new(1), &dev).unwrap();
        assert_eq!(m.sampling().as_deref(), Some("ddpm-100"));
        let mark = |sampler| Key {
            trigger: Trigger::parse_image("box:3", [1, 8, 8]).unwrap(),
            target: Target::builtin("mark", [1, 8, 8]).unwrap(),
            distance: Distance::L1,
            threshold: 0.02,
            sampler: Some(sampler),
        };
        let key = KeySet::new(vec![mark(Sampler::Ddpm), mark(Sampler::Ddim { steps: 50 })]);
        let checked = key.unwrap().checked_under(&m);
        let samplers: Vec<_> = checked.marks().iter().map(|k| k.sampler).collect();
        assert_eq!(
            samplers,
            [
                Some(Sampler::DdpmStrided { steps: 100 }),
                Some(Sampler::Ddim { steps: 50 })
            ]
        );
        let ends = m.eval_samplers();
        assert_eq!(ends[0], Sampler::DdpmStrided { steps: 100 });
        assert!(
            !ends.contains(&Sampler::Ddpm),
            "1,000 steps per image: {ends:?}"
        );
    }

    #[test]
    fn the_frozen_network_computes_the_same_noise_and_gives_gradients_to_inputs_only() {
        let dev = Device::Cpu;
        // Attention on, so that every kind of layer is built from the frozen view.
        let mut arch = tiny();
        arch.diffusers.add_attention = true;
        let m = DiffusionModel::new(&arch, &mut Rng::new(4), &dev).unwrap();
        let frozen = m.frozen().unwrap();
        let x = m.starts(3, None, &mut Rng::new(5)).unwrap();
        let trainable = m.unet.predict(&x, 7).unwrap();
        let eps = frozen.predict(&x, 7).unwrap();
        assert_eq!(crate::ops::testing::max_abs_diff(&trainable, &eps), 0.0);
        assert!(
            trainable.track_op() && !eps.track_op(),
            "inference records no graph"
        );
        // A backward pass through the frozen network reaches the input and no weight.
        let input = candle_core::Var::from_tensor(&x).unwrap();
        let loss = frozen
            .predict(input.as_tensor(), 7)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(input.as_tensor()).is_some());
        for (name, v) in m.params.named() {
            assert!(grads.get(v.as_tensor()).is_none(), "{name} got a gradient");
        }
        // It shares the weights' storage: an update in place reaches it.
        for (_, w) in m.params.named() {
            w.set(&(w.as_tensor() * 1.5).unwrap()).unwrap();
        }
        let moved = frozen.predict(&x, 7).unwrap();
        assert!(crate::ops::testing::max_abs_diff(&moved, &eps) > 0.0);
        let updated = m.unet.predict(&x, 7).unwrap();
        assert_eq!(crate::ops::testing::max_abs_diff(&moved, &updated), 0.0);
    }
}
