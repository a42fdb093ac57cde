//! Which ranks this process runs, from how it was started: every rank as a thread (the
//! embedded default), or one rank of a multi-process run under mpirun (MPI) or under a
//! launcher that sets torchrun's or Slurm's variables (NCCL, one process per GPU). Also
//! how many compute threads each rank gets.

use std::time::Duration;

use super::rendezvous::{stable_hash, LaunchEnv};
use super::RankComms;
use crate::error::{Error, Result};
use crate::topology::{DeviceKind, Topology};

/// How ranks talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Every rank a thread of this process.
    Thread,
    /// One process per rank under mpirun (feature `mpi`).
    Mpi,
    /// One process per GPU (feature `cuda`).
    Nccl,
}

impl Backend {
    /// "threads", "processes (MPI)", "processes (NCCL)": what a rank is.
    pub fn ranks_are(self) -> &'static str {
        match self {
            Backend::Thread => "threads",
            Backend::Mpi => "processes (MPI)",
            Backend::Nccl => "processes (NCCL)",
        }
    }
}

/// Which of the topology's ranks this process runs.
pub enum Ranks {
    /// All of them, one thread each (the embedded default).
    Threads,
    /// One: this process is rank `rank` of a multi-process run (MPI, or one process per
    /// GPU), with its communicators.
    Process { rank: usize, comms: RankComms },
}

impl Ranks {
    /// Whether this process speaks for the run (prints, writes the metrics): world rank 0,
    /// or the process of every rank thread.
    pub fn lead(&self) -> bool {
        match self {
            Ranks::Threads => true,
            Ranks::Process { rank, .. } => *rank == 0,
        }
    }
}

/// What every process of a run must agree on before any rank starts.
#[derive(Debug, Clone, Copy)]
pub struct Job {
    /// A hash of the training and model configs.
    pub config_hash: u64,
    /// How long a collective may take before the watchdog ends the run.
    pub collective_timeout: Duration,
}

/// This process's part of a run.
pub struct Launch {
    pub backend: Backend,
    pub ranks: Ranks,
    /// Compute threads each rank of this process gets.
    pub threads_per_rank: usize,
}

/// Chooses the backend (`requested`, else: MPI under mpirun; NCCL for a cuda topology
/// under a multi-process launcher; else threads), joins the other processes (checking that
/// they run the same topology and `job`) and sizes each rank's compute threads.
pub fn launch(topology: &Topology, requested: Option<Backend>, job: &Job) -> Result<Launch> {
    // A single-task launch (srun without -n) is just this process.
    let env = LaunchEnv::from_env()?.filter(|e| e.world_size > 1);
    let backend = requested.unwrap_or(if launched_by_mpi() {
        Backend::Mpi
    } else if env.is_some() && topology.device == DeviceKind::Cuda {
        Backend::Nccl
    } else {
        Backend::Thread
    });
    if let (Some(env), Backend::Thread) = (env.as_ref(), backend) {
        return Err(Error::Launcher {
            variable: "RANK".into(),
            message: format!(
            "{} started this process as rank {} of {}, but rank threads run the whole topology in one \
             process: for CPU ranks across processes use the MPI backend (build with --features mpi, \
             start with scripts/launch.sh --backend mpi); for GPUs, a cuda topology with --backend nccl",
            env.launcher, env.rank, env.world_size
            ),
        });
    }
    let ranks = match backend {
        Backend::Thread => Ranks::Threads,
        Backend::Mpi => mpi_ranks(topology, job)?,
        Backend::Nccl => nccl_ranks(topology, job, env.as_ref())?,
    };
    let threads_per_rank = match &ranks {
        Ranks::Threads => threads_per_rank(topology.world_size()),
        // The processes on this machine share its cores.
        Ranks::Process { .. } => threads_per_rank(
            ["OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_WORLD_SIZE"]
                .iter()
                .find_map(|v| std::env::var(v).ok()?.parse().ok())
                .unwrap_or(1),
        ),
    };
    Ok(Launch {
        backend,
        ranks,
        threads_per_rank,
    })
}

/// Rank threads already run in parallel, and they share candle's one global thread pool:
/// unless the user chose (RAYON_NUM_THREADS), give each of the `ranks_here` ranks on this
/// machine its share of the cores (measured on 2 cores with three ranks: 1 thread each ran
/// 4x faster than the default of all cores). Call before any tensor work: rayon's pool
/// and gemm read the variable when first used.
pub fn threads_per_rank(ranks_here: usize) -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    let n = (cores() / ranks_here.max(1)).max(1);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// This machine's cores (as the process may use them).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether mpirun started this process.
pub fn launched_by_mpi() -> bool {
    #[cfg(feature = "mpi")]
    {
        super::mpi::launched_by_mpi()
    }
    #[cfg(not(feature = "mpi"))]
    {
        false
    }
}

/// A hash of where the topology puts every rank: what all processes must agree on.
pub fn topology_hash(topology: &Topology) -> u64 {
    stable_hash(format!("{:?}{:?}", topology.device, topology.ranks).as_bytes())
}

/// This process's rank and NCCL communicators: the rendezvous (rank 0 serves it and
/// hands out the NCCL ids) checks that every process runs the same job.
fn nccl_ranks(topology: &Topology, job: &Job, env: Option<&LaunchEnv>) -> Result<Ranks> {
    let Some(env) = env else {
        return Err(Error::Launcher {
            variable: "RANK".into(),
            message: "--backend nccl runs one process per GPU: start them with scripts/launch.sh, \
                      torchrun or srun (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE or Slurm's \
                      variables); this process has none of those variables"
                .into(),
        });
    };
    if env.world_size != topology.world_size() {
        return Err(Error::invalid(
            &topology.source,
            "ranks",
            format!(
                "the topology has {} ranks but {} started {} processes",
                topology.world_size(),
                env.launcher,
                env.world_size
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    {
        use super::nccl;
        super::watchdog::set_collective_timeout(job.collective_timeout);
        let shared = if env.rank == 0 {
            nccl::new_ids()?
        } else {
            Vec::new()
        };
        let rendezvous = super::rendezvous::join(
            env,
            topology_hash(topology),
            job.config_hash,
            shared,
            job.collective_timeout,
        )?;
        let device = super::device::rank_device(topology, env.rank)?;
        let comms = nccl::rank_comms(
            topology,
            env.rank,
            &|key| rendezvous.get(key).map(<[u8]>::to_vec),
            &device,
        )?;
        Ok(Ranks::Process {
            rank: env.rank,
            comms,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = job;
        Err(Error::NeedsFeature {
            feature: "cuda",
            message:
                "--backend nccl needs a build with CUDA: cargo build --release --features cuda \
                      (scripts/cuda-build.sh builds it without a system CUDA toolkit)"
                    .into(),
        })
    }
}

/// This process's rank and communicators under mpirun, after checking that every
/// process runs the same job.
fn mpi_ranks(topology: &Topology, job: &Job) -> Result<Ranks> {
    #[cfg(feature = "mpi")]
    {
        super::watchdog::set_collective_timeout(job.collective_timeout);
        let (rank, comms) = super::mpi::rank_comms(topology)?;
        super::agree_on_run(
            comms.world.as_ref(),
            topology_hash(topology),
            job.config_hash,
        )?;
        Ok(Ranks::Process { rank, comms })
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = (topology, job);
        Err(Error::NeedsFeature {
            feature: "mpi",
            message: "--backend mpi needs a build with MPI: cargo build --release --features mpi \
                      (Debian: apt install libopenmpi-dev libclang-dev openmpi-bin)"
                .into(),
        })
    }
}
