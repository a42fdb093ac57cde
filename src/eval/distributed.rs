//! Evaluation during training, over the ranks: each encodes its share of the held-out
//! pairs with its own tower, world rank 0 gathers the features and scores them.

use candle_core::{DType, Device, Tensor};

use super::retrieval::{RetrievalScores, RetrievalSet};
use super::zero_shot::{class_features, zero_shot_scores, ZeroShotScores, ZeroShotSet};
use super::EvalScores;
use crate::comm::RankComms;
use crate::data::HeldOut;
use crate::error::Result;
use crate::loss::exchange_features;
use crate::model::TowerInput;
use crate::topology::layout::{split_len, split_offset, FeatureLayout};
use crate::topology::{Topology, Tower};

/// Each rank encodes its share of `pairs` held-out pairs with `encode` (a tower it holds,
/// and that tower's normalised features, without a graph), for every tower it holds; the
/// first text rank encodes the zero-shot classes; world rank 0 gathers everything and
/// scores it. Other ranks return `None`.
pub fn evaluate(
    topology: &Topology,
    rank: usize,
    comms: &RankComms,
    encode: &dyn Fn(Tower, &TowerInput) -> Result<Tensor>,
    held_out: &HeldOut,
    pairs: usize,
) -> Result<Option<EvalScores>> {
    const CHUNK: usize = 256;
    let mut parts = Vec::new();
    for role in &topology.ranks[rank].roles {
        let size = topology.group_size(role.tower);
        let (offset, len) = (
            split_offset(pairs, size, role.group_rank),
            split_len(pairs, size, role.group_rank),
        );
        for start in (0..len).step_by(CHUNK) {
            let n = CHUNK.min(len - start);
            let indices: Vec<u64> =
                ((offset + start) as u64..(offset + start + n) as u64).collect();
            parts.push(encode(
                role.tower,
                &held_out.tower_input(role.tower, &indices)?,
            )?);
        }
    }
    let local = if parts.is_empty() {
        Tensor::zeros((0, 0), DType::F32, &Device::Cpu)?
    } else {
        Tensor::cat(&parts, 0)?
    };
    let layout = FeatureLayout::new(topology, pairs);
    let (image, text) = exchange_features(comms.world.as_ref(), &layout, &local)?;
    // Scoring runs on the host, whatever device the towers ran on.
    let (image, text) = (
        image.to_device(&Device::Cpu)?,
        text.to_device(&Device::Cpu)?,
    );
    let first_text = topology
        .ranks
        .iter()
        .position(|r| r.holds(Tower::Text))
        .expect("a topology has a text group");
    let labels = held_out.labels(pairs);
    let classes = match &labels {
        Some(_) => {
            let mine = if rank == first_text {
                held_out
                    .class_features(&|x: &TowerInput| encode(Tower::Text, x))?
                    .expect("labelled sets have classes")
            } else {
                // The shape a collective needs; only the root's values travel.
                let n = crate::data::fashion_mnist::CLASSES.len();
                Tensor::zeros((n, image.dim(1)?), image.dtype(), &Device::Cpu)?
            };
            Some(
                comms
                    .world
                    .broadcast(&mine, first_text)?
                    .to_device(&Device::Cpu)?,
            )
        }
        None => None,
    };
    if rank != 0 {
        return Ok(None);
    }
    let captions: Vec<String> = (0..pairs as u64).map(|i| held_out.caption(i)).collect();
    let classes = classes.as_ref().zip(labels.as_deref());
    Ok(Some(super::score(&image, &text, &captions, classes)?))
}

/// Every rank's rows of a `tower` group's share of `total` items (`local`: this rank's,
/// `None` when it holds no `tower`), in group-rank order on every rank: one world
/// all-gather (ranks outside the group send no rows).
fn gather_group(
    topology: &Topology,
    world: &dyn crate::comm::Communicator,
    tower: Tower,
    local: Option<Tensor>,
    total: usize,
    dim: usize,
) -> Result<Tensor> {
    let mine = match local {
        Some(t) => t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
        None => Tensor::zeros((0, dim), DType::F32, &Device::Cpu)?,
    };
    let layout = FeatureLayout::new(topology, total);
    crate::loss::gather_tower_features(world, &layout, tower, &mine)
}

/// Zero-shot classification of `set` over the ranks: the image ranks encode their share
/// of its images, the text ranks their share of its classes' prompts (each class the
/// normalised mean of its templates), and world rank 0 scores them; the other ranks
/// return None. `dim` is the features' width.
pub fn evaluate_zero_shot(
    topology: &Topology,
    rank: usize,
    comms: &RankComms,
    encode: &dyn Fn(Tower, &TowerInput) -> Result<Tensor>,
    set: &ZeroShotSet,
    dim: usize,
) -> Result<Option<ZeroShotScores>> {
    const CHUNK: usize = 256;
    let me = &topology.ranks[rank];
    let share = |tower: Tower, total: usize| {
        me.role(tower).map(|r| {
            let size = topology.group_size(tower);
            let from = split_offset(total, size, r.group_rank);
            from..from + split_len(total, size, r.group_rank)
        })
    };
    let n = set.images.images.len();
    let images = match share(Tower::Image, n) {
        Some(range) => {
            let mut parts = vec![Tensor::zeros((0, dim), DType::F32, &Device::Cpu)?];
            for start in range.clone().step_by(CHUNK) {
                let chunk = start..(start + CHUNK).min(range.end);
                let x = encode(Tower::Image, &set.image_input(chunk)?)?;
                parts.push(x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
            }
            Some(Tensor::cat(&parts, 0)?)
        }
        None => None,
    };
    let c = set.images.classes.len();
    let classes = match share(Tower::Text, c) {
        Some(range) => {
            let encode_text = |prompts: &[String]| encode(Tower::Text, &set.text_input(prompts)?);
            let mine = &set.images.classes[range];
            Some(if mine.is_empty() {
                Tensor::zeros((0, dim), DType::F32, &Device::Cpu)?
            } else {
                class_features(mine, &set.templates, &encode_text)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
            })
        }
        None => None,
    };
    let world = comms.world.as_ref();
    let images = gather_group(topology, world, Tower::Image, images, n, dim)?;
    let classes = gather_group(topology, world, Tower::Text, classes, c, dim)?;
    if rank != 0 {
        return Ok(None);
    }
    Ok(Some(zero_shot_scores(
        &images,
        &classes,
        &set.images.labels(),
    )?))
}

/// Retrieval on `set` over the ranks: the image ranks encode their share of its images,
/// the text ranks their share of its captions, and world rank 0 scores them; the other
/// ranks return None.
pub fn evaluate_retrieval(
    topology: &Topology,
    rank: usize,
    comms: &RankComms,
    encode: &dyn Fn(Tower, &TowerInput) -> Result<Tensor>,
    set: &RetrievalSet,
    dim: usize,
) -> Result<Option<RetrievalScores>> {
    const CHUNK: usize = 256;
    let me = &topology.ranks[rank];
    let n = set.pairs.len();
    let local = |tower: Tower| -> Result<Option<Tensor>> {
        let Some(role) = me.role(tower) else {
            return Ok(None);
        };
        let size = topology.group_size(tower);
        let from = split_offset(n, size, role.group_rank);
        let to = from + split_len(n, size, role.group_rank);
        let mut parts = vec![Tensor::zeros((0, dim), DType::F32, &Device::Cpu)?];
        for start in (from..to).step_by(CHUNK) {
            let chunk = start..(start + CHUNK).min(to);
            let input = match tower {
                Tower::Image => set.image_input(chunk)?,
                Tower::Text => set.text_input(chunk)?,
            };
            parts.push(
                encode(tower, &input)?
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?,
            );
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    };
    let (image, text) = (local(Tower::Image)?, local(Tower::Text)?);
    let world = comms.world.as_ref();
    let image = gather_group(topology, world, Tower::Image, image, n, dim)?;
    let text = gather_group(topology, world, Tower::Text, text, n, dim)?;
    if rank != 0 {
        return Ok(None);
    }
    Ok(Some(set.score(&image, &text)?))
}
