//! How a batch splits over the ranks: each group's even split of the global batch, and
//! where every rank's rows sit in the world all-gather of features.

use candle_core::Tensor;

use super::{Topology, Tower};
use crate::error::{Error, Result};

/// One tower a rank holds, and its rows of a world all-gather.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub rank: usize,
    pub tower: Tower,
    pub rows: usize,
}

/// Where each rank's rows sit in the world all-gather, so the gathered tensor can be cut
/// back into `X` and `Y` in global sample order, and gradients sent back to their owners.
/// A rank that holds both towers sends its image rows, then its text rows.
#[derive(Debug, Clone)]
pub struct FeatureLayout {
    /// Every rank's parts, in world order (rank by rank, image before text).
    parts: Vec<Part>,
    /// Ranks in the world.
    world: usize,
    image_order: Vec<usize>,
    text_order: Vec<usize>,
}

impl FeatureLayout {
    /// Rows per rank for a global batch (or any set of samples) of `total` split evenly
    /// over each group; with `total` not divisible, the first ranks get one more.
    pub fn new(topology: &Topology, total: usize) -> Self {
        let parts = topology
            .ranks
            .iter()
            .flat_map(|r| {
                r.roles.iter().map(move |role| Part {
                    rank: r.global,
                    tower: role.tower,
                    rows: split_len(total, topology.group_size(role.tower), role.group_rank),
                })
            })
            .collect();
        FeatureLayout {
            parts,
            world: topology.world_size(),
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

    /// The index in [`Self::parts`] of rank `g`'s part of `tower`.
    fn part(&self, g: usize, tower: Tower) -> Option<usize> {
        self.parts
            .iter()
            .position(|p| p.rank == g && p.tower == tower)
    }

    /// Rows of rank `g`'s part of `tower` (0 when it does not hold the tower).
    pub fn rows(&self, g: usize, tower: Tower) -> usize {
        self.part(g, tower).map_or(0, |i| self.parts[i].rows)
    }

    /// First row of global rank `g`'s `tower` rows within that modality's global order.
    pub fn modality_offset(&self, g: usize, tower: Tower) -> usize {
        self.order(tower)
            .iter()
            .take_while(|&&r| r != g)
            .map(|&r| self.rows(r, tower))
            .sum()
    }

    /// Every rank's parts, in world order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The same parts with other row counts (one per part, in [`Self::parts`]' order): a
    /// step that dropped pairs.
    pub fn with_rows(&self, rows: &[usize]) -> FeatureLayout {
        FeatureLayout {
            parts: self
                .parts
                .iter()
                .zip(rows)
                .map(|(&p, &rows)| Part { rows, ..p })
                .collect(),
            ..self.clone()
        }
    }

    /// Per part, in [`Self::parts`]' order: its tower, its first row within its modality,
    /// and its rows.
    pub fn slices(&self) -> Vec<(Tower, usize, usize)> {
        self.parts
            .iter()
            .map(|p| (p.tower, self.modality_offset(p.rank, p.tower), p.rows))
            .collect()
    }

    /// Rows each global rank contributes to a world collective (all its parts').
    pub fn world_rows(&self) -> Vec<usize> {
        let mut rows = vec![0; self.world];
        for p in &self.parts {
            rows[p.rank] += p.rows;
        }
        rows
    }

    /// The parts of `tower` alone: the layout of a world all-gather of that tower's
    /// features (each rank's rows of it, none where it does not hold the tower), which
    /// [`Self::world_rows`] and [`Self::select`] then read as they read the whole one.
    pub fn only(&self, tower: Tower) -> FeatureLayout {
        FeatureLayout {
            parts: self
                .parts
                .iter()
                .copied()
                .filter(|p| p.tower == tower)
                .collect(),
            ..self.clone()
        }
    }

    /// Where each part's rows start in a world all-gather.
    fn starts(&self) -> Vec<usize> {
        let mut at = 0;
        self.parts
            .iter()
            .map(|p| {
                at += p.rows;
                at - p.rows
            })
            .collect()
    }

    /// All rows of `tower`, in global sample order, from a world all-gather.
    pub fn select(&self, gathered: &Tensor, tower: Tower) -> Result<Tensor> {
        let total: usize = self.parts.iter().map(|p| p.rows).sum();
        if gathered.dim(0)? != total {
            return Err(Error::Msg(format!(
                "gathered {} feature rows, expected {total}",
                gathered.dim(0)?
            )));
        }
        let starts = self.starts();
        let parts: Vec<Tensor> = self
            .order(tower)
            .iter()
            .map(|&g| {
                let i = self.part(g, tower).expect("a group member holds its tower");
                gathered.narrow(0, starts[i], self.parts[i].rows)
            })
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
