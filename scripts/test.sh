#!/usr/bin/env bash
# The test command: fetches the real model fixtures once (target/fixtures/) and installs
# MPI where it can, then runs the whole suite, with the `mpi` feature's multi-process
# tests when MPI is there, and the `cuda` feature where there is a GPU and the CUDA venv
# of scripts/cuda-build.sh --setup exists. MMPIPE_TEST_CUDA=1 builds and links the suite
# with `cuda` on a machine without a GPU too (skipping the tests that need one; CI leaves
# it off: its clippy already type-checks the cuda code, and the CUDA test build would take
# CI past 20 minutes); MMPIPE_TEST_CUDA=0 never adds `cuda`. Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-fixtures.sh
features=()
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then
  features+=(mpi)
fi
skip=()
venv="${CUDA_VENV:-$HOME/.cache/cuda13-venv}"
gpu=0
nvidia-smi -L >/dev/null 2>&1 && gpu=1
want_cuda="${MMPIPE_TEST_CUDA:-$gpu}"
if [ -f "$venv/cuda-env.sh" ] && [ "$want_cuda" = 1 ]; then
  # shellcheck disable=SC1091
  source "$venv/cuda-env.sh"
  features+=(cuda)
  if [ "$gpu" = 0 ]; then
    echo "test.sh: no GPU here: building with cuda, skipping the tests that need a GPU (scripts/gpu-check.sh runs them)"
    skip=(-- --skip parity::cuda:: --skip nccl:: --skip optim::cuda:: --skip precision::cuda::)
  fi
elif [ "$gpu" = 0 ]; then
  echo "test.sh: no GPU here: testing without the cuda feature (MMPIPE_TEST_CUDA=1 builds it anyway)"
fi
# A caller's own `--` (test-binary arguments) already opened the list the skips join.
if [ ${#skip[@]} -gt 0 ] && [[ " $* " == *" -- "* ]]; then skip=("${skip[@]:1}"); fi
# TensorBoard's reader, where fetch-fixtures.sh could install it.
if [ -z "${MMPIPE_TENSORBOARD_PYTHON:-}" ] && [ -x target/fixtures/tensorboard-venv/bin/python ]; then
  export MMPIPE_TENSORBOARD_PYTHON="$PWD/target/fixtures/tensorboard-venv/bin/python"
fi
flags=()
[ ${#features[@]} -gt 0 ] && flags=(--features "$(IFS=,; echo "${features[*]}")")
cargo test "${flags[@]}" "$@" "${skip[@]}"
