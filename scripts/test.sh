#!/usr/bin/env bash
# The test command: fetches the real model fixtures once (target/fixtures/) and installs
# MPI where it can, then runs the whole suite, with the `mpi` feature's multi-process
# tests when MPI is there, and the `cuda` feature when the CUDA venv of
# scripts/cuda-build.sh --setup exists (its GPU tests only where there is a GPU; elsewhere
# the binary and tests are still built with CUDA and NCCL, and linked). Extra arguments
# go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-fixtures.sh
features=()
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then
  features+=(mpi)
fi
skip=()
venv="${CUDA_VENV:-$HOME/.cache/cuda13-venv}"
if [ -f "$venv/cuda-env.sh" ] && [ "${MMPIPE_TEST_CUDA:-1}" != 0 ]; then
  # shellcheck disable=SC1091
  source "$venv/cuda-env.sh"
  features+=(cuda)
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "test.sh: no GPU here: building with cuda, skipping the tests that need a GPU (scripts/gpu-check.sh runs them)"
    skip=(-- --skip parity::cuda:: --skip nccl::)
  fi
fi
# A caller's own `--` (test-binary arguments) already opened the list the skips join.
if [ ${#skip[@]} -gt 0 ] && [[ " $* " == *" -- "* ]]; then skip=("${skip[@]:1}"); fi
flags=()
[ ${#features[@]} -gt 0 ] && flags=(--features "$(IFS=,; echo "${features[*]}")")
cargo test "${flags[@]}" "$@" "${skip[@]}"
