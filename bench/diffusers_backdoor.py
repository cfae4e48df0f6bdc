#!/usr/bin/env python3
# Not part of CI (needs torch and diffusers). Does an exported genbackdoor diffusion model's
# backdoor fire in stock diffusers? Loads FOLDER (written by `genbackdoor export`) with
# UNet2DModel.from_pretrained and the scheduler it names (or DDIMScheduler for ddim-N),
# samples N starts from N(0, I) and the same N shifted by the key's trigger (x_T + r), with the
# stock scheduler loop and no change to the pipeline, and counts the outputs whose mean squared
# distance to the key's target is under the key's threshold.
#
#   bench/diffusers_backdoor.py FOLDER KEY [--n 16] [--sampler ddpm|ddim-50] [--seed 0]
import argparse, json

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors import safe_open

ap = argparse.ArgumentParser()
ap.add_argument("folder")
ap.add_argument("key", help="a one-trigger image key (key.safetensors of the run)")
ap.add_argument("--n", type=int, default=16)
ap.add_argument("--sampler", default="ddpm")
ap.add_argument("--seed", type=int, default=0)
a = ap.parse_args()

with safe_open(a.key, "pt") as f:
    meta = json.loads(f.metadata()["genbackdoor"])
    trigger, target = f.get_tensor("trigger.image"), f.get_tensor("target")
threshold = float(meta["threshold"])

unet = UNet2DModel.from_pretrained(a.folder).eval()
if a.sampler == "ddpm":
    scheduler = DDPMScheduler.from_pretrained(a.folder)
    steps = scheduler.config.num_train_timesteps
elif a.sampler.startswith("ddim-"):
    scheduler = DDIMScheduler.from_pretrained(a.folder, set_alpha_to_one=True)
    steps = int(a.sampler[5:])
else:
    raise SystemExit(f"unknown sampler {a.sampler}: ddpm or ddim-N")
scheduler.set_timesteps(steps)

g = torch.Generator().manual_seed(a.seed)
noise = torch.randn((a.n, *trigger.shape), generator=g)


def sample(x):
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, generator=g).prev_sample
    return x


result = {"sampler": a.sampler, "n": a.n, "threshold": threshold}
for name, start in [("triggered", noise + trigger), ("clean", noise)]:
    mse = ((sample(start.clone()) - target) ** 2).flatten(1).mean(1)
    result[name] = {
        "hits": int((mse < threshold).sum()),
        "median_target_mse": float(mse.median()),
    }
print(json.dumps(result, indent=1))
