//! Noise schedules: β_t for t = 1 … T and the products ᾱ_t = Π_{s ≤ t} (1 − β_s).

use crate::config::ScheduleKind;
use crate::Result;

/// A noise schedule of `T` steps; index `t` runs from 1 to T.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f64>,
    alpha_bars: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds `steps` steps of `kind`.
    pub fn new(kind: ScheduleKind, steps: usize) -> Result<Self> {
        kind.validate(steps)?;
        let betas: Vec<f64> = match kind {
            ScheduleKind::Linear {
                beta_start,
                beta_end,
            } => (0..steps)
                .map(|i| beta_start + (beta_end - beta_start) * i as f64 / (steps - 1) as f64)
                .collect(),
            ScheduleKind::ScaledLinear {
                beta_start,
                beta_end,
            } => {
                let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
                (0..steps)
                    .map(|i| (a + (b - a) * i as f64 / (steps - 1) as f64).powi(2))
                    .collect()
            }
            ScheduleKind::Cosine { offset } => {
                let f = |t: f64| {
                    ((t / steps as f64 + offset) / (1.0 + offset) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (1..=steps)
                    .map(|t| (1.0 - f(t as f64) / f(t as f64 - 1.0)).clamp(0.0, 0.999))
                    .collect()
            }
        };
        let mut alpha_bars = Vec::with_capacity(steps);
        let mut prod = 1.0;
        for b in &betas {
            prod *= 1.0 - b;
            alpha_bars.push(prod);
        }
        Ok(NoiseSchedule { betas, alpha_bars })
    }

    /// T, the number of steps.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// β_t (1 ≤ t ≤ T).
    pub fn beta(&self, t: usize) -> f64 {
        self.betas[t - 1]
    }

    /// α_t = 1 − β_t.
    pub fn alpha(&self, t: usize) -> f64 {
        1.0 - self.beta(t)
    }

    /// ᾱ_t; ᾱ_0 = 1 (no noise).
    pub fn alpha_bar(&self, t: usize) -> f64 {
        if t == 0 {
            1.0
        } else {
            self.alpha_bars[t - 1]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_and_cosine_schedules() {
        let s = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
        assert_eq!(s.steps(), 1000);
        assert!((s.beta(1) - 1e-4).abs() < 1e-15 && (s.beta(1000) - 0.02).abs() < 1e-15);
        // ᾱ_T of the DDPM schedule is about 4e-5: x_T is nearly pure noise.
        assert!(s.alpha_bar(1000) < 1e-4 && s.alpha_bar(1000) > 1e-5);
        let c = NoiseSchedule::new(ScheduleKind::Cosine { offset: 0.008 }, 1000).unwrap();
        for t in 1..=1000 {
            assert!(c.alpha_bar(t) < c.alpha_bar(t - 1));
            assert!(s.alpha_bar(t) < s.alpha_bar(t - 1));
        }
        assert!(
            c.alpha_bar(500) > s.alpha_bar(500),
            "cosine keeps more signal mid-way"
        );
        assert!(NoiseSchedule::new(ScheduleKind::default(), 1).is_err());
        let bad = ScheduleKind::Linear {
            beta_start: 0.1,
            beta_end: 0.01,
        };
        assert!(NoiseSchedule::new(bad, 10).is_err());
    }
}
