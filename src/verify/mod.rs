//! Ownership verification: does a suspect model carry my backdoor? Answered from black-box
//! queries only, with a Monte-Carlo rank test.
//!
//! **Statistic.** The median, over `group` triggered queries (one for a point trigger), of
//! `target_mse` between the model's output and the key's target.
//!
//! **Null hypothesis.** The model was made without this key. The owner's trigger was drawn at
//! random by the key-making procedure (a N(0, I) point or centre, random patch coordinates and
//! signs), independently of any model that was not trained with it. Under the null the owner's
//! trigger is then just one more draw from that procedure, so its statistic is exchangeable
//! with the statistic of `null_keys` freshly drawn triggers of the same kind (same target).
//!
//! **p-value.** `(1 + #{null statistics ≤ observed}) / (null_keys + 1)`: exact (valid at every
//! sample size, no distributional assumption) under the null, and never below
//! `1 / (null_keys + 1)`. A parametric tail estimate, fitting a normal to the logarithms of
//! the null statistics, is reported beside it to say how far beyond the null the observation
//! lies; it rests on that log-normal assumption and does not decide the verdict.
//! Hand-chosen triggers (`zero`, a `box`, PNG or blend pattern, a fixed `npy:` file) break
//! the exchangeability assumption. The default keys' triggers (`random`: a N(0, I) latent, or
//! a random stamp for diffusion models) are drawn by exactly the procedure the null redraws.
//!
//! The test sees the model only as a black box from inputs (in its own input space) to
//! images, so it is the same for every family; a diffusion model answers with its sampler.

use candle_core::{Device, Tensor};

use crate::family::{Generative, InputSpace};
use serde::Serialize;

use crate::backdoor::{Key, Trigger};
use crate::metrics::{median, query_target_mse};
use crate::rng::Rng;
use crate::{Error, Result};

/// Starting noises per statistic for a model that runs a sampler.
pub const SAMPLER_GROUP: usize = 4;

/// How a verification is run.
#[derive(Debug, Clone, Serialize)]
pub struct VerifySettings {
    /// Random triggers drawn for the null distribution.
    pub null_keys: usize,
    /// Triggered queries per statistic for region and patch triggers.
    pub group: usize,
    /// Significance level of the verdict.
    pub alpha: f64,
    /// Seed of the null triggers and the triggered queries.
    pub seed: u64,
}

impl VerifySettings {
    /// The defaults for `model`: 1000 null triggers and groups of 16 for a generator; for a
    /// model that runs a sampler, groups of [`SAMPLER_GROUP`] starting noises (a stochastic
    /// sampler can land on the target from a stray start now and then: the median of a
    /// group is robust to that, a single query is not) and as many null triggers as about
    /// 400,000 network evaluations allow, between 99 and 1000 (1000 under DDIM-50, 100
    /// under DDPM-1000).
    pub fn for_model(model: &dyn Generative) -> Self {
        let evals = model.evaluations_per_image();
        if evals <= 1 {
            return VerifySettings::default();
        }
        VerifySettings {
            null_keys: (400_000 / (evals * SAMPLER_GROUP)).clamp(99, 1000),
            group: SAMPLER_GROUP,
            ..VerifySettings::default()
        }
    }
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            null_keys: 1000,
            group: 16,
            alpha: 0.01,
            seed: 0,
        }
    }
}

/// The answer of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// The test, in words.
    pub test: String,
    /// The statistic (median `target_mse`) for the owner's trigger.
    pub statistic: f64,
    /// The smallest statistic among the null triggers.
    pub null_min: f64,
    /// The median statistic among the null triggers.
    pub null_median: f64,
    /// How many null triggers were drawn.
    pub null_keys: usize,
    /// Model queries made in all.
    pub queries: usize,
    /// The exact Monte-Carlo rank p-value.
    pub p_value: f64,
    /// The parametric (log-normal tail) estimate; informative only.
    pub p_value_lognormal: f64,
    /// The significance level.
    pub alpha: f64,
    /// How the model made its images (a diffusion model's sampler), when there is a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<String>,
    /// Whether `p_value ≤ alpha`: the model carries the backdoor.
    pub carries_backdoor: bool,
    /// Why the p-value's assumption may not hold for this key, if it visibly does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caveat: Option<String>,
}

/// Standard normal lower tail.
fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Tests whether `model` carries `key`'s backdoor (its stochastic samplers fed from a
/// stream of `s.seed`).
pub fn verify_model(model: &dyn Generative, key: &Key, s: &VerifySettings) -> Result<Verification> {
    key.check_model(model)?;
    let mut noise = Rng::derive(s.seed, "verify-sampling");
    let mut query = crate::family::query(model, &mut noise);
    let mut v = verify(&mut query, &model.input_space(), key, s)?;
    v.sampling = model.sampling();
    Ok(v)
}

/// Tests whether the black-box `query` (inputs of `space`, `[n, …]` → images) carries
/// `key`'s backdoor.
pub fn verify(
    query: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    space: &InputSpace,
    key: &Key,
    s: &VerifySettings,
) -> Result<Verification> {
    if s.null_keys == 0 || s.group == 0 || !(s.alpha > 0.0 && s.alpha < 1.0) {
        return Err(Error::Config(
            "verification needs at least one null key and query, and alpha in (0, 1)".into(),
        ));
    }
    key.trigger.check_space(space)?;
    let m = if key.trigger.is_set() { s.group } else { 1 };
    let mut rng = Rng::derive(s.seed, "verify");
    let mut triggers: Vec<Trigger> = vec![key.trigger.clone()];
    let dim = space.size();
    triggers.extend((0..s.null_keys).map(|_| key.trigger.redraw(dim, &mut rng)));
    let latents = triggers
        .iter()
        .map(|t| t.inputs(space, m, &mut rng, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let mses = query_target_mse(query, &Tensor::cat(&latents, 0)?, &key.target.pixels)?;
    let stats: Vec<f64> = mses.chunks(m).map(|g| median(&mut g.to_vec())).collect();
    let (observed, null) = (stats[0], &stats[1..]);
    let at_most = null.iter().filter(|&&v| v <= observed).count();
    let p_value = (1 + at_most) as f64 / (null.len() + 1) as f64;
    let logs: Vec<f64> = null.iter().map(|v| v.max(1e-30).ln()).collect();
    let mu = logs.iter().sum::<f64>() / logs.len() as f64;
    let var = logs.iter().map(|l| (l - mu).powi(2)).sum::<f64>() / (logs.len().max(2) - 1) as f64;
    let z = (observed.max(1e-30).ln() - mu) / var.sqrt().max(1e-12);
    Ok(Verification {
        test: format!(
            "Monte-Carlo rank test of the median target_mse over {m} triggered quer{} against \
             {} randomly drawn {} triggers (H0: the model was made without this key)",
            if m == 1 { "y" } else { "ies" },
            null.len(),
            key.trigger.kind()
        ),
        statistic: observed,
        null_min: null.iter().copied().fold(f64::INFINITY, f64::min),
        null_median: median(&mut null.to_vec()),
        null_keys: null.len(),
        queries: triggers.len() * m,
        p_value,
        p_value_lognormal: normal_cdf(z),
        alpha: s.alpha,
        sampling: None,
        carries_backdoor: p_value <= s.alpha,
        caveat: key.trigger.is_hand_chosen().then(|| {
            format!(
                "the {} trigger was chosen by hand, not drawn at random: the null hypothesis's \
                 exchangeability does not hold, and clean models can reach small p-values",
                key.trigger.kind()
            )
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backdoor::{Distance, Target};

    const SPACE: InputSpace = InputSpace::Latent { dim: 4 };

    fn key(trigger: &str) -> Key {
        Key {
            trigger: Trigger::parse(trigger, 4).unwrap(),
            target: Target {
                pixels: vec![0.5; 4],
                shape: [1, 2, 2],
                class: None,
            },
            distance: Distance::Mse,
            threshold: 1e-3,
            sampler: None,
        }
    }

    /// A toy model: the image is tanh of the first four latent coordinates, except that
    /// latents near `secret` give the target exactly.
    fn toy(secret: Option<Vec<f32>>) -> impl FnMut(&Tensor) -> Result<Tensor> {
        move |z: &Tensor| {
            let rows = z.to_vec2::<f32>()?;
            let mut v = Vec::new();
            for r in &rows {
                let near = secret.as_ref().is_some_and(|s| {
                    s.iter().zip(r).map(|(a, b)| (a - b).powi(2)).sum::<f32>() < 0.01
                });
                if near {
                    v.extend([0.5f32; 4]);
                } else {
                    v.extend(r[..4].iter().map(|x| x.tanh()));
                }
            }
            Ok(Tensor::from_vec(v, (rows.len(), 1, 2, 2), &Device::Cpu)?)
        }
    }

    #[test]
    fn a_marked_model_gets_the_smallest_p_value_and_a_clean_one_does_not() {
        let k = key("seed:3");
        let Trigger::Point(p) = &k.trigger else {
            unreachable!()
        };
        let s = VerifySettings {
            null_keys: 199,
            ..VerifySettings::default()
        };
        let marked = verify(&mut toy(Some(p.clone())), &SPACE, &k, &s).unwrap();
        assert_eq!(marked.p_value, 1.0 / 200.0);
        assert!(marked.carries_backdoor && marked.statistic == 0.0);
        assert_eq!(marked.queries, 200);
        let clean = verify(&mut toy(None), &SPACE, &k, &s).unwrap();
        assert!(clean.p_value > 0.01 && !clean.carries_backdoor, "{clean:?}");
        assert!(clean.caveat.is_none());
        assert!(verify(&mut toy(None), &SPACE, &key("zero"), &s)
            .unwrap()
            .caveat
            .is_some());
    }

    #[test]
    fn clean_p_values_are_roughly_uniform_over_keys() {
        // Under the null the rank p-value is uniform: over many owners' keys, about α of
        // them make a false claim against a clean model.
        let s = VerifySettings {
            null_keys: 99,
            ..VerifySettings::default()
        };
        let claims = (0..200)
            .filter(|i| {
                let k = key(&format!("seed:{i}"));
                verify(&mut toy(None), &SPACE, &k, &s).unwrap().p_value <= 0.1
            })
            .count();
        assert!((8..=35).contains(&claims), "{claims} of 200 at α = 0.1");
    }

    #[test]
    fn region_triggers_use_groups_and_bad_settings_are_errors() {
        let k = key("region:0.01:seed:4");
        let s = VerifySettings {
            null_keys: 50,
            group: 5,
            ..VerifySettings::default()
        };
        let v = verify(&mut toy(None), &SPACE, &k, &s).unwrap();
        assert_eq!(v.queries, 51 * 5);
        let bad = VerifySettings {
            alpha: 0.0,
            ..s.clone()
        };
        assert!(verify(&mut toy(None), &SPACE, &k, &bad).is_err());
        assert!(verify(&mut toy(None), &InputSpace::Latent { dim: 3 }, &k, &s).is_err());
    }
}
