//! `mmpipe plan --calibrate`: measure each tower's forward + backward throughput on this
//! machine, so the planner can use measured rates instead of peak × efficiency.
//!
//! Rank threads share the cores, the caches and the memory bandwidth, so one tower timed
//! alone runs faster than it does in training. Calibration therefore runs one thread per
//! rank of the topology at once, each timing its own tower at its local batch, with no
//! communication: what is measured is compute under the real contention.

use std::time::{Duration, Instant};

use candle_core::Device;

use crate::data::{Stream, SyntheticSource};
use crate::error::{Error, Result};
use crate::model::layers::l2_normalize;
use crate::model::{cpu_builder, ClipConfig, Encoder};
use crate::plan::Calibration;
use crate::topology::{Topology, Tower};

/// Samples per second of forward + backward for `tower` on this thread: one warm-up step,
/// then steps until `budget` has passed (at least two).
pub fn tower_rate(model: &ClipConfig, tower: Tower, batch: usize, budget: Duration) -> Result<f64> {
    let encoder = Encoder::new(&cpu_builder(0), model, tower)?;
    let source = SyntheticSource::new(0, model)?;
    let indices: Vec<u64> = (0..batch as u64).collect();
    let input = source.tower_input(tower, Stream::Train, &indices, &Device::Cpu)?;
    let step = || -> Result<()> {
        let features = l2_normalize(&encoder.forward(&input)?)?;
        features.sum_all()?.backward()?;
        Ok(())
    };
    step()?;
    let start = Instant::now();
    let mut steps = 0;
    while steps < 2 || start.elapsed() < budget {
        step()?;
        steps += 1;
    }
    Ok((steps * batch) as f64 / start.elapsed().as_secs_f64())
}

/// Runs every rank's tower at once (as [`tower_rate`]) and returns each tower's mean rate
/// per rank. An `auto` topology is measured half image, half text.
pub fn calibrate(
    topology: &Topology,
    model: &ClipConfig,
    global_batch: usize,
    budget: Duration,
) -> Result<Calibration> {
    let world = topology.devices().len();
    let towers: Vec<Tower> = if topology.auto_groups {
        (0..world)
            .map(|r| {
                if r < world.div_ceil(2) {
                    Tower::Image
                } else {
                    Tower::Text
                }
            })
            .collect()
    } else {
        topology.ranks.iter().map(|r| r.tower).collect()
    };
    let group_size = |t: Tower| towers.iter().filter(|&&x| x == t).count();
    if group_size(Tower::Image) == 0 || group_size(Tower::Text) == 0 {
        return Err(Error::Msg(
            "calibration needs at least one rank per tower".into(),
        ));
    }
    let rates: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = towers
            .iter()
            .map(|&t| {
                let batch = (global_batch / group_size(t)).max(1);
                s.spawn(move || tower_rate(model, t, batch, budget))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Msg("a calibration thread panicked".into())))
            })
            .collect()
    });
    let mut sums = [0.0f64; 2];
    for (t, r) in towers.iter().zip(rates) {
        sums[(*t == Tower::Text) as usize] += r?;
    }
    Ok(Calibration {
        image_samples_per_s: sums[0] / group_size(Tower::Image) as f64,
        text_samples_per_s: sums[1] / group_size(Tower::Text) as f64,
    })
}
