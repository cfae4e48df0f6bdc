//! Access to the f32 data of CPU tensors for the custom kernels.

use std::sync::Mutex;

use candle_core::{CpuStorage, Layout, Shape, Storage, Tensor};

/// The contiguous f32 data behind a storage and layout, or an error naming `op`.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: expects contiguous f32 tensors"),
    }
}

/// Runs `f` on the (made contiguous) f32 data of a CPU tensor.
pub(crate) fn with_f32<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> R,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => Ok(f(f32_slice(s, layout, op)?)),
        _ => candle_core::bail!("{op}: this kernel runs on the CPU only"),
    }
}

/// A new vector of `total` values built in consecutive pieces of `len` values (the last may
/// be shorter): `f(piece index, piece)` runs for all pieces in parallel on candle's CPU worker
/// pool, each piece zero-filled by the thread that then writes it (so the zeroing is spread
/// over the threads and leaves the piece in that thread's cache). The pool is the one
/// candle's own kernels use, so that our kernels and candle's never compete for the cores
/// (rayon's pool beside candle's would put four busy threads on two cores). Returns the
/// vector and the results in piece order, so that summing them gives the same bits whatever
/// the number of threads.
pub(crate) fn parallel_pieces<T: Send>(
    total: usize,
    len: usize,
    f: impl Fn(usize, &mut [f32]) -> T + Sync,
) -> (Vec<f32>, Vec<T>) {
    assert!(len > 0);
    let mut out: Vec<f32> = Vec::with_capacity(total);
    let base = SharedPtr(out.as_mut_ptr());
    let results = parallel_map(total.div_ceil(len), |i| {
        let (start, end) = (i * len, total.min((i + 1) * len));
        // SAFETY: `parallel_map` runs each index once, so the slices built here never overlap;
        // each lies inside `out`'s allocation of `total` values, which outlives the call, and
        // is zero-filled before the slice is made, so that every value it shows is initialised.
        let piece = unsafe {
            std::ptr::write_bytes(base.at(start), 0, end - start);
            std::slice::from_raw_parts_mut(base.at(start), end - start)
        };
        f(i, piece)
    });
    // SAFETY: the pieces cover `0..total` and each was zero-filled above (a panic in `f`
    // would have propagated before this point, leaving the vector empty).
    unsafe { out.set_len(total) };
    (out, results)
}

/// Items split up front (disjoint mutable pieces such as `chunks_mut`), handed out by index
/// to the tasks of a parallel call, each at most once.
pub(crate) struct Handout<I>(Vec<Mutex<Option<I>>>);

impl<I> Handout<I> {
    /// The items, item `i` for task `i`.
    pub(crate) fn new(items: impl IntoIterator<Item = I>) -> Self {
        Handout(items.into_iter().map(|i| Mutex::new(Some(i))).collect())
    }

    /// Item `i`, taken; `None` where there is none (or it was taken before).
    pub(crate) fn take(&self, i: usize) -> Option<I> {
        self.0.get(i)?.lock().expect("handout lock").take()
    }
}

/// Runs `f(item)` for every item in parallel on candle's CPU worker pool (for work on
/// disjoint mutable pieces that were split up front, such as `chunks_mut`).
pub(crate) fn parallel_for_each<I: Send>(items: Vec<I>, f: impl Fn(I) + Sync) {
    let n = items.len();
    let items = Handout::new(items);
    parallel_map(n, |i| f(items.take(i).expect("every index runs once")));
}

/// The threads a parallel call of this module runs on: candle's worker pool (made once) and
/// the calling thread. candle's own `get_num_threads` parses `/proc/cpuinfo` at every call
/// (unless `RAYON_NUM_THREADS` is set, as the command-line tool does), which cost a library
/// caller such as the test suites a tenth of a small model's training step.
pub(crate) fn threads() -> usize {
    candle_core::utils::barrier_pool().n_workers() + 1
}

/// Runs `f(i)` for `i` in `0..n` in parallel on candle's CPU worker pool and returns the
/// results in index order.
pub(crate) fn parallel_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..n).map(|_| Mutex::new(None)).collect();
    candle_core::utils::barrier_pool().execute_chunked(n, |indices| {
        for i in indices {
            let v = f(i);
            *slots[i].lock().expect("slot lock") = Some(v);
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().expect("slot lock").expect("every index ran"))
        .collect()
}

/// Runs `f` compiled with AVX2 and FMA allowed where this CPU has them ([`avx2_fma`]), so
/// that the loops of the kernels inlined into it use 8-lane vectors; elsewhere as compiled
/// for the baseline. The instructions change, the arithmetic
/// does not: Rust never fuses a multiply and an add on its own, and vectorised loops keep
/// their order of summation, so both versions give the same bits.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// `f` under the AVX2 and FMA target features.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if avx2_fma() {
            // SAFETY: the CPU has both features (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Whether this CPU has AVX2 and FMA: what [`wide`] and the direct 3×3 kernel need (the
/// standard library caches the answer).
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AVX-512F: the direct 3×3 kernel's 16-lane version (the standard
/// library caches the answer).
pub(crate) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The start of the buffer [`parallel_pieces`] splits, shared by the workers.
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);

// SAFETY: only used to build disjoint slices, see `parallel_pieces`.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// The pointer `offset` values further (a method, so closures capture the whole wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation (see `parallel_pieces`).
        unsafe { self.0.add(offset) }
    }
}

/// `(n, c, s)`: samples, channels and spatial positions of a contiguous `[n, c, …]` shape.
pub(crate) fn ncs(shape: &Shape) -> (usize, usize, usize) {
    let d = shape.dims();
    (d[0], d[1], d[2..].iter().product())
}

/// `Σ f(a[j], b[j])` over two equally long slices, accumulated in 16 independent f32 partial
/// sums so that the loop vectorises (a single running sum is one long dependency chain that
/// the compiler may not reorder). Pass the same slice twice for a one-operand sum.
#[inline]
pub(crate) fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            lanes[l] += f(x[l], y[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Runs `f(channels)` over consecutive blocks of `0..c` in parallel and concatenates the
/// per-channel results in channel order.
pub(crate) fn per_channel_block<T: Send>(
    c: usize,
    f: impl Fn(std::ops::Range<usize>) -> Vec<T> + Sync,
) -> Vec<T> {
    let block = c.div_ceil(4 * threads()).max(1);
    parallel_map(c.div_ceil(block), |b| f(b * block..c.min((b + 1) * block)))
        .into_iter()
        .flatten()
        .collect()
}

/// `f(a[j], b[j])` for every `j` of two equally long slices, in parallel pieces.
pub(crate) fn elementwise(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    /// Values per parallel piece: large enough to pay for handing a piece to a thread.
    const PIECE: usize = 1 << 15;
    assert_eq!(a.len(), b.len());
    let (out, _) = parallel_pieces(a.len(), PIECE, |i, piece| {
        let r = i * PIECE..i * PIECE + piece.len();
        for ((o, &x), &y) in piece.iter_mut().zip(&a[r.clone()]).zip(&b[r]) {
            *o = f(x, y);
        }
    });
    out
}

/// A matrix operand of [`matmul`]: its values and its (row, column) strides.
pub(crate) type Strided<'a> = (&'a [f32], (usize, usize));

/// `dst [m × n] = (accumulate ? dst : 0) + lhs [m × k] · rhs [k × n]`, every matrix read or
/// written through its (row, column) strides. Panics if a stride reaches outside a slice,
/// which keeps the unchecked gemm call sound.
pub(crate) fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, (dst_rs, dst_cs)): (&mut [f32], (usize, usize)),
    (lhs, (lhs_rs, lhs_cs)): Strided,
    (rhs, (rhs_rs, rhs_cs)): Strided,
    accumulate: bool,
) {
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(m * n == 0 || last(m, n, dst_rs, dst_cs) < dst.len());
    assert!(m * k == 0 || last(m, k, lhs_rs, lhs_cs) < lhs.len());
    assert!(k * n == 0 || last(k, n, rhs_rs, rhs_cs) < rhs.len());
    // SAFETY: the assertions above keep every index gemm computes inside the slices (whose
    // borrows also keep `dst` apart from the operands).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A custom op of three tensors written against their contiguous f32 data; [`F32Op`] plugs it
/// into candle as a `CustomOp3`.
pub(crate) trait F32Op3 {
    /// The op's name in candle's graph and error messages.
    const NAME: &'static str;

    /// The output values and shape, from each input's data and layout, with the activation
    /// `act` applied to every output value (ops fuse it into their last sweep, or call
    /// [`activate`] on each piece they write).
    fn forward(
        &self,
        inputs: [(&[f32], &Layout); 3],
        act: Option<Activation>,
    ) -> candle_core::Result<(Vec<f32>, Shape)>;

    /// The gradients of the three inputs (`None`: no gradient) for the output gradient `dy`;
    /// see `CustomOp3::bwd`.
    fn backward(
        &self,
        inputs: [&Tensor; 3],
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>;

    /// [`F32Op3::backward`] of the op followed by `act = (activation, output)`: `dy` is the
    /// gradient of the activation's output. By default the activation's derivative makes the
    /// op's output gradient in a sweep of its own; ops that can fold it into a sweep they make
    /// anyway override this.
    fn backward_through(
        &self,
        inputs: [&Tensor; 3],
        dy: &Tensor,
        act: Option<(Activation, &Tensor)>,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        match act {
            Some((act, out)) => self.backward(inputs, &activation_grad(act, out, dy)?),
            None => self.backward(inputs, dy),
        }
    }
}

/// The gradient of an activation's input from its output `out` and output gradient `dy`
/// (see [`Activation::grad`]), in parallel pieces.
pub(crate) fn activation_grad(
    act: Activation,
    out: &Tensor,
    dy: &Tensor,
) -> candle_core::Result<Tensor> {
    const PIECE: usize = 1 << 15;
    let dz = with_f32(out, "activation", |y| {
        with_f32(dy, "activation", |g| {
            let (dz, _) = parallel_pieces(y.len(), PIECE, |i, piece| {
                let r = i * PIECE..i * PIECE + piece.len();
                act.grad_into(&y[r.clone()], &g[r], piece);
            });
            dz
        })
    })??;
    Tensor::from_vec(dz, dy.shape(), dy.device())
}

/// An activation fused into the graph node of an [`F32Op`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `max(x, 0) + slope · min(x, 0)`; the slope must be at least 0 (0 is a ReLU).
    LeakyRelu(f32),
    /// `tanh(x)`.
    Tanh,
}

impl Activation {
    /// The activation of `x`.
    pub(crate) fn apply(self, x: f32) -> f32 {
        match self {
            Activation::LeakyRelu(a) => {
                if x > 0.0 {
                    x
                } else {
                    a * x
                }
            }
            Activation::Tanh => x.tanh(),
        }
    }

    /// The gradient through the activation for the output gradient `g` at the output `y`
    /// (with a slope of at least 0 a LeakyReLU's output is positive exactly where its input is,
    /// so its input serves as well).
    pub(crate) fn grad(self, y: f32, g: f32) -> f32 {
        match self {
            Activation::LeakyRelu(a) => {
                if y > 0.0 {
                    g
                } else {
                    a * g
                }
            }
            Activation::Tanh => g * (1.0 - y * y),
        }
    }

    /// `dz[j] = grad(y[j], g[j])` over equally long slices, the activation picked once outside
    /// the loop so that it vectorises.
    pub(crate) fn grad_into(self, y: &[f32], g: &[f32], dz: &mut [f32]) {
        fn each(dz: &mut [f32], y: &[f32], g: &[f32], f: impl Fn(f32, f32) -> f32) {
            for ((d, &y), &g) in dz.iter_mut().zip(y).zip(g) {
                *d = f(y, g);
            }
        }
        // The variant is known in each arm, so `grad`'s match folds away.
        match self {
            Activation::LeakyRelu(a) => each(dz, y, g, |y, g| Activation::LeakyRelu(a).grad(y, g)),
            Activation::Tanh => each(dz, y, g, |y, g| Activation::Tanh.grad(y, g)),
        }
    }
}

/// The candle `CustomOp3` of an [`F32Op3`], optionally followed by an [`Activation`] in the
/// same graph node: one output buffer and one gradient fewer than a separate activation op
/// (candle's backward pass allocates, zeroes and adds every node's gradient).
pub(crate) struct F32Op<T> {
    op: T,
    act: Option<Activation>,
}

impl<T> F32Op<T> {
    /// The op alone.
    pub(crate) fn new(op: T) -> Self {
        F32Op { op, act: None }
    }

    /// The op followed by an activation, if any.
    pub(crate) fn with_activation(op: T, act: Option<Activation>) -> Self {
        F32Op { op, act }
    }
}

/// Applies `act` (if any) to every value in place; ops call it on each piece they have just
/// written, inside their parallel region (a nested parallel call from the pool's main thread
/// would wait on the pool it is running in).
#[inline(always)]
pub(crate) fn activate(act: Option<Activation>, values: &mut [f32]) {
    if let Some(act) = act {
        values.iter_mut().for_each(|v| *v = act.apply(*v));
    }
}

impl<T: F32Op3 + Send + Sync> candle_core::CustomOp3 for F32Op<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let inputs = [
            (f32_slice(s1, l1, T::NAME)?, l1),
            (f32_slice(s2, l2, T::NAME)?, l2),
            (f32_slice(s3, l3, T::NAME)?, l3),
        ];
        if let Some(Activation::LeakyRelu(a)) = self.act {
            if a.is_nan() || a < 0.0 {
                candle_core::bail!("{}: LeakyReLU slope {a} is not at least 0", T::NAME);
            }
        }
        let (values, shape) = self.op.forward(inputs, self.act)?;
        Ok((CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        out: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.op
            .backward_through([a, b, c], dy, self.act.map(|act| (act, out)))
    }
}
