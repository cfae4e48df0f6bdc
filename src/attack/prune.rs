//! Magnitude pruning: in every weight matrix and kernel, the given fraction of entries with
//! the smallest absolute value is set to zero (per layer, as PyTorch's `l1_unstructured`).

use crate::models::Params;
use crate::Result;

/// Prunes `fraction` (in [0, 1]) of each weight matrix/kernel of `params` in place; biases,
/// BatchNorm parameters and statistics are kept. Returns how many entries were zeroed.
pub fn prune_magnitude(params: &Params, fraction: f64) -> Result<usize> {
    let mut zeroed = 0;
    for (_, var) in params.named() {
        if var.dims().len() < 2 {
            continue;
        }
        let mut w = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let k = ((w.len() as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
        if k == 0 {
            continue;
        }
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| w[a].abs().total_cmp(&w[b].abs()));
        for &i in &order[..k] {
            w[i] = 0.0;
        }
        zeroed += k;
        var.set(&candle_core::Tensor::from_vec(w, var.dims(), var.device())?)?;
    }
    Ok(zeroed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn the_smallest_weights_of_each_layer_go_and_vectors_stay() {
        let params = Params::new();
        let vb = params.builder(&Device::Cpu);
        let w = vb
            .get_with_hints((2, 5), "fc.weight", candle_nn::init::ZERO)
            .unwrap();
        let b = vb
            .get_with_hints(5, "fc.bias", candle_nn::init::ZERO)
            .unwrap();
        let _ = (w, b);
        let named = params.named();
        let values = [0.5f32, -0.1, 3.0, -2.0, 0.05, 1.0, -0.7, 0.2, 0.0, 4.0];
        named[1]
            .1
            .set(
                &Tensor::new(&values, &Device::Cpu)
                    .unwrap()
                    .reshape((2, 5))
                    .unwrap(),
            )
            .unwrap();
        named[0]
            .1
            .set(&Tensor::new(&[0.01f32; 5], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(prune_magnitude(&params, 0.4).unwrap(), 4);
        let after = params.named();
        let w: Vec<f32> = after[1].1.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(w, [0.5, 0.0, 3.0, -2.0, 0.0, 1.0, -0.7, 0.0, 0.0, 4.0]);
        let b: Vec<f32> = after[0].1.to_vec1().unwrap();
        assert_eq!(b, [0.01; 5]);
        assert_eq!(prune_magnitude(&params, 0.0).unwrap(), 0);
    }
}
