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
use gemm::Parallelism;

use crate::error::Result;

/// Whether bf16 attention on GPUs may take the flash kernels (`train.flash_attention`):
/// process-wide, as candle's TF32 switch is, set by the trainer before any rank starts.
static FLASH_ATTENTION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn set_flash_attention(on: bool) {
    FLASH_ATTENTION.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn flash_attention_enabled() -> bool {
    FLASH_ATTENTION.load(std::sync::atomic::Ordering::Relaxed)
}

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

/// Partial sums per reduction. One float accumulator is a chain of dependent adds that the
/// compiler must keep in order (it may not reassociate), so a row's sum ran one element at
/// a time; `LANES` independent ones fill an AVX-512 register (two AVX2 ones). The order of
/// the additions differs from a sequential sum's, within rounding.
const LANES: usize = 16;

/// `Σ f(xᵢ)`.
#[inline(always)]
pub(crate) fn sum_of<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let (chunks, rest) = x.as_chunks::<LANES>();
    let mut acc = [T::c(0.0); LANES];
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    let mut sum = T::c(0.0);
    for &v in rest {
        sum += f(v);
    }
    for a in acc {
        sum += a;
    }
    sum
}

/// `Σ f(xᵢ, yᵢ)` over slices of one length.
#[inline(always)]
pub(crate) fn sum_of2<T: Real>(x: &[T], y: &[T], f: impl Fn(T, T) -> T) -> T {
    debug_assert_eq!(x.len(), y.len());
    let (xc, xr) = x.as_chunks::<LANES>();
    let (yc, yr) = y.as_chunks::<LANES>();
    let mut acc = [T::c(0.0); LANES];
    for (xc, yc) in xc.iter().zip(yc) {
        for ((a, &u), &v) in acc.iter_mut().zip(xc).zip(yc) {
            *a += f(u, v);
        }
    }
    let mut sum = T::c(0.0);
    for (&u, &v) in xr.iter().zip(yr) {
        sum += f(u, v);
    }
    for a in acc {
        sum += a;
    }
    sum
}

/// `(Σ f(xᵢ, yᵢ, zᵢ).0, Σ f(xᵢ, yᵢ, zᵢ).1)`: two sums in one pass over slices of one
/// length.
#[inline(always)]
pub(crate) fn sums_of3<T: Real>(
    x: &[T],
    y: &[T],
    z: &[T],
    f: impl Fn(T, T, T) -> (T, T),
) -> (T, T) {
    debug_assert!(x.len() == y.len() && y.len() == z.len());
    let (xc, xr) = x.as_chunks::<LANES>();
    let (yc, yr) = y.as_chunks::<LANES>();
    let (zc, zr) = z.as_chunks::<LANES>();
    let mut acc0 = [T::c(0.0); LANES];
    let mut acc1 = [T::c(0.0); LANES];
    for ((xc, yc), zc) in xc.iter().zip(yc).zip(zc) {
        for l in 0..LANES {
            let (a, b) = f(xc[l], yc[l], zc[l]);
            acc0[l] += a;
            acc1[l] += b;
        }
    }
    let (mut s0, mut s1) = (T::c(0.0), T::c(0.0));
    for ((&u, &v), &w) in xr.iter().zip(yr).zip(zr) {
        let (a, b) = f(u, v, w);
        s0 += a;
        s1 += b;
    }
    for l in 0..LANES {
        s0 += acc0[l];
        s1 += acc1[l];
    }
    (s0, s1)
}

/// The largest element of a non-empty slice.
#[inline(always)]
pub(crate) fn max_of<T: Real>(x: &[T]) -> T {
    let (chunks, rest) = x.as_chunks::<LANES>();
    let mut acc = [x[0]; LANES];
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = if v > *a { v } else { *a };
        }
    }
    let mut max = x[0];
    for v in acc.into_iter().chain(rest.iter().copied()) {
        max = if v > max { v } else { max };
    }
    max
}

/// Runs `body` compiled for AVX-512 (16 floats a vector) or AVX2 (8), with FMA, when the
/// CPU has them, else as compiled for the baseline target. The loops must sit in `body`
/// itself (plain `for` loops over slices, `#[inline(always)]` helpers): a function that is
/// called rather than inlined, such as an iterator's `fold`, keeps the baseline code. The
/// body's own closure is forced inline too (a large body had been left as a call).
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
                let result = unsafe {
                    avx512(
                        #[inline(always)]
                        || $body,
                    )
                };
                result
            } else if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            {
                #[allow(unused_unsafe)]
                let result = unsafe {
                    avx2(
                        #[inline(always)]
                        || $body,
                    )
                };
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

/// A strided matrix operand: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat<T> {
    ptr: *const T,
    rs: usize,
    cs: usize,
}

impl<T> Mat<T> {
    /// A row-major `[rows, cols]` matrix.
    fn rows(ptr: *const T, cols: usize) -> Self {
        Mat {
            ptr,
            rs: cols,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m×n] (row stride dst_rs) = scale · lhs[m×k] · rhs[k×n]`, plus `dst`'s own values
/// where `accumulate` (else `dst` is only written).
///
/// # Safety
/// Every operand element must be in bounds, `dst` must not overlap the operands or
/// another thread's output, and with `accumulate` it must be initialised.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    scale: T,
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        T::c(if accumulate { 1.0 } else { 0.0 }),
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// `Σ x²` over a tensor's elements, in f64: on the CPU one pass without temporaries (f32
/// partial sums per block of 4096 elements, the blocks summed in f64), elsewhere plain ops.
pub fn sum_of_squares(t: &Tensor) -> Result<f64> {
    if !on_cpu(t) {
        return Ok(t
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?);
    }
    fn run<T: Real>(t: &Tensor) -> candle_core::Result<f64> {
        with_slice::<T, _>(t, |x| {
            Ok(with_simd!({
                let mut total = 0f64;
                for block in x.chunks(4096) {
                    total += sum_of(block, |v| v * v).to_f64();
                }
                total
            }))
        })
    }
    Ok(by_dtype!(t.dtype(), run(t))?)
}

mod accumulate;
mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
mod embedding;
mod gelu;
pub mod head_gemms;
mod layer_norm;
mod linear;
pub mod plan;
mod softmax;

pub use accumulate::GradSum;
pub use attention::{attention, attention_mix, attention_plain, attention_scores};
pub use embedding::embedding;
pub use gelu::{gelu_erf, gelu_erf_bias, quick_gelu};
pub use layer_norm::{layer_norm, layer_norm_to};
pub use linear::{bias_add, bias_residual, linear, linear_onto};
pub use softmax::softmax_last_dim;
