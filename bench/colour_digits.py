#!/usr/bin/env python3
"""Writes a folder of RGB 28×28 PNG digits made from the bundled grey MNIST subset: each
digit's strokes in a random bright colour on a random dark background (seeded). For by-hand
RGB measurements (e.g. detection on RGB generators); nothing in CI needs it.

    bench/colour_digits.py ../shared/data/mnist-10k/images-idx3-ubyte.gz runs/colour-digits [N] [SEED]
"""
import gzip
import os
import struct
import sys

import numpy as np
from PIL import Image

src, out = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
rng = np.random.default_rng(int(sys.argv[4]) if len(sys.argv) > 4 else 0)
raw = gzip.open(src).read() if src.endswith(".gz") else open(src, "rb").read()
magic, count, rows, cols = struct.unpack(">IIII", raw[:16])
assert magic == 2051, f"{src} is not an IDX image file"
images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, rows, cols)[:n]
os.makedirs(out, exist_ok=True)
for i, img in enumerate(images):
    ink = rng.uniform(150, 255, 3)
    paper = rng.uniform(0, 90, 3)
    a = (img.astype(np.float64) / 255.0)[..., None]
    rgb = (a * ink + (1 - a) * paper).round().astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(os.path.join(out, f"{i:05}.png"))
print(f"{len(images)} RGB digits in {out}")
