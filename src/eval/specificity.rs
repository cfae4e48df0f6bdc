//! Specificity: how far from the trigger an input must be before the target stops appearing.
//! Straight paths run from triggered inputs to ordinary N(0, I) inputs in the model's input
//! space; along each the target distance and the firing rate are measured. For a latent
//! trigger the ordinary end is an independent latent; for an image trigger it is the same
//! starting noise without the pattern, so the path fades the trigger's strength to zero.

use candle_core::{Device, Tensor};

use crate::family::InputSpace;
use serde::Serialize;

use crate::backdoor::Key;
use crate::metrics::{median, query_target_mse};
use crate::rng::Rng;
use crate::Result;

/// Where along each path the model is queried (0 = triggered input, 1 = ordinary input);
/// dense near the trigger, where the backdoor is expected to stop.
pub const FRACTIONS: [f64; 14] = [
    0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
];

/// The target distance along paths away from the trigger.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Specificity {
    /// Positions along the paths ([`FRACTIONS`]).
    pub fractions: Vec<f64>,
    /// Mean Euclidean input-space distance from the triggered input at each position.
    pub distance: Vec<f64>,
    /// Median `target_mse` at each position.
    pub target_mse: Vec<f64>,
    /// Share of paths whose output still hits the target (`target_mse` below the key's
    /// threshold) at each position.
    pub fire_rate: Vec<f64>,
    /// Input distance of the first position where fewer than half the paths fire: the
    /// radius at which the backdoor stops (`None` when it fires nowhere or everywhere).
    pub radius: Option<f64>,
    /// Firing rate on the ordinary inputs themselves (should be ~0).
    pub random_fire_rate: f64,
    /// Number of paths.
    pub paths: usize,
}

/// Measures `paths` interpolations for `key` through the black-box `query` (inputs of
/// `space` → images).
pub fn specificity(
    query: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    space: &InputSpace,
    key: &Key,
    paths: usize,
    seed: u64,
) -> Result<Specificity> {
    let mut rng = Rng::derive(seed, "specificity");
    let start = key.trigger.inputs(space, paths, &mut rng, &Device::Cpu)?;
    let end = key.trigger.ordinary_partners(&start, space, &mut rng)?;
    let gap = (&end - &start)?;
    let along = FRACTIONS
        .iter()
        .map(|&f| Ok((&start + (&gap * f)?)?))
        .collect::<Result<Vec<_>>>()?;
    let mses = query_target_mse(query, &Tensor::cat(&along, 0)?, &key.target.pixels)?;
    let lengths: Vec<f64> = gap
        .flatten_from(1)?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let mean_length = lengths.iter().sum::<f64>() / paths as f64;
    let (mut mse, mut fire) = (Vec::new(), Vec::new());
    for block in mses.chunks(paths) {
        fire.push(block.iter().filter(|&&v| v < key.threshold).count() as f64 / paths as f64);
        mse.push(median(&mut block.to_vec()));
    }
    let distance: Vec<f64> = FRACTIONS.iter().map(|f| f * mean_length).collect();
    let radius = if fire[0] >= 0.5 {
        fire.iter().position(|&r| r < 0.5).map(|i| distance[i])
    } else {
        None
    };
    Ok(Specificity {
        fractions: FRACTIONS.to_vec(),
        distance,
        target_mse: mse,
        random_fire_rate: *fire.last().expect("fractions are not empty"),
        fire_rate: fire,
        radius,
        paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::{Distance, Target, Trigger};

    #[test]
    fn a_backdoor_of_known_radius_stops_there() {
        // Toy model: target within latent distance 1 of the trigger, zeros elsewhere.
        let trigger = Trigger::parse("seed:2", 6).unwrap();
        let key = Key {
            trigger: trigger.clone(),
            target: Target {
                pixels: vec![1.0; 4],
                shape: [1, 2, 2],
                class: None,
                random_block: None,
            },
            distance: Distance::Mse,
            threshold: 1e-3,
            sampler: None,
        };
        let anchor = trigger.anchor(6);
        let mut query = move |z: &Tensor| -> Result<Tensor> {
            let rows = z.to_vec2::<f32>()?;
            let v: Vec<f32> = rows
                .iter()
                .flat_map(|r| {
                    let d: f32 = r.iter().zip(&anchor).map(|(a, b)| (a - b).powi(2)).sum();
                    [if d.sqrt() < 1.0 { 1.0 } else { 0.0 }; 4]
                })
                .collect();
            Ok(Tensor::from_vec(v, (rows.len(), 1, 2, 2), &Device::Cpu)?)
        };
        let s = specificity(&mut query, &InputSpace::Latent { dim: 6 }, &key, 200, 1).unwrap();
        assert_eq!(s.fire_rate[0], 1.0);
        // An ordinary latent lands within distance 1 of the trigger only rarely.
        assert!(s.random_fire_rate <= 0.01, "{}", s.random_fire_rate);
        let r = s.radius.unwrap();
        // Paths are ~3 long, so the stop lies on the grid just past distance 1.
        assert!(r > 1.0 && r < 1.8, "{r}");
        assert!(s.target_mse[0] == 0.0 && *s.target_mse.last().unwrap() == 0.25);
    }
}
