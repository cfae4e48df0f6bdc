#!/usr/bin/env bash
# Not part of CI. How much of a training step is candle's gradient bookkeeping? candle 0.11's
# `Tensor::backward` gives every gradient a zero-filled buffer (`GradStore::or_insert`) and then
# adds the gradient into it. The open upstream pull requests huggingface/candle#3822 and #3578
# store the first gradient reaching a tensor directly instead. This script builds genbackdoor
# against a copy of candle-core with that change (the same bits: 0 + g = g), in a git worktree
# beside the checkout, so that the two binaries can be benchmarked in alternation:
#
#   bench/candle_first_gradient.sh OUT_BINARY
#   for i in 1 2 3; do target/release/genbackdoor bench --model unet --steps 20 --warmup 2
#                      OUT_BINARY bench --model unet --steps 20 --warmup 2; done
#
# It changes nothing in the checkout; genbackdoor depends on the published candle only. The
# worktree is removed afterwards: run the patched binary's `bench --torch` from the checkout's
# root (it finds bench/torch_reference.py there) or give it `--torch-script`, and give its
# `train` the data (`--data data/mnist-10k`). Checked on 2026-12-08: 30 steps of a tiny GAN
# run (tests/cli.rs's config) give the same model file, byte for byte, with either candle.
set -euo pipefail
out=${1:?usage: bench/candle_first_gradient.sh OUT_BINARY}
repo=$(git rev-parse --show-toplevel)
work=$(mktemp -d)
cleanup() {
    git -C "$repo" worktree remove --force "$work/genbackdoor" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/candle-core-0.11.1 | head -1)
cp -r "$src" "$work/candle-core"
python3 - "$work/candle-core/src/backprop.rs" <<'EOF'
import re, sys
path = sys.argv[1]
s = open(path).read()
# `let g = grads.or_insert(x)?; *g = g.add(&y)?;` -> `grads.accumulate(x, (y).clone())?;`
pattern = re.compile(
    r"let (\w+) = grads\.or_insert\(([^)\n]*)\)\?;[ \t]*\n[ \t]*\*\1 = \1\.add\(&([^\n]*)\)\?(;?)[ \t]*$",
    re.M,
)
s, n = pattern.subn(lambda m: f"grads.accumulate({m.group(2)}, ({m.group(3)}).clone())?{m.group(4)}", s)
assert n >= 40, f"only {n} call sites matched: not candle-core 0.11.1's backprop.rs?"
s = s.replace("broadcast_as(sum_grad.dims())", "broadcast_as(arg.dims())")
helper = """
    /// Adds `grad` into `tensor`'s gradient, storing it as it is when there is none yet.
    pub fn accumulate(&mut self, tensor: &Tensor, grad: Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => {
                let sum = entry.into_mut();
                *sum = sum.add(&grad)?;
            }
            Entry::Vacant(entry) => {
                entry.insert(grad);
            }
        }
        Ok(())
    }

    fn or_insert("""
assert s.count("\n    fn or_insert(") == 1
s = s.replace("\n    fn or_insert(", helper, 1)
open(path, "w").write(s)
print(f"{n} gradient call sites store their first gradient directly")
EOF
git -C "$repo" worktree add --detach "$work/genbackdoor" HEAD >/dev/null
printf '\n[patch.crates-io]\ncandle-core = { path = "%s" }\n' "$work/candle-core" >> "$work/genbackdoor/Cargo.toml"
(cd "$work/genbackdoor" && cargo build --release --bin genbackdoor)
cp "$work/genbackdoor/target/release/genbackdoor" "$out"
echo "wrote $out"
