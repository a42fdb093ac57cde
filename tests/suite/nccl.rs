//! The NCCL backend on one GPU: a single-rank communicator runs every collective of the
//! trait through NCCL itself (CUDA buffers in, CUDA buffers out), the CPU round trip,
//! the dtypes the training loop sends, and the watchdog's abort list. Run by
//! scripts/gpu-check.sh; these tests need a CUDA GPU.

use candle_core::{DType, Device, Tensor};
use mmpipe::comm::nccl::{self, NcclCommunicator};
use mmpipe::comm::{agree_on_run, all_reduce_bucket, Communicator};

use super::common::values;

fn solo() -> (NcclCommunicator, Device) {
    let device = mmpipe::comm::device::cuda_device(0).expect("these tests need a CUDA GPU");
    let id = nccl::new_id().unwrap();
    let comm = NcclCommunicator::new(&id, 0, 1, &device, "solo").unwrap();
    (comm, device)
}

#[test]
fn every_collective_of_one_rank_returns_its_input_where_it_was() {
    let (comm, gpu) = solo();
    assert!(
        comm.abortable(),
        "the watchdog has the communicator's handle to abort"
    );
    let x = Tensor::arange(0f32, 12.0, &gpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let want = values(&x);
    for (op, out) in [
        ("all_gather", comm.all_gather(&x).unwrap()),
        ("all_reduce", comm.all_reduce_sum(&x).unwrap()),
        ("reduce_scatter", comm.reduce_scatter_sum(&x).unwrap()),
        ("broadcast", comm.broadcast(&x, 0).unwrap()),
    ] {
        assert!(out.device().is_cuda(), "{op} left the GPU");
        assert_eq!(out.dims(), &[3, 4], "{op}");
        assert_eq!(values(&out), want, "{op}");
    }
    comm.barrier().unwrap();
    // all-gather + all-reduce + reduce-scatter + broadcast of 48 bytes, plus the row
    // count and the broadcast's shape header, which are not payload.
    assert_eq!(comm.payload_bytes(), 4 * 48);
    // A transposed (strided) input goes through contiguous.
    let t = x.t().unwrap();
    assert_eq!(values(&comm.all_reduce_sum(&t).unwrap()), values(&t));
}

#[test]
fn cpu_tensors_and_other_dtypes_make_the_round_trip() {
    let (comm, _gpu) = solo();
    let flags = Tensor::new(&[1u32, 0, 7], &Device::Cpu).unwrap();
    let out = comm.all_gather(&flags.reshape((3, 1)).unwrap()).unwrap();
    assert!(matches!(out.device(), Device::Cpu));
    assert_eq!(
        out.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
        [1, 0, 7]
    );
    let sums = Tensor::new(&[[1.5f64, -2.25]], &Device::Cpu).unwrap();
    assert_eq!(values(&comm.all_reduce_sum(&sums).unwrap()), [1.5, -2.25]);
    let half = Tensor::new(&[0.5f32, 2.0], &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let out = comm.broadcast(&half, 0).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    assert_eq!(values(&out), [0.5, 2.0]);
    // The run-agreement check and the gradient bucket, as training calls them.
    agree_on_run(&comm, 0xdead_beef_0123, 42).unwrap();
    let grads = [
        Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
        Tensor::full(3f32, 5, &Device::Cpu).unwrap(),
    ];
    let reduced = all_reduce_bucket(&comm, &grads).unwrap();
    assert_eq!(reduced[0].dims(), &[2, 3]);
    assert_eq!(values(&reduced[1]), [3.0; 5]);
}

#[test]
fn an_id_of_the_wrong_size_is_refused_by_name() {
    let device = mmpipe::comm::device::cuda_device(0).expect("these tests need a CUDA GPU");
    let err = NcclCommunicator::new(&[0u8; 12], 0, 1, &device, "image")
        .err()
        .expect("a 12-byte id is refused")
        .to_string();
    assert!(err.contains("image") && err.contains("12 bytes"), "{err}");
}
