//! AdamW on a GPU in one kernel launch per step: every parameter's moments, its f32 master
//! weight and its bf16 working copy are read and written once (`adamw.cu`). The composed
//! candle ops took about twelve kernels and temporaries per parameter (178 ms of a 1.1 s
//! ViT-B/32 step on an H200, `docs/gpu/throughput-vit-b-32-h200.txt`).
//!
//! The kernel is compiled at start-up by NVRTC for the device's compute capability, so the
//! build needs no CUDA compiler and the PTX matches the GPU it runs on.

use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Storage, Tensor};

use super::{AdamWConfig, Slot};
use crate::error::{Error, Result};

/// The kernel's CUDA source.
pub const SOURCE: &str = include_str!("adamw.cu");
const KERNEL: &str = "adamw_multi_tensor";
/// Elements per block: the source's `CHUNK`.
const CHUNK: usize = 4096;
const THREADS: u32 = 256;

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
    let mut desc: Vec<u64> = Vec::with_capacity(8 * slots.len());
    let mut blocks = 0usize;
    for (slot, g) in slots.iter().zip(grads) {
        let w = slot.var.as_tensor();
        let n = w.elem_count();
        if n == 0 {
            continue;
        }
        desc.extend([
            address::<f32>(w, &stream)?,
            address::<f32>(&slot.m, &stream)?,
            address::<f32>(&slot.v, &stream)?,
            address::<f32>(g, &stream)?,
            match &slot.working {
                Some(copy) => address::<half::bf16>(copy.as_tensor(), &stream)?,
                None => 0,
            },
            n as u64,
            blocks as u64,
            u64::from(slot.decay),
        ]);
        blocks += n.div_ceil(CHUNK);
    }
    if blocks == 0 {
        return Ok(());
    }
    let tensors = (desc.len() / 8) as i32;
    let desc = device.clone_htod(&desc)?;
    let (major, minor) = stream
        .context()
        .compute_capability()
        .map_err(|e| Error::Cuda(format!("the GPU's compute capability: {e:?}")))?;
    let func = device.get_or_load_custom_func(KERNEL, "mmpipe_adamw", &ptx(major, minor)?)?;
    // The scalars rounded to f32 as the CPU path rounds them (from f64).
    let f = |x: f64| x as f32;
    let decay = f(1.0 - lr * c.weight_decay);
    let args = [
        f(lr),
        f(c.beta1),
        f(1.0 - c.beta1),
        f(c.beta2),
        f(1.0 - c.beta2),
        f(c.eps),
        f(1.0 / bias1),
        f(1.0 / bias2),
        decay,
    ];
    let mut launch = func.builder();
    launch.arg(&desc);
    launch.arg(&tensors);
    for a in &args {
        launch.arg(a);
    }
    let config = LaunchConfig {
        grid_dim: (
            u32::try_from(blocks).map_err(|_| Error::Cuda("AdamW: too many blocks".into()))?,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every address is a live f32 (bf16 for copies) buffer of `n` elements on this
    // stream's device, held by `slots` and `grads` until the launch is done (the stream
    // orders it before any later use or free); the arguments match the kernel's signature.
    unsafe { launch.launch(config) }
        .map_err(|e| Error::Cuda(format!("the GPU AdamW kernel did not launch: {e:?}")))?;
    // `desc` is freed in stream order, after the kernel has read it.
    Ok(())
}
