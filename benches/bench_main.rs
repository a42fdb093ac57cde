//! Criterion benches: `cargo bench` (one compute thread per rank: RAYON_NUM_THREADS=1 from
//! .cargo/config.toml). Everything runs on the CPU, so no device sync is needed before the
//! clock stops.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mmpipe::comm::thread::{group, DEFAULT_TIMEOUT};
use mmpipe::comm::{Communicator, GroupComms, RankComms};
use mmpipe::data::{Stream, SyntheticSource};
use mmpipe::loss::{
    clip_loss_reference, global_loss, LossConfig, LossKind, LossScalars, Side, TileSize,
};
use mmpipe::model::layers::l2_normalize;
use mmpipe::model::{cpu_builder, ClipConfig, Encoder};
use mmpipe::topology::layout::FeatureLayout;
use mmpipe::topology::Tower;

/// Thread-backend all-reduce: bytes/s against message size and rank count.
fn collectives(c: &mut Criterion) {
    let mut g = c.benchmark_group("all_reduce_threads");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for ranks in [2, 4] {
        for floats in [256usize, 16 * 1024, 1024 * 1024] {
            g.throughput(Throughput::Bytes((floats * 4) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{ranks}_ranks"), floats * 4),
                &floats,
                |b, &floats| {
                    b.iter_custom(|iters| {
                        let comms = group("bench", ranks, DEFAULT_TIMEOUT);
                        let handles: Vec<_> = comms
                            .into_iter()
                            .map(|c| {
                                std::thread::spawn(move || {
                                    let t = Tensor::ones(floats, DType::F32, &Device::Cpu).unwrap();
                                    c.barrier().unwrap();
                                    let start = Instant::now();
                                    for _ in 0..iters {
                                        c.all_reduce_sum(&t).unwrap();
                                    }
                                    start.elapsed()
                                })
                            })
                            .collect();
                        handles
                            .into_iter()
                            .map(|h| h.join().unwrap())
                            .max()
                            .unwrap()
                    })
                },
            );
        }
    }
    g.finish();
}

fn random_features(n: usize, d: usize) -> Tensor {
    l2_normalize(&Tensor::randn(0f32, 1f32, (n, d), &Device::Cpu).unwrap()).unwrap()
}

/// The split loss on one image rank (its rows against all columns) against the autograd
/// reference on the whole batch, forward + backward.
fn loss(c: &mut Criterion) {
    let mut g = c.benchmark_group("clip_loss");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let d = 256;
    for batch in [256usize, 1024] {
        let (x, y) = (random_features(batch, d), random_features(batch, d));
        let comms = RankComms {
            world: Box::new(group("world", 1, DEFAULT_TIMEOUT).remove(0)),
            groups: vec![GroupComms {
                tower: Tower::Image,
                comm: Box::new(group("image", 1, DEFAULT_TIMEOUT).remove(0)),
                stats: std::sync::Arc::new(group("image-stats", 1, DEFAULT_TIMEOUT).remove(0)),
            }],
        };
        // The image rank's half of a 1×1 split: its rows against all columns.
        let topology =
            mmpipe::topology::Topology::from_file(std::path::Path::new("topology/cpu-1x1.toml"))
                .unwrap();
        let layout = FeatureLayout::new(&topology, batch);
        let scalars = LossScalars {
            logit_scale: 2.66,
            logit_bias: -10.0,
        };
        for (name, kind, tile) in [
            ("clip_lse_untiled", LossKind::Clip, TileSize::Untiled),
            ("clip_lse_tile_128", LossKind::Clip, TileSize::Columns(128)),
            ("siglip_untiled", LossKind::Siglip, TileSize::Untiled),
        ] {
            let cfg = LossConfig {
                kind,
                tile,
                ..LossConfig::default()
            };
            g.bench_with_input(BenchmarkId::new(name, batch), &batch, |b, _| {
                b.iter(|| {
                    let side = Side {
                        local: &x,
                        other: &y,
                        offset: 0,
                    };
                    global_loss(&comms, &cfg, &layout, &[side], scalars).unwrap()
                })
            });
        }
        let scale = candle_core::Var::new(2.66f32, &Device::Cpu).unwrap();
        let (xv, yv) = (
            candle_core::Var::from_tensor(&x).unwrap(),
            candle_core::Var::from_tensor(&y).unwrap(),
        );
        g.bench_with_input(
            BenchmarkId::new("autograd_reference", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    clip_loss_reference(xv.as_tensor(), yv.as_tensor(), scale.as_tensor())
                        .unwrap()
                        .backward()
                        .unwrap()
                })
            },
        );
    }
    g.finish();
}

/// Each tiny tower's forward + backward, per sample.
fn towers(c: &mut Criterion) {
    let mut g = c.benchmark_group("tower_fwd_bwd_clip_tiny");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    let model = ClipConfig::default_tiny();
    let source = SyntheticSource::new(0, &model).unwrap();
    let batch = 64;
    g.throughput(Throughput::Elements(batch as u64));
    for tower in [Tower::Image, Tower::Text] {
        let pb = cpu_builder(0);
        let encoder = Encoder::new(&pb, &model, tower).unwrap();
        let indices: Vec<u64> = (0..batch as u64).collect();
        let input = source
            .tower_input(tower, Stream::Train, &indices, &Device::Cpu)
            .unwrap();
        g.bench_function(tower.name(), |b| {
            b.iter(|| {
                encoder
                    .forward(&input)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            })
        });
    }
    g.finish();
}

/// A whole training step of the tiny CLIP on the 1×1 thread topology (both rank threads:
/// forward, exchange, loss, backward, all-reduce, AdamW), per sample; the anchor-size
/// step is `mmpipe bench`.
fn train_step(c: &mut Criterion) {
    use mmpipe::comm::thread::run_ranks;
    use mmpipe::train::{RankTrainer, TrainConfig};
    let mut g = c.benchmark_group("train_step_clip_tiny_1x1");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    let model = ClipConfig::default_tiny();
    let topology =
        mmpipe::topology::Topology::from_file(std::path::Path::new("topology/cpu-1x1.toml"))
            .unwrap();
    let cfg = TrainConfig {
        global_batch: 64,
        ..TrainConfig::default()
    };
    let source = SyntheticSource::new(0, &model).unwrap();
    g.throughput(Throughput::Elements(cfg.global_batch as u64));
    g.bench_function("step", |b| {
        b.iter_custom(|iters| {
            let times = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
                let mut trainer =
                    RankTrainer::new(&topology, rank, &model, &cfg, DType::F32, &Device::Cpu)?;
                let indices = (trainer.towers[0].offset as u64
                    ..(trainer.towers[0].offset + trainer.towers[0].local_batch) as u64)
                    .collect::<Vec<_>>();
                let input = source.tower_input(
                    trainer.towers[0].tower,
                    Stream::Train,
                    &indices,
                    &Device::Cpu,
                )?;
                let start = Instant::now();
                for _ in 0..iters {
                    trainer.step(&comms, std::slice::from_ref(&input), None, 1e-3)?;
                }
                Ok(start.elapsed())
            })
            .unwrap();
            times.into_iter().max().unwrap_or_default()
        })
    });
    g.finish();
}

criterion_group!(benches, collectives, loss, towers, train_step);
criterion_main!(benches);
