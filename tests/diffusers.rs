//! Parity with diffusers: tiny `UNet2DModel` folders written by stock diffusers (made by
//! `tests/fixtures/make_diffusers_fixtures.py`, run by hand; CI needs no Python) must load as
//! genbackdoor models, predict the noise diffusers predicts, sample where diffusers' DDIM
//! sampler lands from the same start, and survive being written back as diffusers folders.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use genbackdoor::family::diffusion::diffusers::{load_folder, parse_scheduler, save_folder};
use genbackdoor::family::diffusion::{DiffusionModel, NoiseSchedule, Sampler};
use genbackdoor::io::npy::read_npy;
use genbackdoor::rng::Rng;

mod common;
use common::{max_abs_error, read_json};

fn fixture(name: &str) -> PathBuf {
    common::fixture_in("diffusers", name)
}

fn parity(dir: &Path) -> serde_json::Value {
    read_json(&dir.join("parity.json"))
}

/// ε̂ at diffusers' timesteps `taus` (genbackdoor's t = τ + 1).
fn noise_prediction(model: &DiffusionModel, x: &Tensor, taus: &[f32]) -> Tensor {
    let t: Vec<f32> = taus.iter().map(|tau| tau + 1.0).collect();
    let t = Tensor::from_vec(t, taus.len(), &Device::Cpu).unwrap();
    model.unet.forward(x, &t).unwrap()
}

/// DDIM-10 from `x_t`, unclamped (diffusers' scheduler returns its last step as it is).
fn ddim_10(model: &DiffusionModel, x_t: &Tensor) -> Tensor {
    let mut predict = |x: &Tensor, t: usize| model.unet.predict(x, t);
    Sampler::Ddim { steps: 10 }
        .run(&model.schedule, x_t.clone(), &mut predict, &mut Rng::new(0))
        .unwrap()
}

#[test]
fn diffusers_folders_predict_and_sample_as_diffusers_does() {
    for name in ["rgb32", "grey28"] {
        let dir = fixture(name);
        let want = parity(&dir);
        let model = load_folder(&dir, &Device::Cpu).unwrap();
        assert_eq!(
            model.params.count() as u64,
            want["parameters"].as_u64().unwrap(),
            "{name}"
        );
        let x = read_npy(&dir.join("x.npy")).unwrap();
        let taus: Vec<f32> = serde_json::from_value(want["taus"].clone()).unwrap();
        let eps = noise_prediction(&model, &x, &taus);
        let err = max_abs_error(&eps, &read_npy(&dir.join("eps.npy")).unwrap());
        let x_t = read_npy(&dir.join("x_t.npy")).unwrap();
        let sampled = ddim_10(&model, &x_t);
        let want_x0 = read_npy(&dir.join("ddim_10.npy")).unwrap();
        let ddim_err = max_abs_error(&sampled, &want_x0);
        // An untrained network's DDIM run ends far outside [-1, 1] (up to 248 here: its noise
        // predictions are not the noise, and x̂_0 divides by √ᾱ_T ≈ 0.006), so the sampling
        // run is held to 1e-4 of its largest value, f32's precision over ten steps.
        let scale = max_abs_error(&want_x0, &want_x0.zeros_like().unwrap()).max(1.0);
        eprintln!(
            "{name}: forward max abs error {err:.2e}; DDIM-10 {ddim_err:.2e} (largest value {scale:.1}) against {}",
            want["made_by"]
        );
        assert!(err <= 1e-4, "{name}: forward error {err}");
        assert!(ddim_err <= 1e-4 * scale, "{name}: DDIM-10 error {ddim_err}");
        // The DDIM run visits diffusers' timesteps τ = 900 … 0, our t = τ + 1.
        let taus: Vec<usize> = serde_json::from_value(want["ddim_taus"].clone()).unwrap();
        let ours: Vec<usize> = Sampler::Ddim { steps: 10 }
            .timesteps(&model.schedule)
            .unwrap()
            .iter()
            .map(|t| t - 1)
            .collect();
        assert_eq!(ours, taus, "{name}");

        // Written back as a diffusers folder and read again: the same network, bit for bit;
        // and through genbackdoor's own checkpoint format too.
        let out = tempfile::tempdir().unwrap();
        save_folder(&model, &out.path().join("again")).unwrap();
        let again = load_folder(&out.path().join("again"), &Device::Cpu).unwrap();
        assert_eq!(again.arch, model.arch, "{name}");
        assert_eq!(
            max_abs_error(&noise_prediction(&again, &x, &[0.0, 417.0, 999.0]), &eps),
            0.0
        );
        let file = out.path().join("m.safetensors");
        model.save(&file).unwrap();
        let ours = genbackdoor::family::load(&file, &Device::Cpu).unwrap();
        let mut rng = Rng::new(3);
        let a = ours.generate(&x_t, &mut rng).unwrap();
        let b = genbackdoor::family::load(&dir, &Device::Cpu)
            .unwrap()
            .generate(&x_t, &mut Rng::new(3))
            .unwrap();
        assert_eq!(max_abs_error(&a, &b), 0.0, "{name}");
    }
}

#[test]
fn the_three_diffusers_beta_schedules_give_diffusers_alpha_bars() {
    let want = read_json(&fixture("schedules.json"));
    for (kind, bars) in want.as_object().unwrap() {
        let json = format!(
            r#"{{"beta_schedule": "{kind}", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}}"#
        );
        let (schedule, steps) = parse_scheduler(Path::new("s.json"), &json).unwrap();
        let s = NoiseSchedule::new(schedule, steps).unwrap();
        for (t, bar) in bars.as_object().unwrap() {
            let (t, bar): (usize, f64) = (t.parse().unwrap(), bar.as_f64().unwrap());
            let rel = (s.alpha_bar(t) - bar).abs() / bar;
            // diffusers computes in f32: 1,000 products leave a relative error near 1e-5.
            assert!(rel < 1e-4, "{kind} t = {t}: {} vs {bar}", s.alpha_bar(t));
        }
    }
}

/// Copies a fixture folder into a temporary one, where a test may damage it.
fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
    ] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    (tmp, dir)
}

fn load_error(dir: &Path) -> String {
    load_folder(dir, &Device::Cpu).err().unwrap().to_string()
}

#[test]
fn folders_that_genbackdoor_cannot_read_are_clear_errors() {
    let edit = |dir: &Path, file: &str, from: &str, to: &str| {
        let p = dir.join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{from} not in {file}");
        std::fs::write(&p, text.replace(from, to)).unwrap();
    };
    // Each unsupported value is named with its field.
    for (file, from, to, expect) in [
        (
            "config.json",
            r#""act_fn": "silu""#,
            r#""act_fn": "gelu""#,
            r#"act_fn = "gelu""#,
        ),
        (
            "config.json",
            r#""DownBlock2D","#,
            r#""CrossAttnDownBlock2D","#,
            r#"down_block_types[0] = "CrossAttnDownBlock2D""#,
        ),
        (
            "config.json",
            r#""resnet_time_scale_shift": "default""#,
            r#""resnet_time_scale_shift": "scale_shift""#,
            "resnet_time_scale_shift",
        ),
        (
            "config.json",
            r#""in_channels": 3"#,
            r#""in_chanels": 3"#,
            "unknown field `in_chanels`",
        ),
        (
            "config.json",
            r#""layers_per_block": 1"#,
            r#""layers_per_block": 2"#,
            "does not fit the network its config.json describes",
        ),
        (
            "scheduler_config.json",
            r#""prediction_type": "epsilon""#,
            r#""prediction_type": "v_prediction""#,
            r#"prediction_type = "v_prediction""#,
        ),
        (
            "scheduler_config.json",
            r#""beta_schedule": "linear""#,
            r#""beta_schedule": "sigmoid""#,
            r#"beta_schedule = "sigmoid""#,
        ),
    ] {
        let (_tmp, dir) = copy_of("rgb32");
        edit(&dir, file, from, to);
        let msg = load_error(&dir);
        assert!(msg.contains(expect), "{to}: {msg}");
        assert!(
            msg.contains(file),
            "{to}: the message names the file: {msg}"
        );
    }
    // A truncated weights file, a missing one, and pickled weights only.
    let (_tmp, dir) = copy_of("rgb32");
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert!(load_error(&dir).contains("corrupt or truncated"));
    std::fs::remove_file(&weights).unwrap();
    assert!(load_error(&dir).contains("diffusion_pytorch_model.safetensors"));
    std::fs::write(dir.join("diffusion_pytorch_model.bin"), b"pickle").unwrap();
    assert!(load_error(&dir).contains("safe_serialization=True"));
    // The default diffusion model is a diffusers network: it exports and loads back.
    let own = DiffusionModel::new(
        &genbackdoor::family::diffusion::run::arch(&Default::default()),
        &mut Rng::new(0),
        &Device::Cpu,
    )
    .unwrap();
    save_folder(&own, &dir.join("out")).unwrap();
    let back = DiffusionModel::load(&dir.join("out"), &Device::Cpu).unwrap();
    assert_eq!(back.arch.diffusers, own.arch.diffusers);
    assert_eq!(back.arch.diffusers.block_out_channels, [16, 32, 32]);
}

#[test]
fn the_command_line_reads_diffusers_folders_and_exports_them() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_genbackdoor"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {err}");
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let dir = fixture("grey28");
    let tmp = tempfile::tempdir().unwrap();
    // The network in genbackdoor's checkpoint format (as an injection writes it), exported.
    let checkpoint = tmp.path().join("m.safetensors");
    load_folder(&dir, &Device::Cpu)
        .unwrap()
        .save(&checkpoint)
        .unwrap();
    let exported = tmp.path().join("exported");
    run(&["export", "--model", &s(&checkpoint), "--out", &s(&exported)]);
    // `sample --noise` from diffusers' start, from the fixture folder and from the export:
    // the same images, which are diffusers' DDIM-10 samples (clamped to [-1, 1], as every
    // genbackdoor sample is).
    let x_t = s(&dir.join("x_t.npy"));
    let mut samples = Vec::new();
    for (model, name) in [(&dir, "a.npy"), (&exported, "b.npy")] {
        let npy = tmp.path().join(name);
        let args = [
            "sample",
            "--model",
            &s(model),
            "--noise",
            &x_t,
            "--sampler",
            "ddim-10",
        ];
        run(&[&args[..], &["--npy", &s(&npy)]].concat());
        samples.push(read_npy(&npy).unwrap());
    }
    assert_eq!(max_abs_error(&samples[0], &samples[1]), 0.0);
    let want = read_npy(&dir.join("ddim_10.npy"))
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    let err = max_abs_error(&samples[0], &want);
    assert!(err <= 1e-4, "sample --noise against diffusers: {err}");
    // A key for the folder's model has its image shape.
    let key = tmp.path().join("k.safetensors");
    run(&["key", "--out", &s(&key), "--model", &s(&dir)]);
    let k = genbackdoor::backdoor::KeySet::load(&key).unwrap();
    assert_eq!(k.marks()[0].target.pixels.len(), 28 * 28);
}
