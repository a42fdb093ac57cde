//! AdamW on a GPU in one kernel launch per step: every parameter's moments, its f32 master
//! weight and its bf16 working copy are read and written once (`adamw.cu`). The composed
//! candle ops took about twelve kernels and temporaries per parameter (178 ms of a 1.1 s
//! ViT-B/32 step on an H200, `docs/gpu/throughput-vit-b-32-h200.txt`).
//!
//! The gradients' joint norm (clipping, and whether every gradient is finite) is one
//! launch too (`grad_norm.cu`): a sum of squares a block of 4096 elements, the partials
//! read back once and summed in f64, where a sum per tensor read back to the host made a
//! host synchronisation per parameter tensor, about 150 a tower.
//!
//! The kernels are compiled at start-up by NVRTC for the device's compute capability, so the
//! build needs no CUDA compiler and the PTX matches the GPU it runs on.

use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{DType, Storage, Tensor};

use super::{AdamWConfig, Slot};
use crate::error::{Error, Result};

use super::plan::{self, Field, KERNEL, NORM_KERNEL, NORM_THREADS, SOURCE, THREADS};

/// The kernel as PTX for compute capability `major.minor` (9.0: H100, H200), compiled by
/// NVRTC once per process and capability, without fused multiply-adds: each element rounds
/// as the CPU AdamW's does. No GPU is needed to compile.
pub fn ptx(major: i32, minor: i32) -> Result<String> {
    crate::comm::device::nvrtc_ptx(SOURCE, "src/train/optim/adamw.cu", false, major, minor)
}

fn is_cuda_f32(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// Whether one launch can take this update: every master, moment and gradient an f32
/// CUDA tensor (working copies bf16), contiguous, all on one GPU.
pub(super) fn applies(slots: &[Slot], grads: &[Tensor]) -> bool {
    let Some(first) = slots.first() else {
        return false;
    };
    let device = first.var.device();
    slots.iter().zip(grads).all(|(s, g)| {
        let w = s.var.as_tensor();
        [w, &s.m, &s.v, g]
            .iter()
            .all(|t| is_cuda_f32(t) && t.device().same_device(device))
            && g.shape() == w.shape()
            && s.m.shape() == w.shape()
            && s.v.shape() == w.shape()
            && s.working.as_ref().is_none_or(|c| {
                c.dtype() == DType::BF16
                    && c.is_contiguous()
                    && c.shape() == w.shape()
                    && c.device().same_device(device)
            })
    })
}

/// The device address of `t`'s first element.
fn address<T: CudaDType>(t: &Tensor, stream: &CudaStream) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(Error::Cuda("the GPU AdamW got a tensor off the GPU".into()));
    };
    let (base, _sync) = s.as_cuda_slice::<T>()?.device_ptr(stream);
    Ok(base + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

/// The optimizer's source as PTX for this device's compute capability (compiled once per
/// process): both kernels load from it, as one module.
fn device_ptx(device: &CudaDevice) -> Result<String> {
    let (major, minor) = device
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(|e| Error::Cuda(format!("the GPU's compute capability: {e:?}")))?;
    ptx(major, minor)
}

/// The module both kernels load from.
const MODULE: &str = "mmpipe_adamw";

/// A one-dimensional launch of `blocks` blocks of `threads` (`what`: the kernel, for the
/// error).
fn grid(blocks: usize, threads: usize, what: &str) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            u32::try_from(blocks).map_err(|_| Error::Cuda(format!("{what}: too many blocks")))?,
            1,
            1,
        ),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One AdamW step over every slot in one launch (what [`applies`] accepted).
pub(super) fn step(
    slots: &[Slot],
    grads: &[Tensor],
    c: AdamWConfig,
    bias1: f64,
    bias2: f64,
    lr: f64,
) -> Result<()> {
    let device = slots[0].var.device().as_cuda_device()?.clone();
    let stream = device.cuda_stream();
    let tensors: Vec<plan::Tensor> = slots
        .iter()
        .map(|s| plan::Tensor {
            elements: s.var.elem_count(),
            decays: s.decay,
            working_copy: s.working.is_some(),
        })
        .collect();
    let Some(l) = plan::launch(&tensors, c, bias1, bias2, lr) else {
        return Ok(());
    };
    let mut desc: Vec<u64> = Vec::with_capacity(8 * l.descriptors.len());
    for d in &l.descriptors {
        for field in d {
            desc.push(match *field {
                Field::Master(i) => address::<f32>(slots[i].var.as_tensor(), &stream)?,
                Field::FirstMoment(i) => address::<f32>(&slots[i].m, &stream)?,
                Field::SecondMoment(i) => address::<f32>(&slots[i].v, &stream)?,
                Field::Gradient(i) => address::<f32>(&grads[i], &stream)?,
                Field::WorkingCopy(i) => match &slots[i].working {
                    Some(copy) => address::<half::bf16>(copy.as_tensor(), &stream)?,
                    None => 0,
                },
                Field::Null => 0,
                Field::Value(v) => v,
            });
        }
    }
    let tensors = l.descriptors.len() as i32;
    let blocks = l.blocks;
    let desc = device.clone_htod(&desc)?;
    let func = device.get_or_load_custom_func(KERNEL, MODULE, &device_ptx(&device)?)?;
    let args = l.scalars;
    let mut launch = func.builder();
    launch.arg(&desc);
    launch.arg(&tensors);
    for a in &args {
        launch.arg(a);
    }
    let config = grid(blocks, THREADS, "AdamW")?;
    // SAFETY: every address is a live f32 (bf16 for copies) buffer of `n` elements on this
    // stream's device, held by `slots` and `grads` until the launch is done (the stream
    // orders it before any later use or free); the arguments match the kernel's signature.
    unsafe { launch.launch(config) }
        .map_err(|e| Error::Cuda(format!("the GPU AdamW kernel did not launch: {e:?}")))?;
    // `desc` is freed in stream order, after the kernel has read it.
    Ok(())
}

/// Whether [`sum_of_squares`] takes `grads`: f32 CUDA tensors, contiguous, on one GPU.
pub fn sum_of_squares_applies(grads: &[Tensor]) -> bool {
    let Some(first) = grads.first() else {
        return false;
    };
    grads
        .iter()
        .all(|g| is_cuda_f32(g) && g.device().same_device(first.device()))
}

/// `Σ x²` over every element of `grads` (what [`sum_of_squares_applies`] accepted), in one
/// launch and one read back to the host: f32 partial sums of 4096 elements, summed in f64.
pub fn sum_of_squares(grads: &[Tensor]) -> Result<f64> {
    let device = grads[0].device().as_cuda_device()?.clone();
    let stream = device.cuda_stream();
    let elements: Vec<usize> = grads.iter().map(|g| g.elem_count()).collect();
    let Some(l) = plan::norm_launch(&elements) else {
        return Ok(0.0);
    };
    let mut desc: Vec<u64> = Vec::with_capacity(4 * l.descriptors.len());
    for d in &l.descriptors {
        for field in d {
            desc.push(match *field {
                Field::Gradient(i) => address::<f32>(&grads[i], &stream)?,
                Field::Value(v) => v,
                other => {
                    return Err(Error::Cuda(format!(
                        "the sum of squares' descriptor holds {other:?}"
                    )))
                }
            });
        }
    }
    let tensors = l.descriptors.len() as i32;
    let desc = device.clone_htod(&desc)?;
    // SAFETY: the kernel writes every one of the `blocks` slots before the read below.
    let partials = unsafe { device.alloc::<f32>(l.blocks)? };
    let func = device.get_or_load_custom_func(NORM_KERNEL, MODULE, &device_ptx(&device)?)?;
    let out = {
        let (ptr, _sync) = partials.device_ptr(&stream);
        ptr
    };
    let mut launch = func.builder();
    launch.arg(&desc);
    launch.arg(&tensors);
    launch.arg(&out);
    let config = grid(l.blocks, NORM_THREADS, "sum of squares")?;
    // SAFETY: every address is a live, contiguous f32 buffer of its element count on this
    // stream's device, held by `grads` until the read back below waits for the kernel;
    // `out` holds `blocks` f32s; the arguments match the kernel's signature.
    unsafe { launch.launch(config) }
        .map_err(|e| Error::Cuda(format!("the sum-of-squares kernel did not launch: {e:?}")))?;
    let partials = device.clone_dtoh(&partials)?;
    Ok(plan::sum_partials(&partials))
}
