//! The linear layer `x wᵀ + b` as one op with its own backward.

use super::*;

/// `x wᵀ + b` for `x` `[rows, in]`, `w` `[out, in]` (PyTorch's layout), `b` `[out]`.
///
/// On the CPU one op with its own backward: the bias is the GEMM's starting value (no
/// separate pass), the weight gradient `gᵀ x` is computed in `w`'s layout (no transposed
/// copy), and the input gradient is skipped where nothing upstream needs it (pixels). On a
/// GPU with a bias, one op too (`cuda::linear_bias`: the bias added in place after the
/// product).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // On a GPU with a bias: the product and the bias add as one op (one output kept).
    #[cfg(feature = "cuda")]
    if let Some(b) = b {
        if super::cuda::linear_bias_applies(x, w, b) {
            return super::cuda::linear_bias(x, w, b);
        }
    }
    if !on_cpu(x) || x.rank() != 2 || w.rank() != 2 {
        let y = x.matmul(&w.t()?)?;
        return match b {
            Some(b) => bias_add(&y, b),
            None => Ok(y),
        };
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp)?,
        None => x.apply_op2(&w, LinearOp)?,
    })
}

struct LinearOp;

fn gemm_parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
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
            // Written by the GEMM below (in_dim > 0), not read.
            None => Vec::with_capacity(rows * out_dim),
        };
        let read_bias = b.is_some();
        // SAFETY: y has room for rows × out, x is rows × in, w out × in (sizes checked
        // above); with no bias the GEMM writes every element before `set_len`.
        unsafe {
            // y (+)= x wᵀ.
            gemm_into(
                rows,
                out_dim,
                in_dim,
                y.as_mut_ptr(),
                out_dim,
                read_bias,
                Mat::rows(x.as_ptr(), in_dim),
                Mat::rows(w.as_ptr(), in_dim).t(),
                T::c(1.0),
                gemm_parallelism(),
            );
            y.set_len(rows * out_dim);
        }
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
                    gemm_into(
                        rows,
                        in_dim,
                        out_dim,
                        dx.as_mut_ptr() as *mut T,
                        in_dim,
                        false,
                        Mat::rows(g.as_ptr(), out_dim),
                        Mat::rows(w.as_ptr(), in_dim),
                        T::c(1.0),
                        par,
                    )
                })
            }
        });
        // dw = gᵀ x: [out, rows] × [rows, in], in w's [out, in] layout.
        let mut dw = vec![T::c(0.0); out_dim * in_dim];
        // SAFETY: as above; not accumulating, and the zeros cover rows = 0.
        unsafe {
            gemm_into(
                out_dim,
                in_dim,
                rows,
                dw.as_mut_ptr(),
                in_dim,
                false,
                Mat::rows(g.as_ptr(), out_dim).t(),
                Mat::rows(x.as_ptr(), in_dim),
                T::c(1.0),
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

/// `stream + (y + bias)`, the sum `y + bias` in `y`'s dtype and then added to the residual
/// `stream` in the stream's (f32 under mixed precision): where a transformer block's
/// branch ends in a linear layer. On a GPU one kernel forward (where the plain ops make
/// three passes) and one backward, the bias gradient's reduction included; elsewhere the
/// plain ops, which are also its reference.
pub fn bias_residual(stream: &Tensor, y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::bias_residual_applies(stream, y, bias) {
        return super::cuda::bias_residual(stream, y, bias);
    }
    let branch = y.broadcast_add(&bias.to_dtype(y.dtype())?)?;
    Ok((stream + branch.to_dtype(stream.dtype())?)?)
}

/// `stream + (x wᵀ + b)` in the stream's dtype, for `x` `[rows, in]` and a stream `[rows,
/// out]`: a linear layer whose branch is added to the residual stream. On a GPU one op
/// (`cuda::linear_onto`: the product's output is not kept for backward); elsewhere the
/// product, then [`bias_residual`].
pub fn linear_onto(stream: &Tensor, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::linear_onto_applies(stream, x, w, b) {
        return super::cuda::linear_onto(stream, x, w, b);
    }
    bias_residual(stream, &linear(x, w, None)?, b)
}

/// `y + bias` on its rows, in `y`'s dtype. On a GPU one kernel, and the bias's gradient a
/// coalesced reduction over the rows (candle's reduces each column in a block of its own,
/// its threads reading one row apart); elsewhere the plain op.
pub fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::cuda::bias_add_applies(y, bias) {
        return super::cuda::bias_add(y, bias);
    }
    Ok(y.broadcast_add(bias)?)
}
