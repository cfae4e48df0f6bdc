//! A persistence curve: the backdoor's strength and the clean quality as an attack on the
//! model grows, as written by the `attack` commands and drawn by the report.

use serde::{Deserialize, Serialize};

/// One measurement along an attack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistencePoint {
    /// How much attack (clean fine-tuning steps, or the pruned fraction).
    pub x: f64,
    /// `tardis` at the trigger's anchor (mean over triggered samples for set triggers).
    pub tardis: f64,
    /// Share of triggered samples that hit the target.
    pub asr: f64,
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
    /// The first `x` at which the backdoor no longer fires (`asr` below one half).
    pub mark_gone_at: Option<f64>,
}

impl PersistenceCurve {
    /// A curve from its points (computes `mark_gone_at`).
    pub fn new(attack: &str, x_label: &str, points: Vec<PersistencePoint>) -> Self {
        let mark_gone_at = points.iter().find(|p| p.asr < 0.5).map(|p| p.x);
        PersistenceCurve {
            attack: attack.into(),
            x_label: x_label.into(),
            points,
            mark_gone_at,
        }
    }

    /// The file name the curve is stored under in a run directory.
    pub fn file_name(attack: &str) -> String {
        format!("attack-{attack}.json")
    }
}
