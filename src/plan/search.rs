//! `mmpipe plan --auto`: search the layouts of three kinds (which devices hold which
//! towers, and so the group sizes) and rank them by predicted step time:
//! - splits cut an ordering of the devices in two: the first `k` devices for one tower,
//!   the rest for the other, for every `k` and both towers first;
//! - data parallelism puts both towers on every device;
//! - hybrids put one tower on every device and the other on the first `k` of an
//!   ordering, for every `k` and both towers.
//!
//! Orderings: node by node as listed (so a group stays inside as few nodes as possible and
//! its all-reduce on the fast links), across the nodes in turn (so a small group spreads
//! over every node), and, on mixed clusters, fastest kind first and slowest kind first (so
//! either tower can get the faster devices). A layout that does not fit in memory, even
//! with gradient checkpointing and micro-batches, is not chosen.

use serde::{Deserialize, Serialize};

use super::cost::{CostModel, SplitEstimate};
use super::options::{CostOptions, MicroBatch};
use crate::error::{Error, Result};
use crate::model::{ClipConfig, ImageTowerConfig};
use crate::topology::{DeviceRef, LayoutKind, Topology, Tower};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Split, data parallel or hybrid.
    pub kind: LayoutKind,
    /// Group entries as a topology file writes them ("node0:0-5").
    pub image: Vec<String>,
    pub text: Vec<String>,
    /// The same devices as (node index, device index), in group-rank order.
    pub image_devices: Vec<DeviceRef>,
    pub text_devices: Vec<DeviceRef>,
    pub split: SplitEstimate,
    /// What this split needs to fit in memory beyond the options asked for, as flags
    /// (`--checkpointing`, `--micro-batch-image N`); empty when it fits as asked.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Whether it was costed with gradient checkpointing, and with which micro-batches
    /// (the options asked for, or what `needs` adds).
    pub checkpointing: bool,
    pub micro_batch: MicroBatch,
}

impl Candidate {
    /// `options` as this candidate was costed: with what it needs to fit.
    pub fn options(&self, options: &CostOptions) -> CostOptions {
        CostOptions {
            checkpointing: self.checkpointing,
            micro_batch: self.micro_batch,
            ..options.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoPlan {
    /// Best first: the fastest layouts, then the best of each kind not among them.
    pub candidates: Vec<Candidate>,
    /// Layouts costed, by kind.
    pub considered: Vec<(LayoutKind, usize)>,
    /// Layouts with a group of more ranks than the batch has samples.
    pub too_small: usize,
    /// Layouts whose memory exceeds a device even with checkpointing and micro-batches,
    /// by kind.
    pub too_big: Vec<(LayoutKind, usize)>,
    pub warnings: Vec<String>,
}

/// The three kinds, in the order the report lists them.
const KINDS: [LayoutKind; 3] = [
    LayoutKind::Split,
    LayoutKind::DataParallel,
    LayoutKind::Hybrid,
];

fn count(counts: &[(LayoutKind, usize)], kind: LayoutKind) -> usize {
    counts
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(0, |(_, n)| *n)
}

fn bump(counts: &mut [(LayoutKind, usize)], kind: LayoutKind) {
    if let Some((_, n)) = counts.iter_mut().find(|(k, _)| *k == kind) {
        *n += 1;
    }
}

/// Writes devices as topology-file entries, merging consecutive indices on a node.
pub fn entries(topology: &Topology, devices: &[DeviceRef]) -> Vec<String> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    for &(node, d) in devices {
        match out.last_mut() {
            Some((n, _, last)) if *n == node && *last + 1 == d => *last = d,
            _ => out.push((node, d, d)),
        }
    }
    out.into_iter()
        .map(|(n, first, last)| {
            let name = &topology.nodes[n].name;
            if first == last {
                format!("{name}:{first}")
            } else {
                format!("{name}:{first}-{last}")
            }
        })
        .collect()
}

fn orderings(topology: &Topology) -> Vec<Vec<DeviceRef>> {
    let listed = topology.devices();
    let speed =
        |&(node, _): &DeviceRef| topology.spec(node).map_or(0.0, |s| s.tflops * s.efficiency);
    let mut fastest_first = listed.clone();
    fastest_first.sort_by(|a, b| speed(b).total_cmp(&speed(a)));
    let mut slowest_first = listed.clone();
    slowest_first.sort_by(|a, b| speed(a).total_cmp(&speed(b)));
    // Device 0 of every node, then device 1 of every node, …
    let mut across = listed.clone();
    across.sort_by_key(|&(node, d)| (d, node));
    let mut out = vec![listed];
    for o in [across, fastest_first, slowest_first] {
        if !out.contains(&o) {
            out.push(o);
        }
    }
    out
}

/// The (image, text) device lists of every layout the search considers, with its kind.
fn layouts(topology: &Topology) -> Vec<(LayoutKind, Vec<DeviceRef>, Vec<DeviceRef>)> {
    let mut out = Vec::new();
    for order in orderings(topology) {
        out.push((LayoutKind::DataParallel, order.clone(), order.clone()));
        for k in 1..order.len() {
            let (a, b) = order.split_at(k);
            out.push((LayoutKind::Split, a.to_vec(), b.to_vec()));
            out.push((LayoutKind::Split, b.to_vec(), a.to_vec()));
            out.push((LayoutKind::Hybrid, order.clone(), a.to_vec()));
            out.push((LayoutKind::Hybrid, a.to_vec(), order.clone()));
        }
    }
    out
}

pub fn search(
    topology: &Topology,
    model: &ClipConfig,
    options: &CostOptions,
    keep: usize,
) -> Result<AutoPlan> {
    if topology.devices().is_empty() {
        return Err(Error::invalid(&topology.source, "nodes", "no devices"));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut candidates = Vec::new();
    let mut considered: Vec<(LayoutKind, usize)> = KINDS.iter().map(|&k| (k, 0)).collect();
    let mut too_big = considered.clone();
    let mut too_small = 0;
    for (kind, mut image, mut text) in layouts(topology) {
        // A group is a set: its cost is its members', whatever their order, and in device
        // order it reads (and its ranks launch) node by node.
        image.sort();
        text.sort();
        if !seen.insert((image.clone(), text.clone())) {
            continue;
        }
        bump(&mut considered, kind);
        // Any batch splits (the first ranks get one more), as long as every rank gets a
        // sample.
        if options.global_batch < image.len().max(text.len()) {
            too_small += 1;
            continue;
        }
        let t = topology.with_groups(&image, &text)?;
        let Some((split, fitted, needs)) = fitting(&t, model, options)? else {
            bump(&mut too_big, kind);
            continue;
        };
        candidates.push(Candidate {
            kind,
            image: entries(topology, &image),
            text: entries(topology, &text),
            image_devices: image,
            text_devices: text,
            split,
            needs,
            checkpointing: fitted.checkpointing,
            micro_batch: fitted.micro_batch,
        });
    }
    let total: usize = considered.iter().map(|(_, n)| n).sum();
    if candidates.is_empty() {
        return Err(Error::File {
            path: topology.source.to_path_buf(),
            message: format!(
                "no layout works for a global batch of {}: of {total} layouts, {too_small} have more \
                 ranks in a group than samples and {} do not fit in device memory even with gradient \
                 checkpointing and micro-batches of one sample (lower the batch)",
                options.global_batch,
                total - too_small
            ),
        });
    }
    candidates.sort_by(|a, b| a.split.step_s.total_cmp(&b.split.step_s));
    // The fastest, then the best of each kind not among them (the runners-up to compare).
    let mut kept: Vec<Candidate> = candidates.iter().take(keep.max(1)).cloned().collect();
    for kind in KINDS {
        if !kept.iter().any(|c| c.kind == kind) {
            if let Some(c) = candidates.iter().find(|c| c.kind == kind) {
                kept.push(c.clone());
            }
        }
    }
    let mut warnings = Vec::new();
    for kind in KINDS {
        if count(&considered, kind) > 0 && !candidates.iter().any(|c| c.kind == kind) {
            warnings.push(format!(
                "no {kind} layout fits in device memory, even with gradient checkpointing and micro-batches of one sample"
            ));
        }
    }
    Ok(AutoPlan {
        candidates: kept,
        considered,
        too_small,
        too_big,
        warnings,
    })
}

/// The split of `t` under `options`, or, where a group does not fit, under the least of
/// gradient checkpointing and then GradCache micro-batches (halved until they fit; none
/// for a ResNet, whose batch norm they would change) that makes it fit, with what it
/// needed as flags. None: nothing fits.
fn fitting(
    t: &Topology,
    model: &ClipConfig,
    options: &CostOptions,
) -> Result<Option<(SplitEstimate, CostOptions, Vec<String>)>> {
    let split = |o: &CostOptions| {
        CostModel {
            topology: t,
            model,
            options: o,
        }
        .split()
    };
    let too_big = |s: &SplitEstimate, tower: Tower| {
        s.groups.iter().any(|g| g.tower == tower && !g.memory.fits)
    };
    let fits = |s: &SplitEstimate| s.groups.iter().all(|g| g.memory.fits);
    let mut o = options.clone();
    let mut needs = Vec::new();
    let mut s = split(&o)?;
    if !fits(&s) && !o.checkpointing {
        o.checkpointing = true;
        needs.push("--checkpointing".to_string());
        s = split(&o)?;
    }
    let resnet = matches!(model.vision, ImageTowerConfig::Resnet(_));
    while !fits(&s) {
        let mut halved = false;
        for tower in [Tower::Image, Tower::Text] {
            if !too_big(&s, tower) || (tower == Tower::Image && resnet) {
                continue;
            }
            let local = s
                .groups
                .iter()
                .find(|g| g.tower == tower)
                .map_or(1, |g| g.local_batch);
            let now = o.micro_batch.of(tower).unwrap_or(local).min(local);
            if now > 1 {
                let next = Some(now / 2);
                match tower {
                    Tower::Image => o.micro_batch.image = next,
                    Tower::Text => o.micro_batch.text = next,
                }
                halved = true;
            }
        }
        if !halved {
            return Ok(None);
        }
        s = split(&o)?;
    }
    for (tower, m) in [
        (Tower::Image, o.micro_batch.image),
        (Tower::Text, o.micro_batch.text),
    ] {
        if let Some(m) = m.filter(|_| options.micro_batch.of(tower) != m) {
            needs.push(format!("--micro-batch-{tower} {m}"));
        }
    }
    Ok(Some((s, o, needs)))
}

impl AutoPlan {
    /// The best layout.
    pub fn best(&self) -> &Candidate {
        &self.candidates[0]
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let counts = |c: &[(LayoutKind, usize)]| {
            c.iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "searched {} layouts ({}); {} have more ranks in a group than samples; do not fit: {}. Best first:",
            self.considered.iter().map(|(_, n)| n).sum::<usize>(),
            counts(&self.considered),
            self.too_small,
            counts(&self.too_big)
        );
        let _ = writeln!(
            s,
            "{:>3}  {:<13} {:>10} {:>10}  {:>7} {:>7}  {:<28} {:<28} needs",
            "#", "kind", "step", "samples/s", "image", "text", "image group", "text group"
        );
        for (i, c) in self.candidates.iter().enumerate() {
            let n = |t: Tower| {
                c.split
                    .groups
                    .iter()
                    .find(|g| g.tower == t)
                    .map_or(0, |g| g.ranks)
            };
            let _ = writeln!(
                s,
                "{:>3}  {:<13} {:>10} {:>10.0}  {:>7} {:>7}  {:<28} {:<28} {}",
                i + 1,
                c.kind.to_string(),
                super::secs(c.split.step_s),
                c.split.samples_per_s,
                n(Tower::Image),
                n(Tower::Text),
                c.image.join(","),
                c.text.join(","),
                c.needs.join(" ")
            );
        }
        let best = self.best();
        for kind in KINDS.iter().filter(|&&k| k != best.kind) {
            if let Some(c) = self.candidates.iter().find(|c| c.kind == *kind) {
                let _ = writeln!(
                    s,
                    "best {kind}: {} per step, {:.2}x the best {}",
                    super::secs(c.split.step_s),
                    c.split.step_s / best.split.step_s,
                    best.kind
                );
            }
        }
        let quote = |v: &[String]| {
            v.iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "\nthe best is {}; to use it, put in the topology file (or keep groups = \"auto\", which trains it):\n[groups]\nimage = [{}]\ntext = [{}]",
            best.kind,
            quote(&best.image),
            quote(&best.text)
        );
        if !best.needs.is_empty() {
            let _ = writeln!(
                s,
                "and train it with {} (it does not fit in memory without)",
                best.needs.join(" ")
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}
