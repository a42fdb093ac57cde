//! Tower configurations, read from `configs/*.toml`, and the sizes that follow from them.

use std::path::Path;

use serde::Deserialize;

use crate::error::{parse_toml, read_toml, Error, Result};

/// A CLIP-style ViT: class token, learned positions, pre-norm blocks, class-token pooling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub channels: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: usize,
}

/// CLIP's causal text transformer, pooled at the end-of-text token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub context_length: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    pub embed_dim: usize,
    pub vision: VisionConfig,
    pub text: TextConfig,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}

/// The model `mmpipe train` uses when given none.
pub const DEFAULT_TINY: &str = include_str!("../../configs/clip-tiny.toml");

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let c: ClipConfig = read_toml(path)?;
        c.validate(path)?;
        Ok(c)
    }

    pub fn from_str(text: &str, origin: &Path) -> Result<Self> {
        let c: ClipConfig = parse_toml(text, origin)?;
        c.validate(origin)?;
        Ok(c)
    }

    pub fn default_tiny() -> Self {
        Self::from_str(DEFAULT_TINY, Path::new("configs/clip-tiny.toml"))
            .expect("the built-in model config is valid")
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::invalid(path, field, msg));
        let v = &self.vision;
        let t = &self.text;
        for (field, value) in [
            ("embed_dim", self.embed_dim),
            ("vision.image_size", v.image_size),
            ("vision.patch_size", v.patch_size),
            ("vision.channels", v.channels),
            ("vision.width", v.width),
            ("vision.layers", v.layers),
            ("vision.heads", v.heads),
            ("vision.mlp_ratio", v.mlp_ratio),
            ("text.vocab_size", t.vocab_size),
            ("text.context_length", t.context_length),
            ("text.width", t.width),
            ("text.layers", t.layers),
            ("text.heads", t.heads),
            ("text.mlp_ratio", t.mlp_ratio),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return bad(
                "vision.patch_size",
                format!(
                    "patch size {} does not divide image size {}",
                    v.patch_size, v.image_size
                ),
            );
        }
        if !v.width.is_multiple_of(v.heads) {
            return bad(
                "vision.heads",
                format!("{} heads do not divide width {}", v.heads, v.width),
            );
        }
        if !t.width.is_multiple_of(t.heads) {
            return bad(
                "text.heads",
                format!("{} heads do not divide width {}", t.heads, t.width),
            );
        }
        Ok(())
    }
}

/// Parameters of one pre-norm transformer block of width `w` and MLP ratio `r`.
fn block_params(w: usize, r: usize) -> usize {
    let ln = 2 * w;
    let attn = w * 3 * w + 3 * w + w * w + w;
    let mlp = w * r * w + r * w + r * w * w + w;
    2 * ln + attn + mlp
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    pub fn patch_dim(&self) -> usize {
        self.channels * self.patch_size * self.patch_size
    }

    pub fn num_params(&self, embed_dim: usize) -> usize {
        let w = self.width;
        self.patch_dim() * w          // patch embedding (no bias, as CLIP)
            + w                       // class token
            + (self.num_patches() + 1) * w
            + 2 * w                   // ln_pre
            + self.layers * block_params(w, self.mlp_ratio)
            + 2 * w                   // ln_post
            + w * embed_dim
    }
}

impl TextConfig {
    pub fn num_params(&self, embed_dim: usize) -> usize {
        let w = self.width;
        self.vocab_size * w
            + self.context_length * w
            + self.layers * block_params(w, self.mlp_ratio)
            + 2 * w                   // ln_final
            + w * embed_dim
    }
}
