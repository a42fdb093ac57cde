//! CLIP's causal text transformer, pooled at each caption's end-of-text token.

use candle_core::Tensor;

use super::config::TextTransformerConfig;
use super::layers::{project, LayerNorm, PooledToken, ResidualBlock, Transformer};
use super::params::{Init, ParamBuilder};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct TextTower {
    cfg: TextTransformerConfig,
    token_embedding: Tensor,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: LayerNorm,
    text_projection: Tensor,
}

impl TextTower {
    /// `pb` unprefixed: OpenCLIP keeps the text tower's names at the top level.
    pub fn new(pb: &ParamBuilder, cfg: &TextTransformerConfig, embed_dim: usize) -> Result<Self> {
        let w = cfg.width;
        // Embeddings in full precision: the residual stream starts from them.
        let embeddings = pb.full_precision();
        Ok(TextTower {
            cfg: cfg.clone(),
            token_embedding: embeddings.get(
                (cfg.vocab_size, w),
                "token_embedding.weight",
                Init::Normal(0.02),
            )?,
            positional_embedding: embeddings.get(
                (cfg.context_length, w),
                "positional_embedding",
                Init::Normal(0.01),
            )?,
            transformer: Transformer::new(
                &pb.pp("transformer"),
                w,
                cfg.layers,
                cfg.heads,
                cfg.mlp_ratio,
                cfg.act,
            )?,
            ln_final: LayerNorm::new(&pb.pp("ln_final"), w)?,
            text_projection: pb.get(
                (w, embed_dim),
                "text_projection",
                Init::Normal((w as f64).powf(-0.5)),
            )?,
        })
    }

    /// `tokens`: `[n, context_length]` u32 ids; `eot`: `[n]` u32, the position of each
    /// caption's end-of-text token. Returns `[n, embed_dim]`, not L2-normalised.
    pub fn forward(&self, tokens: &Tensor, eot: &Tensor) -> Result<Tensor> {
        let mut x = self.stem(tokens)?;
        let mask = self.mask(&x)?;
        for block in self.token_blocks() {
            x = block.forward(&x, Some(&mask))?;
        }
        self.head(&x, eot)
    }

    /// The token-embedding table `[vocab, width]`.
    pub fn token_embedding(&self) -> &Tensor {
        &self.token_embedding
    }

    /// Token and position embeddings: the blocks' input.
    pub fn stem(&self, tokens: &Tensor) -> Result<Tensor> {
        let (n, len) = tokens.dims2()?;
        let w = self.cfg.width;
        Ok(
            super::fused::embedding(&self.token_embedding, &tokens.flatten_all()?)?
                .reshape((n, len, w))?
                .broadcast_add(&self.positional_embedding.narrow(0, 0, len)?)?,
        )
    }

    /// The causal mask for the blocks' input `x`.
    pub fn mask(&self, x: &Tensor) -> Result<Tensor> {
        causal_mask(x.dim(1)?, x.dtype(), x.device())
    }

    /// The blocks that run on every token: all but the last, which [`Self::head`] runs at
    /// the end-of-text token only.
    pub fn token_blocks(&self) -> &[ResidualBlock] {
        let blocks = self.transformer.blocks();
        blocks.split_last().map_or(blocks, |(_, rest)| rest)
    }

    /// From [`Self::token_blocks`]' output: the last block at each caption's end-of-text
    /// token, the final norm, the projection.
    pub fn head(&self, x: &Tensor, eot: &Tensor) -> Result<Tensor> {
        let pooled = PooledToken::At(eot);
        let x = match self.transformer.blocks().last() {
            Some(last) => last.forward_pooled(x, Some(&self.mask(x)?), pooled)?,
            None => pooled.select(x)?,
        };
        project(&self.ln_final.forward(&x)?, &self.text_projection)
    }
}

/// Additive mask: 0 on and below the diagonal, −∞ above (a token sees only earlier ones).
fn causal_mask(
    len: usize,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let rows = Tensor::arange(0u32, len as u32, device)?.reshape((len, 1))?;
    let cols = Tensor::arange(0u32, len as u32, device)?.reshape((1, len))?;
    let future = cols.broadcast_gt(&rows)?;
    let zeros = Tensor::zeros((len, len), dtype, device)?;
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (len, len), device)?.to_dtype(dtype)?;
    Ok(future.where_cond(&neg_inf, &zeros)?)
}
