//! Mixed precision: a bf16 step (bf16 compute and activations, f32 master weights,
//! optimizer, loss and norm statistics) against the f32 step on the same batch and
//! topology: within bf16's tolerance, and really different from f32. The planner's memory
//! model against what a bf16 rank allocates; bf16 gradient sums; bf16 checkpoints.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mmpipe::model::ParamBuilder;
use mmpipe::plan::{Calibration, CostModel, CostOptions, GradReduce, Optimizer, Precision};
use mmpipe::topology::{Topology, Tower};
use mmpipe::train::TrainConfig;

use super::common::{cpu_topology, test_model, train_config, values};
use super::parity::{split_run_on, Run, GLOBAL_BATCH};

/// Below this, two runs are the same arithmetic (f32 reorderings give ~1e-7): bf16 must
/// stay above it to show that it ran in bf16.
const DIFFERENT: f64 = 1e-4;

/// ‖a − b‖ / ‖b‖, in f64.
fn relative(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

fn config(precision: Precision, grad_all_reduce: GradReduce) -> TrainConfig {
    TrainConfig {
        precision: Some(precision),
        grad_all_reduce,
        ..train_config(GLOBAL_BATCH)
    }
}

fn run(image: usize, text: usize, cfg: &TrainConfig) -> Vec<Run> {
    split_run_on(&Device::Cpu, &test_model(), image, text, cfg, DType::F32)
}

/// A worst case: the relative difference and where it is.
type Worst = (f64, String);

/// How far a bf16 run is from the f32 run on the same topology and batches, rank by rank.
#[derive(Default)]
struct Deviation {
    /// |Δloss| / |loss|, over the steps.
    loss: Worst,
    /// ‖Δg‖ / ‖g‖ of all of a rank's step-0 gradients together.
    grads: Worst,
    /// ‖Δg‖ / ‖g‖ of the worst single tensor.
    grad_tensor: Worst,
    /// ‖Δw‖ / ‖w‖ of all of a rank's weights after the steps.
    weights: Worst,
    /// ‖Δu‖ / ‖u‖ of all of a rank's updates `u = w − w₀` over the steps.
    updates: Worst,
}

fn keep(slot: &mut Worst, d: f64, what: String) {
    assert!(d.is_finite(), "{what}: not finite");
    if d > slot.0 {
        *slot = (d, what);
    }
}

/// ‖a − b‖ / ‖b‖ over the tensors of `names` together.
fn joint(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    let (mut diff, mut norm) = (0.0, 0.0);
    for (n, t) in a {
        for (x, y) in values(t).iter().zip(values(&b[n])) {
            diff += (x - y) * (x - y);
            norm += y * y;
        }
    }
    (diff / norm).sqrt()
}

fn deviation(got: &[Run], want: &[Run], initial: &BTreeMap<String, Tensor>) -> Deviation {
    let mut d = Deviation::default();
    for (rank, (g, w)) in got.iter().zip(want).enumerate() {
        for (step, (a, b)) in g.losses.iter().zip(&w.losses).enumerate() {
            keep(
                &mut d.loss,
                (a - b).abs() / b.abs(),
                format!("rank {rank}, step {step}"),
            );
        }
        assert_eq!(
            g.grads.keys().collect::<Vec<_>>(),
            w.grads.keys().collect::<Vec<_>>()
        );
        for (n, t) in g.grads.iter().chain(&g.weights) {
            assert_eq!(
                t.dtype(),
                DType::F32,
                "rank {rank}: {n} is handed over in f32"
            );
        }
        keep(
            &mut d.grads,
            joint(&g.grads, &w.grads),
            format!("rank {rank}"),
        );
        for (n, t) in &g.grads {
            let r = relative(t, &w.grads[n]);
            if std::env::var("PRECISION_DEBUG").is_ok() {
                eprintln!("rank {rank} {n}: gradient off by {r:.2e}");
            }
            keep(&mut d.grad_tensor, r, format!("rank {rank} {n}"));
        }
        keep(
            &mut d.weights,
            joint(&g.weights, &w.weights),
            format!("rank {rank}"),
        );
        let update = |run: &Run| -> BTreeMap<String, Tensor> {
            run.weights
                .iter()
                .map(|(n, t)| (n.clone(), (t - &initial[n]).unwrap()))
                .collect()
        };
        keep(
            &mut d.updates,
            joint(&update(g), &update(w)),
            format!("rank {rank}"),
        );
    }
    d
}

/// The tolerance for bf16 against f32, ‖Δ‖/‖ref‖.
const BF16_TOLERANCE: f64 = 2e-2;
/// Per tensor, a gradient is allowed what OpenCLIP's own amp_bf16 step shows on this model
/// and batch against its f32 step (3.15e-2 worst, `scripts/reference/openclip_bf16.py`,
/// docs/precision.md; mmpipe measured 2.5e-2 there). Tensors whose gradients are small
/// differences of large terms (norm gains, a layer's MLP projection at init) amplify
/// bf16's 2⁻⁹ rounding tenfold in any bf16 trainer.
const BF16_TENSOR_TOLERANCE: f64 = 3.2e-2;
/// Adam's updates normalise each element by its own gradient scale, so elements whose true
/// gradient is zero (attention's key biases: softmax ignores a shift shared by every key)
/// move by ±lr on the sign of rounding noise, in f32 as in bf16: the updates agree only
/// where there is signal. Measured 8.0e-2 to 8.6e-2 on these runs (all of a rank's
/// updates together).
const UPDATE_TOLERANCE: f64 = 0.15;

/// bf16 against f32 on `image` × `text` rank threads over 5 steps.
fn check_bf16_tracks_fp32(image: usize, text: usize, grad_all_reduce: GradReduce) {
    let want = run(image, text, &config(Precision::Fp32, GradReduce::Fp32));
    let got = run(image, text, &config(Precision::Bf16, grad_all_reduce));
    let d = deviation(&got, &want, &initial_weights());
    let label = format!("{image}x{text} bf16, gradients summed in {grad_all_reduce:?}");
    eprintln!(
        "{label}: loss {:.1e} ({}), gradients {:.1e} ({}), worst gradient {:.1e} ({}), \
         weights {:.1e} ({}), updates {:.1e} ({})",
        d.loss.0,
        d.loss.1,
        d.grads.0,
        d.grads.1,
        d.grad_tensor.0,
        d.grad_tensor.1,
        d.weights.0,
        d.weights.1,
        d.updates.0,
        d.updates.1
    );
    d.check(&label);
}

impl Deviation {
    /// Within the tolerances above, and measurably off f32 (f32 reorderings stay near
    /// 1e-7): this ran in bf16.
    fn check(&self, label: &str) {
        for ((value, at), tolerance, what) in [
            (&self.loss, BF16_TOLERANCE, "loss"),
            (&self.grads, BF16_TOLERANCE, "gradients"),
            (&self.grad_tensor, BF16_TENSOR_TOLERANCE, "gradient"),
            (&self.weights, BF16_TOLERANCE, "weights after 5 steps"),
            (&self.updates, UPDATE_TOLERANCE, "updates over 5 steps"),
        ] {
            assert!(
                *value <= tolerance,
                "{label}: {what} ({at}) off by {value:.3e}"
            );
        }
        assert!(
            self.grads.0 > DIFFERENT && self.loss.0 > 1e-6,
            "{label}: gradients within {:.1e} of f32, loss within {:.1e}: this did not run in bf16",
            self.grads.0,
            self.loss.0
        );
    }
}

/// Every parameter of the test model as both towers start (the runs' seed, 7).
fn initial_weights() -> BTreeMap<String, Tensor> {
    let pb = ParamBuilder::new(7, DType::F32, &Device::Cpu);
    let model = test_model();
    mmpipe::model::build_all(&pb, &model).unwrap();
    let cfg = train_config(GLOBAL_BATCH);
    mmpipe::model::loss_scalars(
        &pb,
        cfg.loss.kind.initial_logit_scale(),
        cfg.loss.kind.initial_logit_bias(),
    )
    .unwrap();
    pb.params()
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().copy().unwrap()))
        .collect()
}

#[test]
fn bf16_1x1_tracks_fp32_within_bf16_tolerance() {
    check_bf16_tracks_fp32(1, 1, GradReduce::Fp32);
}

#[test]
fn bf16_2x2_tracks_fp32_within_bf16_tolerance() {
    check_bf16_tracks_fp32(2, 2, GradReduce::Fp32);
}

/// Gradients summed in bf16: half the all-reduce's bytes (as the planner counts them),
/// still within bf16's tolerance of f32.
#[test]
fn bf16_gradient_sums_halve_the_all_reduce_and_track_fp32() {
    check_bf16_tracks_fp32(2, 2, GradReduce::Bf16);
    let fp32 = run(2, 2, &config(Precision::Bf16, GradReduce::Fp32));
    let bf16 = run(2, 2, &config(Precision::Bf16, GradReduce::Bf16));
    let topology = cpu_topology(2, 2);
    let model = test_model();
    for reduce in [GradReduce::Fp32, GradReduce::Bf16] {
        let plan = mmpipe::plan::Plan::new(
            &topology,
            &model,
            &CostOptions {
                grad_reduce: reduce,
                ..super::plan::options(GLOBAL_BATCH)
            },
        )
        .unwrap();
        let runs = match reduce {
            GradReduce::Fp32 => &fp32,
            GradReduce::Bf16 => &bf16,
        };
        for (rank, r) in runs.iter().enumerate() {
            let tower = topology.ranks[rank].roles[0].tower;
            let (_, predicted) = plan
                .traffic
                .grad_all_reduce
                .iter()
                .find(|(t, _)| *t == tower)
                .copied()
                .unwrap();
            assert_eq!(
                r.grad_all_reduce_bytes, predicted,
                "rank {rank} ({tower}) summing in {reduce:?}: measured vs the planner"
            );
        }
    }
    for (a, b) in fp32.iter().zip(&bf16) {
        assert_eq!(2 * b.grad_all_reduce_bytes, a.grad_all_reduce_bytes);
    }
}

/// The planner's memory per rank (weights with the working copy, gradients as backward
/// hands them over and as the optimizer takes them, optimizer state) equals the bytes of
/// the tensors a rank holds, in f32 and in bf16. The loss's scalars (on every rank, not in
/// the planner's tower count) are left out of both.
#[test]
fn the_planner_memory_is_what_a_bf16_rank_allocates() {
    // One image and one text rank thread, with links for the cost model.
    let topology = Topology::from_str(
        "device = \"cpu\"\n[links]\nintra_node_gbps = 4.0\nintra_node_latency_us = 20.0\n\
         inter_node_gbps = 4.0\ninter_node_latency_us = 20.0\n[[nodes]]\nname = \"host\"\n\
         devices = 2\n[groups]\nimage = [\"host:0\"]\ntext = [\"host:1\"]\n",
        Path::new("cpu-1x1-links.toml"),
    )
    .unwrap();
    let model = test_model();
    let source = mmpipe::data::SyntheticSource::new(7, &model).unwrap();
    for precision in [Precision::Fp32, Precision::Bf16] {
        let cfg = config(precision, GradReduce::Fp32);
        let options = CostOptions {
            precision,
            calibration: Some(Calibration {
                image_samples_per_s: 100.0,
                text_samples_per_s: 100.0,
                precision,
            }),
            ..super::plan::options(GLOBAL_BATCH)
        };
        let estimate = CostModel {
            topology: &topology,
            model: &model,
            options: &options,
        }
        .split()
        .unwrap();
        let measured = mmpipe::comm::thread::run_ranks(
            &topology,
            mmpipe::comm::thread::DEFAULT_TIMEOUT,
            |rank, comms| {
                let trainer = mmpipe::train::RankTrainer::new(
                    &topology,
                    rank,
                    &model,
                    &cfg,
                    DType::F32,
                    &Device::Cpu,
                )?;
                let indices = super::common::batch_indices(0, GLOBAL_BATCH, 0, GLOBAL_BATCH);
                let input = source.tower_input(
                    trainer.towers[0].tower,
                    mmpipe::data::Stream::Train,
                    &indices,
                    &Device::Cpu,
                )?;
                let g = trainer.compute_grads(&comms, std::slice::from_ref(&input), None)?;
                // The loss's scalars: one f32 each, with two f32 moments.
                let scalars = trainer.towers[0]
                    .params()
                    .iter()
                    .filter(|(n, _)| n.starts_with("logit_"))
                    .count();
                let tower_grads: usize = trainer.towers[0]
                    .trainable()
                    .names()
                    .iter()
                    .zip(&g.grads[0])
                    .filter(|(n, _)| !n.starts_with("logit_"))
                    .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
                    .sum();
                let state = trainer.state_bytes();
                Ok((
                    trainer.towers[0].tower,
                    state.weights - 4 * scalars,
                    tower_grads + g.backward_grad_bytes,
                    state.optimizer - 8 * scalars,
                ))
            },
        )
        .unwrap();
        for (tower, weights, gradients, optimizer) in measured {
            let memory = estimate
                .groups
                .iter()
                .find(|g| g.tower == tower)
                .unwrap()
                .memory;
            let label = format!("{precision:?} {tower}");
            assert_eq!(weights as f64, memory.weights, "{label}: weights");
            assert_eq!(gradients as f64, memory.gradients, "{label}: gradients");
            assert_eq!(optimizer as f64, memory.optimizer, "{label}: optimizer");
        }
    }
}

/// Under mixed precision the builder keeps an f32 master beside each bf16 working copy
/// (the loss's scalars only the master), and a load into the masters reaches the copies.
#[test]
fn mixed_parameters_are_an_f32_master_and_a_bf16_working_copy() {
    let pb = ParamBuilder::mixed(3, DType::BF16, DType::F32, &Device::Cpu);
    let w = pb
        .get((4, 3), "w", mmpipe::model::Init::Normal(1.0))
        .unwrap();
    pb.full_precision()
        .get((), "logit_scale", mmpipe::model::Init::Const(2.5))
        .unwrap();
    assert_eq!(w.dtype(), DType::BF16);
    let (masters, working) = (pb.masters(), pb.params());
    assert_eq!(masters.names(), working.names());
    let master = masters.get("w").unwrap();
    assert_eq!(master.dtype(), DType::F32);
    assert_ne!(master.id(), working.get("w").unwrap().id());
    assert_eq!(
        masters.get("logit_scale").unwrap().id(),
        working.get("logit_scale").unwrap().id(),
        "the loss's scalars have no working copy"
    );
    // The same draw as an f32 builder's, and the copy is its rounding.
    let plain = ParamBuilder::new(3, DType::F32, &Device::Cpu);
    let want = plain
        .get((4, 3), "w", mmpipe::model::Init::Normal(1.0))
        .unwrap();
    assert_eq!(values(master.as_tensor()), values(&want));
    assert_eq!(values(&w), values(&want.to_dtype(DType::BF16).unwrap()));
    master.set(&(want.clone() * 2.0).unwrap()).unwrap();
    masters.write_working_copies(&working).unwrap();
    assert_eq!(
        values(&w),
        values(&(want * 2.0).unwrap().to_dtype(DType::BF16).unwrap())
    );
    assert_eq!(
        masters.num_bytes(),
        4 * 12 + 4,
        "f32 masters of 12 + 1 elements"
    );
}

/// A bf16 run of 10 steps against 5 + resume + 5: checkpoints hold the f32 masters, and
/// the resumed run's working copies come back from them, so the two runs agree exactly.
#[test]
fn a_bf16_run_resumes_exactly_from_its_f32_masters() {
    let base = std::env::temp_dir().join(format!("mmpipe-bf16-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let topology = cpu_topology(2, 1);
    let model = test_model();
    let run = |dir: &str, resume: Option<std::path::PathBuf>| {
        let cfg = TrainConfig {
            steps: 10,
            global_batch: 8,
            warmup: 2,
            precision: Some(Precision::Bf16),
            checkpoint_dir: Some(base.join(dir)),
            checkpoint_every: 5,
            resume,
            ..train_config(8)
        };
        mmpipe::train::train(&topology, &model, &cfg).unwrap()
    };
    let straight = run("straight", None);
    let second = run("resumed", Some(base.join("straight/step-00000005")));
    assert_eq!(
        straight.losses[5..],
        second.losses[..],
        "losses after the resume"
    );
    for part in ["image.safetensors", "text.safetensors"] {
        let read = |dir: &str| {
            mmpipe::model::checkpoint::read_tensors(
                &base.join(dir).join("step-00000010").join(part),
            )
            .unwrap()
        };
        let (want, got) = (read("straight"), read("resumed"));
        for (name, t) in &want {
            if !name.contains("optimizer.step") {
                assert_eq!(t.dtype(), DType::F32, "{part}: {name} is saved in f32");
            }
            assert_eq!(values(t), values(&got[name]), "{part}: {name}");
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// The planner's bf16 memory on a GPU topology: the working copies and their bf16
/// gradients on top of f32's, and half the activation bytes but the f32 residual stream's
/// (of the same activations: attention's probabilities kept, which flash attention under
/// bf16 would not keep).
#[test]
fn bf16_memory_adds_the_working_copy_and_backward_gradients() {
    let topology = Topology::from_file(Path::new("topology/4x4.toml")).unwrap();
    let model = mmpipe::model::ClipConfig::from_file(Path::new("configs/ViT-B-32.toml")).unwrap();
    let memory = |precision| {
        let options = CostOptions {
            precision,
            optimizer: Optimizer::Adamw,
            flash_attention: false,
            ..super::plan::options(256)
        };
        CostModel {
            topology: &topology,
            model: &model,
            options: &options,
        }
        .split()
        .unwrap()
        .groups[0]
            .memory
    };
    let (f32_mem, bf16_mem) = (memory(Precision::Fp32), memory(Precision::Bf16));
    let size = model.tower_size(Tower::Image);
    let copied =
        (size.num_params(model.embed_dim) - size.full_precision_params(model.embed_dim)) as f64;
    assert!(
        copied > 0.9 * size.num_params(model.embed_dim) as f64,
        "ViT-B/32: mostly matrices"
    );
    assert_eq!(bf16_mem.weights - f32_mem.weights, 2.0 * copied);
    assert_eq!(bf16_mem.gradients - f32_mem.gradients, 2.0 * copied);
    assert_eq!(bf16_mem.optimizer, f32_mem.optimizer);
    // The activations in the tower's dtype halve; its f32 residual stream does not.
    // (4x4.toml's devices are GPUs: the products before the residual adds are not kept.)
    let (e, st) = (
        size.activation_elems(false, true) - size.branch_activation_elems(false),
        size.stream_activation_elems(false),
    );
    let ratio = bf16_mem.activations / f32_mem.activations;
    let want = (2.0 * e + 4.0 * st) / (4.0 * e + 4.0 * st);
    assert!((ratio - want).abs() < 1e-12, "{ratio} vs {want}");
}

/// Which parameters get a bf16 working copy (matrices of products and their biases) and
/// which the towers read in f32 (embeddings, norms, learned queries): what the builder
/// makes equals each tower config's count, for every tower kind.
#[test]
fn every_tower_counts_its_full_precision_parameters() {
    for file in [
        "configs/clip-tiny.toml",
        "configs/clip-tiny-bert.toml",
        "configs/clip-tiny-resnet.toml",
    ] {
        let mut model = mmpipe::model::ClipConfig::from_file(Path::new(file)).unwrap();
        for attentional_pool in [false, true] {
            if let mmpipe::model::ImageTowerConfig::Vit(v) = &mut model.vision {
                v.attentional_pool = attentional_pool;
            } else if attentional_pool {
                continue;
            }
            for tower in [Tower::Image, Tower::Text] {
                let pb = ParamBuilder::mixed(0, DType::BF16, DType::F32, &Device::Cpu);
                mmpipe::model::Encoder::new(&pb, &model, tower).unwrap();
                let (masters, working) = (pb.masters(), pb.params());
                let full: usize = masters
                    .iter()
                    .filter(|(n, m)| working.get(n).unwrap().id() == m.id())
                    .map(|(_, m)| m.elem_count())
                    .sum();
                let copies: usize = working
                    .iter()
                    .filter(|(_, w)| w.dtype() == DType::BF16)
                    .map(|(_, w)| w.elem_count())
                    .sum();
                let size = model.tower_size(tower);
                let label = format!("{file} {tower} (attentional pool {attentional_pool})");
                assert_eq!(full, size.full_precision_params(model.embed_dim), "{label}");
                assert_eq!(full + copies, size.num_params(model.embed_dim), "{label}");
                assert!(copies > 0, "{label}: no working copies");
            }
        }
    }
}

/// bf16 on the GPU (rank threads sharing it, the one-launch AdamW, cuBLAS' bf16 products)
/// against f32 on the CPU: the same tolerances as the CPU's bf16. Needs a CUDA GPU.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    #[test]
    fn cuda_bf16_tracks_the_cpu_f32_step() {
        let gpu = mmpipe::comm::device::cuda_device(0).expect("this test needs a CUDA GPU");
        for (image, text) in [(1, 1), (2, 2)] {
            let want = run(image, text, &config(Precision::Fp32, GradReduce::Fp32));
            let got = split_run_on(
                &gpu,
                &test_model(),
                image,
                text,
                &config(Precision::Bf16, GradReduce::Fp32),
                DType::F32,
            );
            let d = deviation(&got, &want, &initial_weights());
            let label = format!("cuda {image}x{text} bf16");
            eprintln!(
                "{label}: loss {:.1e}, gradients {:.1e}, worst gradient {:.1e} ({}), weights {:.1e}, updates {:.1e}",
                d.loss.0, d.grads.0, d.grad_tensor.0, d.grad_tensor.1, d.weights.0, d.updates.0
            );
            d.check(&label);
        }
    }
}

/// Recomputed blocks change nothing in bf16 (bit for bit), and GradCache micro-batches only
/// bf16's rounding of the split sums.
#[test]
fn bf16_with_micro_batches_and_checkpointing_equals_plain_bf16() {
    let plain = config(Precision::Bf16, GradReduce::Fp32);
    let want = run(2, 2, &plain);
    for (checkpointing, micro) in [
        (true, mmpipe::train::config::MicroBatch::default()),
        (
            false,
            mmpipe::train::config::MicroBatch {
                image: Some(2),
                text: Some(4),
            },
        ),
        (
            true,
            mmpipe::train::config::MicroBatch {
                image: Some(4),
                text: Some(2),
            },
        ),
    ] {
        let cfg = TrainConfig {
            checkpointing,
            micro_batch: micro,
            ..plain.clone()
        };
        let got = run(2, 2, &cfg);
        let d = deviation(&got, &want, &initial_weights());
        let label = format!("bf16 2x2, checkpointing {checkpointing}, micro-batches {micro:?}");
        eprintln!(
            "{label}: loss {:.1e}, gradients {:.1e}, weights {:.1e}",
            d.loss.0, d.grads.0, d.weights.0
        );
        // Recomputation runs the same ops on the same values: bit for bit. Micro-batches
        // round each one's weight gradients to bf16 before the f32 sum (measured 3.7e-3).
        let tolerance = if micro.image.is_some() { 5e-3 } else { 0.0 };
        for ((value, at), what) in [
            (&d.loss, "loss"),
            (&d.grads, "gradients"),
            (&d.weights, "weights"),
        ] {
            assert!(
                *value <= tolerance,
                "{label}: {what} ({at}) off by {value:.3e}"
            );
        }
    }
}
