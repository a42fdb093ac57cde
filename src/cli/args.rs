//! The command line's arguments: clap's structs, and how flags override a config.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use mmpipe::comm::launch::Backend;
use mmpipe::data::fashion_mnist::Split;
use mmpipe::loss::{Exchange, LossConfig, LossKind, TileSize};
use mmpipe::plan::{GradReduce, MicroBatch, Optimizer, Precision};
use mmpipe::train::TrainConfig;

#[derive(Parser)]
#[command(
    name = "mmpipe",
    version,
    about = "CLIP training with the image and text encoders on separate device groups"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    Eval(EvalArgs),
    /// Draw PNG plots of runs' metrics (loss, throughput, evaluations, time per phase);
    /// several runs share the axes and their losses are compared step by step.
    Report(ReportArgs),
    /// Write WebDataset shards (synthetic, Fashion-MNIST, CSV/TSV) and inspect them.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
pub enum DataCommand {
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
        #[arg(long, value_enum, default_value_t = Split::Train)]
        split: Split,
        /// Fashion-MNIST: only the first N images.
        #[arg(long)]
        limit: Option<usize>,
        /// CSV: the column of image paths (relative to the file).
        #[arg(long, default_value = mmpipe::data::CSV_IMAGE_COLUMN)]
        image_column: String,
        /// CSV: the column of captions.
        #[arg(long, default_value = mmpipe::data::CSV_CAPTION_COLUMN)]
        caption_column: String,
    },
    /// How fast the training loader decodes images: the image pipeline of a run (its
    /// shards, workers, transforms, cache) drained with no model behind it, in images/s.
    /// Above the step's samples/s, the device never waits for data.
    Bench {
        /// Shards ('train/{00000..00099}.tar') [default: the config's data].
        #[arg(long, num_args = 1..)]
        shards: Vec<String>,
        /// A training config: its `[data]` (kind, shards, workers, cache, crop) and model.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The model, for its image size [default: the config's, else clip-tiny].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Decoding threads [default: the config's data.workers].
        #[arg(long)]
        workers: Option<usize>,
        /// Images a batch (the global batch: one rank decoding all of it).
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Batches timed.
        #[arg(long, default_value_t = 20)]
        batches: usize,
        /// Untimed batches first (the workers and the shard reader starting).
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Print a shard's sample counts, member types, problems and its first samples.
    Inspect {
        shard: PathBuf,
        #[arg(long, default_value_t = 3)]
        show: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertSource {
    FashionMnist,
    Csv,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointFormat {
    /// An OpenCLIP `state_dict` saved as safetensors (the same names as mmpipe's).
    Openclip,
    /// An HF BERT `model.safetensors` for the model's BERT text tower; the rest keeps its
    /// seeded initialisation.
    HfBert,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// The model config the checkpoint is for.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub from: CheckpointFormat,
    /// The checkpoint to read (safetensors).
    pub input: PathBuf,
    /// Where to write the mmpipe checkpoint (safetensors, written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed for the parameters the input does not cover.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Args)]
pub struct ModelArgs {
    /// Model config (TOML); default: the built-in configs/clip-tiny.toml.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Global batch size, split over each group's ranks (the first ranks get one more when it
    /// does not divide) [default: 128].
    #[arg(long)]
    pub batch: Option<usize>,
}

#[derive(Args)]
pub struct PlanArgs {
    /// Topology file (TOML).
    #[arg(long)]
    pub topology: PathBuf,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training precision (default: bf16 on cuda topologies, fp32 on cpu).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// What the gradient all-reduce sums in: its bytes per step.
    #[arg(long, value_enum, default_value_t = GradReduce::Fp32)]
    pub grad_all_reduce: GradReduce,
    #[arg(long, value_enum, default_value_t = Optimizer::Adamw)]
    pub optimizer: Optimizer,
    /// Gradient checkpointing: recompute each layer's activations in backward.
    #[arg(long)]
    pub checkpointing: bool,
    /// Do not overlap the gradient all-reduce with the backward pass.
    #[arg(long)]
    pub no_overlap: bool,
    /// Cost one feature all-gather after both forwards, not the image features' gather
    /// hidden behind the text forward of a device that holds both towers.
    #[arg(long)]
    pub no_feature_overlap: bool,
    /// Cost attention as keeping its probabilities for backward on GPUs under bf16, as
    /// `train.flash_attention = false` trains (heads of 64 otherwise take flash attention,
    /// which keeps none).
    #[arg(long)]
    pub no_flash_attention: bool,
    /// Megabytes per overlapped gradient all-reduce bucket, as `train.grad_bucket_mb`:
    /// the last one is exposed after backward.
    #[arg(long, value_name = "MB", default_value_t = 25.0)]
    pub grad_bucket_mb: f64,
    /// Search the split and its placement on the nodes; print the best plans.
    #[arg(long)]
    pub auto: bool,
    /// How many plans `--auto` prints.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Measure each tower's forward + backward rate here and use it instead of peak × efficiency.
    #[arg(long)]
    pub calibrate: bool,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Draw the cluster, each device coloured by group, to this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    #[command(flatten)]
    pub loss: LossArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Topology file (TOML); default: the built-in topology/cpu-2x1.toml.
    #[arg(long)]
    pub topology: Option<PathBuf>,
    /// Training config (TOML, e.g. configs/train/siglip.toml); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override any config field: --set loss.kind=siglip --set grad_clip=1.0 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub steps: Option<usize>,
    /// Peak learning rate (linear warm-up, then cosine decay).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub warmup: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Held-out pairs for evaluation (eval.pairs; 0: none).
    #[arg(long)]
    pub eval_pairs: Option<usize>,
    /// Evaluate every N steps as well as at the end (eval.every).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Gradient checkpointing per block: less activation memory, one more forward.
    #[arg(long)]
    pub checkpointing: bool,
    #[command(flatten)]
    pub loss: LossArgs,
    /// Train on WebDataset shards (paths or brace patterns, relative to here) instead of
    /// the synthetic set; repeat for several.
    #[arg(long = "shards", num_args = 1..)]
    pub shards: Vec<String>,
    /// Decoding threads per rank.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Write per-step metrics (JSON lines) to this file.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Write the same numbers (loss, lr, temperature, samples/s, every rank's phase times
    /// and gradient norms, every evaluation) as TensorBoard event files into this folder.
    #[arg(long, value_name = "DIR")]
    pub tensorboard: Option<PathBuf>,
    /// Save checkpoints in this folder (at the end, and every --checkpoint-every steps).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Continue from a checkpoint folder, or `latest` in --checkpoint-dir.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Resume even if the model, the data, the global batch, the seed or the loss differ
    /// from the save's (refused otherwise, naming what changed).
    #[arg(long)]
    pub resume_despite_changes: bool,
    /// How ranks talk: `thread` (every rank a thread of this process), `mpi` (one
    /// process per rank under mpirun; needs `--features mpi`) or `nccl` (one process per
    /// GPU, started by scripts/launch.sh, torchrun or srun; needs `--features cuda`)
    /// [default: mpi under mpirun; nccl for a cuda topology under a launcher; else thread].
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
}

#[derive(Args)]
pub struct PrecisionArgs {
    /// Compute precision [default: bf16 on cuda topologies, fp32 on cpu]. bf16: bf16
    /// matrix products on bf16 copies of f32 master weights, with norms, softmax, the
    /// residual stream, the loss and AdamW in f32 (on the CPU too, slowly: candle's CPU
    /// bf16 products convert through f32).
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// What gradients are summed in over a group [default: fp32]; bf16 halves the bytes.
    #[arg(long, value_enum)]
    pub grad_all_reduce: Option<GradReduce>,
    /// Full f32 matrix products on CUDA (default: TF32 tensor cores allowed for f32).
    #[arg(long)]
    pub no_tf32: bool,
    /// Sum the gradients over the group after backward, not in buckets during it
    /// (grad_overlap = false).
    #[arg(long)]
    pub no_grad_overlap: bool,
    /// Megabytes per overlapped gradient all-reduce [default: 25] (grad_bucket_mb).
    #[arg(long, value_name = "MB")]
    pub grad_bucket_mb: Option<f64>,
    /// Gather both towers' features in one all-gather after both forwards, not the image
    /// features during a rank's text forward (feature_overlap = false).
    #[arg(long)]
    pub no_feature_overlap: bool,
    /// Attention on GPUs keeps its probabilities for backward, not flash attention's
    /// recomputation (flash_attention = false; bf16 heads of 64 only take flash).
    #[arg(long)]
    pub no_flash_attention: bool,
}

impl PrecisionArgs {
    pub fn apply(&self, cfg: &mut TrainConfig) {
        if self.precision.is_some() {
            cfg.precision = self.precision;
        }
        if let Some(g) = self.grad_all_reduce {
            cfg.grad_all_reduce = g;
        }
        cfg.tf32 &= !self.no_tf32;
        cfg.grad_overlap &= !self.no_grad_overlap;
        cfg.feature_overlap &= !self.no_feature_overlap;
        cfg.flash_attention &= !self.no_flash_attention;
        if let Some(mb) = self.grad_bucket_mb {
            cfg.grad_bucket_mb = mb;
        }
    }
}

#[derive(Args)]
pub struct LossArgs {
    /// Contrastive loss [default: clip].
    #[arg(long = "loss", value_enum)]
    pub kind: Option<LossKind>,
    /// How the groups share the loss [default: lse].
    #[arg(long, value_enum)]
    pub exchange: Option<Exchange>,
    /// Columns of logits per tile: auto, none, or a number [default: auto].
    #[arg(long)]
    pub tile: Option<TileSize>,
    /// Micro-batch per image rank (GradCache accumulation) [default: the whole local batch].
    #[arg(long)]
    pub micro_batch_image: Option<usize>,
    /// Micro-batch per text rank.
    #[arg(long)]
    pub micro_batch_text: Option<usize>,
}

impl LossArgs {
    pub fn apply_micro_batch(&self, micro: &mut MicroBatch) {
        if self.micro_batch_image.is_some() {
            micro.image = self.micro_batch_image;
        }
        if self.micro_batch_text.is_some() {
            micro.text = self.micro_batch_text;
        }
    }

    pub fn apply(&self, cfg: &mut LossConfig) {
        if let Some(k) = self.kind {
            cfg.kind = k;
        }
        if let Some(e) = self.exchange {
            cfg.exchange = e;
        }
        if let Some(t) = self.tile {
            cfg.tile = t;
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// Model config [default: the OpenCLIP anchor's tiny CLIP].
    #[arg(long, default_value = "configs/openclip-anchor.toml")]
    pub model: PathBuf,
    /// Topology [default: 2 image + 1 text rank threads, the fastest split measured on 2
    /// cores].
    #[arg(long, default_value = "topology/cpu-2x1.toml")]
    pub topology: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Only measure the f32 GEMM peak on this process's threads and print it (GFLOP/s).
    #[arg(long, hide = true)]
    pub gemm_peak_only: bool,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("set").multiple(false))]
#[command(group = clap::ArgGroup::new("csv").multiple(false))]
pub struct EvalArgs {
    /// A checkpoint folder (step-NNNNNNNN/), as `train --checkpoint-dir` writes; or an
    /// OpenCLIP `state_dict` as one safetensors file (then --model is required).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The model config it was trained with: an mmpipe model TOML, or OpenCLIP's model
    /// config JSON (ViT-B-32.json) [default: the checkpoint folder's model.toml, else the
    /// built-in clip-tiny].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Fashion-MNIST's folder (IDX files).
    #[arg(long, default_value = mmpipe::data::fashion_mnist::DEBIAN_DIR)]
    pub dir: PathBuf,
    /// Test images to use (of 10,000).
    #[arg(long, default_value_t = 10_000)]
    pub images: usize,
    /// Also fit linear probes (multinomial logistic regression) on this many training
    /// images: on the image tower's features, and on raw pixels for reference.
    #[arg(long)]
    pub linear_probe: Option<usize>,
    /// Zero-shot classification of an image folder instead (ROOT/CLASS/*.jpg|png|webp, one
    /// subfolder per class): top-1, top-5 and the mean per-class recall.
    #[arg(long, value_name = "ROOT", group = "set")]
    pub zeroshot_folder: Option<PathBuf>,
    /// Zero-shot classification of WebDataset shards instead, each sample an image and a
    /// `.cls` class index ('val/{000..007}.tar'; needs --class-names).
    #[arg(long, value_name = "PATTERN", requires = "class_names", group = "set")]
    pub zeroshot_shards: Vec<String>,
    /// Zero-shot classification of a CSV/TSV's rows instead: an image path (relative to
    /// the file) and a label, a class index (with --class-names) or a class name.
    #[arg(long, value_name = "FILE", groups = ["set", "csv"])]
    pub zeroshot_csv: Option<PathBuf>,
    /// Retrieval on held-out image–caption pairs instead: WebDataset shards
    /// (`KEY.jpg` + `KEY.txt`): recall@1/5/10 both ways.
    #[arg(long, value_name = "PATTERN", group = "set")]
    pub retrieval_shards: Vec<String>,
    /// Retrieval on a CSV/TSV's image–caption rows instead.
    #[arg(long, value_name = "FILE", groups = ["set", "csv"])]
    pub retrieval_csv: Option<PathBuf>,
    /// The CSV's image-path column.
    #[arg(long, default_value = mmpipe::data::CSV_IMAGE_COLUMN, requires = "csv")]
    pub image_column: String,
    /// The zero-shot CSV's label column.
    #[arg(long, default_value = "label", requires = "zeroshot_csv")]
    pub label_column: String,
    /// The retrieval CSV's caption column.
    #[arg(long, default_value = mmpipe::data::CSV_CAPTION_COLUMN, requires = "retrieval_csv")]
    pub caption_column: String,
    /// The classes' names, one a line: in the folders' sorted order, or by label for
    /// shards [default for a folder: its subfolders' names; the ImageNet-1k names for 1000
    /// WordNet-id folders].
    #[arg(long)]
    pub class_names: Option<PathBuf>,
    /// Prompt templates, one a line with `{}` for the class [default: OpenAI's 80 ImageNet
    /// templates].
    #[arg(long)]
    pub templates: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Run folders (holding metrics.jsonl) or metrics files; the first is the reference.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where the PNGs go [default: the first run's folder].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write a markdown table of the runs (loss, evaluation, throughput) here.
    #[arg(long)]
    pub table: Option<PathBuf>,
}
