//! `mmpipe plan --calibrate`: measure each tower's forward + backward throughput on this
//! machine, so the planner can use measured rates instead of peak × efficiency.

use std::time::{Duration, Instant};

use candle_core::Device;

use crate::data::{Stream, SyntheticSource};
use crate::error::Result;
use crate::model::layers::l2_normalize;
use crate::model::{cpu_builder, ClipConfig, Encoder};
use crate::plan::Calibration;
use crate::topology::Tower;

/// Samples per second of forward + backward for `tower`, on the current thread settings:
/// one warm-up step, then steps until `budget` has passed (at least two).
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

/// Both towers' rates, scaled by `share`: the fraction of its threads' cores a rank gets
/// when more rank threads than cores run at once.
pub fn calibrate(
    model: &ClipConfig,
    batch: usize,
    budget: Duration,
    share: f64,
) -> Result<Calibration> {
    Ok(Calibration {
        image_samples_per_s: share * tower_rate(model, Tower::Image, batch, budget)?,
        text_samples_per_s: share * tower_rate(model, Tower::Text, batch, budget)?,
    })
}
