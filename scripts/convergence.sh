#!/usr/bin/env bash
# Convergence evidence and the ablation table of docs/convergence.md, from scratch:
#   1. Fashion-MNIST (captions from prompt templates), configs/train/fashion-mnist.toml,
#      the same seed and schedule on the 1x1, 2x1 and 1x2 (image x text) rank-thread
#      splits: loss curves compared step by step, zero-shot accuracy on all 10,000 test
#      images every 100 steps;
#   2. ablations on 2x1: loss exchange, tiling, micro-batch accumulation, SigLIP;
#   3. linear probes on the 1x1 model's image features and on raw pixels, for reference.
# Plots and tables go to docs/convergence/; runs (metrics, checkpoints) to $OUT.
# About 20 minutes on 2 cores. STEPS=100 scripts/convergence.sh for a quick look.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-600}
OUT=${OUT:-runs/convergence}
DOCS=${DOCS:-docs/convergence}
PROBE=${PROBE:-60000}
cargo build --release --quiet
bin=target/release/mmpipe
mkdir -p "$OUT" "$DOCS"

run() {
    local name=$1
    shift
    rm -rf "${OUT:?}/$name"
    mkdir -p "$OUT/$name"
    echo "== $name: $*"
    "$bin" train --config configs/train/fashion-mnist.toml --steps "$STEPS" --quiet \
        --metrics "$OUT/$name/metrics.jsonl" --checkpoint-dir "$OUT/$name" "$@" |
        tee "$OUT/$name/stdout.txt"
}

run 1x1 --topology topology/cpu-1x1.toml
run 2x1 --topology topology/cpu-2x1.toml
run 1x2 --topology topology/cpu-1x2.toml
"$bin" report "$OUT/1x1" "$OUT/2x1" "$OUT/1x2" --out "$DOCS" --table "$DOCS/topologies.md"

run gather-scatter --topology topology/cpu-2x1.toml --exchange gather-scatter
run tile-16 --topology topology/cpu-2x1.toml --tile 16
run micro-batch --topology topology/cpu-2x1.toml --micro-batch-image 16 --micro-batch-text 32
run siglip --topology topology/cpu-2x1.toml --loss siglip
"$bin" report "$OUT/2x1" "$OUT/gather-scatter" "$OUT/tile-16" "$OUT/micro-batch" \
    "$OUT/siglip" "$OUT/1x1" "$OUT/1x2" --out "$OUT/ablation-plots" --table "$DOCS/ablation.md"

"$bin" eval --checkpoint "$OUT/1x1/$(cat "$OUT/1x1/latest")" --images 10000 \
    --linear-probe "$PROBE" | tee "$DOCS/probe.txt"
