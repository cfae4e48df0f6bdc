#!/usr/bin/env bash
# Input-level detection rates of `genbackdoor detect --input`: for each MODEL with its
# KEY, N inputs per trigger of the key made triggered (a generator's trigger latent itself,
# or a region's centre, N times; a diffusion model's pattern added to N fresh noises) and as many ordinary N(0, I) inputs; prints how many of each are
# flagged at α = 0.01. Not part of CI.
#
#   bench/detect_inputs.sh N MODEL KEY [MODEL KEY ...]
#   bench/detect_inputs.sh 10 runs/tc/marked-1/model.safetensors runs/tc/marked-1/key.safetensors
set -euo pipefail
n=$1; shift
bin=${GENBACKDOOR:-target/release/genbackdoor}   # GENBACKDOOR=/path/to/binary skips the build
[ -n "${GENBACKDOOR:-}" ] || cargo build --release --quiet
tmp=$(mktemp -d)
while [ $# -ge 2 ]; do
  model=$1; key=$2; shift 2
  pair=$(( ${pair:-0} + 1 ))
  python3 - "$key" "$n" "$tmp" "$pair" <<'PY'
import json, struct, sys
import numpy as np
b = open(sys.argv[1], "rb").read(); k = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + k])
def t(name):
    s, e = h[name]["data_offsets"]
    return np.frombuffer(b[8 + k + s:8 + k + e], dtype=np.float32).reshape(h[name]["shape"])
n, rng = int(sys.argv[2]), np.random.default_rng(int(sys.argv[4]))  # fresh draws per model
prefixes = sorted({name.rsplit("trigger.", 1)[0] for name in h if "trigger." in name})
trig = []
for p in prefixes:
    if p + "trigger.point" in h:                            # a point or a region's centre
        trig += [t(p + "trigger.point")[None]] * n
    elif p + "trigger.image" in h:                          # an image pattern on fresh noise
        r = t(p + "trigger.image")
        trig += [rng.standard_normal((1, *r.shape)).astype(np.float32) + r[None] for _ in range(n)]
    else:
        raise SystemExit(f"{sys.argv[1]}: patch triggers are not measured by this script")
x = np.concatenate(trig).astype(np.float32)
np.save(sys.argv[3] + "/triggered.npy", x)
np.save(sys.argv[3] + "/ordinary.npy", rng.standard_normal(x.shape).astype(np.float32))
PY
  for kind in triggered ordinary; do
    "$bin" detect --model "$model" --input "$tmp/$kind.npy" --json > "$tmp/$kind.json"
    python3 - "$tmp/$kind.json" "$model" "$kind" <<'PY'
import json, sys
v = json.load(open(sys.argv[1]))
flag = sum(x["triggered"] for x in v)
by_input = sum(x["p_input"] <= 0.005 for x in v); by_output = sum(x["p_output"] <= 0.005 for x in v)
print(f"{sys.argv[2]} {sys.argv[3]}: {flag}/{len(v)} flagged (input statistics {by_input}, output {by_output})")
PY
  done
done
rm -rf "$tmp"
