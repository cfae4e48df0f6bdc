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
    // Summed in f64, so that the loss's own rounding (over many outputs) stays far below
    // the differences it measures.
    let r = r.to_dtype(candle_core::DType::F64).unwrap();
    let loss = |ts: &[Tensor]| -> f64 {
        let y = f(ts).to_dtype(candle_core::DType::F64).unwrap();
        (y * &r)
            .unwrap()
            .sum_all()
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

/// The input value that tap `t` of output position `(yy, xx)` of channel `ci` of image `i`
/// reads from `x [n, c, h, w]`: zero in the padding.
fn tapped(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    (i, ci, yy, xx, t): (usize, usize, usize, usize, usize),
) -> f32 {
    // Coordinates in the padded plane, where the image spans 1..=h and 1..=w.
    let (sy, sx) = (yy + t / 3, xx + t % 3);
    if sy == 0 || sx == 0 || sy > h || sx > w {
        return 0.0;
    }
    x[((i * c + ci) * h + sy - 1) * w + sx - 1]
}

/// The plain definition: `y[i, co, y, x] = Σ w[co, ci, dy, dx] · x[i, ci, y+dy−1, x+dx−1]`.
fn conv3x3_reference(
    x: &[f32],
    w: &[f32],
    (g, c, c2, h, wd): (usize, usize, usize, usize, usize),
) -> Vec<f32> {
    let mut y = vec![0f32; g * c2 * h * wd];
    for i in 0..g {
        for co in 0..c2 {
            for yy in 0..h {
                for xx in 0..wd {
                    y[((i * c2 + co) * h + yy) * wd + xx] = (0..c * 9)
                        .map(|k| {
                            let (ci, t) = (k / 9, k % 9);
                            w[co * c * 9 + k] * tapped(x, (c, h, wd), (i, ci, yy, xx, t))
                        })
                        .sum();
                }
            }
        }
    }
    y
}

/// Images, input and output channels, height and width of a 3×3 convolution under test.
pub type Conv3x3Dims = (usize, usize, usize, usize, usize);

/// Checks a 3×3 stride-1 padding-1 convolution kernel against the definition on `shapes`:
/// `forward(x, w, dims)` must give `y [g, c2, h, w]`, and `weight_grad(x, dy, dims)` the
/// gradient of `Σ dy · y` with respect to the weight, transposed (`[c·9, c2]`).
pub fn check_conv3x3_kernel(
    shapes: &[Conv3x3Dims],
    seed: u64,
    forward: impl Fn(&[f32], &[f32], Conv3x3Dims) -> Vec<f32>,
    weight_grad: impl Fn(&[f32], &[f32], Conv3x3Dims) -> Vec<f32>,
) {
    let mut rng = Rng::new(seed);
    for &dims in shapes {
        let (g, c, c2, h, w) = dims;
        let x = rng.normal_vec(g * c * h * w);
        let wt = rng.normal_vec(c2 * c * 9);
        let y = forward(&x, &wt, dims);
        let want = conv3x3_reference(&x, &wt, dims);
        for (a, b) in y.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{a} vs {b} at {dims:?}"
            );
        }
        let dy = rng.normal_vec(g * c2 * h * w);
        let dwt = weight_grad(&x, &dy, dims);
        for co in 0..c2 {
            for ci in 0..c {
                for t in 0..9 {
                    let want: f32 = (0..g * h * w)
                        .map(|j| {
                            let (i, yy, xx) = (j / (h * w), j / w % h, j % w);
                            dy[((i * c2 + co) * h + yy) * w + xx]
                                * tapped(&x, (c, h, w), (i, ci, yy, xx, t))
                        })
                        .sum();
                    let got = dwt[(ci * 9 + t) * c2 + co];
                    assert!(
                        (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                        "dw {got} vs {want} at {dims:?}"
                    );
                }
            }
        }
    }
}
