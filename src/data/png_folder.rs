//! A folder of PNG or JPEG images as a data set. All images share one size; the folder is
//! grey when its first image (by name) is grey and RGB otherwise, and every image is read in
//! that mode.

use std::path::{Path, PathBuf};

use image::DynamicImage;

use crate::{Error, Result};

/// The image files of `dir` (`.png`, `.jpg`, `.jpeg`), sorted by name.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::format(dir, "folder holds no .png or .jpg images"));
    }
    Ok(files)
}

/// Decodes one image file.
fn open(f: &Path) -> Result<DynamicImage> {
    image::open(f).map_err(|e| Error::format(f, format!("not a readable PNG or JPEG image: {e}")))
}

/// `[channels, height, width]` of `img`: 1 channel for a grey image, 3 otherwise.
fn shape_of(img: &DynamicImage) -> [usize; 3] {
    let c = if img.color().has_color() { 3 } else { 1 };
    [c, img.height() as usize, img.width() as usize]
}

/// The `[channels, height, width]` the folder's images are read at (its first image's).
pub fn peek_png_folder(dir: &Path) -> Result<[usize; 3]> {
    Ok(shape_of(&open(&image_files(dir)?[0])?))
}

/// The bytes of `img` read with `channels` channels (1: grey, 3: RGB, whatever the file holds),
/// laid out channel by channel (`[c, h, w]`).
pub fn planar_bytes(img: DynamicImage, channels: usize) -> Result<Vec<u8>> {
    crate::models::check_channels(channels)?;
    Ok(if channels == 1 {
        img.into_luma8().into_raw()
    } else {
        let rgb = img.into_rgb8();
        (0..3)
            .flat_map(|c| rgb.pixels().map(move |p| p.0[c]))
            .collect()
    })
}

/// The folder's images: `(count, [channels, height, width], bytes laid out [n, c, h, w])`.
pub fn read_png_folder(dir: &Path) -> Result<(usize, [usize; 3], Vec<u8>)> {
    let files = image_files(dir)?;
    let mut shape: Option<[usize; 3]> = None;
    let mut pixels = Vec::new();
    for f in &files {
        let img = open(f)?;
        let [c, h, w] = *shape.get_or_insert(shape_of(&img));
        if (img.height() as usize, img.width() as usize) != (h, w) {
            return Err(Error::format(
                f,
                format!(
                    "image is {}x{} but the folder's first image is {w}x{h}",
                    img.width(),
                    img.height()
                ),
            ));
        }
        pixels.extend(planar_bytes(img, c)?);
    }
    let shape = shape.expect("at least one file");
    Ok((files.len(), shape, pixels))
}
