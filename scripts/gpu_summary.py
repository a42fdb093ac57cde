"""gpu-bench.sh's summary lines, from the benches' `RESULT_JSON {...}` lines.

  gpu_summary.py side-by-side MODEL PRECISION MMPIPE_OUT OPENCLIP_OUT SUMMARY_JSONL
      mmpipe's step beside OpenCLIP's (same model, batch, precision, GPU): the ratio of
      samples/s, TFLOP/s, MFU, memory, and the planner's prediction.
  gpu_summary.py ablation MODEL FLASH_OUT KEPT_OUT SUMMARY_JSONL
      mmpipe's bf16 step with flash attention and with the probabilities kept.

Each appends one JSON row to SUMMARY_JSONL and prints one line. A figure a bench did not
report (OpenCLIP's FLOP count where its counter failed, memory on a CPU) prints as n/a
rather than stopping the summary.
"""
import json
import sys


def result(path):
    """The last RESULT_JSON line of a bench's output."""
    lines = [line for line in open(path) if line.startswith("RESULT_JSON ")]
    if not lines:
        sys.exit(f"gpu_summary.py: no RESULT_JSON line in {path}")
    return json.loads(lines[-1][len("RESULT_JSON "):])


def fmt(value, spec, scale=1.0):
    return "n/a" if value is None else format(value * scale, spec)


def append(summary, row):
    with open(summary, "a") as f:
        f.write(json.dumps(row) + "\n")


def side_by_side(model, precision, ours_path, theirs_path, summary):
    a, b = result(ours_path), result(theirs_path)
    ratio = a["samples_per_second"] / b["samples_per_s"]
    predicted = a.get("predicted") or {}
    memory = predicted.get("memory_bytes")
    # The optimizer's share: its phase on the busiest rank, over the step.
    optimizer_ms = max(phases[6] for _, phases in a["phases_ms"])
    row = {
        "model": model, "precision": precision, "batch": a["batch"],
        "mmpipe_samples_per_s": a["samples_per_second"],
        "openclip_samples_per_s": b["samples_per_s"],
        "ratio": ratio,
        "mmpipe_tflops": a["achieved_gflops"] / 1e3,
        "openclip_tflops": b.get("tflops"),
        "mmpipe_mfu": a.get("fraction_of_peak"),
        "bf16_gemm_tflops": a["gemm_peak_gflops"] / 1e3,
        "openclip_bf16_gemm_tflops": b.get("bf16_matmul_tflops"),
        "mmpipe_optimizer_share": optimizer_ms / a["step_ms_median"],
        "mmpipe_gpu_tensor_peak_mib": a.get("gpu_tensor_peak_mib"),
        "openclip_peak_gpu_mem_gib": b.get("peak_gpu_mem_gib"),
        # The planner's step and memory for the same run (mmpipe plan's cost model).
        "mmpipe_predicted_step_ms": predicted.get("step_ms"),
        "mmpipe_predicted_memory_gib": memory / 2**30 if memory else None,
    }
    append(summary, row)
    ours_mib = row["mmpipe_gpu_tensor_peak_mib"]
    print(f"SIDE-BY-SIDE {model} {precision} batch {a['batch']}: "
          f"mmpipe {a['samples_per_second']:.1f} samples/s ({row['mmpipe_tflops']:.1f} TFLOP/s, "
          f"MFU {fmt(row['mmpipe_mfu'], '.1f', 100)}%), OpenCLIP {b['samples_per_s']:.1f} "
          f"({fmt(row['openclip_tflops'], '.1f')} TFLOP/s): ratio {ratio:.2f}; "
          f"peak memory mmpipe {fmt(ours_mib, '.2f', 1 / 1024)} GiB (tensors), "
          f"OpenCLIP {fmt(row['openclip_peak_gpu_mem_gib'], '.2f')} GiB (allocated); "
          f"mmpipe's optimizer {100 * row['mmpipe_optimizer_share']:.1f}% of its step")


def ablation(model, flash_path, kept_path, summary):
    flash, kept = result(flash_path), result(kept_path)
    row = {
        "model": model, "ablation": "flash_attention",
        "flash_samples_per_s": flash["samples_per_second"],
        "kept_samples_per_s": kept["samples_per_second"],
        "flash_gpu_tensor_peak_mib": flash.get("gpu_tensor_peak_mib"),
        "kept_gpu_tensor_peak_mib": kept.get("gpu_tensor_peak_mib"),
    }
    append(summary, row)
    print(f"ABLATION {model} bf16: flash attention {row['flash_samples_per_s']:.1f} samples/s, "
          f"peak {fmt(row['flash_gpu_tensor_peak_mib'], '.0f')} MiB; probabilities kept "
          f"{row['kept_samples_per_s']:.1f} samples/s, peak {fmt(row['kept_gpu_tensor_peak_mib'], '.0f')} MiB")


if __name__ == "__main__":
    commands = {"side-by-side": (side_by_side, 5), "ablation": (ablation, 4)}
    if len(sys.argv) < 2 or sys.argv[1] not in commands or len(sys.argv) != 2 + commands[sys.argv[1]][1]:
        sys.exit(__doc__)
    run, _ = commands[sys.argv[1]]
    run(*sys.argv[2:])
