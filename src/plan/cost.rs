//! The cost model: time and memory of one training step, for the modality split and for
//! plain data parallelism on the same devices. Pure arithmetic over the topology, the
//! model's sizes and the options; every assumption is named here.
//!
//! - Compute: forward + backward = 3 × forward FLOPs (+1 forward when checkpointing
//!   recomputes), at `tflops × efficiency` per device, or at calibrated samples/s.
//! - Collectives: ring algorithms, `α–β` model. All-reduce of `n` bytes over `p` ranks:
//!   `2(p−1)/p · n/bw + 2(p−1)·latency`; all-gather of `n` bytes in total:
//!   `(p−1)/p · n/bw + (p−1)·latency`. A ring runs at the slowest link it crosses: the
//!   inter-node link as soon as its ranks span two nodes.
//! - Overlap: the gradient all-reduce can overlap the backward pass (bucketed, as DDP
//!   does); exposed are what exceeds the backward, and the last bucket, which only
//!   backward's end starts: `max(0, T(n − bucket) − backward) + T(bucket)`, `T` the
//!   all-reduce time of so many bytes (as `comm::overlap` sums them). The loss's
//!   normaliser exchange sits between forward and backward: always exposed. So does the
//!   feature all-gather, except where a device holds both towers and the features are
//!   gathered one tower at a time (`feature_overlap`): then the image features' gather
//!   `T_img` runs during that device's text forward, exposed `max(0, T_img − forward_text)
//!   + T_text`; a device that holds one tower makes both gathers, `T_img + T_text`.
//! - Synchronisation: the groups meet at the feature all-gather once per step, so the
//!   step lasts as long as the busier group; the lighter group idles for the difference.
//! - Memory per rank: fp32 master weights and gradients, optimizer state; under bf16 also
//!   the bf16 working copies of the weights that have one (matrices and their biases:
//!   embeddings and norms are read in f32) and those weights' bf16 gradients from backward
//!   before their cast to f32 (what a rank allocates, tested against its tensors);
//!   activations at the training precision, the loss's `b × B` logit blocks and the
//!   gathered features. Not counted: the all-reduce's flattened bucket.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::loss::{Exchange, LossConfig, LossKind, TILE_BLOCKS};
use crate::model::ClipConfig;
use crate::topology::{LayoutKind, Links, Topology, Tower};

use super::options::{CostOptions, Precision};

/// Bytes one rank holds at the peak of a step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub loss: f64,
    pub total: f64,
    /// The smallest device this applies to.
    pub device: f64,
    pub fits: bool,
}

impl Memory {
    /// A rank holding both towers: each tower's bytes together, on the smaller device.
    fn plus(&self, other: &Memory) -> Memory {
        let device = self.device.min(other.device);
        let total = self.total + other.total;
        Memory {
            weights: self.weights + other.weights,
            gradients: self.gradients + other.gradients,
            optimizer: self.optimizer + other.optimizer,
            activations: self.activations + other.activations,
            loss: self.loss + other.loss,
            total,
            device,
            fits: total <= device,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupEstimate {
    pub tower: Tower,
    pub ranks: usize,
    pub local_batch: usize,
    /// "intra-node", "inter-node", or "none" for one rank.
    pub link: String,
    pub forward_s: f64,
    /// Backward, with the recomputed forward when checkpointing.
    pub backward_s: f64,
    pub loss_s: f64,
    pub loss_exchange_s: f64,
    pub grad_all_reduce_s: f64,
    pub grad_all_reduce_exposed_s: f64,
    /// The step's time split for this group; the three add up to the step time.
    pub compute_s: f64,
    pub comm_s: f64,
    pub idle_s: f64,
    pub memory: Memory,
}

/// The devices that hold the same towers ("image", "text" or "image+text"), and how
/// their step divides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceClassEstimate {
    pub towers: String,
    pub ranks: usize,
    /// The busiest of them; the three add up to the step time.
    pub compute_s: f64,
    pub comm_s: f64,
    pub idle_s: f64,
    /// The fullest of them.
    pub memory: Memory,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitEstimate {
    pub groups: Vec<GroupEstimate>,
    /// Per kind of device (what it holds), image-only first, then both, then text-only.
    #[serde(default)]
    pub classes: Vec<DeviceClassEstimate>,
    pub feature_all_gather_s: f64,
    /// What of the features' gathers no forward hides, on the device where most of them
    /// shows (`feature_all_gather_s` but for `feature_overlap` on devices with both towers).
    #[serde(default)]
    pub feature_all_gather_exposed_s: f64,
    pub step_s: f64,
    pub samples_per_s: f64,
    pub lighter: Tower,
    /// The lighter group's idle share of the step.
    pub idle_fraction: f64,
    /// Each rank's device memory, in the topology's rank order: the towers it holds
    /// together (a group's `memory` is its fullest member's, which for a rank holding both
    /// towers already counts both).
    #[serde(default)]
    pub rank_memory_bytes: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataParallelEstimate {
    pub ranks: usize,
    pub local_batch: usize,
    pub link: String,
    pub compute_s: f64,
    pub feature_all_gather_s: f64,
    pub grad_all_reduce_s: f64,
    pub grad_all_reduce_exposed_s: f64,
    pub step_s: f64,
    pub samples_per_s: f64,
    pub memory: Memory,
}

/// Ring all-reduce of `bytes` over `ranks` on `link`.
pub fn ring_all_reduce_s(bytes: f64, ranks: usize, link: Option<LinkCost>) -> f64 {
    match link {
        Some(l) if ranks > 1 => {
            let p = ranks as f64;
            2.0 * (p - 1.0) / p * bytes / l.bytes_per_s + 2.0 * (p - 1.0) * l.latency_s
        }
        _ => 0.0,
    }
}

/// Ring all-gather producing `total_bytes` on every one of `ranks`.
pub fn ring_all_gather_s(total_bytes: f64, ranks: usize, link: Option<LinkCost>) -> f64 {
    match link {
        Some(l) if ranks > 1 => {
            let p = ranks as f64;
            (p - 1.0) / p * total_bytes / l.bytes_per_s + (p - 1.0) * l.latency_s
        }
        _ => 0.0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkCost {
    pub bytes_per_s: f64,
    pub latency_s: f64,
    pub inter_node: bool,
}

/// The slowest link a ring over `members` (global ranks) crosses; None for one rank.
pub fn ring_link(topology: &Topology, links: &Links, members: &[usize]) -> Option<LinkCost> {
    if members.len() < 2 {
        return None;
    }
    let first = topology.ranks[members[0]].node;
    let inter = members.iter().any(|&r| topology.ranks[r].node != first);
    Some(if inter {
        LinkCost {
            bytes_per_s: links.inter_node_gbps * 1e9,
            latency_s: links.inter_node_latency_us * 1e-6,
            inter_node: true,
        }
    } else {
        LinkCost {
            bytes_per_s: links.intra_node_gbps * 1e9,
            latency_s: links.intra_node_latency_us * 1e-6,
            inter_node: false,
        }
    })
}

fn link_name(link: Option<LinkCost>) -> String {
    match link {
        None => "none".into(),
        Some(l) if l.inter_node => "inter-node".into(),
        Some(_) => "intra-node".into(),
    }
}

/// Per-tower numbers the estimates share.
struct TowerNumbers {
    params: f64,
    /// Of `params`, those with a bf16 working copy under mixed precision.
    copied_params: f64,
    /// What a rank's gradient all-reduce carries: the token table as its batch's rows.
    grad_all_reduce_elems: f64,
    forward_flops: f64,
    activation_elems: f64,
    /// The same without attention's probabilities, where flash attention takes the
    /// tower's heads (bf16 on GPUs); None where it never does.
    flash_activation_elems: Option<f64>,
    /// Activations kept in f32 at any precision (a transformer's residual stream).
    stream_activation_elems: f64,
    /// Of the activations, those a GPU does not keep (a transformer's products before its
    /// residual adds).
    branch_activation_elems: f64,
}

/// `global_batch`: the samples the tower's group looks up in a step.
fn tower_numbers(
    model: &ClipConfig,
    tower: Tower,
    checkpointing: bool,
    global_batch: usize,
) -> TowerNumbers {
    let size = model.tower_size(tower);
    TowerNumbers {
        params: size.num_params(model.embed_dim) as f64,
        copied_params: (size.num_params(model.embed_dim)
            - size.full_precision_params(model.embed_dim)) as f64,
        grad_all_reduce_elems: size.grad_all_reduce_elems(model.embed_dim, global_batch) as f64,
        // What mmpipe's step runs (a last block at the pooled token only), not the model's
        // nominal count.
        forward_flops: size.executed_forward_flops(model.embed_dim),
        activation_elems: size.activation_elems(checkpointing, true),
        flash_activation_elems: size
            .attention_head_width()
            .filter(|&d| crate::model::fused::plan::flash_attention_takes(d))
            .map(|_| size.activation_elems(checkpointing, false)),
        stream_activation_elems: size.stream_activation_elems(checkpointing),
        branch_activation_elems: size.branch_activation_elems(checkpointing),
    }
}

/// Parameters, and of them those with a bf16 working copy under mixed precision.
#[derive(Debug, Clone, Copy, Default)]
struct Params {
    all: f64,
    copied: f64,
}

pub struct CostModel<'a> {
    pub topology: &'a Topology,
    pub model: &'a ClipConfig,
    pub options: &'a CostOptions,
}

impl CostModel<'_> {
    fn links(&self) -> Result<Links> {
        if let Some(l) = self.topology.links {
            return Ok(l);
        }
        Err(Error::invalid(
            &self.topology.source,
            "links",
            "the cost model needs the links' bandwidth and latency: add a [links] table",
        ))
    }

    /// Sustained FLOP/s of `rank` running `tower`.
    fn flops_per_s(&self, rank: usize, tower: Tower) -> Result<f64> {
        let t = self.topology;
        if let Some(c) = self.options.calibration {
            if c.precision != self.options.precision {
                return Err(Error::Msg(format!(
                    "the calibration measured the towers in {:?} but the plan is for {:?}: \
                     calibrate with the same --precision",
                    c.precision, self.options.precision
                )));
            }
            // Measured on one rank's share of the cores, so it already is per rank.
            let rate = match tower {
                Tower::Image => c.image_samples_per_s,
                Tower::Text => c.text_samples_per_s,
            };
            let per_sample = tower_numbers(self.model, tower, false, self.options.global_batch)
                .forward_flops
                * 3.0;
            return Ok(rate * per_sample);
        }
        let node = t.ranks[rank].node;
        match t.spec(node) {
            Some(s) => Ok(s.tflops * 1e12 * s.efficiency),
            None => Err(Error::invalid(
                &t.source,
                format!("nodes[{node}].kind"),
                "the cost model needs each device's throughput: declare [device_kinds] or run with --calibrate",
            )),
        }
    }

    fn device_memory(&self, rank: usize) -> f64 {
        let node = self.topology.ranks[rank].node;
        self.topology
            .spec(node)
            .map(|s| s.memory_gib * (1u64 << 30) as f64)
            .unwrap_or(f64::INFINITY)
    }

    fn compute_factor(&self) -> f64 {
        if self.options.checkpointing {
            4.0
        } else {
            3.0
        }
    }

    /// `held` parameters, of which `trained` have gradients and optimizer state.
    fn memory(
        &self,
        held: Params,
        trained: Params,
        activations: f64,
        loss: f64,
        device: f64,
    ) -> Memory {
        let o = self.options;
        let (params, trained, copied_trained) = (held.all, trained.all, trained.copied);
        // Under bf16: the working copies the model reads, and their bf16 gradients.
        let (working_copy, backward_grads) = match o.precision {
            Precision::Fp32 => (0.0, 0.0),
            Precision::Bf16 => (2.0 * held.copied, 2.0 * copied_trained),
        };
        let weights = 4.0 * params + working_copy;
        let gradients = 4.0 * trained + backward_grads;
        let optimizer = o.optimizer.state_bytes() * trained;
        let total = weights + gradients + optimizer + activations + loss;
        Memory {
            weights,
            gradients,
            optimizer,
            activations,
            loss,
            total,
            device,
            fits: total <= device,
        }
    }

    /// The step under the topology's groups, whichever kind they make (split, data
    /// parallel, hybrid).
    pub fn split(&self) -> Result<SplitEstimate> {
        let t = self.topology;
        let o = self.options;
        t.check_batch(o.global_batch, "--batch")?;
        let links = self.links()?;
        let b_global = o.global_batch as f64;
        let d = self.model.embed_dim as f64;
        let world: Vec<usize> = (0..t.world_size()).collect();
        // Every rank contributes its b × D fp32 features; every rank ends with all 2·B·D.
        let feature_all_gather_s = ring_all_gather_s(
            2.0 * b_global * d * 4.0,
            world.len(),
            ring_link(t, &links, &world),
        );

        // One tower's features: half the bytes, a whole ring's latency.
        let tower_gather_s = ring_all_gather_s(
            b_global * d * 4.0,
            world.len(),
            ring_link(t, &links, &world),
        );
        let gather_per_tower = o.feature_overlap && t.layout_kind() != LayoutKind::Split;

        let mut groups = Vec::new();
        for tower in [Tower::Image, Tower::Text] {
            let members = t.group(tower);
            let n = members.len();
            // The largest slice sets the group's pace and memory (the first ranks get one
            // more sample when the batch does not divide evenly).
            let b = o.global_batch.div_ceil(n);
            // A locked tower runs forward only: no backward, no gradients to reduce.
            let locked = self.model.is_locked(tower);
            let num = tower_numbers(self.model, tower, o.checkpointing || locked, o.global_batch);
            let link = ring_link(t, &links, &members);
            let slowest = members
                .iter()
                .map(|&r| self.flops_per_s(r, tower))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .fold(f64::INFINITY, f64::min);
            let forward_s = b as f64 * num.forward_flops / slowest;
            // A micro-batch smaller than the slice holds its activations only, and pays a
            // second forward (features first, then again with gradients).
            let micro = o.micro_batch.of(tower).filter(|&m| m < b && !locked);
            let backward_s = if locked {
                0.0
            } else {
                (self.compute_factor() - 1.0 + f64::from(u8::from(micro.is_some()))) * forward_s
            };
            let loss_s = o.loss.block_products() * 2.0 * b as f64 * b_global * d / slowest;
            let loss_payload =
                o.loss
                    .exchange_payload(t, tower, o.global_batch, self.model.embed_dim, 4)
                    as f64;
            let loss_exchange_s = match o.loss.exchange {
                Exchange::Lse => ring_all_gather_s(loss_payload, n, link),
                // A reduce-scatter moves what an all-gather of its output would, over the world.
                Exchange::GatherScatter => {
                    ring_all_gather_s(loss_payload, world.len(), ring_link(t, &links, &world))
                }
            };
            let grad_bytes = num.grad_all_reduce_elems * o.grad_reduce.bytes();
            let grad_all_reduce_s = if locked {
                0.0
            } else {
                ring_all_reduce_s(grad_bytes, n, link)
            };
            let grad_all_reduce_exposed_s = match o.overlap {
                _ if locked => 0.0,
                Some(bucket) => {
                    let last = bucket.min(grad_bytes);
                    (ring_all_reduce_s(grad_bytes - last, n, link) - backward_s).max(0.0)
                        + ring_all_reduce_s(last, n, link)
                }
                None => grad_all_reduce_s,
            };
            // Flash attention runs where mmpipe's attention takes it: bf16 on GPUs.
            let gpu = self.topology.device == crate::topology::DeviceKind::Cuda;
            let flash = o.flash_attention && o.precision == Precision::Bf16 && gpu;
            let activation_elems = match num.flash_activation_elems {
                Some(elems) if flash => elems,
                _ => num.activation_elems,
            } - if gpu {
                num.branch_activation_elems
            } else {
                0.0
            };
            let activations = micro.unwrap_or(b) as f64
                * (activation_elems * o.precision.activation_bytes()
                    + num.stream_activation_elems * 4.0);
            let loss_bytes = o
                .loss
                .peak_bytes(b, o.global_batch, self.model.embed_dim, 4);
            let device = members
                .iter()
                .map(|&r| self.device_memory(r))
                .fold(f64::INFINITY, f64::min);
            let held = Params {
                all: num.params,
                copied: num.copied_params,
            };
            let trained = if locked { Params::default() } else { held };
            let memory = self.memory(held, trained, activations, loss_bytes, device);
            groups.push(GroupEstimate {
                tower,
                ranks: n,
                local_batch: b,
                link: link_name(link),
                forward_s,
                backward_s,
                loss_s,
                loss_exchange_s,
                grad_all_reduce_s,
                grad_all_reduce_exposed_s,
                compute_s: forward_s + backward_s + loss_s,
                comm_s: feature_all_gather_s + loss_exchange_s + grad_all_reduce_exposed_s,
                idle_s: 0.0,
                memory,
            });
        }
        // A rank runs the towers it holds one after the other: its compute, its
        // collectives and its memory are its towers' sums (the features travel once).
        let tower_of = |tower: Tower| &groups[usize::from(tower == Tower::Text)];
        let mut feature_all_gather_exposed_s: f64 = 0.0;
        let per_rank: Vec<(f64, f64, Memory)> = t
            .ranks
            .iter()
            .map(|r| {
                let held: Vec<&GroupEstimate> = r.roles.iter().map(|x| tower_of(x.tower)).collect();
                let gather = match held.as_slice() {
                    _ if !gather_per_tower => feature_all_gather_s,
                    [_, text] => (tower_gather_s - text.forward_s).max(0.0) + tower_gather_s,
                    _ => 2.0 * tower_gather_s,
                };
                feature_all_gather_exposed_s = feature_all_gather_exposed_s.max(gather);
                let compute = held.iter().map(|g| g.compute_s).sum::<f64>();
                let sum =
                    |f: &dyn Fn(&GroupEstimate) -> f64| held.iter().map(|g| f(g)).sum::<f64>();
                // Overlapped, a tower's all-reduce may hide behind any backward the device
                // runs (the other tower's too).
                let grad_all_reduce = sum(&|g| g.grad_all_reduce_s);
                let exposed = if o.overlap.is_some() {
                    // The sums may hide behind any backward the device runs (the first
                    // tower's behind the second's too), but not the last tower's, which
                    // its own backward's end starts: at least its exposed part.
                    let last = held.last().map_or(0.0, |g| g.grad_all_reduce_exposed_s);
                    (grad_all_reduce - sum(&|g| g.backward_s)).max(last)
                } else {
                    grad_all_reduce
                };
                let comm = gather + sum(&|g| g.loss_exchange_s) + exposed;
                let memory = held
                    .iter()
                    .skip(1)
                    .fold(held[0].memory, |m, g| m.plus(&g.memory));
                (compute, comm, memory)
            })
            .collect();
        let step_s = per_rank.iter().map(|(c, m, _)| c + m).fold(0.0, f64::max);
        // Each group's row is its busiest member's whole step (both towers' work where it
        // holds both), so compute + comm + idle add up to the step.
        for (i, tower) in [Tower::Image, Tower::Text].into_iter().enumerate() {
            let members = t.group(tower);
            let busiest = members
                .iter()
                .copied()
                .max_by(|&a, &b| {
                    let busy = |r: usize| per_rank[r].0 + per_rank[r].1;
                    busy(a).total_cmp(&busy(b))
                })
                .expect("a group has members");
            let heaviest = members
                .iter()
                .map(|&r| per_rank[r].2)
                .max_by(|a, b| a.total.total_cmp(&b.total))
                .expect("a group has members");
            let g = &mut groups[i];
            g.compute_s = per_rank[busiest].0;
            g.comm_s = per_rank[busiest].1;
            g.idle_s = step_s - g.compute_s - g.comm_s;
            g.memory = heaviest;
        }
        let mut classes: Vec<DeviceClassEstimate> = Vec::new();
        for (r, &(compute, comm, memory)) in t.ranks.iter().zip(&per_rank) {
            let towers = r.label();
            match classes.iter_mut().find(|c| c.towers == towers) {
                Some(c) => {
                    c.ranks += 1;
                    if compute + comm > c.compute_s + c.comm_s {
                        (c.compute_s, c.comm_s) = (compute, comm);
                    }
                    if memory.total > c.memory.total {
                        c.memory = memory;
                    }
                }
                None => classes.push(DeviceClassEstimate {
                    towers,
                    ranks: 1,
                    compute_s: compute,
                    comm_s: comm,
                    idle_s: 0.0,
                    memory,
                }),
            }
        }
        let order = |c: &DeviceClassEstimate| match c.towers.as_str() {
            "image" => 0,
            "image+text" => 1,
            _ => 2,
        };
        classes.sort_by_key(order);
        for c in &mut classes {
            // Not below zero: the busiest device's own rounding.
            c.idle_s = (step_s - c.compute_s - c.comm_s).max(0.0);
        }
        let busy = |g: &GroupEstimate| g.compute_s + g.comm_s;
        let lighter = if busy(&groups[0]) <= busy(&groups[1]) {
            Tower::Image
        } else {
            Tower::Text
        };
        let idle_fraction = groups
            .iter()
            .find(|g| g.tower == lighter)
            .map_or(0.0, |g| g.idle_s / step_s);
        Ok(SplitEstimate {
            groups,
            classes,
            feature_all_gather_s,
            feature_all_gather_exposed_s,
            step_s,
            samples_per_s: b_global / step_s,
            lighter,
            idle_fraction,
            rank_memory_bytes: per_rank.iter().map(|(_, _, m)| m.total).collect(),
        })
    }

    /// The same global batch with every device holding both towers (OpenCLIP's layout,
    /// which mmpipe trains too: features all-gathered, each tower's gradients summed over
    /// every device): [`Self::split`] of that layout.
    pub fn data_parallel(&self) -> Result<DataParallelEstimate> {
        let t = self.topology;
        let devices = t.devices();
        let dp = t.with_groups(&devices, &devices)?;
        let s = CostModel {
            topology: &dp,
            model: self.model,
            options: self.options,
        }
        .split()?;
        let (image, text) = (&s.groups[0], &s.groups[1]);
        Ok(DataParallelEstimate {
            ranks: devices.len(),
            local_batch: image.local_batch,
            link: image.link.clone(),
            compute_s: image.compute_s,
            feature_all_gather_s: s.feature_all_gather_s,
            grad_all_reduce_s: image.grad_all_reduce_s + text.grad_all_reduce_s,
            // A device's collectives beyond the features and the loss's own: what of its
            // all-reduces no backward hides.
            grad_all_reduce_exposed_s: (image.comm_s
                - s.feature_all_gather_exposed_s
                - image.loss_exchange_s
                - text.loss_exchange_s)
                .max(0.0),
            step_s: s.step_s,
            samples_per_s: s.samples_per_s,
            memory: image.memory,
        })
    }
}

/// What the loss costs: its collectives' bytes, its matrix products and its memory.
impl LossConfig {
    /// Payload bytes of the loss's own collectives per step on one rank of `tower`'s group,
    /// as [`crate::comm::Communicator::payload_bytes`] counts them: the normaliser
    /// partials (`lse`, CLIP) or the returned feature gradients (`gather-scatter`, padded
    /// to the larger group's rows), and the world all-reduce of three f64 scalars.
    pub fn exchange_payload(
        &self,
        topology: &Topology,
        tower: Tower,
        global_batch: usize,
        embed_dim: usize,
        elem_bytes: usize,
    ) -> u64 {
        let scalars = 3 * 8;
        let exchanged = match (self.exchange, self.kind) {
            (Exchange::Lse, LossKind::Clip) => topology.group_size(tower) * global_batch,
            (Exchange::Lse, LossKind::Siglip) => 0,
            (Exchange::GatherScatter, _) => {
                // The reduce-scatter pads every rank's block to the widest: a rank's rows
                // are those of every tower it holds.
                let widest = crate::topology::layout::FeatureLayout::new(topology, global_batch)
                    .world_rows()
                    .into_iter()
                    .max()
                    .unwrap_or(0);
                topology.world_size() * widest * embed_dim
            }
        };
        (exchanged * elem_bytes + scalars) as u64
    }

    /// Matrix products the size of a rank's `b × B × D` block per step: the logits once
    /// per pass over the tiles (CLIP takes two: normalisers, then gradients), the own
    /// gradient `G·Y`, and under `gather-scatter` the other side's `Gᵀ·X`.
    pub fn block_products(&self) -> f64 {
        let logits = match self.kind {
            LossKind::Clip => 2.0,
            LossKind::Siglip => 1.0,
        };
        let other = match self.exchange {
            Exchange::Lse => 0.0,
            Exchange::GatherScatter => 1.0,
        };
        logits + 1.0 + other
    }

    /// Peak bytes the loss holds on a rank with `rows` own rows: one tile's blocks, the
    /// gathered features of both modalities, the own gradient, and under
    /// `gather-scatter` the other side's gradients.
    pub fn peak_bytes(&self, rows: usize, global_batch: usize, dim: usize, elem: usize) -> f64 {
        let tile = self.tile_columns(rows, global_batch, elem);
        let blocks = TILE_BLOCKS * rows * tile;
        let features = 2 * global_batch * dim + rows * dim;
        let returned = match self.exchange {
            Exchange::Lse => 0,
            Exchange::GatherScatter => 2 * global_batch * dim,
        };
        ((blocks + features + returned) * elem) as f64
    }
}
