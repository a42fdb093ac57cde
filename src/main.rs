//! The `mmpipe` command line: thin glue over the library.
//!
//! ```text
//! mmpipe train                                   # embedded default: synthetic shapes, cpu-2x1
//! mmpipe plan --topology topology/4x4.toml       # placement and bytes per step
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use mmpipe::loss::{Exchange, LossConfig, LossKind, TileSize};
use mmpipe::model::{checkpoint, ClipConfig};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use mmpipe::plan::{
    self, search, svg, CostOptions, GradReduce, MicroBatch, Optimizer, Plan, Precision,
};
use mmpipe::topology::{DeviceKind, Topology, Tower};
use mmpipe::train::{self, calibrate, PhaseBytes, PhaseTimes, TrainConfig};

#[derive(Parser)]
#[command(
    name = "mmpipe",
    version,
    about = "CLIP training with the image and text encoders on separate device groups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time the training step (default: OpenCLIP's CPU anchor configuration) and set its
    /// FLOP rate against this machine's f32 matrix-multiply peak.
    Bench(BenchArgs),
    /// Print where each rank runs and what each step moves between them.
    Plan(PlanArgs),
    /// Train: the built-in synthetic set, shards, Fashion-MNIST or a CSV.
    Train(Box<TrainArgs>),
    /// Turn an OpenCLIP or HF BERT checkpoint into an mmpipe checkpoint of a model config.
    Convert(ConvertArgs),
    /// Evaluate a training checkpoint: Fashion-MNIST zero-shot accuracy and recall@1/5/10.
    Eval {
        /// A checkpoint folder (step-NNNNNNNN/), as `train --checkpoint-dir` writes.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The model config it was trained with [default: the checkpoint's model.toml,
        /// else the built-in clip-tiny].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Fashion-MNIST's folder (IDX files).
        #[arg(long, default_value = mmpipe::data::fashion_mnist::DEBIAN_DIR)]
        dir: PathBuf,
        /// Test images to use (of 10,000).
        #[arg(long, default_value_t = 10_000)]
        images: usize,
        /// Also fit linear probes (multinomial logistic regression) on this many training
        /// images: on the image tower's features, and on raw pixels for reference.
        #[arg(long)]
        linear_probe: Option<usize>,
    },
    /// Draw PNG plots of runs' metrics (loss, throughput, evaluations, time per phase);
    /// several runs share the axes and their losses are compared step by step.
    Report {
        /// Run folders (holding metrics.jsonl) or metrics files; the first is the reference.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where the PNGs go [default: the first run's folder].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write a markdown table of the runs (loss, evaluation, throughput) here.
        #[arg(long)]
        table: Option<PathBuf>,
    },
    /// Write WebDataset shards (synthetic, Fashion-MNIST, CSV/TSV) and inspect them.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write the synthetic shapes set as PNG + caption shards.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        #[arg(long, default_value_t = 1000)]
        per_shard: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        image_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert Fashion-MNIST or a CSV/TSV of image paths and captions into shards.
    Convert {
        #[arg(long, value_enum)]
        from: ConvertSource,
        /// The CSV/TSV file, or Fashion-MNIST's folder [default: Debian's].
        input: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        per_shard: usize,
        /// Fashion-MNIST split.
        #[arg(long, value_enum, default_value_t = CliSplit::Train)]
        split: CliSplit,
        /// Fashion-MNIST: only the first N images.
        #[arg(long)]
        limit: Option<usize>,
        /// CSV: the column of image paths (relative to the file).
        #[arg(long, default_value = "filepath")]
        image_column: String,
        /// CSV: the column of captions.
        #[arg(long, default_value = "title")]
        caption_column: String,
    },
    /// Print a shard's sample counts, member types, problems and its first samples.
    Inspect {
        shard: PathBuf,
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ConvertSource {
    FashionMnist,
    Csv,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CliSplit {
    Train,
    Test,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    /// An OpenCLIP `state_dict` saved as safetensors (the same names as mmpipe's).
    Openclip,
    /// An HF BERT `model.safetensors` for the model's BERT text tower; the rest keeps its
    /// seeded initialisation.
    HfBert,
}

#[derive(Args)]
struct ConvertArgs {
    /// The model config the checkpoint is for.
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    from: Source,
    /// The checkpoint to read (safetensors).
    input: PathBuf,
    /// Where to write the mmpipe checkpoint (safetensors, written atomically).
    #[arg(long)]
    out: PathBuf,
    /// Seed for the parameters the input does not cover.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ModelArgs {
    /// Model config (TOML); default: the built-in configs/clip-tiny.toml.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Global batch size, split evenly over each group [default: 128].
    #[arg(long)]
    batch: Option<usize>,
}

#[derive(Args)]
struct PlanArgs {
    /// Topology file (TOML).
    #[arg(long)]
    topology: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Training precision (default: bf16 on cuda topologies, fp32 on cpu).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// What the gradient all-reduce sums in: its bytes per step.
    #[arg(long, value_enum, default_value_t = GradReduce::Fp32)]
    grad_all_reduce: GradReduce,
    #[arg(long, value_enum, default_value_t = Optimizer::Adamw)]
    optimizer: Optimizer,
    /// Gradient checkpointing: recompute each layer's activations in backward.
    #[arg(long)]
    checkpointing: bool,
    /// Do not overlap the gradient all-reduce with the backward pass.
    #[arg(long)]
    no_overlap: bool,
    /// Search the split and its placement on the nodes; print the best plans.
    #[arg(long)]
    auto: bool,
    /// How many plans `--auto` prints.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Measure each tower's forward + backward rate here and use it instead of peak × efficiency.
    #[arg(long)]
    calibrate: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Draw the cluster, each device coloured by group, to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    #[command(flatten)]
    loss: LossArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Args)]
struct TrainArgs {
    /// Topology file (TOML); default: the built-in topology/cpu-2x1.toml.
    #[arg(long)]
    topology: Option<PathBuf>,
    /// Training config (TOML, e.g. configs/train/siglip.toml); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config field: --set loss.kind=siglip --set grad_clip=1.0 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate (linear warm-up, then cosine decay).
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Held-out pairs for evaluation (eval.pairs; 0: none).
    #[arg(long)]
    eval_pairs: Option<usize>,
    /// Evaluate every N steps as well as at the end (eval.every).
    #[arg(long)]
    eval_every: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    precision: PrecisionArgs,
    /// Gradient checkpointing per block: less activation memory, one more forward.
    #[arg(long)]
    checkpointing: bool,
    #[command(flatten)]
    loss: LossArgs,
    /// Train on WebDataset shards (paths or brace patterns, relative to here) instead of
    /// the synthetic set; repeat for several.
    #[arg(long = "shards", num_args = 1..)]
    shards: Vec<String>,
    /// Decoding threads per rank.
    #[arg(long)]
    workers: Option<usize>,
    /// Write per-step metrics (JSON lines) to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Save checkpoints in this folder (at the end, and every --checkpoint-every steps).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Continue from a checkpoint folder, or `latest` in --checkpoint-dir.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Resume even if the model, the data, the global batch, the seed or the loss differ
    /// from the save's (refused otherwise, naming what changed).
    #[arg(long)]
    resume_despite_changes: bool,
    /// How ranks talk: `thread` (every rank a thread of this process), `mpi` (one
    /// process per rank under mpirun; needs `--features mpi`) or `nccl` (one process per
    /// GPU, started by scripts/launch.sh, torchrun or srun; needs `--features cuda`)
    /// [default: mpi under mpirun; nccl for a cuda topology under a launcher; else thread].
    #[arg(long, value_enum)]
    backend: Option<Backend>,
}

#[derive(Args)]
struct PrecisionArgs {
    /// Compute precision [default: bf16 on cuda topologies, fp32 on cpu]. bf16: bf16
    /// matrix products on bf16 copies of f32 master weights, with norms, softmax, the
    /// residual stream, the loss and AdamW in f32 (on the CPU too, slowly: candle's CPU
    /// bf16 products convert through f32).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// What gradients are summed in over a group [default: fp32]; bf16 halves the bytes.
    #[arg(long, value_enum)]
    grad_all_reduce: Option<GradReduce>,
    /// Full f32 matrix products on CUDA (default: TF32 tensor cores allowed for f32).
    #[arg(long)]
    no_tf32: bool,
}

impl PrecisionArgs {
    fn apply(&self, cfg: &mut TrainConfig) {
        if self.precision.is_some() {
            cfg.precision = self.precision;
        }
        if let Some(g) = self.grad_all_reduce {
            cfg.grad_all_reduce = g;
        }
        cfg.tf32 &= !self.no_tf32;
    }
}

/// Says what a precision setting does on a CPU topology, where TF32 does not exist and bf16
/// is slow.
fn precision_notes(cfg: &TrainConfig, topology: &Topology) {
    if topology.device != DeviceKind::Cpu {
        return;
    }
    if cfg.precision_on(topology.device) == Precision::Bf16 {
        eprintln!(
            "note: bf16 on the CPU ({}) trains in bf16 for real, but slowly: candle's CPU bf16 \
             matrix products convert through f32",
            topology.source.display()
        );
    }
    if !cfg.tf32 {
        eprintln!(
            "note: tf32 = false changes nothing on {}: CPUs have no TF32 (it applies to cuda topologies)",
            topology.source.display()
        );
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Thread,
    Mpi,
    Nccl,
}

#[derive(Args)]
struct LossArgs {
    /// Contrastive loss [default: clip].
    #[arg(long = "loss", value_enum)]
    kind: Option<CliLoss>,
    /// How the groups share the loss [default: lse].
    #[arg(long, value_enum)]
    exchange: Option<CliExchange>,
    /// Columns of logits per tile: auto, none, or a number [default: auto].
    #[arg(long)]
    tile: Option<TileSize>,
    /// Micro-batch per image rank (GradCache accumulation) [default: the whole local batch].
    #[arg(long)]
    micro_batch_image: Option<usize>,
    /// Micro-batch per text rank.
    #[arg(long)]
    micro_batch_text: Option<usize>,
}

impl LossArgs {
    fn apply_micro_batch(&self, micro: &mut MicroBatch) {
        if self.micro_batch_image.is_some() {
            micro.image = self.micro_batch_image;
        }
        if self.micro_batch_text.is_some() {
            micro.text = self.micro_batch_text;
        }
    }

    fn apply(&self, cfg: &mut LossConfig) {
        if let Some(k) = self.kind {
            cfg.kind = match k {
                CliLoss::Clip => LossKind::Clip,
                CliLoss::Siglip => LossKind::Siglip,
            };
        }
        if let Some(e) = self.exchange {
            cfg.exchange = match e {
                CliExchange::Lse => Exchange::Lse,
                CliExchange::GatherScatter => Exchange::GatherScatter,
            };
        }
        if let Some(t) = self.tile {
            cfg.tile = t;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CliLoss {
    Clip,
    Siglip,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CliExchange {
    Lse,
    GatherScatter,
}

fn load_model(path: &Option<PathBuf>) -> anyhow::Result<ClipConfig> {
    Ok(match path {
        Some(p) => ClipConfig::from_file(p)?,
        None => ClipConfig::default_tiny(),
    })
}

fn plan(args: PlanArgs) -> anyhow::Result<()> {
    let topology = Topology::from_file(&args.topology)?;
    let model = load_model(&args.model.model)?;
    let global_batch = args
        .model
        .batch
        .unwrap_or(TrainConfig::default().global_batch);
    let mut loss = LossConfig::default();
    args.loss.apply(&mut loss);
    let mut micro_batch = MicroBatch::default();
    args.loss.apply_micro_batch(&mut micro_batch);
    let calibration = if args.calibrate {
        if topology.device != DeviceKind::Cpu {
            anyhow::bail!(
                "{}: --calibrate measures on this machine's CPU; calibrating `{}` devices needs the CUDA build",
                topology.source.display(),
                topology.device
            );
        }
        let world = topology.devices().len();
        let threads = compute_threads_per_rank(world);
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let c = calibrate::calibrate(&topology, &model, global_batch, Duration::from_secs(3))
            .context("calibration failed")?;
        eprintln!(
            "calibrated on {cores} cores, {threads} compute thread(s) per rank, {world} ranks: image {:.0}, \
             text {:.0} samples/s per rank (forward + backward)",
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
        precision: args.precision.unwrap_or(match topology.device {
            DeviceKind::Cuda => Precision::Bf16,
            DeviceKind::Cpu => Precision::Fp32,
        }),
        grad_reduce: args.grad_all_reduce,
        optimizer: args.optimizer,
        checkpointing: args.checkpointing,
        overlap: !args.no_overlap,
        calibration,
    };
    let (text, json, chosen) = if args.auto || topology.auto_groups {
        let auto = search::search(&topology, &model, &options, args.top)?;
        let best = &auto.candidates[0];
        let chosen = topology.with_groups(&best.image_devices, &best.text_devices)?;
        let mut plan = Plan::new(&chosen, &model, &options)?;
        // The search's own report already compares the best split with data parallelism.
        plan.warnings.retain(|w| !w.contains("data parallelism"));
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

fn convert(args: ConvertArgs) -> anyhow::Result<()> {
    let model = ClipConfig::from_file(&args.model)?;
    let pb = mmpipe::model::cpu_builder(args.seed);
    let (image, text) = mmpipe::model::build_all(&pb, &model)?;
    let params = pb.params();
    let mut report = match args.from {
        Source::Openclip => checkpoint::load(&params, &args.input)?,
        Source::HfBert => checkpoint::load_hf_bert(&params, &args.input)?,
    };
    // Batch-norm statistics travel with the weights (OpenCLIP's ResNets).
    if args.from == Source::Openclip {
        let tensors = checkpoint::read_tensors(&args.input)?;
        if image.load_buffers(&tensors)? > 0 {
            report.unused.retain(|k| {
                !(k.ends_with("running_mean")
                    || k.ends_with("running_var")
                    || k.ends_with("num_batches_tracked"))
            });
        }
    }
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

fn data(command: DataCommand) -> anyhow::Result<()> {
    use mmpipe::data::convert;
    use mmpipe::data::fashion_mnist::{Split, DEBIAN_DIR};
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
            let split = match split {
                CliSplit::Train => Split::Train,
                CliSplit::Test => Split::Test,
            };
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

fn report(runs: &[PathBuf], out: Option<PathBuf>, table: Option<PathBuf>) -> anyhow::Result<()> {
    let out = out.unwrap_or_else(|| {
        let first = &runs[0];
        if first.is_dir() {
            first.clone()
        } else {
            first
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
        }
    });
    let report = mmpipe::report::write(runs, &out)?;
    for run in &report.runs {
        let losses = run.losses();
        let rates: Vec<f64> = run.steps.iter().map(|s| s.samples_per_s).collect();
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let eval = run.evals.last().map_or(String::new(), |e| {
            let zero_shot = e
                .zero_shot
                .map_or(String::new(), |z| format!("zero-shot {:.1}%, ", 100.0 * z));
            format!(
                "; last evaluation (after step {}): {zero_shot}recall@1 {:.1}/{:.1}%",
                e.step + 1,
                100.0 * e.image_to_text_r1,
                100.0 * e.text_to_image_r1
            )
        });
        println!(
            "{}: {} steps, loss {:.4} -> {:.4}, median {:.0} samples/s{eval}",
            run.name,
            run.steps.len(),
            losses.first().map_or(f64::NAN, |l| l.1),
            losses.last().map_or(f64::NAN, |l| l.1),
            sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        );
    }
    for other in report.runs.iter().skip(1) {
        if let Some((gap, step, compared)) = mmpipe::report::loss_gap(&report.runs[0], other) {
            println!(
                "loss of {} vs {}: largest difference {gap:.3e} (step {step}) over {compared} common steps",
                other.name, report.runs[0].name
            );
        }
    }
    for plot in &report.plots {
        println!("wrote {}", plot.display());
    }
    if let Some(path) = table {
        std::fs::write(&path, mmpipe::report::markdown_table(&report.runs))
            .with_context(|| path.display().to_string())?;
        println!("wrote {}", path.display());
    }
    Ok(())
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

fn launched_by_mpi() -> bool {
    #[cfg(feature = "mpi")]
    {
        mmpipe::comm::mpi::launched_by_mpi()
    }
    #[cfg(not(feature = "mpi"))]
    {
        false
    }
}

/// What every process of a run must agree on: hashes of the topology's placement and of
/// the training and model configs.
#[cfg(any(feature = "mpi", feature = "cuda"))]
fn run_hashes(topology: &Topology, model: &ClipConfig, cfg: &TrainConfig) -> (u64, u64) {
    use mmpipe::comm::rendezvous::stable_hash;
    (
        stable_hash(format!("{:?}{:?}", topology.device, topology.ranks).as_bytes()),
        stable_hash(format!("{}{model:?}", toml::to_string(cfg).unwrap_or_default()).as_bytes()),
    )
}

/// This process's rank and NCCL communicators: the rendezvous (rank 0 serves it and
/// hands out the NCCL ids) checks that every process runs the same job.
fn nccl_ranks(
    topology: &Topology,
    model: &ClipConfig,
    cfg: &TrainConfig,
    env: Option<&mmpipe::comm::rendezvous::LaunchEnv>,
) -> anyhow::Result<train::Ranks> {
    let Some(env) = env else {
        anyhow::bail!(
            "--backend nccl runs one process per GPU: start them with scripts/launch.sh, torchrun or \
             srun (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE or Slurm's variables); this process \
             has none of those variables"
        );
    };
    if env.world_size != topology.world_size() {
        anyhow::bail!(
            "{}: the topology has {} ranks but {} started {} processes",
            topology.source.display(),
            topology.world_size(),
            env.launcher,
            env.world_size
        );
    }
    #[cfg(feature = "cuda")]
    {
        use mmpipe::comm::nccl;
        let timeout = std::time::Duration::from_secs_f64(cfg.collective_timeout);
        mmpipe::comm::watchdog::set_collective_timeout(timeout);
        let (topology_hash, config_hash) = run_hashes(topology, model, cfg);
        let shared = if env.rank == 0 {
            nccl::new_ids()?
        } else {
            Vec::new()
        };
        let rendezvous =
            mmpipe::comm::rendezvous::join(env, topology_hash, config_hash, shared, timeout)?;
        let device = train::rank_device(topology, env.rank)?;
        let comms = nccl::rank_comms(
            topology,
            env.rank,
            &|key| rendezvous.get(key).map(<[u8]>::to_vec),
            &device,
        )?;
        Ok(train::Ranks::Process {
            rank: env.rank,
            comms,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (model, cfg);
        anyhow::bail!(
            "--backend nccl needs a build with CUDA: cargo build --release --features cuda \
             (scripts/cuda-build.sh builds it without a system CUDA toolkit)"
        )
    }
}

/// This process's rank and communicators under mpirun, after checking that every
/// process runs the same job.
fn mpi_ranks(
    topology: &Topology,
    model: &ClipConfig,
    cfg: &TrainConfig,
) -> anyhow::Result<train::Ranks> {
    #[cfg(feature = "mpi")]
    {
        mmpipe::comm::watchdog::set_collective_timeout(std::time::Duration::from_secs_f64(
            cfg.collective_timeout,
        ));
        let (rank, comms) = mmpipe::comm::mpi::rank_comms(topology)?;
        let (topology_hash, config_hash) = run_hashes(topology, model, cfg);
        mmpipe::comm::agree_on_run(comms.world.as_ref(), topology_hash, config_hash)?;
        Ok(train::Ranks::Process { rank, comms })
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (topology, model, cfg);
        anyhow::bail!(
            "--backend mpi needs a build with MPI: cargo build --release --features mpi \
             (Debian: apt install libopenmpi-dev libclang-dev openmpi-bin)"
        )
    }
}

fn train(args: TrainArgs) -> anyhow::Result<()> {
    let topology = match &args.topology {
        Some(p) => Topology::from_file(p)?,
        None => Topology::default_cpu(),
    };
    let mut cfg = TrainConfig::load(args.config.as_deref(), &args.sets)?;
    if args.model.model.is_some() {
        cfg.model = args.model.model.clone();
    }
    let model =
        load_model(&cfg.model).with_context(|| match (&args.model.model, &args.config) {
            (None, Some(config)) => format!("{}: field `model`", config.display()),
            _ => "--model".to_string(),
        })?;
    args.precision.apply(&mut cfg);
    precision_notes(&cfg, &topology);
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
    }
    cfg.progress = !args.quiet;
    cfg.checkpointing |= args.checkpointing;
    args.loss.apply(&mut cfg.loss);
    args.loss.apply_micro_batch(&mut cfg.micro_batch);
    if !args.shards.is_empty() {
        cfg.data.kind = mmpipe::data::DataKind::Webdataset;
        cfg.data.shards = args.shards.clone();
        cfg.data.base_dir = PathBuf::from(".");
        cfg.data.origin = PathBuf::from("--shards");
    }
    if let Some(w) = args.workers {
        cfg.data.workers = w;
    }
    if args.metrics.is_some() {
        cfg.metrics = args.metrics.clone();
    }
    if args.checkpoint_dir.is_some() {
        cfg.checkpoint_dir = args.checkpoint_dir.clone();
    }
    if let Some(n) = args.checkpoint_every {
        cfg.checkpoint_every = n;
    }
    if args.resume.is_some() {
        cfg.resume = args.resume.clone();
    }
    cfg.resume_despite_changes |= args.resume_despite_changes;
    cfg.validate(&origin)?;
    let launch = mmpipe::comm::rendezvous::LaunchEnv::from_env()?;
    // A single-task launch (srun without -n) is just this process.
    let launch = launch.filter(|e| e.world_size > 1);
    let backend = args.backend.unwrap_or(if launched_by_mpi() {
        Backend::Mpi
    } else if launch.is_some() && topology.device == DeviceKind::Cuda {
        Backend::Nccl
    } else {
        Backend::Thread
    });
    if let (Some(env), Backend::Thread) = (launch.as_ref(), backend) {
        anyhow::bail!(
            "{} started this process as rank {} of {}, but rank threads run the whole topology in one \
             process: for CPU ranks across processes use the MPI backend (build with --features mpi, \
             start with scripts/launch.sh --backend mpi); for GPUs, a cuda topology with --backend nccl",
            env.launcher,
            env.rank,
            env.world_size
        );
    }
    let ranks = match backend {
        Backend::Thread => train::Ranks::Threads,
        Backend::Mpi => mpi_ranks(&topology, &model, &cfg)?,
        Backend::Nccl => nccl_ranks(&topology, &model, &cfg, launch.as_ref())?,
    };
    // Across processes, world rank 0 speaks for the run.
    let lead = match &ranks {
        train::Ranks::Threads => true,
        train::Ranks::Process { rank, .. } => *rank == 0,
    };
    cfg.progress &= lead;
    let threads = match &ranks {
        train::Ranks::Threads => compute_threads_per_rank(topology.world_size()),
        // The processes on this machine share its cores.
        train::Ranks::Process { .. } => compute_threads_per_rank(
            ["OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"]
                .iter()
                .find_map(|v| std::env::var(v).ok()?.parse().ok())
                .unwrap_or(1),
        ),
    };
    // On every rank: Ctrl-C or SIGTERM: finish the step, save a checkpoint (with --checkpoint-dir), exit 0.
    if let Err(e) = ctrlc::set_handler(train::request_stop) {
        eprintln!("note: no Ctrl-C handler ({e}): an interrupt stops the run without a checkpoint");
    }
    stop_on_sigusr1();
    if !lead {
        train::train_ranks(&topology, &model, &cfg, ranks).context("training failed")?;
        return Ok(());
    }
    println!(
        "training on {} ({} image + {} text rank {}, {threads} compute threads each), global batch {}, {} steps, \
         {}; loss {} (exchange {}, tile {})",
        topology.source.display(),
        topology.group_size(Tower::Image),
        topology.group_size(Tower::Text),
        match backend {
            Backend::Thread => "threads",
            Backend::Mpi => "processes (MPI)",
            Backend::Nccl => "processes (NCCL)",
        },
        cfg.global_batch,
        cfg.steps,
        precision_summary(&cfg, &topology),
        cfg.loss.kind,
        cfg.loss.exchange,
        cfg.loss.tile,
    );
    let report = train::train_ranks(&topology, &model, &cfg, ranks).context("training failed")?;
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
    print_phases(&report.phases, steps_run);
    let skipped = &report.skipped[0];
    let decode: Vec<String> = report
        .skipped
        .iter()
        .enumerate()
        .filter(|(_, s)| s.total() > 0)
        .map(|(rank, s)| format!("rank {rank}: {s}"))
        .collect();
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
    if skipped.total() > 0 || !decode.is_empty() {
        println!("samples skipped: {}", decode.join("; "));
    } else if cfg.data.kind != mmpipe::data::DataKind::Synthetic {
        println!("samples skipped: none");
    }
    print_bytes(&report.phases, &report.bytes, steps_run);
    if let Some(mib) = peak_memory_mib() {
        println!("peak memory (resident, whole process): {mib:.0} MiB");
    }
    #[cfg(feature = "cuda")]
    if let Some((used, total)) = mmpipe::comm::nccl::memory_peak() {
        println!(
            "peak GPU memory in use (whole device, after backward): {:.0} of {:.0} MiB",
            used as f64 / 1048576.0,
            total as f64 / 1048576.0
        );
    }
    Ok(())
}

/// "bf16 (f32 master weights, gradients summed in fp32)", or "fp32 (TF32 matmuls)".
fn precision_summary(cfg: &TrainConfig, topology: &Topology) -> String {
    let reduce = match cfg.grad_all_reduce {
        GradReduce::Fp32 => "fp32",
        GradReduce::Bf16 => "bf16",
    };
    let tf32 = match (topology.device, cfg.tf32) {
        (DeviceKind::Cuda, true) => ", TF32 for f32 matmuls",
        _ => "",
    };
    match cfg.precision_on(topology.device) {
        Precision::Bf16 => {
            format!("bf16 (f32 master weights, gradients summed in {reduce}{tf32})")
        }
        Precision::Fp32 => format!("fp32 (gradients summed in {reduce}{tf32})"),
    }
}

/// Rank threads already run in parallel, and they share candle's one global thread pool:
/// unless the user chose, give each rank its share of the cores (measured on 2 cores with
/// three ranks: 1 thread each ran 4x faster than the default of all cores).
fn compute_threads_per_rank(world_size: usize) -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let n = (cores / world_size).max(1);
    // Read by rayon's pool and by gemm when first used; nothing has used them yet.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// The process's peak resident set, from Linux's /proc (None elsewhere).
fn peak_memory_mib() -> Option<f64> {
    train::metrics::process_status_mib("VmHWM")
}

fn print_phases(phases: &[(Tower, PhaseTimes)], steps: usize) {
    print!("ms/step by phase  rank tower");
    for name in PhaseTimes::NAMES {
        print!(" {name:>15}");
    }
    println!();
    for (rank, (tower, p)) in phases.iter().enumerate() {
        print!("                  {rank:>4} {tower:<5}");
        for d in p.as_array() {
            print!(" {:>15.1}", d.as_secs_f64() * 1e3 / steps.max(1) as f64);
        }
        println!();
    }
}

fn print_bytes(phases: &[(Tower, PhaseTimes)], bytes: &[PhaseBytes], steps: usize) {
    println!(
        "collective payload per step  rank tower  feature all-gather   loss exchange  grad all-reduce"
    );
    let per_step = |b: u64| plan::short_bytes(b / steps.max(1) as u64);
    for (rank, ((tower, _), b)) in phases.iter().zip(bytes).enumerate() {
        println!(
            "                             {rank:>4} {tower:<5} {:>19} {:>15} {:>16}",
            per_step(b.exchange),
            per_step(b.loss),
            per_step(b.grad_all_reduce)
        );
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Model config [default: the OpenCLIP anchor's tiny CLIP].
    #[arg(long, default_value = "configs/openclip-anchor.toml")]
    model: PathBuf,
    /// Topology [default: 2 image + 1 text rank threads, the fastest split measured on 2
    /// cores].
    #[arg(long, default_value = "topology/cpu-2x1.toml")]
    topology: PathBuf,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[command(flatten)]
    precision: PrecisionArgs,
    /// Only measure the f32 GEMM peak on this process's threads and print it (GFLOP/s).
    #[arg(long, hide = true)]
    gemm_peak_only: bool,
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use mmpipe::bench;
    if args.gemm_peak_only {
        println!("{}", bench::gemm_peak_gflops()?);
        return Ok(());
    }
    let topology = Topology::from_file(&args.topology)?;
    let model = load_model(&Some(args.model.clone()))?;
    let mut precision = TrainConfig::default();
    args.precision.apply(&mut precision);
    precision_notes(&precision, &topology);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(cores);
    let (peak, peak_name) = match topology.device {
        DeviceKind::Cuda => {
            // The GPU's bf16 GEMM in this process, before any training: the MFU's
            // denominator, as OpenCLIP's GPU anchor measures it.
            candle_core::cuda::set_gemm_reduced_precision_f32(precision.tf32);
            let device = train::rank_device(&topology, 0)?;
            let bf16 = bench::device_gemm_peak_gflops(&device, candle_core::DType::BF16)?;
            if precision.precision_on(topology.device) == Precision::Fp32 {
                let f32_peak = bench::device_gemm_peak_gflops(&device, candle_core::DType::F32)?;
                println!(
                    "f32 GEMM (8192³, random data, {}): {:.1} TFLOP/s",
                    if precision.tf32 {
                        "TF32 allowed"
                    } else {
                        "full f32"
                    },
                    f32_peak / 1e3
                );
            }
            (
                bf16,
                "bf16 GEMM (8192³, random data) on this GPU".to_string(),
            )
        }
        DeviceKind::Cpu => {
            // The peak in a process of its own: this one's thread pool is sized per rank.
            let peak_out = std::process::Command::new(std::env::current_exe()?)
                .args(["bench", "--gemm-peak-only"])
                .env("RAYON_NUM_THREADS", threads.to_string())
                .output()?;
            let peak: f64 = String::from_utf8_lossy(&peak_out.stdout)
                .trim()
                .parse()
                .context("measuring the GEMM peak")?;
            (peak, format!("f32 GEMM peak on {threads} threads"))
        }
    };
    let per_rank = compute_threads_per_rank(topology.world_size());
    println!(
        "bench: {} on {} ({} image + {} text rank threads, {per_rank} compute thread{} each, {threads} in all), \
         batch {}, {}, {} timed steps after {} untimed",
        args.model.display(),
        topology.source.display(),
        topology.group_size(Tower::Image),
        topology.group_size(Tower::Text),
        if per_rank == 1 { "" } else { "s" },
        args.batch,
        precision_summary(&precision, &topology),
        args.steps,
        args.warmup
    );
    let report = bench::run(
        &bench::BenchOptions {
            model,
            topology: topology.clone(),
            batch: args.batch,
            steps: args.steps,
            warmup: args.warmup,
            precision: precision.precision,
            grad_reduce: precision.grad_all_reduce,
            tf32: precision.tf32,
        },
        threads,
        peak,
    )?;
    println!(
        "step: median {:.1} ms (min {:.1}, max {:.1}) = {:.1} samples/s",
        report.step_ms_median, report.step_ms_min, report.step_ms_max, report.samples_per_second
    );
    let scale = |gflops: f64| match topology.device {
        DeviceKind::Cuda => format!("{:.1} TFLOP/s", gflops / 1e3),
        DeviceKind::Cpu => format!("{gflops:.1} GFLOP/s"),
    };
    println!(
        "compute: {:.3} GFLOP/sample executed (forward + backward; the model's {:.3}, last blocks at the pooled token only) \
         = {} ({} in the model's FLOPs); {peak_name} {}; {:.1}% of peak{}",
        report.executed_gflop_per_sample,
        report.gflop_per_sample,
        scale(report.achieved_gflops),
        scale(report.model_gflops),
        scale(report.gemm_peak_gflops),
        100.0 * report.fraction_of_peak,
        if topology.device == DeviceKind::Cuda { " (MFU)" } else { "" },
    );
    if report.fraction_of_peak > 1.0 {
        // The probe is the best of six GEMMs, but all six can land on a busy moment.
        println!(
            "note: above the measured GEMM peak, so the peak probe ran slow (another process on \
             these cores, or a profiler starting up): rerun for a fraction that means something"
        );
    }
    println!("ms/step by phase  rank tower     data wait   forward  exchange      loss  backward grad a-r optimizer");
    for (rank, (tower, p)) in report.phases_ms.iter().enumerate() {
        print!("                  {rank:>4} {tower:<6}");
        for v in p {
            print!("{v:>10.1}");
        }
        println!();
    }
    let mut json = serde_json::to_value(&report)?;
    #[cfg(feature = "cuda")]
    if topology.device == DeviceKind::Cuda {
        let device = train::rank_device(&topology, 0)?;
        let mib = |b: u64| b as f64 / 1048576.0;
        if let Some(peak) = mmpipe::comm::nccl::tensor_memory_peak(&device) {
            println!(
                "peak GPU memory of tensors (the allocator's high-water mark): {:.0} MiB",
                mib(peak)
            );
            json["gpu_tensor_peak_mib"] = serde_json::json!(mib(peak));
        }
        if let Some((used, total)) = mmpipe::comm::nccl::memory_peak() {
            println!(
                "peak GPU memory in use (whole device, after backward): {:.0} of {:.0} MiB",
                mib(used),
                mib(total)
            );
            json["gpu_device_peak_mib"] = serde_json::json!(mib(used));
        }
    }
    json["device"] = serde_json::json!(topology.device.to_string());
    println!("RESULT_JSON {json}");
    Ok(())
}

/// Keeps the memory a step frees for the next step: mimalloc otherwise returns freed
/// pages to the OS after 10 ms, and the next step's fresh buffers fault them back in, each
/// page cleared by the kernel (measured: about a third of a CPU training step).
fn keep_freed_memory() {
    // mimalloc's option numbers (mimalloc.h, v2 and v3 alike).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: plain setters of mimalloc's global options.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 1);
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    tracing_subscriber::fmt()
        // Warnings (skipped samples, with shard and key) show unless MMPIPE_LOG says otherwise.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MMPIPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(a) => plan(a),
        Command::Train(a) => train(*a),
        Command::Convert(a) => convert(a),
        Command::Data(c) => data(c),
        Command::Report { runs, out, table } => report(&runs, out, table),
        Command::Bench(a) => bench(a),
        Command::Eval {
            checkpoint,
            model,
            dir,
            images,
            linear_probe,
        } => (|| {
            let saved = checkpoint.join("model.toml");
            let model = match model {
                Some(m) => ClipConfig::from_file(&m)?,
                None if saved.is_file() => ClipConfig::from_file(&saved)?,
                None => ClipConfig::default_tiny(),
            };
            let (r, probe) =
                mmpipe::eval::evaluate_checkpoint(&checkpoint, &model, &dir, images, linear_probe)?;
            println!(
                "{}: Fashion-MNIST test, {} images: zero-shot accuracy {:.1}% (chance 10.0%)",
                checkpoint.display(),
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
            println!("  (recall@1 chance {:.1}%; captions are class prompts, so any image of the class counts)", 100.0 * r.chance);
            if let Some(p) = probe {
                println!(
                    "  linear probe ({} training images): image features {:.1}%, raw pixels {:.1}%",
                    p.train_images,
                    100.0 * p.features,
                    100.0 * p.pixels
                );
            }
            Ok(())
        })(),
    };
    #[cfg(feature = "mpi")]
    mmpipe::comm::mpi::finalize();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
