//! How a batch splits over the ranks: each group's even split of the global batch, and
//! where every rank's rows sit in the world all-gather of features.

use candle_core::Tensor;

use super::{Topology, Tower};
use crate::error::{Error, Result};

/// Where each rank's rows sit in the world all-gather, so the gathered tensor can be cut
/// back into `X` and `Y` in global sample order, and gradients sent back to their owners.
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

    fn order(&self, tower: Tower) -> &[usize] {
        match tower {
            Tower::Image => &self.image_order,
            Tower::Text => &self.text_order,
        }
    }

    /// First row of global rank `g` within its modality's global order.
    pub fn modality_offset(&self, g: usize) -> usize {
        let (tower, _) = self.ranks[g];
        self.order(tower)
            .iter()
            .take_while(|&&r| r != g)
            .map(|&r| self.ranks[r].1)
            .sum()
    }

    /// Per global rank: its tower and its number of rows.
    pub fn ranks(&self) -> &[(Tower, usize)] {
        &self.ranks
    }

    /// The same ranks with other row counts (per global rank): a step that dropped pairs.
    pub fn with_rows(&self, rows: &[usize]) -> FeatureLayout {
        FeatureLayout {
            ranks: self
                .ranks
                .iter()
                .zip(rows)
                .map(|(&(tower, _), &r)| (tower, r))
                .collect(),
            image_order: self.image_order.clone(),
            text_order: self.text_order.clone(),
        }
    }

    /// Per global rank: its tower, its first row within its modality, and its rows.
    pub fn slices(&self) -> Vec<(Tower, usize, usize)> {
        (0..self.ranks.len())
            .map(|g| (self.ranks[g].0, self.modality_offset(g), self.ranks[g].1))
            .collect()
    }

    /// Rows each global rank contributes to a world collective.
    pub fn world_rows(&self) -> Vec<usize> {
        self.ranks.iter().map(|(_, rows)| *rows).collect()
    }

    /// All features of `tower`, in global sample order, from a world all-gather.
    pub fn select(&self, gathered: &Tensor, tower: Tower) -> Result<Tensor> {
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
        let parts: Vec<Tensor> = self
            .order(tower)
            .iter()
            .map(|&g| gathered.narrow(0, starts[g], self.ranks[g].1))
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
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
