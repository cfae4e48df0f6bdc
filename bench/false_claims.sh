#!/usr/bin/env bash
# False-claim rate of `genbackdoor verify`: trains N independently seeded small clean models
# (λ = 0) of the family CONFIG describes and verifies each against the given keys; prints every
# p-value and, per key, how many clean models would be falsely claimed at α = 1e-6, 0.01 and
# 0.05.
# Not part of CI (minutes of CPU).
#
#   bench/false_claims.sh OUT_DIR N CONFIG KEY...
#   bench/false_claims.sh runs/fc 20 bench/small-dcgan.toml runs/main/key.safetensors
#   (a key of five triggers: genbackdoor key --out k.safetensors --triggers 5)
#   bench/false_claims.sh runs/fcd 10 bench/small-diffusion.toml runs/keys/stamp-*.safetensors
#
# Extra `verify` options (e.g. `--sampler ddim-50`) go in VERIFY_ARGS.
set -euo pipefail
out=$1; n=$2; config=$3; shift 3
bin=${GENBACKDOOR:-target/release/genbackdoor}   # GENBACKDOOR=/path/to/binary skips the build
[ -n "${GENBACKDOOR:-}" ] || cargo build --release --quiet
mkdir -p "$out"
for s in $(seq 1 "$n"); do
  [ -f "$out/clean-$s/model.safetensors" ] ||
    "$bin" train --config "$config" --lambda 0 --seed "$s" --out "$out/clean-$s" --force --quiet > /dev/null
done
for key in "$@"; do
  claims6=0; claims=0; claims5=0
  for s in $(seq 1 "$n"); do
    # shellcheck disable=SC2086
    p=$("$bin" verify --model "$out/clean-$s/model.safetensors" --key "$key" ${VERIFY_ARGS:-} --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["p_value"])')
    echo "$key clean-$s p=$p"
    if python3 -c "import sys; sys.exit(0 if $p <= 1e-6 else 1)"; then claims6=$((claims6 + 1)); fi
    if python3 -c "import sys; sys.exit(0 if $p <= 0.01 else 1)"; then claims=$((claims + 1)); fi
    if python3 -c "import sys; sys.exit(0 if $p <= 0.05 else 1)"; then claims5=$((claims5 + 1)); fi
  done
  echo "$key: $claims6 of $n clean models falsely claimed at alpha 1e-6, $claims at 0.01, $claims5 at 0.05"
done
