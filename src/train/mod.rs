//! `mmpipe train`: one thread per rank, each running its tower's steps; world rank 0 shows
//! progress, and at the end the towers encode held-out pairs for a retrieval check.

pub mod calibrate;
pub mod config;
pub mod optim;
pub mod step;

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

pub use config::TrainConfig;
pub use step::{PhaseBytes, PhaseTimes, RankTrainer, StepGrads};

use crate::comm::{thread, RankComms};
use crate::data::{Stream, SyntheticSource};
use crate::error::{Error, Result};
use crate::eval::{recall_at_1, Retrieval};
use crate::loss::{split_len, split_offset, FeatureLayout};
use crate::model::ClipConfig;
use crate::topology::{DeviceKind, Topology, Tower};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The global loss at every step.
    pub losses: Vec<f64>,
    /// World rank 0's wall time of every step (data included), in seconds.
    pub step_seconds: Vec<f64>,
    pub retrieval: Option<Retrieval>,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Per global rank: its tower and its summed phase times.
    pub phases: Vec<(Tower, PhaseTimes)>,
    /// Per global rank: its collective payload summed over the steps.
    pub bytes: Vec<PhaseBytes>,
    pub final_logit_scale: f64,
    /// SigLIP's logit bias at the end (0 for CLIP).
    pub final_logit_bias: f64,
}

impl TrainReport {
    /// The median step time: robust to the first steps' warm-up.
    pub fn median_step_seconds(&self) -> f64 {
        let mut s = self.step_seconds.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

struct RankOutcome {
    losses: Vec<f64>,
    step_seconds: Vec<f64>,
    retrieval: Option<Retrieval>,
    phases: PhaseTimes,
    bytes: PhaseBytes,
    logit_scale: f64,
    logit_bias: f64,
}

/// Samples of step `step` owned by a rank: rows `offset..offset+len` of the global batch.
pub fn batch_indices(step: usize, global_batch: usize, offset: usize, len: usize) -> Vec<u64> {
    let start = (step * global_batch + offset) as u64;
    (start..start + len as u64).collect()
}

/// Trains the model on the built-in synthetic set over the topology's rank threads.
pub fn train(topology: &Topology, model: &ClipConfig, cfg: &TrainConfig) -> Result<TrainReport> {
    if topology.device != DeviceKind::Cpu {
        return Err(Error::invalid(
            &topology.source,
            "device",
            format!(
                "`{}` ranks need the NCCL backend, which this build does not have yet; \
                 train with a cpu topology, or inspect this one with `mmpipe plan`",
                topology.device
            ),
        ));
    }
    topology.check_batch(cfg.global_batch, "the global batch (--batch)")?;
    let largest_group = topology
        .group_size(Tower::Image)
        .max(topology.group_size(Tower::Text));
    if cfg.eval_pairs != 0 && cfg.eval_pairs < largest_group {
        return Err(Error::Msg(format!(
            "--eval-pairs {} is fewer than the {largest_group} ranks of a group: use at least that many, or 0",
            cfg.eval_pairs
        )));
    }
    let source = SyntheticSource::new(cfg.seed, model)?;
    let started = Instant::now();
    let outcomes = thread::run_ranks(topology, thread::DEFAULT_TIMEOUT, |rank, comms| {
        run_rank(topology, rank, comms, model, cfg, &source)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let lead = &outcomes[0];
    Ok(TrainReport {
        losses: lead.losses.clone(),
        step_seconds: lead.step_seconds.clone(),
        retrieval: lead.retrieval,
        seconds,
        samples_per_second: (cfg.steps * cfg.global_batch) as f64 / seconds,
        phases: outcomes
            .iter()
            .zip(&topology.ranks)
            .map(|(o, r)| (r.tower, o.phases))
            .collect(),
        bytes: outcomes.iter().map(|o| o.bytes).collect(),
        final_logit_scale: lead.logit_scale,
        final_logit_bias: lead.logit_bias,
    })
}

fn run_rank(
    topology: &Topology,
    rank: usize,
    comms: RankComms,
    model: &ClipConfig,
    cfg: &TrainConfig,
    source: &SyntheticSource,
) -> Result<RankOutcome> {
    let device = Device::Cpu;
    let mut trainer = RankTrainer::new(topology, rank, model, cfg, DType::F32, &device)?;
    trainer.attach(&comms);
    trainer.check_replicas(&comms)?;
    let bar = (rank == 0 && cfg.progress).then(|| progress_bar(cfg.steps as u64));
    let mut losses = Vec::with_capacity(cfg.steps);
    let mut step_seconds = Vec::with_capacity(cfg.steps);
    let mut phases = PhaseTimes::default();
    let mut bytes = PhaseBytes::default();
    let started = Instant::now();
    for step in 0..cfg.steps {
        let step_started = Instant::now();
        let indices = batch_indices(step, cfg.global_batch, trainer.offset, trainer.local_batch);
        let input = source.tower_input(trainer.tower, Stream::Train, &indices, &device)?;
        let lr = optim::cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps);
        let (loss, times, moved) = trainer.step(&comms, &input, lr)?;
        phases.add(&times);
        bytes.add(&moved);
        losses.push(loss);
        step_seconds.push(step_started.elapsed().as_secs_f64());
        if let Some(bar) = &bar {
            let rate = ((step + 1) * cfg.global_batch) as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {loss:.3} · {rate:.0} samples/s · lr {lr:.1e}"
            ));
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    let retrieval = if cfg.eval_pairs > 0 {
        evaluate(topology, rank, &comms, &trainer, source, cfg.eval_pairs)?
    } else {
        None
    };
    Ok(RankOutcome {
        losses,
        step_seconds,
        retrieval,
        phases,
        bytes,
        logit_scale: trainer.logit_scale()?,
        logit_bias: trainer.logit_bias()?,
    })
}

/// Each rank encodes its share of `pairs` held-out samples (its own modality only); world
/// rank 0 gathers both sides and scores retrieval. Other ranks return `None`.
pub fn evaluate(
    topology: &Topology,
    rank: usize,
    comms: &RankComms,
    trainer: &RankTrainer,
    source: &SyntheticSource,
    pairs: usize,
) -> Result<Option<Retrieval>> {
    const CHUNK: usize = 256;
    let r = &topology.ranks[rank];
    let size = topology.group_size(r.tower);
    let (offset, len) = (
        split_offset(pairs, size, r.group_rank),
        split_len(pairs, size, r.group_rank),
    );
    let mut parts = Vec::new();
    for start in (0..len).step_by(CHUNK) {
        let n = CHUNK.min(len - start);
        let indices: Vec<u64> = ((offset + start) as u64..(offset + start + n) as u64).collect();
        let input = source.tower_input(r.tower, Stream::Heldout, &indices, &Device::Cpu)?;
        parts.push(trainer.encode(&input)?);
    }
    let local = if parts.is_empty() {
        candle_core::Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?
    } else {
        candle_core::Tensor::cat(&parts, 0)?
    };
    let (image, text) = FeatureLayout::new(topology, pairs).exchange(comms, &local)?;
    if rank != 0 {
        return Ok(None);
    }
    let captions: Vec<String> = (0..pairs as u64)
        .map(|i| source.caption(Stream::Heldout, i))
        .collect();
    Ok(Some(recall_at_1(&image, &text, &captions)?))
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} steps · {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
