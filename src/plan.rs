//! The placement of ranks and the bytes each step moves: a pure function of the topology,
//! the model config and the global batch. (The time model comes later; the bytes here are
//! what the training step really sends.)

use std::fmt::Write;

use crate::error::Result;
use crate::model::ClipConfig;
use crate::topology::{Topology, Tower};

#[derive(Debug, Clone, PartialEq)]
pub struct RankPlan {
    pub global_rank: usize,
    pub node: String,
    pub device: String,
    pub tower: Tower,
    pub group_rank: usize,
    /// "vit" or "text-transformer".
    pub encoder: &'static str,
    pub local_batch: usize,
}

/// Bytes per step, counting each collective's payload (the full gathered or reduced
/// tensor) and, for all-reduces, what one rank sends in a ring.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    /// The world all-gather of normalised features: `2·B·D` elements.
    pub feature_all_gather: u64,
    /// Per group: the all-gather of log-sum-exp partials (`size·B` elements).
    pub lse_all_gather: [(Tower, u64); 2],
    /// Per group: the gradient all-reduce payload (the tower's parameters).
    pub grad_all_reduce: [(Tower, u64); 2],
    /// Per group: bytes one rank sends in a ring all-reduce of that payload, `2(n−1)/n`.
    pub grad_ring_per_rank: [(Tower, u64); 2],
    /// The world all-reduce of the loss and the temperature gradient.
    pub scalars: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub topology: String,
    pub global_batch: usize,
    pub bytes_per_element: usize,
    pub ranks: Vec<RankPlan>,
    pub image_params: usize,
    pub text_params: usize,
    pub traffic: Traffic,
}

impl Plan {
    pub fn new(
        topology: &Topology,
        model: &ClipConfig,
        global_batch: usize,
        batch_origin: &str,
    ) -> Result<Self> {
        topology.check_batch(global_batch, batch_origin)?;
        let bytes = 4; // f32 everywhere today
        let ranks = topology
            .ranks
            .iter()
            .map(|r| RankPlan {
                global_rank: r.global,
                node: topology.nodes[r.node].name.clone(),
                device: topology.device_label(r),
                tower: r.tower,
                group_rank: r.group_rank,
                encoder: match r.tower {
                    Tower::Image => "vit",
                    Tower::Text => "text-transformer",
                },
                local_batch: global_batch / topology.group_size(r.tower),
            })
            .collect();
        // logit_scale lives on both groups but its gradient comes from the world scalar
        // all-reduce, not from the group's gradient bucket.
        let image_params = model.vision.size().num_params(model.embed_dim);
        let text_params = model.text.size().num_params(model.embed_dim);
        let b = global_batch as u64;
        let per_group = |f: &dyn Fn(Tower) -> u64| {
            [
                (Tower::Image, f(Tower::Image)),
                (Tower::Text, f(Tower::Text)),
            ]
        };
        let params_of = |t: Tower| match t {
            Tower::Image => image_params as u64,
            Tower::Text => text_params as u64,
        };
        let size = |t: Tower| topology.group_size(t) as u64;
        let traffic = Traffic {
            feature_all_gather: 2 * b * model.embed_dim as u64 * bytes,
            lse_all_gather: per_group(&|t| size(t) * b * bytes),
            grad_all_reduce: per_group(&|t| if size(t) > 1 { params_of(t) * bytes } else { 0 }),
            grad_ring_per_rank: per_group(&|t| 2 * (size(t) - 1) * params_of(t) * bytes / size(t)),
            scalars: 2 * 8,
        };
        Ok(Plan {
            topology: topology.source.display().to_string(),
            global_batch,
            bytes_per_element: bytes as usize,
            ranks,
            image_params,
            text_params,
            traffic,
        })
    }

    /// The human-readable plan `mmpipe plan` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "topology {}, global batch {}",
            self.topology, self.global_batch
        );
        let _ = writeln!(
            s,
            "{:>4}  {:<12} {:<8} {:<5} {:>10}  {:<16} {:>11}",
            "rank", "node", "device", "group", "group-rank", "tower", "local-batch"
        );
        for r in &self.ranks {
            let _ = writeln!(
                s,
                "{:>4}  {:<12} {:<8} {:<5} {:>10}  {:<16} {:>11}",
                r.global_rank, r.node, r.device, r.tower, r.group_rank, r.encoder, r.local_batch
            );
        }
        let t = &self.traffic;
        let _ = writeln!(s, "\nper step (f32):");
        let _ = writeln!(
            s,
            "  feature all-gather (world, across groups): {} gathered",
            human_bytes(t.feature_all_gather)
        );
        for ((tower, lse), ((_, grad), (_, ring))) in t
            .lse_all_gather
            .iter()
            .zip(t.grad_all_reduce.iter().zip(&t.grad_ring_per_rank))
        {
            let params = match tower {
                Tower::Image => self.image_params,
                Tower::Text => self.text_params,
            };
            let _ = writeln!(
                s,
                "  {tower:<5} group: loss normaliser all-gather {}; gradient all-reduce {} ({} parameters), {} sent per rank in a ring",
                human_bytes(*lse),
                human_bytes(*grad),
                params,
                human_bytes(*ring)
            );
        }
        let _ = writeln!(
            s,
            "  loss and temperature gradient all-reduce (world): {}",
            human_bytes(t.scalars)
        );
        s
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {} ({b} B)", UNITS[u])
    }
}
