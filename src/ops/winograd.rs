//! 3×3 stride-1 convolutions with one pixel of zero padding by Winograd's minimal filtering
//! F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
//! each 2×2 block of outputs is `Aᵀ [(G w Gᵀ) ⊙ (Bᵀ d B)] A` for the 4×4 input tile `d`
//! around it, so that a layer is 16 matrix products (one per entry of the 4×4 transformed
//! tiles, gemm over the channels) with 16 multiplications per 4 outputs, where the 3×3
//! kernel takes 36: 2.25 times fewer. The transforms are additions (and halvings of the
//! weights), each over a whole plane's tiles at once.
//!
//! The weight gradient is the adjoint of the same map, `Gᵀ [Σ (A dy Aᵀ) ⊙ (Bᵀ d B)] G`
//! over the tiles: 16 more products, over the tiles this time. Transformed values are laid
//! out `[16, channels, tiles]`, a group's tiles image after image, row after row.

use crate::ops::cpu::{lane_sum, matmul, Strided};
use crate::ops::im2col::Geometry;

/// Entries of a transformed tile (4×4).
const K: usize = 16;

/// Channels a convolution needs on each side for Winograd to beat the direct 3×3 kernel:
/// its 16 products are `c2 × tiles × c` (forward) and `c × c2 × tiles` (weight gradient), and
/// with 16 to 64 channels they are too thin for the saved multiplications to pay for the
/// transforms' memory traffic (layer timings on an AVX2 machine, docs/speed.md, session 46).
const MIN_CHANNELS: usize = 128;

/// The layout of one Winograd convolution: channels on both sides and the plane's tiles.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Winograd {
    /// Input channels.
    c: usize,
    /// Output channels.
    c2: usize,
    /// Output (and input) height and width.
    h: usize,
    w: usize,
    /// Tiles of 2×2 outputs per column and per row of a plane.
    th: usize,
    tw: usize,
}

impl Winograd {
    /// The Winograd layout for geometry `g` with `c2` output channels, where it applies and
    /// pays: a 3×3 kernel, stride 1, padding 1, and at least [`MIN_CHANNELS`] on each side.
    pub(crate) fn new(g: &Geometry, c2: usize) -> Option<Winograd> {
        let fits = g.k == 3 && g.stride == 1 && g.pad == 1;
        let pays = g.c >= MIN_CHANNELS && c2 >= MIN_CHANNELS;
        (fits && pays).then(|| Winograd::of(g, c2))
    }

    /// The layout whatever the channel counts (tests compute small ones too).
    fn of(g: &Geometry, c2: usize) -> Winograd {
        Winograd {
            c: g.c,
            c2,
            h: g.h,
            w: g.w,
            th: g.h.div_ceil(2),
            tw: g.w.div_ceil(2),
        }
    }

    /// Tiles of one image.
    fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// Values of the transformed input tiles of `g` images, `[16, c, g·tiles]`.
    pub(crate) fn input_len(&self, g: usize) -> usize {
        K * self.c * g * self.tiles()
    }

    /// Values of the transformed output tiles of `g` images, `[16, c2, g·tiles]`.
    pub(crate) fn output_len(&self, g: usize) -> usize {
        K * self.c2 * g * self.tiles()
    }

    /// Values of the transformed weight (or its gradient), `[16, c2, c]`.
    pub(crate) fn weight_len(&self) -> usize {
        K * self.c2 * self.c
    }

    /// Working values that [`Winograd::transform_input`], [`Winograd::rows`] and
    /// [`Winograd::transform_output_grad`] need beside their outputs.
    pub(crate) fn rows_len(&self) -> usize {
        let (band, tw) = ((self.th + 1) * self.tw, self.tw);
        (8 * band + 2 * (tw + 1)).max(4 * self.tiles() + 4 * tw)
    }

    /// `w [c2, c, 3, 3]` transformed, `U [16, c2, c]`: `G w Gᵀ` per pair of channels.
    pub(crate) fn transform_weights(&self, w: &[f32]) -> Vec<f32> {
        let pairs = self.c2 * self.c;
        assert_eq!(w.len(), pairs * 9);
        // `G x` for the three values `x` of a kernel column or row.
        let g = |[a, b, c]: [f32; 3]| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
        let mut u = vec![0f32; K * pairs];
        for (o, k) in w.chunks_exact(9).enumerate() {
            let cols: [[f32; 4]; 3] = std::array::from_fn(|j| g([k[j], k[3 + j], k[6 + j]]));
            for i in 0..4 {
                for (j, v) in g([cols[0][i], cols[1][i], cols[2][i]])
                    .into_iter()
                    .enumerate()
                {
                    u[(i * 4 + j) * pairs + o] = v;
                }
            }
        }
        u
    }

    /// The transformed input tiles `v [16, c, g·tiles]` (`Bᵀ d B`) of `g` images `[g, c, h,
    /// w]`, zero-padded by one pixel (and to whole tiles). Overwrites `v`; `rows` is working
    /// memory of [`Winograd::rows_len`] values.
    pub(crate) fn transform_input(&self, x: &[f32], g: usize, v: &mut [f32], rows: &mut [f32]) {
        let (c, h, w, tw) = (self.c, self.h, self.w, self.tw);
        assert_eq!(x.len(), g * c * h * w);
        assert_eq!(v.len(), self.input_len(g));
        assert_eq!(rows.len(), self.rows_len());
        let all = g * self.tiles();
        // `d B` of padded row `p` goes to `rt [parity, 4, th + 1, tw]` at `(p % 2, ·, p / 2)`:
        // rows `k` of every tile (`2·ty + k`) then lie side by side, `tiles` values long.
        let (n, band) = (self.tiles(), (self.th + 1) * tw);
        let (rt, pair) = rows.split_at_mut(8 * band);
        let (even, odd) = pair.split_at_mut(tw + 1);
        // Channel after channel, each channel's planes image after image: the tiles of one
        // channel lie image after image in each of the 16 rows of `v`, so that the writes run
        // along them (planes of 4×4 tiles fill a cache line from four images).
        for (i, ci) in channel_major(g, c) {
            let plane = &x[(i * c + ci) * h * w..][..h * w];
            // Padded row `p` is input row `p − 1`, and padded column `q` input column
            // `q − 1`, so even padded columns hold the odd input ones.
            for p in 0..2 * self.th + 2 {
                even.fill(0.0);
                odd.fill(0.0);
                if (1..=h).contains(&p) {
                    let src = &plane[(p - 1) * w..p * w];
                    let pairs = src.chunks_exact(2);
                    if let [last] = pairs.remainder() {
                        odd[w / 2] = *last;
                    }
                    for (j, pair) in pairs.enumerate() {
                        (odd[j], even[j + 1]) = (pair[0], pair[1]);
                    }
                }
                let (e, o) = (&*even, &*odd);
                let starts = std::array::from_fn(|j| ((p % 2) * 4 + j) * band + p / 2 * tw);
                lanes(
                    [&e[..tw], &o[..tw], &e[1..], &o[1..]],
                    disjoint(rt, starts, tw),
                    |[d0, d1, d2, d3]| [d0 - d2, d1 + d2, d2 - d1, d1 - d3],
                );
            }
            // `Bᵀ (d B)` of every tile, column `j` by column.
            for j in 0..4 {
                let row = |k: usize| &rt[((k % 2) * 4 + j) * band + k / 2 * tw..][..n];
                let starts = std::array::from_fn(|k| ((k * 4 + j) * c + ci) * all + i * n);
                lanes(
                    [row(0), row(1), row(2), row(3)],
                    disjoint(v, starts, n),
                    |[a, b, cc, d]| [a - cc, b + cc, cc - b, b - d],
                );
            }
        }
    }

    /// The transformed outputs `m [16, c2, g·tiles] = U · V`, one product per entry of the
    /// tiles, from the weights `u` of [`Winograd::transform_weights`] and the input tiles `v`.
    pub(crate) fn multiply(&self, u: &[f32], v: &[f32], g: usize, m: &mut [f32]) {
        let (c, c2, t) = (self.c, self.c2, g * self.tiles());
        assert_eq!(u.len(), self.weight_len());
        assert_eq!(v.len(), self.input_len(g));
        assert_eq!(m.len(), self.output_len(g));
        for k in 0..K {
            let lhs: Strided = (&u[k * c2 * c..][..c2 * c], (c, 1));
            let rhs: Strided = (&v[k * c * t..][..c * t], (t, 1));
            matmul(
                (c2, t, c),
                (&mut m[k * c2 * t..][..c2 * t], (t, 1)),
                lhs,
                rhs,
                false,
            );
        }
    }

    /// Calls `row(i, co, y, values)` with the `w` values of output row `y` of channel `co` of
    /// image `i`, from the transformed outputs `m` (`Aᵀ m A` per tile); `rows` is working
    /// memory of [`Winograd::rows_len`] values.
    pub(crate) fn rows(
        &self,
        m: &[f32],
        g: usize,
        rows: &mut [f32],
        mut row: impl FnMut(usize, usize, usize, &[f32]),
    ) {
        let (c2, tw, all) = (self.c2, self.tw, g * self.tiles());
        assert_eq!(m.len(), self.output_len(g));
        let n = self.tiles();
        let (quarters, rest) = rows.split_at_mut(4 * n);
        let [y0, y1] = split::<2>(rest, 2 * tw);
        for co in 0..c2 {
            for i in 0..g {
                // `Aᵀ m A`: the tiles' 2×2 outputs, each of the four in a row of its own.
                let s: [&[f32]; K] =
                    std::array::from_fn(|k| &m[(k * c2 + co) * all + i * n..][..n]);
                lanes(s, split::<4>(quarters, n), |s| {
                    // `Aᵀ m`: rows 0 + 1 + 2 and 1 − 2 − 3 of the tile; then `· A`.
                    let p: [[f32; 4]; 2] = [
                        std::array::from_fn(|j| s[j] + s[4 + j] + s[8 + j]),
                        std::array::from_fn(|j| s[4 + j] - s[8 + j] - s[12 + j]),
                    ];
                    [
                        p[0][0] + p[0][1] + p[0][2],
                        p[0][1] - p[0][2] - p[0][3],
                        p[1][0] + p[1][1] + p[1][2],
                        p[1][1] - p[1][2] - p[1][3],
                    ]
                });
                for ty in 0..self.th {
                    let quarter = |e: usize| &quarters[e * n + ty * tw..][..tw];
                    for (y, e) in [&mut *y0, &mut *y1].into_iter().zip([0, 2]) {
                        let (even, odd) = (quarter(e), quarter(e + 1));
                        for (q, pair) in y.chunks_exact_mut(2).enumerate() {
                            (pair[0], pair[1]) = (even[q], odd[q]);
                        }
                    }
                    row(i, co, 2 * ty, &y0[..self.w]);
                    if 2 * ty + 1 < self.h {
                        row(i, co, 2 * ty + 1, &y1[..self.w]);
                    }
                }
            }
        }
    }

    /// The transformed output-gradient tiles `d [16, c2, g·tiles]` (`A dy Aᵀ`, zero past the
    /// plane) of `g` images `[g, c2, h, w]`, each row taken through `row(r, at, dst, src)`
    /// first (`r = image·c2 + channel`, `src` the row's `w` values at `at = y·w` in its
    /// plane). Returns the sums of the rows so taken, per plane, `[c2, g]` (the bias
    /// gradient). `rows` is working memory of [`Winograd::rows_len`] values.
    pub(crate) fn transform_output_grad(
        &self,
        dy: &[f32],
        g: usize,
        (d, rows): (&mut [f32], &mut [f32]),
        row: impl Fn(usize, usize, &mut [f32], &[f32]),
    ) -> Vec<f32> {
        let (c2, h, w, tw) = (self.c2, self.h, self.w, self.tw);
        assert_eq!(dy.len(), g * c2 * h * w);
        assert_eq!(d.len(), self.output_len(g));
        let all = g * self.tiles();
        let n = self.tiles();
        let (quarters, rest) = rows.split_at_mut(4 * n);
        let [y0, y1] = split::<2>(rest, 2 * tw);
        let mut sums = vec![0f32; c2 * g];
        // In the order of `d`'s rows, as in `transform_input`.
        for (i, co) in channel_major(g, c2) {
            let r = i * c2 + co;
            let plane = &dy[r * h * w..][..h * w];
            let mut sum = 0f32;
            for ty in 0..self.th {
                for (a, buf) in [&mut *y0, &mut *y1].into_iter().enumerate() {
                    let y = 2 * ty + a;
                    buf.fill(0.0);
                    if y < h {
                        let buf = &mut buf[..w];
                        row(r, y * w, buf, &plane[y * w..(y + 1) * w]);
                        sum += lane_sum(buf, buf, |v, _| v);
                    }
                }
                // Both rows' even and odd values, each in its quarter of `quarters`.
                for (y, e) in [&*y0, &*y1].into_iter().zip([0, 2]) {
                    for (q, pair) in y.chunks_exact(2).enumerate() {
                        let at = ty * tw + q;
                        (quarters[e * n + at], quarters[(e + 1) * n + at]) = (pair[0], pair[1]);
                    }
                }
            }
            // `dy Aᵀ` of both rows (`t`), then `A ·` down column `j` of the tile.
            let [u0, v0, u1, v1] = [0, 1, 2, 3].map(|e| &quarters[e * n..][..n]);
            let t = |j: usize, u: f32, v: f32| [u, u + v, u - v, -v][j];
            for j in 0..4 {
                let starts = std::array::from_fn(|k| ((k * 4 + j) * c2 + co) * all + i * n);
                lanes(
                    [u0, v0, u1, v1],
                    disjoint(d, starts, n),
                    |[u0, v0, u1, v1]| {
                        let (a, b) = (t(j, u0, v0), t(j, u1, v1));
                        [a, a + b, a - b, -b]
                    },
                );
            }
            sums[co * g + i] = sum;
        }
        sums
    }

    /// The weight gradient, transposed: `dwt [c·9, c2]` (`dwt[(ci·9 + t)·c2 + co]`), from the
    /// transformed output gradient `d` and input tiles `v` of `g` images: `Gᵀ (D · Vᵀ) G`.
    /// `du` is working memory of [`Winograd::weight_len`] values. Overwrites `dwt`.
    pub(crate) fn weight_grad(
        &self,
        (d, v): (&[f32], &[f32]),
        g: usize,
        du: &mut [f32],
        dwt: &mut [f32],
    ) {
        let (c, c2, t) = (self.c, self.c2, g * self.tiles());
        assert_eq!(d.len(), self.output_len(g));
        assert_eq!(v.len(), self.input_len(g));
        assert_eq!(du.len(), self.weight_len());
        assert_eq!(dwt.len(), c * 9 * c2);
        // `dUᵀ [16, c, c2] = V · Dᵀ`, so that each input channel's gradients lie in rows.
        for k in 0..K {
            let lhs: Strided = (&v[k * c * t..][..c * t], (t, 1));
            let rhs: Strided = (&d[k * c2 * t..][..c2 * t], (1, t));
            matmul(
                (c, c2, t),
                (&mut du[k * c * c2..][..c * c2], (c2, 1)),
                lhs,
                rhs,
                false,
            );
        }
        // `Gᵀ x` for four values `x` of a transformed column or row.
        let gt = |[a, b, cc, d]: [f32; 4]| [a + 0.5 * (b + cc), 0.5 * (b - cc), 0.5 * (b + cc) + d];
        for (ci, out) in dwt.chunks_exact_mut(9 * c2).enumerate() {
            let s: [&[f32]; K] = std::array::from_fn(|k| &du[(k * c + ci) * c2..][..c2]);
            lanes(s, split::<9>(out, c2), |s| {
                let cols: [[f32; 3]; 4] =
                    std::array::from_fn(|j| gt([s[j], s[4 + j], s[8 + j], s[12 + j]]));
                let rows: [[f32; 3]; 3] =
                    std::array::from_fn(|a| gt([cols[0][a], cols[1][a], cols[2][a], cols[3][a]]));
                std::array::from_fn(|t| rows[t / 3][t % 3])
            });
        }
    }
}

/// The planes `(image, channel)` of `g` images, channel after channel (each channel's image
/// after image).
fn channel_major(g: usize, channels: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..channels).flat_map(move |ch| (0..g).map(move |i| (i, ch)))
}

/// `dst[o][q] = f([src[0][q], src[1][q], …])[o]` for every lane `q` of `dst`'s rows (as long
/// as each other, and no longer than `src`'s): one loop the compiler vectorizes.
#[inline(always)]
pub(crate) fn lanes<const I: usize, const O: usize>(
    src: [&[f32]; I],
    dst: [&mut [f32]; O],
    f: impl Fn([f32; I]) -> [f32; O],
) {
    let n = dst[0].len();
    let src = src.map(|s| &s[..n]);
    let mut dst = dst.map(|d| &mut d[..n]);
    for q in 0..n {
        let out = f(std::array::from_fn(|k| src[k][q]));
        for (d, v) in dst.iter_mut().zip(out) {
            d[q] = v;
        }
    }
}

/// The first `O` rows of `n` values of `buf`.
pub(crate) fn split<const O: usize>(buf: &mut [f32], n: usize) -> [&mut [f32]; O] {
    let mut rows = buf.chunks_exact_mut(n);
    std::array::from_fn(|_| rows.next().expect("enough rows"))
}

/// The rows of `n` values of `buf` starting at `starts` (ascending, not overlapping).
pub(crate) fn disjoint<const O: usize>(
    buf: &mut [f32],
    starts: [usize; O],
    n: usize,
) -> [&mut [f32]; O] {
    let mut rest = buf;
    let mut at = 0;
    starts.map(|start| {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - at);
        let (row, tail) = tail.split_at_mut(n);
        (rest, at) = (tail, start + n);
        row
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{check_conv3x3_kernel, Conv3x3Dims};

    #[test]
    fn winograd_convolutions_and_weight_gradients_match_the_definition() {
        let layout = |(_, c, c2, h, w): Conv3x3Dims| {
            let geometry = Geometry {
                c,
                h,
                w,
                k: 3,
                stride: 1,
                pad: 1,
            };
            Winograd::of(&geometry, c2)
        };
        // Odd and even planes (partial tiles on the right and at the bottom), one channel.
        let shapes = [
            (2, 3, 10, 7, 7),
            (3, 16, 8, 14, 14),
            (1, 5, 33, 8, 8),
            (2, 1, 4, 5, 9),
            (2, 3, 6, 6, 4),
            (1, 2, 3, 1, 1),
        ];
        let forward = |x: &[f32], wt: &[f32], dims: Conv3x3Dims| {
            let (g, _, c2, h, w) = dims;
            let wg = layout(dims);
            let mut rows = vec![f32::NAN; wg.rows_len()];
            let mut v = vec![f32::NAN; wg.input_len(g)];
            wg.transform_input(x, g, &mut v, &mut rows);
            let mut m = vec![f32::NAN; wg.output_len(g)];
            wg.multiply(&wg.transform_weights(wt), &v, g, &mut m);
            let mut y = vec![f32::NAN; g * c2 * h * w];
            wg.rows(&m, g, &mut rows, |i, co, yy, vals| {
                y[((i * c2 + co) * h + yy) * w..][..w].copy_from_slice(vals)
            });
            y
        };
        // Each row of `dy` must reach the callback, and the sums come back per plane.
        let weight_grad = |x: &[f32], dy: &[f32], dims: Conv3x3Dims| {
            let (g, c, c2, h, w) = dims;
            let wg = layout(dims);
            let mut rows = vec![f32::NAN; wg.rows_len()];
            let mut d = vec![f32::NAN; wg.output_len(g)];
            let sums = wg.transform_output_grad(dy, g, (&mut d, &mut rows), |r, at, dst, src| {
                assert_eq!(src, &dy[r * h * w + at..][..w]);
                dst.copy_from_slice(src)
            });
            for (r, plane) in dy.chunks(h * w).enumerate() {
                let (want, got) = (plane.iter().sum::<f32>(), sums[r % c2 * g + r / c2]);
                assert!(
                    (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "db {got} vs {want}"
                );
            }
            let mut v = vec![f32::NAN; wg.input_len(g)];
            wg.transform_input(x, g, &mut v, &mut rows);
            let mut du = vec![f32::NAN; wg.weight_len()];
            let mut dwt = vec![f32::NAN; c * 9 * c2];
            wg.weight_grad((&d, &v), g, &mut du, &mut dwt);
            dwt
        };
        check_conv3x3_kernel(&shapes, 7, forward, weight_grad);
    }

    #[test]
    fn winograd_declines_what_it_cannot_compute_or_would_not_speed_up() {
        let g = |c, k, stride, pad| Geometry {
            c,
            h: 8,
            w: 8,
            k,
            stride,
            pad,
        };
        assert!(Winograd::new(&g(128, 3, 1, 1), 256).is_some());
        assert!(Winograd::new(&g(128, 3, 2, 1), 128).is_none());
        assert!(Winograd::new(&g(128, 5, 1, 2), 128).is_none());
        assert!(Winograd::new(&g(128, 3, 1, 0), 128).is_none());
        assert!(Winograd::new(&g(64, 3, 1, 1), 128).is_none());
        assert!(Winograd::new(&g(128, 3, 1, 1), 96).is_none());
    }
}
