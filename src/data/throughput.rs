//! How fast the data pipeline feeds the image tower: the training loader itself (the
//! shard order, the workers' decoding and transforms, the batch assembly) drained as fast
//! as it goes, with no model behind it. If this rate is under the step's samples/s, the
//! device waits for data (the `data wait` phase); `mmpipe data bench` prints it.

use std::time::Instant;

use super::source::{RankSlice, Source};
use crate::error::Result;
use crate::topology::Tower;

/// What a drain of the image pipeline measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DecodeRate {
    pub workers: usize,
    pub batch: usize,
    /// Batches timed (after the untimed first ones).
    pub batches: usize,
    pub images_per_s: f64,
    /// Per worker thread: what each added core buys, roughly.
    pub images_per_s_per_worker: f64,
    pub ms_per_batch: f64,
    /// Samples that could not be decoded (each batch keeps its shape; the step drops them).
    pub samples_failed: u64,
}

impl DecodeRate {
    pub fn summary(&self) -> String {
        format!(
            "{:.0} images/s with {} workers ({:.0} per worker), {:.1} ms per batch of {} \
             ({} batches timed{})",
            self.images_per_s,
            self.workers,
            self.images_per_s_per_worker,
            self.ms_per_batch,
            self.batch,
            self.batches,
            if self.samples_failed > 0 {
                format!(", {} samples failed to decode", self.samples_failed)
            } else {
                String::new()
            }
        )
    }
}

/// Drains `warmup` then `batches` batches of `batch` images from `source`'s image
/// pipeline (one rank holding the whole global batch), timing the second part.
pub fn measure(source: &Source, batch: usize, warmup: usize, batches: usize) -> Result<DecodeRate> {
    let slice = RankSlice {
        tower: Tower::Image,
        offset: 0,
        len: batch,
        global_batch: batch,
        start_step: 0,
    };
    let data = source.rank_pipeline(slice, false);
    for _ in 0..warmup {
        data.next()?;
    }
    let started = Instant::now();
    let mut failed = 0;
    for _ in 0..batches {
        failed += data.next()?.failed.total();
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let workers = source.workers();
    let images_per_s = (batches * batch) as f64 / seconds;
    Ok(DecodeRate {
        workers,
        batch,
        batches,
        images_per_s,
        images_per_s_per_worker: images_per_s / workers.max(1) as f64,
        ms_per_batch: seconds * 1e3 / batches.max(1) as f64,
        samples_failed: failed,
    })
}
