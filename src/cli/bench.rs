//! `mmpipe bench`: the training step's time, FLOP rate and share of this machine's GEMM
//! peak (MFU on a GPU), per phase and with memory.

use anyhow::Context;

use mmpipe::bench;
use mmpipe::comm::device::rank_device;
use mmpipe::comm::launch;
use mmpipe::plan::Precision;
use mmpipe::topology::{DeviceKind, Topology};
use mmpipe::train::TrainConfig;

use super::args::BenchArgs;
use super::{load_model, summary};

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.gemm_peak_only {
        println!("{}", bench::gemm_peak_gflops()?);
        return Ok(());
    }
    let topology = Topology::from_file(&args.topology)?;
    let model = load_model(Some(&args.model))?;
    let mut precision = TrainConfig::default();
    args.precision.apply(&mut precision);
    if !(precision.grad_bucket_mb.is_finite() && precision.grad_bucket_mb > 0.0) {
        anyhow::bail!(
            "--grad-bucket-mb {} is not a positive number of megabytes",
            precision.grad_bucket_mb
        );
    }
    summary::precision_notes(&precision, &topology);
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(launch::cores);
    let (peak, peak_name) = match topology.device {
        DeviceKind::Cuda => {
            // The GPU's bf16 GEMM in this process, before any training: the MFU's
            // denominator, as OpenCLIP's GPU anchor measures it.
            candle_core::cuda::set_gemm_reduced_precision_f32(precision.tf32);
            let device = rank_device(&topology, 0)?;
            let bf16 = bench::device_gemm_peak_gflops(&device, candle_core::DType::BF16)?;
            if precision.precision_on(topology.device) == Precision::Fp32 {
                let f32_peak = bench::device_gemm_peak_gflops(&device, candle_core::DType::F32)?;
                println!(
                    "f32 GEMM (8192³, random data, {}): {:.1} TFLOP/s",
                    if precision.tf32 {
                        "TF32 allowed"
                    } else {
                        "full f32"
                    },
                    f32_peak / 1e3
                );
            }
            (
                bf16,
                "bf16 GEMM (8192³, random data) on this GPU".to_string(),
            )
        }
        DeviceKind::Cpu => {
            // The peak in a process of its own: this one's thread pool is sized per rank.
            let peak_out = std::process::Command::new(std::env::current_exe()?)
                .args(["bench", "--gemm-peak-only"])
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()?;
            let peak: f64 = String::from_utf8_lossy(&peak_out.stdout)
                .trim()
                .parse()
                .context("measuring the GEMM peak")?;
            (peak, format!("f32 GEMM peak on {threads} threads"))
        }
    };
    let per_rank = launch::threads_per_rank(topology.world_size());
    println!(
        "bench: {} on {} ({}, as threads, {per_rank} compute thread{} each, {threads} in all), \
         batch {}, {}, {} timed steps after {} untimed",
        args.model.display(),
        topology.source.display(),
        topology.describe_groups(),
        if per_rank == 1 { "" } else { "s" },
        args.batch,
        summary::precision(&precision, &topology),
        args.steps,
        args.warmup
    );
    let report = bench::run(
        &bench::BenchOptions {
            model,
            topology: topology.clone(),
            batch: args.batch,
            steps: args.steps,
            warmup: args.warmup,
            precision: precision.precision,
            grad_reduce: precision.grad_all_reduce,
            tf32: precision.tf32,
            grad_overlap: precision.grad_overlap,
            grad_bucket_mb: precision.grad_bucket_mb,
            feature_overlap: precision.feature_overlap,
            flash_attention: precision.flash_attention,
        },
        threads,
        peak,
    )?;
    println!(
        "step: median {:.1} ms (min {:.1}, max {:.1}) = {:.1} samples/s",
        report.step_ms_median, report.step_ms_min, report.step_ms_max, report.samples_per_second
    );
    let scale = |gflops: f64| match topology.device {
        DeviceKind::Cuda => format!("{:.1} TFLOP/s", gflops / 1e3),
        DeviceKind::Cpu => format!("{gflops:.1} GFLOP/s"),
    };
    println!(
        "compute: {:.3} GFLOP/sample executed (forward + backward; the model's {:.3}, last blocks at the pooled token only) \
         = {} ({} in the model's FLOPs); {peak_name} {}; {:.1}% of peak{}",
        report.executed_gflop_per_sample,
        report.gflop_per_sample,
        scale(report.achieved_gflops),
        scale(report.model_gflops),
        scale(report.gemm_peak_gflops),
        100.0 * report.fraction_of_peak,
        if topology.device == DeviceKind::Cuda { " (MFU)" } else { "" },
    );
    if report.fraction_of_peak > 1.0 {
        // The probe is the best of six GEMMs, but all six can land on a busy moment.
        println!(
            "note: above the measured GEMM peak, so the peak probe ran slow (another process on \
             these cores, or a profiler starting up): rerun for a fraction that means something"
        );
    }
    summary::print_phases(&report.phases_ms);
    let mut json = serde_json::to_value(&report)?;
    let mut tensor_peak = None;
    if topology.device == DeviceKind::Cuda {
        let device = rank_device(&topology, 0)?;
        if let Some(peak) = mmpipe::comm::device::tensor_memory_peak(&device) {
            let mib = peak as f64 / 1048576.0;
            println!("peak GPU memory of tensors (the allocator's high-water mark): {mib:.0} MiB");
            json["gpu_tensor_peak_mib"] = serde_json::json!(mib);
            tensor_peak = Some(peak as f64);
        }
    }
    print_prediction(&report, &topology, tensor_peak);
    if let Some(mib) = summary::print_memory() {
        json["gpu_device_peak_mib"] = serde_json::json!(mib);
    }
    json["device"] = serde_json::json!(topology.device.to_string());
    println!("RESULT_JSON {json}");
    Ok(())
}

/// The planner's step beside the measured one: how far the cost model is off, in time
/// and, on a GPU, in memory (the allocator's peak against the fullest device's estimate).
fn print_prediction(report: &bench::BenchReport, topology: &Topology, tensor_peak: Option<f64>) {
    let Some(p) = &report.predicted else {
        println!(
            "planner: no prediction for {} (it declares no device kinds or links to rate; \
             `mmpipe plan --calibrate` measures this machine's rate)",
            topology.source.display()
        );
        return;
    };
    let gib = |b: f64| b / (1u64 << 30) as f64;
    println!(
        "planner: step {:.1} ms predicted (busiest device: compute {:.1}, comm {:.1}, idle {:.1}), \
         measured {:.1} ms = {:.2}x the prediction; memory {:.1} GiB a device predicted{}",
        p.step_ms,
        p.compute_ms,
        p.comm_ms,
        p.idle_ms,
        report.step_ms_median,
        report.step_ms_median / p.step_ms,
        gib(p.memory_bytes),
        match tensor_peak {
            Some(peak) => format!(
                ", tensors' peak {:.1} GiB = {:.2}x",
                gib(peak),
                peak / p.memory_bytes
            ),
            None => String::new(),
        }
    );
}
