//! `mmpipe eval`: a training checkpoint's zero-shot accuracy on an image folder, or its
//! zero-shot accuracy, recall@k and linear probes on Fashion-MNIST.

use mmpipe::eval::retrieval::RetrievalSet;
use mmpipe::eval::zero_shot::{LabelledImages, ZeroShotSet};
use mmpipe::model::checkpoint::checkpoint_model;

use super::args::{EvalArgs, Format};

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = checkpoint_model(&args.checkpoint, args.model.as_deref())?;
    if !args.retrieval_shards.is_empty() {
        let shards = mmpipe::data::shards::resolve(
            &args.retrieval_shards,
            std::path::Path::new("."),
            std::path::Path::new("--retrieval-shards"),
            "--retrieval-shards",
        )?;
        let set = RetrievalSet::from_shards("retrieval", &shards, &model)?;
        let scores = mmpipe::eval::retrieval_checkpoint(&args.checkpoint, &model, &set)?;
        match args.format {
            Format::Text => println!(
                "{}: retrieval on {} shard(s): {}",
                args.checkpoint.display(),
                shards.len(),
                scores.summary()
            ),
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "checkpoint": args.checkpoint,
                    "shards": shards,
                    "retrieval": scores,
                }))?
            ),
        }
        return Ok(());
    }
    let set = match (&args.zeroshot_folder, args.zeroshot_shards.is_empty()) {
        (Some(root), _) => Some(LabelledImages::from_folder(
            root,
            args.class_names.as_deref(),
        )?),
        (None, false) => {
            let shards = mmpipe::data::shards::resolve(
                &args.zeroshot_shards,
                std::path::Path::new("."),
                std::path::Path::new("--zeroshot-shards"),
                "--zeroshot-shards",
            )?;
            let names = args.class_names.as_deref().expect("clap requires it");
            Some(LabelledImages::from_shards(&shards, names)?)
        }
        (None, true) => {
            if args.templates.is_some() || args.class_names.is_some() {
                anyhow::bail!(
                    "--templates and --class-names go with --zeroshot-folder or --zeroshot-shards \
                     (Fashion-MNIST's evaluation has its own classes and templates)"
                );
            }
            None
        }
    };
    if let Some(images) = set {
        let root = images.root.clone();
        let set = ZeroShotSet::new("eval", images, args.templates.as_deref(), &model)?;
        let templates = &set.templates;
        let progress = !args.quiet && args.format == Format::Text;
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
    let (r, probe) = mmpipe::eval::evaluate_checkpoint(
        &args.checkpoint,
        &model,
        &args.dir,
        args.images,
        args.linear_probe,
    )?;
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
