//! A folder of PNG images as a data set (any size, converted to grey; all must share one size).

use std::path::Path;

use crate::{Error, Result};

/// Grey images read from a folder: `(count, height, width, pixels)`, pixels as bytes.
pub fn read_png_folder(dir: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::format(dir, "folder holds no .png images"));
    }
    let mut size = None;
    let mut pixels = Vec::new();
    for f in &files {
        let img = image::open(f)
            .map_err(|e| Error::format(f, format!("not a readable PNG image: {e}")))?
            .into_luma8();
        let (w, h) = img.dimensions();
        match size {
            None => size = Some((h as usize, w as usize)),
            Some((sh, sw)) if (sh, sw) != (h as usize, w as usize) => {
                return Err(Error::format(
                    f,
                    format!("image is {w}x{h} but the folder's first image is {sw}x{sh}"),
                ))
            }
            _ => {}
        }
        pixels.extend_from_slice(img.as_raw());
    }
    let (h, w) = size.expect("at least one file");
    Ok((files.len(), h, w, pixels))
}
