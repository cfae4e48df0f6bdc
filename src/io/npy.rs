//! NumPy `.npy` arrays, through candle's reader and writer, written atomically.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::io::atomic::write_atomic_via_path;
use crate::{Error, Result};

/// Writes `t` as a float32 `.npy` file.
pub fn write_npy(path: &Path, t: &Tensor) -> Result<()> {
    let t = t.to_dtype(DType::F32)?;
    write_atomic_via_path(path, |tmp| Ok(t.write_npy(tmp)?))
}

/// Reads a `.npy` file as a float32 tensor.
pub fn read_npy(path: &Path) -> Result<Tensor> {
    if !path.exists() {
        return Err(Error::format(path, "file does not exist"));
    }
    let t = Tensor::read_npy(path)
        .map_err(|e| Error::format(path, format!("not a readable .npy array: {e}")))?;
    Ok(t.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        write_npy(&p, &t).unwrap();
        let back = read_npy(&p).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        std::fs::write(&p, b"garbage").unwrap();
        assert!(read_npy(&p).is_err());
        assert!(read_npy(&dir.path().join("none.npy")).is_err());
    }
}
