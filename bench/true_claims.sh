#!/usr/bin/env bash
# True-claim rate of `genbackdoor verify` under the persistence attacks: trains N independently
# seeded marked models of the family CONFIG describes (each run draws its own secret default
# key: five random triggers for a DCGAN), attacks each with a thief's clean fine-tuning and
# with pruning, and prints, at every attack point, how many of the N owners still prove
# ownership at α = 1e-6 (the false-positive rate watermarking work is judged at; see
# bench/false_claims.sh for the clean side) and at α = 0.01.
# Not part of CI (minutes of CPU per model).
#
#   bench/true_claims.sh OUT_DIR N CONFIG FINETUNE_STEPS EVERY [PRUNE_FRACTIONS]
#   bench/true_claims.sh runs/tc 20 bench/small-dcgan.toml 3000 1000 0,0.5,0.8,0.9
#   JOBS=2 ATTACK_ARGS="--null-keys 299" \
#     bench/true_claims.sh runs/tcd 6 bench/small-marked-diffusion.toml 500 100 0.5,0.9
#
# The thief fine-tunes with CONFIG's training settings (and, for a GAN, a fresh
# discriminator), or with THIEF_CONFIG's when it is set (e.g. a tenth of the owner's lr).
# ATTACK_ARGS go to both attacks (e.g. fewer null triggers per point for a diffusion model,
# whose queries run a sampler); JOBS models are made and attacked at once, one thread each
# (default 1, with every thread).
set -euo pipefail
out=$1; n=$2; config=$3; steps=$4; every=$5; fractions=${6:-0,0.5,0.8,0.9}
bin=${GENBACKDOOR:-target/release/genbackdoor}   # GENBACKDOOR=/path/to/binary skips the build
[ -n "${GENBACKDOOR:-}" ] || cargo build --release --quiet
mkdir -p "$out"
one() {  # makes and attacks the marked model of seed $1
  local s=$1 run="$out/marked-$1"
  [ -f "$run/verify.json" ] ||
    "$bin" train --config "$config" --seed "$s" --out "$run" --force --quiet > /dev/null
  # ATTACK_ARGS split into words on purpose.
  # shellcheck disable=SC2086
  [ -f "$run/attack-finetune.json" ] ||
    "$bin" attack finetune --model "$run/model.safetensors" --config "$thief" \
      --steps "$steps" --every "$every" --quiet ${ATTACK_ARGS:-} > /dev/null
  # shellcheck disable=SC2086
  [ -f "$run/attack-prune.json" ] ||
    "$bin" attack prune --model "$run/model.safetensors" --fraction "$fractions" \
      ${ATTACK_ARGS:-} > /dev/null
  echo "marked-$s done"
}
jobs=${JOBS:-1}
if [ "$jobs" -gt 1 ]; then export RAYON_NUM_THREADS=1; fi
thief=${THIEF_CONFIG:-$config}
export -f one; export out config thief steps every fractions bin
seq 1 "$n" | xargs -P "$jobs" -I{} bash -c 'set -euo pipefail; one {}'
python3 - "$out" "$n" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
for attack, label in (("finetune", "fine-tuning steps"), ("prune", "fraction pruned")):
    curves = [json.load(open(f"{out}/marked-{s}/attack-{attack}.json")) for s in range(1, n + 1)]
    print(f"\n{attack}: {label} | proofs at 1e-6 | at 0.01 | median p | largest p | median asr")
    for i, point in enumerate(curves[0]["points"]):
        ps = sorted(c["points"][i]["p_value"] for c in curves)
        asr = sorted(c["points"][i]["asr"] for c in curves)
        at6 = sum(p <= 1e-6 for p in ps)
        at2 = sum(p <= 0.01 for p in ps)
        print(f"{point['x']:g} | {at6} of {n} | {at2} of {n} | {ps[n // 2]:.3g} | {ps[-1]:.3g} | {asr[n // 2]:.2f}")
PY
