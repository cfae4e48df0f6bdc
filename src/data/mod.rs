//! Training data: IDX pairs, single IDX files, CIFAR-10 binary batches and folders of PNG or
//! JPEG images (grey or RGB), and seeded batching.

mod cifar;
mod idx;
mod png_folder;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub use idx::{parse_idx, read_idx, IdxArray};
use png_folder::peek_png_folder;
pub use png_folder::{planar_bytes, read_png_folder};

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

/// An image byte (0 = black, 255 = full intensity) on the models' scale [-1, 1].
pub fn byte_to_unit(b: u8) -> f32 {
    b as f32 / 127.5 - 1.0
}

/// A set of grey or RGB images in `[-1, 1]`, optionally labelled.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Pixels of all images, `[n, channels, height, width]` row-major, in `[-1, 1]`.
    pub pixels: Vec<f32>,
    /// Number of images.
    pub len: usize,
    /// Channels per image: 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Class labels, when the source has them.
    pub labels: Option<Vec<u8>>,
}

impl Dataset {
    /// Builds a data set of `len` images of `shape` (`[channels, height, width]`) from bytes
    /// laid out `[n, c, h, w]` (0 = black, 255 = full intensity).
    pub fn from_bytes(len: usize, shape: [usize; 3], bytes: &[u8]) -> Self {
        let [channels, height, width] = shape;
        Dataset {
            pixels: bytes.iter().map(|&b| byte_to_unit(b)).collect(),
            len,
            channels,
            height,
            width,
            labels: None,
        }
    }

    /// `[channels, height, width]` of one image.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }

    /// Checks that the images have the shape a model makes (`[channels, height, width]`).
    pub fn check_shape(&self, model: [usize; 3]) -> Result<()> {
        if self.shape() == model {
            Ok(())
        } else {
            Err(Error::Mismatch(format!(
                "the data's images are {} but the model's are {}",
                shape_words(self.shape()),
                shape_words(model)
            )))
        }
    }

    /// Values per image.
    fn per_image(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The images at `indices` as a `[k, c, h, w]` tensor.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let per = self.per_image();
        let mut v = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            v.extend_from_slice(&self.pixels[i * per..(i + 1) * per]);
        }
        let [c, h, w] = self.shape();
        Ok(Tensor::from_vec(v, (indices.len(), c, h, w), device)?)
    }

    /// Keeps only the first `n` images (all when `n` is 0 or larger than the set).
    pub fn truncate(&mut self, n: usize) {
        if n > 0 && n < self.len {
            self.len = n;
            self.pixels.truncate(n * self.per_image());
            if let Some(l) = &mut self.labels {
                l.truncate(n);
            }
        }
    }
}

/// `"3×32×32 (RGB)"`: a `[channels, height, width]` shape in words.
pub fn shape_words(shape: [usize; 3]) -> String {
    let [c, h, w] = shape;
    let kind = match c {
        1 => " (grey)",
        3 => " (RGB)",
        _ => "",
    };
    format!("{c}×{h}×{w}{kind}")
}

/// The formats a data path can hold.
enum Source {
    /// IDX image file, and its label file when there is one.
    Idx(PathBuf, Option<PathBuf>),
    /// CIFAR-10 binary batch files.
    Cifar(Vec<PathBuf>),
    /// A folder of PNG or JPEG images.
    Images(PathBuf),
}

/// What `path` holds: a folder with an IDX pair (`*images*idx3*` and optionally
/// `*labels*idx1*`, gzipped or not), a folder with CIFAR-10 batches (`data_batch_N.bin`, or
/// `test_batch.bin` alone), a folder of PNG or JPEG images, or one IDX or CIFAR-10 file.
fn source(path: &Path) -> Result<Source> {
    if !path.exists() {
        return Err(Error::format(
            path,
            "data path does not exist (give --data a folder with an IDX pair, CIFAR-10 batches or PNG/JPEG images, or one IDX or CIFAR-10 file)",
        ));
    }
    if path.is_file() {
        return Ok(if cifar::is_batch_file(path) {
            Source::Cifar(vec![path.to_path_buf()])
        } else {
            Source::Idx(path.to_path_buf(), None)
        });
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
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
    if let Some(images) = find("idx3") {
        return Ok(Source::Idx(images, find("idx1")));
    }
    let batches = cifar::batch_files(&entries);
    Ok(if batches.is_empty() {
        Source::Images(path.to_path_buf())
    } else {
        Source::Cifar(batches)
    })
}

/// Loads the data set at `path` (see [`source`] for what it may hold). A folder of images
/// is grey when its first image (by name) is grey, RGB otherwise.
pub fn load_dataset(path: &Path) -> Result<Dataset> {
    match source(path)? {
        Source::Idx(images, labels) => dataset_from_idx(&images, labels.as_deref()),
        Source::Cifar(files) => cifar::read_batches(&files),
        Source::Images(dir) => {
            let (n, shape, bytes) = read_png_folder(&dir)?;
            Ok(Dataset::from_bytes(n, shape, &bytes))
        }
    }
}

/// The `[channels, height, width]` of the images at `path`, read from headers and the first
/// image only (cheap even for a large set).
pub fn image_shape(path: &Path) -> Result<[usize; 3]> {
    match source(path)? {
        Source::Idx(images, _) => {
            let dims = idx::peek_dims(&images)?;
            match dims[..] {
                [_, h, w] => Ok([1, h, w]),
                _ => Err(idx_dims_error(&images, &dims)),
            }
        }
        Source::Cifar(_) => Ok(cifar::SHAPE),
        Source::Images(dir) => peek_png_folder(&dir),
    }
}

/// The error for an IDX image file whose dimensions are not `[n, h, w]`.
fn idx_dims_error(images: &Path, dims: &[usize]) -> Error {
    Error::format(
        images,
        format!("expected an image IDX file with 3 dimensions [n, h, w], found {dims:?}"),
    )
}

fn dataset_from_idx(images: &Path, labels: Option<&Path>) -> Result<Dataset> {
    let a = read_idx(images)?;
    if a.dims.len() != 3 {
        return Err(idx_dims_error(images, &a.dims));
    }
    let mut ds = Dataset::from_bytes(a.dims[0], [1, a.dims[1], a.dims[2]], &a.data);
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
        assert_eq!((ds.len, ds.shape()), (10_000, [1, 28, 28]));
        assert_eq!(image_shape(Path::new(BUNDLED_MNIST)).unwrap(), [1, 28, 28]);
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
        assert_eq!((ds.len, ds.shape()), (3, [1, 5, 4]));
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
    fn a_folder_whose_first_image_has_colour_is_rgb() {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::from_pixel(3, 2, image::Rgb([255, 0, 128]))
            .save(dir.path().join("a.png"))
            .unwrap();
        image::RgbImage::from_pixel(3, 2, image::Rgb([0, 255, 0]))
            .save(dir.path().join("b.jpg"))
            .unwrap();
        image::GrayImage::from_pixel(3, 2, image::Luma([255]))
            .save(dir.path().join("c.png"))
            .unwrap();
        assert_eq!(image_shape(dir.path()).unwrap(), [3, 2, 3]);
        let ds = load_dataset(dir.path()).unwrap();
        assert_eq!((ds.len, ds.shape()), (3, [3, 2, 3]));
        // Channel planes: red, green, blue of the first image; a grey image is grey in each.
        assert_eq!(&ds.pixels[..6], &[1.0; 6]);
        assert_eq!(&ds.pixels[6..12], &[-1.0; 6]);
        assert!(ds.pixels[12..18].iter().all(|&p| p.abs() < 0.01));
        let jpeg_green = &ds.pixels[18 + 6..18 + 12];
        assert!(jpeg_green.iter().all(|&p| p > 0.9), "{jpeg_green:?}");
        assert!(ds.pixels[36..].iter().all(|&p| p == 1.0));
        assert!(ds
            .check_shape([1, 2, 3])
            .unwrap_err()
            .to_string()
            .contains("3×2×3 (RGB)"));
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
