//! The gradient all-reduce off the critical path: backward hands over each segment's
//! gradients as soon as it has them ([`crate::model::checkpointing::SegmentGrads`]); they
//! are packed into buckets of about `bucket_bytes`, and a worker thread sums each full
//! bucket over the group while backward goes on, as PyTorch's DDP does. What is left when
//! backward ends (the last bucket, and any still in flight) is the exposed part.
//!
//! The worker owns the group's communicator for the whole backward: the rank's own thread
//! makes no collective on it until [`Buckets::finish`] has joined the worker, so the
//! group sees one ordered stream of collectives, the same on every rank (every replica
//! hands over the same gradients in the same order, so every rank cuts the same buckets).
//!
//! A sum is element-wise, so cutting the gradients into buckets changes no element's sum:
//! on the thread backend the result is bit for bit the unbucketed one. On GPUs the
//! group's communicator runs on its own stream ([`super::nccl`]), so a bucket's sum runs
//! beside backward's kernels.

use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use crossbeam_channel::Sender;

use super::Communicator;
use crate::error::{Error, Result};

/// What the communication that overlaps compute did in one step: the bucketed sums of a
/// tower's gradients, and the world all-gather of the image features that a rank holding
/// both towers starts before its text forward (`train::step`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OverlapStats {
    /// Buckets summed.
    pub buckets: usize,
    /// Of those, handed to the worker while backward was still running.
    pub during_backward: usize,
    /// Wall time the worker spent in collectives, hidden behind backward or not.
    pub busy: Duration,
    /// Image-feature gathers started before the rank's text forward.
    pub feature_gathers: usize,
    /// Their wall time on their worker, hidden behind the text forward or not.
    pub feature_gather_busy: Duration,
    /// What the rank's thread waited for them after its text forward: the exposed part.
    pub feature_gather_waited: Duration,
}

impl OverlapStats {
    pub fn add(&mut self, o: &OverlapStats) {
        self.buckets += o.buckets;
        self.during_backward += o.during_backward;
        self.busy += o.busy;
        self.feature_gathers += o.feature_gathers;
        self.feature_gather_busy += o.feature_gather_busy;
        self.feature_gather_waited += o.feature_gather_waited;
    }
}

type Bucket = Vec<(usize, Tensor)>;

/// The first bucket's size, when smaller than the others: the sums start as soon as the
/// last layers' gradients exist, not after a whole bucket of them (DDP's
/// `_DEFAULT_FIRST_BUCKET_BYTES`, 1 MiB).
pub const FIRST_BUCKET_BYTES: usize = 1 << 20;

/// The worker's result: every summed tensor with its index, and its time in collectives.
type Summed = Result<(Vec<(usize, Tensor)>, Duration)>;

/// Gradients on their way to the group's sum, while backward runs.
pub struct Buckets<'scope> {
    to_worker: Option<Sender<Bucket>>,
    worker: ScopedJoinHandle<'scope, Summed>,
    group: String,
    open: Bucket,
    open_bytes: usize,
    bucket_bytes: usize,
    /// What the open bucket is handed over at: [`FIRST_BUCKET_BYTES`] (or less) for the
    /// first, `bucket_bytes` after.
    hand_over_at: usize,
    stats: OverlapStats,
}

impl<'scope> Buckets<'scope> {
    /// Starts the worker that sums buckets over `comm` inside `scope`. A bucket is handed
    /// over once it holds at least `bucket_bytes` (so a tensor larger than that travels
    /// alone); the first already at [`FIRST_BUCKET_BYTES`] when that is less.
    pub fn start<'env>(
        scope: &'scope Scope<'scope, 'env>,
        comm: &'scope (dyn Communicator + Sync),
        bucket_bytes: usize,
    ) -> Self {
        let (to_worker, buckets) = crossbeam_channel::unbounded::<Bucket>();
        let worker = scope.spawn(move || -> Summed {
            let mut summed = Vec::new();
            let mut busy = Duration::ZERO;
            for bucket in buckets {
                let started = Instant::now();
                let (index, tensors): (Vec<usize>, Vec<Tensor>) = bucket.into_iter().unzip();
                let sums = comm.all_reduce_sum_many(&tensors)?;
                busy += started.elapsed();
                summed.extend(index.into_iter().zip(sums));
            }
            Ok((summed, busy))
        });
        Buckets {
            to_worker: Some(to_worker),
            worker,
            group: comm.name().to_string(),
            open: Vec::new(),
            open_bytes: 0,
            bucket_bytes: bucket_bytes.max(1),
            hand_over_at: bucket_bytes.clamp(1, FIRST_BUCKET_BYTES),
            stats: OverlapStats::default(),
        }
    }

    /// Adds gradient `index` (of the list the caller will assemble) to the open bucket,
    /// and hands the bucket to the worker when it is full. The same index may come more
    /// than once (a parameter several segments read): its sums are added in
    /// [`Self::finish`].
    pub fn add(&mut self, index: usize, grad: Tensor) {
        self.open_bytes += grad.elem_count() * grad.dtype().size_in_bytes();
        self.open.push((index, grad));
        if self.open_bytes >= self.hand_over_at {
            self.hand_over();
            self.hand_over_at = self.bucket_bytes;
            self.stats.during_backward += 1;
        }
    }

    fn hand_over(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let bucket = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        self.stats.buckets += 1;
        // A worker that stopped has its error waiting in `finish`.
        if let Some(to_worker) = &self.to_worker {
            let _ = to_worker.send(bucket);
        }
    }

    /// Hands over the last bucket, waits for every sum, and gives the summed gradients
    /// in index order (`len` of them; one the replica never handed over is None).
    pub fn finish(mut self, len: usize) -> Result<(Vec<Option<Tensor>>, OverlapStats)> {
        self.hand_over();
        drop(self.to_worker.take());
        let (summed, busy) = self.worker.join().map_err(|_| Error::Collective {
            op: "all_reduce",
            group: self.group.clone(),
            message: "the gradient all-reduce's worker thread panicked".into(),
        })??;
        let mut out: Vec<Option<Tensor>> = vec![None; len];
        for (i, sum) in summed {
            let slot = out
                .get_mut(i)
                .ok_or_else(|| Error::Msg(format!("bucketed gradient {i} of a list of {len}")))?;
            *slot = Some(match slot.take() {
                Some(prev) => (prev + sum)?,
                None => sum,
            });
        }
        self.stats.busy = busy;
        Ok((out, self.stats))
    }
}
