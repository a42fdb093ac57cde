//! What `train` and `bench` print about a run: its precision, time per phase, collective
//! bytes and memory. One printer for both, so the two read alike.

use std::fmt::Display;

use mmpipe::comm::overlap::OverlapStats;
use mmpipe::plan::{self, GradReduce, Precision};
use mmpipe::topology::{DeviceKind, Topology};
use mmpipe::train::{PhaseBytes, PhaseTimes, TrainConfig};

/// "bf16 (f32 master weights, gradients summed in fp32)", or "fp32 (TF32 matmuls)".
pub fn precision(cfg: &TrainConfig, topology: &Topology) -> String {
    let reduce = match cfg.grad_all_reduce {
        GradReduce::Fp32 => "fp32",
        GradReduce::Bf16 => "bf16",
    };
    let tf32 = match (topology.device, cfg.tf32) {
        (DeviceKind::Cuda, true) => ", TF32 for f32 matmuls",
        _ => "",
    };
    // Where bf16 attention in heads of 64 goes (the only place the choice exists).
    let attention = match (topology.device, cfg.flash_attention) {
        (DeviceKind::Cuda, true) => ", flash attention",
        (DeviceKind::Cuda, false) => ", attention keeps its probabilities",
        _ => "",
    };
    match cfg.precision_on(topology.device) {
        Precision::Bf16 => {
            format!("bf16 (f32 master weights, gradients summed in {reduce}{tf32}{attention})")
        }
        Precision::Fp32 => format!("fp32 (gradients summed in {reduce}{tf32})"),
    }
}

/// Says what a precision setting does on a CPU topology, where TF32 does not exist and
/// bf16 is slow.
pub fn precision_notes(cfg: &TrainConfig, topology: &Topology) {
    if topology.device != DeviceKind::Cpu {
        return;
    }
    if cfg.precision_on(topology.device) == Precision::Bf16 {
        eprintln!(
            "note: bf16 on the CPU ({}) trains in bf16 for real, but slowly: candle's CPU bf16 \
             matrix products convert through f32",
            topology.source.display()
        );
    }
    if !cfg.tf32 {
        eprintln!(
            "note: tf32 = false changes nothing on {}: CPUs have no TF32 (it applies to cuda topologies)",
            topology.source.display()
        );
    }
    if !cfg.flash_attention {
        eprintln!(
            "note: flash_attention = false changes nothing on {}: flash attention is a GPU kernel \
             (bf16 heads of 64 on cuda topologies); CPU attention keeps its probabilities",
            topology.source.display()
        );
    }
}

/// Each rank's phase totals as milliseconds per step.
pub fn phases_per_step(phases: &[(String, PhaseTimes)], steps: usize) -> Vec<(String, [f64; 7])> {
    phases
        .iter()
        .map(|(tower, p)| {
            (
                tower.clone(),
                p.as_array()
                    .map(|d| d.as_secs_f64() * 1e3 / steps.max(1) as f64),
            )
        })
        .collect()
}

/// The table of milliseconds per step, one row per rank.
pub fn print_phases<T: Display>(rows: &[(T, [f64; 7])]) {
    print!("ms/step by phase  rank tower     ");
    for name in PhaseTimes::NAMES {
        print!(" {name:>15}");
    }
    println!();
    for (rank, (tower, ms)) in rows.iter().enumerate() {
        print!("                  {rank:>4} {:<10}", tower.to_string());
        for v in ms {
            print!(" {v:>15.1}");
        }
        println!();
    }
}

/// Each rank's collective payload per step, by phase.
pub fn print_bytes(phases: &[(String, PhaseTimes)], bytes: &[PhaseBytes], steps: usize) {
    println!(
        "collective payload per step  rank tower       feature all-gather   loss exchange  grad all-reduce"
    );
    let per_step = |b: u64| plan::short_bytes(b / steps.max(1) as u64);
    for (rank, ((tower, _), b)) in phases.iter().zip(bytes).enumerate() {
        println!(
            "                             {rank:>4} {tower:<10} {:>19} {:>15} {:>16}",
            per_step(b.exchange),
            per_step(b.loss),
            per_step(b.grad_all_reduce)
        );
    }
}

/// Each rank's gradient sums that ran in buckets during backward (`train.grad_overlap`):
/// how many, how long the worker spent summing, and how much of that backward hid (the
/// grad all-reduce phase is the part it did not). Nothing when no rank overlapped.
pub fn print_overlap(phases: &[(String, PhaseTimes)], overlap: &[OverlapStats], steps: usize) {
    print_feature_overlap(overlap, steps);
    if overlap.iter().all(|o| o.buckets == 0) {
        return;
    }
    let steps = steps.max(1) as f64;
    println!("gradient sums during backward  rank tower      buckets/step  summing ms/step  exposed ms/step  hidden");
    for (rank, ((tower, times), o)) in phases.iter().zip(overlap).enumerate() {
        if o.buckets == 0 {
            continue;
        }
        let busy = o.busy.as_secs_f64() * 1e3 / steps;
        let exposed = times.grad_all_reduce.as_secs_f64() * 1e3 / steps;
        let hidden = hidden_share(busy, exposed);
        println!(
            "                               {rank:>4} {tower:<10} {:>12.1} {:>16.1} {:>16.1} {:>6.0}%",
            o.buckets as f64 / steps,
            busy,
            exposed,
            100.0 * hidden
        );
    }
}

/// The share of a collective's `busy` time that compute hid, `exposed` of it still
/// waited for.
fn hidden_share(busy: f64, exposed: f64) -> f64 {
    if busy > 0.0 {
        ((busy - exposed) / busy).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// Per rank that holds both towers: the image features' gather during its text forward,
/// how long it took and what of it the rank still waited for.
fn print_feature_overlap(overlap: &[OverlapStats], steps: usize) {
    if overlap.iter().all(|o| o.feature_gathers == 0) {
        return;
    }
    let steps = steps.max(1) as f64;
    println!("image features gathered during the text forward  rank  gathers/step  gathering ms/step  exposed ms/step  hidden");
    for (rank, o) in overlap.iter().enumerate() {
        if o.feature_gathers == 0 {
            continue;
        }
        let busy = o.feature_gather_busy.as_secs_f64() * 1e3 / steps;
        let exposed = o.feature_gather_waited.as_secs_f64() * 1e3 / steps;
        let hidden = hidden_share(busy, exposed);
        println!(
            "                                                 {rank:>4} {:>13.1} {:>18.2} {:>16.2} {:>6.0}%",
            o.feature_gathers as f64 / steps,
            busy,
            exposed,
            100.0 * hidden
        );
    }
}

/// The process's peak resident set and, after a GPU run, the device's peak in use;
/// returns the GPU's in MiB.
pub fn print_memory() -> Option<f64> {
    if let Some(mib) = mmpipe::train::metrics::process_status_mib("VmHWM") {
        println!("peak memory (resident, whole process): {mib:.0} MiB");
    }
    let (used, total) = mmpipe::comm::device::memory_peak()?;
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "peak GPU memory in use (whole device, after backward): {:.0} of {:.0} MiB",
        mib(used),
        mib(total)
    );
    Some(mib(used))
}
