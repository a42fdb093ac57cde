//! CLIP's ViT image encoder. The patch embedding is a reshape and one matmul: the same maths
//! as CLIP's stride-p convolution (weights kept in its `[width, C, p, p]` layout), without
//! candle's slow CPU conv backward.

use candle_core::Tensor;

use super::config::VitConfig;
use super::layers::{LayerNorm, ResidualBlock, Transformer};
use super::params::{Init, ParamBuilder};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct VisionTower {
    cfg: VitConfig,
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    transformer: Transformer,
    ln_post: LayerNorm,
    proj: Tensor,
}

impl VisionTower {
    /// `pb` should be prefixed `visual` for OpenCLIP's parameter names.
    pub fn new(pb: &ParamBuilder, cfg: &VitConfig, embed_dim: usize) -> Result<Self> {
        let w = cfg.width;
        let scale = (w as f64).powf(-0.5);
        let p = cfg.patch_size;
        Ok(VisionTower {
            cfg: cfg.clone(),
            conv1: pb.get((w, cfg.channels, p, p), "conv1.weight", Init::Normal(scale))?,
            class_embedding: pb.get(w, "class_embedding", Init::Normal(scale))?,
            positional_embedding: pb.get(
                (cfg.num_patches() + 1, w),
                "positional_embedding",
                Init::Normal(scale),
            )?,
            ln_pre: LayerNorm::new(&pb.pp("ln_pre"), w)?,
            transformer: Transformer::new(
                &pb.pp("transformer"),
                w,
                cfg.layers,
                cfg.heads,
                cfg.mlp_ratio,
                cfg.act,
            )?,
            ln_post: LayerNorm::new(&pb.pp("ln_post"), w)?,
            proj: pb.get((w, embed_dim), "proj", Init::Normal(scale))?,
        })
    }

    /// `images`: `[n, channels, size, size]`, already normalised. Returns `[n, embed_dim]`,
    /// not L2-normalised.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let x = self.transformer.forward(&self.stem(images)?, None)?;
        self.head(&x)
    }

    /// Patch embedding, class token, positions and the pre-norm: the blocks' input.
    pub fn stem(&self, images: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let images = images.to_dtype(self.proj.dtype())?;
        let (n, ch, hgt, wid) = images.dims4()?;
        let p = c.patch_size;
        let (gh, gw) = (hgt / p, wid / p);
        // [n, C, gh, p, gw, p] -> [n, gh, gw, C, p, p]: each patch flattened as conv1 sees it.
        let patches = images
            .reshape((n, ch, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n * gh * gw, c.patch_dim()))?;
        let weight = self.conv1.reshape((c.width, c.patch_dim()))?;
        let x = patches
            .matmul(&weight.t()?)?
            .reshape((n, gh * gw, c.width))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c.width))?
            .broadcast_as((n, 1, c.width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)?;
        self.ln_pre.forward(&x)
    }

    pub fn blocks(&self) -> &[ResidualBlock] {
        self.transformer.blocks()
    }

    /// The class token's final state, normalised and projected.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let pooled = self.ln_post.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(pooled.matmul(&self.proj)?)
    }
}
