//! Structural similarity (Wang et al. 2004): 11×11 Gaussian window (σ = 1.5), valid positions,
//! images mapped to [0, 1], K1 = 0.01, K2 = 0.03, colour images channel by channel and
//! averaged — `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False, data_range=1, channel_axis=0)`, which `tests/ssim.rs` checks
//! against a fixture that scikit-image made.

const WIN: usize = 11;
const SIGMA: f64 = 1.5;

fn gaussian() -> [f64; WIN] {
    let mut g = [0.0; WIN];
    let c = (WIN / 2) as f64;
    for (i, v) in g.iter_mut().enumerate() {
        *v = (-((i as f64 - c).powi(2)) / (2.0 * SIGMA * SIGMA)).exp();
    }
    let s: f64 = g.iter().sum();
    g.map(|v| v / s)
}

/// Separable Gaussian filter over the valid positions of an `h × w` plane.
fn filter(x: &[f64], h: usize, w: usize, win: usize, g: &[f64]) -> Vec<f64> {
    let (oh, ow) = (h + 1 - win, w + 1 - win);
    let mut rows = vec![0.0; h * ow];
    for y in 0..h {
        for x0 in 0..ow {
            rows[y * ow + x0] = (0..win).map(|k| g[k] * x[y * w + x0 + k]).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y0 in 0..oh {
        for x0 in 0..ow {
            out[y0 * ow + x0] = (0..win).map(|k| g[k] * rows[(y0 + k) * ow + x0]).sum();
        }
    }
    out
}

/// Mean SSIM between two images in [-1, 1], `width` pixels wide: square channels of
/// `width × width` (their mean SSIM), or else one plane of `width`-pixel rows. Images smaller
/// than the window use a window of their own size with uniform weights.
pub fn ssim(a: &[f32], b: &[f32], width: usize) -> f64 {
    assert_eq!(a.len(), b.len(), "ssim: image sizes differ");
    let plane = width * width;
    if a.len() > plane && a.len().is_multiple_of(plane) {
        let planes = a.chunks(plane).zip(b.chunks(plane));
        return planes.map(|(p, q)| ssim(p, q, width)).sum::<f64>() / (a.len() / plane) as f64;
    }
    let (w, h) = (width, a.len() / width);
    let to01 = |v: &[f32]| {
        v.iter()
            .map(|&p| (p as f64 + 1.0) / 2.0)
            .collect::<Vec<_>>()
    };
    let (x, y) = (to01(a), to01(b));
    let (win, g) = if h >= WIN && w >= WIN {
        (WIN, gaussian().to_vec())
    } else {
        let k = h.min(w);
        (k, vec![1.0 / k as f64; k])
    };
    let prod = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(a, b)| a * b).collect::<Vec<_>>();
    let mx = filter(&x, h, w, win, &g);
    let my = filter(&y, h, w, win, &g);
    let sxx = filter(&prod(&x, &x), h, w, win, &g);
    let syy = filter(&prod(&y, &y), h, w, win, &g);
    let sxy = filter(&prod(&x, &y), h, w, win, &g);
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let n = mx.len();
    (0..n)
        .map(|i| {
            let (vx, vy) = (sxx[i] - mx[i] * mx[i], syy[i] - my[i] * my[i]);
            let cov = sxy[i] - mx[i] * my[i];
            ((2.0 * mx[i] * my[i] + c1) * (2.0 * cov + c2))
                / ((mx[i] * mx[i] + my[i] * my[i] + c1) * (vx + vy + c2))
        })
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_images_score_one() {
        let img: Vec<f32> = (0..784)
            .map(|i| ((i * 37 % 97) as f32 / 48.5) - 1.0)
            .collect();
        assert!((ssim(&img, &img, 28) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn constant_images_follow_the_luminance_formula() {
        // Two flat images: the contrast-structure term is c2/c2 = 1, leaving (2ab+c1)/(a²+b²+c1).
        let (a, b) = (0.25f64, 0.75f64);
        let x = vec![(2.0 * a - 1.0) as f32; 784];
        let y = vec![(2.0 * b - 1.0) as f32; 784];
        let c1 = 1e-4;
        let expected = (2.0 * a * b + c1) / (a * a + b * b + c1);
        assert!((ssim(&x, &y, 28) - expected).abs() < 1e-9);
    }

    #[test]
    fn noise_lowers_similarity_monotonically() {
        let img: Vec<f32> = (0..784)
            .map(|i| if (i / 28 + i % 28) % 7 < 3 { 1.0 } else { -1.0 })
            .collect();
        let noisy = |s: f32| -> Vec<f32> {
            img.iter()
                .enumerate()
                .map(|(i, &p)| (p + s * (((i * 7919) % 13) as f32 / 6.0 - 1.0)).clamp(-1.0, 1.0))
                .collect()
        };
        let (s1, s2) = (ssim(&img, &noisy(0.2), 28), ssim(&img, &noisy(0.8), 28));
        assert!(1.0 > s1 && s1 > s2, "{s1} {s2}");
    }
}
