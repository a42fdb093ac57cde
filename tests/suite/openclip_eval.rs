//! `mmpipe eval` on an OpenCLIP `state_dict` with OpenCLIP's model config (JSON), against
//! what OpenCLIP's and clip_benchmark's own evaluation code gives on the same model and
//! images (tests/fixtures/openclip-eval, from scripts/reference/openclip_eval_fixture.py);
//! the same sets read from a CSV/TSV; and bad CSV input named by file and line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mmpipe::data::convert::CsvColumns;
use mmpipe::eval::retrieval::RetrievalSet;
use mmpipe::eval::zero_shot::{CsvLabels, LabelledImages};

const FIXTURE: &str = "tests/fixtures/openclip-eval";

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmpipe-oce-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(name: &str) -> PathBuf {
    std::fs::canonicalize(Path::new(FIXTURE).join(name)).unwrap()
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

/// The fixture's state_dict with its token embedding written back whole (the rows no
/// text uses are zero, as in the model the reference scored), as OpenCLIP saves it.
fn openclip_state_dict(dir: &Path) -> PathBuf {
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("weights.safetensors"), &Device::Cpu).unwrap();
    let ids = tensors.remove("token_embedding.ids").unwrap();
    let rows = tensors.remove("token_embedding.rows").unwrap();
    let (vocab, width) = (49408, rows.dim(1).unwrap());
    let mut table = vec![0f32; vocab * width];
    let rows: Vec<Vec<f32>> = rows.to_vec2().unwrap();
    for (id, row) in ids.to_vec1::<i64>().unwrap().into_iter().zip(rows) {
        table[id as usize * width..(id as usize + 1) * width].copy_from_slice(&row);
    }
    tensors.insert(
        "token_embedding.weight".into(),
        Tensor::from_vec(table, (vocab, width), &Device::Cpu).unwrap(),
    );
    let path = dir.join("openclip-state-dict.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

fn mmpipe_eval(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .arg("eval")
        .args(args)
        .output()
        .unwrap()
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The 22 photos of the fixture's retrieval shard as files, and a TSV of them.
fn retrieval_tsv(dir: &Path) -> PathBuf {
    let images = dir.join("photos");
    std::fs::create_dir_all(&images).unwrap();
    let mut archive = tar::Archive::new(std::fs::File::open(fixture("retrieval.tar")).unwrap());
    archive.unpack(&images).unwrap();
    let mut keys: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "png").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    keys.sort();
    let mut tsv = String::from("filepath\ttitle\n");
    for key in &keys {
        let caption = std::fs::read_to_string(images.join(format!("{key}.txt"))).unwrap();
        tsv.push_str(&format!("photos/{key}.png\t{}\n", caption.trim()));
    }
    let path = dir.join("pairs.tsv");
    std::fs::write(&path, tsv).unwrap();
    path
}

/// The fixture's class folder as a CSV of image paths and class names.
fn zero_shot_csv(dir: &Path) -> PathBuf {
    let root = fixture("classes");
    let mut csv = String::from("filepath,label\n");
    let mut classes: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    // Rows in another order than the folder's: the scores do not depend on it.
    for class in classes.iter().rev() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(class)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in files {
            let name = class.file_name().unwrap().to_string_lossy();
            csv.push_str(&format!("{},{name}\n", file.display()));
        }
    }
    let path = dir.join("labels.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

/// Zero-shot (top-1, top-5, mean per-class recall) and retrieval (recall@1/5/10 both
/// ways) of `mmpipe eval` on OpenCLIP's state_dict and model config equal clip_benchmark's
/// on the same images, and mmpipe's tokens of every prompt and caption are OpenCLIP's.
/// The reference's logits keep every label at least `zero_shot_min_gap` and
/// `retrieval_min_gap` (1e-5 and more) from every other score, so float noise between the
/// two cannot move a rank: the scores must be equal.
#[test]
fn openclip_scores() {
    let dir = fresh_dir("openclip");
    let expected = expected();
    let state_dict = openclip_state_dict(&dir);
    let model = fixture("model.json");

    let tokenizer = mmpipe::data::TextTokenizer::clip();
    for (text, ids) in expected["tokens"].as_object().unwrap() {
        let ours = tokenizer.encode_batch(&[text.as_str()], 24).unwrap();
        let ours: Vec<u64> = ours
            .ids
            .iter()
            .filter(|&&i| i != 0)
            .map(|&i| i as u64)
            .collect();
        let theirs: Vec<u64> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap())
            .collect();
        assert_eq!(ours, theirs, "tokens of {text:?}");
    }

    let zero_shot = json_of(&mmpipe_eval(&[
        "--checkpoint".as_ref(),
        state_dict.as_os_str(),
        "--model".as_ref(),
        model.as_os_str(),
        "--zeroshot-folder".as_ref(),
        fixture("classes").as_os_str(),
        "--templates".as_ref(),
        fixture("templates.txt").as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]));
    let theirs = &expected["zero_shot"];
    let ours = &zero_shot["zero_shot"];
    assert_eq!(ours["images"], 32, "{ours}");
    assert_eq!(zero_shot["templates"], 3, "{zero_shot}");
    for (our_key, their_key) in [
        ("top1", "acc1"),
        ("top5", "acc5"),
        ("mean_per_class_recall", "mean_per_class_recall"),
    ] {
        let (a, b) = (
            ours[our_key].as_f64().unwrap(),
            theirs[their_key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-9,
            "{our_key}: mmpipe {a}, clip_benchmark {b}"
        );
    }
    // A score strictly between chance and perfect: a broken tower could not pass.
    let top1 = ours["top1"].as_f64().unwrap();
    assert!(top1 > 1.5 / 8.0 && top1 < 1.0, "{ours}");

    let retrieval = json_of(&mmpipe_eval(&[
        "--checkpoint".as_ref(),
        state_dict.as_os_str(),
        "--model".as_ref(),
        model.as_os_str(),
        "--retrieval-shards".as_ref(),
        fixture("retrieval.tar").as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]));
    let recall = retrieval["retrieval"]["recall"].as_object().unwrap();
    assert_eq!(recall.len(), 6, "{retrieval}");
    assert_eq!(retrieval["retrieval"]["pairs"], 22);
    let theirs = &expected["retrieval"];
    for k in [1, 5, 10] {
        // clip_benchmark's "text retrieval" retrieves texts for an image: image->text.
        for (ours, their_key) in [
            (
                format!("image_to_text_r{k}"),
                format!("text_retrieval_recall@{k}"),
            ),
            (
                format!("text_to_image_r{k}"),
                format!("image_retrieval_recall@{k}"),
            ),
        ] {
            let (ours, theirs) = (
                recall[&ours].as_f64().unwrap(),
                theirs[&their_key].as_f64().unwrap(),
            );
            // Theirs went through float32.
            assert!(
                (ours - theirs).abs() < 1e-6,
                "{their_key}: mmpipe {ours}, clip_benchmark {theirs}"
            );
        }
    }
}

/// The same sets as a CSV (class names as labels, rows in another order) and a TSV of
/// image–caption pairs score what the folder and the shard score; `--label-column`,
/// `--caption-column` and `--image-column` name other columns; a DDP-saved state_dict
/// (`module.` names) scores what the plain one does.
#[test]
fn csv_sets_score_what_the_folder_and_the_shard_do() {
    let dir = fresh_dir("csv");
    let state_dict = openclip_state_dict(&dir);
    let model = fixture("model.json");
    let common = |extra: &[&std::ffi::OsStr]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--checkpoint".as_ref(),
            state_dict.as_os_str(),
            "--model".as_ref(),
            model.as_os_str(),
            "--format".as_ref(),
            "json".as_ref(),
        ];
        args.extend_from_slice(extra);
        json_of(&mmpipe_eval(&args))
    };
    let templates = fixture("templates.txt");
    let folder = common(&[
        "--zeroshot-folder".as_ref(),
        fixture("classes").as_os_str(),
        "--templates".as_ref(),
        templates.as_os_str(),
    ]);
    let csv = zero_shot_csv(&dir);
    let from_csv = common(&[
        "--zeroshot-csv".as_ref(),
        csv.as_os_str(),
        "--templates".as_ref(),
        templates.as_os_str(),
    ]);
    assert_eq!(folder["zero_shot"], from_csv["zero_shot"]);

    // Other column names, and class indices with a names file.
    let names = dir.join("names.txt");
    std::fs::write(
        &names,
        "brick\ncoins\ngalaxies\ngrass\ngravel\nmoon\npage\nretina\n",
    )
    .unwrap();
    let mut indexed = String::from("image,class\n");
    for line in std::fs::read_to_string(&csv).unwrap().lines().skip(1) {
        let (file, name) = line.rsplit_once(',').unwrap();
        let index = [
            "brick", "coins", "galaxies", "grass", "gravel", "moon", "page", "retina",
        ]
        .iter()
        .position(|n| *n == name)
        .unwrap();
        indexed.push_str(&format!("{file},{index}\n"));
    }
    let indexed_csv = dir.join("indexed.csv");
    std::fs::write(&indexed_csv, indexed).unwrap();
    let from_indices = common(&[
        "--zeroshot-csv".as_ref(),
        indexed_csv.as_os_str(),
        "--image-column".as_ref(),
        "image".as_ref(),
        "--label-column".as_ref(),
        "class".as_ref(),
        "--class-names".as_ref(),
        names.as_os_str(),
        "--templates".as_ref(),
        templates.as_os_str(),
    ]);
    assert_eq!(folder["zero_shot"], from_indices["zero_shot"]);

    // The same weights as a DDP-wrapped model saves them (`module.` before every name,
    // OpenCLIP's training checkpoints): the same scores.
    let wrapped = dir.join("wrapped.safetensors");
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&state_dict, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (format!("module.{k}"), v))
            .collect();
    candle_core::safetensors::save(&tensors, &wrapped).unwrap();
    let out = mmpipe_eval(&[
        "--checkpoint".as_ref(),
        wrapped.as_os_str(),
        "--model".as_ref(),
        model.as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
        "--zeroshot-folder".as_ref(),
        fixture("classes").as_os_str(),
        "--templates".as_ref(),
        templates.as_os_str(),
    ]);
    assert_eq!(json_of(&out)["zero_shot"], folder["zero_shot"]);

    let shard = common(&[
        "--retrieval-shards".as_ref(),
        fixture("retrieval.tar").as_os_str(),
    ]);
    let tsv = retrieval_tsv(&dir);
    let from_tsv = common(&["--retrieval-csv".as_ref(), tsv.as_os_str()]);
    assert_eq!(shard["retrieval"], from_tsv["retrieval"]);
    let renamed = dir.join("renamed.tsv");
    std::fs::write(
        &renamed,
        std::fs::read_to_string(&tsv)
            .unwrap()
            .replacen("filepath\ttitle", "path\tcaption", 1),
    )
    .unwrap();
    let from_renamed = common(&[
        "--retrieval-csv".as_ref(),
        renamed.as_os_str(),
        "--image-column".as_ref(),
        "path".as_ref(),
        "--caption-column".as_ref(),
        "caption".as_ref(),
    ]);
    assert_eq!(shard["retrieval"], from_renamed["retrieval"]);
}

/// Bad CSV input is named by file and line; a weights file that does not match its model
/// config, or that comes without one, is refused with the tensors or the flag named.
#[test]
fn bad_csv_sets_and_mismatched_weights_are_named() {
    let dir = fresh_dir("bad");
    let image = fixture("classes/brick/0.png");
    let write = |name: &str, body: String| {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    let names = write("names.txt", "brick\nmoon\n".into());
    let labels = CsvLabels::default();
    let img = image.display();
    for (file, body, with_names, message) in [
        (
            "past.csv",
            format!("filepath,label\n{img},0\n{img},2\n"),
            true,
            "line 3: label 2 is past the 2 class names",
        ),
        (
            "unknown.csv",
            format!("filepath,label\n{img},zebra\n"),
            true,
            "line 2: label `zebra` is not one of the 2 class names",
        ),
        (
            "indices.csv",
            format!("filepath,label\n{img},1\n"),
            false,
            "line 2: label `1` is a class index",
        ),
        (
            "blank.csv",
            format!("filepath,label\n{img},moon\n{img},\n"),
            true,
            "line 3: blank `label`",
        ),
        (
            "missing.csv",
            format!("filepath,label\n{img},moon\nnope.png,moon\n"),
            true,
            "line 3: no image file",
        ),
        (
            "columns.csv",
            format!("path,label\n{img},moon\n"),
            true,
            "`filepath`",
        ),
    ] {
        let path = write(file, body);
        let e = LabelledImages::from_csv(&path, &labels, with_names.then_some(names.as_path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(file) && e.contains(message), "{file}: {e}");
    }
    let model = mmpipe::model::ClipConfig::from_file(&fixture("model.json")).unwrap();
    let columns = CsvColumns {
        image: "filepath".into(),
        caption: "title".into(),
        delimiter: None,
    };
    let pairs = write(
        "pairs.csv",
        format!("filepath,title\n{img},a brick wall\n{img},\n"),
    );
    let e = RetrievalSet::from_csv("r", &pairs, &columns, &model)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("pairs.csv") && e.contains("line 3: blank `title`"),
        "{e}"
    );

    // OpenCLIP's weights under a config with one text layer fewer: the stray tensors named.
    let state_dict = openclip_state_dict(&dir);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("model.json")).unwrap()).unwrap();
    config["text_cfg"]["layers"] = 1.into();
    let smaller = write("smaller.json", config.to_string());
    let out = mmpipe_eval(&[
        "--checkpoint".as_ref(),
        state_dict.as_os_str(),
        "--model".as_ref(),
        smaller.as_os_str(),
        "--zeroshot-folder".as_ref(),
        fixture("classes").as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("openclip-state-dict.safetensors")
            && stderr.contains("transformer.resblocks.1.")
            && stderr.contains("does not match"),
        "{stderr}"
    );
    let out = mmpipe_eval(&[
        "--checkpoint".as_ref(),
        state_dict.as_os_str(),
        "--zeroshot-folder".as_ref(),
        fixture("classes").as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--model"),
        "{stderr}"
    );
    // A dead flag is refused: --label-column without a zero-shot CSV.
    let out = mmpipe_eval(&[
        "--checkpoint".as_ref(),
        state_dict.as_os_str(),
        "--label-column".as_ref(),
        "class".as_ref(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--zeroshot-csv"));
}

/// OpenCLIP's model configs read as mmpipe models: the fixture's, ViT-B-32's and RN50's
/// as OpenCLIP ships them; a field mmpipe does not build is refused by name.
#[test]
fn openclip_model_configs_read_or_name_the_field() {
    let dir = fresh_dir("configs");
    let model = mmpipe::model::ClipConfig::from_file(&fixture("model.json")).unwrap();
    assert_eq!(
        (
            model.image_size(),
            model.context_length(),
            model.vocab_size()
        ),
        (16, 24, 49408)
    );
    let vit_b_32 = dir.join("ViT-B-32.json");
    std::fs::write(
        &vit_b_32,
        r#"{"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}"#,
    )
    .unwrap();
    let ours = mmpipe::model::ClipConfig::from_file(Path::new("configs/ViT-B-32.toml")).unwrap();
    let theirs = mmpipe::model::ClipConfig::from_file(&vit_b_32).unwrap();
    assert_eq!(theirs.vision, ours.vision);
    assert_eq!(theirs.text, ours.text);
    let rn50 = dir.join("RN50.json");
    std::fs::write(
        &rn50,
        r#"{"embed_dim": 1024, "quick_gelu": false, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64, "patch_size": null},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}"#,
    )
    .unwrap();
    let ours = mmpipe::model::ClipConfig::from_file(Path::new("configs/RN50.toml")).unwrap();
    assert_eq!(
        mmpipe::model::ClipConfig::from_file(&rn50).unwrap().vision,
        ours.vision
    );
    for (body, field) in [
        (
            r#"{"embed_dim": 8, "vision_cfg": {"ls_init_value": 0.1}, "text_cfg": {}}"#,
            "vision_cfg.ls_init_value",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": "bert"}}"#,
            "text_cfg.hf_model_name",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {"timm_model_name": "vit"}, "text_cfg": {}}"#,
            "vision_cfg.timm_model_name",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {"mlp_ratio": 2.6667}, "text_cfg": {}}"#,
            "vision_cfg.mlp_ratio",
        ),
        (
            r#"{"embed_dim": 8, "vision_cfg": {"bogus": 1}, "text_cfg": {}}"#,
            "vision_cfg.bogus",
        ),
        (r#"{"vision_cfg": {}, "text_cfg": {}}"#, "embed_dim"),
    ] {
        let path = dir.join("bad.json");
        std::fs::write(&path, body).unwrap();
        let e = mmpipe::model::ClipConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.json") && e.contains(field), "{body}: {e}");
    }
}
