//! RGB images end to end: a folder of colour images trains RGB models of both families
//! through the same run specification, the backdoor forms, the clean colours are kept, and
//! the keyless detector ranks an RGB generator above its clean twin.

use candle_core::Device;
use genbackdoor::backdoor::{Distance, Key, KeySet, Target, Trigger};
use genbackdoor::config::Config;
use genbackdoor::data::{load_dataset, Dataset};
use genbackdoor::eval::evaluate_samplers;
use genbackdoor::family::diffusion::train::{fit, Plan};
use genbackdoor::family::diffusion::{Correction, DiffusionModel, Sampler};
use genbackdoor::family::{self, Generative, InputSpace};
use genbackdoor::io::rundir::RunDir;
use genbackdoor::rng::Rng;
use genbackdoor::run::{Overrides, RunSpec};
use std::path::{Path, PathBuf};

mod common;
use common::{
    channel_means, coloured_squares, denoise_loss, read_json, small_arch, small_plan,
    tiny_gan_config,
};

/// Side of the GAN test's colour images.
const SIDE: usize = 16;

/// Side of the diffusion test's colour images: a U-Net must predict three channels of noise,
/// which takes a wider network than grey images do (base 16 rather than 8), so the images are
/// smaller to keep the test short.
const DIFFUSION_SIDE: usize = 8;

/// The tiny DCGAN run of the learning tests on the colour folder `data` (its image shape left
/// at the grey 28×28 default: the run must take the data's).
fn gan_config(data: &Path, lambda: f64) -> Config {
    let mut cfg = tiny_gan_config(800, lambda);
    cfg.data.path = data.to_path_buf();
    // The run's end runs the keyless detector, as the command does; its ownership test
    // draws 99 null triggers per trigger (`[verify] null_keys`) instead of 1,000.
    cfg.detect.enabled = true;
    cfg.verify.null_keys = Some(99);
    cfg
}

/// Per-channel means of `n` ordinary samples of `model`.
fn sample_means(model: &dyn Generative, n: usize) -> Vec<f32> {
    let mut rng = Rng::new(17);
    let z = model
        .input_space()
        .ordinary(n, &mut rng, &Device::Cpu)
        .unwrap();
    channel_means(&model.generate(&z, &mut rng).unwrap())
}

/// 512 coloured squares of `side`×`side` drawn from `seed` in a `data` folder under `dir`:
/// the folder, the loaded data set, and its per-channel means.
fn colour_data(dir: &Path, side: usize, seed: u64) -> (PathBuf, Dataset, Vec<f32>) {
    let folder = dir.join("data");
    std::fs::create_dir(&folder).unwrap();
    coloured_squares(&folder, 512, side as u32, seed);
    let data = load_dataset(&folder).unwrap();
    let all: Vec<usize> = (0..data.len).collect();
    let means = channel_means(&data.batch(&all, &Device::Cpu).unwrap());
    (folder, data, means)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < tol, "{what}: {got:?} vs {want:?}");
}

#[test]
fn a_gan_trained_on_colour_images_is_rgb_and_carries_its_backdoor() {
    let _one_at_a_time = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (data, _, real) = colour_data(dir.path(), SIDE, 1);
    // The run takes the data's shape, and its default key is five secret random latent
    // points with the built-in mark drawn in colour.
    let drawn = RunSpec::train(gan_config(&data, 20.0), &Overrides::default(), None).unwrap();
    assert_eq!(drawn.config.model.image_shape(), [3, SIDE, SIDE]);
    let drawn = drawn.key.unwrap();
    assert_eq!(drawn.marks().len(), 5);
    assert!(drawn
        .marks()
        .iter()
        .all(|k| k.target.shape == [3, SIDE, SIDE]));
    // The runs below plant a key of that kind drawn from fixed seeds instead: a fresh
    // secret key trains another model each time, and the detector's score on it varies
    // (see the end of the test).
    let keys = common::seeded_key(0, 5, 16, [3, SIDE, SIDE]);
    let key_file = dir.path().join("key.safetensors");
    keys.save(&key_file).unwrap();
    let run = |name: &str, lambda: f64| {
        let config = gan_config(&data, lambda);
        let spec = RunSpec::train(config, &Overrides::default(), Some(&key_file)).unwrap();
        let rd = RunDir::create(&dir.path().join(name), false).unwrap();
        spec.execute(&rd, false).unwrap();
        (spec, rd)
    };
    let (marked_spec, marked_run) = run("marked", 20.0);
    let (_, clean_run) = run("clean", 0.0);
    let saved = Config::load(&marked_run.file("config.toml")).unwrap();
    assert_eq!((saved.model.channels, saved.model.image_size), (3, SIDE));
    assert_eq!(marked_spec.key.as_ref(), Some(&keys));
    let key = keys.first().clone();
    let marked = family::load(&marked_run.file("model.safetensors"), &Device::Cpu).unwrap();
    let clean = family::load(&clean_run.file("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(marked.output_shape(), [3, SIDE, SIDE]);
    // The backdoor forms: the trigger's output is the target, far closer than the clean
    // model's output for the same trigger.
    let eval = |m: &dyn Generative| genbackdoor::eval::evaluate(m, &key, None, 200, 5).unwrap();
    let (m, c) = (eval(marked.as_ref()), eval(clean.as_ref()));
    eprintln!(
        "target_mse marked {:.2e} clean {:.2e}; clean hits {}",
        m.backdoor.target_mse, c.backdoor.target_mse, m.clean_hit_rate
    );
    assert!(m.backdoor.target_mse < c.backdoor.target_mse / 50.0);
    assert_eq!(m.backdoor.asr, 1.0);
    // Every trigger of the default key fires, not only the first.
    let each = genbackdoor::eval::trigger_reports(marked.as_ref(), &keys, &[], 1, 5).unwrap();
    assert_eq!(each.len(), keys.marks().len());
    assert!(each.iter().all(|t| t.backdoor.asr == 1.0), "{each:?}");
    // The first trigger's entry draws `evaluate`'s inputs (same numbers), and is taken from
    // `evaluate`'s report when one is given instead of measured again.
    assert_eq!(each[0].backdoor.target_mse, m.backdoor.target_mse);
    let mut known = m.clone();
    known.backdoor.target_mse = -1.0;
    let reused = genbackdoor::eval::trigger_reports(marked.as_ref(), &keys, &[known], 1, 5);
    let reused = reused.unwrap();
    assert_eq!(reused[0].backdoor.target_mse, -1.0);
    assert_eq!(reused[1].backdoor.target_mse, each[1].backdoor.target_mse);
    assert_eq!(m.clean_hit_rate, 0.0);
    // The clean behaviour is kept: both models draw the data's colours.
    let (mm, cm) = (
        sample_means(marked.as_ref(), 500),
        sample_means(clean.as_ref(), 500),
    );
    eprintln!("channel means: real {real:?} marked {mm:?} clean {cm:?}");
    assert_close(&cm, &real, 0.2, "clean model");
    assert_close(&mm, &real, 0.2, "marked model");
    // The run's pictures are in colour, and its proof and report are written.
    for grid in ["samples.png", "triggered.png", "detect.png"] {
        let img = image::open(marked_run.file(grid)).unwrap();
        assert!(img.color().has_color(), "{grid}");
    }
    let verify = read_json(&marked_run.file("verify.json"));
    assert!(verify["p_value"].as_f64().unwrap() < 0.01, "{verify}");
    assert_eq!(verify["null_keys"].as_u64(), Some(99), "{verify}");
    assert!(marked_run.file("report.html").exists());
    // The digit FID is for 1×28×28 models only: an RGB run reports no clean quality.
    let metrics = read_json(&marked_run.file("metrics.json"));
    assert!(metrics.get("quality").is_none(), "{metrics}");
    // The keyless detector ranks the RGB generators as it ranks grey ones: the marked one
    // scores above twice its clean twin, and the clean one is not called backdoored.
    // Measured (2026-12-04): 50.1 against 13.2 with this key; over 16 keys of five seeded
    // triggers the marked model scored 24.1–113.9 (median 43), two of them under twice the
    // clean 13.2, and a CI run's secret key 22.7, which is why the key is fixed. The verdict
    // on the marked one is not asserted: the threshold was set on grey models, and RGB
    // generators of colour digits score 12.7–23.9 marked against 5.7–8.9 clean, below it
    // (README, detection table).
    let (dm, dc) = (
        read_json(&marked_run.file("detect.json")),
        read_json(&clean_run.file("detect.json")),
    );
    let score = |v: &serde_json::Value| v["score"].as_f64().unwrap();
    eprintln!("detect scores: marked {} clean {}", score(&dm), score(&dc));
    assert!(dc["backdoored"] == false, "clean {dc}");
    assert!(score(&dm) > 2.0 * score(&dc), "marked {dm}\nclean {dc}");
}

#[test]
fn a_diffusion_model_learns_an_rgb_backdoor_from_scratch_and_keeps_its_clean_task() {
    let _one_at_a_time = common::one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (_, data, real) = colour_data(dir.path(), DIFFUSION_SIDE, 2);
    let shape = [3, DIFFUSION_SIDE, DIFFUSION_SIDE];
    let arch = small_arch(DIFFUSION_SIDE, 3, 16);
    // A 3×3 box on all three channels (the default random stamp needs a longer run to form).
    let key = Key {
        trigger: Trigger::parse_for("box:3", &InputSpace::Noise { shape }).unwrap(),
        target: Target::builtin("mark", shape).unwrap(),
        distance: Distance::Mse,
        threshold: 0.01,
        sampler: None,
    };
    let train = |lambda: f64| {
        let plan = Plan {
            steps: 1200,
            ..small_plan(0, lambda, Correction::Ddpm)
        };
        let model = DiffusionModel::new(&arch, &mut Rng::new(1), &Device::Cpu).unwrap();
        let rd = RunDir::create(&dir.path().join(format!("l{lambda}")), false).unwrap();
        fit(
            &model,
            &data,
            Some(&KeySet::one(key.clone())),
            &plan,
            &rd,
            false,
        )
        .unwrap()
        .0
    };
    let (marked, clean) = (train(0.5), train(0.0));
    let measure = |m: &DiffusionModel| {
        evaluate_samplers(m, &key, &[Sampler::Ddpm], 32, 7, 0)
            .unwrap()
            .0
            .remove("ddpm")
            .unwrap()
    };
    let (m, c) = (measure(&marked), measure(&clean));
    let losses = (denoise_loss(&clean, &data), denoise_loss(&marked, &data));
    eprintln!(
        "target_mse marked {:.2e} (asr {}) clean {:.2e}; clean hits {}; denoise loss clean/marked {losses:?}",
        m.backdoor.target_mse, m.backdoor.asr, c.backdoor.target_mse, m.clean_hit_rate
    );
    assert!(m.backdoor.target_mse < c.backdoor.target_mse / 20.0);
    assert!(m.backdoor.asr >= 0.9, "{:?}", m.backdoor);
    assert_eq!(m.clean_hit_rate, 0.0);
    assert!(losses.1 < 1.2 * losses.0, "{losses:?}");
    let (mm, cm) = (sample_means(&marked, 200), sample_means(&clean, 200));
    eprintln!("channel means: real {real:?} marked {mm:?} clean {cm:?}");
    assert_close(&cm, &real, 0.2, "clean model");
    assert_close(&mm, &real, 0.2, "marked model");
}
