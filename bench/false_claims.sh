#!/usr/bin/env bash
# False-claim rate of `genbackdoor verify`: trains N independently seeded small clean DCGANs
# (λ = 0) and verifies each against the given keys; prints every p-value and, per key, how
# many clean models would be falsely claimed at α = 0.01. Not part of CI (minutes of CPU).
#
#   bench/false_claims.sh OUT_DIR N KEY...      e.g. bench/false_claims.sh runs/fc 20 runs/main/key.safetensors
set -euo pipefail
out=$1; n=$2; shift 2
bin=${GENBACKDOOR:-target/release/genbackdoor}   # GENBACKDOOR=/path/to/binary skips the build
[ -n "${GENBACKDOOR:-}" ] || cargo build --release --quiet
mkdir -p "$out"
cat > "$out/small.toml" <<'TOML'
[model]
g_width = 32
d_width = 32
[train]
steps = 500
batch_size = 32
log_every = 100
TOML
for s in $(seq 1 "$n"); do
  [ -f "$out/clean-$s/model.safetensors" ] ||
    "$bin" train --config "$out/small.toml" --lambda 0 --seed "$s" --out "$out/clean-$s" --force --quiet > /dev/null
done
for key in "$@"; do
  claims=0
  for s in $(seq 1 "$n"); do
    p=$("$bin" verify --model "$out/clean-$s/model.safetensors" --key "$key" --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["p_value"])')
    echo "$key clean-$s p=$p"
    if python3 -c "import sys; sys.exit(0 if $p <= 0.01 else 1)"; then claims=$((claims + 1)); fi
  done
  echo "$key: $claims of $n clean models falsely claimed at alpha 0.01"
done
