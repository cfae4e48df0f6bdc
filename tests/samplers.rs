//! Sampler parity with diffusers: from the same x_T and the same analytic noise predictor,
//! our samplers must land where stock diffusers schedulers do. The fixture is made by
//! `tests/fixtures/make_sampler_fixtures.py` (run by hand; CI needs no Python).

use candle_core::{Device, Tensor};
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
