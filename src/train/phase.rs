//! The phases of a training step, their wall times and collective bytes, and the one timer
//! that measures them.

use std::time::{Duration, Instant};

use candle_core::Device;

use crate::comm::RankComms;
use crate::error::Result;

/// A phase of one rank's step, in the order it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the data pipeline's next batch, and copying it onto the rank's device.
    DataWait,
    Forward,
    /// Agreeing on the readable pairs, and the world all-gather of features.
    Exchange,
    Loss,
    Backward,
    GradAllReduce,
    Optimizer,
}

/// Wall time of each phase of one step on one rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    pub data_wait: Duration,
    pub forward: Duration,
    pub exchange: Duration,
    pub loss: Duration,
    pub backward: Duration,
    pub grad_all_reduce: Duration,
    pub optimizer: Duration,
}

impl PhaseTimes {
    pub const NAMES: [&'static str; 7] = [
        "data wait",
        "forward",
        "exchange",
        "loss",
        "backward",
        "grad all-reduce",
        "optimizer",
    ];

    /// In [`Self::NAMES`] order.
    pub fn as_array(&self) -> [Duration; 7] {
        [
            self.data_wait,
            self.forward,
            self.exchange,
            self.loss,
            self.backward,
            self.grad_all_reduce,
            self.optimizer,
        ]
    }

    /// From [`Self::as_array`]'s order.
    pub fn from_array(d: [Duration; 7]) -> Self {
        PhaseTimes {
            data_wait: d[0],
            forward: d[1],
            exchange: d[2],
            loss: d[3],
            backward: d[4],
            grad_all_reduce: d[5],
            optimizer: d[6],
        }
    }

    pub fn of_mut(&mut self, phase: Phase) -> &mut Duration {
        match phase {
            Phase::DataWait => &mut self.data_wait,
            Phase::Forward => &mut self.forward,
            Phase::Exchange => &mut self.exchange,
            Phase::Loss => &mut self.loss,
            Phase::Backward => &mut self.backward,
            Phase::GradAllReduce => &mut self.grad_all_reduce,
            Phase::Optimizer => &mut self.optimizer,
        }
    }

    pub fn add(&mut self, o: &PhaseTimes) {
        *self = PhaseTimes::from_array(std::array::from_fn(|i| {
            self.as_array()[i] + o.as_array()[i]
        }));
    }
}

/// Collective payload bytes of one step on one rank, by phase (see
/// [`crate::comm::Communicator::payload_bytes`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseBytes {
    /// The world all-gather of features (and of the readable pairs).
    pub exchange: u64,
    /// The loss's own traffic: normaliser partials (`lse`) or returned feature gradients
    /// (`gather-scatter`), and its scalars.
    pub loss: u64,
    pub grad_all_reduce: u64,
}

impl PhaseBytes {
    pub fn add(&mut self, o: &PhaseBytes) {
        self.exchange += o.exchange;
        self.loss += o.loss;
        self.grad_all_reduce += o.grad_all_reduce;
    }

    fn of_mut(&mut self, phase: Phase) -> Option<&mut u64> {
        match phase {
            Phase::Exchange => Some(&mut self.exchange),
            Phase::Loss => Some(&mut self.loss),
            // The gradient sums run during backward too (`comm::overlap`), on a worker
            // whose collectives may end between two phases: [`PhaseTimer::count_grad_sums`]
            // counts them over both at once.
            _ => None,
        }
    }
}

/// Times a step's phases on one rank: each phase ends when the rank's device has finished
/// the work queued so far (CUDA kernels run asynchronously, and a phase's time is when its
/// kernels are done), and its bytes are what the rank's communicators carried meanwhile.
pub struct PhaseTimer<'a> {
    device: &'a Device,
    comms: &'a RankComms,
    pub times: PhaseTimes,
    pub bytes: PhaseBytes,
}

impl<'a> PhaseTimer<'a> {
    pub fn new(device: &'a Device, comms: &'a RankComms) -> Self {
        PhaseTimer {
            device,
            comms,
            times: PhaseTimes::default(),
            bytes: PhaseBytes::default(),
        }
    }

    /// Runs `work` as (part of) `phase`, adding its time and bytes to the phase's.
    pub fn time<T>(&mut self, phase: Phase, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let (started, before) = (Instant::now(), self.payload());
        let out = work()?;
        self.device.synchronize()?;
        *self.times.of_mut(phase) += started.elapsed();
        let carried = self.payload() - before;
        if let Some(b) = self.bytes.of_mut(phase) {
            *b += carried;
        }
        Ok(out)
    }

    /// Adds work timed elsewhere (a worker's collective the rank's thread waited for) to
    /// `phase`: `took` of wall time, and the `bytes` it carried.
    pub fn add(&mut self, phase: Phase, took: Duration, bytes: u64) {
        *self.times.of_mut(phase) += took;
        if let Some(b) = self.bytes.of_mut(phase) {
            *b += bytes;
        }
    }

    /// Bytes the rank's communicators have carried so far.
    pub fn payload(&self) -> u64 {
        let c = self.comms;
        c.world.payload_bytes() + c.groups.iter().map(|g| g.comm.payload_bytes()).sum::<u64>()
    }

    /// Counts what the communicators carried since `before` (read before backward) as the
    /// gradient sums': every collective from backward's start to the sums' end is one.
    pub fn count_grad_sums(&mut self, before: u64) {
        self.bytes.grad_all_reduce += self.payload() - before;
    }
}
