//! `mmpipe eval`: a checkpoint's zero-shot accuracy on a labelled image set (a class
//! folder, `.cls` shards or a CSV), its retrieval recall on image–caption pairs (shards or
//! a CSV), or its zero-shot accuracy, recall@k and linear probes on Fashion-MNIST.

use std::path::{Path, PathBuf};

use mmpipe::data::convert::CsvColumns;
use mmpipe::eval::retrieval::RetrievalSet;
use mmpipe::eval::zero_shot::{CsvLabels, LabelledImages, ZeroShotSet};
use mmpipe::model::checkpoint::checkpoint_model;
use mmpipe::model::ClipConfig;

use super::args::{EvalArgs, Format};

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = checkpoint_model(&args.checkpoint, args.model.as_deref())?;
    let progress = !args.quiet && args.format == Format::Text;
    if let Some((set, source)) = retrieval_set(&args, &model)? {
        let (scores, rate) =
            mmpipe::eval::retrieval_checkpoint(&args.checkpoint, &model, &set, progress)?;
        match args.format {
            Format::Text => println!(
                "{}: retrieval on {}: {} ({rate:.0} pairs/s)",
                args.checkpoint.display(),
                source,
                scores.summary()
            ),
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "checkpoint": args.checkpoint,
                    "set": source,
                    "pairs_per_s": rate,
                    "retrieval": scores,
                }))?
            ),
        }
        return Ok(());
    }
    if let Some(images) = labelled_images(&args)? {
        let root = images.root.clone();
        let set = ZeroShotSet::new("eval", images, args.templates.as_deref(), &model)?;
        let templates = &set.templates;
        let (scores, rate) =
            mmpipe::eval::zero_shot_checkpoint(&args.checkpoint, &model, &set, progress)?;
        match args.format {
            Format::Text => println!(
                "{}: zero-shot on {}: {} ({} templates; {rate:.0} images/s)",
                args.checkpoint.display(),
                root.display(),
                scores.summary(),
                templates.0.len()
            ),
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "checkpoint": args.checkpoint,
                    "set": root,
                    "templates": templates.0.len(),
                    "images_per_s": rate,
                    "zero_shot": scores,
                }))?
            ),
        }
        return Ok(());
    }
    fashion_mnist(&args, &model)
}

fn shards(patterns: &[String], flag: &str) -> anyhow::Result<Vec<PathBuf>> {
    Ok(mmpipe::data::shards::resolve(
        patterns,
        Path::new("."),
        Path::new(flag),
        flag,
    )?)
}

/// The retrieval set the flags name, and what it was read from.
fn retrieval_set(
    args: &EvalArgs,
    model: &ClipConfig,
) -> anyhow::Result<Option<(RetrievalSet, String)>> {
    if let Some(csv) = &args.retrieval_csv {
        let columns = CsvColumns {
            image: args.image_column.clone(),
            caption: args.caption_column.clone(),
            delimiter: None,
        };
        let set = RetrievalSet::from_csv("retrieval", csv, &columns, model)?;
        return Ok(Some((set, csv.display().to_string())));
    }
    if args.retrieval_shards.is_empty() {
        return Ok(None);
    }
    let shards = shards(&args.retrieval_shards, "--retrieval-shards")?;
    let set = RetrievalSet::from_shards("retrieval", &shards, model)?;
    Ok(Some((set, format!("{} shard(s)", shards.len()))))
}

/// The labelled images the flags name for zero-shot classification.
fn labelled_images(args: &EvalArgs) -> anyhow::Result<Option<LabelledImages>> {
    let names = args.class_names.as_deref();
    if let Some(root) = &args.zeroshot_folder {
        return Ok(Some(LabelledImages::from_folder(root, names)?));
    }
    if let Some(csv) = &args.zeroshot_csv {
        let columns = CsvLabels {
            image: args.image_column.clone(),
            label: args.label_column.clone(),
        };
        return Ok(Some(LabelledImages::from_csv(csv, &columns, names)?));
    }
    if !args.zeroshot_shards.is_empty() {
        let shards = shards(&args.zeroshot_shards, "--zeroshot-shards")?;
        let names = names.expect("clap requires --class-names");
        return Ok(Some(LabelledImages::from_shards(&shards, names)?));
    }
    Ok(None)
}

/// Fashion-MNIST's test split: zero-shot accuracy, recall@k, and linear probes.
fn fashion_mnist(args: &EvalArgs, model: &ClipConfig) -> anyhow::Result<()> {
    if args.templates.is_some() || args.class_names.is_some() {
        anyhow::bail!(
            "--templates and --class-names go with --zeroshot-folder, --zeroshot-shards or \
             --zeroshot-csv (Fashion-MNIST's evaluation has its own classes and templates)"
        );
    }
    let (r, probe) = mmpipe::eval::evaluate_checkpoint(
        &args.checkpoint,
        model,
        &args.dir,
        args.images,
        args.linear_probe,
    )?;
    if args.format == Format::Json {
        let recall = mmpipe::eval::recall_json(&r.recall);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "checkpoint": args.checkpoint,
                "set": "fashion-mnist-test",
                "images": r.pairs,
                "zero_shot_top1": r.zero_shot,
                "recall": recall,
                "chance_r1": r.chance,
                "linear_probe": probe.map(|p| serde_json::json!({
                    "train_images": p.train_images,
                    "features": p.features,
                    "pixels": p.pixels,
                })),
            }))?
        );
        return Ok(());
    }
    println!(
        "{}: Fashion-MNIST test, {} images: zero-shot accuracy {:.1}% (chance 10.0%)",
        args.checkpoint.display(),
        r.pairs,
        100.0 * r.zero_shot.unwrap_or(f64::NAN)
    );
    for (k, i2t, t2i) in &r.recall {
        println!(
            "  recall@{k}: image->text {:.1}%, text->image {:.1}%",
            100.0 * i2t,
            100.0 * t2i
        );
    }
    println!(
        "  (recall@1 chance {:.1}%; captions are class prompts, so any image of the class counts)",
        100.0 * r.chance
    );
    if let Some(p) = probe {
        println!(
            "  linear probe ({} training images): image features {:.1}%, raw pixels {:.1}%",
            p.train_images,
            100.0 * p.features,
            100.0 * p.pixels
        );
    }
    Ok(())
}
