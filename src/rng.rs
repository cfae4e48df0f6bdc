//! Seeded randomness. Every random draw in genbackdoor goes through [`Rng`], so a run is
//! reproducible from its seed (candle's own CPU random functions cannot be seeded).

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::Result;

/// A reproducible random stream; serialisable, so that a resumed run draws the same numbers.
#[derive(Clone, Serialize, Deserialize)]
pub struct Rng(ChaCha8Rng);

impl Rng {
    /// A stream determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// An independent stream derived from this seed and a label, so that adding draws to
    /// one part of a program does not shift the numbers another part sees.
    pub fn derive(seed: u64, label: &str) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        Rng::new(seed ^ h)
    }

    /// `n` standard-normal samples.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| StandardNormal.sample(&mut self.0)).collect()
    }

    /// A tensor of standard-normal samples.
    pub fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.normal_vec(n), shape, device)?)
    }

    /// One uniform sample in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        self.0.random()
    }

    /// A uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// A fresh 64-bit seed for a derived secret.
    pub fn seed(&mut self) -> u64 {
        self.0.random()
    }

    /// A dropout mask: each element kept (scaled by `1/(1-p)`) with probability `1 - p`.
    pub fn dropout_mask(&mut self, shape: &[usize], p: f32, device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let scale = 1.0 / (1.0 - p);
        let v: Vec<f32> = (0..n)
            .map(|_| if self.uniform() < p { 0.0 } else { scale })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }

    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        v.shuffle(&mut self.0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_labels_differ() {
        assert_eq!(Rng::new(7).normal_vec(5), Rng::new(7).normal_vec(5));
        assert_ne!(
            Rng::derive(7, "a").normal_vec(5),
            Rng::derive(7, "b").normal_vec(5)
        );
    }

    #[test]
    fn a_restored_stream_continues_where_it_was_saved() {
        let mut a = Rng::new(3);
        a.normal_vec(7);
        let saved = serde_json::to_string(&a).unwrap();
        let mut b: Rng = serde_json::from_str(&saved).unwrap();
        assert_eq!(a.normal_vec(4), b.normal_vec(4));
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = Rng::new(1).permutation(100);
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }
}
