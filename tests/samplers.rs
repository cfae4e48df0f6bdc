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
    let schedule = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
    let strided = fixture["ddpm_strided"].as_object().unwrap();
    assert_eq!(strided.len(), 2, "DDPM over 10 and 50 timesteps");
    let cases = std::iter::once(("ddpm", &fixture["ddpm"]))
        .chain(strided.iter().map(|(name, case)| (name.as_str(), case)));
    for (name, case) in cases {
        let sampler: Sampler = name.parse().unwrap();
        let visited = sampler.timesteps(&schedule).unwrap();
        let values =
            |v: &serde_json::Value| -> Vec<f32> { serde_json::from_value(v.clone()).unwrap() };
        let x = Tensor::from_vec(values(&case["x"]), shape.as_slice(), &Device::Cpu).unwrap();
        let steps = case["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 4);
        for step in steps {
            let number = |k: &str| step[k].as_u64().unwrap() as usize;
            let (t, s) = (number("t"), number("s"));
            // The sampler steps from t to the timestep diffusers steps to.
            let i = visited.iter().position(|&v| v == t).unwrap();
            assert_eq!(
                visited.get(i + 1).copied().unwrap_or(0),
                s,
                "{name}: t = {t}"
            );
            let eps = eps_model(&x, t).unwrap();
            let (mean, variance) = ddpm_posterior(&schedule, &x, &eps, t, s).unwrap();
            let mean = mean.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let err = mean
                .iter()
                .zip(values(&step["mean"]))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let want = step["variance"].as_f64().unwrap();
            // diffusers keeps ᾱ_t in float32, so its 1 − ᾱ_t carries an absolute error of about
            // 6e-8 (2.2e-4 ± 6e-8 at t = 2): its own step is that much further from the exact one
            // near t = 1, and the bound grows with 1 / (1 − ᾱ_t) there (and the variance's with
            // 1 / (1 − ᾱ_s) too: 1 − ᾱ_1 = 1e-4 ± 6e-8). Its last step's variance is clamped
            // to 1e-20 instead of 0 (and never used: no noise at s = 0).
            let near_one = |t: usize| 1e-7 / (1.0 - schedule.alpha_bar(t));
            let tol = 1e-4 + near_one(t);
            let (rel, variance_tol) = match s {
                0 => (variance, 0.0),
                _ => ((variance - want).abs() / want, tol + near_one(s)),
            };
            eprintln!(
                "{name} step from t = {t} to {s}: mean max abs error {err:.2e} (bound {tol:.1e}), variance relative {rel:.1e}"
            );
            assert!(f64::from(err) <= tol, "{name}, t = {t}: {err}");
            assert!(rel <= variance_tol, "{name}, t = {t}: {variance} vs {want}");
        }
    }
}

#[test]
fn ddpm_over_every_timestep_is_ddpm_and_fewer_strides_stay_stochastic() {
    let schedule = NoiseSchedule::new(ScheduleKind::default(), 1000).unwrap();
    let x_t = Rng::new(5).normal(&[2, 1, 4, 4], &Device::Cpu).unwrap();
    let run = |name: &str, seed: u64| -> Vec<f32> {
        let sampler: Sampler = name.parse().unwrap();
        let x = sampler
            .run(&schedule, x_t.clone(), &mut eps_model, &mut Rng::new(seed))
            .unwrap();
        x.flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(run("ddpm-1000", 1), run("ddpm", 1), "bit for bit");
    let (a, b) = (run("ddpm-20", 1), run("ddpm-20", 2));
    let differ = a
        .iter()
        .zip(&b)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(differ > 0.1, "other noise, other image: {differ}");
    assert_eq!(a, run("ddpm-20", 1), "the same seed, the same image");
    assert_eq!("ddpm-20".parse::<Sampler>().unwrap().to_string(), "ddpm-20");
    assert!("ddpm-0".parse::<Sampler>().is_err());
    assert!("ddpm-1001"
        .parse::<Sampler>()
        .unwrap()
        .timesteps(&schedule)
        .is_err());
}
