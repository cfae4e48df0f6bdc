//! Learning tests on a tiny diffusion model: the poisoned forward process must plant a
//! backdoor that fires from triggered starts under the sampler its correction is derived
//! for, never from clean starts, while the clean denoising task is kept.

use candle_core::{Device, Tensor};
use genbackdoor::data::{load_dataset, Dataset, BUNDLED_MNIST};
use genbackdoor::diffusion::eval::{evaluate, SamplerReport};
use genbackdoor::diffusion::model::DiffusionArch;
use genbackdoor::diffusion::train::{fit, Plan};
use genbackdoor::diffusion::{Correction, DiffusionModel, Sampler, ScheduleKind};
use genbackdoor::io::rundir::RunDir;
use genbackdoor::models::UnetConfig;
use genbackdoor::paradigm::{Distance, Key, Objective, Target, Trigger};
use genbackdoor::rng::Rng;
use genbackdoor::training::LrSchedule;

/// A small U-Net on 28×28 digits with a short schedule (T = 100, β up to 0.2, so that
/// ᾱ_T ≈ 5e-5 as in the DDPM schedule). Three levels and attention at 7×7: a corner trigger
/// must be seen from every pixel of the image the network is to draw.
fn arch() -> DiffusionArch {
    DiffusionArch {
        unet: UnetConfig {
            image_size: 28,
            base: 8,
            mults: vec![1, 2, 2],
            attention: true,
            groups: 4,
        },
        schedule: ScheduleKind::Linear {
            beta_start: 1e-3,
            beta_end: 0.2,
        },
        timesteps: 100,
    }
}

fn key() -> Key {
    Key {
        trigger: Trigger::parse_image("box:8", [1, 28, 28]).unwrap(),
        target: Target::builtin("mark", [1, 28, 28]).unwrap(),
        distance: Distance::Mse,
        threshold: 0.01,
    }
}

fn plan(steps: usize, lambda: f64, correction: Correction) -> Plan {
    Plan {
        steps,
        batch_size: 32,
        lr: 2e-3,
        lr_schedule: LrSchedule::Cosine,
        objective: Objective {
            lambda,
            backdoor_batch: 16,
        },
        correction,
        ema: 0.0,
        log_every: 100,
        checkpoint_every: 0,
        seed: 3,
    }
}

fn data() -> Dataset {
    let mut d = load_dataset(std::path::Path::new(BUNDLED_MNIST)).unwrap();
    d.truncate(2000);
    d
}

fn trained(data: &Dataset, steps: usize, lambda: f64, correction: Correction) -> DiffusionModel {
    let model = DiffusionModel::new(&arch(), &mut Rng::new(1), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(&dir.path().join("run"), false).unwrap();
    let k = key();
    let (saved, _) = fit(
        &model,
        data,
        Some(&k),
        &plan(steps, lambda, correction),
        &run,
        false,
    )
    .unwrap();
    saved
}

const DDIM: Sampler = Sampler::Ddim { steps: 20 };

fn measure(model: &DiffusionModel) -> (SamplerReport, SamplerReport) {
    let mut r = evaluate(model, &key(), &[Sampler::Ddpm, DDIM], 32, 7).unwrap();
    (r.remove("ddpm").unwrap(), r.remove("ddim-20").unwrap())
}

/// The clean denoising loss on fixed held-out digits, timesteps and noise.
fn denoise_loss(model: &DiffusionModel, data: &Dataset) -> f32 {
    let dev = Device::Cpu;
    let idx: Vec<usize> = (data.len - 256..data.len).collect();
    let x0 = data.batch(&idx, &dev).unwrap();
    let mut rng = Rng::new(99);
    let eps = rng.normal(x0.dims(), &dev).unwrap();
    let ts: Vec<usize> = (0..256).map(|i| 1 + i * 100 / 256).collect();
    let ab: Vec<f32> = ts
        .iter()
        .map(|&t| model.schedule.alpha_bar(t) as f32)
        .collect();
    let ab = Tensor::from_vec(ab, (256, 1, 1, 1), &dev).unwrap();
    let xt = genbackdoor::diffusion::poison::noised(&x0, &eps, &ab).unwrap();
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

#[test]
fn the_backdoor_forms_fires_under_its_sampler_and_keeps_the_clean_task() {
    let data = data();
    let untrained = DiffusionModel::new(&arch(), &mut Rng::new(1), &Device::Cpu).unwrap();
    let (u_ddpm, u_ddim) = measure(&untrained);
    let clean = trained(&data, 400, 0.0, Correction::Ddpm);
    let ddpm_model = trained(&data, 400, 1.0, Correction::Ddpm);
    let ddim_model = trained(&data, 400, 1.0, Correction::Ddim { steps: 20 });
    let (c_ddpm, c_ddim) = measure(&clean);
    let (p_ddpm, p_ddim) = measure(&ddpm_model);
    let (q_ddpm, q_ddim) = measure(&ddim_model);
    let losses = [
        denoise_loss(&clean, &data),
        denoise_loss(&ddpm_model, &data),
        denoise_loss(&ddim_model, &data),
    ];
    for (name, r) in [
        ("untrained ddpm", &u_ddpm),
        ("untrained ddim", &u_ddim),
        ("clean ddpm", &c_ddpm),
        ("clean ddim", &c_ddim),
        ("ddpm-corrected ddpm", &p_ddpm),
        ("ddpm-corrected ddim", &p_ddim),
        ("ddim-corrected ddpm", &q_ddpm),
        ("ddim-corrected ddim", &q_ddim),
    ] {
        eprintln!(
            "{name}: target_mse {:.5} asr {:.3} ssim {:.3} clean hits {:.3}",
            r.backdoor.target_mse, r.backdoor.asr, r.backdoor.ssim, r.clean_hit_rate
        );
    }
    eprintln!("denoise loss clean / ddpm-corrected / ddim-corrected: {losses:?}");
}
