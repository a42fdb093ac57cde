//! What a plan is asked about: the training precision, the gradient all-reduce's dtype,
//! the optimizer, micro-batches and the rest of [`CostOptions`].

use serde::{Deserialize, Serialize};

use crate::loss::LossConfig;
use crate::topology::Tower;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// Mixed precision as torch.autocast runs it: bf16 matrix products (on bf16 copies of
    /// fp32 master weights) and their outputs; fp32 norms, softmax, embeddings, residual
    /// stream, loss, gradients into the optimizer and its state.
    Bf16,
}

impl Precision {
    /// What a run uses unless told: bf16 on GPUs, fp32 on CPUs (whose bf16 is slow).
    pub fn default_on(device: crate::topology::DeviceKind) -> Precision {
        match device {
            crate::topology::DeviceKind::Cuda => Precision::Bf16,
            crate::topology::DeviceKind::Cpu => Precision::Fp32,
        }
    }

    pub fn activation_bytes(self) -> f64 {
        match self {
            Precision::Fp32 => 4.0,
            Precision::Bf16 => 2.0,
        }
    }

    /// The dtype the towers compute in, with master weights in `master`.
    pub fn compute_dtype(self, master: candle_core::DType) -> candle_core::DType {
        match self {
            Precision::Fp32 => master,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The element type gradients are summed in over a group: f32 (exact sums of what
/// backward gave), or bf16 (half the bytes on the wire, each partial sum rounded to bf16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GradReduce {
    #[default]
    Fp32,
    Bf16,
}

impl GradReduce {
    pub fn bytes(self) -> f64 {
        match self {
            GradReduce::Fp32 => 4.0,
            GradReduce::Bf16 => 2.0,
        }
    }

    /// The dtype of the all-reduced gradients, for master weights in `master` (f32 or f64:
    /// `fp32` sums them in the master dtype).
    pub fn dtype(self, master: candle_core::DType) -> candle_core::DType {
        match self {
            GradReduce::Fp32 => master,
            GradReduce::Bf16 => candle_core::DType::BF16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Two fp32 moments per parameter.
    Adamw,
    /// One fp32 momentum buffer per parameter.
    Sgd,
}

impl Optimizer {
    pub fn state_bytes(self) -> f64 {
        match self {
            Optimizer::Adamw => 8.0,
            Optimizer::Sgd => 4.0,
        }
    }
}

/// Measured forward + backward throughput of each tower on one rank's share of this
/// machine (`mmpipe plan --calibrate`), used instead of peak × efficiency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub image_samples_per_s: f64,
    pub text_samples_per_s: f64,
    /// The precision the towers ran in while measured: a plan at another precision would
    /// use rates that are not its own, and is refused.
    pub precision: Precision,
}

/// Samples per forward pass on each rank, by group, when fewer than the rank's slice of
/// the global batch (GradCache accumulation); absent: the whole slice at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MicroBatch {
    pub image: Option<usize>,
    pub text: Option<usize>,
}

impl MicroBatch {
    pub fn of(&self, tower: Tower) -> Option<usize> {
        match tower {
            Tower::Image => self.image,
            Tower::Text => self.text,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostOptions {
    pub global_batch: usize,
    /// The loss, its exchange scheme and its tiling: compute, traffic and memory.
    pub loss: LossConfig,
    /// Accumulation: activations of one micro-batch at a time, one more forward pass.
    pub micro_batch: MicroBatch,
    pub precision: Precision,
    /// What the gradient all-reduce sums in: its bytes on the wire.
    pub grad_reduce: GradReduce,
    pub optimizer: Optimizer,
    pub checkpointing: bool,
    /// Overlap the gradient all-reduce with the backward pass, in buckets of this many
    /// bytes (`train.grad_bucket_mb`); None: the whole sum after backward.
    pub overlap: Option<f64>,
    /// Gather the image features while a device that holds both towers runs its text
    /// forward (`train.feature_overlap`): one all-gather per tower; false: one of both
    /// after the forwards.
    pub feature_overlap: bool,
    /// bf16 attention on GPUs in heads of 64 by the flash kernels (`train.flash_attention`):
    /// no attention probabilities among the activations kept for backward.
    pub flash_attention: bool,
    pub calibration: Option<Calibration>,
}
