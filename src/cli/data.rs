//! `mmpipe convert` and `mmpipe data`: checkpoints from other trainers, and shards.

use std::path::PathBuf;

use anyhow::Context;

use mmpipe::model::{checkpoint, ClipConfig};

use super::args::{CheckpointFormat, ConvertArgs, ConvertSource, DataCommand};

/// `mmpipe convert`: an OpenCLIP or HF BERT checkpoint as an mmpipe checkpoint.
pub fn convert_checkpoint(args: ConvertArgs) -> anyhow::Result<()> {
    let model = ClipConfig::from_file(&args.model)?;
    let pb = mmpipe::model::cpu_builder(args.seed);
    let (image, text) = mmpipe::model::build_all(&pb, &model)?;
    let params = pb.params();
    let report = match args.from {
        CheckpointFormat::Openclip => {
            // Batch-norm statistics travel with the weights (OpenCLIP's ResNets).
            let tensors = checkpoint::read_state_dict(&args.input)?;
            let buffers = image.load_buffers(&tensors)?;
            let mut report = checkpoint::load_tensors(&params, tensors, &args.input)?;
            if buffers > 0 {
                report.unused.retain(|k| !checkpoint::is_norm_statistic(k));
            }
            report
        }
        CheckpointFormat::HfBert => checkpoint::load_hf_bert(&params, &args.input)?,
    };
    let mut buffers = image.buffers()?;
    buffers.extend(text.buffers()?);
    checkpoint::save_with_buffers(&params, &buffers, &args.out)?;
    println!(
        "wrote {} ({} tensors: {} from {}, {} initialised with seed {})",
        args.out.display(),
        params.len(),
        report.loaded,
        args.input.display(),
        params.len() - report.loaded,
        args.seed
    );
    if !report.unused.is_empty() {
        println!("not used from the input: {}", report.unused.join(", "));
    }
    Ok(())
}

/// `mmpipe data`: write and inspect shards.
pub fn run(command: DataCommand) -> anyhow::Result<()> {
    use mmpipe::data::convert;
    use mmpipe::data::fashion_mnist::DEBIAN_DIR;
    let wrote = |(shards, samples): (Vec<PathBuf>, usize), out: &PathBuf| {
        println!(
            "wrote {samples} samples in {} shard(s) to {}",
            shards.len(),
            out.display()
        );
    };
    match command {
        DataCommand::Synth {
            out,
            samples,
            per_shard,
            image_size,
            seed,
        } => wrote(
            convert::synth(&out, samples, per_shard, image_size, seed)?,
            &out,
        ),
        DataCommand::Convert {
            from: ConvertSource::FashionMnist,
            input,
            out,
            per_shard,
            split,
            limit,
            ..
        } => {
            let dir = input.unwrap_or_else(|| PathBuf::from(DEBIAN_DIR));
            wrote(
                convert::fashion_mnist(&dir, split, &out, per_shard, limit)?,
                &out,
            )
        }
        DataCommand::Convert {
            from: ConvertSource::Csv,
            input,
            out,
            per_shard,
            image_column,
            caption_column,
            ..
        } => {
            let input = input.context("--from csv needs the CSV/TSV file")?;
            let columns = convert::CsvColumns {
                image: image_column,
                caption: caption_column,
                delimiter: None,
            };
            let (shards, samples, skipped) = convert::csv(&input, &columns, &out, per_shard)?;
            wrote((shards, samples), &out);
            println!("rows skipped: {skipped}");
        }
        DataCommand::Bench {
            shards,
            config,
            model,
            workers,
            batch,
            batches,
            warmup,
            format,
        } => {
            let mut cfg = mmpipe::train::TrainConfig::load(config.as_deref(), &[])?;
            if !shards.is_empty() {
                cfg.data.use_shards(shards);
            }
            if let Some(w) = workers {
                cfg.data.workers = w;
            }
            let model = super::load_model(model.as_ref().or(cfg.model.as_ref()))?;
            if batch == 0 || batches == 0 {
                anyhow::bail!("--batch and --batches must be at least 1");
            }
            let source = mmpipe::data::Source::new(&cfg.data, &model, cfg.seed, 0, None)?;
            let rate = mmpipe::data::throughput::measure(&source, batch, warmup, batches)?;
            match format {
                super::args::Format::Text => println!(
                    "{:?} data, {} px images: {}",
                    cfg.data.kind,
                    model.image_size(),
                    rate.summary()
                ),
                super::args::Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&rate)?)
                }
            }
        }
        DataCommand::Inspect { shard, show } => {
            if !shard.is_file() {
                anyhow::bail!("{}: no such shard", shard.display());
            }
            let r = convert::inspect(&shard, show);
            println!(
                "{}: {} samples, {} complete image-caption pairs",
                shard.display(),
                r.samples,
                r.complete
            );
            let members: Vec<String> = r
                .by_extension
                .iter()
                .map(|(e, n)| format!("{n} .{e}"))
                .collect();
            println!("members: {}", members.join(", "));
            println!("problems: {}", r.problems);
            if let Some(s) = &r.stopped {
                println!("scan stopped early: {s}");
            }
            for (key, caption, image) in &r.first {
                println!("  {key}: {image}; \"{caption}\"");
            }
        }
    }
    Ok(())
}
