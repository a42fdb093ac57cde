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
    let path = dir.join("twice.toml");
    std::fs::write(
        &path,
        "device = \"cpu\"\n[[nodes]]\nname = \"h\"\ndevices = 2\n[groups]\nimage = [\"h:0-1\"]\ntext = [\"h:1\", \"h:1\"]\n",
    )
    .unwrap();
    let out = mmpipe(&["plan", "--topology", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("twice.toml") && stderr.contains("groups.text[1]"),
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
    for needle in ["samples/s", "R@1", "chance", "backward", "peak memory"] {
        assert!(stdout.contains(needle), "missing {needle}:\n{stdout}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn train_on_a_gpu_topology_says_what_is_missing() {
    let out = mmpipe(&["train", "--topology", "topology/4x4.toml", "--steps", "1"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("4x4.toml") && stderr.contains("--features cuda"),
        "{stderr}"
    );
}

/// With CUDA built in: a GPU trains; no GPU (CI's link-time libcuda) is a clear error.
#[cfg(feature = "cuda")]
#[test]
fn train_on_a_gpu_topology_trains_or_names_the_missing_gpu() {
    let out = mmpipe(&[
        "train",
        "--topology",
        "topology/gpu-1x1.toml",
        "--steps",
        "2",
        "--quiet",
    ]);
    let stderr = text(&out.stderr);
    if !out.status.success() {
        assert!(
            stderr.contains("no CUDA driver or GPU") || stderr.contains("could not be opened"),
            "{stderr}"
        );
    } else {
        assert!(
            text(&out.stdout).contains("samples/s"),
            "{}",
            text(&out.stdout)
        );
    }
}

#[test]
fn the_nccl_backend_without_a_launcher_says_how_to_start_it() {
    let out = mmpipe(&[
        "train",
        "--topology",
        "topology/4x4.toml",
        "--steps",
        "1",
        "--backend",
        "nccl",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("one process per GPU") && stderr.contains("scripts/launch.sh"),
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

#[test]
fn convert_turns_an_hf_bert_checkpoint_into_an_mmpipe_one() {
    let dir = std::env::temp_dir().join(format!("mmpipe-convert-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("lit.toml");
    let towers = std::fs::canonicalize("configs/towers").unwrap();
    std::fs::write(
        &model,
        format!(
            "embed_dim = 16\ntext = \"{}/minilm-l6.toml\"\n[vision]\nkind = \"vit\"\nimage_size = 16\npatch_size = 8\nwidth = 8\nlayers = 1\nheads = 2\n",
            towers.display()
        ),
    )
    .unwrap();
    let hf = std::path::Path::new("target/fixtures/all-minilm-l6-v2/model.safetensors");
    assert!(hf.exists(), "run `bash scripts/fetch-fixtures.sh`");
    let out = dir.join("converted.safetensors");
    let run = mmpipe(&[
        "convert",
        "--model",
        model.to_str().unwrap(),
        "--from",
        "hf-bert",
        hf.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(
        text(&run.stdout).contains("101 from"),
        "{}",
        text(&run.stdout)
    );
    let ours = mmpipe::model::checkpoint::read_tensors(&out).unwrap();
    let theirs = mmpipe::model::checkpoint::read_tensors(hf).unwrap();
    let key = "encoder.layer.3.attention.self.query.weight";
    let a = ours[&format!("text.transformer.{key}")]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = theirs[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
    assert!(ours.contains_key("visual.conv1.weight") && ours.contains_key("logit_scale"));
}

#[test]
fn train_runs_with_every_tower_kind() {
    for model in [
        "configs/clip-tiny-bert.toml",
        "configs/clip-tiny-resnet.toml",
    ] {
        let out = mmpipe(&[
            "train",
            "--model",
            model,
            "--steps",
            "2",
            "--batch",
            "12",
            "--eval-pairs",
            "12",
            "--quiet",
        ]);
        assert!(out.status.success(), "{model}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("R@1"), "{model}");
    }
    // Checkpointing works per block in every tower, the ResNet's bottlenecks included.
    let out = mmpipe(&[
        "train",
        "--model",
        "configs/clip-tiny-resnet.toml",
        "--steps",
        "2",
        "--batch",
        "12",
        "--eval-pairs",
        "12",
        "--checkpointing",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn train_reads_a_training_config_and_flags_override_it() {
    let out = mmpipe(&[
        "train",
        "--config",
        "configs/train/gradcache.toml",
        "--topology",
        "topology/cpu-2x2.toml",
        "--steps",
        "2",
        "--batch",
        "16",
        "--eval-pairs",
        "0",
        "--loss",
        "siglip",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in [
        "global batch 16",
        "loss siglip (exchange gather-scatter, tile 64)",
        "logit bias",
        "collective payload per step",
        "loss exchange",
    ] {
        assert!(stdout.contains(needle), "missing {needle}:\n{stdout}");
    }
}

#[test]
fn every_shipped_training_config_parses() {
    for entry in std::fs::read_dir("configs/train").unwrap() {
        let path = entry.unwrap().path();
        let cfg = mmpipe::train::TrainConfig::load(Some(&path), &[])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A model named by the file is found relative to it.
        if let Some(model) = &cfg.model {
            mmpipe::model::ClipConfig::from_file(model)
                .unwrap_or_else(|e| panic!("{}: model: {e}", path.display()));
        }
    }
    // The documented default file is the built-in default.
    let mut file = mmpipe::train::TrainConfig::load(
        Some(std::path::Path::new("configs/train/default.toml")),
        &[],
    )
    .unwrap();
    // Where it was read from is not a setting.
    file.data.base_dir = mmpipe::data::DataConfig::default().base_dir;
    file.data.origin = mmpipe::data::DataConfig::default().origin;
    assert_eq!(
        file,
        mmpipe::train::TrainConfig::default(),
        "configs/train/default.toml drifted from TrainConfig::default()"
    );
}

#[test]
fn bad_training_configs_name_the_file_and_field() {
    let dir = std::env::temp_dir().join(format!("mmpipe-train-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body, needle) in [
        (
            "zero.toml",
            "[micro_batch]\nimage = 0\n",
            "micro_batch.image",
        ),
        (
            "unknown.toml",
            "[loss]\nkind = \"clip\"\nwidth = 3\n",
            "unknown field `width`",
        ),
        ("kind.toml", "[loss]\nkind = \"triplet\"\n", "siglip"),
        ("tile.toml", "[loss]\ntile = -4\n", "at least 1"),
        (
            "budget.toml",
            "[loss]\ntile_memory_mib = 0\n",
            "loss.tile_memory_mib",
        ),
        (
            "model.toml",
            "model = \"no-such-model.toml\"\n",
            "no-such-model.toml",
        ),
        (
            "pairs.toml",
            "[data]\nkind = \"fashion-mnist\"\n[eval]\npairs = 10001\n",
            "eval.pairs",
        ),
        ("precision.toml", "precision = \"fp8\"\n", "bf16"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        let out = mmpipe(&["train", "--config", path.to_str().unwrap(), "--steps", "1"]);
        assert!(!out.status.success(), "{name} was accepted");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(name) && stderr.contains(needle),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn micro_batches_with_batch_norm_are_refused_with_the_reason() {
    let out = mmpipe(&[
        "train",
        "--model",
        "configs/clip-tiny-resnet.toml",
        "--steps",
        "1",
        "--batch",
        "16",
        "--micro-batch-image",
        "4",
        "--eval-pairs",
        "0",
        "--quiet",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("micro_batch.image") && stderr.contains("batch norm"),
        "{stderr}"
    );
}

#[test]
fn a_batch_no_group_divides_trains_and_one_smaller_than_a_group_is_refused() {
    let run = |batch: &str| {
        mmpipe(&[
            "train",
            "--topology",
            "topology/cpu-2x1.toml",
            "--batch",
            batch,
            "--steps",
            "1",
            "--eval-pairs",
            "0",
            "--quiet",
        ])
    };
    // 13 over two image ranks: slices of 7 and 6.
    let out = run("13");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("global batch 13"));
    let out = run("1");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cpu-2x1.toml") && stderr.contains("groups.image") && stderr.contains("1"),
        "{stderr}"
    );
}

#[test]
fn data_synth_inspect_and_train_on_the_shards() {
    let dir = std::env::temp_dir().join(format!("mmpipe-cli-data-{}", std::process::id()));
    let out = mmpipe(&[
        "data",
        "synth",
        "--out",
        dir.to_str().unwrap(),
        "--samples",
        "24",
        "--per-shard",
        "10",
        "--image-size",
        "32",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("wrote 24 samples in 3 shard(s)"));
    let out = mmpipe(&["data", "inspect", dir.join("000000.tar").to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("10 samples, 10 complete") && stdout.contains("32x32 png"),
        "{stdout}"
    );
    let pattern = format!("{}/{{000000..000002}}.tar", dir.display());
    let out = mmpipe(&[
        "train",
        "--model",
        "configs/clip-tiny-bpe.toml",
        "--shards",
        &pattern,
        "--steps",
        "2",
        "--batch",
        "8",
        "--quiet",
        "--eval-pairs",
        "0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("data wait") && stdout.contains("samples skipped: none"),
        "{stdout}"
    );
    // A pattern that names a missing shard fails before training.
    let missing = format!("{}/{{000000..000009}}.tar", dir.display());
    let out = mmpipe(&[
        "train",
        "--model",
        "configs/clip-tiny-bpe.toml",
        "--shards",
        &missing,
        "--steps",
        "1",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("7 shard(s) not found"), "{stderr}");
}

#[test]
fn bad_data_sections_name_the_field() {
    let dir = std::env::temp_dir().join(format!("mmpipe-data-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, body, needle) in [
        (
            "noshards.toml",
            "[data]\nkind = \"webdataset\"\n",
            "data.shards",
        ),
        (
            "weight.toml",
            "[data]\nkind = \"webdataset\"\n[[data.sources]]\nshards = [\"a.tar\"]\nweight = 0\n",
            "data.sources[0].weight",
        ),
        ("csv.toml", "[data]\nkind = \"csv\"\n", "data.csv"),
        ("kind.toml", "[data]\nkind = \"laion\"\n", "webdataset"),
        ("workers.toml", "[data]\nworkers = 0\n", "data.workers"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        let out = mmpipe(&["train", "--config", path.to_str().unwrap(), "--steps", "1"]);
        assert!(!out.status.success(), "{name} was accepted");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(name) && stderr.contains(needle),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn set_overrides_any_field_and_names_bad_ones() {
    use mmpipe::train::TrainConfig;
    let cfg = TrainConfig::load(
        Some(std::path::Path::new("configs/train/gradcache.toml")),
        &[
            "loss.kind=siglip".into(),
            "lr=5e-4".into(),
            "micro_batch.text=16".into(),
            "schedule=constant".into(),
            "grad_clip=1.0".into(),
        ],
    )
    .unwrap();
    assert_eq!(cfg.loss.kind, mmpipe::loss::LossKind::Siglip);
    assert_eq!(cfg.lr, 5e-4);
    assert_eq!(cfg.micro_batch.text, Some(16));
    assert_eq!(cfg.micro_batch.image, Some(32), "the file's value stays");
    assert_eq!(cfg.global_batch, 256);
    assert_eq!(cfg.grad_clip, Some(1.0));
    for (set, needle) in [
        ("nonsense=1", "unknown field `nonsense`"),
        ("loss.tile=oops", "loss.tile"),
        ("grad_clip=-1", "grad_clip"),
        ("lr", "KEY=VALUE"),
    ] {
        let err = TrainConfig::load(None, &[set.into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{set}: {err}");
    }
}

/// SIGINT: the run finishes its step, saves a checkpoint, says where, and exits 0.
#[test]
fn an_interrupted_run_saves_a_checkpoint_and_exits_cleanly() {
    let dir = std::env::temp_dir().join(format!("mmpipe-sigint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let metrics = dir.join("metrics.jsonl");
    let child = Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args([
            "train",
            "--steps",
            "100000",
            "--batch",
            "16",
            "--quiet",
            "--eval-pairs",
            "0",
        ])
        .arg("--checkpoint-dir")
        .arg(&dir)
        .arg("--metrics")
        .arg(&metrics)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 120, "the run never got going");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let step = super::common::stopped_after_step(&stdout);
    assert!(step >= 3, "{stdout}");
    let latest = std::fs::read_to_string(dir.join("latest")).unwrap();
    assert_eq!(latest, format!("step-{step:08}"));
    let state = std::fs::read_to_string(dir.join(&latest).join("state.json")).unwrap();
    assert!(state.contains(&format!("\"step\": {step}")), "{state}");
}

/// Training evaluates on Fashion-MNIST's test split as it goes (ranks split the pairs,
/// the metrics file gets each evaluation), and `mmpipe eval` on the final checkpoint, one
/// process with both towers, reproduces the last evaluation.
#[test]
fn eval_scores_a_checkpoint_on_fashion_mnist() {
    let dir = std::env::temp_dir().join(format!("mmpipe-eval-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let metrics = dir.join("metrics.jsonl");
    let out = mmpipe(&[
        "train",
        "--model",
        "configs/clip-tiny-bpe.toml",
        "--set",
        "data.kind=fashion-mnist",
        "--batch",
        "16",
        "--steps",
        "2",
        "--quiet",
        "--eval-pairs",
        "100",
        "--eval-every",
        "1",
        "--metrics",
        metrics.to_str().unwrap(),
        "--checkpoint-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let trained = text(&out.stdout);
    // The number before the first `%` after "zero-shot".
    let zero_shot = |s: &str| -> String {
        s.split("zero-shot")
            .nth(1)
            .and_then(|r| r.split('%').next())
            .and_then(|r| r.split_whitespace().last())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no zero-shot accuracy in:\n{s}"))
    };
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "one evaluation after each step");
    assert_eq!(evals[1]["step"], 1);
    assert_eq!(evals[1]["eval"]["pairs"], 100);
    let last = evals[1]["eval"]["zero_shot"].as_f64().unwrap();
    assert_eq!(format!("{:.1}", 100.0 * last), zero_shot(&trained));
    for k in [1, 5, 10] {
        assert!(evals[1]["eval"]["recall"][format!("text_to_image_r{k}")].is_f64());
    }
    // The checkpoint carries its model file: no --model needed.
    let checkpoint = dir.join("step-00000002");
    let out = mmpipe(&[
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--images",
        "100",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("100 images: zero-shot accuracy") && stdout.contains("recall@10"),
        "{stdout}"
    );
    assert_eq!(
        zero_shot(&stdout),
        zero_shot(&trained),
        "{stdout}\n{trained}"
    );
    // A checkpoint read as another model is refused, naming the file.
    let out = mmpipe(&[
        "eval",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--model",
        "configs/clip-tiny.toml",
        "--images",
        "10",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("image.safetensors"),
        "{}",
        text(&out.stderr)
    );
}

/// `mmpipe report` draws real PNGs from metrics files, compares two runs' losses step by
/// step, and names the file and line of a malformed metrics line.
#[test]
fn report_draws_pngs_and_compares_runs() {
    let dir = std::env::temp_dir().join(format!("mmpipe-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut runs = Vec::new();
    for topology in ["topology/cpu-1x1.toml", "topology/cpu-2x1.toml"] {
        let run = dir.join(
            topology
                .trim_start_matches("topology/cpu-")
                .trim_end_matches(".toml"),
        );
        let out = mmpipe(&[
            "train",
            "--topology",
            topology,
            "--steps",
            "4",
            "--batch",
            "12",
            "--eval-pairs",
            "12",
            "--eval-every",
            "2",
            "--quiet",
            "--metrics",
            run.join("metrics.jsonl").to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        runs.push(run);
    }
    let out = mmpipe(&[
        "report",
        runs[0].to_str().unwrap(),
        runs[1].to_str().unwrap(),
        "--out",
        dir.join("plots").to_str().unwrap(),
        "--table",
        dir.join("runs.md").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = std::fs::read_to_string(dir.join("runs.md")).unwrap();
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| 1x1") || l.starts_with("| 2x1"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(rows[1].contains("| 4 |"), "4 steps: {table}");
    let stdout = text(&out.stdout);
    // Same seed, same batch: the 2x1 split's losses equal the single rank's to float
    // tolerance.
    let gap: f64 = stdout
        .split("largest difference ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no loss comparison:\n{stdout}"));
    assert!(gap < 1e-4, "{stdout}");
    assert!(stdout.contains("over 4 common steps"), "{stdout}");
    for (name, size) in [
        ("training.png", (1400, 1200)),
        ("eval.png", (1000, 600)),
        ("phases.png", (1400, 600)),
    ] {
        let png =
            image::open(dir.join("plots").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((png.width(), png.height()), size, "{name}");
        // Something was drawn: not a blank white page.
        let rgb = png.to_rgb8();
        let ink = rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(ink > 10_000, "{name}: only {ink} drawn pixels");
    }
    // A malformed line in the middle is an error naming the file and the line.
    let metrics = runs[0].join("metrics.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines[1] = "{\"step\": 1, \"loss\": ".into();
    std::fs::write(&metrics, lines.join("\n") + "\n").unwrap();
    let out = mmpipe(&["report", runs[0].to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("metrics.jsonl") && stderr.contains("line 2"),
        "{stderr}"
    );
}

fn launch(hosts: &str, command: &str) -> std::process::Child {
    let dir = std::env::temp_dir().join(format!("mmpipe-env-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("hosts-{}.txt", hosts.len() + command.len()));
    std::fs::write(&file, hosts).unwrap();
    std::process::Command::new("bash")
        .args([
            "scripts/launch.sh",
            "--hostfile",
            file.to_str().unwrap(),
            "--backend",
            "env",
            "--port",
            "29555",
            "--grace",
            "5",
            "--",
        ])
        .args(["sh", "-c", command])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// launch.sh's own process mode (the NCCL layout): torchrun's variables per rank, a failing
/// rank stops the others and is named, SIGTERM reaches every rank.
#[test]
fn launch_script_sets_rank_variables_and_stops_together() {
    // Two "nodes": loopback aliases of this machine (started directly, as local hosts are).
    let hosts = "# two nodes on loopback\nlocalhost slots=2\n127.0.0.2 slots=1\n";
    let out = launch(
        hosts,
        r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $MMPIPE_RUN_SECRET""#,
    )
    .wait_with_output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut lines: Vec<String> = text(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("launch.sh"))
        .map(String::from)
        .collect();
    lines.sort();
    // The rendezvous at the first host as named; one secret for every rank, fresh per run.
    let secret = lines[0].rsplit(' ').next().unwrap().to_string();
    assert_eq!(secret.len(), 32, "{lines:?}");
    assert_eq!(
        lines,
        [
            format!("0 3 0 2 localhost 29555 {secret}"),
            format!("1 3 1 2 localhost 29555 {secret}"),
            format!("2 3 0 1 localhost 29555 {secret}")
        ]
    );
    // Host names that would become ssh options or shell commands are refused, and so is a
    // loopback rendezvous that another machine could not reach.
    for (bad, needle) in [
        ("-oProxyCommand=x slots=1\n", "is not a host name"),
        ("a;touch /tmp/pwned slots=1\n", "is not a host name"),
        ("localhost slots=1\nnode7.invalid slots=1\n", "loopback"),
    ] {
        let out = launch(bad, "true").wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            text(&out.stderr).contains(needle),
            "{bad}: {}",
            text(&out.stderr)
        );
    }
    // Rank 1 fails: the others (which would run for 100 s) are stopped, rank 1 is named,
    // and its exit code is the launcher's.
    let started = std::time::Instant::now();
    let out = launch(hosts, r#"[ "$RANK" = 1 ] && exit 3; sleep 100"#)
        .wait_with_output()
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("rank 1 (localhost) exited with code 3"),
        "{}",
        text(&out.stderr)
    );
    // SIGTERM to the launcher reaches every rank; each stops cleanly.
    let child = launch(
        hosts,
        r#"trap 'echo "rank $RANK stopping"; exit 0' TERM; echo "rank $RANK up"; while :; do sleep 0.1; done"#,
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    for rank in 0..3 {
        assert!(
            stdout.contains(&format!("rank {rank} stopping")),
            "{stdout}"
        );
    }
}

/// torchrun's variables without a backend across processes: a clear refusal, not a
/// silent single-process run.
#[test]
fn train_started_as_one_of_several_ranks_needs_a_process_backend() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["train", "--steps", "1", "--quiet", "--backend", "thread"])
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29556"),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("rank 1 of 2") && stderr.contains("--backend mpi"),
        "{stderr}"
    );
}

/// `--precision bf16` trains in bf16 on a CPU topology too, and says so (the run is slow
/// there, not fake); `--no-tf32` on the CPU is named as changing nothing.
#[test]
fn train_in_bf16_on_the_cpu_says_what_it_does() {
    let out = mmpipe(&[
        "train",
        "--topology",
        "topology/cpu-1x1.toml",
        "--precision",
        "bf16",
        "--grad-all-reduce",
        "bf16",
        "--no-tf32",
        "--steps",
        "2",
        "--batch",
        "8",
        "--eval-pairs",
        "0",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stdout.contains("bf16 (f32 master weights, gradients summed in bf16)"),
        "{stdout}"
    );
    assert!(stderr.contains("trains in bf16 for real"), "{stderr}");
    assert!(stderr.contains("tf32 = false changes nothing"), "{stderr}");
}

/// The plan's gradient traffic follows `--grad-all-reduce`: half the bytes in bf16; its
/// memory follows `--precision`: bf16 adds the working copies and their gradients, and
/// halves the activations but for the f32 residual stream.
#[test]
fn plan_counts_bf16_gradient_sums_and_working_copies() {
    let plan = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["plan", "--topology", "topology/4x4.toml", "--batch", "256"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--format", "json"]);
        let out = mmpipe(&all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let fp32 = plan(&["--precision", "fp32"]);
    let bf16 = plan(&["--precision", "bf16", "--grad-all-reduce", "bf16"]);
    for i in 0..2 {
        let bytes = |p: &serde_json::Value| p["traffic"]["grad_all_reduce"][i][1].as_u64().unwrap();
        assert_eq!(2 * bytes(&bf16), bytes(&fp32));
        let memory =
            |p: &serde_json::Value, k: &str| p["split"]["groups"][i]["memory"][k].as_f64().unwrap();
        assert!(memory(&bf16, "weights") > memory(&fp32, "weights"));
        assert!(memory(&bf16, "gradients") > memory(&fp32, "gradients"));
        // The activations in the compute dtype halve; the residual stream stays f32.
        let (half, full) = (memory(&bf16, "activations"), memory(&fp32, "activations"));
        assert!(0.5 * full < half && half < full, "{half} vs {full}");
    }
}

/// `mmpipe bench` takes the precision and reports it (a tiny model, one step), and its
/// RESULT_JSON line is what scripts/gpu-bench.sh's summary reads.
#[test]
fn bench_runs_in_bf16_and_reports_it() {
    let out = mmpipe(&[
        "bench",
        "--model",
        "configs/clip-tiny.toml",
        "--topology",
        "topology/cpu-1x1.toml",
        "--batch",
        "8",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--precision",
        "bf16",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("bf16 (f32 master weights"), "{stdout}");
    // cpu-1x1.toml has no device kinds: the planner has nothing to predict, and says so.
    assert!(
        stdout.contains("planner: no prediction for topology/cpu-1x1.toml"),
        "{stdout}"
    );
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT_JSON "))
        .expect("a RESULT_JSON line");
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(report["precision"], "bf16");
    assert!(report["predicted"].is_null());
    assert!(report["samples_per_second"]
        .as_f64()
        .is_some_and(|s| s > 0.0));

    // What scripts/gpu-bench.sh makes of this line on a GPU (scripts/gpu_summary.py), beside
    // an OpenCLIP bench's line as its anchor prints it (here with no FLOP count, as when its
    // counter fails): the bench's fields are the ones the summary reads.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gpu-summary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = dir.join("mmpipe.out");
    let theirs = dir.join("openclip.out");
    let summary = dir.join("summary.json");
    let _ = std::fs::remove_file(&summary);
    std::fs::write(&ours, &stdout).unwrap();
    std::fs::write(
        &theirs,
        r#"RESULT_JSON {"model": "clip-tiny", "batch": 8, "precision": "amp_bf16", "samples_per_s": 100.0, "tflops": null, "bf16_matmul_tflops": null, "peak_gpu_mem_gib": null}"#,
    )
    .unwrap();
    let summarise = |args: &[&std::path::Path]| {
        let out = std::process::Command::new("python3")
            .arg("scripts/gpu_summary.py")
            .args(args)
            .output()
            .expect("python3 runs scripts/gpu_summary.py");
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let p = std::path::Path::new;
    let line = summarise(&[
        p("side-by-side"),
        p("clip-tiny"),
        p("bf16"),
        &ours,
        &theirs,
        &summary,
    ]);
    assert!(
        line.starts_with("SIDE-BY-SIDE clip-tiny bf16 batch 8: mmpipe ")
            && line.contains("OpenCLIP 100.0 (n/a TFLOP/s)"),
        "{line}"
    );
    let line = summarise(&[p("ablation"), p("clip-tiny"), &ours, &ours, &summary]);
    assert!(
        line.starts_with("ABLATION clip-tiny bf16: flash attention "),
        "{line}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&summary)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sps = report["samples_per_second"].as_f64().unwrap();
    assert_eq!(rows.len(), 2);
    assert!((rows[0]["ratio"].as_f64().unwrap() - sps / 100.0).abs() < 1e-9);
    assert_eq!(rows[1]["flash_samples_per_s"].as_f64(), Some(sps));
}

/// A rank stuck outside any collective (here its images are FIFOs nobody writes: the
/// read never returns) used to hang the process for ever: its peer's collective times
/// out, and the process then ends within the time-out again, naming the stuck rank.
#[test]
fn a_rank_stuck_outside_a_collective_ends_the_run_naming_it() {
    let dir = std::env::temp_dir().join(format!("mmpipe-stuck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = String::from("filepath,title\n");
    for i in 0..4 {
        let fifo = dir.join(format!("{i}.png"));
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        rows += &format!("{},a photo that never arrives\n", fifo.display());
    }
    std::fs::write(dir.join("pairs.csv"), rows).unwrap();
    let started = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args([
            "train",
            "--topology",
            "topology/cpu-1x1.toml",
            "--model",
            "configs/clip-tiny-bpe.toml",
            "--batch",
            "4",
            "--steps",
            "3",
            "--eval-pairs",
            "0",
            "--quiet",
            "--set",
            "data.kind=csv",
            "--set",
            &format!("data.csv={}", dir.join("pairs.csv").display()),
            "--set",
            "collective_timeout=2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Without the fix the process never ends: give it a minute, then fail.
    while child.try_wait().unwrap().is_none() {
        if started.elapsed().as_secs() > 60 {
            child.kill().unwrap();
            panic!("the run still hangs after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("rank 0 (image) still running")
            && stderr.contains("stuck outside any collective"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `mmpipe train --topology topology/cpu-dp2.toml` (two ranks, each holding both towers)
/// gives cpu-1x1's losses step by step, up to float rounding; so does a hybrid (image on
/// three ranks, text on two of them), with an uneven batch, the gather-scatter scheme
/// and micro-batches. The metrics lines say what each rank holds.
#[test]
fn data_parallel_and_hybrid_topologies_train_like_one_device_from_the_cli() {
    let dir = std::env::temp_dir().join(format!("mmpipe-cli-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hybrid = dir.join("hybrid.toml");
    std::fs::write(
        &hybrid,
        "device = \"cpu\"\n[[nodes]]\nname = \"h\"\ndevices = 3\n[groups]\nimage = [\"h:0-2\"]\ntext = [\"h:1-2\"]\n",
    )
    .unwrap();
    let run = |topology: &str, name: &str, extra: &[&str]| {
        let metrics = dir.join(format!("{name}.jsonl"));
        let out = train_with_metrics(topology, 8, 11, &metrics, extra);
        (
            super::common::metric_losses(&metrics),
            text(&out.stdout),
            metrics,
        )
    };
    let close = |a: &[f64], b: &[f64], label: &str| {
        assert_eq!(a.len(), 8, "{label}");
        for (step, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs(),
                "{label} step {step}: {x} vs one device's {y}"
            );
        }
    };
    let (one, _, _) = run("topology/cpu-1x1.toml", "one", &[]);
    let (dp, stdout, metrics) = run("topology/cpu-dp2.toml", "dp2", &[]);
    close(&dp, &one, "cpu-dp2");
    assert!(
        stdout.contains("2 ranks, each holding both towers"),
        "{stdout}"
    );
    let line = first_metrics_line(&metrics);
    for r in line["ranks"].as_array().unwrap() {
        assert_eq!(r["tower"], "image+text", "{r}");
        for tower in ["image", "text"] {
            assert!(r["grad_norm"][tower].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    let flags = [
        "--exchange",
        "gather-scatter",
        "--micro-batch-image",
        "2",
        "--micro-batch-text",
        "2",
    ];
    let (one, _, _) = run("topology/cpu-1x1.toml", "one-gs", &flags);
    let (mixed, stdout, _) = run(hybrid.to_str().unwrap(), "hybrid", &flags);
    close(&mixed, &one, "hybrid");
    assert!(
        stdout.contains("image on 3, text on 2 (2 hold both)"),
        "{stdout}"
    );
}

/// `groups = "auto"` trains the layout `plan --auto` prints as the best: the same groups,
/// and losses like one device's.
#[test]
fn auto_groups_train_the_layout_plan_auto_chooses() {
    let dir = std::env::temp_dir().join(format!("mmpipe-cli-auto-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let topology = dir.join("auto.toml");
    std::fs::write(
        &topology,
        "device = \"cpu\"\ngroups = \"auto\"\n[device_kinds.core]\ntflops = 0.02\nmemory_gib = 4.0\n\
         [links]\nintra_node_gbps = 4.0\nintra_node_latency_us = 20.0\ninter_node_gbps = 4.0\n\
         inter_node_latency_us = 20.0\n[[nodes]]\nname = \"h\"\ndevices = 3\n",
    )
    .unwrap();
    let path = topology.to_str().unwrap();
    let out = mmpipe(&["plan", "--auto", "--topology", path, "--batch", "12"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    let line = |s: &str, key: &str| {
        s.lines()
            .skip_while(|l| !l.starts_with("[groups]"))
            .find(|l| l.starts_with(key))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no `{key}` in {s}"))
    };
    let (image, txt) = (line(&plan, "image = "), line(&plan, "text = "));
    let metrics = dir.join("auto.jsonl");
    let out = mmpipe(&[
        "train",
        "--topology",
        path,
        "--batch",
        "12",
        "--steps",
        "3",
        "--eval-pairs",
        "0",
        "--quiet",
        "--metrics",
        metrics.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let chosen = stdout
        .lines()
        .find(|l| l.contains("groups = \"auto\": training the layout"))
        .unwrap_or_else(|| panic!("{stdout}"));
    // The plan writes `image = ["h:0-2"]`, the run `image = [h:0-2]`.
    let bare = |l: &str| l.replace('"', "");
    assert!(chosen.contains(&bare(&image)), "{chosen} vs {image}");
    assert!(chosen.contains(&bare(&txt)), "{chosen} vs {txt}");
    assert_eq!(super::common::metric_losses(&metrics).len(), 3);
}

/// `train` sums the gradients in buckets during backward by default, with the buckets
/// `--grad-bucket-mb` asks for, and says how much backward hid; `--no-grad-overlap`
/// sums them after backward (no buckets in the metrics, no overlap table); the same
/// losses either way. A bucket size that is not positive is refused by name.
#[test]
fn train_overlaps_the_gradient_sums_unless_told_not_to() {
    let dir = std::env::temp_dir().join(format!("mmpipe-overlap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, extra: &[&str]| -> (String, Vec<serde_json::Value>) {
        let metrics = dir.join(name);
        let out = train_with_metrics("topology/cpu-2x2.toml", 2, 16, &metrics, extra);
        let lines = std::fs::read_to_string(&metrics)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (text(&out.stdout), lines)
    };
    let buckets = |lines: &[serde_json::Value]| -> Vec<u64> {
        lines[0]["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["grad_overlap"]["buckets"].as_u64().unwrap())
            .collect()
    };
    let loss =
        |stdout: &str| stdout.lines().find(|l| l.starts_with("loss ")).unwrap()[..20].to_string();
    let (one, one_lines) = run("one.jsonl", &[]);
    let (many, many_lines) = run("many.jsonl", &["--grad-bucket-mb", "0.01"]);
    let (after, after_lines) = run("after.jsonl", &["--no-grad-overlap"]);
    assert_eq!(
        buckets(&one_lines),
        [1, 1, 1, 1],
        "one 25 MB bucket per rank"
    );
    assert!(
        buckets(&many_lines).iter().all(|&b| b > 3),
        "{:?}",
        buckets(&many_lines)
    );
    assert_eq!(buckets(&after_lines), [0, 0, 0, 0]);
    assert!(one.contains("gradient sums during backward"), "{one}");
    assert!(many.contains("gradient sums during backward"), "{many}");
    assert!(!after.contains("gradient sums during backward"), "{after}");
    assert_eq!(loss(&one), loss(&after));
    assert_eq!(loss(&many), loss(&after));

    let out = mmpipe(&[
        "train",
        "--topology",
        "topology/cpu-2x2.toml",
        "--steps",
        "1",
        "--grad-bucket-mb",
        "0",
        "--quiet",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("grad_bucket_mb"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where ranks hold both towers, `train` gathers the image features during the text
/// forward by default (one gather a step per rank in the metrics, and the table saying
/// what it hid); `--no-feature-overlap` and `--set feature_overlap=false` gather both
/// after the forwards; the same losses every way.
#[test]
fn train_gathers_the_image_features_during_the_text_forward_unless_told_not_to() {
    let dir = std::env::temp_dir().join(format!("mmpipe-feature-overlap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, extra: &[&str]| -> (String, Vec<u64>) {
        let metrics = dir.join(name);
        let out = train_with_metrics("topology/cpu-dp2.toml", 2, 8, &metrics, extra);
        let first = first_metrics_line(&metrics);
        let gathers = first["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["feature_overlap"]["gathers"].as_u64().unwrap())
            .collect();
        (text(&out.stdout), gathers)
    };
    let loss =
        |stdout: &str| stdout.lines().find(|l| l.starts_with("loss ")).unwrap()[..20].to_string();
    const TABLE: &str = "image features gathered during the text forward";
    let (early, early_gathers) = run("early.jsonl", &[]);
    assert_eq!(early_gathers, [1, 1]);
    assert!(early.contains(TABLE), "{early}");
    for (name, extra) in [
        ("flag.jsonl", &["--no-feature-overlap"][..]),
        ("set.jsonl", &["--set", "feature_overlap=false"][..]),
    ] {
        let (once, gathers) = run(name, extra);
        assert_eq!(gathers, [0, 0], "{extra:?}");
        assert!(!once.contains(TABLE), "{extra:?}: {once}");
        assert_eq!(loss(&once), loss(&early), "{extra:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first step's line of a metrics file.
fn first_metrics_line(metrics: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(metrics).unwrap();
    serde_json::from_str(text.lines().next().unwrap()).unwrap()
}

/// `mmpipe train` on `topology`, `steps` steps of `batch`, no evaluation, quiet, its
/// metrics into `metrics`, with `extra`; the test stops if it fails.
fn train_with_metrics(
    topology: &str,
    steps: usize,
    batch: usize,
    metrics: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let (steps, batch) = (steps.to_string(), batch.to_string());
    let mut args = vec![
        "train",
        "--topology",
        topology,
        "--steps",
        &steps,
        "--batch",
        &batch,
        "--eval-pairs",
        "0",
        "--quiet",
        "--metrics",
        metrics.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = mmpipe(&args);
    assert!(
        out.status.success(),
        "{topology} {extra:?}: {}",
        text(&out.stderr)
    );
    out
}

/// `mmpipe plan --format json` of ViT-B/32 at batch 256 on `topology`, with `args`.
fn vit_b_32_plan(topology: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec![
        "plan",
        "--topology",
        topology,
        "--model",
        "configs/ViT-B-32.toml",
        "--batch",
        "256",
        "--format",
        "json",
    ];
    all.extend_from_slice(args);
    let out = mmpipe(&all);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// On devices that hold both towers the plan hides the image features' gather behind the
/// text forward, as `train` runs it; `--no-feature-overlap` exposes the whole gather; a
/// split, where no device holds both, is costed alike either way.
#[test]
fn plan_hides_the_image_features_gather_behind_the_text_forward() {
    let split = |topology: &str, args: &[&str]| vit_b_32_plan(topology, args)["split"].clone();
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    let dp = split("topology/2node-8gpu-dp.toml", &[]);
    let dp_once = split("topology/2node-8gpu-dp.toml", &["--no-feature-overlap"]);
    let (whole, exposed) = (
        f(&dp, "feature_all_gather_s"),
        f(&dp, "feature_all_gather_exposed_s"),
    );
    assert!(exposed > 0.0 && exposed < whole, "{exposed} of {whole}");
    assert_eq!(f(&dp_once, "feature_all_gather_exposed_s"), whole);
    assert!(f(&dp, "step_s") < f(&dp_once, "step_s"));
    let split_early = split("topology/4x4.toml", &[]);
    let split_once = split("topology/4x4.toml", &["--no-feature-overlap"]);
    assert_eq!(f(&split_early, "step_s"), f(&split_once, "step_s"));
    assert_eq!(
        f(&split_early, "feature_all_gather_exposed_s"),
        f(&split_early, "feature_all_gather_s")
    );
}

/// Under bf16 on GPUs the plan keeps no attention probabilities among the activations
/// (flash attention, as `train` runs ViT-B/32's heads of 64 there); `--no-flash-attention`
/// costs them back in, Korthikanti's `2.5·a·s²` a layer; under fp32 (no flash kernel) the
/// flag changes nothing.
#[test]
fn plan_counts_no_attention_probabilities_under_flash_attention() {
    let groups = |topology: &str, args: &[&str]| -> Vec<serde_json::Value> {
        vit_b_32_plan(topology, args)["split"]["groups"]
            .as_array()
            .unwrap()
            .clone()
    };
    let activations = |topology: &str, args: &[&str]| -> Vec<f64> {
        groups(topology, args)
            .iter()
            .map(|g| g["memory"]["activations"].as_f64().unwrap())
            .collect()
    };
    let flash = activations("topology/4x4.toml", &[]);
    let kept = activations("topology/4x4.toml", &["--no-flash-attention"]);
    for (f, k) in flash.iter().zip(&kept) {
        assert!(*f > 0.0 && f < k, "{f} vs {k}");
    }
    // The image group: its slice of the batch, 12 layers of 12 heads, 50 tokens, 2 bytes.
    let image = &groups("topology/4x4.toml", &[])[0];
    assert_eq!(image["tower"], "image");
    let samples = image["local_batch"].as_f64().unwrap();
    let probabilities = samples * 12.0 * 2.5 * 12.0 * 50.0 * 50.0 * 2.0;
    assert!(
        ((kept[0] - flash[0]) - probabilities).abs() < 1e-6 * kept[0],
        "{} - {} vs {probabilities}",
        kept[0],
        flash[0]
    );
    assert_eq!(
        activations("topology/4x4.toml", &["--precision", "fp32"]),
        activations(
            "topology/4x4.toml",
            &["--precision", "fp32", "--no-flash-attention"]
        )
    );
}

/// `train --no-flash-attention` (or `--set flash_attention=false`) on a CPU topology says
/// that it changes nothing there, and trains the same losses.
#[test]
fn train_says_flash_attention_is_a_gpu_kernel() {
    let dir = std::env::temp_dir().join(format!("mmpipe-flash-note-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let loss = |out: &std::process::Output| {
        let first = |name: &str| {
            first_metrics_line(&dir.join(name))["loss"]
                .as_f64()
                .unwrap()
        };
        (text(&out.stderr), first)
    };
    let on = train_with_metrics("topology/cpu-dp2.toml", 1, 8, &dir.join("on.jsonl"), &[]);
    let (stderr, first) = loss(&on);
    assert!(!stderr.contains("flash_attention = false"), "{stderr}");
    for (name, extra) in [
        ("flag.jsonl", &["--no-flash-attention"][..]),
        ("set.jsonl", &["--set", "flash_attention=false"][..]),
    ] {
        let off = train_with_metrics("topology/cpu-dp2.toml", 1, 8, &dir.join(name), extra);
        let stderr = text(&off.stderr);
        assert!(
            stderr.contains("flash_attention = false changes nothing on topology/cpu-dp2.toml"),
            "{extra:?}: {stderr}"
        );
        assert_eq!(first(name), first("on.jsonl"), "{extra:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The plan's exposed gradient all-reduce follows the bucket size: small buckets hide
/// all but the last one behind backward; one bucket as large as the gradients hides
/// nothing, as `--no-overlap`; a bucket size that is not positive is refused.
#[test]
fn plan_exposes_the_last_gradient_bucket() {
    let exposed = |args: &[&str]| -> Vec<(f64, f64)> {
        vit_b_32_plan("topology/4x4.toml", args)["split"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["grad_all_reduce_s"].as_f64().unwrap(),
                    g["grad_all_reduce_exposed_s"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let small = exposed(&["--grad-bucket-mb", "1"]);
    let whole = exposed(&["--grad-bucket-mb", "1000"]);
    let none = exposed(&["--no-overlap"]);
    for ((s, w), n) in small.iter().zip(&whole).zip(&none) {
        assert!(s.1 > 0.0 && s.1 < 0.1 * s.0, "{s:?}");
        assert_eq!(w.1, w.0);
        assert_eq!(n.1, n.0);
    }
    let out = mmpipe(&[
        "plan",
        "--topology",
        "topology/4x4.toml",
        "--grad-bucket-mb",
        "0",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--grad-bucket-mb"),
        "{}",
        text(&out.stderr)
    );
}
