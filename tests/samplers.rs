//! Sampler parity with diffusers: one DDPM step's mean and variance, and, from the same x_T
//! and the same analytic noise predictor,
//! our samplers must land where stock diffusers schedulers do. The fixture is made by
//! `tests/fixtures/make_sampler_fixtures.py` (run by hand; CI needs no Python).

use candle_core::{Device, Tensor};
use genbackdoor::family::diffusion::sampler::ddpm_posterior;
use genbackdoor::family::diffusion::{NoiseSchedule, Sampler, ScheduleKind};
use genbackdoor::rng::Rng;

/// The fixture's noise predictor: `tanh(x)·(0.5 + t/T) + 0.1` at our timestep t.
fn eps_model(x: &Tensor, t: usize) -> genbackdoor::Result<Tensor> {
    Ok(((x.tanh()? * (0.5 + t as f64 / 1000.0))? + 0.1)?)
}

#[test]
fn ddim_dpm_solver_and_heun_match_diffusers_from_the_same_start() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/samplers.json")).unwrap();
    let shape: Vec<usize> = serde_json::from_value(fixture["shape"].clone()).unwrap();
    let values = |v: &serde_json::Value| -> Vec<f32> { serde_json::from_value(v.clone()).unwrap() };
    let x_t = Tensor::from_vec(values(&fixture["x_t"]), shape.as_slice(), &Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
    let samples = fixture["samples"].as_object().unwrap();
    assert_eq!(
        samples.len(),
        6,
        "DDIM, DPM-Solver++ and Heun at 10 and 50 steps"
    );
    for (name, want) in samples {
        let sampler: Sampler = name.parse().unwrap();
        let got = sampler
            .run(&schedule, x_t.clone(), &mut eps_model, &mut Rng::new(0))
            .unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = got
            .iter()
            .zip(values(want))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{name}: max abs error {err:.2e} against {}",
            fixture["made_by"]
        );
        assert!(err <= 1e-4, "{name}: {err}");
    }
}

#[test]
fn a_ddpm_step_has_the_mean_and_variance_of_diffusers_ddpm_scheduler() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/samplers.json")).unwrap();
    let shape: Vec<usize> = serde_json::from_value(fixture["shape"].clone()).unwrap();
    let ddpm = &fixture["ddpm"];
    let values = |v: &serde_json::Value| -> Vec<f32> { serde_json::from_value(v.clone()).unwrap() };
    let x = Tensor::from_vec(values(&ddpm["x"]), shape.as_slice(), &Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
    let steps = ddpm["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    for step in steps {
        let t = step["t"].as_u64().unwrap() as usize;
        let eps = eps_model(&x, t).unwrap();
        let (mean, variance) = ddpm_posterior(&schedule, &x, &eps, t).unwrap();
        let mean = mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let err = mean
            .iter()
            .zip(values(&step["mean"]))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let want = step["variance"].as_f64().unwrap();
        let rel = (variance - want).abs() / want;
        // diffusers keeps ᾱ_t in float32, so its 1 − ᾱ_t carries an absolute error of about
        // 6e-8 (2.2e-4 ± 6e-8 at t = 2): its own step is that much further from the exact one
        // near t = 1, and the bound grows with 1 / (1 − ᾱ_t) there.
        let tol = 1e-4 + 1e-7 / (1.0 - schedule.alpha_bar(t));
        eprintln!(
            "DDPM step at t = {t}: mean max abs error {err:.2e} (bound {tol:.1e}), variance relative {rel:.1e}"
        );
        assert!(f64::from(err) <= tol, "t = {t}: {err}");
        assert!(rel <= tol, "t = {t}: {variance} vs {want}");
    }
}
