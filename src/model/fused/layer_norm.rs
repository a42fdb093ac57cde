//! Layer norm over the last dimension, with its own backward; each row's mean and 1/σ are
//! kept from forward for backward.

use super::*;

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
///
/// Half-precision inputs are normalised in f32 (statistics, affine and the weights'
/// gradients), the output rounded back: autocast's rule for layer norm. On a GPU, f32
/// weights with an f32 or bf16 input run the CUDA kernels (`cuda.rs`).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    // On a GPU: the CUDA kernels (an f32 or bf16 input read as it is, no cast pass).
    #[cfg(feature = "cuda")]
    if super::cuda::layer_norm_applies(x, weight, bias) {
        return super::cuda::layer_norm(x, weight, bias, eps, DType::F32);
    }
    let half = |t: &Tensor| matches!(t.dtype(), DType::BF16 | DType::F16);
    if half(x) || half(weight) {
        let wide = |t: &Tensor| t.to_dtype(DType::F32);
        return Ok(
            layer_norm(&wide(x)?, &wide(weight)?, &wide(bias)?, eps)?.to_dtype(weight.dtype())?
        );
    }
    if !on_cpu(x) {
        return Ok(candle_nn::ops::layer_norm_slow(x, weight, bias, eps)?);
    }
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp {
            eps: f64::from(eps),
            stats: std::sync::Mutex::new(None),
        },
    )?)
}

/// [`layer_norm`]'s output in `dtype`: the dtype of the matrix product that reads it
/// (bf16 under mixed precision), as a cast of the norm would give it. On a GPU the kernel
/// writes it so, in place of the f32 output and a cast of it: the graph would keep both
/// until backward (candle keeps every op's output that a later op took in), 6 bytes an
/// element where this keeps 2.
pub fn layer_norm_to(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    dtype: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if dtype == DType::BF16 && super::cuda::layer_norm_applies(x, weight, bias) {
        return super::cuda::layer_norm(x, weight, bias, eps, DType::BF16);
    }
    Ok(layer_norm(x, weight, bias, eps)?.to_dtype(dtype)?)
}

struct LayerNormOp {
    eps: f64,
    /// Each row's mean and 1/σ from forward (backward would otherwise recompute them).
    stats: std::sync::Mutex<Option<CpuStorage>>,
}

/// Mean and 1/σ of one row (two passes: the variance of values far from 0 stays exact).
#[inline(always)]
fn row_stats<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::c(row.len() as f64);
    let mean = sum_of(row, |v| v) / n;
    let var = sum_of(row, |v| (v - mean) * (v - mean)) / n;
    (mean, T::c(1.0) / (var + eps).sqrt())
}

/// (normalised output, each row's mean and 1/σ).
fn layer_norm_fwd<T: Real>(x: &[T], w: &[T], b: &[T], eps: T) -> (Vec<T>, Vec<T>) {
    let width = w.len();
    assert!(
        width > 0 && x.len().is_multiple_of(width) && b.len() == width,
        "layer norm: sizes"
    );
    let mut stats = Vec::with_capacity(2 * (x.len() / width));
    // SAFETY: whole rows (checked), each element of each written once.
    let y = unsafe {
        uninit_vec(x.len(), |y| {
            with_simd!(
                for (row, out) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
                    let (mean, rstd) = row_stats(row, eps);
                    stats.push(mean);
                    stats.push(rstd);
                    for (((o, &v), &g), &c) in out.iter_mut().zip(row).zip(w).zip(b) {
                        o.write((v - mean) * rstd * g + c);
                    }
                }
            )
        })
    };
    (y, stats)
}

/// (dx, dweight, dbias), with forward's row statistics.
fn layer_norm_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], stats: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
    let width = w.len();
    let n = T::c(width as f64);
    assert!(
        width > 0 && x.len().is_multiple_of(width) && dy.len() == x.len(),
        "layer norm: sizes"
    );
    let mut dx = Vec::with_capacity(x.len());
    let mut dw = vec![T::c(0.0); width];
    let mut db = vec![T::c(0.0); width];
    assert_eq!(
        stats.len(),
        2 * (x.len() / width),
        "layer norm: row statistics"
    );
    with_simd!(for (((row, g), d), st) in x
        .chunks_exact(width)
        .zip(dy.chunks_exact(width))
        .zip(dx.spare_capacity_mut()[..x.len()].chunks_exact_mut(width))
        .zip(stats.chunks_exact(2))
    {
        let (mean, rstd) = (st[0], st[1]);
        // Σ g·w and Σ g·w·x̂ over the row, x̂ = (x − mean)/σ.
        let (sum_gw, sum_gw_xhat) = sums_of3(row, g, w, |v, gi, wi| {
            let gw = gi * wi;
            (gw, gw * ((v - mean) * rstd))
        });
        let mean_gw = sum_gw / n;
        let mean_gw_xhat = sum_gw_xhat / n;
        for (((di, &v), &gi), (&wi, (dwi, dbi))) in d
            .iter_mut()
            .zip(row)
            .zip(g)
            .zip(w.iter().zip(dw.iter_mut().zip(db.iter_mut())))
        {
            let h = (v - mean) * rstd;
            di.write(rstd * (gi * wi - mean_gw - h * mean_gw_xhat));
            *dwi += gi * h;
            *dbi += gi;
        }
    });
    // SAFETY: whole rows (checked), each element of each written once above.
    unsafe { dx.set_len(x.len()) };
    (dx, dw, db)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            x: (&CpuStorage, &Layout),
            w: (&CpuStorage, &Layout),
            b: (&CpuStorage, &Layout),
            eps: f64,
        ) -> candle_core::Result<(CpuStorage, CpuStorage)> {
            let (x, w, b) = (
                slice::<T>(x.0, x.1)?,
                slice::<T>(w.0, w.1)?,
                slice::<T>(b.0, b.1)?,
            );
            if w.is_empty() || x.len() % w.len() != 0 || b.len() != w.len() {
                return Err(candle_core::Error::Msg(format!(
                    "layer norm: {} values, weight {}, bias {}",
                    x.len(),
                    w.len(),
                    b.len()
                )));
            }
            let (y, stats) = layer_norm_fwd(x, w, b, T::c(eps));
            Ok((T::to_cpu_storage_owned(y), T::to_cpu_storage_owned(stats)))
        }
        let (out, stats) = by_dtype!(s1.dtype(), run((s1, l1), (s2, l2), (s3, l3), self.eps))?;
        *self.stats.lock().expect("layer norm statistics") = Some(stats);
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(
            x: &Tensor,
            w: &Tensor,
            dy: &Tensor,
            stats: &CpuStorage,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let stats = stats.as_slice::<T>()?;
            let (dx, dw, db) = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(w, |ws| {
                    with_slice::<T, _>(dy, |g| Ok(layer_norm_bwd(xs, ws, g, stats)))
                })
            })?;
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
                Some(Tensor::from_vec(db, w.shape(), dev)?),
            ))
        }
        let stats = self.stats.lock().expect("layer norm statistics");
        let stats = stats
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("layer norm backward before forward".into()))?;
        by_dtype!(x.dtype(), run(x, w, dy, stats))
    }
}
