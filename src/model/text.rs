//! CLIP's causal text transformer, pooled at each caption's end-of-text token.

use candle_core::Tensor;

use super::config::TextTransformerConfig;
use super::layers::{LayerNorm, ResidualBlock, Transformer};
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
        Ok(TextTower {
            cfg: cfg.clone(),
            token_embedding: pb.get(
                (cfg.vocab_size, w),
                "token_embedding.weight",
                Init::Normal(0.02),
            )?,
            positional_embedding: pb.get(
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
        let x = self.stem(tokens)?;
        let x = self.transformer.forward(&x, Some(&self.mask(&x)?))?;
        self.head(&x, eot)
    }

    /// Token and position embeddings: the blocks' input.
    pub fn stem(&self, tokens: &Tensor) -> Result<Tensor> {
        let (n, len) = tokens.dims2()?;
        let w = self.cfg.width;
        Ok(self
            .token_embedding
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((n, len, w))?
            .broadcast_add(&self.positional_embedding.narrow(0, 0, len)?)?)
    }

    /// The causal mask for the blocks' input `x`.
    pub fn mask(&self, x: &Tensor) -> Result<Tensor> {
        causal_mask(x.dim(1)?, x.dtype(), x.device())
    }

    pub fn blocks(&self) -> &[ResidualBlock] {
        self.transformer.blocks()
    }

    /// Final norm, the end-of-text token's state, projected.
    pub fn head(&self, x: &Tensor, eot: &Tensor) -> Result<Tensor> {
        let (n, len, w) = x.dims3()?;
        let x = self.ln_final.forward(x)?;
        // Row i·len + eot[i] of the flattened sequence is caption i's end-of-text state.
        let offsets: Vec<u32> = (0..n as u32).map(|i| i * len as u32).collect();
        let offsets = Tensor::from_vec(offsets, n, x.device())?;
        let rows = (offsets + eot.to_dtype(candle_core::DType::U32)?)?;
        let pooled = x.reshape((n * len, w))?.index_select(&rows, 0)?;
        Ok(pooled.matmul(&self.text_projection)?)
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
