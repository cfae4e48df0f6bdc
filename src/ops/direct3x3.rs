//! 3×3 stride-1 convolutions with one pixel of zero padding computed directly, without a
//! column matrix: the kernel reads every tap's input straight from a zero-padded copy of the
//! planes, so that the only copy is the padding itself (one value per input value, where
//! `im2col` writes nine and gemm then packs them again).
//!
//! The output is computed on the padded grid: row `y` of an output plane is the `W + 2`
//! values starting at `y·(W + 2)`, of which the first `W` are the output's and the last two
//! are discarded. Then every tap `(dy, dx)` reads the padded planes at the constant offset
//! `dy·(W + 2) + dx` from the output position, and a register tile of (up to) 6 output
//! channels by 16 positions is a sum of `9·c` broadcast-multiply-adds of two contiguous
//! vectors: gemm's 6×16 AVX2 tile, 12 of the 16 vector registers accumulating. AVX2 with FMA
//! (`is_x86_feature_detected`); other machines keep the `im2col` path.

use std::ops::Range;

use crate::ops::cpu::avx2_fma;
use crate::ops::im2col::Geometry;

/// Output channels per full register tile; the last tile of a layer holds the 2 or 4 left.
const R: usize = 6;
/// Lanes of an AVX2 vector of `f32`.
const LANES: usize = 8;
/// Positions per register tile: two vectors.
const TILE: usize = 2 * LANES;

/// The layout of one direct convolution of `g` images: its padded planes and computed grid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct {
    /// Input channels.
    c: usize,
    /// Output channels (even).
    c2: usize,
    /// Output (and input) height and width.
    h: usize,
    w: usize,
    /// Computed grid positions per image: `h·(w + 2)` rounded up to whole tiles.
    grid: usize,
    /// Values per padded input plane, enough for every tap of every computed position.
    plane: usize,
}

impl Direct {
    /// The direct layout for geometry `g` with `c2` output channels, where it applies: a 3×3
    /// kernel, stride 1, padding 1, an even `c2`, and a CPU with AVX2 and FMA.
    pub(crate) fn new(g: &Geometry, c2: usize) -> Option<Direct> {
        let fits = g.k == 3 && g.stride == 1 && g.pad == 1 && c2.is_multiple_of(2) && c2 > 0;
        if !fits || !avx2_fma() {
            return None;
        }
        let grid = (g.h * (g.w + 2)).next_multiple_of(TILE);
        let plane = (grid + 2 * (g.w + 2) + 2).next_multiple_of(LANES);
        Some(Direct {
            c: g.c,
            c2,
            h: g.h,
            w: g.w,
            grid,
            plane,
        })
    }

    /// Values of the padded input of `g` images, `[c, g, plane]`.
    pub(crate) fn padded_len(&self, g: usize) -> usize {
        self.c * g * self.plane
    }

    /// Values of the output of `g` images on the computed grid, `[c2, g, grid]`.
    pub(crate) fn grid_len(&self, g: usize) -> usize {
        self.c2 * g * self.grid
    }

    /// Lays `g` images `[g, channels, h, w]` out as `out [channels, g, len]`: row `y` of a plane
    /// goes to `origin + y·(w + 2)` of its `len` values, written by `row(r, at, dst, src)`
    /// (`r = image·channels + channel`, `src` the row, `at = y·w` its place in the plane), and
    /// every other value of `out` is zeroed.
    fn lay_out(
        &self,
        (per_image, channels): (&[f32], usize),
        g: usize,
        (out, len, origin): (&mut [f32], usize, usize),
        row: impl Fn(usize, usize, &mut [f32], &[f32]),
    ) {
        let (h, w, wp) = (self.h, self.w, self.w + 2);
        assert_eq!(per_image.len(), g * channels * h * w);
        assert_eq!(out.len(), channels * g * len);
        for (rr, dst) in out.chunks_exact_mut(len).enumerate() {
            let r = (rr % g) * channels + rr / g;
            let mut end = 0;
            for (y, src) in per_image[r * h * w..(r + 1) * h * w]
                .chunks_exact(w)
                .enumerate()
            {
                let start = origin + y * wp;
                dst[end..start].fill(0.0);
                row(r, y * w, &mut dst[start..start + w], src);
                end = start + w;
            }
            dst[end..].fill(0.0);
        }
    }

    /// Copies `g` images `[g, c, h, w]` into zero-padded planes `xp [c, g, plane]`, writing
    /// every value of `xp`.
    pub(crate) fn pad(&self, x: &[f32], g: usize, xp: &mut [f32]) {
        let dst = (xp, self.plane, self.w + 3);
        self.lay_out((x, self.c), g, dst, |_, _, dst, src| {
            dst.copy_from_slice(src)
        });
    }

    /// The register tiles' output channels: sixes, then the 2 or 4 left.
    fn tiles(&self) -> impl Iterator<Item = Range<usize>> {
        let c2 = self.c2;
        (0..c2).step_by(R).map(move |co| co..(co + R).min(c2))
    }

    /// `w [c2, c, 3, 3]` rearranged for the kernel: per register tile of output channels
    /// `co0..co1`, from `co0·c·9` on, per input channel and tap, the tile's weights side by side.
    pub(crate) fn pack(&self, w: &[f32]) -> Vec<f32> {
        assert_eq!(w.len(), self.c2 * self.c * 9);
        let mut packed = vec![0f32; w.len()];
        for tile in self.tiles() {
            let (start, r) = (tile.start * self.c * 9, tile.len());
            for (j, co) in tile.enumerate() {
                for (k, &v) in w[co * self.c * 9..(co + 1) * self.c * 9].iter().enumerate() {
                    packed[start + k * r + j] = v;
                }
            }
        }
        packed
    }

    /// `out [c2, g, grid] = conv(xp)` for `g` images padded by [`Direct::pad`], with the
    /// weights packed by [`Direct::pack`]; the positions past each output row are garbage.
    pub(crate) fn run(&self, packed: &[f32], xp: &[f32], g: usize, out: &mut [f32]) {
        assert_eq!(packed.len(), self.c2 * self.c * 9);
        assert_eq!(xp.len(), self.padded_len(g));
        assert_eq!(out.len(), self.grid_len(g));
        let wp = self.w + 2;
        let offsets: [usize; 9] = std::array::from_fn(|t| (t / 3) * wp + t % 3);
        let stride = (self.c, g * self.plane);
        for i in 0..g {
            for tile in self.tiles() {
                let weights = &packed[tile.start * self.c * 9..tile.end * self.c * 9];
                for q in (0..self.grid).step_by(TILE) {
                    // Every read lies inside `xp`: the last channel's plane of image `i`
                    // starts at `((c − 1)·g + i)·plane` and `q + 16 + offset ≤ plane`.
                    let input = &xp[i * self.plane + q..];
                    let at = (tile.start * g + i) * self.grid + q;
                    let dst = (&mut *out, (at, g * self.grid));
                    // SAFETY: AVX2 and FMA were detected in `new`; the slices' bounds are argued
                    // above and in `tile`'s contract.
                    unsafe {
                        match tile.len() {
                            6 => tile_avx2::<6>(weights, input, stride, &offsets, dst),
                            4 => tile_avx2::<4>(weights, input, stride, &offsets, dst),
                            _ => tile_avx2::<2>(weights, input, stride, &offsets, dst),
                        }
                    }
                }
            }
        }
    }

    /// Whether [`Direct::weight_grad`] beats `im2col` and gemm on this plane: on planes of at
    /// least 14×14 (measured on 2 cores of an AVX2 machine: 28×28 by 16 channels 73 against
    /// 67 GFLOP/s of gemm alone, 32×32 by 128 54 against 25; on 8×8 by 256 21 against 49, where
    /// each image's sums are only a few vectors long).
    pub(crate) fn weight_grad_pays(&self) -> bool {
        self.h * self.w >= 14 * 14
    }

    /// Writes `g` images of the output side `[g, c2, h, w]` onto the computed grid, `[c2, g,
    /// grid]`, each output row by `row(r, dst, src)` (`r = image·c2 + channel`, `src` the
    /// row's `w` values at `at = y·w` in its plane), and zeros past each row: the form
    /// [`Direct::weight_grad`] sums over.
    pub(crate) fn onto_grid(
        &self,
        per_image: &[f32],
        g: usize,
        out: &mut [f32],
        row: impl Fn(usize, usize, &mut [f32], &[f32]),
    ) {
        self.lay_out((per_image, self.c2), g, (out, self.grid, 0), row);
    }

    /// The weight gradient, transposed: `dwt [c·9, c2]`, `dwt[(ci·9 + t)·c2 + co] = Σ dy[co] ·
    /// x[ci] shifted by tap t`, over the `g` images of the output gradient `dy` on the grid
    /// ([`Direct::onto_grid`]) and the padded input `xp` ([`Direct::pad`]). Overwrites `dwt`.
    pub(crate) fn weight_grad(&self, dy: &[f32], xp: &[f32], g: usize, dwt: &mut [f32]) {
        assert_eq!(dy.len(), self.grid_len(g));
        assert_eq!(xp.len(), self.padded_len(g));
        assert_eq!(dwt.len(), self.c * 9 * self.c2);
        let wp = self.w + 2;
        let sizes = (g, self.grid, self.plane);
        for co in (0..self.c2).step_by(4) {
            let r = (self.c2 - co).min(4);
            let dys = &dy[co * g * self.grid..(co + r) * g * self.grid];
            for ci in 0..self.c {
                for ty in 0..3 {
                    let x = &xp[ci * g * self.plane + ty * wp..];
                    // SAFETY: AVX2 and FMA were detected in `new`; `dys` holds the `r`
                    // output channels' `g·grid` values, and each image's reads of `x` end
                    // at `i·plane + grid + 2·wp + 2 ≤ (i + 1)·plane` past the plane's start.
                    let (four, two);
                    let sums = unsafe {
                        match r {
                            4 => {
                                four = weight_tile_avx2::<4>(dys, x, sizes);
                                four.as_flattened()
                            }
                            _ => {
                                two = weight_tile_avx2::<2>(dys, x, sizes);
                                two.as_flattened()
                            }
                        }
                    };
                    for (dx, taps) in sums.chunks_exact(r).enumerate() {
                        let k = ci * 9 + ty * 3 + dx;
                        dwt[k * self.c2 + co..][..r].copy_from_slice(taps);
                    }
                }
            }
        }
    }

    /// Calls `row(i, co, y, values)` with the `w` values of output row `y` of channel `co` of
    /// image `i`, from a grid computed by [`Direct::run`].
    pub(crate) fn rows(
        &self,
        out: &[f32],
        g: usize,
        mut row: impl FnMut(usize, usize, usize, &[f32]),
    ) {
        let wp = self.w + 2;
        for (r, grid) in out.chunks_exact(self.grid).enumerate() {
            let (co, i) = (r / g, r % g);
            for y in 0..self.h {
                row(i, co, y, &grid[y * wp..y * wp + self.w]);
            }
        }
    }
}

/// One register tile: `R` output channels by 16 positions, summed over `c` input channels
/// (planes `stride` apart in `input`) and the nine taps at `offsets`, stored to `out` at
/// `at + r·row_stride` for tile row `r`.
///
/// # Safety
/// The CPU must have AVX2 and FMA. `weights` holds `c·9·R` values; `input` holds at least
/// `(c − 1)·stride + max(offsets) + 16` values; `out` holds `at + (R − 1)·row_stride + 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(
    weights: &[f32],
    input: &[f32],
    (c, stride): (usize, usize),
    offsets: &[usize; 9],
    (out, (at, row_stride)): (&mut [f32], (usize, usize)),
) {
    const V: usize = TILE / LANES;
    use std::arch::x86_64::*;
    debug_assert!(weights.len() >= c * 9 * R);
    debug_assert!(input.len() >= (c - 1) * stride + offsets[8] + LANES * V);
    debug_assert!(out.len() >= at + (R - 1) * row_stride + LANES * V);
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    let (w, x) = (weights.as_ptr(), input.as_ptr());
    for ci in 0..c {
        let (wc, xc) = (w.add(ci * 9 * R), x.add(ci * stride));
        for (t, &off) in offsets.iter().enumerate() {
            let xs = xc.add(off);
            let xv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(xs.add(LANES * v)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(*wc.add(t * R + r));
                for (a, &x) in acc.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(b, x, *a);
                }
            }
        }
    }
    let o = out.as_mut_ptr().add(at);
    for (r, acc) in acc.iter().enumerate() {
        for (v, &a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(r * row_stride + LANES * v), a);
        }
    }
}

/// The sums `Σ_q dy[r][q] · x[q + dx]` for `R` output channels `r` (rows `g·grid` apart in
/// `dy`) and the three taps `dx` of one kernel row, over `g` images (`grid` values each in
/// `dy`, `plane` apart in `x`), in the order `(dx, r)`. 12 accumulators for `R = 4`.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `dy` holds `R·g·grid` values and `x` at least
/// `(g − 1)·plane + grid + 2` (`grid` a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weight_tile_avx2<const R: usize>(
    dy: &[f32],
    x: &[f32],
    (g, grid, plane): (usize, usize, usize),
) -> [[f32; R]; 3] {
    use std::arch::x86_64::*;
    debug_assert!(dy.len() >= R * g * grid);
    debug_assert!(x.len() >= (g - 1) * plane + grid + 2);
    let mut acc = [[_mm256_setzero_ps(); 3]; R];
    let (d, xs) = (dy.as_ptr(), x.as_ptr());
    for i in 0..g {
        let (di, xi) = (d.add(i * grid), xs.add(i * plane));
        for q in (0..grid).step_by(LANES) {
            let xv: [__m256; 3] = std::array::from_fn(|dx| _mm256_loadu_ps(xi.add(q + dx)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let dv = _mm256_loadu_ps(di.add(r * g * grid + q));
                for (a, &x) in acc.iter_mut().zip(&xv) {
                    *a = _mm256_fmadd_ps(dv, x, *a);
                }
            }
        }
    }
    let mut sums = [[0f32; R]; 3];
    for (r, acc) in acc.iter().enumerate() {
        for (dx, &a) in acc.iter().enumerate() {
            let mut lanes = [0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), a);
            sums[dx][r] = lanes.iter().sum();
        }
    }
    sums
}

/// Never called: [`Direct::new`] returns `None` off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn weight_tile_avx2<const R: usize>(
    _: &[f32],
    _: &[f32],
    _: (usize, usize, usize),
) -> [[f32; R]; 3] {
    unreachable!("the direct kernel runs on x86-64 only")
}

/// Never called: [`Direct::new`] returns `None` off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_avx2<const R: usize>(
    _: &[f32],
    _: &[f32],
    _: (usize, usize),
    _: &[usize; 9],
    _: (&mut [f32], (usize, usize)),
) {
    unreachable!("the direct kernel runs on x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_conv3x3_kernel, Conv3x3Dims};

    #[test]
    fn the_direct_convolution_and_its_weight_gradient_match_the_definition() {
        if !avx2_fma() {
            eprintln!("no AVX2 here: the direct kernel is not used, nothing to test");
            return;
        }
        let geometry = |(_, c, _, h, w): Conv3x3Dims| Geometry {
            c,
            h,
            w,
            k: 3,
            stride: 1,
            pad: 1,
        };
        let shapes = [
            (2, 3, 10, 7, 7),
            (3, 16, 16, 14, 14),
            (1, 5, 32, 28, 28),
            (2, 1, 4, 5, 9),
            (2, 3, 6, 6, 4),
        ];
        let forward = |x: &[f32], wt: &[f32], dims: Conv3x3Dims| {
            let (g, _, c2, h, w) = dims;
            let d = Direct::new(&geometry(dims), c2).expect("applies");
            let mut xp = vec![f32::NAN; d.padded_len(g)];
            d.pad(x, g, &mut xp);
            let mut out = vec![f32::NAN; d.grid_len(g)];
            d.run(&d.pack(wt), &xp, g, &mut out);
            let mut y = vec![f32::NAN; g * c2 * h * w];
            d.rows(&out, g, |i, co, yy, vals| {
                y[((i * c2 + co) * h + yy) * w..][..w].copy_from_slice(vals)
            });
            y
        };
        let weight_grad = |x: &[f32], dy: &[f32], dims: Conv3x3Dims| {
            let (g, c, c2, ..) = dims;
            let d = Direct::new(&geometry(dims), c2).expect("applies");
            let mut xp = vec![f32::NAN; d.padded_len(g)];
            d.pad(x, g, &mut xp);
            let mut grid = vec![f32::NAN; d.grid_len(g)];
            d.onto_grid(dy, g, &mut grid, |_, _, dst, src| dst.copy_from_slice(src));
            let mut dwt = vec![f32::NAN; c * 9 * c2];
            d.weight_grad(&grid, &xp, g, &mut dwt);
            dwt
        };
        check_conv3x3_kernel(&shapes, 5, forward, weight_grad);
    }

    #[test]
    fn the_direct_path_declines_what_it_cannot_compute() {
        let g = |k, stride, pad| Geometry {
            c: 4,
            h: 8,
            w: 8,
            k,
            stride,
            pad,
        };
        assert!(Direct::new(&g(3, 2, 1), 8).is_none());
        assert!(Direct::new(&g(5, 1, 2), 8).is_none());
        assert!(Direct::new(&g(3, 1, 0), 8).is_none());
        assert!(Direct::new(&g(3, 1, 1), 5).is_none());
    }
}
