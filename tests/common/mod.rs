//! Helpers shared by the learning and parity tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use genbackdoor::backdoor::{Distance, Key, KeySet, Objective, Target, Trigger};
use genbackdoor::config::Config;
use genbackdoor::data::Dataset;
use genbackdoor::family::diffusion::model::DiffusionArch;
use genbackdoor::family::diffusion::train::Plan;
use genbackdoor::family::diffusion::{Correction, DiffusionModel, ScheduleKind};
use genbackdoor::models::{DcganConfig, DiffusersConfig};
use genbackdoor::rng::Rng;
use genbackdoor::training::LrSchedule;

/// The `[diffusion]` line of the smallest diffusers U-Net the command-line tests train: two
/// levels of 4 and 8 channels, one layer each, no attention. A macro, so that TOML configs
/// can `concat!` it in a constant.
#[macro_export]
macro_rules! tiny_unet {
    () => {
        r#"diffusers = { block_out_channels = [4, 8], down_block_types = ["DownBlock2D", "DownBlock2D"], up_block_types = ["UpBlock2D", "UpBlock2D"], layers_per_block = 1, norm_num_groups = 2, add_attention = false }"#
    };
}

/// Holds the test binary's one lock: a learning test takes it first, so that its binary's
/// learning tests run one after another while cheaper tests go on beside them. Each one's
/// training already keeps both cores of the CI machine busy; two at once only contend
/// (measured: `tests/diffusion_learning.rs` 142 s with its two tests side by side, 103 s one
/// after the other; `tests/learning.rs` 139 s and 108 s). A test that failed while holding
/// it does not stop the others.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A key of `k` point triggers drawn from the secret seeds `first`, `first + 1`, … in a
/// latent space of dimension `dim`, each trained to the built-in mark of `shape`: the
/// default DCGAN key (five random points) made reproducible, since a test run's default key
/// is a fresh secret draw whose trained model differs from run to run.
pub fn seeded_key(first: u64, k: u64, dim: usize, shape: [usize; 3]) -> KeySet {
    let mark = |s: u64| Key {
        trigger: Trigger::parse(&format!("seed:{s}"), dim).unwrap(),
        target: Target::builtin("mark", shape).unwrap(),
        distance: Distance::Mse,
        threshold: 0.01,
        sampler: None,
    };
    KeySet::new((first..first + k).map(mark).collect()).unwrap()
}

/// A tiny DCGAN setup (latent dimension 16, widths 32 and 8) on the first 512 images of the
/// config's data (the bundled digits unless changed), without the end-of-run detection.
pub fn tiny_gan_config(steps: usize, lambda: f64) -> Config {
    let mut cfg = Config {
        model: DcganConfig {
            latent_dim: 16,
            g_width: 32,
            d_width: 8,
            ..Default::default()
        },
        ..Config::default()
    };
    cfg.data.limit = 512;
    cfg.train.steps = steps;
    cfg.train.batch_size = 32;
    cfg.train.lr_g = 5e-4;
    cfg.train.lr_d = 5e-4;
    cfg.train.lr_schedule = LrSchedule::Cosine;
    cfg.train.lambda = lambda;
    cfg.train.log_every = 100;
    // The keyless detector is `tests/detect.rs`'s subject, not the other tests'.
    cfg.detect.enabled = false;
    cfg
}

/// A small two-level U-Net (levels of `base` and 2 × `base` channels, attention in its middle
/// block) for `side`×`side` images of `channels` channels, under a short schedule (T = 20, β
/// from 0.01 to 0.6, so that ᾱ_T ≈ 5e-5 as in the DDPM schedule).
pub fn small_arch(side: usize, channels: usize, base: usize) -> DiffusionArch {
    DiffusionArch {
        diffusers: DiffusersConfig::small(side, channels, &[base, 2 * base], 4),
        schedule: ScheduleKind::Linear {
            beta_start: 0.01,
            beta_end: 0.6,
        },
        timesteps: 20,
    }
}

/// The clean denoising loss on the last 256 images of `data`, at fixed timesteps and noise.
pub fn denoise_loss(model: &DiffusionModel, data: &Dataset) -> f32 {
    let dev = Device::Cpu;
    let idx: Vec<usize> = (data.len - 256..data.len).collect();
    let x0 = data.batch(&idx, &dev).unwrap();
    let mut rng = Rng::new(99);
    let eps = rng.normal(x0.dims(), &dev).unwrap();
    let total = model.schedule.steps();
    let ts: Vec<usize> = (0..256).map(|i| 1 + i * total / 256).collect();
    let ab: Vec<f32> = ts
        .iter()
        .map(|&t| model.schedule.alpha_bar(t) as f32)
        .collect();
    let ab = Tensor::from_vec(ab, (256, 1, 1, 1), &dev).unwrap();
    let xt = genbackdoor::family::diffusion::poison::noised(&x0, &eps, &ab).unwrap();
    let t = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), 256, &dev).unwrap();
    let out = model.unet.forward(&xt, &t).unwrap();
    (out - eps)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Writes `n` RGB PNG images of `side`×`side` into `dir`: a reddish background with a
/// green-blue square at a random place, colours and place drawn from `seed`. Per-channel
/// means about +0.5 (red), −0.65 (green), −0.15 (blue): a model that ignores colour misses them.
pub fn coloured_squares(dir: &std::path::Path, n: usize, side: u32, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut pick = |lo: f64, hi: f64| (lo + (hi - lo) * rng.uniform() as f64) as u8;
    for i in 0..n {
        let bg = [pick(190.0, 250.0), pick(0.0, 40.0), pick(60.0, 120.0)];
        let fg = [pick(0.0, 60.0), pick(150.0, 255.0), pick(150.0, 255.0)];
        let sq = side * 3 / 8;
        let (x0, y0) = (
            pick(0.0, (side - sq) as f64 + 0.99) as u32,
            pick(0.0, (side - sq) as f64 + 0.99) as u32,
        );
        let img = image::RgbImage::from_fn(side, side, |x, y| {
            let inside = (x0..x0 + sq).contains(&x) && (y0..y0 + sq).contains(&y);
            image::Rgb(if inside { fg } else { bg })
        });
        img.save(dir.join(format!("{i:04}.png"))).unwrap();
    }
}

/// The JSON document in the file at `path` (a run's `metrics.json`, `verify.json`, …).
pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Mean of each channel of `images` (`[n, c, h, w]`).
pub fn channel_means(images: &Tensor) -> Vec<f32> {
    images
        .mean_keepdim(0)
        .unwrap()
        .mean_keepdim(2)
        .unwrap()
        .mean_keepdim(3)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Training of [`small_arch`] models: batches of 32 (and 16 poisoned samples), Adam at 3e-3
/// on a cosine schedule, no EMA, no checkpoints.
pub fn small_plan(steps: usize, lambda: f64, correction: Correction) -> Plan {
    Plan {
        steps,
        batch_size: 32,
        lr: 3e-3,
        lr_schedule: LrSchedule::Cosine,
        objective: Objective {
            lambda,
            backdoor_batch: 16,
        },
        correction,
        rollout: Default::default(),
        rehearsal: Default::default(),
        ema: 0.0,
        log_every: 100,
        checkpoint_every: 0,
        seed: 3,
        stage: "train",
    }
}

/// A file of `tests/fixtures/<dir>/`, the parity fixtures other tools made.
pub fn fixture_in(dir: &str, name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir)
        .join(name)
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_error(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
