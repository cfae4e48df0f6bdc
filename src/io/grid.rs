//! PNG image grids of model outputs.

use std::path::Path;

use candle_core::Tensor;

use crate::io::atomic::write_atomic_via_path;
use crate::{Error, Result};

/// Saves images `[n, c, h, w]` in [-1, 1] (c = 1: grey, c = 3: RGB) as one PNG, `cols`
/// per row, 2-pixel grey gaps.
pub fn save_grid(path: &Path, images: &Tensor, cols: usize) -> Result<()> {
    let (n, c, h, w) = images.dims4()?;
    crate::models::check_channels(c)?;
    let color = if c == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let px = images.flatten_all()?.to_vec1::<f32>()?;
    let mut buf = vec![128u8; gw * gh * c];
    for i in 0..n {
        let (ox, oy) = (gap + (i % cols) * (w + gap), gap + (i / cols) * (h + gap));
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let v = px[((i * c + ch) * h + y) * w + x];
                    let b = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                    buf[((oy + y) * gw + ox + x) * c + ch] = b;
                }
            }
        }
    }
    write_atomic_via_path(path, |tmp| {
        image::save_buffer_with_format(
            tmp,
            &buf,
            gw as u32,
            gh as u32,
            color,
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::format(path, format!("cannot write PNG: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn grid_has_expected_size_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.png");
        let t = Tensor::ones((5, 1, 4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        save_grid(&p, &t, 2).unwrap();
        let img = image::open(&p).unwrap().into_luma8();
        assert_eq!(img.dimensions(), (2 * 5 + 2, 3 * 6 + 2));
        assert_eq!(img.get_pixel(2, 2).0[0], 255);
        assert_eq!(img.get_pixel(0, 0).0[0], 128);
    }

    #[test]
    fn rgb_images_make_an_rgb_grid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.png");
        // Two 2×2 images: red, then blue.
        let mut v = vec![-1f32; 2 * 3 * 4];
        v[..4].fill(1.0);
        v[12 + 8..].fill(1.0);
        let t = Tensor::from_vec(v, (2, 3, 2, 2), &Device::Cpu).unwrap();
        save_grid(&p, &t, 2).unwrap();
        let img = image::open(&p).unwrap();
        assert!(img.color().has_color());
        let img = img.into_rgb8();
        assert_eq!(img.get_pixel(2, 2).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(6, 3).0, [0, 0, 255]);
        assert_eq!(img.get_pixel(0, 0).0, [128, 128, 128]);
        let four = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(save_grid(&p, &four, 1).is_err());
    }
}
