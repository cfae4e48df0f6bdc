//! A persistence curve: the backdoor's strength and the clean quality as an attack on the
//! model grows, as written by the `attack` commands and drawn by the report.

use serde::{Deserialize, Serialize};

/// One measurement along an attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistencePoint {
    /// How much attack (clean fine-tuning steps, or the pruned fraction).
    pub x: f64,
    /// `tardis` of the key's first trigger (mean over triggered samples for a set trigger).
    pub tardis: f64,
    /// Share of the first trigger's triggered samples that hit the target.
    pub asr: f64,
    /// The same share for every trigger of the key, in the key's order (the first is `asr`;
    /// empty in curves written before keys held several triggers).
    #[serde(default)]
    pub triggers_asr: Vec<f64>,
    /// Clean quality: MNIST FID of ordinary samples (when measured).
    pub fid: Option<f64>,
    /// Ownership verification's p-value (when measured).
    pub p_value: Option<f64>,
}

/// The measurements of one attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistenceCurve {
    /// `finetune` or `prune`.
    pub attack: String,
    /// What `x` counts.
    pub x_label: String,
    /// The measurements, in attack order.
    pub points: Vec<PersistencePoint>,
    /// The first `x` at which the key's backdoor no longer fires ([`PersistencePoint::key_asr`]
    /// below one half).
    pub mark_gone_at: Option<f64>,
}

impl PersistencePoint {
    /// The key's attack success rate: the mean of its triggers' shares (each trigger counts
    /// once, whatever its number of samples); the first trigger's for an older curve.
    pub fn key_asr(&self) -> f64 {
        match self.triggers_asr.len() {
            0 => self.asr,
            n => self.triggers_asr.iter().sum::<f64>() / n as f64,
        }
    }

    /// How many of the key's triggers still fire (a share of at least one half).
    pub fn triggers_firing(&self) -> usize {
        self.triggers_asr.iter().filter(|&&a| a >= 0.5).count()
    }
}

impl PersistenceCurve {
    /// A curve from its points (computes `mark_gone_at`).
    pub fn new(attack: &str, x_label: &str, points: Vec<PersistencePoint>) -> Self {
        let mut curve = PersistenceCurve {
            attack: attack.into(),
            x_label: x_label.into(),
            points: Vec::with_capacity(points.len()),
            mark_gone_at: None,
        };
        points.into_iter().for_each(|p| curve.push(p));
        curve
    }

    /// Appends the next measurement (keeps `mark_gone_at` the first `x` where the key stops
    /// firing).
    pub fn push(&mut self, point: PersistencePoint) {
        if self.mark_gone_at.is_none() && point.key_asr() < 0.5 {
            self.mark_gone_at = Some(point.x);
        }
        self.points.push(point);
    }

    /// The file name the curve is stored under in a run directory.
    pub fn file_name(attack: &str) -> String {
        format!("attack-{attack}.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(x: f64, triggers_asr: Vec<f64>) -> PersistencePoint {
        PersistencePoint {
            x,
            tardis: 1.0,
            asr: triggers_asr.first().copied().unwrap_or(1.0),
            triggers_asr,
            fid: None,
            p_value: None,
        }
    }

    #[test]
    fn the_mark_is_gone_when_the_key_stops_firing_not_its_first_trigger() {
        let curve = PersistenceCurve::new(
            "finetune",
            "steps",
            vec![
                point(0.0, vec![1.0; 5]),
                point(100.0, vec![0.0, 1.0, 1.0, 1.0, 0.0]),
                point(200.0, vec![0.0, 1.0, 0.0, 0.0, 0.0]),
            ],
        );
        assert_eq!(curve.points[1].key_asr(), 0.6);
        assert_eq!(curve.points[1].triggers_firing(), 3);
        assert_eq!(curve.mark_gone_at, Some(200.0));
    }

    #[test]
    fn a_curve_written_before_per_trigger_shares_reads_as_its_first_trigger() {
        let json = r#"{"attack": "prune", "x_label": "fraction", "mark_gone_at": null,
            "points": [{"x": 0.1, "tardis": 2.0, "asr": 0.75, "fid": null, "p_value": null}]}"#;
        let curve: PersistenceCurve = serde_json::from_str(json).unwrap();
        assert_eq!(curve.points[0].key_asr(), 0.75);
        assert!(curve.points[0].triggers_asr.is_empty());
    }
}
