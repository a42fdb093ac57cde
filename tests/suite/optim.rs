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
