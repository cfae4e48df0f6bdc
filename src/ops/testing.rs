//! Helpers for comparing custom ops with candle's reference implementations in tests.

use candle_core::{Device, Tensor, Var};

use crate::rng::Rng;

/// Ok when `a` and `b` have the same shape and agree to `tol` relative to `b`'s largest
/// magnitude (at least 1).
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f32) -> Result<(), String> {
    if a.dims() != b.dims() {
        return Err(format!("shapes {:?} vs {:?}", a.dims(), b.dims()));
    }
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        if (x - y).abs() > tol * scale {
            return Err(format!("element {i}: {x} vs {y}"));
        }
    }
    Ok(())
}

/// The largest absolute elementwise difference of two same-shaped tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The value of `f(inputs)` and the gradient of `sum(f(inputs) · r)` with respect to each
/// input, for a fixed random `r` drawn from `seed`.
pub fn value_and_grads(
    f: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    seed: u64,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors);
    let r = Rng::new(seed).normal(y.dims(), &Device::Cpu).unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
    (y, g)
}

/// [`value_and_grads`] for a function of one tensor.
pub fn value_and_grad(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, seed: u64) -> (Tensor, Tensor) {
    let (y, mut g) = value_and_grads(|t| f(&t[0]), &[x], seed);
    (y, g.remove(0))
}

/// Checks every `stride`-th partial derivative of `sum(f(inputs) · r)` (random `r` from `seed`)
/// against central finite differences, for each input in turn.
pub fn check_finite_differences(
    f: impl Fn(&[Tensor]) -> Tensor,
    inputs: &[&Tensor],
    seed: u64,
    stride: usize,
) {
    let (y, grads) = value_and_grads(&f, inputs, seed);
    let r = Rng::new(seed).normal(y.dims(), &Device::Cpu).unwrap();
    let loss = |ts: &[Tensor]| -> f64 {
        let l = (f(ts) * &r).unwrap().sum_all().unwrap();
        l.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-2;
    for (k, (t, g)) in inputs.iter().zip(&grads).enumerate() {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gv = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in (0..v.len()).step_by(stride) {
            let shifted = |d: f32| -> f64 {
                let mut w = v.clone();
                w[i] += d;
                let mut ts: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
                ts[k] = Tensor::from_vec(w, t.dims(), &Device::Cpu).unwrap();
                loss(&ts)
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            assert!(
                (fd - gv[i] as f64).abs() < 1e-2 * (1.0 + fd.abs()),
                "input {k}, element {i}: finite difference {fd} vs gradient {}",
                gv[i]
            );
        }
    }
}
