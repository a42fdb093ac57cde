//! Softmax over the last dimension, with its own backward.

use super::*;

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !on_cpu(x) {
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        return Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?);
    }
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}

struct Softmax;

fn softmax_fwd<T: Real>(x: &[T], width: usize) -> Vec<T> {
    let mut y = vec![T::c(0.0); x.len()];
    with_simd!(
        for (row, out) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
            let max = row
                .iter()
                .copied()
                .fold(row[0], |m, v| if v > m { v } else { m });
            let mut sum = T::c(0.0);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = T::c(1.0) / sum;
            for o in out.iter_mut() {
                *o *= inv;
            }
        }
    );
    y
}

fn softmax_bwd<T: Real>(y: &[T], dy: &[T], width: usize) -> Vec<T> {
    let mut dx = vec![T::c(0.0); y.len()];
    with_simd!(for ((y, dy), dx) in y
        .chunks_exact(width)
        .zip(dy.chunks_exact(width))
        .zip(dx.chunks_exact_mut(width))
    {
        let mut dot = T::c(0.0);
        for (&a, &b) in y.iter().zip(dy) {
            dot += a * b;
        }
        for ((d, &a), &b) in dx.iter_mut().zip(y).zip(dy) {
            *d = a * (b - dot);
        }
    });
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
