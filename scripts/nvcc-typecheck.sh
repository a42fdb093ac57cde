#!/usr/bin/env bash
# An `nvcc` for type-checking the `cuda` feature only (`cargo clippy` / `cargo check`,
# which never link or run): candle-kernels' build script compiles ~40 CUDA files with
# nvcc even for a check (measured: 10 of the 15 minutes of `cargo clippy --features
# cuda` on 2 cores), so here every compile (`--ptx`, `-c`, `--lib`) writes an empty
# output instead; anything else (`--version`, queries) goes to the real nvcc on PATH.
#
# Use it as NVCC=scripts/nvcc-typecheck.sh, then remove candle-kernels' outputs and
# fingerprints (`rm -rf target/debug/build/candle-kernels-* target/debug/.fingerprint/
# candle-kernels-*`, as .ci/run does) or use a CARGO_TARGET_DIR of its own: a real build
# would otherwise reuse the empty PTX (cudaforge's cache keys on the sources and flags,
# not on the nvcc). Never for a build that runs: scripts/cuda-build.sh uses the real nvcc.
set -euo pipefail
compile=0 out="" outdir="" sources=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --ptx | -c | --lib) compile=1 ;;
    -o) out="${args[$((i + 1))]}"; i=$((i + 1)) ;;
    --output-directory) outdir="${args[$((i + 1))]}"; i=$((i + 1)) ;;
    *.cu) sources+=("${args[$i]}") ;;
  esac
done
if [ "$compile" = 0 ]; then
  real="$(command -v nvcc)" || { echo "nvcc-typecheck.sh: no real nvcc on PATH for: $*" >&2; exit 1; }
  exec "$real" "$@"
fi
if [ -n "$out" ]; then
  # An archive's magic makes an empty static library valid for tools that open it.
  case "$out" in *.a) printf '!<arch>\n' >"$out" ;; *) : >"$out" ;; esac
else
  for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    : >"${outdir:-.}/$name.ptx"
  done
fi
