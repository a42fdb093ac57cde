//! Zero-shot classification on a labelled image folder: the scores by hand, a folder
//! written from Fashion-MNIST's test split giving the in-memory evaluation's accuracy,
//! `mmpipe eval --zeroshot-folder`, and bad input named.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mmpipe::data::fashion_mnist::{FashionMnist, Split, CLASSES, DEBIAN_DIR, SIDE, TEMPLATES};
use mmpipe::eval::zero_shot::{zero_shot_scores, LabelledImages, Templates, ZeroShotSet};
use mmpipe::model::ClipConfig;

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmpipe-zs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Three classes along the axes of 3-D features; five images: two of class 0 (one right,
/// one taken for class 1 with class 0 second), two of class 1 (right), one of class 2
/// ranked third. Top-1 3/5, top-5 5/5, per-class recall (1/2 + 1 + 0)/3.
#[test]
fn scores_by_hand() {
    let classes = Tensor::from_vec(
        vec![1f32, 0., 0., 0., 1., 0., 0., 0., 1.],
        (3, 3),
        &Device::Cpu,
    )
    .unwrap();
    let images = Tensor::from_vec(
        vec![
            0.9f32, 0.1, 0.0, // 0 → 0
            0.4, 0.6, 0.0, // 0 → 1, then 0
            0.1, 0.9, 0.0, // 1 → 1
            0.0, 0.8, 0.2, // 1 → 1
            0.5, 0.4, 0.1, // 2 → 0, 1, then 2
        ],
        (5, 3),
        &Device::Cpu,
    )
    .unwrap();
    let s = zero_shot_scores(&images, &classes, &[0, 0, 1, 1, 2]).unwrap();
    assert_eq!((s.images, s.classes), (5, 3));
    assert!((s.top1 - 0.6).abs() < 1e-12, "{s:?}");
    assert!((s.top5 - 1.0).abs() < 1e-12, "{s:?}");
    assert!((s.mean_per_class_recall - 0.5).abs() < 1e-12, "{s:?}");
    let e = zero_shot_scores(&images, &classes, &[0, 0, 1, 1, 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 3 of 3 classes"), "{e}");
}

/// `n` Fashion-MNIST test images as RGB PNGs in `root/CLASS/i.png` (the class names as
/// folder names).
fn write_fashion_folder(root: &Path, n: usize) -> FashionMnist {
    let set = FashionMnist::load(Path::new(DEBIAN_DIR), Split::Test).unwrap();
    for i in 0..n {
        let folder = root.join(CLASSES[set.label(i)]);
        std::fs::create_dir_all(&folder).unwrap();
        image::RgbImage::from_raw(SIDE as u32, SIDE as u32, set.rgb(i))
            .unwrap()
            .save(folder.join(format!("{i:05}.png")))
            .unwrap();
    }
    set
}

/// A short training run's checkpoint of the BPE tiny model on Fashion-MNIST.
fn checkpoint(dir: &Path) -> PathBuf {
    let cfg = mmpipe::train::TrainConfig {
        steps: 2,
        global_batch: 16,
        checkpoint_dir: Some(dir.to_path_buf()),
        // Copied into the checkpoint: `mmpipe eval` reads the model from there.
        model: Some(PathBuf::from("configs/clip-tiny-bpe.toml")),
        data: mmpipe::data::DataConfig {
            kind: mmpipe::data::DataKind::FashionMnist,
            ..mmpipe::data::DataConfig::default()
        },
        ..super::common::train_config(16)
    };
    let model = bpe_model();
    mmpipe::train::train(&super::common::cpu_topology(1, 1), &model, &cfg).unwrap();
    dir.join("step-00000002")
}

fn bpe_model() -> ClipConfig {
    ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap()
}

/// 300 test images written as a class folder score what the in-memory Fashion-MNIST
/// evaluation scores on the same images with the same six templates: the same pixels,
/// the same class features, the same top-1 (the folder's class order differs, which the
/// accuracy does not see).
#[test]
fn a_folder_of_fashion_mnist_scores_the_in_memory_evaluation() {
    const N: usize = 300;
    let dir = fresh_dir("fashion");
    let root = dir.join("images");
    write_fashion_folder(&root, N);
    let templates = dir.join("templates.txt");
    std::fs::write(&templates, TEMPLATES.join("\n")).unwrap();
    let checkpoint = checkpoint(&dir.join("run"));
    let model = bpe_model();
    let set = LabelledImages::from_folder(&root, None).unwrap();
    assert_eq!(set.images.len(), N);
    let mut sorted = CLASSES.map(str::to_string).to_vec();
    sorted.sort();
    assert_eq!(set.classes, sorted, "folder names, sorted");
    let set = ZeroShotSet::new("fashion", set, Some(&templates), &model).unwrap();
    assert_eq!(set.templates, Templates::from_file(&templates).unwrap());
    let (scores, rate) =
        mmpipe::eval::zero_shot_checkpoint(&checkpoint, &model, &set, false).unwrap();
    assert!(rate > 0.0);
    let (reference, _) =
        mmpipe::eval::evaluate_checkpoint(&checkpoint, &model, Path::new(DEBIAN_DIR), N, None)
            .unwrap();
    let want = reference.zero_shot.unwrap();
    assert!(
        (scores.top1 - want).abs() < 1e-12,
        "folder top-1 {} vs in-memory {want}",
        scores.top1
    );
    assert!(scores.top5 >= scores.top1 && scores.top5 <= 1.0);
    assert!(scores.mean_per_class_recall > 0.0);
}

/// `mmpipe eval --zeroshot-folder ROOT --format json` on a checkpoint; OpenAI's 80
/// templates by default, a class-names file when given.
#[test]
fn eval_zeroshot_folder_from_the_cli() {
    let dir = fresh_dir("cli");
    let root = dir.join("images");
    write_fashion_folder(&root, 60);
    let checkpoint = checkpoint(&dir.join("run"));
    let names = dir.join("names.txt");
    let mut sorted = CLASSES.to_vec();
    sorted.sort();
    std::fs::write(&names, sorted.join("\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["eval", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--zeroshot-folder")
        .arg(&root)
        .arg("--class-names")
        .arg(&names)
        .args(["--format", "json", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["templates"], 80, "{v}");
    assert_eq!(v["zero_shot"]["images"], 60, "{v}");
    assert_eq!(v["zero_shot"]["classes"], 10, "{v}");
    for key in ["top1", "top5", "mean_per_class_recall"] {
        let s = v["zero_shot"][key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&s), "{key}: {v}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["eval", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--zeroshot-folder")
        .arg(&root)
        .arg("--quiet")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("top-1") && text.contains("mean per-class recall"),
        "{text}"
    );
}

/// The progress bar is drawn on a terminal (`script` gives the command one), with
/// images/s, and `--quiet` leaves it out.
#[test]
fn eval_draws_a_progress_bar_unless_quiet() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("this test needs util-linux's `script` (for a terminal)");
    }
    let dir = fresh_dir("bar");
    let root = dir.join("images");
    write_fashion_folder(&root, 20);
    let checkpoint = checkpoint(&dir.join("run"));
    let run = |quiet: bool| {
        let command = format!(
            "{} eval --checkpoint {} --zeroshot-folder {} {}",
            env!("CARGO_BIN_EXE_mmpipe"),
            checkpoint.display(),
            root.display(),
            if quiet { "--quiet" } else { "" }
        );
        let out = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .env("TERM", "xterm")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (shown, quiet) = (run(false), run(true));
    assert!(shown.contains("20/20 images"), "{shown}");
    assert!(
        !quiet.contains("images ·") && quiet.contains("top-1"),
        "{quiet}"
    );
}

/// Bad input names its path: an empty class folder, a names file of the wrong length,
/// an unreadable template file, a template without `{}`, a folder with no classes.
#[test]
fn bad_zero_shot_input_names_the_path() {
    let dir = fresh_dir("bad");
    let root = dir.join("images");
    write_fashion_folder(&root, 20);
    std::fs::create_dir_all(root.join("zebra")).unwrap();
    std::fs::write(root.join("zebra/notes.txt"), "not an image").unwrap();
    let e = LabelledImages::from_folder(&root, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("zebra") && e.contains("no images"), "{e}");
    std::fs::remove_dir_all(root.join("zebra")).unwrap();

    let names = dir.join("names.txt");
    std::fs::write(&names, "one\ntwo\n").unwrap();
    let e = LabelledImages::from_folder(&root, Some(&names))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("names.txt") && e.contains("2 class names for the"),
        "{e}"
    );

    let missing = dir.join("no-such-templates.txt");
    let e = Templates::from_file(&missing).unwrap_err().to_string();
    assert!(
        e.contains("no-such-templates.txt") && e.contains("cannot read"),
        "{e}"
    );
    let broken = dir.join("broken.txt");
    std::fs::write(&broken, "a photo of a {}.\na photo without a slot.\n").unwrap();
    let e = Templates::from_file(&broken).unwrap_err().to_string();
    assert!(e.contains("broken.txt") && e.contains("line 2"), "{e}");

    let flat = dir.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    let e = LabelledImages::from_folder(&flat, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("flat") && e.contains("no class folders"), "{e}");
    assert_eq!(Templates::openai_imagenet().0.len(), 80);
}

/// `[[eval.sets]]` in a training config: a named zero-shot folder scored at every
/// evaluation over the ranks (images split over the image group, classes over the two
/// text ranks of cpu-1x2), printed, written to the metrics file and TensorBoard; its
/// final scores are what `mmpipe eval --zeroshot-folder` gives the final checkpoint in
/// one process.
#[test]
fn eval_sets_score_during_training_like_eval_on_the_checkpoint() {
    let dir = fresh_dir("train");
    write_fashion_folder(&dir.join("images"), 50);
    std::fs::write(dir.join("templates.txt"), TEMPLATES.join("\n")).unwrap();
    let config = dir.join("train.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\n[data]\nkind = \"fashion-mnist\"\n[eval]\nevery = 2\npairs = 0\n\
             [[eval.sets]]\nname = \"clothes\"\nfolder = \"images\"\ntemplates = \"templates.txt\"\n",
            std::fs::canonicalize("configs/clip-tiny-bpe.toml").unwrap()
        ),
    )
    .unwrap();
    let (metrics, events, checkpoints) = (dir.join("m.jsonl"), dir.join("tb"), dir.join("ckpt"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["train", "--topology", "topology/cpu-1x2.toml", "--config"])
        .arg(&config)
        .args(["--batch", "16", "--steps", "4", "--quiet"])
        .arg("--metrics")
        .arg(&metrics)
        .arg("--tensorboard")
        .arg(&events)
        .arg("--checkpoint-dir")
        .arg(&checkpoints)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "after steps 2 and 4");
    let last = &evals[1]["eval"]["sets"]["clothes"];
    assert_eq!(last["images"], 50, "{last}");
    let tb = std::fs::read_dir(&events).unwrap().count();
    assert_eq!(tb, 1);
    assert!(
        std::fs::read(
            std::fs::read_dir(&events)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path()
        )
        .unwrap()
        .windows(b"eval/sets/clothes/top1".len())
        .any(|w| w == b"eval/sets/clothes/top1"),
        "the event file has the set's top-1"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["eval", "--checkpoint"])
        .arg(checkpoints.join("step-00000004"))
        .arg("--zeroshot-folder")
        .arg(dir.join("images"))
        .arg("--templates")
        .arg(dir.join("templates.txt"))
        .args(["--format", "json", "--quiet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let single: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["top1", "top5", "mean_per_class_recall"] {
        let (a, b) = (
            last[key].as_f64().unwrap(),
            single["zero_shot"][key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-12,
            "{key}: during training {a}, on the checkpoint {b}"
        );
    }
    assert!(stdout.contains("clothes: zero-shot top-1"), "{stdout}");
    // `mmpipe report` plots the set's top-1 over the steps.
    let plots = dir.join("plots");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .arg("report")
        .arg(&metrics)
        .arg("--out")
        .arg(&plots)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(plots.join("sets.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "{} bytes",
        png.len()
    );
}

/// `n` Fashion-MNIST test images as a WebDataset shard: `KEY.png` and `KEY.cls` (the label
/// as text), and the class names by label.
fn write_fashion_shard(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let set = FashionMnist::load(Path::new(DEBIAN_DIR), Split::Test).unwrap();
    let samples: Vec<mmpipe::data::shards::SampleMembers> = (0..n)
        .map(|i| {
            let mut png = Vec::new();
            image::RgbImage::from_raw(SIDE as u32, SIDE as u32, set.rgb(i))
                .unwrap()
                .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .unwrap();
            (
                format!("{i:06}"),
                vec![
                    ("png".to_string(), png),
                    ("cls".to_string(), set.label(i).to_string().into_bytes()),
                ],
            )
        })
        .collect();
    let shard = dir.join("val-000.tar");
    mmpipe::data::shards::write_shard(&shard, &samples).unwrap();
    let names = dir.join("classes.txt");
    std::fs::write(&names, CLASSES.join("\n")).unwrap();
    (shard, names)
}

/// Shards with `.cls` labels score what the in-memory evaluation scores on the same
/// images; from the CLI too; a label past the names and a sample without one are errors
/// naming the shard and the sample.
#[test]
fn webdataset_shards_with_cls_labels_score_the_in_memory_evaluation() {
    const N: usize = 120;
    let dir = fresh_dir("shards");
    let (shard, names) = write_fashion_shard(&dir, N);
    let templates = dir.join("templates.txt");
    std::fs::write(&templates, TEMPLATES.join("\n")).unwrap();
    let checkpoint = checkpoint(&dir.join("run"));
    let model = bpe_model();
    let set = LabelledImages::from_shards(std::slice::from_ref(&shard), &names).unwrap();
    assert_eq!(set.images.len(), N);
    let set = ZeroShotSet::new("shards", set, Some(&templates), &model).unwrap();
    let (scores, _) = mmpipe::eval::zero_shot_checkpoint(&checkpoint, &model, &set, false).unwrap();
    let (reference, _) =
        mmpipe::eval::evaluate_checkpoint(&checkpoint, &model, Path::new(DEBIAN_DIR), N, None)
            .unwrap();
    assert!((scores.top1 - reference.zero_shot.unwrap()).abs() < 1e-12);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["eval", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--zeroshot-shards")
        .arg(&shard)
        .arg("--class-names")
        .arg(&names)
        .arg("--templates")
        .arg(&templates)
        .args(["--format", "json", "--quiet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!((v["zero_shot"]["top1"].as_f64().unwrap() - scores.top1).abs() < 1e-12);

    let short = dir.join("short.txt");
    std::fs::write(&short, "one\ntwo\n").unwrap();
    let e = LabelledImages::from_shards(std::slice::from_ref(&shard), &short)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("val-000.tar") && e.contains("sample `") && e.contains("past the 2 class names"),
        "{e}"
    );
    let unlabelled = dir.join("unlabelled.tar");
    mmpipe::data::shards::write_shard(
        &unlabelled,
        &[("a".into(), vec![("png".into(), vec![1, 2, 3])])],
    )
    .unwrap();
    let e = LabelledImages::from_shards(&[unlabelled], &names)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unlabelled.tar") && e.contains("sample `a`") && e.contains(".cls"),
        "{e}"
    );
}

/// `[[eval.sets]]` that cannot work are refused when the config is read, naming the field.
#[test]
fn eval_sets_in_a_config_are_checked_by_field() {
    let dir = fresh_dir("config");
    for (body, field, message) in [
        (
            "[[eval.sets]]\nname = \"a\"\nshards = [\"v.tar\"]\n",
            "eval.sets[0].class_names",
            "need a class-names file",
        ),
        (
            "[[eval.sets]]\nname = \"a\"\n",
            "eval.sets[0].folder",
            "one of `folder`",
        ),
        (
            "[[eval.sets]]\nname = \"a\"\nfolder = \"x\"\n[[eval.sets]]\nname = \"a\"\nfolder = \"y\"\n",
            "eval.sets[1].name",
            "names two sets",
        ),
        (
            "[[eval.sets]]\nname = \"a\"\nfolder = \"x\"\ncsv = \"l.csv\"\n",
            "eval.sets[0].folder",
            "one of `folder`",
        ),
        (
            "[[eval.sets]]\nname = \"a\"\nfolder = \"x\"\nlabel_column = \"y\"\n",
            "eval.sets[0].label_column",
            "does nothing for a zero-shot set read from folder",
        ),
        (
            "[[eval.sets]]\nname = \"a\"\ncsv = \"l.csv\"\ncaption_column = \"t\"\n",
            "eval.sets[0].caption_column",
            "does nothing for a zero-shot set",
        ),
        (
            "[[eval.sets]]\nname = \"a\"\nkind = \"retrieval\"\ncsv = \"p.csv\"\nlabel_column = \"y\"\n",
            "eval.sets[0].label_column",
            "does nothing for a retrieval set read from csv",
        ),
        (
            "[[eval.sets]]\nname = \"a\"\nkind = \"retrieval\"\nfolder = \"x\"\n",
            "eval.sets[0].shards",
            "either `shards`",
        ),
    ] {
        let path = dir.join("train.toml");
        std::fs::write(&path, body).unwrap();
        let e = mmpipe::train::TrainConfig::load(Some(&path), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.toml") && e.contains(field) && e.contains(message), "{e}");
    }
}

/// A retrieval set of `[[eval.sets]]` (the real-photo shard's 22 image–caption pairs)
/// scored during training on cpu-2x1 (images over two image ranks, captions on the text
/// rank) equals `mmpipe eval --retrieval-shards` on the final checkpoint.
#[test]
fn retrieval_sets_score_during_training_like_eval_on_the_checkpoint() {
    let dir = fresh_dir("retrieval");
    let shard = std::fs::canonicalize("tests/fixtures/real-photos.tar").unwrap();
    // The same pairs as a TSV beside the config (paths relative to it).
    let photos = dir.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    tar::Archive::new(std::fs::File::open(&shard).unwrap())
        .unpack(&photos)
        .unwrap();
    let mut tsv = String::from("path\tcaption\n");
    for i in 0..22 {
        let key = format!("{i:06}");
        let image = ["png", "jpg"]
            .iter()
            .map(|e| format!("{key}.{e}"))
            .find(|f| photos.join(f).is_file())
            .unwrap();
        let caption = std::fs::read_to_string(photos.join(format!("{key}.txt"))).unwrap();
        tsv.push_str(&format!("photos/{image}\t{}\n", caption.trim()));
    }
    std::fs::write(dir.join("pairs.tsv"), tsv).unwrap();
    let config = dir.join("train.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\n[data]\nkind = \"fashion-mnist\"\n[eval]\npairs = 0\n\
             [[eval.sets]]\nname = \"photos\"\nkind = \"retrieval\"\nshards = [{:?}]\n\
             [[eval.sets]]\nname = \"photos-tsv\"\nkind = \"retrieval\"\ncsv = \"pairs.tsv\"\n\
             image_column = \"path\"\ncaption_column = \"caption\"\n",
            std::fs::canonicalize("configs/clip-tiny-bpe.toml").unwrap(),
            shard.display().to_string()
        ),
    )
    .unwrap();
    let (metrics, checkpoints) = (dir.join("m.jsonl"), dir.join("ckpt"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["train", "--topology", "topology/cpu-2x1.toml", "--config"])
        .arg(&config)
        .args(["--batch", "16", "--steps", "2", "--quiet"])
        .arg("--metrics")
        .arg(&metrics)
        .arg("--checkpoint-dir")
        .arg(&checkpoints)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("photos: retrieval image->text"), "{stdout}");
    let eval: serde_json::Value = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v.get("eval").is_some())
        .unwrap();
    let during = &eval["eval"]["sets"]["photos"];
    assert_eq!(during["pairs"], 22, "{during}");
    assert_eq!(&eval["eval"]["sets"]["photos-tsv"], during);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["eval", "--checkpoint"])
        .arg(checkpoints.join("step-00000002"))
        .arg("--retrieval-shards")
        .arg(&shard)
        .args(["--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let single: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        during["recall"], single["retrieval"]["recall"],
        "{during} vs {single}"
    );
    assert_eq!(during["chance_r1"], single["retrieval"]["chance_r1"]);
}

/// The "done when": `mmpipe train --shards … --config X` with zero-shot sets (a
/// folder, and the same images as a CSV whose columns the config names) and a retrieval
/// set prints them at each evaluation during training (off a terminal too, in
/// a job's log), and writes them to the metrics JSONL and to TensorBoard under the sets'
/// names, with the recall named as the held-out evaluation's is.
#[test]
fn train_on_shards_prints_and_logs_both_kinds_of_sets() {
    let dir = fresh_dir("done");
    let fixture = |p: &str| std::fs::canonicalize(Path::new("tests/fixtures").join(p)).unwrap();
    // The texture folder again as a CSV with its own column names, beside the config.
    let mut csv = String::from("image,texture\n");
    let classes = fixture("openclip-eval/classes");
    let mut folders: Vec<PathBuf> = std::fs::read_dir(&classes)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    folders.sort();
    for folder in &folders {
        let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let class = folder.file_name().unwrap().to_string_lossy();
            csv.push_str(&format!("{},{class}\n", file.display()));
        }
    }
    std::fs::write(dir.join("textures.csv"), csv).unwrap();
    let config = dir.join("x.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\n[eval]\nevery = 2\n\
             [[eval.sets]]\nname = \"textures\"\nfolder = {:?}\ntemplates = {:?}\n\
             [[eval.sets]]\nname = \"textures-csv\"\ncsv = \"textures.csv\"\n\
             image_column = \"image\"\nlabel_column = \"texture\"\ntemplates = {:?}\n\
             [[eval.sets]]\nname = \"photos\"\nkind = \"retrieval\"\nshards = [{:?}]\n",
            std::fs::canonicalize("configs/clip-tiny-bpe.toml").unwrap(),
            classes,
            fixture("openclip-eval/templates.txt"),
            fixture("openclip-eval/templates.txt"),
            fixture("openclip-eval/retrieval.tar").display().to_string(),
        ),
    )
    .unwrap();
    let (metrics, events) = (dir.join("m.jsonl"), dir.join("tb"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["train", "--shards"])
        .arg(fixture("real-photos.tar"))
        .arg("--config")
        .arg(&config)
        .args(["--batch", "8", "--steps", "4", "--metrics"])
        .arg(&metrics)
        .arg("--tensorboard")
        .arg(&events)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // No warning about built-in pairs: the named sets are the evaluation.
    assert!(!stderr.contains("no built-in held-out pairs"), "{stderr}");
    let during = stdout
        .lines()
        .find(|l| l.starts_with("eval after step 2:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        during.contains("textures: zero-shot top-1") && during.contains("photos: retrieval"),
        "{during}"
    );
    assert!(stdout.contains("step 4/4 · loss"), "{stdout}");
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_some())
        .collect();
    assert_eq!(evals.len(), 2, "{evals:?}");
    for e in &evals {
        let sets = &e["eval"]["sets"];
        assert_eq!(sets["textures"]["images"], 32, "{e}");
        // The CSV of the same images and classes (its columns named in the config).
        assert_eq!(sets["textures-csv"], sets["textures"], "{e}");
        assert!(sets["photos"]["recall"]["image_to_text_r1"].is_f64(), "{e}");
    }
    let file = std::fs::read_dir(&events)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let (_, records) = super::training::read_events(&file);
    for tag in [
        "eval/sets/textures/top1",
        "eval/sets/textures/mean_per_class_recall",
        "eval/sets/photos/recall/image_to_text_r1",
        "eval/sets/photos/recall/text_to_image_r10",
    ] {
        let steps: Vec<i64> = records
            .iter()
            .filter(|(_, v)| v.iter().any(|(t, _)| t == tag))
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(steps, [1, 3], "{tag}");
    }
}
