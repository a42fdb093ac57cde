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

/// A NaN in one rank's batch skips the step on every rank (no weight moves), and the
/// next step trains as usual.
#[test]
fn a_non_finite_step_is_skipped_everywhere_and_training_goes_on() {
    use candle_core::{DType, Device, Tensor};
    use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
    use mmpipe::data::{Stream, SyntheticSource};
    use mmpipe::model::TowerInput;
    use mmpipe::train::{batch_indices, RankTrainer, SkipReason};

    let model = super::common::test_model();
    let cfg = super::common::train_config(8);
    let source = SyntheticSource::new(cfg.seed, &model).unwrap();
    let topology = super::common::cpu_topology(2, 1);
    let results = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
        let mut trainer =
            RankTrainer::new(&topology, rank, &model, &cfg, DType::F32, &Device::Cpu)?;
        let mut out = Vec::new();
        for step in 0..3 {
            let indices = batch_indices(step, 8, trainer.offset, trainer.local_batch);
            let mut input =
                source.tower_input(trainer.tower, Stream::Train, &indices, &Device::Cpu)?;
            if step == 1 && rank == 1 {
                if let TowerInput::Images(x) = &input {
                    input = TowerInput::Images((x * f64::NAN)?);
                }
            }
            let before: Vec<Tensor> = trainer
                .params()
                .iter()
                .map(|(_, v)| v.as_tensor().copy().unwrap())
                .collect();
            let o = trainer.step(&comms, &input, None, 1e-3)?;
            let moved = trainer.params().iter().zip(&before).any(|((_, v), b)| {
                super::common::scalar(
                    &(v.as_tensor() - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap(),
                ) > 0.0
            });
            out.push((o.loss, o.skipped, moved));
        }
        Ok(out)
    })
    .unwrap();
    for (rank, steps) in results.iter().enumerate() {
        assert!(
            steps[0].0.is_some() && steps[0].2,
            "rank {rank}: step 0 trains"
        );
        assert!(
            matches!(steps[1].1, Some(SkipReason::NonFinite { .. })) && !steps[1].2,
            "rank {rank}: step 1 must be skipped without moving a weight"
        );
        assert!(
            steps[2].0.is_some_and(f64::is_finite) && steps[2].2,
            "rank {rank}: step 2 trains again"
        );
    }
}

#[test]
fn a_diverging_run_stops_with_a_clear_message() {
    let cfg = mmpipe::train::TrainConfig {
        lr: 1e9,
        warmup: 0,
        steps: 30,
        max_bad_steps: 2,
        ..super::common::train_config(8)
    };
    let err = mmpipe::train::train(
        &super::common::cpu_topology(1, 1),
        &super::common::test_model(),
        &cfg,
    )
    .expect_err("a learning rate of 1e9 diverges")
    .to_string();
    assert!(
        err.contains("3 steps in a row") && err.contains("lower the learning rate"),
        "{err}"
    );
}

/// The metrics file: valid JSON per line, one line per step, every rank with every phase,
/// and the losses the run reports.
#[test]
fn the_metrics_file_has_a_line_per_step_with_every_rank_and_phase() {
    let path = std::env::temp_dir().join(format!("mmpipe-metrics-{}/m.jsonl", std::process::id()));
    let cfg = mmpipe::train::TrainConfig {
        steps: 4,
        metrics: Some(path.clone()),
        ..super::common::train_config(8)
    };
    let report = mmpipe::train::train(
        &super::common::cpu_topology(2, 1),
        &super::common::test_model(),
        &cfg,
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 4);
    for (step, (line, loss)) in lines.iter().zip(&report.losses).enumerate() {
        assert_eq!(line["step"], step);
        assert_eq!(line["loss"].as_f64().unwrap(), *loss);
        for key in [
            "lr",
            "logit_scale",
            "samples_per_s",
            "step_ms",
            "samples_skipped",
        ] {
            assert!(line[key].is_number(), "step {step}: {key} missing: {line}");
        }
        let ranks = line["ranks"].as_array().unwrap();
        assert_eq!(ranks.len(), 3);
        for r in ranks {
            for phase in mmpipe::train::PhaseTimes::NAMES {
                let key = format!("{}_ms", phase.replace([' ', '-'], "_"));
                assert!(
                    r["phases"][&key].as_f64().is_some_and(|v| v >= 0.0),
                    "{key}: {r}"
                );
            }
            assert!(r["bytes"]["feature_exchange"].as_u64().unwrap() > 0);
        }
    }
}
