//! Convolution and transposed convolution as single candle custom ops: per group of images,
//! an `im2col`/`col2im` rearrangement plus gemm calls (the `gemm` crate that candle itself
//! uses), with the bias and an optional activation folded in and a backward pass that returns
//! all three gradients. One graph node per layer, where composing candle operations costs
//! about eight, each with its own buffers in both directions.
//!
//! Both kinds share three per-group primitives over a weight viewed as `W [c2, K]`
//! (`K = c·k·k`, `c2` the channels on the other side): gathering (`W · im2col(images)`), its
//! adjoint `scatter` (`col2im(Wᵀ · ·)`), and the weight gradient `Σ other · im2col(images)ᵀ`.
//! A convolution gathers forward and scatters backward; a transposed convolution does the
//! opposite. The column matrix of a group is built and consumed in blocks of input channels
//! (one gemm per block), so that each block is read back from the cache, not from memory.
//! 3×3 stride-1 convolutions with padding 1 skip the column matrix. With at least 128
//! channels on each side, all three passes (forward, the input gradient through the flipped
//! kernel, and the weight gradient) run Winograd's F(2×2, 3×3) of `winograd`, 2.25 times
//! fewer multiplications. Narrower ones, on CPUs with AVX2 and FMA, run the direct kernels of
//! `direct3x3`: gathering, and on planes of at least 14×14 the weight gradient. 4×4
//! stride-2 convolutions with padding 1 over even planes (a DCGAN's down- and upsampling)
//! and at least 64 channels on each side run Winograd's F(4×4, 2×2) over stride phases
//! (`winograd_stride2`), both kinds and all three passes: about half the multiplications.
//!
//! A convolution can also take a GroupNorm (and its SiLU) of its input into its own node
//! (`ConvLayer::forward_normed`): each group of images is normalised into per-thread memory
//! just before the kernels read it, and the norm's gradients are taken back from the input
//! gradient in place. The normalised input is no tensor, so it costs no buffer of its own,
//! no gradient buffer and no graph node; a training forward pass keeps it for the backward
//! pass (`saved`).

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{Layout, Module, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops::cpu::{
    activation_grad, lane_sum, matmul, parallel_map, parallel_pieces, with_f32, Activation, F32Op,
    F32Op3, Handout,
};
use crate::ops::direct3x3::Direct;
use crate::ops::groupnorm::{GroupNorm, GroupNormOp};
use crate::ops::im2col::{
    col2im_rows_add, im2col_rows, merge_phases_add, split_phases, zero_phases, Geometry,
};
use crate::ops::portable;
use crate::ops::saved::Saved;
use crate::ops::winograd::Winograd;
use crate::ops::winograd_stride2::WinogradStride2;
use crate::{Error, Result};

const NAME: &str = "genbackdoor-conv";

/// Images per parallel task (and per partial weight gradient) for a batch of `n` images:
/// at most `most`, in an even number of groups so that two threads get equal shares. It
/// depends on the batch and the geometry alone, so that the partial sums, and so the bits of
/// the weight gradient, do not depend on the number of threads.
fn group_size(n: usize, most: usize) -> usize {
    let most = most.max(1);
    let groups = n.div_ceil(most).next_multiple_of(2);
    n.div_ceil(groups).max(1)
}

/// A convolution's weight as [`Conv::forward_group`] reads it: transformed for Winograd or
/// packed for the direct 3×3 kernel once per call (not once per group of images: a
/// 256-by-256-channel kernel is 2.4 MB), or as given for the `im2col` paths.
enum Weights<'a> {
    Winograd(Winograd, Vec<f32>),
    /// Transformed for the stride-2 Winograd map the forward pass takes: gathering for a
    /// convolution, scattering for a transposed one.
    Stride2(WinogradStride2, Vec<f32>),
    Direct(Direct, Vec<f32>),
    Given(&'a [f32]),
}

/// `conv2d(x [n, c, h, w], weight [cout, c, k, k]) + bias [cout]` with `stride` and zero
/// `pad`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    forward_op(x, weight, stride, pad)?.apply(x, weight, bias, None, None)
}

/// `conv2d(x, weight) + bias + residual` in one graph node, `residual` shaped like the
/// output (a residual block's skip path added in the sweep that writes the output): no
/// separate addition, and one gradient buffer fewer in the backward pass.
pub fn conv2d_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    forward_op(x, weight, stride, pad)?.apply_residual(x, weight, bias, residual, None)
}

/// The op of [`conv2d`] for these inputs, once they are checked to fit.
fn forward_op(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> Result<Conv> {
    let (_, c, h, w) = x.dims4()?;
    let (cout, wc, k, k2) = weight.dims4()?;
    if wc != c || k != k2 {
        return Err(Error::Mismatch(format!(
            "conv2d: input {:?} and kernel {:?} do not fit",
            x.dims(),
            weight.dims()
        )));
    }
    let g = Geometry {
        c,
        h,
        w,
        k,
        stride,
        pad,
    };
    g.validate()?;
    Ok(Conv {
        g,
        c2: cout,
        transposed: false,
        per_image_bias: false,
        residual: false,
        norm: None,
        saved: None,
    })
}

/// `conv_transpose2d(x [n, cin, h, w], weight [cin, cout, k, k]) + bias [cout]`: the adjoint
/// of [`conv2d`] (plus bias), output side `(h − 1)·stride − 2·pad + k + out_pad`.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> Result<Tensor> {
    transposed_op(x, weight, stride, pad, out_pad)?.apply(x, weight, bias, None, None)
}

/// The op of [`conv_transpose2d`] for these inputs, once they are checked to fit.
fn transposed_op(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    pad: usize,
    out_pad: usize,
) -> Result<Conv> {
    let (_, cin, h, w) = x.dims4()?;
    let (wc, cout, k, k2) = weight.dims4()?;
    if wc != cin || k != k2 || out_pad >= stride.max(1) || (h - 1) * stride + k + out_pad < 2 * pad
    {
        return Err(Error::Mismatch(format!(
            "conv_transpose2d: input {:?}, kernel {:?}, stride {stride}, pad {pad}, out_pad {out_pad} do not fit",
            x.dims(),
            weight.dims()
        )));
    }
    let side = |i: usize| (i - 1) * stride + k + out_pad - 2 * pad;
    let g = Geometry {
        c: cout,
        h: side(h),
        w: side(w),
        k,
        stride,
        pad,
    };
    g.validate()?;
    Ok(Conv {
        g,
        c2: cin,
        transposed: true,
        per_image_bias: false,
        residual: false,
        norm: None,
        saved: None,
    })
}

/// Per-thread working memory of the kernels, kept between calls so that the column matrices
/// are not allocated (and their pages faulted in) again at every layer and step. Every user
/// overwrites the part it reads.
#[derive(Default)]
struct Scratch {
    /// One block of rows of a column matrix.
    cols: Vec<f32>,
    /// Stride phase planes of a group of images.
    planes: Vec<f32>,
    /// A joined `[c2, g·P]` matrix.
    mat: Vec<f32>,
    /// A second joined matrix (a transposed convolution's backward pass needs two).
    mat2: Vec<f32>,
    /// Zero-padded input planes of the direct 3×3 kernel.
    padded: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// A group of images through the fused input norm ([`Conv::normed`]).
    static NORMED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The per-group weight gradients of a backward pass, on the thread that runs it.
    static PARTIALS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Values per block of column-matrix rows: 1 MiB, so that a block, the group's phase planes
/// and the gemm operands share a core's L2 cache (the whole column matrix of a group is up to
/// four times that, and gemm would read it back from memory).
const BLOCK_VALUES: usize = 1 << 18;

/// The first `len` values of `buf`, grown if needed (stale contents: callers overwrite them).
fn resized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// One convolution (`transposed` or not) of geometry `g` (over the image side) with `c2`
/// channels on the other side; applied to `(x, weight [c2, …], bias)`.
#[derive(Debug, Clone)]
struct Conv {
    g: Geometry,
    c2: usize,
    transposed: bool,
    /// The bias is `[n, cout]`, one per image and output channel (a time embedding added
    /// to every position), instead of `[cout]`.
    per_image_bias: bool,
    /// (Not transposed.) The op's second input is the weight followed by the `[cout]` bias,
    /// and its third a residual shaped like the output, added to it.
    residual: bool,
    /// (Not transposed.) A GroupNorm (and its SiLU) applied to the input as the kernels read
    /// it, its weight and bias packed at the end of the op's second input: the normalised
    /// input is no tensor, so it has no buffer and no graph node of its own.
    norm: Option<GroupNormOp>,
    /// Where a forward pass with a fused norm that a backward pass will follow keeps the
    /// norm's output (else the backward pass computes it again).
    saved: Option<Saved>,
}

impl Conv {
    /// `op(norm(x), weight) + bias`, then the activation if given; `bias` is `[cout]`, or
    /// `[n, cout]` for one per image.
    fn apply(
        mut self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        act: Option<Activation>,
        norm: Option<&GroupNorm>,
    ) -> Result<Tensor> {
        let (x, norm) = self.fusable(x, norm)?;
        let x = &x;
        let cout = self.out_channels();
        let zeros;
        let bias = match bias {
            Some(b) => b,
            None => {
                zeros = Tensor::zeros(cout, x.dtype(), x.device())?;
                &zeros
            }
        };
        let n = x.dim(0)?;
        self.per_image_bias = match bias.dims() {
            [c] if *c == cout => false,
            [m, c] if (*m, *c) == (n, cout) => true,
            d => {
                return Err(Error::Mismatch(format!(
                "convolution bias {d:?} fits neither {cout} output channels nor {n} images of them"
            )))
            }
        };
        if portable::applies(x) {
            return Ok(self.portable(x, weight, bias, act)?);
        }
        let packed = self.packed(weight, None, norm)?;
        self.fuse(norm, x.track_op() || packed.track_op());
        Ok(x.contiguous()?
            .apply_op3(&packed, bias, F32Op::with_activation(self, act))?)
    }

    /// The input and the norm to fuse with the op: `norm` itself where the op's kernels can
    /// take it (a convolution, not transposed, on the CPU, of the norm's channels); else no
    /// norm, and the input through `norm` as a graph node of its own.
    fn fusable<'n>(
        &self,
        x: &Tensor,
        norm: Option<&'n GroupNorm>,
    ) -> Result<(Tensor, Option<&'n GroupNorm>)> {
        match norm {
            Some(nm) if self.transposed || portable::applies(x) || nm.channels() != self.g.c => {
                Ok((nm.forward(x)?, None))
            }
            norm => Ok((x.clone(), norm)),
        }
    }

    /// Fuses `norm` (if any) into the op, keeping its output for the backward pass when one
    /// will follow (`training`: a variable's gradient flows through the op).
    fn fuse(&mut self, norm: Option<&GroupNorm>, training: bool) {
        self.norm = norm.map(|n| n.parts().0);
        self.saved = (self.norm.is_some() && training).then(Saved::default);
    }

    /// The op's second input: `weight`, then `bias` (where a residual takes the third input),
    /// then `norm`'s weight and bias; [`Conv::unpack`] splits it.
    fn packed(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        norm: Option<&GroupNorm>,
    ) -> Result<Tensor> {
        if bias.is_none() && norm.is_none() {
            return Ok(weight.contiguous()?);
        }
        let mut parts = vec![weight.flatten_all()?];
        parts.extend(bias.cloned());
        if let Some(norm) = norm {
            let (_, gamma, beta) = norm.parts();
            parts.extend([gamma.clone(), beta.clone()]);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The op's second input `packed` ([`Conv::packed`]) split into the weight, the bias
    /// packed with it (with a residual), and the fused norm's `(weight, bias)` (empty
    /// without one); `None` where its length does not fit.
    fn unpack<'a>(&self, packed: &'a [f32]) -> Option<Unpacked<'a>> {
        let weights = self.c2 * self.g.patch();
        let bias = if self.residual { self.c2 } else { 0 };
        let norm = if self.norm.is_some() { self.g.c } else { 0 };
        if packed.len() != weights + bias + 2 * norm {
            return None;
        }
        let (w, rest) = packed.split_at(weights);
        let (b, affine) = rest.split_at(bias);
        Some(Unpacked {
            weight: w,
            bias: self.residual.then_some(b),
            affine: affine.split_at(norm),
        })
    }

    /// `f` of the group of images `xs`, or of them through the fused norm (with its weight
    /// and bias `affine`), computed `into` the given place, else into per-thread memory kept
    /// between calls.
    fn normed<T>(
        &self,
        xs: &[f32],
        affine: Affine,
        into: Option<&mut [f32]>,
        f: impl FnOnce(&[f32]) -> T,
    ) -> T {
        let Some(norm) = self.norm else {
            return f(xs);
        };
        let run = |out: &mut [f32]| {
            norm.forward_images(xs, self.g.h * self.g.w, affine, None, out);
            f(out)
        };
        match into {
            Some(out) => run(out),
            None => NORMED.with_borrow_mut(|buf| run(resized(buf, xs.len()))),
        }
    }

    /// `op(x, weight) + bias + residual` (not transposed), `residual` shaped like the
    /// output. candle's custom ops take three inputs, so the weight and the bias travel
    /// packed in one (a small concatenation node) and the residual takes the bias's place.
    fn apply_residual(
        mut self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        residual: &Tensor,
        norm: Option<&GroupNorm>,
    ) -> Result<Tensor> {
        let (x, norm) = self.fusable(x, norm)?;
        let x = &x;
        let out = self.out_shape(x.dim(0)?);
        if self.transposed || residual.shape() != &out {
            return Err(Error::Mismatch(format!(
                "convolution residual {:?} does not fit the output {out:?}",
                residual.dims()
            )));
        }
        if portable::applies(x) {
            return Ok((self.apply(x, weight, bias, None, None)? + residual)?);
        }
        let bias = match bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(self.c2, x.dtype(), x.device())?,
        };
        if bias.dims() != [self.c2] {
            return Err(Error::Mismatch(format!(
                "convolution bias {:?} with a residual must be [{}]",
                bias.dims(),
                self.c2
            )));
        }
        self.residual = true;
        let packed = self.packed(weight, Some(&bias), norm)?;
        self.fuse(norm, x.track_op() || packed.track_op());
        Ok(x.contiguous()?
            .apply_op3(&packed, &residual.contiguous()?, F32Op::new(self))?)
    }

    /// [`Conv::apply`] by candle's own convolutions.
    fn portable(
        self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        act: Option<Activation>,
    ) -> candle_core::Result<Tensor> {
        let Geometry { k, stride, pad, .. } = self.g;
        let y = if self.transposed {
            // The output side is (h − 1)·stride − 2·pad + k + out_pad.
            let h = x.dim(2)?;
            let out_pad = self.g.h + 2 * pad - (h - 1) * stride - k;
            x.conv_transpose2d(weight, pad, out_pad, stride, 1)?
        } else {
            x.conv2d(weight, pad, stride, 1, 1)?
        };
        let bias = match bias.dims() {
            [n, c] => bias.reshape((*n, *c, 1, 1))?,
            _ => portable::per_channel(bias, 4)?,
        };
        portable::activate(y.broadcast_add(&bias)?, act)
    }

    /// Output channels (the bias's length).
    fn out_channels(&self) -> usize {
        if self.transposed {
            self.g.c
        } else {
            self.c2
        }
    }

    /// The length of the bias of a group of `g` images.
    fn bias_len(&self, g: usize) -> usize {
        if self.per_image_bias {
            g * self.out_channels()
        } else {
            self.out_channels()
        }
    }

    /// The bias of the `i`th group of `group` images (of `g`): all of a per-channel `b`, the
    /// group's rows of a per-image one.
    fn group_bias<'b>(&self, b: &'b [f32], (i, group, g): (usize, usize, usize)) -> &'b [f32] {
        if self.per_image_bias {
            let c = self.out_channels();
            &b[i * group * c..(i * group + g) * c]
        } else {
            b
        }
    }

    /// Values per image on the other side, `c2 · positions`.
    fn other(&self) -> usize {
        self.c2 * self.g.positions()
    }

    /// Values per image of the input and the output.
    fn sizes(&self) -> (usize, usize) {
        if self.transposed {
            (self.other(), self.g.image())
        } else {
            (self.g.image(), self.other())
        }
    }

    /// The input channels of the blocks in which the column matrix of `g` images is built:
    /// each block is `[|block|·k·k, g·P]`, about [`BLOCK_VALUES`] values.
    fn channel_blocks(&self, g: usize) -> impl Iterator<Item = Range<usize>> {
        let c = self.g.c;
        let per_channel = self.g.k * self.g.k * g * self.g.positions();
        let size = c.div_ceil((c * per_channel).div_ceil(BLOCK_VALUES).clamp(1, c));
        (0..c).step_by(size).map(move |c0| c0..(c0 + size).min(c))
    }

    /// Calls `f(block, rows)` for the blocks of rows of the column matrix of `g` images, whose
    /// phase planes are in `planes` ([`split_phases`]), built one after the other in `cols`.
    fn for_each_block(
        &self,
        planes: &[f32],
        g: usize,
        cols: &mut Vec<f32>,
        mut f: impl FnMut(Range<usize>, &[f32]),
    ) {
        let row_len = self.g.k * self.g.k * g * self.g.positions();
        for block in self.channel_blocks(g) {
            let rows = resized(cols, block.len() * row_len);
            im2col_rows(&self.g, planes, g, block.clone(), rows);
            f(block, rows);
        }
    }

    /// `g` images of the other side (`[c2, P]` each) as one `[c2, g·P]` matrix in `m`, each row
    /// written by `row(r, dst, src)` from row `r` of the images (`r = image·c2 + channel`).
    fn join_with<'s>(
        &self,
        per_image: &[f32],
        g: usize,
        m: &'s mut Vec<f32>,
        row: impl Fn(usize, &mut [f32], &[f32]),
    ) -> &'s [f32] {
        let p = self.g.positions();
        let m = resized(m, self.c2 * g * p);
        for (r, src) in per_image.chunks(p).take(g * self.c2).enumerate() {
            let (i, c) = (r / self.c2, r % self.c2);
            row(r, &mut m[(c * g + i) * p..(c * g + i + 1) * p], src);
        }
        m
    }

    /// [`Conv::join_with`] copying the rows.
    fn join<'s>(&self, per_image: &[f32], g: usize, m: &'s mut Vec<f32>) -> &'s [f32] {
        self.join_with(per_image, g, m, |_, dst, src| dst.copy_from_slice(src))
    }

    /// The inverse of [`Conv::join`]: a `[c2, g·P]` matrix back into `g` images, each image
    /// row (`r = image·c2 + channel`) written by `row(r, dst, src)`.
    fn split_with(
        &self,
        m: &[f32],
        g: usize,
        per_image: &mut [f32],
        row: impl Fn(usize, &mut [f32], &[f32]),
    ) {
        let p = self.g.positions();
        for (r, dst) in per_image.chunks_mut(p).take(g * self.c2).enumerate() {
            let (i, c) = (r / self.c2, r % self.c2);
            row(r, dst, &m[(c * g + i) * p..(c * g + i + 1) * p]);
        }
    }

    /// `m [c2, g·P] (+)= W [c2, K] · rows` for the column-matrix rows of one channel block.
    fn gather_block(&self, w: &[f32], block: &Range<usize>, rows: &[f32], m: &mut [f32]) {
        let (gp, kk) = (m.len() / self.c2, self.g.k * self.g.k);
        matmul(
            (self.c2, gp, block.len() * kk),
            (m, (gp, 1)),
            (&w[block.start * kk..], (self.g.patch(), 1)),
            (rows, (gp, 1)),
            block.start > 0,
        );
    }

    /// `dwᵀ [K, c2] = (m · rowsᵀ)ᵀ` for the column-matrix rows of one channel block, with
    /// `m = join(other) [c2, g·P]`. Written transposed so that gemm reads the rows as they
    /// lie (contiguous along the sum) and gathers only the small `m` into packed panels.
    fn weight_grad_block(&self, m: &[f32], block: &Range<usize>, rows: &[f32], dwt: &mut [f32]) {
        let (gp, kk) = (m.len() / self.c2, self.g.k * self.g.k);
        matmul(
            (self.c2, block.len() * kk, gp),
            (&mut dwt[block.start * kk * self.c2..], (1, self.c2)),
            (m, (gp, 1)),
            (rows, (1, gp)),
            false,
        );
    }

    /// Adds the images of `g` other-side blocks, `col2im(Wᵀ · m)` with `m = join(other)`,
    /// onto `images` (the zero-filled pieces of [`parallel_pieces`]), one channel block of
    /// column-matrix rows at a time.
    fn scatter(
        &self,
        (w, m): (&[f32], &[f32]),
        g: usize,
        images: &mut [f32],
        cols: &mut Vec<f32>,
        planes: &mut Vec<f32>,
    ) {
        let (gp, kk) = (m.len() / self.c2, self.g.k * self.g.k);
        let planes = zero_phases(&self.g, g, planes);
        for block in self.channel_blocks(g) {
            let rows = resized(cols, block.len() * kk * gp);
            matmul(
                (block.len() * kk, gp, self.c2),
                (rows, (gp, 1)),
                (&w[block.start * kk..], (1, self.g.patch())),
                (m, (gp, 1)),
                false,
            );
            col2im_rows_add(&self.g, rows, g, block, planes);
        }
        merge_phases_add(&self.g, planes, g, &mut images[..g * self.g.image()]);
    }

    /// The forward map of `g` images, with one gemm per channel block for all of them, plus
    /// the bias `b` (`[cout]`, or the group's `[g, cout]`) and the group's residual `res`
    /// (not transposed), then the activation, if any, in the sweep that writes the output.
    fn forward_group(
        &self,
        (w, b, res): (&Weights, &[f32], Option<&[f32]>),
        x: &[f32],
        g: usize,
        y: &mut [f32],
        act: Option<Activation>,
    ) {
        SCRATCH.with_borrow_mut(|s| {
            let Scratch {
                cols,
                planes,
                mat,
                padded,
                ..
            } = s;
            if self.transposed {
                let y = &mut y[..g * self.g.image()];
                match w {
                    Weights::Stride2(s, u) => s.scatter(
                        u,
                        &x[..g * self.other()],
                        g,
                        resized(cols, s.work_len(g)),
                        y,
                    ),
                    Weights::Given(w) => {
                        let m = self.join(x, g, mat);
                        self.scatter((w, m), g, y, cols, planes);
                    }
                    _ => unreachable!("Conv::weights packs no 3×3 kernel of a transposed one"),
                }
                let plane = self.g.h * self.g.w;
                for (r, row) in y.chunks_mut(plane).enumerate() {
                    let bias = b[r % b.len()];
                    match act {
                        Some(act) => row.iter_mut().for_each(|v| *v = act.apply(*v + bias)),
                        None => row.iter_mut().for_each(|v| *v += bias),
                    }
                }
            } else {
                let p = self.g.positions();
                // Output row `r` (`image·c2 + channel`) from its sums `src`, `at` values into it.
                let finish = |r: usize, at: usize, dst: &mut [f32], src: &[f32]| {
                    let (bias, pairs) = (b[r % b.len()], dst.iter_mut().zip(src));
                    match (act, res) {
                        (Some(act), None) => pairs.for_each(|(d, &v)| *d = act.apply(v + bias)),
                        (None, None) => pairs.for_each(|(d, &v)| *d = v + bias),
                        // No activation is fused with a residual (`Conv::apply_residual`),
                        // which is what the backward pass's residual gradient assumes.
                        (_, Some(res)) => {
                            debug_assert!(act.is_none(), "an activation after a residual");
                            let res = &res[r * p + at..];
                            pairs.zip(res).for_each(|((d, &v), &e)| *d = v + bias + e);
                        }
                    }
                };
                // Output row `row` of channel `co` of image `i` from its sums on a 3×3 path.
                let ow = self.g.ow();
                let mut emit = |i: usize, co: usize, row: usize, src: &[f32]| {
                    let r = i * self.c2 + co;
                    finish(r, row * ow, &mut y[r * p + row * ow..][..ow], src)
                };
                let w = match w {
                    Weights::Stride2(s, u) => {
                        let work = resized(cols, s.work_len(g));
                        s.gather(u, &x[..g * self.g.image()], g, work, &mut emit);
                        return;
                    }
                    Weights::Winograd(wg, u) => {
                        let v = resized(padded, wg.input_len(g));
                        let rows = resized(cols, wg.rows_len());
                        wg.transform_input(&x[..g * self.g.image()], g, v, rows);
                        let m = resized(mat, wg.output_len(g));
                        wg.multiply(u, v, g, m);
                        wg.rows(m, g, rows, &mut emit);
                        return;
                    }
                    Weights::Direct(d, packed) => {
                        let xp = resized(padded, d.padded_len(g));
                        d.pad(&x[..g * self.g.image()], g, xp);
                        let grid = resized(mat, d.grid_len(g));
                        d.run(packed, xp, g, grid);
                        d.rows(grid, g, &mut emit);
                        return;
                    }
                    Weights::Given(w) => w,
                };
                split_phases(&self.g, x, g, planes);
                let m = resized(mat, self.c2 * g * p);
                self.for_each_block(planes, g, cols, |block, rows| {
                    self.gather_block(w, &block, rows, m)
                });
                self.split_with(m, g, y, |r, dst, src| finish(r, 0, dst, src));
            }
        })
    }

    /// The backward pass of `g` images: writes their input gradient (the adjoint of
    /// [`Conv::forward_group`]) when `dx` is given and their weight gradient, transposed
    /// (`[K, c2]`), to `dwt` when given, and returns their bias gradient (empty without
    /// `dwt`: frozen weights need neither). `act` is the activation fused
    /// into the forward pass with the group's output, for a convolution (not transposed) to
    /// take `dy` through its derivative while joining it; a transposed convolution gets
    /// `dy` already through it, and builds the columns of `dy` once for both gradients.
    fn backward_group(
        &self,
        (w, x, dy): (&[f32], &[f32], &[f32]),
        g: usize,
        act: Option<(Activation, &[f32])>,
        dx: Option<&mut [f32]>,
        mut dwt: Option<&mut [f32]>,
    ) -> Vec<f32> {
        SCRATCH.with_borrow_mut(|s| {
            let gp = g * self.g.positions();
            if self.transposed {
                let Scratch {
                    cols,
                    planes,
                    mat,
                    mat2,
                    ..
                } = s;
                let xm = self.join(x, g, mat);
                let dm = resized(mat2, self.c2 * gp);
                split_phases(&self.g, dy, g, planes);
                self.for_each_block(planes, g, cols, |block, rows| {
                    if dx.is_some() {
                        self.gather_block(w, &block, rows, dm);
                    }
                    if let Some(dwt) = dwt.as_deref_mut() {
                        self.weight_grad_block(xm, &block, rows, dwt);
                    }
                });
                if let Some(dx) = dx {
                    self.split_with(dm, g, dx, |_, dst, src| dst.copy_from_slice(src));
                }
                if dwt.is_none() {
                    return Vec::new();
                }
                self.output_bias_grad(dy, g)
            } else {
                // The joined output gradient serves the input, weight and bias gradients.
                let Scratch {
                    cols,
                    planes,
                    mat,
                    mat2,
                    padded,
                } = s;
                let p = self.g.positions();
                // Row `r` (`image·c2 + channel`) of the output gradient, `at` values into its
                // plane, through the fused activation: what the 3×3 paths' weight gradients sum.
                let through = |r: usize, at: usize, dst: &mut [f32], src: &[f32]| match act {
                    Some((act, y)) => act.grad_into(&y[r * p + at..][..dst.len()], src, dst),
                    None => dst.copy_from_slice(src),
                };
                if let (None, Some(wg), Some(dwt)) = (&dx, self.winograd(), &mut dwt) {
                    // The output gradient's tiles, through the activation, and the input's.
                    let d = resized(mat, wg.output_len(g));
                    let rows = resized(cols, wg.rows_len());
                    let dy = &dy[..g * self.other()];
                    let sums = wg.transform_output_grad(dy, g, (d, rows), through);
                    let v = resized(padded, wg.input_len(g));
                    wg.transform_input(&x[..g * self.g.image()], g, v, rows);
                    let du = resized(mat2, wg.weight_len());
                    wg.weight_grad((d, v), g, du, &mut dwt[..self.c2 * self.g.patch()]);
                    return self.bias_from_sums(sums, g);
                }
                let direct = self.direct().filter(Direct::weight_grad_pays);
                if let (None, Some(d), Some(dwt)) = (&dx, direct, &mut dwt) {
                    // The output gradient on the direct kernel's grid, through the activation.
                    let grid = resized(mat, d.grid_len(g));
                    d.onto_grid(&dy[..g * self.other()], g, grid, through);
                    let xp = resized(padded, d.padded_len(g));
                    d.pad(&x[..g * self.g.image()], g, xp);
                    d.weight_grad(grid, xp, g, &mut dwt[..self.c2 * self.g.patch()]);
                    return self.bias_grad(grid, g);
                }
                let m = match act {
                    Some((act, y)) => self.join_with(dy, g, mat, |r, dst, src| {
                        act.grad_into(&y[r * p..(r + 1) * p], src, dst)
                    }),
                    None => self.join(dy, g, mat),
                };
                if let Some(dx) = dx {
                    self.scatter((w, m), g, dx, cols, planes);
                }
                let Some(dwt) = dwt else {
                    return Vec::new();
                };
                split_phases(&self.g, x, g, planes);
                self.for_each_block(planes, g, cols, |block, rows| {
                    self.weight_grad_block(m, &block, rows, dwt)
                });
                self.bias_grad(m, g)
            }
        })
    }

    /// [`Conv::backward_group`] through the stride-2 Winograd maps of `s`, where `u` holds the
    /// transformed weights of the input gradient's map (given with `dx`).
    fn backward_stride2(
        &self,
        (s, u): &(WinogradStride2, Option<Vec<f32>>),
        (x, dy): (&[f32], &[f32]),
        g: usize,
        act: Option<(Activation, &[f32])>,
        dx: Option<&mut [f32]>,
        dwt: Option<&mut [f32]>,
    ) -> Vec<f32> {
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch { cols, mat2, .. } = scratch;
            let (in_len, out_len) = self.sizes();
            let (x, dy) = (&x[..g * in_len], &dy[..g * out_len]);
            let work = resized(cols, s.work_len(g));
            let dx = dx.zip(u.as_deref());
            let dwt = dwt.map(|d| &mut d[..self.c2 * self.g.patch()]);
            if self.transposed {
                // The image side is the output: its gradient (through the activation already)
                // is gathered, and is what the weight gradient correlates with the input.
                if let Some((dx, u)) = dx {
                    let p = self.g.positions();
                    s.gather(u, dy, g, work, |i, co, y, row| {
                        dx[(i * self.c2 + co) * p + y * row.len()..][..row.len()]
                            .copy_from_slice(row)
                    });
                }
                let Some(dwt) = dwt else {
                    return Vec::new();
                };
                s.weight_grad(dy, x, g, work, dwt);
                self.output_bias_grad(dy, g)
            } else {
                let dy = match act {
                    Some((act, y)) => {
                        let through = resized(mat2, dy.len());
                        act.grad_into(y, dy, through);
                        &*through
                    }
                    None => dy,
                };
                if let Some((dx, u)) = dx {
                    s.scatter(u, dy, g, work, &mut dx[..g * in_len]);
                }
                let Some(dwt) = dwt else {
                    return Vec::new();
                };
                s.weight_grad(x, dy, g, work, dwt);
                self.output_bias_grad(dy, g)
            }
        })
    }

    /// The bias gradient of `g` images from their output gradient `dy` as the op writes its
    /// output (`[g, cout, plane]`, either kind): `[g, cout]` for a per-image bias, `[cout]`
    /// otherwise.
    fn output_bias_grad(&self, dy: &[f32], g: usize) -> Vec<f32> {
        let out_len = self.sizes().1;
        let plane = out_len / self.out_channels();
        let mut db = vec![0f32; self.bias_len(g)];
        let len = db.len();
        for (r, row) in dy[..g * out_len].chunks(plane).enumerate() {
            db[r % len] += lane_sum(row, row, |v, _| v);
        }
        db
    }

    /// The bias gradient of `g` images (not transposed) from their output gradient `m` of
    /// `c2·g` equally long rows, one per (channel, image) pair: `[g, cout]` for a per-image
    /// bias, `[cout]` otherwise. Values past the output in a row must be zero.
    fn bias_grad(&self, m: &[f32], g: usize) -> Vec<f32> {
        let row = m.len() / (self.c2 * g);
        if self.per_image_bias {
            let sums = m.chunks(row).map(|row| lane_sum(row, row, |v, _| v));
            self.bias_from_sums(sums.collect(), g)
        } else {
            m.chunks(g * row)
                .map(|row| lane_sum(row, row, |v, _| v))
                .collect()
        }
    }

    /// The bias gradient of `g` images (not transposed) from the sums of their output
    /// gradient per (channel, image) pair, `[c2, g]`: as [`Conv::bias_grad`] returns it.
    fn bias_from_sums(&self, sums: Vec<f32>, g: usize) -> Vec<f32> {
        if self.per_image_bias {
            (0..g * self.c2)
                .map(|r| sums[(r % self.c2) * g + r / self.c2])
                .collect()
        } else {
            sums.chunks(g).map(|s| s.iter().sum()).collect()
        }
    }

    /// Images per group of a batch of `n` ([`group_size`]), at most 16. Through `im2col`: as
    /// many as fit a column matrix of about 2²⁰ values (4 MiB, an L2 cache; larger groups no
    /// longer make the gemm calls faster and push the working memory out of the cache). The
    /// direct 3×3 kernel builds no column matrix and works image by image: there, just enough
    /// images for 1,024 positions, so that the group's partial weight gradient (as large as
    /// the kernel, 2.4 MB for 256 by 256 channels) is small beside its work, and otherwise
    /// groups as small as can be, which a machine whose cores are shared balances best. The
    /// stride-2 Winograd maps take up to 32: their gemm calls have a row per tile, and a
    /// 14×14 plane has only four.
    fn group(&self, n: usize) -> usize {
        if self.stride2().is_some() {
            group_size(n, 32)
        } else if self.winograd().is_some() || self.direct().is_some() {
            group_size(n, 1024usize.div_ceil(self.g.positions()).min(16))
        } else {
            group_size(n, ((1 << 20) / self.g.rows().max(1)).min(16))
        }
    }

    /// The weight `w` as [`Conv::forward_group`] reads it.
    fn weights<'a>(&self, w: &'a [f32]) -> Weights<'a> {
        let w = &w[..self.c2 * self.g.patch()];
        if let Some(s) = self.stride2() {
            let u = if self.transposed {
                s.scatter_weights(w)
            } else {
                s.gather_weights(w)
            };
            return Weights::Stride2(s, u);
        }
        match (self.winograd(), self.direct()) {
            (Some(wg), _) => Weights::Winograd(wg, wg.transform_weights(w)),
            (None, Some(d)) => Weights::Direct(d, d.pack(w)),
            (None, None) => Weights::Given(w),
        }
    }

    /// The stride-2 Winograd layout for this convolution or transposed convolution, where it
    /// applies and pays.
    fn stride2(&self) -> Option<WinogradStride2> {
        WinogradStride2::new(&self.g, self.c2)
    }

    /// The Winograd layout for this convolution (not transposed), where it applies and pays.
    fn winograd(&self) -> Option<Winograd> {
        Winograd::new(&self.g, self.c2).filter(|_| !self.transposed)
    }

    /// The direct 3×3 kernel's layout for this convolution (not transposed), where it applies.
    fn direct(&self) -> Option<Direct> {
        Direct::new(&self.g, self.c2).filter(|_| !self.transposed)
    }

    /// For a stride-1 convolution (not transposed), the convolution that maps its output
    /// gradient to its input gradient: the same kernel flipped, with the channels swapped and
    /// padding `k − 1 − pad`. Gathering through it runs gemm with `c2·k·k` terms per sum, where
    /// scattering back (`col2im(Wᵀ · dy)`) sums only `c2`, and writes a column matrix as large.
    fn input_gradient_conv(&self) -> Option<Conv> {
        let Geometry { k, stride, pad, .. } = self.g;
        (!self.transposed && stride == 1 && pad < k).then(|| Conv {
            g: Geometry {
                c: self.c2,
                h: self.g.oh(),
                w: self.g.ow(),
                k,
                stride: 1,
                pad: k - 1 - pad,
            },
            c2: self.g.c,
            transposed: false,
            per_image_bias: false,
            residual: false,
            norm: None,
            saved: None,
        })
    }

    /// `w [c2, c, k, k]` as the kernel `[c, c2, k, k]` of [`Conv::input_gradient_conv`],
    /// flipped in both spatial directions.
    fn flipped_kernel(&self, w: &[f32]) -> Vec<f32> {
        let (c, kk) = (self.g.c, self.g.k * self.g.k);
        let mut f = vec![0f32; w.len()];
        for (o, taps) in w.chunks(kk).enumerate() {
            let (co, ci) = (o / c, o % c);
            let dst = &mut f[(ci * self.c2 + co) * kk..][..kk];
            dst.iter_mut()
                .zip(taps.iter().rev())
                .for_each(|(d, &t)| *d = t);
        }
        f
    }

    /// Input (if `need_dx`), weight and bias (if `need_dw`) gradients of a batch of `n` images
    /// from the data of `x`, the weight and `dy`, with the activation and output of a
    /// convolution's fused activation, and the fused input norm's weight and bias `affine`
    /// (and its output `kept` by the forward pass, if it was).
    /// Fixed groups of images, their partial sums added in order: the same bits whatever the
    /// number of threads. The groups' transposed weight gradients go to slots of one buffer
    /// kept between calls (every entry of a slot is overwritten).
    fn gradients(
        &self,
        (x, w, dy): (&[f32], &[f32], &[f32]),
        (affine, kept): (Affine, Option<&[f32]>),
        act: Option<(Activation, &[f32])>,
        (n, need_dx, need_dw): (usize, bool, bool),
    ) -> (Option<Vec<f32>>, Option<WeightGradients>) {
        let (in_len, out_len) = self.sizes();
        let group = self.group(n);
        // The fused norm's weight gradients come from the gradient of its output.
        let need_dz = need_dx || (self.norm.is_some() && need_dw);
        let gather = self.input_gradient_conv().filter(|_| need_dz);
        let flipped = gather.as_ref().map(|_| self.flipped_kernel(w));
        let gather = gather.zip(flipped.as_deref()).map(|(op, flipped)| {
            let kernel = op.weights(flipped);
            (op, kernel, vec![0f32; self.g.c])
        });
        // The stride-2 Winograd layout, and the weights of the map the input gradient takes
        // (the adjoint of the forward pass's).
        let stride2 = self.stride2().map(|s| {
            let u = need_dz.then(|| match self.transposed {
                true => s.gather_weights(w),
                false => s.scatter_weights(w),
            });
            (s, u)
        });
        PARTIALS.with_borrow_mut(|buf| {
            let slots = Handout::new(resized(buf, n.div_ceil(group) * w.len()).chunks_mut(w.len()));
            let run = |i: usize, mut dxs: Option<&mut [f32]>| {
                let at = i * group * out_len;
                let g = group.min(n - i * group);
                let (xs, dys) = (&x[i * group * in_len..][..g * in_len], &dy[at..]);
                let act = act.map(|(a, out)| (a, &out[at..at + g * out_len]));
                let dwt = slots.take(i);
                let dwt = need_dw.then(|| dwt.expect("every group runs once"));
                let backward = |inputs: &[f32]| {
                    let dxs = match (&gather, dxs.as_deref_mut()) {
                        (Some((op, kernel, zeros)), Some(dxs)) => {
                            // The output gradient through the fused activation's derivative.
                            let dys = &dys[..g * out_len];
                            let through;
                            let dz = match act {
                                Some((a, out)) => {
                                    let mut dz = vec![0f32; dys.len()];
                                    a.grad_into(out, dys, &mut dz);
                                    through = dz;
                                    &through
                                }
                                None => dys,
                            };
                            op.forward_group((kernel, zeros, None), dz, g, dxs, None);
                            None
                        }
                        (_, dxs) => dxs,
                    };
                    match &stride2 {
                        Some(s) => self.backward_stride2(s, (inputs, dys), g, act, dxs, dwt),
                        None => self.backward_group((w, inputs, dys), g, act, dxs, dwt),
                    }
                };
                let db = match kept {
                    Some(kept) => backward(&kept[i * group * in_len..][..g * in_len]),
                    None => self.normed(xs, affine, None, backward),
                };
                // The gradient of the norm's output, taken back through the norm.
                let dnorm = match (self.norm, dxs) {
                    (Some(norm), Some(dxs)) => {
                        norm.backward_images(xs, self.g.h * self.g.w, affine, dxs)
                    }
                    _ => Vec::new(),
                };
                (db, dnorm)
            };
            let (dx, sums) = if need_dz {
                let (dx, sums) =
                    parallel_pieces(n * in_len, in_len * group, |i, dxs| run(i, Some(dxs)));
                (need_dx.then_some(dx), sums)
            } else {
                (None, parallel_map(n.div_ceil(group), |i| run(i, None)))
            };
            drop(slots);
            if !need_dw {
                return (dx, None);
            }
            let weight = sum_transposed(
                buf.chunks(w.len()).take(sums.len()),
                self.c2,
                self.g.patch(),
            );
            let bias = if self.per_image_bias {
                sums.iter().flat_map(|(db, _)| db.iter().copied()).collect()
            } else {
                let mut db = vec![0f32; self.out_channels()];
                for (pb, _) in &sums {
                    db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
                }
                db
            };
            // The norm's `(Σ dz, Σ dz·x̂)` per channel, summed over the groups in order.
            let mut dnorm = vec![(0f32, 0f32); affine.0.len()];
            for (_, pn) in &sums {
                dnorm
                    .iter_mut()
                    .zip(pn)
                    .for_each(|(a, b)| *a = (a.0 + b.0, a.1 + b.1));
            }
            let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = dnorm.into_iter().unzip();
            let norm = [dgamma, dbeta].concat();
            (dx, Some(WeightGradients { weight, bias, norm }))
        })
    }

    fn out_shape(&self, n: usize) -> Shape {
        if self.transposed {
            Shape::from((n, self.g.c, self.g.h, self.g.w))
        } else {
            Shape::from((n, self.c2, self.g.oh(), self.g.ow()))
        }
    }
}

impl F32Op3 for Conv {
    const NAME: &'static str = NAME;

    fn forward(
        &self,
        [(x, l1), (w, _), (b, _)]: [(&[f32], &Layout); 3],
        act: Option<Activation>,
    ) -> candle_core::Result<(Vec<f32>, Shape)> {
        let (in_len, out_len) = self.sizes();
        let n = l1.dims()[0];
        let misfit = || {
            candle_core::Error::Msg(format!(
                "{NAME}: input {:?} does not fit {self:?}",
                l1.dims()
            ))
        };
        let Unpacked {
            weight: w,
            bias: packed_bias,
            affine,
        } = self.unpack(w).ok_or_else(misfit)?;
        // With a residual: the bias packed with the weight, and the residual in its place.
        let (b, res) = match packed_bias {
            Some(packed) => (packed, Some(b)),
            None => (b, None),
        };
        if x.len() != n * in_len
            || b.len() != self.bias_len(n)
            || res.is_some_and(|r| r.len() != n * out_len)
        {
            return Err(misfit());
        }
        let (group, w) = (self.group(n), self.weights(w));
        // The norm's output, kept for the backward pass (only a fused norm's is): each group
        // writes its piece.
        let mut kept = self.saved.as_ref().map(|_| Saved::buffer(x.len()));
        let slots = Handout::new(kept.iter_mut().flat_map(|k| k.chunks_mut(group * in_len)));
        let (y, _) = parallel_pieces(n * out_len, out_len * group, |i, ys| {
            let g = ys.len() / out_len;
            let b = self.group_bias(b, (i, group, g));
            let res = res.map(|r| &r[i * group * out_len..][..g * out_len]);
            let xs = &x[i * group * in_len..][..g * in_len];
            let into = slots.take(i);
            self.normed(xs, affine, into, |xs| {
                self.forward_group((&w, b, res), xs, g, ys, act)
            });
        });
        drop(slots);
        if let (Some(saved), Some(kept)) = (&self.saved, kept) {
            saved.keep(kept);
        }
        Ok((y, self.out_shape(n)))
    }

    fn backward(
        &self,
        inputs: [&Tensor; 3],
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward_through(inputs, dy, None)
    }

    /// A convolution (not transposed) takes `dy` through the activation's derivative while
    /// joining it for the gemm calls, instead of in a sweep of its own.
    fn backward_through(
        &self,
        [x, weight, bias]: [&Tensor; 3],
        dy: &Tensor,
        act: Option<(Activation, &Tensor)>,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (act, dy) = match act {
            Some((act, out)) if self.transposed => (None, activation_grad(act, out, dy)?),
            act => (act, dy.clone()),
        };
        // An input that no variable depends on (a data batch, a detached sample) needs no
        // gradient, nor do weights that are no variable's (a frozen network's, whose backward
        // pass serves its input only).
        let batch = (
            x.dim(0)?,
            x.track_op(),
            weight.track_op() || (!self.residual && bias.track_op()),
        );
        // The fused norm's output, if the forward pass kept it.
        let kept = self.saved.as_ref().and_then(Saved::take);
        let kept = kept.filter(|k| k.len() == x.elem_count());
        let (dx, dwb) = with_f32(x, NAME, |x| {
            with_f32(weight, NAME, |packed| {
                let Some(Unpacked {
                    weight: w, affine, ..
                }) = self.unpack(packed)
                else {
                    candle_core::bail!("{NAME}: weight {:?} does not fit {self:?}", weight.dims())
                };
                let norm = (affine, kept.as_deref());
                with_f32(&dy, NAME, |dy| match act {
                    Some((act, out)) => with_f32(out, NAME, |out| {
                        self.gradients((x, w, dy), norm, Some((act, out)), batch)
                    }),
                    None => Ok(self.gradients((x, w, dy), norm, None, batch)),
                })
            })
        })????;
        if let Some(kept) = kept {
            Saved::recycle(kept);
        }
        let dev = x.device();
        let dx = dx
            .map(|dx| Tensor::from_vec(dx, x.shape(), dev))
            .transpose()?;
        // The residual gets the output gradient itself (no activation is fused with a
        // residual).
        let residual = self.residual.then(|| dy.clone());
        let Some(WeightGradients {
            weight: dw,
            bias: db,
            norm,
        }) = dwb
        else {
            return Ok((dx, None, residual));
        };
        // The packed second input gets its gradients packed alike.
        let (packed, third) = if self.residual {
            ([dw, db, norm].concat(), residual)
        } else {
            let db = Tensor::from_vec(db, bias.shape(), dev)?;
            ([dw, norm].concat(), Some(db))
        };
        Ok((
            dx,
            Some(Tensor::from_vec(packed, weight.shape(), dev)?),
            third,
        ))
    }
}

/// A fused input norm's weight and bias, per input channel.
type Affine<'a> = (&'a [f32], &'a [f32]);

/// The parts of a convolution op's packed second input ([`Conv::unpack`]).
struct Unpacked<'a> {
    weight: &'a [f32],
    /// The bias, where a residual takes the third input.
    bias: Option<&'a [f32]>,
    /// The fused norm's (empty without one).
    affine: Affine<'a>,
}

/// A convolution's weight and bias gradients, and its fused input norm's weight and bias
/// gradients side by side (empty without a norm).
struct WeightGradients {
    weight: Vec<f32>,
    bias: Vec<f32>,
    norm: Vec<f32>,
}

/// `Σ_p pᵀ` of `[k, c2]` partial sums `p` (added in order): the `[c2, k]` weight gradient,
/// in parallel pieces of whole weight rows, through 16 × 16 tiles so that both the reads and
/// the transposed writes use whole cache lines.
fn sum_transposed<'a>(
    partials: impl Iterator<Item = &'a [f32]> + Clone + Sync,
    c2: usize,
    k: usize,
) -> Vec<f32> {
    const TILE: usize = 16;
    let (dw, _) = parallel_pieces(c2 * k, TILE * k, |i, piece| {
        let c0 = i * TILE;
        let rows = piece.len() / k;
        let mut tile = [[0f32; TILE]; TILE];
        for k0 in (0..k).step_by(TILE) {
            let cols = TILE.min(k - k0);
            tile.iter_mut().for_each(|t| t.fill(0.0));
            for pt in partials.clone() {
                for (t, kk) in tile.iter_mut().zip(k0..k0 + cols) {
                    let src = &pt[kk * c2 + c0..kk * c2 + c0 + rows];
                    t.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                }
            }
            for (j, row) in piece.chunks_mut(k).enumerate() {
                for (dst, t) in row[k0..k0 + cols].iter_mut().zip(&tile) {
                    *dst = t[j];
                }
            }
        }
    });
    dw
}

/// Which convolution a [`ConvLayer`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    /// [`conv2d`]; weight `[cout, cin, k, k]`.
    Forward,
    /// [`conv_transpose2d`] with this output padding; weight `[cin, cout, k, k]`.
    Transposed {
        /// Extra rows and columns at the bottom and right of the output.
        out_pad: usize,
    },
}

/// A convolution layer with square kernels, backed by [`conv2d`] or [`conv_transpose2d`],
/// whose tensors are named `weight` and `bias` like candle-nn's and PyTorch's.
pub struct ConvLayer {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
    kind: ConvKind,
}

impl ConvLayer {
    /// Creates the layer's tensors under `vb` (a `bias [cout]` only when `bias`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: ConvKind,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let shape = match kind {
            ConvKind::Forward => (cout, cin, k, k),
            ConvKind::Transposed { .. } => (cin, cout, k, k),
        };
        let weight = vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bias = if bias {
            Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(ConvLayer {
            weight,
            bias,
            stride,
            pad,
            kind,
        })
    }
}

impl ConvLayer {
    /// Multiply-adds of one forward pass over an `h × w` input image.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let d = self.weight.dims();
        let per_position = (d[0] * d[1] * d[2] * d[3]) as u64;
        match self.kind {
            ConvKind::Forward => {
                let out = |i: usize| (i + 2 * self.pad - d[2]) / self.stride + 1;
                per_position * (out(h) * out(w)) as u64
            }
            ConvKind::Transposed { .. } => per_position * (h * w) as u64,
        }
    }
}

impl ConvLayer {
    /// The layer followed by an activation, fused into one graph node.
    pub fn forward_with(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.apply(x, Some(act))
    }

    /// The layer followed by a LeakyReLU of slope `slope` (at least 0; 0 is a ReLU), fused
    /// into one graph node.
    pub fn forward_leaky(&self, x: &Tensor, slope: f64) -> Result<Tensor> {
        self.forward_with(x, Activation::LeakyRelu(slope as f32))
    }

    /// The layer applied to `norm(x)` (a GroupNorm, with its SiLU if it has one), in the
    /// same graph node for a convolution: the normalised input is computed image group by
    /// image group as the kernels read it, and is never a tensor of its own.
    pub fn forward_normed(&self, x: &Tensor, norm: &GroupNorm) -> Result<Tensor> {
        self.apply_biased(x, Some(norm), self.bias.as_ref(), None)
    }

    /// The layer, on `norm(x)` when a norm is given (as [`ConvLayer::forward_normed`]), plus
    /// `shift [n, cout]`, one value per image and output channel added at every position (a
    /// diffusion U-Net's time embedding), in the same graph node.
    pub fn forward_shifted(
        &self,
        x: &Tensor,
        norm: Option<&GroupNorm>,
        shift: &Tensor,
    ) -> Result<Tensor> {
        let bias = match &self.bias {
            Some(b) => shift.broadcast_add(b)?,
            None => shift.clone(),
        };
        self.apply_biased(x, norm, Some(&bias), None)
    }

    /// The layer, on `norm(x)` when a norm is given (as [`ConvLayer::forward_normed`]), plus
    /// `residual` (shaped like its output: a residual block's skip path), in the same graph
    /// node for a convolution (a transposed one adds it after).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        norm: Option<&GroupNorm>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (w, s, p) = (&self.weight, self.stride, self.pad);
        match self.kind {
            ConvKind::Forward => {
                let bias = self.bias.as_ref();
                forward_op(x, w, s, p)?.apply_residual(x, w, bias, residual, norm)
            }
            ConvKind::Transposed { .. } => {
                Ok((self.apply_biased(x, norm, self.bias.as_ref(), None)? + residual)?)
            }
        }
    }

    fn apply(&self, x: &Tensor, act: Option<Activation>) -> Result<Tensor> {
        self.apply_biased(x, None, self.bias.as_ref(), act)
    }

    fn apply_biased(
        &self,
        x: &Tensor,
        norm: Option<&GroupNorm>,
        b: Option<&Tensor>,
        act: Option<Activation>,
    ) -> Result<Tensor> {
        let (w, s, p) = (&self.weight, self.stride, self.pad);
        let op = match self.kind {
            ConvKind::Forward => forward_op(x, w, s, p)?,
            ConvKind::Transposed { out_pad } => transposed_op(x, w, s, p, out_pad)?,
        };
        op.apply(x, w, b, act, norm)
    }
}

impl Module for ConvLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(x, None).map_err(candle_core::Error::wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing;
    use crate::rng::Rng;
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    /// Compares forward value and the gradients of input, kernel and bias of our layer
    /// (`ours(x, w, b)`) with candle's convolution plus a broadcast bias (`theirs(x, w)`);
    /// `b` is `[cout]` or `[n, cout]`.
    fn compare(
        ours: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        theirs: impl Fn(&Tensor, &Tensor) -> Tensor,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        seed: u64,
    ) -> std::result::Result<(), TestCaseError> {
        let (y1, g1) = testing::value_and_grads(|t| ours(&t[0], &t[1], &t[2]), &[x, w, b], seed);
        let with_bias = |t: &[Tensor]| {
            let b = match t[2].dims() {
                &[n, c] => t[2].reshape((n, c, 1, 1)),
                _ => t[2].reshape((1, (), 1, 1)),
            };
            theirs(&t[0], &t[1]).broadcast_add(&b.unwrap()).unwrap()
        };
        let (y2, g2) = testing::value_and_grads(with_bias, &[x, w, b], seed);
        let names = ["forward", "input grad", "kernel grad", "bias grad"];
        for (name, (p, q)) in names.iter().zip(
            [&y1]
                .into_iter()
                .chain(&g1)
                .zip([&y2].into_iter().chain(&g2)),
        ) {
            testing::assert_close(p, q, 1e-4)
                .map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    /// [`compare`] for [`conv2d`] against candle's `conv2d`.
    fn check_conv2d(
        (x, w, b): (&Tensor, &Tensor, &Tensor),
        stride: usize,
        pad: usize,
        seed: u64,
    ) -> std::result::Result<(), TestCaseError> {
        compare(
            |x, w, b| conv2d(x, w, Some(b), stride, pad).unwrap(),
            |x, w| x.conv2d(w, pad, stride, 1, 1).unwrap(),
            x,
            w,
            b,
            seed,
        )
    }

    /// [`compare`] for [`conv_transpose2d`] against candle's `conv_transpose2d`.
    fn check_transposed(
        (x, w, b): (&Tensor, &Tensor, &Tensor),
        (stride, pad, out_pad): (usize, usize, usize),
        seed: u64,
    ) -> std::result::Result<(), TestCaseError> {
        compare(
            |x, w, b| conv_transpose2d(x, w, Some(b), stride, pad, out_pad).unwrap(),
            |x, w| x.conv_transpose2d(w, pad, out_pad, stride, 1).unwrap(),
            x,
            w,
            b,
            seed,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn conv2d_matches_candle_forward_and_backward(
            n in 1usize..4, c in 1usize..4, cout in 1usize..5, h in 2usize..10, w in 2usize..10,
            k in 1usize..6, stride in 1usize..4, pad in 0usize..3, seed in 0u64..1000,
        ) {
            prop_assume!(h + 2 * pad >= k && w + 2 * pad >= k && pad < k);
            // candle's own conv2d backward derives the output padding of its input gradient
            // from the height alone and fails when height and width leave different remainders.
            prop_assume!((h + 2 * pad - k) % stride == (w + 2 * pad - k) % stride);
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, c, h, w], &Device::Cpu).unwrap();
            let wt = rng.normal(&[cout, c, k, k], &Device::Cpu).unwrap();
            let b = rng.normal(&[cout], &Device::Cpu).unwrap();
            check_conv2d((&x, &wt, &b), stride, pad, seed)?;
        }

        #[test]
        fn direct_3x3_convolutions_match_candle_forward_and_backward(
            n in 1usize..4, c in 1usize..9, half in 1usize..8, h in 14usize..19, w in 14usize..19,
            seed in 0u64..1000,
        ) {
            // Even output channels and planes of at least 14×14: the direct kernel's forward
            // pass and weight gradient (and, for an even `c`, its input gradient).
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, c, h, w], &Device::Cpu).unwrap();
            let wt = rng.normal(&[2 * half, c, 3, 3], &Device::Cpu).unwrap();
            let b = rng.normal(&[2 * half], &Device::Cpu).unwrap();
            check_conv2d((&x, &wt, &b), 1, 1, seed)?;
        }

        #[test]
        fn winograd_convolutions_match_candle_forward_and_backward(
            n in 1usize..4, c in 128usize..133, c2 in 128usize..133, h in 1usize..11,
            w in 1usize..11, seed in 0u64..1000,
        ) {
            // At least 128 channels on each side: Winograd's forward pass, input gradient
            // and weight gradient, on planes with partial tiles and as small as 1×1.
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, c, h, w], &Device::Cpu).unwrap();
            let wt = rng.normal(&[c2, c, 3, 3], &Device::Cpu).unwrap();
            let b = rng.normal(&[c2], &Device::Cpu).unwrap();
            prop_assert!(forward_op(&x, &wt, 1, 1).unwrap().winograd().is_some());
            check_conv2d((&x, &wt, &b), 1, 1, seed)?;
        }

        #[test]
        fn stride_2_winograd_matches_candle_forward_and_backward(
            n in 1usize..4, c in 64usize..67, c2 in 64usize..67, half_h in 1usize..9,
            half_w in 1usize..9, seed in 0u64..1000,
        ) {
            // 4×4 kernels, stride 2, padding 1, even sides, at least 64 channels on each side:
            // the convolution's forward pass (gather), input gradient (scatter) and weight
            // gradient, and the transposed convolution's, with partial tiles on both sides.
            let (h, w) = (2 * half_h, 2 * half_w);
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, c, h, w], &Device::Cpu).unwrap();
            let wt = rng.normal(&[c2, c, 4, 4], &Device::Cpu).unwrap();
            let b = rng.normal(&[c2], &Device::Cpu).unwrap();
            prop_assert!(forward_op(&x, &wt, 2, 1).unwrap().stride2().is_some());
            check_conv2d((&x, &wt, &b), 2, 1, seed)?;
            let small = rng.normal(&[n, c2, half_h, half_w], &Device::Cpu).unwrap();
            let b = rng.normal(&[c], &Device::Cpu).unwrap();
            prop_assert!(transposed_op(&small, &wt, 2, 1, 0).unwrap().stride2().is_some());
            check_transposed((&small, &wt, &b), (2, 1, 0), seed)?;
        }

        #[test]
        fn conv_transpose2d_matches_candle_forward_and_backward(
            n in 1usize..4, cin in 1usize..4, cout in 1usize..5, h in 1usize..8, w in 1usize..8,
            k in 1usize..6, stride in 1usize..4, pad in 0usize..3, out_pad in 0usize..3, seed in 0u64..1000,
        ) {
            prop_assume!(out_pad < stride && pad < k && (h.min(w) - 1) * stride + k + out_pad > 2 * pad);
            let mut rng = Rng::new(seed);
            let x = rng.normal(&[n, cin, h, w], &Device::Cpu).unwrap();
            let wt = rng.normal(&[cin, cout, k, k], &Device::Cpu).unwrap();
            let b = rng.normal(&[cout], &Device::Cpu).unwrap();
            check_transposed((&x, &wt, &b), (stride, pad, out_pad), seed)?;
        }
    }

    #[test]
    fn batches_of_several_groups_match_candle_with_either_kind_of_bias() {
        // 19 images: groups of 10 and 9; a `[cout]` bias, then a `[n, cout]` one (a U-Net's
        // time embedding); stride 2 and 1 (whose input gradient is gathered).
        let mut rng = Rng::new(11);
        let dev = Device::Cpu;
        let x = rng.normal(&[19, 3, 7, 7], &dev).unwrap();
        let w = rng.normal(&[4, 3, 3, 3], &dev).unwrap();
        let wt = rng.normal(&[3, 2, 4, 4], &dev).unwrap();
        for per_image in [false, true] {
            let images = if per_image { vec![19] } else { vec![] };
            let bias = |c: usize| [&images[..], &[c]].concat();
            let b = rng.normal(&bias(4), &dev).unwrap();
            check_conv2d((&x, &w, &b), 2, 1, 5).unwrap();
            check_conv2d((&x, &w, &b), 1, 1, 15).unwrap();
            let bt = rng.normal(&bias(2), &dev).unwrap();
            check_transposed((&x, &wt, &bt), (2, 1, 0), 6).unwrap();
        }
        // A bias for another batch, or of another rank, is an error.
        for bad in [&[18, 4][..], &[19, 4, 1], &[5]] {
            let b = Tensor::zeros(bad, candle_core::DType::F32, &dev).unwrap();
            let err = conv2d(&x, &w, Some(&b), 1, 1).unwrap_err().to_string();
            assert!(err.contains("bias"), "{err}");
        }
    }

    #[test]
    fn a_residual_added_in_the_convolutions_sweep_matches_a_separate_addition() {
        // 19 images (groups of 10 and 9), stride 1 (gathered input gradient) and 2: the
        // output and the gradients of input, kernel, bias and residual.
        let mut rng = Rng::new(29);
        let dev = Device::Cpu;
        let x = rng.normal(&[19, 3, 7, 7], &dev).unwrap();
        let w = rng.normal(&[4, 3, 3, 3], &dev).unwrap();
        let b = rng.normal(&[4], &dev).unwrap();
        for (stride, side) in [(1, 7), (2, 4)] {
            let r = rng.normal(&[19, 4, side, side], &dev).unwrap();
            let inputs = [&x, &w, &b, &r];
            let fused = testing::value_and_grads(
                |t| conv2d_residual(&t[0], &t[1], Some(&t[2]), &t[3], stride, 1).unwrap(),
                &inputs,
                stride as u64,
            );
            let apart = testing::value_and_grads(
                |t| (conv2d(&t[0], &t[1], Some(&t[2]), stride, 1).unwrap() + &t[3]).unwrap(),
                &inputs,
                stride as u64,
            );
            // The same sums in the same order: the same bits.
            assert_eq!(testing::max_abs_diff(&fused.0, &apart.0), 0.0);
            for (f, a) in fused.1.iter().zip(&apart.1) {
                testing::assert_close(f, a, 1e-6).unwrap();
            }
            // The portable path computes the same.
            let portable = crate::ops::portable::forced(|| {
                conv2d_residual(&x, &w, Some(&b), &r, stride, 1).unwrap()
            });
            testing::assert_close(&portable, &fused.0, 1e-4).unwrap();
        }
        // Finite differences, and a layer without a bias.
        let (x, r) = (
            x.narrow(0, 0, 2).unwrap(),
            rng.normal(&[2, 4, 7, 7], &dev).unwrap(),
        );
        testing::check_finite_differences(
            |t| conv2d_residual(&t[0], &t[1], Some(&t[2]), &t[3], 1, 1).unwrap(),
            &[&x, &w, &b, &r],
            9,
            7,
        );
        let unbiased = conv2d_residual(&x, &w, None, &r, 1, 1).unwrap();
        let want = (conv2d(&x, &w, None, 1, 1).unwrap() + &r).unwrap();
        testing::assert_close(&unbiased, &want, 1e-6).unwrap();
        // A residual of another shape is an error.
        let wrong = rng.normal(&[2, 4, 6, 7], &dev).unwrap();
        let err = conv2d_residual(&x, &w, Some(&b), &wrong, 1, 1).unwrap_err();
        assert!(err.to_string().contains("residual"), "{err}");
    }

    #[test]
    fn a_shifted_layer_adds_its_bias_and_the_shift() {
        let mut rng = Rng::new(23);
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
        let layer = ConvLayer::new(ConvKind::Forward, 3, 4, 3, 1, 1, true, vb).unwrap();
        let bias = rng.normal(&[4], &dev).unwrap();
        vm.data().lock().unwrap()["bias"].set(&bias).unwrap();
        let x = rng.normal(&[5, 3, 6, 6], &dev).unwrap();
        let shift = rng.normal(&[5, 4], &dev).unwrap();
        let fused = testing::value_and_grads(
            |t| layer.forward_shifted(&t[0], None, &t[1]).unwrap(),
            &[&x, &shift],
            3,
        );
        let apart = testing::value_and_grads(
            |t| {
                let s = t[1].reshape((5, 4, 1, 1)).unwrap();
                layer.forward(&t[0]).unwrap().broadcast_add(&s).unwrap()
            },
            &[&x, &shift],
            3,
        );
        testing::assert_close(&fused.0, &apart.0, 1e-6).unwrap();
        for (f, a) in fused.1.iter().zip(&apart.1) {
            testing::assert_close(f, a, 1e-5).unwrap();
        }
    }

    #[test]
    fn column_matrices_built_in_several_channel_blocks_match_candle() {
        // 37 channels of 16×16 under 5×5 kernels: groups of 3 images whose column matrices
        // are built in blocks of 13, 13 and 11 channels.
        let mut rng = Rng::new(13);
        let dev = Device::Cpu;
        let x = rng.normal(&[6, 37, 16, 16], &dev).unwrap();
        let w = rng.normal(&[5, 37, 5, 5], &dev).unwrap();
        let b = rng.normal(&[5], &dev).unwrap();
        let op = forward_op(&x, &w, 1, 2).unwrap();
        let blocks: Vec<_> = op.channel_blocks(op.group(6)).collect();
        assert_eq!(blocks, [0..13, 13..26, 26..37]);
        check_conv2d((&x, &w, &b), 1, 2, 7).unwrap();
        let x = rng.normal(&[6, 5, 16, 16], &dev).unwrap();
        let w = rng.normal(&[5, 37, 5, 5], &dev).unwrap();
        let b = rng.normal(&[37], &dev).unwrap();
        let op = transposed_op(&x, &w, 1, 2, 0).unwrap();
        assert_eq!(op.channel_blocks(op.group(6)).count(), 3);
        check_transposed((&x, &w, &b), (1, 2, 0), 8).unwrap();
    }

    #[test]
    fn an_input_without_variables_gets_no_gradient_and_the_same_kernel_gradients() {
        // 11 images: one full group and a partial one, through both kinds.
        let mut rng = Rng::new(12);
        let dev = Device::Cpu;
        let x = rng.normal(&[11, 3, 6, 6], &dev).unwrap();
        for (w, transposed) in [
            (rng.normal(&[4, 3, 4, 4], &dev).unwrap(), false),
            (rng.normal(&[3, 2, 4, 4], &dev).unwrap(), true),
        ] {
            let out_channels = if transposed { w.dim(1) } else { w.dim(0) }.unwrap();
            let bv = Var::from_tensor(&rng.normal(&[out_channels], &dev).unwrap()).unwrap();
            let wv = Var::from_tensor(&w).unwrap();
            let run = |x: &Tensor| {
                let y = if transposed {
                    conv_transpose2d(x, wv.as_tensor(), Some(bv.as_tensor()), 2, 1, 0)
                } else {
                    conv2d(x, wv.as_tensor(), Some(bv.as_tensor()), 2, 1)
                }
                .unwrap();
                let r = Rng::new(1).normal(y.dims(), &dev).unwrap();
                (y * r).unwrap().sum_all().unwrap().backward().unwrap()
            };
            let xv = Var::from_tensor(&x).unwrap();
            let (tracked, plain) = (run(xv.as_tensor()), run(&x));
            assert!(tracked.get(xv.as_tensor()).is_some() && plain.get(&x).is_none());
            for v in [&wv, &bv] {
                let (a, b) = (
                    tracked.get(v.as_tensor()).unwrap(),
                    plain.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(testing::max_abs_diff(a, b), 0.0, "transposed {transposed}");
            }
        }
    }

    #[test]
    fn frozen_weights_get_no_gradient_and_the_input_the_same_one() {
        // A frozen network (detached weights, as `Params::frozen_builder` gives) back-propagates
        // to its input only: the same input gradient to the bit, no weight gradient computed.
        let mut rng = Rng::new(13);
        let dev = Device::Cpu;
        let xv = Var::from_tensor(&rng.normal(&[11, 3, 6, 6], &dev).unwrap()).unwrap();
        for (w, transposed) in [
            (rng.normal(&[4, 3, 4, 4], &dev).unwrap(), false),
            (rng.normal(&[3, 2, 4, 4], &dev).unwrap(), true),
        ] {
            let out_channels = if transposed { w.dim(1) } else { w.dim(0) }.unwrap();
            let b = rng.normal(&[out_channels], &dev).unwrap();
            let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
            let run = |w: &Tensor, b: &Tensor| {
                let y = if transposed {
                    conv_transpose2d(xv.as_tensor(), w, Some(b), 2, 1, 0)
                } else {
                    conv2d(xv.as_tensor(), w, Some(b), 2, 1)
                }
                .unwrap();
                let r = Rng::new(1).normal(y.dims(), &dev).unwrap();
                (y * r).unwrap().sum_all().unwrap().backward().unwrap()
            };
            let tracked = run(wv.as_tensor(), bv.as_tensor());
            let (wf, bf) = (wv.as_tensor().detach(), bv.as_tensor().detach());
            let frozen = run(&wf, &bf);
            assert!(frozen.get(&wf).is_none() && frozen.get(&bf).is_none());
            let dx = |g: &candle_core::backprop::GradStore| g.get(xv.as_tensor()).unwrap().clone();
            let diff = testing::max_abs_diff(&dx(&tracked), &dx(&frozen));
            assert_eq!(diff, 0.0, "transposed {transposed}");
        }
    }

    /// `op` with each activation fused against the activation applied as a separate op: the
    /// output and the gradients of input, kernel and bias.
    fn fused_and_separate_activations_agree(op: &Conv, (x, w, b): (&Tensor, &Tensor, &Tensor)) {
        for act in [Activation::LeakyRelu(0.2), Activation::Tanh] {
            let fused = testing::value_and_grads(
                |t| {
                    op.clone()
                        .apply(&t[0], &t[1], Some(&t[2]), Some(act), None)
                        .unwrap()
                },
                &[x, w, b],
                9,
            );
            let apart = testing::value_and_grads(
                |t| {
                    let y = op
                        .clone()
                        .apply(&t[0], &t[1], Some(&t[2]), None, None)
                        .unwrap();
                    match act {
                        Activation::Tanh => y.tanh().unwrap(),
                        Activation::LeakyRelu(a) => crate::ops::leaky_relu(&y, a as f64).unwrap(),
                    }
                },
                &[x, w, b],
                9,
            );
            testing::assert_close(&fused.0, &apart.0, 1e-6).unwrap();
            for (f, a) in fused.1.iter().zip(&apart.1) {
                testing::assert_close(f, a, 1e-4).unwrap();
            }
        }
    }

    #[test]
    fn fused_activations_give_the_separate_ops_gradients_of_all_inputs() {
        // 19 images (several groups), both kinds, both activations, and a convolution of
        // stride 1 (whose input gradient is gathered through the flipped kernel): the fused
        // backward pass (the derivative folded into the join for a convolution) against the
        // separate ops.
        let mut rng = Rng::new(22);
        let dev = Device::Cpu;
        let x = rng.normal(&[19, 3, 7, 7], &dev).unwrap();
        for (transposed, stride) in [(false, 2), (true, 2), (false, 1)] {
            let (w, cout) = if transposed {
                (rng.normal(&[3, 4, 4, 4], &dev).unwrap(), 4)
            } else {
                (rng.normal(&[4, 3, 4, 4], &dev).unwrap(), 4)
            };
            let b = rng.normal(&[cout], &dev).unwrap();
            let op = if transposed {
                transposed_op(&x, &w, stride, 1, 0).unwrap()
            } else {
                forward_op(&x, &w, stride, 1).unwrap()
            };
            fused_and_separate_activations_agree(&op, (&x, &w, &b));
        }
        // Both kinds through the stride-2 Winograd maps (4×4 kernels, 64 channels a side).
        let x = rng.normal(&[5, 64, 6, 8], &dev).unwrap();
        let w = (rng.normal(&[64, 64, 4, 4], &dev).unwrap() * 0.1).unwrap();
        let b = rng.normal(&[64], &dev).unwrap();
        let small = rng.normal(&[5, 64, 3, 4], &dev).unwrap();
        for (op, x) in [
            (forward_op(&x, &w, 2, 1).unwrap(), &x),
            (transposed_op(&small, &w, 2, 1, 0).unwrap(), &small),
        ] {
            assert!(op.stride2().is_some());
            fused_and_separate_activations_agree(&op, (x, &w, &b));
        }
    }

    /// A 3×3 stride-1 convolution of `n` images `c → c2` channels of `h×w` against candle and
    /// the separate ops, with either kind of bias, fused activations and a fused residual, in
    /// value and all gradients, and by finite differences on `k → k` channels, every
    /// `stride`-th partial derivative.
    fn three_by_three_matches_candle_and_the_separate_ops(
        (n, c, c2, h, w): (usize, usize, usize, usize, usize),
        (k, stride): (usize, usize),
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let dev = Device::Cpu;
        let x = rng.normal(&[n, c, h, w], &dev).unwrap();
        let wt = rng.normal(&[c2, c, 3, 3], &dev).unwrap();
        let op = forward_op(&x, &wt, 1, 1).unwrap();
        for b in [vec![c2], vec![n, c2]] {
            let b = rng.normal(&b, &dev).unwrap();
            check_conv2d((&x, &wt, &b), 1, 1, 17).unwrap();
            fused_and_separate_activations_agree(&op, (&x, &wt, &b));
        }
        let (b, r) = (
            rng.normal(&[c2], &dev).unwrap(),
            rng.normal(&[n, c2, h, w], &dev).unwrap(),
        );
        let fused = testing::value_and_grads(
            |t| conv2d_residual(&t[0], &t[1], Some(&t[2]), &t[3], 1, 1).unwrap(),
            &[&x, &wt, &b, &r],
            3,
        );
        let apart = testing::value_and_grads(
            |t| (conv2d(&t[0], &t[1], Some(&t[2]), 1, 1).unwrap() + &t[3]).unwrap(),
            &[&x, &wt, &b, &r],
            3,
        );
        assert_eq!(testing::max_abs_diff(&fused.0, &apart.0), 0.0);
        for (f, a) in fused.1.iter().zip(&apart.1) {
            testing::assert_close(f, a, 1e-6).unwrap();
        }
        let (x, w, b) = (
            rng.normal(&[2, k, h, w], &dev).unwrap(),
            rng.normal(&[k, k, 3, 3], &dev).unwrap(),
            rng.normal(&[2, k], &dev).unwrap(),
        );
        testing::check_finite_differences(
            |t| conv2d(&t[0], &t[1], Some(&t[2]), 1, 1).unwrap(),
            &[&x, &w, &b],
            8,
            stride,
        );
    }

    #[test]
    fn the_direct_3x3_path_matches_candle_and_the_separate_ops() {
        // 3×3, stride 1, padding 1, channels 6 → 10: the forward pass, the gathered input
        // gradient (10 → 6) and the weight gradient all take the direct kernel (register
        // tiles of 6 + 4 channels, weight tiles of 4 + 4 + 2), over 19 images in groups.
        let x = Tensor::zeros((19, 6, 14, 15), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((10, 6, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let op = forward_op(&x, &w, 1, 1).unwrap();
        let direct = |op: &Conv| op.direct().filter(Direct::weight_grad_pays);
        let gathered = op.input_gradient_conv().unwrap();
        assert_eq!(direct(&op).is_some(), direct(&gathered).is_some());
        assert!(op.winograd().is_none() && gathered.winograd().is_none());
        if direct(&op).is_none() {
            eprintln!("no AVX2 and FMA here: the direct kernel is not used");
        }
        three_by_three_matches_candle_and_the_separate_ops((19, 6, 10, 14, 15), (4, 7), 31);
    }

    #[test]
    fn the_winograd_path_matches_candle_and_the_separate_ops() {
        // Channels 128 → 136 on odd planes (partial tiles): the forward pass, the gathered
        // input gradient (136 → 128) and the weight gradient all take Winograd, over 5 images
        // in groups of 3 and 2 (two groups for two threads).
        let x = Tensor::zeros((5, 128, 9, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((136, 128, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let op = forward_op(&x, &w, 1, 1).unwrap();
        assert!(op.winograd().is_some());
        assert!(op.input_gradient_conv().unwrap().winograd().is_some());
        assert_eq!(op.group(5), 3);
        three_by_three_matches_candle_and_the_separate_ops((5, 128, 136, 9, 7), (128, 1031), 41);
    }

    /// A GroupNorm + SiLU fused into the input of a convolution of `n` images `c → c2`
    /// channels of `h×w` (kernel `k`, `stride`, padding `(k − 1) / 2`) gives the bits of the norm
    /// applied first, and the separate ops' gradients of every input: with a per-image bias
    /// and a fused activation, with a residual, with an input that is no variable (the
    /// norm's weights still get theirs), and on the portable path; and by finite differences
    /// on two images of at most 8 → 4 channels (f32 sums over more channels are too coarse
    /// for them).
    fn a_fused_input_norm_matches_the_separate_ops(
        (n, c, c2, h, w): (usize, usize, usize, usize, usize),
        (k, stride, groups): (usize, usize, usize),
        seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let dev = Device::Cpu;
        let normal = |rng: &mut Rng, dims: &[usize]| rng.normal(dims, &dev).unwrap();
        let x = ((normal(&mut rng, &[n, c, h, w]) * 2.0).unwrap() + 0.5).unwrap();
        let gamma = (normal(&mut rng, &[c]) + 1.0).unwrap();
        let beta = normal(&mut rng, &[c]);
        let wt = normal(&mut rng, &[c2, c, k, k]);
        let pad = (k - 1) / 2;
        let op = forward_op(&x, &wt, stride, pad).unwrap();
        let (oh, ow) = (op.g.oh(), op.g.ow());
        let b = normal(&mut rng, &[n, c2]);
        let r = normal(&mut rng, &[n, c2, oh, ow]);
        let act = Some(Activation::LeakyRelu(0.2));
        // Groups of `c / groups` channels, also on the fewer channels of the last check.
        let per = c / groups;
        let norm = move |t: &[Tensor]| {
            let groups = t[3].elem_count() / per;
            GroupNorm::of(t[3].clone(), t[4].clone(), groups, true)
        };
        // (x, weight, bias, gamma, beta, residual) → output, with the norm fused or applied
        // first; with the per-image bias and the activation, or the residual.
        let conv = |fuse: bool, residual: bool| {
            move |t: &[Tensor]| {
                let norm = norm(t);
                let (x, norm) = match fuse {
                    true => (t[0].clone(), Some(&norm)),
                    false => (norm.forward(&t[0]).unwrap(), None),
                };
                let op = forward_op(&x, &t[1], stride, pad).unwrap();
                if residual {
                    let b = t[2].mean(0).unwrap();
                    op.apply_residual(&x, &t[1], Some(&b), &t[5], norm).unwrap()
                } else {
                    op.apply(&x, &t[1], Some(&t[2]), act, norm).unwrap()
                }
            }
        };
        let shifted = |fuse: bool| conv(fuse, false);
        let residual = |fuse: bool| conv(fuse, true);
        let inputs = [&x, &wt, &b, &gamma, &beta, &r];
        let agree = |fused: (Tensor, Vec<Tensor>), apart: (Tensor, Vec<Tensor>)| {
            // The same normalised input, the same sums: the same bits forward.
            assert_eq!(testing::max_abs_diff(&fused.0, &apart.0), 0.0);
            for (i, (f, a)) in fused.1.iter().zip(&apart.1).enumerate() {
                testing::assert_close(f, a, 1e-5).unwrap_or_else(|e| panic!("input {i}: {e}"));
            }
        };
        agree(
            testing::value_and_grads(shifted(true), &inputs[..5], seed),
            testing::value_and_grads(shifted(false), &inputs[..5], seed),
        );
        agree(
            testing::value_and_grads(residual(true), &inputs, seed),
            testing::value_and_grads(residual(false), &inputs, seed),
        );
        // An input that is no variable: the weights' and the norm's gradients alone.
        let frozen = |fuse: bool| {
            let (x, f) = (x.clone(), shifted(fuse));
            move |t: &[Tensor]| f(&[std::slice::from_ref(&x), t].concat())
        };
        agree(
            testing::value_and_grads(frozen(true), &inputs[1..5], seed),
            testing::value_and_grads(frozen(false), &inputs[1..5], seed),
        );
        let t: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        let portable = crate::ops::portable::forced(|| shifted(true)(&t));
        testing::assert_close(&portable, &shifted(true)(&t), 1e-4).unwrap();
        // A second backward pass over the same graph, which finds the norm's output taken
        // by the first and computes it again: the same bits.
        let vars: Vec<Var> = inputs[..5]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let t: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = residual(true)(&[&t[..], std::slice::from_ref(&r)].concat())
            .sum_all()
            .unwrap();
        let (first, second) = (loss.backward().unwrap(), loss.backward().unwrap());
        for v in &vars {
            let (a, b) = (first.get(v).unwrap(), second.get(v).unwrap());
            assert_eq!(testing::max_abs_diff(a, b), 0.0);
        }
        let cf = c.min(8).max(per);
        let t: Vec<Tensor> = [
            x.narrow(0, 0, 2).unwrap().narrow(1, 0, cf).unwrap(),
            wt.narrow(0, 0, 4).unwrap().narrow(1, 0, cf).unwrap(),
            b.narrow(0, 0, 2).unwrap().narrow(1, 0, 4).unwrap(),
            gamma.narrow(0, 0, cf).unwrap(),
            beta.narrow(0, 0, cf).unwrap(),
            r.narrow(0, 0, 2).unwrap().narrow(1, 0, 4).unwrap(),
        ]
        .into();
        testing::check_finite_differences(residual(true), &t.iter().collect::<Vec<_>>(), 5, 7);
    }

    #[test]
    fn a_norm_fuses_into_every_kind_of_convolution() {
        // The direct 3×3 kernel (6 → 10 channels, 19 images in groups), Winograd (128 → 136,
        // odd planes), gemm on column matrices (stride 2, and a 1×1 kernel), and the stride-2
        // Winograd maps (4×4 kernel, 64 → 66 channels).
        a_fused_input_norm_matches_the_separate_ops((19, 6, 10, 14, 15), (3, 1, 3), 51);
        a_fused_input_norm_matches_the_separate_ops((5, 64, 66, 8, 6), (4, 2, 16), 55);
        a_fused_input_norm_matches_the_separate_ops((5, 128, 136, 9, 7), (3, 1, 32), 52);
        a_fused_input_norm_matches_the_separate_ops((7, 8, 6, 9, 9), (3, 2, 2), 53);
        a_fused_input_norm_matches_the_separate_ops((7, 8, 6, 5, 6), (1, 1, 4), 54);
    }

    #[test]
    fn fused_activations_match_the_separate_ops() {
        let mut rng = Rng::new(21);
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, candle_core::DType::F32, &dev);
        let kinds = [ConvKind::Forward, ConvKind::Transposed { out_pad: 1 }];
        for (i, kind) in kinds.into_iter().enumerate() {
            let layer = ConvLayer::new(kind, 3, 4, 3, 2, 1, true, vb.pp(i)).unwrap();
            let x = rng.normal(&[10, 3, 6, 6], &dev).unwrap();
            for slope in [0.0, 0.2] {
                let fused =
                    testing::value_and_grad(|x| layer.forward_leaky(x, slope).unwrap(), &x, 4);
                let apart = testing::value_and_grad(
                    |x| crate::ops::leaky_relu(&layer.forward(x).unwrap(), slope).unwrap(),
                    &x,
                    4,
                );
                testing::assert_close(&fused.0, &apart.0, 1e-6).unwrap();
                testing::assert_close(&fused.1, &apart.1, 1e-6).unwrap();
            }
            assert!(layer.forward_leaky(&x, -0.1).is_err());
            let fused = testing::value_and_grad(
                |x| layer.forward_with(x, Activation::Tanh).unwrap(),
                &x,
                5,
            );
            let apart =
                testing::value_and_grad(|x| layer.forward(x).unwrap().tanh().unwrap(), &x, 5);
            testing::assert_close(&fused.0, &apart.0, 1e-6).unwrap();
            testing::assert_close(&fused.1, &apart.1, 1e-5).unwrap();
        }
    }

    #[test]
    fn finite_differences_agree_with_the_gradient() {
        let mut rng = Rng::new(3);
        let x = rng.normal(&[2, 2, 5, 5], &Device::Cpu).unwrap();
        let wt = rng.normal(&[2, 3, 3, 3], &Device::Cpu).unwrap();
        let b = rng.normal(&[3], &Device::Cpu).unwrap();
        testing::check_finite_differences(
            |t| conv_transpose2d(&t[0], &t[1], Some(&t[2]), 2, 1, 1).unwrap(),
            &[&x, &wt, &b],
            7,
            5,
        );
        // Both kinds through the stride-2 Winograd maps (4×4 kernels, 64 channels a side).
        let wide = rng.normal(&[1, 64, 4, 6], &Device::Cpu).unwrap();
        let w4 = (rng.normal(&[64, 64, 4, 4], &Device::Cpu).unwrap() * 0.2).unwrap();
        let b64 = rng.normal(&[64], &Device::Cpu).unwrap();
        testing::check_finite_differences(
            |t| conv2d(&t[0], &t[1], Some(&t[2]), 2, 1).unwrap(),
            &[&wide, &w4, &b64],
            9,
            97,
        );
        let small = rng.normal(&[1, 64, 2, 3], &Device::Cpu).unwrap();
        testing::check_finite_differences(
            |t| conv_transpose2d(&t[0], &t[1], Some(&t[2]), 2, 1, 0).unwrap(),
            &[&small, &w4, &b64],
            10,
            97,
        );
        let w2 = rng.normal(&[3, 2, 3, 3], &Device::Cpu).unwrap();
        let per_image = rng.normal(&[2, 3], &Device::Cpu).unwrap();
        for b in [&b, &per_image] {
            testing::check_finite_differences(
                |t| conv2d(&t[0], &t[1], Some(&t[2]), 2, 1).unwrap(),
                &[&x, &w2, b],
                8,
                5,
            );
        }
    }
}
