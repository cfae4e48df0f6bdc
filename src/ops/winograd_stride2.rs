//! 4×4 stride-2 convolutions with one pixel of zero padding (a DCGAN's down- and upsampling
//! layers, `genbackdoor bench --model k4`) by Winograd's minimal filtering F(4×4, 2×2) over
//! stride phases. Padded by one, an input plane of even sides splits into four phase planes
//! (even or odd rows × even or odd columns) of `(h/2 + 1) × (w/2 + 1)` pixels, and the 4×4
//! kernel into four 2×2 kernels, one per phase: the convolution is a stride-1 2×2
//! convolution over `4c` phase channels. F(4×4, 2×2) computes each 4×4 block of its outputs
//! as `Aᵀ [(G w Gᵀ) ⊙ (Bᵀ d B)] A` from the 5×5 tile `d` under it, 25 multiplications per
//! pair of channels where the 2×2 kernel takes 64 (a 14×14 plane's 7×7 outputs: 4 tiles, 100
//! multiplications against 196). Interpolation points 0, 1, −1, 2 and ∞.
//!
//! Three maps, each 25 gemm products between transforms: `gather` (the convolution),
//! `scatter` (its adjoint: the convolution's input gradient and the transposed
//! convolution's forward pass, a 2×2 convolution of the output with the flipped kernel onto
//! the phase planes) and `weight_grad` (`Gᵀ [Σ (A dy Aᵀ) ⊙ (Bᵀ d B)] G` over the tiles).
//! Transformed values lie channels last, `[25, tiles, channels]`, so that every transform
//! runs along the channels, a vector lane per channel.

use crate::ops::cpu::{matmul, parallel_pieces};
use crate::ops::im2col::Geometry;
use crate::ops::winograd::{disjoint, lanes, split};

/// Side of an input tile.
const T: usize = 5;
/// Entries of a transformed tile (5×5).
const K: usize = T * T;
/// Side of a block of outputs per tile.
const M: usize = 4;
/// Working rows (of a lane each) of a tile's transforms: a 5×5 tile between passes and a
/// block of 4×4 outputs.
const TMP: usize = K + M * M;

/// Channels a convolution needs on each side for this path to beat `im2col` and gemm: the
/// transforms' work grows with the channels, the products' with their square. Measured
/// (docs/speed.md, session 50): 64 → 128 channels on 14×14 planes 1.3 times faster with
/// their gradients, 32 → 32 and 32 → 64 no faster.
const MIN_CHANNELS: usize = 64;

/// `Bᵀ d` for five values of an input tile's column or row.
fn bt([d0, d1, d2, d3, d4]: [f32; 5]) -> [f32; 5] {
    [
        2.0 * (d0 - d2) + d3 - d1,
        2.0 * d1 + d2 - d3,
        3.0 * d2 - 2.0 * d1 - d3,
        d3 - d1,
        2.0 * (d1 - d3) - d2 + d4,
    ]
}

/// `Aᵀ m` for five transformed values: four outputs.
fn at([m0, m1, m2, m3, m4]: [f32; 5]) -> [f32; 4] {
    let (s, d) = (m1 + m2, m1 - m2);
    [m0 + s + m3, d + 2.0 * m3, s + 4.0 * m3, d + 8.0 * m3 + m4]
}

/// `A y` (the adjoint of [`at`]) for four output gradients.
fn a([y0, y1, y2, y3]: [f32; 4]) -> [f32; 5] {
    let (e, o) = (y0 + y2, y1 + y3);
    [y0, e + o, e - o, y0 + 2.0 * y1 + 4.0 * y2 + 8.0 * y3, y3]
}

/// `G g` for two kernel values.
fn g([g0, g1]: [f32; 2]) -> [f32; 5] {
    [
        0.5 * g0,
        0.5 * (g0 + g1),
        (g0 - g1) / 6.0,
        (g0 + 2.0 * g1) / 6.0,
        g1,
    ]
}

/// `Gᵀ s` (the adjoint of [`g`]) for five transformed values.
fn gt([s0, s1, s2, s3, s4]: [f32; 5]) -> [f32; 2] {
    [
        0.5 * (s0 + s1) + (s2 + s3) / 6.0,
        0.5 * s1 + (2.0 * s3 - s2) / 6.0 + s4,
    ]
}

/// A separable transform of a tile of `R × C` rows of lanes (`src[row][column]`): `f` along
/// each row (`C` values to `C2`) into `tmp`, then `h` down each of the `C2` columns (`R`
/// values to `R2`), written to the rows of `dst` at `starts(column)` (entry `(r, column)` at
/// `starts(column)[r]`).
#[inline(always)]
fn separable<const R: usize, const C: usize, const C2: usize, const R2: usize>(
    src: [[&[f32]; C]; R],
    (f, h): (
        impl Fn([f32; C]) -> [f32; C2],
        impl Fn([f32; R]) -> [f32; R2],
    ),
    tmp: &mut [f32],
    (dst, starts): (&mut [f32], impl Fn(usize) -> [usize; R2]),
) {
    let l = src[0][0].len();
    for (r, row) in src.into_iter().enumerate() {
        lanes(row, split::<C2>(&mut tmp[r * C2 * l..], l), &f);
    }
    for j in 0..C2 {
        let column = std::array::from_fn(|r| &tmp[(r * C2 + j) * l..][..l]);
        lanes(column, disjoint(dst, starts(j), l), &h);
    }
}

/// `G w Gᵀ` of a 2×2 kernel (row-major), as a 5×5 tile (row-major).
fn kernel(w: [f32; 4]) -> [f32; K] {
    let r: [[f32; T]; 2] = std::array::from_fn(|i| g([w[2 * i], w[2 * i + 1]]));
    let c: [[f32; T]; T] = std::array::from_fn(|j| g([r[0][j], r[1][j]]));
    std::array::from_fn(|k| c[k % T][k / T])
}

/// `G k Gᵀ` of every 2×2 kernel `k` whose four taps lie in `taps [4, len]`: `[25, len]`.
fn transform_taps(taps: &[f32]) -> Vec<f32> {
    let len = taps.len() / 4;
    // Entry `e` of the transformed kernel is `Σ_t coef[t][e] · tap t`.
    let coef: [[f32; K]; 4] =
        std::array::from_fn(|t| kernel(std::array::from_fn(|s| f32::from(u8::from(s == t)))));
    let src: [&[f32]; 4] = std::array::from_fn(|t| &taps[t * len..][..len]);
    // In parallel, an entry per piece: it is 25 times as large as the layer's kernel.
    let (u, _) = parallel_pieces(K * len, len, |e, row| {
        let cf: [f32; 4] = coef.map(|c| c[e]);
        lanes(src, [row], |x| {
            [cf[0] * x[0] + cf[1] * x[1] + cf[2] * x[2] + cf[3] * x[3]]
        });
    });
    u
}

/// The layout of one such convolution: `c` channels of `h × w` planes on the image side
/// (the convolution's input, the transposed convolution's output) and `c2` channels of
/// `h/2 × w/2` on the other.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WinogradStride2 {
    c: usize,
    c2: usize,
    h: usize,
    w: usize,
}

/// A grid of tiles over planes of `lanes` channels, channels last: `[g, rows, cols, lanes]`
/// with `rows = 4·th + 1` (tiles overlap by one row and one column).
#[derive(Debug, Clone, Copy)]
struct Grid {
    th: usize,
    tw: usize,
    lanes: usize,
}

impl Grid {
    /// Tiles covering `h × w` outputs, over `lanes` channels.
    fn over(h: usize, w: usize, lanes: usize) -> Grid {
        Grid {
            th: h.div_ceil(M),
            tw: w.div_ceil(M),
            lanes,
        }
    }

    fn rows(&self) -> usize {
        M * self.th + 1
    }

    fn cols(&self) -> usize {
        M * self.tw + 1
    }

    /// Tiles per image.
    fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// Image, tile row and tile column of tile `t` of a group (image after image, row after
    /// row).
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        (t / self.tiles(), t % self.tiles() / self.tw, t % self.tw)
    }

    /// Values of the grid of `g` images.
    fn len(&self, g: usize) -> usize {
        g * self.rows() * self.cols() * self.lanes
    }

    /// Values of the transformed tiles of `g` images, `[25, g·tiles, lanes]`.
    fn transformed_len(&self, g: usize) -> usize {
        K * g * self.tiles() * self.lanes
    }

    /// The transformed tiles `v [25, g·tiles, lanes]` (`Bᵀ d B`) of the grid of `g` images;
    /// `tmp` is working memory of [`TMP`]` · lanes` values.
    fn transform(&self, grid: &[f32], g: usize, v: &mut [f32], tmp: &mut [f32]) {
        let (n, l, cols) = (g * self.tiles(), self.lanes, self.cols());
        for t in 0..n {
            let (i, ty, tx) = self.tile(t);
            let corner = (i * self.rows() + M * ty) * cols + M * tx;
            let src = std::array::from_fn(|u| {
                std::array::from_fn(|x| &grid[(corner + u * cols + x) * l..][..l])
            });
            let starts = |j| std::array::from_fn(|r| ((r * T + j) * n + t) * l);
            separable(src, (bt, bt), tmp, (v, starts));
        }
    }

    /// The 25 products of a map of `g` images on this grid, after `fill` has written the
    /// grid: `m [25, g·tiles, out] = V · u` for the transformed tiles `V` and the transformed
    /// weights `u [25, lanes, out]`. Returns `m`, working memory of [`TMP`] rows of
    /// `max(lanes, out)` values, and the rest of `work`.
    fn map<'w>(
        &self,
        g: usize,
        (u, out): (&[f32], usize),
        work: &'w mut [f32],
        fill: impl FnOnce(&mut [f32]),
    ) -> (&'w [f32], &'w mut [f32], &'w mut [f32]) {
        let (n, inner) = (g * self.tiles(), self.lanes);
        let (grid, rest) = work.split_at_mut(self.len(g));
        let (v, rest) = rest.split_at_mut(self.transformed_len(g));
        let (m, rest) = rest.split_at_mut(K * n * out);
        let (tmp, rest) = rest.split_at_mut(TMP * inner.max(out));
        fill(grid);
        self.transform(grid, g, v, tmp);
        for e in 0..K {
            matmul(
                (n, out, inner),
                (&mut m[e * n * out..][..n * out], (out, 1)),
                (&v[e * n * inner..][..n * inner], (inner, 1)),
                (&u[e * inner * out..][..inner * out], (out, 1)),
                false,
            );
        }
        (m, tmp, rest)
    }

    /// The outputs of the tiles (`Aᵀ m A` of the transformed outputs `m`, `[25, g·tiles,
    /// lanes]`) inside `h × w`, channels last: `out [g, h, w, lanes]`. `tmp` is working
    /// memory of [`TMP`]` · lanes` values.
    fn untransform(
        &self,
        m: &[f32],
        g: usize,
        (h, w): (usize, usize),
        tmp: &mut [f32],
        out: &mut [f32],
    ) {
        let (n, l) = (g * self.tiles(), self.lanes);
        let (block, tmp) = tmp.split_at_mut(M * M * l);
        for t in 0..n {
            let (i, ty, tx) = self.tile(t);
            let src = std::array::from_fn(|u| {
                std::array::from_fn(|x| &m[((u * T + x) * n + t) * l..][..l])
            });
            let starts = |b| std::array::from_fn(|a| (a * M + b) * l);
            separable(src, (at, at), tmp, (block, starts));
            for (o, values) in block.chunks_exact(l).enumerate() {
                let (y, x) = (M * ty + o / M, M * tx + o % M);
                if y < h && x < w {
                    out[((i * h + y) * w + x) * l..][..l].copy_from_slice(values);
                }
            }
        }
    }
}

impl WinogradStride2 {
    /// The layout for geometry `g` (the image side) with `c2` channels on the other side,
    /// where it applies and pays: a 4×4 kernel, stride 2, padding 1, even sides, and at least
    /// [`MIN_CHANNELS`] on each side.
    pub(crate) fn new(g: &Geometry, c2: usize) -> Option<WinogradStride2> {
        let fits = g.k == 4
            && g.stride == 2
            && g.pad == 1
            && g.h.is_multiple_of(2)
            && g.w.is_multiple_of(2);
        let pays = g.c >= MIN_CHANNELS && c2 >= MIN_CHANNELS;
        (fits && pays && g.h > 0 && g.w > 0).then_some(WinogradStride2 {
            c: g.c,
            c2,
            h: g.h,
            w: g.w,
        })
    }

    /// The other side's plane, `h/2 × w/2`.
    fn other(&self) -> (usize, usize) {
        (self.h / 2, self.w / 2)
    }

    /// The phase planes' sides, `h/2 + 1` and `w/2 + 1`.
    fn phases(&self) -> (usize, usize) {
        (self.h / 2 + 1, self.w / 2 + 1)
    }

    /// Tiles of the convolution's outputs over the `4c` phase channels (gather and the weight
    /// gradient).
    fn gather_grid(&self) -> Grid {
        let (oh, ow) = self.other();
        Grid::over(oh, ow, 4 * self.c)
    }

    /// Tiles of the phase planes over the `c2` channels of the other side (scatter).
    fn scatter_grid(&self) -> Grid {
        let (ph, pw) = self.phases();
        Grid::over(ph, pw, self.c2)
    }

    /// Working memory that [`WinogradStride2::gather`], [`WinogradStride2::scatter`] and
    /// [`WinogradStride2::weight_grad`] of `g` images need.
    pub(crate) fn work_len(&self, g: usize) -> usize {
        let (c4, c2, (oh, ow)) = (4 * self.c, self.c2, self.other());
        let (gg, sg) = (self.gather_grid(), self.scatter_grid());
        let (gn, sn) = (g * gg.tiles(), g * sg.tiles());
        let gather = gg.len(g) + K * gn * (c4 + c2) + g * c2 * oh * ow + ow;
        let (ph, pw) = self.phases();
        let scatter = sg.len(g) + K * sn * (c2 + c4) + g * ph * pw * c4;
        let weights = gg.len(g).max(gn * M * M * c2) + K * gn * (c4 + c2) + K * c4 * c2;
        gather.max(scatter).max(weights) + TMP * c4.max(c2)
    }

    /// The taps of the 2×2 phase kernels of `w [c2, c, 4, 4]` as four matrices, `[4, ·]`:
    /// tap `(a, b)` of the kernel that phase `(p, q)` of input channel `ci` meets in output
    /// channel `co` (its flipped tap `(1 − a, 1 − b)` when `flip`) at `[2a + b, at(co, cc)]`,
    /// `cc = 4·ci + 2p + q` its phase channel.
    fn phase_taps(
        &self,
        w: &[f32],
        flip: bool,
        at: impl Fn(usize, usize) -> usize + Sync,
    ) -> Vec<f32> {
        assert_eq!(w.len(), self.c2 * self.c * 16);
        let len = 4 * self.c * self.c2;
        // A tap per piece, in parallel: the kernels' values are read where they lie, each
        // piece written where `at` puts them.
        let (taps, _) = parallel_pieces(4 * len, len, |t, tap| {
            let (a, b) = if flip {
                (1 - t / 2, 1 - t % 2)
            } else {
                (t / 2, t % 2)
            };
            for (o, kernel) in w.chunks_exact(16).enumerate() {
                let (co, ci) = (o / self.c, o % self.c);
                for phase in 0..4 {
                    let (p, q) = (phase / 2, phase % 2);
                    tap[at(co, 4 * ci + phase)] = kernel[(2 * a + p) * 4 + 2 * b + q];
                }
            }
        });
        taps
    }

    /// `w [c2, c, 4, 4]` transformed for [`WinogradStride2::gather`], `[25, 4c, c2]`.
    pub(crate) fn gather_weights(&self, w: &[f32]) -> Vec<f32> {
        let c2 = self.c2;
        transform_taps(&self.phase_taps(w, false, |co, cc| cc * c2 + co))
    }

    /// `w [c2, c, 4, 4]` transformed for [`WinogradStride2::scatter`], `[25, c2, 4c]`: each
    /// phase kernel flipped.
    pub(crate) fn scatter_weights(&self, w: &[f32]) -> Vec<f32> {
        let c4 = 4 * self.c;
        transform_taps(&self.phase_taps(w, true, |co, cc| co * c4 + cc))
    }

    /// The padded phase planes of `g` images `x [g, c, h, w]` on the gather grid: phase
    /// channel `4·ci + 2·(r % 2) + (s % 2)` at `(r / 2, s / 2)` for padded pixel `(r, s)`.
    fn phase_grid(&self, x: &[f32], g: usize, grid: &mut [f32]) {
        let (c, h, w) = (self.c, self.h, self.w);
        let gg = self.gather_grid();
        assert_eq!(x.len(), g * c * h * w);
        assert_eq!(grid.len(), gg.len(g));
        let (rows, cols, l) = (gg.rows(), gg.cols(), gg.lanes);
        // Cells `(py, px)` with `1 ≤ py < h/2` and `1 ≤ px < w/2` get all four phases of
        // every channel; the others hold padding (or lie past it) and are zeroed first.
        for (r, line) in grid.chunks_exact_mut(cols * l).enumerate() {
            if (1..h / 2).contains(&(r % rows)) {
                line[..l].fill(0.0);
                line[w / 2 * l..].fill(0.0);
            } else {
                line.fill(0.0);
            }
        }
        // Row by row of the image, every channel's row in turn: the cells written lie in one
        // row of the grid, which stays in the cache while its lanes fill.
        for (i, image) in x.chunks_exact(c * h * w).enumerate() {
            for y in 0..h {
                let (py, p) = (y.div_ceil(2), (y + 1) % 2);
                let cells = &mut grid[(i * rows + py) * cols * l..][..cols * l];
                for (ci, line) in image
                    .chunks_exact(h * w)
                    .map(|pl| &pl[y * w..][..w])
                    .enumerate()
                {
                    // Padded column `x + 1` lies in cell `(x + 1) / 2`, phase `(x + 1) % 2`:
                    // pixel 0 alone in cell 0, then two pixels per cell.
                    let lane = 4 * ci + 2 * p;
                    cells[lane + 1] = line[0];
                    for (cell, pair) in cells[l..].chunks_exact_mut(l).zip(line[1..].chunks(2)) {
                        cell[lane] = pair[0];
                        if let [_, v] = pair {
                            cell[lane + 1] = *v;
                        }
                    }
                }
            }
        }
    }

    /// `g` images of the other side `o [g, c2, h/2, w/2]` on the scatter grid, one pixel of
    /// zeros above and to the left, every value written.
    fn other_grid(&self, o: &[f32], g: usize, grid: &mut [f32]) {
        let (c2, (oh, ow)) = (self.c2, self.other());
        let sg = self.scatter_grid();
        assert_eq!(o.len(), g * c2 * oh * ow);
        assert_eq!(grid.len(), sg.len(g));
        let (rows, cols) = (sg.rows(), sg.cols());
        for (cell, values) in grid.chunks_exact_mut(c2).enumerate() {
            let (i, y, x) = (cell / (rows * cols), cell / cols % rows, cell % cols);
            match (y.checked_sub(1), x.checked_sub(1)) {
                (Some(y), Some(x)) if y < oh && x < ow => {
                    let planes = o[i * c2 * oh * ow + y * ow + x..].iter().step_by(oh * ow);
                    values.iter_mut().zip(planes).for_each(|(v, &p)| *v = p);
                }
                _ => values.fill(0.0),
            }
        }
    }

    /// The convolution of `g` images `x [g, c, h, w]` with the weights `u` of
    /// [`WinogradStride2::gather_weights`]: calls `row(i, co, y, values)` with the `w/2`
    /// values of output row `y` of channel `co` of image `i`.
    pub(crate) fn gather(
        &self,
        u: &[f32],
        x: &[f32],
        g: usize,
        work: &mut [f32],
        mut row: impl FnMut(usize, usize, usize, &[f32]),
    ) {
        let (c2, gg, (oh, ow)) = (self.c2, self.gather_grid(), self.other());
        let (m, tmp, rest) = gg.map(g, (u, c2), work, |grid| self.phase_grid(x, g, grid));
        // The outputs channels last, `[g, h/2, w/2, c2]`, then row by row per channel.
        let (out, line) = rest.split_at_mut(g * oh * ow * c2);
        let untiled = Grid { lanes: c2, ..gg };
        untiled.untransform(m, g, (oh, ow), tmp, out);
        let line = &mut line[..ow];
        for (r, pixels) in out.chunks_exact(ow * c2).enumerate() {
            let (i, y) = (r / oh, r % oh);
            for co in 0..c2 {
                let column = pixels[co..].iter().step_by(c2);
                line.iter_mut().zip(column).for_each(|(v, &p)| *v = p);
                row(i, co, y, line);
            }
        }
    }

    /// The adjoint of [`WinogradStride2::gather`] for `g` images of the other side `o [g,
    /// c2, h/2, w/2]`, with the weights `u` of [`WinogradStride2::scatter_weights`]: writes
    /// `out [g, c, h, w]`.
    pub(crate) fn scatter(
        &self,
        u: &[f32],
        o: &[f32],
        g: usize,
        work: &mut [f32],
        out: &mut [f32],
    ) {
        let (c, c4, sg) = (self.c, 4 * self.c, self.scatter_grid());
        let (h, w) = (self.h, self.w);
        assert_eq!(out.len(), g * c * h * w);
        let (m, tmp, rest) = sg.map(g, (u, c4), work, |grid| self.other_grid(o, g, grid));
        // The phase planes channels last, `[g, ph, pw, 4c]`, then the image pixels: pixel
        // `(y, x)` is padded pixel `(y + 1, x + 1)`, of phase `((y + 1) % 2, (x + 1) % 2)`.
        let (ph, pw) = self.phases();
        let phases = &mut rest[..g * ph * pw * c4];
        let untiled = Grid { lanes: c4, ..sg };
        untiled.untransform(m, g, (ph, pw), tmp, phases);
        // Row by row of the image, every channel's row in turn: the cells read lie in one row
        // of the phase planes, which stays in the cache.
        for (i, image) in out.chunks_exact_mut(c * h * w).enumerate() {
            for y in 0..h {
                let at = (i * ph + y.div_ceil(2)) * pw;
                let p = (y + 1) % 2;
                let cells = &phases[at * c4..][..pw * c4];
                for (ci, plane) in image.chunks_exact_mut(h * w).enumerate() {
                    // Pixel 0 from cell 0, then two pixels per cell (as in `phase_grid`).
                    let (lane, line) = (4 * ci + 2 * p, &mut plane[y * w..][..w]);
                    line[0] = cells[lane + 1];
                    for (pair, cell) in line[1..].chunks_mut(2).zip(cells[c4..].chunks_exact(c4)) {
                        pair[0] = cell[lane];
                        if let [_, v] = pair {
                            *v = cell[lane + 1];
                        }
                    }
                }
            }
        }
    }

    /// The weight gradient, transposed: `dwt [c·16, c2]` (`dwt[(ci·16 + tap)·c2 + co]`), of
    /// `g` images `x [g, c, h, w]` whose outputs got the gradient `dy [g, c2, h/2, w/2]`.
    /// Overwrites `dwt`.
    pub(crate) fn weight_grad(
        &self,
        x: &[f32],
        dy: &[f32],
        g: usize,
        work: &mut [f32],
        dwt: &mut [f32],
    ) {
        let (c4, c2, gg, (oh, ow)) = (4 * self.c, self.c2, self.gather_grid(), self.other());
        assert_eq!(dy.len(), g * c2 * oh * ow);
        assert_eq!(dwt.len(), self.c * 16 * c2);
        let n = g * gg.tiles();
        let (grid, rest) = work.split_at_mut(gg.len(g).max(n * M * M * c2));
        let (v, rest) = rest.split_at_mut(gg.transformed_len(g));
        let (d, rest) = rest.split_at_mut(K * n * c2);
        let (du, rest) = rest.split_at_mut(K * c4 * c2);
        let tmp = &mut rest[..TMP * c4.max(c2)];
        // The output gradient's 4×4 blocks, channels last (zero past the plane), `A dy Aᵀ`.
        let blocks = &mut grid[..n * M * M * c2];
        for (cell, values) in blocks.chunks_exact_mut(c2).enumerate() {
            let (t, o) = (cell / (M * M), cell % (M * M));
            let (i, ty, tx) = gg.tile(t);
            let (y, x) = (M * ty + o / M, M * tx + o % M);
            if y < oh && x < ow {
                let planes = dy[i * c2 * oh * ow + y * ow + x..].iter().step_by(oh * ow);
                values.iter_mut().zip(planes).for_each(|(v, &p)| *v = p);
            } else {
                values.fill(0.0);
            }
        }
        for t in 0..n {
            let src = std::array::from_fn(|i| {
                std::array::from_fn(|j| &blocks[(t * M * M + i * M + j) * c2..][..c2])
            });
            let starts = |j| std::array::from_fn(|r| ((r * T + j) * n + t) * c2);
            separable(src, (a, a), tmp, (d, starts));
        }
        self.phase_grid(x, g, &mut grid[..gg.len(g)]);
        gg.transform(&grid[..gg.len(g)], g, v, tmp);
        // `dU [25, 4c, c2] = Vᵀ · D`, so that each phase channel's gradients lie in rows.
        for k in 0..K {
            matmul(
                (c4, c2, n),
                (&mut du[k * c4 * c2..][..c4 * c2], (c2, 1)),
                (&v[k * n * c4..][..n * c4], (1, c4)),
                (&d[k * n * c2..][..n * c2], (c2, 1)),
                false,
            );
        }
        for cc in 0..c4 {
            let (ci, p, q) = (cc / 4, cc / 2 % 2, cc % 2);
            let src = std::array::from_fn(|u| {
                std::array::from_fn(|x| &du[((u * T + x) * c4 + cc) * c2..][..c2])
            });
            // Tap `(2a + p, 2b + q)` of input channel `ci` for entry `(a, b)`.
            let starts = |b| std::array::from_fn(|a| (ci * 16 + (2 * a + p) * 4 + 2 * b + q) * c2);
            separable(src, (gt, gt), tmp, (&mut *dwt, starts));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The separable transform `(f, h)` of one `R × C` tile (row-major), `R2 × C2` values.
    fn tile<const R: usize, const C: usize, const C2: usize, const R2: usize>(
        x: &[f32],
        f: impl Fn([f32; C]) -> [f32; C2],
        h: impl Fn([f32; R]) -> [f32; R2],
    ) -> Vec<f32> {
        let src = std::array::from_fn(|r| std::array::from_fn(|c| &x[r * C + c..][..1]));
        let (mut tmp, mut out) = (vec![0f32; R * C2], vec![0f32; R2 * C2]);
        let starts = |j| std::array::from_fn(|r| r * C2 + j);
        separable(src, (f, h), &mut tmp, (&mut out, starts));
        out
    }

    #[test]
    fn the_tile_transforms_compute_a_two_by_two_correlation_and_its_adjoints() {
        let mut rng = crate::rng::Rng::new(3);
        let d = rng.normal_vec(K);
        let w: [f32; 4] = rng.normal_vec(4).try_into().unwrap();
        let dy = rng.normal_vec(M * M);
        let (u, v) = (kernel(w), tile::<T, T, T, T>(&d, bt, bt));
        let y = tile::<T, T, M, M>(&std::array::from_fn::<f32, K, _>(|k| u[k] * v[k]), at, at);
        for (o, got) in y.iter().enumerate() {
            let (i, j) = (o / M, o % M);
            let want: f32 = (0..4).map(|t| w[t] * d[(i + t / 2) * T + j + t % 2]).sum();
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        // The weight gradient: Σ dy · d over the block, per tap.
        let z = tile::<M, M, T, T>(&dy, a, a);
        let dw = tile::<T, T, 2, 2>(&std::array::from_fn::<f32, K, _>(|k| z[k] * v[k]), gt, gt);
        for (t, got) in dw.iter().enumerate() {
            let want: f32 = (0..M * M)
                .map(|o| dy[o] * d[(o / M + t / 2) * T + o % M + t % 2])
                .sum();
            assert!((got - want).abs() < 1e-3, "{got} vs {want}");
        }
        // The taps' transform is the kernel's.
        let taps: Vec<f32> = w.to_vec();
        let by_taps = transform_taps(&taps);
        for (p, q) in u.iter().zip(&by_taps) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
    }

    #[test]
    fn it_declines_what_it_cannot_compute_or_would_not_speed_up() {
        let g = |c, h, k, stride, pad| Geometry {
            c,
            h,
            w: 14,
            k,
            stride,
            pad,
        };
        assert!(WinogradStride2::new(&g(64, 14, 4, 2, 1), 128).is_some());
        assert!(WinogradStride2::new(&g(64, 13, 4, 2, 1), 128).is_none());
        assert!(WinogradStride2::new(&g(64, 14, 3, 2, 1), 128).is_none());
        assert!(WinogradStride2::new(&g(64, 14, 4, 1, 1), 128).is_none());
        assert!(WinogradStride2::new(&g(64, 14, 4, 2, 0), 128).is_none());
        assert!(WinogradStride2::new(&g(1, 28, 4, 2, 1), 64).is_none());
        assert!(WinogradStride2::new(&g(64, 14, 4, 2, 1), 1).is_none());
        assert!(WinogradStride2::new(&g(32, 14, 4, 2, 1), 128).is_none());
    }
}
