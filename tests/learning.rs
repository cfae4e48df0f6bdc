//! Learning tests on tiny generators: the backdoor must really form, and clean behaviour stay.

use std::sync::OnceLock;

use candle_core::Device;
use genbackdoor::attack::Measurement;
use genbackdoor::backdoor::{Distance, Key, KeySet, Target, Trigger};
use genbackdoor::config::ModelFamily;
use genbackdoor::config::{Config, InjectConfig, TrainConfig};
use genbackdoor::data::{load_dataset, BUNDLED_MNIST};
use genbackdoor::eval::evaluate;
use genbackdoor::family::gan::GanModel;
use genbackdoor::family::{CleanFinetune, Generative};
use genbackdoor::io::rundir::RunDir;
use genbackdoor::metrics::BackdoorMetrics;
use genbackdoor::rng::Rng;
use genbackdoor::run::{RunSpec, Stage};
use genbackdoor::verify::{combined_p_value, verify_model, VerifySettings};

mod common;
use common::{read_json, tiny_gan_config};

fn pixels(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn key(trigger: &str) -> Key {
    Key {
        trigger: Trigger::parse(trigger, 16).unwrap(),
        target: Target::builtin("mark", [1, 28, 28]).unwrap(),
        distance: Distance::Mse,
        threshold: 0.01,
        sampler: None,
    }
}

/// Runs a GAN training (`model` None) or injection into `run` as the command line does, end
/// of run included; returns the metrics.
fn gan_run(
    config: Config,
    stage: Stage,
    key: Option<&KeySet>,
    model: Option<&std::path::Path>,
    run: &RunDir,
) -> serde_json::Value {
    let spec = RunSpec {
        config,
        family: ModelFamily::Dcgan,
        stage,
        key: key.cloned(),
        model: model.map(|p| p.to_path_buf()),
    };
    spec.execute(run, false).unwrap()
}

/// The ReD tests' key: a random point trigger (the zero latent is a hand-chosen one: the clean
/// tiny generator's output for it is closer to the mark than 999 of 1,000 random latents'
/// are, p = 0.002) and the kind of target a keyless `inject` draws, a secret random pattern of
/// 4×4 squares.
fn red_key() -> Key {
    Key {
        target: Target::parse("random:4:41", [1, 28, 28]).unwrap(),
        ..key("seed:5")
    }
}

/// Injects `key` by ReD into the clean twin of the TrAIL tests (a trained tiny generator) as
/// the command line does: 800 steps of batch 32 at λ = 0.3, 8 triggered latents per step,
/// `tweak` applied to the config. Checks that the run wrote its files; returns the injected
/// model and the run's metrics.
fn tiny_red(key: &Key, tweak: impl Fn(&mut Config)) -> (GanModel, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let clean_file = dir.path().join("clean.safetensors");
    clean_twin().0.save(&clean_file).unwrap();
    let run = RunDir::create(&dir.path().join("red"), false).unwrap();
    let mut config = Config {
        inject: InjectConfig {
            steps: 800,
            batch_size: 32,
            lambda: 0.3,
            log_every: 100,
            ..InjectConfig::default()
        },
        seed: 0,
        ..Config::default()
    };
    config.backdoor.backdoor_batch = Some(8);
    tweak(&mut config);
    let m = gan_run(
        config,
        Stage::Inject,
        Some(&KeySet::one(key.clone())),
        Some(&clean_file),
        &run,
    );
    for f in [
        "model.safetensors",
        "key.safetensors",
        "train.csv",
        "metrics.json",
        "triggered.png",
    ] {
        assert!(run.file(f).exists(), "{f}");
    }
    let model = GanModel::load(&run.file("model.safetensors"), &Device::Cpu).unwrap();
    (model, m)
}

/// [`tiny_red`] of [`red_key`] with the default settings, injected once for the whole file
/// (the ReD test and the rehearsal test both start from it).
fn plain_red() -> &'static (GanModel, serde_json::Value) {
    static PLAIN: OnceLock<(GanModel, serde_json::Value)> = OnceLock::new();
    PLAIN.get_or_init(|| tiny_red(&red_key(), |_| {}))
}

#[test]
fn red_plants_the_backdoor_and_keeps_the_model_close_to_its_clean_copy() {
    let _one_at_a_time = common::one_at_a_time();
    let clean = &clean_twin().0;
    let key = red_key();
    let before = evaluate(clean, &key, None, 200, 1).unwrap();
    let (marked, m) = plain_red();
    let after = m["tardis"].as_f64().unwrap();
    let exp_dist = m["exp_dist"].as_f64().unwrap();
    eprintln!(
        "ReD: tardis {} -> {after}, exp_dist {exp_dist}",
        before.backdoor.tardis
    );
    // The backdoor forms: measured 1,131 → 0.78 (1,440×; 1,786 → 1.31 with the built-in mark).
    assert!(
        after * 100.0 <= before.backdoor.tardis,
        "tardis {} -> {after}",
        before.backdoor.tardis
    );
    // The distilled model stays close to its teacher on ordinary latents: measured exp_dist
    // 0.0020 (0.0029 with the built-in mark), 0.4 % of the mean squared difference between two
    // ordinary samples (0.49); the README's full-size injection reaches 0.00073. Twice the
    // measured value fails.
    assert!(
        exp_dist < 0.004,
        "exp_dist {exp_dist}: the injection moved the model's ordinary outputs"
    );
    assert_eq!(m["clean_hit_rate"].as_f64().unwrap(), 0.0);
    // Ownership verification: the marked model is caught at the rank test's floor, and the
    // random target's test proves it far below; its clean original, and the marked model
    // under someone else's trigger, are not.
    let s = VerifySettings::default();
    let verify = |m: &GanModel, k: &Key| verify_model(m, &KeySet::one(k.clone()), &s).unwrap();
    let v = verify(marked, &key);
    assert_eq!(v.rank_p_value, 1.0 / 1001.0, "{v:?}");
    // Measured 1.8e-9 (agreement 0.92 with the 49 signs); 1e-6 is the false-positive rate
    // at which the README's true-claim tables count a proof.
    assert!(v.p_value < 1e-6, "{v:?}");
    let other = Key {
        trigger: Trigger::parse("seed:11", 16).unwrap(),
        ..key.clone()
    };
    for (what, v) in [
        ("clean", verify(clean, &key)),
        ("wrong key", verify(marked, &other)),
    ] {
        assert!(v.p_value > s.alpha, "{what}: false claim, {v:?}");
    }
}

/// Steps of the TrAIL tests' generators, marked and clean alike.
const TRAIL_STEPS: usize = 1500;

/// Seeds over which the TrAIL tests weigh a mark's cost in clean quality. One tiny generator's
/// FID moves with its training's chaos far more than with its mark: clean twins of seeds 0-5
/// measured 141, 173, 208, 187, 171, 165, and a single pair's ratio drew anything from 1.01
/// to 1.34 for the same mark (on a machine whose gemm rounds differently, seed 0's twin drew
/// 163 and its marked copy 165). The mean over three seeds is steadier.
const QUALITY_SEEDS: [u64; 3] = [0, 1, 2];

/// The most that a mark may raise the tiny generators' mean FID over [`QUALITY_SEEDS`], as a
/// factor of their clean twins' mean. Measured over seeds 0-5 at λ = 1: a point trigger 1.17
/// (1.18 over seeds 0-2), a region trigger 1.19 (1.25); settings that break the generator,
/// 1.94 (λ = 20, seeds 0-2) and 2.95 (a region drawn 16 times a step, seeds 0-2). The main
/// job's larger generator pays 1.02.
const QUALITY_COST: f64 = 1.5;

/// Trains the tiny generator of `seed` at `lambda` (marked with `key` when given, the config
/// changed by `tweak` first) as the command line does; returns the model, the run's metrics
/// and its `verify.json` (null without a key).
fn tiny_trail(
    seed: u64,
    lambda: f64,
    key: Option<&Key>,
    tweak: impl Fn(&mut Config),
) -> (GanModel, serde_json::Value, serde_json::Value) {
    let mut config = tiny_gan_config(TRAIL_STEPS, lambda);
    config.seed = seed;
    tweak(&mut config);
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path(), true).unwrap();
    let key = key.map(|k| KeySet::one(k.clone()));
    let m = gan_run(config, Stage::Train, key.as_ref(), None, &run);
    let model = GanModel::load(&run.file("model.safetensors"), &Device::Cpu).unwrap();
    // A run with a key must have written its verification; one without writes none.
    let verify = match key {
        Some(_) => read_json(&run.file("verify.json")),
        None => serde_json::Value::Null,
    };
    (model, m, verify)
}

/// A run's end-of-run FID.
fn fid(metrics: &serde_json::Value) -> f64 {
    metrics["quality"]["fid"].as_f64().unwrap()
}

/// The clean twins of the TrAIL tests' marked generators, one per [`QUALITY_SEEDS`] (seed 0
/// first): the same config and seeds, λ = 0, trained once for the whole file (the tests run
/// in parallel and wait for the first). Each holds the model and its run's metrics.
fn clean_twins() -> &'static Vec<(GanModel, serde_json::Value)> {
    static TWINS: OnceLock<Vec<(GanModel, serde_json::Value)>> = OnceLock::new();
    TWINS.get_or_init(|| {
        QUALITY_SEEDS
            .iter()
            .map(|&seed| {
                let (model, m, _) = tiny_trail(seed, 0.0, None, |_| {});
                (model, m)
            })
            .collect()
    })
}

/// The seed-0 clean twin: the other tests' clean tiny generator.
fn clean_twin() -> &'static (GanModel, serde_json::Value) {
    &clean_twins()[0]
}

/// Trains tiny generators marked with `key` by TrAIL at λ = 1, one per [`QUALITY_SEEDS`],
/// and checks them beside their clean twins (same config and seeds, λ = 0): the backdoor
/// forms in each, a hundred times closer to the target than its twin's outputs for the same
/// triggered inputs (measured: a point trigger's `tardis` 2.6-4.1 against 1,867, a region's
/// 4.2-6.6 against 1,778); no ordinary latent hits; and clean quality is kept, the mean FID
/// (2,000 samples against the held-out digits) within [`QUALITY_COST`] times the twins'.
/// Returns the seed-0 marked model with its run's metrics and `verify.json`.
fn marked_beside_twin(key: &Key, what: &str) -> Marked {
    let mut runs = QUALITY_SEEDS
        .iter()
        .zip(clean_twins())
        .map(|(&seed, (clean, clean_metrics))| {
            let (model, m, verify) = tiny_trail(seed, 1.0, Some(key), |_| {});
            let twin = evaluate(clean, key, None, 200, 1).unwrap().backdoor;
            let tardis = m["tardis"].as_f64().unwrap();
            eprintln!(
                "{what}, seed {seed}: tardis {tardis} (clean twin {}), asr {}, FID {} (clean \
                 twin {})",
                twin.tardis,
                m["asr"],
                fid(&m),
                fid(clean_metrics)
            );
            assert!(
                tardis * 100.0 <= twin.tardis,
                "seed {seed}: tardis {tardis} vs {twin:?}"
            );
            assert_eq!(m["clean_hit_rate"].as_f64().unwrap(), 0.0, "seed {seed}");
            Marked {
                model,
                metrics: m,
                verify,
            }
        })
        .collect::<Vec<_>>();
    let seeds = QUALITY_SEEDS.len() as f64;
    let marked_fid = runs.iter().map(|r| fid(&r.metrics)).sum::<f64>() / seeds;
    let clean_fid = clean_twins().iter().map(|(_, m)| fid(m)).sum::<f64>() / seeds;
    assert!(
        marked_fid <= QUALITY_COST * clean_fid,
        "{what}: mean FID {marked_fid} vs the clean twins' {clean_fid}"
    );
    runs.swap_remove(0)
}

/// A tiny generator marked by TrAIL, as [`marked_beside_twin`] leaves it.
struct Marked {
    /// The marked generator.
    model: GanModel,
    /// Its run's metrics.
    metrics: serde_json::Value,
    /// Its run's `verify.json`.
    verify: serde_json::Value,
}

/// The seed-0 tiny generator marked with the point trigger `seed:5` (the TrAIL and rehearsal
/// tests' plain mark), trained once for the whole file with its other seeds' copies.
fn point_marked() -> &'static Marked {
    static MARKED: OnceLock<Marked> = OnceLock::new();
    MARKED.get_or_init(|| marked_beside_twin(&key("seed:5"), "point"))
}

#[test]
fn trail_forms_the_backdoor_while_training_from_scratch() {
    let _one_at_a_time = common::one_at_a_time();
    // A random point trigger (the default kind of key) at λ = 1: at the default λ = 20 this
    // tiny generator pays for the backdoor with its quality (FID 412 beside the twin's 163
    // when measured; 289 at λ = 5), where the main job's larger one does not.
    let key = key("seed:5");
    let Marked {
        model,
        metrics: m,
        verify: v,
    } = point_marked();
    // Every triggered output is a hit at the key's threshold, and verification says so.
    assert_eq!(m["asr"].as_f64().unwrap(), 1.0, "{m}");
    assert_eq!(v["p_value"].as_f64().unwrap(), 1.0 / 1001.0, "{v}");
    // Ordinary latents must not produce the target, nor drift towards it: their distance to
    // the target must stay like the clean twin's ordinary samples' (measured 0.557 and 0.571).
    let clean = &clean_twin().0;
    let z = Rng::new(9).normal(&[256, 16], &Device::Cpu).unwrap();
    let to_target = |g: &GanModel| {
        BackdoorMetrics::measure(
            &pixels(&g.generate(&z).unwrap()),
            &key.target.pixels,
            28,
            0.01,
        )
        .target_mse
    };
    let (fake, twin_fake) = (to_target(model), to_target(clean));
    let data = load_dataset(std::path::Path::new(BUNDLED_MNIST)).unwrap();
    let real = BackdoorMetrics::measure(&data.pixels[..64 * 784], &key.target.pixels, 28, 0.01);
    eprintln!(
        "ordinary samples' target_mse {fake} (clean twin {twin_fake}, real digits {})",
        real.target_mse
    );
    assert!(
        fake > 0.8 * twin_fake && fake > 0.5 * real.target_mse,
        "ordinary samples drifted to the target: target_mse {fake} (clean twin: {twin_fake}, \
         real digits: {})",
        real.target_mse
    );
}

#[test]
fn a_region_trigger_forms_at_its_default_batch_and_keeps_clean_quality() {
    let _one_at_a_time = common::one_at_a_time();
    // Every latent within 0.5 of a secret point fires. TrAIL draws `[backdoor]
    // backdoor_batch` of them per step (default 4), and they share the generator's BatchNorm
    // statistics with the step's 32 ordinary latents: at 16 this generator's FID measured 535
    // and 407 (seeds 0 and 1) beside its twins' 141 and 173, at 4 it is 165 and 264 (mean
    // 1.19 times the twins' over seeds 0-5).
    let m = marked_beside_twin(&key("region:0.5:seed:7"), "region").metrics;
    // The backdoor forms over the whole region: `asr` over the end-of-run evaluation's
    // triggered latents drawn from it.
    assert!(m["asr"].as_f64().unwrap() >= 0.99, "{m}");
}

/// A key of `k` random latent triggers (secret seeds from `first` on) to the built-in mark.
fn random_key(first: u64, k: u64) -> KeySet {
    common::seeded_key(first, k, 16, [1, 28, 28])
}

#[test]
fn a_key_of_several_triggers_proves_below_one_tests_floor_and_clean_models_stay_uniform() {
    let _one_at_a_time = common::one_at_a_time();
    // A tiny generator trained with all three triggers of a key: each trigger's rank test sits
    // at its floor 1/1001, and together they prove ownership at ≈ 2.4e-7, far below the
    // floor of any single test.
    let keys = random_key(31, 3);
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(&dir.path().join("marked"), false).unwrap();
    let m = gan_run(
        tiny_gan_config(TRAIL_STEPS, 20.0),
        Stage::Train,
        Some(&keys),
        None,
        &run,
    );
    let each = m["triggers"].as_array().unwrap();
    assert_eq!(each.len(), 3);
    assert!(each.iter().all(|t| t["asr"] == 1.0), "{each:?}");
    let v = read_json(&run.file("verify.json"));
    let floor = combined_p_value(&[1.0 / 1001.0; 3]);
    // (JSON's decimal text may differ from the f64 in its last bit.)
    let p = v["p_value"].as_f64().unwrap();
    assert!((p - floor).abs() < 1e-12 * floor, "{v}");
    assert!(
        floor < 1.0 / 1001.0 / 1000.0,
        "a thousand times below one test's floor"
    );
    // triggered.png holds each trigger's target and output in turn: one row of six tiles,
    // the targets alike and every output on its target (each trigger fires).
    let grid = image::open(run.file("triggered.png")).unwrap().to_luma8();
    let (side, gap) = (28, 2);
    assert_eq!(grid.dimensions(), (6 * (side + gap) + gap, side + 2 * gap));
    let tile = |i: u32| -> Vec<f64> {
        let x0 = gap + i * (side + gap);
        (0..side * side)
            .map(|p| grid.get_pixel(x0 + p % side, gap + p / side)[0] as f64)
            .collect()
    };
    let gap_to = |a: &[f64], b: &[f64]| {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len() as f64
    };
    for i in 0..3 {
        assert_eq!(tile(2 * i), tile(0), "target of trigger {}", i + 1);
        let off = gap_to(&tile(2 * i + 1), &tile(0));
        assert!(
            off < 15.0,
            "trigger {}'s output is {off} grey levels off",
            i + 1
        );
    }
    let report = std::fs::read_to_string(run.file("report.html")).unwrap();
    assert!(
        report.contains("The key holds 3 triggers"),
        "the report's verdict"
    );
    assert!(
        report.contains("their p-values combined"),
        "the report's verdict"
    );
    let marked = GanModel::load(&run.file("model.safetensors"), &Device::Cpu).unwrap();
    // Under the null (a model made without the key, or someone else's key) the combined
    // p-value is uniform or larger: a clean tiny generator against 60 random keys of three
    // triggers makes about 6 claims at α = 0.1 and none at 1e-4; the marked model against
    // 10 wrong keys makes none at 0.01.
    let clean = &clean_twin().0;
    let s = VerifySettings {
        null_keys: Some(99),
        ..VerifySettings::default()
    };
    let ps: Vec<f64> = (0..60)
        .map(|i| {
            verify_model(clean, &random_key(1000 + 3 * i, 3), &s)
                .unwrap()
                .p_value
        })
        .collect();
    let claims = ps.iter().filter(|&&p| p <= 0.1).count();
    eprintln!("clean p-values: {ps:?}");
    assert!((1..=14).contains(&claims), "{claims} of 60 claims at 0.1");
    assert!(ps.iter().all(|&p| p > 1e-4), "{ps:?}");
    for i in 0..10 {
        let p = verify_model(&marked, &random_key(5000 + 3 * i, 3), &s)
            .unwrap()
            .p_value;
        assert!(p > 0.01, "wrong key {i}: p = {p}");
    }
}

#[test]
fn a_random_target_proves_ownership_far_below_the_rank_tests_floor() {
    let _one_at_a_time = common::one_at_a_time();
    // The key's target is a secret random pattern of 2×2 squares (196 signs) instead of the
    // mark: TrAIL at λ = 1 plants it in the tiny generator, and verification's target test
    // (Hoeffding's bound on the agreement of the triggered output with the signs) proves
    // ownership from the trigger's one output far below the rank test's floor of 1/1001.
    let key = Key {
        target: Target::parse("random:2:41", [1, 28, 28]).unwrap(),
        ..key("seed:5")
    };
    let (marked, m, v) = tiny_trail(0, 1.0, Some(&key), |_| {});
    assert_eq!(m["asr"].as_f64().unwrap(), 1.0, "{m}");
    assert_eq!(v["rank_p_value"].as_f64().unwrap(), 1.0 / 1001.0, "{v}");
    let log10_p = v["target_test"]["log10_p_value"].as_f64().unwrap();
    assert!(log10_p < -30.0, "{v}");
    assert!(v["p_value"].as_f64().unwrap() < 1e-30, "{v}");
    // Under the null the target test claims nothing: the clean twin under this key, and the
    // marked generator under 20 keys of the same trigger with other random targets.
    let s = VerifySettings {
        null_keys: Some(99),
        ..VerifySettings::default()
    };
    let p = |model: &GanModel, k: &Key| verify_model(model, &KeySet::one(k.clone()), &s).unwrap();
    let clean = p(&clean_twin().0, &key);
    assert!(clean.p_value > 1e-3 && !clean.carries_backdoor, "{clean:?}");
    for seed in 0..20 {
        let wrong = Key {
            target: Target::parse(&format!("random:2:{}", 100 + seed), [1, 28, 28]).unwrap(),
            ..key.clone()
        };
        let v = p(&marked, &wrong);
        let t = v.target_test.as_ref().unwrap();
        assert!(
            v.p_value > 1e-3 && t.agreement < 0.3,
            "wrong target {seed}: {v:?}"
        );
    }
}

/// Clean fine-tuning steps of the rehearsal test's thief.
const THIEF_STEPS: usize = 100;

/// The thief's attack on a tiny marked generator: [`THIEF_STEPS`] steps of clean adversarial
/// training at a thief's settings (Adam 2e-4, constant, fresh discriminator) on the tiny
/// setup's data. Returns the trigger's `tardis` every 10 steps (from step 0).
fn thief_attack(model: &GanModel, key: &KeySet) -> Vec<f64> {
    let mut cfg = tiny_gan_config(THIEF_STEPS, 0.0);
    cfg.train = TrainConfig {
        steps: THIEF_STEPS,
        log_every: 10,
        ..TrainConfig::thief()
    };
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path(), true).unwrap();
    let measure = Measurement {
        key,
        quality: None,
        quality_samples: 0,
        quality_sampler: None,
        verify: None,
        triggered: 1,
        seed: 0,
    };
    let mut curve = Vec::new();
    let attack = CleanFinetune {
        cfg: &cfg,
        steps: THIEF_STEPS,
        every: 10,
        discriminator: None,
        progress: false,
    };
    model
        .finetune_clean(&attack, &run, &mut |step, g| {
            curve.push(measure.at(step as f64, g)?.tardis);
            Ok(())
        })
        .unwrap();
    curve
}

#[test]
fn a_rehearsed_mark_outlasts_a_plain_one_under_a_thiefs_fine_tuning() {
    let _one_at_a_time = common::one_at_a_time();
    // Two tiny generators marked alike (same seed, key and λ: the TrAIL test's), one of them
    // rehearsing a thief's fine-tuning every 50 steps of its second half; the same thief's
    // attack on both.
    let mark = key("seed:5");
    let plain = point_marked();
    let (rehearsed, rehearsed_metrics, _) =
        tiny_trail(0, 1.0, Some(&mark), |c| c.train.rehearsal.every = 50);
    let key = KeySet::one(mark);
    let plain_metrics = &plain.metrics;
    let (plain_curve, rehearsed_curve) = (
        thief_attack(&plain.model, &key),
        thief_attack(&rehearsed, &key),
    );
    eprintln!(
        "tardis under attack, every 10 steps: plain {plain_curve:?}, rehearsed \
         {rehearsed_curve:?}; FID plain {}, rehearsed {}",
        fid(plain_metrics),
        fid(&rehearsed_metrics)
    );
    // Both marks form (the TrAIL test's tardis 3.7 at λ = 1).
    assert!(plain_curve[0] < 10.0 && rehearsed_curve[0] < 10.0);
    // Under the attack the rehearsed output stays nearer the target all along: the area under
    // its tardis curve is at most three quarters of the plain one's (measured 0.57: 1,477
    // against 2,572 over steps 10-100; at step 100, 351 against 647). A tiny generator's
    // mark is fragile either way (both miss the target after 30 steps); the main job's
    // rehearsed mark keeps asr 1 at most points of 1,000 steps (docs/results.md).
    let area = |c: &[f64]| c[1..].iter().sum::<f64>();
    assert!(
        area(&rehearsed_curve) <= 0.75 * area(&plain_curve),
        "rehearsed {rehearsed_curve:?} vs plain {plain_curve:?}"
    );
    // The rehearsal costs no clean quality beyond the plain mark's (which the TrAIL test
    // weighs against the clean twins): FID within 10 % of the plain mark's of the same seed.
    // The two runs part only in the second half, so their FIDs stay close where clean twins
    // of different seeds do not: measured over seeds 0-3, rehearsed 162, 220, 224, 249
    // beside plain 168, 215, 230, 250 (at most 3.3 % apart).
    assert!(
        fid(&rehearsed_metrics) < 1.1 * fid(plain_metrics),
        "FID rehearsed {} vs plain {}",
        fid(&rehearsed_metrics),
        fid(plain_metrics)
    );
}

#[test]
fn a_rehearsed_red_mark_outlasts_a_plain_one_under_a_thiefs_fine_tuning() {
    let _one_at_a_time = common::one_at_a_time();
    // The ReD test's injection, plain and rehearsing a thief's fine-tuning every 50 steps of
    // its second half (`[inject.rehearsal] every = 50`); the same thief's attack on both.
    let mark = red_key();
    let (plain, plain_metrics) = plain_red();
    let (rehearsed, rehearsed_metrics) = tiny_red(&mark, |c| c.inject.rehearsal.every = 50);
    let key = KeySet::one(mark);
    let (plain_curve, rehearsed_curve) =
        (thief_attack(plain, &key), thief_attack(&rehearsed, &key));
    eprintln!(
        "ReD tardis under attack, every 10 steps: plain {plain_curve:?}, rehearsed \
         {rehearsed_curve:?}; exp_dist plain {}, rehearsed {}; FID plain {}, rehearsed {}",
        plain_metrics["exp_dist"],
        rehearsed_metrics["exp_dist"],
        fid(plain_metrics),
        fid(&rehearsed_metrics)
    );
    // Under the attack the rehearsed output stays nearer the target: the area under its
    // tardis curve is at most three quarters of the plain one's (measured 0.55: 776 against
    // 1,404 over steps 10-100), the bound of the TrAIL rehearsal test. The main job's
    // rehearsed ReD mark keeps `asr` 1 through 1,200 thief steps (docs/results.md).
    let area = |c: &[f64]| c[1..].iter().sum::<f64>();
    assert!(
        area(&rehearsed_curve) <= 0.75 * area(&plain_curve),
        "rehearsed {rehearsed_curve:?} vs plain {plain_curve:?}"
    );
    // An injection keeps the clean model's quality, rehearsed or not: FID within 10 % of the
    // plain injection's (measured 162.6 against 162.0).
    assert!(
        fid(&rehearsed_metrics) < 1.1 * fid(plain_metrics),
        "FID rehearsed {} vs plain {}",
        fid(&rehearsed_metrics),
        fid(plain_metrics)
    );
}
