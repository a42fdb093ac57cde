#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU and no Rust toolchain, run from the
# repository root on a bundle made by `scripts/cuda-build.sh --bundle DIR` elsewhere:
#   1. loss parity and every gradient with CUDA tensors (rank threads sharing the GPU)
#      against one CPU device on the whole batch, f64 and f32 (tests parity::cuda);
#   2. NCCL on single-rank communicators: every collective, dtypes, CPU round trip
#      (tests nccl::);
#   3. the one-launch AdamW kernel: NVRTC compiles it, and on random tensors it equals
#      the CPU AdamW bit for bit, masters, moments and bf16 copies; the one-launch
#      gradient norm equals the CPU's (tests optim::);
#   4. bf16 on the GPU against f32 on the CPU: loss, gradients, weights after 5 steps
#      (tests precision::cuda);
#   4b. the fused ops' CUDA kernels (layer norm, exact and quick GELU, softmax, attention's
#      softmax, flash attention (bf16 heads of 64), the token embedding; forward and
#      backward, f32 and bf16): NVRTC compiles them, they equal the
#      plain ops in f64 and run twice to the same bits, and their workbench timings against
#      the plain ops (tests fused::cuda, log fused-kernels-cuda.log holds the timings; the
#      same kernels run on the CPU emulator in every CI run: tests kernels::);
#   5. `mmpipe train` on topology/gpu-1x1.toml in full f32 (no TF32) against the same run
#      on the CPU: the losses of 20 steps, and of 10 steps on real photos (uploaded as
#      bytes, normalised on the GPU);
#   6. 300 steps of the default run in bf16 and in f32 on the GPU: the largest loss gap
#      (scripts/precision-curves.sh).
# One summary line per check (PASS/FAIL ...), the logs under $LOG_DIR (default
# gpu-check-logs); exit status non-zero if any check failed. Throughput and OpenCLIP side
# by side: scripts/gpu-bench.sh; the profile by op class: scripts/gpu-profile.sh.
#
# usage: scripts/gpu-check.sh [BUNDLE]   (a directory, default .gpu, or its .tar.xz from
#        scripts/cuda-build.sh --bundle DIR --pack)
set -uo pipefail
cd "$(dirname "$0")/.."
# The bundle and the libraries its binary loads (scripts/gpu-env.sh).
# shellcheck source=scripts/gpu-env.sh
source scripts/gpu-env.sh "${1:-.gpu}" || exit $?
logs="${LOG_DIR:-gpu-check-logs}"
mkdir -p "$logs"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "gpu: ${gpu:-nvidia-smi gave nothing}"

failed=0
report() { # name, status, detail
  printf '%s %-28s %s\n' "$2" "$1" "$3"
  [ "$2" = PASS ] || failed=1
}

# Runs test filter $2 of the suite (further arguments go to the test binary); summary: the
# tests and their time.
tests() {
  local name=$1 filter=$2 start end log="$logs/$1.log"
  shift 2
  start=$(date +%s.%N)
  "$bundle/suite" "$filter" --test-threads "${TEST_THREADS:-4}" "$@" >"$log" 2>&1
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
tests adamw-kernel optim::
tests bf16-cuda-vs-cpu-f32 precision::cuda::
tests fused-kernels-cuda fused::cuda:: --nocapture

# 5. The CLI on the GPU against the CPU, same seed, full f32: 20 steps of the tiny model on
#    the synthetic set; then 10 steps on the real photos of tests/fixtures, which a GPU
#    rank takes as bytes and normalises on the device (data.normalise_on's default there)
#    and the CPU normalises as it stacks them.
train_losses() { # topology, metrics file, more train arguments
  local topology=$1 metrics=$2
  shift 2
  "$bundle/mmpipe" train --topology "$topology" --quiet --seed 0 --eval-every 0 \
    --precision fp32 --no-tf32 --metrics "$metrics" "$@" >"$metrics.out" 2>&1
}
compare_train() { # check name, steps, file prefix, more train arguments
  local name=$1 steps=$2 prefix=$3
  shift 3
  if train_losses topology/cpu-1x1.toml "$logs/$prefix-cpu.jsonl" --steps "$steps" "$@" &&
    train_losses topology/gpu-1x1.toml "$logs/$prefix-gpu.jsonl" --steps "$steps" "$@"; then
    local detail
    detail=$(python3 - "$logs/$prefix-cpu.jsonl" "$logs/$prefix-gpu.jsonl" "$steps" <<'EOF'
import json, sys
def losses(p):
    return [json.loads(l)["loss"] for l in open(p) if '"loss"' in l]
cpu, gpu, steps = losses(sys.argv[1]), losses(sys.argv[2]), int(sys.argv[3])
worst = max(abs(a - b) for a, b in zip(cpu, gpu))
ok = len(cpu) == len(gpu) == steps and worst < 1e-3
print(("ok " if ok else "bad ") + f"{steps} steps, loss {cpu[0]:.4f} -> {cpu[-1]:.4f} (cpu) / {gpu[-1]:.4f} (cuda), max |dloss| {worst:.1e}")
EOF
)
    case "$detail" in
      ok*) report "$name" PASS "${detail#ok }" ;;
      *) report "$name" FAIL "${detail#bad }" ;;
    esac
  else
    report "$name" FAIL "mmpipe train failed: $(tail -q -n 3 "$logs/$prefix"-*.jsonl.out | tr '\n' ' ')"
  fi
}
compare_train train-cuda-vs-cpu 20 train
compare_train photos-as-bytes-vs-cpu 10 photos --model configs/clip-tiny-bpe.toml \
  --shards tests/fixtures/real-photos.tar --batch 8

# 6. bf16 tracks f32 over 300 steps (the loss gap of any step, and of 10-step means).
if curves=$(OUT="$logs/curves" bash scripts/precision-curves.sh topology/gpu-1x1.toml 300 "$bundle/mmpipe" 2>&1); then
  report bf16-curve-300-steps PASS "$(echo "$curves" | grep -E '^[0-9]+ steps:')"
else
  report bf16-curve-300-steps FAIL "$(echo "$curves" | tail -2 | tr '\n' ' ')"
fi
exit $failed
