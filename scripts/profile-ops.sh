#!/usr/bin/env bash
# Where a CPU training step's time goes, by op class: samples `mmpipe bench` with perf
# (after start-up and the warm-up) and sums the flat profile's symbols into classes
# (matmul, attention, layer norm, GELU, linear bias, optimizer, elementwise, copies and
# fills, allocator and kernel, communication, other), in % of the sampled CPU time.
#
# usage: scripts/profile-ops.sh [extra mmpipe bench args...]
# env: MMPIPE (default target/release/mmpipe; build with `cargo build --release`, whose
#      profile keeps the symbols), DELAY_MS (default 10000: start-up, GEMM peak, warm-up),
#      PERF_DATA (default a temporary file). Needs `perf` (Debian: linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
mmpipe="${MMPIPE:-target/release/mmpipe}"
delay="${DELAY_MS:-10000}"
command -v perf >/dev/null || { echo "profile-ops.sh: perf not found (Debian: apt install linux-perf)" >&2; exit 1; }
[ -x "$mmpipe" ] || { echo "profile-ops.sh: build mmpipe first (cargo build --release)" >&2; exit 1; }
data="${PERF_DATA:-$(mktemp /tmp/mmpipe-perf.XXXXXX)}"

perf record -q -o "$data" -D "$delay" -F 999 -- "$mmpipe" bench --steps 8 "$@" | grep -E '^(bench|step|compute):'
perf report -i "$data" --no-children --sort symbol --stdio 2>/dev/null | python3 -c '
import re, sys
# First match wins: the attention and linear ops call GEMMs, which count as matmul.
classes = [
    ("matmul (GEMM kernels and packing)", r"gemm"),
    ("attention (scores softmax, masks)", r"AttentionOp"),
    ("layer norm", r"layer_norm"),
    ("GELU", r"gelu"),
    ("softmax (outside attention)", r"Softmax|softmax_"),
    ("linear bias (its gradient)", r"LinearOp"),
    ("optimizer (AdamW)", r"optim::|AdamW"),
    ("communication (thread backend)", r"comm::|crossbeam"),
    ("copies and fills (memcpy, memset, strided copies, cat)", r"memmove|memcpy|memset|copy_strided|copy2d|spec_extend|SpecExtend"),
    ("allocator and kernel (page faults, frees)", r"^\[k\]|mi_|malloc|_free|clear_page|page_fault"),
    ("elementwise (candle: adds, scales, reductions)", r"binary_map|unary_map|Map1|Map2|BarrierPool|vec_sum|affine|reduce|where_cond|index_"),
]
totals = {name: 0.0 for name, _ in classes}
other = 0.0
unclassified = []
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\[[.k]\])\s+(.*)", line)
    if not m:
        continue
    share, kind, sym = float(m.group(1)), m.group(2), m.group(3).strip()
    key = ("[k] " if kind == "[k]" else "") + sym
    for name, pattern in classes:
        if re.search(pattern, key):
            totals[name] += share
            break
    else:
        other += share
        unclassified.append((share, sym))
print("%-56s %13s" % ("op class", "% of CPU time"))
for name, share in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"{name:<56} {share:>13.1f}")
print("%-56s %13.1f" % ("other", other))
top = ", ".join(f"{s[:60]} {p:.1f}%" for p, s in sorted(unclassified, reverse=True)[:3])
if top:
    print(f"  largest in other: {top}")
'
[ -n "${PERF_DATA:-}" ] || rm -f "$data"
