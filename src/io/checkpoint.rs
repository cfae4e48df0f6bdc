//! Model checkpoints: a network's tensors (PyTorch-style names) plus its family and
//! architecture in the metadata, so a checkpoint alone rebuilds the model. Keys never go here.
//! Files of other tools (a PyTorch state_dict, diffusers weights) are read here too.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use crate::io::tensorfile::{self, TensorFile};
use crate::models::Params;
use crate::{Error, Result};

/// The `format` tag of model checkpoints.
pub const MODEL_FORMAT: &str = "model";

/// Saves `params` with the model family name and its architecture (JSON) in the metadata.
pub fn save_params(path: &Path, params: &Params, family: &str, arch_json: &str) -> Result<()> {
    let tensors: Vec<_> = params
        .named()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let meta = BTreeMap::from([
        ("family".to_string(), family.to_string()),
        ("arch".to_string(), arch_json.to_string()),
    ]);
    tensorfile::save(path, MODEL_FORMAT, &tensors, meta)
}

/// Parses the bytes of a checkpoint that must hold a `family` model (`path` names it in
/// errors): its architecture, deserialised from the metadata, and its tensors.
pub fn parse_family<A: DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
    family: &str,
    device: &Device,
) -> Result<(A, TensorFile)> {
    let f = tensorfile::parse(path, bytes, MODEL_FORMAT, device)?;
    let found = f.meta_field(path, "family")?;
    if found != family {
        return Err(Error::format(
            path,
            format!("holds a '{found}' model, but a '{family}' checkpoint is needed"),
        ));
    }
    let arch = serde_json::from_str(f.meta_field(path, "arch")?)
        .map_err(|e| Error::format(path, format!("architecture metadata is invalid: {e}")))?;
    Ok((arch, f))
}

/// The model family stored in the checkpoint bytes (`path` names them in errors).
pub fn family_in(path: &Path, bytes: &[u8]) -> Result<String> {
    let f = tensorfile::parse(path, bytes, MODEL_FORMAT, &Device::Cpu)?;
    Ok(f.meta_field(path, "family")?.to_string())
}

/// Copies the checkpoint's tensors into `params`; every name, shape and dtype must match.
pub fn assign(path: &Path, params: &Params, file: &TensorFile) -> Result<()> {
    let count = params.named().len();
    if count != file.tensors.len() {
        return Err(Error::format(
            path,
            format!(
                "holds {} tensors but the model has {count}",
                file.tensors.len()
            ),
        ));
    }
    assign_prefixed(path, params, file, "")
}

/// Copies the tensors named `prefix` + a parameter's name into `params` (a file that holds
/// several networks); shapes and dtypes must match and values must be finite.
pub fn assign_prefixed(
    path: &Path,
    params: &Params,
    file: &TensorFile,
    prefix: &str,
) -> Result<()> {
    for (name, var) in params.named() {
        let t = file.tensor(path, &format!("{prefix}{name}"))?;
        if t.dims() != var.dims() || t.dtype() != var.dtype() {
            return Err(Error::format(
                path,
                format!(
                    "tensor '{prefix}{name}' is {:?} {:?} but the model needs {:?} {:?}",
                    t.dtype(),
                    t.dims(),
                    var.dtype(),
                    var.dims()
                ),
            ));
        }
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::format(
                path,
                format!("tensor '{prefix}{name}' holds NaN or infinite values"),
            ));
        }
        if name.ends_with(".running_var") && v.iter().any(|&x| x < 0.0) {
            return Err(Error::format(
                path,
                format!("tensor '{prefix}{name}' holds negative variances"),
            ));
        }
        var.set(t)?;
    }
    Ok(())
}

/// The tensors of a safetensors file written by another tool (no genbackdoor metadata), as f32,
/// under the names `rename` gives them (`None` drops a tensor, such as PyTorch's integer
/// `num_batches_tracked`).
pub fn read_foreign(
    path: &Path,
    bytes: &[u8],
    device: &Device,
    rename: &dyn Fn(&str) -> Option<String>,
) -> Result<TensorFile> {
    let raw = candle_core::safetensors::load_buffer(bytes, device)
        .map_err(|e| tensorfile::corrupt(path, &e))?;
    let mut tensors = HashMap::new();
    for (name, t) in raw {
        let Some(name) = rename(&name) else { continue };
        let t = match t.dtype() {
            DType::F32 => t,
            DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor '{name}' is {other:?}; floating-point weights are needed"),
                ))
            }
        };
        tensors.insert(name, t);
    }
    Ok(TensorFile {
        tensors,
        meta: Default::default(),
    })
}

/// [`assign`] for a file that must hold exactly the tensors of `params`: an error names what
/// is missing or extra, as not fitting `what`.
pub fn assign_exactly(path: &Path, params: &Params, file: &TensorFile, what: &str) -> Result<()> {
    let needed: Vec<String> = params.named().into_iter().map(|(n, _)| n).collect();
    let missing: Vec<&String> = needed
        .iter()
        .filter(|n| !file.tensors.contains_key(*n))
        .collect();
    let mut extra: Vec<&String> = file
        .tensors
        .keys()
        .filter(|n| !needed.contains(n))
        .collect();
    extra.sort();
    if !missing.is_empty() || !extra.is_empty() {
        let few = |v: &[&String]| {
            let shown: Vec<&str> = v.iter().take(4).map(|s| s.as_str()).collect();
            match v.len() - shown.len() {
                0 => shown.join(", "),
                more => format!("{} and {more} more", shown.join(", ")),
            }
        };
        return Err(Error::format(
            path,
            format!(
                "does not fit {what}: {} missing ({}), {} unexpected ({})",
                missing.len(),
                few(&missing),
                extra.len(),
                few(&extra)
            ),
        ));
    }
    assign(path, params, file)
}
