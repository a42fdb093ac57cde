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

    use candle_core::cuda_backend::cudarc::driver::{CudaStream, PinnedHostSlice};
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::{DType, Device, Storage, Tensor};

    use crate::error::{Error, Result};
    use crate::model::TowerInput;

    pub struct Uploader {
        device: CudaDevice,
        stream: Arc<CudaStream>,
        /// The images' staging buffer, kept from batch to batch.
        pinned: Option<PinnedHostSlice<f32>>,
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
                pinned: None,
            })
        }

        pub fn upload(&mut self, input: TowerInput) -> Result<TowerInput> {
            Ok(match input {
                TowerInput::Images(t) if t.dtype() == DType::F32 && t.device().is_cpu() => {
                    TowerInput::Images(self.images(&t)?)
                }
                // Captions are a few KB: the step's ordinary copy.
                other => other.to_device(&Device::Cuda(self.device.clone()))?,
            })
        }

        /// `t`'s values through the pinned buffer onto the GPU, on the copy stream.
        fn images(&mut self, t: &Tensor) -> Result<Tensor> {
            let t = t.contiguous()?;
            let n = t.elem_count();
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cpu(candle_core::CpuStorage::F32(values)) = &*storage else {
                return Err(cuda_err("images not in f32 on the CPU"));
            };
            let values = &values[layout.start_offset()..layout.start_offset() + n];
            if self.pinned.as_ref().is_none_or(|p| p.len() != n) {
                let context = self.stream.context();
                // SAFETY: every element is written below before the copy reads it.
                self.pinned = Some(unsafe { context.alloc_pinned::<f32>(n) }.map_err(cuda_err)?);
            }
            let pinned = self.pinned.as_mut().expect("allocated above");
            // Waits for the previous copy out of this buffer to finish.
            pinned
                .as_mut_slice()
                .map_err(cuda_err)?
                .copy_from_slice(values);
            // SAFETY: the copy below writes every element before anything reads it.
            let mut on_device = unsafe { self.stream.alloc::<f32>(n) }.map_err(cuda_err)?;
            self.stream
                .memcpy_htod(&*pinned, &mut on_device)
                .map_err(cuda_err)?;
            let storage = CudaStorage::wrap_cuda_slice(on_device, self.device.clone());
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                t.shape().clone(),
                candle_core::op::BackpropOp::none(),
                false,
            ))
        }
    }
}
