//! Values that a custom op's forward pass keeps for its backward pass. candle hands a custom
//! op's backward pass only the op's inputs and output; whatever else it needs it must
//! compute again, unless the forward pass left it in the op object that candle keeps in the
//! graph. The buffers come from a per-thread pool (a graph's forward and backward passes
//! run on the thread that builds it) and go back to it once read, so that training steps
//! reuse their pages instead of zero-filling fresh ones.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

/// The most buffers a thread's pool keeps; more are freed.
const POOL_SIZE: usize = 64;

thread_local! {
    /// Buffers read by a backward pass (or dropped unread with their graph), for the next
    /// forward pass to fill.
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer kept from a forward pass for the backward pass that may follow, shared by the
/// op's copies (the one candle keeps in the graph among them).
#[derive(Debug, Clone, Default)]
pub(crate) struct Saved(Arc<Slot>);

#[derive(Debug, Default)]
struct Slot(Mutex<Option<Vec<f32>>>);

impl Saved {
    /// A buffer of `len` values with stale contents, for the forward pass to overwrite and
    /// [`Saved::keep`]: the smallest pooled one that holds them, else a new one.
    pub(crate) fn buffer(len: usize) -> Vec<f32> {
        let mut buf = POOL.with_borrow_mut(|pool| {
            let fits = (0..pool.len())
                .filter(|&i| pool[i].capacity() >= len)
                .min_by_key(|&i| pool[i].capacity());
            fits.map_or_else(Vec::new, |i| pool.swap_remove(i))
        });
        buf.resize(len, 0.0);
        buf
    }

    /// Keeps `values` for the backward pass.
    pub(crate) fn keep(&self, values: Vec<f32>) {
        *self.0 .0.lock().expect("saved lock") = Some(values);
    }

    /// The kept values, taken: a second backward pass over the same graph finds none (and
    /// computes them again).
    pub(crate) fn take(&self) -> Option<Vec<f32>> {
        self.0 .0.lock().expect("saved lock").take()
    }

    /// Hands a buffer that has been read back to this thread's pool (or frees it, when the
    /// pool is full or the thread is ending).
    pub(crate) fn recycle(values: Vec<f32>) {
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL_SIZE {
                pool.push(values);
            }
        });
    }
}

impl Drop for Slot {
    /// A graph dropped without its backward pass hands its buffer back too.
    fn drop(&mut self) {
        if let Some(values) = self.0.get_mut().ok().and_then(Option::take) {
            Saved::recycle(values);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_values_are_taken_once_and_their_buffers_reused() {
        let saved = Saved::default();
        let mut buf = Saved::buffer(5);
        buf.copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        saved.clone().keep(buf);
        let taken = saved.take().expect("kept");
        assert_eq!(taken, [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(saved.take().is_none());
        // A read buffer, recycled, serves a smaller request without a new allocation (the
        // pool is this test thread's own).
        let at = taken.as_ptr();
        Saved::recycle(taken);
        let again = Saved::buffer(3);
        assert_eq!((again.as_ptr(), &again[..]), (at, &[1.0, 2.0, 3.0][..]));
        // Dropping an op that kept values unread hands them back.
        let dropped = Saved::default();
        dropped.keep(vec![7.0; 4]);
        drop(dropped);
        assert!(POOL.with_borrow(|pool| pool.iter().any(|b| b[..] == [7.0; 4])));
    }
}
