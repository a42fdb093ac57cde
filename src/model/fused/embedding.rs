//! Row lookup in an embedding table, with a backward that writes straight into a fresh
//! gradient table.

use super::*;

/// `table[ids]`: the `[n, width]` rows of `table` `[rows, width]` at `ids` `[n]` (u32).
///
/// candle's `index_select` backward materialises a zero table and `index_add`s into it,
/// and `index_add` copies that table first: for CLIP's 49 408-row token table at width 512,
/// a 100 MB fill and a 100 MB copy every step. Here the backward adds the rows into one
/// zeroed table, in the same order as `index_add` (so the same sums, bit for bit).
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    // On a GPU the CUDA kernels: the lookup, and a scatter without atomics (token order).
    #[cfg(feature = "cuda")]
    if super::cuda::embedding_applies(table, ids) {
        return super::cuda::embedding(table, ids);
    }
    if !on_cpu(table) || ids.dtype() != DType::U32 || table.rank() != 2 || ids.rank() != 1 {
        return Ok(table.index_select(ids, 0)?);
    }
    Ok(table
        .contiguous()?
        .apply_op2(&ids.contiguous()?, Embedding)?)
}

struct Embedding;

/// The ids as table rows, each checked against the table's `rows`.
fn rows_of(ids: &[u32], rows: usize) -> candle_core::Result<impl Iterator<Item = usize> + '_> {
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(candle_core::Error::Msg(format!(
            "embedding: id {bad} outside a table of {rows} rows"
        )));
    }
    Ok(ids.iter().map(|&id| id as usize))
}

fn lookup<T: Real>(table: &[T], width: usize, ids: &[u32]) -> candle_core::Result<Vec<T>> {
    let rows = table.len() / width.max(1);
    let mut out = Vec::with_capacity(ids.len() * width);
    for r in rows_of(ids, rows)? {
        out.extend_from_slice(&table[r * width..(r + 1) * width]);
    }
    Ok(out)
}

/// `Σ` of `dy`'s rows into a zero `[rows, width]` table at their ids.
fn scatter_rows<T: Real>(
    rows: usize,
    width: usize,
    ids: &[u32],
    dy: &[T],
) -> candle_core::Result<Vec<T>> {
    let mut grad = vec![T::c(0.0); rows * width];
    for (r, g) in rows_of(ids, rows)?.zip(dy.chunks_exact(width.max(1))) {
        for (acc, &v) in grad[r * width..(r + 1) * width].iter_mut().zip(g) {
            *acc += v;
        }
    }
    Ok(grad)
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, width) = l1.shape().dims2()?;
        let ids = slice::<u32>(s2, l2)?;
        fn run<T: Real>(
            table: (&CpuStorage, &Layout),
            width: usize,
            ids: &[u32],
        ) -> candle_core::Result<CpuStorage> {
            Ok(T::to_cpu_storage_owned(lookup(
                slice::<T>(table.0, table.1)?,
                width,
                ids,
            )?))
        }
        Ok((
            by_dtype!(s1.dtype(), run((s1, l1), width, ids))?,
            Shape::from((ids.len(), width)),
        ))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(table: &Tensor, ids: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
            let (rows, width) = table.dims2()?;
            let grad = with_slice::<u32, _>(ids, |ids| {
                with_slice::<T, _>(dy, |dy| scatter_rows(rows, width, ids, dy))
            })?;
            Tensor::from_vec(grad, (rows, width), table.device())
        }
        Ok((Some(by_dtype!(table.dtype(), run(table, ids, dy))?), None))
    }
}
