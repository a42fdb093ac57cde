//! `mmpipe train`: one thread per rank, each running its tower's steps; world rank 0 shows
//! progress, and at the end the towers encode held-out pairs for a retrieval check.

pub mod calibrate;
pub mod checkpoints;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod pairs;
pub mod phase;
mod run;
pub mod step;
pub mod tensorboard;
pub mod trainer;

use std::time::{Duration, Instant};

use candle_core::Device;

pub use crate::comm::launch::Ranks;
pub use config::TrainConfig;
pub use pairs::Readable;
pub use phase::{PhaseBytes, PhaseTimes};
pub use step::{SkipReason, StepGrads, StepOutcome};
pub use trainer::{RankTrainer, StateBytes};

use crate::comm::overlap::OverlapStats;
use crate::comm::{thread, RankComms};
use crate::data::order::SkipCounts;
use crate::data::{DataKind, Source};
use crate::error::Result;
use crate::eval::retrieval::RetrievalSet;
use crate::eval::zero_shot::{LabelledImages, ZeroShotSet};
use crate::eval::{EvalScores, EvalSet};
use crate::model::ClipConfig;
use crate::topology::Topology;
use config::EvalSetKind;
use metrics::MetricsFile;
use run::{run_rank, RankInputs, RankOutcome};

/// Set by SIGINT/SIGTERM (or [`request_stop`]): the run finishes its step, saves a
/// checkpoint and returns.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks a running [`train`] to stop after its current step.
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Whether [`request_stop`] was called since the run started.
fn stop_requested() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The global loss at every step.
    pub losses: Vec<f64>,
    /// World rank 0's wall time of every step (data included), in seconds.
    pub step_seconds: Vec<f64>,
    /// Evaluations on held-out pairs: after which step (0-based), and the scores. The last
    /// one is the final model's.
    pub evals: Vec<(usize, EvalScores)>,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Per global rank: what it holds ("image", "text" or "image+text") and its summed
    /// phase times.
    pub phases: Vec<(String, PhaseTimes)>,
    /// Per global rank: its collective payload summed over the steps.
    pub bytes: Vec<PhaseBytes>,
    /// Per global rank: its gradient sums that ran during backward, summed over the steps.
    pub overlap: Vec<OverlapStats>,
    /// Per global rank: samples it could not use, by cause. Header problems (missing
    /// members, truncated shards) show on every rank; decoding problems on the ranks of
    /// the modality that hit them.
    pub skipped: Vec<SkipCounts>,
    /// Steps skipped because fewer than two pairs of their batch could be read.
    pub skipped_steps: usize,
    /// Steps skipped because the loss or a gradient was NaN or infinite.
    pub non_finite_steps: usize,
    /// Set when a stop request ended the run early: the steps completed.
    pub interrupted_at: Option<usize>,
    pub final_logit_scale: f64,
    /// SigLIP's logit bias at the end (0 for CLIP).
    pub final_logit_bias: f64,
}

impl TrainReport {
    /// The median step time: robust to the first steps' warm-up.
    pub fn median_step_seconds(&self) -> f64 {
        metrics::median(self.step_seconds.iter().copied())
    }
}

/// Trains the model over the topology's rank threads.
pub fn train(topology: &Topology, model: &ClipConfig, cfg: &TrainConfig) -> Result<TrainReport> {
    train_ranks(topology, model, cfg, Ranks::Threads)
}

/// Trains the model on `ranks`. In a multi-process run every process calls this with its
/// own rank; world rank 0 writes the metrics file (its own rank's phases) and evaluates,
/// and every process's report carries all ranks' phase times and bytes (gathered at the
/// end).
pub fn train_ranks(
    topology: &Topology,
    model: &ClipConfig,
    cfg: &TrainConfig,
    ranks: Ranks,
) -> Result<TrainReport> {
    cfg.validate_run(topology, model)?;
    // Process-wide in candle: whether CUDA's f32 matrix products may use TF32.
    candle_core::cuda::set_gemm_reduced_precision_f32(cfg.tf32);
    // Process-wide too: whether attention on GPUs may take the flash kernels.
    crate::model::fused::set_flash_attention(cfg.flash_attention);
    // Every data decision, and every missing file, before any rank starts.
    let process_rank = match &ranks {
        Ranks::Threads => None,
        Ranks::Process { rank, .. } => Some(*rank),
    };
    // Shards and CSVs carry no held-out pairs of their own: where named sets are given
    // they are the evaluation, and nothing needs a warning.
    let has_no_pairs = matches!(cfg.data.kind, DataKind::Webdataset | DataKind::Csv);
    let held_out_pairs = if has_no_pairs && !cfg.eval.sets.is_empty() {
        0
    } else {
        cfg.eval.pairs
    };
    let source = Source::new(&cfg.data, model, cfg.seed, held_out_pairs, process_rank)?;
    // The named evaluation sets, read (and any bad folder or shard named) before any rank
    // starts.
    let sets = cfg
        .eval
        .sets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let shards = || {
                crate::data::shards::resolve(
                    &s.shards,
                    &cfg.data.base_dir,
                    &cfg.data.origin,
                    &format!("eval.sets[{i}].shards"),
                )
            };
            if s.kind == EvalSetKind::Retrieval {
                return Ok(EvalSet::Retrieval(match &s.csv {
                    Some(csv) => RetrievalSet::from_csv(&s.name, csv, &s.csv_pairs(), model)?,
                    None => RetrievalSet::from_shards(&s.name, &shards()?, model)?,
                }));
            }
            let names = s.class_names.as_deref();
            let images = match (&s.folder, &s.csv, names) {
                (Some(folder), _, _) => LabelledImages::from_folder(folder, names)?,
                (None, Some(csv), _) => LabelledImages::from_csv(csv, &s.csv_labels(), names)?,
                (None, None, Some(names)) => LabelledImages::from_shards(&shards()?, names)?,
                (None, None, None) => unreachable!("TrainConfig::validate requires one"),
            };
            Ok(EvalSet::ZeroShot(ZeroShotSet::new(
                &s.name,
                images,
                s.templates.as_deref(),
                model,
            )?))
        })
        .collect::<Result<Vec<_>>>()?;
    STOP.store(false, std::sync::atomic::Ordering::SeqCst);
    // Ranks whose lines the metrics file collects: all of them as threads, rank 0's alone
    // across processes.
    let (writes_metrics, metric_ranks) = match &ranks {
        Ranks::Threads => (true, topology.world_size()),
        Ranks::Process { rank, .. } => (*rank == 0, 1),
    };
    // The checkpoint folder, checked and held by the process that writes the saves'
    // state (world rank 0), before any rank starts.
    let _checkpoint_lock = match (&cfg.checkpoint_dir, writes_metrics) {
        (Some(dir), true) => Some(checkpoints::prepare(
            dir,
            checkpoints::save_bytes(model),
            "checkpoint_dir",
        )?),
        _ => None,
    };
    let metrics = (writes_metrics && (cfg.metrics.is_some() || cfg.tensorboard.is_some()))
        .then(|| {
            MetricsFile::create(
                cfg.metrics.as_deref(),
                cfg.tensorboard.as_deref(),
                metric_ranks,
                cfg.global_batch,
            )
        })
        .transpose()?;
    let started = Instant::now();
    let work = |rank: usize, comms: &RankComms| {
        let data = RankInputs {
            source: &source,
            sets: &sets,
            embed_dim: model.embed_dim,
            metrics: metrics.as_ref().map(MetricsFile::sender),
        };
        run_rank(topology, rank, comms, model, cfg, data)
    };
    let outcomes = match &ranks {
        Ranks::Threads => thread::run_ranks(
            topology,
            Duration::from_secs_f64(cfg.collective_timeout),
            |rank, comms| work(rank, &comms),
        ),
        Ranks::Process { rank, comms } => work(*rank, comms).map(|o| vec![o]),
    };
    if let Some(m) = metrics {
        m.finish()?;
    }
    let outcomes = outcomes?;
    let seconds = started.elapsed().as_secs_f64();
    let lead = &outcomes[0];
    let (phases, bytes, overlap) = match &ranks {
        Ranks::Threads => (
            outcomes.iter().map(|o| o.phases).collect(),
            outcomes.iter().map(|o| o.bytes).collect(),
            outcomes.iter().map(|o| o.overlap).collect(),
        ),
        Ranks::Process { comms, .. } => gather_accounts(comms, lead)?,
    };
    Ok(TrainReport {
        losses: lead.losses.clone(),
        step_seconds: lead.step_seconds.clone(),
        evals: lead.evals.clone(),
        seconds,
        samples_per_second: (lead.steps_run * cfg.global_batch) as f64 / seconds,
        phases: phases
            .into_iter()
            .zip(&topology.ranks)
            .map(|(p, r)| (r.label(), p))
            .collect(),
        bytes,
        overlap,
        skipped: outcomes.iter().map(|o| o.skipped.clone()).collect(),
        skipped_steps: lead.skipped_steps,
        non_finite_steps: lead.non_finite_steps,
        interrupted_at: lead.interrupted_at,
        final_logit_scale: lead.logit_scale,
        final_logit_bias: lead.logit_bias,
    })
}

/// Every process's phase times, bytes and overlapped collectives, by world rank: one small
/// world all-gather.
type Accounts = (Vec<PhaseTimes>, Vec<PhaseBytes>, Vec<OverlapStats>);

fn gather_accounts(comms: &RankComms, mine: &RankOutcome) -> Result<Accounts> {
    let mut row: Vec<f64> = mine
        .phases
        .as_array()
        .iter()
        .map(Duration::as_secs_f64)
        .collect();
    let b = mine.bytes;
    row.extend([b.exchange, b.loss, b.grad_all_reduce].map(|v| v as f64));
    let o = mine.overlap;
    row.extend([
        o.buckets as f64,
        o.during_backward as f64,
        o.busy.as_secs_f64(),
        o.feature_gathers as f64,
        o.feature_gather_busy.as_secs_f64(),
        o.feature_gather_waited.as_secs_f64(),
    ]);
    let width = row.len();
    let all: Vec<Vec<f64>> = comms
        .world
        .all_gather(&candle_core::Tensor::from_vec(
            row,
            (1, width),
            &Device::Cpu,
        )?)?
        .to_vec2()?;
    let seconds = Duration::from_secs_f64;
    let mut accounts: Accounts = Default::default();
    for r in &all {
        accounts
            .0
            .push(PhaseTimes::from_array(std::array::from_fn(|i| {
                seconds(r[i])
            })));
        accounts.1.push(PhaseBytes {
            exchange: r[7] as u64,
            loss: r[8] as u64,
            grad_all_reduce: r[9] as u64,
        });
        accounts.2.push(OverlapStats {
            buckets: r[10] as usize,
            during_backward: r[11] as usize,
            busy: seconds(r[12]),
            feature_gathers: r[13] as usize,
            feature_gather_busy: seconds(r[14]),
            feature_gather_waited: seconds(r[15]),
        });
    }
    Ok(accounts)
}
