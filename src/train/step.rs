//! One rank's training step, top to bottom:
//! forward own tower → normalise → world all-gather of features → global loss (own feature
//! gradient, global loss, temperature and bias gradients) → backward with the injected
//! gradient → sum parameter gradients inside the group → AdamW → clamp the temperature.
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

use candle_core::{DType, Device, Tensor, Var};

use super::config::TrainConfig;
use super::optim::{AdamW, AdamWConfig};
use std::sync::Arc;

use crate::comm::{all_reduce_sum_sparse_rows, Communicator, RankComms, SparseRows};
use crate::error::{Error, Result};
use crate::loss::{global_loss, split_len, split_offset, FeatureLayout, LossConfig, LossScalars};
use crate::model::checkpointing::{backward_recomputing, forward_keeping_block_inputs};
use crate::model::layers::l2_normalize;
use crate::model::resnet::StatsReducer;
use crate::model::{
    checkpoint, loss_scalars, ClipConfig, Encoder, ParamBuilder, Params, TowerInput,
    LOGIT_SCALE_MAX,
};
use crate::topology::{Topology, Tower};

/// Wall time of each phase of one step on one rank.
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseTimes {
    /// Waiting for the data pipeline's next batch.
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

    pub fn add(&mut self, o: &PhaseTimes) {
        self.data_wait += o.data_wait;
        self.forward += o.forward;
        self.exchange += o.exchange;
        self.loss += o.loss;
        self.backward += o.backward;
        self.grad_all_reduce += o.grad_all_reduce;
        self.optimizer += o.optimizer;
    }
}

/// Collective payload bytes of one step on one rank, by phase (see
/// [`Communicator::payload_bytes`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PhaseBytes {
    /// The world all-gather of features.
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
}

/// The gradients of one step, before the optimizer: every trainable parameter's (name
/// order, as [`RankTrainer::trainable`]), summed over the group, and the global loss.
#[derive(Debug, Clone)]
pub struct StepGrads {
    pub loss: f64,
    /// In the master weights' dtype.
    pub grads: Vec<Tensor>,
    /// Bytes of the tower's gradients that backward handed over in the compute dtype (the
    /// bf16 working copies'), before their cast to the master dtype: what the planner's
    /// memory model counts beside `grads`.
    pub backward_grad_bytes: usize,
    pub times: PhaseTimes,
    pub bytes: PhaseBytes,
    /// Fewer than two pairs of the global batch could be read: no loss, no update (every
    /// rank decides alike, from the same gathered validity).
    pub skipped: bool,
    /// L2 norm of the tower's group-summed gradients before clipping; NaN or infinite
    /// when a gradient, the loss's scalars' included, is. One pass serves clipping, the
    /// NaN check and the metrics.
    pub grad_norm: f64,
}

/// What a rank could read of its slice of a step's batch.
#[derive(Debug, Clone, Copy)]
pub struct Readable<'a> {
    /// The step (named when the ranks disagree).
    pub step: u64,
    /// False where the sample could not be used.
    pub valid: &'a [bool],
    /// The samples' keys (as the data pipeline names them, the same on the image and the
    /// text side), checked across the modalities; empty: not checked.
    pub keys: &'a [String],
}

impl<'a> Readable<'a> {
    /// Validity alone, no keys to check.
    pub fn valid_only(valid: &'a [bool]) -> Self {
        Readable {
            step: 0,
            valid,
            keys: &[],
        }
    }
}

/// Bytes a rank keeps from step to step ([`RankTrainer::state_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBytes {
    /// Master weights, and the working copies under mixed precision.
    pub weights: usize,
    /// The optimizer's moments.
    pub optimizer: usize,
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
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// The global loss; None for a skipped step.
    pub loss: Option<f64>,
    pub skipped: Option<SkipReason>,
    pub times: PhaseTimes,
    pub bytes: PhaseBytes,
    /// The tower's gradient norm before clipping (NaN when the batch was unreadable).
    pub grad_norm: f64,
}

/// Scales `grads` down to L2 norm `max_norm` when their joint norm exceeds it. Applied to
/// a tower's group-summed gradients, which every rank of the group holds alike.
pub fn clip_to_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<Vec<Tensor>> {
    let norm = grad_norm(&grads)?;
    clip_with_norm(grads, norm, max_norm)
}

/// The joint L2 norm of `grads` (NaN or infinite when one of them is).
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0;
    for g in grads {
        sum += crate::model::fused::sum_of_squares(g)?;
    }
    Ok(sum.sqrt())
}

/// [`clip_to_norm`] with the norm already known.
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

/// The loss's own learnable scalars: replicated on every rank, never tower parameters.
fn is_loss_scalar(name: &str) -> bool {
    name == "logit_scale" || name == "logit_bias"
}

/// Both of a rank's communicators' payload so far.
fn payload(comms: &RankComms) -> u64 {
    comms.world.payload_bytes() + comms.group.payload_bytes()
}

/// Batch-norm statistics summed over the rank's group.
struct GroupStats(Arc<dyn Communicator + Sync>);

impl StatsReducer for GroupStats {
    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        self.0.all_reduce_sum(t)
    }
}

pub struct RankTrainer {
    pub tower: Tower,
    /// Where this rank's weights live and its steps run.
    device: Device,
    encoder: Encoder,
    /// The tower's parameters and `logit_scale`, sorted by name: the master weights.
    params: Params,
    /// What the optimizer updates: `params`, less the tower's when it is locked.
    trainable: Params,
    /// The variables the tower reads, of the trained tower parameters (the working copies
    /// under mixed precision; `trainable`'s own otherwise), in `trainable`'s order: what
    /// backward gives gradients for.
    tower_working: Params,
    /// Every working variable, by name (for writing them after a checkpoint load).
    working: Params,
    /// The master weights' dtype: features, the loss and the optimizer's gradients.
    master: DType,
    /// What the gradient all-reduce sums in.
    grad_reduce: DType,
    locked: bool,
    checkpointing: bool,
    sync_batch_norm: bool,
    logit_scale: Var,
    logit_bias: Option<Var>,
    loss: LossConfig,
    /// Samples per forward pass when smaller than the local batch (GradCache).
    micro_batch: Option<usize>,
    grad_clip: Option<f64>,
    optimizer: AdamW,
    layout: FeatureLayout,
    /// This rank's rows of the global batch.
    pub offset: usize,
    pub local_batch: usize,
}

impl RankTrainer {
    /// Builds the tower for `global_rank`. Every rank of a group draws the same weights from
    /// the same seed (and the same as a single-device model with that seed would).
    pub fn new(
        topology: &Topology,
        global_rank: usize,
        model: &ClipConfig,
        cfg: &TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let rank = &topology.ranks[global_rank];
        // `dtype` is the master weights'; the tower computes in the precision's dtype.
        let compute = cfg.precision_on(topology.device).compute_dtype(dtype);
        let pb = ParamBuilder::mixed(cfg.seed, compute, dtype, device);
        let encoder = Encoder::new(&pb, model, rank.tower)?;
        // The loss reads its scalars in full precision: no working copies.
        loss_scalars(
            &pb.full_precision(),
            cfg.loss.kind.initial_logit_scale(),
            cfg.loss.kind.initial_logit_bias(),
        )?;
        let params = pb.masters();
        let working = pb.params();
        if let (Tower::Text, Some(dir)) = (rank.tower, &model.pretrained_text) {
            checkpoint::load_hf_bert(&params, &dir.join("model.safetensors"))?;
            params.write_working_copies(&working)?;
        }
        let locked = model.is_locked(rank.tower);
        let trainable = if locked {
            params.filter(is_loss_scalar)
        } else {
            params.clone()
        };
        let tower_working = working.filter(|n| !is_loss_scalar(n) && trainable.get(n).is_some());
        let logit_scale = params.get("logit_scale").expect("registered above").clone();
        let logit_bias = params.get("logit_bias").cloned();
        let size = topology.group_size(rank.tower);
        let local_batch = split_len(cfg.global_batch, size, rank.group_rank);
        let micro_batch = cfg
            .micro_batch
            .of(rank.tower)
            .filter(|&m| m < local_batch && !locked);
        let optimizer = AdamW::with_working_copies(
            &trainable,
            &working,
            AdamWConfig {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        Ok(RankTrainer {
            tower: rank.tower,
            device: device.clone(),
            encoder,
            params,
            trainable,
            tower_working,
            working,
            master: dtype,
            grad_reduce: cfg.grad_all_reduce.dtype(dtype),
            locked,
            checkpointing: cfg.checkpointing,
            sync_batch_norm: model.sync_batch_norm() && rank.tower == Tower::Image,
            logit_scale,
            logit_bias,
            loss: cfg.loss,
            micro_batch,
            grad_clip: cfg.grad_clip,
            optimizer,
            layout: FeatureLayout::new(topology, cfg.global_batch),
            offset: split_offset(cfg.global_batch, size, rank.group_rank),
            local_batch,
        })
    }

    /// Every parameter this rank holds: the master weights.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Bytes this rank keeps across steps: the weights (masters and working copies) and
    /// the optimizer's state.
    pub fn state_bytes(&self) -> StateBytes {
        let copies = self
            .working
            .iter()
            .filter(|(n, w)| self.params.get(n).is_some_and(|m| m.id() != w.id()))
            .map(|(_, w)| w.elem_count() * w.dtype().size_in_bytes())
            .sum::<usize>();
        StateBytes {
            weights: self.params.num_bytes() + copies,
            optimizer: self.optimizer.state_bytes(),
        }
    }

    /// Connects what the model reduces inside its own passes to this rank's group (today:
    /// synchronised batch norm, when the model asks for it). Call once, before training.
    pub fn attach(&mut self, comms: &RankComms) {
        if self.sync_batch_norm {
            self.encoder
                .set_stats_reducer(Arc::new(GroupStats(comms.group_stats.clone())));
        }
    }

    /// The parameters the optimizer updates, in the order of [`StepGrads::grads`].
    pub fn trainable(&self) -> &Params {
        &self.trainable
    }

    pub fn logit_scale(&self) -> Result<f64> {
        Ok(self
            .logit_scale
            .as_tensor()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// Writes this rank's part of a checkpoint: its tower's parameters and the loss's
    /// scalars (OpenCLIP names), batch-norm statistics, and the optimizer's state.
    pub fn save_part(&self, path: &std::path::Path) -> Result<()> {
        let mut extra = self.encoder.buffers()?;
        extra.extend(self.optimizer.state(&self.trainable.names())?);
        checkpoint::save_with_buffers(&self.params, &extra, path)
    }

    /// Restores [`Self::save_part`]'s file: every parameter, statistic and optimizer
    /// moment must be there.
    pub fn load_part(&mut self, path: &std::path::Path) -> Result<()> {
        checkpoint::load(&self.params, path)?;
        self.params.write_working_copies(&self.working)?;
        let tensors = checkpoint::read_tensors(path)?;
        self.encoder.load_buffers(&tensors)?;
        let names = self.trainable.names();
        self.optimizer
            .load_state(&names, &tensors)
            .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))
    }

    /// SigLIP's logit bias (0 for a loss without one).
    pub fn logit_bias(&self) -> Result<f64> {
        match &self.logit_bias {
            Some(b) => Ok(b.as_tensor().to_dtype(DType::F64)?.to_scalar::<f64>()?),
            None => Ok(0.0),
        }
    }

    /// `(start, len)` of each forward pass over the local batch.
    fn micro_batches(&self) -> Vec<(usize, usize)> {
        let step = self.micro_batch.unwrap_or(self.local_batch).max(1);
        (0..self.local_batch)
            .step_by(step)
            .map(|s| (s, step.min(self.local_batch - s)))
            .collect()
    }

    /// The tower's output in the master dtype, L2-normalised there: the features the loss
    /// takes (its gradient flows back through the cast into the compute dtype).
    fn normalise(&self, x: &Tensor) -> Result<Tensor> {
        l2_normalize(&x.to_dtype(self.master)?)
    }

    /// The tower's parameter gradients for `input` with `grad` injected at its normalised
    /// features: one forward with a graph (or with checkpoints) and its backward.
    fn tower_grads(
        &self,
        input: &TowerInput,
        grad: &Tensor,
        tower_params: &Params,
    ) -> Result<Vec<Tensor>> {
        let normalise = |x: &Tensor| self.normalise(x);
        if self.checkpointing {
            let (_, saved) = forward_keeping_block_inputs(&self.encoder, input, normalise)?;
            backward_recomputing(&self.encoder, input, &saved, grad, normalise, tower_params)
        } else {
            let features = self.normalise(&self.encoder.forward(input)?)?;
            let store = (features * grad)?.sum_all()?.backward()?;
            tower_params.grads(&store)
        }
    }

    /// Where this rank's tower gradients (in `tower_params`' order) are zero outside a few
    /// rows: the token table's, outside the rows of this rank's captions' tokens.
    fn sparse_grad_rows(
        &self,
        input: &TowerInput,
        tower_params: &Params,
    ) -> Result<Vec<SparseRows>> {
        let (Some(table), TowerInput::Captions { tokens, .. }) =
            (self.encoder.token_table(), input)
        else {
            return Ok(Vec::new());
        };
        let Some(index) = tower_params.iter().position(|(_, v)| v.id() == table.id()) else {
            return Ok(Vec::new());
        };
        let rows = tokens
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        Ok(vec![SparseRows { index, rows }])
    }

    /// Time since `t` once this rank's device has finished the work queued so far: CUDA
    /// kernels run asynchronously, and a phase's time is when its kernels are done.
    fn elapsed(&self, t: Instant) -> Result<Duration> {
        self.device.synchronize()?;
        Ok(t.elapsed())
    }

    /// Normalised features of `input`, without building a graph (evaluation).
    pub fn encode(&self, input: &TowerInput) -> Result<Tensor> {
        let input = input.to_device(&self.device)?;
        Ok(self
            .normalise(&self.encoder.forward_eval(&input)?)?
            .detach())
    }

    /// Checks that every rank of the group holds bit-identical weights (one checksum per
    /// parameter, all-gathered): data parallelism is only exact if the replicas agree.
    pub fn check_replicas(&self, comms: &RankComms) -> Result<()> {
        let sums: Vec<f64> = self
            .params
            .iter()
            .map(|(_, v)| {
                Ok(v.as_tensor()
                    .to_dtype(DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()?)
            })
            .collect::<Result<_>>()?;
        let n = sums.len();
        let mine = Tensor::from_vec(sums, (1, n), &Device::Cpu)?;
        let all: Vec<Vec<f64>> = comms.group.all_gather(&mine)?.to_vec2()?;
        for (rank, row) in all.iter().enumerate() {
            if let Some(i) = (0..n).find(|&i| row[i].to_bits() != all[0][i].to_bits()) {
                return Err(Error::Msg(format!(
                    "{} group: rank {rank}'s `{}` differs from rank 0's: the replicas did not start identical",
                    self.tower,
                    self.params.names()[i]
                )));
            }
        }
        Ok(())
    }

    /// Forward, exchange, loss, backward and the group reduction: the exact gradient of the
    /// global-batch loss for every parameter this rank holds.
    pub fn compute_grads(&self, comms: &RankComms, input: &TowerInput) -> Result<StepGrads> {
        self.compute_grads_masked(comms, input, None)
    }

    /// Which pairs of the global batch every rank keeps, from each rank's `valid` (a
    /// world all-gather of two u32 per sample: validity and a hash of the sample's key): a
    /// pair stays only if its image and its caption both materialised, and the image and
    /// text ranks must have read the same sample at every position, or the step stops,
    /// naming it. Returns the step's layout, this rank's offset in it, and the local rows
    /// kept.
    fn kept_pairs(
        &self,
        comms: &RankComms,
        read: &Readable,
    ) -> Result<Option<(FeatureLayout, usize, Vec<u32>)>> {
        let valid = read.valid;
        // Bit 0: usable; bit 1: a key to compare. Then the key's hash.
        let mine: Vec<u32> = valid
            .iter()
            .enumerate()
            .flat_map(|(i, &v)| {
                let key = read.keys.get(i);
                let hash = key.map_or(0, |k| {
                    crate::comm::rendezvous::stable_hash(k.as_bytes()) as u32
                });
                [u32::from(v) | u32::from(key.is_some()) << 1, hash]
            })
            .collect();
        let mine = Tensor::from_vec(mine, (valid.len(), 2), &Device::Cpu)?;
        let gathered = comms.world.all_gather(&mine)?;
        let side = |tower| -> Result<Vec<Vec<u32>>> {
            Ok(self.layout.select(&gathered, tower)?.to_vec2::<u32>()?)
        };
        let (image, text) = (side(Tower::Image)?, side(Tower::Text)?);
        if let Some(at) = (0..image.len())
            .find(|&i| image[i][0] & 2 != 0 && text[i][0] & 2 != 0 && image[i][1] != text[i][1])
        {
            let here = if (self.offset..self.offset + self.local_batch).contains(&at) {
                format!(
                    " (this {} rank read `{}`)",
                    self.tower,
                    read.keys[at - self.offset]
                )
            } else {
                String::new()
            };
            return Err(Error::Msg(format!(
                "step {}: the image and text ranks read different samples at position {at} of the \
                 global batch (key hashes {:08x} and {:08x}){here}: every rank must read the same \
                 shards in the same order (the same --shards, with the same contents, on every node)",
                read.step, image[at][1], text[at][1]
            )));
        }
        let pair: Vec<bool> = image
            .iter()
            .zip(&text)
            .map(|(a, b)| a[0] & 1 != 0 && b[0] & 1 != 0)
            .collect();
        let kept = |from: usize, len: usize| pair[from..from + len].iter().filter(|&&p| p).count();
        if kept(0, pair.len()) < 2 {
            return Ok(None);
        }
        let rows: Vec<usize> = self
            .layout
            .slices()
            .iter()
            .map(|&(_, from, len)| kept(from, len))
            .collect();
        let local: Vec<u32> = (0..self.local_batch)
            .filter(|&i| pair[self.offset + i])
            .map(|i| i as u32)
            .collect();
        Ok(Some((
            self.layout.with_rows(&rows),
            kept(0, self.offset),
            local,
        )))
    }

    /// [`Self::compute_grads`] on a batch where some samples could not be read: `read`
    /// marks this rank's usable ones (and carries their keys, which must match the other
    /// modality's). The loss is the exact global loss over the pairs every rank could read;
    /// the others get no gradient.
    pub fn compute_grads_masked(
        &self,
        comms: &RankComms,
        input: &TowerInput,
        read: Option<&Readable>,
    ) -> Result<StepGrads> {
        if input.len()? != self.local_batch {
            return Err(Error::Msg(format!(
                "rank got {} samples, expected its slice of {}",
                input.len()?,
                self.local_batch
            )));
        }
        let mut times = PhaseTimes::default();
        let mut bytes = PhaseBytes::default();
        let t = Instant::now();
        let input = &input.to_device(&self.device)?;
        let checkpointed = self.checkpointing && !self.locked;
        let micro_batches = self.micro_batches();
        let accumulated = micro_batches.len() > 1;
        let (features, saved) = if accumulated {
            // Features only: each micro-batch's graph is dropped as soon as it is done.
            let parts = micro_batches
                .iter()
                .map(|&(start, len)| {
                    let x = self.encoder.forward(&input.narrow(start, len)?)?;
                    Ok(self.normalise(&x)?.detach())
                })
                .collect::<Result<Vec<_>>>()?;
            (Tensor::cat(&parts, 0)?, Vec::new())
        } else if checkpointed {
            forward_keeping_block_inputs(&self.encoder, input, |x: &Tensor| self.normalise(x))?
        } else {
            let features = self.normalise(&self.encoder.forward(input)?)?;
            // A locked tower keeps no graph: its features are constants of the step.
            (
                if self.locked {
                    features.detach()
                } else {
                    features
                },
                Vec::new(),
            )
        };
        times.forward = self.elapsed(t)?;

        let t = Instant::now();
        let before = payload(comms);
        let masked = match read {
            Some(r) => match self.kept_pairs(comms, r)? {
                Some(kept) => Some(kept),
                None => {
                    times.exchange = self.elapsed(t)?;
                    return Ok(StepGrads {
                        loss: f64::NAN,
                        grads: Vec::new(),
                        backward_grad_bytes: 0,
                        times,
                        bytes,
                        skipped: true,
                        grad_norm: f64::NAN,
                    });
                }
            },
            None => None,
        };
        let (layout, offset, kept) = match &masked {
            Some((layout, offset, rows)) => (layout, *offset, Some(rows)),
            None => (&self.layout, self.offset, None),
        };
        let local = match kept {
            Some(rows) => {
                let index = Tensor::from_vec(rows.clone(), rows.len(), features.device())?;
                features.detach().index_select(&index, 0)?
            }
            None => features.detach(),
        };
        let (image, text) = layout.exchange(comms, &local)?;
        let other = match self.tower {
            Tower::Image => text,
            Tower::Text => image,
        };
        bytes.exchange = payload(comms) - before;
        times.exchange = self.elapsed(t)?;

        let t = Instant::now();
        let before = payload(comms);
        let mut out = global_loss(
            comms,
            &self.loss,
            layout,
            &local,
            &other,
            offset,
            LossScalars {
                logit_scale: self.logit_scale()?,
                logit_bias: self.logit_bias()?,
            },
        )?;
        if let Some(rows) = kept {
            // Dropped rows get no gradient.
            let index = Tensor::from_vec(rows.clone(), rows.len(), out.grad.device())?;
            out.grad = features
                .detach()
                .zeros_like()?
                .index_add(&index, &out.grad, 0)?;
        }
        bytes.loss = payload(comms) - before;
        times.loss = self.elapsed(t)?;

        // Backpropagate ∂L/∂features into the tower: d/dθ Σ features ⊙ g = (∂L/∂features)·∂features/∂θ.
        let t = Instant::now();
        let tower_params = &self.tower_working;
        let local = if tower_params.is_empty() {
            Vec::new()
        } else if accumulated {
            let mut sums: Option<Vec<Tensor>> = None;
            for &(start, len) in &micro_batches {
                // Accumulated in the master dtype: bf16 partial sums would round at
                // every micro-batch.
                let grads = self
                    .tower_grads(
                        &input.narrow(start, len)?,
                        &out.grad.narrow(0, start, len)?,
                        tower_params,
                    )?
                    .into_iter()
                    .map(|g| g.to_dtype(self.master))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                sums = Some(match sums {
                    None => grads,
                    Some(acc) => acc
                        .iter()
                        .zip(&grads)
                        .map(|(a, g)| a + g)
                        .collect::<candle_core::Result<_>>()?,
                });
            }
            sums.expect("at least two micro-batches")
        } else if checkpointed {
            backward_recomputing(
                &self.encoder,
                input,
                &saved,
                &out.grad,
                |x: &Tensor| self.normalise(x),
                tower_params,
            )?
        } else {
            let store = (features * out.grad)?.sum_all()?.backward()?;
            tower_params.grads(&store)?
        };
        // Gradients backward gave in another dtype than the master's (the bf16 working
        // copies'): their f32 casts are allocated beside them.
        let backward_grad_bytes = local
            .iter()
            .filter(|g| g.dtype() != self.master)
            .map(|g| g.elem_count() * g.dtype().size_in_bytes())
            .sum();
        times.backward = self.elapsed(t)?;
        // Activations and gradients are all alive here: the step's high-water mark.
        crate::comm::device::sample_memory(&self.device);

        let t = Instant::now();
        let before = payload(comms);
        let sparse = self.sparse_grad_rows(input, tower_params)?;
        // Summed in the all-reduce's dtype, handed on in the master dtype.
        let local = local
            .into_iter()
            .map(|g| g.to_dtype(self.grad_reduce))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut reduced = all_reduce_sum_sparse_rows(comms.group.as_ref(), &local, &sparse)?
            .into_iter()
            .map(|g| g.to_dtype(self.master))
            .collect::<candle_core::Result<Vec<_>>>()?;
        bytes.grad_all_reduce = payload(comms) - before;
        times.grad_all_reduce = self.elapsed(t)?;
        let mut norm = grad_norm(&reduced)?;
        if let Some(max_norm) = self.grad_clip {
            reduced = clip_with_norm(reduced, norm, max_norm)?;
        }
        if !(out.grad_logit_scale.is_finite() && out.grad_logit_bias.is_finite()) {
            norm = f64::NAN;
        }

        let scalar = |v: f64| -> Result<Tensor> {
            Ok(Tensor::new(v, &Device::Cpu)?
                .to_dtype(self.logit_scale.dtype())?
                .to_device(self.logit_scale.device())?)
        };
        let mut reduced = reduced.into_iter();
        let grads = self
            .trainable
            .names()
            .into_iter()
            .map(|n| match n {
                "logit_scale" => scalar(out.grad_logit_scale),
                "logit_bias" => scalar(out.grad_logit_bias),
                _ => Ok(reduced.next().expect("one gradient per tower parameter")),
            })
            .collect::<Result<_>>()?;
        Ok(StepGrads {
            loss: out.loss,
            grads,
            backward_grad_bytes,
            times,
            bytes,
            skipped: false,
            grad_norm: norm,
        })
    }

    /// Applies gradients (as from [`Self::compute_grads`]) and clamps the temperature.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<Duration> {
        let t = Instant::now();
        self.optimizer.step(grads, lr)?;
        if self.logit_scale()? > LOGIT_SCALE_MAX {
            let clamped = Tensor::new(LOGIT_SCALE_MAX, &Device::Cpu)?
                .to_dtype(self.logit_scale.dtype())?
                .to_device(self.logit_scale.device())?;
            self.logit_scale.set(&clamped)?;
        }
        self.elapsed(t)
    }

    /// A whole step; returns the loss and the phase times.
    pub fn step(
        &mut self,
        comms: &RankComms,
        input: &TowerInput,
        read: Option<&Readable>,
        lr: f64,
    ) -> Result<StepOutcome> {
        let mut g = self.compute_grads_masked(comms, input, read)?;
        if g.skipped {
            return Ok(StepOutcome {
                loss: None,
                skipped: Some(SkipReason::UnreadableBatch),
                times: g.times,
                bytes: g.bytes,
                grad_norm: g.grad_norm,
            });
        }
        // One flag over the world: a NaN in one tower's gradients skips the step on both
        // groups, so neither moves without the other.
        let bad = !(g.loss.is_finite() && g.grad_norm.is_finite());
        let flag = Tensor::new(&[f32::from(u8::from(bad))], &Device::Cpu)?;
        if comms.world.all_reduce_sum(&flag)?.to_vec1::<f32>()?[0] > 0.0 {
            return Ok(StepOutcome {
                loss: None,
                skipped: Some(SkipReason::NonFinite { loss: g.loss }),
                times: g.times,
                bytes: g.bytes,
                grad_norm: g.grad_norm,
            });
        }
        g.times.optimizer = self.apply(&g.grads, lr)?;
        Ok(StepOutcome {
            loss: Some(g.loss),
            skipped: None,
            times: g.times,
            bytes: g.bytes,
            grad_norm: g.grad_norm,
        })
    }
}
