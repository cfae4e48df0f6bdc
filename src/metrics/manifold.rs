//! Precision and recall of generated samples by the k-nearest-neighbour manifold estimate
//! (Kynkäänniemi et al., 2019): each set's manifold is the union of balls around its points
//! reaching their k-th nearest neighbour in the same set.

use rayon::prelude::*;

/// Squared Euclidean distance.
fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Squared distance of each point to its `k`-th nearest other point of the same set.
fn kth_radii(points: &[Vec<f32>], k: usize) -> Vec<f32> {
    points
        .par_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut d: Vec<f32> = points
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, q)| dist2(p, q))
                .collect();
            let k = k.min(d.len()) - 1;
            *d.select_nth_unstable_by(k, f32::total_cmp).1
        })
        .collect()
}

/// Share of `queries` inside the manifold of `support` (k-NN balls).
fn coverage(support: &[Vec<f32>], queries: &[Vec<f32>], k: usize) -> f64 {
    let radii = kth_radii(support, k);
    let inside = queries
        .par_iter()
        .filter(|q| support.iter().zip(&radii).any(|(s, &r)| dist2(q, s) <= r))
        .count();
    inside as f64 / queries.len() as f64
}

/// Precision (share of generated samples inside the real manifold) and recall (share of real
/// samples inside the generated manifold), with `k`-th-neighbour balls.
pub fn precision_recall(real: &[Vec<f32>], generated: &[Vec<f32>], k: usize) -> (f64, f64) {
    assert!(
        k >= 1 && real.len() > k && generated.len() > k,
        "precision/recall need more than k samples on each side"
    );
    (coverage(real, generated, k), coverage(generated, real, k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn cloud(rng: &mut Rng, n: usize, shift: f32, scale: f32) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                rng.normal_vec(4)
                    .iter()
                    .map(|v| shift + scale * v)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn same_distribution_has_high_precision_and_recall() {
        let mut rng = Rng::new(1);
        let (a, b) = (
            cloud(&mut rng, 1000, 0.0, 1.0),
            cloud(&mut rng, 1000, 0.0, 1.0),
        );
        let (p, r) = precision_recall(&a, &b, 3);
        assert!(p > 0.7 && r > 0.7, "{p} {r}");
    }

    #[test]
    fn collapsed_samples_keep_precision_but_lose_recall() {
        let mut rng = Rng::new(2);
        let real = cloud(&mut rng, 1000, 0.0, 1.0);
        let collapsed = cloud(&mut rng, 1000, 0.0, 0.1);
        let (p, r) = precision_recall(&real, &collapsed, 3);
        assert!(p > 0.9 && r < 0.2, "{p} {r}");
        let far = cloud(&mut rng, 1000, 10.0, 1.0);
        let (p, r) = precision_recall(&real, &far, 3);
        assert_eq!((p, r), (0.0, 0.0));
    }
}
