//! One rank's trainer: a replica of each tower it holds ([`TowerTrainer`]: master weights
//! and, under mixed precision, their working copies, the loss's scalars, the optimizer,
//! and its place in the global batch). The step itself is in [`super::step`].
//!
//! A rank that holds both towers keeps the loss's scalars twice, once beside each tower:
//! both copies get the same gradient (summed over the world) and the same update, so they
//! stay bit-identical, and each tower's checkpoint part stays whole on its own.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::TrainConfig;
use super::optim::{AdamW, AdamWConfig};
use crate::comm::{Communicator, GroupComms, RankComms, SparseRows};
use crate::error::{Error, Result};
use crate::loss::LossConfig;
use crate::model::checkpointing::{backward_recomputing, forward_keeping_block_inputs};
use crate::model::layers::l2_normalize;
use crate::model::resnet::StatsReducer;
use crate::model::{
    checkpoint, loss_scalars, ClipConfig, Encoder, LossScalarVars, ParamBuilder, Params, TowerInput,
};
use crate::topology::layout::{split_len, split_offset, FeatureLayout};
use crate::topology::{LayoutKind, Role, Topology, Tower};

/// Bytes a rank keeps from step to step ([`RankTrainer::state_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateBytes {
    /// Master weights, and the working copies under mixed precision.
    pub weights: usize,
    /// The optimizer's moments.
    pub optimizer: usize,
}

/// Batch-norm statistics summed over the rank's group.
struct GroupStats(Arc<dyn Communicator + Sync>);

impl StatsReducer for GroupStats {
    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        self.0.all_reduce_sum(t)
    }
}

/// One rank's replicas: one per tower it holds, image first.
pub struct RankTrainer {
    pub towers: Vec<TowerTrainer>,
    /// Where this rank's weights live and its steps run.
    pub(super) device: Device,
    pub(super) loss: LossConfig,
    /// Where every rank's rows sit in the world all-gather.
    pub(super) layout: FeatureLayout,
    /// Gather the features one tower at a time, the image's while a rank that holds both
    /// runs its text forward: `feature_overlap`, and some rank holds both (decided from
    /// the config and the layout, alike on every rank: each makes the same world calls).
    pub(super) gather_per_tower: bool,
}

/// A replica of one tower on a rank.
pub struct TowerTrainer {
    pub tower: Tower,
    /// Where this rank's weights live and its steps run.
    pub(super) device: Device,
    pub(super) encoder: Encoder,
    /// The tower's parameters and `logit_scale`, sorted by name: the master weights.
    pub(super) params: Params,
    /// What the optimizer updates: the tower's parameters (unless it is locked) and the
    /// loss's scalars, sorted by name.
    pub(super) trainable: Params,
    /// The variables the tower reads, of the trained tower parameters (the working copies
    /// under mixed precision; `trainable`'s own otherwise), in `trainable`'s order: what
    /// backward gives gradients for.
    pub(super) tower_working: Params,
    /// Every working variable, by name (for writing them after a checkpoint load).
    pub(super) working: Params,
    /// The master weights' dtype: features, the loss and the optimizer's gradients.
    pub(super) master: DType,
    /// What the gradient all-reduce sums in.
    pub(super) grad_reduce: DType,
    pub(super) locked: bool,
    pub(super) checkpointing: bool,
    /// Sum the gradients over the group in buckets while backward runs
    /// (`comm::overlap`): asked for, and the group has two ranks or more to sum over.
    pub(super) overlap: bool,
    /// Bytes per overlapped bucket.
    pub(super) bucket_bytes: usize,
    pub(super) sync_batch_norm: bool,
    /// The loss's temperature and bias: how they were built says they are not the tower's.
    pub(super) scalars: LossScalarVars,
    /// Samples per forward pass when smaller than the local batch (GradCache).
    pub(super) micro_batch: Option<usize>,
    pub(super) grad_clip: Option<f64>,
    pub(super) optimizer: AdamW,
    /// This rank's rows of the global batch.
    pub offset: usize,
    pub local_batch: usize,
}

impl RankTrainer {
    /// Builds the towers `global_rank` holds. Every rank of a group draws the same weights
    /// from the same seed (and the same as a single-device model with that seed would).
    pub fn new(
        topology: &Topology,
        global_rank: usize,
        model: &ClipConfig,
        cfg: &TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let towers = topology.ranks[global_rank]
            .roles
            .iter()
            .map(|role| TowerTrainer::new(topology, *role, model, cfg, dtype, device))
            .collect::<Result<_>>()?;
        Ok(RankTrainer {
            towers,
            device: device.clone(),
            loss: cfg.loss,
            layout: FeatureLayout::new(topology, cfg.global_batch),
            gather_per_tower: cfg.feature_overlap && topology.layout_kind() != LayoutKind::Split,
        })
    }

    /// This rank's replica of `tower`, if it holds one.
    pub fn tower(&self, tower: Tower) -> Option<&TowerTrainer> {
        self.towers.iter().find(|t| t.tower == tower)
    }

    /// What the rank holds: "image", "text" or "image+text".
    pub fn label(&self) -> String {
        let names: Vec<&str> = self.towers.iter().map(|t| t.tower.name()).collect();
        names.join("+")
    }

    /// Bytes this rank keeps across steps, over its towers.
    pub fn state_bytes(&self) -> StateBytes {
        self.towers.iter().fold(
            StateBytes {
                weights: 0,
                optimizer: 0,
            },
            |acc, t| {
                let b = t.state_bytes();
                StateBytes {
                    weights: acc.weights + b.weights,
                    optimizer: acc.optimizer + b.optimizer,
                }
            },
        )
    }

    /// Connects what each tower reduces inside its own passes to that tower's group.
    /// Call once, before training.
    pub fn attach(&mut self, comms: &RankComms) -> Result<()> {
        for t in &mut self.towers {
            t.attach(comms.group(t.tower)?);
        }
        Ok(())
    }

    /// The loss's temperature `t` (the same in every replica).
    pub fn logit_scale(&self) -> Result<f64> {
        self.towers[0].logit_scale()
    }

    /// SigLIP's logit bias (0 for a loss without one).
    pub fn logit_bias(&self) -> Result<f64> {
        self.towers[0].logit_bias()
    }

    /// Checks every tower's replicas against the rest of its group.
    pub fn check_replicas(&self, comms: &RankComms) -> Result<()> {
        for t in &self.towers {
            t.check_replicas(comms.group(t.tower)?.comm.as_ref())?;
        }
        Ok(())
    }
}

impl TowerTrainer {
    /// Builds one tower's replica for the rank with `role` in its group.
    fn new(
        topology: &Topology,
        role: Role,
        model: &ClipConfig,
        cfg: &TrainConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // `dtype` is the master weights'; the tower computes in the precision's dtype.
        let compute = cfg.precision_on(topology.device).compute_dtype(dtype);
        let pb = ParamBuilder::mixed(cfg.seed, compute, dtype, device);
        let encoder = Encoder::new(&pb, model, role.tower)?;
        // Everything built so far is the tower's: what `Encoder::new` registered.
        let tower_masters = pb.masters();
        // The loss reads its scalars in full precision: no working copies.
        let scalars = loss_scalars(
            &pb.full_precision(),
            cfg.loss.kind.initial_logit_scale(),
            cfg.loss.kind.initial_logit_bias(),
        )?;
        let params = pb.masters();
        let working = pb.params();
        if let (Tower::Text, Some(dir)) = (role.tower, &model.pretrained_text) {
            checkpoint::load_hf_bert(&params, &dir.join("model.safetensors"))?;
            params.write_working_copies(&working)?;
        }
        let locked = model.is_locked(role.tower);
        let trainable = if locked {
            params.without(&tower_masters)
        } else {
            params.clone()
        };
        // The working variables of the trained tower parameters, in `trainable`'s order.
        let tower_working = working.filter(|n| !locked && tower_masters.get(n).is_some());
        let size = topology.group_size(role.tower);
        let local_batch = split_len(cfg.global_batch, size, role.group_rank);
        let micro_batch = cfg
            .micro_batch
            .of(role.tower)
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
        Ok(TowerTrainer {
            tower: role.tower,
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
            // GradCache sums its micro-batches' gradients first: one sum after backward.
            // Decided from the config, not from this rank's slice (a rank whose slice is
            // no larger than the micro-batch runs whole): every rank of the group must
            // make the same collectives.
            overlap: cfg.grad_overlap
                && size > 1
                && !locked
                && cfg.micro_batch.of(role.tower).is_none(),
            bucket_bytes: (cfg.grad_bucket_mb * 1e6) as usize,
            sync_batch_norm: model.sync_batch_norm() && role.tower == Tower::Image,
            scalars,
            micro_batch,
            grad_clip: cfg.grad_clip,
            optimizer,
            offset: split_offset(cfg.global_batch, size, role.group_rank),
            local_batch,
        })
    }

    /// Every parameter of this replica: the master weights.
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

    /// Connects what the model reduces inside its own passes to the tower's group (today:
    /// synchronised batch norm, when the model asks for it).
    fn attach(&mut self, group: &GroupComms) {
        // Synchronised batch norm reduces inside backward: under a backend whose
        // collectives hold each other, the overlapped sums could wait for it while it
        // waits for them.
        if self.sync_batch_norm && group.comm.serialises_collectives() {
            self.overlap = false;
        }
        if self.sync_batch_norm {
            self.encoder
                .set_stats_reducer(Arc::new(GroupStats(group.stats.clone())));
        }
    }

    /// The parameters the optimizer updates, in the order of [`StepGrads::grads`].
    pub fn trainable(&self) -> &Params {
        &self.trainable
    }

    pub fn logit_scale(&self) -> Result<f64> {
        Ok(self
            .scalars
            .scale
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
            .map_err(|e| Error::File {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    /// SigLIP's logit bias (0 for a loss without one).
    pub fn logit_bias(&self) -> Result<f64> {
        match &self.scalars.bias {
            Some(b) => Ok(b.as_tensor().to_dtype(DType::F64)?.to_scalar::<f64>()?),
            None => Ok(0.0),
        }
    }

    /// `(start, len)` of each forward pass over the local batch.
    pub(super) fn micro_batches(&self) -> Vec<(usize, usize)> {
        let step = self.micro_batch.unwrap_or(self.local_batch).max(1);
        (0..self.local_batch)
            .step_by(step)
            .map(|s| (s, step.min(self.local_batch - s)))
            .collect()
    }

    /// The tower's output in the master dtype, L2-normalised there: the features the loss
    /// takes (its gradient flows back through the cast into the compute dtype).
    pub(super) fn normalise(&self, x: &Tensor) -> Result<Tensor> {
        l2_normalize(&x.to_dtype(self.master)?)
    }

    /// The tower's parameter gradients for `input` with `grad` injected at its normalised
    /// features: one forward with a graph (or with checkpoints) and its backward.
    pub(super) fn tower_grads(
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

    /// Where the token table is in `tower_params`, when the tower looks tokens up and
    /// trains its table: the one gradient that is zero outside a few rows.
    pub(super) fn token_table_index(
        &self,
        input: &TowerInput,
        tower_params: &Params,
    ) -> Option<usize> {
        let table = self.encoder.token_table()?;
        if !matches!(input, TowerInput::Captions { .. }) {
            return None;
        }
        tower_params.iter().position(|(_, v)| v.id() == table.id())
    }

    /// Where this rank's tower gradients (in `tower_params`' order) are zero outside a few
    /// rows: the token table's, outside the rows of this rank's captions' tokens.
    pub(super) fn sparse_grad_rows(
        &self,
        input: &TowerInput,
        tower_params: &Params,
    ) -> Result<Vec<SparseRows>> {
        let (Some(index), TowerInput::Captions { tokens, .. }) =
            (self.token_table_index(input, tower_params), input)
        else {
            return Ok(Vec::new());
        };
        let rows = tokens
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        Ok(vec![SparseRows { index, rows }])
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
    pub fn check_replicas(&self, group: &dyn Communicator) -> Result<()> {
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
        let all: Vec<Vec<f64>> = group.all_gather(&mine)?.to_vec2()?;
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
}
