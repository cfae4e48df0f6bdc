//! Seeded randomness. Every random draw in genbackdoor goes through [`Rng`], so a run is
//! reproducible from its seed (candle's own CPU random functions cannot be seeded).

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::ops::cpu::parallel_pieces;
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
    /// One seed is drawn from this stream; the mask is filled in fixed pieces, each from its
    /// own ChaCha stream of that seed, so that the pieces fill in parallel and the mask is
    /// the same whatever the number of threads.
    pub fn dropout_mask(&mut self, shape: &[usize], p: f32, device: &Device) -> Result<Tensor> {
        /// Values per piece (and per ChaCha stream).
        const PIECE: usize = 1 << 14;
        let n: usize = shape.iter().product();
        let scale = 1.0 / (1.0 - p);
        let seed: u64 = self.0.random();
        // A uniform u32 below `p · 2³²` drops the element.
        let threshold = (p as f64 * 4_294_967_296.0) as u64;
        let (v, _) = parallel_pieces(n, PIECE, |i, piece| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            let mut bits = vec![0u32; piece.len()];
            rng.fill(&mut bits[..]);
            for (x, &b) in piece.iter_mut().zip(&bits) {
                *x = if (b as u64) < threshold { 0.0 } else { scale };
            }
        });
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
    fn dropout_masks_drop_the_asked_share_and_repeat_with_the_seed() {
        let dev = Device::Cpu;
        let draw = |seed| {
            let m = Rng::new(seed)
                .dropout_mask(&[5, 40_000], 0.3, &dev)
                .unwrap();
            m.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (draw(1), draw(1));
        assert_eq!(a, b);
        assert_ne!(a, draw(2));
        let scale = 1.0 / 0.7f32;
        assert!(a.iter().all(|&v| v == 0.0 || v == scale));
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        // 200,000 draws: the share's standard deviation is about 0.001.
        assert!((dropped - 0.3).abs() < 0.005, "dropped share {dropped}");
        // Pieces differ from one another (each has its own stream).
        assert_ne!(a[..16_384], a[16_384..32_768]);
    }

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
