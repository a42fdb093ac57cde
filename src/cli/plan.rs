//! `mmpipe plan`: where each rank runs, what a step moves and costs, and (`--auto`) the
//! best splits.

use std::time::Duration;

use anyhow::Context;

use mmpipe::comm::launch;
use mmpipe::loss::LossConfig;
use mmpipe::plan::{search, svg, CostOptions, MicroBatch, Plan, Precision};
use mmpipe::topology::{DeviceKind, Topology};
use mmpipe::train::{calibrate, TrainConfig};

use super::args::{Format, PlanArgs};
use super::load_model;

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    if !(args.grad_bucket_mb.is_finite() && args.grad_bucket_mb > 0.0) {
        anyhow::bail!(
            "--grad-bucket-mb {} is not a positive number of megabytes",
            args.grad_bucket_mb
        );
    }
    let topology = Topology::from_file(&args.topology)?;
    let model = load_model(args.model.model.as_ref())?;
    let global_batch = args
        .model
        .batch
        .unwrap_or(TrainConfig::default().global_batch);
    let mut loss = LossConfig::default();
    args.loss.apply(&mut loss);
    let mut micro_batch = MicroBatch::default();
    args.loss.apply_micro_batch(&mut micro_batch);
    let precision = args
        .precision
        .unwrap_or_else(|| Precision::default_on(topology.device));
    let calibration = if args.calibrate {
        if topology.device != DeviceKind::Cpu {
            anyhow::bail!(
                "{}: --calibrate measures on this machine's CPU; calibrating `{}` devices needs the CUDA build",
                topology.source.display(),
                topology.device
            );
        }
        let world = topology.devices().len();
        let threads = launch::threads_per_rank(world);
        let cores = launch::cores();
        let c = calibrate::calibrate(
            &topology,
            &model,
            global_batch,
            Duration::from_secs(3),
            precision,
        )
        .context("calibration failed")?;
        eprintln!(
            "calibrated on {cores} cores, {threads} compute thread(s) per rank, {world} ranks, {precision:?}: \
             image {:.0}, text {:.0} samples/s per rank (forward + backward)",
            c.image_samples_per_s, c.text_samples_per_s
        );
        Some(c)
    } else {
        None
    };
    let options = CostOptions {
        global_batch,
        loss,
        micro_batch,
        precision,
        grad_reduce: args.grad_all_reduce,
        optimizer: args.optimizer,
        checkpointing: args.checkpointing,
        overlap: (!args.no_overlap).then_some(args.grad_bucket_mb * 1e6),
        feature_overlap: !args.no_feature_overlap,
        flash_attention: !args.no_flash_attention,
        calibration,
    };
    let (text, json, chosen) = if args.auto || topology.auto_groups {
        let auto = search::search(&topology, &model, &options, args.top)?;
        let best = &auto.candidates[0];
        let chosen = topology.with_groups(&best.image_devices, &best.text_devices)?;
        // With what the best needs to fit (checkpointing, micro-batches), as it was costed.
        let mut plan = Plan::new(&chosen, &model, &best.options(&options))?;
        // The search's own report already compares the best split with data parallelism.
        plan.data_parallel_warnings.clear();
        let text = format!(
            "{}\nthe best plan in full:\n{}",
            auto.render(),
            plan.render()
        );
        let json = serde_json::json!({ "auto": auto, "best": plan });
        (text, json, chosen)
    } else {
        let plan = Plan::new(&topology, &model, &options)?;
        (
            plan.render(),
            serde_json::to_value(&plan)?,
            topology.clone(),
        )
    };
    match args.format {
        Format::Text => print!("{text}"),
        Format::Json => println!("{}", serde_json::to_string_pretty(&json)?),
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg::render(&chosen))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
