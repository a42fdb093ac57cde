//! `mmpipe eval`: a training checkpoint's zero-shot accuracy, recall@k and linear probes.

use mmpipe::model::checkpoint::checkpoint_model;

use super::args::EvalArgs;

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let model = checkpoint_model(&args.checkpoint, args.model.as_deref())?;
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
