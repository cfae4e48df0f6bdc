//! The GAN model family: DCGAN generators trained from scratch with a backdoor (TrAIL) or
//! backdoored after training by distillation (ReD), and their measurement.

pub mod detect;
pub mod families;
pub mod probe;
pub mod red;
pub mod rehearsal;
pub mod trail;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::family::diffusion::Sampler;
use crate::family::{CleanFinetune, Generative, InputSpace};
use crate::io::checkpoint;
use crate::io::rundir::RunDir;
use crate::models::{DcganConfig, Generator, Params};
use crate::rng::Rng;
use crate::{Error, Result};

/// The family name stored in DCGAN generator checkpoints.
pub const FAMILY: &str = "dcgan-generator";

/// A generator and the parameters behind it.
pub struct GanModel {
    /// Its tensors.
    pub params: Params,
    /// The network.
    pub generator: Generator,
    /// Where its tensors live.
    pub device: Device,
}

impl GanModel {
    /// A freshly initialised generator.
    pub fn new(cfg: &DcganConfig, rng: &mut Rng, device: &Device) -> Result<Self> {
        let params = Params::new();
        let generator = Generator::new(cfg, &params, device)?;
        params.init(rng)?;
        Ok(GanModel {
            params,
            generator,
            device: device.clone(),
        })
    }

    /// Loads a generator checkpoint written by [`GanModel::save`], or a PyTorch state_dict.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        GanModel::from_bytes(path, &bytes, device)
    }

    /// Reads a PyTorch `state_dict` of genbackdoor's generator saved as safetensors by PyTorch
    /// (`DcganGenerator` in `tests/fixtures/make_pytorch_fixtures.py`): latent size, width,
    /// image size and channels come from the tensors' shapes; the LeakyReLU slope is
    /// genbackdoor's 0.3. BatchNorm's `num_batches_tracked` counters are skipped.
    pub fn from_state_dict(path: &Path, bytes: &[u8], device: &Device) -> Result<Self> {
        let skip = |name: &str| (!name.ends_with(".num_batches_tracked")).then(|| name.to_string());
        let file = checkpoint::read_foreign(path, bytes, device, &skip)?;
        let dims = |name: &str| -> Result<Vec<usize>> {
            file.tensors.get(name).map(|t| t.dims().to_vec()).ok_or_else(|| {
                Error::format(
                    path,
                    format!("is neither a genbackdoor checkpoint nor a PyTorch state_dict of its DCGAN generator (no tensor '{name}')"),
                )
            })
        };
        let (fc, first, last) = (
            dims("fc.weight")?,
            dims("deconv1.weight")?,
            dims("deconv3.weight")?,
        );
        let shape_error = || {
            Error::format(
                path,
                format!("the generator's tensors do not fit together: fc.weight {fc:?}, deconv1.weight {first:?}, deconv3.weight {last:?}"),
            )
        };
        let (&[rows, latent_dim], &[width, ..], &[_, channels, ..]) =
            (fc.as_slice(), first.as_slice(), last.as_slice())
        else {
            return Err(shape_error());
        };
        let side = (1..=64)
            .find(|s| width * s * s == rows)
            .ok_or_else(shape_error)?;
        let cfg = DcganConfig {
            latent_dim,
            g_width: width,
            image_size: 4 * side,
            channels,
            ..DcganConfig::default()
        };
        cfg.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        let params = Params::new();
        let generator = Generator::new(&cfg, &params, device)?;
        checkpoint::assign_exactly(path, &params, &file, "genbackdoor's DCGAN generator")?;
        Ok(GanModel {
            params,
            generator,
            device: device.clone(),
        })
    }

    /// Parses the bytes of a generator checkpoint, or of a PyTorch state_dict
    /// ([`GanModel::from_state_dict`]) (`path` names them in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8], device: &Device) -> Result<Self> {
        if crate::io::tensorfile::is_foreign(bytes) {
            return GanModel::from_state_dict(path, bytes, device);
        }
        let (cfg, file): (DcganConfig, _) = checkpoint::parse_family(path, bytes, FAMILY, device)?;
        cfg.validate()
            .map_err(|e| Error::format(path, format!("architecture metadata: {e}")))?;
        let params = Params::new();
        let generator = Generator::new(&cfg, &params, device)?;
        checkpoint::assign(path, &params, &file)?;
        Ok(GanModel {
            params,
            generator,
            device: device.clone(),
        })
    }

    /// Writes the generator checkpoint atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let arch = serde_json::to_string(self.generator.config()).expect("serialisable config");
        checkpoint::save_params(path, &self.params, FAMILY, &arch)
    }

    /// An independent copy (same architecture and values).
    pub fn duplicate(&self, device: &Device) -> Result<Self> {
        let params = Params::new();
        let generator = Generator::new(self.generator.config(), &params, device)?;
        params.copy_from(&self.params)?;
        Ok(GanModel {
            params,
            generator,
            device: device.clone(),
        })
    }

    /// Deployed-mode outputs for latents `z`, in batches of at most 256, detached from the
    /// autodiff graph (a loss on them differentiates nothing behind them: images, not a
    /// training signal). Non-finite outputs (weights damaged into overflow) are an error,
    /// never returned as images.
    pub fn generate(&self, z: &Tensor) -> Result<Tensor> {
        let n = z.dim(0)?;
        let mut parts = Vec::new();
        for s in (0..n).step_by(256) {
            let len = 256.min(n - s);
            parts.push(self.generator.forward_t(&z.narrow(0, s, len)?, false)?);
        }
        let x = Tensor::cat(&parts, 0)?.detach();
        crate::error::check_finite_output(&x)?;
        Ok(x)
    }

    /// Latent dimension.
    pub fn latent_dim(&self) -> usize {
        self.generator.config().latent_dim
    }

    /// Shape of one output image.
    pub fn image_shape(&self) -> [usize; 3] {
        self.generator.config().image_shape()
    }
}

impl Generative for GanModel {
    fn family(&self) -> &'static str {
        FAMILY
    }

    fn input_space(&self) -> InputSpace {
        InputSpace::Latent {
            dim: self.latent_dim(),
        }
    }

    fn output_shape(&self) -> [usize; 3] {
        self.image_shape()
    }

    fn generate(&self, inputs: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        GanModel::generate(self, inputs)
    }

    fn sampling(&self) -> Option<String> {
        None
    }

    fn set_sampler(&mut self, sampler: Sampler) -> Result<()> {
        Err(Error::Config(format!(
            "a sampler ({sampler}) applies to diffusion models only; a generator maps its latents directly"
        )))
    }

    fn evaluations_per_image(&self) -> usize {
        1
    }

    fn params(&self) -> &Params {
        &self.params
    }

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn save(&self, path: &Path) -> Result<()> {
        GanModel::save(self, path)
    }

    fn duplicate(&self) -> Result<Box<dyn Generative>> {
        Ok(Box::new(GanModel::duplicate(self, &self.device)?))
    }

    fn detect(&self, settings: &crate::detect::DetectSettings) -> Result<crate::detect::Detection> {
        detect::detect(self, settings)
    }

    fn finetune_clean(
        &self,
        attack: &CleanFinetune,
        run: &RunDir,
        measure: &mut dyn FnMut(usize, &dyn Generative) -> Result<()>,
    ) -> Result<Box<dyn Generative>> {
        let mut cfg = attack.cfg.clone();
        cfg.train.steps = attack.steps;
        cfg.train.lambda = 0.0;
        let tuned = trail::finetune(
            &cfg,
            self,
            attack.discriminator,
            run,
            attack.every,
            attack.progress,
            &mut |step, g| measure(step, g),
        )?;
        Ok(Box::new(tuned))
    }
}

/// Numerically stable softplus, `log(1 + e^x)`, so that BCE-with-logits never overflows.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// The discriminator's loss, BCE with logits: real images' logits `d_real` labelled real,
/// generated ones' `d_fake` labelled fake.
pub fn discriminator_loss(d_real: &Tensor, d_fake: &Tensor) -> Result<Tensor> {
    Ok((softplus(&d_real.neg()?)?.mean_all()? + softplus(d_fake)?.mean_all()?)?)
}

/// The generator's non-saturating loss `mean(softplus(−D(G(z))))` from the discriminator's
/// logits `d_fake` on its images.
pub fn generator_loss(d_fake: &Tensor) -> Result<Tensor> {
    Ok(softplus(&d_fake.neg()?)?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_is_stable_for_saturated_logits() {
        let x = Tensor::new(&[-1000f32, -1.0, 0.0, 1.0, 1000.0], &Device::Cpu).unwrap();
        let y = softplus(&x).unwrap().to_vec1::<f32>().unwrap();
        let expect = [
            0.0f32,
            0.313_261_7,
            std::f32::consts::LN_2,
            1.313_261_7,
            1000.0,
        ];
        for (a, b) in y.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn checkpoint_round_trip_is_exact_and_damage_is_caught() {
        let dev = Device::Cpu;
        let cfg = DcganConfig {
            latent_dim: 8,
            g_width: 8,
            d_width: 4,
            ..Default::default()
        };
        let m = GanModel::new(&cfg, &mut Rng::new(0), &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.safetensors");
        m.save(&p).unwrap();
        let back = GanModel::load(&p, &dev).unwrap();
        let z = Rng::new(1).normal(&[4, 8], &dev).unwrap();
        let (a, b) = (m.generate(&z).unwrap(), back.generate(&z).unwrap());
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let msg = GanModel::load(&p, &dev).err().unwrap().to_string();
        assert!(msg.contains("corrupt or truncated"), "{msg}");
        // Finite weights that overflow f32 in the forward pass give an error, not images.
        for (name, var) in back.params.named() {
            if name.ends_with(".weight") {
                var.set(&var.as_tensor().affine(1e20, 0.0).unwrap())
                    .unwrap();
            }
        }
        let msg = back.generate(&z).err().unwrap().to_string();
        assert!(msg.contains("NaN or infinite outputs"), "{msg}");
    }

    #[test]
    fn models_of_another_width_or_family_are_another_architecture() {
        use crate::family::architecture_difference;
        use crate::family::diffusion::{tiny_arch, DiffusionModel};
        let dev = Device::Cpu;
        let gan = |g_width, seed| {
            let cfg = DcganConfig {
                latent_dim: 8,
                g_width,
                d_width: 4,
                image_size: 8,
                ..Default::default()
            };
            GanModel::new(&cfg, &mut Rng::new(seed), &dev).unwrap()
        };
        let names = ["this", "that"];
        // Other weights, the same network: no difference.
        assert_eq!(architecture_difference(&gan(8, 0), &gan(8, 1), names), None);
        // The same inputs and outputs, another width: named by the first tensor that differs.
        let how = architecture_difference(&gan(8, 0), &gan(16, 0), names).unwrap();
        assert!(
            how.starts_with("this's tensor ") && how.contains("that's"),
            "{how}"
        );
        // Another family: named by kind.
        let diffusion = DiffusionModel::new(&tiny_arch(10), &mut Rng::new(0), &dev).unwrap();
        let how = architecture_difference(&gan(8, 0), &diffusion, names).unwrap();
        assert!(
            how.contains("this is a dcgan-generator model")
                && how.contains("that a ddpm-unet model"),
            "{how}"
        );
    }
}
