//! Multi-head self-attention on packed projections, with its own backward: heads read
//! and written in place through GEMM strides, one task per (sample, head).

use super::*;

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
        let mask = mask.as_ref().map(|m| &m.values);
        // On a GPU, bf16 heads of 64: flash attention, no probabilities kept.
        #[cfg(feature = "cuda")]
        if flash_attention_enabled() && super::cuda::flash_attention_applies(qkv, heads, mask) {
            return super::cuda::flash_attention(qkv, heads, mask);
        }
        // Otherwise the heads read in place by cuBLAS (`head_gemms.rs`), no copies.
        #[cfg(feature = "cuda")]
        if super::cuda::attention_applies(qkv, mask) {
            return super::cuda::attention(qkv, heads, mask);
        }
        return attention_plain(qkv, heads, mask);
    }
    Ok(qkv.contiguous()?.apply_op1(AttentionOp {
        heads,
        width,
        mask,
        probs: std::sync::Mutex::new(None),
    })?)
}

/// `q kᵀ · scale`, in f32 for half-precision `q` and `k` (as flash attention keeps its
/// scores: rounding them to bf16 before the softmax cost a visible share of bf16's
/// agreement with f32); in their own dtype otherwise.
pub fn attention_scores(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((raw_scores(q, k)? * scale)?)
}

/// `q kᵀ` unscaled, widened as [`attention_scores`] widens it.
fn raw_scores(q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let wide = |t: &Tensor| match t.dtype() {
        DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    };
    Ok(wide(q)?.matmul(&wide(k)?.t()?)?)
}

/// `probs · v`, the probabilities (f32 from [`attention_scores`]' softmax) rounded to
/// `v`'s dtype first.
pub fn attention_mix(probs: &Tensor, v: &Tensor) -> Result<Tensor> {
    Ok(probs.to_dtype(v.dtype())?.matmul(v)?)
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
    let scale = 1.0 / (d as f64).sqrt();
    let raw = raw_scores(&q, &k)?;
    // On a GPU, f32 scores: the scale, the mask and the softmax in one kernel each way.
    #[cfg(feature = "cuda")]
    if super::cuda::attention_softmax_applies(&raw, mask) {
        let probs = super::cuda::attention_softmax(&raw, mask, heads, scale)?;
        return merge_heads(&attention_mix(&probs, &v)?, n, heads, len, d);
    }
    let scores = (raw * scale)?;
    let scores = match mask {
        // [n or 1, len or 1, len] → [n, 1, len, len] over the heads.
        Some(m) => scores
            .reshape((n, heads, len, len))?
            .broadcast_add(&m.to_dtype(scores.dtype())?.unsqueeze(1)?)?
            .reshape((n * heads, len, len))?,
        None => scores,
    };
    let attn = attention_mix(&softmax_last_dim(&scores)?, &v)?; // [n*h, len, d]
    merge_heads(&attn, n, heads, len, d)
}

/// `[n·heads, len, d]` → `[n, len, heads·d]`.
fn merge_heads(attn: &Tensor, n: usize, heads: usize, len: usize, d: usize) -> Result<Tensor> {
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

/// Sample `b`'s head `head` of the queries, keys and values in the packed
/// `[n, len, 3·w]` projections (heads `d` wide).
///
/// # Safety
/// `qkv` must hold sample `b` whole and `head · d < w`.
unsafe fn head_views<T>(
    qkv: &[T],
    b: usize,
    head: usize,
    len: usize,
    w: usize,
    d: usize,
) -> (Mat<T>, Mat<T>, Mat<T>) {
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
    (q, k, v)
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
        super::softmax::softmax_row_in_place(row);
    }
}

/// `ds ← p ⊙ (ds − rowsum(p ⊙ ds)) · scale`: from the probabilities' gradient to the
/// scaled scores', row by row.
#[inline(always)]
fn softmax_backward_in_place<T: Real>(ds: &mut [T], p: &[T], len: usize, scale: T) {
    for (ds, p) in ds.chunks_exact_mut(len).zip(p.chunks_exact(len)) {
        super::softmax::softmax_backward_row_in_place(ds, p, scale);
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
                        let (q, k, v) = head_views(qkv, b, head, len, w, d);
                        let p = probs_ptr.get().add(t * len * len);
                        gemm_into(
                            len,
                            len,
                            d,
                            p,
                            len,
                            false,
                            q,
                            k.t(),
                            scale,
                            Parallelism::None,
                        );
                        let rows = std::slice::from_raw_parts_mut(p, len * len);
                        with_simd!(softmax_rows_in_place(rows, len, mask.map(|m| (m, b))));
                        let pm = Mat {
                            ptr: p as *const T,
                            rs: len,
                            cs: 1,
                        };
                        let o = out_ptr.get().add(b * len * w + head * d);
                        gemm_into(
                            len,
                            d,
                            len,
                            o,
                            w,
                            false,
                            pm,
                            v,
                            T::c(1.0),
                            Parallelism::None,
                        );
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
                    let (q, k, v) = head_views(qkv, b, head, len, w, d);
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
                    gemm_into(
                        len,
                        d,
                        len,
                        dv,
                        3 * w,
                        false,
                        p.t(),
                        g,
                        T::c(1.0),
                        Parallelism::None,
                    );
                    gemm_into(
                        len,
                        len,
                        d,
                        ds.as_mut_ptr(),
                        len,
                        false,
                        g,
                        v.t(),
                        T::c(1.0),
                        Parallelism::None,
                    );
                    let p_rows = std::slice::from_raw_parts(p.ptr, len * len);
                    with_simd!(softmax_backward_in_place(ds, p_rows, len, scale));
                    let dsm = Mat {
                        ptr: ds.as_ptr(),
                        rs: len,
                        cs: 1,
                    };
                    // dq = ds k; dk = dsᵀ q.
                    gemm_into(
                        len,
                        d,
                        len,
                        dq,
                        3 * w,
                        false,
                        dsm,
                        k,
                        T::c(1.0),
                        Parallelism::None,
                    );
                    gemm_into(
                        len,
                        d,
                        len,
                        dk,
                        3 * w,
                        false,
                        dsm.t(),
                        q,
                        T::c(1.0),
                        Parallelism::None,
                    );
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
