//! Single-device encoders. Nothing here knows about ranks or collectives: a rank builds the
//! tower it trains, and the test reference builds both.

pub mod bert;
pub mod checkpoint;
pub mod checkpointing;
pub mod config;
pub mod fused;
pub mod layers;
pub mod openclip_config;
pub mod params;
pub mod resnet;
pub mod text;
pub mod vision;

use candle_core::{DType, Device, Tensor, Var};

pub use bert::BertTower;
pub use config::{
    BertConfig, ClipConfig, ImageTowerConfig, ResNetConfig, TextTowerConfig, TextTransformerConfig,
    VitConfig,
};
pub use params::{Init, ParamBuilder, Params};
pub use text::TextTower;
pub use vision::VisionTower;

use crate::error::{Error, Result};
use crate::topology::Tower;

/// OpenCLIP's initial temperature: `logit_scale = ln(1/0.07)`.
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778;
/// The scale `exp(logit_scale)` is clamped to 100 after every optimizer step.
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;

/// A per-channel image normalisation, `(v/255 − mean)/std` on RGB bytes: one formula for
/// the host's workers and for the device, so that both give the same floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PixelNorm {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl PixelNorm {
    /// Per channel, `v · scale − shift` in f32: the operations both paths do, in order.
    pub fn scale_shift(&self) -> ([f32; 3], [f32; 3]) {
        let scale = std::array::from_fn(|c| 1.0 / (255.0 * self.std[c]));
        let shift = std::array::from_fn(|c| self.mean[c] / self.std[c]);
        (scale, shift)
    }

    /// `[h·w·3]` bytes (HWC) → `[3, h, w]` floats (CHW), appended to `out`.
    pub fn extend_chw(&self, hwc: &[u8], out: &mut Vec<f32>) {
        let (scale, shift) = self.scale_shift();
        for c in 0..3 {
            out.extend(
                hwc.chunks_exact(3)
                    .map(|px| px[c] as f32 * scale[c] - shift[c]),
            );
        }
    }

    /// `[n, h, w, 3]` u8 → `[n, 3, h, w]` f32 on the bytes' device. On a GPU one kernel
    /// reads the bytes once and writes the floats once (`fused::cuda::pixel_normalise`);
    /// elsewhere the permute is a view that the cast reads through, then a scale and a
    /// shift.
    pub fn on_device(&self, bytes: &Tensor) -> Result<Tensor> {
        let (scale, shift) = self.scale_shift();
        let device = bytes.device();
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            return fused::cuda::pixel_normalise(bytes, scale, shift);
        }
        let scale = Tensor::from_slice(&scale, (1, 3, 1, 1), device)?;
        let shift = Tensor::from_slice(&shift, (1, 3, 1, 1), device)?;
        Ok(bytes
            .permute((0, 3, 1, 2))?
            .to_dtype(DType::F32)?
            .broadcast_mul(&scale)?
            .broadcast_sub(&shift)?)
    }
}

/// A batch for one tower: images, or tokenised captions.
#[derive(Debug, Clone)]
pub enum TowerInput {
    /// `[n, channels, size, size]` floats, normalised.
    Images(Tensor),
    /// `[n, size, size, 3]` u8 as decoded: a quarter of the floats' bytes on the way to the
    /// device, normalised there ([`TowerInput::normalised`]).
    Pixels { bytes: Tensor, norm: PixelNorm },
    /// `tokens` and `mask` `[n, context]` u32; `eot` `[n]`: each caption's last real token.
    Captions {
        tokens: Tensor,
        mask: Tensor,
        eot: Tensor,
    },
}

impl TowerInput {
    pub fn len(&self) -> Result<usize> {
        Ok(match self {
            TowerInput::Images(t) => t.dim(0)?,
            TowerInput::Pixels { bytes, .. } => bytes.dim(0)?,
            TowerInput::Captions { tokens, .. } => tokens.dim(0)?,
        })
    }

    /// Bytes normalised into floats where they are (images of any other kind as they are):
    /// what a step does once, on its device, before the forward.
    pub fn normalised(&self) -> Result<TowerInput> {
        Ok(match self {
            TowerInput::Pixels { bytes, norm } => TowerInput::Images(norm.on_device(bytes)?),
            other => other.clone(),
        })
    }

    /// The images as the encoder takes them: normalised floats.
    fn images(&self) -> Result<Option<std::borrow::Cow<'_, Tensor>>> {
        Ok(match self {
            TowerInput::Images(x) => Some(std::borrow::Cow::Borrowed(x)),
            TowerInput::Pixels { bytes, norm } => {
                Some(std::borrow::Cow::Owned(norm.on_device(bytes)?))
            }
            TowerInput::Captions { .. } => None,
        })
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// The same samples on `device` (the data pipeline builds them on the CPU).
    pub fn to_device(&self, device: &candle_core::Device) -> Result<TowerInput> {
        Ok(match self {
            TowerInput::Images(t) => TowerInput::Images(t.to_device(device)?),
            TowerInput::Pixels { bytes, norm } => TowerInput::Pixels {
                bytes: bytes.to_device(device)?,
                norm: *norm,
            },
            TowerInput::Captions { tokens, mask, eot } => TowerInput::Captions {
                tokens: tokens.to_device(device)?,
                mask: mask.to_device(device)?,
                eot: eot.to_device(device)?,
            },
        })
    }

    /// Samples `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<TowerInput> {
        Ok(match self {
            TowerInput::Images(t) => TowerInput::Images(t.narrow(0, start, len)?),
            TowerInput::Pixels { bytes, norm } => TowerInput::Pixels {
                bytes: bytes.narrow(0, start, len)?,
                norm: *norm,
            },
            TowerInput::Captions { tokens, mask, eot } => TowerInput::Captions {
                tokens: tokens.narrow(0, start, len)?,
                mask: mask.narrow(0, start, len)?,
                eot: eot.narrow(0, start, len)?,
            },
        })
    }
}

/// One of the two encoders: what a rank trains.
#[derive(Debug, Clone)]
pub enum Encoder {
    Image(VisionTower),
    ResNet(resnet::ResNetTower),
    Text(TextTower),
    Bert(BertTower),
}

impl Encoder {
    pub fn new(pb: &ParamBuilder, cfg: &ClipConfig, tower: Tower) -> Result<Self> {
        Ok(match tower {
            Tower::Image => match &cfg.vision {
                ImageTowerConfig::Vit(v) => {
                    Encoder::Image(VisionTower::new(&pb.pp("visual"), v, cfg.embed_dim)?)
                }
                ImageTowerConfig::Resnet(r) => Encoder::ResNet(resnet::ResNetTower::new(
                    &pb.pp("visual"),
                    r,
                    cfg.embed_dim,
                )?),
            },
            Tower::Text => match &cfg.text {
                TextTowerConfig::Clip(t) => Encoder::Text(TextTower::new(pb, t, cfg.embed_dim)?),
                TextTowerConfig::Bert(b) => {
                    Encoder::Bert(BertTower::new(&pb.pp("text"), b, cfg.embed_dim)?)
                }
            },
        })
    }

    /// Features for evaluation: batch norms use their running statistics (and, when
    /// synchronised, do not communicate). Other towers behave as in training.
    pub fn forward_eval(&self, input: &TowerInput) -> Result<Tensor> {
        match (self, input.images()?.as_deref()) {
            (Encoder::ResNet(m), Some(x)) => m.forward(x, false),
            _ => self.forward(input),
        }
    }

    /// Unnormalised features `[n, embed_dim]` (training mode).
    pub fn forward(&self, input: &TowerInput) -> Result<Tensor> {
        let images = input.images()?;
        match (self, input, images.as_deref()) {
            (Encoder::Image(m), _, Some(x)) => m.forward(x),
            (Encoder::ResNet(m), _, Some(x)) => m.forward(x, true),
            (Encoder::Text(m), TowerInput::Captions { tokens, eot, .. }, _) => {
                m.forward(tokens, eot)
            }
            (Encoder::Bert(m), TowerInput::Captions { tokens, mask, .. }, _) => {
                m.forward(tokens, mask)
            }
            _ => Err(Error::Msg(
                "encoder and input are of different modalities".into(),
            )),
        }
    }
}

/// The temperature parameter, named as OpenCLIP names it.
pub fn logit_scale(pb: &ParamBuilder) -> Result<Tensor> {
    pb.get((), "logit_scale", Init::Const(LOGIT_SCALE_INIT))
}

/// The loss's learnable scalars: replicated on every rank, never tower parameters.
#[derive(Debug, Clone)]
pub struct LossScalarVars {
    /// The temperature `t` (logits are scaled by `exp(t)`).
    pub scale: Var,
    /// SigLIP's learnable logit bias.
    pub bias: Option<Var>,
}

/// The loss's learnable scalars, named as OpenCLIP names them: `logit_scale` and, for
/// SigLIP, `logit_bias`; registered in `pb` (their master variables returned).
pub fn loss_scalars(
    pb: &ParamBuilder,
    scale_init: f64,
    bias_init: Option<f64>,
) -> Result<LossScalarVars> {
    Ok(LossScalarVars {
        scale: pb.var((), "logit_scale", Init::Const(scale_init))?,
        bias: bias_init
            .map(|b| pb.var((), "logit_bias", Init::Const(b)))
            .transpose()?,
    })
}

/// Parameter builder for the CPU in f32: what the thread backend trains with.
pub fn cpu_builder(seed: u64) -> ParamBuilder {
    ParamBuilder::new(seed, DType::F32, &Device::Cpu)
}

/// Both towers and the temperature of `cfg`, registered in `pb`: everything a checkpoint
/// of this model holds.
pub fn build_all(pb: &ParamBuilder, cfg: &ClipConfig) -> Result<(Encoder, Encoder)> {
    let image = Encoder::new(pb, cfg, Tower::Image)?;
    let text = Encoder::new(pb, cfg, Tower::Text)?;
    logit_scale(pb)?;
    Ok((image, text))
}

impl Encoder {
    /// The text tower's token-embedding table: the one parameter whose gradient is zero
    /// outside the rows of the batch's tokens (it is read only by a row lookup).
    pub fn token_table(&self) -> Option<&Tensor> {
        match self {
            Encoder::Text(m) => Some(m.token_embedding()),
            Encoder::Bert(m) => Some(m.word_embeddings()),
            Encoder::Image(_) | Encoder::ResNet(_) => None,
        }
    }

    /// Non-parameter state a checkpoint must carry (batch-norm statistics), under full
    /// OpenCLIP names.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        match self {
            Encoder::ResNet(m) => Ok(m
                .buffers()?
                .into_iter()
                .map(|(n, t)| (format!("visual.{n}"), t))
                .collect()),
            _ => Ok(Vec::new()),
        }
    }

    /// Synchronises batch-norm statistics through `reducer` (towers without batch norm
    /// ignore it).
    pub fn set_stats_reducer(&mut self, reducer: std::sync::Arc<dyn resnet::StatsReducer>) {
        if let Encoder::ResNet(m) = self {
            m.set_stats_reducer(reducer);
        }
    }

    /// Restores [`Self::buffers`] from a checkpoint's tensors; returns how many were found.
    pub fn load_buffers(
        &self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<usize> {
        match self {
            Encoder::ResNet(m) => m.load_buffers(tensors, "visual."),
            _ => Ok(0),
        }
    }
}
