//! Where a rank computes, and how much GPU memory a run used: the CPU, or a CUDA device
//! shared by every rank thread of this process that runs on it.

use candle_core::Device;

use crate::error::{Error, Result};
use crate::topology::{DeviceKind, Topology};

#[cfg(feature = "cuda")]
pub use cuda::{
    cuda_device, device_count, memory_peak, nvrtc_ptx, reset_tensor_memory_peak, sample_memory,
    tensor_memory_peak,
};

/// Where rank `rank` computes: the CPU, or the GPU of its position on its node (modulo
/// the GPUs this process sees, so rank threads of a many-GPU topology can share one GPU,
/// and a process limited by CUDA_VISIBLE_DEVICES takes the one it sees).
pub fn rank_device(topology: &Topology, rank: usize) -> Result<Device> {
    match topology.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => {
            let count = device_count()?;
            if count == 0 {
                return Err(Error::Cuda("no GPU is visible to this process".into()));
            }
            cuda_device(topology.ranks[rank].device % count)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => Err(Error::invalid(
            &topology.source,
            "device",
            format!("rank {rank} is a `cuda` rank: that needs a build with --features cuda"),
        )),
    }
}

/// Records the device's memory in use now (a no-op without CUDA).
#[cfg(not(feature = "cuda"))]
pub fn sample_memory(_device: &Device) {}

/// (peak in use, total) in bytes of the GPU [`sample_memory`] saw; None without CUDA.
#[cfg(not(feature = "cuda"))]
pub fn memory_peak() -> Option<(u64, u64)> {
    None
}

/// The GPU tensors' high-water mark; None without CUDA.
#[cfg(not(feature = "cuda"))]
pub fn tensor_memory_peak(_device: &Device) -> Option<u64> {
    None
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::Ordering;
    use std::sync::{Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::sys as sys_driver;
    use candle_core::Device;

    use crate::error::{Error, Result};

    /// `source` (named `name`: in NVRTC's messages, and for the cache, so one name one
    /// source) as PTX for compute capability `major.minor`, compiled by NVRTC once per
    /// process, source and capability; `fmad`:
    /// whether products and sums may fuse. No GPU is needed to compile. The kernels of
    /// mmpipe (the AdamW step, the fused ops) are built this way at start-up, so the build
    /// needs no CUDA compiler and the PTX matches the GPU it runs on.
    pub fn nvrtc_ptx(
        source: &'static str,
        name: &str,
        fmad: bool,
        major: i32,
        minor: i32,
    ) -> Result<String> {
        use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
        type Key = (String, bool, i32, i32);
        static COMPILED: Mutex<Vec<(Key, String)>> = Mutex::new(Vec::new());
        // Each source has a name of its own.
        let key = (name.to_string(), fmad, major, minor);
        let mut compiled = COMPILED.lock().expect("compiled kernels");
        if let Some((_, ptx)) = compiled.iter().find(|(k, _)| *k == key) {
            return Ok(ptx.clone());
        }
        let options = CompileOptions {
            fmad: Some(fmad),
            options: vec![format!("--gpu-architecture=compute_{major}{minor}")],
            name: Some(name.into()),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(source, options)
            .map_err(|e| {
                Error::Cuda(format!(
                    "NVRTC could not compile {name} for compute capability {major}.{minor}: {e}"
                ))
            })?
            .to_src();
        compiled.push((key, ptx.clone()));
        Ok(ptx)
    }

    /// The CUDA device of ordinal `ordinal`, one per process: every rank thread on that GPU
    /// gets the same device and so the same stream, which orders their kernels and makes
    /// tensors safe to pass between them (a fresh `Device::new_cuda` would give each thread
    /// its own per-thread stream, with no ordering between them).
    pub fn cuda_device(ordinal: usize) -> Result<Device> {
        static DEVICES: OnceLock<Mutex<Vec<(usize, Device)>>> = OnceLock::new();
        let mut devices = DEVICES
            .get_or_init(|| Mutex::new(Vec::new()))
            .lock()
            .expect("device list");
        if let Some((_, d)) = devices.iter().find(|(o, _)| *o == ordinal) {
            return Ok(d.clone());
        }
        let device = Device::new_cuda_with_stream(ordinal).map_err(|e| {
            Error::Cuda(format!(
                "device {ordinal} could not be opened: {e} (is there an NVIDIA driver and GPU here?)"
            ))
        })?;
        devices.push((ordinal, device.clone()));
        Ok(device)
    }

    /// How many GPUs this process sees (CUDA_VISIBLE_DEVICES applied).
    pub fn device_count() -> Result<usize> {
        candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
            .map(|n| n as usize)
            .map_err(|e| Error::Cuda(format!("no driver or GPU: {e:?}")))
    }

    /// The most GPU memory seen in use (whole device, bytes) by [`sample_memory`], and the
    /// device's total.
    static MEMORY_PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static MEMORY_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// Records how much of `device`'s memory is in use now (all processes on it, the CUDA
    /// context included: what decides whether the next batch fits). A no-op on the CPU.
    pub fn sample_memory(device: &Device) {
        let Ok(cuda) = device.as_cuda_device() else {
            return;
        };
        if let Ok((free, total)) = cuda.cuda_stream().context().mem_get_info() {
            MEMORY_PEAK.fetch_max((total - free) as u64, Ordering::Relaxed);
            MEMORY_TOTAL.store(total as u64, Ordering::Relaxed);
        }
    }

    /// (peak in use, total) in bytes, once [`sample_memory`] has seen a GPU.
    pub fn memory_peak() -> Option<(u64, u64)> {
        let total = MEMORY_TOTAL.load(Ordering::Relaxed);
        (total > 0).then(|| (MEMORY_PEAK.load(Ordering::Relaxed), total))
    }

    /// The default memory pool of `device`'s GPU: where cudarc's stream-ordered allocations
    /// (every candle tensor) come from.
    fn default_pool(device: &Device) -> Option<sys_driver::CUmemoryPool> {
        let cuda = device.as_cuda_device().ok()?;
        let context = cuda.cuda_stream().context().clone();
        context.bind_to_thread().ok()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: a valid device handle and an out-pointer to fill.
        let status =
            unsafe { sys_driver::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) };
        (status == sys_driver::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    /// The most bytes `device`'s tensors held at once since the process started or since
    /// [`reset_tensor_memory_peak`] (the pool's high-water mark: tensors only, not the CUDA
    /// context, cuBLAS' workspace or NCCL's buffers). None where the GPU has no pools.
    pub fn tensor_memory_peak(device: &Device) -> Option<u64> {
        let pool = default_pool(device)?;
        let mut used: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
        let status = unsafe {
            sys_driver::cuMemPoolGetAttribute(
                pool,
                sys_driver::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut used as *mut u64).cast(),
            )
        };
        (status == sys_driver::CUresult::CUDA_SUCCESS).then_some(used)
    }

    /// Starts [`tensor_memory_peak`] again from what is allocated now.
    pub fn reset_tensor_memory_peak(device: &Device) {
        if let Some(pool) = default_pool(device) {
            let mut zero: u64 = 0;
            // SAFETY: setting USED_MEM_HIGH to 0 resets it to the current use.
            unsafe {
                sys_driver::cuMemPoolSetAttribute(
                    pool,
                    sys_driver::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                );
            }
        }
    }
}
