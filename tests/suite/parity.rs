//! The modality split must change nothing but speed: on every topology, the loss, every
//! parameter's gradient (after the group reduction) and the weights after several steps
//! equal one device training the whole model on the whole batch.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use mmpipe::comm::overlap::OverlapStats;
use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
use mmpipe::data::SyntheticSource;
use mmpipe::loss::{Exchange, LossConfig, LossKind, TileSize};
use mmpipe::model::{ClipConfig, LOGIT_SCALE_MAX};
use mmpipe::topology::{Topology, Tower};
use mmpipe::train::config::MicroBatch;
use mmpipe::train::optim::{AdamW, AdamWConfig};
use mmpipe::train::{RankTrainer, TrainConfig};

use super::common::{batch_indices, slice_inputs};

use super::common::{
    batch, cpu_topology, scalar, test_model, train_config, worst_violation, Reference, Relative,
};

pub(super) const GLOBAL_BATCH: usize = 12;
const STEPS: usize = 5;
const LR: f64 = 1e-3;

#[derive(Default)]
pub(super) struct Run {
    pub losses: Vec<f64>,
    /// Gradients of step 0, by name.
    pub grads: BTreeMap<String, Tensor>,
    /// Weights after the last step, by name.
    pub weights: BTreeMap<String, Tensor>,
    /// What step 0's gradient all-reduce handled on this rank (0 on one device).
    pub grad_all_reduce_bytes: u64,
    /// What step 0's overlapped collectives did on this rank.
    pub overlap: OverlapStats,
    /// What step 0's feature exchange (the pairs' and the features' gathers) carried.
    pub exchange_bytes: u64,
}

fn adamw(cfg: &TrainConfig) -> AdamWConfig {
    AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    }
}

fn reference_run(cfg: &TrainConfig, dtype: DType) -> Run {
    reference_run_of(&test_model(), cfg, dtype)
}

/// One device; a locked tower's parameters are left out of the optimizer.
fn reference_run_of(model: &ClipConfig, cfg: &TrainConfig, dtype: DType) -> Run {
    let model = model.clone();
    let reference = Reference::with_loss(&model, cfg.seed, dtype, cfg.loss.kind);
    let source = SyntheticSource::new(cfg.seed, &model).unwrap();
    let text_param = |n: &str| !n.starts_with("visual.") && n != "logit_scale" && n != "logit_bias";
    let trainable = reference
        .params
        .filter(|n| !(model.is_locked(Tower::Text) && text_param(n)));
    let mut opt = AdamW::new(&trainable, adamw(cfg)).unwrap();
    let mut run = Run::default();
    for step in 0..STEPS {
        let (images, texts) = batch(
            &source,
            &batch_indices(step, cfg.global_batch, 0, cfg.global_batch),
            dtype,
        );
        let (loss, mut grads) = reference.grads(&images, &texts);
        if let Some(max_norm) = cfg.grad_clip {
            // Each tower on its own, the loss's scalars never.
            let is_image = |n: &str| n.starts_with("visual.");
            let is_text = |n: &str| !n.starts_with("visual.") && !n.starts_with("logit_");
            for in_tower in [&is_image as &dyn Fn(&str) -> bool, &is_text] {
                let names: Vec<String> = grads.keys().filter(|n| in_tower(n)).cloned().collect();
                let tower: Vec<Tensor> = names.iter().map(|n| grads[n].clone()).collect();
                let norm: f64 = tower
                    .iter()
                    .map(|g| scalar(&g.sqr().unwrap().sum_all().unwrap()))
                    .sum::<f64>()
                    .sqrt();
                if step == 0 {
                    assert!(norm > max_norm, "the test's clip must bite: norm {norm}");
                }
                // torch.nn.utils.clip_grad_norm_'s rule, written out.
                let clipped: Vec<Tensor> = if norm > max_norm {
                    tower
                        .iter()
                        .map(|g| (g * (max_norm / norm)).unwrap())
                        .collect()
                } else {
                    tower
                };
                for (n, g) in names.into_iter().zip(clipped) {
                    grads.insert(n, g);
                }
            }
        }
        run.losses.push(loss);
        let trainable_grads: Vec<Tensor> = trainable
            .names()
            .iter()
            .map(|n| grads[*n].clone())
            .collect();
        opt.step(&trainable_grads, LR).unwrap();
        let t = &reference.params.get("logit_scale").unwrap();
        if scalar(t.as_tensor()) > LOGIT_SCALE_MAX {
            t.set(
                &Tensor::new(LOGIT_SCALE_MAX, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
        }
        if step == 0 {
            run.grads = grads;
        }
    }
    run.weights = reference
        .params
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().copy().unwrap()))
        .collect();
    run
}

/// One `Run` per rank, each with the parameters that rank holds.
fn split_run(image: usize, text: usize, cfg: &TrainConfig, dtype: DType) -> Vec<Run> {
    split_run_of(&test_model(), image, text, cfg, dtype)
}

fn split_run_of(
    model: &ClipConfig,
    image: usize,
    text: usize,
    cfg: &TrainConfig,
    dtype: DType,
) -> Vec<Run> {
    split_run_on(&Device::Cpu, model, image, text, cfg, dtype)
}

/// [`split_run_of`] with every rank thread's weights and steps on `device` (the batches
/// start on the CPU, as the data pipeline makes them).
pub(super) fn split_run_on(
    device: &Device,
    model: &ClipConfig,
    image: usize,
    text: usize,
    cfg: &TrainConfig,
    dtype: DType,
) -> Vec<Run> {
    layout_run_on(device, model, &cpu_topology(image, text), cfg, dtype)
}

/// One `Run` per rank of `topology` (any layout: a rank holding both towers trains both
/// in its one thread), each with the parameters that rank holds.
pub(super) fn layout_run_on(
    device: &Device,
    model: &ClipConfig,
    topology: &Topology,
    cfg: &TrainConfig,
    dtype: DType,
) -> Vec<Run> {
    run_ranks(topology, DEFAULT_TIMEOUT, |rank, comms| {
        rank_run(device, model, topology, rank, &comms, cfg, dtype)
    })
    .unwrap()
}

/// Rank `rank`'s `Run` of `topology` over `comms` (any backend's).
fn rank_run(
    device: &Device,
    model: &ClipConfig,
    topology: &Topology,
    rank: usize,
    comms: &mmpipe::comm::RankComms,
    cfg: &TrainConfig,
    dtype: DType,
) -> mmpipe::error::Result<Run> {
    let source = SyntheticSource::new(cfg.seed, model).unwrap();
    let mut trainer = RankTrainer::new(topology, rank, model, cfg, dtype, device)?;
    let names: Vec<Vec<String>> = trainer
        .towers
        .iter()
        .map(|t| {
            t.trainable()
                .names()
                .iter()
                .map(|s| s.to_string())
                .collect()
        })
        .collect();
    let mut run = Run::default();
    for step in 0..STEPS {
        let inputs = slice_inputs(&trainer, &source, step, cfg.global_batch)?;
        let g = trainer.compute_grads(comms, &inputs, None)?;
        run.losses.push(g.loss);
        if step == 0 {
            for (names, grads) in names.iter().zip(&g.grads) {
                for (n, grad) in names.iter().zip(grads) {
                    // The loss's scalars sit beside each tower: both copies must agree.
                    if let Some(seen) = run.grads.get(n) {
                        assert!(
                            worst_violation(grad, seen, 0.0, 0.0, Relative::Element).is_none(),
                            "rank {rank}: the two copies of {n}'s gradient differ"
                        );
                    }
                    run.grads.insert(n.clone(), grad.clone());
                }
            }
            run.grad_all_reduce_bytes = g.bytes.grad_all_reduce;
            run.overlap = g.overlap;
            run.exchange_bytes = g.bytes.exchange;
        }
        trainer.apply(&g.grads, LR)?;
    }
    for t in &trainer.towers {
        for (n, v) in t.params().iter() {
            let w = v.as_tensor().copy().unwrap();
            if let Some(seen) = run.weights.get(n) {
                assert!(
                    worst_violation(&w, seen, 0.0, 0.0, Relative::Element).is_none(),
                    "rank {rank}: the two copies of {n} differ after the steps"
                );
            }
            run.weights.insert(n.to_string(), w);
        }
    }
    Ok(run)
}

/// In f64 every element agrees to 1e-10 of itself: the split maths is exact. In f32 the
/// spec's tolerances (1e-5 relative, 1e-6 absolute on gradients; 1e-4 on weights after 5
/// steps) hold relative to each tensor's scale: an element that is small by cancellation
/// (a positional-embedding row summed over the batch) keeps the rounding of its large
/// terms, about 1e-7 of the tensor's largest entry, on one device as on many.
fn check_topology(image: usize, text: usize) {
    check_topology_in(
        image,
        text,
        DType::F64,
        1e-10,
        1e-12,
        1e-9,
        Relative::Element,
    );
    check_topology_in(image, text, DType::F32, 1e-5, 1e-6, 1e-4, Relative::Tensor);
}

fn check_topology_in(
    image: usize,
    text: usize,
    dtype: DType,
    rel: f64,
    abs: f64,
    weight_abs: f64,
    relative: Relative,
) {
    check_run(
        &train_config(GLOBAL_BATCH),
        image,
        text,
        dtype,
        rel,
        abs,
        weight_abs,
        relative,
    );
}

#[allow(clippy::too_many_arguments)]
fn check_run(
    cfg: &TrainConfig,
    image: usize,
    text: usize,
    dtype: DType,
    rel: f64,
    abs: f64,
    weight_abs: f64,
    relative: Relative,
) {
    let cfg = cfg.clone();
    let reference = reference_run(&cfg, dtype);
    let ranks = split_run(image, text, &cfg, dtype);
    let label = format!("{image}x{text} {dtype:?}");
    compare(&label, &reference, &ranks, rel, abs, weight_abs, relative);
}

/// [`compare`] at the f64 tolerances: every element to 1e-10 of itself.
fn compare_f64(label: &str, reference: &Run, ranks: &[Run]) {
    compare(
        label,
        reference,
        ranks,
        1e-10,
        1e-12,
        1e-9,
        Relative::Element,
    );
}

/// [`compare`] at the spec's f32 tolerances: 1e-5 relative to each tensor's scale and
/// 1e-6 absolute on gradients, 1e-4 on the weights after the steps.
fn compare_f32(label: &str, reference: &Run, ranks: &[Run]) {
    compare(label, reference, ranks, 1e-5, 1e-6, 1e-4, Relative::Tensor);
}

/// Every rank's run against the reference: losses, step-0 gradients, final weights; and
/// every parameter is held by some rank.
fn compare(
    label: &str,
    reference: &Run,
    ranks: &[Run],
    rel: f64,
    abs: f64,
    weight_abs: f64,
    relative: Relative,
) {
    if std::env::var("PARITY_DEBUG").is_ok() {
        for (rank, run) in ranks.iter().enumerate() {
            for (name, g) in &run.grads {
                let want = &reference.grads[name];
                let d = super::common::values(&(g - want).unwrap())
                    .iter()
                    .fold(0f64, |m, v| m.max(v.abs()));
                let m = super::common::values(want)
                    .iter()
                    .fold(0f64, |m, v| m.max(v.abs()));
                eprintln!("{label} rank {rank} {name}: max|diff| {d:.2e} max|ref| {m:.2e}");
            }
        }
    }
    let mut covered = std::collections::BTreeSet::new();
    for (rank, run) in ranks.iter().enumerate() {
        for (step, (got, want)) in run.losses.iter().zip(&reference.losses).enumerate() {
            assert!(
                (got - want).abs() <= abs + rel * want.abs(),
                "{label} rank {rank} step {step}: loss {got} vs reference {want}"
            );
        }
        for (name, g) in &run.grads {
            let want = &reference.grads[name];
            if let Some((i, a, b)) = worst_violation(g, want, rel, abs, relative) {
                panic!("{label} rank {rank}: gradient of {name}[{i}] is {a}, reference {b}");
            }
            let norm = scalar(&g.sqr().unwrap().sum_all().unwrap());
            assert!(
                norm > 0.0,
                "{label} rank {rank}: {name} got a zero gradient"
            );
            covered.insert(name.clone());
        }
        for (name, w) in &run.weights {
            if let Some((i, a, b)) = worst_violation(
                w,
                &reference.weights[name],
                0.0,
                weight_abs,
                Relative::Element,
            ) {
                panic!(
                    "{label} rank {rank}: after {STEPS} steps {name}[{i}] is {a}, reference {b}"
                );
            }
        }
    }
    let all: std::collections::BTreeSet<String> = reference.grads.keys().cloned().collect();
    assert_eq!(covered, all, "{label}: some parameters are held by no rank");
}

#[test]
fn split_1x1_equals_one_device() {
    check_topology(1, 1);
}

#[test]
fn split_2x1_equals_one_device() {
    check_topology(2, 1);
}

#[test]
fn split_1x2_equals_one_device() {
    check_topology(1, 2);
}

#[test]
fn split_2x2_equals_one_device() {
    check_topology(2, 2);
}

#[test]
fn split_3x1_equals_one_device() {
    check_topology(3, 1);
}

#[test]
fn weights_actually_move_so_the_weight_check_can_fail() {
    let cfg = train_config(GLOBAL_BATCH);
    let model = test_model();
    let fresh = Reference::new(&model, cfg.seed, DType::F32);
    let trained = reference_run(&cfg, DType::F32);
    let moved = fresh
        .params
        .iter()
        .filter(|(n, v)| {
            worst_violation(
                v.as_tensor(),
                &trained.weights[*n],
                0.0,
                1e-4,
                Relative::Element,
            )
            .is_some()
        })
        .count();
    assert_eq!(
        moved,
        fresh.params.len(),
        "every parameter should move by more than the tolerance"
    );
}

#[test]
fn a_locked_text_tower_stays_put_while_the_image_side_matches_one_device() {
    let text = format!("locked = [\"text\"]\n{}", super::common::TEST_MODEL);
    let model = ClipConfig::from_str(&text, std::path::Path::new("locked.toml")).unwrap();
    let cfg = train_config(GLOBAL_BATCH);
    let reference = reference_run_of(&model, &cfg, DType::F64);
    let initial = Reference::new(&model, cfg.seed, DType::F64);
    // The split, data parallelism, and a hybrid whose text ranks also hold the image.
    for topology in [
        cpu_topology(2, 1),
        super::common::cpu_layout(2, "0-1", "0-1"),
        super::common::cpu_layout(3, "0-2", "1-2"),
    ] {
        let label = topology.source.display().to_string();
        let runs = layout_run_on(&Device::Cpu, &model, &topology, &cfg, DType::F64);
        for (rank, run) in runs.iter().enumerate() {
            for (name, w) in &run.weights {
                let want = if name.starts_with("visual.") || name == "logit_scale" {
                    reference.weights[name].clone()
                } else {
                    initial.params.get(name).unwrap().as_tensor().clone()
                };
                if let Some((i, a, b)) = worst_violation(w, &want, 0.0, 1e-9, Relative::Element) {
                    panic!("{label} rank {rank}: {name}[{i}] is {a}, expected {b}");
                }
            }
            assert!(
                run.grads
                    .keys()
                    .all(|n| n.starts_with("visual.") || n == "logit_scale"),
                "{label} rank {rank}: no text gradients, got {:?}",
                run.grads.keys().collect::<Vec<_>>()
            );
        }
    }
}

#[test]
fn a_large_vocabulary_all_reduces_only_the_batchs_token_rows_and_equals_one_device() {
    // 2 000 token rows, of which the batch's captions use a few dozen: the text group's
    // all-reduce carries those rows (and a 0/1 row mask), not the whole table.
    let model = ClipConfig::from_str(
        &super::common::TEST_MODEL.replace("vocab_size = 32", "vocab_size = 2000"),
        std::path::Path::new("vocab-2000.toml"),
    )
    .unwrap();
    let cfg = train_config(GLOBAL_BATCH);
    let reference = reference_run_of(&model, &cfg, DType::F64);
    let ranks = split_run_of(&model, 1, 3, &cfg, DType::F64);
    compare_f64("1x3 vocabulary 2000", &reference, &ranks);
    let text_params: usize = ranks[1].grads.values().map(|g| g.elem_count()).sum();
    let table = 2000 * 24;
    for run in &ranks[1..] {
        let bytes = run.grad_all_reduce_bytes as usize;
        assert!(
            bytes > (text_params - table) * 8 && bytes < (text_params - table / 2) * 8,
            "{bytes} B all-reduced for {text_params} text parameters, {table} of them the table"
        );
    }
}

#[test]
fn checkpointed_2x2_equals_one_device() {
    // Recomputing the blocks in backward changes nothing: the same f64 tolerance as
    // without checkpointing, against the plain autograd reference.
    let cfg = TrainConfig {
        checkpointing: true,
        ..train_config(GLOBAL_BATCH)
    };
    check_run(
        &cfg,
        2,
        2,
        DType::F64,
        1e-10,
        1e-12,
        1e-9,
        Relative::Element,
    );
}

/// The topologies of the loss issue: both groups single, one split, the other, both.
const LOSS_TOPOLOGIES: [(usize, usize); 5] = [(1, 1), (2, 1), (1, 3), (2, 2), (3, 2)];

/// Micro-batches that split the local slices (12, 6, 4 rows) unevenly, or not at all.
const MICRO_BATCH: MicroBatch = MicroBatch {
    image: Some(3),
    text: Some(5),
};

fn loss_config(
    kind: LossKind,
    exchange: Exchange,
    tile: TileSize,
    micro: MicroBatch,
) -> TrainConfig {
    TrainConfig {
        loss: LossConfig {
            kind,
            exchange,
            tile,
            ..LossConfig::default()
        },
        micro_batch: micro,
        ..train_config(GLOBAL_BATCH)
    }
}

/// Every loss × exchange scheme × tiling (a tile of 5 columns divides no slice) ×
/// accumulation, on every topology: the loss, every gradient and the weights after 5
/// steps equal one device in f64.
fn check_every_combination(kind: LossKind) {
    let reference = reference_run(
        &loss_config(
            kind,
            Exchange::Lse,
            TileSize::Untiled,
            MicroBatch::default(),
        ),
        DType::F64,
    );
    for exchange in [Exchange::Lse, Exchange::GatherScatter] {
        for tile in [TileSize::Untiled, TileSize::Columns(5)] {
            for micro in [MicroBatch::default(), MICRO_BATCH] {
                let cfg = loss_config(kind, exchange, tile, micro);
                for (image, text) in LOSS_TOPOLOGIES {
                    let label = format!(
                        "{kind} {exchange} tile {tile} micro-batch {micro:?} {image}x{text}"
                    );
                    let ranks = split_run(image, text, &cfg, DType::F64);
                    compare_f64(&label, &reference, &ranks);
                }
            }
        }
    }
}

#[test]
fn clip_every_scheme_tiling_and_accumulation_equals_one_device() {
    check_every_combination(LossKind::Clip);
}

#[test]
fn siglip_every_scheme_tiling_and_accumulation_equals_one_device() {
    check_every_combination(LossKind::Siglip);
}

/// A batch no group divides: 11 pairs over 3 image ranks (slices of 4, 4, 3) and 2 text
/// ranks (6, 5), and the other way round, for both losses and both schemes, whole and
/// tiled with micro-batches: the loss, every gradient and the weights after 5 steps equal
/// one device on the whole batch in f64.
#[test]
fn an_uneven_batch_equals_one_device() {
    const UNEVEN: usize = 11;
    for kind in [LossKind::Clip, LossKind::Siglip] {
        let uneven = |exchange, tile, micro| TrainConfig {
            global_batch: UNEVEN,
            ..loss_config(kind, exchange, tile, micro)
        };
        let reference = reference_run(
            &uneven(Exchange::Lse, TileSize::Untiled, MicroBatch::default()),
            DType::F64,
        );
        for exchange in [Exchange::Lse, Exchange::GatherScatter] {
            for (tile, micro) in [
                (TileSize::Untiled, MicroBatch::default()),
                (TileSize::Columns(5), MICRO_BATCH),
            ] {
                for (image, text) in [(3, 2), (2, 3)] {
                    let cfg = uneven(exchange, tile, micro);
                    let ranks = split_run(image, text, &cfg, DType::F64);
                    let label = format!(
                        "batch {UNEVEN} {kind} {exchange} tile {tile} micro-batch {micro:?} {image}x{text}"
                    );
                    compare_f64(&label, &reference, &ranks);
                }
            }
        }
    }
}

/// The spec's f32 tolerances with everything on at once, on the largest topology.
/// Layouts where devices hold both towers: plain data parallelism on 2 and 3 ranks, and
/// hybrids (image on 3 ranks and text on 2 of them; text on 2 and image on 1 of them).
const SHARED_LAYOUTS: [(usize, &str, &str); 4] = [
    (2, "0-1", "0-1"),
    (3, "0-2", "0-2"),
    (3, "0-2", "1-2"),
    (2, "0", "0-1"),
];

/// Data-parallel and hybrid layouts, for both losses, both schemes, whole and tiled with
/// micro-batches, on the even batch and on one no group divides: the loss, every
/// gradient and the weights after 5 AdamW steps equal one device in f64 (to 1e-10), and
/// the two copies of the loss's scalars on a rank holding both towers stay identical.
#[test]
fn data_parallel_and_hybrid_layouts_equal_one_device() {
    for batch in [GLOBAL_BATCH, 11] {
        for kind in [LossKind::Clip, LossKind::Siglip] {
            let at = |exchange, tile, micro| TrainConfig {
                global_batch: batch,
                ..loss_config(kind, exchange, tile, micro)
            };
            let reference = reference_run(
                &at(Exchange::Lse, TileSize::Untiled, MicroBatch::default()),
                DType::F64,
            );
            for exchange in [Exchange::Lse, Exchange::GatherScatter] {
                for (tile, micro) in [
                    (TileSize::Untiled, MicroBatch::default()),
                    (TileSize::Columns(5), MICRO_BATCH),
                ] {
                    for (devices, image, text) in SHARED_LAYOUTS {
                        let topology = super::common::cpu_layout(devices, image, text);
                        let cfg = at(exchange, tile, micro);
                        let ranks =
                            layout_run_on(&Device::Cpu, &test_model(), &topology, &cfg, DType::F64);
                        let label = format!(
                            "batch {batch} {kind} {exchange} tile {tile} micro-batch {micro:?} \
                             {devices} devices, image {image}, text {text}"
                        );
                        compare_f64(&label, &reference, &ranks);
                    }
                }
            }
        }
    }
}

/// In f32, data parallelism on 2 ranks and a hybrid match one device at the spec's f32
/// tolerances; with gradient clipping each tower is clipped on its own, as in the split.
#[test]
fn data_parallel_and_hybrid_in_f32_and_clipped_equal_one_device() {
    let reference = reference_run(&train_config(GLOBAL_BATCH), DType::F32);
    let clipped = TrainConfig {
        grad_clip: Some(0.05),
        ..train_config(GLOBAL_BATCH)
    };
    let reference_clipped = reference_run(&clipped, DType::F64);
    for (devices, image, text) in [(2, "0-1", "0-1"), (3, "0-2", "1-2")] {
        let topology = super::common::cpu_layout(devices, image, text);
        let label = format!("{devices} devices, image {image}, text {text}");
        let ranks = layout_run_on(
            &Device::Cpu,
            &test_model(),
            &topology,
            &train_config(GLOBAL_BATCH),
            DType::F32,
        );
        compare_f32(&format!("f32 {label}"), &reference, &ranks);
        let ranks = layout_run_on(&Device::Cpu, &test_model(), &topology, &clipped, DType::F64);
        compare_f64(&format!("clipped {label}"), &reference_clipped, &ranks);
    }
}

#[test]
fn f32_gather_scatter_tiled_accumulated_3x2_equals_one_device() {
    for kind in [LossKind::Clip, LossKind::Siglip] {
        let cfg = loss_config(
            kind,
            Exchange::GatherScatter,
            TileSize::Columns(5),
            MICRO_BATCH,
        );
        let reference = reference_run(&cfg, DType::F32);
        let ranks = split_run(3, 2, &cfg, DType::F32);
        compare_f32(&format!("{kind} f32 3x2"), &reference, &ranks);
    }
}

#[test]
fn accumulation_with_checkpointing_equals_one_device() {
    let cfg = TrainConfig {
        checkpointing: true,
        ..loss_config(
            LossKind::Clip,
            Exchange::Lse,
            TileSize::Columns(5),
            MICRO_BATCH,
        )
    };
    let reference = reference_run(&cfg, DType::F64);
    let ranks = split_run(2, 1, &cfg, DType::F64);
    compare_f64("checkpointed, accumulated 2x1", &reference, &ranks);
}

/// Gradient clipping per tower, on the group-summed gradients: the same as clipping each
/// tower's gradients on one device.
#[test]
fn clipped_2x2_equals_one_device_clipped_per_tower() {
    let cfg = TrainConfig {
        grad_clip: Some(0.05),
        ..train_config(GLOBAL_BATCH)
    };
    check_run(
        &cfg,
        2,
        2,
        DType::F64,
        1e-10,
        1e-12,
        1e-9,
        Relative::Element,
    );
}

/// The same parity with CUDA tensors: several rank threads share the GPU (one stream),
/// and the reference is the CPU on the whole batch. f64 agrees to 1e-10 (only the
/// summation order differs); f32 to the spec's tolerances.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    fn gpu() -> Device {
        mmpipe::comm::device::cuda_device(0).expect("these tests need a CUDA GPU")
    }

    fn check_on_gpu(image: usize, text: usize, dtype: DType) {
        let cfg = train_config(GLOBAL_BATCH);
        let reference = reference_run(&cfg, dtype);
        let ranks = split_run_on(&gpu(), &test_model(), image, text, &cfg, dtype);
        let label = format!("cuda {image}x{text} {dtype:?}");
        match dtype {
            DType::F64 => compare_f64(&label, &reference, &ranks),
            _ => compare_f32(&label, &reference, &ranks),
        }
    }

    #[test]
    fn cuda_1x1_equals_one_cpu_device() {
        check_on_gpu(1, 1, DType::F64);
        check_on_gpu(1, 1, DType::F32);
    }

    #[test]
    fn cuda_2x2_rank_threads_on_one_gpu_equal_one_cpu_device() {
        check_on_gpu(2, 2, DType::F64);
        check_on_gpu(2, 2, DType::F32);
    }

    /// One GPU holding both towers (one rank thread running both in turn): the layout
    /// `topology/gpu-1x1.toml` trains.
    #[test]
    fn cuda_one_gpu_holding_both_towers_equals_one_cpu_device() {
        let topology = super::super::common::cpu_layout(1, "0", "0");
        for dtype in [DType::F64, DType::F32] {
            let cfg = train_config(GLOBAL_BATCH);
            let reference = reference_run(&cfg, dtype);
            let ranks = layout_run_on(&gpu(), &test_model(), &topology, &cfg, dtype);
            let label = format!("cuda one GPU, both towers, {dtype:?}");
            match dtype {
                DType::F64 => compare_f64(&label, &reference, &ranks),
                _ => compare_f32(&label, &reference, &ranks),
            }
        }
    }

    /// One GPU holding both towers over NCCL's single-rank communicators, as `mmpipe
    /// train` builds them: the world's, on its own stream, gathers the image features on
    /// a worker while the text forward's kernels run on the compute stream; the event that
    /// orders the gather after the image forward holds: the steps equal one CPU device,
    /// and, bit for bit, a run that gathers both after the forwards.
    #[test]
    fn cuda_one_gpu_over_nccl_gathering_image_features_during_the_text_forward_equals_one_cpu_device(
    ) {
        use mmpipe::comm::nccl;
        let gpu = gpu();
        let topology = super::super::common::cpu_layout(1, "0", "0");
        let ids = nccl::new_ids().unwrap();
        let id = |key: &str| ids.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let comms = nccl::rank_comms(&topology, 0, &id, &gpu).unwrap();
        let model = test_model();
        for dtype in [DType::F64, DType::F32] {
            let at = |feature_overlap| TrainConfig {
                feature_overlap,
                ..train_config(GLOBAL_BATCH)
            };
            let early = rank_run(&gpu, &model, &topology, 0, &comms, &at(true), dtype).unwrap();
            let once = rank_run(&gpu, &model, &topology, 0, &comms, &at(false), dtype).unwrap();
            let label = format!("cuda one GPU over NCCL, {dtype:?}");
            assert_eq!(early.overlap.feature_gathers, 1, "{label}");
            assert_eq!(once.overlap.feature_gathers, 0, "{label}");
            assert_identical(&label, &once, &early);
            let reference = reference_run(&at(true), dtype);
            match dtype {
                DType::F64 => compare_f64(&label, &reference, &[early]),
                _ => compare_f32(&label, &reference, &[early]),
            }
        }
    }

    /// Decoded photos go to a GPU rank as bytes by default (`data.normalise_on = "auto"`),
    /// through the uploader's pinned byte buffer, and the normalisation there gives the
    /// host's floats, bit for bit.
    #[test]
    fn cuda_photos_uploaded_as_bytes_and_normalised_on_the_gpu_equal_the_hosts_floats() {
        use mmpipe::data::NormaliseOn;
        use mmpipe::model::TowerInput;
        let gpu = gpu();
        let batch = |normalise_on, device: &Device| {
            let upload = mmpipe::comm::upload::uploader(device);
            super::super::common::photo_pipeline(normalise_on, device, 8, upload)
                .next()
                .unwrap()
                .input
        };
        let on_gpu = batch(NormaliseOn::Auto, &gpu);
        let TowerInput::Pixels { bytes, .. } = &on_gpu else {
            panic!("a GPU rank's batch: bytes")
        };
        assert!(bytes.device().is_cuda() && bytes.dtype() == DType::U8);
        let TowerInput::Images(host) = batch(NormaliseOn::Host, &Device::Cpu) else {
            panic!("the host's floats")
        };
        let TowerInput::Images(normalised) = on_gpu.normalised().unwrap() else {
            panic!("normalised on the GPU")
        };
        assert!(normalised.device().is_cuda());
        let values = |t: &Tensor| {
            t.to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (values(&host), values(&normalised));
        assert_eq!(a.len(), b.len());
        // One kernel (`fused::cuda::pixel_normalise`) rounding the product and the
        // difference one at a time, as the host does: the same bits.
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(
            differ,
            0,
            "normalised on the GPU: {differ} of {} floats differ",
            a.len()
        );
    }

    #[test]
    fn cuda_every_scheme_tiled_and_accumulated_equals_one_cpu_device() {
        let model = test_model();
        for kind in [LossKind::Clip, LossKind::Siglip] {
            let reference = reference_run(
                &loss_config(
                    kind,
                    Exchange::Lse,
                    TileSize::Untiled,
                    MicroBatch::default(),
                ),
                DType::F64,
            );
            for exchange in [Exchange::Lse, Exchange::GatherScatter] {
                let cfg = loss_config(kind, exchange, TileSize::Columns(5), MICRO_BATCH);
                let ranks = split_run_on(&gpu(), &model, 3, 2, &cfg, DType::F64);
                compare_f64(&format!("cuda 3x2 {kind} {exchange}"), &reference, &ranks);
            }
        }
    }
}

/// The same rank of two runs: identical losses, step 0's gradients and the final weights,
/// bit for bit.
fn assert_identical(label: &str, a: &Run, b: &Run) {
    assert_eq!(a.losses, b.losses, "{label}: losses");
    for (what, x, y) in [
        ("gradient", &a.grads, &b.grads),
        ("weights", &a.weights, &b.weights),
    ] {
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{label}: {what} names"
        );
        for (name, t) in x {
            if let Some((i, p, q)) = worst_violation(t, &y[name], 0.0, 0.0, Relative::Element) {
                panic!("{label}: {what} of {name}[{i}]: {p} vs {q}");
            }
        }
    }
}

/// The gradient sums' part of `o` (the features' gathers left out).
fn gradient_sums(o: &OverlapStats) -> OverlapStats {
    OverlapStats {
        buckets: o.buckets,
        during_backward: o.during_backward,
        busy: o.busy,
        ..OverlapStats::default()
    }
}

/// Where ranks hold both towers (plain data parallelism; a hybrid of image-only, text-only
/// and both), the image features gathered during the text forward, one gather per tower,
/// train bit for bit as one gather of both after the forwards, with and without
/// GradCache's micro-batches, and so equal one device; the gathers carry the same bytes.
/// Every rank that holds both starts its image features' gather before its text forward,
/// no other does; on a split, where no rank holds both, nothing changes.
#[test]
fn image_features_gathered_during_the_text_forward_equal_one_gather_bit_for_bit() {
    let model = test_model();
    let layouts = [
        super::common::cpu_layout(2, "0-1", "0-1"),
        super::common::cpu_layout(3, "0-1", "1-2"),
        cpu_topology(2, 1),
    ];
    for topology in &layouts {
        for micro_batch in [MicroBatch::default(), MICRO_BATCH] {
            let at = |feature_overlap| TrainConfig {
                feature_overlap,
                micro_batch,
                ..train_config(GLOBAL_BATCH)
            };
            let label = format!("{}, {micro_batch:?}", topology.describe_groups());
            let once = layout_run_on(&Device::Cpu, &model, topology, &at(false), DType::F64);
            let early = layout_run_on(&Device::Cpu, &model, topology, &at(true), DType::F64);
            for (rank, (a, e)) in once.iter().zip(&early).enumerate() {
                let label = format!("{label}: rank {rank}");
                assert_identical(&label, a, e);
                assert_eq!(
                    a.exchange_bytes, e.exchange_bytes,
                    "{label}: bytes gathered"
                );
                assert!(e.exchange_bytes > 0, "{label}: no bytes counted");
                assert_eq!(a.overlap.feature_gathers, 0, "{label}: one gather");
                let both = topology.ranks[rank].roles.len() == 2;
                assert_eq!(e.overlap.feature_gathers, usize::from(both), "{label}");
            }
            let reference = reference_run_of(&model, &at(true), DType::F64);
            compare_f64(&label, &reference, &early);
        }
    }
}

/// The gradient sums overlapped with backward, in buckets of every size (one tensor a
/// bucket, a few tensors, one bucket for all), with and without checkpointing, on the
/// split, on a large vocabulary's sparse table and on a layout where ranks hold both
/// towers: the gradients and the weights after 5 steps are bit for bit those of one sum
/// after backward (a sum is element-wise, and the thread backend sums in rank order), and
/// so equal one device. The buckets really go during backward.
#[test]
fn gradient_sums_overlapped_with_backward_equal_one_sum_after_it_bit_for_bit() {
    let vocabulary = ClipConfig::from_str(
        &super::common::TEST_MODEL.replace("vocab_size = 32", "vocab_size = 2000"),
        std::path::Path::new("vocab-2000.toml"),
    )
    .unwrap();
    let layouts = [
        (test_model(), cpu_topology(2, 2)),
        (vocabulary, cpu_topology(1, 3)),
        (test_model(), super::common::cpu_layout(3, "0-2", "1-2")),
    ];
    for (model, topology) in &layouts {
        for checkpointing in [false, true] {
            let at = |grad_overlap, grad_bucket_mb| TrainConfig {
                checkpointing,
                grad_overlap,
                grad_bucket_mb,
                ..train_config(GLOBAL_BATCH)
            };
            let after = layout_run_on(&Device::Cpu, model, topology, &at(false, 25.0), DType::F64);
            assert!(after
                .iter()
                .all(|r| gradient_sums(&r.overlap) == OverlapStats::default()));
            let reference = reference_run_of(model, &at(false, 25.0), DType::F64);
            // 1 byte: every tensor its own bucket; 2 kB: a few tensors each; 25 MB: one.
            for mb in [1e-6, 2e-3, 25.0] {
                let label = format!(
                    "{}, checkpointing {checkpointing}, buckets of {mb} MB",
                    topology.describe_groups()
                );
                let during =
                    layout_run_on(&Device::Cpu, model, topology, &at(true, mb), DType::F64);
                for (rank, (a, d)) in after.iter().zip(&during).enumerate() {
                    let label = format!("{label}: rank {rank}");
                    assert_identical(&label, a, d);
                    assert_eq!(
                        d.grad_all_reduce_bytes, a.grad_all_reduce_bytes,
                        "{label}: other bytes summed"
                    );
                    let (tensors, stats) = (d.grads.len(), gradient_sums(&d.overlap));
                    let shared = topology.ranks[rank]
                        .roles
                        .iter()
                        .any(|r| topology.group_size(r.tower) > 1);
                    if !shared {
                        // A group of one has nothing to sum.
                        assert_eq!(stats, OverlapStats::default(), "{label}");
                    } else if mb < 1e-3 {
                        // A bucket per tensor (but the loss's scalars and the sparse
                        // table, which goes after), every one handed over during backward.
                        assert!(
                            stats.buckets >= tensors / 2 && stats.during_backward == stats.buckets,
                            "{label}: {stats:?} for {tensors} tensors"
                        );
                    } else if mb > 1.0 {
                        assert!(
                            stats.during_backward == 0 && stats.buckets >= 1,
                            "{label}: {stats:?}"
                        );
                    } else {
                        assert!(
                            stats.during_backward >= 2 && stats.buckets < tensors / 2,
                            "{label}: {stats:?} for {tensors} tensors"
                        );
                    }
                }
                compare_f64(&label, &reference, &during);
            }
        }
    }
}
