//! `mmpipe plan`: where each rank runs, what each step moves, and what it costs — for the
//! topology's groups, for plain data parallelism on the same devices, and (with `--auto`)
//! for every split the search considers. Pure functions of (topology, model, options).

pub mod cost;
pub mod options;
pub mod search;
pub mod size;
pub mod svg;

use std::fmt::Write;

use serde::{Deserialize, Serialize};

pub use cost::{CostModel, DataParallelEstimate, SplitEstimate};
pub use options::{Calibration, CostOptions, GradReduce, MicroBatch, Optimizer, Precision};

use crate::error::Result;
use crate::loss::{Exchange, LossConfig, LossKind};
use crate::model::{ClipConfig, ImageTowerConfig, TextTowerConfig};
use crate::topology::{LayoutKind, Topology, Tower};

/// One tower on one rank: a rank that holds both towers has two, with the same
/// `global_rank`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankPlan {
    pub global_rank: usize,
    pub node: String,
    pub device: String,
    /// The device kind's name, if the topology declares kinds.
    pub kind: Option<String>,
    pub tower: Tower,
    pub group_rank: usize,
    /// "vit", "resnet", "clip-text" or "bert".
    pub encoder: String,
    pub local_batch: usize,
    /// Estimated peak bytes on this rank, over every tower it holds (needs the cost
    /// model).
    pub memory_bytes: Option<f64>,
}

/// Bytes per step, counting each collective's payload (the full gathered or reduced
/// tensor) and, for all-reduces, what one rank sends in a ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    /// The world all-gather of normalised features: `2·B·D` elements.
    pub feature_all_gather: u64,
    /// Per group, per rank: the loss's own collectives under the chosen scheme
    /// (normaliser partials, or returned feature gradients; and three scalars).
    pub loss_exchange: [(Tower, u64); 2],
    /// The same under each exchange scheme, for comparison.
    pub loss_exchange_by_scheme: Vec<(String, [(Tower, u64); 2])>,
    /// Per group: the gradient all-reduce payload (the tower's parameters).
    pub grad_all_reduce: [(Tower, u64); 2],
    /// Per group: bytes one rank sends in a ring all-reduce of that payload, `2(n−1)/n`.
    pub grad_ring_per_rank: [(Tower, u64); 2],
    /// The world all-reduce of the loss and the temperature gradient.
    pub scalars: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub topology: String,
    /// Split, data parallel or hybrid: how the topology's groups share its devices.
    pub layout: LayoutKind,
    pub global_batch: usize,
    pub options: CostOptions,
    pub ranks: Vec<RankPlan>,
    pub image_params: usize,
    pub text_params: usize,
    pub image_forward_gflops: f64,
    pub text_forward_gflops: f64,
    pub traffic: Traffic,
    /// None when the topology lacks device kinds or links (and no calibration).
    pub split: Option<SplitEstimate>,
    pub data_parallel: Option<DataParallelEstimate>,
    /// Why there is no estimate, when there is none.
    pub no_estimate: Option<String>,
    pub warnings: Vec<String>,
    /// Warnings from comparing the split with plain data parallelism (which `--auto`'s
    /// own report already makes).
    pub data_parallel_warnings: Vec<String>,
}

fn encoder_name(model: &ClipConfig, tower: Tower) -> &'static str {
    match (tower, &model.vision, &model.text) {
        (Tower::Image, ImageTowerConfig::Vit(_), _) => "vit",
        (Tower::Image, ImageTowerConfig::Resnet(_), _) => "resnet",
        (Tower::Text, _, TextTowerConfig::Clip(_)) => "clip-text",
        (Tower::Text, _, TextTowerConfig::Bert(_)) => "bert",
    }
}

impl Plan {
    pub fn new(topology: &Topology, model: &ClipConfig, options: &CostOptions) -> Result<Self> {
        let global_batch = options.global_batch;
        topology.check_batch(global_batch, "--batch")?;
        // Features and normalisers travel in fp32, gradients as the all-reduce sums them.
        // logit_scale lives on both groups but its gradient comes from the world scalar
        // all-reduce, not from the group's gradient bucket.
        let bytes = 4;
        let grad_bytes = options.grad_reduce.bytes() as u64;
        let image_params = model.vision.size().num_params(model.embed_dim);
        let text_params = model.text.size().num_params(model.embed_dim);
        let b = global_batch as u64;
        let per_group = |f: &dyn Fn(Tower) -> u64| {
            [
                (Tower::Image, f(Tower::Image)),
                (Tower::Text, f(Tower::Text)),
            ]
        };
        let size = |t: Tower| topology.group_size(t) as u64;
        // The text group's token table travels as its batch's rows (an upper bound on them).
        let trained_of = |t: Tower| {
            if model.is_locked(t) {
                0
            } else {
                model
                    .tower_size(t)
                    .grad_all_reduce_elems(model.embed_dim, global_batch) as u64
            }
        };
        let traffic = Traffic {
            feature_all_gather: 2 * b * model.embed_dim as u64 * bytes,
            loss_exchange: per_group(&|t| {
                options
                    .loss
                    .exchange_payload(topology, t, global_batch, model.embed_dim, 4)
            }),
            loss_exchange_by_scheme: [Exchange::Lse, Exchange::GatherScatter]
                .into_iter()
                .map(|exchange| {
                    let loss = LossConfig {
                        exchange,
                        ..options.loss
                    };
                    (
                        exchange.to_string(),
                        per_group(&|t| {
                            loss.exchange_payload(topology, t, global_batch, model.embed_dim, 4)
                        }),
                    )
                })
                .collect(),
            grad_all_reduce: per_group(&|t| {
                if size(t) > 1 {
                    trained_of(t) * grad_bytes
                } else {
                    0
                }
            }),
            grad_ring_per_rank: per_group(&|t| {
                2 * (size(t) - 1) * trained_of(t) * grad_bytes / size(t)
            }),
            scalars: 3 * 8,
        };

        let cost = CostModel {
            topology,
            model,
            options,
        };
        let mut warnings = Vec::new();
        let mut data_parallel_warnings = Vec::new();
        let (split, data_parallel, no_estimate) = match cost.split() {
            Ok(split) => {
                let dp = match cost.data_parallel() {
                    Ok(dp) => Some(dp),
                    Err(e) => {
                        data_parallel_warnings.push(format!("no data-parallel comparison: {e}"));
                        None
                    }
                };
                (Some(split), dp, None)
            }
            Err(e) => (None, None, Some(e.to_string())),
        };
        if let Some(s) = &split {
            for g in &s.groups {
                if !g.memory.fits {
                    warnings.push(format!(
                        "the {} group needs {} per device but its devices have {}: lower the batch, \
                         turn on --checkpointing, or give the group more devices",
                        g.tower,
                        gib(g.memory.total),
                        gib(g.memory.device)
                    ));
                }
            }
            if let Some(dp) = &data_parallel {
                if dp.step_s < s.step_s && dp.memory.fits {
                    data_parallel_warnings.push(format!(
                        "this {} layout is {:.2}x slower than plain data parallelism on the same devices \
                         ({} vs {} per step)",
                        topology.layout_kind(),
                        s.step_s / dp.step_s,
                        secs(s.step_s),
                        secs(dp.step_s)
                    ));
                }
            }
        }

        let ranks = topology
            .ranks
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                // The rank's device, both towers where it holds both (counted once).
                let memory = split
                    .as_ref()
                    .and_then(|s| s.rank_memory_bytes.get(i).copied());
                r.roles.iter().map(move |role| RankPlan {
                    global_rank: r.global,
                    node: topology.nodes[r.node].name.clone(),
                    device: topology.device_label(r),
                    kind: topology.spec(r.node).map(|s| s.name.clone()),
                    tower: role.tower,
                    group_rank: role.group_rank,
                    encoder: encoder_name(model, role.tower).to_string(),
                    local_batch: crate::topology::layout::split_len(
                        global_batch,
                        topology.group_size(role.tower),
                        role.group_rank,
                    ),
                    memory_bytes: memory,
                })
            })
            .collect();
        Ok(Plan {
            topology: topology.source.display().to_string(),
            layout: topology.layout_kind(),
            global_batch,
            options: options.clone(),
            ranks,
            image_params,
            text_params,
            image_forward_gflops: model.vision.size().forward_flops(model.embed_dim) / 1e9,
            text_forward_gflops: model.text.size().forward_flops(model.embed_dim) / 1e9,
            traffic,
            split,
            data_parallel,
            no_estimate,
            warnings,
            data_parallel_warnings,
        })
    }

    /// The human-readable plan `mmpipe plan` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let o = &self.options;
        let _ = writeln!(
            s,
            "topology {}, global batch {}, {:?}, {:?}{}{}",
            self.topology,
            self.global_batch,
            o.precision,
            o.optimizer,
            if o.checkpointing {
                ", checkpointing"
            } else {
                ""
            },
            if o.calibration.is_some() {
                ", calibrated rates"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "image tower {:.2} M parameters, {:.2} GFLOPs/sample forward; text tower {:.2} M, {:.2} GFLOPs",
            self.image_params as f64 / 1e6,
            self.image_forward_gflops,
            self.text_params as f64 / 1e6,
            self.text_forward_gflops
        );
        let _ = writeln!(
            s,
            "\n{:>4}  {:<10} {:<8} {:<8} {:<5} {:>10}  {:<9} {:>11} {:>10}",
            "rank",
            "node",
            "device",
            "kind",
            "group",
            "group-rank",
            "tower",
            "local-batch",
            "memory"
        );
        for r in &self.ranks {
            let _ = writeln!(
                s,
                "{:>4}  {:<10} {:<8} {:<8} {:<5} {:>10}  {:<9} {:>11} {:>10}",
                r.global_rank,
                r.node,
                r.device,
                r.kind.as_deref().unwrap_or("-"),
                r.tower,
                r.group_rank,
                r.encoder,
                r.local_batch,
                r.memory_bytes.map_or("-".into(), gib)
            );
        }
        let t = &self.traffic;
        let _ = writeln!(s, "\nbytes per step:");
        let _ = writeln!(
            s,
            "  feature all-gather (world, across groups): {}",
            human_bytes(t.feature_all_gather)
        );
        let loss = &self.options.loss;
        let what = match (loss.exchange, loss.kind) {
            (Exchange::Lse, LossKind::Clip) => "normaliser partials",
            (Exchange::Lse, LossKind::Siglip) => "scalars only",
            (Exchange::GatherScatter, _) => "returned feature gradients",
        };
        for ((tower, exchange), ((_, grad), (_, ring))) in t
            .loss_exchange
            .iter()
            .zip(t.grad_all_reduce.iter().zip(&t.grad_ring_per_rank))
        {
            let _ = writeln!(
                s,
                "  {tower:<5} group, per rank: loss exchange {} ({what}); gradient all-reduce {}, {} sent in a ring",
                human_bytes(*exchange),
                human_bytes(*grad),
                human_bytes(*ring)
            );
        }
        let _ = writeln!(
            s,
            "  of which the loss's scalars (loss, temperature and bias gradients; world all-reduce): {}",
            human_bytes(t.scalars)
        );
        let schemes: Vec<String> = t
            .loss_exchange_by_scheme
            .iter()
            .map(|(name, per)| {
                format!(
                    "{name}: image {}, text {}",
                    short_bytes(per[0].1),
                    short_bytes(per[1].1)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "  {} loss exchange per rank by scheme (chosen: {}, tile {}): {}",
            loss.kind,
            loss.exchange,
            loss.tile,
            schemes.join("; ")
        );

        match (&self.split, &self.no_estimate) {
            (Some(split), _) => {
                let _ = writeln!(
                    s,
                    "\npredicted step ({}): {} ({:.0} samples/s)",
                    self.layout,
                    secs(split.step_s),
                    split.samples_per_s
                );
                let _ = writeln!(
                    s,
                    "  {:<10} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10}",
                    "devices", "ranks", "compute", "comm", "idle", "idle %", "memory"
                );
                for c in &split.classes {
                    let _ = writeln!(
                        s,
                        "  {:<10} {:>5} {:>10} {:>10} {:>10} {:>9.1}% {:>10}{}",
                        c.towers,
                        c.ranks,
                        secs(c.compute_s),
                        secs(c.comm_s),
                        secs(c.idle_s),
                        100.0 * c.idle_s / split.step_s,
                        gib(c.memory.total),
                        if c.memory.fits { "" } else { "  DOES NOT FIT" }
                    );
                }
                let _ = writeln!(
                    s,
                    "  {:<10} {:>5}  {:<10} {:>12}",
                    "group", "ranks", "ring link", "grad a-r"
                );
                for g in &split.groups {
                    let _ = writeln!(
                        s,
                        "  {:<10} {:>5}  {:<10} {:>12}",
                        g.tower,
                        g.ranks,
                        g.link,
                        secs(g.grad_all_reduce_s)
                    );
                }
                let idlest = split
                    .classes
                    .iter()
                    .max_by(|a, b| a.idle_s.total_cmp(&b.idle_s))
                    .expect("a layout has devices");
                let _ = writeln!(
                    s,
                    "  feature all-gather {}{}; the least busy devices ({}) idle {:.1}% of the step",
                    secs(split.feature_all_gather_s),
                    if split.feature_all_gather_exposed_s < split.feature_all_gather_s {
                        format!(
                            " (exposed {}: the image features' gather runs during the text forward)",
                            secs(split.feature_all_gather_exposed_s)
                        )
                    } else {
                        String::new()
                    },
                    idlest.towers,
                    100.0 * idlest.idle_s / split.step_s
                );
                if let Some(dp) = &self.data_parallel {
                    let _ = writeln!(
                        s,
                        "\nplain data parallelism on the same {} devices: {} per step ({:.0} samples/s), \
                         compute {}, comm {} ({} ring), memory {}/device{}",
                        dp.ranks,
                        secs(dp.step_s),
                        dp.samples_per_s,
                        secs(dp.compute_s),
                        secs(dp.step_s - dp.compute_s),
                        dp.link,
                        gib(dp.memory.total),
                        if dp.memory.fits { "" } else { " — DOES NOT FIT" }
                    );
                    let ratio = dp.step_s / split.step_s;
                    let _ = writeln!(
                        s,
                        "  {} vs data parallel: {:.2}x {}",
                        self.layout,
                        if ratio >= 1.0 { ratio } else { 1.0 / ratio },
                        if ratio >= 1.0 { "faster" } else { "slower" }
                    );
                }
            }
            (None, Some(why)) => {
                let _ = writeln!(s, "\nno time estimate: {why}");
            }
            (None, None) => {}
        }
        for w in self.warnings.iter().chain(&self.data_parallel_warnings) {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

pub fn gib(bytes: f64) -> String {
    if bytes.is_infinite() {
        "unknown".into()
    } else if bytes >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes / (1u64 << 20) as f64)
    }
}

pub fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{:.0} µs", s * 1e6)
    }
}

pub fn human_bytes(b: u64) -> String {
    let short = short_bytes(b);
    if b < 1024 {
        short
    } else {
        format!("{short} ({b} B)")
    }
}

/// `b` in the largest binary unit below it, without the exact count: for tables.
pub fn short_bytes(b: u64) -> String {
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
        format!("{v:.2} {}", UNITS[u])
    }
}
