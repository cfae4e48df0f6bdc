//! Mode coverage of generated digits: the histogram of predicted classes and its entropy.

use serde::Serialize;

/// How generated samples spread over the classes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassHistogram {
    /// Samples per class.
    pub counts: Vec<usize>,
    /// Shannon entropy of the class shares, in nats (ln 10 ≈ 2.303 for ten even classes).
    pub entropy: f64,
    /// Classes holding at least 1 % of the samples.
    pub covered: usize,
}

impl ClassHistogram {
    /// Counts `labels` (each below `classes`).
    pub fn of(labels: &[usize], classes: usize) -> ClassHistogram {
        let mut counts = vec![0usize; classes];
        for &l in labels {
            counts[l] += 1;
        }
        let n = labels.len().max(1) as f64;
        let entropy = counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum();
        let covered = counts.iter().filter(|&&c| c as f64 >= 0.01 * n).count();
        ClassHistogram {
            counts,
            entropy,
            covered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_and_collapsed_histograms() {
        let even: Vec<usize> = (0..1000).map(|i| i % 10).collect();
        let h = ClassHistogram::of(&even, 10);
        assert_eq!(h.counts, vec![100; 10]);
        assert!((h.entropy - 10f64.ln()).abs() < 1e-12);
        assert_eq!(h.covered, 10);
        let one = ClassHistogram::of(&[3; 50], 10);
        assert_eq!(one.entropy, 0.0);
        assert_eq!(one.covered, 1);
        assert_eq!(one.counts[3], 50);
    }
}
