//! Gradients summed in place: `sum += g`, `g` widened to the sum's dtype on the way (a
//! bf16 gradient into its f32 sum), one pass and no allocation, where `sum + g.to_dtype(..)`
//! made a cast, an add and a fresh sum per micro-batch.

use super::*;

/// A running sum of gradients that owns its memory, so it can be added to in place.
pub struct GradSum(Tensor);

impl GradSum {
    /// A sum holding `g` in `dtype`, in memory of its own: a gradient can share its storage
    /// with another tensor (backward hands one tensor to several nodes), which an update in
    /// place would change too.
    pub fn new(g: &Tensor, dtype: DType) -> Result<Self> {
        let own = if g.dtype() != dtype {
            // A cast writes a fresh, contiguous tensor.
            g.to_dtype(dtype)?
        } else if g.is_contiguous() {
            g.copy()?
        } else {
            g.contiguous()?
        };
        Ok(Self(own))
    }

    /// `self += g`, `g` of the sum's shape: in place where the dtypes are the sum's own,
    /// or bf16 into f32 (f64 on the CPU only); a fresh sum otherwise.
    pub fn add(&mut self, g: &Tensor) -> Result<()> {
        if g.dims() != self.0.dims() {
            return Err(crate::error::Error::Msg(format!(
                "a gradient of shape {:?} added to a sum of shape {:?}",
                g.dims(),
                self.0.dims()
            )));
        }
        let in_place = match (self.0.dtype(), g.dtype()) {
            (DType::F32, DType::F32 | DType::BF16) => {
                self.0.device().is_cpu() || (cfg!(feature = "cuda") && self.0.device().is_cuda())
            }
            (DType::F64, DType::F64) => self.0.device().is_cpu(),
            _ => false,
        } && g.device().same_device(self.0.device());
        if in_place {
            self.0.inplace_op2(&g.contiguous()?, &Accumulate)?;
        } else {
            self.0 = (&self.0 + g.to_dtype(self.0.dtype())?)?;
        }
        Ok(())
    }

    pub fn into_tensor(self) -> Tensor {
        self.0
    }
}

/// `sum += g` (the sum f32 or f64, `g` its dtype or bf16 into f32).
struct Accumulate;

impl candle_core::InplaceOp2 for Accumulate {
    fn name(&self) -> &'static str {
        "accumulate"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        if l.shape().elem_count() != gl.shape().elem_count() {
            return Err(candle_core::Error::Msg(format!(
                "accumulate: {} values into a sum of {}",
                gl.shape().elem_count(),
                l.shape().elem_count()
            )));
        }
        match (s.dtype(), gs.dtype()) {
            (DType::F32, DType::F32) => {
                let g = slice::<f32>(gs, gl)?;
                for (s, g) in slice_mut::<f32>(s, l)?.iter_mut().zip(g) {
                    *s += g;
                }
            }
            (DType::F32, DType::BF16) => {
                let g = slice::<half::bf16>(gs, gl)?;
                for (s, g) in slice_mut::<f32>(s, l)?.iter_mut().zip(g) {
                    *s += g.to_f32();
                }
            }
            (DType::F64, DType::F64) => {
                let g = slice::<f64>(gs, gl)?;
                for (s, g) in slice_mut::<f64>(s, l)?.iter_mut().zip(g) {
                    *s += g;
                }
            }
            (sum, g) => {
                return Err(candle_core::Error::Msg(format!(
                    "accumulate: a {g:?} gradient into a {sum:?} sum"
                )))
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::accumulate(s, l, gs, gl)
    }
}
