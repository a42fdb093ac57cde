#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU and no Rust toolchain, run from the
# repository root on a bundle made by `scripts/cuda-build.sh --bundle DIR` elsewhere:
#   1. loss parity and every gradient with CUDA tensors (rank threads sharing the GPU)
#      against one CPU device on the whole batch (tests parity::cuda);
#   2. NCCL on single-rank communicators: every collective, dtypes, CPU round trip
#      (tests nccl::);
#   3. `mmpipe train` on topology/gpu-1x1.toml against the same run on the CPU: the
#      losses of 20 steps;
#   4. throughput: `mmpipe train` on the GPU with ViT-B/32 at batch 256, samples/s and
#      the phases.
# One summary line per check (PASS/FAIL ...), the logs under $LOG_DIR (default
# gpu-check-logs); exit status non-zero if any check failed. About 2-3 minutes on an H100.
#
# usage: scripts/gpu-check.sh [BUNDLE]   (a directory, default .gpu, or its .tar.xz from
#        scripts/cuda-build.sh --bundle DIR --pack)
set -uo pipefail
cd "$(dirname "$0")/.."
bundle="${1:-.gpu}"
logs="${LOG_DIR:-gpu-check-logs}"
mkdir -p "$logs"
if [ -f "$bundle" ]; then
  unpacked=$(mktemp -d)
  tar xJf "$bundle" -C "$unpacked" || { echo "gpu-check.sh: cannot unpack $bundle" >&2; exit 2; }
  bundle="$unpacked"
fi
[ -x "$bundle/mmpipe" ] && [ -x "$bundle/suite" ] || {
  echo "gpu-check.sh: no mmpipe and suite executables in $bundle (make them with scripts/cuda-build.sh --bundle $bundle)" >&2
  exit 2
}

# The binary loads cuBLAS, cuRAND, NVRTC, the CUDA runtime and NCCL at start-up (CUDA 13,
# NCCL 2.30). Where the system has no copy, take the ones in Python's nvidia-* wheels
# (PyTorch's); never a stand-in libcuda: the driver's is the real one. Only what the
# loader does not find already is looked for.
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
    exit 1
  fi
  dirs+=("$(dirname "$found")")
done
if [ ${#dirs[@]} -gt 0 ]; then
  LD_LIBRARY_PATH="$(printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
fi
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "gpu: ${gpu:-nvidia-smi gave nothing}"

failed=0
report() { # name, status, detail
  printf '%s %-28s %s\n' "$2" "$1" "$3"
  [ "$2" = PASS ] || failed=1
}

# Runs test filter $2 of the suite; summary: the tests and their time.
tests() {
  local name=$1 filter=$2 start end log="$logs/$1.log"
  start=$(date +%s.%N)
  "$bundle/suite" "$filter" --test-threads "${TEST_THREADS:-4}" >"$log" 2>&1
  local rc=$?
  end=$(date +%s.%N)
  local summary
  summary=$(grep -E '^test result:' "$log" | tail -1)
  if [ $rc -eq 0 ] && grep -qE 'test result: ok\. [1-9]' "$log"; then
    report "$name" PASS "$(echo "$summary" | grep -oE '[0-9]+ passed'), $(awk "BEGIN { printf \"%.1f\", $end - $start }") s"
  else
    report "$name" FAIL "exit $rc: $(grep -E '^(thread|---- |test .* FAILED)' "$log" | head -3 | tr '\n' ' ') (log: $log)"
  fi
}

tests parity-and-gradients-cuda parity::cuda::
tests nccl-single-rank nccl::

# 3. The CLI on the GPU against the CPU: 20 steps of the tiny model, same seed.
train_losses() { # topology, metrics file
  "$bundle/mmpipe" train --topology "$1" --steps 20 --quiet --seed 0 --eval-every 0 \
    --metrics "$2" >"$2.out" 2>&1
}
if train_losses topology/cpu-1x1.toml "$logs/cpu.jsonl" && train_losses topology/gpu-1x1.toml "$logs/gpu.jsonl"; then
  detail=$(python3 - "$logs/cpu.jsonl" "$logs/gpu.jsonl" <<'EOF'
import json, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(a - b) for a, b in zip(cpu, gpu))
ok = len(cpu) == len(gpu) == 20 and worst < 1e-3
print(("ok " if ok else "bad ") + f"20 steps, loss {cpu[0]:.4f} -> {cpu[-1]:.4f} (cpu) / {gpu[-1]:.4f} (cuda), max |dloss| {worst:.1e}")
EOF
)
  case "$detail" in
    ok*) report train-cuda-vs-cpu PASS "${detail#ok }" ;;
    *) report train-cuda-vs-cpu FAIL "${detail#bad }" ;;
  esac
else
  report train-cuda-vs-cpu FAIL "mmpipe train failed: $(tail -q -n 3 "$logs"/*.jsonl.out | tr '\n' ' ')"
fi

# 4. Throughput: ViT-B/32 with the CLIP text tower, batch 256, f32, both towers sharing
# the GPU as threads (the data pipeline makes synthetic samples on the CPU).
out="$logs/throughput.out"
if "$bundle/mmpipe" train --topology topology/gpu-1x1.toml --model configs/ViT-B-32.toml \
     --batch "${BATCH:-256}" --steps "${STEPS:-30}" --quiet --eval-every 0 --eval-pairs 0 \
     --metrics "$logs/throughput.jsonl" >"$out" 2>&1; then
  report throughput PASS "$(grep -E '^loss ' "$out" | sed 's/^loss [^;]*; //')"
  sed -n '/ms\/step by phase/,/^peak memory/p' "$out"
else
  report throughput FAIL "$(tail -3 "$out" | tr '\n' ' ')"
fi
exit $failed
