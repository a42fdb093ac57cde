//! Softmax over the last dimension, with its own backward.

use super::*;

/// Softmax over the last dimension.
/// Half-precision inputs are computed in f32 (exponentials and the row sums) and the
/// probabilities rounded back to the input's dtype, as autocast does.
/// On a GPU the CUDA kernels (`softmax.cu`), one pass each way.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::softmax_applies(x) {
        return super::cuda::softmax(x);
    }
    if let dtype @ (DType::BF16 | DType::F16) = x.dtype() {
        return Ok(softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?);
    }
    if !on_cpu(x) {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        return Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?);
    }
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}

struct Softmax;

/// A row's softmax, in place.
#[inline(always)]
pub(super) fn softmax_row_in_place<T: Real>(row: &mut [T]) {
    let max = max_of(row);
    for x in row.iter_mut() {
        *x = (*x - max).exp();
    }
    let inv = T::c(1.0) / sum_of(row, |v| v);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// A row's gradient through softmax `y`, in place of the output's `dy`:
/// `dy ← y ⊙ (dy − Σ y ⊙ dy) · scale` (scale folds in a following op's constant factor).
#[inline(always)]
pub(super) fn softmax_backward_row_in_place<T: Real>(dy: &mut [T], y: &[T], scale: T) {
    let dot = sum_of2(dy, y, |a, b| a * b);
    for (d, &yi) in dy.iter_mut().zip(y) {
        *d = yi * (*d - dot) * scale;
    }
}

fn softmax_fwd<T: Real>(x: &[T], width: usize) -> Vec<T> {
    let mut y = x.to_vec();
    with_simd!(for row in y.chunks_exact_mut(width) {
        softmax_row_in_place(row);
    });
    y
}

fn softmax_bwd<T: Real>(y: &[T], dy: &[T], width: usize) -> Vec<T> {
    let mut dx = dy.to_vec();
    with_simd!(
        for (dx, y) in dx.chunks_exact_mut(width).zip(y.chunks_exact(width)) {
            softmax_backward_row_in_place(dx, y, T::c(1.0));
        }
    );
    dx
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let width = l.shape().dims().last().copied().unwrap_or(1).max(1);
        fn run<T: Real>(s: &CpuStorage, l: &Layout, w: usize) -> candle_core::Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(softmax_fwd(slice::<T>(s, l)?, w)))
        }
        Ok((by_dtype!(s.dtype(), run(s, l, width))?, l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let width = y.dims().last().copied().unwrap_or(1).max(1);
        fn run<T: Real>(y: &Tensor, dy: &Tensor, w: usize) -> candle_core::Result<Tensor> {
            let dx = with_slice::<T, _>(y, |y| {
                with_slice::<T, _>(dy, |dy| Ok(softmax_bwd(y, dy, w)))
            })?;
            Tensor::from_vec(dx, y.shape(), y.device())
        }
        Ok(Some(by_dtype!(y.dtype(), run(y, dy, width))?))
    }
}
