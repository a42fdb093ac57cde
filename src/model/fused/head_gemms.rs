//! Attention's GEMMs on the GPU as cuBLAS strided-batched calls that read and write the
//! heads in place: the queries, keys and values inside the packed projections
//! `[n, len, 3·w]` and the output inside `[n, len, w]`, through leading dimensions and
//! offsets. candle's batched matmul needs each head copied out contiguous first (its batch
//! dimensions must collapse into one stride, and samples and heads do not), and the heads
//! merged back by another copy: four copies forward and as many backward.
//!
//! cuBLAS has one batch stride, so each GEMM is one call per head, batched over the
//! samples (a head steps by `d` within a row, a sample by `len·3w`). The layout maths is
//! data: `cuda.rs` hands each [`Cublas`] call to `cublasGemmStridedBatchedEx`, and
//! [`cublas_reference`], a CPU reading of cuBLAS's column-major contract with its argument
//! checks, runs the same calls in the tests against the plain ops.

/// The buffers attention's GEMMs read and write, by shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    /// `[n, len, 3·w]`: the packed projections, or their gradient.
    Packed,
    /// `[n, heads, len, len]`: the scores or probabilities, or a gradient of them.
    Scores,
    /// `[n, len, w]`: the heads merged (attention's output), or its gradient.
    Merged,
}

/// Attention's sizes: `n` samples of `len` tokens, `heads` heads over `width` values.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n: usize,
    pub len: usize,
    pub heads: usize,
    pub width: usize,
}

impl Dims {
    /// Each head's width.
    pub fn head(&self) -> usize {
        self.width / self.heads
    }

    /// The number of values in an operand.
    pub fn size(&self, operand: Operand) -> usize {
        match operand {
            Operand::Packed => self.n * self.len * 3 * self.width,
            Operand::Scores => self.n * self.heads * self.len * self.len,
            Operand::Merged => self.n * self.len * self.width,
        }
    }
}

/// The GEMMs of attention forward and backward, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Raw scores `s = q kᵀ` (the scale and mask come in the softmax kernel).
    Scores,
    /// Output `o = p v`, written into the merged heads.
    Mix,
    /// `dv = pᵀ do`, into the packed gradient.
    ValueGrad,
    /// `dp = do vᵀ`.
    ProbsGrad,
    /// `dq = ds k`, into the packed gradient.
    QueryGrad,
    /// `dk = dsᵀ q`, into the packed gradient.
    KeyGrad,
}

/// A matrix inside an operand, row-major: element (i, j) of batch entry `b` at
/// `offset + b·batch_stride + i·ld + j`, read as its transpose where `transposed`.
#[derive(Clone, Copy, Debug)]
struct Matrix {
    operand: Operand,
    offset: usize,
    ld: usize,
    batch_stride: usize,
    transposed: bool,
}

impl Matrix {
    fn t(self) -> Self {
        Self {
            transposed: !self.transposed,
            ..self
        }
    }
}

/// Where one operand of a cuBLAS call starts, its leading dimension and batch stride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arg {
    pub operand: Operand,
    /// In elements from the operand's start.
    pub offset: usize,
    pub ld: i32,
    pub stride: i64,
}

/// One `cublasGemmStridedBatchedEx` call, column-major as cuBLAS reads it:
/// `C = op(A) · op(B)` (alpha 1, beta 0: C is written, never read), `C` `m × n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cublas {
    pub transa: bool,
    pub transb: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: Arg,
    pub b: Arg,
    pub c: Arg,
    pub batch: i32,
}

/// The calls of one stage: one per head, each batched over the samples.
pub fn calls(stage: Stage, dims: Dims) -> Vec<Cublas> {
    const Q: usize = 0;
    const K: usize = 1;
    const V: usize = 2;
    let Dims {
        n,
        len,
        heads,
        width: w,
    } = dims;
    let d = dims.head();
    (0..heads)
        .map(|h| {
            let packed = |part: usize| Matrix {
                operand: Operand::Packed,
                offset: part * w + h * d,
                ld: 3 * w,
                batch_stride: len * 3 * w,
                transposed: false,
            };
            let scores = Matrix {
                operand: Operand::Scores,
                offset: h * len * len,
                ld: len,
                batch_stride: heads * len * len,
                transposed: false,
            };
            let merged = Matrix {
                operand: Operand::Merged,
                offset: h * d,
                ld: w,
                batch_stride: len * w,
                transposed: false,
            };
            // (C, A, B, inner size) of C = A·B, row-major.
            let (c, a, b, k) = match stage {
                Stage::Scores => (scores, packed(Q), packed(K).t(), d),
                Stage::Mix => (merged, scores, packed(V), len),
                Stage::ValueGrad => (packed(V), scores.t(), merged, len),
                Stage::ProbsGrad => (scores, merged, packed(V).t(), d),
                Stage::QueryGrad => (packed(Q), scores, packed(K), len),
                Stage::KeyGrad => (packed(K), scores.t(), packed(Q), len),
            };
            let cols = if c.operand == Operand::Scores { len } else { d };
            column_major(len, cols, k, n, c, a, b)
        })
        .collect()
}

/// The cuBLAS call for row-major `C (m × n) = op(A) (m × k) · op(B) (k × n)`: cuBLAS reads
/// a row-major matrix as its transpose, so it computes `Cᵀ = op(B)ᵀ · op(A)ᵀ` with the
/// operands swapped, and a matrix stored transposed is read as stored, untransposed.
fn column_major(
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    c: Matrix,
    a: Matrix,
    b: Matrix,
) -> Cublas {
    let arg = |x: Matrix| Arg {
        operand: x.operand,
        offset: x.offset,
        ld: x.ld as i32,
        stride: x.batch_stride as i64,
    };
    Cublas {
        transa: b.transposed,
        transb: a.transposed,
        m: n as i32,
        n: m as i32,
        k: k as i32,
        a: arg(b),
        b: arg(a),
        c: arg(c),
        batch: batch as i32,
    }
}

/// Runs `call` on the CPU as cuBLAS would (`C[i + j·ldc] = Σₗ op(A)(i, l) · op(B)(l, j)` per
/// batch entry, column-major), after cuBLAS's argument checks (the leading dimensions
/// against the sizes they span) and a bounds check of every element it touches: the
/// tests' reference for the layout maths above. `a`, `b` and `c` are the whole operands.
pub fn cublas_reference(call: &Cublas, a: &[f64], b: &[f64], c: &mut [f64]) -> Result<(), String> {
    let Cublas {
        transa,
        transb,
        m,
        n,
        k,
        batch,
        ..
    } = *call;
    let rows_a = if transa { k } else { m };
    let rows_b = if transb { n } else { k };
    if m < 0 || n < 0 || k < 0 || batch < 0 {
        return Err(format!("negative size in {call:?}"));
    }
    if call.a.ld < rows_a.max(1) || call.b.ld < rows_b.max(1) || call.c.ld < m.max(1) {
        return Err(format!(
            "a leading dimension below the rows it spans (cuBLAS refuses it): {call:?}"
        ));
    }
    let index = |arg: &Arg, batch_entry: i32, row: i32, col: i32, len: usize| {
        let at = arg.offset as i64
            + batch_entry as i64 * arg.stride
            + row as i64
            + col as i64 * arg.ld as i64;
        usize::try_from(at)
            .ok()
            .filter(|&at| at < len)
            .ok_or_else(|| {
                format!(
                    "element ({row}, {col}) of entry {batch_entry} at {at}, past {len}: {call:?}"
                )
            })
    };
    for p in 0..batch {
        for j in 0..n {
            for i in 0..m {
                let mut sum = 0.0;
                for l in 0..k {
                    let (ra, ca) = if transa { (l, i) } else { (i, l) };
                    let (rb, cb) = if transb { (j, l) } else { (l, j) };
                    sum += a[index(&call.a, p, ra, ca, a.len())?]
                        * b[index(&call.b, p, rb, cb, b.len())?];
                }
                let at = index(&call.c, p, i, j, c.len())?;
                c[at] = sum;
            }
        }
    }
    Ok(())
}
