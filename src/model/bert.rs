//! A trainable BERT encoder (HF `BertModel` layout and names), pooled by mean over the
//! attention mask or by the [CLS] token, projected into the shared embedding. Post-norm
//! blocks, exact (erf) GELU, absolute positions, token type 0 for every token.
//!
//! Names follow OpenCLIP's HF text tower: the HF model under `text.transformer.` and the
//! projection as `text.proj.weight`, so a BERT checkpoint loads with its own names under
//! that prefix (see `checkpoint::load_hf_bert`).

use candle_core::{DType, Tensor, D};

use super::config::{BertConfig, BertPooling};
use super::layers::{project, Activation, Attention, LayerNorm, Linear, QkvProjection};
use super::params::{Init, ParamBuilder};
use crate::error::Result;

const STD: f64 = 0.02;

#[derive(Debug, Clone)]
struct BertLayer {
    attention: Attention,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl BertLayer {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self
            .attention_norm
            .forward(&self.attention.forward_onto(x, Some(mask), x)?)?;
        let hidden = Activation::Gelu.forward(&self.intermediate.forward(&x)?)?;
        self.output_norm
            .forward(&self.output.forward_onto(&hidden, &x)?)
    }
}

#[derive(Debug, Clone)]
pub struct BertTower {
    cfg: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<BertLayer>,
    /// HF's pooler (dense + tanh on [CLS]); only with CLS pooling.
    pooler: Option<Linear>,
    proj: Tensor,
}

impl BertTower {
    /// `pb` should be prefixed `text` for OpenCLIP's names.
    pub fn new(pb: &ParamBuilder, cfg: &BertConfig, embed_dim: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let t = pb.pp("transformer");
        let eps = 1e-12;
        let emb = t.pp("embeddings");
        let linear = |pb: &ParamBuilder, i, o| Linear::new(pb, i, o, STD);
        // Embeddings in full precision: the residual stream starts from them.
        let embeddings = emb.full_precision();
        let layers = (0..cfg.layers)
            .map(|i| {
                let l = t.pp("encoder.layer").pp(i);
                let a = l.pp("attention");
                let qkv = QkvProjection::Separate(
                    linear(&a.pp("self.query"), h, h)?,
                    linear(&a.pp("self.key"), h, h)?,
                    linear(&a.pp("self.value"), h, h)?,
                );
                Ok(BertLayer {
                    attention: Attention::from_parts(
                        qkv,
                        linear(&a.pp("output.dense"), h, h)?,
                        cfg.heads,
                    ),
                    attention_norm: LayerNorm::with_eps(&a.pp("output.LayerNorm"), h, eps)?,
                    intermediate: linear(&l.pp("intermediate.dense"), h, cfg.intermediate_size)?,
                    output: linear(&l.pp("output.dense"), cfg.intermediate_size, h)?,
                    output_norm: LayerNorm::with_eps(&l.pp("output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<_>>()?;
        let pooler = match (cfg.pooling, cfg.pooler) {
            (BertPooling::Cls, true) => Some(linear(&t.pp("pooler.dense"), h, h)?),
            _ => None,
        };
        Ok(BertTower {
            cfg: cfg.clone(),
            word_embeddings: embeddings.get(
                (cfg.vocab_size, h),
                "word_embeddings.weight",
                Init::Normal(STD),
            )?,
            position_embeddings: embeddings.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
                Init::Normal(STD),
            )?,
            token_type_embeddings: embeddings.get(
                (cfg.type_vocab_size, h),
                "token_type_embeddings.weight",
                Init::Normal(STD),
            )?,
            embedding_norm: LayerNorm::with_eps(&emb.pp("LayerNorm"), h, eps)?,
            layers,
            pooler,
            proj: pb.get(
                (embed_dim, h),
                "proj.weight",
                Init::Normal((h as f64).powf(-0.5)),
            )?,
        })
    }

    /// The encoder's last hidden states `[n, len, hidden]` for `tokens` `[n, len]` with
    /// attention `mask` `[n, len]` (1 real, 0 padding).
    pub fn hidden_states(&self, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut x = self.stem(tokens)?;
        let additive = self.additive_mask(mask, &x)?;
        for layer in &self.layers {
            x = layer.forward(&x, &additive)?;
        }
        Ok(x)
    }

    /// The word-embedding table `[vocab, hidden]`.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings
    }

    /// Word, position and type embeddings, normalised: the layers' input.
    pub fn stem(&self, tokens: &Tensor) -> Result<Tensor> {
        let (n, len) = tokens.dims2()?;
        let h = self.cfg.hidden_size;
        let x = super::fused::embedding(&self.word_embeddings, &tokens.flatten_all()?)?
            .reshape((n, len, h))?
            .broadcast_add(&self.position_embeddings.narrow(0, 0, len)?)?
            .broadcast_add(&self.token_type_embeddings.narrow(0, 0, 1)?)?;
        self.embedding_norm.forward(&x)
    }

    /// Padding keys get −∞: exp(−∞) = 0, so they take no attention and no gradient.
    pub fn additive_mask(&self, mask: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (n, len) = mask.dims2()?;
        let keep = mask.to_dtype(DType::U8)?.reshape((n, 1, 1, len))?;
        let zeros = Tensor::zeros((n, 1, 1, len), x.dtype(), x.device())?;
        let barred =
            Tensor::full(f32::NEG_INFINITY, (n, 1, 1, len), x.device())?.to_dtype(x.dtype())?;
        Ok(keep.where_cond(&zeros, &barred)?)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i` on `x` with the additive mask.
    pub fn layer(&self, i: usize, x: &Tensor, additive: &Tensor) -> Result<Tensor> {
        self.layers[i].forward(x, additive)
    }

    /// Pooling (and HF's pooler) and the projection, from the last hidden states.
    pub fn head(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        project(&self.pool(x, mask)?, &self.proj.t()?)
    }

    fn pool(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self.cfg.pooling {
            BertPooling::Mean => {
                let m = mask.to_dtype(x.dtype())?.unsqueeze(D::Minus1)?;
                Ok(x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?)
            }
            BertPooling::Cls => {
                let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
                match &self.pooler {
                    Some(p) => Ok(p.forward(&cls)?.tanh()?),
                    None => Ok(cls),
                }
            }
        }
    }

    /// The pooled sentence representation `[n, hidden]`, before the projection.
    pub fn pooled(&self, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.pool(&self.hidden_states(tokens, mask)?, mask)
    }

    /// Features `[n, embed_dim]`, not L2-normalised.
    pub fn forward(&self, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.head(&self.hidden_states(tokens, mask)?, mask)
    }
}
