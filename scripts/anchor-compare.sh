#!/usr/bin/env bash
# mmpipe against OpenCLIP on this CPU, back to back: alternately the anchor's training step
# (../shared/anchors/openclip_cpu_bench.py: PyTorch, 2 threads, batch 128) and `mmpipe
# bench` on the same configuration, ROUNDS times; prints each run's samples/s (from the
# median step) and the ratio mmpipe / OpenCLIP, min / median / max over the rounds.
#
# usage: scripts/anchor-compare.sh [ROUNDS (default 3)] [extra mmpipe bench args...]
# env: OPENCLIP_PYTHON (default /tmp/openclip-venv/bin/python; set it up with the anchor
#      README's two commands), ANCHOR_DIR (default ../shared/anchors), MMPIPE (default
#      target/release/mmpipe), STEPS (timed steps per run, default 10).
# Run it on an idle machine: two threads sharing a core with a build run 4-5x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
shift || true
python="${OPENCLIP_PYTHON:-/tmp/openclip-venv/bin/python}"
anchor="${ANCHOR_DIR:-../shared/anchors}/openclip_cpu_bench.py"
mmpipe="${MMPIPE:-target/release/mmpipe}"
steps="${STEPS:-10}"
[ -x "$python" ] || { echo "anchor-compare.sh: no Python with torch + open_clip at $python (see $(dirname "$anchor")/README.md)" >&2; exit 1; }
[ -f "$anchor" ] || { echo "anchor-compare.sh: no anchor script at $anchor" >&2; exit 1; }
[ -x "$mmpipe" ] || { echo "anchor-compare.sh: build mmpipe first (cargo build --release)" >&2; exit 1; }

openclip=() ours=()
for round in $(seq 1 "$rounds"); do
  a=$("$python" "$anchor" --steps "$steps" --warmup 3 --breakdown-steps 0 | sed -n 's/^RESULT_JSON //p' \
      | python3 -c 'import json,sys; t=json.load(sys.stdin)["timed"]; print(1000*128/t["ms_per_step_median"])')
  m=$("$mmpipe" bench --steps "$steps" "$@" | sed -n 's/^RESULT_JSON //p' \
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["samples_per_second"])')
  printf 'round %d: OpenCLIP %.1f samples/s, mmpipe %.1f samples/s, ratio %.2f\n' "$round" "$a" "$m" \
    "$(python3 -c "print($m / $a)")"
  openclip+=("$a") ours+=("$m")
done
python3 - "${openclip[*]}" "${ours[*]}" <<'PY'
import statistics, sys
a = [float(v) for v in sys.argv[1].split()]
m = [float(v) for v in sys.argv[2].split()]
r = [y / x for x, y in zip(a, m)]
print(f"OpenCLIP samples/s min/median/max {min(a):.1f}/{statistics.median(a):.1f}/{max(a):.1f}")
print(f"mmpipe   samples/s min/median/max {min(m):.1f}/{statistics.median(m):.1f}/{max(m):.1f}")
print(f"ratio mmpipe/OpenCLIP min/median/max {min(r):.2f}/{statistics.median(r):.2f}/{max(r):.2f} over {len(r)} rounds")
PY
