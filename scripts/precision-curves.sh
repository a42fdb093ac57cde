#!/usr/bin/env bash
# bf16 against f32 over a whole run: the same training (default model, synthetic set, same
# seed) once in each precision, the per-step loss gap, and the report's plots of both.
#   scripts/precision-curves.sh [TOPOLOGY] [STEPS] [MMPIPE]
#   defaults: topology/cpu-1x1.toml, 300 steps, target/release/mmpipe
# Prints the largest relative gap |bf16 - f32| / f32 of any step and of 10-step means,
# and the final losses; the metrics and PNGs go to $OUT (default runs/precision-curves).
# Fails when a 10-step mean's gap exceeds $MAX_MEAN_GAP (default 0.05; the CPU's 300 steps
# measured 0.025).
set -euo pipefail
cd "$(dirname "$0")/.."
topology="${1:-topology/cpu-1x1.toml}"
steps="${2:-300}"
bin="${3:-target/release/mmpipe}"
out="${OUT:-runs/precision-curves}"
mkdir -p "$out/fp32" "$out/bf16"
for p in fp32 bf16; do
  # TF32 off: the f32 run is full f32 on a GPU too.
  "$bin" train --topology "$topology" --steps "$steps" --precision "$p" --no-tf32 --quiet \
    --metrics "$out/$p/metrics.jsonl" >"$out/$p/train.out" 2>&1 \
    || { echo "precision-curves.sh: the $p run failed: $(tail -3 "$out/$p/train.out")" >&2; exit 1; }
  grep -E '^(loss|held-out)' "$out/$p/train.out" | sed "s/^/$p: /"
done
python3 - "$out/fp32/metrics.jsonl" "$out/bf16/metrics.jsonl" "${MAX_MEAN_GAP:-0.05}" <<'PY'
import json, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert len(a) == len(b) and a, "both runs must log every step"
gap = [abs(x - y) / abs(x) for x, y in zip(a, b)]
i = max(range(len(gap)), key=gap.__getitem__)
w = 10
mean = lambda v, j: sum(v[j:j + w]) / w
smooth = [abs(mean(a, j) - mean(b, j)) / mean(a, j) for j in range(len(a) - w + 1)]
k = max(range(len(smooth)), key=smooth.__getitem__)
print(f"{len(a)} steps: largest gap {gap[i]:.2e} at step {i} (f32 {a[i]:.4f}, bf16 {b[i]:.4f}); "
      f"of 10-step means {smooth[k]:.2e} at steps {k}-{k + w - 1}; "
      f"final loss f32 {a[-1]:.4f}, bf16 {b[-1]:.4f}")
if smooth[k] > float(sys.argv[3]):
    sys.exit(f"the bf16 curve left the f32 one: a 10-step mean {smooth[k]:.2e} apart (limit {sys.argv[3]})")
PY
"$bin" report "$out/fp32" "$out/bf16" --out "$out" >/dev/null && echo "plots: $out/*.png"
