//! End-to-end tests of the command line: key → train → sample → eval, and bad input.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

#[macro_use]
mod common;
use common::read_json;

const TINY: &str = r#"
[data]
limit = 256
[model]
latent_dim = 16
g_width = 8
d_width = 4
[train]
steps = 4
batch_size = 16
log_every = 2
[inject]
steps = 4
batch_size = 8
[detect]
steps = 5
"#;

/// Files every training run writes (GAN runs add their discriminator, verify.json).
const RUN_FILES: [&str; 7] = [
    "model.safetensors",
    "key.safetensors",
    "config.toml",
    "metrics.json",
    "samples.png",
    "triggered.png",
    "train.csv",
];

/// The binary, on one thread: the tests run two at a time on CI's two cores, and two
/// processes of two threads each would fight over them (measured: the file took 282 s so,
/// about 150 s with one thread each). A test that needs threads sets `RAYON_NUM_THREADS`.
fn bin() -> Command {
    let mut c = Command::cargo_bin("genbackdoor").unwrap();
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RAYON_NUM_THREADS", "1");
    c
}

/// Runs a command that must fail; returns its stderr, checked to be a clear error, not a panic.
fn fails(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.starts_with("error:"), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {err}"
    );
    err
}

fn ok(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{args:?} failed: {o}\n{e}");
    o.to_string()
}

/// The words of a command line (no quoting: test paths have no spaces).
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
    key: PathBuf,
    run: PathBuf,
}

fn trained() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let config = root.join("tiny.toml");
    std::fs::write(&config, TINY).unwrap();
    let key = root.join("key.safetensors");
    ok(&[
        "key",
        "--out",
        s(&key),
        "--trigger",
        "seed:3",
        "--latent-dim",
        "16",
    ]);
    let run = root.join("run");
    ok(&[
        "train",
        "--config",
        s(&config),
        "--key",
        s(&key),
        "--out",
        s(&run),
        "--quiet",
    ]);
    Setup {
        _dir: dir,
        root,
        config,
        key,
        run,
    }
}

#[test]
fn key_train_sample_eval_inject() {
    let t = trained();
    for f in RUN_FILES {
        assert!(t.run.join(f).exists(), "missing {f}");
    }
    let log = std::fs::read_to_string(t.run.join("train.csv")).unwrap();
    assert!(
        log.starts_with("step,d_loss,g_loss,backdoor_loss,tardis\n"),
        "{log}"
    );
    assert_eq!(log.lines().count(), 1 + 3, "{log}");
    // The run's measurement is what `eval` and `verify` answer for its model and key.
    let metrics = read_json(&t.run.join("metrics.json"));
    let model = t.run.join("model.safetensors");
    let out = ok(&["eval", "--model", s(&model), "--key", s(&t.key), "--json"]);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    for f in ["tardis", "target_mse", "ssim", "asr", "clean_hit_rate"] {
        let (run, cli) = (metrics[f].as_f64().unwrap(), e[f].as_f64().unwrap());
        assert!(
            (run - cli).abs() <= 1e-9 * run.abs().max(1.0),
            "{f}: {run} vs {cli}"
        );
    }
    let out = ok(&["verify", "--model", s(&model), "--key", s(&t.key), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let run_v = read_json(&t.run.join("verify.json"));
    assert_eq!(v["p_value"], run_v["p_value"]);
    assert_eq!(v["statistic"], run_v["statistic"]);

    let npy = t.root.join("out.npy");
    let png = t.root.join("grid.png");
    ok(&[
        "sample",
        "--model",
        s(&model),
        "--key",
        s(&t.key),
        "--n",
        "5",
        "--npy",
        s(&npy),
        "--png",
        s(&png),
    ]);
    let arr = candle_core::Tensor::read_npy(&npy).unwrap();
    assert_eq!(arr.dims(), &[5, 1, 28, 28]);
    let v = arr.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    // A point trigger makes every triggered sample the same image.
    assert_eq!(&v[..784], &v[784..1568]);
    assert!(image::open(&png).is_ok());

    let out = ok(&[
        "eval",
        "--model",
        s(&model),
        "--key",
        s(&t.key),
        "--reference",
        s(&model),
        "--n",
        "50",
        "--json",
    ]);
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    for f in ["tardis", "target_mse", "ssim", "asr", "exp_dist"] {
        assert!(e[f].is_number(), "eval lacks {f}: {out}");
    }
    assert_eq!(e["exp_dist"].as_f64().unwrap(), 0.0);

    // ReD into the trained model, with the key given or (None) drawn by inject itself.
    let inject = |out: &Path, key: Option<&Path>| {
        let mut a = vec!["inject", "--config", s(&t.config), "--model", s(&model)];
        if let Some(k) = key {
            a.extend(["--key", s(k)]);
        }
        a.extend(["--out", s(out), "--quiet"]);
        ok(&a);
    };
    let inj = t.root.join("inj");
    inject(&inj, Some(&t.key));
    assert!(inj.join("model.safetensors").exists());
    // ReD's run keeps its whole config, which `--config` reads back (it once wrote only the
    // [inject] section), and the key it planted.
    let inj_cfg = genbackdoor::config::Config::load(&inj.join("config.toml")).unwrap();
    assert_eq!(inj_cfg.inject.steps, 4);
    assert_eq!(
        std::fs::read(inj.join("key.safetensors")).unwrap(),
        std::fs::read(&t.key).unwrap()
    );
    // Without --key, inject draws a key of its own defaults (one secret random trigger
    // fitted to the model's latent space, a secret random target of 4×4 squares) and keeps
    // it in the run.
    let drawn = t.root.join("inj-drawn");
    inject(&drawn, None);
    let key = genbackdoor::backdoor::KeySet::load(&drawn.join("key.safetensors")).unwrap();
    assert_eq!(key.marks().len(), 1);
    assert_eq!(key.first().trigger.kind(), "point");
    assert_eq!(key.first().target.random_block, Some(4));
    key.check_fits(inj_cfg.model.latent_dim, inj_cfg.model.image_shape())
        .unwrap();
    assert_ne!(
        std::fs::read(drawn.join("key.safetensors")).unwrap(),
        std::fs::read(&t.key).unwrap()
    );

    // Same seed, same run: reproducible.
    let again = t.root.join("again");
    ok(&[
        "train",
        "--config",
        s(&t.config),
        "--key",
        s(&t.key),
        "--out",
        s(&again),
        "--quiet",
    ]);
    for f in ["model.safetensors", "key.safetensors", "train.csv"] {
        let same = std::fs::read(t.run.join(f)).unwrap() == std::fs::read(again.join(f)).unwrap();
        assert!(same, "{f} differs between two runs with the same seed");
    }
}

#[test]
fn the_key_stays_out_of_the_model_and_out_of_the_output() {
    let t = trained();
    let key = genbackdoor::backdoor::KeySet::load(&t.key).unwrap();
    let key = key.first();
    let bytes_of = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let contains = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    let trigger = key.trigger.anchor(16);
    // Eight consecutive target pixels from a row with both colours.
    let row = &key.target.pixels[28 * 5..28 * 6];
    let (m, k) = (t.run.join("model.safetensors"), t.key.clone());
    // A thief's fine-tuning writes finetuned.safetensors (and its curve) into the run.
    ok(&[
        "attack",
        "finetune",
        "--model",
        s(&m),
        "--steps",
        "2",
        "--every",
        "1",
        "--null-keys",
        "9",
        "--quiet",
    ]);
    for f in [
        "model.safetensors",
        "checkpoint.safetensors",
        "discriminator.safetensors",
        "finetuned.safetensors",
    ] {
        let bytes = std::fs::read(t.run.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(
            !contains(&bytes, &bytes_of(&trigger[..4])),
            "trigger in {f}"
        );
        assert!(!contains(&bytes, &bytes_of(&row[..8])), "target in {f}");
    }
    // No output shows the trigger's values, neither rounded to the four decimals of a table
    // nor as the first five decimals of a full-precision number (JSON, debug output).
    let shows_trigger = |text: &str| {
        trigger[..4].iter().find(|v| {
            let cut = format!("{:.5}", (**v as f64 * 1e5).trunc() / 1e5);
            text.contains(&format!("{v:.4}")) || text.contains(&cut)
        })
    };
    let npy = t.root.join("triggered.npy");
    let mut outputs = Vec::new();
    for args in [
        vec!["eval", "--json"],
        vec!["eval"],
        vec!["verify", "--queries", "9", "--json"],
        vec!["verify", "--queries", "9"],
        vec!["sample", "--n", "2", "--npy", s(&npy)],
    ] {
        let mut a = args.clone();
        a.extend(["--model", s(&m), "--key", s(&k)]);
        outputs.push((format!("{args:?}"), ok(&a)));
    }
    ok(&["report", s(&t.run)]);
    for f in [
        "report.html",
        "metrics.json",
        "verify.json",
        "attack-finetune.json",
    ] {
        let text = std::fs::read_to_string(t.run.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        outputs.push((f.to_string(), text));
    }
    for (what, text) in &outputs {
        assert!(
            shows_trigger(text).is_none(),
            "{what} shows the trigger value {:?}: {text}",
            shows_trigger(text)
        );
    }
}

#[test]
fn region_and_patch_keys_report_asr_over_many_inputs() {
    let t = trained();
    let model = t.run.join("model.safetensors");
    for trig in ["region:0.5:seed:1", "patch:4:2"] {
        let key = t.root.join("k2.safetensors");
        ok(&[
            "key",
            "--out",
            s(&key),
            "--trigger",
            trig,
            "--latent-dim",
            "16",
            "--force",
        ]);
        let out = ok(&[
            "eval",
            "--model",
            s(&model),
            "--key",
            s(&key),
            "--n",
            "40",
            "--json",
        ]);
        let e: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(e["samples"].as_u64().unwrap(), 40, "{out}");
        assert!((0.0..=1.0).contains(&e["asr"].as_f64().unwrap()));
    }
}

#[test]
fn keys_of_several_triggers_from_the_command_line() {
    let t = trained();
    let model = t.run.join("model.safetensors");
    let three = t.root.join("three.safetensors");
    let k = |args: &str| format!("key --out {} --force {args}", s(&three));
    ok(&words(&k("--triggers 3 --latent-dim 16")));
    // Someone else's key of three triggers: each tested, their p-values combined, no claim.
    // A key like the one `key` drew, its triggers from fixed seeds, so that the verdict is the
    // same in every run: a valid test claims a key drawn afresh at α = 0.01 in 1 % of runs
    // (thirty fresh keys on this model gave combined p-values from 0.07 to 0.97; one CI run
    // met p = 0.005 with the key drawn above).
    let fixed = t.root.join("someone-else.safetensors");
    common::seeded_key(101, 3, 16, [1, 28, 28])
        .save(&fixed)
        .unwrap();
    let out = ok(&words(&format!(
        "verify --model {} --key {} --queries 50 --json",
        s(&model),
        s(&fixed)
    )));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let triggers = v["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 3, "{out}");
    assert_eq!(v["queries"], 3 * 51, "{out}");
    let each: Vec<f64> = triggers
        .iter()
        .map(|t| t["p_value"].as_f64().unwrap())
        .collect();
    let p = v["p_value"].as_f64().unwrap();
    assert_eq!(p, genbackdoor::verify::combined_p_value(&each), "{out}");
    assert!(p > 0.01 && v["carries_backdoor"] == false, "{out}");
    let out = ok(&words(&format!(
        "eval --model {} --key {} --n 20 --quality-samples 0 --json",
        s(&model),
        s(&three)
    )));
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["triggers"].as_array().unwrap().len(), 3, "{out}");
    // `sample` takes any trigger of the key; a number the key has not is refused.
    let sample = |i: usize| {
        let npy = t.root.join(format!("trigger-{i}.npy"));
        let args = format!(
            "sample --model {} --key {} --trigger {i} --n 2 --npy {}",
            s(&model),
            s(&three),
            s(&npy)
        );
        (args, npy)
    };
    let read = |p: &Path| {
        candle_core::Tensor::read_npy(p)
            .unwrap()
            .flatten_all()
            .unwrap()
    };
    let outputs: Vec<Vec<f32>> = [1, 2]
        .map(|i| {
            let (args, npy) = sample(i);
            ok(&words(&args));
            read(&npy).to_vec1::<f32>().unwrap()
        })
        .into();
    assert_ne!(outputs[0], outputs[1]);
    for i in [0, 4] {
        let e = fails(&words(&sample(i).0));
        assert!(e.contains("holds 3 trigger(s)"), "{e}");
    }
    // Samplers per trigger, for diffusion models' image triggers.
    ok(&words(&k(
        "--trigger stamp:4 --image-size 8 --triggers 2 --samplers ddpm,ddim-10",
    )));
    let keys = genbackdoor::backdoor::KeySet::load(&three).unwrap();
    let samplers: Vec<String> = keys
        .marks()
        .iter()
        .map(|m| m.sampler.unwrap().to_string())
        .collect();
    assert_eq!(samplers, ["ddpm", "ddim-10"]);
    for (args, says) in [
        (
            "--triggers 2 --trigger zero --latent-dim 16",
            "same trigger",
        ),
        (
            "--triggers 2 --trigger seed:5 --latent-dim 16",
            "same trigger",
        ),
        ("--triggers 0 --latent-dim 16", "at least one trigger"),
        ("--samplers ddpm --latent-dim 16", "diffusion models only"),
        (
            "--trigger stamp:4 --image-size 8 --samplers dpm++2m",
            "no trigger correction",
        ),
        (
            "--trigger stamp:4 --image-size 8 --triggers 2 --samplers ddpm,ddim-5,ddpm",
            "samplers for 2",
        ),
    ] {
        let e = fails(&words(&k(args)));
        assert!(e.contains(says), "{args}: {e}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let t = trained();
    let model = t.run.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();

    let truncated = t.root.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let e = fails(&["eval", "--model", s(&truncated), "--key", s(&t.key)]);
    assert!(e.contains("corrupt or truncated"), "{e}");

    let corrupt = t.root.join("corrupt.safetensors");
    let mut c = bytes.clone();
    c[10] ^= 0xff;
    c[20] ^= 0xff;
    std::fs::write(&corrupt, &c).unwrap();
    fails(&[
        "sample",
        "--model",
        s(&corrupt),
        "--n",
        "2",
        "--png",
        s(&t.root.join("x.png")),
    ]);

    let garbage = t.root.join("garbage.safetensors");
    std::fs::write(&garbage, b"hello").unwrap();
    fails(&["eval", "--model", s(&garbage), "--key", s(&t.key)]);

    // A clean reference for `exp_dist` of the model's inputs and outputs but another width.
    let wider = t.root.join("wider.safetensors");
    let config = genbackdoor::models::DcganConfig {
        latent_dim: 16,
        g_width: 16,
        d_width: 4,
        ..Default::default()
    };
    let device = candle_core::Device::Cpu;
    genbackdoor::family::gan::GanModel::new(&config, &mut genbackdoor::rng::Rng::new(0), &device)
        .unwrap()
        .save(&wider)
        .unwrap();
    let e = fails(&[
        "eval",
        "--reference",
        s(&wider),
        "--model",
        s(&model),
        "--key",
        s(&t.key),
    ]);
    assert!(
        e.contains("architecture differs") && e.contains("tensor"),
        "{e}"
    );

    // `detect`: inputs that do not fit the model, and settings no search can run with.
    let wrong_inputs = t.root.join("wrong.npy");
    genbackdoor::io::npy::write_npy(
        &wrong_inputs,
        &candle_core::Tensor::zeros((2, 15), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    )
    .unwrap();
    let e = fails(&["detect", "--model", s(&model), "--input", s(&wrong_inputs)]);
    assert!(e.contains("latent vectors of dimension 16"), "{e}");
    let e = fails(&["detect", "--model", s(&model), "--steps", "0"]);
    assert!(e.contains("--steps"), "{e}");
    let e = fails(&[
        "detect",
        "--model",
        s(&model),
        "--input",
        s(&wrong_inputs),
        "--alpha",
        "2",
    ]);
    assert!(e.contains("--alpha"), "{e}");

    let wide_key = t.root.join("wide.safetensors");
    ok(&["key", "--out", s(&wide_key), "--latent-dim", "100"]);
    let e = fails(&["eval", "--model", s(&model), "--key", s(&wide_key)]);
    assert!(e.contains("latent dimension 16"), "{e}");
    let big_target = t.root.join("big.safetensors");
    ok(&[
        "key",
        "--out",
        s(&big_target),
        "--latent-dim",
        "16",
        "--image-size",
        "32",
    ]);
    let e = fails(&[
        "sample",
        "--model",
        s(&model),
        "--key",
        s(&big_target),
        "--npy",
        s(&t.root.join("y.npy")),
    ]);
    assert!(e.contains("target has shape"), "{e}");
    assert!(!t.root.join("y.npy").exists());

    let e = fails(&["eval", "--model", s(&t.key), "--key", s(&t.key)]);
    assert!(e.contains("key file"), "{e}");
    let e = fails(&["eval", "--model", s(&model), "--key", s(&model)]);
    assert!(e.contains("model file"), "{e}");

    let e = fails(&[
        "train",
        "--config",
        s(&t.config),
        "--data",
        "no/such/data",
        "--out",
        s(&t.root.join("r2")),
    ]);
    assert!(e.contains("does not exist"), "{e}");

    let bad_cfg = t.root.join("bad.toml");
    std::fs::write(&bad_cfg, "[train]\nsteps = 3\nlearning_rate = 0.1\n").unwrap();
    let e = fails(&[
        "train",
        "--config",
        s(&bad_cfg),
        "--out",
        s(&t.root.join("r3")),
    ]);
    assert!(e.contains("learning_rate"), "{e}");

    let e = fails(&["train", "--config", s(&t.config), "--out", s(&t.run)]);
    assert!(e.contains("--force"), "{e}");

    // Keys: truncated, bit-flipped, not a key.
    let key_bytes = std::fs::read(&t.key).unwrap();
    let short_key = t.root.join("short-key.safetensors");
    std::fs::write(&short_key, &key_bytes[..key_bytes.len() / 2]).unwrap();
    let e = fails(&["eval", "--model", s(&model), "--key", s(&short_key)]);
    assert!(e.contains("corrupt or truncated"), "{e}");
    let flipped_key = t.root.join("flipped-key.safetensors");
    let mut k = key_bytes.clone();
    k[4] ^= 0x20;
    k[12] ^= 0x41;
    std::fs::write(&flipped_key, &k).unwrap();
    fails(&["eval", "--model", s(&model), "--key", s(&flipped_key)]);

    // `--resume` of a folder that holds no run, and of one with a config but no checkpoint.
    let empty = t.root.join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    let e = fails(&["train", "--resume", s(&empty)]);
    assert!(
        e.contains("empty-run") && e.contains("not a run folder"),
        "{e}"
    );
    std::fs::copy(t.run.join("config.toml"), empty.join("config.toml")).unwrap();
    let e = fails(&["train", "--resume", s(&empty)]);
    assert!(e.contains("checkpoint"), "{e}");

    // Checkpoints whose tensor has the wrong dtype or shape, NaN or infinite weights, or
    // negative BatchNorm variances: each refused by the tensor's name and what is wrong.
    let file =
        genbackdoor::io::tensorfile::load(&model, "model", &candle_core::Device::Cpu).unwrap();
    type Break = fn(&candle_core::Tensor) -> candle_core::Tensor;
    let to_f64: Break = |t| t.to_dtype(candle_core::DType::F64).unwrap();
    let shorten: Break = |t| t.narrow(0, 0, 1).unwrap();
    let nan: Break = |t| t.affine(1.0, f64::NAN).unwrap();
    let inf: Break = |t| t.affine(1.0, f64::INFINITY).unwrap();
    let negative: Break = |t| t.affine(-1.0, -0.1).unwrap();
    for (name, broken, why) in [
        ("fc.weight", to_f64, "F64"),
        ("bn1.weight", shorten, "needs"),
        ("fc.weight", nan, "NaN or infinite"),
        ("bn2.bias", inf, "NaN or infinite"),
        ("bn1.running_var", negative, "negative variances"),
    ] {
        let mut tensors: Vec<(String, candle_core::Tensor)> = file
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (n, t) in tensors.iter_mut() {
            if n == name {
                *t = broken(t);
            }
        }
        let mut meta = file.meta.clone();
        meta.remove("format");
        let p = t.root.join(format!("broken-{name}.safetensors"));
        genbackdoor::io::tensorfile::save(&p, "model", &tensors, meta).unwrap();
        let e = fails(&["eval", "--model", s(&p), "--key", s(&t.key)]);
        assert!(e.contains(name) && e.contains(why), "{e}");
    }

    // Target images: not a PNG, and a PNG of the wrong size.
    let fake_png = t.root.join("fake.png");
    std::fs::write(&fake_png, b"this is not a png").unwrap();
    let out_key = t.root.join("k2.safetensors");
    let e = fails(&["key", "--out", s(&out_key), "--target", s(&fake_png)]);
    assert!(e.contains("fake.png"), "{e}");
    assert!(!out_key.exists());
    let small_png = t.root.join("small.png");
    image::GrayImage::new(10, 10).save(&small_png).unwrap();
    let e = fails(&[
        "key",
        "--out",
        s(&out_key),
        "--target",
        s(&small_png),
        "--latent-dim",
        "16",
    ]);
    assert!(e.contains("10") && e.contains("28"), "{e}");
    assert!(!out_key.exists());

    // An output folder that cannot be created.
    let e = fails(&[
        "train",
        "--config",
        s(&t.config),
        "--out",
        s(&t.key.join("sub")),
    ]);
    assert!(e.contains("sub"), "{e}");

    fails(&["key", "--out", s(&t.key)]);
    let e = fails(&[
        "key",
        "--out",
        s(&t.root.join("k.safetensors")),
        "--target",
        s(&t.root.join("none.png")),
    ]);
    assert!(e.contains("none.png"), "{e}");
}

/// Decodes every data URI of an HTML page: PNGs must decode as images, SVGs parse as XML.
fn check_embedded_images(html: &str) -> usize {
    use base64::Engine as _;
    let mut n = 0;
    for part in html.split("src=\"data:").skip(1) {
        let (mime, rest) = part.split_once(";base64,").unwrap();
        let b64 = &rest[..rest.find('"').unwrap()];
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        match mime {
            "image/png" => {
                image::load_from_memory(&bytes).unwrap();
            }
            "image/svg+xml" => {
                let text = String::from_utf8(bytes).unwrap();
                let doc = roxmltree::Document::parse(&text).unwrap();
                assert_eq!(doc.root_element().tag_name().name(), "svg");
            }
            other => panic!("unexpected embedded type {other}"),
        }
        n += 1;
    }
    n
}

#[test]
fn verify_attacks_and_the_report() {
    let t = trained();
    let model = t.run.join("model.safetensors");
    // The run verified itself and wrote its report.
    let v = read_json(&t.run.join("verify.json"));
    assert_eq!(v["null_keys"].as_u64().unwrap(), 1000);
    let p = v["p_value"].as_f64().unwrap();
    assert!((1.0 / 1001.0..=1.0).contains(&p), "{v}");
    let verify_args = [
        "verify",
        "--model",
        s(&model),
        "--key",
        s(&t.key),
        "--queries",
        "50",
        "--json",
    ];
    let out = ok(&verify_args);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["queries"].as_u64().unwrap(), 51);
    let text = ok(&verify_args[..verify_args.len() - 1]);
    assert!(text.contains("p = "), "{text}");

    ok(&[
        "attack",
        "prune",
        "--model",
        s(&model),
        "--fraction",
        "0,0.5",
        "--null-keys",
        "20",
        "--json",
    ]);
    let prune = read_json(&t.run.join("attack-prune.json"));
    assert_eq!(prune["points"].as_array().unwrap().len(), 2);
    ok(&[
        "attack",
        "finetune",
        "--model",
        s(&model),
        "--config",
        s(&t.config),
        "--steps",
        "2",
        "--every",
        "1",
        "--null-keys",
        "10",
        "--quiet",
    ]);
    let ft = read_json(&t.run.join("attack-finetune.json"));
    let xs: Vec<f64> = ft["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["x"].as_f64().unwrap())
        .collect();
    assert_eq!(xs, [0.0, 1.0, 2.0]);
    // Both curves start from the untouched model, measured alike; each attack then changes
    // what the model makes, and the fine-tuned weights are saved and differ.
    let point = |curve: &serde_json::Value, i: usize, field: &str| {
        curve["points"][i][field].as_f64().unwrap()
    };
    for field in ["tardis", "asr", "fid"] {
        assert_eq!(point(&ft, 0, field), point(&prune, 0, field), "{field}");
    }
    assert_ne!(point(&prune, 1, "tardis"), point(&prune, 0, "tardis"));
    assert_ne!(point(&ft, 2, "tardis"), point(&ft, 0, "tardis"));
    // Every point measures each trigger of the key; the first is the curve's `asr`.
    let marks = genbackdoor::backdoor::KeySet::load(&t.key)
        .unwrap()
        .marks()
        .len();
    for p in ft["points"].as_array().unwrap() {
        let each = p["triggers_asr"].as_array().unwrap();
        assert_eq!(each.len(), marks);
        assert_eq!(each[0].as_f64(), p["asr"].as_f64());
    }
    let finetuned = std::fs::read(t.run.join("finetuned.safetensors")).unwrap();
    assert_ne!(finetuned, std::fs::read(&model).unwrap());
    // With the run's own discriminator instead of a fresh one (all else as above) the
    // thief's training differs; a file that is no discriminator of this model is refused.
    let given = t.root.join("given-d");
    let with_d = |d: &Path| {
        let d = s(d).to_string();
        let args = format!(
            "attack finetune --model {} --config {} --steps 2 --every 1 --null-keys 10 --quiet --out {} --discriminator {d}",
            s(&model),
            s(&t.config),
            s(&given)
        );
        bin().args(words(&args)).output().unwrap()
    };
    assert!(with_d(&t.run.join("discriminator.safetensors"))
        .status
        .success());
    let tuned_with_d = std::fs::read(given.join("finetuned.safetensors")).unwrap();
    assert_ne!(tuned_with_d, finetuned);
    let wrong = with_d(&model);
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("error:"), "{err}");
    genbackdoor::family::load(
        &t.run.join("finetuned.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();

    ok(&["report", s(&t.run)]);
    let html = std::fs::read_to_string(t.run.join("report.html")).unwrap();
    for id in genbackdoor::report::SECTIONS {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "no {id}");
    }
    // The run's end ran `detect`: its verdict and its image are in the page, not the note
    // that detect.json is missing.
    assert!(
        html.contains("Detection without the key finds"),
        "no detection verdict"
    );
    assert!(
        html.contains("detect.png, what the model makes of the inverted trigger")
            && html.contains("alt=\"the detection's images\""),
        "no detection image"
    );
    assert!(html.contains("<h3>prune</h3>") && html.contains("<h3>finetune</h3>"));
    // The page opens with the verdict in words, the p-value in scientific notation, and the
    // metrics grouped with their meaning.
    let verdict = &html[html.find("class=\"verdict\"").expect("a verdict")..];
    let verdict = &verdict[..verdict.find("</div>").unwrap()];
    assert!(verdict.contains("Ownership verification:"), "{verdict}");
    assert!(verdict.contains(&format!("p = {p:.2e}")), "{verdict}");
    assert!(html.contains("<th>attack success rate</th>"));
    // Two grids, four training curves, the detection grid, two specificity charts, three
    // per attack.
    assert_eq!(check_embedded_images(&html), 2 + 4 + 1 + 2 + 3 * 2);

    let e = fails(&[&verify_args[..5], &["--alpha", "0"]].concat());
    assert!(e.contains("alpha"), "{e}");
    let e = fails(&["attack", "prune", "--model", s(&model), "--fraction", "1.5"]);
    assert!(e.contains("[0, 1]"), "{e}");
    let e = fails(&["report", s(&t.root)]);
    assert!(e.contains("metrics.json"), "{e}");
}

const TINY_DIFFUSION: &str = concat!(
    r#"
family = "diffusion"
[data]
limit = 128
[backdoor]
backdoor_batch = 4
[diffusion]
steps = 3
batch_size = 8
timesteps = 10
log_every = 1
eval_samples = 4
quality_samples = 20
"#,
    tiny_unet!(),
    r#"
[diffusion.schedule]
kind = "linear"
beta_start = 0.01
beta_end = 0.5
[diffusion.inject]
steps = 2
[detect]
steps = 2
"#
);

/// The end-of-run verification of the runs that test something else: 9 null triggers.
const QUICK_VERIFY: &str = "[verify]\nnull_keys = 9\n";

#[test]
fn diffusion_train_sample_eval_inject() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ddpm.toml");
    std::fs::write(&cfg, TINY_DIFFUSION).unwrap();
    let run = dir.path().join("run");
    ok(&["train", "--config", s(&cfg), "--out", s(&run), "--quiet"]);
    for f in RUN_FILES.iter().chain(&["report.html"]) {
        assert!(run.join(f).exists(), "no {f}");
    }
    let m = read_json(&run.join("metrics.json"));
    assert_eq!(m["family"], "diffusion");
    // Each sampler measured under itself (their target distances all differ), and the
    // key's own (DDPM) as `eval` measures it.
    let mut distances = Vec::new();
    for sampler in ["ddpm", "ddim-10", "dpm++2m-10"] {
        let r = &m["samplers"][sampler];
        assert_eq!(r["samples"], 4, "{m}");
        distances.push(r["target_mse"].as_f64().unwrap());
    }
    assert!(
        distances[0] != distances[1]
            && distances[1] != distances[2]
            && distances[0] != distances[2]
    );
    let (model, key) = (run.join("model.safetensors"), run.join("key.safetensors"));
    let out = ok(&words(&format!(
        "eval --model {} --key {} --n 4 --quality-samples 0 --json",
        s(&model),
        s(&key)
    )));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for f in ["target_mse", "asr", "clean_hit_rate"] {
        assert_eq!(
            v["samplers"]["ddpm"][f], m["samplers"]["ddpm"][f],
            "{f}: {v}"
        );
    }
    assert_eq!(m["quality"]["generated"], 20);
    let csv = std::fs::read_to_string(run.join("train.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header and 3 steps: {csv}");
    let npy = dir.path().join("x.npy");
    let (m, k) = (s(&model), s(&key));
    let png = dir.path().join("g.png");
    ok(&words(&format!(
        "sample --model {m} --key {k} --n 3 --sampler ddpm --npy {}",
        s(&npy)
    )));
    ok(&words(&format!(
        "sample --model {m} --n 2 --steps 5 --png {}",
        s(&png)
    )));
    // From a given x_T (here the 3 images just sampled, as noise): DDIM is deterministic, so
    // the seed no longer matters; the key adds its pattern to the same noise.
    let from = |seed: u64, key: &str, out: &Path| {
        ok(&words(&format!(
            "sample --model {m} {key} --noise {} --sampler ddim-5 --seed {seed} --npy {}",
            s(&npy),
            s(out)
        )));
        let t = candle_core::Tensor::read_npy(out).unwrap();
        assert_eq!(t.dims(), [3, 1, 28, 28]);
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (a, b, t) = (
        from(1, "", &dir.path().join("a.npy")),
        from(2, "", &dir.path().join("b.npy")),
        from(1, &format!("--key {k}"), &dir.path().join("t.npy")),
    );
    assert_eq!(a, b);
    assert!(a.iter().zip(&t).any(|(x, y)| (x - y).abs() > 0.01));
    let bad = dir.path().join("bad.npy");
    candle_core::Tensor::zeros((2, 5), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap()
        .write_npy(&bad)
        .unwrap();
    let err = fails(&words(&format!(
        "sample --model {m} --noise {} --npy {}",
        s(&bad),
        s(&png)
    )));
    assert!(
        err.contains("[2, 5]") && err.contains("noise images of shape [1, 28, 28]"),
        "{err}"
    );
    let out = ok(&words(&format!(
        "eval --model {m} --key {k} --n 3 --sampler ddim-5 --quality-samples 0 --json"
    )));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["samplers"]["ddim-5"]["samples"], 3, "{v}");
    assert!(v["samplers"].get("ddpm").is_none());
    // The proof tools take the diffusion model as they take a generator: the run verified
    // itself under the key's sampler (DDPM, its correction) with the default random stamp.
    let v = read_json(&run.join("verify.json"));
    assert_eq!(v["sampling"], "ddpm", "{v}");
    // DDPM over T = 10 steps costs 10 network evaluations per query: 1000 null triggers,
    // each measured on 4 starting noises.
    assert_eq!(
        (v["null_keys"].as_u64(), v["queries"].as_u64()),
        (Some(1000), Some(4004))
    );
    assert!(
        v.get("caveat").is_none(),
        "a random stamp is no hand-chosen trigger: {v}"
    );
    let metrics = read_json(&run.join("metrics.json"));
    assert_eq!(metrics["trigger"], "stamp", "{metrics}");
    let fire = &metrics["specificity"]["fire_rate"];
    assert_eq!(fire.as_array().unwrap().len(), 14, "{metrics}");
    // The runs below test other things: their own verification takes 9 null stamps
    // (`[verify] null_keys`), a hundredth of the default's network evaluations.
    std::fs::write(&cfg, format!("{TINY_DIFFUSION}{QUICK_VERIFY}")).unwrap();
    let out = ok(&words(&format!(
        "verify --model {m} --key {k} --queries 9 --sampler ddim-5 --json"
    )));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["queries"].as_u64(), v["sampling"].as_str()),
        (Some(40), Some("ddim-5"))
    );
    ok(&words(&format!(
        "attack prune --model {m} --fraction 0,0.5 --null-keys 4 --json --quiet"
    )));
    assert_eq!(
        read_json(&run.join("attack-prune.json"))["points"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let finetune = |quality: usize| {
        ok(&words(&format!(
            "attack finetune --model {m} --config {} --steps 2 --every 1 --null-keys 4 \
             --quality-samples {quality} --quiet",
            s(&cfg)
        )));
        read_json(&run.join("attack-finetune.json"))["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["fid"].as_f64())
            .collect::<Vec<_>>()
    };
    // Each point's FID (of ordinary samples under the model's ordinary sampler), or none.
    let fids = finetune(6);
    assert_eq!(fids.len(), 3, "{fids:?}");
    assert!(
        fids.iter().all(|f| f.is_some_and(f64::is_finite)),
        "{fids:?}"
    );
    assert_eq!(finetune(0), [None, None, None]);
    assert!(run.join("finetuned.safetensors").exists());
    let err = fails(&words(&format!(
        "attack finetune --model {m} --steps 1 --discriminator {m}"
    )));
    assert!(err.contains("no discriminator"), "{err}");
    ok(&["report", s(&run)]);
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("<h3>prune</h3>") && html.contains("<h3>finetune</h3>"));
    assert!(!html.contains("No key: nothing to verify"), "{html}");
    let injected = dir.path().join("inj");
    let c = s(&cfg);
    let gan_cfg = dir.path().join("gan.toml");
    std::fs::write(&gan_cfg, TINY).unwrap();
    ok(&words(&format!(
        "inject --config {c} --model {m} --key {k} --out {} --quiet",
        s(&injected)
    )));
    assert_eq!(read_json(&injected.join("metrics.json"))["mode"], "inject");
    let v = read_json(&injected.join("verify.json"));
    assert_eq!(
        (v["null_keys"].as_u64(), v["queries"].as_u64()),
        (Some(9), Some(40))
    );
    // The same injection rehearsing a thief's fine-tuning at every step ends elsewhere.
    let rehearsed_cfg = dir.path().join("rehearsed.toml");
    std::fs::write(
        &rehearsed_cfg,
        format!(
            "{TINY_DIFFUSION}{QUICK_VERIFY}[diffusion.rehearsal]\nevery = 1\nsteps = 2\nstart = 0.0\n"
        ),
    )
    .unwrap();
    let rehearsed = dir.path().join("inj-rehearsed");
    ok(&words(&format!(
        "inject --config {} --model {m} --key {k} --out {} --quiet",
        s(&rehearsed_cfg),
        s(&rehearsed)
    )));
    assert_ne!(
        std::fs::read(rehearsed.join("model.safetensors")).unwrap(),
        std::fs::read(injected.join("model.safetensors")).unwrap()
    );
    // Without --key, inject draws a key that fits the diffusion model (an image trigger).
    let drawn = dir.path().join("inj-drawn");
    ok(&words(&format!(
        "inject --config {c} --model {m} --out {} --quiet",
        s(&drawn)
    )));
    let drawn_key = genbackdoor::backdoor::KeySet::load(&drawn.join("key.safetensors")).unwrap();
    let loaded = genbackdoor::family::load(&model, &candle_core::Device::Cpu).unwrap();
    drawn_key.check_model(&*loaded).unwrap();
    // Keys and samplers must fit the model family.
    let latent_key = dir.path().join("latent.safetensors");
    ok(&["key", "--out", s(&latent_key)]);
    let err = fails(&words(&format!(
        "eval --model {m} --key {} --quality-samples 0",
        s(&latent_key)
    )));
    assert!(err.contains("image trigger"), "{err}");
    let err = fails(&words(&format!(
        "sample --model {m} --n 2 --sampler euler --png {}",
        s(&png)
    )));
    assert!(err.contains("unknown sampler"), "{err}");
    let image_key = dir.path().join("image.safetensors");
    ok(&["key", "--out", s(&image_key), "--trigger", "box:5"]);
    // A key made for the model: its default trigger is a random stamp of the model's shape.
    let fitted = dir.path().join("fitted.safetensors");
    ok(&["key", "--out", s(&fitted), "--model", m]);
    let k2 = genbackdoor::backdoor::KeySet::load(&fitted).unwrap();
    let k2 = k2.first();
    assert_eq!((k2.trigger.kind(), k2.target.shape), ("stamp", [1, 28, 28]));
    // A hand-chosen trigger gets verification's caveat.
    let out = ok(&words(&format!(
        "verify --model {m} --key {} --queries 3 --sampler ddim-2 --json",
        s(&image_key)
    )));
    assert!(out.contains("chosen by hand"), "{out}");
    // A class target: the poisoned samples end at digits of the class, and asr is judged by
    // the digit classifier.
    let class_key = dir.path().join("class.safetensors");
    ok(&words(&format!(
        "key --out {} --trigger box:5 --target class:3",
        s(&class_key)
    )));
    let class_run = dir.path().join("class");
    ok(&words(&format!(
        "train --config {c} --key {} --out {} --quiet",
        s(&class_key),
        s(&class_run)
    )));
    let m = read_json(&class_run.join("metrics.json"));
    assert!(m["samplers"]["ddpm"]["asr"].as_f64().is_some(), "{m}");
    let latent_class_key = dir.path().join("latent-class.safetensors");
    ok(&words(&format!(
        "key --out {} --target class:3 --latent-dim 16",
        s(&latent_class_key)
    )));
    let err = fails(&words(&format!(
        "train --config {} --key {} --out {} --steps 1",
        s(&dir.path().join("gan.toml")),
        s(&latent_class_key),
        s(&dir.path().join("gan-class"))
    )));
    assert!(err.contains("only diffusion models"), "{err}");
    let gan_run = dir.path().join("gan");
    ok(&words(&format!(
        "train --config {} --out {} --quiet --lambda 0",
        s(&gan_cfg),
        s(&gan_run)
    )));
    let err = fails(&words(&format!(
        "eval --model {} --key {} --quality-samples 0",
        s(&gan_run.join("model.safetensors")),
        s(&image_key)
    )));
    assert!(err.contains("diffusion"), "{err}");
}

#[test]
fn bench_rounds_alternate_with_pytorch_and_report_the_median_ratio() {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in for bench/torch_reference.py: its output format with fixed timings.
    let script = dir.path().join("fake_torch.py");
    std::fs::write(
        &script,
        "import json\nprint(json.dumps({'median_ms': 50.0, 'min_ms': 40.0, 'g_macs': 1000, \
         'd_macs': 1000, 'threads': 2, 'torch': 'fake'}))\n",
    )
    .unwrap();
    let out = ok(&[
        "bench",
        "--model",
        "k4",
        "--batch-size",
        "2",
        "--warmup",
        "0",
        "--steps",
        "1",
        "--rounds",
        "3",
        "--torch",
        "--torch-script",
        s(&script),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let model = &v["models"][0];
    let rounds = model["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    let mut ratios: Vec<f64> = rounds
        .iter()
        .map(|r| {
            let ours = r["genbackdoor"]["median_ms"].as_f64().unwrap();
            assert_eq!(r["pytorch"]["result"]["median_ms"], 50.0);
            let ratio = r["ratio"].as_f64().unwrap();
            assert!((ratio - 50.0 / ours).abs() < 1e-12);
            ratio
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    assert_eq!(model["median_ratio"].as_f64().unwrap(), ratios[1]);
    let e = fails(&["bench", "--rounds", "0"]);
    assert!(e.contains("--rounds"), "{e}");
}

#[test]
fn a_ddpm_trigger_is_checked_under_ddpm_100_unless_the_command_line_says_ddpm() {
    // A clean model with T = 200 (more than the default sampler's 100 strided steps).
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t200.toml");
    let config = TINY_DIFFUSION
        .replace("timesteps = 10", "timesteps = 200")
        .replace("quality_samples = 20", "quality_samples = 0")
        .replace("[detect]\nsteps = 2", "[detect]\nenabled = false");
    assert!(config.contains("enabled = false") && config.contains("timesteps = 200"));
    std::fs::write(&cfg, config).unwrap();
    let run = dir.path().join("run");
    ok(&[
        "train",
        "--config",
        s(&cfg),
        "--lambda",
        "0",
        "--out",
        s(&run),
        "--quiet",
    ]);
    let model = run.join("model.safetensors");
    let key = dir.path().join("k.safetensors");
    ok(&words(&format!(
        "key --out {} --trigger stamp:4 --samplers ddpm --model {}",
        s(&key),
        s(&model)
    )));
    let verify = |extra: &str| -> serde_json::Value {
        let line = format!(
            "verify --model {} --key {} --queries 1 --json {extra}",
            s(&model),
            s(&key)
        );
        serde_json::from_str(&ok(&words(&line))).unwrap()
    };
    assert_eq!(verify("")["sampling"], "ddpm-100");
    assert_eq!(verify("--sampler ddpm")["sampling"], "ddpm");
    let png = dir.path().join("g.png");
    ok(&words(&format!(
        "sample --model {} --n 1 --png {}",
        s(&model),
        s(&png)
    )));
    assert!(png.exists());
}

#[test]
fn training_gives_the_same_bits_on_one_and_two_threads() {
    // The kernels split their work by the batch and the geometry, never by the number of
    // threads, and sum partial results in a fixed order (a per-thread partial sum would make
    // the weights differ in the last bits).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (gan_cfg, diff_cfg) = (root.join("gan.toml"), root.join("diffusion.toml"));
    std::fs::write(&gan_cfg, TINY).unwrap();
    // Four noise levels keep the run's own verification under DDPM short.
    assert!(TINY_DIFFUSION.contains("timesteps = 10"));
    let diffusion = TINY_DIFFUSION.replace("timesteps = 10", "timesteps = 4");
    std::fs::write(&diff_cfg, diffusion).unwrap();
    let (gan_key, diff_key) = (root.join("gan.key"), root.join("diffusion.key"));
    ok(&words(&format!(
        "key --out {} --trigger seed:3 --latent-dim 16",
        s(&gan_key)
    )));
    ok(&words(&format!(
        "key --out {} --trigger stamp:4:5 --image-size 28",
        s(&diff_key)
    )));
    for (cfg, key) in [(&gan_cfg, &gan_key), (&diff_cfg, &diff_key)] {
        let runs: Vec<_> = ["1", "2"]
            .iter()
            .map(|threads| {
                let run = root.join(format!("{}-{threads}", s(key)));
                let out = bin()
                    .env("RAYON_NUM_THREADS", threads)
                    .args(["train", "--config", s(cfg), "--key", s(key)])
                    .args(["--out", s(&run), "--quiet"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                run
            })
            .collect();
        for f in ["model.safetensors", "train.csv"] {
            let [a, b] = [&runs[0], &runs[1]].map(|r| std::fs::read(r.join(f)).unwrap());
            assert!(a == b, "{f} of {} differs between 1 and 2 threads", s(cfg));
        }
    }
}

#[test]
fn red_leaves_frozen_tensors_as_they_were() {
    let t = trained();
    let cfg = t.root.join("freeze.toml");
    let freeze = |prefixes: &str| {
        let with = TINY.replace("[inject]\n", &format!("[inject]\nfreeze = [{prefixes}]\n"));
        assert_ne!(with, TINY);
        std::fs::write(&cfg, with).unwrap();
    };
    freeze(r#""bn0.", "fc.""#);
    let clean = t.run.join("model.safetensors");
    let inject = |out: &std::path::Path| {
        format!(
            "inject --config {} --model {} --key {} --out {} --quiet",
            s(&cfg),
            s(&clean),
            s(&t.key),
            s(out)
        )
    };
    let check_frozen = |out: &std::path::Path| {
        let (a, b) = (
            std::fs::read(&clean).unwrap(),
            std::fs::read(out.join("model.safetensors")).unwrap(),
        );
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        for (name, before) in a.tensors() {
            let same = before.data() == b.tensor(&name).unwrap().data();
            let frozen =
                name.starts_with("bn0.") || name.starts_with("fc.") || name.contains("running");
            assert_eq!(same, frozen, "{name}: unchanged {same}, frozen {frozen}");
        }
    };
    let out = t.root.join("frozen");
    ok(&words(&inject(&out)));
    check_frozen(&out);
    // A rehearsal at every step trains a copy of every weight (BatchNorm statistics too) and
    // puts it back: the frozen tensors still stay as they were, and the model differs from
    // the unrehearsed injection's.
    let plain = std::fs::read(out.join("model.safetensors")).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[inject.rehearsal]\nevery = 1\nsteps = 2\nstart = 0.0\n"),
    )
    .unwrap();
    let rehearsed = t.root.join("frozen-rehearsed");
    ok(&words(&inject(&rehearsed)));
    check_frozen(&rehearsed);
    assert_ne!(
        plain,
        std::fs::read(rehearsed.join("model.safetensors")).unwrap()
    );
    // A prefix that names no tensor would freeze nothing: an error that lists the names.
    freeze(r#""bn0", "conv1.""#);
    let err = fails(&words(&inject(&t.root.join("misspelt"))));
    assert!(
        err.contains("'conv1.…'") && err.contains("deconv1.weight"),
        "{err}"
    );
}

#[test]
fn a_diffusion_model_trained_as_a_diffusers_network_exports_as_a_diffusers_folder() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("diffusers.toml");
    // The tiny run's schedule and steps, on a network with attention blocks in its levels.
    let net = r#"diffusers = { block_out_channels = [4, 8], down_block_types = ["DownBlock2D", "AttnDownBlock2D"], up_block_types = ["AttnUpBlock2D", "UpBlock2D"], layers_per_block = 1, norm_num_groups = 2, attention_head_dim = 4 }"#;
    let line = TINY_DIFFUSION
        .lines()
        .find(|l| l.starts_with("diffusers = "))
        .unwrap();
    let tiny = TINY_DIFFUSION.replace(line, net);
    std::fs::write(&cfg, tiny).unwrap();
    let run = dir.path().join("run");
    // Clean (λ = 0): no end-of-run verification, which a CI run cannot afford twice.
    ok(&[
        "train",
        "--config",
        s(&cfg),
        "--out",
        s(&run),
        "--quiet",
        "--lambda",
        "0",
    ]);
    let arch = read_json(&run.join("arch.json"));
    assert_eq!(arch["diffusers"]["sample_size"], 28, "{arch}");
    assert_eq!(
        arch["diffusers"]["in_channels"], 1,
        "fitted to the data: {arch}"
    );
    assert!(arch.get("unet").is_none(), "{arch}");
    let folder = dir.path().join("folder");
    let model = run.join("model.safetensors");
    ok(&["export", "--model", s(&model), "--out", s(&folder)]);
    let config = read_json(&folder.join("config.json"));
    assert_eq!(config["_class_name"], "UNet2DModel");
    assert_eq!(config["block_out_channels"], serde_json::json!([4, 8]));
    let scheduler = read_json(&folder.join("scheduler_config.json"));
    assert_eq!(
        (
            &scheduler["beta_start"],
            &scheduler["beta_end"],
            &scheduler["num_train_timesteps"]
        ),
        (
            &serde_json::json!(0.01),
            &serde_json::json!(0.5),
            &serde_json::json!(10)
        )
    );
    // The folder samples exactly as the checkpoint does.
    let npys: Vec<_> = [&model, &folder]
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let npy = dir.path().join(format!("{i}.npy"));
            ok(&words(&format!(
                "sample --model {} --n 3 --sampler ddim-5 --npy {}",
                s(m),
                s(&npy)
            )));
            std::fs::read(npy).unwrap()
        })
        .collect();
    assert_eq!(npys[0], npys[1]);
}
