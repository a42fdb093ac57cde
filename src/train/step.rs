//! One rank's training step, top to bottom:
//! forward own tower(s) → agree on the readable pairs → world all-gather of features →
//! global loss (own feature gradients, the loss scalars' gradients) → backward with the
//! injected gradients → sum parameter gradients inside each tower's group → one world
//! flag: every gradient finite, and whether to stop → AdamW → clamp the temperature.
//!
//! A rank that holds both towers runs each phase for its image replica, then its text
//! replica, in one thread; what crosses the world (the pairs' agreement, the features,
//! the loss's gradients and scalars, the flag) goes as one collective for both, so every
//! rank makes the same world calls whatever it holds.
//!
//! With a micro-batch smaller than the rank's slice (GradCache), the forward runs per
//! micro-batch without keeping activations, the loss runs once on the whole global batch,
//! and the backward re-runs each micro-batch's forward with its slice of the feature
//! gradient: the step equals the unaccumulated one.
//!
//! Precision: the tower runs in its compute dtype (bf16 under mixed precision, reading
//! the working copies of the weights); its features are cast to the master dtype before
//! they are normalised, so the loss, its exchange and every gradient it injects are in
//! full precision. Backward's gradients are cast to the all-reduce's dtype, summed, and
//! handed to the optimizer in the master dtype.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::pairs::{agree_on_pairs, PairSide, Pairs, Readable, Slice};
use super::phase::{Phase, PhaseBytes, PhaseTimer, PhaseTimes};
use super::trainer::{RankTrainer, TowerTrainer};
use crate::comm::overlap::{Buckets, OverlapStats};
use crate::comm::{all_reduce_sum_sparse_rows, Communicator, RankComms, SparseRows};
use crate::error::{Error, Result};
use crate::loss::{
    exchange_features, gather_tower_features, global_loss, LossOutput, LossScalars, Side,
};
use crate::model::checkpointing::{
    backward_recomputing_into, forward_in_segments, forward_keeping_block_inputs, GradAccumulator,
    SegmentGrads, Segments,
};
use crate::model::fused::GradSum;
use crate::model::{TowerInput, LOGIT_SCALE_MAX};
use crate::topology::Tower;

/// The gradients of one step, before the optimizer: per tower the rank holds (in
/// [`RankTrainer::towers`]' order), every trainable parameter's (name order, as
/// [`TowerTrainer::trainable`]) summed over the tower's group; and the global loss.
#[derive(Debug, Clone)]
pub struct StepGrads {
    pub loss: f64,
    /// Per tower, in the master weights' dtype.
    pub grads: Vec<Vec<Tensor>>,
    /// Bytes of the tower's gradients that backward handed over in the compute dtype (the
    /// bf16 working copies'), before their cast to the master dtype: what the planner's
    /// memory model counts beside `grads`.
    pub backward_grad_bytes: usize,
    pub times: PhaseTimes,
    pub bytes: PhaseBytes,
    /// Fewer than two pairs of the global batch could be read: no loss, no update (every
    /// rank decides alike, from the same gathered validity).
    pub skipped: bool,
    /// Per tower: the L2 norm of its group-summed gradients before clipping; NaN or
    /// infinite when a gradient, the loss's scalars' included, is. One pass serves
    /// clipping, the NaN check and the metrics.
    pub grad_norms: Vec<(Tower, f64)>,
    /// The overlapped gradient sums of the rank's towers (zero when none overlapped).
    pub overlap: OverlapStats,
}

/// Why a step made no update (every rank decides alike).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SkipReason {
    /// Fewer than two pairs of the global batch could be read.
    UnreadableBatch,
    /// The loss or a gradient was NaN or infinite somewhere in the world.
    NonFinite { loss: f64 },
}

/// What one step did on one rank.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The global loss; None for a skipped step.
    pub loss: Option<f64>,
    pub skipped: Option<SkipReason>,
    pub times: PhaseTimes,
    pub bytes: PhaseBytes,
    /// Per tower: its gradient norm before clipping (NaN when the batch was unreadable).
    pub grad_norms: Vec<(Tower, f64)>,
    /// Some rank was asked to stop ([`super::request_stop`]): every rank stops after this
    /// step.
    pub stop: bool,
    pub overlap: OverlapStats,
}

/// The joint L2 norm of `grads` (NaN or infinite when one of them is).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    // On a GPU, one launch and one read back for them all (not one per tensor).
    #[cfg(feature = "cuda")]
    if crate::train::optim::cuda::sum_of_squares_applies(grads) {
        return Ok(crate::train::optim::cuda::sum_of_squares(grads)?.sqrt());
    }
    let mut sum = 0.0;
    for g in grads {
        sum += crate::model::fused::sum_of_squares(g)?;
    }
    Ok(sum.sqrt())
}

/// Scales `grads` (whose joint norm is `norm`) down to L2 norm `max_norm` when `norm`
/// exceeds it. Applied to a tower's group-summed gradients, which every rank of the group
/// holds alike.
fn clip_with_norm(grads: Vec<Tensor>, norm: f64, max_norm: f64) -> Result<Vec<Tensor>> {
    if norm <= max_norm || !norm.is_finite() {
        return Ok(grads);
    }
    let scale = max_norm / norm;
    Ok(grads
        .into_iter()
        .map(|g| g * scale)
        .collect::<candle_core::Result<_>>()?)
}

/// The forward pass's result: the normalised features, and what backward needs of it.
struct Forward {
    /// This rank's normalised features; with a graph back into the tower unless the
    /// tower is locked or the forward ran per micro-batch.
    features: Tensor,
    /// Block inputs, under gradient checkpointing.
    saved: Vec<Tensor>,
    /// Whether the forward ran per micro-batch (GradCache): backward re-runs it.
    accumulated: bool,
    /// Every block's graph, cut at the blocks, for a backward that hands over each
    /// block's gradients as it goes (overlapped sums, without checkpointing).
    segments: Option<Segments>,
}

impl Forward {
    /// Whether backward can hand over its gradients segment by segment.
    fn in_segments(&self) -> bool {
        self.segments.is_some() || !self.saved.is_empty()
    }
}

/// Backward's gradients of a tower's trained parameters, before the group's sum.
enum TowerGrads<'scope> {
    /// Every gradient, in the compute dtype: summed after backward.
    Local(Vec<Tensor>),
    /// The buckets already on their way (summing during backward), and the token
    /// table's gradient held back for its sparse-row sum.
    Overlapped {
        buckets: Buckets<'scope>,
        table: Option<(usize, Tensor)>,
    },
}

impl RankTrainer {
    /// A whole step: the gradients, one world flag, the update. `inputs` and `reads` hold
    /// one entry per tower of [`Self::towers`].
    pub fn step(
        &mut self,
        comms: &RankComms,
        inputs: &[TowerInput],
        reads: Option<&[Readable]>,
        lr: f64,
    ) -> Result<StepOutcome> {
        let mut g = self.compute_grads(comms, inputs, reads)?;
        let finite =
            g.skipped || (g.loss.is_finite() && g.grad_norms.iter().all(|(_, n)| n.is_finite()));
        let (all_finite, stop) = agree_on_step(comms, finite)?;
        let skipped = if g.skipped {
            Some(SkipReason::UnreadableBatch)
        } else if !all_finite {
            Some(SkipReason::NonFinite { loss: g.loss })
        } else {
            g.times.optimizer = self.apply(&g.grads, lr)?;
            None
        };
        Ok(StepOutcome {
            loss: skipped.is_none().then_some(g.loss),
            skipped,
            times: g.times,
            bytes: g.bytes,
            grad_norms: g.grad_norms,
            stop,
            overlap: g.overlap,
        })
    }

    /// Forward, agreement on the pairs, exchange, loss, backward and the group reductions:
    /// the exact gradient of the global-batch loss for every parameter this rank holds.
    /// `inputs` holds each tower's slice; `reads` marks each tower's usable samples (and
    /// carries their keys, which must match the other modality's): the loss is then over
    /// the pairs every rank could read, and the others get no gradient. None: every sample
    /// is usable (no agreement needed).
    pub fn compute_grads(
        &self,
        comms: &RankComms,
        inputs: &[TowerInput],
        reads: Option<&[Readable]>,
    ) -> Result<StepGrads> {
        if inputs.len() != self.towers.len() || reads.is_some_and(|r| r.len() != inputs.len()) {
            return Err(Error::Msg(format!(
                "a rank holding {} got {} inputs: one per tower",
                self.label(),
                inputs.len()
            )));
        }
        for (t, input) in self.towers.iter().zip(inputs) {
            if input.len()? != t.local_batch {
                return Err(Error::Msg(format!(
                    "the {} replica got {} samples, expected its slice of {}",
                    t.tower,
                    input.len()?,
                    t.local_batch
                )));
            }
        }
        let mut timer = PhaseTimer::new(&self.device, comms);
        // The batch's copy onto the device counts as waiting for data: on a GPU it is the
        // host-to-device transfer, which no kernel overlaps yet.
        let inputs = timer.time(Phase::DataWait, || {
            inputs
                .iter()
                .map(|i| i.to_device(&self.device))
                .collect::<Result<Vec<_>>>()
        })?;
        // Decoded bytes become floats once, on the device: not again in a recomputed stem
        // or for each micro-batch.
        let inputs = timer.time(Phase::Forward, || {
            inputs
                .iter()
                .map(TowerInput::normalised)
                .collect::<Result<Vec<_>>>()
        })?;
        // The pairs depend on what was read, not on the features: agreed before the
        // forward, so a batch with no loss runs none, and the features' gather can start
        // as soon as they exist.
        let Some(pairs) = timer.time(Phase::Exchange, || self.agree_on_pairs(comms, reads))? else {
            return Ok(StepGrads {
                loss: f64::NAN,
                grads: Vec::new(),
                backward_grad_bytes: 0,
                times: timer.times,
                bytes: timer.bytes,
                skipped: true,
                grad_norms: self.towers.iter().map(|t| (t.tower, f64::NAN)).collect(),
                overlap: OverlapStats::default(),
            });
        };
        let mut overlap = OverlapStats::default();
        let (forwards, mine, others) =
            self.forward_and_exchange(&mut timer, comms, &pairs, &inputs, &mut overlap)?;
        let features: Vec<&Tensor> = forwards.iter().map(|f| &f.features).collect();
        let loss = timer.time(Phase::Loss, || {
            self.loss(comms, &pairs, &mine, &others, &features)
        })?;
        // Each tower's gradient sums may start during backward, on a worker per tower
        // (`comm::overlap`): they live in this scope, and the group's sum ends in it.
        let grad_sums_from = timer.payload();
        let (reduced, backward_grad_bytes) = std::thread::scope(|scope| -> Result<_> {
            let backward = timer.time(Phase::Backward, || {
                self.towers
                    .iter()
                    .zip(&inputs)
                    .zip(forwards)
                    .zip(&loss.grads)
                    .map(|(((t, input), forward), grad)| {
                        let buckets = if t.overlap && forward.in_segments() {
                            let comm = comms.group(t.tower)?.comm.as_ref();
                            Some(Buckets::start(scope, comm, t.bucket_bytes))
                        } else {
                            None
                        };
                        t.backward(input, forward, grad, buckets)
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            // Activations and gradients are all alive here: the step's high-water mark.
            crate::comm::device::sample_memory(&self.device);
            let backward_grad_bytes = backward.iter().map(|(_, bytes)| bytes).sum();
            let reduced = timer.time(Phase::GradAllReduce, || {
                self.towers
                    .iter()
                    .zip(&inputs)
                    .zip(backward)
                    .map(|((t, input), (grads, _))| {
                        t.reduce(comms.group(t.tower)?.comm.as_ref(), input, grads, &loss)
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            Ok((reduced, backward_grad_bytes))
        })?;
        timer.count_grad_sums(grad_sums_from);
        let mut grads = Vec::with_capacity(reduced.len());
        let mut norms = Vec::with_capacity(reduced.len());
        for (g, norm, stats) in reduced {
            grads.push(g);
            norms.push(norm);
            overlap.add(&stats);
        }
        Ok(StepGrads {
            loss: loss.loss,
            grads,
            backward_grad_bytes,
            times: timer.times,
            bytes: timer.bytes,
            skipped: false,
            grad_norms: self.towers.iter().map(|t| t.tower).zip(norms).collect(),
            overlap,
        })
    }

    /// Applies gradients (as from [`Self::compute_grads`], one list per tower) and clamps
    /// the temperature.
    pub fn apply(&mut self, grads: &[Vec<Tensor>], lr: f64) -> Result<Duration> {
        let t = Instant::now();
        for (tower, grads) in self.towers.iter_mut().zip(grads) {
            tower.apply(grads, lr)?;
        }
        self.device.synchronize()?;
        Ok(t.elapsed())
    }

    /// The pairs of the global batch this step trains on: all of them, or those every
    /// rank could read. None: fewer than two.
    fn agree_on_pairs(
        &self,
        comms: &RankComms,
        reads: Option<&[Readable]>,
    ) -> Result<Option<Pairs>> {
        match reads {
            None => Ok(Some(Pairs {
                layout: self.layout.clone(),
                sides: self
                    .towers
                    .iter()
                    .map(|t| PairSide {
                        offset: t.offset,
                        kept: None,
                    })
                    .collect(),
            })),
            Some(reads) => {
                let me: Vec<Slice> = self
                    .towers
                    .iter()
                    .map(|t| Slice {
                        tower: t.tower,
                        offset: t.offset,
                        len: t.local_batch,
                    })
                    .collect();
                agree_on_pairs(comms, &self.layout, &me, reads)
            }
        }
    }

    /// Each tower's forward and the world all-gather of the kept features: the forwards,
    /// this rank's own kept features of each tower it holds (detached: the loss's gradient
    /// comes back through backward's injection), and per tower all features of the other
    /// one.
    ///
    /// One gather of every rank's features after every forward; or, where some rank holds
    /// both towers and `feature_overlap` is on, one gather per tower, image first, which
    /// such a rank starts on a worker as soon as its image features exist, so that it
    /// travels while the text forward runs (on GPUs the world's communicator has a stream
    /// of its own). Every rank makes the same two world calls in the same order; the
    /// gathered features equal the single gather's bit for bit.
    fn forward_and_exchange(
        &self,
        timer: &mut PhaseTimer,
        comms: &RankComms,
        pairs: &Pairs,
        inputs: &[TowerInput],
        overlap: &mut OverlapStats,
    ) -> Result<(Vec<Forward>, Vec<Tensor>, Vec<Tensor>)> {
        let world: &(dyn Communicator + Sync) = comms.world.as_ref();
        let layout = &pairs.layout;
        if !self.gather_per_tower {
            let forwards = timer.time(Phase::Forward, || {
                self.towers
                    .iter()
                    .zip(inputs)
                    .map(|(t, input)| t.forward(input))
                    .collect::<Result<Vec<_>>>()
            })?;
            let (mine, (image, text)) = timer.time(Phase::Exchange, || {
                let mine = forwards
                    .iter()
                    .zip(&pairs.sides)
                    .map(|(f, side)| kept_features(&f.features, side))
                    .collect::<Result<Vec<_>>>()?;
                let local = if mine.len() == 1 {
                    mine[0].clone()
                } else {
                    Tensor::cat(&mine, 0)?
                };
                Ok((mine, exchange_features(world, layout, &local)?))
            })?;
            let others = self.others(&image, &text);
            return Ok((forwards, mine, others));
        }
        std::thread::scope(|scope| {
            let mut forwards = Vec::with_capacity(self.towers.len());
            let mut mine = Vec::with_capacity(self.towers.len());
            let mut early = None;
            for (i, ((t, input), side)) in
                self.towers.iter().zip(inputs).zip(&pairs.sides).enumerate()
            {
                let forward = timer.time(Phase::Forward, || t.forward(input))?;
                let kept = kept_features(&forward.features, side)?;
                if t.tower == Tower::Image && i + 1 < self.towers.len() {
                    // Made contiguous here, behind the image forward: the worker's
                    // collective then only reads it.
                    let local = kept.contiguous()?;
                    overlap.feature_gathers += 1;
                    early = Some(scope.spawn(move || -> Result<(Tensor, Duration, u64)> {
                        // The rank's thread makes no world call until it has joined this
                        // worker: the bytes the world carried meanwhile are this gather's.
                        let (started, before) = (Instant::now(), world.payload_bytes());
                        let image = gather_tower_features(world, layout, Tower::Image, &local)?;
                        Ok((image, started.elapsed(), world.payload_bytes() - before))
                    }));
                }
                forwards.push(forward);
                mine.push(kept);
            }
            let own = |tower: Tower| -> Result<Tensor> {
                match self.towers.iter().position(|t| t.tower == tower) {
                    Some(i) => Ok(mine[i].clone()),
                    // A rank without the tower adds no rows of it.
                    None => Ok(mine[0].narrow(0, 0, 0)?),
                }
            };
            let image = match early {
                Some(worker) => {
                    let waited = Instant::now();
                    let (image, busy, bytes) = worker.join().map_err(|_| Error::Collective {
                        op: "all_gather",
                        group: world.name().to_string(),
                        message: "the image features' gather thread panicked".into(),
                    })??;
                    let waited = waited.elapsed();
                    timer.add(Phase::Exchange, waited, bytes);
                    overlap.feature_gather_busy += busy;
                    overlap.feature_gather_waited += waited;
                    image
                }
                None => timer.time(Phase::Exchange, || {
                    gather_tower_features(world, layout, Tower::Image, &own(Tower::Image)?)
                })?,
            };
            let text = timer.time(Phase::Exchange, || {
                gather_tower_features(world, layout, Tower::Text, &own(Tower::Text)?)
            })?;
            let others = self.others(&image, &text);
            Ok((forwards, mine, others))
        })
    }

    /// Per tower this rank holds, all features of the other one.
    fn others(&self, image: &Tensor, text: &Tensor) -> Vec<Tensor> {
        self.towers
            .iter()
            .map(|t| match t.tower {
                Tower::Image => text.clone(),
                Tower::Text => image.clone(),
            })
            .collect()
    }

    /// The global loss and this rank's share of its gradient, per tower at every row of
    /// its slice (zero at the rows that were not kept).
    fn loss(
        &self,
        comms: &RankComms,
        pairs: &Pairs,
        mine: &[Tensor],
        others: &[Tensor],
        features: &[&Tensor],
    ) -> Result<LossOutput> {
        let scalars = LossScalars {
            logit_scale: self.logit_scale()?,
            logit_bias: self.logit_bias()?,
        };
        let sides: Vec<Side> = mine
            .iter()
            .zip(others)
            .zip(&pairs.sides)
            .map(|((local, other), side)| Side {
                local,
                other,
                offset: side.offset,
            })
            .collect();
        let mut out = global_loss(comms, &self.loss, &pairs.layout, &sides, scalars)?;
        for ((grad, side), features) in out.grads.iter_mut().zip(&pairs.sides).zip(features) {
            if let Some(rows) = &side.kept {
                let index = Tensor::from_vec(rows.clone(), rows.len(), grad.device())?;
                *grad = features.detach().zeros_like()?.index_add(&index, grad, 0)?;
            }
        }
        Ok(out)
    }
}

impl TowerTrainer {
    /// Applies this tower's gradients and clamps the temperature.
    fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.optimizer.step(grads, lr)?;
        if self.logit_scale()? > LOGIT_SCALE_MAX {
            let scale = &self.scalars.scale;
            let clamped = Tensor::new(LOGIT_SCALE_MAX, &Device::Cpu)?
                .to_dtype(scale.dtype())?
                .to_device(scale.device())?;
            scale.set(&clamped)?;
        }
        Ok(())
    }

    /// The tower's normalised features: whole, per micro-batch (features only, each
    /// micro-batch's graph dropped as soon as it is done), or keeping block inputs for
    /// gradient checkpointing.
    fn forward(&self, input: &TowerInput) -> Result<Forward> {
        let micro_batches = self.micro_batches();
        let accumulated = micro_batches.len() > 1;
        let mut segments = None;
        let (features, saved) = if accumulated {
            let parts = micro_batches
                .iter()
                .map(|&(start, len)| {
                    let x = self.encoder.forward(&input.narrow(start, len)?)?;
                    Ok(self.normalise(&x)?.detach())
                })
                .collect::<Result<Vec<_>>>()?;
            (Tensor::cat(&parts, 0)?, Vec::new())
        } else if self.checkpointing && !self.locked {
            forward_keeping_block_inputs(&self.encoder, input, |x: &Tensor| self.normalise(x))?
        } else if self.overlap {
            let (features, kept) =
                forward_in_segments(&self.encoder, input, |x: &Tensor| self.normalise(x))?;
            segments = Some(kept);
            (features, Vec::new())
        } else {
            let features = self.normalise(&self.encoder.forward(input)?)?;
            // A locked tower keeps no graph: its features are constants of the step.
            let features = if self.locked {
                features.detach()
            } else {
                features
            };
            (features, Vec::new())
        };
        Ok(Forward {
            features,
            saved,
            accumulated,
            segments,
        })
    }

    /// Backpropagates ∂L/∂features into the tower (d/dθ Σ features ⊙ g = (∂L/∂features) ·
    /// ∂features/∂θ): the gradients of the tower's trained parameters, in the compute
    /// dtype, and how many bytes of them are not in the master dtype. With `buckets`
    /// (and a forward in segments), each segment's gradients start their group sum as
    /// soon as the segment is done.
    fn backward<'scope>(
        &self,
        input: &TowerInput,
        forward: Forward,
        grad: &Tensor,
        buckets: Option<Buckets<'scope>>,
    ) -> Result<(TowerGrads<'scope>, usize)> {
        let tower_params = &self.tower_working;
        if let Some(mut buckets) = buckets {
            let table_index = self.token_table_index(input, tower_params);
            let mut table: Option<Tensor> = None;
            let mut other_dtype = 0;
            {
                let mut sink = |grads: SegmentGrads| -> Result<()> {
                    for (i, g) in grads {
                        if g.dtype() != self.master {
                            other_dtype += g.elem_count() * g.dtype().size_in_bytes();
                        }
                        if Some(i) == table_index {
                            table = Some(match table.take() {
                                Some(prev) => (prev + g)?,
                                None => g,
                            });
                        } else {
                            buckets.add(i, g.to_dtype(self.grad_reduce)?);
                        }
                    }
                    Ok(())
                };
                self.backward_segments(input, forward, grad, &mut sink)?;
            }
            let table = table_index.zip(table);
            return Ok((TowerGrads::Overlapped { buckets, table }, other_dtype));
        }
        let grads = if tower_params.is_empty() {
            Vec::new()
        } else if forward.accumulated {
            let mut sums: Option<Vec<GradSum>> = None;
            for (start, len) in self.micro_batches() {
                let grads = self.tower_grads(
                    &input.narrow(start, len)?,
                    &grad.narrow(0, start, len)?,
                    tower_params,
                )?;
                // Accumulated in the master dtype (bf16 partial sums would round at every
                // micro-batch), in place: a bf16 gradient is widened as it is added.
                match &mut sums {
                    None => {
                        sums = Some(
                            grads
                                .iter()
                                .map(|g| GradSum::new(g, self.master))
                                .collect::<Result<_>>()?,
                        )
                    }
                    Some(acc) => {
                        for (a, g) in acc.iter_mut().zip(&grads) {
                            a.add(g)?;
                        }
                    }
                }
            }
            sums.expect("at least two micro-batches")
                .into_iter()
                .map(GradSum::into_tensor)
                .collect()
        } else if forward.in_segments() {
            let mut acc = GradAccumulator::new(tower_params);
            let mut sink = |g: SegmentGrads| acc.add(g);
            self.backward_segments(input, forward, grad, &mut sink)?;
            acc.finish()?
        } else {
            let store = (forward.features * grad)?.sum_all()?.backward()?;
            tower_params.grads(&store)?
        };
        // Gradients backward gave in another dtype than the master's (the bf16 working
        // copies'): their f32 casts are allocated beside them.
        let other_dtype = grads
            .iter()
            .filter(|g| g.dtype() != self.master)
            .map(|g| g.elem_count() * g.dtype().size_in_bytes())
            .sum();
        Ok((TowerGrads::Local(grads), other_dtype))
    }

    /// Backward one segment at a time, through the kept segments or recomputing from the
    /// saved block inputs: each segment's gradients of the trained parameters go to
    /// `sink` as soon as the segment is done.
    fn backward_segments(
        &self,
        input: &TowerInput,
        forward: Forward,
        grad: &Tensor,
        sink: &mut dyn FnMut(SegmentGrads) -> Result<()>,
    ) -> Result<()> {
        match forward.segments {
            Some(segments) => segments.backward(grad, &self.tower_working, sink),
            None => backward_recomputing_into(
                &self.encoder,
                input,
                &forward.saved,
                grad,
                |x: &Tensor| self.normalise(x),
                &self.tower_working,
                sink,
            ),
        }
    }

    /// Sums the tower's gradients over the group (in the all-reduce's dtype, sparse rows
    /// for the token table), or waits for the buckets already summing, clips them, and
    /// puts the loss scalars' own gradients beside them: every trainable parameter's
    /// gradient in the master dtype, the tower's norm before clipping (NaN when any
    /// gradient is not finite), and what the overlapped sums did.
    fn reduce(
        &self,
        group: &dyn Communicator,
        input: &TowerInput,
        tower_grads: TowerGrads,
        loss: &LossOutput,
    ) -> Result<(Vec<Tensor>, f64, OverlapStats)> {
        let (summed, stats) = match tower_grads {
            TowerGrads::Local(grads) => {
                let sparse = self.sparse_grad_rows(input, &self.tower_working)?;
                let local = grads
                    .into_iter()
                    .map(|g| g.to_dtype(self.grad_reduce))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let summed = all_reduce_sum_sparse_rows(group, &local, &sparse)?;
                (summed, OverlapStats::default())
            }
            TowerGrads::Overlapped { buckets, table } => {
                let (mut summed, stats) = buckets.finish(self.tower_working.len())?;
                // The worker is done with the group: the table's sum follows its buckets.
                if let Some((i, g)) = table {
                    let rows = self
                        .sparse_grad_rows(input, &self.tower_working)?
                        .into_iter()
                        .flat_map(|s| s.rows)
                        .collect();
                    let sparse = [SparseRows { index: 0, rows }];
                    let g = g.to_dtype(self.grad_reduce)?;
                    summed[i] = all_reduce_sum_sparse_rows(group, &[g], &sparse)?.pop();
                }
                let summed = summed
                    .into_iter()
                    .zip(self.tower_working.iter())
                    .map(|(g, (_, v))| match g {
                        Some(g) => Ok(g),
                        // Backward never reached it, on any rank: its sum is zero.
                        None => Ok(v.as_tensor().zeros_like()?.to_dtype(self.grad_reduce)?),
                    })
                    .collect::<Result<Vec<_>>>()?;
                (summed, stats)
            }
        };
        let mut reduced = summed
            .into_iter()
            .map(|g| g.to_dtype(self.master))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut norm = grad_norm(&reduced)?;
        if let Some(max_norm) = self.grad_clip {
            reduced = clip_with_norm(reduced, norm, max_norm)?;
        }
        if !(loss.grad_logit_scale.is_finite() && loss.grad_logit_bias.is_finite()) {
            norm = f64::NAN;
        }
        let scale = &self.scalars.scale;
        let scalar = |v: f64| -> Result<Tensor> {
            Ok(Tensor::new(v, &Device::Cpu)?
                .to_dtype(scale.dtype())?
                .to_device(scale.device())?)
        };
        let bias_id = self.scalars.bias.as_ref().map(|b| b.id());
        let mut reduced = reduced.into_iter();
        let grads = self
            .trainable
            .iter()
            .map(|(_, v)| {
                if v.id() == scale.id() {
                    scalar(loss.grad_logit_scale)
                } else if Some(v.id()) == bias_id {
                    scalar(loss.grad_logit_bias)
                } else {
                    Ok(reduced.next().expect("one gradient per tower parameter"))
                }
            })
            .collect::<Result<_>>()?;
        Ok((grads, norm, stats))
    }
}

/// This rank's kept rows of a tower's features, detached.
fn kept_features(features: &Tensor, side: &PairSide) -> Result<Tensor> {
    match &side.kept {
        Some(rows) => {
            let index = Tensor::from_vec(rows.clone(), rows.len(), features.device())?;
            Ok(features.detach().index_select(&index, 0)?)
        }
        None => Ok(features.detach()),
    }
}

/// One world all-reduce of two flags: whether every rank's loss and gradients are finite
/// (a NaN in one tower skips the step on both groups, so neither moves without the
/// other), and whether any rank was asked to stop (every rank must stop at the same step).
fn agree_on_step(comms: &RankComms, finite: bool) -> Result<(bool, bool)> {
    let flags = [!finite, super::stop_requested()].map(|f| f32::from(u8::from(f)));
    let sums = comms
        .world
        .all_reduce_sum(&Tensor::new(&flags, &Device::Cpu)?)?
        .to_vec1::<f32>()?;
    Ok((sums[0] == 0.0, sums[1] > 0.0))
}
