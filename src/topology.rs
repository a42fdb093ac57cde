//! Topology files: which devices exist, on which nodes, and which of them form the image
//! group and the text group. Everything is checked when the file is read, so the rest of
//! the program only ever sees a consistent layout.
//!
//! ```toml
//! device = "cuda"                 # or "cpu": one rank thread per device
//! [[nodes]]
//! name = "node0"
//! devices = 4
//! [[nodes]]
//! name = "node1"
//! devices = 4
//! [groups]
//! image = ["node0:0-3"]           # "NODE:INDEX" or "NODE:FIRST-LAST"
//! text = ["node1:0-3"]
//! ```
//!
//! Global ranks follow the launcher convention: node by node, device index within a node.
//! Ranks inside a group follow the order of the group's list.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{parse_toml, read_toml, Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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

/// The two encoders; each group of ranks trains exactly one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    name: Option<String>,
    device: DeviceKind,
    nodes: Vec<NodeFile>,
    groups: GroupsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    devices: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupsFile {
    image: Vec<String>,
    text: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub devices: usize,
}

/// One rank: a device and the role it plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rank {
    pub global: usize,
    pub node: usize,
    pub device: usize,
    pub tower: Tower,
    /// Position inside its tower's group.
    pub group_rank: usize,
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub name: String,
    /// Where it was read from; named in every later error about it.
    pub source: PathBuf,
    pub device: DeviceKind,
    pub nodes: Vec<Node>,
    /// Indexed by global rank.
    pub ranks: Vec<Rank>,
}

/// The topology `mmpipe train` uses when given none: two image rank threads, one text.
pub const DEFAULT_CPU_2X1: &str = include_str!("../topology/cpu-2x1.toml");

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
            nodes.push(Node {
                name: n.name.clone(),
                devices: n.devices,
            });
        }

        // (node, device) -> (tower, group rank)
        let mut owner: Vec<Vec<Option<(Tower, usize, String)>>> =
            nodes.iter().map(|n| vec![None; n.devices]).collect();
        for (tower, list) in [
            (Tower::Image, &file.groups.image),
            (Tower::Text, &file.groups.text),
        ] {
            let field = format!("groups.{tower}");
            if list.is_empty() {
                return Err(err(
                    field,
                    format!("the {tower} group is empty: it needs at least one device"),
                ));
            }
            let mut group_rank = 0;
            for (i, entry) in list.iter().enumerate() {
                let entry_field = format!("{field}[{i}]");
                let (node, devices) =
                    parse_device_ref(entry, &nodes).map_err(|m| err(entry_field.clone(), m))?;
                for d in devices {
                    if let Some((t, _, f)) = &owner[node][d] {
                        let what = if *t == tower {
                            "listed twice in"
                        } else {
                            "already in"
                        };
                        return Err(err(
                            entry_field,
                            format!(
                                "device {}:{d} is {what} `{f}`: the groups must not overlap",
                                nodes[node].name
                            ),
                        ));
                    }
                    owner[node][d] = Some((tower, group_rank, entry_field.clone()));
                    group_rank += 1;
                }
            }
        }

        let mut ranks = Vec::new();
        for (n, devs) in owner.iter().enumerate() {
            for (d, o) in devs.iter().enumerate() {
                let Some((tower, group_rank, _)) = o else {
                    return Err(err(
                        "groups".into(),
                        format!(
                            "device {}:{d} is in neither group: every device of a node must be given a tower \
                             (or lower nodes[{n}].devices)",
                            nodes[n].name
                        ),
                    ));
                };
                ranks.push(Rank {
                    global: ranks.len(),
                    node: n,
                    device: d,
                    tower: *tower,
                    group_rank: *group_rank,
                });
            }
        }
        let name = file.name.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "topology".into())
        });
        Ok(Topology {
            name,
            source: path.to_path_buf(),
            device: file.device,
            nodes,
            ranks,
        })
    }

    pub fn world_size(&self) -> usize {
        self.ranks.len()
    }

    /// Global ranks of a tower's group, in group-rank order.
    pub fn group(&self, tower: Tower) -> Vec<usize> {
        let mut members: Vec<&Rank> = self.ranks.iter().filter(|r| r.tower == tower).collect();
        members.sort_by_key(|r| r.group_rank);
        members.iter().map(|r| r.global).collect()
    }

    pub fn group_size(&self, tower: Tower) -> usize {
        self.ranks.iter().filter(|r| r.tower == tower).count()
    }

    /// Checks that a global batch splits evenly over both groups. `batch_origin` names where
    /// the batch size came from (a config field or a flag).
    pub fn check_batch(&self, global_batch: usize, batch_origin: &str) -> Result<()> {
        if global_batch == 0 {
            return Err(Error::Msg(format!(
                "{batch_origin}: the global batch must be at least 1"
            )));
        }
        for tower in [Tower::Image, Tower::Text] {
            let size = self.group_size(tower);
            if !global_batch.is_multiple_of(size) {
                return Err(Error::invalid(
                    &self.source,
                    format!("groups.{tower}"),
                    format!(
                        "the global batch {global_batch} (from {batch_origin}) is not divisible by the {tower} \
                         group's size {size}: every rank must get the same number of samples"
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
