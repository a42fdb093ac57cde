#!/usr/bin/env bash
# Everything the GPU part of the work measures, in one call on a lent GPU machine (the
# device tool allows 10 minutes a command): the checks, mmpipe beside OpenCLIP on the
# same GPU, today's full-f32 baseline, the bf16 curve, the profile by op class. Each
# stage has a time limit, so one slow stage cannot take the others with it.
#
# usage, from the checkout on the GPU machine (carry .gpu/ with the packed bundle of
# `scripts/cuda-build.sh --bundle .gpu --pack` and .gpu-anchor/ from ../shared/anchors/gpu):
#   OUT=$OUT bash scripts/gpu-run.sh [BUNDLE]       (default .gpu/mmpipe-gpu.tar.xz)
# env: STAGES (default "checks bench baseline decode profile": the stages to run, in that
#      order), BENCH_MODELS (default "ViT-B-16 ViT-B-32"), STEPS and WARMUP (gpu-bench.sh's,
#      default 20 and 3), PROFILE_MODEL (default ViT-B-32). A short lease runs
#      "checks bench decode" first and the rest in a second call.
# Writes $OUT/gpu-run.txt (every stage's summary, also on stdout) and $OUT/gpu-logs.tar.xz
# (every log). Copy the summary into docs/gpu/ with the commit it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-.gpu/mmpipe-gpu.tar.xz}"
out="${OUT:-gpu-run-out}"
mkdir -p "$out"
logs=$(mktemp -d)
summary="$out/gpu-run.txt"
: >"$summary"
say() { echo "$@" | tee -a "$summary"; }
# name, seconds, command...: runs it with its output in the summary.
stage() {
  local name=$1 limit=$2 start rc
  shift 2
  say "== $name (limit ${limit}s)"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$summary"
  rc=${PIPESTATUS[0]}
  say "== $name: exit $rc after $((SECONDS - start))s"
}
say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1)"
# Unpack once: every script below takes the directory.
unpacked=$(mktemp -d)
if [ -f "$bundle" ]; then
  tar xJf "$bundle" -C "$unpacked" || { say "cannot unpack $bundle"; exit 2; }
  bundle="$unpacked"
fi
# The commit the bundle's executables were built from (scripts/cuda-build.sh writes it;
# the working tree's own commit, where .git travelled, for the scripts).
say "bundle built at $(cat "$bundle/COMMIT" 2>/dev/null || echo 'an unknown commit (no COMMIT in the bundle)'); scripts at $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git here)')"
stages=" ${STAGES:-checks bench baseline decode profile} "
wants() { [[ "$stages" == *" $1 "* ]]; }
read -r -a bench_models <<<"${BENCH_MODELS:-ViT-B-16 ViT-B-32}"
wants checks && stage checks 170 env LOG_DIR="$logs/check" bash scripts/gpu-check.sh "$bundle"
wants bench && stage "side by side, bf16" 240 env LOG_DIR="$logs/bench" PRECISION=bf16 bash scripts/gpu-bench.sh "$bundle" "${bench_models[@]}"
# Today's baseline for the speed-up: full f32, as mmpipe ran before this work.
wants baseline && stage "mmpipe ViT-B/32 full f32" 50 bash -c "source scripts/gpu-env.sh '$bundle' && \
  \"\$bundle/mmpipe\" bench --topology topology/gpu-1x1.toml --model configs/ViT-B-32.toml \
  --batch 256 --precision fp32 --no-tf32 --steps 10 --warmup 2 | grep -vE '^RESULT_JSON'"
# Whether 16 cores decode real JPEGs as fast as the GPU trains (issue 21, part 4): the
# training loader at ViT-B/16's 224 px, all cores. The full-size real-photo shard when it
# was carried (`cp ../shared/data/real-photos/shard-000000.tar .gpu-anchor/real-photos.tar`),
# else the repository's 128 px copy (cheaper to decode than real photos).
decode_shard=.gpu-anchor/real-photos.tar
[ -f "$decode_shard" ] || decode_shard=tests/fixtures/real-photos.tar
wants decode && stage "decode rate, $(nproc) workers, $decode_shard" 20 bash -c "source scripts/gpu-env.sh '$bundle' && \
  \"\$bundle/mmpipe\" data bench --shards '$decode_shard' --model configs/ViT-B-16.toml \
  --workers $(nproc) --batch 256 --batches 10"
wants profile && stage "profile ${PROFILE_MODEL:-ViT-B-32} bf16" 140 env LOG_DIR="$logs/profile" bash scripts/gpu-profile.sh "$bundle" "${PROFILE_MODEL:-ViT-B-32}"
tar cJf "$out/gpu-logs.tar.xz" -C "$logs" . 2>/dev/null
echo "summary: $summary; logs: $out/gpu-logs.tar.xz"
