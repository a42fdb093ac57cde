//! Exact GELU, `x Φ(x)`, with its own backward; optionally with the preceding layer's
//! bias added in the same pass (`gelu(y + b)`, the MLP's first layer).

use super::*;

/// Exact GELU, `x Φ(x)`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    // On a GPU: the CUDA kernels, in the values' dtype (f32 or bf16, computing in f32).
    #[cfg(feature = "cuda")]
    if super::cuda::gelu_applies(x, None) {
        return super::cuda::gelu(super::plan::Gelu::Erf, x, None);
    }
    if let dtype @ (DType::BF16 | DType::F16) = x.dtype() {
        return Ok(gelu_erf(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?);
    }
    if !on_cpu(x) {
        return gelu_plain(x);
    }
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
}

/// OpenAI's quick GELU, `x σ(1.702 x)`: on a GPU the CUDA kernels (one pass each way, in
/// the values' dtype computing in f32); elsewhere plain ops, half precision computed in
/// f32 and rounded back once.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::gelu_applies(x, None) {
        return super::cuda::gelu(super::plan::Gelu::Quick, x, None);
    }
    if let dtype @ (DType::BF16 | DType::F16) = x.dtype() {
        return Ok(quick_gelu(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)?);
    }
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// `gelu(y + bias)`, `bias` broadcast over the rows of `y` (its last dimension): on the CPU
/// one pass forward and one backward (the bias gradient summed in the same pass), where
/// a linear layer's bias add and the activation would take two each.
pub fn gelu_erf_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let width = bias.elem_count();
    if y.dims().last() != Some(&width) || bias.rank() != 1 {
        return Err(crate::error::Error::Msg(format!(
            "GELU with bias: a bias of shape {:?} for values of shape {:?}",
            bias.dims(),
            y.dims()
        )));
    }
    #[cfg(feature = "cuda")]
    if super::cuda::gelu_applies(y, Some(bias)) {
        return super::cuda::gelu(super::plan::Gelu::Erf, y, Some(bias));
    }
    if let dtype @ (DType::BF16 | DType::F16) = y.dtype() {
        let wide = |t: &Tensor| t.to_dtype(DType::F32);
        return Ok(gelu_erf_bias(&wide(y)?, &wide(bias)?)?.to_dtype(dtype)?);
    }
    if !on_cpu(y) {
        return gelu_plain(&y.broadcast_add(bias)?);
    }
    Ok(y.contiguous()?.apply_op2(&bias.contiguous()?, GeluErf)?)
}

/// Through `erf`, not candle's `gelu_erf`: its backward rounds 1/√(2π) to six digits (a
/// 7e-7 relative error in the gradient that f64 parity sees).
fn gelu_plain(x: &Tensor) -> Result<Tensor> {
    let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    Ok((x * cdf?)?)
}

struct GeluErf;

/// The rows `x` is cut into: the bias's width, or the whole slice without one.
fn row_width<T>(x: &[T], bias: Option<&[T]>) -> usize {
    bias.map_or(x.len(), <[T]>::len).max(1)
}

/// `z Φ(z)`. (`#[inline(always)]`, as every function the kernels' loops call: a call that
/// is not inlined runs the baseline code, not the SIMD copy's.)
#[inline(always)]
fn gelu_value<T: Real>(z: T) -> T {
    T::c(0.5) * z * (T::c(1.0) + (z * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// `g · d/dz [z Φ(z)] = g (Φ(z) + z φ(z))`.
#[inline(always)]
fn gelu_grad<T: Real>(z: T, g: T) -> T {
    let half = T::c(0.5);
    let cdf = half * (T::c(1.0) + (z * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = T::c(1.0 / (2.0 * std::f64::consts::PI).sqrt()) * (-(half * z * z)).exp();
    g * (cdf + z * pdf)
}

// Plain `for` loops, not `map(..).collect()`: the iterator's `fold` is a separate function
// that is not inlined into the SIMD copy, so it would run without the wide vectors.
fn gelu_fwd<T: Real>(x: &[T], bias: Option<&[T]>) -> Vec<T> {
    let width = row_width(x, bias);
    assert!(
        x.len().is_multiple_of(width),
        "GELU: rows of the bias's width"
    );
    // SAFETY: whole rows (checked); the loops write one output per input.
    unsafe {
        uninit_vec(x.len(), |y| {
            with_simd!(
                for (out, row) in y.chunks_exact_mut(width).zip(x.chunks_exact(width)) {
                    match bias {
                        Some(b) => {
                            for ((o, &v), &c) in out.iter_mut().zip(row).zip(b) {
                                o.write(gelu_value(v + c));
                            }
                        }
                        None => {
                            for (o, &z) in out.iter_mut().zip(row) {
                                o.write(gelu_value(z));
                            }
                        }
                    }
                }
            )
        })
    }
}

/// (dx, the bias's gradient when there is a bias).
fn gelu_bwd<T: Real>(x: &[T], bias: Option<&[T]>, dy: &[T]) -> (Vec<T>, Option<Vec<T>>) {
    let width = row_width(x, bias);
    assert_eq!(x.len(), dy.len(), "GELU backward: gradient size");
    assert!(
        x.len().is_multiple_of(width),
        "GELU: rows of the bias's width"
    );
    let mut db = bias.map(|b| vec![T::c(0.0); b.len()]);
    // SAFETY: whole rows (checked); the loops write one output per input.
    let dx = unsafe {
        uninit_vec(x.len(), |dx| {
            with_simd!(for ((out, row), g) in dx
                .chunks_exact_mut(width)
                .zip(x.chunks_exact(width))
                .zip(dy.chunks_exact(width))
            {
                match (bias, db.as_mut()) {
                    (Some(b), Some(db)) => {
                        for ((((o, &v), &c), &gi), s) in
                            out.iter_mut().zip(row).zip(b).zip(g).zip(db.iter_mut())
                        {
                            let d = gelu_grad(v + c, gi);
                            o.write(d);
                            *s += d;
                        }
                    }
                    _ => {
                        for ((o, &z), &gi) in out.iter_mut().zip(row).zip(g) {
                            o.write(gelu_grad(z, gi));
                        }
                    }
                }
            })
        })
    };
    (dx, db)
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(gelu_fwd(slice::<T>(s, l)?, None)))
        }
        Ok((by_dtype!(s.dtype(), run(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn run<T: Real>(x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
            let dx = with_slice::<T, _>(x, |x| {
                with_slice::<T, _>(dy, |dy| Ok(gelu_bwd(x, None, dy).0))
            })?;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(by_dtype!(x.dtype(), run(x, dy))?))
    }
}

impl CustomOp2 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            y: (&CpuStorage, &Layout),
            b: (&CpuStorage, &Layout),
        ) -> candle_core::Result<CpuStorage> {
            let (y, b) = (slice::<T>(y.0, y.1)?, slice::<T>(b.0, b.1)?);
            Ok(T::to_cpu_storage_owned(gelu_fwd(y, Some(b))))
        }
        Ok((
            by_dtype!(s1.dtype(), run((s1, l1), (s2, l2)))?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(
            y: &Tensor,
            bias: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let (dx, db) = with_slice::<T, _>(y, |ys| {
                with_slice::<T, _>(bias, |bs| {
                    with_slice::<T, _>(dy, |g| Ok(gelu_bwd(ys, Some(bs), g)))
                })
            })?;
            let db = db.expect("a bias gradient when there is a bias");
            Ok((
                Some(Tensor::from_vec(dx, y.shape(), y.device())?),
                Some(Tensor::from_vec(db, bias.shape(), bias.device())?),
            ))
        }
        by_dtype!(y.dtype(), run(y, bias, dy))
    }
}
