//! `mmpipe plan --calibrate`: measure each tower's forward + backward throughput on this
//! machine, so the planner can use measured rates instead of peak × efficiency.
//!
//! Rank threads share the cores, the caches and the memory bandwidth, so one tower timed
//! alone runs faster than it does in training. Calibration therefore runs one thread per
//! rank of the topology, each timing its own tower at its local batch, with no
//! communication, in lockstep as in training: every step starts together, and a rank that
//! finishes early waits for the others. The heavier tower so runs part of its step beside
//! the lighter one and the rest alone, the overlap the real step has (timed freely, the
//! lighter tower would keep contending for the whole step: on 2 cores that made the 1x1
//! prediction 20 % slow).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::data::{Stream, SyntheticSource};
use crate::error::{Error, Result};
use crate::model::layers::l2_normalize;
use crate::model::{ClipConfig, Encoder, ParamBuilder};
use crate::plan::{Calibration, Precision};
use crate::topology::{Topology, Tower};

/// Samples per second of forward + backward for `tower` on this thread, with `lockstep`
/// shared by every calibrating thread: [`WARM_UP_STEPS`] untimed steps, then timed ones,
/// every step started by all threads together, until `budget` has passed (at least two). Only this thread's own compute time
/// counts, not the wait for the others.
fn tower_rate(
    model: &ClipConfig,
    tower: Tower,
    batch: usize,
    budget: Duration,
    precision: Precision,
    lockstep: &Lockstep,
) -> Result<f64> {
    // As the trainer builds it: f32 masters, the tower computing in the precision's dtype.
    let compute = precision.compute_dtype(DType::F32);
    let pb = ParamBuilder::mixed(0, compute, DType::F32, &Device::Cpu);
    let encoder = Encoder::new(&pb, model, tower)?;
    let source = SyntheticSource::new(0, model)?;
    let indices: Vec<u64> = (0..batch as u64).collect();
    let input = source.tower_input(tower, Stream::Train, &indices, &Device::Cpu)?;
    let step = || -> Result<()> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
            let features = l2_normalize(&encoder.forward(&input)?.to_dtype(DType::F32)?)?;
            features.sum_all()?.backward()?;
            Ok(())
        }))
        .unwrap_or_else(|_| {
            Err(Error::Msg(format!(
                "calibrating the {tower} tower panicked"
            )))
        })
    };
    // A failed step still takes part in the lockstep, so the other threads never wait for a
    // thread that has left; the error is returned once all have stopped.
    let mut outcome = Ok(());
    let mut start = Instant::now();
    let mut busy = Duration::ZERO;
    let mut steps = 0usize;
    for round in 0.. {
        lockstep.barrier.wait();
        if round == WARM_UP_STEPS {
            start = Instant::now();
        }
        if outcome.is_ok() {
            let t = Instant::now();
            outcome = step();
            if round >= WARM_UP_STEPS {
                busy += t.elapsed();
                steps += 1;
            }
        }
        lockstep.barrier.wait();
        if lockstep.barrier.wait().is_leader() {
            // At least two timed steps.
            let done = round > WARM_UP_STEPS && start.elapsed() >= budget;
            lockstep.stop.store(done, Ordering::SeqCst);
        }
        lockstep.barrier.wait();
        if lockstep.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    outcome?;
    Ok((steps * batch) as f64 / busy.as_secs_f64())
}

/// Untimed steps first: the first few steps run up to 25 % slower than the steady state
/// (the allocator's first touches of the activations' memory; measured on the anchor's
/// image tower: 2.21, 2.15, 1.94, then 1.83–1.94 s).
const WARM_UP_STEPS: usize = 2;

/// What the calibrating threads share to run their steps together.
struct Lockstep {
    barrier: Barrier,
    stop: AtomicBool,
}

/// Runs every rank's tower at once (as [`tower_rate`], in `precision`) and returns each
/// tower's mean rate
/// per rank: one thread per device. An `auto` topology, or one whose devices hold both
/// towers, is measured half image, half text (the threads' contention is then what the
/// devices' would be; a device running both towers in turn runs each at that rate).
pub fn calibrate(
    topology: &Topology,
    model: &ClipConfig,
    global_batch: usize,
    budget: Duration,
    precision: Precision,
) -> Result<Calibration> {
    let world = topology.devices().len();
    let shared = topology.ranks.iter().any(|r| r.roles.len() > 1);
    let towers: Vec<Tower> = if topology.auto_groups || shared {
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
        topology.ranks.iter().map(|r| r.roles[0].tower).collect()
    };
    let group_size = |t: Tower| towers.iter().filter(|&&x| x == t).count();
    if group_size(Tower::Image) == 0 || group_size(Tower::Text) == 0 {
        return Err(Error::Msg(
            "calibration needs at least one rank per tower".into(),
        ));
    }
    let lockstep = Lockstep {
        barrier: Barrier::new(towers.len()),
        stop: AtomicBool::new(false),
    };
    let rates: Vec<Result<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = towers
            .iter()
            .map(|&t| {
                let batch = global_batch.div_ceil(group_size(t)).max(1);
                let lockstep = &lockstep;
                s.spawn(move || tower_rate(model, t, batch, budget, precision, lockstep))
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
        precision,
    })
}
