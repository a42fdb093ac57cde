//! GPU ranks over NCCL: one process per GPU (the conventional layout), communicators for
//! the world and for each tower's group, built from unique ids that world rank 0 creates
//! and hands out through the rendezvous ([`super::rendezvous`]).
//!
//! The statistics' collectives (synchronised batch norm, inside forward and backward) run
//! on the compute stream of the rank's device, so they are ordered after the kernels that
//! produce their inputs with no extra events. A tower group's communicator, which sums
//! the gradients while backward runs (`comm::overlap`, from a worker thread), and the
//! world's, which gathers the image features while a rank that holds both towers runs its
//! text forward (`train::step`, from a worker thread), have a stream of their own each:
//! each of their collectives first waits for everything queued on the compute stream so
//! far (an event, not the host), so the kernels queued after it run beside it. Each
//! collective then waits for its own stream: a collective that never completes must
//! surface inside the watchdog's window ([`super::watchdog`]), not at some later copy to
//! the host.
//!
//! Conventions of the trait that NCCL does not keep by itself, kept here: all-gather takes
//! different row counts (the counts go first, then padded blocks); broadcast takes any
//! shape on non-root ranks (the root's shape goes first). CPU tensors (flags, checksums,
//! the run's hashes) make a round trip through the GPU. NCCL's ring sums are identical on
//! every rank but not taken in rank order: results agree with a single device to float
//! tolerance, not bit for bit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::cudarc::nccl::safe::NcclType;
use candle_core::cuda_backend::cudarc::nccl::{result as nccl, result::NcclError, sys};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::watchdog::InFlight;
use super::{Communicator, GroupComms, RankComms};
use crate::error::{Error, Result};
use crate::topology::{Topology, Tower};

fn nccl_message(e: &NcclError) -> String {
    // SAFETY: NCCL returns a static, NUL-terminated string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    format!("{} ({:?})", text.to_string_lossy(), e.0)
}

/// An NCCL communicator by its raw handle, on a stream: ours rather than cudarc's `Comm`,
/// which keeps the handle private, so that the watchdog can abort a hung collective
/// through the handle itself.
struct RawComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    /// The device's compute stream when `stream` is another one: each collective waits
    /// for the work queued on it first.
    after: Option<Arc<CudaStream>>,
    rank: usize,
}

// SAFETY: a communicator is used by one thread at a time (the lock in
// [`NcclCommunicator`]), which NCCL allows from any thread; the watchdog's abort is the
// one call NCCL allows concurrently.
unsafe impl Send for RawComm {}

impl RawComm {
    /// Joins the communicator of `id` as `rank` of `size` (collective: blocks until all
    /// have joined).
    fn join(
        stream: Arc<CudaStream>,
        rank: usize,
        size: usize,
        id: sys::ncclUniqueId,
    ) -> std::result::Result<Self, NcclError> {
        let mut comm = std::mem::MaybeUninit::uninit();
        let (size, rank_i) = (
            i32::try_from(size).expect("a world that fits an i32"),
            i32::try_from(rank).expect("a rank that fits an i32"),
        );
        // SAFETY: `comm` is written by a successful init, and only then read.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), size, id, rank_i)?;
            comm.assume_init()
        };
        Ok(RawComm {
            comm,
            stream,
            after: None,
            rank,
        })
    }

    fn handle(&self) -> usize {
        self.comm as usize
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // As cudarc's `Comm` ends its communicators (a destroy would wait for work that a
        // failing run may never finish).
        // SAFETY: the handle came from a successful init and is dropped once.
        unsafe {
            let _ = nccl::comm_abort(self.comm);
        }
    }
}

pub struct NcclCommunicator {
    comm: Mutex<RawComm>,
    device: Device,
    name: String,
    rank: usize,
    size: usize,
    payload: AtomicU64,
}

/// Every NCCL communicator this process made, for the watchdog to abort.
static LIVE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn abort_all() {
    if let Ok(live) = LIVE.try_lock() {
        for &handle in live.iter() {
            // SAFETY: handles are removed from LIVE before their communicator is dropped.
            unsafe {
                sys::ncclCommAbort(handle as sys::ncclComm_t);
            }
        }
    }
}

/// Bytes of one NCCL unique id.
const ID_BYTES: usize = 128;

/// A fresh unique id, as bytes for the rendezvous.
pub fn new_id() -> Result<Vec<u8>> {
    let id = nccl::get_uniqueid()
        .map_err(|e| Error::Cuda(format!("ncclGetUniqueId: {}", nccl_message(&e))))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

fn id_from_bytes(bytes: &[u8], what: &str) -> Result<sys::ncclUniqueId> {
    if bytes.len() != ID_BYTES {
        return Err(Error::Rendezvous {
            peer: "rank 0".into(),
            message: format!(
                "the rendezvous gave {} bytes for the NCCL id of {what}, not {ID_BYTES}",
                bytes.len()
            ),
        });
    }
    let mut internal = [0 as std::ffi::c_char; ID_BYTES];
    for (i, b) in internal.iter_mut().zip(bytes) {
        *i = *b as std::ffi::c_char;
    }
    Ok(sys::ncclUniqueId { internal })
}

impl NcclCommunicator {
    /// Joins the communicator of `id` as `rank` of `size`, on `device`'s stream. Blocks
    /// until every member has joined (NCCL's init is collective).
    pub fn new(id: &[u8], rank: usize, size: usize, device: &Device, name: &str) -> Result<Self> {
        Self::join(id, rank, size, device, name, false)
    }

    /// [`Self::new`] on a stream of its own, ordered after the compute stream's work at
    /// each collective: its sums run beside the kernels queued after them.
    pub fn on_own_stream(
        id: &[u8],
        rank: usize,
        size: usize,
        device: &Device,
        name: &str,
    ) -> Result<Self> {
        Self::join(id, rank, size, device, name, true)
    }

    fn join(
        id: &[u8],
        rank: usize,
        size: usize,
        device: &Device,
        name: &str,
        own_stream: bool,
    ) -> Result<Self> {
        let cuda = device.as_cuda_device()?;
        let id = id_from_bytes(id, name)?;
        let compute = cuda.cuda_stream();
        let stream = if own_stream {
            compute
                .context()
                .new_stream()
                .map_err(|e| Error::Cuda(format!("a stream for NCCL communicator `{name}`: {e}")))?
        } else {
            compute.clone()
        };
        let mut comm = RawComm::join(stream, rank, size, id).map_err(|e| {
            Error::Cuda(format!(
                "NCCL communicator `{name}` (rank {rank} of {size}) could not start: {}",
                nccl_message(&e)
            ))
        })?;
        comm.after = own_stream.then_some(compute);
        LIVE.lock().expect("live list").push(comm.handle());
        Ok(NcclCommunicator {
            comm: Mutex::new(comm),
            device: device.clone(),
            name: name.to_string(),
            rank,
            size,
            payload: AtomicU64::new(0),
        })
    }

    /// Runs one NCCL collective on `t` (moved to this rank's GPU, made contiguous) and
    /// hands the result back on `t`'s device.
    fn run(&self, op: Op, t: &Tensor) -> Result<Tensor> {
        let _watch = InFlight::start(op.name(), &self.name);
        let input = t.to_device(&self.device)?.contiguous()?;
        let out = {
            let comm = self.comm.lock().expect("NCCL communicator");
            let out = input
                .apply_op1_no_bwd(&Collective {
                    comm: &comm,
                    op,
                    size: self.size,
                })
                .map_err(|e| Error::Collective {
                    op: op.name(),
                    group: self.name.clone(),
                    message: e.to_string(),
                })?;
            match &comm.after {
                // The host waits for the collective's stream only: the compute stream
                // goes on with what was queued after it.
                Some(_) => comm.stream.synchronize().map_err(|e| Error::Collective {
                    op: op.name(),
                    group: self.name.clone(),
                    message: e.to_string(),
                })?,
                None => self.device.synchronize()?,
            }
            out
        };
        Ok(out.to_device(t.device())?)
    }

    /// Whether the watchdog can abort this communicator (its handle is in the list).
    pub fn abortable(&self) -> bool {
        let h = self.comm.lock().expect("NCCL communicator").handle();
        LIVE.lock().expect("live list").contains(&h)
    }

    /// All-gather of blocks padded to the widest of `counts` (each rank's rows), cut back
    /// to every rank's own rows.
    fn gather_blocks(&self, t: &Tensor, counts: &[usize]) -> Result<Tensor> {
        let rows = t.dim(0)?;
        let widest = counts.iter().copied().max().unwrap_or(0);
        let padded = if rows == widest {
            t.clone()
        } else {
            let mut pad = t.dims().to_vec();
            pad[0] = widest - rows;
            Tensor::cat(&[t.clone(), Tensor::zeros(pad, t.dtype(), t.device())?], 0)?
        };
        let gathered = if widest == 0 {
            padded.clone()
        } else {
            self.run(Op::AllGather, &padded)?
        };
        let out = if counts.iter().all(|&c| c == widest) {
            gathered
        } else {
            let blocks = counts
                .iter()
                .enumerate()
                .map(|(r, &c)| gathered.narrow(0, r * widest, c))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&blocks, 0)?
        };
        self.count(&out);
        Ok(out)
    }

    fn count(&self, t: &Tensor) {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.payload.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        let h = self.comm.lock().expect("NCCL communicator").handle();
        LIVE.lock().expect("live list").retain(|&x| x != h);
    }
}

#[derive(Clone, Copy)]
enum Op {
    AllGather,
    AllReduce,
    ReduceScatter,
    Broadcast(usize),
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllGather => "all_gather",
            Op::AllReduce => "all_reduce",
            Op::ReduceScatter => "reduce_scatter",
            Op::Broadcast(_) => "broadcast",
        }
    }
}

/// One collective as a candle op: candle hands over the input's CUDA storage and takes
/// back the output's, which is how a tensor's buffer is reached from outside candle.
struct Collective<'a> {
    comm: &'a RawComm,
    op: Op,
    size: usize,
}

impl Collective<'_> {
    fn run<T>(&self, s: &CudaStorage, l: &Layout, out: Shape) -> candle_core::Result<CudaStorage>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL needs a contiguous tensor".into()))?;
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        let device: CudaDevice = s.device().clone();
        let mut dst = device.alloc_zeros::<T>(out.elem_count())?;
        let c = self.comm;
        let (count_in, count_out) = (src.len(), dst.len());
        if let Some(compute) = &c.after {
            // Everything queued on the compute stream so far, the input's kernels and
            // the output's zeroing among them, before the collective.
            c.stream
                .join(compute)
                .map_err(|e| candle_core::Error::Msg(format!("NCCL (rank {}): {e}", c.rank)))?;
        }
        let done = {
            let (src_ptr, _read) = src.device_ptr(&c.stream);
            let (dst_ptr, _write) = dst.device_ptr_mut(&c.stream);
            let (send, recv) = (
                src_ptr as *const std::ffi::c_void,
                dst_ptr as *mut std::ffi::c_void,
            );
            let (kind, stream) = (T::as_nccl_type(), c.stream.cu_stream() as _);
            let sum = sys::ncclRedOp_t::ncclSum;
            // SAFETY: `send` holds `count_in` elements and `recv` `count_out` of type T on
            // this communicator's device and stream, both alive until the op is done (the
            // caller synchronises the stream before either is dropped or read).
            unsafe {
                match self.op {
                    Op::AllGather => nccl::all_gather(send, recv, count_in, kind, c.comm, stream),
                    Op::AllReduce => {
                        nccl::all_reduce(send, recv, count_in, kind, sum, c.comm, stream)
                    }
                    Op::ReduceScatter => {
                        nccl::reduce_scatter(send, recv, count_out, kind, sum, c.comm, stream)
                    }
                    // Every rank's `send` is a valid buffer of the root's shape; NCCL reads
                    // the root's only.
                    Op::Broadcast(root) => nccl::broadcast(
                        send,
                        recv,
                        count_out,
                        kind,
                        i32::try_from(root).expect("a rank that fits an i32"),
                        c.comm,
                        stream,
                    ),
                }
            }
        };
        done.map_err(|e| {
            candle_core::Error::Msg(format!("NCCL (rank {}): {}", c.rank, nccl_message(&e)))
        })?;
        Ok(T::wrap_cuda_slice(dst, device))
    }
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(
            "NCCL collectives take CUDA tensors".into(),
        ))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let mut dims = l.shape().dims().to_vec();
        match self.op {
            Op::AllGather => dims[0] *= self.size,
            Op::ReduceScatter => dims[0] /= self.size,
            Op::AllReduce | Op::Broadcast(_) => {}
        }
        let out = Shape::from(dims);
        let storage = match s.dtype() {
            DType::F32 => self.run::<f32>(s, l, out.clone())?,
            DType::F64 => self.run::<f64>(s, l, out.clone())?,
            DType::BF16 => self.run::<half::bf16>(s, l, out.clone())?,
            DType::F16 => self.run::<half::f16>(s, l, out.clone())?,
            DType::U32 => self.run::<u32>(s, l, out.clone())?,
            DType::U8 => self.run::<u8>(s, l, out.clone())?,
            DType::I64 => self.run::<i64>(s, l, out.clone())?,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "NCCL collectives here take f32, f64, bf16, f16, u32, u8 or i64, not {other:?}"
                )))
            }
        };
        Ok((storage, out))
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        if t.rank() == 0 {
            return Err(Error::Collective {
                op: "all_gather",
                group: self.name.clone(),
                message: "a scalar has no rows to gather".into(),
            });
        }
        // NCCL gathers equal blocks: first every rank's row count, then padded blocks.
        let rows = t.dim(0)?;
        let counts: Vec<usize> = self
            .run(Op::AllGather, &Tensor::new(&[rows as u32], &Device::Cpu)?)?
            .to_vec1::<u32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        self.gather_blocks(t, &counts)
    }

    /// The layout says every rank's rows: no counts to gather first.
    fn all_gather_rows(&self, t: &Tensor, rows: &[usize]) -> Result<Tensor> {
        super::check_rows(self, "all_gather", t, rows, super::RowsHeld::Own)?;
        self.gather_blocks(t, rows)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let out = self.run(Op::AllReduce, t)?;
        self.count(&out);
        Ok(out)
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let rows = t.dim(0)?;
        if rows % self.size != 0 {
            return Err(Error::Collective {
                op: "reduce_scatter",
                group: self.name.clone(),
                message: format!("{rows} rows do not split into {} equal blocks", self.size),
            });
        }
        self.count(t);
        self.run(Op::ReduceScatter, t)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        // The root's shape first: other ranks' `t` only says where the result goes.
        let mut header = [0u32; 9];
        if self.rank == root {
            header[0] = t.rank() as u32;
            for (h, &d) in header[1..].iter_mut().zip(t.dims()) {
                *h = d as u32;
            }
        }
        let header: Vec<u32> = self
            .run(Op::Broadcast(root), &Tensor::new(&header, &Device::Cpu)?)?
            .to_vec1()?;
        let dims: Vec<usize> = header[1..=header[0] as usize]
            .iter()
            .map(|&d| d as usize)
            .collect();
        let mine = if self.rank == root {
            t.clone()
        } else {
            Tensor::zeros(dims, t.dtype(), t.device())?
        };
        let out = self.run(Op::Broadcast(root), &mine)?;
        self.count(&out);
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        self.run(Op::AllReduce, &Tensor::new(&[0f32], &Device::Cpu)?)?;
        Ok(())
    }

    fn payload_bytes(&self) -> u64 {
        self.payload.load(Ordering::Relaxed)
    }
}

/// The rendezvous keys of the NCCL ids rank 0 creates.
pub fn id_keys() -> [&'static str; 5] {
    [
        "nccl/world",
        "nccl/image",
        "nccl/text",
        "nccl/image-stats",
        "nccl/text-stats",
    ]
}

/// Fresh ids for every key of [`id_keys`] (world rank 0 calls this before the
/// rendezvous).
pub fn new_ids() -> Result<Vec<(String, Vec<u8>)>> {
    id_keys()
        .iter()
        .map(|k| Ok((k.to_string(), new_id()?)))
        .collect()
}

/// This rank's communicators from the ids the rendezvous handed out, on `device`.
pub fn rank_comms(
    topology: &Topology,
    rank: usize,
    ids: &dyn Fn(&str) -> Option<Vec<u8>>,
    device: &Device,
) -> Result<RankComms> {
    let id = |key: &str| {
        ids(key).ok_or_else(|| Error::Rendezvous {
            peer: "rank 0".into(),
            message: format!("the rendezvous has no NCCL id `{key}`"),
        })
    };
    set_abort_hook();
    let me = &topology.ranks[rank];
    // One process per GPU (NCCL refuses two ranks of one communicator on one device): it
    // joins the world once and the group of every tower it holds, image first (each
    // initialisation waits for its members only, so the order cannot deadlock).
    let world = NcclCommunicator::on_own_stream(
        &id("nccl/world")?,
        rank,
        topology.world_size(),
        device,
        "world",
    )?;
    let mut groups = Vec::new();
    for role in &me.roles {
        let name = role.tower.to_string();
        let (group_key, stats_key) = match role.tower {
            Tower::Image => ("nccl/image", "nccl/image-stats"),
            Tower::Text => ("nccl/text", "nccl/text-stats"),
        };
        let size = topology.group_size(role.tower);
        // The gradient sums' communicator, on its own stream (see the module's note).
        let group =
            NcclCommunicator::on_own_stream(&id(group_key)?, role.group_rank, size, device, &name)?;
        let stats = NcclCommunicator::new(&id(stats_key)?, role.group_rank, size, device, &name)?;
        groups.push(GroupComms {
            tower: role.tower,
            comm: Box::new(group),
            stats: Arc::new(stats),
        });
    }
    Ok(RankComms {
        world: Box::new(world),
        groups,
    })
}

/// Makes the collective watchdog abort this process's NCCL communicators before it
/// exits (freeing the GPU for the peers' own aborts).
pub fn set_abort_hook() {
    super::watchdog::set_abort_hook(abort_all);
}
