//! Access to the f32 data of CPU tensors for the custom kernels.

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
