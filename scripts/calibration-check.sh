#!/usr/bin/env bash
# Predicted (mmpipe plan --calibrate) against measured (mmpipe train) step time on the CPU
# thread topologies. Run from the repository root on a quiet machine:
#   bash scripts/calibration-check.sh [BATCH] [STEPS]
# Prints a markdown table; docs/planner.md keeps the last run's.
set -euo pipefail
batch=${1:-128}
steps=${2:-60}
bin=target/release/mmpipe
cargo build --release --quiet
echo "| topology | predicted step (ms) | measured median step (ms) | error |"
echo "|---|---|---|---|"
for t in cpu-1x1 cpu-2x1 cpu-2x2; do
  predicted=$($bin plan --topology topology/$t.toml --calibrate --batch "$batch" --format json 2>/dev/null \
    | python3 -c 'import json,sys; print(1e3*json.load(sys.stdin)["split"]["step_s"])')
  measured=$($bin train --topology topology/$t.toml --batch "$batch" --steps "$steps" --eval-pairs 0 --quiet \
    | sed -n 's/.*median step \([0-9.]*\) ms.*/\1/p')
  python3 -c "p,m=$predicted,$measured; print(f'| $t | {p:.1f} | {m:.1f} | {100*(p-m)/m:+.1f}% |')"
done
