//! `mmpipe train`: the flags over the config file, the ranks from the launcher, the run,
//! and its summary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use mmpipe::comm::launch::{self, Job};
use mmpipe::data::DataKind;
use mmpipe::loss::LossKind;
use mmpipe::model::ClipConfig;
use mmpipe::topology::Topology;
use mmpipe::train::{self, TrainConfig, TrainReport};

use super::args::TrainArgs;
use super::{load_model, summary};

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let (topology, model, mut cfg) = config(&args)?;
    // groups = "auto": the layout `plan --auto` picks (the same on every process).
    let (topology, chosen) = cfg.choose_groups(topology, &model)?;
    summary::precision_notes(&cfg, &topology);
    let job = Job {
        config_hash: cfg.fingerprint(&model),
        collective_timeout: Duration::from_secs_f64(cfg.collective_timeout),
    };
    let launch = launch::launch(&topology, args.backend, &job)?;
    // Across processes, world rank 0 speaks for the run.
    let lead = launch.ranks.lead();
    cfg.progress &= lead;
    // On every rank: Ctrl-C or SIGTERM: finish the step, save a checkpoint (with
    // --checkpoint-dir), exit 0.
    if let Err(e) = ctrlc::set_handler(train::request_stop) {
        eprintln!("note: no Ctrl-C handler ({e}): an interrupt stops the run without a checkpoint");
    }
    stop_on_sigusr1();
    if let (true, Some(chosen)) = (lead, &chosen) {
        println!("{chosen}");
    }
    if lead {
        println!(
            "training on {} ({}, as {}, {} compute threads each), global batch {}, \
             {} steps, {}; loss {} (exchange {}, tile {})",
            topology.source.display(),
            topology.describe_groups(),
            launch.backend.ranks_are(),
            launch.threads_per_rank,
            cfg.global_batch,
            cfg.steps,
            summary::precision(&cfg, &topology),
            cfg.loss.kind,
            cfg.loss.exchange,
            cfg.loss.tile,
        );
    }
    let report =
        train::train_ranks(&topology, &model, &cfg, launch.ranks).context("training failed")?;
    if lead {
        print_report(&report, &cfg);
    }
    Ok(())
}

/// The run's config: the topology, the model, and the training config file with every
/// flag laid over it, checked.
fn config(args: &TrainArgs) -> anyhow::Result<(Topology, ClipConfig, TrainConfig)> {
    let topology = match &args.topology {
        Some(p) => Topology::from_file(p)?,
        None => Topology::default_cpu(),
    };
    let mut cfg = TrainConfig::load(args.config.as_deref(), &args.sets)?;
    if args.model.model.is_some() {
        cfg.model = args.model.model.clone();
    }
    let model = load_model(cfg.model.as_ref()).with_context(|| {
        match (&args.model.model, &args.config) {
            (None, Some(config)) => format!("{}: field `model`", config.display()),
            _ => "--model".to_string(),
        }
    })?;
    args.precision.apply(&mut cfg);
    let origin = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("the command line"));
    macro_rules! set {
        ($($flag:expr => $field:expr),* $(,)?) => { $(if let Some(v) = $flag { $field = v; })* };
    }
    set! {
        args.seed => cfg.seed,
        args.steps => cfg.steps,
        args.model.batch => cfg.global_batch,
        args.lr => cfg.lr,
        args.warmup => cfg.warmup,
        args.eval_pairs => cfg.eval.pairs,
        args.eval_every => cfg.eval.every,
        args.workers => cfg.data.workers,
        args.checkpoint_every => cfg.checkpoint_every,
    }
    cfg.progress = !args.quiet;
    cfg.checkpointing |= args.checkpointing;
    args.loss.apply(&mut cfg.loss);
    args.loss.apply_micro_batch(&mut cfg.micro_batch);
    if !args.shards.is_empty() {
        cfg.data.use_shards(args.shards.clone());
    }
    if args.metrics.is_some() {
        cfg.metrics = args.metrics.clone();
    }
    if args.tensorboard.is_some() {
        cfg.tensorboard = args.tensorboard.clone();
    }
    if args.checkpoint_dir.is_some() {
        cfg.checkpoint_dir = args.checkpoint_dir.clone();
    }
    if args.resume.is_some() {
        cfg.resume = args.resume.clone();
    }
    cfg.resume_despite_changes |= args.resume_despite_changes;
    // The rest (what needs the topology and model too) is checked by `train_ranks`,
    // after the launcher's own errors.
    cfg.validate(&origin)?;
    Ok((topology, model, cfg))
}

/// What world rank 0 prints at the end: the loss, the rate, the evaluation, where the
/// time and the bytes went, what could not be read, and memory.
fn print_report(report: &TrainReport, cfg: &TrainConfig) {
    if let Some(step) = report.interrupted_at {
        println!(
            "interrupted: stopped after step {step}{}",
            cfg.checkpoint_dir
                .as_ref()
                .map_or(String::new(), |d| format!(
                    "; checkpoint in {} (resume with --resume latest)",
                    d.display()
                ))
        );
    }
    let first = report.losses.first().copied().unwrap_or(f64::NAN);
    let last = report.losses.last().copied().unwrap_or(f64::NAN);
    println!(
        "loss {first:.4} -> {last:.4}; {:.1} s, {:.0} samples/s, median step {:.1} ms; logit scale {:.2} (exp {:.1})",
        report.seconds,
        report.samples_per_second,
        report.median_step_seconds() * 1e3,
        report.final_logit_scale,
        report.final_logit_scale.exp()
    );
    if let Some((step, scores)) = report.evals.last() {
        println!(
            "held-out evaluation after step {}: {}",
            step + 1,
            scores.summary()
        );
    }
    if cfg.loss.kind == LossKind::Siglip {
        println!("logit bias {:.2}", report.final_logit_bias);
    }
    // Per step this run took (fewer than `steps` when interrupted or resumed).
    let steps_run = (report.losses.len() + report.non_finite_steps + report.skipped_steps).max(1);
    summary::print_phases(&summary::phases_per_step(&report.phases, steps_run));
    if report.non_finite_steps > 0 {
        println!(
            "steps skipped (NaN or infinite loss or gradient): {}",
            report.non_finite_steps
        );
    }
    if report.skipped_steps > 0 {
        println!(
            "steps skipped (fewer than two readable pairs): {}",
            report.skipped_steps
        );
    }
    let skipped: Vec<String> = report
        .skipped
        .iter()
        .enumerate()
        .filter(|(_, s)| s.total() > 0)
        .map(|(rank, s)| format!("rank {rank}: {s}"))
        .collect();
    if !skipped.is_empty() {
        println!("samples skipped: {}", skipped.join("; "));
    } else if cfg.data.kind != DataKind::Synthetic {
        println!("samples skipped: none");
    }
    summary::print_bytes(&report.phases, &report.bytes, steps_run);
    summary::print_overlap(&report.phases, &report.overlap, steps_run);
    summary::print_memory();
}

/// SIGUSR1 asks for a stop like Ctrl-C. mpirun ends the job at once on SIGINT/SIGTERM but
/// passes SIGUSR1 on to every rank, so scripts/launch.sh turns a stop request into it.
fn stop_on_sigusr1() {
    extern "C" fn on_usr1(_: nix::libc::c_int) {
        // An atomic store: safe in a signal handler.
        train::request_stop();
    }
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: the handler only stores to an atomic.
    if let Err(e) = unsafe { signal(Signal::SIGUSR1, SigHandler::Handler(on_usr1)) } {
        eprintln!("note: no SIGUSR1 handler ({e})");
    }
}
