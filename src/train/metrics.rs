//! The metrics file: one JSON object per step and line (JSONL), from every rank's report
//! of that step. Written as the run goes and flushed per line, so a stopped run keeps
//! what it measured.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Sender};
use serde_json::json;

use super::phase::{PhaseBytes, PhaseTimes};
use super::step::SkipReason;
use super::tensorboard::EventWriter;
use crate::error::{Error, Result};
use crate::eval::EvalScores;
use crate::topology::Tower;

/// One rank's account of one step.
#[derive(Debug, Clone)]
pub struct RankStep {
    pub rank: usize,
    /// What the rank holds: "image", "text" or "image+text".
    pub towers: String,
    pub step: usize,
    pub loss: Option<f64>,
    pub skipped: Option<SkipReason>,
    pub lr: f64,
    pub logit_scale: f64,
    pub logit_bias: f64,
    pub times: PhaseTimes,
    pub bytes: PhaseBytes,
    /// Each tower's gradient norm (group-summed, before clipping).
    pub grad_norms: Vec<(Tower, f64)>,
    /// The gradient sums that ran during backward.
    pub overlap: crate::comm::overlap::OverlapStats,
    /// Wall time of the whole step on this rank, data included.
    pub seconds: f64,
    /// Samples this rank could not use in this step's batch.
    pub samples_skipped: u64,
}

/// What the ranks send the writer.
#[derive(Debug, Clone)]
pub enum Record {
    /// The run starts after this many steps (a resume's step; 0 for a new run): the file
    /// keeps its lines of earlier steps and drops the rest. World rank 0 sends it first.
    Start(usize),
    Step(Box<RankStep>),
    /// World rank 0's evaluation after this step (0-based).
    Eval(usize, EvalScores),
}

/// Collects every rank's steps and writes one line per step, and one per evaluation
/// (`{"step": s, "eval": {...}}`, after step `s`'s line).
pub struct MetricsFile {
    tx: Option<Sender<Record>>,
    writer: Option<JoinHandle<Result<()>>>,
}

/// A memory figure of this process from Linux's /proc/self/status (`VmRSS`: resident
/// now, `VmHWM`: its peak), in MiB; None elsewhere.
pub fn process_status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The process's resident memory now.
pub fn resident_mib() -> Option<f64> {
    process_status_mib("VmRSS")
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn line(steps: &[RankStep], global_batch: usize) -> serde_json::Value {
    let lead = &steps[0];
    let slowest = steps.iter().map(|s| s.seconds).fold(0.0, f64::max);
    let ranks: Vec<serde_json::Value> = steps
        .iter()
        .map(|s| {
            let mut phases = serde_json::Map::new();
            for (name, d) in PhaseTimes::NAMES.iter().zip(s.times.as_array()) {
                phases.insert(
                    format!("{}_ms", name.replace([' ', '-'], "_")),
                    json!(ms(d)),
                );
            }
            json!({
                "rank": s.rank,
                "tower": s.towers,
                "phases": phases,
                "bytes": {
                    "feature_exchange": s.bytes.exchange,
                    "loss_exchange": s.bytes.loss,
                    "grad_all_reduce": s.bytes.grad_all_reduce,
                },
                "grad_norm": s
                    .grad_norms
                    .iter()
                    .map(|(t, n)| (t.to_string(), json!(n)))
                    .collect::<serde_json::Map<_, _>>(),
                "samples_skipped": s.samples_skipped,
                "grad_overlap": {
                    "buckets": s.overlap.buckets,
                    "during_backward": s.overlap.during_backward,
                    "summing_ms": ms(s.overlap.busy),
                },
                "feature_overlap": {
                    "gathers": s.overlap.feature_gathers,
                    "gathering_ms": ms(s.overlap.feature_gather_busy),
                    "waited_ms": ms(s.overlap.feature_gather_waited),
                },
            })
        })
        .collect();
    json!({
        "step": lead.step,
        "loss": lead.loss,
        "skipped_step": lead.skipped.map(|r| match r {
            SkipReason::UnreadableBatch => "unreadable batch",
            SkipReason::NonFinite { .. } => "non-finite loss or gradient",
        }),
        "lr": lead.lr,
        "logit_scale": lead.logit_scale,
        "logit_bias": lead.logit_bias,
        "step_ms": slowest * 1e3,
        "samples_per_s": global_batch as f64 / slowest,
        "resident_mib": resident_mib(),
        "samples_skipped": steps.iter().map(|s| s.samples_skipped).sum::<u64>(),
        "ranks": ranks,
    })
}

fn eval_line(step: usize, scores: &EvalScores) -> serde_json::Value {
    let recall = crate::eval::recall_json(&scores.recall);
    json!({
        "step": step,
        "eval": {
            "pairs": scores.pairs,
            "zero_shot": scores.zero_shot,
            "recall": recall,
            "chance_r1": scores.chance,
            "sets": scores
                .sets
                .iter()
                .map(|(name, s)| (name.clone(), json!(s)))
                .collect::<serde_json::Map<_, _>>(),
        },
    })
}

/// Rewrites `path` (durably) with only its lines of steps before `start`, and opens it to
/// append. Lines that do not parse (a line cut short by a crash) are dropped.
fn keep_lines_before(path: &Path, start: usize) -> Result<std::fs::File> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let old = std::fs::read_to_string(path).map_err(io)?;
    let kept: String = old
        .lines()
        .filter(|l| {
            start > 0
                && serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| (s as usize) < start)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != old.len() {
        crate::durable::write(path, kept.as_bytes())?;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io)
}

impl MetricsFile {
    /// Opens `path` (and its folder) and starts the writer for `world` ranks. Nothing in
    /// the file is touched until the run says where it starts ([`Record::Start`]): a
    /// resumed run appends to the lines of the steps before it.
    pub fn create(
        path: Option<&Path>,
        tensorboard: Option<&Path>,
        world: usize,
        global_batch: usize,
    ) -> Result<Self> {
        if let Some(path) = path {
            let io = |source| Error::Io {
                path: path.to_path_buf(),
                source,
            };
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            // Fails now if the file cannot be written, before any step.
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(path)
                .map_err(io)?;
        }
        // Also made now: a folder that cannot be written fails before any step.
        let mut events = tensorboard.map(EventWriter::create).transpose()?;
        let (tx, rx) = unbounded::<Record>();
        let path: Option<PathBuf> = path.map(Path::to_path_buf);
        let writer = std::thread::spawn(move || -> Result<()> {
            // The file is only rewritten once the run says where it starts: a run that
            // fails before (a refused resume) leaves it as it was.
            let (start, first) = match rx.recv() {
                Ok(Record::Start(step)) => (step, None),
                Ok(other) => (0, Some(other)),
                Err(_) => return Ok(()),
            };
            let mut out = match &path {
                Some(path) => Some((
                    path.clone(),
                    std::io::BufWriter::new(keep_lines_before(path, start)?),
                )),
                None => None,
            };
            let mut pending: std::collections::BTreeMap<usize, Vec<RankStep>> = Default::default();
            let mut evals: Vec<(usize, EvalScores)> = Vec::new();
            // Each line to the JSONL file and to the event file.
            let mut write = |value: serde_json::Value| -> Result<()> {
                if let Some((path, out)) = &mut out {
                    writeln!(out, "{value}")
                        .and_then(|_| out.flush())
                        .map_err(|source| Error::Io {
                            path: path.clone(),
                            source,
                        })?;
                }
                if let Some(events) = &mut events {
                    events.line(&value)?;
                }
                Ok(())
            };
            for record in first.into_iter().chain(rx.iter()) {
                let s = match record {
                    Record::Start(_) => continue,
                    Record::Step(s) => *s,
                    Record::Eval(step, scores) => {
                        // After its step's line, which may still wait for slower ranks.
                        if pending.contains_key(&step) {
                            evals.push((step, scores));
                        } else {
                            write(eval_line(step, &scores))?;
                        }
                        continue;
                    }
                };
                let step = s.step;
                let entry = pending.entry(step).or_default();
                entry.push(s);
                if entry.len() == world {
                    let mut steps = pending.remove(&step).expect("just filled");
                    steps.sort_by_key(|s| s.rank);
                    write(line(&steps, global_batch))?;
                    for (_, scores) in evals.iter().filter(|(s, _)| *s == step) {
                        write(eval_line(step, scores))?;
                    }
                    evals.retain(|(s, _)| *s != step);
                }
            }
            for (step, scores) in &evals {
                write(eval_line(*step, scores))?;
            }
            Ok(())
        });
        Ok(MetricsFile {
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// A sender for one rank's thread.
    pub fn sender(&self) -> Sender<Record> {
        self.tx.clone().expect("open until finish")
    }

    /// Waits for the last lines to be written.
    pub fn finish(mut self) -> Result<()> {
        drop(self.tx.take());
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Msg("the metrics writer panicked".into())),
            None => Ok(()),
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count; NaN for none):
/// robust to the first steps' warm-up and to a few slow steps. The one median of step
/// times and rates, for `train`, `bench` and `report` alike.
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]),
    }
}
