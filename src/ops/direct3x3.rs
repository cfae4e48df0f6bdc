//! 3×3 stride-1 convolutions with one pixel of zero padding computed directly, without a
//! column matrix: the kernel reads every tap's input straight from a zero-padded copy of the
//! planes, so that the only copy is the padding itself (one value per input value, where
//! `im2col` writes nine and gemm then packs them again).
//!
//! The output is computed on the padded grid: row `y` of an output plane is the `W + 2`
//! values starting at `y·(W + 2)`, of which the first `W` are the output's and the last two
//! are discarded. Then every tap `(dy, dx)` reads the padded planes at the constant offset
//! `dy·(W + 2) + dx` from the output position, and a register tile of (up to) 6 output
//! channels by two vectors of positions is a sum of `9·c` broadcast-multiply-adds of two
//! contiguous vectors: gemm's 6×16 AVX2 tile, 12 of the 16 vector registers accumulating, or
//! on CPUs with AVX-512 the same tile over 6×32 positions in 16-lane vectors (12 of 32
//! registers). AVX2 with FMA at least (`is_x86_feature_detected`); other machines keep the
//! `im2col` path.

use std::ops::Range;

use crate::ops::cpu::{avx2_fma, avx512};
use crate::ops::im2col::Geometry;

/// Output channels per full register tile; the last tile of a layer holds the 2 or 4 left.
const R: usize = 6;

/// The vector instructions a direct convolution runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 with FMA: 8 lanes of `f32`.
    Avx2,
    /// AVX-512F: 16 lanes.
    Avx512,
}

impl Isa {
    /// The widest this CPU runs, if any.
    fn best() -> Option<Isa> {
        Isa::available().last()
    }

    /// Every instruction set this CPU has, narrowest first.
    pub(crate) fn available() -> impl Iterator<Item = Isa> {
        let avx2 = avx2_fma();
        [(Isa::Avx2, avx2), (Isa::Avx512, avx2 && avx512())]
            .into_iter()
            .filter_map(|(isa, has)| has.then_some(isa))
    }

    /// Positions per register tile of the convolution: two vectors.
    fn tile(self) -> usize {
        2 * self.lanes()
    }

    /// Lanes of one vector of `f32`.
    fn lanes(self) -> usize {
        match self {
            Isa::Avx2 => 8,
            Isa::Avx512 => 16,
        }
    }
}

/// The layout of one direct convolution of `g` images: its padded planes and computed grid.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Direct {
    /// The kernels' instruction set.
    isa: Isa,
    /// Input channels.
    c: usize,
    /// Output channels (even).
    c2: usize,
    /// Output (and input) height and width.
    h: usize,
    w: usize,
    /// Computed grid positions per image: `h·(w + 2)` rounded up to whole register tiles of
    /// two vectors.
    grid: usize,
    /// Values per padded input plane, enough for every tap of every computed position.
    plane: usize,
}

impl Direct {
    /// The direct layout for geometry `g` with `c2` output channels, where it applies: a 3×3
    /// kernel, stride 1, padding 1, an even `c2`, and a CPU with AVX2 and FMA (run at the
    /// widest vectors the CPU has).
    pub(crate) fn new(g: &Geometry, c2: usize) -> Option<Direct> {
        Direct::with_isa(g, c2, Isa::best()?)
    }

    /// [`Direct::new`] on the instructions `isa`, which the CPU must have.
    pub(crate) fn with_isa(g: &Geometry, c2: usize, isa: Isa) -> Option<Direct> {
        let fits = g.k == 3 && g.stride == 1 && g.pad == 1 && c2.is_multiple_of(2) && c2 > 0;
        if !fits {
            return None;
        }
        assert!(Isa::available().any(|a| a == isa), "{isa:?} on this CPU");
        let lanes = isa.lanes();
        let grid = (g.h * (g.w + 2)).next_multiple_of(isa.tile());
        let plane = (grid + 2 * (g.w + 2) + 2).next_multiple_of(lanes);
        Some(Direct {
            isa,
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

    /// Where each tap `t = 3·dy + dx` reads the padded planes, from the output position on the
    /// grid: `dy·(w + 2) + dx`.
    fn offsets(&self) -> [usize; 9] {
        let wp = self.w + 2;
        std::array::from_fn(|t| (t / 3) * wp + t % 3)
    }

    /// `out [c2, g, grid] = conv(xp)` for `g` images padded by [`Direct::pad`], with the
    /// weights packed by [`Direct::pack`]; the positions past each output row are garbage.
    pub(crate) fn run(&self, packed: &[f32], xp: &[f32], g: usize, out: &mut [f32]) {
        assert_eq!(packed.len(), self.c2 * self.c * 9);
        assert_eq!(xp.len(), self.padded_len(g));
        assert_eq!(out.len(), self.grid_len(g));
        let offsets = self.offsets();
        let stride = (self.c, g * self.plane);
        for i in 0..g {
            for tile in self.tiles() {
                let weights = &packed[tile.start * self.c * 9..tile.end * self.c * 9];
                for q in (0..self.grid).step_by(self.isa.tile()) {
                    // Every read lies inside `xp`: the last channel's plane of image `i`
                    // starts at `((c − 1)·g + i)·plane` and `q + 2·lanes + offset ≤ plane`.
                    let input = &xp[i * self.plane + q..];
                    let at = (tile.start * g + i) * self.grid + q;
                    let dst = (&mut *out, (at, g * self.grid));
                    // SAFETY: `isa` is one the CPU has (checked in `with_isa`); the slices'
                    // bounds are argued above and in the tiles' contract.
                    unsafe {
                        match (self.isa, tile.len()) {
                            (Isa::Avx2, 6) => tile_avx2::<6>(weights, input, stride, &offsets, dst),
                            (Isa::Avx2, 4) => tile_avx2::<4>(weights, input, stride, &offsets, dst),
                            (Isa::Avx2, _) => tile_avx2::<2>(weights, input, stride, &offsets, dst),
                            (Isa::Avx512, 6) => {
                                tile_avx512::<6>(weights, input, stride, &offsets, dst)
                            }
                            (Isa::Avx512, 4) => {
                                tile_avx512::<4>(weights, input, stride, &offsets, dst)
                            }
                            (Isa::Avx512, _) => {
                                tile_avx512::<2>(weights, input, stride, &offsets, dst)
                            }
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
    ///
    /// With AVX2, sums over one kernel row for four output channels at a time; with AVX-512,
    /// over all nine taps for three output channels ([`weight_taps_avx512`]).
    pub(crate) fn weight_grad(&self, dy: &[f32], xp: &[f32], g: usize, dwt: &mut [f32]) {
        assert_eq!(dy.len(), self.grid_len(g));
        assert_eq!(xp.len(), self.padded_len(g));
        assert_eq!(dwt.len(), self.c * 9 * self.c2);
        let wp = self.w + 2;
        let sizes = (g, self.grid, self.plane);
        if self.isa == Isa::Avx512 {
            let offsets = self.offsets();
            for co in (0..self.c2).step_by(3) {
                let r = (self.c2 - co).min(3);
                let dys = &dy[co * g * self.grid..(co + r) * g * self.grid];
                for ci in 0..self.c {
                    let x = &xp[ci * g * self.plane..];
                    // SAFETY: AVX-512F was checked in `with_isa`; `dys` holds `r` output
                    // channels' `g·grid` values, and each image's reads of `x` end at
                    // `i·plane + grid + 2·wp + 2 ≤ (i + 1)·plane`.
                    let (three, two, one);
                    let sums = unsafe {
                        match r {
                            3 => {
                                three = weight_taps_avx512::<3>(dys, x, sizes, &offsets);
                                three.as_flattened()
                            }
                            2 => {
                                two = weight_taps_avx512::<2>(dys, x, sizes, &offsets);
                                two.as_flattened()
                            }
                            _ => {
                                one = weight_taps_avx512::<1>(dys, x, sizes, &offsets);
                                one.as_flattened()
                            }
                        }
                    };
                    for (t, taps) in sums.chunks_exact(r).enumerate() {
                        dwt[(ci * 9 + t) * self.c2 + co..][..r].copy_from_slice(taps);
                    }
                }
            }
            return;
        }
        for co in (0..self.c2).step_by(4) {
            let r = (self.c2 - co).min(4);
            let dys = &dy[co * g * self.grid..(co + r) * g * self.grid];
            for ci in 0..self.c {
                for ty in 0..3 {
                    let x = &xp[ci * g * self.plane + ty * wp..];
                    // SAFETY: every `isa` implies AVX2 and FMA (`Isa::available`); `dys` holds
                    // the `r` output channels' `g·grid` values, and each image's reads of `x`
                    // end at `i·plane + grid + 2·wp + 2 ≤ (i + 1)·plane` past the plane's start.
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

/// The sums `Σ_q dy[r][q] · x[q + dx]` for `R` output channels `r` (rows `g·grid`
/// apart in `dy`) and the three taps `dx` of one kernel row, over `g` images (`grid`
/// values each in `dy`, `plane` apart in `x`), in the order `(dx, r)`. 12
/// accumulators for `R = 4`.
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
    const LANES: usize = 8;
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

/// The sums `Σ_q dy[r][q] · x[q + offsets[t]]` for `R` output channels `r` (rows `g·grid`
/// apart in `dy`) and all nine taps `t`, over `g` images (`grid` values each in `dy`, `plane`
/// apart in `x`), in the order `(t, r)`: 27 accumulators for `R = 3`. The AVX2 kernel's
/// blocking (three taps, four channels) in 16-lane vectors streams the output gradient and
/// the input from the L2 cache at about 27 bytes per multiply-add and ran no faster than in 8
/// lanes (58–79 against 75–89 GFLOP/s on one core of an Intel CPU with AVX-512, the U-Net's
/// 28×28 and 14×14 layers, 2026-12-07); nine taps for three channels read each value from L2
/// once per three channels, under 10 bytes per multiply-add: 98–110 GFLOP/s there.
///
/// # Safety
/// The CPU must have AVX-512F; `dy` holds `R·g·grid` values and `x` at least `(g − 1)·plane +
/// grid + max(offsets)` (`grid` a multiple of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn weight_taps_avx512<const R: usize>(
    dy: &[f32],
    x: &[f32],
    (g, grid, plane): (usize, usize, usize),
    offsets: &[usize; 9],
) -> [[f32; R]; 9] {
    const LANES: usize = 16;
    use std::arch::x86_64::*;
    debug_assert!(dy.len() >= R * g * grid);
    debug_assert!(x.len() >= (g - 1) * plane + grid + offsets[8]);
    let mut acc = [[_mm512_setzero_ps(); R]; 9];
    let (d, xs) = (dy.as_ptr(), x.as_ptr());
    for i in 0..g {
        let (di, xi) = (d.add(i * grid), xs.add(i * plane));
        for q in (0..grid).step_by(LANES) {
            let dv: [__m512; R] =
                std::array::from_fn(|r| _mm512_loadu_ps(di.add(r * g * grid + q)));
            for (acc, &off) in acc.iter_mut().zip(offsets) {
                let xv = _mm512_loadu_ps(xi.add(q + off));
                for (a, &d) in acc.iter_mut().zip(&dv) {
                    *a = _mm512_fmadd_ps(d, xv, *a);
                }
            }
        }
    }
    acc.map(|pair| pair.map(|a| _mm512_reduce_add_ps(a)))
}

/// Never called: [`Direct::new`] returns `None` off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn weight_taps_avx512<const R: usize>(
    _: &[f32],
    _: &[f32],
    _: (usize, usize, usize),
    _: &[usize; 9],
) -> [[f32; R]; 9] {
    unreachable!("the direct kernel runs on x86-64 only")
}

/// Writes the convolution's kernel for one instruction set, `$tile` (one register tile of
/// two vectors of `$lanes` lanes, `$vec`, with the set's `$zero`, `$load`, `$splat`, `$fma` and
/// `$store` intrinsics); off x86-64, a stub that is never called.
macro_rules! direct_kernels {
    ($features:literal, $tile:ident, $vec:ident, $lanes:literal,
     $zero:ident, $load:ident, $splat:ident, $fma:ident, $store:ident) => {
        /// One register tile: `R` output channels by two vectors of positions, summed over `c`
        /// input channels (planes `stride` apart in `input`) and the nine taps at `offsets`,
        /// stored to `out` at `at + r·row_stride` for tile row `r`.
        ///
        /// # Safety
        /// The CPU must have the target features. `weights` holds `c·9·R` values; `input`
        /// holds at least `(c − 1)·stride + max(offsets) + 2·lanes` values; `out` holds
        /// `at + (R − 1)·row_stride + 2·lanes`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $tile<const R: usize>(
            weights: &[f32],
            input: &[f32],
            (c, stride): (usize, usize),
            offsets: &[usize; 9],
            (out, (at, row_stride)): (&mut [f32], (usize, usize)),
        ) {
            const V: usize = 2;
            const LANES: usize = $lanes;
            use std::arch::x86_64::*;
            debug_assert!(weights.len() >= c * 9 * R);
            debug_assert!(input.len() >= (c - 1) * stride + offsets[8] + LANES * V);
            debug_assert!(out.len() >= at + (R - 1) * row_stride + LANES * V);
            let mut acc = [[$zero(); V]; R];
            let (w, x) = (weights.as_ptr(), input.as_ptr());
            for ci in 0..c {
                let (wc, xc) = (w.add(ci * 9 * R), x.add(ci * stride));
                for (t, &off) in offsets.iter().enumerate() {
                    let xs = xc.add(off);
                    let xv: [$vec; V] = std::array::from_fn(|v| $load(xs.add(LANES * v)));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let b = $splat(*wc.add(t * R + r));
                        for (a, &x) in acc.iter_mut().zip(&xv) {
                            *a = $fma(b, x, *a);
                        }
                    }
                }
            }
            let o = out.as_mut_ptr().add(at);
            for (r, acc) in acc.iter().enumerate() {
                for (v, &a) in acc.iter().enumerate() {
                    $store(o.add(r * row_stride + LANES * v), a);
                }
            }
        }

        /// Never called: [`Direct::new`] returns `None` off x86-64.
        #[cfg(not(target_arch = "x86_64"))]
        unsafe fn $tile<const R: usize>(
            _: &[f32],
            _: &[f32],
            _: (usize, usize),
            _: &[usize; 9],
            _: (&mut [f32], (usize, usize)),
        ) {
            unreachable!("the direct kernel runs on x86-64 only")
        }
    };
}

direct_kernels!(
    "avx2,fma",
    tile_avx2,
    __m256,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);
direct_kernels!(
    "avx512f",
    tile_avx512,
    __m512,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_conv3x3_kernel, Conv3x3Dims};

    #[test]
    fn the_direct_convolution_and_its_weight_gradient_match_the_definition_on_each_isa() {
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
        for isa in Isa::available() {
            eprintln!("{isa:?}");
            let forward = |x: &[f32], wt: &[f32], dims: Conv3x3Dims| {
                let (g, _, c2, h, w) = dims;
                let d = Direct::with_isa(&geometry(dims), c2, isa).expect("applies");
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
                let d = Direct::with_isa(&geometry(dims), c2, isa).expect("applies");
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
