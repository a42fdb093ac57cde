//! Moving a rank's batches onto its device ahead of their step. The data pipeline's
//! assembler thread uploads each batch as soon as it is assembled, so that on a GPU the
//! host-to-device copy of batch k+1 runs while step k computes, instead of inside step
//! k+1 (where it counts as data wait).
//!
//! On a GPU the copy goes from a pinned host buffer (a DMA transfer, where pageable memory
//! is staged through the driver's own buffer first) on a CUDA stream of its own. The
//! step's kernels run on the device's stream; cudarc's event tracking (on, as candle's
//! multi-stream devices have it) makes them wait for the copy's completion before they
//! read the batch, and makes the next copy into the pinned buffer wait for the last one.
//!
//! Decoded images travel as bytes where `data.normalise_on` has the device normalise them
//! (the default on a GPU): `[n, size, size, 3]` u8, a quarter of the floats' bytes, staged
//! in a pinned buffer of their own.

use candle_core::Device;

use crate::data::pipeline::Upload;

/// What moves batches onto `device`: None where there is nothing to move (the CPU), or
/// where the copy stream cannot be made (the step's own copy then does it).
pub fn uploader(device: &Device) -> Option<Upload> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        match cuda::Uploader::new(d) {
            Ok(mut u) => return Some(Box::new(move |input| u.upload(input))),
            Err(e) => tracing::warn!(
                "batches will be copied to the GPU inside each step (no copy stream: {e})"
            ),
        }
    }
    let _ = device;
    None
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

    use crate::error::{Error, Result};
    use crate::model::TowerInput;

    pub struct Uploader {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        /// The staging buffers, kept from batch to batch: normalised floats, or decoded
        /// bytes (`data.normalise_on`).
        floats: Option<PinnedHostSlice<f32>>,
        bytes: Option<PinnedHostSlice<u8>>,
    }

    fn cuda_err(e: impl std::fmt::Debug) -> Error {
        Error::Cuda(format!("uploading a batch: {e:?}"))
    }

    impl Uploader {
        pub fn new(device: &CudaDevice) -> Result<Self> {
            let stream = device
                .cuda_stream()
                .context()
                .new_stream()
                .map_err(cuda_err)?;
            Ok(Uploader {
                device: device.clone(),
                stream,
                floats: None,
                bytes: None,
            })
        }

        pub fn upload(&mut self, input: TowerInput) -> Result<TowerInput> {
            Ok(match input {
                TowerInput::Images(t) if t.dtype() == DType::F32 && t.device().is_cpu() => {
                    TowerInput::Images(through_pinned(
                        &self.stream,
                        &self.device,
                        &mut self.floats,
                        &t,
                    )?)
                }
                TowerInput::Pixels { bytes, norm }
                    if bytes.dtype() == DType::U8 && bytes.device().is_cpu() =>
                {
                    TowerInput::Pixels {
                        bytes: through_pinned(&self.stream, &self.device, &mut self.bytes, &bytes)?,
                        norm,
                    }
                }
                // Captions are a few KB: the step's ordinary copy.
                other => other.to_device(&Device::Cuda(self.device.clone()))?,
            })
        }
    }

    /// An element type a batch is staged in.
    trait Staged: DeviceRepr + ValidAsZeroBits + CudaDType + Copy {
        fn values(s: &CpuStorage) -> Option<&[Self]>;
    }

    impl Staged for f32 {
        fn values(s: &CpuStorage) -> Option<&[f32]> {
            match s {
                CpuStorage::F32(v) => Some(v),
                _ => None,
            }
        }
    }

    impl Staged for u8 {
        fn values(s: &CpuStorage) -> Option<&[u8]> {
            match s {
                CpuStorage::U8(v) => Some(v),
                _ => None,
            }
        }
    }

    /// `t`'s values through the pinned buffer (grown to fit) onto the GPU, on `stream`.
    fn through_pinned<T: Staged>(
        stream: &Arc<CudaStream>,
        device: &CudaDevice,
        pinned: &mut Option<PinnedHostSlice<T>>,
        t: &Tensor,
    ) -> Result<Tensor> {
        let t = t.contiguous()?;
        let n = t.elem_count();
        let (storage, layout) = t.storage_and_layout();
        let values = match &*storage {
            Storage::Cpu(cpu) => T::values(cpu),
            _ => None,
        }
        .ok_or_else(|| cuda_err(format!("a {:?} batch not on the CPU", t.dtype())))?;
        let values = &values[layout.start_offset()..layout.start_offset() + n];
        if pinned.as_ref().is_none_or(|p| p.len() != n) {
            // SAFETY: every element is written below before the copy reads it.
            *pinned = Some(unsafe { stream.context().alloc_pinned::<T>(n) }.map_err(cuda_err)?);
        }
        let buffer = pinned.as_mut().expect("allocated above");
        // Waits for the previous copy out of this buffer to finish.
        buffer
            .as_mut_slice()
            .map_err(cuda_err)?
            .copy_from_slice(values);
        // SAFETY: the copy below writes every element before anything reads it.
        let mut on_device = unsafe { stream.alloc::<T>(n) }.map_err(cuda_err)?;
        stream
            .memcpy_htod(&*buffer, &mut on_device)
            .map_err(cuda_err)?;
        let storage = CudaStorage::wrap_cuda_slice(on_device, device.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            t.shape().clone(),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    }
}
