#!/usr/bin/env bash
# mmpipe's training step and OpenCLIP's own, side by side in one run on one GPU: the same
# model, batch and precision, each timed by its own bench (median step, CUDA-synchronised),
# and the ratio of their samples/s.
#
# usage: scripts/gpu-bench.sh [BUNDLE] [MODEL...]
#   BUNDLE  scripts/cuda-build.sh --bundle output (directory or .tar.xz), default .gpu
#   MODEL   OpenCLIP architecture names with a configs/NAME.toml here (default ViT-B-32 ViT-B-16)
# env: BATCH (256), PRECISION (bf16 or fp32: OpenCLIP's amp_bf16, or fp32 with TF32 on
#      both sides), STEPS (20 timed), WARMUP (3), ANCHOR (OpenCLIP's GPU anchor folder,
#      default .gpu-anchor: `cp -r ../shared/anchors/gpu/. .gpu-anchor/`), LOG_DIR
#      (default gpu-bench-logs: every output, and summary.json), FLASH_ABLATION (models
#      whose bf16 step is timed again with --no-flash-attention, default ViT-B-16; empty:
#      none).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh "${1:-.gpu}" || exit $?
shift || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(ViT-B-32 ViT-B-16)
batch="${BATCH:-256}"
precision="${PRECISION:-bf16}"
anchor="${ANCHOR:-.gpu-anchor}"
logs="${LOG_DIR:-gpu-bench-logs}"
mkdir -p "$logs"
[ -f "$anchor/openclip_gpu_bench.py" ] || { echo "gpu-bench.sh: no OpenCLIP anchor in $anchor (ANCHOR=...)" >&2; exit 2; }
case "$precision" in
  bf16) anchor_flags=(--precision amp_bf16) ;;
  fp32) anchor_flags=(--precision fp32 --tf32) ;;
  *) echo "gpu-bench.sh: PRECISION is bf16 or fp32, not $precision" >&2; exit 2 ;;
esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$anchor"/wheels/*.whl || { echo "gpu-bench.sh: the anchor's wheels did not install" >&2; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"

failed=0
for m in "${models[@]}"; do
  config="configs/$m.toml"
  [ -f "$config" ] || { echo "gpu-bench.sh: no $config" >&2; failed=1; continue; }
  ours="$logs/mmpipe-$m-$precision.out"
  theirs="$logs/openclip-$m-$precision.out"
  "$bundle/mmpipe" bench --topology topology/gpu-1x1.toml --model "$config" --batch "$batch" \
    --precision "$precision" --steps "${STEPS:-20}" --warmup "${WARMUP:-3}" >"$ours" 2>&1 \
    || { echo "FAIL mmpipe $m: $(tail -3 "$ours" | tr '\n' ' ')"; failed=1; continue; }
  python3 "$anchor/openclip_gpu_bench.py" --model "$m" --batch-size "$batch" \
    --steps "${STEPS:-20}" --warmup "${WARMUP:-3}" "${anchor_flags[@]}" >"$theirs" 2>&1 \
    || { echo "FAIL OpenCLIP $m: $(tail -3 "$theirs" | tr '\n' ' ')"; failed=1; continue; }
  grep -vE '^RESULT_JSON' "$ours"
  python3 scripts/gpu_summary.py side-by-side "$m" "$precision" "$ours" "$theirs" "$logs/summary.json" \
    || failed=1
  # The step with attention keeping its probabilities (no flash kernels), where asked:
  # what flash attention buys the whole step, in time and in memory.
  if [ "$precision" = bf16 ] && [[ " ${FLASH_ABLATION-ViT-B-16} " == *" $m "* ]]; then
    kept="$logs/mmpipe-$m-$precision-kept-probabilities.out"
    "$bundle/mmpipe" bench --topology topology/gpu-1x1.toml --model "$config" --batch "$batch" \
      --precision "$precision" --no-flash-attention --steps "${STEPS:-20}" --warmup "${WARMUP:-3}" >"$kept" 2>&1 \
      || { echo "FAIL mmpipe $m --no-flash-attention: $(tail -3 "$kept" | tr '\n' ' ')"; failed=1; continue; }
    python3 scripts/gpu_summary.py ablation "$m" "$ours" "$kept" "$logs/summary.json" || failed=1
  fi
done
exit $failed
