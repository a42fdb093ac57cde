//! Model configurations, read from `configs/*.toml`. The sizes that follow from them
//! (parameters, FLOPs, activation memory) are the planner's: `plan::size`.
//!
//! A model file names its embedding size and its two towers, each either inline or as a
//! path (relative to the model file) to a tower file in `configs/towers/`:
//!
//! ```toml
//! embed_dim = 512
//! vision = "towers/vit-b-16.toml"
//! [text]
//! kind = "clip"
//! vocab_size = 49408
//! # ...
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::error::{parse_toml, read_toml, Error, Result};
use crate::topology::Tower;

pub use super::layers::Activation;

/// A CLIP-style ViT: class token, learned positions, pre-norm blocks, class-token pooling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub channels: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: usize,
    /// `"gelu"` (default) or `"quick_gelu"` (OpenAI's original checkpoints).
    #[serde(default)]
    pub act: Activation,
    /// Pool with OpenCLIP's attentional pooler (learned queries) instead of the class token.
    #[serde(default)]
    pub attentional_pool: bool,
    #[serde(default = "two_five_six")]
    pub attn_pooler_queries: usize,
    #[serde(default = "eight")]
    pub attn_pooler_heads: usize,
}

/// CLIP's modified ResNet: a three-convolution stem, anti-aliased (average-pool) strides,
/// and attention pooling over the final feature map.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    pub image_size: usize,
    /// Bottleneck blocks per stage: `[3, 4, 6, 3]` for ResNet-50.
    pub layers: [usize; 4],
    /// Channels of the first stage (the stem ends with this many).
    pub width: usize,
    /// Heads of the attention pool.
    pub heads: usize,
    #[serde(default = "three")]
    pub channels: usize,
    /// Batch-norm statistics over the whole image group's batch (exact: the split step
    /// then equals the single-device step), instead of each rank's own.
    #[serde(default)]
    pub sync_batch_norm: bool,
}

/// CLIP's causal text transformer, pooled at the end-of-text token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextTransformerConfig {
    pub vocab_size: usize,
    pub context_length: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: usize,
    #[serde(default)]
    pub act: Activation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BertPooling {
    Mean,
    Cls,
}

/// A BERT encoder (bidirectional, attention mask), as in HF's `BertModel`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// Tokens per caption during training (at most `max_position_embeddings`).
    pub context_length: usize,
    pub pooling: BertPooling,
    /// HF checkpoints carry a pooler (dense + tanh on the CLS token).
    #[serde(default)]
    pub pooler: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageTowerConfig {
    Vit(VitConfig),
    Resnet(ResNetConfig),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TextTowerConfig {
    Clip(TextTransformerConfig),
    Bert(BertConfig),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub embed_dim: usize,
    pub vision: ImageTowerConfig,
    pub text: TextTowerConfig,
    /// Towers that do not train (no gradient, no optimizer state): LiT-style training
    /// against a frozen pretrained tower.
    pub locked: Vec<Tower>,
    /// An HF BERT folder (`config.json`, `model.safetensors`, `tokenizer.json`) whose
    /// weights initialise the BERT text tower.
    pub pretrained_text: Option<std::path::PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClipConfigFile {
    embed_dim: usize,
    vision: toml::Value,
    text: toml::Value,
    #[serde(default)]
    locked: Vec<Tower>,
    /// Relative to the model file.
    pretrained_text: Option<String>,
}

fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn eight() -> usize {
    8
}
fn two_five_six() -> usize {
    256
}

/// The model `mmpipe train` uses when given none.
pub const DEFAULT_TINY: &str = include_str!("../../configs/clip-tiny.toml");

impl ClipConfig {
    /// A model file: mmpipe's TOML, or OpenCLIP's JSON model config (`ViT-B-32.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            return super::openclip_config::from_file(path);
        }
        let file: ClipConfigFile = read_toml(path)?;
        Self::build(file, path)
    }

    /// Parses model text; `origin` names it in errors and anchors relative tower paths.
    pub fn from_str(text: &str, origin: &Path) -> Result<Self> {
        let file: ClipConfigFile = parse_toml(text, origin)?;
        Self::build(file, origin)
    }

    pub fn default_tiny() -> Self {
        Self::from_str(DEFAULT_TINY, Path::new("configs/clip-tiny.toml"))
            .expect("the built-in model config is valid")
    }

    fn build(file: ClipConfigFile, path: &Path) -> Result<Self> {
        let base = path.parent().unwrap_or(Path::new(""));
        let c = ClipConfig {
            embed_dim: file.embed_dim,
            vision: resolve_tower(file.vision, "vision", path)?,
            text: resolve_tower(file.text, "text", path)?,
            locked: file.locked,
            pretrained_text: file.pretrained_text.map(|p| base.join(p)),
        };
        c.validate(path)?;
        Ok(c)
    }

    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::invalid(path, field, msg));
        if self.locked.len() > 1 && self.locked[0] != self.locked[1] {
            return bad(
                "locked",
                "both towers locked: nothing would train but the temperature".into(),
            );
        }
        if let Some(dir) = &self.pretrained_text {
            if !matches!(self.text, TextTowerConfig::Bert(_)) {
                return bad("pretrained_text", "pretrained text weights are HF BERT checkpoints: the text tower must be kind = \"bert\"".into());
            }
            if !dir.join("model.safetensors").exists() {
                return bad(
                    "pretrained_text",
                    format!("{} has no model.safetensors", dir.display()),
                );
            }
        }
        let mut fields: Vec<(&str, usize)> = vec![("embed_dim", self.embed_dim)];
        match &self.vision {
            ImageTowerConfig::Vit(v) => {
                fields.extend([
                    ("vision.image_size", v.image_size),
                    ("vision.patch_size", v.patch_size),
                    ("vision.channels", v.channels),
                    ("vision.width", v.width),
                    ("vision.layers", v.layers),
                    ("vision.heads", v.heads),
                    ("vision.mlp_ratio", v.mlp_ratio),
                ]);
                if v.patch_size > 0 && !v.image_size.is_multiple_of(v.patch_size) {
                    return bad(
                        "vision.patch_size",
                        format!(
                            "patch size {} does not divide image size {}",
                            v.patch_size, v.image_size
                        ),
                    );
                }
                if v.heads > 0 && !v.width.is_multiple_of(v.heads) {
                    return bad(
                        "vision.heads",
                        format!("{} heads do not divide width {}", v.heads, v.width),
                    );
                }
            }
            ImageTowerConfig::Resnet(r) => {
                fields.extend([
                    ("vision.image_size", r.image_size),
                    ("vision.width", r.width),
                    ("vision.heads", r.heads),
                    ("vision.channels", r.channels),
                ]);
                if !r.image_size.is_multiple_of(32) {
                    return bad(
                        "vision.image_size",
                        format!(
                            "{} is not a multiple of 32 (the total stride)",
                            r.image_size
                        ),
                    );
                }
                if r.heads > 0 && !(32 * r.width).is_multiple_of(r.heads) {
                    return bad(
                        "vision.heads",
                        format!(
                            "{} heads do not divide the pool width {}",
                            r.heads,
                            32 * r.width
                        ),
                    );
                }
            }
        }
        match &self.text {
            TextTowerConfig::Clip(t) => {
                fields.extend([
                    ("text.vocab_size", t.vocab_size),
                    ("text.context_length", t.context_length),
                    ("text.width", t.width),
                    ("text.layers", t.layers),
                    ("text.heads", t.heads),
                    ("text.mlp_ratio", t.mlp_ratio),
                ]);
                if t.heads > 0 && !t.width.is_multiple_of(t.heads) {
                    return bad(
                        "text.heads",
                        format!("{} heads do not divide width {}", t.heads, t.width),
                    );
                }
            }
            TextTowerConfig::Bert(b) => {
                fields.extend([
                    ("text.vocab_size", b.vocab_size),
                    ("text.hidden_size", b.hidden_size),
                    ("text.layers", b.layers),
                    ("text.heads", b.heads),
                    ("text.intermediate_size", b.intermediate_size),
                    ("text.context_length", b.context_length),
                ]);
                if b.context_length > b.max_position_embeddings {
                    return bad(
                        "text.context_length",
                        format!(
                            "{} exceeds max_position_embeddings {}",
                            b.context_length, b.max_position_embeddings
                        ),
                    );
                }
                if b.heads > 0 && !b.hidden_size.is_multiple_of(b.heads) {
                    return bad(
                        "text.heads",
                        format!(
                            "{} heads do not divide hidden size {}",
                            b.heads, b.hidden_size
                        ),
                    );
                }
            }
        }
        for (field, value) in fields {
            if value == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        Ok(())
    }

    pub fn image_size(&self) -> usize {
        match &self.vision {
            ImageTowerConfig::Vit(v) => v.image_size,
            ImageTowerConfig::Resnet(r) => r.image_size,
        }
    }

    pub fn channels(&self) -> usize {
        match &self.vision {
            ImageTowerConfig::Vit(v) => v.channels,
            ImageTowerConfig::Resnet(r) => r.channels,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match &self.text {
            TextTowerConfig::Clip(t) => t.vocab_size,
            TextTowerConfig::Bert(b) => b.vocab_size,
        }
    }

    /// Whether the image tower's batch norms are synchronised across the image group.
    pub fn sync_batch_norm(&self) -> bool {
        matches!(&self.vision, ImageTowerConfig::Resnet(r) if r.sync_batch_norm)
    }

    pub fn is_locked(&self, tower: Tower) -> bool {
        self.locked.contains(&tower)
    }

    pub fn context_length(&self) -> usize {
        match &self.text {
            TextTowerConfig::Clip(t) => t.context_length,
            TextTowerConfig::Bert(b) => b.context_length,
        }
    }
}

/// A tower given inline (a table) or as a path to a tower file, relative to the model file.
fn resolve_tower<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    field: &str,
    model_path: &Path,
) -> Result<T> {
    match value {
        toml::Value::String(rel) => {
            let path = model_path.parent().unwrap_or(Path::new("")).join(&rel);
            read_toml(&path)
        }
        toml::Value::Table(t) => {
            T::deserialize(t).map_err(|e| Error::invalid(model_path, field, e.to_string()))
        }
        other => Err(Error::invalid(
            model_path,
            field,
            format!(
                "expected a table or a path to a tower file, found {}",
                other.type_str()
            ),
        )),
    }
}

impl VitConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch_size * self.patch_size
    }

    /// Width of what `ln_post` and `proj` see: the class token, or the pooler's output.
    pub fn pool_dim(&self, embed_dim: usize) -> usize {
        if self.attentional_pool {
            embed_dim
        } else {
            self.width
        }
    }
}
