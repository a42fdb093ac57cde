//! The global-batch contrastive losses under the modality split: all of their distributed
//! maths in one file. `docs/contrastive-loss-math.md` derives every formula.
//!
//! Notation: global batch `B`; normalised image features `X` (rows `i`) and text features
//! `Y` (rows `j`); scale `s = exp(t)`; logits `S = s·X·Yᵀ`.
//! - CLIP: row normalisers `r_i = logsumexp_j S_ij`, column normalisers `c_j`;
//!   `L = 1/(2B)·[Σ_i (r_i − S_ii) + Σ_j (c_j − S_jj)]`, `∂L/∂S = (P + Q − 2I)/(2B)`.
//! - SigLIP: `U = S + β`; `L = 1/B·[Σ_ij softplus(U_ij) − Σ_i U_ii]`, `∂L/∂U = (σ(U) − I)/B`.
//!
//! Both gradients are a smooth part plus a constant on the diagonal. A rank computes the
//! smooth part tile by tile and adds the diagonal from its paired rows, so no rank ever
//! holds more than `b × tile` logits; normalisers come from an online log-sum-exp and the
//! tiles are recomputed for the gradient.
//!
//! Every rank owns a contiguous slice of rows of its modality and, after a world
//! all-gather, holds all features of the other one. A text rank sees `Sᵀ`: the maths is
//! symmetric, so one function serves both sides. A rank holding both towers owns a slice
//! of each and computes both sides ([`Side`]), with one world collective for both. Two exchange schemes:
//! - `lse`: each rank computes the complete gradient of its own features. For CLIP it
//!   needs the other direction's normalisers, combined inside its group from per-rank
//!   partials (`size·B` floats); SigLIP has none. No gradient traffic.
//! - `gather-scatter`: each side computes only its share of the loss (CLIP: image ranks
//!   the image→text rows, text ranks the text→image rows; SigLIP: half of every pair each)
//!   and the gradient of every feature it touched; the gradients of features owned
//!   elsewhere are reduce-scattered back to their owners over the world.
//!
//! Convention for parameters: every rank's feature gradient is an exact partial derivative
//! of the one global loss, so parameter gradients inside a group are **summed**, not
//! averaged. A scalar summed over all of `S` (the temperature's and bias's gradients, the
//! SigLIP loss) is counted once: on the image side, or half on each side.

use std::fmt;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::comm::{Communicator, RankComms};
use crate::error::{Error, Result};
use crate::topology::layout::FeatureLayout;
use crate::topology::Tower;

/// Which contrastive loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Symmetric InfoNCE over the global batch.
    #[default]
    Clip,
    /// Pairwise sigmoid with a learnable bias.
    Siglip,
}

impl LossKind {
    /// The stored temperature `t` at initialisation: OpenCLIP's `ln(1/0.07)` for CLIP,
    /// `ln 10` for SigLIP.
    pub fn initial_logit_scale(self) -> f64 {
        match self {
            LossKind::Clip => 2.659_260_036_932_778,
            LossKind::Siglip => 10f64.ln(),
        }
    }

    /// The learnable logit bias `β` at initialisation, for losses that have one.
    pub fn initial_logit_bias(self) -> Option<f64> {
        match self {
            LossKind::Clip => None,
            LossKind::Siglip => Some(-10.0),
        }
    }
}

impl fmt::Display for LossKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossKind::Clip => "clip",
            LossKind::Siglip => "siglip",
        })
    }
}

/// How the ranks of the two groups share the loss's work and gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Exchange {
    /// Normaliser partials inside each group; no gradient traffic.
    #[default]
    Lse,
    /// Gradients of features owned elsewhere reduce-scattered back over the world.
    GatherScatter,
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Exchange::Lse => "lse",
            Exchange::GatherScatter => "gather-scatter",
        })
    }
}

/// Columns per tile of logits: `"auto"` (from [`LossConfig::tile_memory_mib`]), `"none"`
/// (one `b × B` block, as OpenCLIP's local loss), or a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TileSize {
    #[default]
    Auto,
    Untiled,
    Columns(usize),
}

impl<'de> Deserialize<'de> for TileSize {
    fn deserialize<De: serde::Deserializer<'de>>(de: De) -> std::result::Result<Self, De::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = TileSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\", \"none\" or a number of columns of at least 1")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<TileSize, E> {
                if v < 1 {
                    return Err(E::custom(format!("a tile of {v} columns: use at least 1")));
                }
                Ok(TileSize::Columns(v as usize))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<TileSize, E> {
                self.visit_i64(v as i64)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<TileSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        de.deserialize_any(Visitor)
    }
}

impl Serialize for TileSize {
    fn serialize<Se: serde::Serializer>(&self, se: Se) -> std::result::Result<Se::Ok, Se::Error> {
        match self {
            TileSize::Columns(c) => se.serialize_u64(*c as u64),
            named => se.serialize_str(&named.to_string()),
        }
    }
}

impl std::str::FromStr for TileSize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(TileSize::Auto),
            "none" => Ok(TileSize::Untiled),
            n => match n.parse::<usize>() {
                Ok(c) if c >= 1 => Ok(TileSize::Columns(c)),
                _ => Err(format!(
                    "tile `{s}`: expected \"auto\", \"none\" or a number of columns of at least 1"
                )),
            },
        }
    }
}

impl fmt::Display for TileSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TileSize::Auto => f.write_str("auto"),
            TileSize::Untiled => f.write_str("none"),
            TileSize::Columns(c) => write!(f, "{c}"),
        }
    }
}

/// The `[loss]` section of a training config.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub kind: LossKind,
    pub exchange: Exchange,
    pub tile: TileSize,
    /// Budget for one tile's logits and their temporaries when `tile = "auto"`.
    pub tile_memory_mib: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: LossKind::Clip,
            exchange: Exchange::Lse,
            tile: TileSize::Auto,
            tile_memory_mib: 256.0,
        }
    }
}

/// Live `rows × tile` blocks while a tile is processed (logits, two exponentials, their
/// gradient): what the automatic tile size budgets for.
pub const TILE_BLOCKS: usize = 4;

impl LossConfig {
    /// Columns per tile for a rank with `rows` own rows against `columns` columns.
    pub fn tile_columns(&self, rows: usize, columns: usize, elem_bytes: usize) -> usize {
        let want = match self.tile {
            TileSize::Untiled => columns,
            TileSize::Columns(c) => c,
            TileSize::Auto => {
                let budget = self.tile_memory_mib * (1 << 20) as f64;
                let per_column = (TILE_BLOCKS * rows.max(1) * elem_bytes) as f64;
                // Multiples of 64 keep the matrix products on whole SIMD panels.
                let fit = (budget / per_column) as usize;
                (fit / 64 * 64).max(64)
            }
        };
        want.clamp(1, columns.max(1))
    }
}

/// The loss's learnable scalars, replicated on every rank.
#[derive(Debug, Clone, Copy)]
pub struct LossScalars {
    /// The stored temperature `t`; the scale is `exp(t)`.
    pub logit_scale: f64,
    /// SigLIP's bias `β` (ignored by CLIP).
    pub logit_bias: f64,
}

/// One tower's side of the loss on a rank: its own rows and the other modality's whole
/// batch. A rank that holds both towers has two sides, image first.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    /// This rank's normalised features of the tower, `[b, D]`, detached: rows
    /// `offset..offset+b` of the modality in the global batch.
    pub local: &'a Tensor,
    /// All `B` normalised features of the other modality, in global order.
    pub other: &'a Tensor,
    pub offset: usize,
}

/// What one rank gets from the loss.
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The global-batch loss (the same on every rank).
    pub loss: f64,
    /// Per side: `∂L/∂(own normalised features)`, `[b, D]`: inject it as the upstream
    /// gradient.
    pub grads: Vec<Tensor>,
    /// `∂L/∂t` (the same on every rank).
    pub grad_logit_scale: f64,
    /// `∂L/∂β` (the same on every rank; 0 for CLIP).
    pub grad_logit_bias: f64,
}

/// All-gathers every rank's local features over the world; returns (all image features,
/// all text features), each in global sample order.
pub fn exchange_features(
    world: &dyn Communicator,
    layout: &FeatureLayout,
    local: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let gathered = world.all_gather_rows(local, &layout.world_rows())?;
    Ok((
        layout.select(&gathered, Tower::Image)?,
        layout.select(&gathered, Tower::Text)?,
    ))
}

/// All-gathers every rank's features of one tower over the world (`local`: this rank's
/// rows of it, none where it does not hold the tower); returns all of that tower's
/// features in global sample order. Two of these, image then text, equal one
/// [`exchange_features`] bit for bit; they let a rank that holds both towers gather its
/// image features while its text forward runs.
pub fn gather_tower_features(
    world: &dyn Communicator,
    layout: &FeatureLayout,
    tower: Tower,
    local: &Tensor,
) -> Result<Tensor> {
    let only = layout.only(tower);
    let gathered = world.all_gather_rows(local, &only.world_rows())?;
    only.select(&gathered, tower)
}

/// Sends each side's `partial` (`[B, D]`: its gradient contributions for every feature of
/// the other modality) to the features' owners over the world, in one reduce-scatter;
/// returns, per side, the sum of the other modality's contributions for this rank's own
/// rows of that side.
fn return_gradients(
    world: &dyn Communicator,
    layout: &FeatureLayout,
    sides: &[(Tower, &Tensor)],
) -> Result<Vec<Tensor>> {
    let (_, dim) = sides[0].1.dims2()?;
    let (dtype, device) = (sides[0].1.dtype(), sides[0].1.device());
    // The rows of a part of tower T come from this rank's side of the other tower, which
    // holds gradients for every T feature.
    let blocks: Vec<Tensor> = layout
        .parts()
        .iter()
        .map(
            |p| match sides.iter().find(|(tower, _)| *tower != p.tower) {
                Some((_, partial)) => {
                    Ok(partial.narrow(0, layout.modality_offset(p.rank, p.tower), p.rows)?)
                }
                None => Ok(Tensor::zeros((p.rows, dim), dtype, device)?),
            },
        )
        .collect::<Result<_>>()?;
    let mine = world.reduce_scatter_rows_sum(&Tensor::cat(&blocks, 0)?, &layout.world_rows())?;
    // This rank's rows come back as its parts, image first: one per side.
    let me = world.rank();
    let mut at = 0;
    sides
        .iter()
        .map(|(tower, _)| {
            let rows = layout.rows(me, *tower);
            at += rows;
            Ok(mine.narrow(0, at - rows, rows)?)
        })
        .collect()
}

fn to_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `log Σ exp` along `dim`, stable.
fn logsumexp(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?;
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(dim)?;
    Ok((sum.log()? + max)?.squeeze(dim)?)
}

/// `log(1 + eˣ)` without overflow: `max(x, 0) + log(1 + e^−|x|)`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// One rank's rows of logits, `S = s·own·otherᵀ` (`[b, B]`), never held whole: the
/// positive of own row `i` is column `offset + i`.
struct Block<'a> {
    own: &'a Tensor,
    other: &'a Tensor,
    offset: usize,
    scale: f64,
    tile: usize,
    /// The logits of the normaliser pass when they are one tile: the gradient pass then
    /// reuses them instead of recomputing (the tile fits the budget either way).
    kept: std::cell::RefCell<Option<Tensor>>,
}

/// The gradient sums of one block, with the scale `s` applied.
struct BlockGrads {
    /// `∂/∂own`, `[b, D]`.
    own: Tensor,
    /// `∂/∂other`, `[B, D]`, when asked for.
    other: Option<Tensor>,
    /// `Σ G∘S`: the temperature's gradient from this block.
    g_dot_logits: f64,
    /// `Σ G`: the bias's gradient from this block.
    g_sum: f64,
}

impl Block<'_> {
    fn columns(&self) -> Result<usize> {
        Ok(self.other.dim(0)?)
    }

    /// `(start, len)` of each column tile.
    fn tiles(&self) -> Result<Vec<(usize, usize)>> {
        let n = self.columns()?;
        Ok((0..n)
            .step_by(self.tile)
            .map(|c| (c, self.tile.min(n - c)))
            .collect())
    }

    fn logits(&self, start: usize, len: usize) -> Result<Tensor> {
        if let Some(kept) = self.kept.borrow_mut().take() {
            return Ok(kept);
        }
        let cols = self.other.narrow(0, start, len)?;
        Ok((self.own.matmul(&cols.t()?)? * self.scale)?)
    }

    /// `S_{i, offset+i}` for every own row, `[b]`.
    fn positive_logits(&self) -> Result<Tensor> {
        let b = self.own.dim(0)?;
        let partners = self.other.narrow(0, self.offset, b)?;
        Ok(((self.own * partners)?.sum(1)? * self.scale)?)
    }

    /// Row normalisers `[b]` (complete: the rows are local) and the column normalisers'
    /// partials over these rows only `[B]`, by an online log-sum-exp over the tiles.
    fn normalisers(&self) -> Result<(Tensor, Tensor)> {
        let b = self.own.dim(0)?;
        let (dtype, device) = (self.own.dtype(), self.own.device());
        if b == 0 {
            // A rank that could read none of its slice: no rows, and every column's
            // partial over no rows is log 0 (candle reduces no empty tensor).
            let columns = self.columns()?;
            return Ok((
                Tensor::zeros(0, dtype, device)?,
                Tensor::full(f64::NEG_INFINITY, columns, device)?.to_dtype(dtype)?,
            ));
        }
        let mut max = Tensor::full(f64::NEG_INFINITY, (b, 1), device)?.to_dtype(dtype)?;
        let mut sum = Tensor::zeros((b, 1), dtype, device)?;
        let mut column_parts = Vec::new();
        for (start, len) in self.tiles()? {
            let s = self.logits(start, len)?;
            let new_max = max.maximum(&s.max_keepdim(1)?)?;
            let tile_sum = s.broadcast_sub(&new_max)?.exp()?.sum_keepdim(1)?;
            sum = ((sum * (max - &new_max)?.exp()?)? + tile_sum)?;
            max = new_max;
            column_parts.push(logsumexp(&s, 0)?);
            if len == self.columns()? {
                *self.kept.borrow_mut() = Some(s);
            }
        }
        let rows = (sum.log()? + max)?.squeeze(1)?;
        Ok((rows, Tensor::cat(&column_parts, 0)?))
    }

    /// Recomputes every tile, takes the gradient's smooth part `smooth(S_tile, start,
    /// len)` plus `−diagonal` at each positive pair, and accumulates `∂L/∂own` (and
    /// `∂L/∂other` with `with_other`).
    fn backward(
        &self,
        smooth: &mut dyn FnMut(&Tensor, usize, usize) -> Result<Tensor>,
        diagonal: f64,
        with_other: bool,
    ) -> Result<BlockGrads> {
        let (b, dim) = self.own.dims2()?;
        let mut own = Tensor::zeros((b, dim), self.own.dtype(), self.own.device())?;
        let mut other_parts = Vec::new();
        let (mut g_dot_logits, mut g_sum) = (0.0, 0.0);
        for (start, len) in self.tiles()? {
            let s = self.logits(start, len)?;
            let g = smooth(&s, start, len)?;
            own = (own + g.matmul(&self.other.narrow(0, start, len)?)?)?;
            if with_other {
                other_parts.push(g.t()?.matmul(self.own)?);
            }
            g_dot_logits += to_f64(&(&g * &s)?.sum_all()?)?;
            g_sum += to_f64(&g.sum_all()?)?;
        }
        // The diagonal: G_{i, offset+i} −= diagonal.
        let partners = self.other.narrow(0, self.offset, b)?;
        let own = ((own - (partners * diagonal)?)? * self.scale)?;
        let other = if with_other {
            let all = Tensor::cat(&other_parts, 0)?;
            let n = all.dim(0)?;
            let end = self.offset + b;
            let fixed = (all.narrow(0, self.offset, b)? - (self.own * diagonal)?)?;
            let pieces = [
                all.narrow(0, 0, self.offset)?,
                fixed,
                all.narrow(0, end, n - end)?,
            ];
            Some((Tensor::cat(&pieces, 0)? * self.scale)?)
        } else {
            None
        };
        g_dot_logits -= diagonal * to_f64(&self.positive_logits()?.sum_all()?)?;
        g_sum -= diagonal * b as f64;
        Ok(BlockGrads {
            own,
            other,
            g_dot_logits,
            g_sum,
        })
    }
}

/// The exact global loss for one rank, over each of its sides (one per tower it holds,
/// in `comms.groups`' order: image first).
///
/// Collectives: under `lse` with CLIP, an all-gather of `B` floats per rank inside each
/// side's group; under `gather-scatter`, one world reduce-scatter of `B·D` gradient
/// elements; always one world all-reduce of three scalars (whatever the number of sides).
pub fn global_loss(
    comms: &RankComms,
    cfg: &LossConfig,
    layout: &FeatureLayout,
    sides: &[Side],
    scalars: LossScalars,
) -> Result<LossOutput> {
    if sides.len() != comms.groups.len() || sides.is_empty() {
        return Err(Error::Msg(format!(
            "{} loss sides for a rank that holds {} towers",
            sides.len(),
            comms.groups.len()
        )));
    }
    let mut own = Vec::with_capacity(sides.len());
    let mut partials = Vec::new();
    let mut totals = [0.0; 3];
    for (side, group) in sides.iter().zip(&comms.groups) {
        let part = side_loss(group.comm.as_ref(), group.tower, cfg, side, scalars)?;
        own.push(part.own);
        if let Some(other) = part.other {
            partials.push((group.tower, other));
        }
        for (t, v) in totals.iter_mut().zip(part.totals) {
            *t += v;
        }
    }
    let grads = if partials.is_empty() {
        own
    } else {
        let sides: Vec<(Tower, &Tensor)> = partials.iter().map(|(t, p)| (*t, p)).collect();
        let returned = return_gradients(comms.world.as_ref(), layout, &sides)?;
        own.iter()
            .zip(returned)
            .map(|(g, r)| Ok((g + r)?))
            .collect::<Result<_>>()?
    };
    let totals = comms
        .world
        .all_reduce_sum(&Tensor::new(&totals, &Device::Cpu)?)?
        .to_vec1::<f64>()?;
    Ok(LossOutput {
        loss: totals[0],
        grads,
        grad_logit_scale: totals[1],
        grad_logit_bias: match cfg.kind {
            LossKind::Clip => 0.0,
            LossKind::Siglip => totals[2],
        },
    })
}

/// One side's part of the loss, before anything crosses the world.
struct SideLoss {
    /// `∂/∂own`, `[b, D]`.
    own: Tensor,
    /// Under `gather-scatter`: this side's contributions to the other modality's
    /// gradients, `[B, D]`.
    other: Option<Tensor>,
    /// This side's share of the loss, of `Σ G∘S` and of `Σ G` (summed over the world).
    totals: [f64; 3],
}

/// The loss's work for one tower's rows on this rank; `group` is that tower's group.
fn side_loss(
    group: &dyn Communicator,
    tower: Tower,
    cfg: &LossConfig,
    side: &Side,
    scalars: LossScalars,
) -> Result<SideLoss> {
    let (local, other, offset) = (side.local, side.other, side.offset);
    let (b, _) = local.dims2()?;
    let (batch, _) = other.dims2()?;
    if offset + b > batch {
        return Err(Error::Msg(format!(
            "rows {offset}..{} lie outside a batch of {batch}",
            offset + b
        )));
    }
    let block = Block {
        own: local,
        other,
        offset,
        scale: scalars.logit_scale.exp(),
        tile: cfg.tile_columns(b, batch, local.dtype().size_in_bytes()),
        kept: Default::default(),
    };
    let image_side = tower == Tower::Image;
    let gather_scatter = cfg.exchange == Exchange::GatherScatter;
    let with_other = gather_scatter;
    let n = batch as f64;

    // Each arm gives this rank's gradient sums, its share of the loss, and how much of the
    // block's `Σ G∘S` and `Σ G` belong to it (once over the world).
    let (grads, loss_part, scalar_share) = match cfg.kind {
        LossKind::Clip => {
            let alpha = 1.0 / (2.0 * n);
            let (own_lse, partial_lse) = block.normalisers()?;
            let loss_part = alpha
                * (to_f64(&own_lse.sum_all()?)? - to_f64(&block.positive_logits()?.sum_all()?)?);
            let own_lse = own_lse.unsqueeze(1)?;
            match cfg.exchange {
                Exchange::Lse => {
                    // One row a rank, known to all: no row counts to exchange first.
                    let rows = vec![1; group.size()];
                    let partials = group.all_gather_rows(&partial_lse.unsqueeze(0)?, &rows)?;
                    let other_lse = logsumexp(&partials, 0)?;
                    let grads = block.backward(
                        &mut |s, start, len| {
                            let p = s.broadcast_sub(&own_lse)?.exp()?;
                            let cols = other_lse.narrow(0, start, len)?.unsqueeze(0)?;
                            let q = s.broadcast_sub(&cols)?.exp()?;
                            Ok(((p + q)? * alpha)?)
                        },
                        2.0 * alpha,
                        false,
                    )?;
                    (grads, loss_part, if image_side { 1.0 } else { 0.0 })
                }
                Exchange::GatherScatter => {
                    let grads = block.backward(
                        &mut |s, _, _| Ok((s.broadcast_sub(&own_lse)?.exp()? * alpha)?),
                        alpha,
                        with_other,
                    )?;
                    (grads, loss_part, 1.0)
                }
            }
        }
        LossKind::Siglip => {
            // Under `lse` each side takes the whole gradient of its own features and the
            // image side the scalars; under `gather-scatter` each side takes half of all.
            let (weight, loss_share) = match (cfg.exchange, image_side) {
                (Exchange::Lse, true) => (1.0, 1.0),
                (Exchange::Lse, false) => (1.0, 0.0),
                (Exchange::GatherScatter, _) => (0.5, 0.5),
            };
            let bias = scalars.logit_bias;
            let mut softplus_sum = 0.0;
            let grads = block.backward(
                &mut |s, _, _| {
                    let u = (s + bias)?;
                    if loss_share != 0.0 {
                        softplus_sum += to_f64(&softplus(&u)?.sum_all()?)?;
                    }
                    Ok((candle_nn::ops::sigmoid(&u)? * (weight / n))?)
                },
                weight / n,
                with_other,
            )?;
            let positives = to_f64(&block.positive_logits()?.sum_all()?)? + bias * b as f64;
            let loss_part = loss_share * (softplus_sum - positives) / n;
            (
                grads,
                loss_part,
                if gather_scatter { 1.0 } else { loss_share },
            )
        }
    };

    Ok(SideLoss {
        own: grads.own,
        other: grads.other,
        totals: [
            loss_part,
            scalar_share * grads.g_dot_logits,
            scalar_share * grads.g_sum,
        ],
    })
}

/// `[rows, cols]` matrix with ones at `(i, offset + i)`: the positive pairs of a row block.
fn positives(
    rows: usize,
    cols: usize,
    offset: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; rows * cols];
    for i in 0..rows {
        m[i * cols + offset + i] = 1.0;
    }
    Ok(Tensor::from_vec(m, (rows, cols), device)?.to_dtype(dtype)?)
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

/// The single-device SigLIP loss by plain autograd, written as the paper writes it:
/// `−1/B · Σ_ij log σ(z_ij · (s·x_i·y_j + β))` with `z = 2I − 1`.
pub fn siglip_loss_reference(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Result<Tensor> {
    let batch = image.dim(0)?;
    let logits = image
        .matmul(&text.t()?)?
        .broadcast_mul(&logit_scale.exp()?)?
        .broadcast_add(logit_bias)?;
    let eye = positives(batch, batch, 0, logits.dtype(), logits.device())?;
    let signs = ((eye * 2.0)? - 1.0)?;
    // −log σ(v) = log(1 + e^−v)
    let nll = ((logits * signs)?.neg()?.exp()? + 1.0)?.log()?;
    Ok((nll.sum_all()? * (1.0 / batch as f64))?)
}
