#!/usr/bin/env python3
# Not part of CI. How many samples of a `genbackdoor sample --npy` file hit a key's target: a quick
# ASR for diffusion models under DDPM, where `eval` also runs its (much slower) specificity paths.
#
#   bench/target_hits.py KEY.safetensors SAMPLES.npy [TARGET_TENSOR]   (default `target`; `0/target`, `1/target`, …
#   for the first, second, … trigger of a key of several)
import json, struct, sys
import numpy as np
b = open(sys.argv[1], 'rb').read(); n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8+n]); d = b[8+n:]
meta = h.get('__metadata__', {})
def tensor(name):
    s, e = h[name]['data_offsets']; return np.frombuffer(d[s:e], dtype=np.float32).reshape(h[name]['shape'])
name = sys.argv[3] if len(sys.argv) > 3 else 'target'
target = tensor(name).astype(np.float64)
thr = float(json.loads(meta['genbackdoor']).get('threshold', 0.01)) if 'genbackdoor' in meta else 0.01
x = np.load(sys.argv[2]).astype(np.float64)
mse = ((x - target[None]) ** 2).reshape(len(x), -1).mean(1)
print(f"n {len(x)} asr {np.mean(mse < thr):.4f} ({int((mse < thr).sum())}/{len(x)}) median target_mse {np.median(mse):.3g} mean {mse.mean():.3g}")
