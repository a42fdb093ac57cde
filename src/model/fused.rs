//! Fused CPU kernels with their own backward, for the ops where candle's composition of
//! small ops costs the most on the CPU: exact GELU (candle's `erf` is a scalar call per
//! element, and its backward is a chain of temporaries), softmax over the last dimension,
//! layer norm, multi-head attention (no per-head copies) and the linear layer (bias in
//! the GEMM; candle reduced the bias gradient with a strided scalar loop).
//!
//! Each op is one pass over memory forward and one backward, in f32 (SIMD-friendly code:
//! a polynomial `exp` and an `erf` without branches, compiled again for AVX-512 or AVX2
//! with FMA where the CPU has them; GEMMs through the `gemm` crate, with strides) or f64 (std's `exp`, candle's `erf`, for the gradient tests). On other
//! devices, and for other dtypes, the same maths runs as plain candle ops — which is also
//! what the CPU kernels are tested against.

use std::mem::MaybeUninit;

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

/// `e^x` in f32 without branches or calls (so loops over it vectorise; `mul_add` is one
/// instruction in the AVX2/AVX-512 copies that [`with_simd`] makes, a libm call only on
/// x86 CPUs older than FMA): Cephes' degree-6
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
    let shifted = x.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r) + 1.0;
    // n sits in the low mantissa bits of `shifted`: read it with integer ops (an `as i32`
    // cast is a saturating conversion that keeps the loop from vectorising).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
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
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = 1.061_405_4f32.mul_add(t, -1.453_152_1);
    let poly = poly.mul_add(t, 1.421_413_7);
    let poly = poly.mul_add(t, -0.284_496_74);
    let poly = poly.mul_add(t, 0.254_829_6) * t;
    let y = (-poly).mul_add(exp_f32(-a * a), 1.0);
    y.copysign(x)
}

/// Runs `body` compiled for AVX-512 (16 floats a vector) or AVX2 (8), with FMA, when the
/// CPU has them, else as compiled for the baseline target. The loops must sit in `body`
/// itself (plain `for` loops over slices, `#[inline(always)]` helpers): a function that is
/// called rather than inlined, such as an iterator's `fold`, keeps the baseline code.
macro_rules! with_simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY (both): the features were just detected. (Callers may already be in an
            // unsafe block.)
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("fma")
            {
                #[allow(unused_unsafe)]
                let result = unsafe { avx512(|| $body) };
                result
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                #[allow(unused_unsafe)]
                let result = unsafe { avx2(|| $body) };
                result
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

/// A vector of `len` values that `fill` writes, each once, with no zero-filling pass
/// first (on outputs of tens of MB, that pass was a visible share of a CPU step).
///
/// # Safety
/// `fill` must write every element of the slice it is given.
unsafe fn uninit_vec<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `fill` wrote all `len` elements.
    unsafe { v.set_len(len) };
    v
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

// Plain `for` loops, not `map(..).collect()`: the iterator's `fold` is a separate function
// that is not inlined into the AVX2 copy, so it would run without the wide vectors.
fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    let half = T::c(0.5);
    let one = T::c(1.0);
    let k = T::c(std::f64::consts::FRAC_1_SQRT_2);
    // SAFETY: the loop writes one output per input.
    unsafe {
        uninit_vec(x.len(), |y| {
            with_simd!(for (o, &v) in y.iter_mut().zip(x) {
                o.write(half * v * (one + (v * k).erf()));
            })
        })
    }
}

fn gelu_bwd<T: Real>(x: &[T], dy: &[T]) -> Vec<T> {
    let half = T::c(0.5);
    let one = T::c(1.0);
    let k = T::c(std::f64::consts::FRAC_1_SQRT_2);
    let density = T::c(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    assert_eq!(x.len(), dy.len(), "GELU backward: gradient size");
    // SAFETY: the loop writes one output per input.
    unsafe {
        uninit_vec(x.len(), |dx| {
            with_simd!(for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                let cdf = half * (one + (v * k).erf());
                let pdf = density * (-(half * v * v)).exp();
                o.write(g * (cdf + v * pdf));
            })
        })
    }
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
            stats: std::sync::Mutex::new(None),
        },
    )?)
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
    let mut xhat = vec![T::c(0.0); width];
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
            di.write(rstd * (gi * wi - mean_gw - h * mean_gw_xhat));
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

// ---------------------------------------------------------------- attention

/// Multi-head self-attention on packed projections, heads merged on the way out:
/// `qkv` `[n, len, 3·width]` (queries, then keys, then values, each `heads` blocks of
/// `width / heads`), additive `mask` broadcastable to `[n, 1, len, len]` (−∞ where
/// attention is barred); returns `softmax(q kᵀ/√d + mask) v` as `[n, len, width]`.
///
/// On the CPU one op with its own backward: the heads are read and written in place
/// through GEMM strides (no split or merge copies), each (sample, head) is one GEMM
/// thread's work, and the probabilities are kept from forward for backward.
pub fn attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (n, len, width3) = qkv.dims3()?;
    if heads == 0 || width3 % (3 * heads) != 0 {
        return Err(crate::error::Error::Msg(format!(
            "attention: {width3} packed projection values per token do not split into 3 × {heads} heads"
        )));
    }
    let width = width3 / 3;
    let mask = match mask {
        Some(m) => Some(attention_mask(m, n, len, qkv)?),
        None => None,
    };
    if !on_cpu(qkv) {
        return attention_plain(qkv, heads, mask.as_ref().map(|m| &m.values));
    }
    Ok(qkv.contiguous()?.apply_op1(AttentionOp {
        heads,
        width,
        mask,
        probs: std::sync::Mutex::new(None),
    })?)
}

/// The same maths in plain candle ops (other devices and dtypes; the CPU op's reference).
pub fn attention_plain(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let (n, len, width3) = qkv.dims3()?;
    let d = width3 / 3 / heads;
    let qkv = qkv
        .reshape((n, len, 3, heads, d))?
        .permute((2, 0, 3, 1, 4))?; // [3, n, h, len, d]
    let part = |i: usize| -> Result<Tensor> {
        Ok(qkv.get(i)?.contiguous()?.reshape((n * heads, len, d))?)
    };
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let scores = (q.matmul(&k.t()?)? * (1.0 / (d as f64).sqrt()))?;
    let scores = match mask {
        // [n or 1, len or 1, len] → [n, 1, len, len] over the heads.
        Some(m) => scores
            .reshape((n, heads, len, len))?
            .broadcast_add(&m.unsqueeze(1)?)?
            .reshape((n * heads, len, len))?,
        None => scores,
    };
    let attn = softmax_last_dim(&scores)?.matmul(&v)?; // [n*h, len, d]
    Ok(attn
        .reshape((n, heads, len, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, len, heads * d))?)
}

/// An additive mask as `[n or 1, len or 1, len]`, contiguous, in `like`'s dtype and device.
struct AttentionMask {
    values: Tensor,
    per_sample: bool,
    per_query: bool,
}

fn attention_mask(m: &Tensor, n: usize, len: usize, like: &Tensor) -> Result<AttentionMask> {
    let bad = || {
        crate::error::Error::Msg(format!(
            "attention mask of shape {:?} does not broadcast to [{n}, 1, {len}, {len}]",
            m.dims()
        ))
    };
    let m3 = match m.dims() {
        [q, k] => m.reshape((1, *q, *k))?,
        [b, 1, q, k] => m.reshape((*b, *q, *k))?,
        _ => return Err(bad()),
    };
    let (b, q, k) = m3.dims3()?;
    if !(b == 1 || b == n) || !(q == 1 || q == len) || k != len {
        return Err(bad());
    }
    Ok(AttentionMask {
        values: m3
            .to_dtype(like.dtype())?
            .to_device(like.device())?
            .contiguous()?,
        per_sample: b > 1,
        per_query: q > 1,
    })
}

struct AttentionOp {
    heads: usize,
    width: usize,
    mask: Option<AttentionMask>,
    /// The softmax probabilities `[n, heads, len, len]` from forward, for backward.
    probs: std::sync::Mutex<Option<CpuStorage>>,
}

/// A raw pointer that rayon tasks may share: each task writes only its own (sample, head)
/// block of the output.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// Through a method, so closures capture the wrapper, not its raw field.
    fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `f(scratch, task)` for tasks `0..n`: on the thread pool when it has several
/// threads, else on this thread. (Rank threads size the pool to one thread each: a
/// parallel loop would then queue every rank's tasks on the pool's one thread, while the
/// rank threads wait.) `init` makes each worker's scratch space.
fn for_each_task<S>(
    n: usize,
    init: impl Fn() -> S + Send + Sync,
    f: impl Fn(&mut S, usize) + Send + Sync,
) {
    use rayon::prelude::*;
    if rayon::current_num_threads() > 1 {
        (0..n).into_par_iter().for_each_init(init, f);
    } else {
        let mut scratch = init();
        for t in 0..n {
            f(&mut scratch, t);
        }
    }
}

/// A strided matrix operand: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

impl<T> Mat<T> {
    fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m×n] (row stride dst_rs) = scale · lhs[m×k] · rhs[k×n]`, single-threaded (the
/// callers parallelise over heads).
///
/// # Safety
/// Every operand element must be in bounds and `dst` must not overlap the operands or
/// another thread's output.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: Mat<T>,
    rhs: Mat<T>,
    scale: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        T::c(0.0),
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Row `i` of sample `b`'s additive mask, stored as `[n or 1, len or 1, len]`.
#[derive(Clone, Copy)]
struct MaskRows<'a, T> {
    values: &'a [T],
    per_sample: bool,
    per_query: bool,
    len: usize,
}

impl<'a, T> MaskRows<'a, T> {
    fn row(&self, b: usize, i: usize) -> &'a [T] {
        let rows_per_sample = if self.per_query { self.len } else { 1 };
        let row = if self.per_sample {
            b * rows_per_sample
        } else {
            0
        } + if self.per_query { i } else { 0 };
        &self.values[row * self.len..(row + 1) * self.len]
    }
}

/// Softmax of each `len`-wide row of `s` in place, after adding the mask's row (if any).
#[inline(always)]
fn softmax_rows_in_place<T: Real>(s: &mut [T], len: usize, mask: Option<(MaskRows<T>, usize)>) {
    for (i, row) in s.chunks_exact_mut(len).enumerate() {
        if let Some((m, b)) = mask {
            for (x, &a) in row.iter_mut().zip(m.row(b, i)) {
                *x += a;
            }
        }
        let max = row
            .iter()
            .copied()
            .fold(row[0], |m, v| if v > m { v } else { m });
        let mut sum = T::c(0.0);
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = T::c(1.0) / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `ds ← p ⊙ (ds − rowsum(p ⊙ ds)) · scale`: from the probabilities' gradient to the
/// scaled scores', row by row.
#[inline(always)]
fn softmax_backward_in_place<T: Real>(ds: &mut [T], p: &[T], len: usize, scale: T) {
    for (ds, p) in ds.chunks_exact_mut(len).zip(p.chunks_exact(len)) {
        let mut dot = T::c(0.0);
        for (&a, &b) in ds.iter().zip(p) {
            dot += a * b;
        }
        for (x, &pi) in ds.iter_mut().zip(p) {
            *x = pi * (*x - dot) * scale;
        }
    }
}

impl AttentionOp {
    /// (samples, tokens, heads, head width) of a `[n, len, 3·width]` input.
    fn dims(&self, l: &Layout) -> (usize, usize, usize, usize) {
        let dims = l.shape().dims();
        (dims[0], dims[1], self.heads, self.width / self.heads)
    }

    /// Runs `f` with the mask's rows (or none).
    fn with_mask<T: Real, R>(
        &self,
        len: usize,
        f: impl FnOnce(Option<MaskRows<T>>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        match &self.mask {
            None => f(None),
            Some(m) => with_slice::<T, _>(&m.values, |values| {
                f(Some(MaskRows {
                    values,
                    per_sample: m.per_sample,
                    per_query: m.per_query,
                    len,
                }))
            }),
        }
    }

    /// (output `[n, len, width]`, probabilities `[n, heads, len, len]`).
    fn forward<T: Real>(&self, qkv: &[T], l: &Layout) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let (n, len, h, d) = self.dims(l);
        let w = self.width;
        if qkv.len() != n * len * 3 * w {
            return Err(candle_core::Error::Msg("attention: input size".into()));
        }
        let scale = T::c(1.0 / (d as f64).sqrt());
        let mut out = Vec::<T>::with_capacity(n * len * w);
        let mut probs = Vec::<T>::with_capacity(n * h * len * len);
        let (out_ptr, probs_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(probs.as_mut_ptr()));
        self.with_mask::<T, _>(len, |mask| {
            for_each_task(
                n * h,
                || (),
                |_, t| {
                    let (b, head) = (t / h, t % h);
                    // SAFETY: every offset below stays inside `qkv` (checked size), the task's
                    // own probability block, or its own head's columns of the output.
                    unsafe {
                        let q = Mat {
                            ptr: qkv.as_ptr().add(b * len * 3 * w + head * d),
                            rs: 3 * w,
                            cs: 1,
                        };
                        let k = Mat {
                            ptr: q.ptr.add(w),
                            ..q
                        };
                        let v = Mat {
                            ptr: q.ptr.add(2 * w),
                            ..q
                        };
                        let p = probs_ptr.get().add(t * len * len);
                        gemm_into(len, len, d, p, len, q, k.t(), scale);
                        let rows = std::slice::from_raw_parts_mut(p, len * len);
                        with_simd!(softmax_rows_in_place(rows, len, mask.map(|m| (m, b))));
                        let pm = Mat {
                            ptr: p as *const T,
                            rs: len,
                            cs: 1,
                        };
                        let o = out_ptr.get().add(b * len * w + head * d);
                        gemm_into(len, d, len, o, w, pm, v, T::c(1.0));
                    }
                },
            );
            Ok(())
        })?;
        // SAFETY: the tasks above wrote every element: each (sample, head) its `len × d`
        // block of the output and its `len × len` probabilities.
        unsafe {
            out.set_len(n * len * w);
            probs.set_len(n * h * len * len);
        }
        Ok((out, probs))
    }

    /// The gradient of the packed projections `[n, len, 3·width]` from the output's.
    fn backward<T: Real>(
        &self,
        qkv: &[T],
        probs: &[T],
        grad: &[T],
        l: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let (n, len, h, d) = self.dims(l);
        let w = self.width;
        if qkv.len() != n * len * 3 * w
            || probs.len() != n * h * len * len
            || grad.len() != n * len * w
        {
            return Err(candle_core::Error::Msg("attention backward: sizes".into()));
        }
        let scale = T::c(1.0 / (d as f64).sqrt());
        let mut dqkv = Vec::<T>::with_capacity(n * len * 3 * w);
        let dqkv_ptr = SharedMut(dqkv.as_mut_ptr());
        for_each_task(
            n * h,
            || vec![T::c(0.0); len * len],
            |ds, t| {
                let (b, head) = (t / h, t % h);
                // SAFETY: as in forward; each task writes its own head's columns of the
                // sample's query, key and value gradients.
                unsafe {
                    let q = Mat {
                        ptr: qkv.as_ptr().add(b * len * 3 * w + head * d),
                        rs: 3 * w,
                        cs: 1,
                    };
                    let k = Mat {
                        ptr: q.ptr.add(w),
                        ..q
                    };
                    let v = Mat {
                        ptr: q.ptr.add(2 * w),
                        ..q
                    };
                    let p = Mat {
                        ptr: probs.as_ptr().add(t * len * len),
                        rs: len,
                        cs: 1,
                    };
                    let g = Mat {
                        ptr: grad.as_ptr().add(b * len * w + head * d),
                        rs: w,
                        cs: 1,
                    };
                    let dq = dqkv_ptr.get().add(b * len * 3 * w + head * d);
                    let (dk, dv) = (dq.add(w), dq.add(2 * w));
                    // dv = pᵀ g; dp = g vᵀ; ds = p ⊙ (dp − rowsum(p ⊙ dp)) / √d.
                    gemm_into(len, d, len, dv, 3 * w, p.t(), g, T::c(1.0));
                    gemm_into(len, len, d, ds.as_mut_ptr(), len, g, v.t(), T::c(1.0));
                    let p_rows = std::slice::from_raw_parts(p.ptr, len * len);
                    with_simd!(softmax_backward_in_place(ds, p_rows, len, scale));
                    let dsm = Mat {
                        ptr: ds.as_ptr(),
                        rs: len,
                        cs: 1,
                    };
                    // dq = ds k; dk = dsᵀ q.
                    gemm_into(len, d, len, dq, 3 * w, dsm, k, T::c(1.0));
                    gemm_into(len, d, len, dk, 3 * w, dsm.t(), q, T::c(1.0));
                }
            },
        );
        // SAFETY: every (sample, head) wrote its query, key and value gradient columns.
        unsafe { dqkv.set_len(n * len * 3 * w) };
        Ok(dqkv)
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            op: &AttentionOp,
            s: &CpuStorage,
            l: &Layout,
        ) -> candle_core::Result<(CpuStorage, CpuStorage)> {
            let (out, probs) = op.forward(slice::<T>(s, l)?, l)?;
            Ok((T::to_cpu_storage_owned(out), T::to_cpu_storage_owned(probs)))
        }
        let (out, probs) = by_dtype!(s.dtype(), run(self, s, l))?;
        *self.probs.lock().expect("attention probabilities") = Some(probs);
        let dims = l.shape().dims();
        Ok((out, Shape::from((dims[0], dims[1], self.width))))
    }

    fn bwd(&self, qkv: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn run<T: Real>(
            op: &AttentionOp,
            qkv: &Tensor,
            probs: &CpuStorage,
            grad: &Tensor,
        ) -> candle_core::Result<Tensor> {
            let qkv = qkv.contiguous()?;
            let dqkv = with_slice::<T, _>(&qkv, |x| {
                with_slice::<T, _>(grad, |g| {
                    op.backward(x, probs.as_slice::<T>()?, g, qkv.layout())
                })
            })?;
            Tensor::from_vec(dqkv, qkv.shape(), qkv.device())
        }
        let probs = self.probs.lock().expect("attention probabilities");
        let probs = probs
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("attention backward before forward".into()))?;
        Ok(Some(by_dtype!(qkv.dtype(), run(self, qkv, probs, grad))?))
    }
}

// ---------------------------------------------------------------- linear

/// `x wᵀ + b` for `x` `[rows, in]`, `w` `[out, in]` (PyTorch's layout), `b` `[out]`.
///
/// On the CPU one op with its own backward: the bias is the GEMM's starting value (no
/// separate pass), the weight gradient `gᵀ x` is computed in `w`'s layout (no transposed
/// copy), and the input gradient is skipped where nothing upstream needs it (pixels).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !on_cpu(x) || x.rank() != 2 || w.rank() != 2 {
        let y = x.matmul(&w.t()?)?;
        return Ok(match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp)?,
        None => x.apply_op2(&w, LinearOp)?,
    })
}

struct LinearOp;

fn gemm_parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

impl LinearOp {
    /// `[rows, out]`: rows of `b` (or zeros), then `+= x wᵀ`.
    fn forward<T: Real>(
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
        in_dim: usize,
    ) -> candle_core::Result<Vec<T>> {
        if in_dim == 0 || !x.len().is_multiple_of(in_dim) || !w.len().is_multiple_of(in_dim) {
            return Err(candle_core::Error::Msg(format!(
                "linear: input of {} values and weight of {} do not share an inner size {in_dim}",
                x.len(),
                w.len()
            )));
        }
        let (rows, out_dim) = (x.len() / in_dim, w.len() / in_dim);
        let mut y = match b {
            Some(b) if b.len() == out_dim => {
                let mut y = Vec::with_capacity(rows * out_dim);
                for _ in 0..rows {
                    y.extend_from_slice(b);
                }
                y
            }
            Some(b) => {
                return Err(candle_core::Error::Msg(format!(
                    "linear: bias of {} for {out_dim} outputs",
                    b.len()
                )))
            }
            None => vec![T::c(0.0); rows * out_dim],
        };
        // SAFETY: y is rows × out, x rows × in, w out × in (sizes checked above).
        unsafe {
            gemm::gemm(
                rows,
                out_dim,
                in_dim,
                y.as_mut_ptr(),
                1,
                out_dim as isize,
                true,
                x.as_ptr(),
                1,
                in_dim as isize,
                w.as_ptr(),
                in_dim as isize,
                1,
                T::c(1.0),
                T::c(1.0),
                false,
                false,
                false,
                gemm_parallelism(),
            )
        };
        Ok(y)
    }

    /// (dx if wanted, dw, db) from `g` `[rows, out]`.
    fn backward<T: Real>(
        x: &[T],
        w: &[T],
        g: &[T],
        in_dim: usize,
        want_dx: bool,
    ) -> (Option<Vec<T>>, Vec<T>, Vec<T>) {
        let rows = x.len() / in_dim;
        let out_dim = w.len() / in_dim;
        assert_eq!(g.len(), rows * out_dim, "linear backward: gradient size");
        let par = gemm_parallelism();
        let dx = want_dx.then(|| {
            // dx = g w: [rows, out] × [out, in].
            // SAFETY: sizes as above; the GEMM writes every element (k = out > 0).
            unsafe {
                uninit_vec(rows * in_dim, |dx| {
                    gemm::gemm(
                        rows,
                        in_dim,
                        out_dim,
                        dx.as_mut_ptr() as *mut T,
                        1,
                        in_dim as isize,
                        false,
                        g.as_ptr(),
                        1,
                        out_dim as isize,
                        w.as_ptr(),
                        1,
                        in_dim as isize,
                        T::c(0.0),
                        T::c(1.0),
                        false,
                        false,
                        false,
                        par,
                    )
                })
            }
        });
        // dw = gᵀ x: [out, rows] × [rows, in], in w's [out, in] layout.
        let mut dw = vec![T::c(0.0); out_dim * in_dim];
        // SAFETY: as above; `read_dst` is false, the zeros cover rows = 0.
        unsafe {
            gemm::gemm(
                out_dim,
                in_dim,
                rows,
                dw.as_mut_ptr(),
                1,
                in_dim as isize,
                false,
                g.as_ptr(),
                out_dim as isize,
                1,
                x.as_ptr(),
                1,
                in_dim as isize,
                T::c(0.0),
                T::c(1.0),
                false,
                false,
                false,
                par,
            )
        };
        let mut db = vec![T::c(0.0); out_dim];
        with_simd!(for row in g.chunks_exact(out_dim) {
            for (s, &v) in db.iter_mut().zip(row) {
                *s += v;
            }
        });
        (dx, dw, db)
    }

    fn fwd_storage(
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn run<T: Real>(
            x: (&CpuStorage, &Layout),
            w: (&CpuStorage, &Layout),
            b: Option<(&CpuStorage, &Layout)>,
        ) -> candle_core::Result<CpuStorage> {
            let b = match b {
                Some((s, l)) => Some(slice::<T>(s, l)?),
                None => None,
            };
            let in_dim = w.1.shape().dims()[1];
            let y = LinearOp::forward(slice::<T>(x.0, x.1)?, slice::<T>(w.0, w.1)?, b, in_dim)?;
            Ok(T::to_cpu_storage_owned(y))
        }
        let (rows, out_dim) = (x.1.shape().dims()[0], w.1.shape().dims()[0]);
        let y = by_dtype!(x.0.dtype(), run(x, w, b))?;
        Ok((y, Shape::from((rows, out_dim))))
    }

    /// (dx, dw, db) as tensors.
    fn bwd_tensors(
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        fn run<T: Real>(
            x: &Tensor,
            w: &Tensor,
            g: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
            let in_dim = w.dim(1)?;
            // An input that is neither a variable nor computed from one (pixels) needs no
            // gradient; candle's own matmul would compute it anyway.
            let want_dx = x.track_op();
            let (dx, dw, db) = with_slice::<T, _>(x, |xs| {
                with_slice::<T, _>(w, |ws| {
                    with_slice::<T, _>(g, |gs| Ok(LinearOp::backward(xs, ws, gs, in_dim, want_dx)))
                })
            })?;
            let dev = x.device();
            Ok((
                dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev))
                    .transpose()?,
                Tensor::from_vec(dw, w.shape(), dev)?,
                Tensor::from_vec(db, w.dim(0)?, dev)?,
            ))
        }
        by_dtype!(x.dtype(), run(x, w, g))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        LinearOp::fwd_storage((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = LinearOp::bwd_tensors(x, w, g)?;
        Ok((dx, Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear-bias"
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
        LinearOp::fwd_storage((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = LinearOp::bwd_tensors(x, w, g)?;
        Ok((dx, Some(dw), Some(db)))
    }
}
