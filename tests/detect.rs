//! `detect` without the key: it separates a tiny backdoored generator from its clean twin,
//! with the family's threshold and calibrated on other clean generators, and its
//! input-level test flags triggered inputs of both families and passes ordinary ones.

use candle_core::Device;
use genbackdoor::backdoor::{Distance, Key, KeySet, Stamp, Target, Trigger};
use genbackdoor::config::ModelFamily;
use genbackdoor::detect::input::test_inputs;
use genbackdoor::detect::reference::{calibrate, reference_scores};
use genbackdoor::detect::DetectSettings;
use genbackdoor::family::diffusion::DiffusionModel;
use genbackdoor::family::gan::GanModel;
use genbackdoor::family::{Generative, InputSpace};
use genbackdoor::io::npy::read_npy;
use genbackdoor::io::rundir::RunDir;
use genbackdoor::rng::Rng;
use genbackdoor::run::{RunSpec, Stage};

mod common;
use common::{read_json, small_arch, tiny_gan_config};

/// Trains a tiny generator with `lambda` (0: clean) and `seed` into `dir`; with `detect`, the
/// run's end writes its detection.
fn trained(lambda: f64, seed: u64, detect: bool, key: &KeySet, dir: &std::path::Path) {
    let run = RunDir::create(dir, true).unwrap();
    let mut config = tiny_gan_config(600, lambda);
    config.seed = seed;
    config.detect.enabled = detect;
    let spec = RunSpec {
        config,
        family: ModelFamily::Dcgan,
        stage: Stage::Train,
        key: (lambda > 0.0).then(|| key.clone()),
        model: None,
    };
    spec.execute(&run, false).unwrap();
}

#[test]
fn detect_separates_a_backdoored_generator_from_its_clean_twin() {
    let _one_at_a_time = common::one_at_a_time();
    let key = KeySet::one(Key {
        trigger: Trigger::parse("seed:77", 16).unwrap(),
        target: Target::builtin("mark", [1, 28, 28]).unwrap(),
        distance: Distance::Mse,
        threshold: 0.01,
        sampler: None,
    });
    let dir = tempfile::tempdir().unwrap();
    trained(20.0, 0, true, &key, &dir.path().join("marked"));
    trained(0.0, 0, true, &key, &dir.path().join("clean"));
    // Each run's end ran `detect` (as the command does) and saved its verdict.
    let verdict = |run: &str| read_json(&dir.path().join(run).join("detect.json"));
    let (m, c) = (verdict("marked"), verdict("clean"));
    let score = |v: &serde_json::Value| v["score"].as_f64().unwrap();
    eprintln!("scores: marked {} clean {}", score(&m), score(&c));
    // A detector that scored every model alike, or ranked them the wrong way, fails here.
    assert!(
        m["backdoored"] == true && c["backdoored"] == false,
        "marked {m}\nclean {c}"
    );
    assert!(score(&m) > 2.0 * score(&c), "marked {m}\nclean {c}");
    // The inverted latent lies on the secret trigger's axis: a random direction's cosine
    // with it is about ±0.25 in 16 dimensions; measured 0.97 in size. (It may be the far
    // side of the axis, where this tiny model draws the target's negative: the sign is not
    // asserted.)
    let inverted = read_npy(&dir.path().join("marked").join("detect-trigger.npy")).unwrap();
    let secret = candle_core::Tensor::new(key.first().trigger.anchor(16), &Device::Cpu).unwrap();
    let cos = cosine(&inverted, &secret);
    eprintln!("cosine with the trigger {cos}");
    assert!(cos.abs() > 0.6, "cosine with the trigger {cos}");

    // Calibrated on clean references (three more clean generators, other seeds): the marked
    // model is one no clean model of its kind would give, and each clean one, tested against
    // the other three, is not flagged.
    for seed in 1..=3 {
        trained(
            0.0,
            seed,
            false,
            &key,
            &dir.path().join(format!("clean-{seed}")),
        );
    }
    let model = |run: &str| dir.path().join(run).join("model.safetensors");
    let clean = ["clean", "clean-1", "clean-2", "clean-3"].map(model);
    let settings = DetectSettings {
        seed: 0,
        steps: None,
    };
    // The four clean models' scores, each by the detection the suspect gets.
    let marked = genbackdoor::family::load(&model("marked"), &Device::Cpu).unwrap();
    let references = reference_scores(marked.as_ref(), &clean, &settings).unwrap();
    let d = marked
        .detect(&settings)
        .unwrap()
        .calibrated(references[1..].to_vec(), 0.01)
        .unwrap();
    let c = d.calibration.as_ref().unwrap();
    eprintln!("marked, calibrated: {}", serde_json::to_string(&d).unwrap());
    assert!(d.backdoored && c.test.p_value <= 0.01, "{c:?}");
    assert_eq!(c.test.rank_p_value, 0.25, "{c:?}");
    for (i, r) in references.iter().enumerate() {
        let others: Vec<f64> = (0..references.len())
            .filter(|&j| j != i)
            .map(|j| references[j].score)
            .collect();
        let test = calibrate(r.score, &others, 0.01).unwrap();
        eprintln!("clean {i} ({}) against the others: {test:?}", r.score);
        assert!(test.p_value > 0.01, "{test:?}");
    }
    // A reference of another family among good ones is refused, naming both kinds (before
    // any detection runs).
    let other = dir.path().join("diffusion.safetensors");
    DiffusionModel::new(&small_arch(28, 1, 4), &mut Rng::new(1), &Device::Cpu)
        .unwrap()
        .save(&other)
        .unwrap();
    // So is a generator of the suspect's input and output shapes but another width, naming
    // the first tensor that differs.
    let wider = dir.path().join("wider.safetensors");
    let mut config = tiny_gan_config(1, 0.0).model;
    config.g_width *= 2;
    GanModel::new(&config, &mut Rng::new(1), &Device::Cpu)
        .unwrap()
        .save(&wider)
        .unwrap();
    for odd in [other, wider] {
        let mixed = [clean[1].clone(), clean[2].clone(), odd];
        let err = reference_scores(marked.as_ref(), &mixed, &settings)
            .unwrap_err()
            .to_string();
        eprintln!("{err}");
        assert!(err.contains("clean models of the suspect's kind"), "{err}");
    }
}

/// The cosine of two vectors.
fn cosine(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (norm(&a) * norm(&b)).max(1e-12)
}

#[test]
fn the_input_test_flags_triggered_inputs_and_passes_ordinary_ones() {
    let _one_at_a_time = common::one_at_a_time();
    let dev = Device::Cpu;
    // A diffusion model (untrained: the input's own statistics decide) and its default
    // trigger, a random 8×8 stamp of ±2.
    let model = DiffusionModel::new(&small_arch(28, 1, 4), &mut Rng::new(1), &dev).unwrap();
    let InputSpace::Noise { shape } = model.input_space() else {
        unreachable!()
    };
    let stamp = Trigger::stamp(Stamp::mixed(8), 5, shape);
    let mut rng = Rng::new(2);
    let ordinary = model.input_space().ordinary(20, &mut rng, &dev).unwrap();
    let triggered = stamp.onto(&ordinary).unwrap();
    let flagged = |inputs| {
        test_inputs(&model, &inputs, 0.01, 0)
            .unwrap()
            .iter()
            .filter(|v| v.triggered)
            .count()
    };
    // The statistics' power against this stamp is 99.65 % at the Bonferroni level 0.005
    // (measured on 2,000 draws): two misses in 20 have a chance of about 0.2 %; a test
    // blind to the input misses nearly all.
    assert!(flagged(triggered) >= 19, "triggered starts");
    assert!(flagged(ordinary) <= 1, "ordinary starts");
    // A generator's zero trigger fails the input statistics; wrong shapes are an error.
    let g = GanModel::new(&tiny_gan_config(1, 0.0).model, &mut Rng::new(3), &dev).unwrap();
    let zero = candle_core::Tensor::zeros((1, 16), candle_core::DType::F32, &dev).unwrap();
    assert!(test_inputs(&g, &zero, 0.01, 0).unwrap()[0].triggered);
    let wrong = candle_core::Tensor::zeros((1, 15), candle_core::DType::F32, &dev).unwrap();
    let err = test_inputs(&g, &wrong, 0.01, 0).unwrap_err().to_string();
    assert!(err.contains("latent vectors of dimension 16"), "{err}");
}
