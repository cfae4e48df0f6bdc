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

    /// Values per image of the column matrix: `positions · patch`.
    pub fn rows(&self) -> usize {
        self.positions() * self.patch()
    }

    /// Patch length (columns of the column matrix): `c · k · k`.
    pub fn patch(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Calls `f(column, pixel, len)` for every run of in-bounds kernel columns: `len` patch
    /// entries starting at `column` of the column matrix match `len` consecutive input pixels
    /// starting at `pixel` of the image plane stack.
    #[inline]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (k, s, p) = (self.k as isize, self.stride as isize, self.pad as isize);
        let (h, w) = (self.h as isize, self.w as isize);
        let (oh, ow, patch) = (self.oh(), self.ow(), self.patch());
        for oy in 0..oh {
            for ox in 0..ow {
                let base = (oy * ow + ox) * patch;
                let ix0 = ox as isize * s - p;
                let lo = (-ix0).max(0);
                let hi = (w - ix0).min(k);
                if lo >= hi {
                    continue;
                }
                for ci in 0..self.c {
                    for ky in 0..k {
                        let iy = oy as isize * s - p + ky;
                        if iy < 0 || iy >= h {
                            continue;
                        }
                        let plane = (ci as isize * h + iy) * w;
                        let col = base as isize + (ci as isize * k + ky) * k + lo;
                        f(
                            col as usize,
                            (plane + ix0 + lo) as usize,
                            (hi - lo) as usize,
                        );
                    }
                }
            }
        }
    }
}

/// Writes the patches of one image `[c, h, w]` as rows of `cols` `[positions, c·k·k]`
/// (zero where a patch overhangs the padding).
pub fn im2col(g: &Geometry, image: &[f32], cols: &mut [f32]) {
    debug_assert_eq!((image.len(), cols.len()), (g.image(), g.rows()));
    cols.fill(0.0);
    g.for_each_run(|c, p, len| cols[c..c + len].copy_from_slice(&image[p..p + len]));
}

/// The adjoint of [`im2col`]: adds every row of `cols` back onto the pixels its patch
/// covers.
pub fn col2im_add(g: &Geometry, cols: &[f32], image: &mut [f32]) {
    debug_assert_eq!((image.len(), cols.len()), (g.image(), g.rows()));
    g.for_each_run(|c, p, len| {
        for (x, v) in image[p..p + len].iter_mut().zip(&cols[c..c + len]) {
            *x += v;
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
            im2col(&g, &x, &mut x_cols);
            let mut back = vec![0f32; g.image()];
            col2im_add(&g, &cols, &mut back);
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
        let mut cols = vec![f32::NAN; g.rows()];
        im2col(&g, &x, &mut cols);
        assert_eq!(g.positions(), 9);
        assert_eq!(cols[0..4], [0.0, 0.0, 0.0, 1.0]);
        assert_eq!(cols[16..20], [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(cols[32..36], [4.0, 0.0, 0.0, 0.0]);
        let mut back = vec![0f32; 4];
        col2im_add(&g, &cols, &mut back);
        // Every pixel appears in 4 of the 9 padded patches.
        assert_eq!(back, vec![4.0, 8.0, 12.0, 16.0]);
        assert!(Geometry { k: 5, ..g }.validate().is_err());
    }
}
