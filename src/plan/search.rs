//! `mmpipe plan --auto`: search the split (how many devices each tower gets) and the
//! mapping of the groups onto nodes, and rank the candidates by predicted step time.
//!
//! Candidates cut an ordering of the devices in two: the first `k` devices for one tower,
//! the rest for the other, for every `k` and both towers first. Orderings: node by node as
//! listed (so a group stays inside as few nodes as possible and its all-reduce on the fast
//! links), and, on mixed clusters, fastest kind first and slowest kind first (so either
//! tower can get the faster devices).

use serde::{Deserialize, Serialize};

use super::cost::{CostModel, DataParallelEstimate, SplitEstimate};
use super::options::{CostOptions, MicroBatch};
use crate::error::{Error, Result};
use crate::model::{ClipConfig, ImageTowerConfig};
use crate::topology::{DeviceRef, Topology, Tower};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
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
    /// Best first.
    pub candidates: Vec<Candidate>,
    pub data_parallel: Option<DataParallelEstimate>,
    pub considered: usize,
    /// Splits with a group of more ranks than the batch has samples.
    pub too_small: usize,
    /// Splits whose memory exceeds a device.
    pub too_big: usize,
    pub warnings: Vec<String>,
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
    let mut out = vec![listed];
    for o in [fastest_first, slowest_first] {
        if !out.contains(&o) {
            out.push(o);
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
    let devices = topology.devices();
    if devices.len() < 2 {
        return Err(Error::invalid(
            &topology.source,
            "nodes",
            format!(
                "a split needs at least two devices (one per tower); this cluster has {}",
                devices.len()
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut candidates = Vec::new();
    let (mut considered, mut too_small, mut too_big) = (0, 0, 0);
    for order in orderings(topology) {
        for k in 1..order.len() {
            for first in [Tower::Image, Tower::Text] {
                let (a, b) = order.split_at(k);
                let (image, text) = if first == Tower::Image {
                    (a, b)
                } else {
                    (b, a)
                };
                let mut key = (image.to_vec(), text.to_vec());
                key.0.sort();
                key.1.sort();
                if !seen.insert(key) {
                    continue;
                }
                considered += 1;
                // Any batch splits (the first ranks get one more), as long as every rank
                // gets a sample.
                if options.global_batch < image.len().max(text.len()) {
                    too_small += 1;
                    continue;
                }
                let t = topology.with_groups(image, text)?;
                let Some((split, fitted, needs)) = fitting(&t, model, options)? else {
                    too_big += 1;
                    continue;
                };
                candidates.push(Candidate {
                    image: entries(topology, image),
                    text: entries(topology, text),
                    image_devices: image.to_vec(),
                    text_devices: text.to_vec(),
                    split,
                    needs,
                    checkpointing: fitted.checkpointing,
                    micro_batch: fitted.micro_batch,
                });
            }
        }
    }
    if candidates.is_empty() {
        return Err(Error::File {
 path: topology.source.to_path_buf(),
 message: format!("no split works for a global batch of {}: of {considered} splits, {too_small} have more \
             ranks in a group than samples and {too_big} do not fit in device memory even with gradient checkpointing and \
             micro-batches of one sample (lower the batch)", options.global_batch),
 });
    }
    candidates.sort_by(|a, b| a.split.step_s.total_cmp(&b.split.step_s));
    candidates.truncate(keep.max(1));
    let mut warnings = Vec::new();
    let data_parallel = match (CostModel {
        topology,
        model,
        options,
    })
    .data_parallel()
    {
        Ok(dp) => Some(dp),
        Err(e) => {
            warnings.push(format!("no data-parallel comparison: {e}"));
            None
        }
    };
    if let Some(dp) = &data_parallel {
        let best = &candidates[0].split;
        if dp.memory.fits && dp.step_s < best.step_s {
            warnings.push(format!(
                "the best split ({} per step) loses to plain data parallelism on the same devices ({} per step, \
                 {:.2}x faster): split only for memory or mixed hardware",
                super::secs(best.step_s),
                super::secs(dp.step_s),
                best.step_s / dp.step_s
            ));
        } else if !dp.memory.fits {
            warnings.push(format!(
                "plain data parallelism does not fit ({} per device): the split does",
                super::gib(dp.memory.total)
            ));
        }
    }
    Ok(AutoPlan {
        candidates,
        data_parallel,
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
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "searched {} splits ({} have more ranks in a group than samples, {} do not fit); best first:",
            self.considered, self.too_small, self.too_big
        );
        let _ = writeln!(
            s,
            "{:>3}  {:>10} {:>10}  {:>7} {:>7}  {:<28} {:<28} needs",
            "#", "step", "samples/s", "image", "text", "image group", "text group"
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
                "{:>3}  {:>10} {:>10.0}  {:>7} {:>7}  {:<28} {:<28} {}",
                i + 1,
                super::secs(c.split.step_s),
                c.split.samples_per_s,
                n(Tower::Image),
                n(Tower::Text),
                c.image.join(","),
                c.text.join(","),
                c.needs.join(" ")
            );
        }
        if let Some(dp) = &self.data_parallel {
            let _ = writeln!(
                s,
                "data parallel on all {} devices: {} per step ({:.0} samples/s), memory {}/device{}",
                dp.ranks,
                super::secs(dp.step_s),
                dp.samples_per_s,
                super::gib(dp.memory.total),
                if dp.memory.fits { "" } else { " — DOES NOT FIT" }
            );
        }
        let best = &self.candidates[0];
        let quote = |v: &[String]| {
            v.iter()
                .map(|e| format!("\"{e}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "\nto use the best, put in the topology file:\n[groups]\nimage = [{}]\ntext = [{}]",
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
