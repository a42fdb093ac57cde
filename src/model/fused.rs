//! Fused CPU kernels with their own backward, for the ops where candle's composition of
//! small ops costs the most on the CPU: exact GELU (candle's `erf` is a scalar call per
//! element, and its backward is a chain of temporaries), softmax over the last dimension,
//! layer norm, and the bias add (whose gradient candle reduces with a strided scalar loop).
//!
//! Each op is one pass over memory forward and one backward, in f32 (SIMD-friendly code:
//! a polynomial `exp` and an `erf` without branches, compiled again for AVX2+FMA where
//! the CPU has it) or f64 (std's `exp`, candle's `erf`, for the gradient tests). On other
//! devices, and for other dtypes, the same maths runs as plain candle ops — which is also
//! what the CPU kernels are tested against.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::error::Result;

/// The element types the kernels take (also the optimizer's in-place update).
pub(crate) trait Real:
    candle_core::WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::ops::Neg<Output = Self>
    + PartialOrd
{
    fn exp(self) -> Self;
    fn erf(self) -> Self;
    fn sqrt(self) -> Self;
    fn c(v: f64) -> Self {
        Self::from_f64(v)
    }
    /// The values of a CPU storage of this type, to write in place.
    fn vec_mut(s: &mut CpuStorage) -> candle_core::Result<&mut Vec<Self>>;
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn vec_mut(s: &mut CpuStorage) -> candle_core::Result<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Ok(v),
            _ => Err(candle_core::Error::Msg("expected an f64 storage".into())),
        }
    }
}

impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn vec_mut(s: &mut CpuStorage) -> candle_core::Result<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            _ => Err(candle_core::Error::Msg("expected an f32 storage".into())),
        }
    }
}

/// `e^x` in f32 without branches or calls (so loops over it vectorise): Cephes' degree-6
/// polynomial on `x - n ln 2`, scaled by `2^n` through the exponent bits. Relative error
/// about 2e-7 over the whole range; inputs are clamped to where f32 neither overflows nor
/// goes subnormal (e^-87.3 ≈ 1.2e-38, flushed to 0 below).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer with plain adds.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        p * scale
    }
}

/// `erf(x)` in f32, Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7) with the
/// branch-free `exp` above.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp_f32(-a * a);
    y.copysign(x)
}

/// Runs `body` compiled for AVX2 + FMA when the CPU has them (the loops in these kernels
/// then run 8 floats at a time), else as compiled for the baseline target.
macro_rules! with_avx2 {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                unsafe { fast(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

fn contiguous_range(l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("CPU kernels take contiguous tensors".into()))?;
    Ok(start..end)
}

/// The contiguous elements of a CPU tensor.
pub(crate) fn slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    Ok(&s.as_slice::<T>()?[contiguous_range(l)?])
}

/// The contiguous elements of a CPU tensor, to write in place.
pub(crate) fn slice_mut<'a, T: Real>(
    s: &'a mut CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a mut [T]> {
    Ok(&mut T::vec_mut(s)?[contiguous_range(l)?])
}

/// Runs `f` on the elements of `t` (a contiguous CPU tensor), from backward passes.
fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => f(slice::<T>(s, layout)?),
        _ => Err(candle_core::Error::Msg(
            "fused CPU op on a non-CPU tensor".into(),
        )),
    }
}

fn on_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            other => Err(candle_core::Error::Msg(format!("fused op: unsupported dtype {other:?}"))),
        }
    };
}

// ---------------------------------------------------------------- GELU (erf)

/// Exact GELU, `x Φ(x)`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !on_cpu(x) {
        // Through `erf`, not candle's `gelu_erf`: its backward rounds 1/√(2π) to six
        // digits (a 7e-7 relative error in the gradient that f64 parity sees).
        let cdf = ((x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
        return Ok((x * cdf?)?);
    }
    Ok(x.contiguous()?.apply_op1(GeluErf)?)
}

struct GeluErf;

fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    let half = T::c(0.5);
    let one = T::c(1.0);
    let k = T::c(std::f64::consts::FRAC_1_SQRT_2);
    with_avx2!(x
        .iter()
        .map(|&v| half * v * (one + (v * k).erf()))
        .collect())
}

fn gelu_bwd<T: Real>(x: &[T], dy: &[T]) -> Vec<T> {
    let half = T::c(0.5);
    let one = T::c(1.0);
    let k = T::c(std::f64::consts::FRAC_1_SQRT_2);
    let density = T::c(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    with_avx2!(x
        .iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let cdf = half * (one + (v * k).erf());
            let pdf = density * (-(half * v * v)).exp();
            g * (cdf + v * pdf)
        })
        .collect())
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(gelu_fwd(slice::<T>(s, l)?)))
        }
        Ok((by_dtype!(s.dtype(), run(s, l))?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn run<T: Real>(x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
            let dx = with_slice::<T, _>(x, |x| with_slice::<T, _>(dy, |dy| Ok(gelu_bwd(x, dy))))?;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(by_dtype!(x.dtype(), run(x, dy))?))
    }
}

// ---------------------------------------------------------------- softmax

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
    with_avx2!(
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
    with_avx2!(for ((y, dy), dx) in y
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

// ---------------------------------------------------------------- layer norm

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    if !on_cpu(x) {
        return Ok(candle_nn::ops::layer_norm_slow(x, weight, bias, eps)?);
    }
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp {
            eps: f64::from(eps),
        },
    )?)
}

struct LayerNormOp {
    eps: f64,
}

/// Mean and 1/σ of one row (two passes: the variance of values far from 0 stays exact).
#[inline(always)]
fn row_stats<T: Real>(row: &[T], eps: T) -> (T, T) {
    let n = T::c(row.len() as f64);
    let mut sum = T::c(0.0);
    for &v in row {
        sum += v;
    }
    let mean = sum / n;
    let mut var = T::c(0.0);
    for &v in row {
        let d = v - mean;
        var += d * d;
    }
    (mean, T::c(1.0) / (var / n + eps).sqrt())
}

fn layer_norm_fwd<T: Real>(x: &[T], w: &[T], b: &[T], eps: T) -> Vec<T> {
    let width = w.len();
    let mut y = vec![T::c(0.0); x.len()];
    with_avx2!(
        for (row, out) in x.chunks_exact(width).zip(y.chunks_exact_mut(width)) {
            let (mean, rstd) = row_stats(row, eps);
            for (((o, &v), &g), &c) in out.iter_mut().zip(row).zip(w).zip(b) {
                *o = (v - mean) * rstd * g + c;
            }
        }
    );
    y
}

/// (dx, dweight, dbias).
fn layer_norm_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: T) -> (Vec<T>, Vec<T>, Vec<T>) {
    let width = w.len();
    let n = T::c(width as f64);
    let mut dx = vec![T::c(0.0); x.len()];
    let mut dw = vec![T::c(0.0); width];
    let mut db = vec![T::c(0.0); width];
    let mut xhat = vec![T::c(0.0); width];
    with_avx2!(for ((row, g), d) in x
        .chunks_exact(width)
        .zip(dy.chunks_exact(width))
        .zip(dx.chunks_exact_mut(width))
    {
        let (mean, rstd) = row_stats(row, eps);
        let mut sum_gw = T::c(0.0);
        let mut sum_gw_xhat = T::c(0.0);
        for ((((h, &v), &gi), &wi), (dwi, dbi)) in xhat
            .iter_mut()
            .zip(row)
            .zip(g)
            .zip(w)
            .zip(dw.iter_mut().zip(db.iter_mut()))
        {
            *h = (v - mean) * rstd;
            let gw = gi * wi;
            sum_gw += gw;
            sum_gw_xhat += gw * *h;
            *dwi += gi * *h;
            *dbi += gi;
        }
        let mean_gw = sum_gw / n;
        let mean_gw_xhat = sum_gw_xhat / n;
        for (((di, &h), &gi), &wi) in d.iter_mut().zip(&xhat).zip(g).zip(w) {
            *di = rstd * (gi * wi - mean_gw - h * mean_gw_xhat);
        }
    });
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
        ) -> candle_core::Result<CpuStorage> {
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
            Ok(T::to_cpu_storage_owned(layer_norm_fwd(x, w, b, T::c(eps))))
        }
        let out = by_dtype!(s1.dtype(), run((s1, l1), (s2, l2), (s3, l3), self.eps))?;
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
            eps: f64,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dx, dw, db) = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(w, |ws| {
                    with_slice::<T, _>(dy, |g| Ok(layer_norm_bwd(xs, ws, g, T::c(eps))))
                })
            })?;
            let dev = x.device();
            Ok((
                Some(Tensor::from_vec(dx, x.shape(), dev)?),
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
                Some(Tensor::from_vec(db, w.shape(), dev)?),
            ))
        }
        by_dtype!(x.dtype(), run(x, w, dy, self.eps))
    }
}

// ---------------------------------------------------------------- bias add

/// `y + bias` with `bias` broadcast over the rows of `y` (`[rows, width]`, `[width]`).
pub fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !on_cpu(y) || y.rank() != 2 {
        return Ok(y.broadcast_add(bias)?);
    }
    Ok(y.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)?)
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fused-add-bias"
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
            if b.is_empty() || y.len() % b.len() != 0 {
                return Err(candle_core::Error::Msg(format!(
                    "bias of {} for rows of {} values",
                    b.len(),
                    y.len()
                )));
            }
            let mut out = y.to_vec();
            with_avx2!(for row in out.chunks_exact_mut(b.len()) {
                for (o, &c) in row.iter_mut().zip(b) {
                    *o += c;
                }
            });
            Ok(T::to_cpu_storage_owned(out))
        }
        Ok((
            by_dtype!(s1.dtype(), run((s1, l1), (s2, l2)))?,
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(bias: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
            let width = bias.elem_count();
            let sums = with_slice::<T, _>(dy, |g| {
                let mut sums = vec![T::c(0.0); width];
                with_avx2!(for row in g.chunks_exact(width) {
                    for (s, &v) in sums.iter_mut().zip(row) {
                        *s += v;
                    }
                });
                Ok(sums)
            })?;
            Tensor::from_vec(sums, bias.shape(), bias.device())
        }
        Ok((
            Some(dy.clone()),
            Some(by_dtype!(dy.dtype(), run(bias, dy))?),
        ))
    }
}
