#!/usr/bin/env bash
# The GPU step's time by op class (GEMMs, elementwise, reductions, casts and copies,
# indexing, optimizer, collectives, waits): Nsight Compute times every kernel of two
# `mmpipe train` runs that differ by one step (scripts/gpu_profile.py takes the difference),
# and an unprofiled `mmpipe bench` gives the step's wall time, the rest of which is the
# GPU waiting. The clocks are left alone (--clock-control none).
#
# usage: scripts/gpu-profile.sh [BUNDLE] [MODEL]   (default .gpu, ViT-B-32)
# env: BATCH (256), PRECISION (bf16), STEPS (2: the shorter run's steps), LOG_DIR
#      (gpu-profile-logs), NCU (ncu on the PATH, else Nsight Compute's usual places)
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh "${1:-.gpu}" || exit $?
model="${2:-ViT-B-32}"
batch="${BATCH:-256}"
precision="${PRECISION:-bf16}"
steps="${STEPS:-2}"
logs="${LOG_DIR:-gpu-profile-logs}"
mkdir -p "$logs"
ncu="${NCU:-$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}"
[ -x "$ncu" ] || { echo "gpu-profile.sh: no ncu (Nsight Compute) here; set NCU" >&2; exit 2; }
run=(train --topology topology/gpu-1x1.toml --model "configs/$model.toml" --batch "$batch"
     --precision "$precision" --quiet --eval-pairs 0 --eval-every 0)
"$bundle/mmpipe" bench --topology topology/gpu-1x1.toml --model "configs/$model.toml" \
  --batch "$batch" --precision "$precision" --steps 10 --warmup 2 >"$logs/bench.out" 2>&1 \
  || { echo "gpu-profile.sh: the bench failed: $(tail -3 "$logs/bench.out")" >&2; exit 1; }
step_ms=$(python3 -c 'import json,sys; print([json.loads(l[12:]) for l in open(sys.argv[1]) if l.startswith("RESULT_JSON ")][-1]["step_ms_median"])' "$logs/bench.out")
for n in "$steps" $((steps + 1)); do
  "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
    --log-file "$logs/ncu-$n.csv" "$bundle/mmpipe" "${run[@]}" --steps "$n" >"$logs/ncu-$n.out" 2>&1 \
    || { echo "gpu-profile.sh: ncu on $n steps failed: $(tail -3 "$logs/ncu-$n.out")" >&2; exit 1; }
done
echo "profile: $model, batch $batch, $precision, topology/gpu-1x1.toml (median step $step_ms ms unprofiled)"
python3 scripts/gpu_profile.py "$logs/ncu-$steps.csv" "$logs/ncu-$((steps + 1)).csv" 1 "$step_ms" | tee "$logs/profile.txt"
