//! A trainer's resumable state in one safetensors file (`checkpoint.safetensors` in a run
//! directory): groups of parameters under name prefixes, Adam states, every random stream
//! (as JSON), the step, the training seconds so far and what the run was doing (its
//! stage). Every family's trainer saves and restores through here, so that `--resume`
//! continues any run bit for bit.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::io::{checkpoint, tensorfile};
use crate::models::Params;
use crate::optim::{Adam, AdamState};
use crate::{Error, Result};

/// The resumable state file inside a run directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// The `format` tag of training checkpoints.
const FORMAT: &str = "train-checkpoint";

/// What a snapshot holds besides tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Steps done.
    pub step: usize,
    /// Training seconds so far, across interruptions.
    pub seconds: f64,
    /// Every random stream of the trainer, serialised as JSON.
    pub streams: String,
    /// What the run does (`train` or `inject`).
    pub stage: String,
}

/// Saves `params` (each group under its name prefix), the optimisers' states (under their
/// names) and `progress` to `path`, atomically.
pub fn save(
    path: &Path,
    params: &[(&str, &Params)],
    optimisers: &[(&str, &Adam)],
    progress: &Progress,
) -> Result<()> {
    let mut tensors = Vec::new();
    for (prefix, group) in params {
        for (name, var) in group.named() {
            tensors.push((format!("{prefix}{name}"), var.as_tensor().clone()));
        }
    }
    let mut meta = BTreeMap::from([
        ("step".to_string(), progress.step.to_string()),
        ("seconds".to_string(), format!("{:.3}", progress.seconds)),
        ("streams".to_string(), progress.streams.clone()),
        ("stage".to_string(), progress.stage.clone()),
    ]);
    for (name, opt) in optimisers {
        let st = opt.state();
        meta.insert(format!("{name}_step"), st.step.to_string());
        for (which, moments) in [("m", &st.m), ("v", &st.v)] {
            for (i, v) in moments.iter().enumerate() {
                let t = Tensor::from_slice(v, v.len(), &Device::Cpu)?;
                tensors.push((format!("{name}/{which}/{i}"), t));
            }
        }
    }
    tensorfile::save(path, FORMAT, &tensors, meta)
}

/// The stage a snapshot was saved in (`train` for snapshots older than the field).
pub fn stage_of(path: &Path) -> Result<String> {
    let f = tensorfile::load(path, FORMAT, &Device::Cpu)?;
    Ok(f.meta
        .get("stage")
        .cloned()
        .unwrap_or_else(|| "train".into()))
}

/// Restores a snapshot written by [`save`] into `params` and `optimisers` (same names and
/// shapes); refuses one saved after `last_step` or in another stage. Returns its progress.
pub fn restore(
    path: &Path,
    params: &[(&str, &Params)],
    optimisers: &mut [(&str, &mut Adam)],
    last_step: usize,
    stage: &str,
) -> Result<Progress> {
    let f = tensorfile::load(path, FORMAT, &Device::Cpu)?;
    let bad = |m: String| Error::format(path, m);
    let number = |k: &str| -> Result<usize> {
        f.meta_field(path, k)?
            .parse()
            .map_err(|_| bad(format!("metadata field '{k}' is not a number")))
    };
    let step = number("step")?;
    if step > last_step {
        return Err(bad(format!(
            "was saved at step {step}, after the run's last step {last_step}"
        )));
    }
    let saved_stage = f.meta.get("stage").map_or("train", String::as_str);
    if saved_stage != stage {
        return Err(bad(format!(
            "was saved by a '{saved_stage}' run, not a '{stage}' one"
        )));
    }
    for (prefix, group) in params {
        checkpoint::assign_prefixed(path, group, &f, prefix)?;
    }
    for (name, opt) in optimisers.iter_mut() {
        let moments = |which: &str| -> Result<Vec<Vec<f32>>> {
            (0..opt.len())
                .map(|i| {
                    let t = f.tensor(path, &format!("{name}/{which}/{i}"))?;
                    Ok(t.flatten_all()?.to_vec1::<f32>()?)
                })
                .collect()
        };
        let state = AdamState {
            step: number(&format!("{name}_step"))? as u64,
            m: moments("m")?,
            v: moments("v")?,
        };
        opt.load_state(state).map_err(|e| bad(e.to_string()))?;
    }
    Ok(Progress {
        step,
        seconds: f
            .meta_field(path, "seconds")?
            .parse()
            .map_err(|_| bad("metadata field 'seconds' is not a number".into()))?,
        streams: f.meta_field(path, "streams")?.to_string(),
        stage: saved_stage.to_string(),
    })
}
