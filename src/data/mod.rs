//! Training data: IDX pairs, single IDX files and PNG folders, and seeded batching.

mod idx;
mod png_folder;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub use idx::{parse_idx, read_idx, IdxArray};
pub use png_folder::read_png_folder;

use crate::rng::Rng;
use crate::{Error, Result};

/// Where the bundled MNIST subset lives, relative to the repository root.
pub const BUNDLED_MNIST: &str = "data/mnist-10k";

/// The bundled data: `data/mnist-10k` from the current folder when it is there, else the
/// copy in the crate's own source tree.
pub fn bundled_path() -> PathBuf {
    let p = Path::new(BUNDLED_MNIST);
    if p.exists() {
        p.to_path_buf()
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
    }
}

/// A set of single-channel images in `[-1, 1]`, optionally labelled.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Pixels of all images, `[n, 1, height, width]` row-major, in `[-1, 1]`.
    pub pixels: Vec<f32>,
    /// Number of images.
    pub len: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Class labels, when the source has them.
    pub labels: Option<Vec<u8>>,
}

impl Dataset {
    /// Builds a data set from bytes (0 = black, 255 = white).
    pub fn from_bytes(len: usize, height: usize, width: usize, bytes: &[u8]) -> Self {
        Dataset {
            pixels: bytes.iter().map(|&b| b as f32 / 127.5 - 1.0).collect(),
            len,
            height,
            width,
            labels: None,
        }
    }

    /// The images at `indices` as a `[k, 1, h, w]` tensor.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let per = self.height * self.width;
        let mut v = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            v.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
        }
        Ok(Tensor::from_vec(
            v,
            (indices.len(), 1, self.height, self.width),
            device,
        )?)
    }

    /// Keeps only the first `n` images (all when `n` is 0 or larger than the set).
    pub fn truncate(&mut self, n: usize) {
        if n > 0 && n < self.len {
            self.len = n;
            self.pixels.truncate(n * self.height * self.width);
            if let Some(l) = &mut self.labels {
                l.truncate(n);
            }
        }
    }
}

/// Loads a data set from `path`: a folder holding an IDX pair (`*images*idx3*` and optionally
/// `*labels*idx1*`, gzipped or not), a single IDX image file, or a folder of PNG images.
pub fn load_dataset(path: &Path) -> Result<Dataset> {
    if !path.exists() {
        return Err(Error::format(
            path,
            "data path does not exist (give --data a folder with an IDX pair or PNG images, or an IDX image file)",
        ));
    }
    if path.is_file() {
        return dataset_from_idx(path, None);
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let find = |needle: &str| {
        entries
            .iter()
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains(needle))
            })
            .cloned()
    };
    match find("idx3") {
        Some(images) => dataset_from_idx(&images, find("idx1").as_deref()),
        None => {
            let (n, h, w, bytes) = read_png_folder(path)?;
            Ok(Dataset::from_bytes(n, h, w, &bytes))
        }
    }
}

fn dataset_from_idx(images: &Path, labels: Option<&Path>) -> Result<Dataset> {
    let a = read_idx(images)?;
    if a.dims.len() != 3 {
        return Err(Error::format(
            images,
            format!(
                "expected an image IDX file with 3 dimensions [n, h, w], found {:?}",
                a.dims
            ),
        ));
    }
    let mut ds = Dataset::from_bytes(a.dims[0], a.dims[1], a.dims[2], &a.data);
    if let Some(lp) = labels {
        let l = read_idx(lp)?;
        if l.dims != [ds.len] {
            return Err(Error::format(
                lp,
                format!(
                    "label file has dimensions {:?} but the image file holds {} images",
                    l.dims, ds.len
                ),
            ));
        }
        ds.labels = Some(l.data);
    }
    Ok(ds)
}

/// Yields shuffled mini-batches of indices, epoch after epoch, from a seeded stream.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Batcher {
    order: Vec<usize>,
    pos: usize,
    batch: usize,
    rng: Rng,
}

impl Batcher {
    /// Batches of `batch` indices drawn from `0..len`; each epoch is a fresh permutation.
    pub fn new(len: usize, batch: usize, rng: Rng) -> Self {
        Batcher {
            order: (0..len).collect(),
            pos: len,
            batch: batch.min(len),
            rng,
        }
    }

    /// The next batch (drops the incomplete tail of each epoch).
    pub fn next_batch(&mut self) -> &[usize] {
        if self.pos + self.batch > self.order.len() {
            self.order = self.rng.permutation(self.order.len());
            self.pos = 0;
        }
        let s = self.pos;
        self.pos += self.batch;
        &self.order[s..self.pos]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_mnist_loads_with_labels() {
        let ds = load_dataset(Path::new(BUNDLED_MNIST)).unwrap();
        assert_eq!((ds.len, ds.height, ds.width), (10_000, 28, 28));
        let labels = ds.labels.as_ref().unwrap();
        assert!(labels.iter().all(|&l| l < 10));
        assert!(ds.pixels.iter().all(|&p| (-1.0..=1.0).contains(&p)));
    }

    #[test]
    fn png_folder_loads_and_rejects_mixed_sizes() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..3u8 {
            image::GrayImage::from_pixel(4, 5, image::Luma([i * 100]))
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        let ds = load_dataset(dir.path()).unwrap();
        assert_eq!((ds.len, ds.height, ds.width), (3, 5, 4));
        assert_eq!(ds.pixels[0], -1.0);
        image::GrayImage::new(6, 6)
            .save(dir.path().join("odd.png"))
            .unwrap();
        let msg = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("6x6"), "{msg}");
        std::fs::remove_file(dir.path().join("odd.png")).unwrap();
        std::fs::write(dir.path().join("z.png"), b"not a png").unwrap();
        let msg = load_dataset(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("not a readable PNG"), "{msg}");
    }

    #[test]
    fn missing_data_is_a_clear_error() {
        let msg = load_dataset(Path::new("no/such/dir"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("does not exist"), "{msg}");
    }

    #[test]
    fn batcher_covers_each_epoch_once() {
        let mut b = Batcher::new(10, 5, Rng::new(3));
        let mut seen: Vec<usize> = b.next_batch().to_vec();
        seen.extend_from_slice(b.next_batch());
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
