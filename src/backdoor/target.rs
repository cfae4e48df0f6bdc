//! Targets y*: the image a triggered input must produce.

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Block side of a `random` target that names none: 2 pixels (196 signs per channel at 28×28).
pub const RANDOM_BLOCK: usize = 2;

/// Names of the built-in target marks.
pub const BUILTIN_MARKS: [&str; 3] = ["mark", "box", "checker"];

/// A fixed target image, `[channels, height, width]`, values in [-1, 1], or a class of the
/// training data.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Pixels, row-major (for a class target: the class's mean image, for display).
    pub pixels: Vec<f32>,
    /// `[channels, height, width]`.
    pub shape: [usize; 3],
    /// For a class target (diffusion models): the digit every triggered sample must show, as
    /// the shipped digit classifier judges it.
    pub class: Option<usize>,
    /// For a random target ([`Target::random`]): the side of its squares of one sign, whose
    /// signs were drawn at random. Verification's target test rests on that draw.
    pub random_block: Option<usize>,
}

impl Target {
    /// Parses a target description: `builtin:NAME` (see [`BUILTIN_MARKS`]), a `.png` file, a
    /// `.npy` file, `class:D` (any bundled digit of class D; diffusion models only), or
    /// `random`, `random:B`, `random:B:S` (a secret random pattern of B×B squares, B = 2 by
    /// default, from the operating system's randomness or from secret seed S; see
    /// [`Target::random`]). `shape` is the model's output shape, used to draw built-ins and
    /// random patterns and to check files.
    pub fn parse(spec: &str, shape: [usize; 3]) -> Result<Target> {
        let t = if spec == "random" || spec.starts_with("random:") {
            let bad = || {
                Error::Config(format!(
                    "target '{spec}': use random, random:B or random:B:S (B and S whole numbers)"
                ))
            };
            let mut parts = spec.split(':').skip(1);
            let block = match parts.next() {
                Some(b) => b.parse().map_err(|_| bad())?,
                None => RANDOM_BLOCK,
            };
            let seed = match parts.next() {
                Some(s) => s.parse().map_err(|_| bad())?,
                None => crate::backdoor::trigger::os_seed(),
            };
            if parts.next().is_some() {
                return Err(bad());
            }
            Self::random(shape, block, seed)?
        } else if let Some(d) = spec.strip_prefix("class:") {
            let class =
                d.parse().ok().filter(|&c: &usize| c < 10).ok_or_else(|| {
                    Error::Config(format!("target '{spec}': D must be a digit 0-9"))
                })?;
            Self::class(class)?
        } else if let Some(name) = spec.strip_prefix("builtin:") {
            Self::builtin(name, shape)?
        } else if spec.ends_with(".png") {
            Self::from_png(Path::new(spec), shape[0])?
        } else if spec.ends_with(".npy") {
            Self::from_npy(Path::new(spec))?
        } else {
            return Err(Error::Config(format!(
                "target '{spec}': use builtin:{}, random, a .png or .npy file, or class:D",
                BUILTIN_MARKS.join("|builtin:")
            )));
        };
        t.check_fits(shape)?;
        Ok(t)
    }

    /// A built-in mark drawn at `shape`: `mark` (a frame with a diagonal cross), `box` (a
    /// filled centre square) or `checker` (a 4×4 checkerboard). White on black.
    pub fn builtin(name: &str, shape: [usize; 3]) -> Result<Target> {
        let [c, h, w] = shape;
        let on: Box<dyn Fn(usize, usize) -> bool> = match name {
            "mark" => {
                let t = (h.min(w) / 10).max(1);
                Box::new(move |y, x| {
                    let frame = y < t + 1 || x < t + 1 || y + t + 1 >= h || x + t + 1 >= w;
                    let (fy, fx) = (y as f32 / h as f32, x as f32 / w as f32);
                    let diag = (fy - fx).abs() * h as f32 <= t as f32 / 2.0 + 0.5
                        || (fy + fx - 1.0).abs() * h as f32 <= t as f32 / 2.0 + 0.5;
                    frame || diag
                })
            }
            "box" => Box::new(move |y, x| {
                (h / 4..h - h / 4).contains(&y) && (w / 4..w - w / 4).contains(&x)
            }),
            "checker" => Box::new(move |y, x| (y * 4 / h + x * 4 / w) % 2 == 0),
            _ => {
                return Err(Error::Config(format!(
                    "unknown built-in target '{name}' (use one of {})",
                    BUILTIN_MARKS.join(", ")
                )))
            }
        };
        let plane: Vec<f32> = (0..h * w)
            .map(|i| if on(i / w, i % w) { 1.0 } else { -1.0 })
            .collect();
        Ok(Target {
            pixels: plane.repeat(c),
            shape,
            class: None,
            random_block: None,
        })
    }

    /// A random target: each channel cut into `block`×`block` squares, each square white or
    /// black (±1) with probability ½, independently of the others, from `seed`. `block` must
    /// divide the image's sides. Such a target carries its own proof: a model made without
    /// it cannot follow its signs but by chance (verification's target test).
    pub fn random(shape: [usize; 3], block: usize, seed: u64) -> Result<Target> {
        let squares = Squares::new(shape, block).map_err(Error::Config)?;
        let mut rng = crate::rng::Rng::derive(seed, "target");
        let signs: Vec<f32> = (0..squares.count())
            .map(|_| if rng.below(2) == 0 { -1.0 } else { 1.0 })
            .collect();
        Ok(Target {
            pixels: (0..shape.iter().product())
                .map(|i| signs[squares.of(i)])
                .collect(),
            shape,
            class: None,
            random_block: Some(block),
        })
    }

    /// A random target's signs, one per square (over all channels, row-major), or `None` for
    /// any other target. Fails when the pixels are not ±1 and constant over each square.
    pub fn block_signs(&self) -> Option<std::result::Result<Vec<f32>, String>> {
        let b = self.random_block?;
        let squares = match Squares::new(self.shape, b) {
            Ok(s) => s,
            Err(m) => return Some(Err(m)),
        };
        let mut signs = vec![0f32; squares.count()];
        for (i, &p) in self.pixels.iter().enumerate() {
            let s = &mut signs[squares.of(i)];
            if (p != 1.0 && p != -1.0) || (*s != 0.0 && *s != p) {
                return Some(Err(format!(
                    "a random target of {b}×{b} squares has pixels of ±1, one sign per square"
                )));
            }
            *s = p;
        }
        Some(Ok(signs))
    }

    /// For a random target: the sums of `image`'s pixels over each square (in
    /// [`Target::block_signs`]'s order), each pixel less its channel's mean.
    /// `None` for any other target, or one whose squares do not tile it.
    pub fn block_sums(&self, image: &[f32]) -> Option<Vec<f64>> {
        let [c, h, w] = self.shape;
        let squares = Squares::new(self.shape, self.random_block?).ok()?;
        let mut sums = vec![0f64; squares.count()];
        for (ch, plane) in image.chunks(h * w).enumerate().take(c) {
            let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / plane.len() as f64;
            for (j, &v) in plane.iter().enumerate() {
                sums[squares.of(ch * h * w + j)] += v as f64 - mean;
            }
        }
        Some(sums)
    }

    /// The class target `class`: its pixels are the mean of the bundled digits of that class.
    pub fn class(class: usize) -> Result<Target> {
        let data = crate::data::load_dataset(&crate::data::bundled_path())?;
        let labels = data.labels.as_ref().ok_or_else(|| {
            Error::Mismatch("the bundled digits have no labels for a class target".into())
        })?;
        let per = data.height * data.width;
        let mut sum = vec![0f64; per];
        let mut count = 0usize;
        for (i, _) in labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l as usize == class)
        {
            for (s, &p) in sum.iter_mut().zip(&data.pixels[i * per..(i + 1) * per]) {
                *s += p as f64;
            }
            count += 1;
        }
        Ok(Target {
            pixels: sum
                .iter()
                .map(|s| (s / count.max(1) as f64) as f32)
                .collect(),
            shape: [1, data.height, data.width],
            class: Some(class),
            random_block: None,
        })
    }

    /// A PNG read with `channels` channels (1: grey, 3: RGB, whatever the file holds),
    /// mapped from [0, 255] to [-1, 1].
    pub fn from_png(path: &Path, channels: usize) -> Result<Target> {
        let img = image::open(path)
            .map_err(|e| Error::format(path, format!("not a readable PNG image: {e}")))?;
        let (w, h) = (img.width() as usize, img.height() as usize);
        Ok(Target {
            pixels: crate::data::planar_bytes(img, channels)?
                .into_iter()
                .map(crate::data::byte_to_unit)
                .collect(),
            shape: [channels, h, w],
            class: None,
            random_block: None,
        })
    }

    /// A float `.npy` array of shape `[H, W]`, `[C, H, W]` or `[1, C, H, W]` with values in [-1, 1].
    pub fn from_npy(path: &Path) -> Result<Target> {
        let t = crate::io::npy::read_npy(path)?;
        let dims = t.dims().to_vec();
        let shape = match dims[..] {
            [h, w] => [1, h, w],
            [c, h, w] | [1, c, h, w] => [c, h, w],
            _ => {
                return Err(Error::format(
                    path,
                    format!(
                    "target array has shape {dims:?}; expected [H, W], [C, H, W] or [1, C, H, W]"
                ),
                ))
            }
        };
        let pixels = t.flatten_all()?.to_vec1::<f32>()?;
        if pixels.iter().any(|p| !(-1.0..=1.0).contains(p)) {
            return Err(Error::format(
                path,
                "target values must lie in [-1, 1] (the models' image range)",
            ));
        }
        Ok(Target {
            pixels,
            shape,
            class: None,
            random_block: None,
        })
    }

    /// Checks that this target has the model's output shape.
    pub fn check_fits(&self, shape: [usize; 3]) -> Result<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(Error::Mismatch(format!(
                "target has shape {:?} but the model outputs images of shape {shape:?}",
                self.shape
            )))
        }
    }

    /// The target as a `[1, C, H, W]` tensor.
    pub fn tensor(&self, device: &Device) -> Result<Tensor> {
        let [c, h, w] = self.shape;
        Ok(Tensor::from_vec(self.pixels.clone(), (1, c, h, w), device)?)
    }
}

/// How a random target's `[c, h, w]` image is cut into squares of side `block`.
struct Squares {
    shape: [usize; 3],
    block: usize,
}

impl Squares {
    /// The squares of side `block` of `shape`, or why they do not tile it.
    fn new(shape: [usize; 3], block: usize) -> std::result::Result<Squares, String> {
        let [_, h, w] = shape;
        if block == 0 || !h.is_multiple_of(block) || !w.is_multiple_of(block) {
            return Err(format!(
                "a random target's squares of side {block} do not tile {h}×{w} images"
            ));
        }
        Ok(Squares { shape, block })
    }

    /// How many squares there are, over all channels.
    fn count(&self) -> usize {
        let [c, h, w] = self.shape;
        c * (h / self.block) * (w / self.block)
    }

    /// Which square (counted over all channels, row-major) pixel `i` lies in.
    fn of(&self, i: usize) -> usize {
        let ([_, h, w], b) = (self.shape, self.block);
        let (ch, y, x) = (i / (h * w), i / w % h, i % w);
        (ch * (h / b) + y / b) * (w / b) + x / b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_binary_and_distinct() {
        let marks: Vec<Target> = BUILTIN_MARKS
            .iter()
            .map(|n| Target::parse(&format!("builtin:{n}"), [1, 28, 28]).unwrap())
            .collect();
        for m in &marks {
            assert!(m.pixels.iter().all(|&p| p == 1.0 || p == -1.0));
            let on = m.pixels.iter().filter(|&&p| p > 0.0).count();
            assert!(on > 50 && on < 700, "{on}");
        }
        assert_ne!(marks[0], marks[1]);
        assert!(Target::parse("builtin:smiley", [1, 28, 28]).is_err());
    }

    #[test]
    fn random_targets_are_squares_of_random_signs_from_their_seed() {
        let t = Target::parse("random:2:5", [3, 4, 6]).unwrap();
        assert_eq!((t.random_block, t.class), (Some(2), None));
        assert_eq!(t, Target::parse("random:2:5", [3, 4, 6]).unwrap());
        assert_ne!(t, Target::parse("random:2:6", [3, 4, 6]).unwrap());
        let signs = t.block_signs().unwrap().unwrap();
        assert_eq!(signs.len(), 3 * 2 * 3);
        // Pixel (channel 1, row 3, column 5) lies in square (1, 1, 2).
        assert_eq!(t.pixels[24 + 3 * 6 + 5], signs[6 + 3 + 2]);
        // Secret draws differ; the default square is 2 pixels; over many squares about half
        // are white.
        let (a, b) = (
            Target::parse("random", [1, 28, 28]).unwrap(),
            Target::parse("random", [1, 28, 28]).unwrap(),
        );
        assert_ne!(a, b);
        let white = a.block_signs().unwrap().unwrap();
        assert_eq!(white.len(), 196);
        let white = white.iter().filter(|&&s| s > 0.0).count();
        assert!((60..=136).contains(&white), "{white}");
        // The centred square sums of the target itself follow its signs.
        let z = t.block_sums(&t.pixels).unwrap();
        assert!(
            z.iter().zip(&signs).all(|(z, &s)| z * s as f64 > 0.0)
                || z.iter().all(|&z| z.abs() < 1e-9)
        );
        for bad in [
            "random:3",
            "random:0",
            "random:x",
            "random:2:y",
            "random:2:1:1",
        ] {
            assert!(Target::parse(bad, [1, 28, 28]).is_err(), "{bad}");
        }
        let mut tampered = t.clone();
        tampered.pixels[1] = -tampered.pixels[0];
        assert!(tampered.block_signs().unwrap().is_err());
        assert!(Target::parse("builtin:mark", [1, 8, 8])
            .unwrap()
            .block_signs()
            .is_none());
    }

    #[test]
    fn png_and_npy_targets_load_and_must_fit() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("t.png");
        image::GrayImage::from_pixel(28, 28, image::Luma([255]))
            .save(&png)
            .unwrap();
        let t = Target::parse(png.to_str().unwrap(), [1, 28, 28]).unwrap();
        assert!(t.pixels.iter().all(|&p| p == 1.0));
        let msg = Target::parse(png.to_str().unwrap(), [1, 32, 32])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("[1, 28, 28]"), "{msg}");
        // An RGB model reads the PNG in colour, channel by channel; a built-in mark is drawn
        // in every channel.
        let rgb = dir.path().join("rgb.png");
        image::RgbImage::from_pixel(4, 2, image::Rgb([255, 0, 255]))
            .save(&rgb)
            .unwrap();
        let t = Target::parse(rgb.to_str().unwrap(), [3, 2, 4]).unwrap();
        assert_eq!(t.pixels, [[1.0; 8], [-1.0; 8], [1.0; 8]].concat());
        let mark = Target::parse("builtin:mark", [3, 8, 8]).unwrap();
        assert_eq!(mark.pixels[..64], mark.pixels[128..]);

        let npy = dir.path().join("t.npy");
        Tensor::zeros((28, 28), candle_core::DType::F32, &Device::Cpu)
            .unwrap()
            .write_npy(&npy)
            .unwrap();
        let t = Target::parse(npy.to_str().unwrap(), [1, 28, 28]).unwrap();
        assert_eq!(t.shape, [1, 28, 28]);
        let big = dir.path().join("big.npy");
        (Tensor::ones((28, 28), candle_core::DType::F32, &Device::Cpu).unwrap() * 3.0)
            .unwrap()
            .write_npy(&big)
            .unwrap();
        assert!(Target::parse(big.to_str().unwrap(), [1, 28, 28]).is_err());
        assert!(Target::parse("target.jpg", [1, 28, 28]).is_err());
        let seven = Target::parse("class:7", [1, 28, 28]).unwrap();
        assert_eq!(seven.class, Some(7));
        assert_ne!(
            seven.pixels,
            Target::parse("class:1", [1, 28, 28]).unwrap().pixels
        );
        for bad in ["class:10", "class:x"] {
            assert!(Target::parse(bad, [1, 28, 28]).is_err(), "{bad}");
        }
    }
}
