#!/usr/bin/env bash
# The test command: fetches the real model fixtures once (target/fixtures/) and installs
# MPI where it can, then runs the whole suite, with the `mpi` feature's multi-process
# tests when MPI is there. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-fixtures.sh
features=()
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then
  features=(--features mpi)
fi
cargo test "${features[@]}" "$@"
