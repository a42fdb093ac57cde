//! The fused ops' CUDA kernels, with their own backward (`layer_norm.cu`): one pass over
//! memory forward, one for the input's gradient and one for the weights', where candle's
//! composition of small ops launches a kernel and makes a pass per op.
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
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use crate::error::{Error, Result};

/// The layer norm kernels' CUDA source.
pub const LAYER_NORM_SOURCE: &str = include_str!("layer_norm.cu");
/// Threads a block: the source's `THREADS`.
const THREADS: u32 = 256;
/// The most row chunks the weight gradients reduce over (each a partial sum per column).
const MAX_CHUNKS: usize = 256;

/// The layer norm kernels as PTX for compute capability `major.minor` (9.0: H100, H200),
/// compiled by NVRTC once per process and capability. No GPU is needed to compile.
pub fn layer_norm_ptx(major: i32, minor: i32) -> Result<String> {
    static COMPILED: Mutex<Vec<((i32, i32), String)>> = Mutex::new(Vec::new());
    let mut compiled = COMPILED.lock().expect("compiled kernels");
    if let Some((_, ptx)) = compiled.iter().find(|(cc, _)| *cc == (major, minor)) {
        return Ok(ptx.clone());
    }
    let options = CompileOptions {
        options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
        name: Some("layer_norm.cu".into()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(LAYER_NORM_SOURCE, options)
        .map_err(|e| {
            Error::Cuda(format!(
                "NVRTC could not compile the layer norm kernels (src/model/fused/layer_norm.cu) \
                 for compute capability {major}.{minor}: {e}"
            ))
        })?
        .to_src();
    compiled.push(((major, minor), ptx.clone()));
    Ok(ptx)
}

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
        LayerNormCuda {
            eps,
            stats: Mutex::new(None),
        },
    )?)
}

struct LayerNormCuda {
    eps: f32,
    /// Each row's mean and 1/σ from forward, on the GPU.
    stats: Mutex<Option<CudaSlice<f32>>>,
}

fn cuda_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("the CUDA layer norm: {e:?}"))
}

/// The device address of a storage's element at `layout`'s start (contiguous layouts
/// only).
fn storage_address<T: CudaDType>(
    s: &CudaStorage,
    layout: &Layout,
    stream: &CudaStream,
) -> candle_core::Result<u64> {
    if !layout.is_contiguous() {
        return Err(cuda_err("a strided input"));
    }
    let (base, _sync) = s.as_cuda_slice::<T>()?.device_ptr(stream);
    Ok(base + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

/// The device address of a tensor's first element.
fn tensor_address<T: CudaDType>(t: &Tensor, stream: &CudaStream) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(cuda_err("a tensor off the GPU"));
    };
    storage_address::<T>(s, layout, stream)
}

/// The address of `x`'s data whatever its dtype (f32 or bf16).
fn input_address(
    s: &CudaStorage,
    layout: &Layout,
    stream: &CudaStream,
) -> candle_core::Result<u64> {
    match s.dtype() {
        DType::F32 => storage_address::<f32>(s, layout, stream),
        DType::BF16 => storage_address::<half::bf16>(s, layout, stream),
        other => Err(cuda_err(format!("an input of {other:?}"))),
    }
}

fn suffix(dtype: DType) -> candle_core::Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => Err(cuda_err(format!("an input of {other:?}"))),
    }
}

/// The kernels' PTX for `device`'s compute capability.
fn ptx_for(device: &CudaDevice) -> candle_core::Result<String> {
    let (major, minor) = device
        .cuda_stream()
        .context()
        .compute_capability()
        .map_err(cuda_err)?;
    layer_norm_ptx(major, minor).map_err(cuda_err)
}

/// The module name the kernels load under, once per device.
const MODULE: &str = "mmpipe_layer_norm";

fn blocks(n: usize) -> candle_core::Result<u32> {
    u32::try_from(n).map_err(|_| cuda_err(format!("{n} blocks")))
}

impl CustomOp3 for LayerNormCuda {
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
        Err(cuda_err("called on CPU tensors"))
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
            return Err(cuda_err(format!("{n} values, weight {width}")));
        }
        let rows = n / width;
        // SAFETY: the kernel writes every element of both before anything reads them.
        let (y, stats) = unsafe { (device.alloc::<f32>(n)?, device.alloc::<f32>(2 * rows)?) };
        let (y_at, _y) = y.device_ptr(&stream);
        let (stats_at, _s) = stats.device_ptr(&stream);
        let (x_at, w_at, b_at) = (
            input_address(x, lx, &stream)?,
            storage_address::<f32>(w, lw, &stream)?,
            storage_address::<f32>(b, lb, &stream)?,
        );
        let width_arg = i32::try_from(width).map_err(cuda_err)?;
        if rows > 0 {
            let name = format!("layer_norm_fwd_{}", suffix(x.dtype())?);
            let func = device.get_or_load_custom_func(&name, MODULE, &ptx_for(&device)?)?;
            let mut launch = func.builder();
            launch.arg(&x_at);
            launch.arg(&w_at);
            launch.arg(&b_at);
            launch.arg(&y_at);
            launch.arg(&stats_at);
            launch.arg(&width_arg);
            launch.arg(&self.eps);
            let config = LaunchConfig {
                grid_dim: (blocks(rows)?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: every address is a live buffer of the sizes the kernel reads and
            // writes (rows × width inputs and outputs, width weights, 2 × rows statistics)
            // on this stream's device; the arguments match the kernel's signature.
            unsafe { launch.launch(config) }.map_err(cuda_err)?;
        }
        drop((_y, _s));
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
            .ok_or_else(|| cuda_err("backward before forward"))?;
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
        let chunks = rows.min(MAX_CHUNKS);
        let rows_per_chunk = rows.div_ceil(chunks) as i64;
        let chunks = rows.div_ceil(rows_per_chunk as usize);
        let partial = Tensor::zeros(2 * chunks * width, DType::F32, x.device())?;
        let (stats_at, _s) = stats.device_ptr(&stream);
        let x_at = {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cuda(s) = &*storage else {
                return Err(cuda_err("a tensor off the GPU"));
            };
            input_address(s, layout, &stream)?
        };
        let dx_at = match x.dtype() {
            DType::BF16 => tensor_address::<half::bf16>(&dx, &stream)?,
            _ => tensor_address::<f32>(&dx, &stream)?,
        };
        let (w_at, dy_at, partial_at, dw_at, db_at) = (
            tensor_address::<f32>(&w, &stream)?,
            tensor_address::<f32>(&dy, &stream)?,
            tensor_address::<f32>(&partial, &stream)?,
            tensor_address::<f32>(&dw, &stream)?,
            tensor_address::<f32>(&db, &stream)?,
        );
        let name = suffix(x.dtype())?;
        let ptx = ptx_for(&device)?;
        let width_arg = i32::try_from(width).map_err(cuda_err)?;
        let columns = blocks(width.div_ceil(THREADS as usize))?;
        let launch_on = |grid: (u32, u32, u32)| LaunchConfig {
            grid_dim: grid,
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY (the three launches): every address is a live buffer on this stream's
        // device of the size its kernel reads or writes (rows × width for x, dy and dx,
        // width for w, dw and db, 2 × rows statistics, 2 × chunks × width partial sums),
        // held until the stream has run them; the arguments match the signatures.
        let func =
            device.get_or_load_custom_func(&format!("layer_norm_bwd_dx_{name}"), MODULE, &ptx)?;
        let mut launch = func.builder();
        launch.arg(&x_at);
        launch.arg(&w_at);
        launch.arg(&dy_at);
        launch.arg(&stats_at);
        launch.arg(&dx_at);
        launch.arg(&width_arg);
        unsafe { launch.launch(launch_on((blocks(rows)?, 1, 1))) }.map_err(cuda_err)?;

        let rows_arg = rows as i64;
        let func = device.get_or_load_custom_func(
            &format!("layer_norm_bwd_partial_{name}"),
            MODULE,
            &ptx,
        )?;
        let mut launch = func.builder();
        launch.arg(&x_at);
        launch.arg(&dy_at);
        launch.arg(&stats_at);
        launch.arg(&partial_at);
        launch.arg(&rows_arg);
        launch.arg(&width_arg);
        launch.arg(&rows_per_chunk);
        unsafe { launch.launch(launch_on((columns, blocks(chunks)?, 1))) }.map_err(cuda_err)?;

        let chunks_arg = i32::try_from(chunks).map_err(cuda_err)?;
        let func = device.get_or_load_custom_func("layer_norm_bwd_dw", MODULE, &ptx)?;
        let mut launch = func.builder();
        launch.arg(&partial_at);
        launch.arg(&dw_at);
        launch.arg(&db_at);
        launch.arg(&width_arg);
        launch.arg(&chunks_arg);
        unsafe { launch.launch(launch_on((columns, 1, 1))) }.map_err(cuda_err)?;
        drop(_s);
        // `dy`, `partial` and the rest stay alive until here; the stream orders their
        // frees after the kernels.
        Ok((Some(dx), Some(dw), Some(db)))
    }
}
