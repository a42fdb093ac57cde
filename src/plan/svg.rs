//! `mmpipe plan --svg FILE`: the cluster drawn node by node, each device coloured by the
//! group it serves. SVG is a few rectangles and labels: written directly.

use std::fmt::Write;

use crate::topology::{Topology, Tower};

const IMAGE: &str = "#4c78a8";
const TEXT: &str = "#f58518";
const NONE: &str = "#bab0ac";
const BOTH: &str = "#54a24b";

pub fn render(topology: &Topology) -> String {
    const CELL: usize = 34;
    const PAD: usize = 12;
    const PER_ROW: usize = 4;
    let widest = topology
        .nodes
        .iter()
        .map(|n| n.devices.min(8))
        .max()
        .unwrap_or(1);
    let node_w = 2 * PAD + widest * CELL;
    let node_h = |devices: usize| 34 + devices.div_ceil(8) * CELL + PAD;
    let tallest = topology
        .nodes
        .iter()
        .map(|n| node_h(n.devices))
        .max()
        .unwrap_or(60);
    let cols = topology.nodes.len().min(PER_ROW);
    let rows = topology.nodes.len().div_ceil(PER_ROW);
    let width = PAD + cols * (node_w + PAD);
    let height = 40 + rows * (tallest + PAD) + 30;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{PAD}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(&topology.name)
    );
    for (n, node) in topology.nodes.iter().enumerate() {
        let x0 = PAD + (n % PER_ROW) * (node_w + PAD);
        let y0 = 36 + (n / PER_ROW) * (tallest + PAD);
        let kind = topology
            .spec(n)
            .map(|k| format!(" · {}", k.name))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{node_w}" height="{}" rx="6" fill="#f4f4f4" stroke="#888"/>"##,
            node_h(node.devices)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}{}</text>"#,
            x0 + PAD,
            y0 + 18,
            escape(&node.name),
            escape(&kind)
        );
        for d in 0..node.devices {
            let rank = topology.ranks.iter().find(|r| r.node == n && r.device == d);
            let (fill, label) = match rank {
                Some(r) => match (r.role(Tower::Image), r.role(Tower::Text)) {
                    (Some(i), Some(t)) => (BOTH, format!("{}/{}", i.group_rank, t.group_rank)),
                    (Some(i), None) => (IMAGE, format!("I{}", i.group_rank)),
                    (None, _) => (TEXT, format!("T{}", r.roles[0].group_rank)),
                },
                None => (NONE, d.to_string()),
            };
            let x = x0 + PAD + (d % 8) * CELL;
            let y = y0 + 28 + (d / 8) * CELL;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="{y}" width="{}" height="{}" rx="3" fill="{fill}"><title>{}:{d}</title></rect>"#,
                CELL - 4,
                CELL - 4,
                escape(&node.name)
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" fill="white" text-anchor="middle">{label}</text>"#,
                x + (CELL - 4) / 2,
                y + (CELL - 4) / 2 + 4
            );
        }
    }
    let ly = height - 14;
    for (i, (fill, label)) in [
        (IMAGE, "image group (I = group rank)"),
        (TEXT, "text group (T)"),
        (BOTH, "both towers (image/text rank)"),
    ]
    .iter()
    .enumerate()
    {
        let lx = PAD + i * 220;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="12" height="12" fill="{fill}"/>"#,
            ly - 10
        );
        let _ = writeln!(s, r#"<text x="{}" y="{ly}">{label}</text>"#, lx + 18);
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
