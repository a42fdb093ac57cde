//! Training-ready building blocks. candle's fused LayerNorm and `softmax_last_dim` drop
//! gradients silently; the norm, the softmax, GELU and the bias add here are our own
//! fused ops with their own backward on the CPU ([`super::fused`]), plain ops elsewhere.
//!
//! Mixed precision follows torch.autocast's rules, as OpenCLIP's amp_bf16 runs: matrix
//! products (and their weights and biases) in bf16; norms, softmax and GELU computed in
//! f32 inside; embeddings, norm parameters and the residual stream in f32 (a bf16 branch
//! is added to the f32 stream). Under f32 every dtype is f32 and the casts are no-ops.

use candle_core::{DType, Tensor, D};

use super::params::{Init, ParamBuilder};
use crate::error::Result;

/// `y = x Wᵀ + b`, weights stored as PyTorch's `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(pb: &ParamBuilder, in_dim: usize, out_dim: usize, std: f64) -> Result<Self> {
        Ok(Linear {
            weight: pb.get((out_dim, in_dim), "weight", Init::Normal(std))?,
            bias: Some(pb.get(out_dim, "bias", Init::Zeros)?),
        })
    }

    /// Applies the layer to the last dimension of `x`, with one GEMM for all leading dims.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, self.bias.as_ref())
    }

    /// `x Wᵀ` only, for a caller that adds the bias in its own pass.
    pub fn forward_without_bias(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, None)
    }

    /// `stream + (x Wᵀ + b)` in the stream's dtype: a block's branch that ends in this
    /// layer, added to the residual stream. On a GPU the product, the bias add, the
    /// rounding and the residual add are one op (`fused::linear_onto`); on the CPU the
    /// bias rides in the GEMM.
    pub fn forward_onto(&self, x: &Tensor, stream: &Tensor) -> Result<Tensor> {
        match &self.bias {
            // One op on a GPU (`fused::linear_onto`): the product, the bias add, the
            // rounding and the residual add, with no product output kept for backward.
            Some(b) if !stream.device().is_cpu() => {
                let x = self.rows(x)?;
                let out = super::fused::linear_onto(
                    &stream.reshape((x.dim(0)?, self.weight.dim(0)?))?,
                    &x,
                    &self.weight,
                    b,
                )?;
                Ok(out.reshape(stream.dims())?)
            }
            _ => residual(stream, &self.forward(x)?),
        }
    }

    /// `x` as the product takes it: `[rows, in]`, all leading dims as rows, in the
    /// weight's dtype (bf16 under mixed precision).
    fn rows(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = x.dims().last().copied().unwrap_or(0);
        let rows = x.elem_count() / in_dim.max(1);
        Ok(x.to_dtype(self.weight.dtype())?.reshape((rows, in_dim))?)
    }

    fn apply(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let y = super::fused::linear(&self.rows(x)?, &self.weight, bias)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("non-scalar input") = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    /// PyTorch's default epsilon, as CLIP uses.
    pub fn new(pb: &ParamBuilder, dim: usize) -> Result<Self> {
        Self::with_eps(pb, dim, 1e-5)
    }

    /// Gain and bias in full precision (the norm runs in f32 under mixed precision).
    pub fn with_eps(pb: &ParamBuilder, dim: usize, eps: f32) -> Result<Self> {
        let pb = pb.full_precision();
        Ok(LayerNorm {
            weight: pb.get(dim, "weight", Init::Ones)?,
            bias: pb.get(dim, "bias", Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// The norm in `dtype`, that of the layer that reads it: what `forward` and a cast
    /// give, with no f32 output kept on a GPU ([`super::fused::layer_norm_to`]).
    pub fn forward_to(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        super::fused::layer_norm_to(x, &self.weight, &self.bias, self.eps, dtype)
    }
}

/// Softmax over the last dimension.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    super::fused::softmax_last_dim(x)
}

/// `x · w` in `w`'s dtype: a projection by a raw weight matrix (CLIP's `proj`,
/// `text_projection`) runs in its weight's dtype, whatever its input's.
pub fn project(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(w.dtype())?.matmul(w)?)
}

/// `stream + branch` in the stream's dtype: under mixed precision the residual stream
/// stays f32 and each block's bf16 output is added to it.
pub fn residual(stream: &Tensor, branch: &Tensor) -> Result<Tensor> {
    Ok((stream + branch.to_dtype(stream.dtype())?)?)
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?)
}

/// The query, key and value projections: packed as PyTorch's `nn.MultiheadAttention`
/// keeps them, or separate as BERT does (concatenated at each forward, one GEMM).
#[derive(Debug, Clone)]
pub enum QkvProjection {
    Packed(Linear),
    Separate(Linear, Linear, Linear),
}

impl QkvProjection {
    /// The query, key and value projections on their own (views of a packed weight).
    fn split(&self) -> Result<[Linear; 3]> {
        Ok(match self {
            QkvProjection::Packed(l) => {
                let width = l.weight.dim(0)? / 3;
                let part = |i: usize| -> Result<Linear> {
                    Ok(Linear {
                        weight: l.weight.narrow(0, i * width, width)?,
                        bias: l
                            .bias
                            .as_ref()
                            .map(|b| b.narrow(0, i * width, width))
                            .transpose()?,
                    })
                };
                [part(0)?, part(1)?, part(2)?]
            }
            QkvProjection::Separate(q, k, v) => [q.clone(), k.clone(), v.clone()],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            QkvProjection::Packed(l) => l.forward(x),
            QkvProjection::Separate(q, k, v) => {
                let cat = |f: fn(&Linear) -> Option<&Tensor>| -> Result<Option<Tensor>> {
                    Ok(match (f(q), f(k), f(v)) {
                        (Some(a), Some(b), Some(c)) => Some(Tensor::cat(&[a, b, c], 0)?),
                        _ => None,
                    })
                };
                let packed = Linear {
                    weight: cat(|l| Some(&l.weight))?.expect("weights"),
                    bias: cat(|l| l.bias.as_ref())?,
                };
                packed.forward(x)
            }
        }
    }
}

/// The token a sequence is pooled at after the last block: a ViT's class token (row 0),
/// or each caption's end-of-text token (`[n]` u32 positions).
#[derive(Debug, Clone, Copy)]
pub enum PooledToken<'a> {
    First,
    At(&'a Tensor),
}

impl PooledToken<'_> {
    /// `x` `[n, len, ...]` → `[n, ...]`: each sequence's row at its pooled token.
    pub fn select(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            PooledToken::First => Ok(x.narrow(1, 0, 1)?.squeeze(1)?),
            PooledToken::At(positions) => {
                let dims = x.dims();
                let (n, len) = (dims[0], dims[1]);
                let row = x.elem_count() / (n * len).max(1);
                // Row i·len + position[i] of the flattened sequences is sequence i's.
                let offsets: Vec<u32> = (0..n as u32).map(|i| i * len as u32).collect();
                let offsets = Tensor::from_vec(offsets, n, x.device())?;
                let rows = (offsets + positions.to_dtype(candle_core::DType::U32)?)?;
                let mut out_dims = dims.to_vec();
                out_dims.remove(1);
                Ok(x.reshape((n * len, row))?
                    .index_select(&rows, 0)?
                    .reshape(out_dims)?)
            }
        }
    }
}

/// Multi-head self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: QkvProjection,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    pub fn new(
        pb: &ParamBuilder,
        width: usize,
        heads: usize,
        in_std: f64,
        out_std: f64,
    ) -> Result<Self> {
        let in_proj = Linear {
            weight: pb.get((3 * width, width), "in_proj_weight", Init::Normal(in_std))?,
            bias: Some(pb.get(3 * width, "in_proj_bias", Init::Zeros)?),
        };
        let out_proj = Linear::new(&pb.pp("out_proj"), width, width, out_std)?;
        Ok(Attention {
            qkv: QkvProjection::Packed(in_proj),
            out_proj,
            heads,
        })
    }

    pub fn from_parts(qkv: QkvProjection, out_proj: Linear, heads: usize) -> Self {
        Attention {
            qkv,
            out_proj,
            heads,
        }
    }

    /// `x`: `[batch, len, width]`; `mask`: additive, broadcastable to `[batch, 1, len,
    /// len]` (−∞ where attention is barred): `[len, len]` causal, `[batch, 1, 1, len]` padding.
    /// Returns `stream + out_proj(attention(x))`, the residual add fused with the output
    /// projection's bias ([`Linear::forward_onto`]).
    pub fn forward_onto(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        stream: &Tensor,
    ) -> Result<Tensor> {
        self.out_proj
            .forward_onto(&self.heads_merged(x, mask)?, stream)
    }

    /// The dtype its input projections compute in (their weights'), which a norm before
    /// them may write in directly.
    pub fn input_dtype(&self) -> DType {
        match &self.qkv {
            QkvProjection::Packed(l) | QkvProjection::Separate(l, _, _) => l.weight.dtype(),
        }
    }

    /// The heads' outputs merged, `[batch, len, width]`, before the output projection.
    fn heads_merged(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        super::fused::attention(&self.qkv.forward(x)?, self.heads, mask)
    }

    /// The output at the pooled token only, `[n, width]`: every token's keys and values,
    /// one query per sequence (the other queries' outputs would be thrown away). The three
    /// projections run apart, on views of the packed weight: the query at the pooled token
    /// only, and no slices of a packed `[n, len, 3·width]` output, whose gradients would
    /// each be a zero-padded tensor of that full size.
    pub fn forward_pooled(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pooled: PooledToken,
    ) -> Result<Tensor> {
        let (n, len, width) = x.dims3()?;
        let (h, d) = (self.heads, width / self.heads);
        let [q_proj, k_proj, v_proj] = self.qkv.split()?;
        let q = q_proj.forward(&pooled.select(x)?)?.reshape((n, h, 1, d))?;
        let head_major = |proj: &Linear| -> Result<Tensor> {
            Ok(proj
                .forward(x)?
                .reshape((n, len, h, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (k, v) = (head_major(&k_proj)?, head_major(&v_proj)?);
        let mut scores = super::fused::attention_scores(&q, &k, 1.0 / (d as f64).sqrt())?; // [n, h, 1, len]
        if let Some(m) = mask {
            // The pooled query's row of the mask, per sequence: [n, 1, 1, len].
            let rows = pooled.select(&m.broadcast_as((n, 1, len, len))?.squeeze(1)?)?;
            scores =
                scores.broadcast_add(&rows.reshape((n, 1, 1, len))?.to_dtype(scores.dtype())?)?;
        }
        let mixed = super::fused::attention_mix(&softmax(&scores)?, &v)?; // [n, h, 1, d]
        self.out_proj.forward(&mixed.reshape((n, width))?)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    act: Activation,
}

impl Mlp {
    /// `stream + c_proj(act(c_fc(x)))`, the residual add fused with the second layer's
    /// bias ([`Linear::forward_onto`]).
    pub fn forward_onto(&self, x: &Tensor, stream: &Tensor) -> Result<Tensor> {
        self.c_proj.forward_onto(&self.hidden(x)?, stream)
    }

    /// The dtype its first layer computes in (its weight's).
    pub fn input_dtype(&self) -> DType {
        self.c_fc.weight.dtype()
    }

    /// The activation of the first layer.
    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        match (self.act, &self.c_fc.bias) {
            // The bias add and the activation in one pass (and their gradients in one).
            (Activation::Gelu, Some(b)) => {
                super::fused::gelu_erf_bias(&self.c_fc.forward_without_bias(x)?, b)
            }
            _ => self.act.forward(&self.c_fc.forward(x)?),
        }
    }
}

/// The MLP's nonlinearity: exact GELU (OpenCLIP's default), or OpenAI's `x·σ(1.702x)`
/// ("quick GELU") that the original CLIP checkpoints were trained with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Gelu,
    QuickGelu,
}

impl Activation {
    /// Half-precision inputs are computed in f32 and rounded back once.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => super::fused::gelu_erf(x)?,
            Activation::QuickGelu => super::fused::quick_gelu(x)?,
        })
    }
}

/// Pre-norm residual block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl ResidualBlock {
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x =
            self.attn
                .forward_onto(&self.ln_1.forward_to(x, self.attn.input_dtype())?, mask, x)?;
        self.mlp
            .forward_onto(&self.ln_2.forward_to(&x, self.mlp.input_dtype())?, &x)
    }

    /// The block's output at the pooled token only, `[n, width]`: the same values as
    /// `pooled.select(&self.forward(x, mask)?)`, without the attention output, MLP and
    /// norms of the tokens a tower's last block would compute and then drop.
    pub fn forward_pooled(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pooled: PooledToken,
    ) -> Result<Tensor> {
        let attended = self
            .attn
            .forward_pooled(&self.ln_1.forward(x)?, mask, pooled)?;
        let x = residual(&pooled.select(x)?, &attended)?;
        self.mlp.forward_onto(&self.ln_2.forward(&x)?, &x)
    }
}

/// A stack of residual blocks, initialised as OpenCLIP's `Transformer`: attention
/// projections with std `width^-0.5`, output projections scaled down by `(2·layers)^-0.5`.
#[derive(Debug, Clone)]
pub struct Transformer {
    blocks: Vec<ResidualBlock>,
}

impl Transformer {
    pub fn new(
        pb: &ParamBuilder,
        width: usize,
        layers: usize,
        heads: usize,
        mlp_ratio: usize,
        act: Activation,
    ) -> Result<Self> {
        let attn_std = (width as f64).powf(-0.5);
        let proj_std = attn_std * ((2 * layers) as f64).powf(-0.5);
        let fc_std = ((2 * width) as f64).powf(-0.5);
        let blocks = (0..layers)
            .map(|i| {
                let pb = pb.pp("resblocks").pp(i);
                Ok(ResidualBlock {
                    ln_1: LayerNorm::new(&pb.pp("ln_1"), width)?,
                    attn: Attention::new(&pb.pp("attn"), width, heads, attn_std, proj_std)?,
                    ln_2: LayerNorm::new(&pb.pp("ln_2"), width)?,
                    mlp: Mlp {
                        c_fc: Linear::new(
                            &pb.pp("mlp").pp("c_fc"),
                            width,
                            mlp_ratio * width,
                            fc_std,
                        )?,
                        c_proj: Linear::new(
                            &pb.pp("mlp").pp("c_proj"),
                            mlp_ratio * width,
                            width,
                            proj_std,
                        )?,
                        act,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Transformer { blocks })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for b in &self.blocks {
            x = b.forward(&x, mask)?;
        }
        Ok(x)
    }

    pub fn blocks(&self) -> &[ResidualBlock] {
        &self.blocks
    }
}
