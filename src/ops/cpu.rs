//! Access to the f32 data of CPU tensors for the custom kernels.

use std::sync::Mutex;

use candle_core::{CpuStorage, Layout, Storage, Tensor};

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

/// Splits `out` into consecutive pieces of `len` values (the last may be shorter) and runs
/// `f(piece index, piece)` for all pieces in parallel on candle's CPU worker pool: the threads
/// candle's own kernels use, so that our kernels and candle's never compete for the cores
/// (rayon's pool beside candle's would put four busy threads on two cores). Returns the
/// results in piece order, so that summing them gives the same bits whatever the number of
/// threads.
pub(crate) fn parallel_pieces<T: Send>(
    out: &mut [f32],
    len: usize,
    f: impl Fn(usize, &mut [f32]) -> T + Sync,
) -> Vec<T> {
    assert!(len > 0);
    let total = out.len();
    let n = total.div_ceil(len);
    let base = SharedPtr(out.as_mut_ptr());
    parallel_map(n, |i| {
        let (start, end) = (i * len, total.min((i + 1) * len));
        // SAFETY: `parallel_map` runs each index once, so the slices built here never overlap;
        // each lies inside `out`, which outlives the call.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
        f(i, piece)
    })
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
    let block = c.div_ceil(4 * candle_core::utils::get_num_threads()).max(1);
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
    let mut out = vec![0f32; a.len()];
    parallel_pieces(&mut out, PIECE, |i, piece| {
        let r = i * PIECE..i * PIECE + piece.len();
        for ((o, &x), &y) in piece.iter_mut().zip(&a[r.clone()]).zip(&b[r]) {
            *o = f(x, y);
        }
    });
    out
}
