//! What the one-launch GPU AdamW (`adamw.cu`) and the one-launch sum of squares of the
//! gradients (`grad_norm.cu`) are launched with, as data. For AdamW: each tensor's
//! descriptor (its buffers by role, its size, its first block, whether it decays), the
//! grid, and the scalars rounded to f32 as the CPU AdamW rounds them. `cuda.rs` resolves
//! the roles to device addresses and launches; the suite's CPU emulator of the kernel
//! (`kernels::` tests, `tests/cuda-emulator/`) resolves them to host buffers and holds the
//! result to the CPU AdamW's bits. Nothing here needs CUDA.

use super::AdamWConfig;

/// The kernels' CUDA source: the AdamW step, and the gradients' sum of squares.
pub const SOURCE: &str = concat!(include_str!("adamw.cu"), include_str!("grad_norm.cu"));
pub const KERNEL: &str = "adamw_multi_tensor";
/// Elements per block: the source's `CHUNK`.
pub const CHUNK: usize = 4096;
pub const THREADS: usize = 256;

/// One tensor of the update, by its index in the update's list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tensor {
    pub elements: usize,
    pub decays: bool,
    /// It has a bf16 working copy to write.
    pub working_copy: bool,
}

/// One of a descriptor's eight u64s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The address of tensor `i`'s f32 master weight, first moment, second moment,
    /// gradient, or bf16 working copy.
    Master(usize),
    FirstMoment(usize),
    SecondMoment(usize),
    Gradient(usize),
    WorkingCopy(usize),
    /// A null address (no working copy).
    Null,
    Value(u64),
}

/// The launch: descriptors (8 fields each, in the kernel's order), blocks, and the
/// kernel's arguments after the descriptor pointer and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub descriptors: Vec<[Field; 8]>,
    pub blocks: usize,
    /// lr, beta1, 1 − beta1, beta2, 1 − beta2, eps, 1/bias1, 1/bias2, 1 − lr·decay.
    pub scalars: [f32; 9],
}

/// The launch of one AdamW step over `tensors` (empty ones left out); None when there is
/// nothing to update.
pub fn launch(
    tensors: &[Tensor],
    c: AdamWConfig,
    bias1: f64,
    bias2: f64,
    lr: f64,
) -> Option<Launch> {
    let mut descriptors = Vec::with_capacity(tensors.len());
    let mut blocks = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        if t.elements == 0 {
            continue;
        }
        descriptors.push([
            Field::Master(i),
            Field::FirstMoment(i),
            Field::SecondMoment(i),
            Field::Gradient(i),
            if t.working_copy {
                Field::WorkingCopy(i)
            } else {
                Field::Null
            },
            Field::Value(t.elements as u64),
            Field::Value(blocks as u64),
            Field::Value(u64::from(t.decays)),
        ]);
        blocks += t.elements.div_ceil(CHUNK);
    }
    if blocks == 0 {
        return None;
    }
    // The scalars rounded to f32 as the CPU path rounds them (from f64).
    let f = |x: f64| x as f32;
    Some(Launch {
        descriptors,
        blocks,
        scalars: [
            f(lr),
            f(c.beta1),
            f(1.0 - c.beta1),
            f(c.beta2),
            f(1.0 - c.beta2),
            f(c.eps),
            f(1.0 / bias1),
            f(1.0 / bias2),
            f(1.0 - lr * c.weight_decay),
        ],
    })
}

/// The sum-of-squares kernel (`grad_norm.cu`), its elements per block (`NORM_CHUNK`) and
/// its threads (`NORM_THREADS`).
pub const NORM_KERNEL: &str = "sum_of_squares_multi_tensor";
pub const NORM_CHUNK: usize = 4096;
pub const NORM_THREADS: usize = 256;

/// The launch of one sum of squares over many tensors: descriptors (4 fields each: the
/// tensor's address as [`Field::Gradient`], its element count, its first block, 0) and
/// the blocks, one f32 partial sum each.
#[derive(Debug, Clone, PartialEq)]
pub struct NormLaunch {
    pub descriptors: Vec<[Field; 4]>,
    pub blocks: usize,
}

/// The launch over tensors of `elements` each (empty ones left out); None when there is
/// nothing to sum.
pub fn norm_launch(elements: &[usize]) -> Option<NormLaunch> {
    let mut descriptors = Vec::with_capacity(elements.len());
    let mut blocks = 0usize;
    for (i, &n) in elements.iter().enumerate() {
        if n == 0 {
            continue;
        }
        descriptors.push([
            Field::Gradient(i),
            Field::Value(n as u64),
            Field::Value(blocks as u64),
            Field::Value(0),
        ]);
        blocks += n.div_ceil(NORM_CHUNK);
    }
    (blocks > 0).then_some(NormLaunch {
        descriptors,
        blocks,
    })
}

/// The kernel's partial sums, one a block, summed in f64 in block order.
pub fn sum_partials(partials: &[f32]) -> f64 {
    partials.iter().map(|&p| f64::from(p)).sum()
}
