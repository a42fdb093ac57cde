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
    let (after, r) = report.evals.last().expect("rank 0 evaluates");
    assert_eq!(*after, 149, "the final evaluation follows the last step");
    assert_eq!(r.pairs, 256);
    assert!(r.chance < 0.02, "chance {}", r.chance);
    let (i2t, t2i) = r.recall_at_1();
    assert!(
        i2t > 0.5 && t2i > 0.5,
        "recall@1 image->text {i2t:.3}, text->image {t2i:.3} (chance {:.3})",
        r.chance
    );
    let (first, last) = (report.losses[0], *report.losses.last().unwrap());
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

/// A NaN in one rank's batch skips the step on every rank (no weight moves), and the
/// next step trains as usual.
#[test]
fn a_non_finite_step_is_skipped_everywhere_and_training_goes_on() {
    use super::common::batch_indices;
    use candle_core::{DType, Device, Tensor};
    use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
    use mmpipe::data::{Stream, SyntheticSource};
    use mmpipe::model::TowerInput;
    use mmpipe::train::{RankTrainer, SkipReason};

    let model = super::common::test_model();
    let cfg = super::common::train_config(8);
    let source = SyntheticSource::new(cfg.seed, &model).unwrap();
    let topology = super::common::cpu_topology(2, 1);
    let results = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
        let mut trainer =
            RankTrainer::new(&topology, rank, &model, &cfg, DType::F32, &Device::Cpu)?;
        let mut out = Vec::new();
        for step in 0..3 {
            let indices = batch_indices(
                step,
                8,
                trainer.towers[0].offset,
                trainer.towers[0].local_batch,
            );
            let mut input = source.tower_input(
                trainer.towers[0].tower,
                Stream::Train,
                &indices,
                &Device::Cpu,
            )?;
            if step == 1 && rank == 1 {
                if let TowerInput::Images(x) = &input {
                    input = TowerInput::Images((x * f64::NAN)?);
                }
            }
            let before: Vec<Tensor> = trainer.towers[0]
                .params()
                .iter()
                .map(|(_, v)| v.as_tensor().copy().unwrap())
                .collect();
            let o = trainer.step(&comms, std::slice::from_ref(&input), None, 1e-3)?;
            let moved = trainer.towers[0]
                .params()
                .iter()
                .zip(&before)
                .any(|((_, v), b)| {
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
            let tower = r["tower"].as_str().unwrap();
            let norm = r["grad_norm"][tower].as_f64().unwrap();
            assert!(norm.is_finite() && norm > 0.0, "grad_norm: {r}");
        }
        // The image ranks hold the same group-summed gradients.
        assert_eq!(
            ranks[0]["grad_norm"]["image"],
            ranks[1]["grad_norm"]["image"]
        );
    }
}

/// Every tensor of a checkpoint folder's parts (parameters, statistics, optimizer state).
fn checkpoint_tensors(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f64>> {
    let mut all = std::collections::BTreeMap::new();
    for part in ["image.safetensors", "text.safetensors"] {
        for (name, t) in mmpipe::model::checkpoint::read_tensors(&dir.join(part)).unwrap() {
            all.insert(format!("{part}/{name}"), super::common::values(&t));
        }
    }
    all
}

/// 10 steps of 8 samples saved into `dir` every 5, from `resume` if given.
fn ten_steps_saved_at_five(
    dir: &std::path::Path,
    resume: Option<std::path::PathBuf>,
) -> mmpipe::train::TrainConfig {
    mmpipe::train::TrainConfig {
        steps: 10,
        global_batch: 8,
        warmup: 2,
        checkpoint_dir: Some(dir.to_path_buf()),
        checkpoint_every: 5,
        resume,
        ..super::common::train_config(8)
    }
}

/// 10 steps straight, and 5 steps + resume + 5: the same losses, weights and optimizer
/// state, on synthetic data and on shards with random crops and a shuffle buffer, on
/// splits, data parallelism and a hybrid.
#[test]
fn resuming_from_a_checkpoint_is_exact() {
    let base = std::env::temp_dir().join(format!("mmpipe-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let shard = std::path::PathBuf::from("tests/fixtures/real-photos.tar");
    let bpe =
        mmpipe::model::ClipConfig::from_file(std::path::Path::new("configs/clip-tiny-bpe.toml"))
            .unwrap();
    let webdataset = mmpipe::data::DataConfig {
        kind: mmpipe::data::DataKind::Webdataset,
        shards: vec![std::fs::canonicalize(&shard).unwrap().display().to_string()],
        shuffle_buffer: 5,
        random_crop: true,
        ..mmpipe::data::DataConfig::default()
    };
    for (name, model, data, topology) in [
        (
            "synthetic",
            super::common::test_model(),
            mmpipe::data::DataConfig::default(),
            super::common::cpu_topology(2, 1),
        ),
        (
            "shards",
            bpe.clone(),
            webdataset.clone(),
            super::common::cpu_topology(1, 2),
        ),
        (
            "data-parallel",
            super::common::test_model(),
            mmpipe::data::DataConfig::default(),
            super::common::cpu_layout(2, "0-1", "0-1"),
        ),
        (
            "hybrid-shards",
            bpe,
            webdataset,
            super::common::cpu_layout(3, "0-2", "1-2"),
        ),
    ] {
        let run = |dir: &str, resume: Option<std::path::PathBuf>| {
            let cfg = mmpipe::train::TrainConfig {
                data: data.clone(),
                ..ten_steps_saved_at_five(&base.join(name).join(dir), resume)
            };
            mmpipe::train::train(&topology, &model, &cfg).unwrap()
        };
        // A run that stopped after step 5 left exactly the step-5 checkpoint behind.
        let straight = run("straight", None);
        let halfway = base.join(name).join("straight/step-00000005");
        let second = run("resumed", Some(halfway));
        assert_eq!(second.losses.len(), 5, "{name}");
        for (step, (a, b)) in straight.losses[5..].iter().zip(&second.losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * a.abs(),
                "{name} step {}: {a} vs {b}",
                step + 5
            );
        }
        let want = checkpoint_tensors(&base.join(name).join("straight/step-00000010"));
        let got = checkpoint_tensors(&base.join(name).join("resumed/step-00000010"));
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        );
        assert!(
            want.keys().any(|k| k.contains("optimizer.m.")),
            "optimizer state is saved"
        );
        for (k, w) in &want {
            let worst = w
                .iter()
                .zip(&got[k])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst <= 1e-6, "{name}: {k} differs by {worst}");
        }
    }
}

/// A checkpoint is a tower part per tower, whatever the layout that wrote it: a split
/// run's save resumes under data parallelism (and a data-parallel save on a split) and
/// continues with the losses the original layout would have had.
#[test]
fn a_save_resumes_on_another_layout() {
    let base = std::env::temp_dir().join(format!("mmpipe-relayout-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let model = super::common::test_model();
    let split = super::common::cpu_topology(2, 1);
    let dp = super::common::cpu_layout(2, "0-1", "0-1");
    for (name, first, second) in [("split-to-dp", &split, &dp), ("dp-to-split", &dp, &split)] {
        let run = |topology: &mmpipe::topology::Topology, dir: &str, resume| {
            let cfg = ten_steps_saved_at_five(&base.join(name).join(dir), resume);
            mmpipe::train::train(topology, &model, &cfg).unwrap()
        };
        let straight = run(first, "straight", None);
        let halfway = base.join(name).join("straight/step-00000005");
        let moved = run(second, "moved", Some(halfway));
        assert_eq!(moved.losses.len(), 5, "{name}");
        for (step, (a, b)) in straight.losses[5..].iter().zip(&moved.losses).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs(),
                "{name} step {}: {a} vs {b}",
                step + 5
            );
        }
    }
}

/// A save cut short leaves only a `.partial` folder: `latest` still names the previous
/// checkpoint, which loads; a resume with another batch size is refused by name.
#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint_loadable() {
    let dir = std::env::temp_dir().join(format!("mmpipe-atomic-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = mmpipe::train::TrainConfig {
        steps: 3,
        checkpoint_dir: Some(dir.clone()),
        ..super::common::train_config(8)
    };
    let topology = super::common::cpu_topology(1, 1);
    let model = super::common::test_model();
    mmpipe::train::train(&topology, &model, &cfg).unwrap();
    // What a kill during the next save leaves: a half-written folder.
    let partial = dir.join("step-00000006.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("image.safetensors"), b"half a file").unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap(),
        "step-00000003"
    );
    let resumed = mmpipe::train::TrainConfig {
        steps: 5,
        resume: Some("latest".into()),
        ..cfg.clone()
    };
    let report = mmpipe::train::train(&topology, &model, &resumed).unwrap();
    assert_eq!(report.losses.len(), 2, "steps 3 and 4 after the resume");
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap(),
        "step-00000005"
    );
    let other_batch = mmpipe::train::TrainConfig {
        global_batch: 4,
        steps: 6,
        ..resumed
    };
    let err = mmpipe::train::train(&topology, &model, &other_batch)
        .expect_err("another batch size cannot resume exactly")
        .to_string();
    assert!(
        err.contains("state.json") && err.contains("global_batch"),
        "{err}"
    );
}

/// Known answers: matching embeddings retrieve perfectly, a shuffled pairing sits near
/// chance; zero-shot on embeddings built from the class features scores 1.
#[test]
fn retrieval_and_zero_shot_metrics_give_the_known_answers() {
    use candle_core::{Device, Tensor};
    use mmpipe::eval::{recall_at_k, zero_shot_accuracy};
    let n = 200;
    let x = super::common::fixed_values(&[n, 16], 0.4);
    let x = x
        .broadcast_div(&x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap())
        .unwrap();
    let captions: Vec<String> = (0..n).map(|i| format!("caption {i}")).collect();
    let perfect = recall_at_k(&x, &x, &captions, &[1, 5, 10]).unwrap();
    assert_eq!(perfect, vec![(1, 1.0, 1.0), (5, 1.0, 1.0), (10, 1.0, 1.0)]);
    // Shuffled partners: recall@k about k/n.
    let perm: Vec<u32> = (0..n as u32).map(|i| (i * 71 + 13) % n as u32).collect();
    let shuffled = x
        .index_select(&Tensor::new(perm.as_slice(), &Device::Cpu).unwrap(), 0)
        .unwrap();
    let r = recall_at_k(&x, &shuffled, &captions, &[1, 10]).unwrap();
    assert!(r[0].1 <= 0.03 && r[1].1 <= 0.15, "{r:?}");
    // Zero-shot: images equal to their class feature plus a little noise.
    let classes = x.narrow(0, 0, 10).unwrap();
    let labels: Vec<usize> = (0..n).map(|i| i % 10).collect();
    let index = Tensor::new(
        labels
            .iter()
            .map(|&l| l as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &Device::Cpu,
    )
    .unwrap();
    let images = (classes.index_select(&index, 0).unwrap() + (x * 0.01).unwrap()).unwrap();
    assert_eq!(zero_shot_accuracy(&images, &classes, &labels).unwrap(), 1.0);
    let wrong: Vec<usize> = labels.iter().map(|l| (l + 1) % 10).collect();
    assert_eq!(zero_shot_accuracy(&images, &classes, &wrong).unwrap(), 0.0);
}

/// The linear probe on a case with a known answer: classes that a hyperplane separates are
/// told apart perfectly; labels unrelated to the features score near chance on new data.
#[test]
fn the_linear_probe_separates_separable_classes_and_not_noise() {
    use candle_core::{Device, Tensor};
    use mmpipe::eval::linear_probe;
    let (n, d, classes) = (300, 8, 3);
    let noise = super::common::fixed_values(&[n, d], 0.3)
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let labels: Vec<usize> = (0..n).map(|i| i % classes).collect();
    // Class c sits at +2 on axis c: far beyond the noise.
    let mut centres = vec![0f32; n * d];
    for (i, &l) in labels.iter().enumerate() {
        centres[i * d + l] = 2.0;
    }
    let x = (Tensor::from_vec(centres, (n, d), &Device::Cpu).unwrap() + &noise).unwrap();
    let (train, test) = (x.narrow(0, 0, 200).unwrap(), x.narrow(0, 200, 100).unwrap());
    let accuracy = linear_probe(&train, &labels[..200], &test, &labels[200..], classes).unwrap();
    assert_eq!(accuracy, 1.0);
    // Labels that ignore the features: nothing to learn that carries over.
    let scrambled: Vec<usize> = (0..n).map(|i| (i * 7 / 5) % classes).collect();
    let accuracy = linear_probe(
        &noise.narrow(0, 0, 200).unwrap(),
        &scrambled[..200],
        &noise.narrow(0, 200, 100).unwrap(),
        &scrambled[200..],
        classes,
    )
    .unwrap();
    assert!(accuracy < 0.6, "{accuracy}");
}

/// CRC-32C, bit by bit (Castagnoli, reflected 0x82F63B78): independent of the writer's
/// table-driven crate.
fn crc32c_by_bits(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn read_varint(bytes: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// The protocol-buffer fields of `bytes` as (field, wire type, payload): varints as their
/// value's bytes, fixed64/fixed32 and length-delimited as their bytes.
fn fields(bytes: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = read_varint(bytes, &mut at);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => read_varint(bytes, &mut at).to_le_bytes().to_vec(),
            1 => {
                at += 8;
                bytes[at - 8..at].to_vec()
            }
            2 => {
                let len = read_varint(bytes, &mut at) as usize;
                at += len;
                bytes[at - len..at].to_vec()
            }
            5 => {
                at += 4;
                bytes[at - 4..at].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, wire, payload));
    }
    out
}

/// One event: its step and its scalars.
pub type Event = (i64, Vec<(String, f32)>);

/// An event file's records, their CRCs checked: (step, [(tag, value)]) per event, and
/// the first record's file version.
pub fn read_events(path: &std::path::Path) -> (String, Vec<Event>) {
    let bytes = std::fs::read(path).unwrap();
    let masked = |d: &[u8]| crc32c_by_bits(d).rotate_right(15).wrapping_add(0xa282_ead8);
    let (mut at, mut version, mut events) = (0, String::new(), Vec::new());
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked(len_bytes), "length CRC at byte {at}");
        let data = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked(data), "data CRC at byte {at}");
        at += 16 + len;
        let mut step = 0i64;
        let mut values = Vec::new();
        for (field, _, payload) in fields(data) {
            match field {
                2 => step = i64::from_le_bytes(payload.try_into().unwrap()),
                3 => version = String::from_utf8(payload).unwrap(),
                5 => {
                    for (_, _, value) in fields(&payload) {
                        let (mut tag, mut v) = (String::new(), f32::NAN);
                        for (f, _, p) in fields(&value) {
                            match f {
                                1 => tag = String::from_utf8(p).unwrap(),
                                2 => v = f32::from_le_bytes(p.try_into().unwrap()),
                                _ => {}
                            }
                        }
                        values.push((tag, v));
                    }
                }
                _ => {}
            }
        }
        if !values.is_empty() {
            events.push((step, values));
        }
    }
    (version, events)
}

/// `--tensorboard DIR` writes TensorFlow event records (CRCs checked by an independent
/// CRC-32C) holding every number of the metrics lines at their steps: the loss, the
/// learning rate, each rank's phases and gradient norms, every evaluation. Where Python
/// has the `tensorboard` package (or `MMPIPE_TENSORBOARD_PYTHON` names one that has), its
/// own reader loads the loss too.
#[test]
fn tensorboard_event_files_hold_the_metrics() {
    let dir = std::env::temp_dir().join(format!("mmpipe-tb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (metrics, events_dir) = (dir.join("metrics.jsonl"), dir.join("tb"));
    let cfg = mmpipe::train::TrainConfig {
        steps: 4,
        metrics: Some(metrics.clone()),
        tensorboard: Some(events_dir.clone()),
        eval: mmpipe::train::config::EvalConfig {
            every: 2,
            pairs: 16,
            sets: Vec::new(),
        },
        ..super::common::train_config(8)
    };
    let topology = super::common::cpu_topology(2, 1);
    mmpipe::train::train(&topology, &super::common::test_model(), &cfg).unwrap();
    let files: Vec<_> = std::fs::read_dir(&events_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let (version, events) = read_events(&files[0]);
    assert_eq!(version, "brain.Event:2");
    let losses = super::common::metric_losses(&metrics);
    let scalar = |step: i64, tag: &str| {
        events
            .iter()
            .filter(|(s, _)| *s == step)
            .flat_map(|(_, v)| v)
            .find(|(t, _)| t == tag)
            .map(|(_, v)| *v)
    };
    for (step, loss) in losses.iter().enumerate() {
        assert_eq!(
            scalar(step as i64, "loss"),
            Some(*loss as f32),
            "step {step}"
        );
        for tag in [
            "lr",
            "logit_scale",
            "samples_per_s",
            "rank0/phases/forward_ms",
        ] {
            assert!(scalar(step as i64, tag).is_some(), "step {step}: no {tag}");
        }
        assert!(scalar(step as i64, "rank2/grad_norm/text").unwrap() > 0.0);
    }
    // The evaluations after steps 2 and 4 (0-based lines 1 and 3).
    for step in [1, 3] {
        let r1 = scalar(step, "eval/recall/image_to_text_r1").expect("an evaluation");
        assert!((0.0..=1.0).contains(&r1));
    }

    let python = std::env::var("MMPIPE_TENSORBOARD_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
         a = EventAccumulator({:?}); a.Reload()\n\
         print(' '.join(repr(e.value) for e in a.Scalars('loss')))\n",
        events_dir.display().to_string()
    );
    match std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
    {
        Ok(out) if out.status.success() => {
            let read: Vec<f32> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            let want: Vec<f32> = losses.iter().map(|&l| l as f32).collect();
            assert_eq!(read, want, "TensorBoard's own reader");
        }
        _ => eprintln!("note: no Python `tensorboard` package ({python}): its reader not run"),
    }
}
