//! The embedded default learns: `mmpipe train`'s run, on a schedule shortened for CI.

use mmpipe::model::ClipConfig;
use mmpipe::topology::Topology;
use mmpipe::train::{train, TrainConfig};

#[test]
fn default_run_retrieves_far_above_chance() {
    let cfg = TrainConfig {
        steps: 150,
        progress: false,
        ..TrainConfig::default()
    };
    let report = train(&Topology::default_cpu(), &ClipConfig::default_tiny(), &cfg).unwrap();
    let r = report.retrieval.expect("rank 0 evaluates");
    assert_eq!(r.pairs, 256);
    assert!(r.chance < 0.02, "chance {}", r.chance);
    assert!(
        r.image_to_text_r1 > 0.5 && r.text_to_image_r1 > 0.5,
        "recall@1 image->text {:.3}, text->image {:.3} (chance {:.3})",
        r.image_to_text_r1,
        r.text_to_image_r1,
        r.chance
    );
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}
