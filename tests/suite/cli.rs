//! The binary end to end: what a user types and sees.

use std::process::{Command, Output};

fn mmpipe(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(args)
        .output()
        .expect("run mmpipe")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn plan_prints_every_rank_and_the_bytes() {
    let out = mmpipe(&["plan", "--topology", "topology/4x4.toml", "--batch", "256"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let rank_rows = stdout.lines().filter(|l| l.contains("cuda:")).count();
    assert_eq!(rank_rows, 8, "{stdout}");
    assert!(
        stdout.contains("64") && stdout.contains("feature all-gather"),
        "{stdout}"
    );
}

#[test]
fn a_broken_topology_fails_with_file_and_field() {
    let dir = std::env::temp_dir().join(format!("mmpipe-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("overlap.toml");
    std::fs::write(
        &path,
        "device = \"cpu\"\n[[nodes]]\nname = \"h\"\ndevices = 2\n[groups]\nimage = [\"h:0-1\"]\ntext = [\"h:1\"]\n",
    )
    .unwrap();
    let out = mmpipe(&["plan", "--topology", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("overlap.toml") && stderr.contains("groups.text[0]"),
        "{stderr}"
    );
}

#[test]
fn train_runs_a_few_steps_and_reports_retrieval() {
    let out = mmpipe(&[
        "train",
        "--steps",
        "3",
        "--batch",
        "12",
        "--eval-pairs",
        "12",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in ["samples/s", "recall@1", "chance", "backward", "peak memory"] {
        assert!(stdout.contains(needle), "missing {needle}:\n{stdout}");
    }
}

#[test]
fn train_on_a_gpu_topology_says_what_is_missing() {
    let out = mmpipe(&["train", "--topology", "topology/4x4.toml", "--steps", "1"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("4x4.toml") && stderr.contains("NCCL"),
        "{stderr}"
    );
}

#[test]
fn plan_auto_writes_json_and_an_svg() {
    let svg = std::env::temp_dir().join(format!("mmpipe-plan-{}.svg", std::process::id()));
    let out = mmpipe(&[
        "plan",
        "--topology",
        "topology/mixed.toml",
        "--model",
        "configs/ViT-B-16.toml",
        "--batch",
        "1920",
        "--format",
        "json",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert!(json["auto"]["candidates"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));
    assert!(json["best"]["split"]["step_s"]
        .as_f64()
        .is_some_and(|s| s > 0.0));
    let drawing = std::fs::read_to_string(&svg).unwrap();
    assert!(drawing.starts_with("<svg") && drawing.contains("fast") && drawing.contains("T7"));
}

#[test]
fn plan_calibrate_measures_this_machine_and_predicts_a_step() {
    let out = mmpipe(&[
        "plan",
        "--topology",
        "topology/cpu-1x1.toml",
        "--calibrate",
        "--batch",
        "16",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("calibrated on"));
    assert!(
        text(&out.stdout).contains("predicted step (split)"),
        "{}",
        text(&out.stdout)
    );
}
