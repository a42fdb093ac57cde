//! Checkpoints a run can trust: a damaged save is passed over for the previous one, pruning
//! touches only the run's own saves, a second run cannot share the folder, a killed save
//! leaves nothing half-written behind, the folder is checked before the first step, and
//! the metrics file continues across a resume.

use std::path::{Path, PathBuf};
use std::process::Command;

use mmpipe::train::checkpoints;
use mmpipe::train::TrainConfig;

use super::common::{cpu_topology, test_model, train_config};

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmpipe-ckpt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(dir: &Path, steps: usize, every: usize) -> TrainConfig {
    TrainConfig {
        steps,
        global_batch: 8,
        warmup: 1,
        checkpoint_dir: Some(dir.to_path_buf()),
        checkpoint_every: every,
        ..train_config(8)
    }
}

fn train(cfg: &TrainConfig) -> mmpipe::Result<mmpipe::train::TrainReport> {
    mmpipe::train::train(&cpu_topology(1, 1), &test_model(), cfg)
}

fn latest(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("latest"))
        .unwrap()
        .trim()
        .to_string()
}

/// Zeroes 64 bytes in the middle of a file, its length unchanged: what a power loss can
/// leave of an unflushed write.
fn punch_hole(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 64].fill(0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_damaged_latest_save_is_passed_over_for_the_previous_one() {
    let dir = fresh_dir("damaged");
    train(&config(&dir, 4, 2)).unwrap();
    assert_eq!(latest(&dir), "step-00000004");
    let state: checkpoints::CheckpointState = serde_json::from_str(
        &std::fs::read_to_string(dir.join("step-00000004/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        state.parts.keys().collect::<Vec<_>>(),
        vec!["image.safetensors", "text.safetensors"],
        "state.json records every part's checksum"
    );
    punch_hole(&dir.join("step-00000004/image.safetensors"));
    // `latest` falls back to step 2: the resumed run runs steps 2..6.
    let resumed = train(&TrainConfig {
        resume: Some("latest".into()),
        ..config(&dir, 6, 0)
    })
    .unwrap();
    assert_eq!(resumed.losses.len(), 4, "resumed from step 2");
    // A save named explicitly must check out: no fallback, and the error says why.
    punch_hole(&dir.join("step-00000006/text.safetensors"));
    let err = train(&TrainConfig {
        resume: Some(dir.join("step-00000006")),
        ..config(&dir, 8, 0)
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("text.safetensors")
            && err.contains("CRC-32")
            && err.contains("no complete save"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pruning_removes_only_this_runs_oldest_saves() {
    let dir = fresh_dir("prune");
    // An older run's saves (another id) and a save from before ids: not this run's.
    for (step, state) in [
        (
            100,
            r#"{"step":100,"position":800,"global_batch":8,"seed":7,"loss":"clip","run":"another"}"#,
        ),
        (
            200,
            r#"{"step":200,"position":1600,"global_batch":8,"seed":7,"loss":"clip","run":"another"}"#,
        ),
        (
            300,
            r#"{"step":300,"position":2400,"global_batch":8,"seed":7,"loss":"clip"}"#,
        ),
    ] {
        let save = dir.join(format!("step-{step:08}"));
        std::fs::create_dir_all(&save).unwrap();
        std::fs::write(save.join("state.json"), state).unwrap();
    }
    train(&TrainConfig {
        keep_checkpoints: 3,
        ..config(&dir, 5, 1)
    })
    .unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .collect();
    left.sort();
    assert_eq!(
        left,
        [3, 4, 5, 100, 200, 300].map(|s| format!("step-{s:08}")),
        "this run keeps its newest 3; the others' stay"
    );
    assert_eq!(latest(&dir), "step-00000005");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_run_cannot_use_a_folder_in_use() {
    let dir = fresh_dir("lock");
    let held = checkpoints::prepare(&dir, 0, "checkpoint_dir").unwrap();
    let err = train(&config(&dir, 2, 0)).unwrap_err().to_string();
    assert!(
        err.contains("another run is using this folder")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(held);
    train(&config(&dir, 2, 0)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_saves_partial_folder_is_removed_at_start() {
    let dir = fresh_dir("partial");
    let stale = dir.join("step-00000009.partial");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("image.safetensors"), b"half a file").unwrap();
    train(&config(&dir, 1, 0)).unwrap();
    assert!(!stale.exists());
    assert_eq!(latest(&dir), "step-00000001");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unusable_checkpoint_folder_fails_before_the_first_step() {
    let dir = fresh_dir("unusable");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    let started = std::time::Instant::now();
    let err = train(&config(&file.join("checkpoints"), 1000, 0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checkpoint_dir") && err.contains("cannot create"),
        "{err}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "failed at start, not after 1000 steps"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The metrics file after a resume holds every step once: the lines before the resumed
/// step are kept, those a crashed attempt wrote after it (and a line cut short) are not.
#[test]
fn the_metrics_file_continues_across_a_resume() {
    let dir = fresh_dir("metrics");
    let metrics = dir.join("metrics.jsonl");
    train(&TrainConfig {
        metrics: Some(metrics.clone()),
        ..config(&dir, 4, 0)
    })
    .unwrap();
    // A crashed attempt's lines past the save, and a torn last line.
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text.push_str("{\"step\": 4, \"loss\": 9.9}\n{\"step\": 5, \"lo");
    std::fs::write(&metrics, &text).unwrap();
    // A resume that is refused (another seed) leaves the file as it was.
    train(&TrainConfig {
        metrics: Some(metrics.clone()),
        resume: Some("latest".into()),
        seed: 99,
        ..config(&dir, 8, 0)
    })
    .unwrap_err();
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), text);
    train(&TrainConfig {
        metrics: Some(metrics.clone()),
        resume: Some("latest".into()),
        ..config(&dir, 8, 0)
    })
    .unwrap();
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..8).collect::<Vec<u64>>());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ten runs killed (SIGKILL) at random moments while they save every step (most of their
/// time), each followed by `--resume latest`: every resume loads the save `latest` names,
/// complete, and trains on. The counts are printed for docs/reliability.md.
#[test]
fn killed_mid_save_a_run_resumes_from_its_last_complete_save() {
    use rand::{Rng, SeedableRng};
    let dir = fresh_dir("kill");
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let base = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mmpipe"));
        c.args([
            "train",
            "--topology",
            "topology/cpu-1x1.toml",
            "--batch",
            "8",
            "--eval-pairs",
            "0",
            "--quiet",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--checkpoint-every",
            "1",
        ])
        .args(extra)
        .env("MMPIPE_LOG", "info")
        .env("RAYON_NUM_THREADS", "1");
        c
    };
    let (mut killed, mut resumed, mut mid_save) = (0, 0, 0);
    for trial in 0..10 {
        let args: Vec<String> = if trial == 0 {
            vec!["--steps".into(), "100000".into()]
        } else {
            ["--steps", "100000", "--resume", "latest"]
                .map(String::from)
                .to_vec()
        };
        let mut child = base(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(
            rng.random_range(400..1500),
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        killed += 1;
        // Where the kill landed: inside a save if it left one unfinished.
        let unfinished = std::fs::read_dir(&dir).unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".partial") || name.contains(".tmp-")
        });
        mid_save += usize::from(unfinished);
        if !dir.join("latest").exists() {
            continue; // killed before its first save: nothing to resume yet
        }
        let name = latest(&dir);
        let step: usize = name.strip_prefix("step-").unwrap().parse().unwrap();
        let out = base(&["--steps", &(step + 1).to_string(), "--resume", "latest"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "trial {trial}: the resume failed:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "resuming from {} at step {step}",
                dir.join(&name).display()
            )),
            "trial {trial}: did not resume from {name}:\n{stderr}"
        );
        resumed += 1;
    }
    eprintln!(
        "{killed} runs killed ({mid_save} inside a save, leaving it unfinished), {resumed} resumed from the save `latest` named"
    );
    assert!(
        resumed >= 8,
        "only {resumed} of {killed} kills came after a first save"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small model with CLIP's BPE vocabulary: shards' captions need it.
const BPE_MODEL: &str = r#"
embed_dim = 16
[vision]
kind = "vit"
image_size = 16
patch_size = 8
width = 16
layers = 1
heads = 2
mlp_ratio = 2
[text]
kind = "clip"
vocab_size = 49408
context_length = 16
width = 16
layers = 1
heads = 2
mlp_ratio = 2
"#;

/// A resume continues a run: another model, other data (same shard names, other
/// contents) or a changed identity setting is refused, naming it; the learning rate and
/// the steps may change (shown, accepted); `resume_despite_changes` lets a refused one
/// through.
#[test]
fn a_resume_into_another_run_is_refused_naming_what_changed() {
    let dir = fresh_dir("identity");
    let shards_dir = dir.join("shards");
    let shards = |samples: usize| {
        let (paths, _) = mmpipe::data::convert::synth(&shards_dir, samples, 64, 16, 3).unwrap();
        assert_eq!(paths.len(), 1);
        paths[0].display().to_string()
    };
    let model =
        |text: &str| mmpipe::model::ClipConfig::from_str(text, Path::new("bpe.toml")).unwrap();
    let shard = shards(24);
    let base = TrainConfig {
        data: mmpipe::data::DataConfig {
            kind: mmpipe::data::DataKind::Webdataset,
            shards: vec![shard.clone()],
            ..mmpipe::data::DataConfig::default()
        },
        ..config(&dir.join("ckpt"), 2, 0)
    };
    let topology = cpu_topology(1, 1);
    mmpipe::train::train(&topology, &model(BPE_MODEL), &base).unwrap();
    let resume = |cfg: TrainConfig, text: &str| {
        mmpipe::train::train(
            &topology,
            &model(text),
            &TrainConfig {
                resume: Some("latest".into()),
                steps: 3,
                ..cfg
            },
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let other_model = BPE_MODEL.replace("embed_dim = 16", "embed_dim = 8");
    let err = resume(base.clone(), &other_model).unwrap_err();
    assert!(
        err.contains("the model") && err.contains("--resume-despite-changes"),
        "{err}"
    );
    let err = resume(
        TrainConfig {
            data: mmpipe::data::DataConfig {
                random_crop: true,
                ..base.data.clone()
            },
            ..base.clone()
        },
        BPE_MODEL,
    )
    .unwrap_err();
    assert!(
        err.contains("`data.random_crop` was false, is true"),
        "{err}"
    );
    // A new learning rate is a choice: accepted.
    resume(
        TrainConfig {
            lr: 1e-3,
            ..base.clone()
        },
        BPE_MODEL,
    )
    .unwrap();
    // The same shard name, other contents.
    shards(40);
    let err = resume(base.clone(), BPE_MODEL).unwrap_err();
    assert!(err.contains("the data files"), "{err}");
    resume(
        TrainConfig {
            resume_despite_changes: true,
            ..base.clone()
        },
        BPE_MODEL,
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
