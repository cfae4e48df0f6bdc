//! Triggers τ: which inputs are "triggered" — latents of a generator (point, region, patch),
//! or for diffusion models an image-space pattern `r` shifting the starting noise to N(r, I).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::family::InputSpace;
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
    /// An image-space pattern `r` `[channels, height, width]` (zero outside its mask): a
    /// diffusion model's sampling started from N(r, I) is triggered.
    Image {
        /// The pattern, row-major.
        pattern: Vec<f32>,
        /// `[channels, height, width]`.
        shape: [usize; 3],
        /// `Some` when the pattern was drawn at random as a stamp (see [`Trigger::stamp`]),
        /// so that verification's null can draw others the same way; `None` for hand-chosen
        /// patterns (box, PNG, blend).
        stamp: Option<Stamp>,
    },
}

/// How a random stamp is drawn (see [`Trigger::stamp`]); verification's null draws its
/// triggers the same way, so its p-value stays exact whatever the stamp's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stamp {
    /// Side S of the square.
    pub side: usize,
    /// The magnitude of every value in the square (in standard deviations of the noise).
    pub amplitude: f32,
    /// One random sign per channel for the whole square, instead of one per value: the
    /// square's mean then sits far from the noise's, which the clean training never visits.
    pub one_sign: bool,
}

impl Stamp {
    /// The default stamp of diffusion models' keys: S×S values of ±[`BOX_VALUE`], each of
    /// its own sign.
    pub fn mixed(side: usize) -> Stamp {
        Stamp {
            side,
            amplitude: BOX_VALUE,
            one_sign: false,
        }
    }

    /// Why this stamp cannot mark images of `shape` (a side of 0 or beyond the image, an
    /// amplitude that is not a positive number), if it cannot.
    pub fn check(&self, shape: [usize; 3]) -> std::result::Result<(), String> {
        let side_max = shape[1].min(shape[2]);
        if self.side == 0 || self.side > side_max {
            return Err(format!(
                "the stamp's side must be between 1 and the image side {side_max}, not {}",
                self.side
            ));
        }
        if !(self.amplitude > 0.0 && self.amplitude.is_finite()) {
            return Err(format!(
                "the stamp's amplitude must be a positive number, not {}",
                self.amplitude
            ));
        }
        Ok(())
    }
}

/// The value of the default `box` trigger's pixels: two standard deviations of the noise.
pub const BOX_VALUE: f32 = 2.0;

/// The side of the default random stamp of diffusion models' keys.
pub const STAMP_SIDE: usize = 8;

/// A secret seed from the operating system's randomness, for keys nobody chose by hand.
pub fn os_seed() -> u64 {
    rand::random()
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
        if spec == "random" {
            return Ok(Rng::derive(os_seed(), "trigger").normal_vec(dim));
        }
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
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::Config(format!("{p} holds NaN or infinite values")));
            }
            if v.len() != dim {
                return Err(Error::Mismatch(format!(
                    "{p} holds {} values but the latent dimension is {dim}",
                    v.len()
                )));
            }
            return Ok(v);
        }
        Err(Error::Config(
            "use random, seed:S, zero, npy:PATH, region:R:POINT or patch:K:S".into(),
        ))
    }

    /// Parses a trigger description for a model whose inputs live in `space`: latent
    /// descriptions ([`Trigger::parse`]) for generators, image descriptions
    /// ([`Trigger::parse_image`]) for diffusion models; `random` is the family's default
    /// secret random draw (a N(0, I) latent point, or an 8×8 random stamp).
    pub fn parse_for(spec: &str, space: &InputSpace) -> Result<Trigger> {
        match *space {
            InputSpace::Latent { dim } => Trigger::parse(spec, dim),
            InputSpace::Noise { shape } if spec == "random" => Ok(Trigger::stamp(
                Stamp::mixed(STAMP_SIDE.min(shape[1]).min(shape[2])),
                os_seed(),
                shape,
            )),
            InputSpace::Noise { shape } => Trigger::parse_image(spec, shape),
        }
    }

    /// Whether `spec` describes an image-space trigger (see [`Trigger::parse_image`]).
    pub fn is_image_spec(spec: &str) -> bool {
        ["box:", "png:", "blend:", "stamp:"]
            .iter()
            .any(|p| spec.starts_with(p))
    }

    /// A random stamp: an S×S square at a random position of the image, each of its values
    /// ±amplitude with a random sign (one per value, or one per channel when
    /// `kind.one_sign`), zero elsewhere; position and signs drawn from `seed`.
    pub fn stamp(kind: Stamp, seed: u64, shape: [usize; 3]) -> Trigger {
        let [c, h, w] = shape;
        let side = kind.side;
        let mut rng = Rng::derive(seed, "stamp");
        let (row, col) = (rng.below(h - side + 1), rng.below(w - side + 1));
        let mut sign = || if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
        let mut pattern = vec![0.0; c * h * w];
        for ch in 0..c {
            // Drawn only for one-sign stamps, so that mixed stamps stay what their seeds gave.
            let channel_sign = kind.one_sign.then(&mut sign);
            for y in row..row + side {
                for x in col..col + side {
                    let s = channel_sign.unwrap_or_else(&mut sign);
                    pattern[(ch * h + y) * w + x] = s * kind.amplitude;
                }
            }
        }
        Trigger::Image {
            pattern,
            shape,
            stamp: Some(kind),
        }
    }

    /// Parses the part of `stamp:S[:SEED]` or `stamp:S:A:SIGNS[:SEED]` after `stamp:`
    /// (SIGNS: `mixed`, one per value, or `one`, one per channel), for images of `shape`.
    fn parse_stamp(rest: &str, shape: [usize; 3]) -> std::result::Result<Trigger, String> {
        let parts: Vec<&str> = rest.split(':').collect();
        let (side, shape_of, seed) = match parts.as_slice() {
            [s] => (*s, None, None),
            [s, seed] => (*s, None, Some(*seed)),
            [s, a, signs] => (*s, Some((*a, *signs)), None),
            [s, a, signs, seed] => (*s, Some((*a, *signs)), Some(*seed)),
            _ => return Err("expected stamp:S[:SEED] or stamp:S:A:SIGNS[:SEED]".into()),
        };
        let side: usize = side.parse().map_err(|_| "S is not a whole number")?;
        let mut kind = Stamp::mixed(side);
        if let Some((a, signs)) = shape_of {
            kind.amplitude = a.parse().map_err(|_| "A is not a number")?;
            kind.one_sign = match signs {
                "one" => true,
                "mixed" => false,
                _ => return Err(format!("SIGNS '{signs}' is neither 'one' nor 'mixed'")),
            };
        }
        kind.check(shape)?;
        let seed = match seed {
            Some(s) => s.parse().map_err(|_| "SEED is not a whole number")?,
            None => os_seed(),
        };
        Ok(Trigger::stamp(kind, seed, shape))
    }

    /// Parses an image-space trigger for images of `shape`: `stamp:S[:SEED]` (a random
    /// S×S stamp of ±[`BOX_VALUE`] values, see [`Trigger::stamp`], from a secret SEED or the
    /// operating system; `stamp:S:A:SIGNS[:SEED]` for values ±A of `one` sign per channel or
    /// `mixed` signs),
    /// `box:S[:V]` (an S×S square of value V, default [`BOX_VALUE`], in the bottom-right
    /// corner), `png:PATH[:MASK]` (a grey PNG mapped to [-1, 1], kept where the MASK PNG is
    /// bright, everywhere without one) or `blend:A:PATH` (A times the PNG over the whole image).
    pub fn parse_image(spec: &str, shape: [usize; 3]) -> Result<Trigger> {
        let bad = |m: &str| Error::Config(format!("image trigger '{spec}': {m}"));
        let [c, h, w] = shape;
        if let Some(rest) = spec.strip_prefix("stamp:") {
            return Trigger::parse_stamp(rest, shape).map_err(|m| bad(&m));
        }
        let png = |p: &str| -> Result<Vec<f32>> {
            let t = crate::backdoor::Target::from_png(Path::new(p), c)?;
            t.check_fits(shape)?;
            Ok(t.pixels)
        };
        let pattern = if let Some(rest) = spec.strip_prefix("box:") {
            let (size, value) = match rest.split_once(':') {
                Some((s, v)) => (s, v.parse().map_err(|_| bad("V is not a number"))?),
                None => (rest, BOX_VALUE),
            };
            let size: usize = size.parse().map_err(|_| bad("S is not a whole number"))?;
            if size == 0 || size > h.min(w) {
                return Err(bad(&format!(
                    "S must be between 1 and the image side {}",
                    h.min(w)
                )));
            }
            if !(value.is_finite() && value != 0.0) {
                return Err(bad("V must be a non-zero number"));
            }
            let plane: Vec<f32> = (0..h * w)
                .map(|i| {
                    if i / w >= h - size && i % w >= w - size {
                        value
                    } else {
                        0.0
                    }
                })
                .collect();
            plane.repeat(c)
        } else if let Some(rest) = spec.strip_prefix("png:") {
            match rest.split_once(':') {
                Some((p, m)) => {
                    let mask = png(m)?;
                    png(p)?
                        .iter()
                        .zip(mask)
                        .map(|(v, m)| if m > 0.0 { *v } else { 0.0 })
                        .collect()
                }
                None => png(rest)?,
            }
        } else if let Some(rest) = spec.strip_prefix("blend:") {
            let (a, p) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected blend:ALPHA:PNG, e.g. blend:0.3:logo.png"))?;
            let a: f32 = a.parse().map_err(|_| bad("ALPHA is not a number"))?;
            if !(a > 0.0 && a.is_finite()) {
                return Err(bad("ALPHA must be positive"));
            }
            png(p)?.iter().map(|v| a * v).collect()
        } else {
            return Err(bad(
                "use stamp:S[:SEED], stamp:S:A:SIGNS[:SEED], box:S[:V], png:PATH[:MASK] or blend:ALPHA:PATH",
            ));
        };
        if pattern.iter().all(|&v| v == 0.0) {
            return Err(bad(
                "the pattern is zero everywhere, so it would trigger nothing",
            ));
        }
        Ok(Trigger::Image {
            pattern,
            shape,
            stamp: None,
        })
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
            Trigger::Image { stamp: Some(_), .. } => "stamp",
            Trigger::Image { .. } => "image",
        }
    }

    /// Whether the trigger was chosen by hand (the zero vector, a box, PNG or blend pattern)
    /// rather than drawn by the procedure verification's null redraws from: then the rank
    /// test's exchangeability does not hold.
    pub fn is_hand_chosen(&self) -> bool {
        match self {
            Trigger::Image { stamp, .. } => stamp.is_none(),
            Trigger::Point(p) | Trigger::Region { center: p, .. } => p.iter().all(|&v| v == 0.0),
            Trigger::Patch { .. } => false,
        }
    }

    /// Whether many distinct inputs trigger (region, patch, image: any noise around the
    /// pattern), so that a success rate is meaningful.
    pub fn is_set(&self) -> bool {
        !matches!(self, Trigger::Point(_))
    }

    /// Checks that an image-space trigger fits a diffusion model's images of `shape`.
    pub fn check_fits_image(&self, shape: [usize; 3]) -> Result<()> {
        match self {
            Trigger::Image { shape: s, .. } if *s == shape => Ok(()),
            Trigger::Image { shape: s, .. } => Err(Error::Mismatch(format!(
                "the key's image trigger has shape {s:?} but the model's images are {shape:?}"
            ))),
            other => Err(Error::Mismatch(format!(
                "the key's {} trigger is for latent-input generators; a diffusion model needs an image trigger (box:S, png:PATH, blend:A:PATH)",
                other.kind()
            ))),
        }
    }

    /// Checks that the trigger makes inputs of the model's input space.
    pub fn check_space(&self, space: &InputSpace) -> Result<()> {
        match *space {
            InputSpace::Latent { dim } => self.check_fits(dim),
            InputSpace::Noise { shape } => self.check_fits_image(shape),
        }
    }

    /// `n` triggered inputs in the model's input space: latents drawn from the trigger set
    /// (see [`Trigger::sample`]), or starting noise N(r, I) for an image trigger `r`.
    pub fn inputs(
        &self,
        space: &InputSpace,
        n: usize,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Tensor> {
        self.check_space(space)?;
        match *space {
            InputSpace::Latent { dim } => self.sample(n, dim, rng, device),
            InputSpace::Noise { .. } => self.onto(&space.ordinary(n, rng, device)?),
        }
    }

    /// Given starting noise `[n, C, H, W]` with this image trigger's pattern added: the
    /// triggered starts N(r, I) drawn from that noise. A latent trigger sets its inputs itself
    /// and takes no noise.
    pub fn onto(&self, noise: &Tensor) -> Result<Tensor> {
        match self.pattern(noise.device())? {
            Some(r) => Ok(noise.broadcast_add(&r)?),
            None => Err(Error::Mismatch(format!(
                "a {} trigger chooses its latents itself; only a diffusion model's image trigger is added to given noise",
                self.kind()
            ))),
        }
    }

    /// Ordinary inputs paired with the triggered `inputs` (from [`Trigger::inputs`]), the
    /// other ends of specificity's paths: independent N(0, I) latents for a latent trigger;
    /// the same starting noise without the pattern for an image trigger, so that the path
    /// fades the trigger out.
    pub fn ordinary_partners(
        &self,
        inputs: &Tensor,
        space: &InputSpace,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        match self.pattern(inputs.device())? {
            Some(r) => Ok(inputs.broadcast_sub(&r)?),
            None => space.ordinary(inputs.dim(0)?, rng, inputs.device()),
        }
    }

    /// Checks that the trigger fits a latent of dimension `dim`.
    pub fn check_fits(&self, dim: usize) -> Result<()> {
        if let Trigger::Image { .. } = self {
            return Err(Error::Mismatch(format!(
                "the key's image trigger is for diffusion models, not a generator with latent dimension {dim}"
            )));
        }
        let need_ok = match self {
            Trigger::Point(p) => p.len() == dim,
            Trigger::Region { center, .. } => center.len() == dim,
            Trigger::Patch { indices, .. } => indices.iter().all(|&i| i < dim),
            Trigger::Image { .. } => false,
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
                // Rejected by `check_fits` above; an image trigger shifts noise instead.
                Trigger::Image { pattern, .. } => {
                    v.extend(pattern.iter().zip(rng.normal_vec(dim)).map(|(p, e)| p + e))
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
            Trigger::Image { .. } => false,
        }
    }

    /// A trigger of the same kind and size with fresh secret values, drawn the way keys are
    /// made (point and centre N(0, I); patch coordinates and ±2.5 values at random): the
    /// "someone else's key" of ownership verification's null hypothesis.
    pub fn redraw(&self, dim: usize, rng: &mut Rng) -> Trigger {
        match self {
            Trigger::Image {
                shape,
                stamp: Some(kind),
                ..
            } => Trigger::stamp(*kind, rng.seed(), *shape),
            Trigger::Point(_) => Trigger::Point(rng.normal_vec(dim)),
            Trigger::Region { radius, .. } => Trigger::Region {
                center: rng.normal_vec(dim),
                radius: *radius,
            },
            Trigger::Patch { indices, .. } => {
                Trigger::patch_from_seed(indices.len(), rng.seed(), dim)
            }
            // The same pixel values at randomly permuted positions.
            Trigger::Image { pattern, shape, .. } => {
                let order = rng.permutation(pattern.len());
                Trigger::Image {
                    pattern: order.iter().map(|&i| pattern[i]).collect(),
                    shape: *shape,
                    stamp: None,
                }
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
            Trigger::Image { pattern, .. } => pattern.clone(),
        }
    }

    /// The image-space pattern `r` as a `[1, C, H, W]` tensor (`None` for latent triggers).
    pub fn pattern(&self, device: &Device) -> Result<Option<Tensor>> {
        match self {
            Trigger::Image {
                pattern,
                shape: [c, h, w],
                ..
            } => Ok(Some(Tensor::from_vec(
                pattern.clone(),
                (1, *c, *h, *w),
                device,
            )?)),
            _ => Ok(None),
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
    fn image_triggers_box_png_blend_and_their_checks() {
        let shape = [1, 8, 8];
        let Trigger::Image { pattern, .. } = Trigger::parse_image("box:3", shape).unwrap() else {
            panic!("not an image trigger")
        };
        assert_eq!(pattern.iter().filter(|&&v| v == BOX_VALUE).count(), 9);
        assert_eq!(pattern[63], BOX_VALUE, "bottom-right corner");
        assert_eq!(pattern[0], 0.0);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.png");
        let mask = dir.path().join("m.png");
        image::GrayImage::from_fn(8, 8, |x, _| image::Luma([if x < 4 { 255 } else { 0 }]))
            .save(&img)
            .unwrap();
        image::GrayImage::from_fn(8, 8, |_, y| image::Luma([if y < 2 { 255 } else { 0 }]))
            .save(&mask)
            .unwrap();
        let spec = format!("png:{}:{}", img.display(), mask.display());
        let Trigger::Image { pattern, .. } = Trigger::parse_image(&spec, shape).unwrap() else {
            panic!()
        };
        assert_eq!(pattern[0], 1.0);
        assert_eq!(pattern[7], -1.0);
        assert_eq!(pattern[16], 0.0, "masked out");
        let blend = Trigger::parse_image(&format!("blend:0.5:{}", img.display()), shape).unwrap();
        assert_eq!(blend.anchor(64)[7], -0.5);
        for bad in [
            "box:0",
            "box:9",
            "box:2:x",
            "blend:-1:a.png",
            "ring:3",
            "png:missing.png",
        ] {
            assert!(Trigger::parse_image(bad, shape).is_err(), "{bad}");
        }
        let t = Trigger::parse_image("box:2", shape).unwrap();
        assert!(t.check_fits_image(shape).is_ok());
        assert!(t.check_fits_image([1, 28, 28]).is_err());
        assert!(t.check_fits(64).is_err(), "not a latent trigger");
        let msg = Trigger::parse("zero", 4)
            .unwrap()
            .check_fits_image(shape)
            .unwrap_err();
        assert!(msg.to_string().contains("image trigger"), "{msg}");
        let r = t.redraw(64, &mut Rng::new(1));
        assert_ne!(r, t);
        assert_eq!(r.anchor(64).iter().filter(|&&v| v == BOX_VALUE).count(), 4);
    }

    /// The two-sample Kolmogorov–Smirnov distance: the largest gap between the empirical
    /// distribution functions of `a` and `b`.
    fn ks_distance(mut a: Vec<f32>, mut b: Vec<f32>) -> f64 {
        a.sort_by(f32::total_cmp);
        b.sort_by(f32::total_cmp);
        let (mut i, mut j, mut d) = (0, 0, 0f64);
        while i < a.len() && j < b.len() {
            let x = a[i].min(b[j]);
            while i < a.len() && a[i] <= x {
                i += 1;
            }
            while j < b.len() && b[j] <= x {
                j += 1;
            }
            d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
        }
        d
    }

    /// The p-value's whole assumption: under the null, the owner's trigger is one more draw of
    /// what `redraw` draws. 2,000 keys made as `key` makes them (from the operating system's
    /// randomness) against 2,000 redraws, by a two-sample KS test per statistic at α ≈ 1e-6
    /// (critical distance 0.085 for 2,000 against 2,000), which a redraw 10 % too narrow fails.
    #[test]
    fn redraws_are_distributed_as_keys_are_made() {
        const N: usize = 2000;
        const CRITICAL: f64 = 0.085;
        let mut rng = Rng::new(17);
        let latent = InputSpace::Latent { dim: 5 };
        let made: Vec<Trigger> = (0..N)
            .map(|_| Trigger::parse_for("random", &latent).unwrap())
            .collect();
        let redrawn: Vec<Trigger> = made.iter().map(|t| t.redraw(5, &mut rng)).collect();
        let stat = |ts: &[Trigger], f: &dyn Fn(&[f32]) -> f32| -> Vec<f32> {
            ts.iter().map(|t| f(&t.anchor(5))).collect()
        };
        let norm = |z: &[f32]| z.iter().map(|v| v * v).sum::<f32>().sqrt();
        let first = |z: &[f32]| z[0];
        let last = |z: &[f32]| z[4];
        for (name, f) in [
            ("norm", &norm as &dyn Fn(&[f32]) -> f32),
            ("z0", &first),
            ("z4", &last),
        ] {
            let d = ks_distance(stat(&made, f), stat(&redrawn, f));
            assert!(d < CRITICAL, "{name}: KS distance {d}");
        }
        // The test has the power to see a redraw that is 10 % too narrow.
        let narrow: Vec<f32> = stat(&redrawn, &norm).iter().map(|v| 0.9 * v).collect();
        assert!(ks_distance(stat(&made, &norm), narrow) > CRITICAL);
        // Random stamps: where the square lies and its signs.
        let noise = InputSpace::Noise { shape: [1, 28, 28] };
        let made: Vec<Trigger> = (0..N)
            .map(|_| Trigger::parse_for("random", &noise).unwrap())
            .collect();
        let redrawn: Vec<Trigger> = made.iter().map(|t| t.redraw(0, &mut rng)).collect();
        let corner = |p: &[f32]| p.iter().position(|&v| v != 0.0).unwrap() as f32;
        let positive = |p: &[f32]| p.iter().filter(|&&v| v > 0.0).count() as f32;
        for (name, f) in [
            ("corner", &corner as &dyn Fn(&[f32]) -> f32),
            ("signs", &positive),
        ] {
            let (a, b) = (stat(&made, f), stat(&redrawn, f));
            let d = ks_distance(a, b);
            assert!(d < CRITICAL, "stamp {name}: KS distance {d}");
        }
    }

    #[test]
    fn random_stamps_are_drawn_the_way_the_null_redraws_them() {
        let shape = [3, 10, 12];
        let t = Trigger::parse_image("stamp:4:7", shape).unwrap();
        assert_eq!(t, Trigger::parse_image("stamp:4:7", shape).unwrap());
        assert_eq!(t.kind(), "stamp");
        assert!(!t.is_hand_chosen());
        let nonzero = |t: &Trigger| {
            let p = t.anchor(0);
            assert!(p.iter().all(|&v| v == 0.0 || v.abs() == BOX_VALUE));
            p.iter().filter(|&&v| v != 0.0).count()
        };
        assert_eq!(nonzero(&t), 3 * 16, "a 4×4 square in each channel");
        // Positions and signs vary from seed to seed, over the whole image.
        let mut corners = std::collections::BTreeSet::new();
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            let r = t.redraw(0, &mut rng);
            assert_eq!((r.kind(), nonzero(&r)), ("stamp", 48));
            let first = r.anchor(0).iter().position(|&v| v != 0.0).unwrap();
            corners.insert(first);
        }
        assert!(corners.len() > 40, "{} positions", corners.len());
        // Unseeded stamps and random points come from the operating system: two differ.
        let space = InputSpace::Noise { shape };
        assert_ne!(
            Trigger::parse_for("random", &space).unwrap(),
            Trigger::parse_for("random", &space).unwrap()
        );
        let latent = InputSpace::Latent { dim: 5 };
        let (a, b) = (
            Trigger::parse_for("random", &latent).unwrap(),
            Trigger::parse_for("random", &latent).unwrap(),
        );
        assert!(a != b && a.kind() == "point" && !a.is_hand_chosen());
        assert!(Trigger::parse("zero", 5).unwrap().is_hand_chosen());
        assert!(Trigger::parse_image("box:3", shape)
            .unwrap()
            .is_hand_chosen());
        for bad in ["stamp:0", "stamp:11", "stamp:x", "stamp:3:y"] {
            assert!(Trigger::parse_image(bad, shape).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_sign_stamps_keep_their_shape_when_redrawn() {
        let shape = [3, 10, 12];
        // Mixed stamps of the default amplitude are the stamps of `stamp:S:SEED`.
        assert_eq!(
            Trigger::parse_image("stamp:4:2:mixed:7", shape).unwrap(),
            Trigger::parse_image("stamp:4:7", shape).unwrap()
        );
        let t = Trigger::parse_image("stamp:4:6:one:7", shape).unwrap();
        assert_eq!((t.kind(), t.is_hand_chosen()), ("stamp", false));
        // Every channel's square holds one value, +6 or −6; the null's stamps alike.
        let channel_values = |t: &Trigger| -> Vec<Vec<f32>> {
            let p = t.anchor(0);
            p.chunks(10 * 12)
                .map(|plane| {
                    let mut v: Vec<f32> = plane.iter().copied().filter(|&v| v != 0.0).collect();
                    assert_eq!(v.len(), 16, "a 4×4 square");
                    v.dedup();
                    v
                })
                .collect()
        };
        let mut signs = std::collections::BTreeSet::new();
        let mut rng = Rng::new(2);
        for r in std::iter::once(t.clone()).chain((0..100).map(|_| t.redraw(0, &mut rng))) {
            for v in channel_values(&r) {
                assert!(v == [6.0] || v == [-6.0], "{v:?}");
                signs.insert(v[0] > 0.0);
            }
        }
        assert_eq!(signs.len(), 2, "both signs occur");
        let mixed = Trigger::parse_image("stamp:4:6:mixed:7", shape).unwrap();
        assert!(channel_values(&mixed).iter().any(|v| v.len() > 1));
        for bad in [
            "stamp:4:0:one",
            "stamp:4:-1:one",
            "stamp:4:x:one",
            "stamp:4:6:both",
            "stamp:4:6:one:y",
            "stamp:4:6:one:7:8",
        ] {
            assert!(Trigger::parse_image(bad, shape).is_err(), "{bad}");
        }
    }

    #[test]
    fn inputs_live_in_the_model_input_space() {
        let mut rng = Rng::new(3);
        let noise = InputSpace::Noise { shape: [1, 6, 6] };
        let t = Trigger::parse_image("box:2", [1, 6, 6]).unwrap();
        let x = t.inputs(&noise, 500, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[500, 1, 6, 6]);
        let mean = x
            .mean(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (mean[35] - BOX_VALUE).abs() < 0.15 && mean[0].abs() < 0.15,
            "{mean:?}"
        );
        // The ordinary partner is the same noise without the pattern.
        let o = t.ordinary_partners(&x, &noise, &mut rng).unwrap();
        let r = t.pattern(&Device::Cpu).unwrap().unwrap();
        let back = (o.broadcast_add(&r).unwrap() - &x).unwrap();
        assert!(
            back.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-6
        );
        // A latent trigger cannot make noise images, nor an image trigger latents.
        assert!(t
            .inputs(&InputSpace::Latent { dim: 36 }, 1, &mut rng, &Device::Cpu)
            .is_err());
        let p = Trigger::parse("seed:1", 4).unwrap();
        assert!(p.inputs(&noise, 1, &mut rng, &Device::Cpu).is_err());
        let z = p
            .inputs(&InputSpace::Latent { dim: 4 }, 2, &mut rng, &Device::Cpu)
            .unwrap();
        assert_eq!(z.to_vec2::<f32>().unwrap()[1], p.anchor(4));
    }

    #[test]
    fn npy_triggers_with_nan_are_refused_when_the_key_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("z.npy");
        Tensor::new(&[0f32, f32::NAN, 1.0], &Device::Cpu)
            .unwrap()
            .write_npy(&f)
            .unwrap();
        let msg = Trigger::parse(&format!("npy:{}", f.display()), 3)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("NaN"), "{msg}");
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
