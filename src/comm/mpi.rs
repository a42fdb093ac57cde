//! Ranks in separate processes on the CPU, over MPI (`mpirun`; Debian's OpenMPI): the
//! multi-process, multi-node path testable without GPUs. One process per rank; the world
//! communicator is split into the image and text groups by tower.
//!
//! Every collective is an all-gather underneath, and sums are taken locally in rank order,
//! exactly as the thread backend takes them: results are bit-identical to a single-process
//! run on the same topology (the parity the tests hold), at the cost of moving n times
//! the bytes of a ring reduction. This is the correctness path; NCCL is the fast one.
//!
//! MPI handles are not thread-safe objects in Rust's eyes. A process holds one rank, and
//! all its collectives go through one process-wide lock, so MPI only ever sees one call at
//! a time (initialised with `Threading::Serialized`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor, WithDType};
use mpi::datatype::PartitionMut;
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use mpi::traits::*;

use super::watchdog::InFlight;
use super::{shape_mismatch, sum_in_order, Communicator, GroupComms, RankComms};
use crate::error::{Error, Result};
use crate::topology::{Topology, Tower};

/// MPI is initialised once per process and finalised at exit.
struct MpiProcess {
    universe: mpi::environment::Universe,
    lock: Arc<Mutex<()>>,
}

// SAFETY: the universe is only touched under `lock` (or read for the world handle).
unsafe impl Send for MpiProcess {}
unsafe impl Sync for MpiProcess {}

static PROCESS: OnceLock<std::result::Result<MpiProcess, String>> = OnceLock::new();

fn process() -> Result<&'static MpiProcess> {
    PROCESS
        .get_or_init(|| {
            let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| {
                    "MPI could not be initialised (already initialised elsewhere?)".to_string()
                })?;
            if threading < mpi::Threading::Serialized {
                return Err(format!(
                    "this MPI library offers thread level {threading:?}; mmpipe needs Serialized"
                ));
            }
            Ok(MpiProcess {
                universe,
                lock: Arc::new(Mutex::new(())),
            })
        })
        .as_ref()
        .map_err(|e| Error::Msg(e.clone()))
}

/// Ends MPI for this process (mpirun counts a process that exits without it as failed).
/// Call last, after every communicator from [`rank_comms`] is dropped; a no-op when MPI
/// was never started.
pub fn finalize() {
    if let Some(Ok(p)) = PROCESS.get() {
        let _guard = p.lock.lock().expect("MPI lock");
        // SAFETY: called once at the end; the universe (a static) is never dropped, so
        // MPI is not finalised twice.
        unsafe {
            mpi::ffi::MPI_Finalize();
        }
    }
}

/// This process's rank and the world's size, as the MPI launcher set them.
pub fn world_rank_and_size() -> Result<(usize, usize)> {
    let p = process()?;
    let _guard = p.lock.lock().expect("MPI lock");
    let world = p.universe.world();
    Ok((world.rank() as usize, world.size() as usize))
}

/// Whether this process was started by an MPI launcher (mpirun/mpiexec/srun --mpi).
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

pub struct MpiCommunicator {
    comm: SimpleCommunicator,
    lock: Arc<Mutex<()>>,
    name: String,
    rank: usize,
    size: usize,
    payload: AtomicU64,
}

// SAFETY: every use of `comm` holds the process-wide MPI lock.
unsafe impl Send for MpiCommunicator {}
unsafe impl Sync for MpiCommunicator {}

impl MpiCommunicator {
    fn new(comm: SimpleCommunicator, lock: Arc<Mutex<()>>, name: &str) -> Self {
        MpiCommunicator {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm,
            lock,
            name: name.to_string(),
            payload: AtomicU64::new(0),
        }
    }

    fn count(&self, t: &Tensor) {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.payload.fetch_add(bytes, Ordering::Relaxed);
    }

    fn fail(&self, op: &'static str, message: String) -> Error {
        Error::Collective {
            op,
            group: self.name.clone(),
            message,
        }
    }

    /// Every rank's `values`, concatenated in rank order; `counts[r]` elements from rank r.
    fn gather_values<T: Equivalence + Default + Clone>(
        &self,
        values: &[T],
        counts: &[usize],
    ) -> Vec<T> {
        let total: usize = counts.iter().sum();
        let mut out = vec![T::default(); total];
        let counts_i: Vec<mpi::Count> = counts.iter().map(|&c| c as mpi::Count).collect();
        let displs: Vec<mpi::Count> = counts_i
            .iter()
            .scan(0, |acc, &c| {
                let at = *acc;
                *acc += c;
                Some(at)
            })
            .collect();
        {
            let mut partition = PartitionMut::new(&mut out[..], counts_i, &displs[..]);
            self.comm.all_gather_varcount_into(values, &mut partition);
        }
        out
    }

    /// Every rank's tensor (same dtype, any shape), in rank order. The shapes travel
    /// first, so mismatches are named before any data moves.
    fn exchange(&self, op: &'static str, t: &Tensor) -> Result<Vec<Tensor>> {
        let _guard = self.lock.lock().expect("MPI lock");
        let _watch = InFlight::start(op, &self.name);
        // Header: dtype code, rank, dims (padded to 8).
        let mut header = [u64::MAX; 10];
        header[0] = dtype_code(t.dtype())
            .ok_or_else(|| self.fail(op, format!("{:?} tensors are not supported", t.dtype())))?;
        header[1] = t.rank() as u64;
        if t.rank() > 8 {
            return Err(self.fail(op, format!("a tensor of rank {} (at most 8)", t.rank())));
        }
        for (i, &d) in t.dims().iter().enumerate() {
            header[2 + i] = d as u64;
        }
        let mut headers = vec![0u64; 10 * self.size];
        self.comm.all_gather_into(&header[..], &mut headers[..]);
        let shapes: Vec<Vec<usize>> = headers
            .chunks(10)
            .map(|h| {
                h[2..2 + h[1] as usize]
                    .iter()
                    .map(|&d| d as usize)
                    .collect()
            })
            .collect();
        for (peer, h) in headers.chunks(10).enumerate() {
            if h[0] != header[0] {
                return Err(self.fail(
                    op,
                    format!(
                        "rank {peer} sent {} but rank {} sent {:?}",
                        h[0],
                        self.rank,
                        t.dtype()
                    ),
                ));
            }
        }
        let counts: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let flat = t.flatten_all()?;
        let parts = match t.dtype() {
            DType::F32 => self.split(
                &self.gather_values(&flat.to_vec1::<f32>()?, &counts),
                &shapes,
            )?,
            DType::F64 => self.split(
                &self.gather_values(&flat.to_vec1::<f64>()?, &counts),
                &shapes,
            )?,
            DType::U32 => self.split(
                &self.gather_values(&flat.to_vec1::<u32>()?, &counts),
                &shapes,
            )?,
            DType::I64 => self.split(
                &self.gather_values(&flat.to_vec1::<i64>()?, &counts),
                &shapes,
            )?,
            DType::U8 => self.split(
                &self.gather_values(&flat.to_vec1::<u8>()?, &counts),
                &shapes,
            )?,
            // MPI has no bf16: its bits travel as u16 (the sums are taken here, in order).
            DType::BF16 => {
                let bits: Vec<u16> = flat
                    .to_vec1::<half::bf16>()?
                    .into_iter()
                    .map(half::bf16::to_bits)
                    .collect();
                let values: Vec<half::bf16> = self
                    .gather_values(&bits, &counts)
                    .into_iter()
                    .map(half::bf16::from_bits)
                    .collect();
                self.split(&values, &shapes)?
            }
            other => return Err(self.fail(op, format!("{other:?} tensors are not supported"))),
        };
        Ok(parts)
    }

    fn split<T: WithDType>(&self, values: &[T], shapes: &[Vec<usize>]) -> Result<Vec<Tensor>> {
        let mut at = 0;
        let mut out = Vec::with_capacity(shapes.len());
        for shape in shapes {
            let n: usize = shape.iter().product();
            out.push(Tensor::from_slice(
                &values[at..at + n],
                shape.as_slice(),
                &Device::Cpu,
            )?);
            at += n;
        }
        Ok(out)
    }

    fn check_same_shape(&self, op: &'static str, parts: &[Tensor]) -> Result<()> {
        match shape_mismatch(parts, false) {
            Some(message) => Err(self.fail(op, message)),
            None => Ok(()),
        }
    }
}

fn dtype_code(d: DType) -> Option<u64> {
    Some(match d {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::U32 => 2,
        DType::I64 => 3,
        DType::U8 => 4,
        DType::BF16 => 5,
        _ => return None,
    })
}

impl Communicator for MpiCommunicator {
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
        let parts = self.exchange("all_gather", t)?;
        if let Some(message) = shape_mismatch(&parts, true) {
            return Err(self.fail("all_gather", message));
        }
        let gathered = Tensor::cat(&parts, 0)?;
        self.count(&gathered);
        Ok(gathered)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let parts = self.exchange("all_reduce", t)?;
        self.check_same_shape("all_reduce", &parts)?;
        self.count(t);
        Ok(sum_in_order(&parts)?)
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "reduce_scatter";
        let rows = t.dims().first().copied().unwrap_or(0);
        if rows % self.size != 0 {
            return Err(self.fail(
                OP,
                format!("{rows} rows do not split into {} equal blocks", self.size),
            ));
        }
        let parts = self.exchange(OP, t)?;
        self.check_same_shape(OP, &parts)?;
        let block = rows / self.size;
        let mine: Vec<Tensor> = parts
            .iter()
            .map(|p| p.narrow(0, self.rank * block, block))
            .collect::<candle_core::Result<_>>()?;
        self.count(t);
        Ok(sum_in_order(&mine)?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.size {
            return Err(self.fail(
                "broadcast",
                format!("root {root} is not a rank of a group of {}", self.size),
            ));
        }
        // Only the root's tensor matters; the others send nothing.
        let empty;
        let mine = if self.rank == root {
            t
        } else {
            empty = Tensor::zeros(0, t.dtype(), &Device::Cpu)?;
            &empty
        };
        let parts = self.exchange("broadcast", mine)?;
        let out = parts[root].clone();
        self.count(&out);
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        let _guard = self.lock.lock().expect("MPI lock");
        let _watch = InFlight::start("barrier", &self.name);
        self.comm.barrier();
        Ok(())
    }

    fn payload_bytes(&self) -> u64 {
        self.payload.load(Ordering::Relaxed)
    }

    fn serialises_collectives(&self) -> bool {
        true
    }
}

/// This process's communicators for `topology`: the world, its tower's group (split by
/// tower from the world, keeping world order), and a second handle on the group for
/// statistics. The MPI world must have the topology's size.
pub fn rank_comms(topology: &Topology) -> Result<(usize, RankComms)> {
    let p = process()?;
    let _guard = p.lock.lock().expect("MPI lock");
    let world = p.universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    if size != topology.world_size() {
        return Err(Error::invalid(
            &topology.source,
            "nodes",
            format!(
                "the topology has {} ranks but mpirun started {size} processes: use -np {}",
                topology.world_size(),
                topology.world_size()
            ),
        ));
    }
    // Every process takes part in every split (MPI's rule); a process outside a tower's
    // group gets no communicator from it. The key puts each group in the file's order
    // (group rank = list order), whatever the world order.
    let mut groups = Vec::new();
    for tower in [Tower::Image, Tower::Text] {
        let role = topology.ranks[rank].role(tower);
        let (colour, key) = match role {
            Some(r) => (Color::with_value(0), r.group_rank as i32),
            None => (Color::undefined(), 0),
        };
        let group = world.split_by_color_with_key(colour, key);
        let stats = world.split_by_color_with_key(colour, key);
        if let (Some(_), Some(group), Some(stats)) = (role, group, stats) {
            let name = tower.to_string();
            groups.push(GroupComms {
                tower,
                comm: Box::new(MpiCommunicator::new(group, p.lock.clone(), &name)),
                stats: Arc::new(MpiCommunicator::new(stats, p.lock.clone(), &name)),
            });
        } else if role.is_some() {
            return Err(Error::Collective {
                op: "split",
                group: "world".into(),
                message: format!("MPI could not split the {tower} group"),
            });
        }
    }
    let world_comm = world.duplicate();
    drop(_guard);
    Ok((
        rank,
        RankComms {
            world: Box::new(MpiCommunicator::new(world_comm, p.lock.clone(), "world")),
            groups,
        },
    ))
}
