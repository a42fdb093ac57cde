//! One rank's run, as a checklist: build the tower, resume, start the data; then per step
//! evaluate and save when due, take the batch, step, report, tally; at the end save and
//! evaluate once more.

use std::time::{Duration, Instant};

use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoints::{self, RunIdentity};
use super::config::TrainConfig;
use super::metrics::{RankStep, Record};
use super::pairs::Readable;
use super::phase::{PhaseBytes, PhaseTimes};
use super::step::{SkipReason, StepOutcome};
use super::trainer::RankTrainer;
use crate::comm::overlap::OverlapStats;
use crate::comm::RankComms;
use crate::data::order::SkipCounts;
use crate::data::{RankSlice, Source};
use crate::error::{Error, Result};
use crate::eval::{EvalScores, EvalSet, SetScores};
use crate::model::{ClipConfig, TowerInput};
use crate::topology::{Topology, Tower};

/// How often a run off a terminal (its progress bar hidden) prints a progress line.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What every rank of a process shares: the data, the zero-shot sets it scores, and the
/// metrics file's channel.
pub(super) struct RankInputs<'a> {
    pub source: &'a Source,
    pub sets: &'a [EvalSet],
    /// The features' width (the sets' empty shares need it).
    pub embed_dim: usize,
    pub metrics: Option<crossbeam_channel::Sender<Record>>,
}

/// What a rank's run reports back.
pub(super) struct RankOutcome {
    pub losses: Vec<f64>,
    pub step_seconds: Vec<f64>,
    pub evals: Vec<(usize, EvalScores)>,
    pub phases: PhaseTimes,
    pub bytes: PhaseBytes,
    pub overlap: OverlapStats,
    /// Samples this rank could not use, by cause (the order's skips included).
    pub skipped: SkipCounts,
    pub skipped_steps: usize,
    pub non_finite_steps: usize,
    /// Steps this run took (fewer than `steps` after a resume).
    pub steps_run: usize,
    pub interrupted_at: Option<usize>,
    pub logit_scale: f64,
    pub logit_bias: f64,
}

/// The steps' account: losses and times of the steps that updated, the ones skipped and
/// why, and the limit on bad steps in a row.
#[derive(Default)]
struct Tally {
    /// Steps in a row that may make no update before the run stops (`max_bad_steps`).
    max_bad: usize,
    /// World rank 0: warns of each skipped step.
    lead: bool,
    losses: Vec<f64>,
    step_seconds: Vec<f64>,
    phases: PhaseTimes,
    bytes: PhaseBytes,
    overlap: OverlapStats,
    /// Samples the pipeline could not use (the order's own skips are added at the end).
    skipped: SkipCounts,
    skipped_steps: usize,
    non_finite_steps: usize,
    bad_in_a_row: usize,
}

impl Tally {
    /// Counts step `step`'s outcome (`seconds` long, `times` by phase); an error once more
    /// than `max_bad` steps in a row made no update.
    fn record(
        &mut self,
        step: usize,
        lr: f64,
        outcome: &StepOutcome,
        times: &PhaseTimes,
        seconds: f64,
    ) -> Result<()> {
        let max_bad = self.max_bad;
        self.phases.add(times);
        self.bytes.add(&outcome.bytes);
        self.overlap.add(&outcome.overlap);
        let why = match (outcome.loss, outcome.skipped) {
            (Some(loss), _) => {
                self.bad_in_a_row = 0;
                self.losses.push(loss);
                self.step_seconds.push(seconds);
                return Ok(());
            }
            (None, Some(SkipReason::NonFinite { loss })) => {
                self.non_finite_steps += 1;
                self.bad_in_a_row += 1;
                if self.bad_in_a_row > max_bad {
                    return Err(Error::Step {
                        step: step as u64,
                        message: format!(
                            "the loss or a gradient was NaN or infinite for {} steps in a row (last \
                             loss {loss}, learning rate {lr:.2e}): training diverged; lower the \
                             learning rate or check the data",
                            self.bad_in_a_row
                        ),
                    });
                }
                format!("loss {loss}, or a gradient, is not finite")
            }
            (None, _) => {
                self.skipped_steps += 1;
                self.bad_in_a_row += 1;
                if self.bad_in_a_row > max_bad {
                    return Err(Error::Step {
                        step: step as u64,
                        message: format!(
                            "{} steps in a row had fewer than two readable pairs in their global \
                             batch ({} skipped so far: {}): the data cannot be read; check its \
                             paths and files (max_bad_steps = {max_bad})",
                            self.bad_in_a_row,
                            self.skipped.total(),
                            self.skipped
                        ),
                    });
                }
                "fewer than two pairs of the global batch could be read".to_string()
            }
        };
        if self.lead {
            tracing::warn!("step {step}: {why}; step skipped");
        }
        Ok(())
    }
}

/// Where a rank starts: step 0 with a new run id, or the save every rank agrees on (its
/// tower's part loaded; a resumed run keeps its id, for pruning its own saves).
fn start_point(
    comms: &RankComms,
    trainer: &mut RankTrainer,
    cfg: &TrainConfig,
    identity: &dyn Fn(String) -> RunIdentity,
) -> Result<(usize, RunIdentity)> {
    let Some(resume) = &cfg.resume else {
        return Ok((0, identity(checkpoints::new_run_id())));
    };
    let (dir, state) = checkpoints::resume_point(
        comms,
        cfg.checkpoint_dir.as_deref(),
        resume,
        &trainer.towers.iter().map(|t| t.tower).collect::<Vec<_>>(),
        cfg,
        &identity(String::new()),
    )?;
    for t in &mut trainer.towers {
        t.load_part(&dir.join(checkpoints::part_file(t.tower)))?;
    }
    if comms.world.rank() == 0 {
        tracing::info!("resuming from {} at step {}", dir.display(), state.step);
    }
    let run = if state.run.is_empty() {
        checkpoints::new_run_id()
    } else {
        state.run
    };
    Ok((state.step, identity(run)))
}

pub(super) fn run_rank(
    topology: &Topology,
    rank: usize,
    comms: &RankComms,
    model: &ClipConfig,
    cfg: &TrainConfig,
    inputs: RankInputs,
) -> Result<RankOutcome> {
    // Set up: the towers (identical on every rank of a group), the resume point, the data
    // (one pipeline per tower this rank holds).
    let device = crate::comm::device::rank_device(topology, rank)?;
    let mut trainer = RankTrainer::new(topology, rank, model, cfg, DType::F32, &device)?;
    trainer.attach(comms)?;
    let identity = |run: String| RunIdentity::new(run, model, &inputs.source.files());
    let (start, run_id) = start_point(comms, &mut trainer, cfg, &identity)?;
    if let (0, Some(tx)) = (rank, &inputs.metrics) {
        let _ = tx.send(Record::Start(start));
    }
    trainer.check_replicas(comms)?;
    let data: Vec<_> = trainer
        .towers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            inputs.source.rank_pipeline_onto(
                RankSlice {
                    tower: t.tower,
                    offset: t.offset,
                    len: t.local_batch,
                    global_batch: cfg.global_batch,
                    start_step: start,
                },
                rank == 0 && i == 0,
                &trainer.device,
                crate::comm::upload::uploader(&trainer.device),
            )
        })
        .collect();
    let masked = inputs.source.may_fail();
    let bar = (rank == 0 && cfg.progress).then(|| progress_bar(cfg.steps as u64, start as u64));
    let evaluate = |trainer: &RankTrainer, done: usize, bar: Option<&ProgressBar>| {
        evaluate_and_show(topology, rank, comms, trainer, &inputs, cfg, bar, done)
    };

    let mut tally = Tally {
        max_bad: cfg.max_bad_steps,
        lead: rank == 0,
        ..Tally::default()
    };
    let mut skipped_by_order = SkipCounts::default();
    let mut evals = Vec::new();
    let (mut evaluated_at, mut saved_at, mut interrupted_at) = (None, None, None);
    let mut end = cfg.steps;
    let started = Instant::now();
    let mut last_log: Option<Instant> = None;
    for step in start..cfg.steps {
        // 1. Steps 0..step are done: evaluate and save them when due.
        if cfg.eval.every > 0 && step > start && step % cfg.eval.every == 0 {
            evals.extend(evaluate(&trainer, step, bar.as_ref())?);
            evaluated_at = Some(step);
        }
        if let Some(dir) = &cfg.checkpoint_dir {
            if cfg.checkpoint_every > 0 && step > start && step % cfg.checkpoint_every == 0 {
                checkpoints::save(dir, step, comms, &trainer, cfg, &run_id)?;
                saved_at = Some(step);
            }
        }
        // 2. The batch: each tower's slice.
        let step_started = Instant::now();
        let batches = data.iter().map(|d| d.next()).collect::<Result<Vec<_>>>()?;
        let data_wait = step_started.elapsed();
        for batch in &batches {
            tally.skipped.merge(&batch.failed);
        }
        // The order's skips are the same in every pipeline: counted once.
        skipped_by_order = batches[0].skipped_by_order.clone();
        let samples_skipped: u64 = batches.iter().map(|b| b.failed.total()).sum();
        // 3. The step.
        let lr = cfg.schedule.lr(step, cfg.lr, cfg.warmup, cfg.steps);
        let reads: Vec<Readable> = batches
            .iter()
            .map(|batch| Readable {
                step: batch.step,
                valid: &batch.valid,
                keys: &batch.keys,
            })
            .collect();
        let step_inputs: Vec<TowerInput> = batches.iter().map(|b| b.input.clone()).collect();
        let outcome = trainer.step(comms, &step_inputs, masked.then_some(&reads[..]), lr)?;
        // The pipeline's wait, and the step's copy of the batch onto the device.
        let times = PhaseTimes {
            data_wait: data_wait + outcome.times.data_wait,
            ..outcome.times
        };
        let seconds = step_started.elapsed().as_secs_f64();
        // 4. Report it: the metrics line, the tally, the progress bar.
        if let Some(tx) = &inputs.metrics {
            let line = RankStep {
                rank,
                towers: trainer.label(),
                step,
                loss: outcome.loss,
                skipped: outcome.skipped,
                lr,
                logit_scale: trainer.logit_scale()?,
                logit_bias: trainer.logit_bias()?,
                times,
                bytes: outcome.bytes,
                grad_norms: outcome.grad_norms.clone(),
                overlap: outcome.overlap,
                seconds,
                samples_skipped,
            };
            // The writer only stops if it failed; its error surfaces at the end.
            let _ = tx.send(Record::Step(Box::new(line)));
        }
        tally.record(step, lr, &outcome, &times, seconds)?;
        if let Some(bar) = &bar {
            if let Some(loss) = outcome.loss {
                let rate = ((step + 1 - start) * cfg.global_batch) as f64
                    / started.elapsed().as_secs_f64();
                let message = format!("loss {loss:.3} · {rate:.0} samples/s · lr {lr:.1e}");
                // Off a terminal the bar is hidden: a plain line now and then instead,
                // for the job's log.
                if bar.is_hidden()
                    && (step + 1 == end
                        || last_log.is_none_or(|t: Instant| t.elapsed() >= LOG_INTERVAL))
                {
                    println!("step {}/{} · {message}", step + 1, cfg.steps);
                    last_log = Some(Instant::now());
                }
                bar.set_message(message);
            }
            bar.inc(1);
        }
        // 5. Every rank learnt in the step's one flag whether a stop was asked for.
        if outcome.stop && step + 1 < cfg.steps {
            interrupted_at = Some(step + 1);
            end = step + 1;
            break;
        }
    }

    // The end: save and evaluate what the last step left, unless that was just done.
    if let (Some(dir), true) = (&cfg.checkpoint_dir, end > start) {
        if saved_at != Some(end) {
            checkpoints::save(dir, end, comms, &trainer, cfg, &run_id)?;
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    if end > 0 && evaluated_at != Some(end) {
        evals.extend(evaluate(&trainer, end, None)?);
    }
    tally.skipped.merge(&skipped_by_order);
    Ok(RankOutcome {
        losses: tally.losses,
        step_seconds: tally.step_seconds,
        evals,
        phases: tally.phases,
        bytes: tally.bytes,
        overlap: tally.overlap,
        skipped: tally.skipped,
        skipped_steps: tally.skipped_steps,
        non_finite_steps: tally.non_finite_steps,
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
    if inputs.source.held_out().is_none() && inputs.sets.is_empty() {
        return Ok(None);
    }
    let encode = |tower: Tower, x: &TowerInput| match trainer.tower(tower) {
        Some(t) => t.encode(x),
        None => Err(Error::Msg(format!("this rank holds no {tower} replica"))),
    };
    let held = match inputs.source.held_out() {
        Some(held_out) => crate::eval::distributed::evaluate(
            topology,
            rank,
            comms,
            &encode,
            held_out,
            cfg.eval.pairs,
        )?,
        None => None,
    };
    let mut sets = Vec::new();
    for set in inputs.sets {
        use crate::eval::distributed::{evaluate_retrieval, evaluate_zero_shot};
        let dim = inputs.embed_dim;
        let scores = match set {
            EvalSet::ZeroShot(s) => {
                evaluate_zero_shot(topology, rank, comms, &encode, s, dim)?.map(SetScores::ZeroShot)
            }
            EvalSet::Retrieval(s) => evaluate_retrieval(topology, rank, comms, &encode, s, dim)?
                .map(SetScores::Retrieval),
        };
        sets.extend(scores.map(|s| (set.name().to_string(), s)));
    }
    if rank != 0 {
        return Ok(None);
    }
    let scores = match held {
        Some(scores) => EvalScores { sets, ..scores },
        None => EvalScores::sets_only(sets),
    };
    let line = format!("eval after step {done}: {}", scores.summary());
    match bar {
        Some(bar) if !bar.is_hidden() => bar.println(line),
        // A bar is hidden off a terminal (a batch job's log file), and so is what it
        // prints: the scores go to standard output themselves.
        Some(_) => println!("{line}"),
        None => tracing::info!("{line}"),
    }
    if let Some(tx) = &inputs.metrics {
        let _ = tx.send(Record::Eval(done - 1, scores.clone()));
    }
    Ok(Some((done - 1, scores)))
}

/// The progress bar of a run of `len` steps that starts at `start`.
fn progress_bar(len: u64, start: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} steps · {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_position(start);
    bar
}
