//! The MPI backend's checks, one process per rank:
//!   mpirun -np 4 --oversubscribe target/release/examples/mpi_check
//! Collectives on the world and on each group against answers every process can compute
//! alone, then the global CLIP and SigLIP losses under both exchange schemes against one
//! device's autograd on the whole batch (every rank's feature gradient, the loss, the
//! scalars' gradients), on a split of image = ⌈n/2⌉, text = ⌊n/2⌋ processes. Rank 0 prints
//! one line per check; any failure exits non-zero (and mpirun stops the others).
//! With `MPI_CHECK_STALL=1`, rank 1 hangs instead, for the collective watchdog to catch.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use mmpipe::comm::mpi::{rank_comms, world_rank_and_size};
use mmpipe::comm::{Communicator, RankComms};
use mmpipe::loss::{
    clip_loss_reference, global_loss, siglip_loss_reference, Exchange, LossConfig, LossKind,
    LossScalars, Side, TileSize,
};
use mmpipe::topology::layout::{split_len, split_offset, FeatureLayout};
use mmpipe::topology::{Topology, Tower};

const BATCH: usize = 12;
const DIM: usize = 8;

fn topology(image: usize, text: usize) -> Topology {
    let toml = format!(
        "device = \"cpu\"\n[[nodes]]\nname = \"host\"\ndevices = {}\n[groups]\nimage = [\"host:0-{}\"]\ntext = [\"host:{}-{}\"]\n",
        image + text,
        image - 1,
        image,
        image + text - 1
    );
    Topology::from_str(&toml, Path::new(&format!("mpi-{image}x{text}.toml"))).expect("topology")
}

/// Values every process computes alike: `sin(phase + 0.37 i)` over the shape.
fn fixed(shape: &[usize], phase: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| (phase + 0.37 * i as f64).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

struct Checks {
    rank: usize,
    failed: usize,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        if !ok {
            self.failed += 1;
            eprintln!("rank {}: FAIL {name}: {detail}", self.rank);
        } else if self.rank == 0 {
            println!("ok   {name}");
        }
    }
}

fn collectives(comm: &dyn Communicator, checks: &mut Checks) {
    let (r, n) = (comm.rank(), comm.size());
    let name = comm.name().to_string();
    // All-gather with a different number of rows per rank.
    let mine = (Tensor::ones((r + 1, 3), DType::F32, &Device::Cpu).unwrap() * r as f64).unwrap();
    let gathered = comm.all_gather(&mine).unwrap();
    let expected: Vec<f32> = (0..n)
        .flat_map(|p| std::iter::repeat_n(p as f32, (p + 1) * 3))
        .collect();
    let got: Vec<f32> = gathered.flatten_all().unwrap().to_vec1().unwrap();
    checks.check(
        &format!("{name}: all_gather of ragged rows"),
        got == expected,
        format!("{got:?}"),
    );
    // All-reduce in f64: the sum in rank order, bit for bit.
    let x = fixed(&[4, 5], r as f64);
    let sum = comm.all_reduce_sum(&x).unwrap();
    let mut expected = fixed(&[4, 5], 0.0);
    for p in 1..n {
        expected = (expected + fixed(&[4, 5], p as f64)).unwrap();
    }
    checks.check(
        &format!("{name}: all_reduce_sum, same bits as a rank-order sum"),
        max_abs_diff(&sum, &expected) == 0.0,
        format!("{}", max_abs_diff(&sum, &expected)),
    );
    // All-reduce in bf16 (MPI has no bf16: its bits travel as u16): the rank-order sum
    // of the bf16 tensors, bit for bit, in bf16.
    let half = |p: usize| fixed(&[4, 5], p as f64).to_dtype(DType::BF16).unwrap();
    let sum = comm.all_reduce_sum(&half(r)).unwrap();
    let mut expected = half(0);
    for p in 1..n {
        expected = (expected + half(p)).unwrap();
    }
    checks.check(
        &format!("{name}: all_reduce_sum in bf16, same bits as a rank-order sum"),
        sum.dtype() == DType::BF16 && max_abs_diff(&sum, &expected) == 0.0,
        format!("{:?} {}", sum.dtype(), max_abs_diff(&sum, &expected)),
    );
    // Reduce-scatter: block r of the sum.
    let x = fixed(&[2 * n, 3], 1.0 + r as f64);
    let block = comm.reduce_scatter_sum(&x).unwrap();
    let mut total = fixed(&[2 * n, 3], 1.0);
    for p in 1..n {
        total = (total + fixed(&[2 * n, 3], 1.0 + p as f64)).unwrap();
    }
    let expected = total.narrow(0, 2 * r, 2).unwrap();
    checks.check(
        &format!("{name}: reduce_scatter_sum"),
        max_abs_diff(&block, &expected) == 0.0,
        format!("{block}"),
    );
    // Broadcast from the last rank, u32.
    let root = n - 1;
    let x = Tensor::new(&[r as u32 * 10, 7], &Device::Cpu).unwrap();
    let got: Vec<u32> = comm.broadcast(&x, root).unwrap().to_vec1().unwrap();
    checks.check(
        &format!("{name}: broadcast from rank {root}"),
        got == vec![root as u32 * 10, 7],
        format!("{got:?}"),
    );
    comm.barrier().unwrap();
    // A shape mismatch is an error naming the collective, not a hang.
    let odd = Tensor::zeros((1, 2 + usize::from(r == 0)), DType::F32, &Device::Cpu).unwrap();
    if n > 1 {
        let err = comm
            .all_reduce_sum(&odd)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        checks.check(
            &format!("{name}: mismatched shapes are refused"),
            err.contains("all_reduce") && err.contains("shape"),
            err,
        );
    }
}

fn losses(topology: &Topology, rank: usize, comms: &RankComms, checks: &mut Checks) {
    // A split: every rank holds one tower.
    let r = topology.ranks[rank].roles[0];
    let size = topology.group_size(r.tower);
    let (offset, len) = (
        split_offset(BATCH, size, r.group_rank),
        split_len(BATCH, size, r.group_rank),
    );
    let normalise = |x: Tensor| {
        let norm = x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        x.broadcast_div(&norm).unwrap()
    };
    let image = normalise(fixed(&[BATCH, DIM], 0.3));
    let text = normalise(fixed(&[BATCH, DIM], 1.7));
    let layout = FeatureLayout::new(topology, BATCH);
    for kind in [LossKind::Clip, LossKind::Siglip] {
        let scalars = LossScalars {
            logit_scale: kind.initial_logit_scale(),
            logit_bias: kind.initial_logit_bias().unwrap_or(0.0),
        };
        // One device, autograd, the whole batch.
        let (x, y) = (
            Var::from_tensor(&image).unwrap(),
            Var::from_tensor(&text).unwrap(),
        );
        let t = Var::from_tensor(&Tensor::new(scalars.logit_scale, &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(scalars.logit_bias, &Device::Cpu).unwrap()).unwrap();
        let reference = match kind {
            LossKind::Clip => clip_loss_reference(&x, &y, &t).unwrap(),
            LossKind::Siglip => siglip_loss_reference(&x, &y, &t, &b).unwrap(),
        };
        let grads = reference.backward().unwrap();
        let own = match r.tower {
            Tower::Image => grads.get(&x).unwrap(),
            Tower::Text => grads.get(&y).unwrap(),
        }
        .narrow(0, offset, len)
        .unwrap();
        let reference_loss = reference.to_scalar::<f64>().unwrap();
        for exchange in [Exchange::Lse, Exchange::GatherScatter] {
            for tile in [TileSize::Untiled, TileSize::Columns(5)] {
                let cfg = LossConfig {
                    kind,
                    exchange,
                    tile,
                    ..LossConfig::default()
                };
                let local = match r.tower {
                    Tower::Image => image.narrow(0, offset, len).unwrap(),
                    Tower::Text => text.narrow(0, offset, len).unwrap(),
                };
                let (gathered_image, gathered_text) =
                    mmpipe::loss::exchange_features(comms.world.as_ref(), &layout, &local).unwrap();
                let other = match r.tower {
                    Tower::Image => gathered_text,
                    Tower::Text => gathered_image,
                };
                let side = Side {
                    local: &local,
                    other: &other,
                    offset,
                };
                let out = global_loss(comms, &cfg, &layout, &[side], scalars).unwrap();
                let gap = max_abs_diff(&out.grads[0], &own);
                checks.check(
                    &format!(
                        "{kind} {exchange} tile {tile}: loss and feature gradients vs one device"
                    ),
                    (out.loss - reference_loss).abs() < 1e-10 && gap < 1e-10,
                    format!(
                        "loss {} vs {reference_loss}, gradient off by {gap:e}",
                        out.loss
                    ),
                );
                let dt = grads.get(&t).unwrap().to_scalar::<f64>().unwrap();
                checks.check(
                    &format!("{kind} {exchange} tile {tile}: temperature gradient"),
                    (out.grad_logit_scale - dt).abs() < 1e-10,
                    format!("{} vs {dt}", out.grad_logit_scale),
                );
            }
        }
    }
}

fn main() {
    let (rank, n) = world_rank_and_size().expect("MPI");
    if n < 2 {
        eprintln!("run under mpirun with at least 2 processes");
        std::process::exit(2);
    }
    let topology = topology(n.div_ceil(2), n / 2);
    let (rank_again, comms) = rank_comms(&topology).expect("communicators");
    assert_eq!(rank, rank_again);
    // `MPI_CHECK_STALL=1`: rank 1 hangs before a barrier; the watchdog must end the run.
    if std::env::var_os("MPI_CHECK_STALL").is_some() {
        mmpipe::comm::watchdog::set_collective_timeout(std::time::Duration::from_secs(2));
        if rank == 1 {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        comms.world.barrier().unwrap();
        eprintln!("rank {rank}: the barrier completed: the watchdog did not fire");
        std::process::exit(0);
    }
    let mut checks = Checks { rank, failed: 0 };
    collectives(comms.world.as_ref(), &mut checks);
    for group in &comms.groups {
        collectives(group.comm.as_ref(), &mut checks);
    }
    losses(&topology, rank, &comms, &mut checks);
    comms.world.barrier().unwrap();
    let failed = comms
        .world
        .all_reduce_sum(&Tensor::new(&[checks.failed as f64], &Device::Cpu).unwrap())
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    if rank == 0 {
        println!(
            "mpi_check: {n} processes ({}x{} split): {}",
            n.div_ceil(2),
            n / 2,
            if failed == 0.0 {
                "all checks passed".to_string()
            } else {
                format!("{failed} failed checks")
            }
        );
    }
    drop(comms);
    mmpipe::comm::mpi::finalize();
    std::process::exit(i32::from(failed != 0.0));
}
