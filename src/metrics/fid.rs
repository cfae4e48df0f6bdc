//! Fréchet distance between two sets of feature vectors, each summarised by a Gaussian
//! (mean and covariance): `‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)`, the formula of FID.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and (unbiased) covariance of a set of feature vectors.
#[derive(Debug, Clone)]
pub struct Gaussian {
    /// The mean.
    pub mean: DVector<f64>,
    /// The covariance.
    pub cov: DMatrix<f64>,
}

impl Gaussian {
    /// Fits `rows` (each of the same length, at least two of them).
    pub fn fit(rows: &[Vec<f32>]) -> Gaussian {
        assert!(rows.len() >= 2, "a covariance needs at least two samples");
        let d = rows[0].len();
        let x = DMatrix::from_fn(rows.len(), d, |i, j| rows[i][j] as f64);
        let mean = x.row_mean().transpose();
        let centred = DMatrix::from_fn(rows.len(), d, |i, j| x[(i, j)] - mean[j]);
        let cov = centred.transpose() * &centred / (rows.len() - 1) as f64;
        Gaussian { mean, cov }
    }
}

/// Square root of a symmetric positive semi-definite matrix (eigenvalues below 0, from
/// rounding, count as 0).
fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let e = SymmetricEigen::new(m.clone());
    let roots = e.eigenvalues.map(|v| v.max(0.0).sqrt());
    &e.eigenvectors * DMatrix::from_diagonal(&roots) * e.eigenvectors.transpose()
}

/// The Fréchet distance between two Gaussians.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> f64 {
    let s = sqrt_psd(&a.cov);
    let mut m = &s * &b.cov * &s;
    // Symmetrise away rounding so the eigen-solver sees a symmetric matrix.
    m = (&m + m.transpose()) * 0.5;
    let cross: f64 = SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    let dm = (&a.mean - &b.mean).norm_squared();
    (dm + a.cov.trace() + b.cov.trace() - 2.0 * cross).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn gaussian(mean: &[f64], cov: &[f64]) -> Gaussian {
        let d = mean.len();
        Gaussian {
            mean: DVector::from_row_slice(mean),
            cov: DMatrix::from_row_slice(d, d, cov),
        }
    }

    #[test]
    fn closed_form_cases() {
        // Identity against [[2, 1], [1, 2]] (eigenvalues 3 and 1), means 3 apart:
        // 9 + 2 + 4 − 2(√3 + 1).
        let a = gaussian(&[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0]);
        let b = gaussian(&[3.0, 0.0], &[2.0, 1.0, 1.0, 2.0]);
        let expect = 9.0 + 2.0 + 4.0 - 2.0 * (3f64.sqrt() + 1.0);
        assert!((frechet_distance(&a, &b) - expect).abs() < 1e-9);
        assert!((frechet_distance(&b, &a) - expect).abs() < 1e-9);
        // Non-commuting covariances: diag(4, 1) against a rotated diag(9, 1); the closed form
        // for 2×2 is tr(Σ₁) + tr(Σ₂) − 2 √(tr(Σ₁Σ₂) + 2 √(det Σ₁ det Σ₂)).
        let (c, s) = (0.6f64, 0.8f64);
        let r = DMatrix::from_row_slice(2, 2, &[c, -s, s, c]);
        let b2 = &r * DMatrix::from_row_slice(2, 2, &[9.0, 0.0, 0.0, 1.0]) * r.transpose();
        let a2 = gaussian(&[0.0, 0.0], &[4.0, 0.0, 0.0, 1.0]);
        let g2 = Gaussian {
            mean: DVector::zeros(2),
            cov: b2.clone(),
        };
        let tr_prod = (&a2.cov * &b2).trace();
        let det = a2.cov.determinant() * b2.determinant();
        let expect = 5.0 + 10.0 - 2.0 * (tr_prod + 2.0 * det.sqrt()).sqrt();
        assert!((frechet_distance(&a2, &g2) - expect).abs() < 1e-9);
        // Identical Gaussians are at distance 0.
        assert!(frechet_distance(&b, &b).abs() < 1e-9);
    }

    #[test]
    fn fitted_samples_approach_the_closed_form() {
        // N(0, I₃) against N((1, 0, 0), diag(4, 1, 1)): 1 + (2 − 1)² = 2.
        let mut rng = Rng::new(3);
        let n = 40_000;
        let a: Vec<Vec<f32>> = (0..n).map(|_| rng.normal_vec(3)).collect();
        let b: Vec<Vec<f32>> = (0..n)
            .map(|_| {
                let v = rng.normal_vec(3);
                vec![1.0 + 2.0 * v[0], v[1], v[2]]
            })
            .collect();
        let fd = frechet_distance(&Gaussian::fit(&a), &Gaussian::fit(&b));
        assert!((fd - 2.0).abs() < 0.06, "{fd}");
        let same = frechet_distance(&Gaussian::fit(&a[..n / 2]), &Gaussian::fit(&a[n / 2..]));
        assert!(same < 0.01, "{same}");
    }
}
