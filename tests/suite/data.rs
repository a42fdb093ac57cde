//! The data pipeline on real photos: shards, the global order split by modality, image
//! transforms, bad input, resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
use mmpipe::data::order::{GlobalStream, OrderConfig};
use mmpipe::data::pipeline::{Assembler, Materialiser, PipelineConfig, RankData, SampleOrder};
use mmpipe::data::shards::{expand_braces, resolve, scan, write_shard, SampleMembers, SkipCause};
use mmpipe::data::transform::{Crop, ImageTransform, CLIP_MEAN, CLIP_STD};
use mmpipe::data::{DataConfig, DataKind, Stream, SyntheticSource, TextTokenizer};
use mmpipe::loss::{Exchange, LossConfig, LossKind};
use mmpipe::model::ClipConfig;
use mmpipe::topology::{Topology, Tower};
use mmpipe::train::{RankTrainer, TrainConfig};

use rand::{Rng, SeedableRng};

use super::common::{batch, cpu_topology, scalar, test_model, train_config, Reference};

/// 22 real photos and scans (PNG and JPEG, colour, grey and alpha) with captions, at 128
/// pixels on their longer side (tests/fixtures/README.md).
fn real_shard() -> PathBuf {
    PathBuf::from("tests/fixtures/real-photos.tar")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmpipe-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A short unevaluated run of `steps` steps at `global_batch` on `data`.
fn quiet_run(steps: usize, global_batch: usize, data: DataConfig) -> TrainConfig {
    TrainConfig {
        steps,
        global_batch,
        eval: mmpipe::train::config::EvalConfig {
            every: 0,
            pairs: 0,
            sets: Vec::new(),
        },
        progress: false,
        data,
        ..TrainConfig::default()
    }
}

/// Shards named by `patterns` relative to `dir`, in their own order.
fn shards_in(dir: &Path, patterns: &[&str]) -> DataConfig {
    DataConfig {
        kind: DataKind::Webdataset,
        shards: patterns.iter().map(|p| p.to_string()).collect(),
        shuffle_buffer: 1,
        base_dir: dir.to_path_buf(),
        ..DataConfig::default()
    }
}

/// The real shard's samples as `(key, [(extension, bytes)])`.
fn real_samples() -> Vec<SampleMembers> {
    let shard = real_shard();
    scan(&shard)
        .samples
        .iter()
        .map(|s| {
            let members = s
                .members
                .iter()
                .map(|m| (m.extension.clone(), s.read(m).unwrap()))
                .collect();
            (s.key.clone(), members)
        })
        .collect()
}

#[test]
fn brace_patterns_expand_like_a_shell() {
    assert_eq!(
        expand_braces("data/{008..011}.tar").unwrap(),
        [
            "data/008.tar",
            "data/009.tar",
            "data/010.tar",
            "data/011.tar"
        ]
    );
    assert_eq!(
        expand_braces("{a,b}/{0..1}.tar").unwrap(),
        ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    );
    assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
    for bad in [
        "data/{3..1}.tar",
        "data/{1..x}.tar",
        "data/{0..3.tar",
        "data/0}.tar",
    ] {
        assert!(expand_braces(bad).is_err(), "{bad} was accepted");
    }
}

#[test]
fn a_pattern_that_matches_nothing_is_an_error_naming_the_field() {
    let dir = temp_dir("resolve");
    write_shard(&dir.join("000.tar"), &real_samples()[..2]).unwrap();
    let found = resolve(
        &["{000..000}.tar".into()],
        &dir,
        Path::new("cfg.toml"),
        "data.shards",
    )
    .unwrap();
    assert_eq!(found, [dir.join("000.tar")]);
    let err = resolve(
        &["000.tar".into(), "{000..002}.tar".into()],
        &dir,
        Path::new("cfg.toml"),
        "data.shards",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cfg.toml")
            && err.contains("data.shards[1]")
            && err.contains("2 shard(s) not found"),
        "{err}"
    );
}

#[test]
fn the_real_shard_scans_into_22_complete_pairs() {
    let s = scan(&real_shard());
    assert!(s.stopped.is_none());
    assert_eq!(s.samples.len(), 22);
    for (i, sample) in s.samples.iter().enumerate() {
        assert_eq!(sample.key, format!("{i:06}"));
        assert!(sample.structural_problem().is_none(), "{}", sample.key);
        let caption = String::from_utf8(sample.read(sample.caption().unwrap()).unwrap()).unwrap();
        assert!(!caption.trim().is_empty());
    }
}

#[test]
fn every_real_photo_decodes_to_normalised_pixels() {
    let t = ImageTransform::clip(32, Crop::Centre);
    for sample in scan(&real_shard()).samples {
        let bytes = sample.read(sample.image().unwrap()).unwrap();
        let px = t
            .apply(&bytes, 0)
            .unwrap_or_else(|e| panic!("{}: {e}", sample.key));
        assert_eq!(px.len(), 3 * 32 * 32);
        let lo = (0..3)
            .map(|c| -CLIP_MEAN[c] / CLIP_STD[c])
            .fold(f32::INFINITY, f32::min);
        let hi = (0..3)
            .map(|c| (1.0 - CLIP_MEAN[c]) / CLIP_STD[c])
            .fold(0.0, f32::max);
        assert!(px
            .iter()
            .all(|v| v.is_finite() && *v >= lo - 1e-4 && *v <= hi + 1e-4));
        let mean = px.iter().sum::<f32>() / px.len() as f32;
        let var = px.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / px.len() as f32;
        assert!(
            var > 0.01,
            "{}: a photo is not flat (variance {var})",
            sample.key
        );
    }
}

#[test]
fn a_flat_colour_comes_out_as_its_normalised_value_and_crops_are_where_they_should_be() {
    let img = image::RgbImage::from_pixel(300, 200, image::Rgb([200, 100, 50]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let t = ImageTransform::clip(16, Crop::Centre);
    let px = t.apply(&png, 0).unwrap();
    for (c, v) in [200.0, 100.0, 50.0].iter().enumerate() {
        let want = (v / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        for got in &px[c * 256..(c + 1) * 256] {
            assert!((got - want).abs() < 1e-5, "channel {c}: {got} vs {want}");
        }
    }
    // The centre crop is the largest centred square.
    assert_eq!(t.crop_box(300, 200, 0), (50, 0, 200, 200));
    // The random crop stays inside, keeps 90–100% of the area, and replays by seed.
    let r = ImageTransform::clip(16, Crop::OPENCLIP_TRAIN);
    for (w0, h0) in [(300, 280), (300, 200), (120, 400)] {
        for seed in 0..50 {
            let (x, y, w, h) = r.crop_box(w0, h0, seed);
            assert!(x + w <= w0 && y + h <= h0);
            let area = (w * h) as f64 / (w0 * h0) as f64;
            let aspect = w as f64 / h as f64;
            // Inside the scale range, or torchvision's fallback: the widest centred box
            // of an allowed aspect ratio.
            assert!(
                (0.9 - 1e-2..=1.0).contains(&area) || (0.74..=1.34).contains(&aspect),
                "{w0}x{h0}: area fraction {area}, aspect {aspect}"
            );
            assert_eq!(r.crop_box(w0, h0, seed), (x, y, w, h));
        }
    }
    assert_ne!(r.crop_box(300, 280, 1), r.crop_box(300, 280, 2));
}

fn caption_assembler(tower: Tower, image_size: usize) -> Assembler {
    Assembler {
        tower,
        image_shape: (3, image_size, image_size),
        norm: ImageTransform::clip(image_size, Crop::Centre).norm(),
        bytes_to_device: false,
        tokenizer: Arc::new(TextTokenizer::clip()),
        context: 16,
        upload: None,
    }
}

/// A rank's tower, group rank, and per step its keys and validity.
type RankKeys = (Tower, usize, Vec<Vec<String>>, Vec<Vec<bool>>);

/// Every rank's keys for `steps` batches of `global_batch`, from its own pipeline.
fn keys_per_rank(
    shards: &[PathBuf],
    image: usize,
    text: usize,
    global_batch: usize,
    steps: usize,
) -> Vec<RankKeys> {
    let topology = cpu_topology(image, text);
    topology
        .ranks
        .iter()
        .map(|r| {
            // A split: every rank holds one tower.
            let r = r.roles[0];
            let size = topology.group_size(r.tower);
            let offset = mmpipe::topology::layout::split_offset(global_batch, size, r.group_rank);
            let len = mmpipe::topology::layout::split_len(global_batch, size, r.group_rank);
            let order = SampleOrder::Shards(Box::new(GlobalStream::new(
                shards.to_vec(),
                OrderConfig {
                    seed: 3,
                    shuffle_buffer: 5,
                    resample: false,
                },
            )));
            let materialiser = match r.tower {
                Tower::Image => {
                    Materialiser::ShardImages(ImageTransform::clip(16, Crop::Centre), None)
                }
                Tower::Text => Materialiser::ShardCaptions,
            };
            let data = RankData::spawn(
                order,
                offset,
                len,
                global_batch,
                Arc::new(materialiser),
                caption_assembler(r.tower, 16),
                PipelineConfig {
                    workers: 3,
                    prefetch: 2,
                    seed: 3,
                    start_step: 0,
                },
            );
            let (mut keys, mut valid) = (Vec::new(), Vec::new());
            for step in 0..steps {
                let b = data.next().unwrap();
                assert_eq!(b.step, step as u64);
                assert_eq!(b.input.len().unwrap(), len);
                keys.push(b.keys);
                valid.push(b.valid);
            }
            (r.tower, r.group_rank, keys, valid)
        })
        .collect()
}

/// The real shard cut into three shards of 7, 7 and 8 samples.
fn three_shards(dir: &Path) -> Vec<PathBuf> {
    let samples = real_samples();
    let cuts = [(0, 7), (7, 14), (14, 22)];
    cuts.iter()
        .enumerate()
        .map(|(i, &(a, b))| {
            let p = dir.join(format!("{i:03}.tar"));
            write_shard(&p, &samples[a..b]).unwrap();
            p
        })
        .collect()
}

#[test]
fn image_and_text_ranks_see_the_same_keys_at_every_step_on_unequal_groups() {
    let dir = temp_dir("pairs");
    let shards = three_shards(&dir);
    // 7 steps of 6 cross the 22-sample epoch boundary once.
    for (image, text) in [(2, 1), (1, 3), (3, 2)] {
        let ranks = keys_per_rank(&shards, image, text, 6, 7);
        let side = |tower: Tower| -> Vec<Vec<String>> {
            let mut of_tower: Vec<_> = ranks.iter().filter(|r| r.0 == tower).collect();
            of_tower.sort_by_key(|r| r.1);
            (0..7)
                .map(|step| of_tower.iter().flat_map(|r| r.2[step].clone()).collect())
                .collect()
        };
        let (img, txt) = (side(Tower::Image), side(Tower::Text));
        assert_eq!(
            img, txt,
            "{image}x{text}: the two modalities disagree on the pairs"
        );
        let all: Vec<&String> = img.iter().flatten().collect();
        assert_eq!(all.len(), 42);
        // The shuffle buffer mixes shards: the first batch is not just shard 0 in order.
        assert_ne!(
            img[0],
            ["000000", "000001", "000002", "000003", "000004", "000005"]
        );
        // Each epoch holds every sample exactly once (the buffer drains at its end), and
        // the second epoch starts in another order.
        for epoch in [&all[..22], &all[22..42]] {
            let mut keys: Vec<&String> = epoch.to_vec();
            keys.sort();
            keys.dedup();
            assert_eq!(
                keys.len(),
                epoch.len(),
                "{image}x{text}: an epoch repeats a sample"
            );
        }
        assert_ne!(
            all[..20],
            all[22..42],
            "{image}x{text}: epochs share an order"
        );
        for r in &ranks {
            assert!(r.3.iter().flatten().all(|&v| v), "real photos all decode");
        }
    }
}

#[test]
fn resuming_at_a_position_gives_exactly_the_samples_that_came_next() {
    let dir = temp_dir("resume");
    let shards = three_shards(&dir);
    let cfg = OrderConfig {
        seed: 11,
        shuffle_buffer: 4,
        resample: false,
    };
    let mut straight = GlobalStream::new(shards.clone(), cfg);
    let keys: Vec<String> = (0..60)
        .map(|_| straight.next_sample().unwrap().key)
        .collect();
    for at in [0u64, 1, 21, 22, 37] {
        let mut resumed = GlobalStream::new(shards.clone(), cfg);
        resumed.skip(at).unwrap();
        assert_eq!(resumed.position, at);
        let next: Vec<String> = (0..10)
            .map(|_| resumed.next_sample().unwrap().key)
            .collect();
        assert_eq!(next, keys[at as usize..at as usize + 10], "resumed at {at}");
    }
    // Resampling draws shards with replacement, still the same on every replay.
    let resample = OrderConfig {
        resample: true,
        ..cfg
    };
    let a: Vec<String> = {
        let mut s = GlobalStream::new(shards.clone(), resample);
        (0..30).map(|_| s.next_sample().unwrap().key).collect()
    };
    let mut s = GlobalStream::new(shards, resample);
    let b: Vec<String> = (0..30).map(|_| s.next_sample().unwrap().key).collect();
    assert_eq!(a, b);
}

/// A shard with every kind of damage, and good pairs around it.
fn damaged_shards(dir: &Path) -> Vec<PathBuf> {
    let good = real_samples();
    let caption = |s: &str| ("txt".to_string(), s.as_bytes().to_vec());
    let jpeg = good[3].1.iter().find(|m| m.0 == "jpg").unwrap().1.clone();
    let mut samples: Vec<SampleMembers> = good[..6].to_vec();
    samples.push((
        "corrupt".into(),
        vec![
            ("jpg".into(), b"not a jpeg at all".to_vec()),
            caption("garbage"),
        ],
    ));
    samples.push((
        "cut".into(),
        vec![
            ("jpg".into(), jpeg[..jpeg.len() / 3].to_vec()),
            caption("half a rocket"),
        ],
    ));
    samples.push(("nocaption".into(), vec![("jpg".into(), jpeg.clone())]));
    samples.push((
        "blank".into(),
        vec![("jpg".into(), jpeg.clone()), caption("   \n")],
    ));
    samples.push(("noimage".into(), vec![caption("a caption alone")]));
    samples.extend(good[6..12].iter().cloned());
    let damaged = dir.join("000.tar");
    write_shard(&damaged, &samples).unwrap();
    // A second shard cut off in the middle of a member.
    let truncated = dir.join("001.tar");
    write_shard(&truncated, &good[12..22]).unwrap();
    let len = std::fs::metadata(&truncated).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap();
    f.set_len(len * 2 / 3).unwrap();
    vec![damaged, truncated]
}

#[test]
fn damaged_samples_are_skipped_counted_by_cause_and_the_run_goes_on() {
    let dir = temp_dir("damaged");
    let shards = damaged_shards(&dir);
    let scan_cut = scan(&shards[1]);
    assert_eq!(
        scan_cut.stopped.as_ref().map(|s| s.0),
        Some(SkipCause::TruncatedShard)
    );
    assert!(!scan_cut.samples.is_empty() && scan_cut.samples.len() < 10);

    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let cfg = quiet_run(
        6,
        4,
        DataConfig {
            workers: 2,
            ..shards_in(&dir, &["{000..001}.tar"])
        },
    );
    let report = mmpipe::train::train(&cpu_topology(2, 1), &model, &cfg).unwrap();
    assert_eq!(report.losses.len(), 6);
    assert!(report.losses.iter().all(|l| l.is_finite()));
    let image = {
        let mut s = report.skipped[0].clone();
        s.merge(&report.skipped[1]);
        s
    };
    let text = &report.skipped[2];
    // Header problems, seen by every rank alike (once per epoch the order passes them).
    for cause in [
        SkipCause::MissingCaption,
        SkipCause::MissingImage,
        SkipCause::TruncatedShard,
    ] {
        let seen: Vec<u64> = report.skipped.iter().map(|s| s.get(cause)).collect();
        assert!(
            seen[0] >= 1 && seen.iter().all(|&n| n == seen[0]),
            "{cause:?}: {seen:?}"
        );
    }
    // Content problems, seen by the modality that reads them (24 samples cover the 19
    // complete pairs at least once). A JPEG cut short still decodes (the missing rows
    // come out grey), as with Pillow's LOAD_TRUNCATED_IMAGES; bytes that are no JPEG
    // do not.
    assert!(image.get(SkipCause::CorruptImage) >= 1, "{image}");
    assert_eq!(image.get(SkipCause::EmptyCaption), 0, "{image}");
    assert!(text.get(SkipCause::EmptyCaption) >= 1, "{text}");
    assert_eq!(
        text.get(SkipCause::CorruptImage),
        0,
        "text ranks never decode images: {text}"
    );
}

#[test]
fn a_pattern_with_no_shard_stops_training_before_it_starts() {
    let cfg = TrainConfig {
        data: DataConfig {
            kind: DataKind::Webdataset,
            shards: vec!["nowhere/{0..9}.tar".into()],
            origin: "run.toml".into(),
            ..DataConfig::default()
        },
        ..train_config(4)
    };
    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let err = mmpipe::train::train(&cpu_topology(1, 1), &model, &cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("run.toml") && err.contains("data.shards[0]"),
        "{err}"
    );
}

/// Dropping pairs keeps the loss exact: a step where one image failed equals one device
/// on the batch without that pair; so does one where a rank could read none of its slice,
/// on a split and where a rank holds both towers (its image features gathered during its
/// text forward, and a rank that adds no rows to the gather).
#[test]
fn a_step_without_an_unreadable_pair_equals_one_device_on_the_rest() {
    let model = test_model();
    let hybrid = || super::common::cpu_layout(3, "0-1", "1-2");
    let loss = |kind, exchange| LossConfig {
        kind,
        exchange,
        ..LossConfig::default()
    };
    let clip = loss(LossKind::Clip, Exchange::Lse);
    let mut cases: Vec<(Topology, Vec<u64>, LossConfig)> = vec![
        // Image rank 0's fourth sample.
        (cpu_topology(2, 1), vec![3], clip),
        (hybrid(), vec![3], clip),
    ];
    // Image rank 0's whole slice, under every loss and exchange.
    for kind in [LossKind::Clip, LossKind::Siglip] {
        for exchange in [Exchange::Lse, Exchange::GatherScatter] {
            cases.push((hybrid(), (0..6).collect(), loss(kind, exchange)));
        }
    }
    for (topology, dropped, loss) in &cases {
        let cfg = TrainConfig {
            loss: *loss,
            ..train_config(12)
        };
        let source = SyntheticSource::new(cfg.seed, &model).unwrap();
        let reference = Reference::with_loss(&model, cfg.seed, DType::F64, loss.kind);
        let label = format!(
            "{}, dropped {dropped:?}, {} {}",
            topology.describe_groups(),
            loss.kind,
            loss.exchange
        );
        let kept: Vec<u64> = (0..12).filter(|i| !dropped.contains(i)).collect();
        let (images, texts) = batch(&source, &kept, DType::F64);
        let (want_loss, want_grads) = reference.grads(&images, &texts);
        let runs = run_ranks(topology, DEFAULT_TIMEOUT, |rank, comms| {
            let trainer = RankTrainer::new(topology, rank, &model, &cfg, DType::F64, &Device::Cpu)?;
            let mut inputs = Vec::new();
            let mut valid = Vec::new();
            for t in &trainer.towers {
                let indices = super::common::slice_indices(t, 0, 12);
                inputs.push(source.tower_input(t.tower, Stream::Train, &indices, &Device::Cpu)?);
                valid.push(
                    indices
                        .iter()
                        .map(|i| !dropped.contains(i))
                        .collect::<Vec<_>>(),
                );
            }
            let reads: Vec<_> = valid
                .iter()
                .map(|v| mmpipe::train::Readable::valid_only(v))
                .collect();
            let g = trainer.compute_grads(&comms, &inputs, Some(&reads))?;
            let names: Vec<String> = trainer
                .towers
                .iter()
                .flat_map(|t| {
                    t.trainable()
                        .names()
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                })
                .collect();
            Ok((g.loss, names, g.grads.concat()))
        })
        .unwrap();
        for (rank, (loss, names, grads)) in runs.iter().enumerate() {
            assert!(
                (loss - want_loss).abs() < 1e-10,
                "{label}: rank {rank}: {loss} vs {want_loss}"
            );
            for (name, g) in names.iter().zip(grads) {
                let want = &want_grads[name];
                let diff = scalar(&(g - want).unwrap().abs().unwrap().max_all().unwrap());
                let size = scalar(&want.abs().unwrap().max_all().unwrap());
                assert!(
                    diff <= 1e-10 * size.max(1e-12),
                    "{label}: rank {rank} {name}: off by {diff}"
                );
            }
        }
    }
}

/// Ranks reading different data (another shard set on one node, or shards with other
/// contents at the same path) stop at the first step where an image and its caption are
/// not the same sample, naming the step and the position; matching keys train on.
#[test]
fn image_and_text_ranks_that_read_different_samples_stop_at_that_step() {
    let model = test_model();
    let cfg = train_config(12);
    let source = SyntheticSource::new(cfg.seed, &model).unwrap();
    let topology = cpu_topology(2, 1);
    for mismatched in [false, true] {
        let results = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
            let trainer =
                RankTrainer::new(&topology, rank, &model, &cfg, DType::F32, &Device::Cpu)?;
            let indices = super::common::slice_indices(&trainer.towers[0], 0, 12);
            let input = source.tower_input(
                trainer.towers[0].tower,
                Stream::Train,
                &indices,
                &Device::Cpu,
            )?;
            let valid = vec![true; indices.len()];
            // The text rank reads sample 7 from another shard.
            let keys: Vec<String> = indices
                .iter()
                .map(|&i| match (mismatched && rank == 2 && i == 7, i) {
                    (true, _) => "other.tar#000007".to_string(),
                    (false, i) => format!("shard-000000.tar#{i:06}"),
                })
                .collect();
            let read = mmpipe::train::Readable {
                step: 41,
                valid: &valid,
                keys: &keys,
            };
            Ok(trainer
                .compute_grads(&comms, std::slice::from_ref(&input), Some(&[read]))
                .map(|g| g.loss)
                .map_err(|e| e.to_string()))
        })
        .unwrap();
        for (rank, r) in results.iter().enumerate() {
            match (mismatched, r) {
                (false, Ok(loss)) => assert!(loss.is_finite()),
                (true, Err(e)) => assert!(
                    e.contains("step 41")
                        && e.contains("position 7")
                        && e.contains("different samples"),
                    "rank {rank}: {e}"
                ),
                _ => panic!("rank {rank}, mismatched {mismatched}: {r:?}"),
            }
        }
        if mismatched {
            assert!(
                results
                    .iter()
                    .any(|r| r.as_ref().is_err_and(|e| e.contains("other.tar#000007"))),
                "the rank that read it names the odd sample"
            );
        }
    }
}

/// Malformed inputs never panic: truncated and bit-flipped shards scan to fewer samples
/// or stop with a cause; mangled image bytes are an error, not a crash.
#[test]
fn mangled_shards_and_images_never_panic() {
    let bytes = std::fs::read(real_shard()).unwrap();
    let dir = temp_dir("fuzz");
    let path = dir.join("x.tar");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let t = ImageTransform::clip(8, Crop::OPENCLIP_TRAIN);
    let jpeg = real_samples()[3]
        .1
        .iter()
        .find(|m| m.0 == "jpg")
        .unwrap()
        .1
        .clone();
    for case in 0..120 {
        let mut b = bytes.clone();
        match case % 3 {
            0 => b.truncate(rng.random_range(0..b.len())),
            1 => {
                // Flip bytes in the first headers.
                for _ in 0..8 {
                    let i = rng.random_range(0..4096.min(b.len()));
                    b[i] ^= rng.random::<u8>() | 1;
                }
            }
            _ => {
                let i = rng.random_range(0..b.len());
                b.splice(
                    i..i,
                    (0..rng.random_range(1..2000)).map(|_| rng.random::<u8>()),
                );
            }
        }
        std::fs::write(&path, &b).unwrap();
        let s = scan(&path);
        assert!(s.samples.len() <= 40, "case {case}");
        for sample in s.samples.iter().take(3) {
            if let Some(m) = sample.image() {
                if let Ok(img) = sample.read(m) {
                    let _ = t.apply(&img, case);
                }
            }
        }
        let mut img = jpeg.clone();
        let cut = rng.random_range(0..img.len());
        img.truncate(cut);
        if !img.is_empty() {
            let i = rng.random_range(0..img.len());
            img[i] ^= 0x5a;
        }
        let _ = t.apply(&img, case);
    }
}

#[test]
fn a_tsv_of_image_paths_and_captions_becomes_shards_skipping_bad_rows() {
    use mmpipe::data::convert::{csv, inspect, CsvColumns};
    let dir = temp_dir("csv");
    let mut rows = String::from("path\tcaption\n");
    for (i, (key, members)) in real_samples().iter().take(5).enumerate() {
        let (ext, bytes) = members.iter().find(|m| m.0 != "txt").unwrap();
        let name = format!("images/{key}.{ext}");
        std::fs::create_dir_all(dir.join("images")).unwrap();
        std::fs::write(dir.join(&name), bytes).unwrap();
        let caption =
            String::from_utf8(members.iter().find(|m| m.0 == "txt").unwrap().1.clone()).unwrap();
        rows += &format!("{name}\t{}\n", if i == 1 { "  " } else { caption.trim() });
    }
    std::fs::write(dir.join("images/broken.jpg"), b"no jpeg").unwrap();
    rows += "images/missing.png\ta missing photo\nimages/broken.jpg\ta broken photo\n";
    let tsv = dir.join("pairs.tsv");
    std::fs::write(&tsv, rows).unwrap();
    let columns = CsvColumns {
        image: "path".into(),
        caption: "caption".into(),
        delimiter: None,
    };
    let (shards, samples, skipped) = csv(&tsv, &columns, &dir.join("out"), 3).unwrap();
    assert_eq!((shards.len(), samples), (2, 4));
    assert_eq!(skipped.get(SkipCause::EmptyCaption), 1);
    assert_eq!(skipped.get(SkipCause::MissingImage), 1);
    assert_eq!(skipped.get(SkipCause::CorruptImage), 1);
    let report = inspect(&shards[0], 3);
    assert_eq!((report.samples, report.complete), (3, 3));
    assert!(
        report.first[0].2.contains("128x128"),
        "{:?}",
        report.first[0]
    );
    // A column that is not there is named, with the columns that are.
    let wrong = CsvColumns {
        image: "file".into(),
        ..columns
    };
    let err = csv(&tsv, &wrong, &dir.join("out2"), 3)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pairs.tsv") && err.contains("file") && err.contains("path, caption"),
        "{err}"
    );
}

#[test]
fn synthetic_shards_train_like_any_other_shards() {
    use mmpipe::data::convert::synth;
    let dir = temp_dir("synth");
    let (shards, samples) = synth(&dir, 40, 16, 32, 0).unwrap();
    assert_eq!((shards.len(), samples), (3, 40));
    let s = scan(&shards[0]);
    assert_eq!(s.samples.len(), 16);
    // The PNG round trip keeps the rendered image to within one grey level.
    let t = ImageTransform::clip(32, Crop::Centre);
    let source = SyntheticSource::new(0, &test_model_32()).unwrap();
    let want = source
        .shapes
        .render(&source.shapes.sample(Stream::Train, 0));
    let got = t
        .apply(
            &s.samples[0].read(s.samples[0].image().unwrap()).unwrap(),
            0,
        )
        .unwrap();
    let worst = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1.0 / (255.0 * 0.26) + 1e-4, "off by {worst}");
}

fn test_model_32() -> ClipConfig {
    ClipConfig::default_tiny()
}

/// Fashion-MNIST read from Debian's files: sizes, labels, captions; and a few training
/// steps on it through the pipeline. (`scripts/fetch-fixtures.sh` installs the package.)
#[test]
fn fashion_mnist_loads_as_real_labelled_images_and_trains() {
    use mmpipe::data::fashion_mnist::{FashionMnist, Split, CLASSES, DEBIAN_DIR};
    let test = FashionMnist::load(Path::new(DEBIAN_DIR), Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    let mut per_class = [0usize; 10];
    for i in 0..test.len() {
        per_class[test.label(i)] += 1;
    }
    assert_eq!(per_class, [1000; 10], "the test split is balanced");
    // The first test image is an ankle boot (label 9), as in the dataset's own docs.
    assert_eq!(CLASSES[test.label(0)], "ankle boot");
    assert_eq!(test.caption(0, 0), "a photo of a ankle boot.");
    let rgb = test.rgb(0);
    assert_eq!(rgb.len(), 28 * 28 * 3);
    assert!(rgb.iter().any(|&v| v > 200) && rgb.contains(&0));

    let err = FashionMnist::load(Path::new("/nonexistent"), Split::Test)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dataset-fashion-mnist"), "{err}");

    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let cfg = TrainConfig {
        steps: 3,
        global_batch: 16,
        eval: mmpipe::train::config::EvalConfig {
            every: 0,
            pairs: 0,
            sets: Vec::new(),
        },
        progress: false,
        data: DataConfig {
            kind: DataKind::FashionMnist,
            split: Split::Test,
            ..DataConfig::default()
        },
        ..TrainConfig::default()
    };
    let report = mmpipe::train::train(&cpu_topology(1, 2), &model, &cfg).unwrap();
    assert_eq!(report.losses.len(), 3);
    assert!(report.losses.iter().all(|l| l.is_finite()));
    assert!(report.skipped.iter().all(|s| s.total() == 0));
}

fn image_pipeline(shards: &[PathBuf], start_step: u64) -> RankData {
    let order = SampleOrder::Shards(Box::new(GlobalStream::new(
        shards.to_vec(),
        OrderConfig {
            seed: 9,
            shuffle_buffer: 5,
            resample: false,
        },
    )));
    RankData::spawn(
        order,
        2,
        3,
        6,
        Arc::new(Materialiser::ShardImages(
            ImageTransform::clip(8, Crop::OPENCLIP_TRAIN),
            None,
        )),
        caption_assembler(Tower::Image, 8),
        PipelineConfig {
            workers: 2,
            prefetch: 2,
            seed: 9,
            start_step,
        },
    )
}

#[test]
fn a_pipeline_resumed_at_a_step_gives_the_same_batches_bit_for_bit() {
    let dir = temp_dir("pipeline-resume");
    let shards = three_shards(&dir);
    let straight = image_pipeline(&shards, 0);
    let batches: Vec<_> = (0..7).map(|_| straight.next().unwrap()).collect();
    let resumed = image_pipeline(&shards, 4);
    for want in &batches[4..] {
        let got = resumed.next().unwrap();
        assert_eq!(got.step, want.step);
        assert_eq!(got.keys, want.keys);
        assert_eq!(got.position, want.position);
        // The random crops replay too: the same pixels.
        let (mmpipe::model::TowerInput::Images(a), mmpipe::model::TowerInput::Images(b)) =
            (&got.input, &want.input)
        else {
            panic!("images expected")
        };
        let diff = scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap());
        assert_eq!(diff, 0.0, "step {}", want.step);
    }
}

#[test]
fn mixed_sources_are_drawn_by_weight_the_same_way_every_time() {
    let dir = temp_dir("mix");
    let samples = real_samples();
    let a = dir.join("a.tar");
    write_shard(&a, &samples[..10]).unwrap();
    let b = dir.join("b.tar");
    let renamed: Vec<SampleMembers> = samples[10..]
        .iter()
        .map(|(k, m)| (format!("b/{k}"), m.clone()))
        .collect();
    write_shard(&b, &renamed).unwrap();
    let draw = || {
        let cfg = OrderConfig {
            seed: 1,
            shuffle_buffer: 1,
            resample: false,
        };
        let mut order = SampleOrder::mix(
            vec![
                GlobalStream::new(vec![a.clone()], cfg),
                GlobalStream::new(vec![b.clone()], cfg),
            ],
            &[3.0, 1.0],
            4,
        );
        (0..800)
            .map(|_| order.draw().unwrap().key())
            .collect::<Vec<_>>()
    };
    let keys = draw();
    let from_b = keys.iter().filter(|k| k.starts_with("b/")).count() as f64 / 800.0;
    assert!(
        (0.2..0.3).contains(&from_b),
        "source b drew {from_b:.3} of the samples, weight 0.25"
    );
    assert_eq!(keys, draw(), "the mixture replays");
}

#[test]
fn a_csv_of_paths_and_captions_trains_directly() {
    let dir = temp_dir("csv-train");
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut rows = String::from("filepath,title\n");
    for (key, members) in real_samples().iter().take(8) {
        let (ext, bytes) = members.iter().find(|m| m.0 != "txt").unwrap();
        std::fs::write(dir.join(format!("img/{key}.{ext}")), bytes).unwrap();
        let caption =
            String::from_utf8(members.iter().find(|m| m.0 == "txt").unwrap().1.clone()).unwrap();
        rows += &format!("img/{key}.{ext},\"{}\"\n", caption.trim());
    }
    rows += "img/absent.png,a photo that is not there\n";
    std::fs::write(dir.join("pairs.csv"), rows).unwrap();
    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let cfg = TrainConfig {
        steps: 4,
        global_batch: 6,
        eval: mmpipe::train::config::EvalConfig {
            every: 0,
            pairs: 0,
            sets: Vec::new(),
        },
        progress: false,
        data: DataConfig {
            kind: DataKind::Csv,
            csv: "pairs.csv".into(),
            base_dir: dir.clone(),
            ..DataConfig::default()
        },
        ..TrainConfig::default()
    };
    let report = mmpipe::train::train(&cpu_topology(1, 1), &model, &cfg).unwrap();
    assert!(report.losses.iter().all(|l| l.is_finite()));
    // 24 draws over 9 rows: the missing image is met and dropped on the image side.
    assert!(
        report.skipped[0].get(SkipCause::MissingImage) >= 1,
        "{}",
        report.skipped[0]
    );
    assert_eq!(report.skipped[1].total(), 0, "{}", report.skipped[1]);
}

#[test]
fn cached_squares_give_the_same_pixels_and_are_read_back_on_later_passes() {
    use mmpipe::data::cache::ImageCache;
    use mmpipe::data::pipeline::SampleRef;
    let dir = temp_dir("cache");
    let samples: Vec<SampleRef> = scan(&real_shard())
        .samples
        .into_iter()
        .map(SampleRef::Shard)
        .collect();
    let t = ImageTransform::clip(32, Crop::Centre);
    let cache = Arc::new(ImageCache::create(&dir.join("c.bin"), 32, samples.len()).unwrap());
    let plain = Materialiser::ShardImages(t, None);
    let cached = Materialiser::ShardImages(t, Some(cache.clone()));
    let pixels = |m: &Materialiser, s: &SampleRef| match m.item(s, 0) {
        Ok(mmpipe::data::pipeline::Item::Bytes(p)) => p,
        _ => panic!("an image's bytes"),
    };
    let mut worst = 0u8;
    for _pass in 0..2 {
        for s in &samples {
            let (a, b) = (pixels(&plain, s), pixels(&cached, s));
            assert_eq!(a.len(), 32 * 32 * 3);
            worst = worst.max(a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap());
        }
    }
    // One uint8 rounding of the resized square: at most one grey level.
    assert!(worst <= 1, "cached pixels differ by {worst} grey levels");
    assert_eq!(
        cache.stats(),
        (22, 22),
        "22 misses fill it, 22 hits read it back"
    );
}

/// `steps` of `global_batch` on a copy of the fixture photos in `dir` (`photos.tar`),
/// random crops, no evaluation; `data` sets the rest of the data section.
fn photo_training(dir: &Path, steps: usize, global_batch: usize, data: DataConfig) -> TrainConfig {
    std::fs::copy(real_shard(), dir.join("photos.tar")).unwrap();
    TrainConfig {
        steps,
        global_batch,
        eval: mmpipe::train::config::EvalConfig {
            every: 0,
            pairs: 0,
            sets: Vec::new(),
        },
        progress: false,
        data: DataConfig {
            kind: DataKind::Webdataset,
            shards: vec!["photos.tar".into()],
            random_crop: true,
            base_dir: dir.to_path_buf(),
            ..data
        },
        ..TrainConfig::default()
    }
}

#[test]
fn training_with_the_cache_runs_over_several_epochs() {
    let dir = temp_dir("cache-train");
    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let data = DataConfig {
        cache: Some("cache/images.bin".into()),
        ..DataConfig::default()
    };
    let cfg = photo_training(&dir, 4, 16, data);
    let report = mmpipe::train::train(&cpu_topology(2, 1), &model, &cfg).unwrap();
    assert!(report.losses.iter().all(|l| l.is_finite()));
    let size = std::fs::metadata(dir.join("cache/images.bin"))
        .unwrap()
        .len();
    assert_eq!(size, 22 * 64 * 64 * 3, "one 64x64 RGB square per sample");
}

/// A global batch with fewer than two readable pairs has no contrastive loss: every rank
/// skips the step alike, and the weights stay as they were.
#[test]
fn a_batch_with_fewer_than_two_readable_pairs_is_skipped_on_every_rank() {
    let model = test_model();
    let cfg = train_config(6);
    let source = SyntheticSource::new(cfg.seed, &model).unwrap();
    let topology = cpu_topology(1, 2);
    let outcomes = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
        let mut trainer =
            RankTrainer::new(&topology, rank, &model, &cfg, DType::F32, &Device::Cpu)?;
        let indices = super::common::slice_indices(&trainer.towers[0], 0, 6);
        let input = source.tower_input(
            trainer.towers[0].tower,
            Stream::Train,
            &indices,
            &Device::Cpu,
        )?;
        let before = trainer.towers[0]
            .params()
            .get("logit_scale")
            .unwrap()
            .as_tensor()
            .copy()?;
        // Only sample 4's image is readable on the image rank; every caption is.
        let valid: Vec<bool> = indices
            .iter()
            .map(|&i| trainer.towers[0].tower == Tower::Text || i == 4)
            .collect();
        let outcome = trainer.step(
            &comms,
            std::slice::from_ref(&input),
            Some(&[mmpipe::train::Readable::valid_only(&valid)]),
            1e-2,
        )?;
        let after = trainer.towers[0]
            .params()
            .get("logit_scale")
            .unwrap()
            .as_tensor()
            .copy()?;
        Ok((outcome.loss, scalar(&(after - before)?)))
    })
    .unwrap();
    for (rank, (loss, moved)) in outcomes.into_iter().enumerate() {
        assert!(loss.is_none(), "rank {rank} did not skip");
        assert_eq!(moved, 0.0, "rank {rank} updated its weights");
    }
}

#[test]
fn webp_members_decode_too() {
    let img = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 90])
    });
    let mut webp = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut webp),
        image::ImageFormat::WebP,
    )
    .unwrap();
    let dir = temp_dir("webp");
    let shard = dir.join("w.tar");
    write_shard(
        &shard,
        &[(
            "a".into(),
            vec![
                ("webp".into(), webp),
                ("txt".into(), b"a gradient".to_vec()),
            ],
        )],
    )
    .unwrap();
    let s = scan(&shard).samples.remove(0);
    assert_eq!(s.image().unwrap().extension, "webp");
    let px = ImageTransform::clip(8, Crop::Centre)
        .apply(&s.read(s.image().unwrap()).unwrap(), 0)
        .unwrap();
    assert_eq!(px.len(), 3 * 8 * 8);
    // The blue channel is flat at 90 after a lossless round trip.
    let want = (90.0 / 255.0 - CLIP_MEAN[2]) / CLIP_STD[2];
    assert!(px[128..].iter().all(|v| (v - want).abs() < 1e-5));
}

/// A PNG of nothing but a header claiming `w × h` pixels: a few dozen bytes that ask a
/// decoder for gigabytes.
fn huge_png_header(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        c.extend_from_slice(&body);
        c.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

/// Images over the size limits are refused before decoding, with the reason: a real
/// photo against small limits, and a 50-byte header asking for 10¹⁰ pixels against the
/// defaults; in training, such a sample is skipped and counted.
#[test]
fn images_over_the_size_limits_are_skipped_before_decoding() {
    use mmpipe::data::transform::{DecodeError, ImageLimits};
    let photo = real_samples()[3]
        .1
        .iter()
        .find(|m| m.0 == "jpg")
        .unwrap()
        .1
        .clone();
    let t = ImageTransform::clip(16, Crop::Centre);
    assert!(t.apply(&photo, 0).is_ok());
    let small = |max_pixels, max_bytes| {
        t.with_limits(ImageLimits {
            max_pixels,
            max_bytes,
        })
        .apply(&photo, 0)
        .unwrap_err()
    };
    assert!(
        matches!(small(1000, u64::MAX), DecodeError::TooLarge(m) if m.contains("data.max_image_pixels"))
    );
    assert!(
        matches!(small(u64::MAX, 100), DecodeError::TooLarge(m) if m.contains("data.max_image_bytes"))
    );
    let bomb = huge_png_header(100_000, 100_000);
    assert!(bomb.len() < 100);
    let err = t.apply(&bomb, 0).unwrap_err();
    assert!(
        matches!(&err, DecodeError::TooLarge(m) if m.contains("100000 × 100000")),
        "{err:?}"
    );
    assert_eq!(err.cause(), SkipCause::ImageTooLarge);

    // In a shard: skipped, counted, the run goes on.
    let dir = temp_dir("bomb");
    let mut samples: Vec<SampleMembers> = real_samples()[..7].to_vec();
    samples.insert(
        3,
        (
            "bomb".into(),
            vec![
                ("png".into(), bomb),
                ("txt".into(), b"a very large image".to_vec()),
            ],
        ),
    );
    write_shard(&dir.join("000.tar"), &samples).unwrap();
    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let cfg = quiet_run(2, 4, shards_in(&dir, &["000.tar"]));
    let report = mmpipe::train::train(&cpu_topology(1, 1), &model, &cfg).unwrap();
    assert_eq!(report.losses.len(), 2);
    assert_eq!(
        report.skipped[0].get(SkipCause::ImageTooLarge),
        1,
        "{}",
        report.skipped[0]
    );
}

/// A cache file one process holds is refused to a second (which would truncate the first's
/// mapped file under it: SIGBUS), and free again once the first is done.
#[test]
fn a_cache_file_in_use_is_refused_to_a_second_user() {
    use mmpipe::data::cache::ImageCache;
    let dir = temp_dir("cache-lock");
    let path = dir.join("images.bin");
    let first = ImageCache::create(&path, 8, 4).unwrap();
    first.put("a", &[7u8; 8 * 8 * 3]);
    let err = ImageCache::create(&path, 8, 4)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("in use by another process") && err.contains("images.bin"),
        "{err}"
    );
    assert_eq!(
        first.get("a").unwrap()[0],
        7,
        "the first user's map is untouched"
    );
    drop(first);
    ImageCache::create(&path, 8, 4).unwrap();
}

/// A CSV whose images are all missing used to skip every step and exit 0 with an untrained
/// model: after `max_bad_steps` unreadable batches in a row the run stops, saying why.
#[test]
fn a_run_whose_data_cannot_be_read_stops_after_max_bad_steps() {
    let dir = temp_dir("csv-unreadable");
    let rows: String = std::iter::once("filepath,title\n".to_string())
        .chain((0..8).map(|i| format!("img/absent-{i}.png,a photo that is not there\n")))
        .collect();
    std::fs::write(dir.join("pairs.csv"), rows).unwrap();
    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let cfg = TrainConfig {
        max_bad_steps: 3,
        ..quiet_run(
            50,
            4,
            DataConfig {
                kind: DataKind::Csv,
                csv: "pairs.csv".into(),
                base_dir: dir.clone(),
                ..DataConfig::default()
            },
        )
    };
    let err = mmpipe::train::train(&cpu_topology(1, 1), &model, &cfg)
        .expect_err("the run stops")
        .to_string();
    assert!(
        err.contains("4 steps in a row")
            && err.contains("cannot be read")
            && err.contains("missing"),
        "{err}"
    );
}

/// `mmpipe data bench` drains the training loader's image pipeline on the real photos:
/// every batch whole, the workers counted, a rate; `--workers` reaches the pipeline.
#[test]
fn data_bench_measures_the_image_pipeline() {
    let run = |workers: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
            .args([
                "data",
                "bench",
                "--shards",
                "tests/fixtures/real-photos.tar",
            ])
            .args([
                "--model",
                "configs/clip-tiny-bpe.toml",
                "--workers",
                workers,
            ])
            .args([
                "--batch",
                "8",
                "--batches",
                "3",
                "--warmup",
                "1",
                "--format",
                "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // A training config's [data] and model reach it too: its workers, its shards.
    let dir = std::env::temp_dir().join(format!("mmpipe-data-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("train.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\n[data]\nkind = \"webdataset\"\nshards = [{:?}]\nworkers = 3\n",
            std::fs::canonicalize("configs/clip-tiny-bpe.toml").unwrap(),
            std::fs::canonicalize("tests/fixtures/real-photos.tar")
                .unwrap()
                .display()
                .to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(["data", "bench", "--config"])
        .arg(&config)
        .args(["--batch", "8", "--batches", "2", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["workers"].as_u64(), v["batches"].as_u64()),
        (Some(3), Some(2)),
        "{v}"
    );
    for workers in [1, 3] {
        let v = run(&workers.to_string());
        assert_eq!(v["workers"], workers, "{v}");
        assert_eq!(
            (v["batch"].as_u64(), v["batches"].as_u64()),
            (Some(8), Some(3))
        );
        assert_eq!(v["samples_failed"], 0, "{v}");
        let rate = v["images_per_s"].as_f64().unwrap();
        let per_batch = v["ms_per_batch"].as_f64().unwrap();
        assert!(rate > 0.0 && per_batch > 0.0, "{v}");
        // The rate is the batches' images over their time.
        assert!((rate * per_batch / 1e3 - 8.0).abs() < 1e-6, "{v}");
    }
}

/// A rank's pipeline hands every assembled batch to its upload (on a GPU, the copy onto
/// the device ahead of the step), on the assembler's thread, in step order; the batches
/// the step gets are what the upload returned.
#[test]
fn the_pipeline_uploads_every_batch_once_assembled() {
    use mmpipe::model::TowerInput;
    let uploads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = uploads.clone();
    let upload: mmpipe::data::pipeline::Upload = Box::new(move |input| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // A stand-in for the device copy that a test can see: the pixels widened.
        Ok(match input {
            TowerInput::Images(t) => TowerInput::Images(t.to_dtype(DType::F64)?),
            other => other,
        })
    });
    let pipeline = super::common::photo_pipeline(
        mmpipe::data::NormaliseOn::Auto,
        &Device::Cpu,
        4,
        Some(upload),
    );
    for step in 0..3 {
        let batch = pipeline.next().unwrap();
        assert_eq!(batch.step, step);
        match &batch.input {
            TowerInput::Images(t) => assert_eq!(t.dtype(), DType::F64, "step {step}"),
            _ => panic!("image batches expected"),
        }
    }
    assert!(uploads.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

/// Decoded images sent as bytes and normalised in the step (`data.normalise_on =
/// "device"`, a GPU's default) train exactly as floats normalised by the pipeline: the
/// same losses and, after the last step, the same weights, bit for bit, on a ViT and on a
/// ResNet (whose batch norms see every slot).
#[test]
fn images_normalised_on_the_device_train_as_on_the_host_bit_for_bit() {
    use mmpipe::data::NormaliseOn;
    let dir = temp_dir("normalise-on");
    let vit = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    // The tiny ResNet under the BPE text tower that shards' captions need.
    let resnet = ClipConfig {
        vision: ClipConfig::from_file(Path::new("configs/clip-tiny-resnet.toml"))
            .unwrap()
            .vision,
        ..vit.clone()
    };
    for (model, config) in [("vit", vit), ("resnet", resnet)] {
        let run = |normalise_on: NormaliseOn| {
            let out = dir.join(format!("{normalise_on:?}"));
            let _ = std::fs::remove_dir_all(&out);
            let data = DataConfig {
                normalise_on,
                ..DataConfig::default()
            };
            let cfg = TrainConfig {
                checkpoint_dir: Some(out.clone()),
                checkpoint_every: 3,
                ..photo_training(&dir, 3, 8, data)
            };
            let report = mmpipe::train::train(&cpu_topology(2, 1), &config, &cfg).unwrap();
            let weights = mmpipe::model::checkpoint::read_tensors(
                &out.join("step-00000003/image.safetensors"),
            )
            .unwrap();
            (report.losses, weights)
        };
        let (host_losses, host) = run(NormaliseOn::Host);
        let (device_losses, device) = run(NormaliseOn::Device);
        assert!(host_losses.iter().all(|l| l.is_finite()), "{model}");
        assert_eq!(host_losses, device_losses, "{model}: losses");
        assert_eq!(host.len(), device.len());
        for (name, t) in &host {
            let flat = |t: &candle_core::Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(flat(t), flat(&device[name]), "{model}: {name}");
        }
    }
}

/// `data.normalise_on` takes "auto", "host" or "device", and anything else is refused by
/// name, with the values it takes.
#[test]
fn normalise_on_is_read_and_a_wrong_value_is_refused() {
    let dir = temp_dir("normalise-on-config");
    let path = dir.join("train.toml");
    std::fs::write(&path, "[data]\nnormalise_on = \"device\"\n").unwrap();
    let cfg = TrainConfig::load(Some(&path), &[]).unwrap();
    assert_eq!(cfg.data.normalise_on, mmpipe::data::NormaliseOn::Device);
    assert!(mmpipe::data::NormaliseOn::Device.on_device(&Device::Cpu));
    assert!(!mmpipe::data::NormaliseOn::Auto.on_device(&Device::Cpu));
    // What a CPU rank's pipeline hands its step under each setting.
    use mmpipe::data::NormaliseOn;
    use mmpipe::model::TowerInput;
    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    for (normalise_on, bytes) in [
        (NormaliseOn::Auto, false),
        (NormaliseOn::Host, false),
        (NormaliseOn::Device, true),
    ] {
        let batch = super::common::photo_pipeline(normalise_on, &Device::Cpu, 4, None)
            .next()
            .unwrap();
        let side = model.image_size();
        match (&batch.input, bytes) {
            (TowerInput::Pixels { bytes, .. }, true) => {
                assert_eq!(bytes.dtype(), DType::U8);
                assert_eq!(bytes.dims(), &[4, side, side, 3]);
            }
            (TowerInput::Images(t), false) => assert_eq!(t.dims(), &[4, 3, side, side]),
            _ => panic!("{normalise_on:?}: the wrong kind of batch"),
        }
    }
    std::fs::write(&path, "[data]\nnormalise_on = \"gpu\"\n").unwrap();
    let err = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
    assert!(
        err.contains("normalise_on") && err.contains("gpu") && err.contains("host"),
        "{err}"
    );
}
