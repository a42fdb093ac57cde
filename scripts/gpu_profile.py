"""Where a GPU training step's time goes, by op class, from two Nsight Compute logs.

    python3 scripts/gpu_profile.py SHORT.csv LONG.csv STEPS_DIFF STEP_MS

SHORT.csv and LONG.csv are `ncu --csv --print-units base --metrics gpu__time_duration.sum`
logs of the same `mmpipe train` run with N and N + STEPS_DIFF steps (scripts/gpu-profile.sh):
start-up, warm-up and the end are the same in both, so their difference is exactly
STEPS_DIFF steps' kernels. STEP_MS is the step's wall time without the profiler (mmpipe
bench's median): what the kernels do not cover is the GPU waiting (launches, host work,
synchronisation). Prints ms per step and share for each class, and each class's
heaviest kernels.
"""
import csv
import re
import sys
from collections import defaultdict

# First match wins. candle's kernels (candle-kernels: unary `u*`, binary `b*`, `affine`,
# `cast_*`, `copy2d`, reductions `fast_*`, indexing `is_*`/`ia_*`/`where_*`), cuBLAS'
# (Hopper: `nvjet*`, `sm90_xmma*`, cutlass), NCCL's, and mmpipe's own AdamW.
CLASSES = [
    ("optimizer", r"adamw"),
    ("GEMM (cuBLAS)", r"gemm|gemv|xmma|cutlass|nvjet|splitk|cublas|kernel2"),
    ("collectives (NCCL)", r"nccl"),
    ("reductions (sums, max: norms, softmax, bias gradients)", r"^fast_|^sum_|reduce|layernorm|rmsnorm|softmax|argm"),
    ("casts and copies (dtype casts, contiguous, cat, fill)", r"^cast_|copy|^fill|^const_set"),
    ("indexing (embedding rows, gather, index_add, where)", r"^is_|^ia_|^sa_|gather|scatter|index|^where"),
    ("elementwise (unary, binary, affine)", r"^u[a-z]+_|^b[a-z]+_|^affine|^(eq|ne|lt|le|gt|ge)_|elu|gelu|relu|sigmoid"),
]


def classify(name):
    short = name.split("(")[0].split("<")[0].strip().lower()
    short = short.replace("void ", "")
    for label, pattern in CLASSES:
        if re.search(pattern, short):
            return label
    return "other"


def kernels(path):
    """(kernel name, nanoseconds) of every profiled launch."""
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1.0)
        rows.append((row["Kernel Name"], value * scale))
    return rows


def totals(rows):
    by_class, by_kernel = defaultdict(float), defaultdict(float)
    for name, ns in rows:
        by_class[classify(name)] += ns
        by_kernel[name] += ns
    return by_class, by_kernel


def main(short, long, steps, step_ms):
    steps, step_ms = int(steps), float(step_ms)
    a, b = kernels(short), kernels(long)
    (ca, ka), (cb, kb) = totals(a), totals(b)
    per_step = {c: (cb[c] - ca.get(c, 0.0)) / steps / 1e6 for c in cb}
    kernel_step = {k: (kb[k] - ka.get(k, 0.0)) / steps / 1e6 for k in kb}
    launches = (len(b) - len(a)) / steps
    busy = sum(per_step.values())
    print(f"one step: {launches:.0f} kernel launches, {busy:.1f} ms of kernels, step {step_ms:.1f} ms")
    print(f"{'class':<58} {'ms/step':>8} {'share':>6}")
    rows = sorted(per_step.items(), key=lambda kv: -kv[1])
    rows.append(("waits (GPU idle: launches, host work, synchronisation)", max(step_ms - busy, 0.0)))
    for c, ms in rows:
        print(f"{c:<58} {ms:>8.2f} {100 * ms / step_ms:>5.1f}%")
    print("heaviest kernels per class (ms/step):")
    for c, _ in rows[:-1]:
        top = sorted((kv for kv in kernel_step.items() if classify(kv[0]) == c), key=lambda kv: -kv[1])[:3]
        for name, ms in top:
            print(f"  {c.split(' (')[0]:<16} {ms:>7.2f}  {name[:110]}")
    print("(attention's products are under GEMM, its softmax under reductions and elementwise:"
          " it runs as plain candle ops until part 2's fused kernel)")


if __name__ == "__main__":
    main(*sys.argv[1:5])
