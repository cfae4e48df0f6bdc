//! Nearest-neighbour upsampling by 2 (a U-Net's way up) as one parallel op. candle's CPU
//! `upsample_nearest2d` runs on one thread, and its backward pass is a single-threaded
//! `conv2d` with a kernel of ones: together a few percent of a diffusion training step with
//! the other core idle.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::ops::cpu::{f32_slice, parallel_pieces, with_f32};
use crate::Result;

const NAME: &str = "upsample2x";

/// Values per parallel piece: large enough to pay for handing a piece to a thread.
const PIECE: usize = 1 << 15;

/// `x [n, c, h, w]` upsampled to `[n, c, 2h, 2w]`, each value repeated over a 2 × 2 block
/// (PyTorch's `interpolate(scale_factor=2, mode="nearest")`); backward, each input value
/// gets the sum of its block's gradients.
pub fn upsample2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if crate::ops::portable::applies(x) {
        return Ok(x.upsample_nearest2d(2 * h, 2 * w)?);
    }
    Ok(x.contiguous()?.apply_op1(Upsample2x { h, w })?)
}

/// The op of [`upsample2x`] for input planes of `h × w`.
struct Upsample2x {
    h: usize,
    w: usize,
}

impl Upsample2x {
    /// Whole input planes per parallel piece.
    fn planes_per_piece(&self) -> usize {
        (PIECE / (self.h * self.w)).max(1)
    }
}

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, NAME)?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (plane, per) = (h * w, self.planes_per_piece());
        let (y, _) = parallel_pieces(4 * x.len(), 4 * plane * per, |i, piece| {
            let src = &x[i * per * plane..];
            for (out, inp) in piece.chunks_mut(4 * plane).zip(src.chunks(plane)) {
                for (rows, row) in out.chunks_mut(4 * w).zip(inp.chunks(w)) {
                    let (top, bottom) = rows.split_at_mut(2 * w);
                    for (pair, &v) in top.chunks_mut(2).zip(row) {
                        pair.fill(v);
                    }
                    bottom.copy_from_slice(top);
                }
            }
        });
        Ok((CpuStorage::F32(y), Shape::from((n, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (plane, per, w) = (self.h * self.w, self.planes_per_piece(), self.w);
        let dx = with_f32(grad, NAME, |g| {
            parallel_pieces(x.elem_count(), plane * per, |i, piece| {
                let src = &g[4 * i * per * plane..];
                for (out, inp) in piece.chunks_mut(plane).zip(src.chunks(4 * plane)) {
                    for (row, rows) in out.chunks_mut(w).zip(inp.chunks(4 * w)) {
                        let (top, bottom) = rows.split_at(2 * w);
                        for (j, d) in row.iter_mut().enumerate() {
                            *d = top[2 * j] + top[2 * j + 1] + bottom[2 * j] + bottom[2 * j + 1];
                        }
                    }
                }
            })
            .0
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{assert_close, value_and_grad};
    use crate::rng::Rng;
    use candle_core::Device;

    #[test]
    fn matches_candles_nearest_upsampling_forward_and_backward() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        // Planes larger and smaller than a parallel piece, odd sides.
        for dims in [[3, 5, 7, 9], [2, 3, 190, 181], [1, 1, 1, 1]] {
            let x = rng.normal(&dims, &dev).unwrap();
            let ours = value_and_grad(|x| upsample2x(x).unwrap(), &x, 1);
            let theirs = value_and_grad(
                |x| x.upsample_nearest2d(2 * dims[2], 2 * dims[3]).unwrap(),
                &x,
                1,
            );
            assert_eq!(ours.0.dims(), [dims[0], dims[1], 2 * dims[2], 2 * dims[3]]);
            assert_close(&ours.0, &theirs.0, 0.0).unwrap();
            assert_close(&ours.1, &theirs.1, 1e-5).unwrap();
        }
        assert!(
            upsample2x(&Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap()).is_err()
        );
    }
}
