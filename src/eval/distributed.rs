//! Evaluation during training, over the ranks: each encodes its share of the held-out
//! pairs with its own tower, world rank 0 gathers the features and scores them.

use candle_core::{DType, Device, Tensor};

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
