//! `mmpipe train`: one thread per rank, each running its tower's steps; world rank 0 shows
//! progress, and at the end the towers encode held-out pairs for a retrieval check.

pub mod calibrate;
pub mod checkpoints;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod pairs;
pub mod phase;
pub mod step;
pub mod trainer;

use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};

pub use crate::comm::launch::Ranks;
pub use config::TrainConfig;
pub use pairs::Readable;
pub use phase::{PhaseBytes, PhaseTimes};
pub use step::{SkipReason, StepGrads, StepOutcome};
pub use trainer::{RankTrainer, StateBytes};

use crate::comm::{thread, RankComms};
use crate::data::order::SkipCounts;
use crate::data::{RankSlice, Source};
use crate::error::{Error, Result};
use crate::eval::EvalScores;
use crate::model::{ClipConfig, TowerInput};
use crate::topology::{Topology, Tower};
use metrics::{MetricsFile, RankStep, Record};

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
    /// Per global rank: its tower and its summed phase times.
    pub phases: Vec<(Tower, PhaseTimes)>,
    /// Per global rank: its collective payload summed over the steps.
    pub bytes: Vec<PhaseBytes>,
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

struct RankOutcome {
    losses: Vec<f64>,
    step_seconds: Vec<f64>,
    evals: Vec<(usize, EvalScores)>,
    phases: PhaseTimes,
    bytes: PhaseBytes,
    /// Samples this rank could not use, by cause (the order's skips included).
    skipped: SkipCounts,
    skipped_steps: usize,
    non_finite_steps: usize,
    /// Steps this run took (fewer than `steps` after a resume).
    steps_run: usize,
    interrupted_at: Option<usize>,
    logit_scale: f64,
    logit_bias: f64,
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
    // Every data decision, and every missing file, before any rank starts.
    let process_rank = match &ranks {
        Ranks::Threads => None,
        Ranks::Process { rank, .. } => Some(*rank),
    };
    let source = Source::new(&cfg.data, model, cfg.seed, cfg.eval.pairs, process_rank)?;
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
    let metrics = cfg
        .metrics
        .as_ref()
        .filter(|_| writes_metrics)
        .map(|p| MetricsFile::create(p, metric_ranks, cfg.global_batch))
        .transpose()?;
    let started = Instant::now();
    let work = |rank: usize, comms: &RankComms| {
        let data = RankInputs {
            source: &source,
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
    let (phases, bytes) = match &ranks {
        Ranks::Threads => (
            outcomes.iter().map(|o| o.phases).collect(),
            outcomes.iter().map(|o| o.bytes).collect(),
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
            .map(|(p, r)| (r.tower, p))
            .collect(),
        bytes,
        skipped: outcomes.iter().map(|o| o.skipped.clone()).collect(),
        skipped_steps: lead.skipped_steps,
        non_finite_steps: lead.non_finite_steps,
        interrupted_at: lead.interrupted_at,
        final_logit_scale: lead.logit_scale,
        final_logit_bias: lead.logit_bias,
    })
}

/// Every process's phase times and bytes, by world rank: one small world all-gather.
fn gather_accounts(
    comms: &RankComms,
    mine: &RankOutcome,
) -> Result<(Vec<PhaseTimes>, Vec<PhaseBytes>)> {
    let mut row: Vec<f64> = mine
        .phases
        .as_array()
        .iter()
        .map(Duration::as_secs_f64)
        .collect();
    let b = mine.bytes;
    row.extend([b.exchange, b.loss, b.grad_all_reduce].map(|v| v as f64));
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
    Ok(all
        .iter()
        .map(|r| {
            (
                PhaseTimes::from_array(std::array::from_fn(|i| seconds(r[i]))),
                PhaseBytes {
                    exchange: r[7] as u64,
                    loss: r[8] as u64,
                    grad_all_reduce: r[9] as u64,
                },
            )
        })
        .unzip())
}

/// What every rank of a process shares: the data, and the metrics file's channel.
struct RankInputs<'a> {
    source: &'a Source,
    metrics: Option<crossbeam_channel::Sender<Record>>,
}

fn run_rank(
    topology: &Topology,
    rank: usize,
    comms: &RankComms,
    model: &ClipConfig,
    cfg: &TrainConfig,
    inputs: RankInputs,
) -> Result<RankOutcome> {
    let device = crate::comm::device::rank_device(topology, rank)?;
    let mut trainer = RankTrainer::new(topology, rank, model, cfg, DType::F32, &device)?;
    trainer.attach(comms);
    // Resuming: every rank agrees on the save, and loads its tower's part; the data order
    // replays to the step. A resumed run keeps its id (for pruning its own saves).
    let identity = |run: String| checkpoints::RunIdentity::new(run, model, &inputs.source.files());
    let (start, run_id) = match &cfg.resume {
        Some(resume) => {
            let (dir, state) = checkpoints::resume_point(
                comms,
                cfg.checkpoint_dir.as_deref(),
                resume,
                trainer.tower,
                cfg,
                &identity(String::new()),
            )?;
            trainer.load_part(&dir.join(checkpoints::part_file(trainer.tower)))?;
            if rank == 0 {
                tracing::info!("resuming from {} at step {}", dir.display(), state.step);
            }
            let run = if state.run.is_empty() {
                checkpoints::new_run_id()
            } else {
                state.run
            };
            (state.step, run)
        }
        None => (0, checkpoints::new_run_id()),
    };
    let run_id = identity(run_id);
    if let (0, Some(tx)) = (rank, &inputs.metrics) {
        let _ = tx.send(Record::Start(start));
    }
    trainer.check_replicas(comms)?;
    let data = inputs.source.rank_pipeline(
        RankSlice {
            tower: trainer.tower,
            offset: trainer.offset,
            len: trainer.local_batch,
            global_batch: cfg.global_batch,
            start_step: start,
        },
        rank == 0,
    );
    let masked = inputs.source.may_fail();
    let mut skipped = SkipCounts::default();
    let mut skipped_steps = 0;
    let mut non_finite_steps = 0;
    let mut bad_in_a_row = 0;
    let mut skipped_by_order = SkipCounts::default();
    let bar = (rank == 0 && cfg.progress).then(|| {
        let bar = progress_bar(cfg.steps as u64);
        bar.set_position(start as u64);
        bar
    });
    let mut losses = Vec::with_capacity(cfg.steps);
    let mut step_seconds = Vec::with_capacity(cfg.steps);
    let mut phases = PhaseTimes::default();
    let mut bytes = PhaseBytes::default();
    let started = Instant::now();
    let mut saved_at = None;
    let mut interrupted_at = None;
    let mut end = cfg.steps;
    let mut evals = Vec::new();
    let mut evaluated_at = None;
    for step in start..cfg.steps {
        // Steps 0..step are done: evaluate and save them before the next.
        if cfg.eval.every > 0 && step > start && step % cfg.eval.every == 0 {
            evals.extend(evaluate_and_show(
                topology,
                rank,
                comms,
                &trainer,
                &inputs,
                cfg,
                bar.as_ref(),
                step,
            )?);
            evaluated_at = Some(step);
        }
        if let Some(dir) = &cfg.checkpoint_dir {
            if cfg.checkpoint_every > 0 && step > start && step % cfg.checkpoint_every == 0 {
                checkpoints::save(dir, step, comms, &trainer, cfg, &run_id)?;
                saved_at = Some(step);
            }
        }
        let step_started = Instant::now();
        let batch = data.next()?;
        let data_wait = step_started.elapsed();
        skipped.merge(&batch.failed);
        skipped_by_order = batch.skipped_by_order.clone();
        let lr = cfg.schedule.lr(step, cfg.lr, cfg.warmup, cfg.steps);
        let read = Readable {
            step: batch.step,
            valid: &batch.valid,
            keys: &batch.keys,
        };
        let outcome = trainer.step(comms, &batch.input, masked.then_some(&read), lr)?;
        let mut times = outcome.times;
        times.data_wait = data_wait;
        if let Some(tx) = &inputs.metrics {
            let report = RankStep {
                rank,
                tower: trainer.tower,
                step,
                loss: outcome.loss,
                skipped: outcome.skipped,
                lr,
                logit_scale: trainer.logit_scale()?,
                logit_bias: trainer.logit_bias()?,
                times,
                bytes: outcome.bytes,
                grad_norm: outcome.grad_norm,
                seconds: step_started.elapsed().as_secs_f64(),
                samples_skipped: batch.failed.total(),
            };
            // The writer only stops if it failed; its error surfaces at the end.
            let _ = tx.send(Record::Step(report));
        }
        phases.add(&times);
        bytes.add(&outcome.bytes);
        match (outcome.loss, outcome.skipped) {
            (Some(loss), _) => {
                bad_in_a_row = 0;
                losses.push(loss);
                step_seconds.push(step_started.elapsed().as_secs_f64());
                if let Some(bar) = &bar {
                    let rate = ((step + 1 - start) * cfg.global_batch) as f64
                        / started.elapsed().as_secs_f64();
                    bar.set_message(format!(
                        "loss {loss:.3} · {rate:.0} samples/s · lr {lr:.1e}"
                    ));
                }
            }
            (None, Some(SkipReason::NonFinite { loss })) => {
                non_finite_steps += 1;
                bad_in_a_row += 1;
                if bad_in_a_row > cfg.max_bad_steps {
                    return Err(Error::Step {
                        step: step as u64,
                        message: format!(
                            "the loss or a gradient was NaN or infinite for {bad_in_a_row} steps in a \
                             row (last loss {loss}, learning rate {lr:.2e}): training diverged; lower \
                             the learning rate or check the data"
                        ),
                    });
                }
                if rank == 0 {
                    tracing::warn!(
                        "step {step}: loss {loss}, or a gradient, is not finite; step skipped"
                    );
                }
            }
            (None, _) => {
                skipped_steps += 1;
                bad_in_a_row += 1;
                if bad_in_a_row > cfg.max_bad_steps {
                    return Err(Error::Step {
                        step: step as u64,
                        message: format!(
                            "{bad_in_a_row} steps in a row had fewer than two readable pairs in their \
                             global batch ({} skipped so far: {}): the data cannot be read; check its \
                             paths and files (max_bad_steps = {})",
                            skipped.total(),
                            skipped,
                            cfg.max_bad_steps
                        ),
                    });
                }
                if rank == 0 {
                    tracing::warn!(
                        "step {step}: fewer than two pairs of the global batch could be read; step skipped"
                    );
                }
            }
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
        // Every rank learnt in the step's one flag whether a stop was asked for.
        if outcome.stop && step + 1 < cfg.steps {
            interrupted_at = Some(step + 1);
            end = step + 1;
            break;
        }
    }
    if let (Some(dir), true) = (&cfg.checkpoint_dir, end > start) {
        if saved_at != Some(end) {
            checkpoints::save(dir, end, comms, &trainer, cfg, &run_id)?;
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    skipped.merge(&skipped_by_order);
    if end > 0 && evaluated_at != Some(end) {
        evals.extend(evaluate_and_show(
            topology, rank, comms, &trainer, &inputs, cfg, None, end,
        )?);
    }
    Ok(RankOutcome {
        losses,
        step_seconds,
        evals,
        phases,
        bytes,
        skipped,
        skipped_steps,
        non_finite_steps,
        steps_run: end.saturating_sub(start),
        interrupted_at,
        logit_scale: trainer.logit_scale()?,
        logit_bias: trainer.logit_bias()?,
    })
}

/// Evaluates the model after `done` steps, shows the scores (above the progress bar while
/// it runs) and sends them to the metrics file. World rank 0 returns `(done - 1, scores)`.
#[allow(clippy::too_many_arguments)]
fn evaluate_and_show(
    topology: &Topology,
    rank: usize,
    comms: &RankComms,
    trainer: &RankTrainer,
    inputs: &RankInputs,
    cfg: &TrainConfig,
    bar: Option<&ProgressBar>,
    done: usize,
) -> Result<Option<(usize, EvalScores)>> {
    let Some(held_out) = inputs.source.held_out() else {
        return Ok(None);
    };
    let encode = |x: &TowerInput| trainer.encode(x);
    let Some(scores) = crate::eval::distributed::evaluate(
        topology,
        rank,
        comms,
        &encode,
        held_out,
        cfg.eval.pairs,
    )?
    else {
        return Ok(None);
    };
    let line = format!("eval after step {done}: {}", scores.summary());
    match bar {
        Some(bar) => bar.println(line),
        None => tracing::info!("{line}"),
    }
    if let Some(tx) = &inputs.metrics {
        let _ = tx.send(Record::Eval(done - 1, scores.clone()));
    }
    Ok(Some((done - 1, scores)))
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
