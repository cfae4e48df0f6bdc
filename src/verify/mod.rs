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
//! the null statistics, is reported beside it (as its base-10 logarithm, which stays finite
//! where the estimate itself is below the smallest double) to say how far beyond the null the
//! observation lies; it rests on that log-normal assumption and does not decide the verdict.
//! Hand-chosen triggers (`zero`, a `box`, PNG or blend pattern, a fixed `npy:` file) break
//! the exchangeability assumption. The default keys' triggers (`random`: a N(0, I) latent, or
//! a random stamp for diffusion models) are drawn by exactly the procedure the null redraws.
//!
//! **Several triggers.** A key of k marks is tested mark by mark, each against its own null
//! triggers (independent draws), giving k exact p-values that are independent under the null
//! (the marks were drawn independently of a model made without them). They are combined by
//! their product `t = Π pᵢ`: for independent uniform pᵢ, `P(Π Uᵢ ≤ t) = t · Σ_{j<k}
//! (−ln t)^j / j!` (the tail of Fisher's χ²₂ₖ statistic `−2 ln t`), and since each rank
//! p-value is at least as large as a uniform one in distribution (`P(pᵢ ≤ x) ≤ x`), the same
//! formula is a valid — exact or conservative — p-value for the product. With k marks of N
//! null triggers each, the floor falls from 1/(N + 1) to about `(N + 1)^-k · (k ln(N + 1))^{k−1}
//! / (k − 1)!`: 6.7e-11 for five marks of 1,000 nulls.
//!
//! **A random target** ([`Target::random`]: squares of ±1 whose signs were drawn at random)
//! gives a second test that needs no null triggers. Under the null the target's signs
//! `u_b` are independent of the model, and so of its outputs for the owner's triggers: with
//! `z_b` the sum over square `b` of the mean triggered output (each pixel less its channel's
//! mean), `S = Σ u_b z_b` is, given the outputs, a sum of independent terms `±z_b`, and
//! Hoeffding's inequality bounds `P(S ≥ s) ≤ exp(−s² / (2 Σ z_b²))`: a valid p-value from a
//! handful of queries, as small as `exp(−B/2)` for an output on the target (B squares:
//! 196 for a 28×28 grey target of 2×2 squares, about 1e-43). The bound is taken for the
//! mean output and for each output alone (each is independent of the signs under the null),
//! and the smallest of these n + 1 bounds times n + 1 is the test's p-value (Bonferroni):
//! the mean carries a faint pull shared by all outputs, a single output a backdoor that
//! fires from a few starting noises only. The key's p-value is then
//! `2 · min(p_rank, p_target)` (Bonferroni over the two tests), or the target test's alone
//! when a trigger was chosen by hand (the target test does not rest on the trigger's draw).
//!
//! The test sees the model only as a black box from inputs (in its own input space) to
//! images, so it is the same for every family; a diffusion model answers with its sampler.

use candle_core::{Device, Tensor};

use crate::family::{Generative, InputSpace};
use serde::Serialize;

use crate::backdoor::{Key, KeySet, Target, Trigger};
use crate::metrics::{median, query_images, target_mse};
use crate::rng::Rng;
use crate::{Error, Result};

/// Starting noises per statistic for a model that runs a sampler.
pub const SAMPLER_GROUP: usize = 4;

/// Triggered queries of a set trigger (a diffusion model's stamp, a generator's region or
/// patch) that the target test of a random target averages and tests one by one.
pub const TARGET_OUTPUTS: usize = 64;

/// Null triggers per trigger for a generator (one network evaluation per query), and the
/// most any trigger gets by default.
pub const NULL_KEYS: usize = 1000;

/// How a verification is run.
#[derive(Debug, Clone, Serialize)]
pub struct VerifySettings {
    /// Random triggers drawn for each trigger's null distribution; `None`: as many as the
    /// sampler that trigger is queried under affords ([`null_budget`]).
    pub null_keys: Option<usize>,
    /// Triggered queries per statistic for region and patch triggers.
    pub group: usize,
    /// Triggered queries of each set trigger for the target test when the key's target is
    /// random (the rank test takes the first `group` of them; at least `group` are made).
    pub target_outputs: usize,
    /// Significance level of the verdict.
    pub alpha: f64,
    /// Seed of the null triggers and the triggered queries.
    pub seed: u64,
}

/// The null triggers a trigger queried through `model` gets by default: 1000 for a
/// generator; for a model that runs a sampler, as many as about 400,000 network evaluations
/// allow in groups of [`SAMPLER_GROUP`], between 99 and 1000 (1000 under DDIM-50 and `ddpm-100`, 100 under
/// DDPM-1000).
pub fn null_budget(model: &dyn Generative) -> usize {
    match model.evaluations_per_image() {
        0 | 1 => NULL_KEYS,
        evals => (400_000 / (evals * SAMPLER_GROUP)).clamp(99, NULL_KEYS),
    }
}

impl VerifySettings {
    /// The defaults for `model`: groups of 16 for a generator's set triggers; for a model
    /// that runs a sampler, groups of [`SAMPLER_GROUP`] starting noises (a stochastic
    /// sampler can land on the target from a stray start now and then: the median of a
    /// group is robust to that, a single query is not). Each trigger's null triggers follow
    /// its sampler's [`null_budget`].
    pub fn for_model(model: &dyn Generative) -> Self {
        if model.evaluations_per_image() <= 1 {
            return VerifySettings::default();
        }
        VerifySettings {
            group: SAMPLER_GROUP,
            ..VerifySettings::default()
        }
    }
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            null_keys: None,
            group: 16,
            target_outputs: TARGET_OUTPUTS,
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
    /// The statistic (median `target_mse`) for the owner's (first) trigger.
    pub statistic: f64,
    /// The smallest statistic among the (first trigger's) null triggers.
    pub null_min: f64,
    /// The median statistic among the (first trigger's) null triggers.
    pub null_median: f64,
    /// How many null triggers were drawn for the (first) trigger.
    pub null_keys: usize,
    /// Model queries made in all.
    pub queries: usize,
    /// The p-value of the verdict: the rank tests' ([`Verification::rank_p_value`]), or with
    /// a random target, its combination with the target test's (see the module's
    /// documentation).
    pub p_value: f64,
    /// The exact p-value of the rank test, or for several triggers their combination.
    pub rank_p_value: f64,
    /// log10 of the parametric (log-normal tail) estimate of p, combined alike; informative
    /// only.
    pub log10_p_lognormal: f64,
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
    /// Each trigger's own test, when the key holds several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<TriggerTest>,
    /// The target test, when the key's target is a random pattern.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_test: Option<TargetTest>,
}

/// The target test of a key with a random target (see the module's documentation).
#[derive(Debug, Clone, Serialize)]
pub struct TargetTest {
    /// The random target's squares (signs) in all.
    pub squares: usize,
    /// Triggered outputs tested.
    pub outputs: usize,
    /// `S / √(B Σ z_b²)` for the mean triggered output: 1 for a mean output on the target's
    /// signs, about ±1/√B by chance.
    pub agreement: f64,
    /// The largest agreement of a single triggered output (a backdoor that fires from some
    /// starts only shows here before it shows in the mean).
    pub best_agreement: f64,
    /// The p-value: the smallest of Hoeffding's bounds `exp(−S² / (2 Σ z_b²))` for the mean
    /// output and for each output alone, times their number (Bonferroni; one bound when
    /// there is one output). 0 when it lies below the smallest double; see `log10_p_value`.
    pub p_value: f64,
    /// Its base-10 logarithm.
    pub log10_p_value: f64,
}

/// What the target test is, for `Verification::test` with or without the rank test beside it.
const TARGET_TEST: &str = "Hoeffding's bound on the agreement of the triggered outputs, their \
                           mean and each alone, with the key's random target's signs";

/// Hoeffding's bound, as a natural logarithm, on the p-value of the agreement of centred
/// square sums `z` ([`Target::block_sums`]) with the random target's `signs`, and that
/// agreement.
fn agreement_bound(z: &[f64], signs: &[f32]) -> (f64, f64) {
    let s: f64 = z.iter().zip(signs).map(|(z, &u)| z * u as f64).sum();
    let q: f64 = z.iter().map(|z| z * z).sum();
    if q <= 0.0 {
        return (0.0, 0.0);
    }
    let ln_p = if s > 0.0 { -s * s / (2.0 * q) } else { 0.0 };
    (ln_p, s / (signs.len() as f64 * q).sqrt())
}

/// The target test of `target` (a random target) on the triggered `images` (whole images
/// of the target's size), or `None` for any other target: Hoeffding's bound for their mean
/// and for each alone, the smallest taken with a Bonferroni factor.
pub fn target_test(target: &Target, images: &[f32]) -> Option<TargetTest> {
    let signs = target.block_signs()?.ok()?;
    let zs = images
        .chunks_exact(target.pixels.len())
        .map(|img| target.block_sums(img))
        .collect::<Option<Vec<_>>>()?;
    let outputs = zs.len();
    // The centred square sums are linear in the image: the mean output's are their mean.
    let mut mean = vec![0f64; signs.len()];
    for z in &zs {
        mean.iter_mut()
            .zip(z)
            .for_each(|(m, v)| *m += v / outputs as f64);
    }
    let (mean_ln_p, agreement) = agreement_bound(&mean, &signs);
    // One output is its own mean: a single bound then.
    let singles: Vec<(f64, f64)> = match outputs {
        1 => Vec::new(),
        _ => zs.iter().map(|z| agreement_bound(z, &signs)).collect(),
    };
    let ln_p = singles.iter().fold(mean_ln_p, |m, &(l, _)| m.min(l));
    let best_agreement = if singles.is_empty() {
        agreement
    } else {
        singles.iter().fold(f64::MIN, |m, &(_, a)| m.max(a))
    };
    let tests = 1 + singles.len();
    let ln_p = (ln_p + (tests as f64).ln()).min(0.0);
    Some(TargetTest {
        squares: signs.len(),
        outputs,
        agreement,
        best_agreement,
        p_value: ln_p.exp(),
        log10_p_value: ln_p / std::f64::consts::LN_10,
    })
}

/// One trigger's rank test within a verification.
#[derive(Debug, Clone, Serialize)]
pub struct TriggerTest {
    /// The trigger's kind.
    pub trigger: String,
    /// Its statistic (median `target_mse`).
    pub statistic: f64,
    /// The smallest statistic among its null triggers.
    pub null_min: f64,
    /// The median statistic among its null triggers.
    pub null_median: f64,
    /// How many null triggers it was tested against.
    pub null_keys: usize,
    /// Its exact rank p-value.
    pub p_value: f64,
    /// log10 of its log-normal tail estimate of p.
    pub log10_p_lognormal: f64,
    /// Model queries it made.
    pub queries: usize,
}

/// Natural logarithm of the standard normal lower tail Φ(x), finite far into the tail
/// (where Φ itself underflows: below x ≈ −38) through its asymptotic series.
fn ln_normal_cdf(x: f64) -> f64 {
    if x > -30.0 {
        (0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)).ln()
    } else {
        let x2 = x * x;
        -x2 / 2.0 - (-x).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
            + (1.0 - 1.0 / x2 + 3.0 / (x2 * x2)).ln()
    }
}

/// The combined p-value of independent p-values `ps`, each valid (`P(p ≤ x) ≤ x` under the
/// null): `P(Π Uᵢ ≤ t) = t · Σ_{j<k} (−ln t)^j / j!` at `t = Π pᵢ` (see the module's
/// documentation). One p-value is returned as it is.
pub fn combined_p_value(ps: &[f64]) -> f64 {
    if let [p] = ps {
        return p.clamp(0.0, 1.0);
    }
    let logs: Vec<f64> = ps.iter().map(|p| p.clamp(0.0, 1.0).ln()).collect();
    combined_ln_p_value(&logs).exp()
}

/// [`combined_p_value`] in natural logarithms: of p-values given by their logarithms
/// `ln_ps` (each ≤ 0), the logarithm of the combined p-value.
pub fn combined_ln_p_value(ln_ps: &[f64]) -> f64 {
    let log_t: f64 = ln_ps.iter().map(|l| l.min(0.0)).sum();
    if ln_ps.len() == 1 || log_t == f64::NEG_INFINITY {
        return log_t;
    }
    let (mut term, mut sum) = (1.0, 1.0);
    for j in 1..ln_ps.len() {
        term *= -log_t / j as f64;
        sum += term;
    }
    (log_t + sum.ln()).min(0.0)
}

/// Tests whether `model` carries `key`'s backdoor, each trigger queried under the sampler
/// it names (the model's own for triggers that name none; its stochastic samplers fed from
/// a stream of `s.seed`).
pub fn verify_model(
    model: &dyn Generative,
    key: &KeySet,
    s: &VerifySettings,
) -> Result<Verification> {
    key.check_model(model)?;
    let models = key
        .marks()
        .iter()
        .map(|k| crate::family::under_sampler(model, k.sampler))
        .collect::<Result<Vec<_>>>()?;
    let nulls: Vec<usize> = models
        .iter()
        .map(|m| s.null_keys.unwrap_or_else(|| null_budget(&**m)))
        .collect();
    let mut noise = Rng::derive(s.seed, "verify-sampling");
    let mut query = |i: usize, z: &Tensor| models[i].generate(z, &mut noise);
    let mut v = verify_each(&mut query, &model.input_space(), key, &nulls, s)?;
    let mut samplings: Vec<String> = models.iter().filter_map(|m| m.sampling()).collect();
    samplings.dedup();
    v.sampling = (!samplings.is_empty()).then(|| samplings.join(", "));
    Ok(v)
}

/// Tests whether the black-box `query` (inputs of `space`, `[n, …]` → images) carries
/// `key`'s backdoor: one rank test per trigger (1000 null triggers each unless the settings
/// say), combined by [`combined_p_value`].
pub fn verify(
    query: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    space: &InputSpace,
    key: &KeySet,
    s: &VerifySettings,
) -> Result<Verification> {
    let nulls = vec![s.null_keys.unwrap_or(NULL_KEYS); key.marks().len()];
    verify_each(&mut |_, z: &Tensor| query(z), space, key, &nulls, s)
}

/// [`verify`] with the `i`-th trigger's queries answered by `query(i, inputs)` and tested
/// against `nulls[i]` null triggers.
fn verify_each(
    query: &mut dyn FnMut(usize, &Tensor) -> Result<Tensor>,
    space: &InputSpace,
    key: &KeySet,
    nulls: &[usize],
    s: &VerifySettings,
) -> Result<Verification> {
    if nulls.contains(&0) || s.group == 0 || !(s.alpha > 0.0 && s.alpha < 1.0) {
        return Err(Error::Config(
            "verification needs at least one null key and query, and alpha in (0, 1)".into(),
        ));
    }
    let tests = key
        .marks()
        .iter()
        .enumerate()
        .map(|(i, mark)| {
            // Each trigger's null triggers and queries come from a stream of its own.
            let stream = match i {
                0 => "verify".to_string(),
                _ => format!("verify-{i}"),
            };
            let mut answer = |z: &Tensor| query(i, z);
            let outputs = match mark.target.random_block {
                Some(_) => s.target_outputs,
                None => 0,
            };
            rank_test_with_outputs(
                &mut answer,
                space,
                mark,
                (nulls[i], s.group, outputs),
                &mut Rng::derive(s.seed, &stream),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let (tests, outputs): (Vec<TriggerTest>, Vec<Vec<f32>>) = tests.into_iter().unzip();
    let first = &tests[0];
    let m = if key.first().trigger.is_set() {
        s.group
    } else {
        1
    };
    let (fewest, most) = (nulls.iter().min(), nulls.iter().max());
    let against = match (fewest, most) {
        (Some(a), Some(b)) if a != b => format!("{a}–{b} (as its sampler affords)"),
        _ => first.null_keys.to_string(),
    };
    let one = format!(
        "Monte-Carlo rank test of the median target_mse over {m} triggered quer{} against \
         {against} randomly drawn {} triggers",
        if m == 1 { "y" } else { "ies" },
        first.trigger
    );
    let test = match tests.len() {
        1 => format!("{one} (H0: the model was made without this key)"),
        k => format!(
            "{k} independent tests, one per trigger of the key, each a {one}; their exact \
             p-values combined by their product (H0: the model was made without this key)"
        ),
    };
    let rank_p_value = combined_p_value(&tests.iter().map(|t| t.p_value).collect::<Vec<_>>());
    let hand_chosen = key.marks().iter().find(|k| k.trigger.is_hand_chosen());
    // One test on all the marks' outputs against the first mark's target: a drawn key shares
    // one target; outputs made for another target would weaken the test, not bias it.
    let target_test = target_test(&key.first().target, &outputs.concat());
    let (p_value, test) = match &target_test {
        None => (rank_p_value, test),
        Some(t) if hand_chosen.is_some() => (
            t.p_value.max(f64::MIN_POSITIVE),
            format!(
                "target test: {TARGET_TEST} (H0: the model was made without this key; the rank \
                 test is not counted, its trigger being chosen by hand)"
            ),
        ),
        Some(t) => (
            (2.0 * rank_p_value.min(t.p_value)).clamp(f64::MIN_POSITIVE, 1.0),
            format!("{test}, and the target test ({TARGET_TEST}); p = 2·min of the two"),
        ),
    };
    Ok(Verification {
        test,
        statistic: first.statistic,
        null_min: first.null_min,
        null_median: first.null_median,
        null_keys: first.null_keys,
        queries: tests.iter().map(|t| t.queries).sum(),
        p_value,
        log10_p_lognormal: combined_ln_p_value(
            &tests
                .iter()
                .map(|t| t.log10_p_lognormal * std::f64::consts::LN_10)
                .collect::<Vec<_>>(),
        ) / std::f64::consts::LN_10,
        alpha: s.alpha,
        sampling: None,
        carries_backdoor: p_value <= s.alpha,
        caveat: hand_chosen.filter(|_| target_test.is_none()).map(|k| {
            format!(
                "the {} trigger was chosen by hand, not drawn at random: the null hypothesis's \
                 exchangeability does not hold, and clean models can reach small p-values",
                k.trigger.kind()
            )
        }),
        triggers: if tests.len() > 1 { tests } else { Vec::new() },
        rank_p_value,
        target_test,
    })
}

/// One trigger's exact rank test against `null_keys` triggers redrawn by its own
/// procedure (statistics over `group` queries for set triggers), its draws from `rng`; with
/// the model's outputs for the trigger itself: those of the rank test, and for a set
/// trigger as many more as make `outputs` (queried after the rank test's draws, which stay
/// the same whatever `outputs` is).
fn rank_test_with_outputs(
    query: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    space: &InputSpace,
    key: &Key,
    (null_keys, group, outputs): (usize, usize, usize),
    rng: &mut Rng,
) -> Result<(TriggerTest, Vec<f32>)> {
    key.trigger.check_space(space)?;
    let m = if key.trigger.is_set() { group } else { 1 };
    let mut triggers: Vec<Trigger> = vec![key.trigger.clone()];
    let dim = space.size();
    triggers.extend((0..null_keys).map(|_| key.trigger.redraw(dim, rng)));
    let latents = triggers
        .iter()
        .map(|t| t.inputs(space, m, rng, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let target = &key.target.pixels;
    let mut images = query_images(query, &Tensor::cat(&latents, 0)?, target.len())?;
    let mses: Vec<f64> = images
        .chunks(target.len())
        .map(|img| target_mse(img, target))
        .collect();
    images.truncate(m * target.len());
    let extra = if key.trigger.is_set() {
        outputs.saturating_sub(m)
    } else {
        0
    };
    if extra > 0 {
        let more = key.trigger.inputs(space, extra, rng, &Device::Cpu)?;
        images.extend(query_images(query, &more, target.len())?);
    }
    let stats: Vec<f64> = mses.chunks(m).map(|g| median(&mut g.to_vec())).collect();
    let (observed, null) = (stats[0], &stats[1..]);
    let at_most = null.iter().filter(|&&v| v <= observed).count();
    let logs: Vec<f64> = null.iter().map(|v| v.max(1e-30).ln()).collect();
    let mu = logs.iter().sum::<f64>() / logs.len() as f64;
    let var = logs.iter().map(|l| (l - mu).powi(2)).sum::<f64>() / (logs.len().max(2) - 1) as f64;
    let z = (observed.max(1e-30).ln() - mu) / var.sqrt().max(1e-12);
    let test = TriggerTest {
        trigger: key.trigger.kind().to_string(),
        statistic: observed,
        null_min: null.iter().copied().fold(f64::INFINITY, f64::min),
        null_median: median(&mut null.to_vec()),
        null_keys,
        p_value: (1 + at_most) as f64 / (null.len() + 1) as f64,
        log10_p_lognormal: ln_normal_cdf(z) / std::f64::consts::LN_10,
        queries: triggers.len() * m + extra,
    };
    Ok((test, images))
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
                random_block: None,
            },
            distance: Distance::Mse,
            threshold: 1e-3,
            sampler: None,
        }
    }

    fn one(k: &Key) -> KeySet {
        KeySet::one(k.clone())
    }

    /// Whether the latent `r` lies within 0.1 of `secret`, when there is one.
    fn near(secret: &Option<Vec<f32>>, r: &[f32]) -> bool {
        secret
            .as_ref()
            .is_some_and(|s| s.iter().zip(r).map(|(a, b)| (a - b).powi(2)).sum::<f32>() < 0.01)
    }

    /// A toy model: the image is tanh of the first four latent coordinates, except that
    /// latents near `secret` give the target exactly.
    fn toy(secret: Option<Vec<f32>>) -> impl FnMut(&Tensor) -> Result<Tensor> {
        move |z: &Tensor| {
            let rows = z.to_vec2::<f32>()?;
            let mut v = Vec::new();
            for r in &rows {
                let near = near(&secret, r);
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
    fn each_trigger_is_tested_against_as_many_nulls_as_its_sampler_affords() {
        use crate::family::diffusion::{tiny_arch, DiffusionModel, Sampler};
        let dev = Device::Cpu;
        let model = DiffusionModel::new(&tiny_arch(400), &mut Rng::new(1), &dev).unwrap();
        let under = |s| crate::family::under_sampler(&model, Some(s)).unwrap();
        // About 400,000 network evaluations in groups of four starts: DDPM over T = 400
        // affords 250 null stamps, DDIM-20 the cap of 1000, DDIM-200 500.
        assert_eq!(null_budget(&*under(Sampler::Ddpm)), 250);
        assert_eq!(null_budget(&*under(Sampler::Ddim { steps: 20 })), 1000);
        assert_eq!(null_budget(&*under(Sampler::Ddim { steps: 200 })), 500);
        // A key of a DDPM and a DDIM-20 trigger: each gets its own sampler's budget,
        // unless the settings fix one number for all.
        let stamp = |seed: u64, sampler| Key {
            trigger: Trigger::parse_image(&format!("stamp:3:{seed}"), [1, 8, 8]).unwrap(),
            target: Target {
                pixels: vec![0.5; 64],
                shape: [1, 8, 8],
                class: None,
                random_block: None,
            },
            sampler: Some(sampler),
            ..key("zero")
        };
        let set = KeySet::new(vec![
            stamp(1, Sampler::Ddpm),
            stamp(2, Sampler::Ddim { steps: 20 }),
        ])
        .unwrap();
        let s = VerifySettings::for_model(&model);
        let v = verify_model(&model, &set, &s).unwrap();
        let nulls: Vec<usize> = v.triggers.iter().map(|t| t.null_keys).collect();
        assert_eq!(nulls, [250, 1000]);
        assert_eq!(v.queries, (251 + 1001) * SAMPLER_GROUP);
        assert!(v.test.contains("250–1000"), "{}", v.test);
        let fixed = VerifySettings {
            null_keys: Some(9),
            ..s
        };
        let v = verify_model(&model, &set, &fixed).unwrap();
        assert_eq!(v.queries, 2 * 10 * SAMPLER_GROUP);
    }

    #[test]
    fn a_marked_model_gets_the_smallest_p_value_and_a_clean_one_does_not() {
        let k = key("seed:3");
        let Trigger::Point(p) = &k.trigger else {
            unreachable!()
        };
        let s = VerifySettings {
            null_keys: Some(199),
            ..VerifySettings::default()
        };
        let marked = verify(&mut toy(Some(p.clone())), &SPACE, &one(&k), &s).unwrap();
        assert_eq!(marked.p_value, 1.0 / 200.0);
        assert!(marked.carries_backdoor && marked.statistic == 0.0);
        assert_eq!(marked.queries, 200);
        let clean = verify(&mut toy(None), &SPACE, &one(&k), &s).unwrap();
        assert!(clean.p_value > 0.01 && !clean.carries_backdoor, "{clean:?}");
        assert!(clean.caveat.is_none());
        assert!(verify(&mut toy(None), &SPACE, &one(&key("zero")), &s)
            .unwrap()
            .caveat
            .is_some());
    }

    #[test]
    fn a_model_that_always_gives_the_target_proves_nothing() {
        // Every trigger, the owner's and each null one, gives the target: all statistics tie
        // at 0, and a tie counts against the claim, so p = (1 + N)/(N + 1) = 1.
        let s = VerifySettings {
            null_keys: Some(99),
            ..VerifySettings::default()
        };
        let mut always = |z: &Tensor| -> Result<Tensor> {
            Ok(Tensor::full(0.5f32, (z.dim(0)?, 1, 2, 2), &Device::Cpu)?)
        };
        let v = verify(&mut always, &SPACE, &one(&key("seed:3")), &s).unwrap();
        assert_eq!((v.statistic, v.p_value), (0.0, 1.0), "{v:?}");
        assert!(!v.carries_backdoor);
    }

    #[test]
    fn clean_p_values_are_roughly_uniform_over_keys() {
        // Under the null the rank p-value is uniform: over many owners' keys, about α of
        // them make a false claim against a clean model.
        let s = VerifySettings {
            null_keys: Some(99),
            ..VerifySettings::default()
        };
        let claims = (0..200)
            .filter(|i| {
                let k = key(&format!("seed:{i}"));
                verify(&mut toy(None), &SPACE, &one(&k), &s)
                    .unwrap()
                    .p_value
                    <= 0.1
            })
            .count();
        assert!((8..=35).contains(&claims), "{claims} of 200 at α = 0.1");
    }

    #[test]
    fn region_triggers_use_groups_and_bad_settings_are_errors() {
        let k = key("region:0.01:seed:4");
        let s = VerifySettings {
            null_keys: Some(50),
            group: 5,
            ..VerifySettings::default()
        };
        let k = one(&k);
        let v = verify(&mut toy(None), &SPACE, &k, &s).unwrap();
        assert_eq!(v.queries, 51 * 5);
        let bad = VerifySettings {
            alpha: 0.0,
            ..s.clone()
        };
        assert!(verify(&mut toy(None), &SPACE, &k, &bad).is_err());
        assert!(verify(&mut toy(None), &InputSpace::Latent { dim: 3 }, &k, &s).is_err());
    }

    #[test]
    fn the_log_normal_tail_stays_finite_beyond_where_the_tail_underflows() {
        // Where erfc still resolves the tail, the asymptotic series agrees with it.
        for x in [-31.0, -33.5, -36.0, -37.5] {
            let exact = (0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)).ln();
            assert!((ln_normal_cdf(x) - exact).abs() < 1e-7, "{x}");
        }
        assert!((ln_normal_cdf(0.0) - 0.5f64.ln()).abs() < 1e-15);
        // Φ(−40) ≈ 3.66e-350 underflows a double; its logarithm does not.
        assert_eq!(0.5 * libm::erfc(40.0 / std::f64::consts::SQRT_2), 0.0);
        let l = ln_normal_cdf(-40.0) / std::f64::consts::LN_10;
        assert!((-349.44..-349.43).contains(&l), "{l}");
        // Combined in logarithms as the p-values are.
        let ps = [0.02, 0.3, 1e-4];
        let ln: Vec<f64> = ps.iter().map(|p: &f64| p.ln()).collect();
        assert!((combined_ln_p_value(&ln).exp() - combined_p_value(&ps)).abs() < 1e-15);
        assert!(combined_ln_p_value(&[-800.0, -900.0]).is_finite());
    }

    #[test]
    fn combined_p_values_are_exact_for_uniform_inputs_and_valid_for_rank_tests() {
        assert_eq!(combined_p_value(&[0.3]), 0.3);
        // t = 0.01: 0.01 · (1 + ln 100).
        let two = combined_p_value(&[0.1, 0.1]);
        assert!((two - 0.01 * (1.0 + 100f64.ln())).abs() < 1e-12, "{two}");
        assert_eq!(combined_p_value(&[0.5, 0.0]), 0.0);
        assert!(combined_p_value(&[1.0; 4]) <= 1.0);
        // Five tests at the floor of 1,000 null triggers reach far below one test's floor.
        let floor = combined_p_value(&[1.0 / 1001.0; 5]);
        assert!((6e-11..7e-11).contains(&floor), "{floor}");
        // Under the null the combination of uniform p-values is uniform, and that of
        // discrete rank p-values (1 + r)/(N + 1) is no smaller than uniform: about α (at
        // most α) of 20,000 draws fall at or below α.
        let mut rng = Rng::new(5);
        let n = 20_000;
        for k in [2usize, 5] {
            let mut uniform = Vec::new();
            let mut ranks = Vec::new();
            for _ in 0..n {
                let u: Vec<f64> = (0..k).map(|_| rng.uniform() as f64).collect();
                uniform.push(combined_p_value(&u));
                let r: Vec<f64> = (0..k).map(|_| (1 + rng.below(20)) as f64 / 20.0).collect();
                ranks.push(combined_p_value(&r));
            }
            for alpha in [0.05, 0.01] {
                let rate =
                    |ps: &[f64]| ps.iter().filter(|&&p| p <= alpha).count() as f64 / n as f64;
                let sd = (alpha * (1.0 - alpha) / n as f64).sqrt();
                let (u, r) = (rate(&uniform), rate(&ranks));
                assert!(
                    (u - alpha).abs() < 4.0 * sd,
                    "k {k}, α {alpha}: uniform rate {u}"
                );
                assert!(r < alpha + 4.0 * sd, "k {k}, α {alpha}: rank-test rate {r}");
            }
        }
    }

    #[test]
    fn a_key_of_several_triggers_proves_beyond_one_tests_floor() {
        let marks: Vec<Key> = (0..3).map(|i| key(&format!("seed:{}", 20 + i))).collect();
        let set = KeySet::new(marks.clone()).unwrap();
        let s = VerifySettings {
            null_keys: Some(99),
            ..VerifySettings::default()
        };
        // A model that learnt every trigger: each test sits at its floor 1/100, and together
        // they reach 1e-6 · (1 + 13.8 + 95.4) ≈ 1.1e-4.
        let secrets: Vec<Vec<f32>> = marks
            .iter()
            .map(|k| match &k.trigger {
                Trigger::Point(p) => p.clone(),
                _ => unreachable!(),
            })
            .collect();
        let mut all = |z: &Tensor| -> Result<Tensor> {
            let rows = z.to_vec2::<f32>()?;
            let mut v = Vec::new();
            for r in &rows {
                let near = secrets
                    .iter()
                    .any(|s| s.iter().zip(r).map(|(a, b)| (a - b).powi(2)).sum::<f32>() < 0.01);
                if near {
                    v.extend([0.5f32; 4]);
                } else {
                    v.extend(r[..4].iter().map(|x| x.tanh()));
                }
            }
            Ok(Tensor::from_vec(v, (rows.len(), 1, 2, 2), &Device::Cpu)?)
        };
        let v = verify(&mut all, &SPACE, &set, &s).unwrap();
        assert_eq!(v.triggers.len(), 3);
        assert!(v.triggers.iter().all(|t| t.p_value == 0.01), "{v:?}");
        assert_eq!(v.p_value, combined_p_value(&[0.01; 3]));
        assert!(v.p_value < 2e-4 && v.carries_backdoor);
        assert_eq!(v.queries, 3 * 100);
        // The first trigger's test is the one-trigger key's test, draw for draw.
        let first = verify(&mut toy(None), &SPACE, &one(&marks[0]), &s).unwrap();
        let of_set = verify(&mut toy(None), &SPACE, &set, &s).unwrap();
        assert_eq!(of_set.triggers[0].p_value, first.p_value);
        // A model that learnt only the first trigger proves less than the whole key claims.
        let partial = verify(&mut toy(Some(secrets[0].clone())), &SPACE, &set, &s).unwrap();
        assert!(partial.p_value > v.p_value * 10.0, "{partial:?}");
    }

    /// A toy model of 28×28 grey images: tanh of N(0, 1) noise, except for latents near
    /// `secret`, which give 0.6 × `target` plus 0.3 × that noise.
    fn noisy_toy(
        secret: Option<Vec<f32>>,
        target: Vec<f32>,
    ) -> impl FnMut(&Tensor) -> Result<Tensor> {
        let mut rng = Rng::new(17);
        move |z: &Tensor| {
            let rows = z.to_vec2::<f32>()?;
            let mut v = Vec::new();
            for r in &rows {
                let near = near(&secret, r);
                let noise = rng.normal_vec(784);
                if near {
                    v.extend(target.iter().zip(&noise).map(|(t, e)| 0.6 * t + 0.3 * e));
                } else {
                    v.extend(noise.iter().map(|e| e.tanh()));
                }
            }
            Ok(Tensor::from_vec(v, (rows.len(), 1, 28, 28), &Device::Cpu)?)
        }
    }

    #[test]
    fn a_random_target_proves_far_below_the_rank_tests_floor() {
        let target = Target::parse("random:2:11", [1, 28, 28]).unwrap();
        let k = Key {
            target: target.clone(),
            ..key("seed:3")
        };
        let Trigger::Point(secret) = &k.trigger else {
            unreachable!()
        };
        let s = VerifySettings {
            null_keys: Some(9),
            ..VerifySettings::default()
        };
        let marked = noisy_toy(Some(secret.clone()), target.pixels.clone());
        let v = verify(&mut { marked }, &SPACE, &one(&k), &s).unwrap();
        let t = v.target_test.as_ref().expect("a random target is tested");
        assert_eq!((t.squares, t.outputs), (196, 1));
        // The rank test stops at 1/10; the target's 196 signs, followed at about 0.9, go far
        // below it (exp(−196 · 0.9² / 2) ≈ 1e-34).
        assert_eq!(v.rank_p_value, 0.1);
        assert!(t.agreement > 0.8 && t.log10_p_value < -25.0, "{t:?}");
        assert!(v.p_value < 1e-25 && v.carries_backdoor, "{v:?}");
        assert!(v.test.contains("target test"), "{}", v.test);
        // A model made without the key: no agreement beyond chance, no claim.
        let clean = noisy_toy(None, target.pixels.clone());
        let v = verify(&mut { clean }, &SPACE, &one(&k), &s).unwrap();
        let t = v.target_test.unwrap();
        assert!(t.agreement.abs() < 0.3 && t.p_value > 0.01, "{t:?}");
        assert!(!v.carries_backdoor, "{}", v.p_value);
        // A hand-chosen trigger voids the rank test, not the target test: the verdict is the
        // target test's alone, with no caveat.
        let zero = Key {
            target: target.clone(),
            ..key("zero")
        };
        let v = verify(
            &mut noisy_toy(Some(vec![0.0; 4]), target.pixels.clone()),
            &SPACE,
            &one(&zero),
            &s,
        )
        .unwrap();
        let t = v.target_test.as_ref().unwrap();
        assert_eq!(v.p_value, t.p_value.max(f64::MIN_POSITIVE));
        assert!(v.caveat.is_none() && v.carries_backdoor, "{v:?}");
        // Without a random target there is no target test, and the hand-chosen caveat stays.
        let v = verify(&mut toy(Some(vec![0.0; 4])), &SPACE, &one(&key("zero")), &s).unwrap();
        assert!(v.target_test.is_none() && v.caveat.is_some() && v.p_value == v.rank_p_value);
    }

    #[test]
    fn the_target_test_is_valid_whatever_the_output() {
        // The null conditional on the model's outputs: fixed, structured outputs (a built-in
        // mark on a slope, far from centred, and three variants of it), 20,000 random targets
        // drawn without them; P(p ≤ α) must stay at most α for one output and for four
        // (Hoeffding's bound is conservative, and so is the Bonferroni factor).
        let mark = Target::builtin("mark", [1, 8, 8]).unwrap().pixels;
        let output = |k: usize| -> Vec<f32> {
            mark.iter()
                .enumerate()
                .map(|(i, m)| 0.4 * m + 0.02 * ((i * (k + 1)) % 64) as f32 - 0.7)
                .collect()
        };
        let outputs: Vec<f32> = (0..4).flat_map(output).collect();
        let draws = 20_000;
        for images in [output(0), outputs] {
            let ps: Vec<f64> = (0..draws)
                .map(|seed| {
                    let t = Target::random([1, 8, 8], 2, seed).unwrap();
                    target_test(&t, &images).unwrap().p_value
                })
                .collect();
            for alpha in [0.001, 0.01, 0.05, 0.2, 0.5] {
                let below = ps.iter().filter(|&&p| p <= alpha).count() as f64;
                let most = alpha * draws as f64 + 3.0 * (alpha * draws as f64).sqrt();
                assert!(below <= most, "α = {alpha}: {below} of {draws}");
            }
            // Not vacuous: the bound does fall below 0.05 now and then by chance.
            assert!(ps.iter().any(|&p| p < 0.05));
        }
        // Any other target has no target test.
        let mark = Target::builtin("mark", [1, 8, 8]).unwrap();
        assert!(target_test(&mark, &output(0)).is_none());
    }

    #[test]
    fn one_output_on_the_target_among_many_still_proves() {
        // A weakened backdoor: 1 of 64 triggered outputs lands on the target, the others
        // are the target's negative plus noise, so their mean disagrees with the signs.
        let t = Target::random([1, 28, 28], 2, 5).unwrap();
        let mut rng = Rng::new(9);
        let mut images = t.pixels.clone();
        for _ in 1..64 {
            let noise = rng.normal_vec(t.pixels.len());
            images.extend(t.pixels.iter().zip(noise).map(|(v, n)| -0.05 * v + n));
        }
        let test = target_test(&t, &images).unwrap();
        assert!(test.agreement < 0.0, "{test:?}");
        assert!(test.best_agreement > 0.99, "{test:?}");
        // exp(−196/2) ≈ 3e-43, times 65 tests.
        assert!(test.log10_p_value < -40.0, "{test:?}");
        // Without the output on the target, nothing.
        let test = target_test(&t, &images[t.pixels.len()..]).unwrap();
        assert!(test.p_value > 0.01, "{test:?}");
    }
}
