//! PNG image grids of model outputs.

use std::path::Path;

use candle_core::Tensor;

use crate::io::atomic::write_atomic_via_path;
use crate::{Error, Result};

/// Saves images `[n, 1, h, w]` in [-1, 1] as one grey PNG, `cols` per row, 2-pixel gaps.
pub fn save_grid(path: &Path, images: &Tensor, cols: usize) -> Result<()> {
    let (n, c, h, w) = images.dims4()?;
    if c != 1 {
        return Err(Error::Mismatch(format!(
            "grid images must have 1 channel, not {c}"
        )));
    }
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let gap = 2;
    let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
    let px = images.flatten_all()?.to_vec1::<f32>()?;
    let mut img = image::GrayImage::from_pixel(gw as u32, gh as u32, image::Luma([128]));
    for i in 0..n {
        let (ox, oy) = (gap + (i % cols) * (w + gap), gap + (i / cols) * (h + gap));
        for y in 0..h {
            for x in 0..w {
                let v = px[i * h * w + y * w + x];
                let b = ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
                img.put_pixel((ox + x) as u32, (oy + y) as u32, image::Luma([b]));
            }
        }
    }
    write_atomic_via_path(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
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
}
