use std::path::Path;

use mmpipe::model::{ClipConfig, Encoder};
use mmpipe::plan::{CostOptions, Optimizer, Plan, Precision};
use mmpipe::topology::{Topology, Tower};

pub fn options(global_batch: usize) -> CostOptions {
    CostOptions {
        global_batch,
        loss: mmpipe::loss::LossConfig::default(),
        precision: Precision::Bf16,
        optimizer: Optimizer::Adamw,
        checkpointing: false,
        overlap: true,
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
fn plan_rejects_a_batch_the_groups_cannot_split() {
    let t = Topology::from_file(Path::new("topology/cpu-2x1.toml")).unwrap();
    let e = Plan::new(&t, &ClipConfig::default_tiny(), &options(7))
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
