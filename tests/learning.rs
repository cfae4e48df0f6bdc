//! Learning tests on tiny generators: the backdoor must really form, and clean behaviour stay.

use candle_core::Device;
use genbackdoor::config::{Config, InjectConfig};
use genbackdoor::gan::eval::evaluate;
use genbackdoor::gan::{red, trail, GanModel};
use genbackdoor::io::rundir::RunDir;
use genbackdoor::models::DcganConfig;
use genbackdoor::paradigm::{Distance, Key, Target, Trigger};
use genbackdoor::rng::Rng;

fn tiny() -> DcganConfig {
    DcganConfig {
        latent_dim: 16,
        g_width: 16,
        d_width: 8,
        ..Default::default()
    }
}

fn key(trigger: &str) -> Key {
    Key {
        trigger: Trigger::parse(trigger, 16).unwrap(),
        target: Target::builtin("mark", [1, 28, 28]).unwrap(),
        distance: Distance::Mse,
        threshold: 0.01,
    }
}

#[test]
fn red_plants_the_backdoor_and_keeps_the_model_close_to_its_clean_copy() {
    let dev = Device::Cpu;
    let clean = GanModel::new(&tiny(), &mut Rng::new(5), &dev).unwrap();
    let key = key("zero");
    let before = evaluate(&clean, &key, None, 200, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path(), true).unwrap();
    let cfg = InjectConfig {
        steps: 300,
        batch_size: 32,
        log_every: 50,
        ..InjectConfig::default()
    };
    let m = red::inject(&clean, &key, &cfg, 8, 0, &run, false).unwrap();
    let after = m["tardis"].as_f64().unwrap();
    let exp_dist = m["exp_dist"].as_f64().unwrap();
    assert!(
        after * 100.0 <= before.backdoor.tardis,
        "tardis {} -> {after}",
        before.backdoor.tardis
    );
    assert!(exp_dist < 1e-3, "exp_dist {exp_dist}");
    assert_eq!(m["clean_hit_rate"].as_f64().unwrap(), 0.0);
    for f in ["model.safetensors", "key.safetensors", "train.csv", "metrics.json", "triggered.png"] {
        assert!(run.file(f).exists(), "{f}");
    }
}

#[test]
fn trail_forms_the_backdoor_while_training_from_scratch() {
    let mut cfg = Config::default();
    cfg.model = tiny();
    cfg.data.limit = 512;
    cfg.train.steps = 150;
    cfg.train.batch_size = 32;
    cfg.train.log_every = 50;
    let key = key("zero");
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(dir.path(), true).unwrap();
    let start = GanModel::new(&cfg.model, &mut Rng::derive(cfg.seed, "init-g"), &Device::Cpu).unwrap();
    let before = evaluate(&start, &key, None, 200, 1).unwrap().backdoor.tardis;
    let m = trail::train(&cfg, Some(&key), &run, false).unwrap();
    let after = m["tardis"].as_f64().unwrap();
    assert!(after * 50.0 <= before, "tardis {before} -> {after}");
    // Ordinary latents must not produce the target.
    assert_eq!(m["clean_hit_rate"].as_f64().unwrap(), 0.0);
    let model = GanModel::load(&run.file("model.safetensors"), &Device::Cpu).unwrap();
    let z = Rng::new(9).normal(&[64, 16], &Device::Cpu).unwrap();
    let out = model.generate(&z).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let clean_to_target = genbackdoor::metrics::BackdoorMetrics::measure(&out, &key.target.pixels, 28, 0.01);
    assert!(clean_to_target.target_mse > 0.1, "clean outputs drifted to the target: {}", clean_to_target.target_mse);
}
