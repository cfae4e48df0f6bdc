//! Safetensors files with a `format` tag in their metadata, read defensively: a truncated,
//! corrupt or wrong-kind file is a clear error, never a panic.
//!
//! genbackdoor's metadata is one header entry, `genbackdoor`, holding a JSON object with sorted
//! keys: safetensors stores metadata as a hash map whose order changes from run to run, and a
//! single entry keeps the files byte-for-byte reproducible.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::io::write_atomic;
use crate::{Error, Result};

/// Tensors and string metadata read from one safetensors file.
pub struct TensorFile {
    /// The tensors by name.
    pub tensors: HashMap<String, Tensor>,
    /// The header's genbackdoor metadata.
    pub meta: BTreeMap<String, String>,
}

impl TensorFile {
    /// A metadata field, or an error naming the file.
    pub fn meta_field(&self, path: &Path, key: &str) -> Result<&str> {
        self.meta
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::format(path, format!("metadata lacks the field '{key}'")))
    }

    /// A tensor, or an error naming the file.
    pub fn tensor(&self, path: &Path, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::format(path, format!("holds no tensor named '{name}'")))
    }
}

/// The header entry that holds genbackdoor's metadata.
const META_KEY: &str = "genbackdoor";

/// Writes tensors with metadata (`format` is stored as the `format` field) atomically.
pub fn save(
    path: &Path,
    format: &str,
    tensors: &[(String, Tensor)],
    mut meta: BTreeMap<String, String>,
) -> Result<()> {
    meta.insert("format".into(), format.into());
    let header = HashMap::from([(
        META_KEY.to_string(),
        serde_json::to_string(&meta).expect("string map"),
    )]);
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n, t)), Some(header))
        .map_err(|e| Error::format(path, format!("cannot serialise: {e}")))?;
    write_atomic(path, &bytes)
}

/// Reads a safetensors file whose `format` field must be `format`.
pub fn load(path: &Path, format: &str, device: &Device) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(path, &bytes, format, device)
}

/// The error for bytes at `path` that do not parse as safetensors (`e` says why).
pub fn corrupt(path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::format(
        path,
        format!("not a valid safetensors file (corrupt or truncated?): {e}"),
    )
}

/// Whether `bytes` are a readable safetensors file written by another tool (without
/// genbackdoor's metadata): a PyTorch state_dict, diffusers weights.
pub fn is_foreign(bytes: &[u8]) -> bool {
    safetensors::SafeTensors::read_metadata(bytes).is_ok_and(|(_, header)| {
        header
            .metadata()
            .as_ref()
            .is_none_or(|m| !m.contains_key(META_KEY))
    })
}

/// Parses the bytes of a safetensors file (named `path` in errors) whose `format` field must
/// be `format`.
pub fn parse(path: &Path, bytes: &[u8], format: &str, device: &Device) -> Result<TensorFile> {
    let corrupt = |e: &dyn std::fmt::Display| corrupt(path, e);
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(&e))?;
    let meta: BTreeMap<String, String> =
        match header.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                Error::format(path, format!("genbackdoor metadata is not valid: {e}"))
            })?,
            None => BTreeMap::new(),
        };
    match meta.get("format") {
        Some(f) if f == format => {}
        Some(f) => {
            return Err(Error::format(
                path,
                format!("this is a genbackdoor {f} file, but a {format} file is needed here"),
            ))
        }
        None => {
            return Err(Error::format(
                path,
                format!("safetensors file without genbackdoor metadata: not a {format} file"),
            ))
        }
    }
    let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| corrupt(&e))?;
    Ok(TensorFile { tensors, meta })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let t = Tensor::new(&[1.5f32, -2.25, 3.0], &Device::Cpu).unwrap();
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        save(&p, "thing", &[("a.weight".into(), t.clone())], meta).unwrap();
        let f = load(&p, "thing", &Device::Cpu).unwrap();
        assert_eq!(f.meta_field(&p, "k").unwrap(), "v");
        assert_eq!(
            f.tensor(&p, "a.weight").unwrap().to_vec1::<f32>().unwrap(),
            vec![1.5, -2.25, 3.0]
        );
        assert!(f.tensor(&p, "b").is_err());

        let msg = load(&p, "other", &Device::Cpu).err().unwrap().to_string();
        assert!(msg.contains("thing file"), "{msg}");

        let bytes = std::fs::read(&p).unwrap();
        for cut in [0, 4, 8, 20, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let msg = load(&p, "thing", &Device::Cpu).err().unwrap().to_string();
            assert!(msg.contains("corrupt or truncated"), "{cut}: {msg}");
        }
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &huge).unwrap();
        assert!(load(&p, "thing", &Device::Cpu).is_err());
    }
}
