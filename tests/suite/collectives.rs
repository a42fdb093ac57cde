use std::sync::mpsc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use mmpipe::comm::thread::{group, ThreadCommunicator};
use mmpipe::comm::{all_reduce_bucket, all_reduce_sum_sparse_rows, Communicator, SparseRows};
use mmpipe::Error;

/// Runs `f` on each rank of a fresh group of `n` on its own thread, with a deadline: a
/// hang fails the test instead of blocking it.
fn on_ranks<T: Send + 'static>(
    n: usize,
    timeout: Duration,
    f: impl Fn(ThreadCommunicator) -> mmpipe::Result<T> + Send + Sync + Clone + 'static,
) -> Vec<mmpipe::Result<T>> {
    let (tx, rx) = mpsc::channel();
    for (rank, comm) in group("test", n, timeout).into_iter().enumerate() {
        let (tx, f) = (tx.clone(), f.clone());
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(comm)));
            let r = r.unwrap_or_else(|_| Err(Error::Msg("panicked".into())));
            let _ = tx.send((rank, r));
        });
    }
    let mut out: Vec<Option<mmpipe::Result<T>>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        let (rank, r) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a rank hung");
        out[rank] = Some(r);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Rank r's input: `rows` rows of 3 values, distinct per rank and element.
fn input(rank: usize, rows: usize) -> Tensor {
    let v: Vec<f32> = (0..rows * 3)
        .map(|i| (rank * 100 + i) as f32 * 0.37 - 5.0)
        .collect();
    Tensor::from_vec(v, (rows, 3), &Device::Cpu).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().unwrap()
}

const T: Duration = Duration::from_secs(10);

#[test]
fn all_gather_concatenates_in_rank_order_even_with_ragged_rows() {
    for n in 1..=4 {
        let results = on_ranks(n, T, move |c| c.all_gather(&input(c.rank(), c.rank() + 1)));
        let expected =
            Tensor::cat(&(0..n).map(|r| input(r, r + 1)).collect::<Vec<_>>(), 0).unwrap();
        for r in results {
            assert_eq!(rows(&r.unwrap()), rows(&expected), "{n} ranks");
        }
    }
}

#[test]
fn all_reduce_equals_the_serial_sum_bit_for_bit_on_every_rank() {
    for n in 1..=4 {
        let results = on_ranks(n, T, |c| c.all_reduce_sum(&input(c.rank(), 4)));
        let mut serial = input(0, 4);
        for r in 1..n {
            serial = (serial + input(r, 4)).unwrap();
        }
        for r in results {
            assert_eq!(rows(&r.unwrap()), rows(&serial), "{n} ranks");
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_block_of_the_sum() {
    for n in 1..=4 {
        let results = on_ranks(n, T, move |c| c.reduce_scatter_sum(&input(c.rank(), 2 * n)));
        let mut serial = input(0, 2 * n);
        for r in 1..n {
            serial = (serial + input(r, 2 * n)).unwrap();
        }
        for (rank, r) in results.into_iter().enumerate() {
            assert_eq!(
                rows(&r.unwrap()),
                rows(&serial.narrow(0, 2 * rank, 2).unwrap()),
                "{n} ranks"
            );
        }
    }
}

#[test]
fn broadcast_copies_the_root_tensor_and_barrier_returns() {
    for n in 1..=4 {
        for root in 0..n {
            let results = on_ranks(n, T, move |c| {
                c.barrier()?;
                c.broadcast(&input(c.rank(), 2), root)
            });
            for r in results {
                assert_eq!(rows(&r.unwrap()), rows(&input(root, 2)));
            }
        }
    }
}

#[test]
fn bucketed_all_reduce_keeps_shapes_and_sums() {
    let results = on_ranks(3, T, |c| {
        let a = input(c.rank(), 2);
        let b = input(c.rank() + 10, 5).reshape((3, 5)).unwrap();
        all_reduce_bucket(&c, &[a, b])
    });
    let sum = |f: &dyn Fn(usize) -> Tensor| (f(0) + f(1)).unwrap().add(&f(2)).unwrap();
    let a = sum(&|r| input(r, 2));
    let b = sum(&|r| input(r + 10, 5).reshape((3, 5)).unwrap());
    for r in results {
        let r = r.unwrap();
        assert_eq!(rows(&r[0]), rows(&a));
        assert_eq!(r[1].to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }
}

/// The thread backend's list all-reduce (no bucket) gives the bucket's bits.
#[test]
fn list_all_reduce_equals_the_bucket_bit_for_bit() {
    let make = |rank: usize| {
        vec![
            input(rank, 2),
            input(rank + 10, 5).reshape((3, 5)).unwrap(),
            input(rank + 20, 1).flatten_all().unwrap(),
        ]
    };
    let lists = on_ranks(3, T, move |c| c.all_reduce_sum_many(&make(c.rank())));
    let buckets = on_ranks(3, T, move |c| all_reduce_bucket(&c, &make(c.rank())));
    for (l, b) in lists.into_iter().zip(buckets) {
        let (l, b) = (l.unwrap(), b.unwrap());
        assert_eq!(l.len(), 3);
        for (x, y) in l.iter().zip(&b) {
            assert_eq!(x.dims(), y.dims());
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(xs, ys);
        }
    }
}

#[test]
fn list_all_reduce_refuses_lists_that_differ() {
    let results = on_ranks(2, T, |c| {
        let list: Vec<Tensor> = (0..=c.rank()).map(|i| input(i, 2)).collect();
        c.all_reduce_sum_many(&list)
    });
    for r in results {
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.contains("passed 1 tensors") || msg.contains("passed 2 tensors"),
            "{msg}"
        );
    }
}

#[test]
fn consecutive_collectives_do_not_mix_up_messages() {
    // Rank 0 races ahead through many gathers; per-pair ordering keeps them apart.
    let results = on_ranks(3, T, |c| {
        let mut out = Vec::new();
        for step in 0..50 {
            if c.rank() == 2 && step % 7 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let t = Tensor::new(&[(c.rank() * 1000 + step) as f32], &Device::Cpu).unwrap();
            out.push(c.all_gather(&t)?.to_vec1::<f32>().unwrap());
        }
        Ok(out)
    });
    for r in results {
        for (step, got) in r.unwrap().into_iter().enumerate() {
            assert_eq!(
                got,
                vec![step as f32, (1000 + step) as f32, (2000 + step) as f32]
            );
        }
    }
}

#[test]
fn a_failing_rank_makes_the_others_return_an_error() {
    let results = on_ranks(4, T, |c| {
        if c.rank() == 1 {
            return Err(Error::Msg("rank 1 failed on purpose".into()));
        }
        c.all_reduce_sum(&input(c.rank(), 2))
    });
    assert!(matches!(&results[1], Err(Error::Msg(_))));
    for (rank, r) in results.iter().enumerate().filter(|(r, _)| *r != 1) {
        match r {
            // Rank 1, or a rank that already gave up because of it.
            Err(Error::PeerLost { .. }) => {}
            other => panic!("rank {rank}: expected PeerLost, got {other:?}"),
        }
    }
}

#[test]
fn a_panicking_rank_makes_the_others_return_an_error() {
    let results = on_ranks(3, T, |c| {
        c.barrier()?;
        if c.rank() == 2 {
            panic!("rank 2 panics on purpose");
        }
        c.all_gather(&input(c.rank(), 1))
    });
    assert!(
        results.iter().all(|r| r.is_err()),
        "every rank must see the failure"
    );
    let msg = results[0].as_ref().unwrap_err().to_string();
    assert!(msg.contains("rank 2 of 3 left"), "{msg}");
}

#[test]
fn a_silent_rank_times_out_with_a_message() {
    let results = on_ranks(2, Duration::from_millis(200), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(1500));
            return Ok(None);
        }
        c.all_reduce_sum(&input(0, 1)).map(Some)
    });
    let msg = results[0].as_ref().unwrap_err().to_string();
    assert!(
        msg.contains("rank 1 of 2 did not answer within 0.2 s"),
        "{msg}"
    );
}

#[test]
fn mismatched_shapes_are_an_error_not_garbage() {
    let results = on_ranks(2, T, |c| c.all_reduce_sum(&input(c.rank(), c.rank() + 1)));
    for r in results {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("shape"), "{msg}");
    }
}

#[test]
fn run_ranks_reports_the_root_cause_not_the_echoes() {
    let topology = super::common::cpu_topology(2, 2);
    let err = mmpipe::comm::thread::run_ranks(&topology, T, |rank, comms| {
        if rank == 3 {
            panic!("boom");
        }
        comms.world.barrier()?;
        comms.world.barrier()
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rank 3") && msg.contains("panicked: boom"),
        "{msg}"
    );
}

/// Rank r's gradient of a `rows`-row table: non-zero only at `touched(r)`.
fn sparse_input(rank: usize, rows: usize, touched: &[u32]) -> Tensor {
    let mut v = vec![0f32; rows * 3];
    for &t in touched {
        for j in 0..3 {
            v[t as usize * 3 + j] = (rank * 10 + t as usize + j) as f32 * 0.37 - 1.0;
        }
    }
    Tensor::from_vec(v, (rows, 3), &Device::Cpu).unwrap()
}

#[test]
fn sparse_rows_all_reduce_equals_the_dense_one_and_carries_fewer_bytes() {
    // Rank r touches rows {3r, 7, 7, 40 + r} of 50 (a repeat included); a second table of
    // 4 rows is touched everywhere, so it travels whole; a dense tensor rides along.
    let touched = |r: usize, n: usize| -> Vec<u32> {
        if n == 4 {
            vec![0, 1, 2, 3]
        } else {
            vec![3 * r as u32, 7, 7, 40 + r as u32]
        }
    };
    let results = on_ranks(3, T, move |c| {
        let r = c.rank();
        let list = vec![
            input(r, 5),
            sparse_input(r, 50, &touched(r, 50)),
            sparse_input(r, 4, &touched(r, 4)),
        ];
        let sparse = [
            SparseRows {
                index: 1,
                rows: touched(r, 50),
            },
            SparseRows {
                index: 2,
                rows: touched(r, 4),
            },
        ];
        let before = c.payload_bytes();
        let dense = c.all_reduce_sum_many(&list)?;
        let dense_bytes = c.payload_bytes() - before;
        let before = c.payload_bytes();
        let packed = all_reduce_sum_sparse_rows(&c, &list, &sparse)?;
        let packed_bytes = c.payload_bytes() - before;
        Ok((dense, dense_bytes, packed, packed_bytes))
    });
    for r in results {
        let (dense, dense_bytes, packed, packed_bytes) = r.unwrap();
        for (d, p) in dense.iter().zip(&packed) {
            assert_eq!(d.dims(), p.dims());
            assert_eq!(rows(d), rows(p), "bit-identical sums");
        }
        // The union {0, 3, 6, 7, 40, 41, 42}: 7 rows of 3 and a 50 + 4 row mask instead of
        // 50 rows of 3.
        assert_eq!(dense_bytes, 4 * (5 * 3 + 50 * 3 + 4 * 3));
        assert_eq!(packed_bytes, 4 * (5 * 3 + 7 * 3 + 4 * 3 + 50 + 4));
    }
}

#[test]
fn a_sparse_row_outside_the_table_is_an_error_naming_it() {
    let results = on_ranks(2, T, |c| {
        let list = vec![input(c.rank(), 5)];
        let sparse = [SparseRows {
            index: 0,
            rows: vec![5],
        }];
        all_reduce_sum_sparse_rows(&c, &list, &sparse)
    });
    for r in results {
        let err = r.unwrap_err().to_string();
        assert!(
            err.contains("sparse row 5 of a tensor with 5 rows"),
            "{err}"
        );
    }
}

/// The first bucket goes at 1 MiB (DDP's first bucket) when the others are larger, so the
/// sums start with the last layers' gradients; the rest wait for a whole bucket; the sums
/// are one all-reduce's.
#[test]
fn the_first_bucket_goes_at_one_mebibyte() {
    use mmpipe::comm::overlap::{Buckets, FIRST_BUCKET_BYTES};
    let results = on_ranks(2, Duration::from_secs(10), |comm| {
        // Five tensors of half a MiB, in buckets of 8 MB.
        let half = FIRST_BUCKET_BYTES / 2 / 4;
        let tensors: Vec<Tensor> = (0..5)
            .map(|i| Tensor::full((comm.rank() + i) as f32, (half, 1), &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let want = comm.all_reduce_sum_many(&tensors)?;
        std::thread::scope(|scope| -> mmpipe::Result<()> {
            let mut buckets = Buckets::start(scope, &comm, 8_000_000);
            for (i, t) in tensors.iter().enumerate() {
                buckets.add(i, t.clone());
            }
            let (got, stats) = buckets.finish(5)?;
            // The first two tensors during backward; the other three at its end.
            assert_eq!((stats.buckets, stats.during_backward), (2, 1));
            for (i, w) in want.iter().enumerate() {
                assert_eq!(rows(got[i].as_ref().unwrap()), rows(w), "tensor {i}");
            }
            Ok(())
        })
    });
    for r in results {
        r.unwrap();
    }
}

/// The bucketed sums a worker makes while the rank goes on: every tensor summed as by one
/// all-reduce, whatever the buckets, a repeated index summed with itself, and each bucket
/// counted; a peer that leaves mid-way turns `finish` into an error naming the group.
#[test]
fn bucketed_sums_on_a_worker_equal_one_all_reduce_and_report_a_lost_peer() {
    use mmpipe::comm::overlap::Buckets;
    let results = on_ranks(3, Duration::from_secs(10), |comm| {
        let tensors: Vec<Tensor> = (0..5).map(|i| input(comm.rank() + i, 3)).collect();
        let want = comm.all_reduce_sum_many(&tensors)?;
        std::thread::scope(|scope| -> mmpipe::Result<()> {
            // 40 bytes: two 3×2 f32 tensors (24 bytes each) a bucket.
            let mut buckets = Buckets::start(scope, &comm, 40);
            for (i, t) in tensors.iter().enumerate() {
                buckets.add(i, t.clone());
            }
            buckets.add(4, tensors[4].clone());
            let (got, stats) = buckets.finish(6)?;
            assert_eq!((stats.buckets, stats.during_backward), (3, 3));
            for (i, w) in want.iter().enumerate().take(4) {
                assert_eq!(rows(got[i].as_ref().unwrap()), rows(w), "tensor {i}");
            }
            assert_eq!(
                rows(got[4].as_ref().unwrap()),
                rows(&(&want[4] * 2.0)?),
                "a repeated index"
            );
            assert!(got[5].is_none(), "an index never handed over");
            Ok(())
        })
    });
    for r in results {
        r.unwrap();
    }
    let results = on_ranks(2, Duration::from_secs(10), |comm| {
        if comm.rank() == 1 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
        std::thread::scope(|scope| {
            let mut buckets = Buckets::start(scope, &comm, 1);
            buckets.add(0, input(0, 2));
            buckets.finish(1).map(|_| ())
        })
    });
    match &results[0] {
        Err(Error::PeerLost { group, peer, .. }) => {
            assert_eq!((group.as_str(), *peer), ("test", 1))
        }
        other => panic!("expected the lost peer, got {other:?}"),
    }
}
