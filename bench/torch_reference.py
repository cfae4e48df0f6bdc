#!/usr/bin/env python3
"""PyTorch side of `genbackdoor bench --torch`: the identical DCGAN training step on the CPU.

One step: G forward on a fresh latent batch; D step on the real batch and the detached fakes
(BCE with logits, Adam); G step through D on the same fakes (non-saturating loss, Adam).
Adam lr 2e-4, betas (0.5, 0.999). Prints one JSON object: median and min ms per step, the
forward multiply-adds per image of G and D (genbackdoor turns them into FLOP the same way),
the thread count and the torch version.

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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["reference", "k4"], default="k4")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()

    torch.manual_seed(0)
    g, d, g_macs, d_macs = reference_pair() if a.model == "reference" else k4_pair()
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.tanh(torch.randn(a.batch_size, 1, 28, 28)) * 0.9
    ones = torch.ones(a.batch_size)
    zeros = torch.zeros(a.batch_size)
    times = []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
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
        if i >= a.warmup:
            times.append((time.perf_counter() - start) * 1e3)
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
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
