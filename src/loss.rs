//! The global-batch CLIP loss under the modality split: all of its distributed maths in one
//! file. `../shared/docs/contrastive-loss-math.md` derives every formula used here.
//!
//! Notation: global batch `B`; normalised image features `X` (rows `i`) and text features
//! `Y` (rows `j`); scale `s = exp(t)`; logits `S = s·X·Yᵀ`; row normalisers
//! `r_i = logsumexp_j S_ij`, column normalisers `c_j = logsumexp_i S_ij`;
//! `L = 1/(2B)·[Σ_i (r_i − S_ii) + Σ_j (c_j − S_jj)]`.
//!
//! Exchange scheme `lse` (no gradient traffic): each rank owns a contiguous slice of rows
//! of its modality and holds, after a world all-gather, all features of the other one. An
//! image rank's block `S_{R_k,:}` has complete row normalisers; the column normalisers are
//! combined inside the image group from per-rank partials (`K·B` floats). With both it has
//! `G = ∂L/∂S = (P + Q − 2I)/(2B)` on its rows and so the complete gradient of its own
//! features. Text ranks do the same on `Sᵀ`: the maths is symmetric, so one function
//! serves both sides.
//!
//! Convention for parameters: every rank's feature gradient is an exact partial derivative
//! of the one global loss, so parameter gradients inside a group are **summed**, not
//! averaged. The temperature's gradient `Σ G∘S` is counted on the image side only.

use candle_core::{DType, Tensor, D};

use crate::comm::RankComms;
use crate::error::{Error, Result};
use crate::topology::{Topology, Tower};

/// What one rank gets from the loss.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The global-batch loss (the same on every rank).
    pub loss: f64,
    /// `∂L/∂(own normalised features)`, `[b, D]`: inject it as the upstream gradient.
    pub grad: Tensor,
    /// `∂L/∂t` for the stored temperature `t` (the same on every rank).
    pub grad_logit_scale: f64,
}

/// Where each rank's rows sit in the world all-gather, so the gathered tensor can be cut
/// back into `X` and `Y` in global sample order.
#[derive(Debug, Clone)]
pub struct FeatureLayout {
    /// Per global rank: its tower and its number of rows.
    ranks: Vec<(Tower, usize)>,
    image_order: Vec<usize>,
    text_order: Vec<usize>,
}

impl FeatureLayout {
    /// Rows per rank for a global batch (or any set of samples) of `total` split evenly
    /// over each group; with `total` not divisible, the first ranks get one more.
    pub fn new(topology: &Topology, total: usize) -> Self {
        let ranks = topology
            .ranks
            .iter()
            .map(|r| {
                (
                    r.tower,
                    split_len(total, topology.group_size(r.tower), r.group_rank),
                )
            })
            .collect();
        FeatureLayout {
            ranks,
            image_order: topology.group(Tower::Image),
            text_order: topology.group(Tower::Text),
        }
    }

    /// All features of `tower`, in global sample order, from a world all-gather.
    fn select(&self, gathered: &Tensor, tower: Tower) -> Result<Tensor> {
        let mut starts = Vec::with_capacity(self.ranks.len());
        let mut at = 0;
        for (_, rows) in &self.ranks {
            starts.push(at);
            at += rows;
        }
        if gathered.dim(0)? != at {
            return Err(Error::Msg(format!(
                "gathered {} feature rows, expected {at}",
                gathered.dim(0)?
            )));
        }
        let order = match tower {
            Tower::Image => &self.image_order,
            Tower::Text => &self.text_order,
        };
        let parts: Vec<Tensor> = order
            .iter()
            .map(|&g| gathered.narrow(0, starts[g], self.ranks[g].1))
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// All-gathers every rank's local features over the world; returns (all image
    /// features, all text features), each in global sample order.
    pub fn exchange(&self, comms: &RankComms, local: &Tensor) -> Result<(Tensor, Tensor)> {
        let gathered = comms.world.all_gather(local)?;
        Ok((
            self.select(&gathered, Tower::Image)?,
            self.select(&gathered, Tower::Text)?,
        ))
    }
}

/// Rows that group rank `rank` of `size` gets out of `total`: even split, remainder first.
pub fn split_len(total: usize, size: usize, rank: usize) -> usize {
    total / size + usize::from(rank < total % size)
}

/// First row of group rank `rank` under [`split_len`].
pub fn split_offset(total: usize, size: usize, rank: usize) -> usize {
    (0..rank).map(|r| split_len(total, size, r)).sum()
}

/// `log Σ exp` along `dim`, stable.
fn logsumexp(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?;
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(dim)?;
    Ok((sum.log()? + max)?.squeeze(dim)?)
}

/// `[rows, cols]` matrix with ones at `(i, offset + i)`: the positive pairs of a row block.
fn positives(
    rows: usize,
    cols: usize,
    offset: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; rows * cols];
    for i in 0..rows {
        m[i * cols + offset + i] = 1.0;
    }
    Ok(Tensor::from_vec(m, (rows, cols), device)?.to_dtype(dtype)?)
}

/// The exact global CLIP loss for one rank, scheme `lse`.
///
/// - `local`: this rank's normalised features `[b, D]` (rows `offset..offset+b` of its
///   modality in the global batch), detached;
/// - `other`: all `B` normalised features of the other modality, in global order;
/// - `logit_scale`: the stored temperature `t`.
///
/// Collectives: one all-gather of `B` floats per rank inside the rank's group, and one
/// world all-reduce of two scalars.
pub fn clip_loss_lse(
    comms: &RankComms,
    local: &Tensor,
    other: &Tensor,
    offset: usize,
    logit_scale: f64,
) -> Result<LossOutput> {
    let (b, _) = local.dims2()?;
    let (batch, _) = other.dims2()?;
    if offset + b > batch {
        return Err(Error::Msg(format!(
            "rows {offset}..{} lie outside a batch of {batch}",
            offset + b
        )));
    }
    let s = logit_scale.exp();
    let inv_2b = 1.0 / (2.0 * batch as f64);

    // This rank's block of logits: its rows against every column.
    let logits = (local.matmul(&other.t()?)? * s)?; // [b, B]
    let own_lse = logsumexp(&logits, 1)?; // complete: the row is local
    let partial_lse = logsumexp(&logits, 0)?; // [B], over this rank's rows only
    let other_lse = logsumexp(&comms.group.all_gather(&partial_lse.unsqueeze(0)?)?, 0)?;

    let eye = positives(b, batch, offset, logits.dtype(), logits.device())?;
    let p = logits.broadcast_sub(&own_lse.unsqueeze(1)?)?.exp()?;
    let q = logits.broadcast_sub(&other_lse.unsqueeze(0)?)?.exp()?;
    let g = (((p + q)? - (&eye * 2.0)?)? * inv_2b)?; // ∂L/∂S on this block

    let grad = (g.matmul(other)? * s)?;
    let positive_logits = (&logits * &eye)?.sum(1)?;
    let loss_part = ((own_lse - positive_logits)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
        * inv_2b;
    // The temperature gradient sums over all of S: count it on one side only.
    let dt_part = match comms.tower {
        Tower::Image => (&g * &logits)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?,
        Tower::Text => 0.0,
    };
    let totals = comms
        .world
        .all_reduce_sum(&Tensor::new(&[loss_part, dt_part], local.device())?)?
        .to_vec1::<f64>()?;
    Ok(LossOutput {
        loss: totals[0],
        grad,
        grad_logit_scale: totals[1],
    })
}

/// The single-device CLIP loss, by plain autograd: the reference the split loss is tested
/// against. `image` and `text` are normalised `[B, D]`; `logit_scale` is `t`.
pub fn clip_loss_reference(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let batch = image.dim(0)?;
    let logits = image
        .matmul(&text.t()?)?
        .broadcast_mul(&logit_scale.exp()?)?;
    let eye = positives(batch, batch, 0, logits.dtype(), logits.device())?;
    let ce = |l: &Tensor| -> Result<Tensor> {
        let logp = candle_nn::ops::log_softmax(l, D::Minus1)?;
        Ok(((logp * &eye)?.sum_all()? * (-1.0 / batch as f64))?)
    };
    Ok(((ce(&logits)? + ce(&logits.t()?)?)? * 0.5)?)
}
