//! CLIP's ViT image encoder. The patch embedding is a reshape and one matmul: the same maths
//! as CLIP's stride-p convolution (weights kept in its `[width, C, p, p]` layout), without
//! candle's slow CPU conv backward.

use candle_core::Tensor;

use super::config::VitConfig;
use super::layers::{project, softmax, LayerNorm, Linear, PooledToken, ResidualBlock, Transformer};
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
    /// OpenCLIP's attentional pooler, when configured; `ln_post` and `proj` then act on its
    /// output (`embed_dim` wide) instead of the class token (`width` wide).
    attn_pool: Option<AttentionalPooler>,
    ln_post: LayerNorm,
    proj: Tensor,
}

/// Learned queries cross-attending to the normalised tokens (OpenCLIP's
/// `AttentionalPooler`, as its CoCa setup uses it: the first query's output is pooled).
#[derive(Debug, Clone)]
struct AttentionalPooler {
    query: Tensor,
    ln_q: LayerNorm,
    ln_k: LayerNorm,
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    /// The three projections' biases, packed as PyTorch keeps them.
    in_proj_bias: Tensor,
    out_proj: Linear,
    heads: usize,
}

impl AttentionalPooler {
    fn new(
        pb: &ParamBuilder,
        d_model: usize,
        context: usize,
        heads: usize,
        queries: usize,
    ) -> Result<Self> {
        let a = pb.pp("attn");
        let std = (d_model as f64).powf(-0.5);
        Ok(AttentionalPooler {
            // Learned inputs, as embeddings: full precision.
            query: pb
                .full_precision()
                .get((queries, d_model), "query", Init::Normal(1.0))?,
            ln_q: LayerNorm::new(&pb.pp("ln_q"), d_model)?,
            ln_k: LayerNorm::new(&pb.pp("ln_k"), context)?,
            q_proj: a.get((d_model, d_model), "q_proj_weight", Init::Normal(std))?,
            k_proj: a.get((d_model, context), "k_proj_weight", Init::Normal(std))?,
            v_proj: a.get((d_model, context), "v_proj_weight", Init::Normal(std))?,
            in_proj_bias: a.get(3 * d_model, "in_proj_bias", Init::Zeros)?,
            out_proj: Linear::new(&a.pp("out_proj"), d_model, d_model, std)?,
            heads,
        })
    }

    /// `x` `[n, len, context]` → `[n, queries, d_model]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, len, _) = x.dims3()?;
        let (queries, d_model) = self.query.dims2()?;
        let h = self.heads;
        let d = d_model / h;
        let x = self.ln_k.forward(x)?;
        // Sliced at every forward, so the optimizer's updates of the packed bias show.
        let proj = |w: &Tensor, i: usize| Linear {
            weight: w.clone(),
            bias: self.in_proj_bias.narrow(0, i * d_model, d_model).ok(),
        };
        let q = proj(&self.q_proj, 0).forward(&self.ln_q.forward(&self.query)?)?; // [queries, d_model]
        let q = q
            .reshape((1, queries, h, d))?
            .transpose(1, 2)?
            .broadcast_as((n, h, queries, d))?;
        let heads =
            |t: Tensor| -> Result<Tensor> { Ok(t.reshape((n, len, h, d))?.transpose(1, 2)?) };
        let k = heads(proj(&self.k_proj, 1).forward(&x)?)?;
        let v = heads(proj(&self.v_proj, 2).forward(&x)?)?;
        let flat = |t: Tensor, rows: usize| -> Result<Tensor> {
            Ok(t.contiguous()?.reshape((n * h, rows, d))?)
        };
        let (q, k, v) = (flat(q, queries)?, flat(k, len)?, flat(v, len)?);
        let scores = super::fused::attention_scores(&q, &k, 1.0 / (d as f64).sqrt())?;
        let out = super::fused::attention_mix(&softmax(&scores)?, &v)?;
        let out = out
            .reshape((n, h, queries, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, queries, d_model))?;
        self.out_proj.forward(&out)
    }
}

impl VisionTower {
    /// `pb` should be prefixed `visual` for OpenCLIP's parameter names.
    pub fn new(pb: &ParamBuilder, cfg: &VitConfig, embed_dim: usize) -> Result<Self> {
        let w = cfg.width;
        let scale = (w as f64).powf(-0.5);
        let p = cfg.patch_size;
        // Embeddings in full precision: the residual stream starts from them.
        let embeddings = pb.full_precision();
        Ok(VisionTower {
            cfg: cfg.clone(),
            conv1: pb.get((w, cfg.channels, p, p), "conv1.weight", Init::Normal(scale))?,
            class_embedding: embeddings.get(w, "class_embedding", Init::Normal(scale))?,
            positional_embedding: embeddings.get(
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
            attn_pool: if cfg.attentional_pool {
                Some(AttentionalPooler::new(
                    &pb.pp("attn_pool"),
                    embed_dim,
                    w,
                    cfg.attn_pooler_heads,
                    cfg.attn_pooler_queries,
                )?)
            } else {
                None
            },
            ln_post: LayerNorm::new(&pb.pp("ln_post"), cfg.pool_dim(embed_dim))?,
            proj: pb.get(
                (cfg.pool_dim(embed_dim), embed_dim),
                "proj",
                Init::Normal(scale),
            )?,
        })
    }

    /// `images`: `[n, channels, size, size]`, already normalised. Returns `[n, embed_dim]`,
    /// not L2-normalised.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = self.stem(images)?;
        for block in self.token_blocks() {
            x = block.forward(&x, None)?;
        }
        self.head(&x)
    }

    /// Patch embedding, class token, positions and the pre-norm: the blocks' input.
    pub fn stem(&self, images: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let images = images.to_dtype(self.conv1.dtype())?;
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
        // The fused linear computes no gradient for the pixels (nothing needs it).
        let x = super::fused::linear(&patches, &weight, None)?
            .reshape((n, gh * gw, c.width))?
            .to_dtype(self.class_embedding.dtype())?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c.width))?
            .broadcast_as((n, 1, c.width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)?;
        self.ln_pre.forward(&x)
    }

    /// The blocks that run on every token: all but the last, which [`Self::head`] runs at
    /// the class token only (all of them before an attentional pooler, which reads every
    /// token).
    pub fn token_blocks(&self) -> &[ResidualBlock] {
        let blocks = self.transformer.blocks();
        match (&self.attn_pool, blocks.split_last()) {
            (None, Some((_, rest))) => rest,
            _ => blocks,
        }
    }

    /// From [`Self::token_blocks`]' output: the last block at the class token (or the
    /// attentional pooler's first query), normalised and projected.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let pooled = match (&self.attn_pool, self.transformer.blocks().last()) {
            (Some(pool), _) => PooledToken::First.select(&pool.forward(x)?)?,
            (None, Some(last)) => last.forward_pooled(x, None, PooledToken::First)?,
            (None, None) => PooledToken::First.select(x)?,
        };
        project(&self.ln_post.forward(&pooled)?, &self.proj)
    }
}
