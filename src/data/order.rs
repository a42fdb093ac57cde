//! The one global order of samples, the same on every rank.
//!
//! Each epoch visits the shards in a seeded order (or, resampling, draws shards with
//! replacement for endless runs); their samples pass through a seeded shuffle buffer.
//! Every choice depends only on the seed, the epoch and the tar headers, so an image rank
//! and a text rank produce the same keys in the same order, and global batch `t` is
//! positions `t·B .. (t+1)·B` of this sequence on every rank. Resuming is replaying:
//! `skip(n)` scans headers only.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::shards::{scan, ShardSample, SkipCause};
use crate::error::{Error, Result};

/// Samples skipped, by cause.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipCounts(pub BTreeMap<SkipCause, u64>);

impl SkipCounts {
    pub fn add(&mut self, cause: SkipCause, n: u64) {
        *self.0.entry(cause).or_default() += n;
    }

    pub fn merge(&mut self, other: &SkipCounts) {
        for (&c, &n) in &other.0 {
            self.add(c, n);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn get(&self, cause: SkipCause) -> u64 {
        self.0.get(&cause).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(c, n)| format!("{n} {}", c.describe()))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// True the first time a sample fails for a cause in this process: each problem is
/// logged once, however many epochs and ranks meet it (all are counted).
pub(crate) fn first_report(key: &str, cause: SkipCause) -> bool {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<HashSet<(String, SkipCause)>>> = OnceLock::new();
    SEEN.get_or_init(Default::default)
        .lock()
        .map(|mut seen| seen.insert((key.to_string(), cause)))
        .unwrap_or(true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderConfig {
    pub seed: u64,
    /// Samples held for shuffling; 1 keeps the shards' own order.
    pub shuffle_buffer: usize,
    /// Draw shards with replacement (endless, no epochs) instead of permuting them.
    pub resample: bool,
}

/// An endless stream of complete samples in the global order.
pub struct GlobalStream {
    shards: Vec<PathBuf>,
    config: OrderConfig,
    rng: rand::rngs::StdRng,
    epoch: u64,
    /// Shard indices still to visit this epoch.
    plan: VecDeque<usize>,
    /// The current shard's samples not yet in the buffer.
    current: VecDeque<ShardSample>,
    buffer: Vec<ShardSample>,
    /// Samples emitted so far: the position a checkpoint records.
    pub position: u64,
    /// Samples and shards left out for what their headers show.
    pub skipped: SkipCounts,
    /// Warn about each problem (one rank does, so the log is not repeated per rank).
    pub log: bool,
    /// Samples found in the epoch so far: an epoch with none is an error, not a hang.
    found_this_epoch: u64,
}

impl GlobalStream {
    pub fn new(shards: Vec<PathBuf>, config: OrderConfig) -> Self {
        GlobalStream {
            rng: rand::rngs::StdRng::seed_from_u64(config.seed),
            shards,
            config,
            epoch: 0,
            plan: VecDeque::new(),
            current: VecDeque::new(),
            buffer: Vec::new(),
            position: 0,
            skipped: SkipCounts::default(),
            log: false,
            found_this_epoch: 0,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn start_epoch(&mut self) -> Result<()> {
        if self.epoch > 0 && self.found_this_epoch == 0 {
            return Err(Error::Msg(format!(
                "the {} shard(s) hold no complete image-caption pair ({} skipped: {})",
                self.shards.len(),
                self.skipped.total(),
                self.skipped
            )));
        }
        self.found_this_epoch = 0;
        let n = self.shards.len();
        // Each epoch's shard order from its own seed: independent of how far the buffer
        // drew, so epochs are reproducible on their own.
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.config.seed ^ (self.epoch.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let order: Vec<usize> = if self.config.resample {
            (0..n).map(|_| rng.random_range(0..n)).collect()
        } else {
            let mut o: Vec<usize> = (0..n).collect();
            o.shuffle(&mut rng);
            o
        };
        self.plan = order.into();
        self.epoch += 1;
        Ok(())
    }

    /// The next complete sample of this epoch's shards, in shard order; None when the
    /// epoch has no more.
    fn next_in_shards(&mut self) -> Option<ShardSample> {
        loop {
            if let Some(s) = self.current.pop_front() {
                if let Some(cause) = s.structural_problem() {
                    self.skipped.add(cause, 1);
                    let id = format!("{}#{}", s.shard.display(), s.key);
                    if self.log && first_report(&id, cause) {
                        tracing::warn!(
                            "skipping {} in {}: {}",
                            s.key,
                            s.shard.display(),
                            cause.describe()
                        );
                    }
                    continue;
                }
                self.found_this_epoch += 1;
                return Some(s);
            }
            let shard = self.plan.pop_front()?;
            let path = &self.shards[shard];
            let scan = scan(path);
            if let Some((cause, message)) = &scan.stopped {
                self.skipped.add(*cause, 1);
                if self.log && first_report(&path.display().to_string(), *cause) {
                    tracing::warn!(
                        "{}: {} after {} samples: {message}",
                        path.display(),
                        cause.describe(),
                        scan.samples.len()
                    );
                }
            }
            self.current = scan.samples.into();
        }
    }

    /// Skips `n` samples (headers only): resuming at a recorded position.
    pub fn skip(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            self.next_sample()?;
        }
        Ok(())
    }

    /// The next sample. The shuffle buffer never reaches into the next epoch: it drains
    /// at an epoch's end, so each epoch holds every complete sample exactly once.
    pub fn next_sample(&mut self) -> Result<ShardSample> {
        let capacity = self.config.shuffle_buffer.max(1);
        loop {
            while self.buffer.len() < capacity {
                match self.next_in_shards() {
                    Some(s) => self.buffer.push(s),
                    None => break,
                }
            }
            if !self.buffer.is_empty() {
                break;
            }
            self.start_epoch()?;
        }
        let pick = self.rng.random_range(0..self.buffer.len());
        self.position += 1;
        Ok(self.buffer.swap_remove(pick))
    }
}
