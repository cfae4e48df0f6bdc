//! `im2col` (image patches → rows) and its adjoint `col2im` (rows → summed image) on one
//! image's plain f32 data; the convolution kernels in `conv` call them per image.

use std::ops::Range;

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

    /// Rows and columns of the stride phase plane `(qy, qx)`: the pixels whose row is `qy` and
    /// column `qx` modulo the stride, a grid of its own.
    fn plane_dims(&self, qy: usize, qx: usize) -> (usize, usize) {
        let s = self.stride;
        ((self.h + s - 1 - qy) / s, (self.w + s - 1 - qx) / s)
    }

    /// Where each phase plane starts within one channel's block of `h·w` values: the planes
    /// of a channel lie back to back in `(qy, qx)` order and partition its pixels.
    fn plane_offsets(&self) -> Vec<usize> {
        let s = self.stride;
        let mut at = 0;
        let mut offsets = Vec::with_capacity(s * s);
        for qy in 0..s {
            for qx in 0..s {
                offsets.push(at);
                let (ph, pw) = self.plane_dims(qy, qx);
                at += ph * pw;
            }
        }
        offsets
    }

    /// The shifted plane copies that make up the column matrix: one per kernel entry
    /// `(ky, kx)` in row order, the same for every channel.
    fn shifts(&self) -> Vec<Shift> {
        let (s, p) = (self.stride as isize, self.pad as isize);
        let (oh, ow) = (self.oh(), self.ow());
        let offsets = self.plane_offsets();
        let phase = |k: usize| {
            (
                (k as isize - p).rem_euclid(s) as usize,
                (k as isize - p).div_euclid(s),
            )
        };
        let mut shifts = Vec::with_capacity(self.k * self.k);
        for (qy, dy) in (0..self.k).map(phase) {
            for (qx, dx) in (0..self.k).map(phase) {
                let (rows, cols) = self.plane_dims(qy, qx);
                let (ys, xs) = (valid(dy, rows, oh), valid(dx, cols, ow));
                let (ys, xs) = if ys.is_empty() || xs.is_empty() {
                    (0..0, 0..0)
                } else {
                    (ys, xs)
                };
                shifts.push(Shift {
                    offset: offsets[qy * self.stride + qx],
                    rows,
                    cols,
                    dy,
                    dx,
                    ow,
                    zero_cols: (0..xs.start).chain(xs.end..ow).collect(),
                    ys,
                    xs,
                });
            }
        }
        shifts
    }
}

/// The outputs `o` in `0..out` whose shifted index `o + d` lies in `0..len`.
fn valid(d: isize, len: usize, out: usize) -> Range<usize> {
    let lo = (-d).max(0) as usize;
    let hi = (len as isize - d).clamp(0, out as isize) as usize;
    lo.min(hi)..hi
}

/// How the column-matrix row of one kernel entry reads a channel's phase planes: output
/// position `(oy, ox)` reads entry `(oy + dy, ox + dx)` of the plane that starts `offset`
/// values into the channel's block and has `rows × cols` entries; outside the valid output rows `ys`
/// and columns `xs` it reads padding.
struct Shift {
    offset: usize,
    rows: usize,
    cols: usize,
    dy: isize,
    dx: isize,
    ow: usize,
    ys: Range<usize>,
    xs: Range<usize>,
    /// The output columns outside `xs`.
    zero_cols: Vec<usize>,
}

impl Shift {
    /// Where output `(oy, xs.start)` reads in the plane.
    fn source(&self, oy: usize) -> usize {
        (((oy as isize + self.dy) * self.cols as isize) + self.xs.start as isize + self.dx) as usize
    }

    /// Writes one row `[oh·ow]` of the column matrix from the channel's planes.
    fn copy(&self, planes: &[f32], dst: &mut [f32]) {
        let (ow, ys) = (self.ow, &self.ys);
        if ys.is_empty() {
            dst.fill(0.0);
            return;
        }
        let plane = &planes[self.offset..];
        if ys.start > 0 {
            dst[..ys.start * ow].fill(0.0);
        }
        if ys.end * ow < dst.len() {
            dst[ys.end * ow..].fill(0.0);
        }
        let rows = &mut dst[ys.start * ow..ys.end * ow];
        if self.cols == ow {
            // Plane rows as long as output rows: the valid rows are one shifted copy; its
            // entries at invalid columns read across a row end and are zeroed after.
            let base = ((ys.start as isize + self.dy) * ow as isize) + self.dx;
            let skip = (-base).max(0) as usize;
            let end = (rows.len() as isize).min((self.rows * ow) as isize - base) as usize;
            let start = (base + skip as isize) as usize;
            let len = end.max(skip) - skip;
            rows[skip..skip + len].copy_from_slice(&plane[start..start + len]);
            for row in rows.chunks_mut(ow) {
                for &c in &self.zero_cols {
                    row[c] = 0.0;
                }
            }
        } else {
            for (oy, row) in ys.clone().zip(rows.chunks_mut(ow)) {
                let from = self.source(oy);
                row[self.xs.clone()].copy_from_slice(&plane[from..from + self.xs.len()]);
                for &c in &self.zero_cols {
                    row[c] = 0.0;
                }
            }
        }
    }

    /// The adjoint of [`Shift::copy`]: adds one row of the column matrix onto the planes.
    fn add(&self, src: &[f32], planes: &mut [f32]) {
        let (ow, ys) = (self.ow, &self.ys);
        let plane = &mut planes[self.offset..];
        if self.cols == ow && self.zero_cols.is_empty() {
            // Every column valid and rows equally long: the valid rows are one shifted block.
            let from = self.source(ys.start);
            let block = &src[ys.start * ow..ys.end * ow];
            for (p, v) in plane[from..from + block.len()].iter_mut().zip(block) {
                *p += v;
            }
            return;
        }
        for oy in ys.clone() {
            let from = self.source(oy);
            let row = &src[oy * ow + self.xs.start..oy * ow + self.xs.end];
            for (p, v) in plane[from..from + row.len()].iter_mut().zip(row) {
                *p += v;
            }
        }
    }
}

/// Calls `f(pixel, entry, len)` for every run of an image row that forms one row of a stride
/// phase plane (see [`Geometry::plane_dims`]): pixels `pixel`, `pixel + stride`, … are the
/// entries `entry`, `entry + 1`, … (`len` of them) of the image's planes.
fn phase_runs(g: &Geometry, mut f: impl FnMut(usize, usize, usize)) {
    let (s, hw) = (g.stride, g.h * g.w);
    let offsets = g.plane_offsets();
    for ci in 0..g.c {
        for iy in 0..g.h {
            let (qy, jy) = (iy % s, iy / s);
            for qx in 0..s.min(g.w) {
                let pw = g.plane_dims(qy, qx).1;
                f(
                    ci * hw + iy * g.w + qx,
                    ci * hw + offsets[qy * s + qx] + jy * pw,
                    pw,
                );
            }
        }
    }
}

/// Writes the patches of one image `[c, h, w]` as columns of a `[c·k·k, positions]` block of
/// `cols` whose rows are `row_stride` apart (so that the blocks of several images can sit
/// side by side in one `[c·k·k, images·positions]` matrix), zeros where a patch overhangs
/// the padding. `buf` is working memory.
pub fn im2col(
    g: &Geometry,
    image: &[f32],
    cols: &mut [f32],
    row_stride: usize,
    buf: &mut Vec<f32>,
) {
    let (positions, hw, kk) = (g.positions(), g.h * g.w, g.k * g.k);
    let image = &image[..g.image()];
    let planes: &[f32] = if g.stride == 1 {
        image
    } else {
        buf.resize(g.image(), 0.0);
        phase_runs(g, |pixel, entry, len| {
            let pixels = image[pixel..].iter().step_by(g.stride);
            buf[entry..entry + len]
                .iter_mut()
                .zip(pixels)
                .for_each(|(p, x)| *p = *x);
        });
        buf
    };
    for (e, shift) in g.shifts().iter().enumerate() {
        for ci in 0..g.c {
            let r = ci * kk + e;
            shift.copy(
                &planes[ci * hw..(ci + 1) * hw],
                &mut cols[r * row_stride..r * row_stride + positions],
            );
        }
    }
}

/// The adjoint of [`im2col`]: adds every column of the block back onto the pixels its patch
/// covers. `buf` is working memory.
pub fn col2im_add(
    g: &Geometry,
    cols: &[f32],
    image: &mut [f32],
    row_stride: usize,
    buf: &mut Vec<f32>,
) {
    let (positions, hw, kk) = (g.positions(), g.h * g.w, g.k * g.k);
    let strided = g.stride > 1;
    if strided {
        buf.clear();
        buf.resize(g.image(), 0.0);
    }
    let planes: &mut [f32] = if strided {
        buf
    } else {
        &mut image[..g.image()]
    };
    for (e, shift) in g.shifts().iter().enumerate() {
        for ci in 0..g.c {
            let r = ci * kk + e;
            shift.add(
                &cols[r * row_stride..r * row_stride + positions],
                &mut planes[ci * hw..(ci + 1) * hw],
            );
        }
    }
    if strided {
        phase_runs(g, |pixel, entry, len| {
            let pixels = image[pixel..].iter_mut().step_by(g.stride);
            pixels
                .zip(&buf[entry..entry + len])
                .for_each(|(x, p)| *x += p);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum()
    }

    /// Valid geometries of up to 3 channels and 9×9 pixels, with every kernel side, stride
    /// and padding up to 5, 3 and 2, and a seed.
    fn geometries() -> impl Strategy<Value = (Geometry, u64)> {
        (
            1usize..4,
            1usize..10,
            1usize..10,
            1usize..6,
            1usize..4,
            0usize..3,
            0u64..1000,
        )
            .prop_map(|(c, h, w, k, stride, pad, seed)| {
                (
                    Geometry {
                        c,
                        h,
                        w,
                        k,
                        stride,
                        pad,
                    },
                    seed,
                )
            })
            .prop_filter("the kernel must fit the padded input", |(g, _)| {
                g.validate().is_ok()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// <im2col(x), c> = <x, col2im(c)>: col2im is im2col's adjoint, which is exactly what
        /// makes each the other's backward pass.
        #[test]
        fn col2im_is_the_adjoint_of_im2col((g, seed) in geometries()) {
            let mut rng = Rng::new(seed);
            let x = rng.normal_vec(g.image());
            let cols = rng.normal_vec(g.rows());
            let mut x_cols = vec![0f32; g.rows()];
            im2col(&g, &x, &mut x_cols, g.positions(), &mut Vec::new());
            let mut back = vec![0f32; g.image()];
            col2im_add(&g, &cols, &mut back, g.positions(), &mut Vec::new());
            let (lhs, rhs) = (dot(&x_cols, &cols), dot(&x, &back));
            prop_assert!((lhs - rhs).abs() <= 1e-3 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
        }

        /// Every entry of the column block, written over a buffer full of garbage, is the
        /// pixel its patch position reads (zero in the padding), for the second of two
        /// images side by side.
        #[test]
        fn im2col_matches_its_definition((g, seed) in geometries()) {
            let Geometry { c: _, h, w, k, stride, pad } = g;
            let x = Rng::new(seed).normal_vec(g.image());
            let p = g.positions();
            let mut cols = vec![f32::NAN; 2 * g.rows()];
            im2col(&g, &x, &mut cols[p..], 2 * p, &mut Vec::new());
            let (oh, ow) = (g.oh(), g.ow());
            for r in 0..g.patch() {
                let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (iy, ix) = ((oy * stride + ky) as isize - pad as isize, (ox * stride + kx) as isize - pad as isize);
                        let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                        let want = if inside { x[(ci * h + iy as usize) * w + ix as usize] } else { 0.0 };
                        prop_assert_eq!(cols[r * 2 * p + p + oy * ow + ox], want, "row {} at ({}, {})", r, oy, ox);
                    }
                }
            }
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
        im2col(&g, &x, &mut cols, g.positions(), &mut Vec::new());
        assert_eq!(g.positions(), 9);
        // Row r holds kernel entry r at each of the 9 output positions.
        assert_eq!(cols[0..9], [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
        assert_eq!(cols[27..36], [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        // Two images side by side: the second's block starts 9 values into each row.
        let mut two = vec![0f32; 2 * g.rows()];
        im2col(&g, &x, &mut two[9..], 18, &mut Vec::new());
        assert_eq!(two[9..18], cols[0..9]);
        assert_eq!(two[27..36], cols[9..18]);
        let mut back = vec![0f32; 4];
        col2im_add(&g, &cols, &mut back, g.positions(), &mut Vec::new());
        // Every pixel appears in 4 of the 9 padded patches.
        assert_eq!(back, vec![4.0, 8.0, 12.0, 16.0]);
        assert!(Geometry { k: 5, ..g }.validate().is_err());
    }
}
