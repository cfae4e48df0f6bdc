//! `im2col` (image patches → columns) and its adjoint `col2im` (columns → summed images) on
//! the plain f32 data of a group of images, in two stages each. The images are first split
//! into their stride phases (the pixels whose row and column are `qy`, `qx` modulo the
//! stride, [`split_phases`]), so that every row of the column matrix is a shifted copy of one
//! phase plane: for the whole group in one piece when the planes have the output's size (as
//! in every layer here), else row by row. The rows are then built for a range of input
//! channels at a time ([`im2col_rows`]), so that the convolution kernels in `conv` can hand
//! each block to gemm while it is still in the cache; `col2im` runs the same stages backwards
//! ([`col2im_rows_add`], [`merge_phases_add`]).

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
                    oh,
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
/// position `(oy, ox)` of an image reads entry `(oy + dy, ox + dx)` of that image's plane,
/// which has `rows × cols` entries and, with the same plane of the other images of the group,
/// starts `offset` values (times the images) into the channel's block; outside the valid
/// output rows `ys` and columns `xs` it reads padding.
struct Shift {
    offset: usize,
    rows: usize,
    cols: usize,
    dy: isize,
    dx: isize,
    oh: usize,
    ow: usize,
    ys: Range<usize>,
    xs: Range<usize>,
    /// The output columns outside `xs`.
    zero_cols: Vec<usize>,
}

impl Shift {
    /// Whether a plane has the output's size, so that the planes of a group, back to back,
    /// map onto the group's output positions by one flat shift.
    fn flat(&self) -> bool {
        self.rows == self.oh && self.cols == self.ow
    }

    /// The flat index shift from an output position to the plane entry it reads.
    fn shift(&self) -> isize {
        self.dy * self.ow as isize + self.dx
    }

    /// Sets the entries of one row (`n` images of `oh·ow` positions) of the column matrix that
    /// read padding to zero.
    fn zero_padding(&self, row: &mut [f32]) {
        let ow = self.ow;
        for image in row.chunks_mut(self.oh * ow) {
            if self.ys.is_empty() {
                image.fill(0.0);
                continue;
            }
            image[..self.ys.start * ow].fill(0.0);
            image[self.ys.end * ow..].fill(0.0);
            for oy in self.ys.clone() {
                for &c in &self.zero_cols {
                    image[oy * ow + c] = 0.0;
                }
            }
        }
    }

    /// The positions `0..len` (of a flat row) whose shifted entry lies inside `0..planes`.
    fn clipped(&self, len: usize, planes: usize) -> Range<usize> {
        valid(self.shift(), planes, len)
    }

    /// Calls `f(positions, entry)` for runs of a row of the column matrix (`len` positions,
    /// `n` images) that read consecutive plane entries from `entry` on, among `planes` values:
    /// one run in all when the planes have the output's size (positions reading across a row
    /// or image end, or outside the planes, are padding), one per image and valid output row
    /// otherwise.
    fn runs(&self, len: usize, planes: usize, mut f: impl FnMut(Range<usize>, usize)) {
        let per_image = self.rows * self.cols;
        if per_image == 0 {
            // A phase without pixels: every position is padding.
        } else if self.flat() {
            let r = self.clipped(len, planes);
            if !r.is_empty() {
                let from = (r.start as isize + self.shift()) as usize;
                f(r, from);
            }
        } else {
            let (ow, out) = (self.ow, self.oh * self.ow);
            for img in 0..len / out {
                for oy in self.ys.clone() {
                    let at = img * per_image + self.entry(oy);
                    let start = img * out + oy * ow;
                    f(start + self.xs.start..start + self.xs.end, at);
                }
            }
        }
    }

    /// Writes one row of the column matrix (`n` images) from the group's planes of one
    /// channel and phase.
    fn copy(&self, planes: &[f32], row: &mut [f32]) {
        self.runs(row.len(), planes.len(), |r, at| {
            let len = r.len();
            row[r].copy_from_slice(&planes[at..at + len]);
        });
        self.zero_padding(row);
    }

    /// The adjoint of [`Shift::copy`]: adds one row of the column matrix onto the planes.
    /// Zeroes the row's padding entries first (the row is working memory), so that in the
    /// single flat run they add nothing where they land.
    fn add(&self, row: &mut [f32], planes: &mut [f32]) {
        self.zero_padding(row);
        self.runs(row.len(), planes.len(), |r, at| {
            let len = r.len();
            for (p, v) in planes[at..at + len].iter_mut().zip(&row[r]) {
                *p += v;
            }
        });
    }

    /// Where output `(oy, xs.start)` of an image reads in that image's plane.
    fn entry(&self, oy: usize) -> usize {
        ((oy as isize + self.dy) * self.cols as isize + self.xs.start as isize + self.dx) as usize
    }
}

/// Calls `f(pixel, entries)` for every image row of `n` images `[n, c, h, w]` whose planes are
/// grouped by channel and phase (each block holding that plane of all `n` images in turn):
/// the row's pixels `pixel + qx`, `pixel + qx + stride`, … are the entries `entries[qx]`,
/// `entries[qx] + 1`, … of the row's phase planes (one per column phase `qx`, in increasing
/// order).
fn phase_rows(g: &Geometry, n: usize, mut f: impl FnMut(usize, &[usize])) {
    let (s, hw) = (g.stride, g.h * g.w);
    let offsets = g.plane_offsets();
    // A plane's height depends on its row phase only, its width on its column phase only.
    let heights: Vec<usize> = (0..s).map(|qy| g.plane_dims(qy, 0).0).collect();
    let widths: Vec<usize> = (0..s.min(g.w)).map(|qx| g.plane_dims(0, qx).1).collect();
    let mut entries = vec![0; widths.len()];
    for ci in 0..g.c {
        let channel = ci * n * hw;
        for img in 0..n {
            let image = (img * g.c + ci) * hw;
            let (mut qy, mut jy) = (0, 0);
            for iy in 0..g.h {
                let phases = &offsets[qy * s..];
                for (qx, (e, &pw)) in entries.iter_mut().zip(&widths).enumerate() {
                    *e = channel + n * phases[qx] + (img * heights[qy] + jy) * pw;
                }
                f(image + iy * g.w, &entries);
                qy += 1;
                if qy == s {
                    (qy, jy) = (0, jy + 1);
                }
            }
        }
    }
}

/// Calls `f(shift, row, planes)` for every row of the column matrix of `n` images that
/// belongs to an input channel in `channels`: the row's [`Shift`], its range in the matrix of
/// those channels' rows (`[|channels|·k·k, n·positions]`) and the range of the group's planes
/// it reads (one channel, one phase).
fn for_each_row(
    g: &Geometry,
    n: usize,
    channels: Range<usize>,
    mut f: impl FnMut(&Shift, Range<usize>, Range<usize>),
) {
    let (len, hw, kk) = (n * g.positions(), g.h * g.w, g.k * g.k);
    for (e, shift) in g.shifts().iter().enumerate() {
        for ci in channels.clone() {
            let at = ci * n * hw + n * shift.offset;
            let r = (ci - channels.start) * kk + e;
            f(
                shift,
                r * len..(r + 1) * len,
                at..at + n * shift.rows * shift.cols,
            );
        }
    }
}

/// `im2col`'s first stage: splits `n` images `[n, c, h, w]` into their stride phase planes
/// (grouped by channel and phase) in `planes`, from which [`im2col_rows`] copies the rows of
/// the column matrix.
pub fn split_phases(g: &Geometry, images: &[f32], n: usize, planes: &mut Vec<f32>) {
    let (s, w) = (g.stride, g.w);
    planes.resize(n * g.image(), 0.0);
    if s == 1 {
        // One plane per channel: the images' channel blocks, regrouped by channel.
        for (r, block) in images[..n * g.image()].chunks(g.h * w).enumerate() {
            let (img, ci) = (r / g.c, r % g.c);
            planes[(ci * n + img) * block.len()..][..block.len()].copy_from_slice(block);
        }
        return;
    }
    phase_rows(g, n, |pixel, entries| {
        let row = &images[pixel..pixel + w];
        if let (2, &[e0, e1]) = (s, entries) {
            // Every downsampling layer here: one pass over the row's pixel pairs.
            let (even, odd) = planes.split_at_mut(e1);
            let pairs = row.chunks_exact(2);
            if let [last] = pairs.remainder() {
                even[e0 + w / 2] = *last;
            }
            for ((p, a), b) in pairs.zip(&mut even[e0..e0 + w / 2]).zip(&mut odd[..w / 2]) {
                (*a, *b) = (p[0], p[1]);
            }
            return;
        }
        for (qx, &e) in entries.iter().enumerate() {
            for (p, x) in planes[e..].iter_mut().zip(row[qx..].iter().step_by(s)) {
                *p = *x;
            }
        }
    });
}

/// Writes the rows of the column matrix of `n` images that belong to the input channels
/// `channels`, `[|channels|·k·k, n·positions]` (image after image along each row), from the
/// images' phase planes ([`split_phases`]); zeros where a patch overhangs the padding.
pub fn im2col_rows(
    g: &Geometry,
    planes: &[f32],
    n: usize,
    channels: Range<usize>,
    cols: &mut [f32],
) {
    for_each_row(g, n, channels, |shift, row, from| {
        shift.copy(&planes[from], &mut cols[row]);
    });
}

/// Zeroed phase planes for `n` images, to sum [`col2im_rows_add`] into.
pub fn zero_phases<'a>(g: &Geometry, n: usize, planes: &'a mut Vec<f32>) -> &'a mut [f32] {
    planes.clear();
    planes.resize(n * g.image(), 0.0);
    planes
}

/// The adjoint of [`im2col_rows`]: adds the rows of the channels `channels` back onto the
/// phase planes of the pixels their patches cover. `cols` is consumed as working memory (its
/// padding entries are zeroed).
pub fn col2im_rows_add(
    g: &Geometry,
    cols: &mut [f32],
    n: usize,
    channels: Range<usize>,
    planes: &mut [f32],
) {
    for_each_row(g, n, channels, |shift, row, to| {
        shift.add(&mut cols[row], &mut planes[to]);
    });
}

/// The adjoint of [`split_phases`]: adds the phase planes of `n` images onto the images.
pub fn merge_phases_add(g: &Geometry, planes: &[f32], n: usize, images: &mut [f32]) {
    let (s, w) = (g.stride, g.w);
    if s == 1 {
        for (r, block) in images[..n * g.image()].chunks_mut(g.h * w).enumerate() {
            let (img, ci) = (r / g.c, r % g.c);
            let plane = &planes[(ci * n + img) * block.len()..][..block.len()];
            block.iter_mut().zip(plane).for_each(|(x, p)| *x += p);
        }
        return;
    }
    phase_rows(g, n, |pixel, entries| {
        let row = &mut images[pixel..pixel + w];
        if let (2, &[e0, e1]) = (s, entries) {
            let (even, odd) = (&planes[e0..], &planes[e1..]);
            let mut pairs = row.chunks_exact_mut(2);
            for ((p, a), b) in (&mut pairs).zip(&even[..w / 2]).zip(&odd[..w / 2]) {
                p[0] += a;
                p[1] += b;
            }
            if let [last] = pairs.into_remainder() {
                *last += even[w / 2];
            }
            return;
        }
        for (qx, &e) in entries.iter().enumerate() {
            for (x, p) in row[qx..].iter_mut().step_by(s).zip(&planes[e..]) {
                *x += p;
            }
        }
    });
}

/// The whole column matrix `[c·k·k, n·positions]` of `n` images.
#[cfg(test)]
fn im2col(g: &Geometry, images: &[f32], n: usize, cols: &mut [f32]) {
    let mut planes = Vec::new();
    split_phases(g, images, n, &mut planes);
    im2col_rows(g, &planes, n, 0..g.c, cols);
}

/// The adjoint of [`im2col`]: adds every column back onto the pixels its patch covers.
#[cfg(test)]
fn col2im_add(g: &Geometry, cols: &mut [f32], n: usize, images: &mut [f32]) {
    let mut planes = Vec::new();
    let planes = zero_phases(g, n, &mut planes);
    col2im_rows_add(g, cols, n, 0..g.c, planes);
    merge_phases_add(g, planes, n, images);
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
        /// <im2col(x), c> = <x, col2im(c)> for a group of 1 to 3 images: col2im is im2col's
        /// adjoint, which is exactly what makes each the other's backward pass.
        #[test]
        fn col2im_is_the_adjoint_of_im2col((g, seed) in geometries(), n in 1usize..4) {
            let mut rng = Rng::new(seed);
            let x = rng.normal_vec(n * g.image());
            let cols = rng.normal_vec(n * g.rows());
            let mut x_cols = vec![0f32; n * g.rows()];
            im2col(&g, &x, n, &mut x_cols);
            let mut back = vec![0f32; n * g.image()];
            col2im_add(&g, &mut cols.clone(), n, &mut back);
            let (lhs, rhs) = (dot(&x_cols, &cols), dot(&x, &back));
            prop_assert!((lhs - rhs).abs() <= 1e-3 * (1.0 + lhs.abs()), "{} vs {}", lhs, rhs);
        }

        /// The rows of a range of channels are those channels' rows of the whole matrix, and
        /// adding the rows back range by range gives the whole adjoint, bit for bit.
        #[test]
        fn channel_ranges_are_slices_of_the_whole(
            (g, seed) in geometries(),
            n in 1usize..4,
            cut in 0usize..4,
        ) {
            let cut = cut.min(g.c);
            let mut rng = Rng::new(seed);
            let x = rng.normal_vec(n * g.image());
            let mut whole = vec![0f32; n * g.rows()];
            im2col(&g, &x, n, &mut whole);
            let mut planes = Vec::new();
            split_phases(&g, &x, n, &mut planes);
            let per_channel = g.k * g.k * n * g.positions();
            let mut parts = vec![f32::NAN; n * g.rows()];
            let (a, b) = parts.split_at_mut(cut * per_channel);
            im2col_rows(&g, &planes, n, 0..cut, a);
            im2col_rows(&g, &planes, n, cut..g.c, b);
            prop_assert_eq!(&parts, &whole);

            let cols = rng.normal_vec(n * g.rows());
            let mut back = vec![0f32; n * g.image()];
            col2im_add(&g, &mut cols.clone(), n, &mut back);
            let mut cols = cols;
            let (a, b) = cols.split_at_mut(cut * per_channel);
            let mut buf = Vec::new();
            let planes = zero_phases(&g, n, &mut buf);
            col2im_rows_add(&g, b, n, cut..g.c, planes);
            col2im_rows_add(&g, a, n, 0..cut, planes);
            let mut parts = vec![0f32; n * g.image()];
            merge_phases_add(&g, planes, n, &mut parts);
            prop_assert_eq!(parts, back);
        }

        /// Every entry of the column matrix of a group of 1 to 3 images, written over a buffer
        /// full of garbage, is the pixel its patch position reads (zero in the padding).
        #[test]
        fn im2col_matches_its_definition((g, seed) in geometries(), n in 1usize..4) {
            let Geometry { c, h, w, k, stride, pad } = g;
            let x = Rng::new(seed).normal_vec(n * g.image());
            let p = g.positions();
            let mut cols = vec![f32::NAN; n * g.rows()];
            im2col(&g, &x, n, &mut cols);
            let (oh, ow) = (g.oh(), g.ow());
            for r in 0..g.patch() {
                let (ci, ky, kx) = (r / (k * k), r / k % k, r % k);
                for (img, oy, ox) in (0..n).flat_map(|i| (0..oh).flat_map(move |y| (0..ow).map(move |x| (i, y, x)))) {
                    let (iy, ix) = ((oy * stride + ky) as isize - pad as isize, (ox * stride + kx) as isize - pad as isize);
                    let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                    let want = if inside { x[((img * c + ci) * h + iy as usize) * w + ix as usize] } else { 0.0 };
                    prop_assert_eq!(cols[r * n * p + img * p + oy * ow + ox], want, "row {} image {} at ({}, {})", r, img, oy, ox);
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
        im2col(&g, &x, 1, &mut cols);
        assert_eq!(g.positions(), 9);
        // Row r holds kernel entry r at each of the 9 output positions.
        assert_eq!(cols[0..9], [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
        assert_eq!(cols[27..36], [1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        // Two images: each row holds the first image's 9 positions, then the second's.
        let two_images = [x, x.map(|v| -v)].concat();
        let mut two = vec![0f32; 2 * g.rows()];
        im2col(&g, &two_images, 2, &mut two);
        assert_eq!(two[0..9], cols[0..9]);
        assert_eq!(
            two[9..18],
            cols[0..9].iter().map(|v| -v).collect::<Vec<_>>()[..]
        );
        assert_eq!(two[18..27], cols[9..18]);
        let mut back = vec![0f32; 4];
        col2im_add(&g, &mut cols, 1, &mut back);
        // Every pixel appears in 4 of the 9 padded patches.
        assert_eq!(back, vec![4.0, 8.0, 12.0, 16.0]);
        assert!(Geometry { k: 5, ..g }.validate().is_err());
    }
}
