//! What the fused ops' CUDA kernels are launched with, as data: for each op, the kernels in
//! order, their grids, and their arguments, buffers named by role. `cuda.rs` resolves the
//! roles to device addresses and launches; the CPU emulator of the kernels
//! (`tests/cuda-emulator/`, `kernels::` in the test suite) resolves them to host buffers
//! and runs the same plan, so the kernels and the launch sequences are checked on any
//! machine, before a GPU runs them. Nothing here needs CUDA.

/// The kernels' CUDA source: the shared part, then each op's file.
pub const SOURCE: &str = concat!(
    include_str!("kernels.cuh"),
    include_str!("layer_norm.cu"),
    include_str!("gelu.cu"),
    include_str!("softmax.cu"),
    include_str!("embedding.cu"),
    include_str!("bias.cu"),
    include_str!("accumulate.cu"),
    include_str!("pixels.cu"),
    include_str!("flash_attention.cu")
);

/// Threads a block: the source's `THREADS` (every kernel's but flash attention's).
pub const THREADS: usize = 256;
/// Flash attention's threads a block (`FLASH_THREADS`: four warps), the queries or keys a
/// block owns (`FLASH_TILE`), and the one head width it takes (`FLASH_D`).
pub const FLASH_THREADS: usize = 128;
pub const FLASH_TILE: usize = 64;
pub const FLASH_HEAD: usize = 64;
/// The most row chunks a weight or bias gradient reduces over (each a partial sum per
/// column, added in chunk order).
pub const MAX_CHUNKS: usize = 256;

/// The values' element type: the kernels' name suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    F32,
    /// bf16, as its bits.
    Bf16,
}

impl Values {
    pub fn suffix(self) -> &'static str {
        match self {
            Values::F32 => "f32",
            Values::Bf16 => "bf16",
        }
    }
}

/// A buffer of an op, by its role. Which dtype and size each has is the op's comment's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Buffer {
    /// The op's input (values).
    Input,
    Weight,
    Bias,
    /// The forward's output.
    Output,
    /// Per-row statistics kept from forward for backward (f32).
    Stats,
    /// The gradient arriving at the output.
    OutputGrad,
    InputGrad,
    WeightGrad,
    BiasGrad,
    /// Per-chunk partial sums of a column reduction (f32 scratch, zeroed).
    Partial,
    /// An additive attention mask (f32).
    Mask,
    /// Table row ids (u32).
    Ids,
    /// The residual stream a block's branch is added to (f32).
    Residual,
}

/// Table rows a block of the embedding backward owns: the source's `EMBEDDING_TILE`.
pub const EMBEDDING_TILE: usize = 32;

/// One kernel argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// The address of a buffer's first element.
    Address(Buffer),
    /// A null address: an optional buffer that is absent.
    Null,
    I64(i64),
    I32(i32),
    F32(f32),
}

/// One launch: `threads` a block on a `grid` of blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub kernel: String,
    pub grid: (usize, usize),
    pub threads: usize,
    pub args: Vec<Arg>,
}

/// An op's launches in order, and the scratch buffers (f32, zeroed) they need beside the
/// op's own.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub scratch: Vec<(Buffer, usize)>,
    pub launches: Vec<Launch>,
}

fn int(n: usize) -> Arg {
    Arg::I32(i32::try_from(n).expect("a size the kernels index with i32"))
}

fn long(n: usize) -> Arg {
    Arg::I64(n as i64)
}

/// How a column reduction over `rows` rows is cut: (chunks, rows a chunk).
pub fn chunking(rows: usize) -> (usize, usize) {
    let per_chunk = rows.div_ceil(rows.clamp(1, MAX_CHUNKS)).max(1);
    (rows.div_ceil(per_chunk), per_chunk)
}

/// Blocks of `THREADS` over `width` columns.
fn columns(width: usize) -> usize {
    width.div_ceil(THREADS)
}

fn launch(kernel: String, grid: (usize, usize), args: Vec<Arg>) -> Launch {
    Launch {
        kernel,
        grid,
        threads: THREADS,
        args,
    }
}

/// The plan of one launch; of none when there are no elements to work on.
fn single(elements: usize, kernel: String, grid: (usize, usize), args: Vec<Arg>) -> Plan {
    Plan {
        scratch: Vec::new(),
        launches: if elements > 0 {
            vec![launch(kernel, grid, args)]
        } else {
            Vec::new()
        },
    }
}

use Arg::Address;
use Buffer::*;

/// Layer norm forward over `rows` rows of `width`: `Input` (`values`), `Weight` and
/// `Bias` (f32, `width`) → `Output` (`out`: f32, or bf16 rounded as it is written; rows ×
/// width), `Stats` (f32, 2 × rows: each row's mean and 1/σ).
pub fn layer_norm_forward(
    values: Values,
    out: Values,
    rows: usize,
    width: usize,
    eps: f32,
) -> Plan {
    let args = vec![
        Address(Input),
        Address(Weight),
        Address(Bias),
        Address(Output),
        Address(Stats),
        int(width),
        Arg::F32(eps),
    ];
    single(
        rows,
        match out {
            Values::F32 => format!("layer_norm_fwd_{}", values.suffix()),
            Values::Bf16 => format!("layer_norm_fwd_{}_to_bf16", values.suffix()),
        },
        (rows, 1),
        args,
    )
}

/// Layer norm backward: `Input`, `Weight`, `Stats` (forward's), `OutputGrad` (`grad`: f32,
/// or bf16 for a norm that wrote bf16) → `InputGrad` (`values`), `WeightGrad` and
/// `BiasGrad` (f32, `width`).
pub fn layer_norm_backward(values: Values, grad: Values, rows: usize, width: usize) -> Plan {
    if rows == 0 {
        return Plan::default();
    }
    let name = match grad {
        Values::F32 => values.suffix().to_string(),
        Values::Bf16 => format!("{}_from_bf16", values.suffix()),
    };
    let (chunks, per_chunk) = chunking(rows);
    let dx = vec![
        Address(Input),
        Address(Weight),
        Address(OutputGrad),
        Address(Stats),
        Address(InputGrad),
        int(width),
    ];
    let partial = vec![
        Address(Input),
        Address(OutputGrad),
        Address(Stats),
        Address(Partial),
        long(rows),
        int(width),
        long(per_chunk),
    ];
    let dw = vec![
        Address(Partial),
        Address(WeightGrad),
        Address(BiasGrad),
        int(width),
        int(chunks),
    ];
    Plan {
        scratch: vec![(Partial, 2 * chunks * width)],
        launches: vec![
            launch(format!("layer_norm_bwd_dx_{name}"), (rows, 1), dx),
            launch(
                format!("layer_norm_bwd_partial_{name}"),
                (columns(width), chunks),
                partial,
            ),
            launch("layer_norm_bwd_dw".into(), (columns(width), 1), dw),
        ],
    }
}

/// Which GELU: the kernels' name prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// Exact: `z Φ(z)`.
    Erf,
    /// OpenAI's quick GELU: `z σ(1.702 z)`.
    Quick,
}

impl Gelu {
    fn prefix(self) -> &'static str {
        match self {
            Gelu::Erf => "gelu",
            Gelu::Quick => "quick_gelu",
        }
    }
}

fn optional(bias: bool) -> Arg {
    if bias {
        Address(Bias)
    } else {
        Arg::Null
    }
}

/// GELU of `Input` (+ `Bias`, `width`, on its rows) → `Output`, all `values`, `n`
/// elements.
pub fn gelu_forward(act: Gelu, values: Values, n: usize, width: usize, bias: bool) -> Plan {
    let args = vec![
        Address(Input),
        optional(bias),
        Address(Output),
        long(n),
        int(width),
    ];
    single(
        n,
        format!("{}_fwd_{}", act.prefix(), values.suffix()),
        (n.div_ceil(THREADS), 1),
        args,
    )
}

/// GELU backward: `Input`, `Bias` (when there is one), `OutputGrad` (all `values`) →
/// `InputGrad`, and `BiasGrad` when there is a bias (`values`).
pub fn gelu_backward(act: Gelu, values: Values, n: usize, width: usize, bias: bool) -> Plan {
    let (prefix, name) = (act.prefix(), values.suffix());
    let mut plan = Plan {
        scratch: Vec::new(),
        launches: vec![launch(
            format!("{prefix}_bwd_{name}"),
            (n.div_ceil(THREADS), 1),
            vec![
                Address(Input),
                optional(bias),
                Address(OutputGrad),
                Address(InputGrad),
                long(n),
                int(width),
            ],
        )],
    };
    if !bias {
        return plan;
    }
    let rows = n / width.max(1);
    let (chunks, per_chunk) = chunking(rows);
    plan.scratch.push((Partial, chunks * width));
    plan.launches.push(launch(
        format!("{prefix}_bias_partial_{name}"),
        (columns(width), chunks),
        vec![
            Address(Input),
            Address(Bias),
            Address(OutputGrad),
            Address(Partial),
            long(rows),
            int(width),
            long(per_chunk),
        ],
    ));
    plan.launches.push(launch(
        format!("{prefix}_bias_grad_{name}"),
        (columns(width), 1),
        vec![Address(Partial), Address(BiasGrad), int(width), int(chunks)],
    ));
    plan
}

/// Softmax over rows of `width`: `Input` → `Output`, both `values`.
pub fn softmax_forward(values: Values, rows: usize, width: usize) -> Plan {
    single(
        rows,
        format!("softmax_fwd_{}", values.suffix()),
        (rows, 1),
        vec![Address(Input), Address(Output), int(width)],
    )
}

/// Softmax backward: `Output` (forward's) and `OutputGrad` → `InputGrad`, all `values`.
pub fn softmax_backward(values: Values, rows: usize, width: usize) -> Plan {
    single(
        rows,
        format!("softmax_bwd_{}", values.suffix()),
        (rows, 1),
        vec![
            Address(Output),
            Address(OutputGrad),
            Address(InputGrad),
            int(width),
        ],
    )
}

/// Embedding lookup: `Weight` (the table, `values`, rows × width) at `Ids` (u32, `ids`)
/// → `Output` (`values`, ids × width).
pub fn embedding_forward(values: Values, rows: usize, width: usize, ids: usize) -> Plan {
    let n = ids * width;
    single(
        n,
        format!("embedding_fwd_{}", values.suffix()),
        (n.div_ceil(THREADS), 1),
        vec![
            Address(Weight),
            Address(Ids),
            Address(Output),
            long(n),
            int(width),
            int(rows),
        ],
    )
}

/// Its backward: `Ids` and `OutputGrad` (`values`) → `WeightGrad` (`values`, the whole
/// table: zero where no id points).
pub fn embedding_backward(values: Values, rows: usize, width: usize, ids: usize) -> Plan {
    single(
        rows * width,
        format!("embedding_bwd_{}", values.suffix()),
        (rows.div_ceil(EMBEDDING_TILE), columns(width)),
        vec![
            Address(Ids),
            Address(OutputGrad),
            Address(WeightGrad),
            long(ids),
            int(width),
            int(rows),
        ],
    )
}

/// How an attention mask `[samples or 1, queries or 1, len]` broadcasts: its strides
/// (elements) between samples and between queries, 0 where it repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskStrides {
    pub sample: usize,
    pub query: usize,
}

/// Attention's probabilities from raw scores `Input` (f32, `samples · heads · len` rows of
/// `len`): `softmax(scale · s + mask)`, with `Mask` (f32) when `mask` says how it
/// broadcasts → `Output` (f32).
pub fn attention_softmax_forward(
    rows: usize,
    len: usize,
    heads: usize,
    mask: Option<MaskStrides>,
    scale: f32,
) -> Plan {
    let (mask_at, strides) = match mask {
        Some(m) => (Address(Mask), m),
        None => (
            Arg::Null,
            MaskStrides {
                sample: 0,
                query: 0,
            },
        ),
    };
    single(
        rows,
        "attention_softmax_fwd_f32".into(),
        (rows, 1),
        vec![
            Address(Input),
            mask_at,
            Address(Output),
            int(len),
            int(heads),
            long(strides.sample),
            int(strides.query),
            Arg::F32(scale),
        ],
    )
}

/// Its backward: `Output` (the probabilities, `values`) and `OutputGrad` (f32) →
/// `InputGrad`, the raw scores' gradient (`values`).
pub fn attention_softmax_backward(values: Values, rows: usize, len: usize, scale: f32) -> Plan {
    single(
        rows,
        format!("attention_softmax_bwd_{}", values.suffix()),
        (rows, 1),
        vec![
            Address(Output),
            Address(OutputGrad),
            Address(InputGrad),
            int(len),
            Arg::F32(scale),
        ],
    )
}

/// A linear layer's bias add and the residual add after it, `n` values in rows of
/// `width`: `Residual` (f32) + (`Input` + `Bias`, both `values`, the sum rounded to
/// `values`) → `Output` (f32).
pub fn bias_residual_forward(values: Values, n: usize, width: usize) -> Plan {
    single(
        n,
        format!("bias_residual_fwd_{}", values.suffix()),
        (n.div_ceil(THREADS), 1),
        vec![
            Address(Residual),
            Address(Input),
            Address(Bias),
            Address(Output),
            long(n),
            int(width),
        ],
    )
}

/// Its backward from `OutputGrad` (f32; the residual stream's gradient is that same
/// tensor): `InputGrad`, the gradient rounded to `values` (bf16 only: in f32 it would be
/// a copy of `OutputGrad`), and `BiasGrad` (`values`), the sum of the rounded gradient
/// over the rows.
pub fn bias_residual_backward(values: Values, n: usize, width: usize) -> Plan {
    let input_grad = match values {
        Values::F32 => Arg::Null,
        Values::Bf16 => Address(InputGrad),
    };
    bias_backward("bias_residual_bwd_partial", values, n, width, input_grad)
}

/// A bias gradient: `OutputGrad` summed over the rows in chunks of partial sums (written
/// rounded to `InputGrad` where `input_grad` names it), then the chunks per column →
/// `BiasGrad` (`values`).
fn bias_backward(partial: &str, values: Values, n: usize, width: usize, input_grad: Arg) -> Plan {
    if n == 0 {
        return Plan::default();
    }
    let name = values.suffix();
    let rows = n / width.max(1);
    let (chunks, per_chunk) = chunking(rows);
    Plan {
        scratch: vec![(Partial, chunks * width)],
        launches: vec![
            launch(
                format!("{partial}_{name}"),
                (columns(width), chunks),
                vec![
                    Address(OutputGrad),
                    input_grad,
                    Address(Partial),
                    long(rows),
                    int(width),
                    long(per_chunk),
                ],
            ),
            launch(
                format!("bias_grad_{name}"),
                (columns(width), 1),
                vec![Address(Partial), Address(BiasGrad), int(width), int(chunks)],
            ),
        ],
    }
}

/// A linear layer's bias add, `n` values in rows of `width`: `Input` + `Bias` → `Output`,
/// all `values`.
pub fn bias_add_forward(values: Values, n: usize, width: usize) -> Plan {
    single(
        n,
        format!("bias_add_fwd_{}", values.suffix()),
        (n.div_ceil(THREADS), 1),
        vec![
            Address(Input),
            Address(Bias),
            Address(Output),
            long(n),
            int(width),
        ],
    )
}

/// Its bias's gradient: `OutputGrad` (`values`) summed over the rows → `BiasGrad`
/// (`values`). (The input's gradient is the output's own.)
pub fn bias_add_backward(values: Values, n: usize, width: usize) -> Plan {
    bias_backward("bias_grad_partial", values, n, width, Arg::Null)
}

/// A gradient into its running sum in place: `Output` (f32, `n`) += `Input` (`values`).
pub fn accumulate(values: Values, n: usize) -> Plan {
    single(
        n,
        format!("accumulate_{}", values.suffix()),
        (n.div_ceil(THREADS), 1),
        vec![Address(Output), Address(Input), long(n)],
    )
}

/// Image bytes normalised: `Input` (u8, `images × plane × 3`, HWC) → `Output` (f32,
/// `images × 3 × plane`, CHW), `plane` pixels an image, per channel `v · scale − shift`.
pub fn pixel_normalise(images: usize, plane: usize, scale: [f32; 3], shift: [f32; 3]) -> Plan {
    let n = images * 3 * plane;
    let mut args = vec![Address(Input), Address(Output), long(plane), long(n)];
    args.extend(scale.iter().chain(&shift).map(|&v| Arg::F32(v)));
    single(n, "pixel_normalise".into(), (n.div_ceil(THREADS), 1), args)
}

/// Whether flash attention takes heads of `head` values (its one width).
pub fn flash_attention_takes(head: usize) -> bool {
    head == FLASH_HEAD
}

/// The arguments every flash-attention kernel ends with: the sizes, the mask's strides,
/// the scale.
fn flash_tail(len: usize, heads: usize, mask: Option<MaskStrides>, scale: f32) -> Vec<Arg> {
    let strides = mask.unwrap_or(MaskStrides {
        sample: 0,
        query: 0,
    });
    vec![
        int(len),
        int(heads),
        long(strides.sample),
        int(strides.query),
        Arg::F32(scale),
    ]
}

fn flash_mask(mask: Option<MaskStrides>) -> Arg {
    match mask {
        Some(_) => Address(Mask),
        None => Arg::Null,
    }
}

/// A block per (sample, head, tile of `FLASH_TILE` rows).
fn flash_grid(samples: usize, len: usize, heads: usize) -> (usize, usize) {
    (samples * heads * len.div_ceil(FLASH_TILE), 1)
}

/// Flash attention forward over `samples` sequences of `len`, `heads` heads of
/// `FLASH_HEAD`: `Input` (bf16 packed projections `[samples, len, 3 · heads · FLASH_HEAD]`)
/// and `Mask` (f32, broadcast as `mask` says) → `Output` (bf16 `[samples, len, heads ·
/// FLASH_HEAD]`) and `Stats` (f32 `[samples, heads, len]`: each query row's log-sum-exp).
pub fn flash_attention_forward(
    samples: usize,
    len: usize,
    heads: usize,
    mask: Option<MaskStrides>,
    scale: f32,
) -> Plan {
    let mut args = vec![
        Address(Input),
        flash_mask(mask),
        Address(Output),
        Address(Stats),
    ];
    args.extend(flash_tail(len, heads, mask, scale));
    let mut plan = single(
        samples * len * heads,
        "flash_attention_fwd_bf16".into(),
        flash_grid(samples, len, heads),
        args,
    );
    for l in &mut plan.launches {
        l.threads = FLASH_THREADS;
    }
    plan
}

/// Its backward: `Input` (the packed projections), `Output` (forward's), `OutputGrad`
/// (bf16, as `Output`), `Stats` (forward's), `Mask` → `InputGrad` (bf16, as `Input`, every
/// element written). `Partial` (f32 scratch, a float a query row) holds rowsum(dO ∘ O).
pub fn flash_attention_backward(
    samples: usize,
    len: usize,
    heads: usize,
    mask: Option<MaskStrides>,
    scale: f32,
) -> Plan {
    let rows = samples * heads * len;
    if rows == 0 {
        return Plan::default();
    }
    let grad = |kernel: &str| {
        let mut args = vec![
            Address(Input),
            flash_mask(mask),
            Address(OutputGrad),
            Address(Stats),
            Address(Partial),
            Address(InputGrad),
        ];
        args.extend(flash_tail(len, heads, mask, scale));
        Launch {
            kernel: kernel.into(),
            grid: flash_grid(samples, len, heads),
            threads: FLASH_THREADS,
            args,
        }
    };
    Plan {
        scratch: vec![(Partial, rows)],
        launches: vec![
            launch(
                "flash_attention_delta_bf16".into(),
                (rows.div_ceil(THREADS / 32), 1),
                vec![
                    Address(Output),
                    Address(OutputGrad),
                    Address(Partial),
                    long(rows),
                    int(len),
                    int(heads),
                ],
            ),
            grad("flash_attention_dq_bf16"),
            grad("flash_attention_dkv_bf16"),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_rows_once() {
        for rows in [1, 2, 255, 256, 257, 1000, 70_000] {
            let (chunks, per) = chunking(rows);
            assert!(chunks <= MAX_CHUNKS && chunks * per >= rows && (chunks - 1) * per < rows);
        }
    }
}
