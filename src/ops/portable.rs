//! The portable path: candle's own tensor operations in place of every project kernel. The
//! kernels are CPU code, so a model whose tensors live on another device (a CUDA build's GPU)
//! runs this path, chosen automatically; on the CPU it runs only when forced, which is how the
//! tests compare the two paths' outputs and gradients.

use std::cell::Cell;

use candle_core::Tensor;

use crate::ops::cpu::Activation;

thread_local! {
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// Whether an op on `x` runs candle's own operations instead of the project's kernel.
pub(crate) fn applies(x: &Tensor) -> bool {
    !x.device().is_cpu() || FORCED.with(Cell::get)
}

/// Runs `f` with the portable path forced on this thread, as on a device without the kernels
/// (for comparisons of the two paths).
pub fn forced<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(true)));
    f()
}

/// `act(x)`; the identity without one.
pub(crate) fn activate(x: Tensor, act: Option<Activation>) -> candle_core::Result<Tensor> {
    match act {
        None => Ok(x),
        Some(Activation::Tanh) => x.tanh(),
        Some(Activation::LeakyRelu(slope)) => leaky_relu(&x, slope as f64),
    }
}

/// `max(x, 0) + slope · min(x, 0)`.
pub(crate) fn leaky_relu(x: &Tensor, slope: f64) -> candle_core::Result<Tensor> {
    x.relu()? + (x.minimum(0f32)? * slope)?
}

/// `v` `[c]` shaped to broadcast over dimension 1 of a tensor of rank `rank`.
pub(crate) fn per_channel(v: &Tensor, rank: usize) -> candle_core::Result<Tensor> {
    let mut shape = vec![1; rank];
    shape[1] = v.elem_count();
    v.reshape(shape)
}

/// GroupNorm of `x` `[n, c, …]` in `groups` groups, then the affine map and, when `silu`, SiLU.
pub(crate) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let xs = x.reshape((n, groups, ()))?;
    let centred = xs.broadcast_sub(&xs.mean_keepdim(2)?)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred
        .broadcast_div(&(var + eps as f64)?.sqrt()?)?
        .reshape(x.shape())?;
    let y = normed
        .broadcast_mul(&per_channel(weight, x.rank())?)?
        .broadcast_add(&per_channel(bias, x.rank())?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// Training-mode BatchNorm of `x` `[n, c, …]`: the normalised and affinely mapped batch, and
/// the batch's per-channel mean and biased variance (detached, `[c]`).
pub(crate) fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let rows = x.transpose(0, 1)?.reshape((c, ()))?;
    let mean = rows.mean_keepdim(1)?;
    let var = rows.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
    let (mean, var) = (mean.flatten_all()?, var.flatten_all()?);
    let rank = x.rank();
    let normed = x
        .broadcast_sub(&per_channel(&mean, rank)?)?
        .broadcast_div(&per_channel(&(&var + eps as f64)?.sqrt()?, rank)?)?;
    let y = normed
        .broadcast_mul(&per_channel(weight, rank)?)?
        .broadcast_add(&per_channel(bias, rank)?)?;
    Ok((y, mean.detach(), var.detach()))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::models::dcgan_k4::{K4Discriminator, K4Generator};
    use crate::models::{DcganConfig, Discriminator, Generator, Params};
    use crate::ops::testing::max_abs_diff;
    use crate::rng::Rng;

    /// `f(params)`'s output, the gradient of its mean square for every tensor of `params`
    /// (in name order) and the tensors afterwards (BatchNorm's running statistics move).
    fn run(params: &Params, f: &dyn Fn() -> Tensor) -> (Tensor, Vec<Tensor>, Vec<Tensor>) {
        let y = f();
        let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        let named = params.named();
        let g = named
            .iter()
            .filter_map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        let after = named
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        (y, g, after)
    }

    /// The two paths agree on `f`'s output, every gradient and every state update, to within
    /// `tol` of each tensor's largest value; each path starts from the same tensors.
    fn agree(what: &str, params: &Params, f: &dyn Fn() -> Tensor, tol: f32) {
        let start: Vec<Tensor> = params
            .named()
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let kernels = run(params, f);
        for ((_, v), t) in params.named().iter().zip(&start) {
            v.set(t).unwrap();
        }
        let portable = super::forced(|| run(params, f));
        let scale = |t: &Tensor| max_abs_diff(t, &t.zeros_like().unwrap()).max(1e-3);
        let close = |a: &Tensor, b: &Tensor| max_abs_diff(a, b) <= tol * scale(a);
        assert!(close(&kernels.0, &portable.0), "{what}: outputs differ");
        assert_eq!(kernels.1.len(), portable.1.len(), "{what}: gradients");
        assert_eq!(
            kernels.1.len(),
            params.trainable().len(),
            "{what}: a tensor without gradient"
        );
        for (i, (a, b)) in kernels.1.iter().zip(&portable.1).enumerate() {
            assert!(close(a, b), "{what}: gradient {i}: {}", max_abs_diff(a, b));
        }
        for (i, (a, b)) in kernels.2.iter().zip(&portable.2).enumerate() {
            assert!(close(a, b), "{what}: tensor {i} after the pass");
        }
    }

    /// Every network through the kernels and through candle's own operations (as on a GPU):
    /// the same outputs, gradients and BatchNorm running statistics.
    #[test]
    fn the_portable_path_computes_what_the_kernels_compute() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(7);
        let cfg = DcganConfig {
            latent_dim: 8,
            g_width: 8,
            d_width: 8,
            ..Default::default()
        };
        let z = rng.normal(&[3, 8], &dev).unwrap();
        let x = rng.normal(&[3, 1, 28, 28], &dev).unwrap().tanh().unwrap();
        let p = Params::new();
        let g = Generator::new(&cfg, &p, &dev).unwrap();
        p.init(&mut Rng::new(1)).unwrap();
        agree("generator", &p, &|| g.forward_t(&z, true).unwrap(), 1e-4);
        let p = Params::new();
        let d = Discriminator::new(&cfg, &p, &dev).unwrap();
        p.init(&mut Rng::new(2)).unwrap();
        let dropout = || d.forward(&x, Some(&mut Rng::new(3))).unwrap();
        agree("discriminator with dropout", &p, &dropout, 1e-4);
        let p = Params::new();
        let g4 = K4Generator::new(&p, &dev).unwrap();
        p.init(&mut Rng::new(4)).unwrap();
        let z4 = rng
            .normal(&[2, crate::models::dcgan_k4::LATENT_DIM], &dev)
            .unwrap();
        agree("k4 generator", &p, &|| g4.forward(&z4).unwrap(), 1e-4);
        let p = Params::new();
        let d4 = K4Discriminator::new(&p, &dev).unwrap();
        p.init(&mut Rng::new(5)).unwrap();
        let x4 = rng.normal(&[2, 1, 28, 28], &dev).unwrap();
        agree("k4 discriminator", &p, &|| d4.forward(&x4).unwrap(), 1e-4);
        // The diffusion U-Net (GroupNorm + SiLU, attention, stride-2 and padded convolutions).
        let t = Tensor::new(&[3f32, 500.0, 998.0], &dev).unwrap();
        let mut arch = crate::family::diffusion::tiny_arch(1000);
        arch.diffusers = crate::models::DiffusersConfig {
            down_block_types: vec!["AttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "AttnUpBlock2D".into()],
            attention_head_dim: Some(2),
            downsample_padding: 0,
            add_attention: true,
            ..arch.diffusers
        };
        let ours =
            crate::family::diffusion::DiffusionModel::new(&arch, &mut Rng::new(8), &dev).unwrap();
        let xs = rng.normal(&[3, 1, 8, 8], &dev).unwrap();
        agree(
            "diffusers U-Net",
            &ours.params,
            &|| ours.unet.forward(&xs, &t).unwrap(),
            1e-4,
        );
    }
}
