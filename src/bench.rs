//! `mmpipe bench`: the training step on a fixed configuration (by default OpenCLIP's CPU
//! anchor's, `configs/openclip-anchor.toml`: the same towers, batch, AdamW settings, f32,
//! and this machine's cores; `scripts/anchor-compare.sh` times OpenCLIP beside it), timed step by step, with the FLOPs it does set against this
//! machine's matrix-multiply peak: on the CPU an f32 GEMM on the same threads, on a GPU a
//! bf16 GEMM (8192³, random data) timed in the same process (the ratio is the MFU).

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::ClipConfig;
use crate::plan::{GradReduce, Precision};
use crate::topology::Topology;
use crate::train::{self, PhaseTimes, TrainConfig};

/// What to time.
pub struct BenchOptions {
    pub model: ClipConfig,
    pub topology: Topology,
    pub batch: usize,
    /// Timed steps, after `warmup` untimed ones (allocator and caches settle).
    pub steps: usize,
    pub warmup: usize,
    /// As `train` takes them (None: bf16 on CUDA, fp32 on the CPU).
    pub precision: Option<Precision>,
    pub grad_reduce: GradReduce,
    pub tf32: bool,
    /// As `train.grad_overlap` and `train.grad_bucket_mb`.
    pub grad_overlap: bool,
    pub grad_bucket_mb: f64,
    /// As `train.feature_overlap` and `train.flash_attention`.
    pub feature_overlap: bool,
    pub flash_attention: bool,
}

impl BenchOptions {
    /// The anchor's training settings with this bench's precision.
    fn train_config(&self, steps: usize) -> TrainConfig {
        TrainConfig {
            precision: self.precision,
            grad_all_reduce: self.grad_reduce,
            tf32: self.tf32,
            grad_overlap: self.grad_overlap,
            grad_bucket_mb: self.grad_bucket_mb,
            feature_overlap: self.feature_overlap,
            flash_attention: self.flash_attention,
            ..anchor_train_config(self.batch, steps)
        }
    }
}

/// What the planner predicts for the benched step (`mmpipe plan` on the same topology,
/// model, batch and settings), to set beside what was measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    pub step_ms: f64,
    /// The busiest device's compute and communication, and its idle time.
    pub compute_ms: f64,
    pub comm_ms: f64,
    pub idle_ms: f64,
    /// The fullest device's peak bytes.
    pub memory_bytes: f64,
}

impl BenchOptions {
    /// The planner's step for these options; None where the topology gives the cost model
    /// nothing to go on (no device kinds or links).
    pub fn prediction(&self) -> Result<Option<Prediction>> {
        let cfg = self.train_config(self.steps);
        let options = cfg.cost_options(self.topology.device);
        let plan = crate::plan::Plan::new(&self.topology, &self.model, &options)?;
        Ok(plan.split.map(|s| {
            let busiest = s
                .classes
                .iter()
                .max_by(|a, b| (a.compute_s + a.comm_s).total_cmp(&(b.compute_s + b.comm_s)))
                .expect("a layout has devices");
            Prediction {
                step_ms: 1e3 * s.step_s,
                compute_ms: 1e3 * busiest.compute_s,
                comm_ms: 1e3 * busiest.comm_s,
                idle_ms: 1e3 * busiest.idle_s,
                memory_bytes: s.rank_memory_bytes.iter().copied().fold(0.0, f64::max),
            }
        }))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub batch: usize,
    pub steps: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms_max: f64,
    /// From the median step.
    pub samples_per_second: f64,
    /// The model's forward + backward FLOPs per sample (3× the forward, multiply-adds
    /// counted as 2), as OpenCLIP's profile counts them.
    pub gflop_per_sample: f64,
    /// The same for what mmpipe runs: its towers' last blocks run at the pooled token only.
    pub executed_gflop_per_sample: f64,
    /// Executed FLOPs per second: the hardware's share of work done.
    pub achieved_gflops: f64,
    /// The model's FLOPs per second (`gflop_per_sample` × samples/s): comparable to a
    /// trainer that runs every token through every block.
    pub model_gflops: f64,
    pub gemm_peak_gflops: f64,
    /// `achieved_gflops / gemm_peak_gflops`.
    pub fraction_of_peak: f64,
    pub threads: usize,
    /// Per rank: tower and mean milliseconds per timed step in each phase (data wait,
    /// forward, exchange, loss, backward, gradient all-reduce, optimizer).
    pub phases_ms: Vec<(String, [f64; 7])>,
    /// "fp32" or "bf16".
    pub precision: String,
    /// The planner's, for the same step (None: no cost model for this topology).
    pub predicted: Option<Prediction>,
}

/// The anchor's optimizer and schedule (AdamW lr 1e-4, weight decay 0.1, betas 0.9/0.98,
/// eps 1e-6, constant lr), no evaluation, no progress bar.
pub fn anchor_train_config(batch: usize, steps: usize) -> TrainConfig {
    TrainConfig {
        seed: 0,
        steps,
        global_batch: batch,
        lr: 1e-4,
        warmup: 0,
        schedule: crate::train::optim::Schedule::Constant,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        progress: false,
        eval: crate::train::config::EvalConfig {
            every: 0,
            pairs: 0,
            sets: Vec::new(),
        },
        ..TrainConfig::default()
    }
}

/// A device's matrix-multiply rate in `dtype`, GFLOP/s: 8192 × 8192 × 8192 products of
/// random matrices (a product of zeros runs faster than real data), three warm-ups, then
/// the best of three rounds of ten back to back, each round timed to its last product's
/// end. On a GPU, through the same cuBLAS path as the step's matmuls (TF32 for f32 as
/// candle is set).
pub fn device_gemm_peak_gflops(device: &Device, dtype: DType) -> Result<f64> {
    const N: usize = 8192;
    let a = Tensor::randn(0f32, 1.0, (N, N), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (N, N), device)?.to_dtype(dtype)?;
    for _ in 0..3 {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..10 {
            a.matmul(&b)?;
        }
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() / 10.0);
    }
    Ok(2.0 * (N * N * N) as f64 / best / 1e9)
}

/// The best of a few large f32 matrix products on this process's compute threads (the
/// GEMM's shape is a ViT MLP's at batch 128 × 65 tokens), in GFLOP/s.
pub fn gemm_peak_gflops() -> Result<f64> {
    let (m, k, n) = (8320, 256, 1024);
    let a = vec![1f32; m * k];
    let b = vec![1f32; k * n];
    // The GEMM alone, into one output buffer written six times: no allocation or zero fill
    // in the timing (those are the step's overheads, not the hardware's limit).
    let mut c = vec![0f32; m * n];
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        let t = Instant::now();
        // SAFETY: row-major a (m × k), b (k × n), c (m × n), each its own allocation.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0f32,
                1f32,
                false,
                false,
                false,
                parallelism,
            )
        };
        best = best.min(t.elapsed().as_secs_f64());
    }
    if c[0] != k as f32 {
        return Err(crate::error::Error::Msg(format!(
            "GEMM peak probe: c[0] = {}, expected {k}",
            c[0]
        )));
    }
    Ok(2.0 * (m * k * n) as f64 / best / 1e9)
}

/// Trains `warmup + steps` steps and reports the timed ones.
/// `gemm_peak` is [`gemm_peak_gflops`] on `threads` threads, measured by the caller (in a
/// process of its own, whose thread pool is not sized per rank).
pub fn run(opts: &BenchOptions, threads: usize, gemm_peak: f64) -> Result<BenchReport> {
    // The warm-up is a run of its own (the allocator keeps its memory, the caches stay
    // warm), so the timed run's phase totals hold timed steps only.
    if opts.warmup > 0 {
        train::train(&opts.topology, &opts.model, &opts.train_config(opts.warmup))?;
    }
    let config = opts.train_config(opts.steps);
    let report = train::train(&opts.topology, &opts.model, &config)?;
    let mut timed: Vec<f64> = report.step_seconds.iter().map(|s| s * 1e3).collect();
    timed.sort_by(f64::total_cmp);
    if timed.is_empty() {
        return Err(crate::error::Error::Msg("no timed steps".into()));
    }
    let step_ms = crate::train::metrics::median(timed.iter().copied());
    let embed = opts.model.embed_dim;
    let (vision, text) = (opts.model.vision.size(), opts.model.text.size());
    let gflop_per_sample = 3.0 * (vision.forward_flops(embed) + text.forward_flops(embed)) / 1e9;
    let executed_gflop_per_sample =
        3.0 * (vision.executed_forward_flops(embed) + text.executed_forward_flops(embed)) / 1e9;
    let samples_per_second = opts.batch as f64 / (step_ms / 1e3);
    let achieved = samples_per_second * executed_gflop_per_sample;
    let peak = gemm_peak;
    let all_steps = report.step_seconds.len().max(1) as f64;
    let phases_ms = report
        .phases
        .iter()
        .map(|(tower, p): &(String, PhaseTimes)| {
            (
                tower.to_string(),
                p.as_array().map(|d| d.as_secs_f64() * 1e3 / all_steps),
            )
        })
        .collect();
    Ok(BenchReport {
        batch: opts.batch,
        steps: timed.len(),
        step_ms_median: step_ms,
        step_ms_min: timed[0],
        step_ms_max: timed[timed.len() - 1],
        samples_per_second,
        gflop_per_sample,
        executed_gflop_per_sample,
        achieved_gflops: achieved,
        model_gflops: samples_per_second * gflop_per_sample,
        gemm_peak_gflops: peak,
        fraction_of_peak: achieved / peak,
        threads,
        phases_ms,
        precision: match config.precision_on(opts.topology.device) {
            Precision::Fp32 => "fp32".into(),
            Precision::Bf16 => "bf16".into(),
        },
        // The timings stand without it: a planner that cannot size this run says why.
        predicted: opts.prediction().unwrap_or_else(|e| {
            tracing::warn!("the planner has no prediction for this bench: {e}");
            None
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every setting `mmpipe bench` takes reaches the runs it times (`--no-feature-overlap`
    /// once stopped at the bench's options).
    #[test]
    fn the_bench_trains_with_its_settings() {
        let opts = BenchOptions {
            model: ClipConfig::default_tiny(),
            topology: Topology::from_file(std::path::Path::new("topology/cpu-dp2.toml")).unwrap(),
            batch: 8,
            steps: 2,
            warmup: 1,
            precision: Some(Precision::Bf16),
            grad_reduce: GradReduce::Bf16,
            tf32: false,
            grad_overlap: false,
            grad_bucket_mb: 3.0,
            feature_overlap: false,
            flash_attention: false,
        };
        let cfg = opts.train_config(5);
        assert_eq!(cfg.steps, 5);
        assert_eq!(cfg.precision, Some(Precision::Bf16));
        assert_eq!(cfg.grad_all_reduce, GradReduce::Bf16);
        assert!(!cfg.tf32 && !cfg.grad_overlap && !cfg.feature_overlap && !cfg.flash_attention);
        assert_eq!(cfg.grad_bucket_mb, 3.0);
    }

    /// The bench's prediction is `mmpipe plan`'s for the same step: its step time, the
    /// busiest device's split, the fullest device's memory; flash attention's setting
    /// reaches it (bf16 on a GPU keeps no attention probabilities); a topology with no
    /// device kinds gets none.
    #[test]
    fn the_bench_predicts_what_the_planner_predicts() {
        // ViT-B/32: heads of 64, which flash attention takes.
        let model = ClipConfig::from_file(std::path::Path::new("configs/ViT-B-32.toml")).unwrap();
        let on = |path: &str, flash_attention: bool| BenchOptions {
            model: model.clone(),
            topology: Topology::from_file(std::path::Path::new(path)).unwrap(),
            batch: 64,
            steps: 2,
            warmup: 1,
            precision: None,
            grad_reduce: GradReduce::Fp32,
            tf32: true,
            grad_overlap: true,
            grad_bucket_mb: 25.0,
            feature_overlap: true,
            flash_attention,
        };
        let opts = on("topology/gpu-1x1.toml", true);
        let got = opts
            .prediction()
            .unwrap()
            .expect("gpu-1x1 declares a device kind");
        let options = opts.train_config(2).cost_options(opts.topology.device);
        let split = crate::plan::Plan::new(&opts.topology, &opts.model, &options)
            .unwrap()
            .split
            .unwrap();
        assert_eq!(got.step_ms, 1e3 * split.step_s);
        assert_eq!(got.memory_bytes, split.classes[0].memory.total);
        assert!((got.compute_ms + got.comm_ms + got.idle_ms - got.step_ms).abs() < 1e-9);
        let kept = on("topology/gpu-1x1.toml", false)
            .prediction()
            .unwrap()
            .unwrap();
        assert!(
            kept.memory_bytes > got.memory_bytes,
            "{kept:?} against {got:?}"
        );
        assert_eq!(
            on("topology/cpu-1x1.toml", true).prediction().unwrap(),
            None
        );
    }
}
