//! Topology files: which devices exist, on which nodes, and which of them form the image
//! group and the text group. Everything is checked when the file is read, so the rest of
//! the program only ever sees a consistent layout.
//!
//! ```toml
//! device = "cuda"                 # or "cpu": one rank thread per device
//! groups = "auto"                 # or a [groups] table (below)
//! [device_kinds.h100]             # for the cost model: peak TFLOP/s, memory, efficiency
//! tflops = 989.0
//! memory_gib = 80.0
//! [links]                         # GB/s per device, one direction; latency in µs
//! intra_node_gbps = 450.0
//! intra_node_latency_us = 3.0
//! inter_node_gbps = 50.0
//! inter_node_latency_us = 8.0
//! [[nodes]]
//! name = "node0"
//! devices = 4
//! kind = "h100"                   # optional when one kind is declared
//! [groups]
//! image = ["node0:0-3"]           # "NODE:INDEX" or "NODE:FIRST-LAST"
//! text = ["node1:0-3"]
//! ```
//!
//! Global ranks follow the launcher convention: node by node, device index within a node.
//! Ranks inside a group follow the order of the group's list.
//!
//! A device may be listed in both groups: its rank then holds both towers and runs them
//! one after the other (plain data parallelism lists every device in both; a hybrid
//! lists some). Every device must be in at least one group.

pub mod layout;

use std::fmt;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{parse_toml, read_toml, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// The two encoders; each group of ranks trains one of them (a rank in both groups holds
/// both).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Tower {
    Image,
    Text,
}

impl Tower {
    pub fn name(self) -> &'static str {
        match self {
            Tower::Image => "image",
            Tower::Text => "text",
        }
    }
}

impl fmt::Display for Tower {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// How the towers share the devices.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutKind {
    /// Every device holds one tower: the image and text groups are disjoint.
    Split,
    /// Every device holds both towers (OpenCLIP's layout).
    DataParallel,
    /// Some devices hold both towers, the others one.
    Hybrid,
}

impl fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            LayoutKind::Split => "split",
            LayoutKind::DataParallel => "data parallel",
            LayoutKind::Hybrid => "hybrid",
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    name: Option<String>,
    device: DeviceKind,
    #[serde(default)]
    device_kinds: BTreeMap<String, DeviceSpecFile>,
    links: Option<Links>,
    nodes: Vec<NodeFile>,
    /// `"auto"`, or a table with `image` and `text` lists.
    groups: toml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    devices: usize,
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupsFile {
    image: Vec<String>,
    text: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceSpecFile {
    tflops: f64,
    memory_gib: f64,
    efficiency: Option<f64>,
}

/// One kind of device: what the cost model needs to know of it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct DeviceSpec {
    pub name: String,
    /// Peak dense TFLOP/s at the training precision.
    pub tflops: f64,
    pub memory_gib: f64,
    /// The fraction of peak a training step sustains (model FLOPs utilisation).
    pub efficiency: f64,
}

/// The default sustained fraction of peak: typical of well-tuned transformer training.
pub const DEFAULT_EFFICIENCY: f64 = 0.4;

/// Bandwidths (GB/s, one direction, per device) and latencies of the two kinds of link.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    pub intra_node_gbps: f64,
    pub intra_node_latency_us: f64,
    pub inter_node_gbps: f64,
    pub inter_node_latency_us: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub devices: usize,
    /// Index into [`Topology::kinds`]; None when the file declares no device kinds.
    pub kind: Option<usize>,
}

/// A device, by node index and index on the node.
pub type DeviceRef = (usize, usize);

/// One rank: a device and the towers it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rank {
    pub global: usize,
    pub node: usize,
    pub device: usize,
    /// The towers this rank holds, image first: one, or both.
    pub roles: Vec<Role>,
}

/// A tower a rank holds, and the rank's place in that tower's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    pub tower: Tower,
    /// Position inside the tower's group.
    pub group_rank: usize,
}

impl Rank {
    /// This rank's role in `tower`'s group, if it holds that tower.
    pub fn role(&self, tower: Tower) -> Option<Role> {
        self.roles.iter().copied().find(|r| r.tower == tower)
    }

    pub fn holds(&self, tower: Tower) -> bool {
        self.role(tower).is_some()
    }

    /// What the rank holds, for messages and tables: "image", "text" or "image+text".
    pub fn label(&self) -> String {
        let names: Vec<&str> = self.roles.iter().map(|r| r.tower.name()).collect();
        names.join("+")
    }
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub name: String,
    /// Where it was read from; named in every later error about it.
    pub source: PathBuf,
    pub device: DeviceKind,
    pub kinds: Vec<DeviceSpec>,
    pub links: Option<Links>,
    pub nodes: Vec<Node>,
    /// Indexed by global rank; empty while the groups are `auto` (see [`Self::with_groups`]).
    pub ranks: Vec<Rank>,
    /// The file asked the planner to choose the groups.
    pub auto_groups: bool,
}

/// The topology `mmpipe train` uses when given none: two image rank threads, one text.
pub const DEFAULT_CPU_2X1: &str = include_str!("../../topology/cpu-2x1.toml");

impl Topology {
    pub fn from_file(path: &Path) -> Result<Self> {
        let file: TopologyFile = read_toml(path)?;
        Self::build(file, path)
    }

    /// Parses topology text; `origin` is the name used in errors.
    pub fn from_str(text: &str, origin: &Path) -> Result<Self> {
        let file: TopologyFile = parse_toml(text, origin)?;
        Self::build(file, origin)
    }

    pub fn default_cpu() -> Self {
        Self::from_str(DEFAULT_CPU_2X1, Path::new("topology/cpu-2x1.toml"))
            .expect("the built-in topology is valid")
    }

    fn build(file: TopologyFile, path: &Path) -> Result<Self> {
        let err = |field: String, msg: String| Error::invalid(path, field, msg);
        let mut kinds = Vec::new();
        for (name, k) in &file.device_kinds {
            let field = |f: &str| format!("device_kinds.{name}.{f}");
            if !(k.tflops.is_finite() && k.tflops > 0.0) {
                return Err(err(
                    field("tflops"),
                    format!("{} is not a positive throughput", k.tflops),
                ));
            }
            if !(k.memory_gib.is_finite() && k.memory_gib > 0.0) {
                return Err(err(
                    field("memory_gib"),
                    format!("{} is not a positive size", k.memory_gib),
                ));
            }
            let efficiency = k.efficiency.unwrap_or(DEFAULT_EFFICIENCY);
            if !(efficiency > 0.0 && efficiency <= 1.0) {
                return Err(err(
                    field("efficiency"),
                    format!("{efficiency} is not in (0, 1]"),
                ));
            }
            kinds.push(DeviceSpec {
                name: name.clone(),
                tflops: k.tflops,
                memory_gib: k.memory_gib,
                efficiency,
            });
        }
        if let Some(l) = &file.links {
            for (f, v) in [
                ("intra_node_gbps", l.intra_node_gbps),
                ("inter_node_gbps", l.inter_node_gbps),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(err(
                        format!("links.{f}"),
                        format!("{v} is not a positive bandwidth"),
                    ));
                }
            }
            for (f, v) in [
                ("intra_node_latency_us", l.intra_node_latency_us),
                ("inter_node_latency_us", l.inter_node_latency_us),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(err(format!("links.{f}"), format!("{v} is not a latency")));
                }
            }
        }
        if file.nodes.is_empty() {
            return Err(err(
                "nodes".into(),
                "no nodes listed: add at least one [[nodes]] table".into(),
            ));
        }
        let mut nodes = Vec::new();
        for (i, n) in file.nodes.iter().enumerate() {
            if n.name.is_empty() || n.name.contains(':') {
                return Err(err(
                    format!("nodes[{i}].name"),
                    format!(
                        "node name `{}` must be non-empty and contain no ':'",
                        n.name
                    ),
                ));
            }
            if nodes.iter().any(|m: &Node| m.name == n.name) {
                return Err(err(
                    format!("nodes[{i}].name"),
                    format!("node `{}` is listed twice", n.name),
                ));
            }
            if n.devices == 0 {
                return Err(err(
                    format!("nodes[{i}].devices"),
                    format!("node `{}` has no devices", n.name),
                ));
            }
            let kind = match (&n.kind, kinds.len()) {
                (None, 0) => None,
                (None, 1) => Some(0),
                (None, _) => {
                    return Err(err(
                        format!("nodes[{i}].kind"),
                        "several device kinds are declared: name this node's".into(),
                    ))
                }
                (Some(k), _) => Some(kinds.iter().position(|d| &d.name == k).ok_or_else(|| {
                    let known: Vec<&str> = kinds.iter().map(|d| d.name.as_str()).collect();
                    err(
                        format!("nodes[{i}].kind"),
                        format!("unknown device kind `{k}` (declared: {})", known.join(", ")),
                    )
                })?),
            };
            nodes.push(Node {
                name: n.name.clone(),
                devices: n.devices,
                kind,
            });
        }
        let name = file.name.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "topology".into())
        });
        let mut topology = Topology {
            name,
            source: path.to_path_buf(),
            device: file.device,
            kinds,
            links: file.links,
            nodes,
            ranks: Vec::new(),
            auto_groups: false,
        };
        match file.groups {
            toml::Value::String(s) if s == "auto" => {
                topology.auto_groups = true;
                Ok(topology)
            }
            toml::Value::Table(t) => {
                let groups =
                    GroupsFile::deserialize(t).map_err(|e| err("groups".into(), e.to_string()))?;
                let mut parsed = Vec::new();
                for (tower, list) in [(Tower::Image, &groups.image), (Tower::Text, &groups.text)] {
                    let mut entries = Vec::new();
                    for (i, entry) in list.iter().enumerate() {
                        let field = format!("groups.{tower}[{i}]");
                        let (node, devices) = parse_device_ref(entry, &topology.nodes)
                            .map_err(|m| err(field.clone(), m))?;
                        entries.push((field, devices.into_iter().map(|d| (node, d)).collect()));
                    }
                    parsed.push(entries);
                }
                let text = parsed.pop().expect("two towers");
                let image = parsed.pop().expect("two towers");
                topology.assign(&image, &text)?;
                Ok(topology)
            }
            other => Err(err(
                "groups".into(),
                format!("expected \"auto\" or a table with `image` and `text`, found {other}"),
            )),
        }
    }

    /// This cluster with the given groups (group rank = list order), checked as a file is.
    pub fn with_groups(&self, image: &[DeviceRef], text: &[DeviceRef]) -> Result<Self> {
        let mut t = self.clone();
        t.auto_groups = false;
        let named = |tower: Tower, list: &[DeviceRef]| -> Vec<(String, Vec<DeviceRef>)> {
            list.iter()
                .enumerate()
                .map(|(i, d)| (format!("groups.{tower}[{i}]"), vec![*d]))
                .collect()
        };
        t.assign(&named(Tower::Image, image), &named(Tower::Text, text))?;
        Ok(t)
    }

    /// Fills `ranks` from the groups' entries, each (field name, devices). A device may be
    /// in both groups, but only once in each.
    fn assign(
        &mut self,
        image: &[(String, Vec<DeviceRef>)],
        text: &[(String, Vec<DeviceRef>)],
    ) -> Result<()> {
        let err = |field: String, msg: String| Error::invalid(&self.source, field, msg);
        let nodes = &self.nodes;
        // (node, device) -> its roles, each with the field that gave it
        let mut owner: Vec<Vec<Vec<(Role, String)>>> =
            nodes.iter().map(|n| vec![Vec::new(); n.devices]).collect();
        for (tower, entries) in [(Tower::Image, image), (Tower::Text, text)] {
            if entries.is_empty() {
                return Err(err(
                    format!("groups.{tower}"),
                    format!("the {tower} group is empty: it needs at least one device"),
                ));
            }
            let mut group_rank = 0;
            for (field, devices) in entries {
                for &(node, d) in devices {
                    if node >= nodes.len() || d >= nodes[node].devices {
                        return Err(err(field.clone(), format!("no device {d} on node {node}")));
                    }
                    if let Some((_, f)) = owner[node][d].iter().find(|(r, _)| r.tower == tower) {
                        return Err(err(
                            field.clone(),
                            format!(
                                "device {}:{d} is listed twice in the {tower} group (first in `{f}`): \
                                 a device holds at most one replica of a tower",
                                nodes[node].name
                            ),
                        ));
                    }
                    owner[node][d].push((Role { tower, group_rank }, field.clone()));
                    group_rank += 1;
                }
            }
        }
        let mut ranks = Vec::new();
        for (n, devs) in owner.iter().enumerate() {
            for (d, roles) in devs.iter().enumerate() {
                if roles.is_empty() {
                    return Err(err(
                        "groups".into(),
                        format!(
                            "device {}:{d} is in neither group: every device of a node must be given a tower \
                             (or lower nodes[{n}].devices)",
                            nodes[n].name
                        ),
                    ));
                }
                ranks.push(Rank {
                    global: ranks.len(),
                    node: n,
                    device: d,
                    roles: roles.iter().map(|(r, _)| *r).collect(),
                });
            }
        }
        self.ranks = ranks;
        Ok(())
    }

    /// Errors when the groups are still `auto`: what needs ranks calls this first.
    pub fn require_groups(&self) -> Result<()> {
        if self.auto_groups {
            return Err(Error::invalid(
                &self.source,
                "groups",
                "the groups are \"auto\": run `mmpipe plan --auto` to choose them, then list them in the file",
            ));
        }
        Ok(())
    }

    /// Every device, node by node.
    pub fn devices(&self) -> Vec<DeviceRef> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(n, node)| (0..node.devices).map(move |d| (n, d)))
            .collect()
    }

    /// The device spec of a node, if the file declares kinds.
    pub fn spec(&self, node: usize) -> Option<&DeviceSpec> {
        self.nodes[node].kind.map(|k| &self.kinds[k])
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Global ranks of a tower's group, in group-rank order.
    pub fn group(&self, tower: Tower) -> Vec<usize> {
        let mut members: Vec<(usize, usize)> = self
            .ranks
            .iter()
            .filter_map(|r| r.role(tower).map(|role| (role.group_rank, r.global)))
            .collect();
        members.sort();
        members.into_iter().map(|(_, g)| g).collect()
    }

    pub fn group_size(&self, tower: Tower) -> usize {
        self.ranks.iter().filter(|r| r.holds(tower)).count()
    }

    /// The groups in words: "2 image + 1 text ranks", "2 ranks, each holding both towers",
    /// or "3 ranks: image on 3, text on 2 (2 hold both)".
    pub fn describe_groups(&self) -> String {
        let (image, text) = (self.group_size(Tower::Image), self.group_size(Tower::Text));
        match self.layout_kind() {
            LayoutKind::Split => format!("{image} image + {text} text ranks"),
            LayoutKind::DataParallel => {
                format!("{} ranks, each holding both towers", self.world_size())
            }
            LayoutKind::Hybrid => format!(
                "{} ranks: image on {image}, text on {text} ({} hold both)",
                self.world_size(),
                self.ranks.iter().filter(|r| r.roles.len() == 2).count()
            ),
        }
    }

    /// What kind of layout the groups make: every device holds one tower (a split),
    /// every device both (data parallel), or some both (a hybrid).
    pub fn layout_kind(&self) -> LayoutKind {
        let both = self.ranks.iter().filter(|r| r.roles.len() == 2).count();
        if both == 0 {
            LayoutKind::Split
        } else if both == self.ranks.len() {
            LayoutKind::DataParallel
        } else {
            LayoutKind::Hybrid
        }
    }

    /// Checks that a global batch gives every rank of both groups at least one sample (it
    /// splits as evenly as it can: [`layout::split_len`], the first ranks one more).
    /// `batch_origin` names where the batch size came from (a config field or a flag).
    pub fn check_batch(&self, global_batch: usize, batch_origin: &str) -> Result<()> {
        self.require_groups()?;
        if global_batch == 0 {
            return Err(Error::Msg(format!(
                "{batch_origin}: the global batch must be at least 1"
            )));
        }
        for tower in [Tower::Image, Tower::Text] {
            let size = self.group_size(tower);
            if global_batch < size {
                return Err(Error::invalid(
                    &self.source,
                    format!("groups.{tower}"),
                    format!(
                        "the global batch {global_batch} (from {batch_origin}) is smaller than the {tower} \
                         group's {size} ranks: every rank needs at least one sample"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn device_label(&self, rank: &Rank) -> String {
        format!("{}:{}", self.device, rank.device)
    }
}

/// Parses "node:3" or "node:0-3" against the declared nodes.
fn parse_device_ref(
    entry: &str,
    nodes: &[Node],
) -> std::result::Result<(usize, Vec<usize>), String> {
    let Some((node_name, range)) = entry.split_once(':') else {
        return Err(format!(
            "device `{entry}` must be written NODE:INDEX or NODE:FIRST-LAST"
        ));
    };
    let Some(node) = nodes.iter().position(|n| n.name == node_name) else {
        let known: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        return Err(format!(
            "unknown device `{entry}`: no node named `{node_name}` (nodes: {})",
            known.join(", ")
        ));
    };
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .map_err(|_| format!("device `{entry}`: `{s}` is not a device index"))
    };
    let (first, last) = match range.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let i = parse(range)?;
            (i, i)
        }
    };
    if first > last {
        return Err(format!(
            "device `{entry}`: the range is empty ({first} > {last})"
        ));
    }
    let count = nodes[node].devices;
    if last >= count {
        return Err(format!(
            "unknown device `{entry}`: node `{node_name}` has {count} devices (indices 0-{})",
            count - 1
        ));
    }
    Ok((node, (first..=last).collect()))
}
