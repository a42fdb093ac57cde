//! The fused ops' CUDA kernels, with their own backward: layer norm (`layer_norm.cu`),
//! exact and quick GELU with an optional bias (`gelu.cu`) and softmax (`softmax.cu`), over
//! what they share (`kernels.cuh`), launched as `plan.rs` lays out; flash attention for
//! bf16 heads of 64 (`flash_attention.cu`); and otherwise attention's GEMMs through cuBLAS
//! on the heads in place as `head_gemms.rs` lays out.
//! One pass over memory forward and one or two backward, where candle's composition of
//! small ops launches a kernel and makes a pass per op (GELU through `erf` was eight, and
//! two casts under bf16).
//!
//! The kernels are compiled at start-up by NVRTC for the device's compute capability, as
//! the AdamW kernel is (`src/train/optim/cuda.rs`): the build needs no CUDA compiler.
//! Their workbench (`tests/suite/fused.rs`, `cuda` module) checks them against the plain
//! ops on fresh random inputs and times both; `scripts/gpu-check.sh` runs it.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::Tensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage};

use crate::error::Result;

use super::head_gemms::{self, Dims, Operand, Stage};
use super::plan::{self, Buffer, Plan, Values, SOURCE};

/// The module name the kernels load under, once per device.
const MODULE: &str = "mmpipe_fused";

/// The kernels as PTX for compute capability `major.minor` (9.0: H100, H200), compiled by
/// NVRTC once per process and capability. No GPU is needed to compile.
pub fn ptx(major: i32, minor: i32) -> Result<String> {
    crate::comm::device::nvrtc_ptx(SOURCE, "src/model/fused/*.cu", true, major, minor)
}

fn cuda_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("a fused CUDA kernel: {e:?}"))
}

/// The kernels' element type for values of `dtype`.
fn values(dtype: DType) -> candle_core::Result<Values> {
    match dtype {
        DType::F32 => Ok(Values::F32),
        DType::BF16 => Ok(Values::Bf16),
        other => Err(cuda_err(format!("values of {other:?}"))),
    }
}

/// The device address of a storage's element at `layout`'s start (contiguous layouts
/// only), whatever its dtype (f32, bf16, or u32 ids).
fn storage_address(
    s: &CudaStorage,
    layout: &Layout,
    stream: &CudaStream,
) -> candle_core::Result<u64> {
    fn at<T: CudaDType>(
        s: &CudaStorage,
        layout: &Layout,
        stream: &CudaStream,
    ) -> candle_core::Result<u64> {
        let (base, _sync) = s.as_cuda_slice::<T>()?.device_ptr(stream);
        Ok(base + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
    }
    if !layout.is_contiguous() {
        return Err(cuda_err("a strided input"));
    }
    match s.dtype() {
        DType::F32 => at::<f32>(s, layout, stream),
        DType::BF16 => at::<half::bf16>(s, layout, stream),
        DType::U32 => at::<u32>(s, layout, stream),
        other => Err(cuda_err(format!("values of {other:?}"))),
    }
}

/// The device address of a (contiguous) tensor's first element.
fn tensor_address(t: &Tensor, stream: &CudaStream) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(cuda_err("a tensor off the GPU"));
    };
    storage_address(s, layout, stream)
}

/// The address of a buffer the kernels write or read whole.
fn slice_address<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// A fresh output of `n` values of `dtype` (f32 or bf16), and its address, for a kernel
/// that writes every element.
fn output(device: &CudaDevice, dtype: DType, n: usize) -> candle_core::Result<(CudaStorage, u64)> {
    fn of<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        device: &CudaDevice,
        n: usize,
    ) -> candle_core::Result<(CudaStorage, u64)> {
        // SAFETY: every caller's kernel writes every element before anything reads it.
        let slice = unsafe { device.alloc::<T>(n)? };
        let at = slice_address(&slice, &device.cuda_stream());
        Ok((CudaStorage::wrap_cuda_slice(slice, device.clone()), at))
    }
    match dtype {
        DType::BF16 => of::<half::bf16>(device, n),
        _ => of::<f32>(device, n),
    }
}

/// A fresh tensor of `shape` (f32 or bf16) for kernels that write every element of it:
/// not zeroed, since a memset would be one more pass over memory for nothing (the emulator
/// tests hand these buffers in filled with NaN: `tests/suite/kernels.rs`). Zeroed where no
/// kernel runs (`written` false: an op over no rows, whose reduction is then zero).
fn written_whole(
    shape: &Shape,
    dtype: DType,
    device: &CudaDevice,
    written: bool,
) -> candle_core::Result<Tensor> {
    if !written {
        return Tensor::zeros(shape, dtype, &candle_core::Device::Cuda(device.clone()));
    }
    let (storage, _) = output(device, dtype, shape.elem_count())?;
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape.clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

fn blocks(n: usize) -> candle_core::Result<u32> {
    u32::try_from(n).map_err(|_| cuda_err(format!("{n} blocks")))
}

/// Runs `plan` on `device`'s stream, each launch's threads a block, its buffers at `addresses` and its
/// scratch buffers allocated (zeroed) here.
///
/// Every caller passes addresses of live buffers on this device of the sizes the plan's
/// op reads and writes (`plan.rs` says which), held until the stream has run the kernels
/// (a tensor's memory is freed in stream order); the plan holds the arguments in each
/// kernel's signature's order (the emulator's tests check both).
fn run(device: &CudaDevice, plan: &Plan, addresses: &[(Buffer, u64)]) -> candle_core::Result<()> {
    if plan.launches.is_empty() {
        return Ok(());
    }
    let stream = device.cuda_stream();
    let (major, minor) = stream.context().compute_capability().map_err(cuda_err)?;
    let ptx = ptx(major, minor).map_err(cuda_err)?;
    let scratch = plan
        .scratch
        .iter()
        .map(|&(b, len)| {
            let t = Tensor::zeros(len, DType::F32, &candle_core::Device::Cuda(device.clone()))?;
            Ok((b, t))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut at: Vec<(Buffer, u64)> = addresses.to_vec();
    for (b, t) in &scratch {
        at.push((*b, tensor_address(t, &stream)?));
    }
    let address = |b: Buffer| {
        at.iter()
            .find(|(role, _)| *role == b)
            .map(|(_, a)| *a)
            .ok_or_else(|| cuda_err(format!("no {b:?} buffer for the plan")))
    };
    for l in &plan.launches {
        let func = device.get_or_load_custom_func(&l.kernel, MODULE, &ptx)?;
        let mut builder = func.builder();
        // The values live until the launch (the builder holds references).
        let mut values: Vec<Value> = Vec::with_capacity(l.args.len());
        for a in &l.args {
            values.push(match *a {
                plan::Arg::Address(b) => Value::U64(address(b)?),
                plan::Arg::Null => Value::U64(0),
                plan::Arg::I64(v) => Value::I64(v),
                plan::Arg::I32(v) => Value::I32(v),
                plan::Arg::F32(v) => Value::F32(v),
            });
        }
        for v in &values {
            match v {
                Value::U64(v) => builder.arg(v),
                Value::I64(v) => builder.arg(v),
                Value::I32(v) => builder.arg(v),
                Value::F32(v) => builder.arg(v),
            };
        }
        let config = LaunchConfig {
            grid_dim: (blocks(l.grid.0)?, blocks(l.grid.1)?, 1),
            block_dim: (l.threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as the function's contract says (every caller below keeps it).
        unsafe { builder.launch(config) }.map_err(cuda_err)?;
    }
    // `scratch` is freed after this, in stream order: after the kernels.
    drop(scratch);
    Ok(())
}

/// A kernel argument's value.
enum Value {
    U64(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

// Layer norm.

/// Whether the CUDA layer norm takes these: a contiguous f32 or bf16 input on a GPU, f32
/// weight and bias of its last dimension's width there (a norm returns f32 under
/// autocast; other combinations take the plain ops).
pub fn layer_norm_applies(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    let width = x.dims().last().copied().unwrap_or(0);
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && width > 0
        && [weight, bias].iter().all(|t| {
            t.dtype() == DType::F32 && t.dims() == [width] && t.device().same_device(x.device())
        })
}

/// Layer norm over the last dimension on the GPU (what [`layer_norm_applies`] accepted),
/// its backward by the kernels too. `out` is f32, or bf16 for a norm read only by a bf16
/// matrix product: the f32 output rounded as the kernel writes it, bit for bit what a cast
/// of the f32 output gives, without that output (kept alive by the graph until backward)
/// or the cast's pass.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    out: DType,
) -> Result<Tensor> {
    if !matches!(out, DType::F32 | DType::BF16) {
        return Err(cuda_err(format!(
            "the CUDA layer norm writes f32 or bf16, not {out:?}"
        ))
        .into());
    }
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm {
            eps,
            out,
            stats: Mutex::new(None),
        },
    )?)
}

struct LayerNorm {
    eps: f32,
    /// The output's dtype: f32 or bf16.
    out: DType,
    /// Each row's mean and 1/σ from forward, on the GPU.
    stats: Mutex<Option<CudaSlice<f32>>>,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "cuda-layer-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA layer norm called on CPU tensors"))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        let stream = device.cuda_stream();
        let width = lw.shape().elem_count();
        let n = lx.shape().elem_count();
        if width == 0 || !n.is_multiple_of(width) || lb.shape().elem_count() != width {
            return Err(cuda_err(format!(
                "layer norm of {n} values, weight {width}"
            )));
        }
        let rows = n / width;
        // SAFETY: the kernel writes every element of both before anything reads them.
        let stats = unsafe { device.alloc::<f32>(2 * rows)? };
        let (y, y_at) = output(&device, self.out, n)?;
        let plan =
            plan::layer_norm_forward(values(x.dtype())?, values(self.out)?, rows, width, self.eps);
        let addresses = [
            (Buffer::Input, storage_address(x, lx, &stream)?),
            (Buffer::Weight, storage_address(w, lw, &stream)?),
            (Buffer::Bias, storage_address(b, lb, &stream)?),
            (Buffer::Output, y_at),
            (Buffer::Stats, slice_address(&stats, &stream)),
        ];
        run(&device, &plan, &addresses)?;
        *self.stats.lock().expect("layer norm statistics") = Some(stats);
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().expect("layer norm statistics");
        let stats = stats
            .as_ref()
            .ok_or_else(|| cuda_err("layer norm backward before forward"))?;
        let device = x.device().as_cuda_device()?.clone();
        let stream = device.cuda_stream();
        let width = w.elem_count();
        let rows = x.elem_count() / width;
        // A norm that wrote bf16 gets a bf16 gradient, which the kernels read as it is;
        // any other, in f32. Bound here, so that no copy is freed before they read it.
        let grad = match dy.dtype() {
            DType::BF16 => Values::Bf16,
            _ => Values::F32,
        };
        let dy = match grad {
            Values::Bf16 => dy.contiguous()?,
            Values::F32 => dy.to_dtype(DType::F32)?.contiguous()?,
        };
        let w = w.contiguous()?;
        let dx = written_whole(x.shape(), x.dtype(), &device, rows > 0)?;
        let dw = written_whole(w.shape(), DType::F32, &device, rows > 0)?;
        let db = written_whole(w.shape(), DType::F32, &device, rows > 0)?;
        if rows == 0 {
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let plan = plan::layer_norm_backward(values(x.dtype())?, grad, rows, width);
        let addresses = [
            (Buffer::Input, tensor_address(x, &stream)?),
            (Buffer::Weight, tensor_address(&w, &stream)?),
            (Buffer::OutputGrad, tensor_address(&dy, &stream)?),
            (Buffer::Stats, slice_address(stats, &stream)),
            (Buffer::InputGrad, tensor_address(&dx, &stream)?),
            (Buffer::WeightGrad, tensor_address(&dw, &stream)?),
            (Buffer::BiasGrad, tensor_address(&db, &stream)?),
        ];
        run(&device, &plan, &addresses)?;
        // `w` and `dy` are freed after this, in stream order: after the kernels.
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

// GELU.

/// Whether the CUDA GELU takes these: contiguous-able f32 or bf16 values on a GPU, and a
/// bias (if any) of the same dtype and of their last dimension's width there.
pub fn gelu_applies(y: &Tensor, bias: Option<&Tensor>) -> bool {
    let width = y.dims().last().copied().unwrap_or(0);
    y.device().is_cuda()
        && matches!(y.dtype(), DType::F32 | DType::BF16)
        && y.elem_count() > 0
        && bias.is_none_or(|b| {
            b.dtype() == y.dtype() && b.dims() == [width] && b.device().same_device(y.device())
        })
}

/// GELU (`act`: exact or quick) of `y` (+ `bias` on its rows) on the GPU (what
/// [`gelu_applies`] accepted), in `y`'s dtype, its backward by the kernels too.
pub fn gelu(act: plan::Gelu, y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = y.contiguous()?;
    Ok(match bias {
        Some(b) => y.apply_op2(&b.contiguous()?, Gelu { act })?,
        None => y.apply_op1(Gelu { act })?,
    })
}

struct Gelu {
    act: plan::Gelu,
}

impl Gelu {
    fn fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        bias: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = y.device().clone();
        let stream = device.cuda_stream();
        let n = ly.shape().elem_count();
        let width = ly.shape().dims().last().copied().unwrap_or(1).max(1);
        let (storage, out_at) = output(&device, y.dtype(), n)?;
        let plan = plan::gelu_forward(self.act, values(y.dtype())?, n, width, bias.is_some());
        let mut addresses = vec![
            (Buffer::Input, storage_address(y, ly, &stream)?),
            (Buffer::Output, out_at),
        ];
        if let Some((b, lb)) = bias {
            addresses.push((Buffer::Bias, storage_address(b, lb, &stream)?));
        }
        run(&device, &plan, &addresses)?;
        Ok((storage, ly.shape().clone()))
    }

    /// (∂/∂y, ∂/∂bias when there is one).
    fn backward(
        &self,
        y: &Tensor,
        bias: Option<&Tensor>,
        dz: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let device = y.device().as_cuda_device()?.clone();
        let stream = device.cuda_stream();
        let n = y.elem_count();
        let width = y.dims().last().copied().unwrap_or(1).max(1);
        // Bound here, so that no copy is freed before the kernels have read it.
        let g = dz.to_dtype(y.dtype())?.contiguous()?;
        let dy = written_whole(y.shape(), y.dtype(), &device, n > 0)?;
        let dbias = match bias {
            Some(b) => Some(written_whole(b.shape(), b.dtype(), &device, n > 0)?),
            None => None,
        };
        let plan = plan::gelu_backward(self.act, values(y.dtype())?, n, width, bias.is_some());
        let mut addresses = vec![
            (Buffer::Input, tensor_address(y, &stream)?),
            (Buffer::OutputGrad, tensor_address(&g, &stream)?),
            (Buffer::InputGrad, tensor_address(&dy, &stream)?),
        ];
        if let (Some(b), Some(db)) = (bias, &dbias) {
            addresses.push((Buffer::Bias, tensor_address(b, &stream)?));
            addresses.push((Buffer::BiasGrad, tensor_address(db, &stream)?));
        }
        run(&device, &plan, &addresses)?;
        // `g` is freed after this, in stream order: after the kernels.
        Ok((dy, dbias))
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "cuda-gelu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA GELU called on CPU tensors"))
    }

    fn cuda_fwd(&self, y: &CudaStorage, ly: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd(y, ly, None)
    }

    fn bwd(&self, y: &Tensor, _: &Tensor, dz: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(y, None, dz)?.0))
    }
}

impl CustomOp2 for Gelu {
    fn name(&self) -> &'static str {
        "cuda-gelu-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA GELU called on CPU tensors"))
    }

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd(y, ly, Some((b, lb)))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        dz: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dy, dbias) = self.backward(y, Some(bias), dz)?;
        Ok((Some(dy), dbias))
    }
}

// Softmax.

/// Whether the CUDA softmax takes `x`: f32 or bf16 values on a GPU.
pub fn softmax_applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16) && x.elem_count() > 0
}

/// Softmax over the last dimension on the GPU (what [`softmax_applies`] accepted), in
/// `x`'s dtype computing in f32, its backward by the kernels too.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "cuda-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA softmax called on CPU tensors"))
    }

    fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        let stream = device.cuda_stream();
        let n = lx.shape().elem_count();
        let width = lx.shape().dims().last().copied().unwrap_or(1).max(1);
        let (storage, out_at) = output(&device, x.dtype(), n)?;
        let plan = plan::softmax_forward(values(x.dtype())?, n / width, width);
        let addresses = [
            (Buffer::Input, storage_address(x, lx, &stream)?),
            (Buffer::Output, out_at),
        ];
        run(&device, &plan, &addresses)?;
        Ok((storage, lx.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let device = y.device().as_cuda_device()?.clone();
        let stream = device.cuda_stream();
        let width = y.dims().last().copied().unwrap_or(1).max(1);
        // Bound here, so that no copy is freed before the kernel has read it.
        let (y, g) = (y.contiguous()?, dy.to_dtype(y.dtype())?.contiguous()?);
        let dx = written_whole(y.shape(), y.dtype(), &device, y.elem_count() > 0)?;
        let plan = plan::softmax_backward(values(y.dtype())?, y.elem_count() / width, width);
        let addresses = [
            (Buffer::Output, tensor_address(&y, &stream)?),
            (Buffer::OutputGrad, tensor_address(&g, &stream)?),
            (Buffer::InputGrad, tensor_address(&dx, &stream)?),
        ];
        run(&device, &plan, &addresses)?;
        Ok(Some(dx))
    }
}

// Attention's softmax.

/// Whether the CUDA attention softmax takes these raw scores `[n·heads, len, len]`: f32
/// on a GPU, and a mask (if any) `[n or 1, len or 1, len]` there.
pub fn attention_softmax_applies(scores: &Tensor, mask: Option<&Tensor>) -> bool {
    let Ok((_, q, k)) = scores.dims3() else {
        return false;
    };
    scores.device().is_cuda()
        && scores.dtype() == DType::F32
        && q == k
        && k > 0
        && mask.is_none_or(|m| {
            m.rank() == 3 && m.dims()[2] == k && m.device().same_device(scores.device())
        })
}

/// `softmax(scale · scores + mask)` over the keys, the mask `[n or 1, len or 1, len]`
/// broadcast over the heads (and over samples or queries where it is 1): one pass forward
/// and one backward (what [`attention_softmax_applies`] accepted). f32 out.
pub fn attention_softmax(
    scores: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (rows, len, _) = scores.dims3()?;
    let op = |strides| AttentionSoftmax {
        heads,
        scale: scale as f32,
        strides,
        samples: rows / heads.max(1),
    };
    let scores = scores.contiguous()?;
    Ok(match mask {
        Some(m) => {
            let strides = mask_strides(m, len)?;
            let m = m.to_dtype(DType::F32)?.contiguous()?;
            scores.apply_op2(&m, op(Some(strides)))?
        }
        None => scores.apply_op1(op(None))?,
    })
}

/// How a mask `[n or 1, len or 1, len]` broadcasts over samples and queries.
fn mask_strides(mask: &Tensor, len: usize) -> Result<plan::MaskStrides> {
    let (b, q, _) = mask.dims3()?;
    Ok(plan::MaskStrides {
        sample: if b > 1 { q * len } else { 0 },
        query: if q > 1 { len } else { 0 },
    })
}

struct AttentionSoftmax {
    heads: usize,
    scale: f32,
    strides: Option<plan::MaskStrides>,
    samples: usize,
}

impl AttentionSoftmax {
    fn fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        mask: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = s.device().clone();
        let stream = device.cuda_stream();
        let (rows, len, _) = ls.shape().dims3()?;
        if let Some((_, lm)) = mask {
            let (b, _, _) = lm.shape().dims3()?;
            if !(b == 1 || b == self.samples) || rows != self.samples * self.heads {
                return Err(cuda_err(format!(
                    "an attention mask {:?} for {rows} score rows of {} heads",
                    lm.shape().dims(),
                    self.heads
                )));
            }
        }
        let n = ls.shape().elem_count();
        // SAFETY: the kernel writes every element before anything reads it.
        let probs = unsafe { device.alloc::<f32>(n)? };
        let plan =
            plan::attention_softmax_forward(rows * len, len, self.heads, self.strides, self.scale);
        let mut addresses = vec![
            (Buffer::Input, storage_address(s, ls, &stream)?),
            (Buffer::Output, slice_address(&probs, &stream)),
        ];
        if let Some((m, lm)) = mask {
            addresses.push((Buffer::Mask, storage_address(m, lm, &stream)?));
        }
        run(&device, &plan, &addresses)?;
        Ok((
            CudaStorage::wrap_cuda_slice(probs, device),
            ls.shape().clone(),
        ))
    }

    fn backward(&self, probs: &Tensor, dp: &Tensor) -> candle_core::Result<Tensor> {
        let device = probs.device().as_cuda_device()?.clone();
        let stream = device.cuda_stream();
        let (rows, len, _) = probs.dims3()?;
        // Bound here, so that no copy is freed before the kernel has read it.
        let (p, g) = (probs.contiguous()?, dp.to_dtype(DType::F32)?.contiguous()?);
        let ds = written_whole(p.shape(), DType::F32, &device, p.elem_count() > 0)?;
        let plan = plan::attention_softmax_backward(Values::F32, rows * len, len, self.scale);
        let addresses = [
            (Buffer::Output, tensor_address(&p, &stream)?),
            (Buffer::OutputGrad, tensor_address(&g, &stream)?),
            (Buffer::InputGrad, tensor_address(&ds, &stream)?),
        ];
        run(&device, &plan, &addresses)?;
        Ok(ds)
    }
}

impl CustomOp1 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "cuda-attention-softmax"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA attention softmax called on CPU tensors"))
    }

    fn cuda_fwd(&self, s: &CudaStorage, ls: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd(s, ls, None)
    }

    fn bwd(&self, _: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(p, dp)?))
    }
}

impl CustomOp2 for AttentionSoftmax {
    fn name(&self) -> &'static str {
        "cuda-attention-softmax-masked"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA attention softmax called on CPU tensors"))
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        m: &CudaStorage,
        lm: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.fwd(s, ls, Some((m, lm)))
    }

    /// The mask is a constant: no gradient.
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        p: &Tensor,
        dp: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.backward(p, dp)?), None))
    }
}

// Attention, its GEMMs on the heads in place.

/// Whether the CUDA attention takes these: packed projections `[n, len, 3·w]` of f32 or
/// bf16 on a GPU, and a mask (if any) `[n or 1, len or 1, len]` there.
pub fn attention_applies(qkv: &Tensor, mask: Option<&Tensor>) -> bool {
    let Ok((n, len, width3)) = qkv.dims3() else {
        return false;
    };
    qkv.device().is_cuda()
        && matches!(qkv.dtype(), DType::F32 | DType::BF16)
        && n * len * width3 > 0
        && mask.is_none_or(|m| {
            m.rank() == 3 && m.dims()[2] == len && m.device().same_device(qkv.device())
        })
}

/// `softmax(q kᵀ/√d + mask) v` with the heads merged, `[n, len, w]`, from the packed
/// projections (what [`attention_applies`] accepted; `fused::attention` checks the
/// shapes): the GEMMs read and write the heads in place (`head_gemms.rs`), the scores in
/// f32 whatever the values' dtype, the softmax with its scale and mask in one kernel each
/// way. Backward alike: two GEMMs, the softmax's backward, two more, into one gradient.
pub fn attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (n, len, width3) = qkv.dims3()?;
    let dims = Dims {
        n,
        len,
        heads,
        width: width3 / 3,
    };
    let (mask, strides) = match mask {
        Some(m) => (
            Some(m.to_dtype(DType::F32)?.contiguous()?),
            Some(mask_strides(m, len)?),
        ),
        None => (None, None),
    };
    let op = HeadsAttention {
        dims,
        softmax: AttentionSoftmax {
            heads,
            scale: (1.0 / (dims.head() as f64).sqrt()) as f32,
            strides,
            samples: n,
        },
        mask,
        probs: Mutex::new(None),
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

struct HeadsAttention {
    dims: Dims,
    softmax: AttentionSoftmax,
    /// f32, contiguous, on the GPU.
    mask: Option<Tensor>,
    /// The probabilities `[n, heads, len, len]` from forward, for backward, in the values'
    /// dtype: the GEMMs' operand, which the softmax's backward reads too (bf16 keeps no f32
    /// copy of them).
    probs: Mutex<Option<CudaStorage>>,
}

impl HeadsAttention {
    fn scores_layout(&self) -> Layout {
        let Dims { n, len, heads, .. } = self.dims;
        Layout::contiguous((n * heads, len, len))
    }

    fn check(&self, what: &str, layout: &Layout, operand: Operand) -> candle_core::Result<()> {
        if layout.shape().elem_count() != self.dims.size(operand) {
            return Err(cuda_err(format!(
                "attention's {what} of shape {:?} for {:?}",
                layout.shape().dims(),
                self.dims
            )));
        }
        Ok(())
    }
}

/// Runs one stage of attention's GEMMs (`head_gemms.rs`: a cuBLAS call per head) on
/// `device`'s stream, its inputs found by operand, its output written whole (beta 0).
fn head_gemms(
    device: &CudaDevice,
    stage: Stage,
    dims: Dims,
    inputs: &[(Operand, u64, DType)],
    output: (u64, DType),
) -> candle_core::Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    let input = |operand: Operand| {
        inputs
            .iter()
            .find(|(o, ..)| *o == operand)
            .map(|&(_, at, dtype)| (at, dtype))
            .ok_or_else(|| cuda_err(format!("no {operand:?} input for attention's {stage:?}")))
    };
    let data_type = |dtype: DType| match dtype {
        DType::F32 => Ok(sys::cudaDataType_t::CUDA_R_32F),
        DType::BF16 => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        other => Err(cuda_err(format!("attention GEMMs on {other:?}"))),
    };
    let op = |transposed: bool| {
        if transposed {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let address = |(base, dtype): (u64, DType), arg: &head_gemms::Arg| {
        base + (arg.offset * dtype.size_in_bytes()) as u64
    };
    let blas = device.cublas_handle();
    let (alpha, beta) = (1f32, 0f32);
    for call in head_gemms::calls(stage, dims) {
        let (a, b) = (input(call.a.operand)?, input(call.b.operand)?);
        // TF32 where the precision policy allows it for f32 GEMMs (as candle's matmul);
        // bf16 operands multiply exactly into f32 sums.
        let compute =
            if a.1 == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32() {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            };
        // SAFETY: the callers pass live buffers of `dims`' sizes (checked against their
        // layouts), which every call stays inside (`head_gemms::cublas_reference` checks
        // the same calls' bounds in the tests); cuBLAS runs on the buffers' stream.
        unsafe {
            result::gemm_strided_batched_ex(
                *blas.handle(),
                op(call.transa),
                op(call.transb),
                call.m,
                call.n,
                call.k,
                &alpha as *const f32 as *const std::ffi::c_void,
                address(a, &call.a) as *const std::ffi::c_void,
                data_type(a.1)?,
                call.a.ld,
                call.a.stride,
                address(b, &call.b) as *const std::ffi::c_void,
                data_type(b.1)?,
                call.b.ld,
                call.b.stride,
                &beta as *const f32 as *const std::ffi::c_void,
                address(output, &call.c) as *mut std::ffi::c_void,
                data_type(output.1)?,
                call.c.ld,
                call.c.stride,
                call.batch,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(cuda_err)?;
    }
    Ok(())
}

impl CustomOp1 for HeadsAttention {
    fn name(&self) -> &'static str {
        "cuda-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA attention called on CPU tensors"))
    }

    fn cuda_fwd(&self, qkv: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.check("input", l, Operand::Packed)?;
        let device = qkv.device().clone();
        let stream = device.cuda_stream();
        let (dims, dtype) = (self.dims, qkv.dtype());
        let packed = (Operand::Packed, storage_address(qkv, l, &stream)?, dtype);
        // SAFETY: the GEMMs write every element before the softmax reads it.
        let raw = unsafe { device.alloc::<f32>(dims.size(Operand::Scores))? };
        let raw_at = slice_address(&raw, &stream);
        head_gemms(
            &device,
            Stage::Scores,
            dims,
            &[packed],
            (raw_at, DType::F32),
        )?;
        let raw = CudaStorage::wrap_cuda_slice(raw, device.clone());
        let scores = self.scores_layout();
        let (exact, _) = match &self.mask {
            Some(m) => {
                let (storage, layout) = m.storage_and_layout();
                let Storage::Cuda(ms) = &*storage else {
                    return Err(cuda_err("an attention mask off the GPU"));
                };
                self.softmax.fwd(&raw, &scores, Some((ms, layout)))?
            }
            None => self.softmax.fwd(&raw, &scores, None)?,
        };
        let probs = match dtype {
            DType::F32 => exact,
            other => exact.to_dtype(&scores, other)?,
        };
        let (out, out_at) = output(&device, dtype, dims.size(Operand::Merged))?;
        let inputs = [
            (
                Operand::Scores,
                storage_address(&probs, &scores, &stream)?,
                dtype,
            ),
            packed,
        ];
        head_gemms(&device, Stage::Mix, dims, &inputs, (out_at, dtype))?;
        *self.probs.lock().expect("attention probabilities") = Some(probs);
        // `raw` (and in bf16 the f32 probabilities) is freed after this, in stream order:
        // after the kernels.
        Ok((out, Shape::from((dims.n, dims.len, dims.width))))
    }

    fn bwd(&self, qkv: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(qkv.dtype())?.contiguous()?;
        // The gradient as an op of its own: its output needs no zero fill first.
        Ok(Some(
            qkv.contiguous()?
                .apply_op2_no_bwd(&g, &HeadsAttentionGrad { op: self })?,
        ))
    }
}

/// Attention's backward: the packed projections' gradient `[n, len, 3·w]` from them and
/// the output's gradient.
struct HeadsAttentionGrad<'a> {
    op: &'a HeadsAttention,
}

impl CustomOp2 for HeadsAttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "cuda-attention-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err(
            "the CUDA attention gradient called on CPU tensors",
        ))
    }

    fn cuda_fwd(
        &self,
        qkv: &CudaStorage,
        lq: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.op;
        op.check("input", lq, Operand::Packed)?;
        op.check("output gradient", lg, Operand::Merged)?;
        let probs = op.probs.lock().expect("attention probabilities");
        let probs = probs
            .as_ref()
            .ok_or_else(|| cuda_err("attention backward before forward"))?;
        let device = qkv.device().clone();
        let stream = device.cuda_stream();
        let (dims, dtype) = (op.dims, qkv.dtype());
        let scores = op.scores_layout();
        let packed = (Operand::Packed, storage_address(qkv, lq, &stream)?, dtype);
        let merged = (Operand::Merged, storage_address(g, lg, &stream)?, dtype);
        let p = (
            Operand::Scores,
            storage_address(probs, &scores, &stream)?,
            dtype,
        );
        // dv, dq and dk cover every element of the packed gradient between them.
        let (dqkv, dqkv_at) = output(&device, dtype, dims.size(Operand::Packed))?;
        head_gemms(
            &device,
            Stage::ValueGrad,
            dims,
            &[p, merged],
            (dqkv_at, dtype),
        )?;
        // SAFETY: the GEMM writes every element before the softmax's backward reads it.
        let dp = unsafe { device.alloc::<f32>(dims.size(Operand::Scores))? };
        let dp_at = slice_address(&dp, &stream);
        head_gemms(
            &device,
            Stage::ProbsGrad,
            dims,
            &[merged, packed],
            (dp_at, DType::F32),
        )?;
        // The scores' gradient in the values' dtype, the GEMMs' operand, from the kernel.
        let (ds, ds_at) = output(&device, dtype, dims.size(Operand::Scores))?;
        let (rows, len) = (dims.n * dims.heads * dims.len, dims.len);
        let plan = plan::attention_softmax_backward(values(dtype)?, rows, len, op.softmax.scale);
        let addresses = [
            (Buffer::Output, p.1),
            (Buffer::OutputGrad, dp_at),
            (Buffer::InputGrad, ds_at),
        ];
        run(&device, &plan, &addresses)?;
        let inputs = [
            (
                Operand::Scores,
                storage_address(&ds, &scores, &stream)?,
                dtype,
            ),
            packed,
        ];
        head_gemms(&device, Stage::QueryGrad, dims, &inputs, (dqkv_at, dtype))?;
        head_gemms(&device, Stage::KeyGrad, dims, &inputs, (dqkv_at, dtype))?;
        // `dp` and `ds` are freed after this, in stream order.
        Ok((dqkv, lq.shape().clone()))
    }
}

// Flash attention.

/// Whether flash attention (`flash_attention.cu`) takes these: what [`attention_applies`]
/// takes, in bf16, in heads of `plan::FLASH_HEAD` values.
pub fn flash_attention_applies(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> bool {
    let Ok((_, _, width3)) = qkv.dims3() else {
        return false;
    };
    attention_applies(qkv, mask)
        && qkv.dtype() == DType::BF16
        && heads > 0
        && width3 % (3 * heads) == 0
        && plan::flash_attention_takes(width3 / 3 / heads)
}

/// The bytes flash attention's kernels copy at once (`cp.async`'s 16: eight bf16s), to which
/// the packed projections and the output's gradient must be aligned.
const FLASH_ALIGN: usize = 16;

/// `t` (bf16, contiguous) starting on a 16-byte boundary: itself when it does (a fresh
/// allocation, or a view at a multiple of 8 elements), else a copy into a fresh one
/// (`Tensor::copy` would keep the view's offset). A GPU faults on a cp.async source off a
/// 16-byte boundary.
fn flash_aligned(t: Tensor) -> candle_core::Result<Tensor> {
    if (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(FLASH_ALIGN) {
        Ok(t)
    } else {
        t.force_contiguous()
    }
}

/// `softmax(q kᵀ/√d + mask) v` with the heads merged, `[n, len, w]` bf16, by the flash
/// kernels (what [`flash_attention_applies`] accepted; `fused::attention` checks the
/// shapes): the scores and probabilities stay in registers, forward keeps one
/// log-sum-exp a query row (`n · heads · len` floats, where [`attention`] keeps `n · heads
/// · len²` probabilities), and backward recomputes the probabilities from it.
pub fn flash_attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (samples, len, width3) = qkv.dims3()?;
    let (mask, strides) = match mask {
        Some(m) => (
            Some(m.to_dtype(DType::F32)?.contiguous()?),
            Some(mask_strides(m, len)?),
        ),
        None => (None, None),
    };
    let op = FlashAttention {
        samples,
        len,
        heads,
        width: width3 / 3,
        scale: (1.0 / (plan::FLASH_HEAD as f64).sqrt()) as f32,
        strides,
        mask,
        lse: Mutex::new(None),
    };
    Ok(flash_aligned(qkv.contiguous()?)?.apply_op1(op)?)
}

struct FlashAttention {
    samples: usize,
    len: usize,
    heads: usize,
    width: usize,
    scale: f32,
    strides: Option<plan::MaskStrides>,
    /// f32, contiguous, on the GPU.
    mask: Option<Tensor>,
    /// Each query row's log-sum-exp `[n, heads, len]` from forward, for backward.
    lse: Mutex<Option<CudaSlice<f32>>>,
}

impl FlashAttention {
    fn check(&self, what: &str, layout: &Layout, elements: usize) -> candle_core::Result<()> {
        if layout.shape().elem_count() != elements {
            return Err(cuda_err(format!(
                "flash attention's {what} of shape {:?} for {} samples of {} positions, {} heads",
                layout.shape().dims(),
                self.samples,
                self.len,
                self.heads
            )));
        }
        Ok(())
    }

    fn packed(&self) -> usize {
        self.samples * self.len * 3 * self.width
    }

    fn merged(&self) -> usize {
        self.samples * self.len * self.width
    }

    /// The address of the packed projections or the output's gradient, which the kernels
    /// read 16 bytes at a time ([`flash_aligned`] made sure they can).
    fn aligned_address(
        &self,
        what: &str,
        t: &CudaStorage,
        layout: &Layout,
        stream: &CudaStream,
    ) -> candle_core::Result<u64> {
        let at = storage_address(t, layout, stream)?;
        if !at.is_multiple_of(FLASH_ALIGN as u64) {
            return Err(cuda_err(format!(
                "flash attention's {what} at {at:#x} (element {}), not on a {FLASH_ALIGN}-byte boundary",
                layout.start_offset()
            )));
        }
        Ok(at)
    }

    fn with_mask(
        &self,
        mut addresses: Vec<(Buffer, u64)>,
        stream: &CudaStream,
    ) -> candle_core::Result<Vec<(Buffer, u64)>> {
        if let Some(m) = &self.mask {
            addresses.push((Buffer::Mask, tensor_address(m, stream)?));
        }
        Ok(addresses)
    }
}

impl CustomOp1 for FlashAttention {
    fn name(&self) -> &'static str {
        "cuda-flash-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("CUDA flash attention called on CPU tensors"))
    }

    fn cuda_fwd(&self, qkv: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.check("input", l, self.packed())?;
        if qkv.dtype() != DType::BF16 {
            return Err(cuda_err(format!(
                "flash attention on {:?} projections",
                qkv.dtype()
            )));
        }
        let device = qkv.device().clone();
        let stream = device.cuda_stream();
        let (out, out_at) = output(&device, DType::BF16, self.merged())?;
        // SAFETY: the kernel writes every row's statistic before anything reads it.
        let lse = unsafe { device.alloc::<f32>(self.samples * self.heads * self.len)? };
        let addresses = self.with_mask(
            vec![
                (
                    Buffer::Input,
                    self.aligned_address("packed projections", qkv, l, &stream)?,
                ),
                (Buffer::Output, out_at),
                (Buffer::Stats, slice_address(&lse, &stream)),
            ],
            &stream,
        )?;
        let plan = plan::flash_attention_forward(
            self.samples,
            self.len,
            self.heads,
            self.strides,
            self.scale,
        );
        run(&device, &plan, &addresses)?;
        *self.lse.lock().expect("flash attention statistics") = Some(lse);
        Ok((out, Shape::from((self.samples, self.len, self.width))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = flash_aligned(grad.to_dtype(DType::BF16)?.contiguous()?)?;
        // The gradient as an op of its own: its output needs no zero fill first.
        Ok(Some(qkv.contiguous()?.apply_op3_no_bwd(
            &out.contiguous()?,
            &g,
            &FlashAttentionGrad { op: self },
        )?))
    }
}

/// Flash attention's backward: the packed projections' gradient `[n, len, 3·w]` (bf16)
/// from them, forward's output and statistics, and the output's gradient.
struct FlashAttentionGrad<'a> {
    op: &'a FlashAttention,
}

impl CustomOp3 for FlashAttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "cuda-flash-attention-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err(
            "the CUDA flash attention gradient called on CPU tensors",
        ))
    }

    fn cuda_fwd(
        &self,
        qkv: &CudaStorage,
        lq: &Layout,
        out: &CudaStorage,
        lo: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let op = self.op;
        op.check("input", lq, op.packed())?;
        op.check("output", lo, op.merged())?;
        op.check("output gradient", lg, op.merged())?;
        let lse = op.lse.lock().expect("flash attention statistics");
        let lse = lse
            .as_ref()
            .ok_or_else(|| cuda_err("flash attention backward before forward"))?;
        let device = qkv.device().clone();
        let stream = device.cuda_stream();
        // The dq kernel writes every position's query part, the dk/dv kernel its key and
        // value parts: every element.
        let (dqkv, dqkv_at) = output(&device, DType::BF16, op.packed())?;
        let addresses = op.with_mask(
            vec![
                (
                    Buffer::Input,
                    op.aligned_address("packed projections", qkv, lq, &stream)?,
                ),
                (Buffer::Output, storage_address(out, lo, &stream)?),
                (
                    Buffer::OutputGrad,
                    op.aligned_address("output gradient", g, lg, &stream)?,
                ),
                (Buffer::Stats, slice_address(lse, &stream)),
                (Buffer::InputGrad, dqkv_at),
            ],
            &stream,
        )?;
        let plan =
            plan::flash_attention_backward(op.samples, op.len, op.heads, op.strides, op.scale);
        run(&device, &plan, &addresses)?;
        Ok((dqkv, lq.shape().clone()))
    }
}

// The bias add and the residual add after a linear layer.

/// Whether the CUDA bias-and-residual add takes these: an f32 residual stream, a branch
/// `y` of f32 or bf16 of the same shape, and a bias of `y`'s dtype and last dimension's
/// width, on one GPU.
pub fn bias_residual_applies(stream: &Tensor, y: &Tensor, bias: &Tensor) -> bool {
    let width = y.dims().last().copied().unwrap_or(0);
    stream.device().is_cuda()
        && stream.dtype() == DType::F32
        && matches!(y.dtype(), DType::F32 | DType::BF16)
        && stream.dims() == y.dims()
        && width > 0
        && bias.dtype() == y.dtype()
        && bias.dims() == [width]
        && [y, bias]
            .iter()
            .all(|t| t.device().same_device(stream.device()))
}

/// `stream + (y + bias)` on the GPU (what [`bias_residual_applies`] accepted), f32 out,
/// its backward by the kernels too.
pub fn bias_residual(stream: &Tensor, y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(stream
        .contiguous()?
        .apply_op3(&y.contiguous()?, &bias.contiguous()?, BiasResidual)?)
}

struct BiasResidual;

impl CustomOp3 for BiasResidual {
    fn name(&self) -> &'static str {
        "cuda-bias-residual"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err(
            "the CUDA bias-and-residual add called on CPU tensors",
        ))
    }

    fn cuda_fwd(
        &self,
        stream_values: &CudaStorage,
        ls: &Layout,
        y: &CudaStorage,
        ly: &Layout,
        bias: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = y.device().clone();
        let stream = device.cuda_stream();
        let n = ly.shape().elem_count();
        let width = lb.shape().elem_count();
        if width == 0 || !n.is_multiple_of(width) || ls.shape().elem_count() != n {
            return Err(cuda_err(format!(
                "a residual add of {} values, branch {n}, bias {width}",
                ls.shape().elem_count()
            )));
        }
        let (out, out_at) = output(&device, DType::F32, n)?;
        let plan = plan::bias_residual_forward(values(y.dtype())?, n, width);
        let addresses = [
            (
                Buffer::Residual,
                storage_address(stream_values, ls, &stream)?,
            ),
            (Buffer::Input, storage_address(y, ly, &stream)?),
            (Buffer::Bias, storage_address(bias, lb, &stream)?),
            (Buffer::Output, out_at),
        ];
        run(&device, &plan, &addresses)?;
        Ok((out, ly.shape().clone()))
    }

    fn bwd(
        &self,
        _: &Tensor,
        y: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g, dy, dbias) = bias_residual_grads(g, y.dtype(), bias.elem_count())?;
        Ok((Some(g), Some(dy), Some(dbias)))
    }
}

/// The gradients of `stream + (y + bias)` from the output's `g`, with `y` and `bias` of
/// `dtype` and the bias `width` wide: the stream's (`g` in f32), the branch's (`g` rounded
/// to `dtype` by the kernel; in f32, `g` itself) and the bias's (its rows' sum), by
/// `bias_residual_bwd`.
fn bias_residual_grads(
    g: &Tensor,
    dtype: DType,
    width: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let device = g.device().as_cuda_device()?.clone();
    let stream = device.cuda_stream();
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let n = g.elem_count();
    let of = values(dtype)?;
    let dbias = written_whole(&Shape::from(width), dtype, &device, n > 0)?;
    let dy = match of {
        Values::F32 => None,
        Values::Bf16 => Some(written_whole(g.shape(), dtype, &device, n > 0)?),
    };
    let mut addresses = vec![
        (Buffer::OutputGrad, tensor_address(&g, &stream)?),
        (Buffer::BiasGrad, tensor_address(&dbias, &stream)?),
    ];
    if let Some(dy) = &dy {
        addresses.push((Buffer::InputGrad, tensor_address(dy, &stream)?));
    }
    run(
        &device,
        &plan::bias_residual_backward(of, n, width),
        &addresses,
    )?;
    let dy = dy.unwrap_or_else(|| g.clone());
    Ok((g, dy, dbias))
}

// A linear layer's bias add.

/// Whether the CUDA bias add takes these: `y` f32 or bf16 and a bias of its dtype and last
/// dimension's width, on one GPU.
pub fn bias_add_applies(y: &Tensor, bias: &Tensor) -> bool {
    let width = y.dims().last().copied().unwrap_or(0);
    y.device().is_cuda()
        && matches!(y.dtype(), DType::F32 | DType::BF16)
        && width > 0
        && bias.dtype() == y.dtype()
        && bias.dims() == [width]
        && bias.device().same_device(y.device())
}

/// `y + bias` on its rows on the GPU (what [`bias_add_applies`] accepted), in `y`'s dtype;
/// backward, the bias's gradient is a coalesced reduction over the rows.
pub fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(y.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)?)
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "cuda-bias-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA bias add called on CPU tensors"))
    }

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        bias: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = y.device().clone();
        let stream = device.cuda_stream();
        let (n, width) = (ly.shape().elem_count(), lb.shape().elem_count());
        if width == 0 || !n.is_multiple_of(width) {
            return Err(cuda_err(format!("a bias of {width} on {n} values")));
        }
        let (out, out_at) = output(&device, y.dtype(), n)?;
        let addresses = [
            (Buffer::Input, storage_address(y, ly, &stream)?),
            (Buffer::Bias, storage_address(bias, lb, &stream)?),
            (Buffer::Output, out_at),
        ];
        run(
            &device,
            &plan::bias_add_forward(values(y.dtype())?, n, width),
            &addresses,
        )?;
        Ok((out, ly.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(y.dtype())?.contiguous()?;
        let dbias = bias_grad(&g, bias)?;
        Ok((Some(g), Some(dbias)))
    }
}

/// The gradient of a bias added to every row of an output whose gradient is `g` (`bias`'s
/// dtype, contiguous): the rows' sum, by the coalesced reduction (`bias_grad_*`).
fn bias_grad(g: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let device = g.device().as_cuda_device()?.clone();
    let stream = device.cuda_stream();
    let dbias = written_whole(bias.shape(), bias.dtype(), &device, g.elem_count() > 0)?;
    let addresses = [
        (Buffer::OutputGrad, tensor_address(g, &stream)?),
        (Buffer::BiasGrad, tensor_address(&dbias, &stream)?),
    ];
    let plan = plan::bias_add_backward(values(bias.dtype())?, g.elem_count(), bias.elem_count());
    run(&device, &plan, &addresses)?;
    Ok(dbias)
}

// A linear layer with its bias, as one op.

/// Whether the CUDA linear-with-bias op takes these: `x` `[rows, in]`, `w` `[out, in]`,
/// `b` `[out]`, all f32 or all bf16, on one GPU.
pub fn linear_bias_applies(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    let (Ok((_, k)), Ok((n, k2))) = (x.dims2(), w.dims2()) else {
        return false;
    };
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && k == k2
        && b.dims() == [n]
        && [w, b]
            .iter()
            .all(|t| t.dtype() == x.dtype() && t.device().same_device(x.device()))
}

/// `x wᵀ + b` on the GPU (what [`linear_bias_applies`] accepted) as one op: candle's own
/// GEMM, then the bias added in place by `bias_add_fwd`, so the graph keeps one `[rows,
/// out]` tensor where the product and a bias add after it kept two (the product's output,
/// which no backward reads, lived until backward: 6 bytes an element of the attention's
/// packed projections at bf16). The same values as the two ops, bit for bit: the product
/// rounded, then the bias added and rounded. Backward: `dx = g w` (where `x` is in the
/// graph), `dw = gᵀ x` in `w`'s layout, the bias's gradient by the coalesced reduction.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias)?)
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "cuda-linear-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA linear layer called on CPU tensors"))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, k) = lx.shape().dims2()?;
        let (n, k2) = lw.shape().dims2()?;
        if k != k2 || lb.shape().elem_count() != n {
            return Err(cuda_err(format!(
                "a linear layer of {:?} on {:?} with a bias of {:?}",
                lw.shape().dims(),
                lx.shape().dims(),
                lb.shape().dims()
            )));
        }
        // y = x wᵀ: wᵀ is w's layout transposed, as `x.matmul(&w.t())` passes it.
        let y = x.matmul(w, (1, rows, n, k), lx, &lw.transpose(0, 1)?)?;
        let device = x.device().clone();
        let stream = device.cuda_stream();
        let y_at = storage_address(&y, &Layout::contiguous((rows, n)), &stream)?;
        // In place: the kernel reads and writes each element in one thread.
        let addresses = [
            (Buffer::Input, y_at),
            (Buffer::Bias, storage_address(b, lb, &stream)?),
            (Buffer::Output, y_at),
        ];
        run(
            &device,
            &plan::bias_add_forward(values(x.dtype())?, rows * n, n),
            &addresses,
        )?;
        Ok((y, Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(x.dtype())?.contiguous()?;
        let (dx, dw) = product_grads(&g, x, w)?;
        Ok((dx, Some(dw), Some(bias_grad(&g, b)?)))
    }
}

/// The gradients of `x wᵀ` from its output's `dy` (`x`'s dtype): `dx = dy w`, where `x`
/// is in the graph (nothing upstream of pixels takes one), and `dw = dyᵀ x` in `w`'s
/// layout.
fn product_grads(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Tensor)> {
    let dx = x.track_op().then(|| dy.matmul(w)).transpose()?;
    Ok((dx, dy.t()?.matmul(x)?))
}

// A linear layer onto the residual stream, as one op.

/// Whether the CUDA linear-onto-the-stream op takes these: an f32 stream `[rows, out]`,
/// `x` `[rows, in]`, `w` `[out, in]` and `b` `[out]` all f32 or all bf16, on one GPU.
pub fn linear_onto_applies(stream: &Tensor, x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    let (Ok((rows, _)), Ok((n, _))) = (x.dims2(), w.dims2()) else {
        return false;
    };
    stream.dtype() == DType::F32
        && stream.dims() == [rows, n]
        && stream.device().same_device(x.device())
        && linear_bias_applies(x, w, b)
}

/// `stream + (x wᵀ + b)` on the GPU (what [`linear_onto_applies`] accepted) as one op, in
/// f32: candle's GEMM into a buffer of the op's own, then `bias_residual_fwd`; the buffer
/// goes when the op returns. As two ops (the product, then `bias_residual`) the graph
/// kept the product's output until backward, though no backward reads it: 2 bytes an
/// element at bf16, twice a block. The same values as those two ops, bit for bit. The
/// weight and bias travel as one packed tensor (`[w..., b...]`: a copy of the weight per
/// call, its size), so that the op has three inputs and their gradients reach both.
/// Backward: the stream's gradient is the output's; the branch's, rounded to its dtype
/// with the bias's sum (`bias_residual_bwd`), gives `dx = dy w` (where `x` is in the
/// graph) and `dw = dyᵀ x`.
pub fn linear_onto(stream: &Tensor, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (out, inner) = w.dims2()?;
    let packed = Tensor::cat(&[&w.flatten_all()?, b], 0)?;
    Ok(stream
        .contiguous()?
        .apply_op3(&x.contiguous()?, &packed, LinearOnto { out, inner })?)
}

struct LinearOnto {
    out: usize,
    inner: usize,
}

impl LinearOnto {
    /// The weight's and the bias's layouts inside the packed tensor at `packed`.
    fn parts(&self, packed: &Layout) -> candle_core::Result<(Layout, Layout)> {
        let (n, k) = (self.out, self.inner);
        if packed.shape().elem_count() != n * k + n || !packed.is_contiguous() {
            return Err(cuda_err(format!(
                "a packed weight and bias of {:?} for {n} × {k}",
                packed.shape().dims()
            )));
        }
        let at = packed.start_offset();
        Ok((
            Layout::contiguous_with_offset((n, k), at),
            Layout::contiguous_with_offset(n, at + n * k),
        ))
    }
}

impl CustomOp3 for LinearOnto {
    fn name(&self) -> &'static str {
        "cuda-linear-onto"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err(
            "the CUDA linear layer onto the stream called on CPU tensors",
        ))
    }

    fn cuda_fwd(
        &self,
        stream_values: &CudaStorage,
        ls: &Layout,
        x: &CudaStorage,
        lx: &Layout,
        packed: &CudaStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, k) = lx.shape().dims2()?;
        let n = self.out;
        if k != self.inner || ls.shape().elem_count() != rows * n {
            return Err(cuda_err(format!(
                "a linear layer of {n} × {} on {:?} onto a stream of {:?}",
                self.inner,
                lx.shape().dims(),
                ls.shape().dims()
            )));
        }
        let (lw, lb) = self.parts(lp)?;
        // The branch's product, the op's own buffer (freed, in stream order, on return).
        let y = x.matmul(packed, (1, rows, n, k), lx, &lw.transpose(0, 1)?)?;
        let device = x.device().clone();
        let stream = device.cuda_stream();
        let (out, out_at) = output(&device, DType::F32, rows * n)?;
        let addresses = [
            (
                Buffer::Residual,
                storage_address(stream_values, ls, &stream)?,
            ),
            (
                Buffer::Input,
                storage_address(&y, &Layout::contiguous((rows, n)), &stream)?,
            ),
            (Buffer::Bias, storage_address(packed, &lb, &stream)?),
            (Buffer::Output, out_at),
        ];
        run(
            &device,
            &plan::bias_residual_forward(values(x.dtype())?, rows * n, n),
            &addresses,
        )?;
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        _: &Tensor,
        x: &Tensor,
        packed: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = (self.out, self.inner);
        let (g, dy, dbias) = bias_residual_grads(g, x.dtype(), n)?;
        let w = packed.narrow(0, 0, n * k)?.reshape((n, k))?;
        let (dx, dw) = product_grads(&dy, x, &w)?;
        let dpacked = Tensor::cat(&[&dw.flatten_all()?, &dbias], 0)?;
        Ok((Some(g), dx, Some(dpacked)))
    }
}

// Gradients summed in place.

/// `sum += g` on the GPU (`accumulate.rs`' op): an f32 sum, `g` f32 or bf16, both
/// contiguous and of one size.
pub fn accumulate(
    sum: &mut CudaStorage,
    ls: &Layout,
    g: &CudaStorage,
    lg: &Layout,
) -> candle_core::Result<()> {
    let n = ls.shape().elem_count();
    if sum.dtype() != DType::F32 || lg.shape().elem_count() != n {
        return Err(cuda_err(format!(
            "accumulate: {} {:?} values into {n} {:?}",
            lg.shape().elem_count(),
            g.dtype(),
            sum.dtype()
        )));
    }
    let device = sum.device().clone();
    let stream = device.cuda_stream();
    let addresses = [
        (Buffer::Output, storage_address(sum, ls, &stream)?),
        (Buffer::Input, storage_address(g, lg, &stream)?),
    ];
    run(
        &device,
        &plan::accumulate(values(g.dtype())?, n),
        &addresses,
    )
}

// Image bytes normalised.

/// `[n, h, w, 3]` u8 (HWC) → `[n, 3, h, w]` f32 (CHW), `v · scale[c] − shift[c]` rounded
/// as the host rounds it (`model::PixelNorm`), in one pass: the bytes read once, the
/// floats written once. Data, not a weight: no backward.
pub fn pixel_normalise(bytes: &Tensor, scale: [f32; 3], shift: [f32; 3]) -> Result<Tensor> {
    Ok(bytes
        .contiguous()?
        .apply_op1_no_bwd(&PixelNormalise { scale, shift })?)
}

struct PixelNormalise {
    scale: [f32; 3],
    shift: [f32; 3],
}

impl CustomOp1 for PixelNormalise {
    fn name(&self) -> &'static str {
        "cuda-pixel-normalise"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err(
            "the CUDA image normalisation called on CPU tensors",
        ))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, h, w, channels) = l.shape().dims4()?;
        if channels != 3 || s.dtype() != DType::U8 || !l.is_contiguous() {
            return Err(cuda_err(format!(
                "image normalisation of {:?} {:?}: it takes contiguous [n, h, w, 3] u8",
                l.shape(),
                s.dtype()
            )));
        }
        let device = s.device().clone();
        let stream = device.cuda_stream();
        let (bytes, _sync) = s.as_cuda_slice::<u8>()?.device_ptr(&stream);
        let (storage, out_at) = output(&device, DType::F32, n * 3 * h * w)?;
        let addresses = [
            (Buffer::Input, bytes + l.start_offset() as u64),
            (Buffer::Output, out_at),
        ];
        let plan = plan::pixel_normalise(n, h * w, self.scale, self.shift);
        run(&device, &plan, &addresses)?;
        Ok((storage, Shape::from((n, 3, h, w))))
    }
}

// Embedding lookup.

/// Whether the CUDA embedding takes these: an f32 or bf16 table `[rows, width]` and u32
/// ids `[n]` on one GPU.
pub fn embedding_applies(table: &Tensor, ids: &Tensor) -> bool {
    table.device().is_cuda()
        && matches!(table.dtype(), DType::F32 | DType::BF16)
        && table.rank() == 2
        && ids.dtype() == DType::U32
        && ids.rank() == 1
        && ids.device().same_device(table.device())
}

/// `table[ids]` on the GPU (what [`embedding_applies`] accepted), its backward a
/// deterministic scatter in token order (the CPU's sums).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(table
        .contiguous()?
        .apply_op2(&ids.contiguous()?, Embedding)?)
}

struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "cuda-embedding"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err("the CUDA embedding called on CPU tensors"))
    }

    fn cuda_fwd(
        &self,
        table: &CudaStorage,
        lt: &Layout,
        ids: &CudaStorage,
        li: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = table.device().clone();
        let stream = device.cuda_stream();
        let (rows, width) = lt.shape().dims2()?;
        let n = li.shape().elem_count();
        let (storage, out_at) = output(&device, table.dtype(), n * width)?;
        let plan = plan::embedding_forward(values(table.dtype())?, rows, width, n);
        let addresses = [
            (Buffer::Weight, storage_address(table, lt, &stream)?),
            (Buffer::Ids, storage_address(ids, li, &stream)?),
            (Buffer::Output, out_at),
        ];
        run(&device, &plan, &addresses)?;
        Ok((storage, Shape::from((n, width))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, width) = table.dims2()?;
        let g = dy.to_dtype(table.dtype())?.contiguous()?;
        // The scatter as an op of its own: its output needs no zero fill first.
        let grad = ids
            .contiguous()?
            .apply_op2_no_bwd(&g, &EmbeddingGrad { rows, width })?;
        Ok((Some(grad), None))
    }
}

/// The embedding's backward: `[rows, width]` from the ids and the output's gradient.
struct EmbeddingGrad {
    rows: usize,
    width: usize,
}

impl CustomOp2 for EmbeddingGrad {
    fn name(&self) -> &'static str {
        "cuda-embedding-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cuda_err(
            "the CUDA embedding gradient called on CPU tensors",
        ))
    }

    fn cuda_fwd(
        &self,
        ids: &CudaStorage,
        li: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = g.device().clone();
        let stream = device.cuda_stream();
        let (rows, width) = (self.rows, self.width);
        let (grad, grad_at) = output(&device, g.dtype(), rows * width)?;
        let n = li.shape().elem_count();
        let plan = plan::embedding_backward(values(g.dtype())?, rows, width, n);
        let addresses = [
            (Buffer::Ids, storage_address(ids, li, &stream)?),
            (Buffer::OutputGrad, storage_address(g, lg, &stream)?),
            (Buffer::WeightGrad, grad_at),
        ];
        run(&device, &plan, &addresses)?;
        Ok((grad, Shape::from((rows, width))))
    }
}
