//! The fused ops' CUDA kernels, with their own backward: layer norm (`layer_norm.cu`) and
//! exact GELU with an optional bias (`gelu.cu`), over what they share (`kernels.cuh`).
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

/// The kernels' CUDA source: the shared part, then each op's file.
pub const SOURCE: &str = concat!(
    include_str!("kernels.cuh"),
    include_str!("layer_norm.cu"),
    include_str!("gelu.cu")
);
/// Threads a block: the source's `THREADS`.
const THREADS: u32 = 256;
/// The most row chunks a weight or bias gradient reduces over (each a partial sum per
/// column, added in chunk order).
const MAX_CHUNKS: usize = 256;
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

/// "f32" or "bf16": the kernels' name suffix for values of `dtype`.
fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => Err(cuda_err(format!("values of {other:?}"))),
    }
}

/// The device address of a storage's element at `layout`'s start (contiguous layouts
/// only), whatever its dtype (f32 or bf16).
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

/// One kernel argument.
enum Arg {
    Address(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

fn int(n: usize) -> candle_core::Result<Arg> {
    Ok(Arg::I32(i32::try_from(n).map_err(cuda_err)?))
}

fn blocks(n: usize) -> candle_core::Result<u32> {
    u32::try_from(n).map_err(|_| cuda_err(format!("{n} blocks")))
}

/// Launches kernel `name` of the fused module on `device`'s stream, `THREADS` a block.
///
/// Every caller passes addresses of live buffers on this device of the sizes the kernel
/// reads and writes (its comment in the source says which), held until the stream has run
/// it (a tensor's memory is freed in stream order), and arguments in its signature's order.
fn launch(
    device: &CudaDevice,
    name: &str,
    grid: (usize, usize),
    args: &[Arg],
) -> candle_core::Result<()> {
    let (major, minor) = device
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(cuda_err)?;
    let ptx = ptx(major, minor).map_err(cuda_err)?;
    let func = device.get_or_load_custom_func(name, MODULE, &ptx)?;
    let mut builder = func.builder();
    for a in args {
        match a {
            Arg::Address(v) => builder.arg(v),
            Arg::I64(v) => builder.arg(v),
            Arg::I32(v) => builder.arg(v),
            Arg::F32(v) => builder.arg(v),
        };
    }
    let config = LaunchConfig {
        grid_dim: (blocks(grid.0)?, blocks(grid.1)?, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as the function's contract says (every caller below keeps it).
    unsafe { builder.launch(config) }.map_err(cuda_err)?;
    Ok(())
}

/// How a column reduction over `rows` rows is cut: (chunks, rows a chunk).
fn chunking(rows: usize) -> (usize, usize) {
    let per_chunk = rows.div_ceil(rows.clamp(1, MAX_CHUNKS));
    (rows.div_ceil(per_chunk.max(1)), per_chunk.max(1))
}

fn columns(width: usize) -> usize {
    width.div_ceil(THREADS as usize)
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

/// Layer norm over the last dimension on the GPU (what [`layer_norm_applies`] accepted):
/// f32 out, its backward by the kernels too.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm {
            eps,
            stats: Mutex::new(None),
        },
    )?)
}

struct LayerNorm {
    eps: f32,
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
        let (y, stats) = unsafe { (device.alloc::<f32>(n)?, device.alloc::<f32>(2 * rows)?) };
        if rows > 0 {
            let args = [
                Arg::Address(storage_address(x, lx, &stream)?),
                Arg::Address(storage_address(w, lw, &stream)?),
                Arg::Address(storage_address(b, lb, &stream)?),
                Arg::Address(slice_address(&y, &stream)),
                Arg::Address(slice_address(&stats, &stream)),
                int(width)?,
                Arg::F32(self.eps),
            ];
            let name = format!("layer_norm_fwd_{}", suffix(x.dtype())?);
            launch(&device, &name, (rows, 1), &args)?;
        }
        *self.stats.lock().expect("layer norm statistics") = Some(stats);
        Ok((CudaStorage::wrap_cuda_slice(y, device), lx.shape().clone()))
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
        // Bound here, so that no copy is freed before the kernels have read it.
        let (w, dy) = (w.contiguous()?, dy.to_dtype(DType::F32)?.contiguous()?);
        let dx = Tensor::zeros(x.shape(), x.dtype(), x.device())?;
        let dw = Tensor::zeros(w.shape(), DType::F32, x.device())?;
        let db = Tensor::zeros(w.shape(), DType::F32, x.device())?;
        if rows == 0 {
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let (chunks, per_chunk) = chunking(rows);
        let partial = Tensor::zeros(2 * chunks * width, DType::F32, x.device())?;
        let name = suffix(x.dtype())?;
        let (x_at, w_at, dy_at, stats_at) = (
            tensor_address(x, &stream)?,
            tensor_address(&w, &stream)?,
            tensor_address(&dy, &stream)?,
            slice_address(stats, &stream),
        );
        let dx_args = [
            Arg::Address(x_at),
            Arg::Address(w_at),
            Arg::Address(dy_at),
            Arg::Address(stats_at),
            Arg::Address(tensor_address(&dx, &stream)?),
            int(width)?,
        ];
        launch(
            &device,
            &format!("layer_norm_bwd_dx_{name}"),
            (rows, 1),
            &dx_args,
        )?;
        let partial_at = tensor_address(&partial, &stream)?;
        let partial_args = [
            Arg::Address(x_at),
            Arg::Address(dy_at),
            Arg::Address(stats_at),
            Arg::Address(partial_at),
            Arg::I64(rows as i64),
            int(width)?,
            Arg::I64(per_chunk as i64),
        ];
        let grid = (columns(width), chunks);
        launch(
            &device,
            &format!("layer_norm_bwd_partial_{name}"),
            grid,
            &partial_args,
        )?;
        let dw_args = [
            Arg::Address(partial_at),
            Arg::Address(tensor_address(&dw, &stream)?),
            Arg::Address(tensor_address(&db, &stream)?),
            int(width)?,
            int(chunks)?,
        ];
        launch(&device, "layer_norm_bwd_dw", (columns(width), 1), &dw_args)?;
        // `w`, `dy` and `partial` are freed after this, in stream order: after the kernels.
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

/// Exact GELU of `y` (+ `bias` on its rows) on the GPU (what [`gelu_applies`] accepted),
/// in `y`'s dtype, its backward by the kernels too.
pub fn gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = y.contiguous()?;
    Ok(match bias {
        Some(b) => y.apply_op2(&b.contiguous()?, Gelu)?,
        None => y.apply_op1(Gelu)?,
    })
}

struct Gelu;

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
        let bias_at = match bias {
            Some((b, lb)) => storage_address(b, lb, &stream)?,
            None => 0,
        };
        fn out<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            device: &CudaDevice,
            n: usize,
        ) -> candle_core::Result<(CudaStorage, u64)> {
            // SAFETY: the kernel writes every element before anything reads it.
            let slice = unsafe { device.alloc::<T>(n)? };
            let at = slice_address(&slice, &device.cuda_stream());
            Ok((CudaStorage::wrap_cuda_slice(slice, device.clone()), at))
        }
        let (storage, out_at) = match y.dtype() {
            DType::BF16 => out::<half::bf16>(&device, n)?,
            _ => out::<f32>(&device, n)?,
        };
        let args = [
            Arg::Address(storage_address(y, ly, &stream)?),
            Arg::Address(bias_at),
            Arg::Address(out_at),
            Arg::I64(n as i64),
            int(width)?,
        ];
        let name = format!("gelu_fwd_{}", suffix(y.dtype())?);
        launch(&device, &name, (n.div_ceil(THREADS as usize), 1), &args)?;
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
        let rows = n / width;
        let name = suffix(y.dtype())?;
        // Bound here, so that no copy is freed before the kernels have read it.
        let g = dz.to_dtype(y.dtype())?.contiguous()?;
        let dy = Tensor::zeros(y.shape(), y.dtype(), y.device())?;
        let (y_at, g_at) = (tensor_address(y, &stream)?, tensor_address(&g, &stream)?);
        let bias_at = match bias {
            Some(b) => tensor_address(b, &stream)?,
            None => 0,
        };
        let args = [
            Arg::Address(y_at),
            Arg::Address(bias_at),
            Arg::Address(g_at),
            Arg::Address(tensor_address(&dy, &stream)?),
            Arg::I64(n as i64),
            int(width)?,
        ];
        launch(
            &device,
            &format!("gelu_bwd_{name}"),
            (n.div_ceil(THREADS as usize), 1),
            &args,
        )?;
        let Some(b) = bias else {
            return Ok((dy, None));
        };
        let (chunks, per_chunk) = chunking(rows);
        let partial = Tensor::zeros(chunks * width, DType::F32, y.device())?;
        let dbias = Tensor::zeros(b.shape(), b.dtype(), y.device())?;
        let partial_at = tensor_address(&partial, &stream)?;
        let partial_args = [
            Arg::Address(y_at),
            Arg::Address(bias_at),
            Arg::Address(g_at),
            Arg::Address(partial_at),
            Arg::I64(rows as i64),
            int(width)?,
            Arg::I64(per_chunk as i64),
        ];
        let grid = (columns(width), chunks);
        launch(
            &device,
            &format!("gelu_bias_partial_{name}"),
            grid,
            &partial_args,
        )?;
        let grad_args = [
            Arg::Address(partial_at),
            Arg::Address(tensor_address(&dbias, &stream)?),
            int(width)?,
            int(chunks)?,
        ];
        launch(
            &device,
            &format!("gelu_bias_grad_{name}"),
            (columns(width), 1),
            &grad_args,
        )?;
        // `g` and `partial` are freed after this, in stream order: after the kernels.
        Ok((dy, Some(dbias)))
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
