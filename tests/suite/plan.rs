use std::path::Path;

use mmpipe::model::{ClipConfig, Encoder};
use mmpipe::plan::{CostOptions, Optimizer, Plan, Precision};
use mmpipe::topology::{Topology, Tower};

pub fn options(global_batch: usize) -> CostOptions {
    CostOptions {
        global_batch,
        loss: mmpipe::loss::LossConfig::default(),
        micro_batch: mmpipe::plan::MicroBatch::default(),
        precision: Precision::Bf16,
        grad_reduce: mmpipe::plan::GradReduce::Fp32,
        optimizer: Optimizer::Adamw,
        checkpointing: false,
        overlap: Some(25e6),
        feature_overlap: true,
        flash_attention: true,
        calibration: None,
    }
}

#[test]
fn four_by_four_plan_has_one_row_per_rank_with_its_slice() {
    let t = Topology::from_file(Path::new("topology/4x4.toml")).unwrap();
    let model = ClipConfig::default_tiny();
    let plan = Plan::new(&t, &model, &options(128)).unwrap();
    assert_eq!(plan.ranks.len(), 8);
    for r in &plan.ranks {
        assert_eq!(r.local_batch, 32);
        assert_eq!(
            r.tower,
            if r.global_rank < 4 {
                Tower::Image
            } else {
                Tower::Text
            }
        );
        assert_eq!(r.node, if r.global_rank < 4 { "node0" } else { "node1" });
    }
    let text = plan.render();
    for needle in [
        "node1",
        "cuda:3",
        "clip-text",
        "feature all-gather",
        "gradient all-reduce",
    ] {
        assert!(text.contains(needle), "plan lacks {needle}:\n{text}");
    }
}

#[test]
fn bytes_per_step_follow_from_batch_width_and_parameters() {
    let t = super::common::cpu_topology(2, 1);
    let model = ClipConfig::default_tiny();
    let plan = Plan::new(&t, &model, &options(12)).unwrap();
    let tr = &plan.traffic;
    // 12 image + 12 text features of embed_dim floats.
    assert_eq!(tr.feature_all_gather, 2 * 12 * model.embed_dim as u64 * 4);
    // lse: each group all-gathers one B-vector of normaliser partials per rank; every
    // rank also all-reduces three f64 scalars.
    assert_eq!(
        tr.loss_exchange,
        [(Tower::Image, 2 * 12 * 4 + 24), (Tower::Text, 12 * 4 + 24)]
    );
    // gather-scatter: a world reduce-scatter of 3 ranks' blocks, padded to the text rank's
    // 12 rows.
    let gs = &tr.loss_exchange_by_scheme[1];
    assert_eq!(gs.0, "gather-scatter");
    let world_buffer = 3 * 12 * model.embed_dim as u64 * 4 + 24;
    assert_eq!(
        gs.1,
        [(Tower::Image, world_buffer), (Tower::Text, world_buffer)]
    );
    let image_bytes = model.vision.size().num_params(model.embed_dim) as u64 * 4;
    assert_eq!(
        tr.grad_all_reduce,
        [(Tower::Image, image_bytes), (Tower::Text, 0)]
    );
    assert_eq!(tr.grad_ring_per_rank[0], (Tower::Image, image_bytes));
}

#[test]
fn parameter_counts_match_the_built_towers() {
    for model in [ClipConfig::default_tiny(), super::common::test_model()] {
        for (tower, expected) in [
            (
                Tower::Image,
                model.vision.size().num_params(model.embed_dim),
            ),
            (Tower::Text, model.text.size().num_params(model.embed_dim)),
        ] {
            let pb = mmpipe::model::cpu_builder(0);
            Encoder::new(&pb, &model, tower).unwrap();
            assert_eq!(pb.params().num_elements(), expected, "{tower}");
        }
    }
}

#[test]
fn plan_splits_any_batch_and_rejects_one_smaller_than_a_group() {
    let t = Topology::from_file(Path::new("topology/cpu-2x1.toml")).unwrap();
    let plan = Plan::new(&t, &ClipConfig::default_tiny(), &options(7)).unwrap();
    let slices: Vec<usize> = plan.ranks.iter().map(|r| r.local_batch).collect();
    assert_eq!(
        slices,
        vec![4, 3, 7],
        "image ranks 4 + 3, the text rank all 7"
    );
    let e = Plan::new(&t, &ClipConfig::default_tiny(), &options(1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("groups.image") && e.contains("cpu-2x1.toml"),
        "{e}"
    );
}

#[test]
fn temperature_constants_are_openclips() {
    assert!((mmpipe::model::LOGIT_SCALE_INIT - (1.0f64 / 0.07).ln()).abs() < 1e-15);
    assert!((mmpipe::model::LOGIT_SCALE_MAX - 100f64.ln()).abs() < 1e-15);
}

/// What the trainer's collectives actually carry (counted by the communicators) is what
/// the plan says, for every loss and exchange scheme, on a topology with unequal groups.
#[test]
fn measured_payload_per_step_equals_the_plan() {
    use candle_core::{DType, Device};
    use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
    use mmpipe::data::SyntheticSource;
    use mmpipe::loss::{Exchange, LossConfig, LossKind};
    use mmpipe::train::RankTrainer;

    let topology = super::common::cpu_topology(3, 2);
    let model = super::common::test_model();
    for (kind, exchange) in [
        (LossKind::Clip, Exchange::Lse),
        (LossKind::Clip, Exchange::GatherScatter),
        (LossKind::Siglip, Exchange::Lse),
        (LossKind::Siglip, Exchange::GatherScatter),
    ] {
        let loss = LossConfig {
            kind,
            exchange,
            ..LossConfig::default()
        };
        let cfg = mmpipe::train::TrainConfig {
            loss,
            ..super::common::train_config(12)
        };
        let plan = Plan::new(
            &topology,
            &model,
            &CostOptions {
                loss,
                ..options(12)
            },
        )
        .unwrap();
        let source = SyntheticSource::new(cfg.seed, &model).unwrap();
        let measured = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
            let mut trainer =
                RankTrainer::new(&topology, rank, &model, &cfg, DType::F32, &Device::Cpu)?;
            let inputs = super::common::slice_inputs(&trainer, &source, 0, 12)?;
            let outcome = trainer.step(&comms, &inputs, None, 1e-3)?;
            Ok((trainer.towers[0].tower, outcome.bytes))
        })
        .unwrap();
        let t = &plan.traffic;
        let of =
            |per: &[(Tower, u64); 2], tower: Tower| per.iter().find(|p| p.0 == tower).unwrap().1;
        for (rank, (tower, bytes)) in measured.into_iter().enumerate() {
            let label = format!("{kind} {exchange} rank {rank} ({tower})");
            assert_eq!(
                bytes.exchange, t.feature_all_gather,
                "{label}: feature all-gather"
            );
            assert_eq!(
                bytes.loss,
                of(&t.loss_exchange, tower),
                "{label}: loss exchange"
            );
            let planned = of(&t.grad_all_reduce, tower);
            if tower == Tower::Image {
                assert_eq!(
                    bytes.grad_all_reduce, planned,
                    "{label}: gradient all-reduce"
                );
            } else {
                // The token table travels as the rows of the tokens in use, which the plan
                // bounds by one row per token: here the actual union of the batch's.
                assert_eq!(
                    bytes.grad_all_reduce,
                    text_all_reduce_bytes(&source, &model, 12, plan.text_params),
                    "{label}: gradient all-reduce"
                );
                assert!(
                    bytes.grad_all_reduce <= planned,
                    "{label}: over the plan's bound"
                );
            }
        }
    }
}

/// f32 bytes of the text group's gradient all-reduce for a global batch of `batch`: a row
/// mask, then the token table as its rows in use, or whole when those are over half of it.
fn text_all_reduce_bytes(
    source: &mmpipe::data::SyntheticSource,
    model: &mmpipe::model::ClipConfig,
    batch: u64,
    params: usize,
) -> u64 {
    use mmpipe::model::TowerInput;
    let input = source
        .tower_input(
            Tower::Text,
            mmpipe::data::Stream::Train,
            &(0..batch).collect::<Vec<_>>(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
    let TowerInput::Captions { tokens, .. } = input else {
        panic!("captions expected")
    };
    let mut used: Vec<u32> = tokens.flatten_all().unwrap().to_vec1().unwrap();
    used.sort_unstable();
    used.dedup();
    let (rows, width, _) = model.text.size().token_table().unwrap();
    // The 0/1 row mask goes first either way.
    let elems = if used.len() * 2 > rows {
        params + rows
    } else {
        params - rows * width + used.len() * width + rows
    };
    4 * elems as u64
}

/// GradCache in the cost model: one micro-batch's activations instead of the slice's, and
/// one more forward pass; tiling: the loss's b × B block shrinks to b × tile.
#[test]
fn micro_batches_and_tiles_trade_memory_for_time_in_the_plan() {
    use mmpipe::loss::{LossConfig, TileSize};
    use mmpipe::plan::MicroBatch;
    let t = Topology::from_file(Path::new("topology/4x4.toml")).unwrap();
    let model = ClipConfig::from_file(Path::new("configs/ViT-B-16.toml")).unwrap();
    let estimate = |o: &CostOptions| {
        let split = Plan::new(&t, &model, o).unwrap().split.unwrap();
        let image = split
            .groups
            .iter()
            .find(|g| g.tower == Tower::Image)
            .unwrap()
            .clone();
        (split.step_s, image.memory)
    };
    let base = options(32768);
    let (step, memory) = estimate(&base);
    let accumulated = CostOptions {
        micro_batch: MicroBatch {
            image: Some(256),
            text: None,
        },
        ..base.clone()
    };
    let (step_acc, memory_acc) = estimate(&accumulated);
    assert!(
        (memory_acc.activations - memory.activations * 256.0 / 8192.0).abs() < 1.0,
        "{} vs {}",
        memory_acc.activations,
        memory.activations
    );
    assert!(step_acc > step, "the second forward costs time");
    let untiled = CostOptions {
        loss: LossConfig {
            tile: TileSize::Untiled,
            ..LossConfig::default()
        },
        ..base
    };
    let (_, memory_untiled) = estimate(&untiled);
    // b × B logits in four blocks of fp32 against b × tile.
    assert!(memory_untiled.loss > 4.0 * 8192.0 * 32768.0 * 4.0);
    assert!(memory.loss < memory_untiled.loss / 10.0);
}

/// A rank's memory column is its device's: where a rank holds both towers it counts
/// them once (a group's memory is already its fullest member's whole device), so on one
/// GPU holding both it is the device's, not twice it; on a split layout it is the
/// tower's group's; on a hybrid one, the rank's class's.
#[test]
fn a_rank_holding_both_towers_counts_its_memory_once() {
    let model = ClipConfig::default_tiny();
    let rank_memory = |path: &str| {
        let t = Topology::from_file(Path::new(path)).unwrap();
        let plan = Plan::new(&t, &model, &options(256)).unwrap();
        let split = plan.split.clone().expect("a cost model");
        (plan, split)
    };
    let (plan, split) = rank_memory("topology/gpu-1x1.toml");
    assert_eq!(split.classes.len(), 1);
    let device = split.classes[0].memory.total;
    assert_eq!(plan.ranks.len(), 2, "one rank, two towers");
    for r in &plan.ranks {
        assert_eq!(r.memory_bytes, Some(device), "{:?}", r.tower);
    }
    let (plan, split) = rank_memory("topology/4x4.toml");
    for r in &plan.ranks {
        let group = split.groups.iter().find(|g| g.tower == r.tower).unwrap();
        assert_eq!(r.memory_bytes, Some(group.memory.total));
    }
    let (plan, split) = rank_memory("topology/2node-8gpu-hybrid.toml");
    let class = |towers: &str| {
        split
            .classes
            .iter()
            .find(|c| c.towers == towers)
            .unwrap()
            .memory
            .total
    };
    let both: Vec<_> = plan
        .ranks
        .iter()
        .filter(|r| {
            plan.ranks
                .iter()
                .filter(|o| o.global_rank == r.global_rank)
                .count()
                == 2
        })
        .collect();
    assert_eq!(
        both.len(),
        2 * 4,
        "4 devices hold both towers, a row per tower"
    );
    for r in both {
        assert_eq!(r.memory_bytes, Some(class("image+text")));
    }
    for r in plan.ranks.iter().filter(|r| r.tower == Tower::Image) {
        if plan
            .ranks
            .iter()
            .filter(|o| o.global_rank == r.global_rank)
            .count()
            == 1
        {
            assert_eq!(r.memory_bytes, Some(class("image")));
        }
    }
}
