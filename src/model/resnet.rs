//! CLIP's modified ResNet image tower (OpenCLIP's `ModifiedResNet`): a three-convolution
//! stem with an average pool, bottleneck stages whose strides are average pools before
//! the expansion convolution (anti-aliasing), and attention pooling over the final map.
//!
//! Convolutions are written as shifted views + one matmul (im2col), so their backward is
//! plain matmuls rather than candle's slow CPU transposed convolution. Batch norm runs in
//! training mode and keeps running statistics for evaluation. Its statistics are each
//! rank's own by default (so a split step then differs from the single-device step), or,
//! with `sync_batch_norm = true`, the whole image group's: two all-reduces per norm in
//! forward and one in backward, and the split step is exact again.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::config::ResNetConfig;
use super::layers::{softmax, Linear};
use super::params::{Init, ParamBuilder};
use crate::error::Result;

/// A `k × k` convolution without bias, stride 1 or 2, padding `k / 2`.
#[derive(Debug, Clone)]
struct Conv {
    weight: Tensor,
    kernel: usize,
    stride: usize,
}

impl Conv {
    fn new(
        pb: &ParamBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self> {
        // Kaiming-normal fan-in, as torchvision initialises convolutions.
        let std = (2.0 / (cin * kernel * kernel) as f64).sqrt();
        Ok(Conv {
            weight: pb.get((cout, cin, kernel, kernel), "weight", Init::Normal(std))?,
            kernel,
            stride,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // The convolution runs in its weight's dtype (bf16 under mixed precision).
        let x = &x.to_dtype(self.weight.dtype())?;
        let (n, c, h, w) = x.dims4()?;
        let k = self.kernel;
        let cout = self.weight.dim(0)?;
        let pad = k / 2;
        let padded = if pad > 0 {
            x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?
        } else {
            x.clone()
        };
        // im2col: the k² shifted views, channel-major as the weight is laid out.
        let mut views = Vec::with_capacity(k * k);
        for dy in 0..k {
            for dx in 0..k {
                views.push(padded.narrow(2, dy, h)?.narrow(3, dx, w)?);
            }
        }
        let cols = if k == 1 {
            x.clone()
        } else {
            Tensor::stack(&views, 2)?.reshape((n, c * k * k, h, w))?
        };
        let cols = if self.stride == 2 {
            subsample(&cols)?
        } else {
            cols
        };
        let (_, _, ho, wo) = cols.dims4()?;
        // [n, c·k², ho·wo] -> [n·ho·wo, c·k²] · [c·k², cout]
        let cols = cols
            .reshape((n, c * k * k, ho * wo))?
            .transpose(1, 2)?
            .reshape((n * ho * wo, c * k * k))?;
        let y = cols.matmul(&self.weight.reshape((cout, c * k * k))?.t()?)?;
        Ok(y.reshape((n, ho * wo, cout))?
            .transpose(1, 2)?
            .reshape((n, cout, ho, wo))?)
    }
}

/// Every second row and column (stride 2), for even sides.
fn subsample(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n, c, h / 2, 2, w / 2, 2))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, h / 2, w / 2))?)
}

/// Average pooling with kernel = stride = `s` (a reshape and a mean: plain backward).
fn avg_pool(x: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    Ok(x.reshape((n, c, h / s, s, w / s, s))?.mean(5)?.mean(3)?)
}

/// Sums per-channel statistics over every rank that shares the batch (for synchronised
/// batch norm). Implemented by the training code over the image group; the model only
/// knows this much of communication.
pub trait StatsReducer: Send + Sync {
    fn sum(&self, t: &Tensor) -> Result<Tensor>;
}

/// Identity in forward; in backward, turns the gradient of the normalised activations into
/// what synchronised batch norm needs before the division by the (constant) global std:
/// `g − mean(g) − x̂·mean(g·x̂)`, means over the whole group's batch.
struct SyncNormGrad {
    reducer: Arc<dyn StatsReducer>,
    count: f64,
}

impl CustomOp1 for SyncNormGrad {
    fn name(&self) -> &'static str {
        "sync-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("sync batch norm expects a contiguous tensor")
        };
        let copy = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            _ => candle_core::bail!("sync batch norm supports f32 and f64"),
        };
        Ok((copy, layout.shape().clone()))
    }

    fn bwd(
        &self,
        normed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let per_channel = |t: &Tensor| t.sum_keepdim(3)?.sum_keepdim(2)?.sum_keepdim(0);
        let local = Tensor::cat(&[per_channel(grad)?, per_channel(&(grad * normed)?)?], 0)?;
        let global = self.reducer.sum(&local).map_err(candle_core::Error::wrap)?;
        let mean_g = (global.narrow(0, 0, 1)? / self.count)?;
        let mean_gx = (global.narrow(0, 1, 1)? / self.count)?;
        Ok(Some(
            grad.broadcast_sub(&mean_g)?
                .sub(&normed.broadcast_mul(&mean_gx)?)?,
        ))
    }
}

/// Batch norm over (batch, height, width) per channel, training mode, with running
/// statistics (momentum 0.1, unbiased variance, as PyTorch) for evaluation. With a
/// [`StatsReducer`], the statistics (and their gradient) span the whole group's batch.
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Mutex<Tensor>,
    running_var: Mutex<Tensor>,
    /// PyTorch's `num_batches_tracked`.
    batches: Mutex<i64>,
    eps: f64,
    momentum: f64,
    reducer: Option<Arc<dyn StatsReducer>>,
}

impl std::fmt::Debug for BatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchNorm")
            .field("synchronised", &self.reducer.is_some())
            .finish()
    }
}

impl Clone for BatchNorm {
    fn clone(&self) -> Self {
        BatchNorm {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            running_mean: Mutex::new(self.running_mean.lock().expect("bn stats").clone()),
            running_var: Mutex::new(self.running_var.lock().expect("bn stats").clone()),
            batches: Mutex::new(*self.batches.lock().expect("bn stats")),
            eps: self.eps,
            momentum: self.momentum,
            reducer: self.reducer.clone(),
        }
    }
}

impl BatchNorm {
    fn new(pb: &ParamBuilder, c: usize) -> Result<Self> {
        Self::with_weight(pb, c, Init::Ones)
    }

    /// Gain and bias in full precision, as layer norms keep theirs.
    fn with_weight(pb: &ParamBuilder, c: usize, weight: Init) -> Result<Self> {
        let pb = pb.full_precision();
        Ok(BatchNorm {
            weight: pb.get(c, "weight", weight)?,
            bias: pb.get(c, "bias", Init::Zeros)?,
            // Statistics in full precision (the master dtype), whatever the compute dtype.
            running_mean: Mutex::new(Tensor::zeros(c, pb.master_dtype(), pb.device())?),
            running_var: Mutex::new(Tensor::ones(c, pb.master_dtype(), pb.device())?),
            batches: Mutex::new(0),
            eps: 1e-5,
            momentum: 0.1,
            reducer: None,
        })
    }

    /// Sets the running statistics (from a checkpoint).
    fn set_running(&self, mean: Tensor, var: Tensor, batches: i64) {
        *self.running_mean.lock().expect("bn stats") = mean;
        *self.running_var.lock().expect("bn stats") = var;
        *self.batches.lock().expect("bn stats") = batches;
    }

    /// The running statistics (mean, variance), for checkpoints and tests.
    pub fn running_stats(&self) -> (Tensor, Tensor) {
        (
            self.running_mean.lock().expect("bn stats").clone(),
            self.running_var.lock().expect("bn stats").clone(),
        )
    }

    /// Normalises and applies the affine in the statistics' dtype (f32 under bf16 compute:
    /// batch statistics of a bf16 activation summed in bf16 would lose most of their
    /// digits); the output in `x`'s own dtype.
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let compute = x.dtype();
        let x = &x.to_dtype(self.running_mean.lock().expect("bn stats").dtype())?;
        let (n, c, h, w) = x.dims4()?;
        let shape = (1, c, 1, 1);
        if !train {
            let (mean, var) = self.running_stats();
            let x = x
                .broadcast_sub(&mean.reshape(shape)?)?
                .broadcast_div(&(var.reshape(shape)? + self.eps)?.sqrt()?)?;
            return Ok(self.affine(&x, shape)?.to_dtype(compute)?);
        }
        let flat = x.transpose(0, 1)?.reshape((c, n * h * w))?;
        let (normed, mean, var, count) = match &self.reducer {
            None => {
                let mean = flat.mean(1)?;
                let var = flat.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(1)?;
                let normed = x
                    .broadcast_sub(&mean.reshape(shape)?)?
                    .broadcast_div(&(var.reshape(shape)? + self.eps)?.sqrt()?)?;
                (normed, mean.detach(), var.detach(), (n * h * w) as f64)
            }
            Some(reducer) => {
                // Two passes over the group: the mean, then the variance around it.
                let count_local =
                    Tensor::full((n * h * w) as f64, 1, x.device())?.to_dtype(x.dtype())?;
                let sums =
                    reducer.sum(&Tensor::cat(&[&flat.detach().sum(1)?, &count_local], 0)?)?;
                let count = sums
                    .narrow(0, c, 1)?
                    .to_dtype(candle_core::DType::F64)?
                    .to_vec1::<f64>()?[0];
                let mean = (sums.narrow(0, 0, c)? / count)?;
                let centred = flat.detach().broadcast_sub(&mean.unsqueeze(1)?)?;
                let var = (reducer.sum(&centred.sqr()?.sum(1)?)? / count)?;
                // The statistics are constants here; SyncNormGrad adds their gradient terms.
                let std = (var.reshape(shape)? + self.eps)?.sqrt()?;
                let hat = x
                    .broadcast_sub(&mean.reshape(shape)?)?
                    .broadcast_div(&std)?
                    .contiguous()?;
                let op = SyncNormGrad {
                    reducer: reducer.clone(),
                    count,
                };
                (hat.apply_op1(op)?, mean, var, count)
            }
        };
        let unbiased = (&var * (count / (count - 1.0).max(1.0)))?;
        let m = self.momentum;
        let mut rm = self.running_mean.lock().expect("bn stats");
        *rm = ((&*rm * (1.0 - m))? + (mean * m)?)?;
        let mut rv = self.running_var.lock().expect("bn stats");
        *rv = ((&*rv * (1.0 - m))? + (unbiased * m)?)?;
        *self.batches.lock().expect("bn stats") += 1;
        Ok(self.affine(&normed, shape)?.to_dtype(compute)?)
    }

    fn affine(&self, x: &Tensor, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        Ok(x.broadcast_mul(&self.weight.reshape(shape)?)?
            .broadcast_add(&self.bias.reshape(shape)?)?)
    }
}

#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Conv,
    bn3: BatchNorm,
    stride: usize,
    downsample: Option<(Conv, BatchNorm)>,
}

impl Bottleneck {
    fn new(pb: &ParamBuilder, inplanes: usize, planes: usize, stride: usize) -> Result<Self> {
        let downsample = if stride > 1 || inplanes != 4 * planes {
            // OpenCLIP's Sequential: "-1" avg pool, "0" conv, "1" batch norm.
            let d = pb.pp("downsample");
            Some((
                Conv::new(&d.pp("0"), inplanes, 4 * planes, 1, 1)?,
                BatchNorm::new(&d.pp("1"), 4 * planes)?,
            ))
        } else {
            None
        };
        Ok(Bottleneck {
            conv1: Conv::new(&pb.pp("conv1"), inplanes, planes, 1, 1)?,
            bn1: BatchNorm::new(&pb.pp("bn1"), planes)?,
            conv2: Conv::new(&pb.pp("conv2"), planes, planes, 3, 1)?,
            bn2: BatchNorm::new(&pb.pp("bn2"), planes)?,
            conv3: Conv::new(&pb.pp("conv3"), planes, 4 * planes, 1, 1)?,
            // OpenCLIP zero-initialises the last norm of each block: blocks start as identities.
            bn3: BatchNorm::with_weight(&pb.pp("bn3"), 4 * planes, Init::Zeros)?,
            stride,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.bn1.forward(&self.conv1.forward(x)?, train)?.relu()?;
        let out = self
            .bn2
            .forward(&self.conv2.forward(&out)?, train)?
            .relu()?;
        let out = avg_pool(&out, self.stride)?;
        let out = self.bn3.forward(&self.conv3.forward(&out)?, train)?;
        let identity = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(&avg_pool(x, self.stride)?)?, train)?,
            None => x.clone(),
        };
        Ok((out + identity)?.relu()?)
    }
}

/// Attention over the final map's positions plus their mean; the mean's output is the
/// image feature. (OpenCLIP runs every position as a query and keeps the first; only the
/// first query is computed here: the same result.)
#[derive(Debug, Clone)]
struct AttentionPool {
    positional_embedding: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    c_proj: Linear,
    heads: usize,
}

impl AttentionPool {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        // In the positional embedding's dtype (f32 under mixed precision).
        let tokens = x
            .reshape((n, c, h * w))?
            .transpose(1, 2)?
            .to_dtype(self.positional_embedding.dtype())?; // [n, hw, c]
        let x = Tensor::cat(&[&tokens.mean_keepdim(1)?, &tokens], 1)?
            .broadcast_add(&self.positional_embedding)?;
        let len = h * w + 1;
        let d = c / self.heads;
        let split = |t: Tensor, rows: usize| -> Result<Tensor> {
            Ok(t.reshape((n, rows, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n * self.heads, rows, d))?)
        };
        let q = split(self.q_proj.forward(&x.narrow(1, 0, 1)?)?, 1)?;
        let k = split(self.k_proj.forward(&x)?, len)?;
        let v = split(self.v_proj.forward(&x)?, len)?;
        let scores = super::fused::attention_scores(&q, &k, 1.0 / (d as f64).sqrt())?;
        let out = super::fused::attention_mix(&softmax(&scores)?, &v)?.reshape((n, c))?;
        self.c_proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
pub struct ResNetTower {
    stem: Vec<(Conv, BatchNorm)>,
    stages: Vec<Vec<Bottleneck>>,
    attnpool: AttentionPool,
}

impl ResNetTower {
    /// `pb` should be prefixed `visual` for OpenCLIP's parameter names.
    pub fn new(pb: &ParamBuilder, cfg: &ResNetConfig, embed_dim: usize) -> Result<Self> {
        let w = cfg.width;
        let stem = vec![
            (
                Conv::new(&pb.pp("conv1"), cfg.channels, w / 2, 3, 2)?,
                BatchNorm::new(&pb.pp("bn1"), w / 2)?,
            ),
            (
                Conv::new(&pb.pp("conv2"), w / 2, w / 2, 3, 1)?,
                BatchNorm::new(&pb.pp("bn2"), w / 2)?,
            ),
            (
                Conv::new(&pb.pp("conv3"), w / 2, w, 3, 1)?,
                BatchNorm::new(&pb.pp("bn3"), w)?,
            ),
        ];
        let mut inplanes = w;
        let mut stages = Vec::new();
        for (i, &blocks) in cfg.layers.iter().enumerate() {
            let planes = w << i;
            let stage = pb.pp(format!("layer{}", i + 1));
            let mut v = Vec::new();
            for b in 0..blocks {
                let stride = if i > 0 && b == 0 { 2 } else { 1 };
                v.push(Bottleneck::new(&stage.pp(b), inplanes, planes, stride)?);
                inplanes = 4 * planes;
            }
            stages.push(v);
        }
        let e = 32 * w;
        let side = cfg.image_size / 32;
        let ap = pb.pp("attnpool");
        let std = (e as f64).powf(-0.5);
        let attnpool = AttentionPool {
            positional_embedding: ap.full_precision().get(
                (side * side + 1, e),
                "positional_embedding",
                Init::Normal(std),
            )?,
            q_proj: Linear::new(&ap.pp("q_proj"), e, e, std)?,
            k_proj: Linear::new(&ap.pp("k_proj"), e, e, std)?,
            v_proj: Linear::new(&ap.pp("v_proj"), e, e, std)?,
            c_proj: Linear::new(&ap.pp("c_proj"), e, embed_dim, std)?,
            heads: cfg.heads,
        };
        Ok(ResNetTower {
            stem,
            stages,
            attnpool,
        })
    }

    /// `images` `[n, channels, size, size]` → features `[n, embed_dim]`. `train` uses the
    /// batch's statistics (and updates the running ones); otherwise the running ones.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = self.stem(images, train)?;
        for i in 0..self.num_blocks() {
            x = self.block(i, &x, train)?;
        }
        self.head(&x)
    }

    /// The three stem convolutions and the average pool: the first block's input.
    pub fn stem(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = images.to_dtype(self.stem[0].0.weight.dtype())?;
        for (conv, bn) in &self.stem {
            x = bn.forward(&conv.forward(&x)?, train)?.relu()?;
        }
        avg_pool(&x, 2)
    }

    /// Bottleneck blocks over all stages, in order.
    pub fn num_blocks(&self) -> usize {
        self.stages.iter().map(Vec::len).sum()
    }

    pub fn block(&self, i: usize, x: &Tensor, train: bool) -> Result<Tensor> {
        let block = self
            .stages
            .iter()
            .flatten()
            .nth(i)
            .expect("block index in range");
        block.forward(x, train)
    }

    /// Attention pooling into the embedding.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.attnpool.forward(x)
    }

    /// Synchronises every batch norm's statistics through `reducer`.
    pub fn set_stats_reducer(&mut self, reducer: Arc<dyn StatsReducer>) {
        for (_, bn) in &mut self.stem {
            bn.reducer = Some(reducer.clone());
        }
        for block in self.stages.iter_mut().flatten() {
            for bn in [&mut block.bn1, &mut block.bn2, &mut block.bn3] {
                bn.reducer = Some(reducer.clone());
            }
            if let Some((_, bn)) = &mut block.downsample {
                bn.reducer = Some(reducer.clone());
            }
        }
    }

    /// Every batch norm with its OpenCLIP name relative to the tower (`bn1`,
    /// `layer1.0.downsample.1`, …).
    fn norms(&self) -> Vec<(String, &BatchNorm)> {
        let mut out = Vec::new();
        for (i, (_, bn)) in self.stem.iter().enumerate() {
            out.push((format!("bn{}", i + 1), bn));
        }
        for (s, stage) in self.stages.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                let p = format!("layer{}.{b}", s + 1);
                out.push((format!("{p}.bn1"), &block.bn1));
                out.push((format!("{p}.bn2"), &block.bn2));
                out.push((format!("{p}.bn3"), &block.bn3));
                if let Some((_, bn)) = &block.downsample {
                    out.push((format!("{p}.downsample.1"), bn));
                }
            }
        }
        out
    }

    /// The batch norms' buffers as OpenCLIP's `state_dict` names them (relative to the
    /// tower): `running_mean`, `running_var`, and `num_batches_tracked` (i64).
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, bn) in self.norms() {
            let (m, v) = bn.running_stats();
            let batches = Tensor::new(*bn.batches.lock().expect("bn stats"), m.device())?;
            out.push((format!("{name}.running_mean"), m));
            out.push((format!("{name}.running_var"), v));
            out.push((format!("{name}.num_batches_tracked"), batches));
        }
        Ok(out)
    }

    /// Sets the buffers from `tensors` keyed by `prefix` + the names of [`Self::buffers`];
    /// returns how many norms were set. A norm with no statistics in `tensors` keeps its own.
    pub fn load_buffers(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
        prefix: &str,
    ) -> Result<usize> {
        let mut set = 0;
        for (name, bn) in self.norms() {
            let key = |b: &str| format!("{prefix}{name}.{b}");
            if let (Some(m), Some(v)) = (
                tensors.get(&key("running_mean")),
                tensors.get(&key("running_var")),
            ) {
                // Where and in what dtype the norm keeps its statistics now.
                let (like, _) = bn.running_stats();
                let to = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
                };
                let batches = match tensors.get(&key("num_batches_tracked")) {
                    Some(t) => t.to_dtype(candle_core::DType::I64)?.to_scalar::<i64>()?,
                    None => 0,
                };
                bn.set_running(to(m)?, to(v)?, batches);
                set += 1;
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    fn builder() -> ParamBuilder {
        ParamBuilder::new(4, DType::F64, &Device::Cpu)
    }

    #[test]
    fn im2col_convolution_equals_candle_conv2d() {
        let x = Tensor::randn(0f64, 1.0, (2, 3, 8, 8), &Device::Cpu).unwrap();
        for (k, stride) in [(1, 1), (3, 1), (3, 2)] {
            let conv = Conv::new(&builder().pp(format!("c{k}{stride}")), 3, 5, k, stride).unwrap();
            let ours = conv.forward(&x).unwrap();
            let theirs = x.conv2d(&conv.weight, k / 2, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k {k} stride {stride}");
            let diff = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff < 1e-12, "k {k} stride {stride}: {diff}");
        }
    }

    #[test]
    fn batch_norm_normalises_the_batch_and_tracks_running_statistics() {
        let bn = BatchNorm::new(&builder(), 2).unwrap();
        let x = Tensor::new(
            &[
                [[[1.0f64, 3.0]], [[10.0, 10.0]]],
                [[[5.0, 7.0]], [[20.0, 40.0]]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let y = bn.forward(&x, true).unwrap();
        // Channel 0 holds 1, 3, 5, 7: mean 4, biased variance 5.
        let c0: Vec<f64> = y
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f64> = [1.0, 3.0, 5.0, 7.0]
            .iter()
            .map(|v| (v - 4.0) / (5.0f64 + 1e-5).sqrt())
            .collect();
        for (a, b) in c0.iter().zip(&want) {
            assert!((a - b).abs() < 1e-12);
        }
        let (m, v) = bn.running_stats();
        let (m, v): (Vec<f64>, Vec<f64>) = (m.to_vec1().unwrap(), v.to_vec1().unwrap());
        // 0.9·0 + 0.1·4; 0.9·1 + 0.1·(unbiased 20/3).
        assert!((m[0] - 0.4).abs() < 1e-12 && (v[0] - (0.9 + 0.1 * 20.0 / 3.0)).abs() < 1e-12);
        // Evaluation uses the running statistics, and does not move them.
        let e = bn.forward(&x, false).unwrap();
        let first: f64 = e.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!((first - (1.0 - 0.4) / (v[0] + 1e-5).sqrt()).abs() < 1e-12);
        assert_eq!(bn.running_stats().0.to_vec1::<f64>().unwrap(), m);
    }
}
