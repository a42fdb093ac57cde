#!/usr/bin/env bash
# Builds mmpipe with the `cuda` feature (CUDA tensors, NCCL) on a machine with no GPU and
# no system CUDA toolkit, through the shared recipe (NVIDIA's PyPI wheels, CUDA 13.0,
# and a link-time stand-in for libcuda).
#
# usage: scripts/cuda-build.sh [--bundle DIR] [--dev]
#   (no option)    cargo build --release --features cuda   (binary: $CARGO_TARGET_DIR/release/mmpipe)
#   --dev          the dev profile instead (what CI builds: it shares CI's other builds' deps)
#   --setup        only make the CUDA venv; then `source $CUDA_VENV/cuda-env.sh` for cargo
#   --bundle DIR   also builds the test executables and copies, stripped, the binary and the
#                  integration-test executable into DIR (default .gpu), for
#                  scripts/gpu-check.sh on a GPU machine with no Rust toolchain
#   --pack         with --bundle: also DIR/mmpipe-gpu.tar.xz (~19 MB: the two executables
#                  carry the same ~60 MB of kernel PTX, which compresses well)
# env: CUDA_VENV (default ~/.cache/cuda13-venv), CUDA_RECIPE (default
#      scripts/cuda/setup-cuda-build.sh), CARGO_TARGET_DIR (default target-cuda, so the CPU
#      build in target/ is not rebuilt each time), CUDA_COMPUTE_CAP (default 90: H100/H200;
#      80 gives PTX that also JITs on newer GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=""
pack=0
setup_only=0
profile=(--release)
profile_dir=release
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) bundle="${2:-.gpu}"; shift 2 || shift ;;
    --dev) profile=(); profile_dir=debug; shift ;;
    --pack) pack=1; shift ;;
    --setup) setup_only=1; shift ;;
    *) echo "cuda-build.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

venv="${CUDA_VENV:-$HOME/.cache/cuda13-venv}"
recipe="${CUDA_RECIPE:-scripts/cuda/setup-cuda-build.sh}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"

if [ ! -f "$venv/cuda-env.sh" ]; then
  [ -f "$recipe" ] || { echo "cuda-build.sh: no CUDA recipe at $recipe (set CUDA_RECIPE)" >&2; exit 1; }
  bash "$recipe" "$venv" none
fi
# shellcheck disable=SC1091
source "$venv/cuda-env.sh"
[ "$setup_only" = 1 ] && { echo "cuda-build.sh: source $venv/cuda-env.sh"; exit 0; }

# A bundle's executables are stripped, so our crate's line tables (the release profile's
# `debug = 1`, kept for backtraces elsewhere) would only cost compile time: built without
# them. Only mmpipe's own units change, so the dependencies built before are reused.
if [ -n "$bundle" ]; then
  profile+=(--config "profile.${profile_dir/debug/dev}.package.mmpipe.debug=false")
fi
cargo build "${profile[@]}" --features cuda
echo "cuda-build.sh: built $CARGO_TARGET_DIR/$profile_dir/mmpipe"

if [ -n "$bundle" ]; then
  # The integration-test executable's path, from cargo's JSON messages.
  suite=$(cargo test "${profile[@]}" --features cuda --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "suite" and m.get("executable"):
        print(m["executable"])')
  [ -n "$suite" ] || { echo "cuda-build.sh: no test executable named suite was built" >&2; exit 1; }
  mkdir -p "$bundle"
  strip -o "$bundle/mmpipe" "$CARGO_TARGET_DIR/$profile_dir/mmpipe"
  strip -o "$bundle/suite" "$suite"
  # The commit the executables were built from (the device machine gets no .git): what
  # scripts/gpu-run.sh reports as measured.
  echo "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src tests Cargo.toml Cargo.lock vendor 2>/dev/null || echo '+uncommitted')" >"$bundle/COMMIT"
  if [ "$pack" = 1 ]; then
    tar cf - -C "$bundle" mmpipe suite COMMIT | xz -9 -T2 >"$bundle/mmpipe-gpu.tar.xz"
  fi
  du -h "$bundle"/*
  echo "cuda-build.sh: bundle in $bundle; on the GPU machine: bash scripts/gpu-check.sh $bundle"
fi
