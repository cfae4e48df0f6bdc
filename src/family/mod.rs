//! Model families behind one interface. A family supplies its networks, its task loss and
//! trainers (in its own folder) and implements [`Generative`]: an input space, an output
//! shape and `generate`. Everything that measures or proves a backdoor (`verify`,
//! specificity, `attack`, `eval`, `sample`, the report) sees a model only through this trait,
//! and triggers make their inputs in the model's own [`InputSpace`]. Adding a family is one
//! folder here and one line in [`REGISTRY`].

pub mod diffusion;
pub mod gan;

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::config::Config;
use crate::detect::{DetectSettings, Detection};
use crate::family::diffusion::Sampler;
use crate::io::rundir::RunDir;
use crate::models::Params;
use crate::rng::Rng;
use crate::{Error, Result};

/// Where a model's inputs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSpace {
    /// Latent vectors z ~ N(0, I) of this dimension (a GAN generator's input).
    Latent {
        /// The latent dimension.
        dim: usize,
    },
    /// Starting noise images x_T ~ N(0, I) of shape `[C, H, W]` (a diffusion model's input).
    Noise {
        /// `[channels, height, width]`.
        shape: [usize; 3],
    },
}

impl InputSpace {
    /// Numbers in one input.
    pub fn size(&self) -> usize {
        match self {
            InputSpace::Latent { dim } => *dim,
            InputSpace::Noise { shape } => shape.iter().product(),
        }
    }

    /// The shape of a batch of `n` inputs: `[n, dim]` or `[n, C, H, W]`.
    pub fn batch_shape(&self, n: usize) -> Vec<usize> {
        match self {
            InputSpace::Latent { dim } => vec![n, *dim],
            InputSpace::Noise { shape } => vec![n, shape[0], shape[1], shape[2]],
        }
    }

    /// `n` ordinary (untriggered) inputs, drawn from N(0, I).
    pub fn ordinary(&self, n: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        rng.normal(&self.batch_shape(n), device)
    }

    /// Checks that `inputs` is a batch of this space's inputs (`[n, dim]` or `[n, C, H, W]`,
    /// n ≥ 1) with finite values; `what` names them in the error.
    pub fn check_batch(&self, inputs: &Tensor, what: &str) -> Result<()> {
        let n = inputs.dims().first().copied().unwrap_or(0);
        if n == 0 || inputs.dims() != self.batch_shape(n) {
            return Err(crate::Error::Mismatch(format!(
                "{what} has shape {:?}, but the model takes {} (a batch [N, …] of them)",
                inputs.dims(),
                self.describe()
            )));
        }
        crate::error::check_finite_output(inputs)
            .map_err(|_| crate::Error::Mismatch(format!("{what} holds NaN or infinite values")))
    }

    /// In words, for messages.
    pub fn describe(&self) -> String {
        match self {
            InputSpace::Latent { dim } => format!("latent vectors of dimension {dim}"),
            InputSpace::Noise { shape } => format!("noise images of shape {shape:?}"),
        }
    }
}

/// A generative model as every cross-cutting tool sees it.
pub trait Generative {
    /// The family name stored in the model's checkpoints.
    fn family(&self) -> &'static str;

    /// Where the model's inputs live.
    fn input_space(&self) -> InputSpace;

    /// `[C, H, W]` of one output image.
    fn output_shape(&self) -> [usize; 3];

    /// Deployed-mode images in [-1, 1] for a batch of inputs (a generator: G(z); a diffusion
    /// model: its sampler run from x_T). `rng` feeds stochastic samplers. Non-finite outputs
    /// are an error, never returned as images.
    fn generate(&self, inputs: &Tensor, rng: &mut Rng) -> Result<Tensor>;

    /// How `generate` turns inputs into images when there is a choice (a diffusion model's
    /// sampler, e.g. `ddim-50`); `None` for a direct map.
    fn sampling(&self) -> Option<String>;

    /// Chooses the sampler `generate` runs; an error for families without one.
    fn set_sampler(&mut self, sampler: Sampler) -> Result<()>;

    /// The sampler the proof tools query a backdoor trained for `trained_for` under when none
    /// is named (a diffusion model's [`Sampler::checking`]); `trained_for` itself by default.
    fn checking_sampler(&self, trained_for: Sampler) -> Sampler {
        trained_for
    }

    /// The samplers a run's end measures the backdoor under, besides the one the key names
    /// (none for a direct map).
    fn eval_samplers(&self) -> Vec<Sampler> {
        Vec::new()
    }

    /// Network evaluations per generated image (1 for a generator; a sampler's steps):
    /// tools size their default query counts by it.
    fn evaluations_per_image(&self) -> usize;

    /// The model's tensors.
    fn params(&self) -> &Params;

    /// Where its tensors live.
    fn device(&self) -> Device;

    /// Writes the model's checkpoint atomically.
    fn save(&self, path: &Path) -> Result<()>;

    /// An independent copy (same architecture, values and sampler).
    fn duplicate(&self) -> Result<Box<dyn Generative>>;

    /// Looks for a backdoor without the key (white-box): the family's trigger inversion and
    /// its score against the family's threshold (see [`crate::detect`]).
    fn detect(&self, settings: &DetectSettings) -> Result<Detection>;

    /// A thief's clean fine-tuning of a copy of the model (the family's own task, no
    /// backdoor term), calling `measure(step, model)` before the first step and every
    /// `attack.every` steps; the loop's log goes to `finetune.csv` in `run`. Returns the
    /// fine-tuned model.
    fn finetune_clean(
        &self,
        attack: &CleanFinetune,
        run: &RunDir,
        measure: &mut dyn FnMut(usize, &dyn Generative) -> Result<()>,
    ) -> Result<Box<dyn Generative>>;
}

/// How model `a` differs in architecture from model `b`, in words that call them by
/// `names` (`None`: the same kind, to the shape of every tensor): family, input space,
/// output shape, then the networks' tensors by name and shape. Tools that set one model
/// beside another (a clean reference for `exp_dist` or for a calibrated detection) refuse a
/// model of another kind with it.
pub fn architecture_difference(
    a: &dyn Generative,
    b: &dyn Generative,
    names: [&str; 2],
) -> Option<String> {
    let [na, nb] = names;
    let kind = |m: &dyn Generative| {
        format!(
            "a {} model taking {}, making {:?} images",
            m.family(),
            m.input_space().describe(),
            m.output_shape()
        )
    };
    if kind(a) != kind(b) {
        return Some(format!("{na} is {}, {nb} {}", kind(a), kind(b)));
    }
    let shapes = |m: &dyn Generative| -> Vec<(String, Vec<usize>)> {
        m.params()
            .named()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect()
    };
    let (ta, tb) = (shapes(a), shapes(b));
    if let Some((x, y)) = ta.iter().zip(&tb).find(|(x, y)| x != y) {
        return Some(if x.0 == y.0 {
            format!("{na}'s tensor {} is {:?}, {nb}'s {:?}", x.0, x.1, y.1)
        } else {
            format!("{na} has a tensor `{}` where {nb} has `{}`", x.0, y.0)
        });
    }
    (ta.len() != tb.len()).then(|| format!("{na} has {} tensors, {nb} {}", ta.len(), tb.len()))
}

/// What a trainer hands back for the end of its run: the model to deploy and what the run
/// measures it against.
pub struct Trained {
    /// The trained (or backdoored) model, as it is saved and deployed.
    pub model: Box<dyn Generative>,
    /// The clean model an injection started from (its outputs measure stealth, `exp_dist`).
    pub reference: Option<Box<dyn Generative>>,
    /// The run's summary (mode, steps, seconds, λ…), the first entries of `metrics.json`.
    pub summary: serde_json::Value,
}

/// The persistence attack by clean fine-tuning, as a thief with the model alone would run it.
pub struct CleanFinetune<'a> {
    /// Data and training settings (the family's own section: `[train]` for GANs,
    /// `[diffusion]` for diffusion models, whose learning rate is kept constant); the
    /// backdoor weight is ignored.
    pub cfg: &'a Config,
    /// Clean training steps.
    pub steps: usize,
    /// Measure every this many steps.
    pub every: usize,
    /// A GAN discriminator checkpoint to continue with (else a fresh one); families without
    /// a discriminator refuse it.
    pub discriminator: Option<&'a Path>,
    /// Show a progress bar.
    pub progress: bool,
}

/// A black-box query of `model`: inputs → images, its stochastic samplers fed from `rng`.
pub fn query<'a>(
    model: &'a dyn Generative,
    rng: &'a mut Rng,
) -> impl FnMut(&Tensor) -> Result<Tensor> + 'a {
    move |inputs: &Tensor| model.generate(inputs, rng)
}

/// A copy of `model` that runs `sampler` when one is named and the model has samplers (a
/// key's trigger names the sampler its backdoor was trained for; a generator has none).
pub fn under_sampler(
    model: &dyn Generative,
    sampler: Option<Sampler>,
) -> Result<Box<dyn Generative>> {
    let mut copy = model.duplicate()?;
    if let (Some(s), Some(_)) = (sampler, model.sampling()) {
        copy.set_sampler(s)?;
    }
    Ok(copy)
}

/// A family's checkpoint loader.
type Loader = fn(&Path, &[u8], &Device) -> Result<Box<dyn Generative>>;

/// Every family whose checkpoints `load` reads: (family name in the checkpoint, loader).
pub const REGISTRY: [(&str, Loader); 2] = [
    (gan::FAMILY, |p, b, d| {
        Ok(Box::new(gan::GanModel::from_bytes(p, b, d)?))
    }),
    (diffusion::model::FAMILY, |p, b, d| {
        Ok(Box::new(diffusion::DiffusionModel::from_bytes(p, b, d)?))
    }),
];

/// The family of the model at `path` and, for a file, its bytes: a diffusers folder is a
/// diffusion model, a safetensors file of another tool (a PyTorch state_dict) a DCGAN
/// generator, and a checkpoint names its family.
fn identify(path: &Path) -> Result<(String, Option<Vec<u8>>)> {
    if diffusion::diffusers::is_folder(path) {
        return Ok((diffusion::model::FAMILY.to_string(), None));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let family = if crate::io::tensorfile::is_foreign(&bytes) {
        gan::FAMILY.to_string()
    } else {
        crate::io::checkpoint::family_in(path, &bytes)?
    };
    Ok((family, Some(bytes)))
}

/// Loads any model checkpoint of a registered family, a diffusers `UNet2DModel` folder, or a
/// PyTorch state_dict of genbackdoor's DCGAN generator.
pub fn load(path: &Path, device: &Device) -> Result<Box<dyn Generative>> {
    let (family, Some(bytes)) = identify(path)? else {
        return Ok(Box::new(diffusion::DiffusionModel::load(path, device)?));
    };
    match REGISTRY.iter().find(|(name, _)| *name == family) {
        Some((_, loader)) => loader(path, &bytes, device),
        None => Err(Error::format(
            path,
            format!(
                "holds a '{family}' model, which no registered family reads (known: {})",
                REGISTRY.map(|(n, _)| n).join(", ")
            ),
        )),
    }
}

/// The input space and image shape of the model at `path` (for drawing a key that fits it).
pub fn space_of(path: &Path) -> Result<(InputSpace, [usize; 3])> {
    let m = load(path, &Device::Cpu)?;
    Ok((m.input_space(), m.output_shape()))
}

/// The family of the model at `path` as [`load`] reads it (a diffusers folder is a diffusion
/// model, a PyTorch state_dict a DCGAN generator).
pub fn family_of(path: &Path) -> Result<String> {
    Ok(identify(path)?.0)
}

/// [`load`], then the sampler `generate` runs when one is given.
pub fn load_with_sampler(
    path: &Path,
    sampler: Option<Sampler>,
    device: &Device,
) -> Result<Box<dyn Generative>> {
    let mut model = load(path, device)?;
    if let Some(s) = sampler {
        model.set_sampler(s)?;
    }
    Ok(model)
}

/// The checks every family's rehearsal must pass ([`gan::rehearsal`],
/// [`diffusion::rehearsal`]): `gradient(s)` is a rehearsal's backdoor gradient under settings
/// `s` from the same draws each time, on the model whose tensors are `params`. The model
/// ends as it was, every trainable tensor gets a gradient, the same draws give the same
/// gradient, and it is not the gradient at the unrehearsed weights (`steps = 0`).
#[cfg(test)]
pub(crate) fn check_rehearsal(
    params: &Params,
    settings: crate::config::RehearsalConfig,
    gradient: impl Fn(&crate::config::RehearsalConfig) -> candle_core::backprop::GradStore,
) {
    use crate::optim::testing::gradient_gap;
    let before = params.values();
    let g = gradient(&settings);
    assert_eq!(params.values(), before, "the rehearsal changed the model");
    let vars = params.trainable();
    assert!(vars.iter().all(|v| g.get(v).is_some()));
    let again = gradient(&settings);
    let here = gradient(&crate::config::RehearsalConfig {
        steps: 0,
        ..settings
    });
    assert_eq!(gradient_gap(&g, &again, &vars), 0.0);
    assert!(gradient_gap(&g, &here, &vars) > 1e-6);
}
