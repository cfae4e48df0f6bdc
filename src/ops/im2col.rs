//! `im2col` (image patches → rows) and its adjoint `col2im` (rows → summed image) on one
//! image's plain f32 data; the convolution kernels in `conv` call them per image.

use crate::{Error, Result};

/// The geometry of a 2-D convolution over square kernels: input planes `c × h × w`,
/// kernel `k × k`, `stride`, zero `pad` on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Kernel side.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

impl Geometry {
    /// Checks that the kernel fits the padded input and the stride is positive.
    pub fn validate(&self) -> Result<()> {
        if self.stride == 0
            || self.k == 0
            || self.h + 2 * self.pad < self.k
            || self.w + 2 * self.pad < self.k
        {
            return Err(Error::Mismatch(format!(
                "invalid convolution geometry {self:?}"
            )));
        }
        Ok(())
    }

    /// Output height.
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }

    /// Output width.
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }

    /// Output positions per image (rows of the column matrix).
    pub fn positions(&self) -> usize {
        self.oh() * self.ow()
    }

    /// Values per input image: `c · h · w`.
    pub fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Values per image of the column matrix: `patch · positions`.
    pub fn rows(&self) -> usize {
        self.positions() * self.patch()
    }

    /// Patch length (rows of the column matrix): `c · k · k`.
    pub fn patch(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Calls `f(column, pixel, len)` for every run of in-bounds output positions: for the
    /// patch entry (input channel, kernel row, kernel column) of row `r` of the column matrix
    /// and one output row, `len` consecutive entries starting at `column` (relative to the
    /// start of row `r`, whose length is the positions) read the input pixels `pixel`,
    /// `pixel + stride`, … of the image plane stack. With stride 1 a run is a plain copy of
    /// part of an image row.
    #[inline]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let (oh, ow) = (self.oh(), self.ow());
        for ci in 0..self.c {
            for ky in 0..k {
                for kx in 0..k {
                    let r = (ci * k + ky) * k + kx;
                    // Output columns whose input column ox·s + kx − p lies inside [0, w).
                    let lo = p.saturating_sub(kx).div_ceil(s);
                    let hi = ((self.w + p).saturating_sub(kx)).div_ceil(s).min(ow);
                    if lo >= hi {
                        continue;
                    }
                    for oy in 0..oh {
                        let iy = oy * s + ky;
                        if iy < p || iy - p >= self.h {
                            continue;
                        }
                        let pixel = (ci * self.h + iy - p) * self.w + lo * s + kx - p;
                        f(r * oh * ow + oy * ow + lo, pixel, hi - lo, r);
                    }
                }
            }
        }
    }
}

/// Writes the patches of one image `[c, h, w]` as columns of a `[c·k·k, positions]` block of
/// `cols` whose rows are `row_stride` apart (so that the blocks of several images can sit
/// side by side in one `[c·k·k, images·positions]` matrix). Entries where a patch overhangs
/// the padding are left as they are: callers start from zeros.
pub fn im2col(g: &Geometry, image: &[f32], cols: &mut [f32], row_stride: usize) {
    let (positions, s) = (g.positions(), g.stride);
    g.for_each_run(|c, px, len, r| {
        let at = c + r * (row_stride - positions);
        let dst = &mut cols[at..at + len];
        if s == 1 {
            dst.copy_from_slice(&image[px..px + len]);
        } else {
            for (j, d) in dst.iter_mut().enumerate() {
                *d = image[px + j * s];
            }
        }
    });
}

/// The adjoint of [`im2col`]: adds every column of the block back onto the pixels its patch
/// covers.
pub fn col2im_add(g: &Geometry, cols: &[f32], image: &mut [f32], row_stride: usize) {
    let (positions, s) = (g.positions(), g.stride);
    g.for_each_run(|c, px, len, r| {
        let at = c + r * (row_stride - positions);
        let src = &cols[at..at + len];
        if s == 1 {
            for (x, v) in image[px..px + len].iter_mut().zip(src) {
                *x += v;
            }
        } else {
            for (j, v) in src.iter().enumerate() {
                image[px + j * s] += v;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// <im2col(x), c> = <x, col2im(c)>: col2im is im2col's adjoint, which is exactly what
        /// makes each the other's backward pass.
        #[test]
        fn col2im_is_the_adjoint_of_im2col(
            c in 1usize..4, h in 1usize..9, w in 1usize..9,
            k in 1usize..6, stride in 1usize..4, pad in 0usize..3, seed in 0u64..1000,
        ) {
            let g = Geometry { c, h, w, k, stride, pad };
            prop_assume!(g.validate().is_ok());
            let mut rng = Rng::new(seed);
            let x = rng.normal_vec(g.image());
            let cols = rng.normal_vec(g.rows());
            let mut x_cols = vec![0f32; g.rows()];
            im2col(&g, &x, &mut x_cols, g.positions());
            let mut back = vec![0f32; g.image()];
            col2im_add(&g, &cols, &mut back, g.positions());
            let (lhs, rhs) = (dot(&x_cols, &cols), dot(&x, &back));
            prop_assert!((lhs - rhs).abs() <= 1e-3 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
        }
    }

    #[test]
    fn im2col_on_a_known_image() {
        let x = [1f32, 2.0, 3.0, 4.0];
        let g = Geometry {
            c: 1,
            h: 2,
            w: 2,
            k: 2,
            stride: 1,
            pad: 1,
        };
        let mut cols = vec![0f32; g.rows()];
        im2col(&g, &x, &mut cols, g.positions());
        assert_eq!(g.positions(), 9);
        // Row r holds kernel entry r at each of the 9 output positions.
        assert_eq!(cols[0..9], [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
        assert_eq!(cols[27..36], [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        // Two images side by side: the second's block starts 9 values into each row.
        let mut two = vec![0f32; 2 * g.rows()];
        im2col(&g, &x, &mut two[9..], 18);
        assert_eq!(two[9..18], cols[0..9]);
        assert_eq!(two[27..36], cols[9..18]);
        let mut back = vec![0f32; 4];
        col2im_add(&g, &cols, &mut back, g.positions());
        // Every pixel appears in 4 of the 9 padded patches.
        assert_eq!(back, vec![4.0, 8.0, 12.0, 16.0]);
        assert!(Geometry { k: 5, ..g }.validate().is_err());
    }
}
