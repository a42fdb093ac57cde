//! Training settings: a TOML file (`--config`), every field with a default, and the CLI's
//! flags on top. The full file (optimizer groups, data, checkpoints) grows in later work;
//! unknown fields are errors naming the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{DataConfig, DataKind};
use crate::error::{Error, Result};
use crate::loss::{LossConfig, TileSize};
use crate::model::{ClipConfig, ImageTowerConfig};
pub use crate::plan::{GradReduce, MicroBatch, Precision};
use crate::topology::{DeviceKind, Topology, Tower};

/// Evaluation during training: zero-shot classification and retrieval on held-out pairs
/// (the synthetic set's held-out stream, or Fashion-MNIST's test split when training on
/// Fashion-MNIST), every `every` steps and at the end.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Steps between evaluations (0: only at the end).
    pub every: usize,
    /// Held-out pairs (0: no evaluation). Fashion-MNIST has 10,000 test images.
    pub pairs: usize,
    /// Named labelled image sets scored zero-shot at every evaluation (`[[eval.sets]]`).
    pub sets: Vec<EvalSetConfig>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 0,
            pairs: 256,
            sets: Vec::new(),
        }
    }
}

/// What a set of `[[eval.sets]]` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EvalSetKind {
    #[default]
    ZeroShot,
    Retrieval,
}

/// A set of `[[eval.sets]]`. Zero-shot: an image folder (`ROOT/CLASS/*.jpg`), WebDataset
/// shards with `.cls` labels (then `class_names` is required) or a CSV/TSV with a label
/// column, its class names and prompt templates (`mmpipe eval`'s defaults when absent).
/// Retrieval: shards or a CSV/TSV of image–caption pairs. Paths are relative to the
/// config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSetConfig {
    /// Its name in the logs, the metrics file and TensorBoard (`eval/sets/NAME/top1`).
    pub name: String,
    /// `"zero-shot"` (the default: classification of labelled images) or `"retrieval"`
    /// (recall@k on held-out image–caption pairs of `shards`).
    #[serde(default)]
    pub kind: EvalSetKind,
    pub folder: Option<std::path::PathBuf>,
    /// Shard patterns (`val/{000..007}.tar`), as `data.shards` takes them.
    #[serde(default)]
    pub shards: Vec<String>,
    /// A CSV/TSV (`.tsv`: tab-separated) instead: for zero-shot, rows of an image path
    /// (relative to the CSV) and a label (a class index, or a class name); for
    /// retrieval, rows of an image path and a caption.
    pub csv: Option<std::path::PathBuf>,
    /// The CSV's image-path column [default: `filepath`, OpenCLIP's].
    pub image_column: Option<String>,
    /// A zero-shot CSV's label column [default: `label`].
    pub label_column: Option<String>,
    /// A retrieval CSV's caption column [default: `title`, OpenCLIP's].
    pub caption_column: Option<String>,
    pub class_names: Option<std::path::PathBuf>,
    pub templates: Option<std::path::PathBuf>,
}

impl EvalSetConfig {
    /// A zero-shot CSV's columns (defaults where the set names none).
    pub fn csv_labels(&self) -> crate::eval::zero_shot::CsvLabels {
        let default = crate::eval::zero_shot::CsvLabels::default();
        crate::eval::zero_shot::CsvLabels {
            image: self.image_column.clone().unwrap_or(default.image),
            label: self.label_column.clone().unwrap_or(default.label),
        }
    }

    /// A retrieval CSV's columns (defaults where the set names none).
    pub fn csv_pairs(&self) -> crate::data::convert::CsvColumns {
        crate::data::convert::CsvColumns {
            image: self
                .image_column
                .clone()
                .unwrap_or_else(|| crate::data::CSV_IMAGE_COLUMN.into()),
            caption: self
                .caption_column
                .clone()
                .unwrap_or_else(|| crate::data::CSV_CAPTION_COLUMN.into()),
            delimiter: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    pub steps: usize,
    pub global_batch: usize,
    /// Peak learning rate, reached after `warmup` steps, then cosine decay to 0.
    pub lr: f64,
    pub warmup: usize,
    /// After the warm-up: `"cosine"` decay to 0, or `"constant"`.
    pub schedule: super::optim::Schedule,
    pub weight_decay: f64,
    /// Scale each tower's gradients (summed over its group) down to this L2 norm when
    /// they exceed it; the loss's scalars are not clipped. None: no clipping.
    pub grad_clip: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The model config file, relative to this file (to the working directory without
    /// one); `--model` overrides it. None: the built-in tiny model.
    pub model: Option<PathBuf>,
    /// `fp32`, or `bf16`: bf16 matrix products on bf16 copies of f32 master weights, with
    /// norms, softmax, embeddings, the residual stream, the loss and AdamW in f32 (torch
    /// autocast's rules, docs/precision.md). Absent:
    /// bf16 on CUDA topologies, fp32 on the CPU (where bf16 runs, slowly: candle's CPU
    /// bf16 matrix products convert through f32).
    pub precision: Option<Precision>,
    /// fp32 matrix products on CUDA may use TF32 tensor cores (PyTorch's `allow_tf32`);
    /// false: full f32. Under bf16 this still covers the f32 products (the loss's logits).
    /// The CPU has no TF32: there it changes nothing.
    pub tf32: bool,
    /// What gradients are summed in over a group: `fp32` (default), or `bf16` (half the
    /// bytes, each sum rounded to bf16); cast to the master dtype after.
    pub grad_all_reduce: GradReduce,
    /// Sum each segment's gradients over the group (in buckets, on a worker thread, on
    /// GPUs on the group's own stream) while backward runs on (DDP's overlap); false: one
    /// sum after backward. Only groups of two or more ranks have anything to overlap.
    pub grad_overlap: bool,
    /// Megabytes of gradients per overlapped all-reduce (DDP's `bucket_cap_mb`): smaller
    /// buckets start sooner, larger ones pay each collective's latency less often.
    pub grad_bucket_mb: f64,
    /// Where a rank holds both towers: gather the image features over the world while
    /// its text forward runs (one gather per tower, the image's on a worker; on GPUs on
    /// the world's own stream); false: one gather of both after both forwards.
    pub feature_overlap: bool,
    /// bf16 attention on GPUs, in heads of 64, by the flash kernels: no probabilities kept
    /// for backward, which recomputes them (`src/model/fused/flash_attention.cu`); false:
    /// the probabilities kept (cuBLAS on the heads in place, the softmax kernel). Other
    /// head widths, f32 and the CPU always take the kept-probabilities path: there it
    /// changes nothing.
    pub flash_attention: bool,
    pub eval: EvalConfig,
    /// Show a progress bar on world rank 0 (a CLI matter, not a file field).
    #[serde(skip)]
    pub progress: bool,
    /// Gradient checkpointing per block: keep block inputs, recompute in backward.
    pub checkpointing: bool,
    /// Steps in a row that may be skipped (a NaN or infinite loss or gradient, or fewer than
    /// two readable pairs in the batch: each skipped and counted) before the run stops.
    pub max_bad_steps: usize,
    /// Write one JSON line per step here (loss, lr, temperature, throughput, every rank's
    /// phase times and bytes, memory, skipped samples).
    pub metrics: Option<std::path::PathBuf>,
    /// Write the same numbers as TensorBoard event files into this folder.
    pub tensorboard: Option<std::path::PathBuf>,
    /// Save checkpoints here: every `checkpoint_every` steps (0: only at the end), keeping
    /// the newest `keep_checkpoints`.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    pub checkpoint_every: usize,
    pub keep_checkpoints: usize,
    /// Continue from this checkpoint folder, or `latest` in `checkpoint_dir`.
    pub resume: Option<std::path::PathBuf>,
    /// Resume even though the model, the data or an identity setting (global batch, seed,
    /// loss, data source and order) differs from the save's: a warning instead of a refusal.
    pub resume_despite_changes: bool,
    /// Seconds one collective may take before the run is aborted, naming it (a peer that
    /// hangs would otherwise hang everyone).
    pub collective_timeout: f64,
    pub loss: LossConfig,
    /// Samples per forward pass on each rank of a group, when fewer than the rank's share
    /// of the global batch: features first, the loss once on the whole batch, then each
    /// micro-batch again with gradients (GradCache). Each group may pick its own.
    pub micro_batch: MicroBatch,
    pub data: DataConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            steps: 400,
            global_batch: 128,
            lr: 2e-3,
            warmup: 40,
            schedule: super::optim::Schedule::Cosine,
            weight_decay: 0.1,
            grad_clip: None,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            model: None,
            precision: None,
            tf32: true,
            grad_all_reduce: GradReduce::Fp32,
            grad_overlap: true,
            grad_bucket_mb: 25.0,
            feature_overlap: true,
            flash_attention: true,
            eval: EvalConfig::default(),
            progress: true,
            checkpointing: false,
            max_bad_steps: 5,
            metrics: None,
            tensorboard: None,
            checkpoint_dir: None,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            resume: None,
            resume_despite_changes: false,
            collective_timeout: 300.0,
            loss: LossConfig::default(),
            micro_batch: MicroBatch::default(),
            data: DataConfig::default(),
        }
    }
}

impl TrainConfig {
    /// What the planner costs for this run on `topology`'s devices: its batch, loss,
    /// micro-batches, precision, gradient all-reduce dtype and checkpointing, with AdamW
    /// and the rest as `mmpipe plan` costs them by default (so `groups = "auto"` trains
    /// what `plan --auto` prints).
    pub fn cost_options(&self, device: DeviceKind) -> crate::plan::CostOptions {
        crate::plan::CostOptions {
            global_batch: self.global_batch,
            loss: self.loss,
            micro_batch: self.micro_batch,
            precision: self.precision_on(device),
            grad_reduce: self.grad_all_reduce,
            optimizer: crate::plan::Optimizer::Adamw,
            checkpointing: self.checkpointing,
            overlap: self.grad_overlap.then_some(self.grad_bucket_mb * 1e6),
            feature_overlap: self.feature_overlap,
            flash_attention: self.flash_attention,
            calibration: None,
        }
    }

    /// `topology`'s groups when they are `auto`: the layout `mmpipe plan --auto` picks for
    /// this run, with the checkpointing and micro-batches it needs to fit put into the
    /// config. Returns the chosen topology and what was chosen, in words (None when the
    /// file lists its groups).
    pub fn choose_groups(
        &mut self,
        topology: Topology,
        model: &ClipConfig,
    ) -> Result<(Topology, Option<String>)> {
        if !topology.auto_groups {
            return Ok((topology, None));
        }
        let auto =
            crate::plan::search::search(&topology, model, &self.cost_options(topology.device), 1)?;
        let best = auto.best();
        let chosen = topology.with_groups(&best.image_devices, &best.text_devices)?;
        self.checkpointing = best.checkpointing;
        self.micro_batch = best.micro_batch;
        let needs = if best.needs.is_empty() {
            String::new()
        } else {
            format!(", with {} to fit in memory", best.needs.join(" "))
        };
        let words = format!(
            "{}: groups = \"auto\": training the layout `mmpipe plan --auto` picks, {} ({}), image = [{}], \
             text = [{}]{needs}; predicted {:.1} ms per step",
            topology.source.display(),
            best.kind,
            chosen.describe_groups(),
            best.image.join(", "),
            best.text.join(", "),
            best.split.step_s * 1e3
        );
        Ok((chosen, Some(words)))
    }

    /// The precision on `device`: as set, else bf16 on CUDA and fp32 on the CPU.
    pub fn precision_on(&self, device: DeviceKind) -> Precision {
        self.precision
            .unwrap_or_else(|| Precision::default_on(device))
    }

    /// Reads a training config (or the defaults, without a file), applies `key=value`
    /// overrides (`optim`-style dotted keys: `loss.kind=siglip`, `lr=5e-4`; values in
    /// TOML syntax, bare words as strings), and checks the result. Errors name the file,
    /// or `--set` and the key.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        let origin = path.map_or_else(|| Path::new("--set").to_path_buf(), Path::to_path_buf);
        let mut table: toml::Table = match path {
            Some(p) => crate::error::read_toml(p)?,
            None => toml::Table::new(),
        };
        for set in sets {
            let (key, raw) = set.split_once('=').ok_or_else(|| {
                Error::invalid(
                    "--set",
                    set.as_str(),
                    "expected KEY=VALUE, e.g. loss.kind=siglip",
                )
            })?;
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let mut at = &mut table;
            let parts: Vec<&str> = key.trim().split('.').collect();
            for part in &parts[..parts.len() - 1] {
                at = at
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| {
                        Error::invalid("--set", key, format!("`{part}` is not a section"))
                    })?;
            }
            at.insert(parts[parts.len() - 1].to_string(), value);
        }
        let mut cfg: TrainConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| Error::Parse {
                    path: match (path, sets.is_empty()) {
                        (Some(p), false) => format!("{} with --set", p.display()).into(),
                        _ => origin.clone(),
                    },
                    message: e.to_string().trim_end().to_string(),
                })?;
        if let Some(p) = path {
            cfg.data.base_dir = p
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| ".".into());
            cfg.data.origin = p.to_path_buf();
            cfg.model = cfg.model.map(|m| cfg.data.base_dir.join(m));
            for set in &mut cfg.eval.sets {
                let base = &cfg.data.base_dir;
                set.folder = set.folder.as_ref().map(|p| base.join(p));
                set.csv = set.csv.as_ref().map(|p| base.join(p));
                set.class_names = set.class_names.as_ref().map(|p| base.join(p));
                set.templates = set.templates.as_ref().map(|p| base.join(p));
            }
        }
        cfg.validate(&origin)?;
        Ok(cfg)
    }

    /// A hash of this config and the model's: what every process of a run must agree on.
    pub fn fingerprint(&self, model: &ClipConfig) -> u64 {
        crate::comm::rendezvous::stable_hash(
            format!("{}{model:?}", toml::to_string(self).unwrap_or_default()).as_bytes(),
        )
    }

    /// Checks values that parse but make no sense; `origin` names the file (or the CLI)
    /// in the error.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |field: &str, message: String| Err(Error::invalid(origin, field, message));
        for (i, set) in self.eval.sets.iter().enumerate() {
            if set.name.is_empty() || set.name.contains('/') {
                return bad(
                    &format!("eval.sets[{i}].name"),
                    format!("`{}` must be non-empty and contain no '/'", set.name),
                );
            }
            if self.eval.sets[..i].iter().any(|s| s.name == set.name) {
                return bad(
                    &format!("eval.sets[{i}].name"),
                    format!("`{}` names two sets", set.name),
                );
            }
            let field = |name: &str| format!("eval.sets[{i}].{name}");
            // Where the set's samples are: exactly one of these.
            let sources = [
                ("folder", set.folder.is_some()),
                ("shards", !set.shards.is_empty()),
                ("csv", set.csv.is_some()),
            ];
            let given: Vec<&str> = sources.iter().filter(|s| s.1).map(|s| s.0).collect();
            // Fields that mean nothing for this set (a dead field is an error).
            let mut stray = Vec::new();
            if set.csv.is_none() {
                stray.extend([
                    ("image_column", set.image_column.is_some()),
                    ("label_column", set.label_column.is_some()),
                    ("caption_column", set.caption_column.is_some()),
                ]);
            }
            if set.kind == EvalSetKind::Retrieval {
                if given.len() != 1 || set.folder.is_some() {
                    return bad(
                        &field("shards"),
                        "a retrieval set takes either `shards` (image–caption pairs) or `csv` \
                         (image paths and captions)"
                            .into(),
                    );
                }
                stray.extend([
                    ("class_names", set.class_names.is_some()),
                    ("templates", set.templates.is_some()),
                    ("label_column", set.label_column.is_some()),
                ]);
            } else {
                if given.len() != 1 {
                    return bad(
                        &field("folder"),
                        "a zero-shot set takes one of `folder` (ROOT/CLASS/*.jpg), `shards` \
                         (with `.cls` labels) or `csv` (image paths and labels)"
                            .into(),
                    );
                }
                if !set.shards.is_empty() && set.class_names.is_none() {
                    return bad(
                        &field("class_names"),
                        "shards with `.cls` labels need a class-names file (one name a line, by \
                         label)"
                            .into(),
                    );
                }
                stray.push(("caption_column", set.caption_column.is_some()));
            }
            if let Some((name, _)) = stray.iter().find(|s| s.1) {
                return bad(
                    &field(name),
                    format!(
                        "does nothing for a {} set read from {}",
                        match set.kind {
                            EvalSetKind::Retrieval => "retrieval",
                            EvalSetKind::ZeroShot => "zero-shot",
                        },
                        given.join(", ")
                    ),
                );
            }
        }
        if let Some(c) = self.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return bad("grad_clip", format!("{c} is not a positive norm"));
            }
        }
        if !(self.grad_bucket_mb.is_finite() && self.grad_bucket_mb > 0.0) {
            return bad(
                "grad_bucket_mb",
                format!(
                    "{} is not a positive number of megabytes",
                    self.grad_bucket_mb
                ),
            );
        }
        if !(self.collective_timeout.is_finite() && self.collective_timeout > 0.0) {
            return bad(
                "collective_timeout",
                format!(
                    "{} is not a positive number of seconds",
                    self.collective_timeout
                ),
            );
        }
        if self.global_batch == 0 {
            return bad("global_batch", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not a positive learning rate", self.lr));
        }
        for (field, mb) in [
            ("micro_batch.image", self.micro_batch.image),
            ("micro_batch.text", self.micro_batch.text),
        ] {
            if mb == Some(0) {
                return bad(field, "a micro-batch holds at least 1 sample".into());
            }
        }
        if !(self.loss.tile_memory_mib.is_finite() && self.loss.tile_memory_mib > 0.0) {
            return bad(
                "loss.tile_memory_mib",
                format!("{} MiB is not a memory budget", self.loss.tile_memory_mib),
            );
        }
        let d = &self.data;
        if d.kind == DataKind::Webdataset && d.shards.is_empty() == d.sources.is_empty() {
            return bad(
                "data.shards",
                "kind = \"webdataset\" needs shards, or [[data.sources]] with weights: one of the two".into(),
            );
        }
        for (i, s) in d.sources.iter().enumerate() {
            if !(s.weight.is_finite() && s.weight > 0.0) {
                return bad(
                    &format!("data.sources[{i}].weight"),
                    format!("{} is not a positive weight", s.weight),
                );
            }
        }
        if d.kind == DataKind::Csv && d.csv.as_os_str().is_empty() {
            return bad("data.csv", "kind = \"csv\" needs the file".into());
        }
        if self.data.max_image_pixels == 0 || self.data.max_image_bytes == 0 {
            return bad(
                "data.max_image_pixels",
                "the image limits must allow at least one pixel and one byte".into(),
            );
        }
        if self.data.workers == 0 {
            return bad("data.workers", "at least 1 decoding thread per rank".into());
        }
        let test_images = crate::data::fashion_mnist::TEST_IMAGES;
        if d.kind == DataKind::FashionMnist && self.eval.pairs > test_images {
            return bad(
                "eval.pairs",
                format!(
                    "{} held-out pairs asked for; Fashion-MNIST's test split has {test_images}",
                    self.eval.pairs
                ),
            );
        }
        if let TileSize::Columns(0) = self.loss.tile {
            return bad("loss.tile", "a tile has at least 1 column".into());
        }
        Ok(())
    }

    /// Checks what only makes sense together with the topology and the model: that this
    /// build can run the topology's devices, that the global batch splits evenly, that the
    /// held-out pairs cover every rank, and that micro-batches suit the image tower. The
    /// one place a run's combined settings are checked, before any rank starts.
    pub fn validate_run(&self, topology: &Topology, model: &ClipConfig) -> Result<()> {
        if topology.device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
            return Err(Error::invalid(
                &topology.source,
                "device",
                "`cuda` ranks need a build with CUDA (cargo build --release --features cuda; \
                 scripts/cuda-build.sh does it without a system toolkit); train with a cpu topology, \
                 or inspect this one with `mmpipe plan`",
            ));
        }
        topology.check_batch(self.global_batch, "the global batch (--batch)")?;
        let largest_group = topology
            .group_size(Tower::Image)
            .max(topology.group_size(Tower::Text));
        if self.eval.pairs != 0 && self.eval.pairs < largest_group {
            return Err(Error::invalid(
                &self.data.origin,
                "eval.pairs",
                format!(
                    "{} is fewer than the {largest_group} ranks of a group: use at least that many, or 0",
                    self.eval.pairs
                ),
            ));
        }
        // The largest slice (the first ranks' when the batch does not divide evenly).
        let local_batch = self
            .global_batch
            .div_ceil(topology.group_size(Tower::Image));
        if let Some(m) = self.micro_batch.image {
            let resnet = matches!(model.vision, ImageTowerConfig::Resnet(_));
            if resnet && m < local_batch && !model.is_locked(Tower::Image) {
                return Err(Error::invalid(
                    &self.data.origin,
                    "micro_batch.image",
                    format!(
                        "{m}: the ResNet tower's batch norm takes its statistics from each forward \
                         pass, so micro-batches would change the step (and update the running \
                         statistics twice); use the whole local batch of {local_batch}, or a ViT"
                    ),
                ));
            }
        }
        Ok(())
    }
}
