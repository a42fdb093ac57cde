#!/usr/bin/env bash
# Sourced by the GPU scripts on a GPU machine: unpacks a bundle made by
# `scripts/cuda-build.sh --bundle DIR [--pack]` (a directory, or its .tar.xz) and puts the
# libraries its binary loads at start-up (cuBLAS, cuRAND, NVRTC, the CUDA runtime, NCCL)
# on LD_LIBRARY_PATH: from a system CUDA or Python's nvidia-* wheels (PyTorch's), never a
# stand-in libcuda (the driver's is the real one). Only what the loader misses is looked for.
#   source scripts/gpu-env.sh BUNDLE     then $bundle/mmpipe and $bundle/suite
bundle="${1:-.gpu}"
if [ -f "$bundle" ]; then
  unpacked=$(mktemp -d)
  tar xJf "$bundle" -C "$unpacked" || { echo "gpu-env.sh: cannot unpack $bundle" >&2; return 2 2>/dev/null || exit 2; }
  bundle="$unpacked"
fi
if ! [ -x "$bundle/mmpipe" ] || ! [ -x "$bundle/suite" ]; then
  echo "gpu-env.sh: no mmpipe and suite executables in $bundle (make them with scripts/cuda-build.sh --bundle $bundle)" >&2
  return 2 2>/dev/null || exit 2
fi
dirs=()
for lib in $(ldd "$bundle/mmpipe" | awk '/not found/ { print $1 }'); do
  found=""
  for root in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
              $(python3 -c 'import site; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
    [ -d "$root" ] || continue
    found=$(find -L "$root" -maxdepth 5 -name "$lib" -print -quit 2>/dev/null)
    [ -n "$found" ] && break
  done
  if [ -z "$found" ]; then
    echo "FAIL libraries: $lib not found (system CUDA or Python nvidia-* wheels)"
    return 1 2>/dev/null || exit 1
  fi
  dirs+=("$(dirname "$found")")
done
if [ ${#dirs[@]} -gt 0 ]; then
  LD_LIBRARY_PATH="$(printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
fi
export bundle
