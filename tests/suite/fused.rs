//! The fused CPU ops (GELU, softmax, layer norm, bias add) against the same maths in
//! plain candle ops: values and every input's gradient, in f64 (to rounding) and f32 (to
//! the fast `exp`/`erf`'s accuracy); and finite differences in f64.

use candle_core::{DType, Tensor, Var, D};
use mmpipe::model::fused;

use super::common::{fixed_values, values, worst_violation, Relative};

/// The reference maths in plain candle ops (what the fused ops replace).
mod plain {
    use super::*;

    /// `x Φ(x)` through `erf` (candle's own `gelu_erf` backward rounds 1/√(2π) to six
    /// digits, which the f64 comparison would see).
    pub fn gelu(x: &Tensor) -> Tensor {
        let cdf = (((x * std::f64::consts::FRAC_1_SQRT_2)
            .unwrap()
            .erf()
            .unwrap()
            + 1.0)
            .unwrap()
            * 0.5)
            .unwrap();
        (x * cdf).unwrap()
    }

    pub fn softmax(x: &Tensor) -> Tensor {
        let max = x.max_keepdim(D::Minus1).unwrap().detach();
        let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
        e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
    }

    pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        candle_nn::ops::layer_norm_slow(x, w, b, 1e-5).unwrap()
    }
}

/// Inputs spread wide enough to reach every branch of the kernels (|x| up to 6, rows
/// whose softmax saturates), as variables.
fn inputs(shape: &[usize], scale: f64, dtype: DType) -> Var {
    let t = (fixed_values(shape, 0.3) * scale).unwrap();
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

/// `Σ f(vars) ⊙ weights` and the gradient of every var.
fn value_and_grads(vars: &[&Var], f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&xs);
    let weights = fixed_values(y.dims(), 1.1).to_dtype(y.dtype()).unwrap();
    let loss = (&y * &weights).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|v| {
            grads
                .get(v.as_tensor())
                .expect("every input has a gradient")
                .clone()
        })
        .collect();
    (y, g)
}

/// `check` with `plain_op` run in f64 on the same values: the f32 kernels against the
/// exact result rather than against another f32 rounding.
fn check_f32_against_f64(
    label: &str,
    vars: &[&Var],
    fused_op: &dyn Fn(&[Tensor]) -> Tensor,
    plain_op: &dyn Fn(&[Tensor]) -> Tensor,
    rel: f64,
) {
    let wide: Vec<Var> = vars
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    let (y1, g1) = value_and_grads(vars, fused_op);
    let (y2, g2) = value_and_grads(&wide.iter().collect::<Vec<_>>(), plain_op);
    if let Some((i, a, b)) = worst_violation(&y1, &y2, rel, 0.0, Relative::Tensor) {
        panic!("{label}: value[{i}] {a} vs exact {b}");
    }
    for (k, (a, b)) in g1.iter().zip(&g2).enumerate() {
        if let Some((i, x, y)) = worst_violation(a, b, rel, 0.0, Relative::Tensor) {
            panic!("{label}: gradient of input {k} [{i}] {x} vs exact {y}");
        }
    }
}

fn check(
    label: &str,
    vars: &[&Var],
    fused_op: &dyn Fn(&[Tensor]) -> Tensor,
    plain_op: &dyn Fn(&[Tensor]) -> Tensor,
    rel: f64,
    abs: f64,
) {
    let (y1, g1) = value_and_grads(vars, fused_op);
    let (y2, g2) = value_and_grads(vars, plain_op);
    if let Some((i, a, b)) = worst_violation(&y1, &y2, rel, abs, Relative::Tensor) {
        panic!("{label}: value[{i}] {a} vs plain ops {b}");
    }
    for (k, (a, b)) in g1.iter().zip(&g2).enumerate() {
        assert!(
            values(b).iter().any(|v| *v != 0.0),
            "{label}: zero reference gradient"
        );
        if let Some((i, x, y)) = worst_violation(a, b, rel, abs, Relative::Tensor) {
            panic!("{label}: gradient of input {k} [{i}] {x} vs plain ops {y}");
        }
    }
}

/// Every op at `dtype`: f64 against plain ops to `rel`/`abs`; f32 against plain ops in f64
/// to `rel` of each tensor's scale.
fn check_all(dtype: DType, rel: f64, abs: f64) {
    let check = |label: &str,
                 vars: &[&Var],
                 fused_op: &dyn Fn(&[Tensor]) -> Tensor,
                 plain_op: &dyn Fn(&[Tensor]) -> Tensor,
                 rel: f64,
                 abs: f64| {
        if dtype == DType::F32 {
            check_f32_against_f64(label, vars, fused_op, plain_op, rel)
        } else {
            check(label, vars, fused_op, plain_op, rel, abs)
        }
    };
    let x = inputs(&[6, 40], 6.0, dtype);
    check(
        &format!("gelu {dtype:?}"),
        &[&x],
        &|t| fused::gelu_erf(&t[0]).unwrap(),
        &|t| plain::gelu(&t[0]),
        rel,
        abs,
    );
    let y = inputs(&[2, 3, 8], 3.0, dtype);
    let c = inputs(&[8], 1.0, dtype);
    check(
        &format!("gelu with bias {dtype:?}"),
        &[&y, &c],
        &|t| fused::gelu_erf_bias(&t[0], &t[1]).unwrap(),
        &|t| plain::gelu(&t[0].broadcast_add(&t[1]).unwrap()),
        rel,
        abs,
    );
    // Wide logits: some rows put almost all their mass on one entry.
    let s = inputs(&[3, 5, 17], 12.0, dtype);
    check(
        &format!("softmax {dtype:?}"),
        &[&s],
        &|t| fused::softmax_last_dim(&t[0]).unwrap(),
        &|t| plain::softmax(&t[0]),
        rel,
        abs,
    );
    // Rows with a large offset: the two-pass variance must stay exact.
    let x = Var::from_tensor(
        &((fixed_values(&[2, 7, 24], 0.9) * 3.0).unwrap() + 50.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let w = inputs(&[24], 1.0, dtype);
    let b = inputs(&[24], 0.5, dtype);
    check(
        &format!("layer norm {dtype:?}"),
        &[&x, &w, &b],
        &|t| fused::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        &|t| plain::layer_norm(&t[0], &t[1], &t[2]),
        rel,
        abs,
    );
    let x = inputs(&[11, 6], 2.0, dtype);
    let w = inputs(&[5, 6], 1.0, dtype);
    let c = inputs(&[5], 1.0, dtype);
    check(
        &format!("linear {dtype:?}"),
        &[&x, &w, &c],
        &|t| fused::linear(&t[0], &t[1], Some(&t[2])).unwrap(),
        &|t| {
            t[0].matmul(&t[1].t().unwrap())
                .unwrap()
                .broadcast_add(&t[2])
                .unwrap()
        },
        rel,
        abs,
    );
    check(
        &format!("linear without bias {dtype:?}"),
        &[&x, &w],
        &|t| fused::linear(&t[0], &t[1], None).unwrap(),
        &|t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
        rel,
        abs,
    );
}

#[test]
fn fused_ops_equal_plain_ops_in_f64() {
    check_all(DType::F64, 1e-12, 1e-14);
}

#[test]
fn fused_ops_equal_plain_ops_in_f32() {
    // Layer norm of rows offset by 50 loses ~3e-6 to f32 rounding of the mean (plain f32
    // ops lose as much).
    check_all(DType::F32, 1e-5, 0.0);
}

#[test]
fn fused_ops_take_strided_inputs() {
    let x = inputs(&[8, 5], 3.0, DType::F64);
    let t = x.as_tensor().t().unwrap();
    let a = values(&fused::gelu_erf(&t).unwrap());
    let b = values(&plain::gelu(&t));
    assert_eq!(a.len(), b.len());
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 1e-14, "{p} vs {q}");
    }
    let a = values(&fused::softmax_last_dim(&t).unwrap());
    let b = values(&plain::softmax(&t));
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() < 1e-14, "{p} vs {q}");
    }
}

/// The fast f32 `exp` and `erf` over their whole range, through GELU and softmax, against
/// f64: relative error near f32's rounding, and exact zeros and ones in the tails.
#[test]
fn f32_gelu_and_softmax_are_accurate_over_the_whole_range() {
    let xs: Vec<f64> = (-4000..=4000).map(|i| f64::from(i) * 0.0025).collect();
    let x64 = Tensor::new(xs.as_slice(), &candle_core::Device::Cpu).unwrap();
    let x32 = x64.to_dtype(DType::F32).unwrap();
    let want = values(&fused::gelu_erf(&x64).unwrap());
    let got = values(&fused::gelu_erf(&x32).unwrap());
    // Relative error, or absolute below 1: for x < 0, 1 + erf(x/√2) cancels in f32 (as in
    // any f32 GELU).
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0f64, f64::max);
    assert!(worst < 1e-6, "GELU f32 error {worst:e}");
    // Softmax rows spanning e^-100 .. e^0: tiny entries underflow to 0, the rest are
    // accurate.
    let row: Vec<f64> = (0..101).map(|i| -f64::from(i)).collect();
    let r64 = Tensor::new(row.as_slice(), &candle_core::Device::Cpu).unwrap();
    let want = values(&fused::softmax_last_dim(&r64).unwrap());
    let got = values(&fused::softmax_last_dim(&r64.to_dtype(DType::F32).unwrap()).unwrap());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-6 * w + 1e-38,
            "softmax entry {i}: {g:e} vs {w:e}"
        );
    }
}

/// `[len, len]`: −∞ above the diagonal (the text tower's causal mask).
fn causal_mask(len: usize, dtype: DType) -> Tensor {
    let v: Vec<f64> = (0..len * len)
        .map(|i| {
            if i % len > i / len {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (len, len), &candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// `[n, 1, 1, len]`: sample i's last i keys barred (BERT's padding mask).
fn padding_mask(n: usize, len: usize, dtype: DType) -> Tensor {
    let v: Vec<f64> = (0..n * len)
        .map(|i| {
            if i % len >= len - i / len {
                f64::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, (n, 1, 1, len), &candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The fused attention (heads read and written through strides, probabilities kept for
/// backward) against the same maths in plain ops: no mask, causal, padding, and a mask
/// per sample and query; values and the packed projections' gradient.
fn check_attention(dtype: DType, rel: f64, abs: f64) {
    let (n, len, heads, d) = (3, 7, 2, 4);
    let qkv = inputs(&[n, len, 3 * heads * d], 2.5, dtype);
    let per_query = (fixed_values(&[n, 1, len, len], 0.7) * 4.0)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let masks = [
        ("no mask", None),
        ("causal", Some(causal_mask(len, dtype))),
        ("padding", Some(padding_mask(n, len, dtype))),
        ("per sample and query", Some(per_query)),
    ];
    for (name, mask) in &masks {
        let label = format!("attention {dtype:?} {name}");
        let fused_op = |t: &[Tensor]| fused::attention(&t[0], heads, mask.as_ref()).unwrap();
        let plain_op = |t: &[Tensor]| {
            let m = mask.as_ref().map(|m| {
                let m = m.to_dtype(t[0].dtype()).unwrap();
                // attention_plain takes the mask as [n or 1, len or 1, len].
                match m.dims() {
                    [q, k] => m.reshape((1, *q, *k)).unwrap(),
                    [b, 1, q, k] => m.reshape((*b, *q, *k)).unwrap(),
                    _ => unreachable!(),
                }
            });
            fused::attention_plain(&t[0], heads, m.as_ref()).unwrap()
        };
        if dtype == DType::F32 {
            check_f32_against_f64(&label, &[&qkv], &fused_op, &plain_op, rel);
        } else {
            check(&label, &[&qkv], &fused_op, &plain_op, rel, abs);
        }
    }
}

#[test]
fn fused_attention_equals_plain_ops() {
    check_attention(DType::F64, 1e-12, 1e-14);
    check_attention(DType::F32, 1e-5, 0.0);
}

/// Against central finite differences of the summed, weighted output (an independent
/// check of the hand-written backward).
#[test]
fn fused_attention_gradient_matches_finite_differences() {
    let (n, len, heads, d) = (2, 5, 2, 3);
    let qkv = inputs(&[n, len, 3 * heads * d], 1.5, DType::F64);
    let mask = causal_mask(len, DType::F64);
    let f = |t: &Tensor| fused::attention(t, heads, Some(&mask)).unwrap();
    let (_, g) = value_and_grads(&[&qkv], &|t| f(&t[0]));
    let analytic = values(&g[0]);
    let x0 = values(qkv.as_tensor());
    let shape = qkv.as_tensor().dims().to_vec();
    let objective = |x: &[f64]| {
        let t = Tensor::from_vec(x.to_vec(), shape.as_slice(), &candle_core::Device::Cpu).unwrap();
        let y = f(&t);
        let w = fixed_values(y.dims(), 1.1);
        (&y * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    for i in (0..x0.len()).step_by(7) {
        let mut plus = x0.clone();
        plus[i] += h;
        let mut minus = x0.clone();
        minus[i] -= h;
        let numeric = (objective(&plus) - objective(&minus)) / (2.0 * h);
        assert!(
            (numeric - analytic[i]).abs() < 1e-7 * (1.0 + numeric.abs()),
            "qkv[{i}]: finite differences {numeric} vs backward {}",
            analytic[i]
        );
    }
}

#[test]
fn fused_attention_names_bad_shapes() {
    let qkv = inputs(&[2, 4, 18], 1.0, DType::F32);
    let err = fused::attention(qkv.as_tensor(), 4, None).unwrap_err();
    assert!(err.to_string().contains("3 × 4 heads"), "{err}");
    let mask = Tensor::zeros((3, 1, 1, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = fused::attention(qkv.as_tensor(), 2, Some(&mask)).unwrap_err();
    assert!(err.to_string().contains("[3, 1, 1, 4]"), "{err}");
}

/// One thread (rank threads' pools) and several give the same bits: each (sample, head)
/// is one task's work whichever thread runs it.
#[test]
fn fused_attention_is_the_same_on_one_thread_and_several() {
    let qkv = inputs(&[4, 9, 3 * 16], 2.0, DType::F32);
    let mask = causal_mask(9, DType::F32);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (y, g) = value_and_grads(&[&qkv], &|t| {
                fused::attention(&t[0], 4, Some(&mask)).unwrap()
            });
            (values(&y), values(&g[0]))
        })
    };
    let one = run(1);
    let three = run(3);
    assert_eq!(one.0, three.0, "outputs differ");
    assert_eq!(one.1, three.1, "gradients differ");
    assert!(one.1.iter().any(|v| *v != 0.0));
}

/// An input that needs no gradient (pixels: not a variable, not computed from one) gets
/// none from the fused linear, and the weight's gradient is still exact.
/// The GPU attention's GEMMs (`head_gemms`: one cuBLAS strided-batched call per head that
/// reads q, k and v inside the packed projections and writes the merged heads in place),
/// run on the CPU by a reading of cuBLAS's contract (its argument checks, bounds checked),
/// with the softmax and its backward in f64 between them as the kernels do it: the output
/// and the packed projections' gradient equal the plain ops' for every kind of mask, and
/// each stage writes every element of its output.
#[test]
fn attention_head_gemms_equal_the_plain_ops() {
    use fused::head_gemms::{calls, cublas_reference, Dims, Operand, Stage};
    fn stage(stage: Stage, dims: Dims, inputs: &[(Operand, &[f64])], out: &mut [f64]) {
        for call in calls(stage, dims) {
            let input = |o: Operand| inputs.iter().find(|(x, _)| *x == o).unwrap().1;
            cublas_reference(&call, input(call.a.operand), input(call.b.operand), out)
                .unwrap_or_else(|e| panic!("{stage:?}: {e}"));
        }
    }
    fn written(what: &str, v: &[f64]) {
        assert!(
            v.iter().all(|x| !x.is_nan()),
            "{what}: an element left unwritten"
        );
    }
    for (n, len, heads, d) in [(3, 7, 2, 4), (2, 5, 3, 5)] {
        let (w, scale) = (heads * d, 1.0 / (d as f64).sqrt());
        let dims = Dims {
            n,
            len,
            heads,
            width: w,
        };
        let qkv = (fixed_values(&[n, len, 3 * w], 0.3) * 2.5).unwrap();
        let per_query = (fixed_values(&[n, len, len], 0.7) * 4.0).unwrap();
        let masks = [
            ("no mask", None),
            (
                "causal",
                Some(causal_mask(len, DType::F64).unsqueeze(0).unwrap()),
            ),
            (
                "padding",
                Some(padding_mask(n, len, DType::F64).squeeze(1).unwrap()),
            ),
            ("per sample and query", Some(per_query)),
        ];
        for (name, mask) in &masks {
            let label = format!("{n}×{len}, {heads} heads of {d}, {name}");
            let x = values(&qkv);
            // The mask as the kernel reads it: [n or 1, len or 1, len], broadcast.
            let mask_at = |b: usize, i: usize, j: usize| {
                mask.as_ref().map_or(0.0, |m| {
                    let (mb, mq, _) = m.dims3().unwrap();
                    let row = if mb > 1 { b * mq } else { 0 } + if mq > 1 { i } else { 0 };
                    values(m)[row * len + j]
                })
            };
            let scores_len = dims.size(Operand::Scores);
            let mut raw = vec![f64::NAN; scores_len];
            stage(Stage::Scores, dims, &[(Operand::Packed, &x)], &mut raw);
            written("raw scores", &raw);
            let mut p = raw.clone();
            for (r, row) in p.chunks_mut(len).enumerate() {
                let (b, i) = (r / (heads * len), r % len);
                for (j, s) in row.iter_mut().enumerate() {
                    *s = *s * scale + mask_at(b, i, j);
                }
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = row.iter().map(|s| (s - max).exp()).sum();
                row.iter_mut().for_each(|s| *s = (*s - max).exp() / sum);
            }
            let mut out = vec![f64::NAN; dims.size(Operand::Merged)];
            let inputs = [(Operand::Scores, &p[..]), (Operand::Packed, &x[..])];
            stage(Stage::Mix, dims, &inputs, &mut out);
            written("output", &out);

            let plain_mask = mask.as_ref();
            let qkv_var = Var::from_tensor(&qkv).unwrap();
            let (want, grads) = value_and_grads(&[&qkv_var], &|t| {
                fused::attention_plain(&t[0], heads, plain_mask).unwrap()
            });
            let got = Tensor::from_vec(out, (n, len, w), &candle_core::Device::Cpu).unwrap();
            if let Some((at, a, b)) = worst_violation(&got, &want, 1e-12, 1e-14, Relative::Tensor) {
                panic!("{label}: output[{at}] is {a}, the plain ops' {b}");
            }

            // Backward, from the same output gradient `value_and_grads` weights with.
            let g = values(&fixed_values(&[n, len, w], 1.1));
            let mut dqkv = vec![f64::NAN; dims.size(Operand::Packed)];
            let inputs = [(Operand::Scores, &p[..]), (Operand::Merged, &g[..])];
            stage(Stage::ValueGrad, dims, &inputs, &mut dqkv);
            let mut dp = vec![f64::NAN; scores_len];
            let inputs = [(Operand::Merged, &g[..]), (Operand::Packed, &x[..])];
            stage(Stage::ProbsGrad, dims, &inputs, &mut dp);
            written("probabilities' gradient", &dp);
            let mut ds = dp;
            for (row, p) in ds.chunks_mut(len).zip(p.chunks(len)) {
                let dot: f64 = row.iter().zip(p).map(|(g, p)| g * p).sum();
                for (g, p) in row.iter_mut().zip(p) {
                    *g = p * (*g - dot) * scale;
                }
            }
            let inputs = [(Operand::Scores, &ds[..]), (Operand::Packed, &x[..])];
            stage(Stage::QueryGrad, dims, &inputs, &mut dqkv);
            stage(Stage::KeyGrad, dims, &inputs, &mut dqkv);
            written("packed projections' gradient", &dqkv);
            let got = Tensor::from_vec(dqkv, (n, len, 3 * w), &candle_core::Device::Cpu).unwrap();
            if let Some((at, a, b)) =
                worst_violation(&got, &grads[0], 1e-12, 1e-14, Relative::Tensor)
            {
                panic!("{label}: d qkv[{at}] is {a}, the plain ops' {b}");
            }
        }
    }
}

/// A call whose leading dimension is below the rows it spans is one cuBLAS refuses (and
/// one past its operand reads another's memory): the reference refuses both, so the test
/// above could see a wrong layout.
#[test]
fn the_cublas_reference_refuses_what_cublas_would() {
    use fused::head_gemms::{calls, cublas_reference, Dims, Operand, Stage};
    let dims = Dims {
        n: 2,
        len: 3,
        heads: 2,
        width: 4,
    };
    let call = calls(Stage::Scores, dims)[1];
    let x = vec![1.0; dims.size(Operand::Packed)];
    let mut c = vec![0.0; dims.size(Operand::Scores)];
    assert!(cublas_reference(&call, &x, &x, &mut c).is_ok());
    let mut narrow = call;
    narrow.a.ld = 1;
    let e = cublas_reference(&narrow, &x, &x, &mut c).unwrap_err();
    assert!(e.contains("leading dimension"), "{e}");
    let mut past = call;
    past.b.offset += 3 * dims.width;
    let e = cublas_reference(&past, &x, &x, &mut c).unwrap_err();
    assert!(e.contains("past"), "{e}");
}

/// Gradients summed in place (`fused::GradSum`, micro-batches' sums): the sums equal
/// `a + b` in the sum's dtype bit for bit (f32, bf16 into f32, f64), strided and broadcast
/// gradients included; the first gradient's own tensor is left as it was; a gradient of
/// another shape is an error naming both.
#[test]
fn gradient_sums_in_place_equal_plain_adds_and_leave_their_inputs_alone() {
    for (sum_dtype, g_dtype) in [
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
        (DType::F64, DType::F64),
    ] {
        let label = format!("{g_dtype:?} into {sum_dtype:?}");
        let grad = |phase: f64| fixed_values(&[6, 5], phase).to_dtype(g_dtype).unwrap();
        let first = grad(0.1);
        let before = values(&first);
        let strided = grad(0.2).t().unwrap().contiguous().unwrap().t().unwrap();
        let broadcast = Tensor::new(&[0.5f64], &candle_core::Device::Cpu)
            .unwrap()
            .to_dtype(g_dtype)
            .unwrap()
            .broadcast_as((6, 5))
            .unwrap();
        let mut sum = fused::GradSum::new(&first, sum_dtype).unwrap();
        let mut want = first.to_dtype(sum_dtype).unwrap();
        for g in [&grad(0.3), &strided, &broadcast] {
            sum.add(g).unwrap();
            want = (&want + g.to_dtype(sum_dtype).unwrap()).unwrap();
        }
        let got = sum.into_tensor();
        assert_eq!(got.dtype(), sum_dtype, "{label}");
        assert_eq!(values(&got), values(&want), "{label}: the sums differ");
        assert_eq!(
            values(&first),
            before,
            "{label}: the first gradient changed"
        );
    }
    let mut sum = fused::GradSum::new(&fixed_values(&[2, 3], 0.0), DType::F64).unwrap();
    let e = sum
        .add(&fixed_values(&[3, 2], 0.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
}

#[test]
fn fused_linear_skips_the_gradient_of_constant_inputs() {
    let x = fixed_values(&[7, 4], 0.2);
    let w = inputs(&[3, 4], 1.0, DType::F64);
    let y = fused::linear(&x, w.as_tensor(), None).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none(), "a gradient for a constant input");
    // d(Σ x wᵀ)/dw[o, i] = Σ_rows x[r, i].
    let want = x.sum(0).unwrap();
    let got = grads.get(w.as_tensor()).expect("weight gradient");
    for o in 0..3 {
        let row = values(&got.get(o).unwrap());
        for (a, b) in row.iter().zip(values(&want)) {
            assert!((a - b).abs() < 1e-12, "dw[{o}]: {a} vs {b}");
        }
    }
}

#[test]
fn gelu_with_bias_names_a_bias_of_the_wrong_width() {
    let y = inputs(&[3, 8], 1.0, DType::F32);
    let b = inputs(&[5], 1.0, DType::F32);
    let err = fused::gelu_erf_bias(y.as_tensor(), b.as_tensor()).unwrap_err();
    assert!(
        err.to_string().contains("[5]") && err.to_string().contains("[3, 8]"),
        "{err}"
    );
}

/// A tower's last block runs at the pooled token only (`forward_pooled`): the same values
/// and gradients (every parameter's and the input's) as the whole block with the pooled
/// row taken afterwards, for the class token and per-caption positions, with no mask, a
/// causal mask and a padding mask.
#[test]
fn the_last_block_at_the_pooled_token_equals_the_whole_block_there() {
    use mmpipe::model::layers::{Activation, PooledToken, Transformer};
    use mmpipe::model::ParamBuilder;
    let (n, len, width, heads) = (3, 7, 8, 2);
    let dev = candle_core::Device::Cpu;
    let pb = ParamBuilder::new(5, DType::F64, &dev);
    let transformer = Transformer::new(&pb, width, 1, heads, 4, Activation::Gelu).unwrap();
    let block = &transformer.blocks()[0];
    let params = pb.params();
    // Off their zero/one initial values, so the biases and norms are exercised too.
    for (i, (_, var)) in params.iter().enumerate() {
        let moved = (var.as_tensor() + fixed_values(var.dims(), i as f64) * 0.1).unwrap();
        var.set(&moved).unwrap();
    }
    let positions = Tensor::new(&[6u32, 0, 3], &dev).unwrap();
    let causal = causal_mask(len, DType::F64);
    let padding = padding_mask(n, len, DType::F64);
    let cases = [
        ("class token, no mask", None, PooledToken::First),
        (
            "positions, causal",
            Some(&causal),
            PooledToken::At(&positions),
        ),
        (
            "positions, padding",
            Some(&padding),
            PooledToken::At(&positions),
        ),
        ("class token, causal", Some(&causal), PooledToken::First),
    ];
    let upstream = fixed_values(&[n, width], 1.1);
    for (case, mask, pooled) in cases {
        let x = Var::from_tensor(&fixed_values(&[n, len, width], 0.3)).unwrap();
        let run = |out: Tensor| -> (Tensor, Vec<Tensor>) {
            let store = (&out * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut grads = params.grads(&store).unwrap();
            grads.push(store.get(x.as_tensor()).expect("input gradient").clone());
            (out, grads)
        };
        let (want, want_grads) = run(pooled
            .select(&block.forward(x.as_tensor(), mask).unwrap())
            .unwrap());
        let (got, got_grads) = run(block.forward_pooled(x.as_tensor(), mask, pooled).unwrap());
        assert_eq!(got.dims(), &[n, width], "{case}: shape");
        if let Some((i, a, b)) = worst_violation(&got, &want, 1e-12, 1e-14, Relative::Tensor) {
            panic!("{case}: output[{i}] {a} vs {b}");
        }
        let names = params.names();
        for (k, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
            let name = names.get(k).map_or("input", |s| *s);
            assert!(
                values(w).iter().any(|v| *v != 0.0),
                "{case} {name}: zero gradient"
            );
            if let Some((i, a, b)) = worst_violation(g, w, 1e-10, 1e-13, Relative::Tensor) {
                panic!("{case} {name}[{i}]: {a} vs {b}");
            }
        }
    }
}

/// The gradient norm's sum of squares (one pass on the CPU) against plain ops: f64 to
/// rounding, f32 to its precision, strided input, a length that is no multiple of the
/// 16 partial sums or the 4096-element blocks, and NaN passed through.
#[test]
fn sum_of_squares_equals_plain_ops() {
    let n = 3 * 4096 + 37;
    let x = fixed_values(&[n], 0.2);
    let want: f64 = values(&x).iter().map(|v| v * v).sum();
    let got = fused::sum_of_squares(&x).unwrap();
    assert!((got - want).abs() <= 1e-12 * want, "f64: {got} vs {want}");
    let got = fused::sum_of_squares(&x.to_dtype(DType::F32).unwrap()).unwrap();
    assert!((got - want).abs() <= 1e-5 * want, "f32: {got} vs {want}");
    let m = fixed_values(&[37, 53], 0.9);
    let want: f64 = values(&m).iter().map(|v| v * v).sum();
    let got = fused::sum_of_squares(&m.t().unwrap()).unwrap();
    assert!(
        (got - want).abs() <= 1e-12 * want,
        "strided: {got} vs {want}"
    );
    let with_nan = Tensor::new(&[1f32, f32::NAN, 2.0], &candle_core::Device::Cpu).unwrap();
    assert!(fused::sum_of_squares(&with_nan).unwrap().is_nan());
}

/// The token lookup gives `index_select`'s rows and, through its own backward, the same
/// table gradient bit for bit (repeated ids summed in the same order), in f32 and f64.
#[test]
fn embedding_equals_index_select_values_and_gradient_exactly() {
    let ids = Tensor::new(&[3u32, 0, 3, 6, 3, 1], &candle_core::Device::Cpu).unwrap();
    for dtype in [DType::F32, DType::F64] {
        let table = Var::from_tensor(&fixed_values(&[7, 5], 0.3).to_dtype(dtype).unwrap()).unwrap();
        let weights = fixed_values(&[6, 5], 1.1).to_dtype(dtype).unwrap();
        let run = |rows: Tensor| {
            let grads = (&rows * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (values(&rows), values(grads.get(table.as_tensor()).unwrap()))
        };
        let (want, want_grad) = run(table.index_select(&ids, 0).unwrap());
        let (got, got_grad) = run(fused::embedding(table.as_tensor(), &ids).unwrap());
        assert_eq!(got, want, "{dtype:?} rows");
        assert_eq!(got_grad, want_grad, "{dtype:?} table gradient");
        // Rows 2, 4 and 5 are never looked up: their gradient is zero.
        assert!(got_grad[2 * 5..3 * 5].iter().all(|&g| g == 0.0));
    }
}

#[test]
fn an_embedding_id_outside_the_table_is_an_error_naming_it() {
    let table = fixed_values(&[4, 3], 0.0).to_dtype(DType::F32).unwrap();
    let ids = Tensor::new(&[1u32, 4], &candle_core::Device::Cpu).unwrap();
    let err = fused::embedding(&table, &ids).unwrap_err().to_string();
    assert!(err.contains("id 4 outside a table of 4 rows"), "{err}");
}

/// The fused ops' CUDA kernels: NVRTC compiles them (no GPU needed), and on a GPU, the
/// workbench: each kernel against the plain ops on fresh random inputs, in f64 on the CPU,
/// with both timed (printed, not asserted; `scripts/gpu-check.sh` keeps the log).
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_fused_kernels_compile_for_sm_90() {
        let ptx = fused::cuda::ptx(9, 0).unwrap();
        let mut entries = vec![
            "layer_norm_bwd_dw".to_string(),
            "layer_norm_fwd_f32_to_bf16".to_string(),
            "layer_norm_fwd_bf16_to_bf16".to_string(),
            "layer_norm_bwd_dx_f32_from_bf16".to_string(),
            "layer_norm_bwd_dx_bf16_from_bf16".to_string(),
            "layer_norm_bwd_partial_f32_from_bf16".to_string(),
            "layer_norm_bwd_partial_bf16_from_bf16".to_string(),
            "attention_softmax_fwd_f32".to_string(),
            "attention_softmax_bwd_f32".to_string(),
            "attention_softmax_bwd_bf16".to_string(),
            "pixel_normalise".to_string(),
            "flash_attention_fwd_bf16".to_string(),
            "flash_attention_delta_bf16".to_string(),
            "flash_attention_dq_bf16".to_string(),
            "flash_attention_dkv_bf16".to_string(),
        ];
        for dtype in ["f32", "bf16"] {
            for kernel in [
                "layer_norm_fwd",
                "layer_norm_bwd_dx",
                "layer_norm_bwd_partial",
                "gelu_fwd",
                "gelu_bwd",
                "gelu_bias_partial",
                "gelu_bias_grad",
                "quick_gelu_fwd",
                "quick_gelu_bwd",
                "quick_gelu_bias_partial",
                "quick_gelu_bias_grad",
                "softmax_fwd",
                "softmax_bwd",
                "embedding_fwd",
                "embedding_bwd",
                "bias_residual_fwd",
                "bias_residual_bwd_partial",
                "bias_add_fwd",
                "bias_grad_partial",
                "bias_grad",
                "accumulate",
            ] {
                entries.push(format!("{kernel}_{dtype}"));
            }
        }
        for entry in entries {
            assert!(
                ptx.contains(&format!(".entry {entry}(")),
                "{entry}: {}",
                &ptx[..ptx.len().min(400)]
            );
        }
        assert!(ptx.contains(".target sm_90"));
    }

    fn gpu() -> Device {
        mmpipe::comm::device::cuda_device(0).expect("these tests need a CUDA GPU")
    }

    /// Forward value and the gradients of x, w, b of `Σ layer_norm(x, w, b) ⊙ g`, all
    /// returned on the CPU in f64.
    fn run(
        f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> Vec<Tensor> {
        let (x, w, b) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(w).unwrap(),
            Var::from_tensor(b).unwrap(),
        );
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor());
        let loss = (&y * g.to_dtype(y.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let host = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let mut out = vec![host(&y)];
        for v in [&x, &w, &b] {
            out.push(host(grads.get(v.as_tensor()).expect("a gradient")));
        }
        out
    }

    /// The CUDA layer norm (f32 and bf16 inputs, f32 weights, one row and many, widths
    /// that are and are not multiples of the block) against the plain ops in f64 on the
    /// same values: output and every gradient. The input's gradient comes back in the
    /// input's dtype.
    #[test]
    fn the_cuda_layer_norm_equals_the_plain_ops() {
        let dev = gpu();
        for dims in [
            vec![1, 768],
            vec![3, 7, 33],
            vec![50, 197, 768],
            vec![4, 1000],
        ] {
            let width = *dims.last().unwrap();
            for dtype in [DType::F32, DType::BF16] {
                let label = format!("{dims:?} {dtype:?}");
                // Rows off centre and spread: the two-pass variance is needed.
                let x = Tensor::randn(0.5f32, 3.0, dims.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let w = Tensor::randn(1f32, 0.2, width, &Device::Cpu).unwrap();
                let b = Tensor::randn(0f32, 0.2, width, &Device::Cpu).unwrap();
                let g = Tensor::randn(0f32, 1.0, dims.as_slice(), &Device::Cpu).unwrap();
                let on_gpu = |t: &Tensor| t.to_device(&dev).unwrap();
                assert!(fused::cuda::layer_norm_applies(
                    &on_gpu(&x),
                    &on_gpu(&w),
                    &on_gpu(&b)
                ));
                let kernel = run(
                    &|x, w, b| fused::layer_norm(x, w, b, 1e-5).unwrap(),
                    &on_gpu(&x),
                    &on_gpu(&w),
                    &on_gpu(&b),
                    &on_gpu(&g),
                );
                let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let reference = run(
                    &|x, w, b| plain::layer_norm(x, w, b),
                    &wide(&x),
                    &wide(&w),
                    &wide(&b),
                    &wide(&g),
                );
                // f32 sums over a row (and dw, db over every row); the bf16 input's gradient
                // is rounded to bf16 (2^-9 of its scale).
                let dx_rel = if dtype == DType::BF16 { 8e-3 } else { 1e-5 };
                for (i, (what, rel)) in [("y", 1e-5), ("dx", dx_rel), ("dw", 1e-4), ("db", 1e-4)]
                    .into_iter()
                    .enumerate()
                {
                    if let Some((at, a, b)) =
                        worst_violation(&kernel[i], &reference[i], rel, 1e-6, Relative::Tensor)
                    {
                        panic!("{label}: {what}[{at}] is {a}, the plain ops' {b}");
                    }
                }
                // The same inputs, the same bits: no atomics in any sum.
                let again = run(
                    &|x, w, b| fused::layer_norm(x, w, b, 1e-5).unwrap(),
                    &on_gpu(&x),
                    &on_gpu(&w),
                    &on_gpu(&b),
                    &on_gpu(&g),
                );
                for (a, b) in kernel.iter().zip(&again) {
                    assert!(
                        worst_violation(a, b, 0.0, 0.0, Relative::Element).is_none(),
                        "{label}: a second run differs"
                    );
                }
                // Written in bf16 for a bf16 product after it: the f32 output cast, and the
                // same gradients, bit for bit.
                let to_bf16 = run(
                    &|x, w, b| fused::layer_norm_to(x, w, b, 1e-5, DType::BF16).unwrap(),
                    &on_gpu(&x),
                    &on_gpu(&w),
                    &on_gpu(&b),
                    &on_gpu(&g),
                );
                let cast = run(
                    &|x, w, b| {
                        fused::layer_norm(x, w, b, 1e-5)
                            .unwrap()
                            .to_dtype(DType::BF16)
                            .unwrap()
                    },
                    &on_gpu(&x),
                    &on_gpu(&w),
                    &on_gpu(&b),
                    &on_gpu(&g),
                );
                for (i, (a, b)) in to_bf16.iter().zip(&cast).enumerate() {
                    assert!(
                        worst_violation(a, b, 0.0, 0.0, Relative::Element).is_none(),
                        "{label}: the bf16-writing norm's output {i} differs from the cast's"
                    );
                }
            }
        }
    }

    /// The CUDA GELU, alone and with a bias (f32 and bf16 values, widths that are and are
    /// not multiples of the block), against the plain ops in f64 on the same values: value
    /// and the gradients of the values and of the bias, in their dtypes; the same bits on
    /// a second run.
    #[test]
    fn the_cuda_gelu_equals_the_plain_ops() {
        let dev = gpu();
        for dims in [vec![1, 3072], vec![3, 7, 33], vec![64, 3072]] {
            let width = *dims.last().unwrap();
            for dtype in [DType::F32, DType::BF16] {
                for with_bias in [false, true] {
                    let label = format!("{dims:?} {dtype:?} bias {with_bias}");
                    let y = Tensor::randn(0f32, 2.5, dims.as_slice(), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let bias = Tensor::randn(0f32, 0.5, width, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let g = Tensor::randn(0f32, 1.0, dims.as_slice(), &Device::Cpu).unwrap();
                    let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor,
                               y: &Tensor,
                               bias: &Tensor,
                               g: &Tensor| {
                        let (y, bias) = (
                            Var::from_tensor(y).unwrap(),
                            Var::from_tensor(bias).unwrap(),
                        );
                        let out = f(y.as_tensor(), bias.as_tensor());
                        let loss = (&out * g.to_dtype(out.dtype()).unwrap())
                            .unwrap()
                            .sum_all()
                            .unwrap();
                        let grads = loss.backward().unwrap();
                        let host = |t: &Tensor| {
                            t.to_device(&Device::Cpu)
                                .unwrap()
                                .to_dtype(DType::F64)
                                .unwrap()
                        };
                        let mut all = vec![host(&out), host(grads.get(y.as_tensor()).unwrap())];
                        if with_bias {
                            all.push(host(grads.get(bias.as_tensor()).unwrap()));
                        }
                        all
                    };
                    let fused_op = |y: &Tensor, b: &Tensor| {
                        if with_bias {
                            fused::gelu_erf_bias(y, b).unwrap()
                        } else {
                            fused::gelu_erf(y).unwrap()
                        }
                    };
                    let on_gpu = |t: &Tensor| t.to_device(&dev).unwrap();
                    assert!(fused::cuda::gelu_applies(&on_gpu(&y), Some(&on_gpu(&bias))));
                    let kernel = run(&fused_op, &on_gpu(&y), &on_gpu(&bias), &on_gpu(&g));
                    let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                    let reference = run(
                        &|y, b| {
                            let z = if with_bias {
                                y.broadcast_add(b).unwrap()
                            } else {
                                y.clone()
                            };
                            plain::gelu(&z)
                        },
                        &wide(&y),
                        &wide(&bias),
                        &wide(&g),
                    );
                    // In bf16 the value and the gradients are rounded to bf16; the bias
                    // gradient sums f32 terms over the rows before its rounding.
                    let rel = if dtype == DType::BF16 { 8e-3 } else { 1e-5 };
                    for (i, what) in ["value", "d values", "d bias"]
                        .iter()
                        .enumerate()
                        .take(kernel.len())
                    {
                        if let Some((at, a, b)) =
                            worst_violation(&kernel[i], &reference[i], rel, 1e-6, Relative::Tensor)
                        {
                            panic!("{label}: {what}[{at}] is {a}, the plain ops' {b}");
                        }
                    }
                    let again = run(&fused_op, &on_gpu(&y), &on_gpu(&bias), &on_gpu(&g));
                    for (a, b) in kernel.iter().zip(&again) {
                        assert!(
                            worst_violation(a, b, 0.0, 0.0, Relative::Element).is_none(),
                            "{label}: a second run differs"
                        );
                    }
                }
            }
        }
    }

    /// A one-input op under test.
    type Op = dyn Fn(&Tensor) -> Tensor;

    /// The value and the input's gradient of `Σ f(x) ⊙ g`, on the CPU in f64.
    fn value_and_grad(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, g: &Tensor) -> Vec<Tensor> {
        let x = Var::from_tensor(x).unwrap();
        let y = f(x.as_tensor());
        let loss = (&y * g.to_dtype(y.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let host = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        vec![
            host(&y),
            host(grads.get(x.as_tensor()).expect("a gradient")),
        ]
    }

    /// The CUDA softmax (attention's score rows: 50, 197 and 77 wide, and one over the
    /// block) and quick GELU, f32 and bf16, against the plain ops in f64 on the same
    /// values: value and gradient, in the values' dtype; the same bits on a second run.
    #[test]
    fn the_cuda_softmax_and_quick_gelu_equal_the_plain_ops() {
        let dev = gpu();
        let on_gpu = |t: &Tensor| t.to_device(&dev).unwrap();
        let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let quick =
            |x: &Tensor| (x * candle_nn::ops::sigmoid(&(x * 1.702).unwrap()).unwrap()).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let rel = if dtype == DType::BF16 { 8e-3 } else { 1e-5 };
            for (what, dims) in [
                ("softmax", vec![12 * 50, 50]),
                ("softmax", vec![4, 12, 197, 197]),
                ("softmax", vec![3, 77, 77]),
                ("softmax", vec![2, 1000]),
                ("quick GELU", vec![3, 7, 33]),
                ("quick GELU", vec![64, 3072]),
            ] {
                let label = format!("{what} {dims:?} {dtype:?}");
                let x = Tensor::randn(0f32, 3.0, dims.as_slice(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let g = Tensor::randn(0f32, 1.0, dims.as_slice(), &Device::Cpu).unwrap();
                let (fused_op, reference_op): (&Op, &Op) = if what == "softmax" {
                    assert!(fused::cuda::softmax_applies(&on_gpu(&x)));
                    (&|x| fused::softmax_last_dim(x).unwrap(), &|x| {
                        plain::softmax(x)
                    })
                } else {
                    (&|x| fused::quick_gelu(x).unwrap(), &quick)
                };
                let kernel = value_and_grad(fused_op, &on_gpu(&x), &on_gpu(&g));
                let reference = value_and_grad(reference_op, &wide(&x), &wide(&g));
                for (i, part) in ["value", "gradient"].iter().enumerate() {
                    if let Some((at, a, b)) =
                        worst_violation(&kernel[i], &reference[i], rel, 1e-6, Relative::Tensor)
                    {
                        panic!("{label}: {part}[{at}] is {a}, the plain ops' {b}");
                    }
                }
                let again = value_and_grad(fused_op, &on_gpu(&x), &on_gpu(&g));
                for (a, b) in kernel.iter().zip(&again) {
                    assert!(
                        worst_violation(a, b, 0.0, 0.0, Relative::Element).is_none(),
                        "{label}: a second run differs"
                    );
                }
            }
        }
    }

    /// The CUDA embedding against the CPU's: CLIP's 49,408-row token table at width 512,
    /// a batch of 77-token captions with repeated ids; the lookup and the table's gradient
    /// equal bit for bit in f32 (both scatter in token order), and within bf16's rounding
    /// for a bf16 table (against the f32 embedding of the same values).
    #[test]
    fn the_cuda_embedding_equals_the_cpu_embedding() {
        let dev = gpu();
        let (rows, width, n) = (49_408usize, 512usize, 64 * 77);
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| (i * 2_654_435_761u32) % 2000)
            .collect();
        let ids = Tensor::from_vec(ids, n, &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let table = Tensor::randn(0f32, 1.0, (rows, width), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = Tensor::randn(0f32, 1.0, (n, width), &Device::Cpu).unwrap();
            let on_gpu = |t: &Tensor| t.to_device(&dev).unwrap();
            assert!(fused::cuda::embedding_applies(
                &on_gpu(&table),
                &on_gpu(&ids)
            ));
            let (gpu_ids, cpu_ids) = (on_gpu(&ids), ids.clone());
            let kernel = value_and_grad(
                &|t| fused::embedding(t, &gpu_ids).unwrap(),
                &on_gpu(&table),
                &on_gpu(&g),
            );
            // The reference in f32 (a bf16 table's rows and sums, widened).
            let cpu = value_and_grad(
                &|t| fused::embedding(t, &cpu_ids).unwrap(),
                &table.to_dtype(DType::F32).unwrap(),
                &g,
            );
            let rel = if dtype == DType::BF16 { 8e-3 } else { 0.0 };
            for (i, part) in ["rows", "table gradient"].iter().enumerate() {
                if let Some((at, a, b)) =
                    worst_violation(&kernel[i], &cpu[i], rel, 0.0, Relative::Tensor)
                {
                    panic!("embedding {dtype:?}: {part}[{at}] is {a}, the CPU's {b}");
                }
            }
        }
    }

    /// Attention on the GPU both ways it runs there, f32 and bf16 packed projections, no
    /// mask, a causal mask and a padding mask, against the plain ops in f64 on the CPU (the
    /// output and the projections' gradient): `fused::attention` (the GEMMs on the heads in
    /// place, `head_gemms`) and `attention_plain` (per-head copies; the scale, mask and
    /// softmax in the CUDA kernel).
    #[test]
    fn the_cuda_attention_equals_the_plain_ops() {
        let dev = gpu();
        let (n, heads, len, width) = (3, 4, 77, 64);
        let causal: Vec<f32> = (0..len * len)
            .map(|i| {
                if i % len > i / len {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, len, len), &Device::Cpu).unwrap();
        let padding: Vec<f32> = (0..n * len)
            .map(|i| {
                if i % len >= len - 5 * (i / len) {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let padding = Tensor::from_vec(padding, (n, 1, len), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let rel = if dtype == DType::BF16 { 3e-2 } else { 1e-5 };
            for (what, mask) in [
                ("none", None),
                ("causal", Some(&causal)),
                ("padding", Some(&padding)),
            ] {
                let label = format!("attention {dtype:?} mask {what}");
                let qkv = Tensor::randn(0f32, 1.0, (n, len, 3 * width), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let g = Tensor::randn(0f32, 1.0, (n, len, width), &Device::Cpu).unwrap();
                let on_gpu = |t: &Tensor| t.to_device(&dev).unwrap();
                let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                // `attention_plain` takes the mask as `[n or 1, len or 1, len]`,
                // `attention` as `[len, len]` or `[n, 1, len or 1, len]`.
                let gpu_mask = mask.map(on_gpu);
                let user_mask = gpu_mask.as_ref().map(|m| match m.dims3().unwrap() {
                    (1, q, k) => m.reshape((q, k)).unwrap(),
                    (b, q, k) => m.reshape((b, 1, q, k)).unwrap(),
                });
                let cpu_mask = mask.map(wide);
                let reference = value_and_grad(
                    &|x| fused::attention_plain(x, heads, cpu_mask.as_ref()).unwrap(),
                    &wide(&qkv),
                    &wide(&g),
                );
                let in_place = value_and_grad(
                    &|x| fused::attention(x, heads, user_mask.as_ref()).unwrap(),
                    &on_gpu(&qkv),
                    &on_gpu(&g),
                );
                let copies = value_and_grad(
                    &|x| fused::attention_plain(x, heads, gpu_mask.as_ref()).unwrap(),
                    &on_gpu(&qkv),
                    &on_gpu(&g),
                );
                for (way, got) in [("heads in place", in_place), ("head copies", copies)] {
                    for (i, part) in ["output", "d qkv"].iter().enumerate() {
                        if let Some((at, a, b)) =
                            worst_violation(&got[i], &reference[i], rel, 1e-5, Relative::Tensor)
                        {
                            panic!("{label}, {way}: {part}[{at}] is {a}, the plain ops' {b}");
                        }
                    }
                }
            }
        }
    }

    /// Flash attention (`fused::attention`'s path for bf16 heads of 64 on a GPU) against
    /// the plain ops in f64 on the CPU, with no mask, a causal mask and a padding mask, over
    /// 77 positions (two tiles) and 197 (ViT-B/16's, four): the output and the projections'
    /// gradient, to bf16's tolerance; the same bits on a second run (no atomics); and the
    /// kept-probabilities path (`fused::cuda::attention`) within the same tolerance of it.
    #[test]
    fn the_cuda_flash_attention_equals_the_plain_ops() {
        let dev = gpu();
        let (n, heads) = (3, 2);
        let width = heads * fused::plan::FLASH_HEAD;
        for len in [77, 197] {
            let causal: Vec<f32> = (0..len * len)
                .map(|i| {
                    if i % len > i / len {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let causal = Tensor::from_vec(causal, (1, len, len), &Device::Cpu).unwrap();
            let padding: Vec<f32> = (0..n * len)
                .map(|i| {
                    if i % len >= len - 5 * (i / len) {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let padding = Tensor::from_vec(padding, (n, 1, len), &Device::Cpu).unwrap();
            for (what, mask) in [
                ("none", None),
                ("causal", Some(&causal)),
                ("padding", Some(&padding)),
            ] {
                let label = format!("flash attention over {len}, mask {what}");
                let qkv = Tensor::randn(0f32, 1.0, (n, len, 3 * width), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let g = Tensor::randn(0f32, 1.0, (n, len, width), &Device::Cpu).unwrap();
                let on_gpu = |t: &Tensor| t.to_device(&dev).unwrap();
                let wide = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                let gpu_mask = mask.map(on_gpu);
                let user_mask = gpu_mask.as_ref().map(|m| match m.dims3().unwrap() {
                    (1, q, k) => m.reshape((q, k)).unwrap(),
                    (b, q, k) => m.reshape((b, 1, q, k)).unwrap(),
                });
                assert!(fused::cuda::flash_attention_applies(
                    &on_gpu(&qkv),
                    heads,
                    gpu_mask.as_ref()
                ));
                let cpu_mask = mask.map(wide);
                let reference = value_and_grad(
                    &|x| fused::attention_plain(x, heads, cpu_mask.as_ref()).unwrap(),
                    &wide(&qkv),
                    &wide(&g),
                );
                let flash = || {
                    value_and_grad(
                        &|x| fused::attention(x, heads, user_mask.as_ref()).unwrap(),
                        &on_gpu(&qkv),
                        &on_gpu(&g),
                    )
                };
                let (first, second) = (flash(), flash());
                let kept = value_and_grad(
                    &|x| fused::cuda::attention(x, heads, gpu_mask.as_ref()).unwrap(),
                    &on_gpu(&qkv),
                    &on_gpu(&g),
                );
                for (i, part) in ["output", "d qkv"].iter().enumerate() {
                    for (way, got) in [("flash", &first), ("kept probabilities", &kept)] {
                        if let Some((at, a, b)) =
                            worst_violation(&got[i], &reference[i], 3e-2, 1e-5, Relative::Tensor)
                        {
                            panic!("{label}, {way}: {part}[{at}] is {a}, the plain ops' {b}");
                        }
                    }
                    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    assert_eq!(
                        bits(&first[i]),
                        bits(&second[i]),
                        "{label}: {part} differs between two runs"
                    );
                }
            }
        }
        // Projections that start one element into their buffer (a contiguous view off the
        // kernels' 16-byte boundary): copied to a fresh one first, the same values.
        let len = 77;
        let qkv = Tensor::randn(0f32, 1.0, (n, len, 3 * width), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let g = Tensor::randn(0f32, 1.0, (n, len, width), &Device::Cpu).unwrap();
        let one_element_in = |x: &Tensor| {
            let front = Tensor::zeros(1, x.dtype(), x.device()).unwrap();
            let flat = Tensor::cat(&[&front, &x.flatten_all().unwrap()], 0).unwrap();
            let view = flat
                .narrow(0, 1, x.elem_count())
                .unwrap()
                .reshape(x.shape())
                .unwrap();
            assert!(view.is_contiguous() && view.layout().start_offset() == 1);
            view
        };
        let reference = value_and_grad(
            &|x| fused::attention_plain(x, heads, None).unwrap(),
            &qkv.to_dtype(DType::F64).unwrap(),
            &g.to_dtype(DType::F64).unwrap(),
        );
        let shifted = value_and_grad(
            &|x| fused::attention(&one_element_in(x), heads, None).unwrap(),
            &qkv.to_device(&dev).unwrap(),
            &g.to_device(&dev).unwrap(),
        );
        for (i, part) in ["output", "d qkv"].iter().enumerate() {
            if let Some((at, a, b)) =
                worst_violation(&shifted[i], &reference[i], 3e-2, 1e-5, Relative::Tensor)
            {
                panic!("flash attention on a view one element in: {part}[{at}] is {a}, the plain ops' {b}");
            }
        }
    }

    /// `f(inputs)`'s value and every input's gradient under the weights `g`, with the
    /// inputs on `device` (widened to f64 where `wide`), all returned on the CPU in f64.
    fn grads_on(
        device: &Device,
        wide: bool,
        inputs: &[&Tensor],
        g: &Tensor,
        f: &dyn Fn(&[Tensor]) -> Tensor,
    ) -> Vec<Tensor> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| {
                let t = t.to_device(device).unwrap();
                Var::from_tensor(&if wide {
                    t.to_dtype(DType::F64).unwrap()
                } else {
                    t
                })
                .unwrap()
            })
            .collect();
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&xs);
        let weights = g.to_device(device).unwrap().to_dtype(out.dtype()).unwrap();
        let store = (&out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let host = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let mut all = vec![host(&out)];
        for v in &vars {
            all.push(host(store.get(v.as_tensor()).expect("a gradient")));
        }
        all
    }

    /// An op on a list of inputs.
    type ListOp<'a> = dyn Fn(&[Tensor]) -> Tensor + 'a;

    fn random(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// A linear layer's bias add on the GPU, alone (`bias_add`) and with the residual add
    /// after it (`bias_residual`: f32 stream), f32 and bf16 values (ViT's widths, and one
    /// that is no multiple of a block), against the plain ops in f64 on the CPU: the output
    /// and every input's gradient. And the linear layer with its bias as one op, alone and
    /// onto the stream.
    #[test]
    fn the_cuda_bias_ops_equal_the_plain_ops() {
        let dev = gpu();
        for (dtype, rows, width) in [
            (DType::F32, 197 * 3, 768),
            (DType::BF16, 197 * 3, 2304),
            (DType::BF16, 1000, 37),
        ] {
            let rel = if dtype == DType::BF16 { 1e-2 } else { 1e-6 };
            let (stream, y) = (
                random(&[rows, width], DType::F32),
                random(&[rows, width], dtype),
            );
            let (bias, g) = (random(&[width], dtype), random(&[rows, width], DType::F32));
            let residual = |x: &[Tensor]| fused::bias_residual(&x[0], &x[1], &x[2]).unwrap();
            let add = |x: &[Tensor]| fused::bias_add(&x[0], &x[1]).unwrap();
            let cases: [(&str, &[&Tensor], &ListOp, &[&str]); 2] = [
                (
                    "bias and residual",
                    &[&stream, &y, &bias],
                    &residual,
                    &["output", "d stream", "d values", "d bias"],
                ),
                (
                    "bias",
                    &[&y, &bias],
                    &add,
                    &["output", "d values", "d bias"],
                ),
            ];
            for (what, inputs, f, parts) in cases {
                let label = format!("{what} {dtype:?} {rows}x{width}");
                let kernel = grads_on(&dev, false, inputs, &g, f);
                let reference = grads_on(&Device::Cpu, true, inputs, &g, f);
                for (i, part) in parts.iter().enumerate() {
                    if let Some((at, a, b)) =
                        worst_violation(&kernel[i], &reference[i], rel, 1e-6, Relative::Tensor)
                    {
                        panic!("{label}: {part}[{at}] is {a}, the plain ops' {b}");
                    }
                }
            }
            // The linear layer with its bias as one op (`fused::linear`'s GPU path): the
            // product and the bias add's values bit for bit, and every gradient against
            // the plain ops in f64.
            let label = format!("linear with bias {dtype:?} {rows}x{width}");
            let (x, w) = (random(&[rows, 96], dtype), random(&[width, 96], dtype));
            assert!(fused::cuda::linear_bias_applies(
                &x.to_device(&dev).unwrap(),
                &w.to_device(&dev).unwrap(),
                &bias.to_device(&dev).unwrap()
            ));
            let linear = |t: &[Tensor]| fused::linear(&t[0], &t[1], Some(&t[2])).unwrap();
            let two_ops = |t: &[Tensor]| {
                fused::bias_add(&t[0].matmul(&t[1].t().unwrap()).unwrap(), &t[2]).unwrap()
            };
            let plain = |t: &[Tensor]| {
                t[0].matmul(&t[1].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            };
            let inputs: &[&Tensor] = &[&x, &w, &bias];
            let kernel = grads_on(&dev, false, inputs, &g, &linear);
            let separate = grads_on(&dev, false, inputs, &g, &two_ops);
            assert!(
                worst_violation(&kernel[0], &separate[0], 0.0, 0.0, Relative::Element).is_none(),
                "{label}: the output differs from the product and the bias add's"
            );
            let reference = grads_on(&Device::Cpu, true, inputs, &g, &plain);
            for (i, part) in ["output", "d x", "d w", "d bias"].iter().enumerate() {
                if let Some((at, a, b)) =
                    worst_violation(&kernel[i], &reference[i], rel, 1e-6, Relative::Tensor)
                {
                    panic!("{label}: {part}[{at}] is {a}, the plain ops' {b}");
                }
            }
            // And onto the f32 residual stream as one op (`fused::linear_onto`): the product
            // then `bias_residual`'s values bit for bit, every gradient against the plain
            // ops (the branch rounded to its dtype before the add, as bias_residual does).
            let label = format!("linear onto the stream {dtype:?} {rows}x{width}");
            let onto = |t: &[Tensor]| fused::linear_onto(&t[0], &t[1], &t[2], &t[3]).unwrap();
            let two_ops = |t: &[Tensor]| {
                fused::bias_residual(&t[0], &t[1].matmul(&t[2].t().unwrap()).unwrap(), &t[3])
                    .unwrap()
            };
            let plain = |t: &[Tensor]| {
                let branch = t[1]
                    .matmul(&t[2].t().unwrap())
                    .unwrap()
                    .broadcast_add(&t[3])
                    .unwrap();
                (&t[0] + branch.to_dtype(t[0].dtype()).unwrap()).unwrap()
            };
            let inputs: &[&Tensor] = &[&stream, &x, &w, &bias];
            assert!(fused::cuda::linear_onto_applies(
                &stream.to_device(&dev).unwrap(),
                &x.to_device(&dev).unwrap(),
                &w.to_device(&dev).unwrap(),
                &bias.to_device(&dev).unwrap()
            ));
            let kernel = grads_on(&dev, false, inputs, &g, &onto);
            let separate = grads_on(&dev, false, inputs, &g, &two_ops);
            for (i, part) in ["output", "d stream"].iter().enumerate() {
                assert!(
                    worst_violation(&kernel[i], &separate[i], 0.0, 0.0, Relative::Element)
                        .is_none(),
                    "{label}: {part} differs from the product and bias_residual's"
                );
            }
            let reference = grads_on(&Device::Cpu, true, inputs, &g, &plain);
            for (i, part) in ["output", "d stream", "d x", "d w", "d bias"]
                .iter()
                .enumerate()
            {
                if let Some((at, a, b)) =
                    worst_violation(&kernel[i], &reference[i], rel, 1e-6, Relative::Tensor)
                {
                    panic!("{label}: {part}[{at}] is {a}, the plain ops' {b}");
                }
            }
        }
    }

    /// Gradients summed in place on the GPU (the accumulate kernel), f32 and bf16 into f32:
    /// the same bits as the CPU's in-place sums of the same values.
    #[test]
    fn the_cuda_gradient_sums_equal_the_cpu_sums() {
        let dev = gpu();
        for g_dtype in [DType::F32, DType::BF16] {
            let grads: Vec<Tensor> = (0..3)
                .map(|seed| {
                    Tensor::randn(0f32, 1.0, (1000, 37), &Device::Cpu)
                        .unwrap()
                        .to_dtype(g_dtype)
                        .unwrap()
                        .affine(1.0, seed as f64)
                        .unwrap()
                })
                .collect();
            let sum_on = |device: &Device| {
                let on = |t: &Tensor| t.to_device(device).unwrap();
                let mut sum = fused::GradSum::new(&on(&grads[0]), DType::F32).unwrap();
                for g in &grads[1..] {
                    sum.add(&on(g)).unwrap();
                }
                values(&sum.into_tensor().to_device(&Device::Cpu).unwrap())
            };
            assert_eq!(sum_on(&dev), sum_on(&Device::Cpu), "{g_dtype:?} into f32");
        }
    }

    /// Workbench: decoded bytes normalised on the GPU at ViT-B/16's batch (256 × 224² × 3
    /// bytes), the one kernel against the plain ops it replaced (a permuted view cast to
    /// f32, a scale, a shift): the same bits, and both timed, printed.
    #[test]
    fn the_cuda_pixel_normalise_kernel_equals_the_plain_ops_and_times_both() {
        use mmpipe::model::PixelNorm;
        let dev = gpu();
        let norm = PixelNorm {
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        };
        let (scale, shift) = norm.scale_shift();
        let bytes = Tensor::rand(0f32, 255.0, (256, 224, 224, 3), &dev)
            .unwrap()
            .to_dtype(DType::U8)
            .unwrap();
        let plain = |bytes: &Tensor| {
            let s = Tensor::from_slice(&scale, (1, 3, 1, 1), &dev).unwrap();
            let t = Tensor::from_slice(&shift, (1, 3, 1, 1), &dev).unwrap();
            bytes
                .permute((0, 3, 1, 2))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_mul(&s)
                .unwrap()
                .broadcast_sub(&t)
                .unwrap()
        };
        let kernel = |bytes: &Tensor| fused::cuda::pixel_normalise(bytes, scale, shift).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let small = bytes.narrow(0, 0, 4).unwrap();
        assert_eq!(kernel(&small).dims(), &[4, 3, 224, 224]);
        assert_eq!(bits(&kernel(&small)), bits(&plain(&small)));
        let kernel_ms = mean_ms(&|| {
            kernel(&bytes);
            dev.synchronize().unwrap();
        });
        let plain_ms = mean_ms(&|| {
            plain(&bytes);
            dev.synchronize().unwrap();
        });
        println!(
            "workbench pixel_normalise 256x224x224x3 u8 -> f32: kernel {kernel_ms:.3} ms, plain ops {plain_ms:.3} ms"
        );
    }

    /// Milliseconds a run of `step` takes, the mean of 10 after one to warm up (`step`
    /// synchronises the device itself).
    fn mean_ms(step: &dyn Fn()) -> f64 {
        step();
        let started = std::time::Instant::now();
        for _ in 0..10 {
            step();
        }
        started.elapsed().as_secs_f64() * 1e3 / 10.0
    }

    /// Workbench timing: the kernels against candle's composition of plain ops at a
    /// ViT-B/16 layer's size (256 × 197 rows of 768; the MLP 4 × wider), forward +
    /// backward, printed.
    #[test]
    fn the_cuda_kernels_workbench_times_both() {
        let dev = gpu();
        let (rows, width) = (256 * 197, 768);
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 1.0, (rows, width), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::ones(width, DType::F32, &dev).unwrap();
            let b = Tensor::zeros(width, DType::F32, &dev).unwrap();
            let g = Tensor::randn(0f32, 1.0, (rows, width), &dev).unwrap();
            let time = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
                let step = || {
                    let xv = Var::from_tensor(&x).unwrap();
                    let y = f(xv.as_tensor(), &w, &b);
                    let loss = (&y * &g.to_dtype(y.dtype()).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    loss.backward().unwrap();
                    dev.synchronize().unwrap();
                };
                mean_ms(&step)
            };
            let kernel = time(&|x, w, b| fused::layer_norm(x, w, b, 1e-5).unwrap());
            let plain_ms = time(&|x, w, b| {
                let x = x.to_dtype(DType::F32).unwrap();
                candle_nn::ops::layer_norm_slow(&x, w, b, 1e-5).unwrap()
            });
            println!(
                "layer norm {rows}x{width} {dtype:?}, forward + backward (with the loss's \
                 multiply and sum): kernels {kernel:.3} ms, plain ops {plain_ms:.3} ms"
            );
            // The MLP's activation at the same rows: 4 × 768 wide, with its bias.
            let y = Tensor::randn(0f32, 1.0, (rows, 4 * width), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bias = Tensor::zeros(4 * width, dtype, &dev).unwrap();
            let g = Tensor::randn(0f32, 1.0, (rows, 4 * width), &dev).unwrap();
            let time_gelu = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                let step = || {
                    let yv = Var::from_tensor(&y).unwrap();
                    let bv = Var::from_tensor(&bias).unwrap();
                    let out = f(yv.as_tensor(), bv.as_tensor());
                    let loss = (&out * &g.to_dtype(out.dtype()).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    loss.backward().unwrap();
                    dev.synchronize().unwrap();
                };
                mean_ms(&step)
            };
            let kernel = time_gelu(&|y, b| fused::gelu_erf_bias(y, b).unwrap());
            let plain_ms = time_gelu(&|y, b| {
                let z = y
                    .to_dtype(DType::F32)
                    .unwrap()
                    .broadcast_add(&b.to_dtype(DType::F32).unwrap())
                    .unwrap();
                plain::gelu(&z).to_dtype(y.dtype()).unwrap()
            });
            println!(
                "GELU with bias {rows}x{} {dtype:?}, forward + backward: kernels {kernel:.3} ms, \
                 plain ops {plain_ms:.3} ms",
                4 * width
            );
        }
        // Attention's scores at the same size (256 samples × 12 heads × 197 queries of 197
        // keys, f32 as they are kept): scale and softmax, the kernel against the plain ops.
        let (n, heads, len) = (256usize, 12usize, 197usize);
        let scores = Tensor::randn(0f32, 1.0, (n * heads, len, len), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (n * heads, len, len), &dev).unwrap();
        let scale = 1.0 / 8.0;
        let time_softmax = |f: &dyn Fn(&Tensor) -> Tensor| {
            let step = || {
                let sv = Var::from_tensor(&scores).unwrap();
                let p = f(sv.as_tensor());
                (&p * &g).unwrap().sum_all().unwrap().backward().unwrap();
                dev.synchronize().unwrap();
            };
            mean_ms(&step)
        };
        let kernel =
            time_softmax(&|s| fused::cuda::attention_softmax(s, None, heads, scale).unwrap());
        let plain_ms = time_softmax(&|s| plain::softmax(&(s * scale).unwrap()));
        println!(
            "attention softmax {}x{len}x{len} f32 (scale included), forward + backward: \
             kernels {kernel:.3} ms, plain ops {plain_ms:.3} ms",
            n * heads
        );
        // The bias and residual add after the MLP's second layer, at the same rows.
        for dtype in [DType::F32, DType::BF16] {
            let rows = n * len;
            let stream = Tensor::randn(0f32, 1.0, (rows, 768), &dev).unwrap();
            let y = Tensor::randn(0f32, 1.0, (rows, 768), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let bias = Tensor::zeros(768, dtype, &dev).unwrap();
            let g = Tensor::randn(0f32, 1.0, (rows, 768), &dev).unwrap();
            let time_residual = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
                let step = || {
                    let (sv, yv, bv) = (
                        Var::from_tensor(&stream).unwrap(),
                        Var::from_tensor(&y).unwrap(),
                        Var::from_tensor(&bias).unwrap(),
                    );
                    let out = f(sv.as_tensor(), yv.as_tensor(), bv.as_tensor());
                    (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    dev.synchronize().unwrap();
                };
                mean_ms(&step)
            };
            let kernel = time_residual(&|s, y, b| fused::bias_residual(s, y, b).unwrap());
            let plain_ms = time_residual(&|s, y, b| {
                (s + y.broadcast_add(b).unwrap().to_dtype(DType::F32).unwrap()).unwrap()
            });
            println!(
                "bias and residual add {rows}x768 {dtype:?}, forward + backward: kernels \
                 {kernel:.3} ms, plain ops {plain_ms:.3} ms"
            );
        }
        // Whole attention at the same size (packed projections [256, 197, 3 × 768]):
        // the GEMMs on the heads in place against per-head copies.
        let width = 768;
        for dtype in [DType::F32, DType::BF16] {
            let qkv = Tensor::randn(0f32, 1.0, (n, len, 3 * width), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = Tensor::randn(0f32, 1.0, (n, len, width), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let time_attention = |f: &dyn Fn(&Tensor) -> Tensor| {
                let step = || {
                    let xv = Var::from_tensor(&qkv).unwrap();
                    let y = f(xv.as_tensor());
                    (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                    dev.synchronize().unwrap();
                };
                mean_ms(&step)
            };
            let in_place = time_attention(&|x| fused::cuda::attention(x, heads, None).unwrap());
            let copies = time_attention(&|x| fused::attention_plain(x, heads, None).unwrap());
            // bf16 heads of 64 take flash attention (`fused::attention`'s path there).
            let flash = if fused::cuda::flash_attention_applies(&qkv, heads, None) {
                let ms = time_attention(&|x| fused::attention(x, heads, None).unwrap());
                format!(", flash {ms:.3} ms")
            } else {
                String::new()
            };
            println!(
                "attention {n}x{len}, {heads} heads of {}, {dtype:?}, forward + backward: \
                 heads in place (probabilities kept) {in_place:.3} ms, per-head copies \
                 {copies:.3} ms{flash}",
                width / heads
            );
        }
    }
}
