#!/usr/bin/env python3
"""PyTorch side of `genbackdoor bench --torch`: the identical training steps on the CPU.

DCGANs (reference, k4): G forward on a fresh latent batch; D step on the real batch and the
detached fakes (BCE with logits, Adam); G step through D on the same fakes (non-saturating
loss, Adam). Adam lr 2e-4, betas (0.5, 0.999).
U-Net (unet): the default diffusion U-Net of configs/ddpm.toml, a small diffusers UNet2DModel
(random weights, needs `pip install diffusers`); one noise-prediction step (random timesteps
1..1000, MSE to the noise, Adam lr 2e-4, betas (0.9, 0.999)).
CIFAR U-Net (cifar): diffusers' UNet2DModel in google/ddpm-cifar10-32's configuration, the
same step.
With --sampler (unet, cifar; needs diffusers): a step is one whole sampling run of the batch
under torch.no_grad() with the stock diffusers scheduler (ddpm, ddim-N, dpm++2m-N, heun-N on
the default linear schedule), as `genbackdoor bench --sampler` times `sample`'s loop.
Prints one JSON object: median and min ms per step, the forward multiply-adds per image of G
and D (genbackdoor turns them into FLOP the same way), the network evaluations per image of a
sampling run, the thread count and the torch version.

    pip install torch        # not a dependency of genbackdoor, never run in CI
    python3 bench/torch_reference.py --model k4 --batch-size 64 --steps 20
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def reference_pair():
    """The reference DGM-backdoor DCGAN (IBM ART; `train`'s default model)."""
    g = nn.Sequential(
        nn.Linear(100, 64 * 7 * 7, bias=False),
        nn.BatchNorm1d(64 * 7 * 7),
        nn.LeakyReLU(0.3),
        nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 5, 1, padding=2, bias=False),
        nn.BatchNorm2d(32),
        nn.LeakyReLU(0.3),
        nn.ConvTranspose2d(32, 16, 5, 2, padding=2, output_padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.LeakyReLU(0.3),
        nn.ConvTranspose2d(16, 1, 5, 2, padding=2, output_padding=1, bias=False),
        nn.Tanh(),
    )
    d = nn.Sequential(
        nn.Conv2d(1, 64, 5, 2, padding=2),
        nn.LeakyReLU(0.3),
        nn.Dropout(0.3),
        nn.Conv2d(64, 128, 5, 2, padding=2),
        nn.LeakyReLU(0.3),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(128 * 7 * 7, 1),
    )
    g_macs = 100 * 3136 + 49 * 64 * 32 * 25 + 49 * 32 * 16 * 25 + 196 * 16 * 25
    d_macs = 196 * 64 * 25 + 49 * 128 * 64 * 25 + 6272
    return g, d, g_macs, d_macs


def k4_pair():
    """The PyTorch-example DCGAN of the speed comparison (4x4 kernels, BN in D)."""
    g = nn.Sequential(
        nn.Linear(100, 128 * 7 * 7, bias=False),
        nn.BatchNorm1d(128 * 7 * 7),
        nn.ReLU(),
        nn.Unflatten(1, (128, 7, 7)),
        nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.ConvTranspose2d(64, 1, 4, 2, 1),
        nn.Tanh(),
    )
    d = nn.Sequential(
        nn.Conv2d(1, 64, 4, 2, 1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(64, 128, 4, 2, 1, bias=False),
        nn.BatchNorm2d(128),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(128 * 7 * 7, 1),
    )
    g_macs = 100 * 6272 + 49 * 128 * 64 * 16 + 196 * 64 * 16
    d_macs = 196 * 64 * 16 + 49 * 128 * 64 * 16 + 6272
    return g, d, g_macs, d_macs


def default_unet():
    """The default diffusion U-Net of configs/ddpm.toml, a small diffusers UNet2DModel
    (src/models/diffusers_unet.rs, `DiffusersConfig::small(28, 1, &[16, 32, 32], 8)`)."""
    from diffusers import UNet2DModel

    net = UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=32,
    )
    return lambda x, t: net(x, t - 1).sample, net


def cifar_unet():
    """google/ddpm-cifar10-32's configuration (src/models/diffusers_unet.rs, ddpm_cifar10)."""
    from diffusers import UNet2DModel

    net = UNet2DModel(
        sample_size=32,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        attention_head_dim=None,
        norm_eps=1e-6,
    )
    # diffusers' timesteps run 0..999: genbackdoor's t - 1.
    return lambda x, t: net(x, t - 1).sample, net


def diffusers_macs(net, shape):
    """Forward multiply-adds per image as `DiffusersUnet::macs` counts them: convolutions at
    their actual sizes, the attention projections (4·c²·l) and products (2·l²·c)."""
    from diffusers.models.attention_processor import Attention

    total = [0]

    def conv(m, inp, out):
        total[0] += out.shape[2] * out.shape[3] * m.weight.numel()

    def attention(m, inp, out):
        _, c, h, w = inp[0].shape
        total[0] += 4 * c * c * h * w + 2 * (h * w) ** 2 * c

    hs = [m.register_forward_hook(conv) for m in net.modules() if isinstance(m, nn.Conv2d)]
    hs += [m.register_forward_hook(attention) for m in net.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        net(torch.zeros(1, *shape), 0)
    for h in hs:
        h.remove()
    return total[0]


def diffusion_net(a):
    """(forward(x, t) with genbackdoor's t in 1..1000, the module, image shape, MACs)."""
    forward, net, shape = (
        (*cifar_unet(), (3, 32, 32)) if a.model == "cifar" else (*default_unet(), (1, 28, 28))
    )
    return forward, net, shape, diffusers_macs(net, shape)


def scheduler(name):
    """The stock diffusers scheduler for a genbackdoor sampler name, and its step count."""
    import diffusers

    kind, _, n = name.partition("-")
    kinds = {
        "ddpm": (diffusers.DDPMScheduler, 1000),
        "ddim": (diffusers.DDIMScheduler, 50),
        "dpm++2m": (diffusers.DPMSolverMultistepScheduler, 20),
        "heun": (diffusers.HeunDiscreteScheduler, 25),
    }
    if kind not in kinds:
        raise SystemExit(f"unknown sampler {name!r}")
    cls, steps = kinds[kind]
    linear = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return cls(**linear), int(n) if n else steps


def sampling_times(a):
    forward, net, shape, macs = diffusion_net(a)
    sched, steps = scheduler(a.sampler)
    sched.set_timesteps(steps)
    evaluations = len(sched.timesteps)
    start = torch.randn(a.batch_size, *shape)

    @torch.no_grad()
    def run():
        sched.set_timesteps(steps)
        x = start * sched.init_noise_sigma
        for t in sched.timesteps:
            ts = torch.full((a.batch_size,), float(t) + 1.0)
            eps = forward(sched.scale_model_input(x, t), ts)
            x = sched.step(eps, t, x).prev_sample
        return x

    return step_times(a, run), macs, 0, evaluations


def unet_step_times(a):
    forward, net, shape, macs = diffusion_net(a)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.9, 0.999))
    x = torch.randn(a.batch_size, *shape).tanh()
    # The default linear schedule (β from 1e-4 to 0.02 over T = 1000), as genbackdoor's
    # trainer noises its images: x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε.
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)

    def step():
        eps = torch.randn_like(x)
        t = torch.randint(1, 1001, (a.batch_size,))
        ab = alpha_bar[t - 1].view(-1, 1, 1, 1)
        loss = F.mse_loss(forward(ab.sqrt() * x + (1 - ab).sqrt() * eps, t.float()), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    return step_times(a, step), macs, 0


def step_times(a, step):
    """Milliseconds of each of `a.steps` calls of `step` after `a.warmup` untimed ones."""
    times = []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        step()
        if i >= a.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["reference", "k4", "unet", "cifar"], default="k4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", help="time whole sampling runs (unet, cifar): ddpm, ddim-N, ...")
    a = p.parse_args()

    torch.manual_seed(0)
    evaluations = None
    if a.sampler:
        if a.model not in ("unet", "cifar"):
            raise SystemExit("--sampler needs a diffusion model (unet, cifar)")
        times, g_macs, d_macs, evaluations = sampling_times(a)
    elif a.model in ("unet", "cifar"):
        times, g_macs, d_macs = unet_step_times(a)
    else:
        times, g_macs, d_macs = gan_step_times(a)
    print(
        json.dumps(
            {
                "model": a.model,
                "batch_size": a.batch_size,
                "steps": a.steps,
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "g_macs": g_macs,
                "d_macs": d_macs,
                "evaluations": evaluations,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


def gan_step_times(a):
    g, d, g_macs, d_macs = reference_pair() if a.model == "reference" else k4_pair()
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.tanh(torch.randn(a.batch_size, 1, 28, 28)) * 0.9
    ones = torch.ones(a.batch_size)
    zeros = torch.zeros(a.batch_size)

    def step():
        z = torch.randn(a.batch_size, 100)
        fake = g(z)
        d_loss = F.binary_cross_entropy_with_logits(
            d(real).squeeze(1), ones
        ) + F.binary_cross_entropy_with_logits(d(fake.detach()).squeeze(1), zeros)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(d(fake).squeeze(1), ones)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        g_loss.item()

    return step_times(a, step), g_macs, d_macs


if __name__ == "__main__":
    main()
