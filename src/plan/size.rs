//! The sizes that follow from a model config, per sample: parameters, forward FLOPs and
//! activation memory, for the planner's cost model.
//!
//! FLOP convention: a multiply-add counts as 2 FLOPs, and only matrix products and
//! convolutions are counted (norms, softmax, activations are ignored). This reproduces
//! OpenCLIP's published profile (`docs/model_profile.csv`, from fvcore) to within 0.1%.

use crate::comm::sparse_rows_elems;
use crate::model::config::{
    BertConfig, ClipConfig, ImageTowerConfig, ResNetConfig, TextTowerConfig, TextTransformerConfig,
    VitConfig,
};
use crate::topology::Tower;

impl ClipConfig {
    /// The sizes (parameters, FLOPs, activations) of `tower`.
    pub fn tower_size(&self, tower: Tower) -> &dyn TowerSize {
        match tower {
            Tower::Image => self.vision.size(),
            Tower::Text => self.text.size(),
        }
    }
}

/// Sizes of one tower, per sample. Multiply-adds count 2 FLOPs (see the module docs).
pub trait TowerSize {
    /// Short name for tables ("vit-b/16"-like descriptions are the user's file names).
    fn family(&self) -> &'static str;
    fn num_params(&self, embed_dim: usize) -> usize;
    /// Of those, the ones the tower reads in full precision under mixed precision (no
    /// bf16 working copy: embeddings, norms' gains and biases, learned queries); the others
    /// (matrices of products and their biases) have one.
    fn full_precision_params(&self, embed_dim: usize) -> usize;
    fn forward_flops(&self, embed_dim: usize) -> f64;
    /// The forward FLOPs mmpipe runs: fewer than [`Self::forward_flops`] where the last
    /// block runs at the pooled token only (a ViT pooled at its class token, CLIP's text
    /// tower), since the other tokens' outputs of that block are never used.
    fn executed_forward_flops(&self, embed_dim: usize) -> f64 {
        self.forward_flops(embed_dim)
    }
    /// Activation elements kept for backward, per sample, in the dtype the tower computes
    /// in (bf16 under mixed precision); the f32 residual stream is
    /// [`Self::stream_activation_elems`]. A transformer layer keeps what mmpipe's block
    /// leaves in the graph (candle keeps every op output a later op took in, until
    /// backward), `16·s·h` of them: the first norm's output (s·h), the packed projections
    /// (3), the attention's output (1), the output projection's (1), the second norm's
    /// (1), the MLP's hidden layer before and after its activation (4 + 4), its second
    /// layer's output (1); and attention's probabilities, `2.5·a·s²` as Korthikanti et al.
    /// 2022 count them ("Reducing activation recomputation"). With checkpointing one layer
    /// is live at a time. ResNets keep three tensors (conv, norm, activation outputs) per
    /// convolution, or stage inputs when checkpointing.
    ///
    /// `scores_kept`: attention keeps its probabilities for backward (the `2.5·a·s²`
    /// term); flash attention keeps one statistic a query row instead, and the term goes.
    fn activation_elems(&self, checkpointing: bool, scores_kept: bool) -> f64 {
        self.transformer_dims().map_or(0.0, |d| {
            let (s, w, layers) = (d.tokens as f64, d.width as f64, d.layers as f64);
            let scores = if scores_kept {
                2.5 * d.heads as f64 * s * s
            } else {
                0.0
            };
            let full_layer = 16.0 * s * w + scores;
            if checkpointing {
                full_layer
            } else {
                layers * full_layer
            }
        })
    }
    /// Activation elements kept in f32 whatever the tower computes in, per sample: a
    /// transformer's residual stream, after each of a layer's two residual adds (`2·s·h`
    /// a layer), or with checkpointing each layer's input and one live layer's two.
    fn stream_activation_elems(&self, checkpointing: bool) -> f64 {
        self.transformer_dims().map_or(0.0, |d| {
            let (sw, layers) = ((d.tokens * d.width) as f64, d.layers as f64);
            if checkpointing {
                layers * sw + 2.0 * sw
            } else {
                layers * 2.0 * sw
            }
        })
    }
    /// Of [`Self::activation_elems`], those a GPU does not keep: a transformer layer's two
    /// products before a residual add (`s·h` each), which the GPU's one-op linear layer
    /// onto the stream (`fused::linear_onto`) computes into a buffer of its own.
    fn branch_activation_elems(&self, checkpointing: bool) -> f64 {
        self.transformer_dims().map_or(0.0, |d| {
            let (sw, layers) = ((d.tokens * d.width) as f64, d.layers as f64);
            if checkpointing {
                2.0 * sw
            } else {
                layers * 2.0 * sw
            }
        })
    }
    /// A transformer tower's tokens, width, heads and layers, from which its activation
    /// counts follow; None for other towers (which count their own).
    fn transformer_dims(&self) -> Option<TransformerDims> {
        None
    }
    /// The values per attention head, for a transformer (whether flash attention takes
    /// it); None for other towers.
    fn attention_head_width(&self) -> Option<usize> {
        self.transformer_dims().map(|d| d.width / d.heads.max(1))
    }
    /// `(rows, width, tokens per sample)` of the token-embedding table, read by a row
    /// lookup only (so its gradient is zero outside the batch's tokens' rows); None for
    /// image towers.
    fn token_table(&self) -> Option<(usize, usize, usize)> {
        None
    }
    /// Elements of a rank's gradient all-reduce when the group's ranks look up `samples`
    /// samples' tokens in a step, as `comm::all_reduce_sum_sparse_rows` sends them: the
    /// token table as a 0/1 row mask and the rows in use (here at most one per token, an
    /// upper bound: real captions repeat tokens and padding), or the mask and then the
    /// whole table where those rows would be over half of it.
    fn grad_all_reduce_elems(&self, embed_dim: usize, samples: usize) -> usize {
        let params = self.num_params(embed_dim);
        match self.token_table() {
            Some((rows, width, context)) => {
                params - rows * width + sparse_rows_elems(rows, width, samples * context)
            }
            None => params,
        }
    }
}

/// Per-layer parameters of a pre-norm transformer block with two norms.
fn block_params(w: usize, hidden: usize) -> usize {
    let ln = 2 * w;
    let attn = w * 3 * w + 3 * w + w * w + w;
    let mlp = w * hidden + hidden + hidden * w + w;
    2 * ln + attn + mlp
}

/// Multiply-adds of one transformer layer on `s` tokens of width `w`, MLP hidden `hidden`.
fn layer_macs(s: f64, w: f64, hidden: f64) -> f64 {
    s * (4.0 * w * w + 2.0 * w * hidden) + 2.0 * s * s * w
}

/// Multiply-adds of a last layer run at one pooled token of `s`: every token's key and
/// value projections (the keys and values are all needed), then one query's projection,
/// scores and mixing, output projection and MLP.
fn pooled_layer_macs(s: f64, w: f64, hidden: f64) -> f64 {
    s * 2.0 * w * w + (2.0 * w * w + 2.0 * w * hidden) + 2.0 * s * w
}

/// What a transformer tower's activation counts depend on.
#[derive(Debug, Clone, Copy)]
pub struct TransformerDims {
    /// Tokens a sample (a ViT's patches and class token, a caption's context).
    pub tokens: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
}

impl VitConfig {
    fn pooler_params(&self, embed_dim: usize) -> usize {
        if !self.attentional_pool {
            return 0;
        }
        let (e, w) = (embed_dim, self.width);
        self.attn_pooler_queries * e       // queries
            + e * e + 2 * e * w + 3 * e    // q, k, v projections and their biases
            + e * e + e                    // output projection
            + 2 * e + 2 * w // ln_q, ln_k
    }
}

impl TowerSize for VitConfig {
    fn family(&self) -> &'static str {
        "vit"
    }

    fn full_precision_params(&self, embed_dim: usize) -> usize {
        let w = self.width;
        let pooler = if self.attentional_pool {
            self.attn_pooler_queries * embed_dim + 2 * embed_dim + 2 * w
        } else {
            0
        };
        w + (self.num_patches() + 1) * w      // class token, positions
            + 2 * w                           // ln_pre
            + self.layers * 4 * w             // ln_1, ln_2
            + pooler
            + 2 * self.pool_dim(embed_dim) // ln_post
    }

    fn num_params(&self, embed_dim: usize) -> usize {
        let w = self.width;
        self.patch_dim() * w          // patch embedding (no bias, as CLIP)
            + w                       // class token
            + (self.num_patches() + 1) * w
            + 2 * w                   // ln_pre
            + self.layers * block_params(w, self.mlp_ratio * w)
            + self.pooler_params(embed_dim)
            + 2 * self.pool_dim(embed_dim)    // ln_post
            + self.pool_dim(embed_dim) * embed_dim
    }

    fn forward_flops(&self, embed_dim: usize) -> f64 {
        let (w, p) = (self.width as f64, self.num_patches() as f64);
        let e = embed_dim as f64;
        let pooler = if self.attentional_pool {
            let (q, s) = (self.attn_pooler_queries as f64, p + 1.0);
            // q, k, v projections, scores and mixing, output projection.
            q * e * e + 2.0 * s * w * e + 2.0 * q * s * e + q * e * e
        } else {
            0.0
        };
        let macs = p * self.patch_dim() as f64 * w
            + self.layers as f64 * layer_macs(p + 1.0, w, (self.mlp_ratio * self.width) as f64)
            + pooler
            + self.pool_dim(embed_dim) as f64 * e;
        2.0 * macs
    }

    fn executed_forward_flops(&self, embed_dim: usize) -> f64 {
        if self.attentional_pool || self.layers == 0 {
            return self.forward_flops(embed_dim);
        }
        let (s, w) = ((self.num_patches() + 1) as f64, self.width as f64);
        let hidden = (self.mlp_ratio * self.width) as f64;
        self.forward_flops(embed_dim)
            - 2.0 * (layer_macs(s, w, hidden) - pooled_layer_macs(s, w, hidden))
    }

    fn transformer_dims(&self) -> Option<TransformerDims> {
        Some(TransformerDims {
            tokens: (self.num_patches() + 1),
            width: self.width,
            heads: self.heads,
            layers: self.layers,
        })
    }
}

impl TowerSize for TextTransformerConfig {
    fn family(&self) -> &'static str {
        "clip-text"
    }

    fn full_precision_params(&self, _embed_dim: usize) -> usize {
        let w = self.width;
        (self.vocab_size + self.context_length) * w + self.layers * 4 * w + 2 * w
    }

    fn token_table(&self) -> Option<(usize, usize, usize)> {
        Some((self.vocab_size, self.width, self.context_length))
    }

    fn num_params(&self, embed_dim: usize) -> usize {
        let w = self.width;
        self.vocab_size * w
            + self.context_length * w
            + self.layers * block_params(w, self.mlp_ratio * w)
            + 2 * w                   // ln_final
            + w * embed_dim
    }

    fn forward_flops(&self, embed_dim: usize) -> f64 {
        let (w, s) = (self.width as f64, self.context_length as f64);
        // The projection applies to the end-of-text token only; the embedding is a lookup.
        2.0 * (self.layers as f64 * layer_macs(s, w, (self.mlp_ratio * self.width) as f64)
            + w * embed_dim as f64)
    }

    fn executed_forward_flops(&self, embed_dim: usize) -> f64 {
        if self.layers == 0 {
            return self.forward_flops(embed_dim);
        }
        let (s, w) = (self.context_length as f64, self.width as f64);
        let hidden = (self.mlp_ratio * self.width) as f64;
        self.forward_flops(embed_dim)
            - 2.0 * (layer_macs(s, w, hidden) - pooled_layer_macs(s, w, hidden))
    }

    fn transformer_dims(&self) -> Option<TransformerDims> {
        Some(TransformerDims {
            tokens: self.context_length,
            width: self.width,
            heads: self.heads,
            layers: self.layers,
        })
    }
}

impl TowerSize for BertConfig {
    fn family(&self) -> &'static str {
        "bert"
    }

    fn full_precision_params(&self, _embed_dim: usize) -> usize {
        let h = self.hidden_size;
        (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h
            + 2 * h                   // embedding norm
            + self.layers * 4 * h // attention and output norms
    }

    fn token_table(&self) -> Option<(usize, usize, usize)> {
        Some((self.vocab_size, self.hidden_size, self.context_length))
    }

    fn num_params(&self, embed_dim: usize) -> usize {
        let h = self.hidden_size;
        let embeddings =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h;
        let pooler = if self.pooler { h * h + h } else { 0 };
        embeddings + self.layers * block_params(h, self.intermediate_size) + pooler + h * embed_dim
    }

    fn forward_flops(&self, embed_dim: usize) -> f64 {
        let (h, s) = (self.hidden_size as f64, self.context_length as f64);
        let pooler = if self.pooler { h * h } else { 0.0 };
        2.0 * (self.layers as f64 * layer_macs(s, h, self.intermediate_size as f64)
            + pooler
            + h * embed_dim as f64)
    }

    fn transformer_dims(&self) -> Option<TransformerDims> {
        Some(TransformerDims {
            tokens: self.context_length,
            width: self.hidden_size,
            heads: self.heads,
            layers: self.layers,
        })
    }
}

/// One convolution of the walk: stage (0 = stem), input and output channels, kernel side,
/// output side.
struct Conv {
    stage: usize,
    cin: usize,
    cout: usize,
    kernel: usize,
    side: usize,
}

/// Walks CLIP's modified ResNet, calling `conv` for each convolution and `norm(channels)`
/// for each batch norm; returns the side of the final feature map.
fn walk_resnet(r: &ResNetConfig, mut conv: impl FnMut(Conv), mut norm: impl FnMut(usize)) -> usize {
    let w = r.width;
    let mut side = r.image_size / 2;
    let mut c = |stage, cin, cout, kernel, side| {
        conv(Conv {
            stage,
            cin,
            cout,
            kernel,
            side,
        })
    };
    c(0, r.channels, w / 2, 3, side);
    norm(w / 2);
    c(0, w / 2, w / 2, 3, side);
    norm(w / 2);
    c(0, w / 2, w, 3, side);
    norm(w);
    side /= 2; // average pool
    let mut inplanes = w;
    for (stage, &blocks) in r.layers.iter().enumerate() {
        let planes = w << stage;
        for b in 0..blocks {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            let s = stage + 1;
            c(s, inplanes, planes, 1, side);
            norm(planes);
            c(s, planes, planes, 3, side);
            norm(planes);
            side /= stride; // anti-aliased stride: average pool before the expansion conv
            c(s, planes, 4 * planes, 1, side);
            norm(4 * planes);
            if stride > 1 || inplanes != 4 * planes {
                c(s, inplanes, 4 * planes, 1, side);
                norm(4 * planes);
            }
            inplanes = 4 * planes;
        }
    }
    side
}

impl TowerSize for ResNetConfig {
    fn family(&self) -> &'static str {
        "resnet"
    }

    fn full_precision_params(&self, _embed_dim: usize) -> usize {
        let mut norms = 0;
        let side = walk_resnet(self, |_| {}, |c| norms += 2 * c);
        norms + (side * side + 1) * 32 * self.width // batch norms, attention-pool positions
    }

    fn num_params(&self, embed_dim: usize) -> usize {
        let (mut convs, mut norms) = (0, 0);
        let side = walk_resnet(
            self,
            |c| convs += c.cin * c.cout * c.kernel * c.kernel,
            |c| norms += 2 * c,
        );
        let params = convs + norms;
        let e = 32 * self.width;
        let tokens = side * side + 1;
        params + tokens * e + 3 * (e * e + e) + e * embed_dim + embed_dim
    }

    fn forward_flops(&self, embed_dim: usize) -> f64 {
        let mut macs = 0.0;
        let side = walk_resnet(
            self,
            |c| macs += (c.cin * c.cout * c.kernel * c.kernel * c.side * c.side) as f64,
            |_| {},
        );
        let e = (32 * self.width) as f64;
        let t = (side * side + 1) as f64;
        // OpenCLIP's attention pool runs every token as a query and keeps the first.
        macs += 3.0 * t * e * e + 2.0 * t * t * e + t * e * embed_dim as f64;
        2.0 * macs
    }

    fn activation_elems(&self, checkpointing: bool, _scores_kept: bool) -> f64 {
        // Per stage: three kept tensors per convolution, and the stage's input.
        let mut kept = [0.0f64; 5];
        let mut input = [0.0f64; 5];
        walk_resnet(
            self,
            |c| {
                if kept[c.stage] == 0.0 {
                    input[c.stage] = (c.cin * c.side * c.side) as f64;
                }
                kept[c.stage] += 3.0 * (c.cout * c.side * c.side) as f64;
            },
            |_| {},
        );
        if checkpointing {
            // Stage boundaries kept; one stage recomputed and live at a time.
            input.iter().sum::<f64>() + kept.iter().cloned().fold(0.0, f64::max)
        } else {
            kept.iter().sum()
        }
    }
}

impl ImageTowerConfig {
    pub fn size(&self) -> &dyn TowerSize {
        match self {
            ImageTowerConfig::Vit(v) => v,
            ImageTowerConfig::Resnet(r) => r,
        }
    }
}

impl TextTowerConfig {
    pub fn size(&self) -> &dyn TowerSize {
        match self {
            TextTowerConfig::Clip(t) => t,
            TextTowerConfig::Bert(b) => b,
        }
    }
}
