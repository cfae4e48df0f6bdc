//! diffusers folders: a `UNet2DModel` (`config.json` + `diffusion_pytorch_model.safetensors`)
//! and, when present, its scheduler (`scheduler_config.json`), read as a [`DiffusionModel`] and
//! written back so that stock `UNet2DModel.from_pretrained` and diffusers' schedulers load them.
//! A pipeline folder (`unet/` and `scheduler/` inside) is read the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::config::ScheduleKind;
use crate::family::diffusion::model::{DiffusionArch, DiffusionModel};
use crate::io::atomic::write_atomic;
use crate::io::checkpoint;
use crate::models::diffusers_unet::unsupported;
use crate::models::DiffusersConfig;
use crate::{Error, Result};

/// The network's config file.
pub const CONFIG: &str = "config.json";
/// The network's weights.
pub const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
/// The scheduler's config file.
pub const SCHEDULER: &str = "scheduler_config.json";

/// The diffusers version whose files the parity fixtures were made with (written into the
/// configs genbackdoor exports).
const DIFFUSERS_VERSION: &str = "0.42.1";

/// Attention tensor names of checkpoints older than diffusers 0.14, and their current names.
const DEPRECATED_ATTENTION: [(&str, &str); 4] = [
    (".query.", ".to_q."),
    (".key.", ".to_k."),
    (".value.", ".to_v."),
    (".proj_attn.", ".to_out.0."),
];

/// Whether `path` is a folder (a diffusers model, never a genbackdoor checkpoint file).
pub fn is_folder(path: &Path) -> bool {
    path.is_dir()
}

/// The folders holding the network's files and the scheduler's config: `dir` itself, or its
/// `unet/` and `scheduler/` in a pipeline folder.
fn layout(dir: &Path) -> (PathBuf, PathBuf) {
    if dir.join("unet").join(CONFIG).is_file() {
        (dir.join("unet"), dir.join("scheduler").join(SCHEDULER))
    } else {
        (dir.to_path_buf(), dir.join(SCHEDULER))
    }
}

/// The part of a diffusers scheduler config that fixes the noise schedule and what the network
/// predicts; the fields of sampling (clipping, spacing, …) are left to genbackdoor's samplers.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct SchedulerConfig {
    num_train_timesteps: usize,
    beta_schedule: String,
    beta_start: f64,
    beta_end: f64,
    prediction_type: String,
    trained_betas: Option<serde_json::Value>,
    rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_schedule: "linear".into(),
            beta_start: 1e-4,
            beta_end: 0.02,
            prediction_type: "epsilon".into(),
            trained_betas: None,
            rescale_betas_zero_snr: false,
        }
    }
}

/// The schedule a `scheduler_config.json` describes (`path` names it in errors).
pub fn parse_scheduler(path: &Path, text: &str) -> Result<(ScheduleKind, usize)> {
    let bad = |m: String| Error::format(path, m);
    let c: SchedulerConfig =
        serde_json::from_str(text).map_err(|e| bad(format!("not a scheduler config: {e}")))?;
    let unsupported = |field: &str, value: String, supported: &str| {
        Err(bad(unsupported(field, &value, supported)))
    };
    if c.prediction_type != "epsilon" {
        return unsupported(
            "prediction_type",
            format!("\"{}\"", c.prediction_type),
            "\"epsilon\"",
        );
    }
    if c.trained_betas.as_ref().is_some_and(|v| !v.is_null()) {
        return unsupported("trained_betas", "a list".into(), "null");
    }
    if c.rescale_betas_zero_snr {
        return unsupported("rescale_betas_zero_snr", "true".into(), "false");
    }
    let (beta_start, beta_end) = (c.beta_start, c.beta_end);
    let kind = match c.beta_schedule.as_str() {
        "linear" => ScheduleKind::Linear {
            beta_start,
            beta_end,
        },
        "scaled_linear" => ScheduleKind::ScaledLinear {
            beta_start,
            beta_end,
        },
        "squaredcos_cap_v2" => ScheduleKind::Cosine { offset: CAP_V2 },
        other => {
            return unsupported(
                "beta_schedule",
                format!("\"{other}\""),
                "\"linear\", \"scaled_linear\", \"squaredcos_cap_v2\"",
            )
        }
    };
    kind.validate(c.num_train_timesteps)
        .map_err(|e| bad(e.to_string()))?;
    Ok((kind, c.num_train_timesteps))
}

/// The cosine schedule's offset in diffusers' `squaredcos_cap_v2`.
const CAP_V2: f64 = 0.008;

/// Reads a diffusers folder (see the module docs); without a scheduler config the schedule is
/// DDPM's (linear β from 1e-4 to 0.02 over 1,000 steps), as diffusers' `DDPMScheduler`.
pub fn load_folder(dir: &Path, device: &Device) -> Result<DiffusionModel> {
    let (net, scheduler) = layout(dir);
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
    let config_path = net.join(CONFIG);
    let text = String::from_utf8_lossy(&read(&config_path)?).into_owned();
    let cfg = DiffusersConfig::from_json(&text)
        .map_err(|e| Error::format(&config_path, e.to_string()))?;
    // Without a scheduler config, diffusers' defaults (an empty config).
    let text = if scheduler.is_file() {
        String::from_utf8_lossy(&read(&scheduler)?).into_owned()
    } else {
        "{}".into()
    };
    let (schedule, timesteps) = parse_scheduler(&scheduler, &text)?;
    let weights = net.join(WEIGHTS);
    if !weights.is_file() && net.join("diffusion_pytorch_model.bin").is_file() {
        return Err(Error::format(
            &net,
            format!("holds the weights as a pickled .bin file, which genbackdoor does not read: save the model with `UNet2DModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` to get {WEIGHTS}"),
        ));
    }
    let arch = DiffusionArch {
        diffusers: cfg,
        schedule,
        timesteps,
    };
    let model = DiffusionModel::build(&arch, device)
        .map_err(|e| Error::format(&config_path, e.to_string()))?;
    let file = checkpoint::read_foreign(&weights, &read(&weights)?, device, &current_name)?;
    checkpoint::assign_exactly(
        &weights,
        &model.params,
        &file,
        "the network its config.json describes",
    )?;
    Ok(model)
}

/// A tensor's current diffusers name (attention tensors of old checkpoints are renamed).
fn current_name(name: &str) -> Option<String> {
    let mut name = name.to_string();
    if name.contains(".attentions.") {
        for (old, new) in DEPRECATED_ATTENTION {
            name = name.replace(old, new);
        }
    }
    Some(name)
}

/// Writes `model` (a diffusers network) as a diffusers folder `dir`: `config.json`,
/// `diffusion_pytorch_model.safetensors` and a `DDPMScheduler` `scheduler_config.json` of its
/// schedule. Each file is written atomically.
pub fn save_folder(model: &DiffusionModel, dir: &Path) -> Result<()> {
    let net = model.unet.network();
    let beta_schedule = match model.arch.schedule {
        ScheduleKind::Linear { .. } => "linear",
        ScheduleKind::ScaledLinear { .. } => "scaled_linear",
        ScheduleKind::Cosine { offset } if offset == CAP_V2 => "squaredcos_cap_v2",
        ScheduleKind::Cosine { offset } => {
            return Err(Error::Config(format!(
                "a cosine schedule with offset {offset} has no diffusers counterpart (squaredcos_cap_v2 is 0.008)"
            )))
        }
    };
    // diffusers ignores β_1 and β_T for squaredcos_cap_v2; its defaults are written then.
    let (beta_start, beta_end) = model.arch.schedule.beta_range().unwrap_or((1e-4, 0.02));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = serde_json::to_value(net.config()).expect("serialisable config");
    config["_class_name"] = "UNet2DModel".into();
    config["_diffusers_version"] = DIFFUSERS_VERSION.into();
    let scheduler = serde_json::json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": model.arch.timesteps,
        "beta_schedule": beta_schedule,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        "clip_sample": false,
    });
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("JSON");
    write_atomic(&dir.join(CONFIG), &json(&config))?;
    write_atomic(&dir.join(SCHEDULER), &json(&scheduler))?;
    let tensors: Vec<(String, Tensor)> = model
        .params
        .named()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n, t)), Some(meta))
        .map_err(|e| Error::format(dir, format!("cannot serialise the weights: {e}")))?;
    write_atomic(&dir.join(WEIGHTS), &bytes)
}
