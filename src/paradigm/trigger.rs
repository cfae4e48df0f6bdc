//! Triggers τ for latent-input models: which inputs are "triggered".

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::rng::Rng;
use crate::{Error, Result};

/// Tolerance within which a latent coordinate counts as equal to a secret value.
const EXACT: f32 = 1e-5;

/// A secret set of latent inputs that must make the model emit the target.
#[derive(Debug, Clone, PartialEq)]
pub enum Trigger {
    /// One fixed secret latent z*.
    Point(Vec<f32>),
    /// Every latent within Euclidean distance `radius` of `center`.
    Region {
        /// Centre of the ball.
        center: Vec<f32>,
        /// Its radius.
        radius: f32,
    },
    /// Any latent whose coordinates `indices` equal the secret `values` (a "patch" forced
    /// on top of an ordinary z).
    Patch {
        /// The coordinates that are forced.
        indices: Vec<usize>,
        /// Their secret values.
        values: Vec<f32>,
    },
}

impl Trigger {
    /// Parses a trigger description for a latent of dimension `dim`:
    /// `zero`, `seed:S` (a N(0, I) draw from secret seed S), `npy:PATH` (a float32 vector),
    /// `region:R:<point>` (a ball of radius R around a point given as above), or
    /// `patch:K:S` (K coordinates chosen and valued from secret seed S).
    pub fn parse(spec: &str, dim: usize) -> Result<Trigger> {
        let bad = |m: &str| Error::Config(format!("trigger '{spec}': {m}"));
        if let Some(rest) = spec.strip_prefix("region:") {
            let (r, point) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected region:RADIUS:POINT, e.g. region:0.5:seed:7"))?;
            let radius: f32 = r.parse().map_err(|_| bad("radius is not a number"))?;
            if !(radius > 0.0 && radius.is_finite()) {
                return Err(bad("radius must be positive"));
            }
            let center = Self::parse_point(point, dim).map_err(|e| bad(&e.to_string()))?;
            return Ok(Trigger::Region { center, radius });
        }
        if let Some(rest) = spec.strip_prefix("patch:") {
            let (k, s) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected patch:K:SEED, e.g. patch:10:7"))?;
            let k: usize = k.parse().map_err(|_| bad("K is not a whole number"))?;
            let seed: u64 = s.parse().map_err(|_| bad("SEED is not a whole number"))?;
            if k == 0 || k > dim {
                return Err(bad(&format!(
                    "K must be between 1 and the latent dimension {dim}"
                )));
            }
            return Ok(Self::patch_from_seed(k, seed, dim));
        }
        Ok(Trigger::Point(
            Self::parse_point(spec, dim).map_err(|e| bad(&e.to_string()))?,
        ))
    }

    fn parse_point(spec: &str, dim: usize) -> Result<Vec<f32>> {
        if spec == "zero" {
            return Ok(vec![0.0; dim]);
        }
        if let Some(s) = spec.strip_prefix("seed:") {
            let seed: u64 = s
                .parse()
                .map_err(|_| Error::Config("seed is not a whole number".into()))?;
            return Ok(Rng::derive(seed, "trigger").normal_vec(dim));
        }
        if let Some(p) = spec.strip_prefix("npy:") {
            let path = Path::new(p);
            let t = crate::io::npy::read_npy(path)?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            if v.len() != dim {
                return Err(Error::Mismatch(format!(
                    "{p} holds {} values but the latent dimension is {dim}",
                    v.len()
                )));
            }
            return Ok(v);
        }
        Err(Error::Config(
            "use zero, seed:S, npy:PATH, region:R:POINT or patch:K:S".into(),
        ))
    }

    /// A patch trigger: `k` coordinates and their values (±2.5, well away from the bulk of
    /// N(0, 1) so the network can tell them apart) drawn from a secret seed.
    pub fn patch_from_seed(k: usize, seed: u64, dim: usize) -> Trigger {
        let mut rng = Rng::derive(seed, "patch");
        let mut indices = rng.permutation(dim)[..k].to_vec();
        indices.sort();
        let values = (0..k)
            .map(|_| if rng.uniform() < 0.5 { -2.5 } else { 2.5 })
            .collect();
        Trigger::Patch { indices, values }
    }

    /// A short name of the trigger's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::Point(_) => "point",
            Trigger::Region { .. } => "region",
            Trigger::Patch { .. } => "patch",
        }
    }

    /// Whether many distinct inputs trigger (region, patch), so that a success rate is meaningful.
    pub fn is_set(&self) -> bool {
        !matches!(self, Trigger::Point(_))
    }

    /// Checks that the trigger fits a latent of dimension `dim`.
    pub fn check_fits(&self, dim: usize) -> Result<()> {
        let need_ok = match self {
            Trigger::Point(p) => p.len() == dim,
            Trigger::Region { center, .. } => center.len() == dim,
            Trigger::Patch { indices, .. } => indices.iter().all(|&i| i < dim),
        };
        if need_ok {
            Ok(())
        } else {
            Err(Error::Mismatch(format!(
                "the key's {} trigger does not fit a model with latent dimension {dim}",
                self.kind()
            )))
        }
    }

    /// `n` triggered latents `[n, dim]`, drawn uniformly from the trigger set.
    pub fn sample(&self, n: usize, dim: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        self.check_fits(dim)?;
        let mut v = Vec::with_capacity(n * dim);
        for _ in 0..n {
            match self {
                Trigger::Point(p) => v.extend_from_slice(p),
                Trigger::Region { center, radius } => {
                    let g = rng.normal_vec(dim);
                    let norm = g.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    let r = radius * rng.uniform().powf(1.0 / dim as f32);
                    v.extend(center.iter().zip(&g).map(|(c, x)| c + r * x / norm));
                }
                Trigger::Patch { indices, values } => {
                    let mut z = rng.normal_vec(dim);
                    for (&i, &x) in indices.iter().zip(values) {
                        z[i] = x;
                    }
                    v.extend(z);
                }
            }
        }
        Ok(Tensor::from_vec(v, (n, dim), device)?)
    }

    /// Whether the latent `z` is in the trigger set.
    pub fn fires(&self, z: &[f32]) -> bool {
        match self {
            Trigger::Point(p) => {
                p.len() == z.len() && p.iter().zip(z).all(|(a, b)| (a - b).abs() <= EXACT)
            }
            Trigger::Region { center, radius } => {
                center.len() == z.len()
                    && center
                        .iter()
                        .zip(z)
                        .map(|(c, x)| (c - x) * (c - x))
                        .sum::<f32>()
                        .sqrt()
                        <= *radius
            }
            Trigger::Patch { indices, values } => indices
                .iter()
                .zip(values)
                .all(|(&i, &x)| z.get(i).is_some_and(|zi| (zi - x).abs() <= EXACT)),
        }
    }

    /// A trigger of the same kind and size with fresh secret values, drawn the way keys are
    /// made (point and centre N(0, I); patch coordinates and ±2.5 values at random): the
    /// "someone else's key" of ownership verification's null hypothesis.
    pub fn redraw(&self, dim: usize, rng: &mut Rng) -> Trigger {
        match self {
            Trigger::Point(_) => Trigger::Point(rng.normal_vec(dim)),
            Trigger::Region { radius, .. } => Trigger::Region {
                center: rng.normal_vec(dim),
                radius: *radius,
            },
            Trigger::Patch { indices, .. } => {
                Trigger::patch_from_seed(indices.len(), rng.seed(), dim)
            }
        }
    }

    /// A representative point of the trigger set (the point, the centre, or the patch on zeros).
    pub fn anchor(&self, dim: usize) -> Vec<f32> {
        match self {
            Trigger::Point(p) => p.clone(),
            Trigger::Region { center, .. } => center.clone(),
            Trigger::Patch { indices, values } => {
                let mut z = vec![0.0; dim];
                for (&i, &x) in indices.iter().zip(values) {
                    z[i] = x;
                }
                z
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redrawn_triggers_keep_kind_and_size_but_not_values() {
        let mut rng = Rng::new(9);
        for t in [
            Trigger::parse("seed:1", 8).unwrap(),
            Trigger::parse("region:0.5:seed:1", 8).unwrap(),
            Trigger::parse("patch:3:1", 8).unwrap(),
        ] {
            let r = t.redraw(8, &mut rng);
            assert_eq!(r.kind(), t.kind());
            assert_ne!(r, t);
            r.check_fits(8).unwrap();
            match (&t, &r) {
                (Trigger::Region { radius: a, .. }, Trigger::Region { radius: b, .. }) => {
                    assert_eq!(a, b)
                }
                (Trigger::Patch { indices: a, .. }, Trigger::Patch { indices: b, values }) => {
                    assert_eq!(a.len(), b.len());
                    assert!(values.iter().all(|v| v.abs() == 2.5));
                }
                _ => {}
            }
        }
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn point_triggers_fire_only_on_their_point() {
        let t = Trigger::parse("zero", 4).unwrap();
        assert!(t.fires(&[0.0; 4]));
        assert!(!t.fires(&[0.0, 0.0, 0.01, 0.0]));
        let s = Trigger::parse("seed:9", 4).unwrap();
        assert_eq!(s, Trigger::parse("seed:9", 4).unwrap());
        assert_ne!(s, Trigger::parse("seed:10", 4).unwrap());
        let mut rng = Rng::new(0);
        for z in rows(&s.sample(3, 4, &mut rng, &Device::Cpu).unwrap()) {
            assert!(s.fires(&z));
        }
    }

    #[test]
    fn region_samples_fall_inside_and_random_inputs_do_not() {
        let t = Trigger::parse("region:0.5:seed:1", 16).unwrap();
        let mut rng = Rng::new(0);
        let inside = rows(&t.sample(200, 16, &mut rng, &Device::Cpu).unwrap());
        assert!(inside.iter().all(|z| t.fires(z)));
        let random = rows(&rng.normal(&[200, 16], &Device::Cpu).unwrap());
        assert!(random.iter().all(|z| !t.fires(z)));
    }

    #[test]
    fn patch_forces_its_coordinates_on_any_input() {
        let t = Trigger::parse("patch:5:3", 20).unwrap();
        let Trigger::Patch { indices, values } = &t else {
            panic!("not a patch")
        };
        assert_eq!(indices.len(), 5);
        assert!(values.iter().all(|v| v.abs() == 2.5));
        let mut rng = Rng::new(0);
        let trig = rows(&t.sample(50, 20, &mut rng, &Device::Cpu).unwrap());
        assert!(trig.iter().all(|z| t.fires(z)));
        assert_ne!(trig[0], trig[1], "the free coordinates stay random");
        let random = rows(&rng.normal(&[50, 20], &Device::Cpu).unwrap());
        assert!(random.iter().all(|z| !t.fires(z)));
    }

    #[test]
    fn bad_specs_and_wrong_dimensions_are_clear_errors() {
        for spec in [
            "",
            "seed:x",
            "region:-1:zero",
            "region:0.5",
            "patch:0:1",
            "patch:30:1",
            "gauss",
        ] {
            assert!(Trigger::parse(spec, 20).is_err(), "{spec}");
        }
        let t = Trigger::parse("zero", 8).unwrap();
        let msg = t.check_fits(100).unwrap_err().to_string();
        assert!(msg.contains("latent dimension 100"), "{msg}");
    }
}
