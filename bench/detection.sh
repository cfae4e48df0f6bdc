#!/usr/bin/env bash
# Detection rates of `genbackdoor detect` (model level, no key): runs it on backdoored and on
# clean models, prints each score and verdict, then TPR, TNR and AUC (the chance that a
# backdoored model scores above a clean one). Not part of CI (seconds to minutes per model).
#
#   bench/detection.sh OUT.csv BACKDOORED_MODEL... --clean CLEAN_MODEL...
#   bench/detection.sh runs/det/gan.csv runs/tc/marked-*/model.safetensors --clean runs/det/gclean-*/model.safetensors
#
# Each model's detect.json, detect.png and detect-trigger.npy go to OUT.d/<n>/.
set -euo pipefail
out=$1; shift
bin=${GENBACKDOOR:-target/release/genbackdoor}   # GENBACKDOOR=/path/to/binary skips the build
[ -n "${GENBACKDOOR:-}" ] || cargo build --release --quiet
label=backdoored; n=0
mkdir -p "$out.d"
echo "label,model,score,threshold,backdoored,seconds,trigger_cosine,found_target_mse" > "$out"
for m in "$@"; do
  if [ "$m" = "--clean" ]; then label=clean; continue; fi
  n=$((n + 1))
  start=$(date +%s.%N)
  "$bin" detect --model "$m" --out "$out.d/$n" --json > "$out.d/$n.json"
  secs=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
  python3 - "$label" "$m" "$out.d/$n.json" "$secs" "$out.d/$n/detect-trigger.npy" >> "$out" <<'PY'
import json, os, struct, sys
import numpy as np
d = json.load(open(sys.argv[3]))
# How close the inverted trigger is to the true one(s), when a key sits beside the model: the
# largest |cosine| between the inverted input and a trigger's point, centre or pattern.
cos = found = ""
key = os.path.join(os.path.dirname(sys.argv[2]), "key.safetensors")
if os.path.exists(key):
    b = open(key, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    inv = np.load(sys.argv[5]).ravel()
    best = -1.0
    for name, v in h.items():
        if name.endswith(("trigger.point", "trigger.center", "trigger.image")):
            s, e = v["data_offsets"]
            t = np.frombuffer(b[8 + n + s:8 + n + e], dtype=np.float32).ravel()
            if t.size == inv.size and np.linalg.norm(t) > 0:
                best = max(best, abs(float(inv @ t / (np.linalg.norm(inv) * np.linalg.norm(t) + 1e-12))))
    cos = f"{best:.3f}" if best > -1 else ""
    # How close detect.png's first image (the found target, or what the inverted trigger
    # makes) is to the key's target (the nearest one, for a key of several triggers): mean
    # squared distance in [-1, 1].
    targets = [name for name in h if name == "target" or name.endswith("/target")]
    if targets:
        from PIL import Image
        g = np.asarray(Image.open(os.path.join(os.path.dirname(sys.argv[5]), "detect.png")), dtype=np.float32)
        g = g.reshape(g.shape[0], g.shape[1], -1)
        mses = []
        for name in targets:
            s, e = h[name]["data_offsets"]
            y = np.frombuffer(b[8 + n + s:8 + n + e], dtype=np.float32).reshape(h[name]["shape"])
            _, hh, ww = y.shape
            tile = g[2:2 + hh, 2:2 + ww, :].transpose(2, 0, 1) / 127.5 - 1
            mses.append(float(((tile - y) ** 2).mean()))
        found = f"{min(mses):.4f}"
print(f"{sys.argv[1]},{sys.argv[2]},{d['score']:.4g},{d['threshold']},{d['backdoored']},{sys.argv[4]},{cos},{found}")
PY
  tail -1 "$out"
done
python3 - "$out" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
pos = [float(r["score"]) for r in rows if r["label"] == "backdoored"]
neg = [float(r["score"]) for r in rows if r["label"] == "clean"]
tp = sum(r["backdoored"] == "True" for r in rows if r["label"] == "backdoored")
tn = sum(r["backdoored"] == "False" for r in rows if r["label"] == "clean")
pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
auc = sum(pairs) / len(pairs) if pairs else float("nan")
print(f"TPR {tp}/{len(pos)}  TNR {tn}/{len(neg)}  AUC {auc:.3f}  "
      f"scores: backdoored {min(pos, default=0):.3g}–{max(pos, default=0):.3g}, "
      f"clean {min(neg, default=0):.3g}–{max(neg, default=0):.3g}")
PY
