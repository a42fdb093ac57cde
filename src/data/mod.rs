//! Data for the towers. Each rank materialises only its own modality for its own slice of
//! the global batch.

pub mod cache;
pub mod convert;
pub mod fashion_mnist;
pub mod held_out;
pub mod order;
pub mod pipeline;
pub mod shards;
pub mod source;
pub mod synthetic;
pub mod throughput;
pub mod tokenizer;
pub mod transform;
pub mod vocab;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use serde::Deserialize;

pub use held_out::HeldOut;
pub use source::{RankSlice, Source};
pub use synthetic::{Stream, SyntheticShapes};
pub use tokenizer::{TextTokenizer, Tokens};
pub use vocab::WordVocab;

use crate::error::{Error, Result};
use crate::model::{ClipConfig, TowerInput};
use crate::topology::Tower;

/// Where the training pairs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// The built-in shapes set, generated on the fly.
    #[default]
    Synthetic,
    /// WebDataset tar shards (`KEY.jpg|png|webp` + `KEY.txt`), as img2dataset writes.
    Webdataset,
    /// Fashion-MNIST's IDX files, captions from class names and prompt templates.
    #[serde(rename = "fashion-mnist")]
    FashionMnist,
    /// A CSV/TSV of image paths (relative to it) and captions.
    Csv,
}

/// Where decoded images become normalised floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NormaliseOn {
    /// The device on a GPU rank (bytes cross PCIe: a quarter of the floats' bytes), the
    /// host on a CPU rank (the stacking pass does it for free).
    #[default]
    Auto,
    /// The pipeline, as it stacks the batch: floats go to the device.
    Host,
    /// The step, on the rank's device: `[n, size, size, 3]` bytes go to it.
    Device,
}

impl NormaliseOn {
    /// Whether a rank on `device` normalises there.
    pub fn on_device(self, device: &Device) -> bool {
        match self {
            NormaliseOn::Auto => device.is_cuda(),
            NormaliseOn::Host => false,
            NormaliseOn::Device => true,
        }
    }
}

/// One of several shard sets mixed by weight.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSource {
    pub shards: Vec<String>,
    /// Relative share of the samples drawn (any positive scale).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// The `[data]` section of a training config.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    pub kind: DataKind,
    /// Shard paths or brace patterns (`data/{00000..00099}.tar`), relative to the config
    /// file.
    pub shards: Vec<String>,
    /// Several shard sets mixed by weight (`[[data.sources]]`), instead of `shards`.
    pub sources: Vec<ShardSource>,
    /// `kind = "csv"`: the file, and its image-path and caption columns (OpenCLIP's
    /// defaults); `.tsv` files are tab-separated.
    pub csv: PathBuf,
    pub image_column: String,
    pub caption_column: String,
    /// Samples held for shuffling across shards (1: the shards' own order).
    pub shuffle_buffer: usize,
    /// Draw shards with replacement: endless runs without epochs.
    pub resample: bool,
    /// Decoding threads per rank.
    pub workers: usize,
    /// Batches prepared ahead of the step, per rank.
    pub prefetch: usize,
    /// OpenCLIP's random resized crop (scale 0.9–1) instead of the centre crop.
    pub random_crop: bool,
    /// Keep the image ranks' decoded squares in this memory-mapped file (relative to the
    /// config file) and read them from there in later epochs (shards only).
    pub cache: Option<PathBuf>,
    /// Pixels per side of a cached square (default: the model's image size); larger
    /// leaves random crops more to work with.
    pub cache_side: Option<usize>,
    /// Images over either bound are skipped before decoding (width × height from the
    /// header; the encoded file's bytes).
    pub max_image_pixels: u64,
    pub max_image_bytes: u64,
    /// Where decoded images are normalised (the synthetic set's are drawn as floats).
    pub normalise_on: NormaliseOn,
    /// Fashion-MNIST's folder (Debian's by default) and split.
    pub dir: PathBuf,
    pub split: fashion_mnist::Split,
    /// What relative shard paths are relative to (the config file's folder).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Where the settings came from, for errors: the config file, or the command line.
    #[serde(skip)]
    pub origin: PathBuf,
}

/// OpenCLIP's CSV columns (`--csv-img-key`, `--csv-caption-key`): the default everywhere
/// mmpipe reads image paths and captions from a CSV.
pub const CSV_IMAGE_COLUMN: &str = "filepath";
pub const CSV_CAPTION_COLUMN: &str = "title";

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            kind: DataKind::Synthetic,
            shards: Vec::new(),
            sources: Vec::new(),
            csv: PathBuf::new(),
            image_column: CSV_IMAGE_COLUMN.into(),
            caption_column: CSV_CAPTION_COLUMN.into(),
            shuffle_buffer: 1000,
            resample: false,
            workers: 2,
            prefetch: 2,
            random_crop: false,
            cache: None,
            cache_side: None,
            max_image_pixels: transform::ImageLimits::default().max_pixels,
            max_image_bytes: transform::ImageLimits::default().max_bytes,
            normalise_on: NormaliseOn::Auto,
            dir: PathBuf::from(fashion_mnist::DEBIAN_DIR),
            split: fashion_mnist::Split::Train,
            base_dir: PathBuf::from("."),
            origin: PathBuf::from("the command line"),
        }
    }
}

impl DataConfig {
    /// These settings reading the shards `patterns` (the command line's `--shards`,
    /// relative to the working directory) instead of what they named.
    pub fn use_shards(&mut self, patterns: Vec<String>) {
        self.kind = DataKind::Webdataset;
        self.shards = patterns;
        self.base_dir = PathBuf::from(".");
        self.origin = PathBuf::from("--shards");
    }

    /// The decoding bounds these settings ask for.
    pub fn image_limits(&self) -> transform::ImageLimits {
        transform::ImageLimits {
            max_pixels: self.max_image_pixels,
            max_bytes: self.max_image_bytes,
        }
    }
}

/// The synthetic shapes set, ready to hand any slice of samples to either tower.
pub struct SyntheticSource {
    pub shapes: SyntheticShapes,
    tokenizer: std::sync::Arc<TextTokenizer>,
    context: usize,
    channels: usize,
}

impl SyntheticSource {
    pub fn new(seed: u64, model: &ClipConfig) -> Result<Self> {
        let words = synthetic::SHAPES
            .iter()
            .chain(synthetic::SIZES.iter())
            .chain(synthetic::COLOURS.iter().map(|(c, _)| c))
            .flat_map(|s| s.split_whitespace())
            .chain(
                synthetic::POSITIONS
                    .iter()
                    .flat_map(|p| p.split_whitespace()),
            )
            .chain(["a", "at", "the"]);
        let vocab = WordVocab::new(words);
        if vocab.size() > model.vocab_size() {
            return Err(Error::Msg(format!(
                "the synthetic captions need a vocabulary of {} tokens but text.vocab_size is {}",
                vocab.size(),
                model.vocab_size()
            )));
        }
        if model.channels() != 3 {
            return Err(Error::Msg(
                "the synthetic images are RGB: vision.channels must be 3".into(),
            ));
        }
        Ok(SyntheticSource {
            shapes: SyntheticShapes::new(seed, model.image_size()),
            tokenizer: std::sync::Arc::new(TextTokenizer::Words(vocab)),
            context: model.context_length(),
            channels: model.channels(),
        })
    }

    /// The word tokenizer the synthetic captions use.
    pub fn tokenizer(&self) -> std::sync::Arc<TextTokenizer> {
        self.tokenizer.clone()
    }

    pub fn caption(&self, stream: Stream, index: u64) -> String {
        SyntheticShapes::caption(&self.shapes.sample(stream, index))
    }

    /// The input for `tower` of samples `indices` of `stream`.
    pub fn tower_input(
        &self,
        tower: Tower,
        stream: Stream,
        indices: &[u64],
        device: &Device,
    ) -> Result<TowerInput> {
        let n = indices.len();
        match tower {
            Tower::Image => {
                let size = self.shapes.image_size;
                let mut pixels = Vec::with_capacity(n * self.channels * size * size);
                for &i in indices {
                    pixels.extend(self.shapes.render(&self.shapes.sample(stream, i)));
                }
                Ok(TowerInput::Images(Tensor::from_vec(
                    pixels,
                    (n, self.channels, size, size),
                    device,
                )?))
            }
            Tower::Text => {
                let captions: Vec<String> =
                    indices.iter().map(|&i| self.caption(stream, i)).collect();
                self.tokenizer
                    .caption_input(&captions, self.context, device)
            }
        }
    }
}
