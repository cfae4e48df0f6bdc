//! The CIFAR-10 binary format: batch files (`data_batch_1.bin` … `data_batch_5.bin`,
//! `test_batch.bin`) of 3,073-byte records, a label byte then a 32×32 RGB image stored
//! channel by channel (1,024 red, 1,024 green, 1,024 blue bytes).

use std::path::{Path, PathBuf};

use super::Dataset;
use crate::{Error, Result};

/// `[channels, height, width]` of a CIFAR-10 image.
pub const SHAPE: [usize; 3] = [3, 32, 32];

/// Bytes of one record: the label and the image.
const RECORD: usize = 1 + 3 * 32 * 32;

/// Whether `path` names a CIFAR-10 batch file (a `.bin` file).
pub fn is_batch_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "bin")
}

/// The training batches among `entries` (`data_batch_*.bin`, sorted), or `test_batch.bin`
/// alone when there are none; empty when the folder holds no CIFAR-10 batch.
pub fn batch_files(entries: &[PathBuf]) -> Vec<PathBuf> {
    let named = |f: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = entries
            .iter()
            .filter(|p| is_batch_file(p))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(f))
            .cloned()
            .collect();
        v.sort();
        v
    };
    let train = named(&|n| n.starts_with("data_batch_"));
    if train.is_empty() {
        named(&|n| n == "test_batch.bin")
    } else {
        train
    }
}

/// Reads the records of `files`, in order, as one labelled data set.
pub fn read_batches(files: &[PathBuf]) -> Result<Dataset> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
            return Err(Error::format(
                f,
                format!(
                    "a CIFAR-10 batch holds records of {RECORD} bytes, but this file has {} bytes: truncated or not CIFAR-10",
                    bytes.len()
                ),
            ));
        }
        for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
            if record[0] > 9 {
                return Err(Error::format(
                    f,
                    format!("record {i} has label {}, not a class 0-9", record[0]),
                ));
            }
            labels.push(record[0]);
            images.extend_from_slice(&record[1..]);
        }
    }
    let mut ds = Dataset::from_bytes(labels.len(), SHAPE, &images);
    ds.labels = Some(labels);
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{image_shape, load_dataset};

    /// A batch of `n` records whose image `i` is red `i`, green `2i`, blue `3i`.
    fn batch(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0..n {
            v.push((i % 10) as u8);
            for c in 1..=3 {
                v.extend(std::iter::repeat_n((i * c) as u8, 1024));
            }
        }
        v
    }

    #[test]
    fn batches_load_channel_by_channel_with_labels() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data_batch_2.bin"), batch(3)).unwrap();
        std::fs::write(dir.path().join("data_batch_1.bin"), batch(2)).unwrap();
        std::fs::write(dir.path().join("test_batch.bin"), batch(7)).unwrap();
        assert_eq!(image_shape(dir.path()).unwrap(), SHAPE);
        let ds = load_dataset(dir.path()).unwrap();
        assert_eq!((ds.len, ds.shape()), (5, SHAPE), "training batches only");
        assert_eq!(ds.labels.as_deref(), Some(&[0, 1, 0, 1, 2][..]));
        let second = ds.batch(&[1], &candle_core::Device::Cpu).unwrap();
        let v = second.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let at = |b: u8| b as f32 / 127.5 - 1.0;
        assert_eq!((v[0], v[1024], v[2048]), (at(1), at(2), at(3)));
        let test = load_dataset(&dir.path().join("test_batch.bin")).unwrap();
        assert_eq!(test.len, 7);
    }

    #[test]
    fn truncated_or_mislabelled_batches_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data_batch_1.bin");
        std::fs::write(&f, &batch(2)[..RECORD + 100]).unwrap();
        let msg = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("truncated"), "{msg}");
        let mut bad = batch(2);
        bad[RECORD] = 12;
        std::fs::write(&f, bad).unwrap();
        let msg = load_dataset(&f).unwrap_err().to_string();
        assert!(msg.contains("label 12"), "{msg}");
    }
}
