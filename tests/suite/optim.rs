//! AdamW against the textbook update written out here, element by element: decoupled
//! weight decay on matrices only, bias corrections, the state carried across steps. On
//! the CPU the optimizer updates in place (one fused pass per moment and one for the
//! weights); these tests hold it to the formula.

use candle_core::{DType, Device, Tensor};
use mmpipe::model::params::{Init, ParamBuilder};
use mmpipe::train::optim::{AdamW, AdamWConfig};

use super::common::values;

const CFG: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.98,
    eps: 1e-6,
    weight_decay: 0.1,
};

/// The textbook AdamW in f64 on plain vectors: (weights, m, v) after `grads`.
fn textbook(w0: &[f64], grads: &[Vec<f64>], lrs: &[f64], decay: bool) -> Vec<f64> {
    let (mut w, mut m, mut v) = (w0.to_vec(), vec![0.0; w0.len()], vec![0.0; w0.len()]);
    for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
        let step = (t + 1) as i32;
        for i in 0..w.len() {
            m[i] = CFG.beta1 * m[i] + (1.0 - CFG.beta1) * g[i];
            v[i] = CFG.beta2 * v[i] + (1.0 - CFG.beta2) * g[i] * g[i];
            let m_hat = m[i] / (1.0 - CFG.beta1.powi(step));
            let v_hat = v[i] / (1.0 - CFG.beta2.powi(step));
            if decay {
                w[i] *= 1.0 - lr * CFG.weight_decay;
            }
            w[i] -= lr * m_hat / (v_hat.sqrt() + CFG.eps);
        }
    }
    w
}

fn run(dtype: DType) -> Vec<(String, Vec<f64>, Vec<f64>)> {
    let pb = ParamBuilder::new(3, dtype, &Device::Cpu);
    pb.get((3, 4), "proj.weight", Init::Normal(0.5)).unwrap();
    pb.get(4, "proj.bias", Init::Normal(0.5)).unwrap();
    let params = pb.params();
    let start: Vec<Vec<f64>> = params.iter().map(|(_, v)| values(v.as_tensor())).collect();
    let mut opt = AdamW::new(&params, CFG).unwrap();
    let lrs = [1e-2, 5e-3, 2e-2, 1e-2];
    let mut grads_by_param: Vec<Vec<Vec<f64>>> = vec![Vec::new(); 2];
    for (step, lr) in lrs.iter().enumerate() {
        let grads: Vec<Tensor> = params
            .iter()
            .enumerate()
            .map(|(k, (_, v))| {
                let n = v.elem_count();
                let g: Vec<f64> = (0..n)
                    .map(|i| ((i * 7 + step * 13 + k * 5) as f64 * 0.37).sin() * 0.3)
                    .collect();
                grads_by_param[k].push(g.clone());
                Tensor::from_vec(g, v.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
            })
            .collect();
        opt.step(&grads, *lr).unwrap();
    }
    params
        .iter()
        .enumerate()
        .map(|(k, (name, var))| {
            let want = textbook(
                &start[k],
                &grads_by_param[k],
                &lrs,
                name.ends_with("weight"),
            );
            (name.to_string(), values(var.as_tensor()), want)
        })
        .collect()
}

#[test]
fn adamw_equals_the_textbook_update_in_f64() {
    for (name, got, want) in run(DType::F64) {
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-14 * b.abs().max(1.0),
                "{name}[{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn adamw_in_f32_stays_within_rounding_of_the_textbook_update() {
    for (name, got, want) in run(DType::F32) {
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                "{name}[{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn weight_decay_applies_to_matrices_and_not_to_biases() {
    // Zero gradients: only the decay moves anything.
    let pb = ParamBuilder::new(5, DType::F64, &Device::Cpu);
    pb.get((2, 2), "proj.weight", Init::Ones).unwrap();
    pb.get(2, "proj.bias", Init::Ones).unwrap();
    let params = pb.params();
    let mut opt = AdamW::new(&params, CFG).unwrap();
    let zeros: Vec<Tensor> = params
        .iter()
        .map(|(_, v)| v.as_tensor().zeros_like().unwrap())
        .collect();
    opt.step(&zeros, 0.5).unwrap();
    for (name, var) in params.iter() {
        let want = if name.ends_with("weight") {
            1.0 - 0.5 * 0.1
        } else {
            1.0
        };
        assert!(
            values(var.as_tensor())
                .iter()
                .all(|&x| (x - want).abs() < 1e-15),
            "{name}"
        );
    }
}

/// Under mixed precision each step writes the master (the same f32 update as without a
/// working copy) and the working copy as the master's bf16 rounding, bit for bit.
#[test]
fn adamw_with_working_copies_writes_each_masters_bf16_rounding() {
    let mixed = ParamBuilder::mixed(3, DType::BF16, DType::F32, &Device::Cpu);
    let plain = ParamBuilder::new(3, DType::F32, &Device::Cpu);
    for pb in [&mixed, &plain] {
        pb.get((3, 4), "proj.weight", Init::Normal(0.5)).unwrap();
        pb.get(4, "proj.bias", Init::Normal(0.5)).unwrap();
    }
    let (masters, working) = (mixed.masters(), mixed.params());
    let mut opt = AdamW::with_working_copies(&masters, &working, CFG).unwrap();
    let mut reference = AdamW::new(&plain.params(), CFG).unwrap();
    for step in 0..3 {
        let grads: Vec<Tensor> = masters
            .iter()
            .map(|(_, v)| {
                let n = v.elem_count();
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i + 3 * step) as f32 * 0.7).cos())
                    .collect();
                Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap()
            })
            .collect();
        opt.step(&grads, 1e-2).unwrap();
        reference.step(&grads, 1e-2).unwrap();
    }
    for ((name, master), (_, want)) in masters.iter().zip(plain.params().iter()) {
        assert_eq!(
            values(master.as_tensor()),
            values(want.as_tensor()),
            "{name}"
        );
        let copy = working.get(name).unwrap().as_tensor();
        assert_eq!(copy.dtype(), DType::BF16);
        assert_eq!(
            values(copy),
            values(&master.as_tensor().to_dtype(DType::BF16).unwrap()),
            "{name}: the working copy is the master rounded"
        );
    }
}

/// The GPU AdamW's source (with the gradient norm's kernel) compiles with NVRTC for
/// Hopper (no GPU needed: NVRTC is a library), into PTX with both entry points.
#[cfg(feature = "cuda")]
#[test]
fn the_gpu_adamw_kernel_compiles_for_sm_90() {
    let ptx = mmpipe::train::optim::cuda::ptx(9, 0).unwrap();
    for entry in [
        mmpipe::train::optim::plan::KERNEL,
        mmpipe::train::optim::plan::NORM_KERNEL,
    ] {
        assert!(
            ptx.contains(&format!(".entry {entry}")),
            "{entry}: {}",
            &ptx[..ptx.len().min(400)]
        );
    }
    assert!(
        ptx.contains(".target sm_90"),
        "{}",
        &ptx[..ptx.len().min(400)]
    );
    // No fused multiply-adds: the CPU path's rounding, element by element.
    assert!(
        !ptx.contains("fma.rn.f32"),
        "the kernel must compile without FMA"
    );
}

/// The one-launch GPU AdamW against the CPU AdamW on fresh random tensors (sizes around
/// its 4096-element chunks, a scalar, decayed and undecayed, with and without working
/// copies), three steps: masters and moments equal bit for bit (the kernel rounds as the
/// CPU path does), working copies are the masters' bf16 rounding. Needs a CUDA GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use rand::{Rng, SeedableRng};

    const SHAPES: [(&str, &[usize]); 7] = [
        ("a.logit_scale", &[]),
        ("b.bias", &[5]),
        ("c.weight", &[64, 64]),
        ("d.weight", &[4097]),
        ("e.bias", &[4095]),
        ("f.weight", &[300, 700]),
        ("g.ln_1.weight", &[8193]),
    ];

    fn build(pb: &ParamBuilder) {
        for (name, shape) in SHAPES {
            pb.get(shape, name, Init::Normal(0.3)).unwrap();
        }
    }

    #[test]
    fn the_gpu_adamw_equals_the_cpu_adamw_on_random_tensors() {
        let gpu = mmpipe::comm::device::cuda_device(0).expect("this test needs a CUDA GPU");
        for mixed in [false, true] {
            let compute = if mixed { DType::BF16 } else { DType::F32 };
            let on_gpu = ParamBuilder::mixed(11, compute, DType::F32, &gpu);
            let on_cpu = ParamBuilder::mixed(11, compute, DType::F32, &Device::Cpu);
            build(&on_gpu);
            build(&on_cpu);
            let (gm, gw) = (on_gpu.masters(), on_gpu.params());
            let (cm, cw) = (on_cpu.masters(), on_cpu.params());
            let mut fast = AdamW::with_working_copies(&gm, &gw, CFG).unwrap();
            let mut slow = AdamW::with_working_copies(&cm, &cw, CFG).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(if mixed { 1 } else { 2 });
            for (step, lr) in [3e-3, 1e-2, 5e-4].into_iter().enumerate() {
                let grads: Vec<Tensor> = cm
                    .iter()
                    .map(|(_, v)| {
                        let g: Vec<f32> = (0..v.elem_count())
                            .map(|_| rng.random_range(-1.0f32..1.0) * (step + 1) as f32)
                            .collect();
                        Tensor::from_vec(g, v.shape(), &Device::Cpu).unwrap()
                    })
                    .collect();
                let on_device: Vec<Tensor> =
                    grads.iter().map(|g| g.to_device(&gpu).unwrap()).collect();
                slow.step(&grads, lr).unwrap();
                fast.step(&on_device, lr).unwrap();
            }
            let names = cm.names();
            let state = |o: &AdamW| -> std::collections::BTreeMap<String, Vec<f64>> {
                o.state(&names)
                    .unwrap()
                    .into_iter()
                    .map(|(n, t)| (n, values(&t.to_device(&Device::Cpu).unwrap())))
                    .collect()
            };
            let (want, got) = (state(&slow), state(&fast));
            for (key, w) in &want {
                assert_eq!(&got[key], w, "mixed {mixed}: optimizer state {key}");
            }
            for (name, master) in cm.iter() {
                let label = format!("mixed {mixed}: {name}");
                let on_device = values(gm.get(name).unwrap().as_tensor());
                assert_eq!(on_device, values(master.as_tensor()), "{label}: master");
                let copy = values(gw.get(name).unwrap().as_tensor());
                assert_eq!(
                    copy,
                    values(cw.get(name).unwrap().as_tensor()),
                    "{label}: copy"
                );
            }
        }
    }

    /// The gradients' joint norm on the GPU (one launch, `grad_norm.cu`) against the CPU's
    /// on the same fresh random tensors, sizes around the 4096-element blocks and one of
    /// 3 M: equal to f32 summation's tolerance; a NaN or an infinity in one tensor makes
    /// it NaN or infinite, as on the CPU.
    #[test]
    fn the_gpu_grad_norm_equals_the_cpu_norm() {
        use mmpipe::train::optim::cuda::sum_of_squares_applies;
        use mmpipe::train::step::grad_norm;
        let gpu = mmpipe::comm::device::cuda_device(0).expect("this test needs a CUDA GPU");
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        for poison in [None, Some(f32::NAN), Some(f32::INFINITY)] {
            let cpu: Vec<Tensor> = [1usize, 4095, 4096, 4097, 3 << 20, 77]
                .iter()
                .map(|&n| {
                    let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
                    if let (Some(p), Some(x)) = (poison, v.get_mut(4090)) {
                        *x = p;
                    }
                    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
                })
                .collect();
            let on_gpu: Vec<Tensor> = cpu.iter().map(|t| t.to_device(&gpu).unwrap()).collect();
            assert!(sum_of_squares_applies(&on_gpu));
            let (want, got) = (grad_norm(&cpu).unwrap(), grad_norm(&on_gpu).unwrap());
            match poison {
                None => {
                    let rel = (got - want).abs() / want;
                    assert!(rel < 1e-6, "GPU norm {got}, CPU norm {want}: {rel:e}");
                }
                Some(p) if p.is_nan() => assert!(got.is_nan() && want.is_nan(), "{got} {want}"),
                Some(_) => assert!(got == f64::INFINITY && want == f64::INFINITY),
            }
        }
    }
}
