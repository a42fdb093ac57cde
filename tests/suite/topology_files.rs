use std::path::Path;

use mmpipe::topology::{DeviceKind, Topology, Tower};

#[test]
fn every_shipped_topology_parses() {
    let mut seen = 0;
    for entry in std::fs::read_dir("topology").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let t = Topology::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            // Either the groups are listed, or the planner is to choose them.
            assert!(
                t.auto_groups || (t.group_size(Tower::Image) > 0 && t.group_size(Tower::Text) > 0)
            );
            if t.device == DeviceKind::Cuda {
                assert!(
                    t.links.is_some() && !t.kinds.is_empty(),
                    "{}: no cost-model data",
                    path.display()
                );
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 8,
        "expected the shipped topology files, found {seen}"
    );
}

#[test]
fn four_by_four_places_four_gpus_per_tower_on_two_nodes() {
    let t = Topology::from_file(Path::new("topology/4x4.toml")).unwrap();
    assert_eq!(t.device, DeviceKind::Cuda);
    assert_eq!(t.world_size(), 8);
    assert_eq!(t.group(Tower::Image), vec![0, 1, 2, 3]);
    assert_eq!(t.group(Tower::Text), vec![4, 5, 6, 7]);
    assert!(t.ranks[..4].iter().all(|r| t.nodes[r.node].name == "node0"));
    assert_eq!(t.ranks[6].roles[0].group_rank, 2);
}

#[test]
fn cpu_two_by_one_has_two_image_threads_and_one_text_thread() {
    let t = Topology::from_file(Path::new("topology/cpu-2x1.toml")).unwrap();
    assert_eq!(t.device, DeviceKind::Cpu);
    assert_eq!(
        (t.group_size(Tower::Image), t.group_size(Tower::Text)),
        (2, 1)
    );
    let d = Topology::default_cpu();
    assert_eq!(d.ranks, t.ranks, "the built-in default is the shipped file");
}

#[test]
fn group_order_follows_the_list_not_the_device_index() {
    let t = Topology::from_str(
        "device = \"cpu\"\n[[nodes]]\nname = \"a\"\ndevices = 3\n[groups]\nimage = [\"a:2\", \"a:0\"]\ntext = [\"a:1\"]\n",
        Path::new("order.toml"),
    )
    .unwrap();
    assert_eq!(t.group(Tower::Image), vec![2, 0]);
    assert_eq!(t.ranks[0].roles[0].group_rank, 1);
    assert_eq!(t.ranks[1].roles[0].tower, Tower::Text);
}

/// Parses `body` as `broken.toml` and returns the error text.
fn error_of(body: &str) -> String {
    Topology::from_str(body, Path::new("topology/broken.toml"))
        .map(|_| "no error".to_string())
        .unwrap_or_else(|e| e.to_string())
}

const NODES: &str = "device = \"cuda\"\n[[nodes]]\nname = \"n0\"\ndevices = 2\n[[nodes]]\nname = \"n1\"\ndevices = 2\n";

fn with_groups(image: &str, text: &str) -> String {
    format!("{NODES}[groups]\nimage = {image}\ntext = {text}\n")
}

#[test]
fn broken_files_name_the_file_and_the_field() {
    let cases = [
        (with_groups(r#"["n0:0-1"]"#, r#"["n1:0-1", "n1:1"]"#), "`groups.text[1]`", "listed twice in the text group (first in `groups.text[0]`)"),
        (with_groups(r#"["n0:0-1", "n1:0"]"#, r#"["n2:0"]"#), "`groups.text[0]`", "no node named `n2`"),
        (with_groups(r#"["n0:0-1", "n1:0"]"#, r#"["n1:5"]"#), "`groups.text[0]`", "has 2 devices"),
        (with_groups("[]", r#"["n0:0-1", "n1:0-1"]"#), "`groups.image`", "empty"),
        (with_groups(r#"["n0:0-1"]"#, r#"["n1:0"]"#), "`groups`", "n1:1 is in neither group"),
        (with_groups(r#"["n0:0", "n0:0"]"#, r#"["n1:0-1"]"#), "`groups.image[1]`", "listed twice"),
        (with_groups(r#"["n0"]"#, r#"["n1:0-1"]"#), "`groups.image[0]`", "NODE:INDEX"),
        (
            "device = \"cpu\"\n[[nodes]]\nname = \"a\"\ndevices = 0\n[groups]\nimage = []\ntext = []\n".into(),
            "`nodes[0].devices`",
            "no devices",
        ),
        ("device = \"cpu\"\nnodes = []\n[groups]\nimage = []\ntext = []\n".into(), "`nodes`", "no nodes"),
        (format!("{NODES}[groups]\nimage = [\"n0:0\"]\ntext = [\"n1:0\"]\nspare = 1\n"), "spare", "unknown field"),
        (NODES.replace("cuda", "tpu") + "[groups]\nimage = []\ntext = []\n", "device", "unknown variant"),
    ];
    for (body, field, message) in cases {
        let e = error_of(&body);
        assert!(
            e.starts_with("topology/broken.toml"),
            "error does not name the file: {e}"
        );
        assert!(e.contains(field), "error does not name `{field}`: {e}");
        assert!(e.contains(message), "error lacks `{message}`: {e}");
    }
}

#[test]
fn a_batch_smaller_than_a_group_is_an_error_naming_both() {
    let t = super::common::cpu_topology(2, 3);
    let e = t.check_batch(2, "--batch").unwrap_err().to_string();
    assert!(
        e.contains("cpu-2x3.toml") && e.contains("`groups.text`") && e.contains("--batch"),
        "{e}"
    );
    let t = super::common::cpu_topology(3, 2);
    let e = t.check_batch(2, "--batch").unwrap_err().to_string();
    assert!(e.contains("`groups.image`"), "{e}");
    // Uneven splits are fine: every rank gets one sample or more.
    for batch in [3, 7, 8, 13] {
        t.check_batch(batch, "--batch").unwrap();
    }
}

#[test]
fn a_missing_file_names_the_path() {
    let e = Topology::from_file(Path::new("topology/no-such.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("topology/no-such.toml"), "{e}");
}
