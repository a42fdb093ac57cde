//! Collectives over groups of ranks. One trait, three backends: rank threads in one
//! process ([`thread`]), processes on CPUs over MPI (`mpi`, feature `mpi`), GPUs over
//! NCCL (`nccl`, feature `cuda`). Model and loss code only
//! ever see `&dyn Communicator`.
//!
//! Conventions every backend keeps:
//! - tensors are split and concatenated along dimension 0;
//! - sums are taken in rank order 0, 1, …, n-1 so every rank gets the bit-identical result,
//!   whatever the thread timing;
//! - a peer that leaves (error, panic, drop) turns the collective into an error on the
//!   ranks still waiting, never a hang.

pub mod device;
pub mod launch;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod overlap;
pub mod rendezvous;
pub mod thread;
pub mod upload;
pub mod watchdog;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::topology::Tower;

pub trait Communicator: Send {
    /// Rank inside this group.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// "world", "image" or "text": named in errors.
    fn name(&self) -> &str;

    /// Concatenates every rank's tensor along dim 0, in rank order. Ranks may contribute
    /// different numbers of rows; the other dimensions must agree.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Element-wise sum over ranks; every rank gets the same tensor.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Sums the ranks' tensors and gives rank r the r-th of `size` equal row blocks.
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s tensor on every rank (`t` is ignored elsewhere, except for its device).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;

    /// Bytes of the buffers this rank's collectives have handled so far: the gathered
    /// result of an all-gather, the summed buffer of an all-reduce, the input of a
    /// reduce-scatter, the tensor of a broadcast. Backend-independent, so it can be set
    /// against `mmpipe plan`'s traffic table; what a ring puts on the wire follows from it.
    fn payload_bytes(&self) -> u64;

    /// Whether one of this rank's collectives holds every other communicator of the
    /// process until it completes (MPI here: one process-wide lock). Then a collective
    /// on another thread may not wait for one this thread has yet to make: the gradient
    /// sums do not overlap a backward that itself reduces (synchronised batch norm).
    fn serialises_collectives(&self) -> bool {
        false
    }

    /// Element-wise sums of many tensors over ranks, as one collective: every rank passes
    /// the same list of shapes in the same order (a replica's gradients). By default one
    /// flattened bucket ([`all_reduce_bucket`]); a backend that can hand tensors over
    /// without copying them into a bucket does so.
    fn all_reduce_sum_many(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        all_reduce_bucket(self, tensors)
    }

    /// [`Self::all_gather`] when every rank knows every rank's row count beforehand
    /// (`rows`, one per rank, the same on every rank: the features' layout): a backend
    /// that gathers equal blocks need not exchange the counts first (NCCL: one collective
    /// and one wait of the host fewer).
    fn all_gather_rows(&self, t: &Tensor, rows: &[usize]) -> Result<Tensor> {
        check_rows(self, "all_gather", t, rows, RowsHeld::Own)?;
        let gathered = self.all_gather(t)?;
        let total: usize = rows.iter().sum();
        if gathered.dim(0)? != total {
            return Err(Error::Collective {
                op: "all_gather",
                group: self.name().to_string(),
                message: format!(
                    "gathered {} rows where the ranks' counts {rows:?} add up to {total}",
                    gathered.dim(0)?
                ),
            });
        }
        Ok(gathered)
    }

    /// Sums the ranks' tensors and gives rank r its `rows[r]` rows, rank 0's first. Every
    /// rank passes the same `rows`; blocks may differ in size (the two modality groups
    /// own different numbers of samples when their sizes differ).
    fn reduce_scatter_rows_sum(&self, t: &Tensor, rows: &[usize]) -> Result<Tensor> {
        check_rows(self, "reduce_scatter", t, rows, RowsHeld::Everyones)?;
        let widest = rows.iter().copied().max().unwrap_or(0);
        if rows.iter().all(|&r| r == widest) {
            return self.reduce_scatter_sum(t);
        }
        // Equal blocks are what every backend's reduce-scatter takes: pad, then trim.
        let mut blocks = Vec::with_capacity(rows.len());
        let mut at = 0;
        for &r in rows {
            let block = t.narrow(0, at, r)?;
            at += r;
            blocks.push(if r == widest {
                block
            } else {
                let mut pad_shape = t.dims().to_vec();
                pad_shape[0] = widest - r;
                Tensor::cat(
                    &[block, Tensor::zeros(pad_shape, t.dtype(), t.device())?],
                    0,
                )?
            });
        }
        let mine = self.reduce_scatter_sum(&Tensor::cat(&blocks, 0)?)?;
        Ok(mine.narrow(0, 0, rows[self.rank()])?)
    }
}

/// Checks, over `world`, that every rank runs the same job: the same topology and config
/// hashes as rank 0 (see [`rendezvous::stable_hash`]). A mismatch names the ranks and
/// both hashes.
pub fn agree_on_run(world: &dyn Communicator, topology_hash: u64, config_hash: u64) -> Result<()> {
    let halves = |h: u64| [(h >> 32) as u32, h as u32];
    let mine: Vec<u32> = halves(topology_hash)
        .into_iter()
        .chain(halves(config_hash))
        .collect();
    let all: Vec<Vec<u32>> = world
        .all_gather(&Tensor::from_vec(mine, (1, 4), &candle_core::Device::Cpu)?)?
        .to_vec2()?;
    let join = |r: &[u32]| {
        (
            u64::from(r[0]) << 32 | u64::from(r[1]),
            u64::from(r[2]) << 32 | u64::from(r[3]),
        )
    };
    let (topology0, config0) = join(&all[0]);
    for (rank, r) in all.iter().enumerate().skip(1) {
        let (topology, config) = join(r);
        for (what, lead, theirs) in [
            ("topology", topology0, topology),
            ("config", config0, config),
        ] {
            if lead != theirs {
                return Err(Error::Collective {
                    op: "agree_on_run",
                    group: world.name().to_string(),
                    message: format!(
                        "ranks run different jobs: rank 0 has {what} hash {lead:016x}, rank {rank} has {theirs:016x}; \
                         start every rank with the same topology file, model and training config"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// One tower's group, as a rank in it holds it.
pub struct GroupComms {
    pub tower: Tower,
    /// The group's collectives: the gradient sums (from a worker thread while backward
    /// runs, [`overlap`]) and the replicas' checks.
    pub comm: Box<dyn Communicator + Sync>,
    /// A second communicator over the same group, shareable with model code that reduces
    /// inside forward and backward (synchronised batch norm).
    pub stats: std::sync::Arc<dyn Communicator + Sync>,
}

/// What one rank holds: the world, and the group of each tower it trains (image first).
pub struct RankComms {
    /// The features' and the loss's collectives, and the step's flags: from the rank's
    /// thread, and from a worker that gathers the image features while a rank that holds
    /// both towers runs its text forward.
    pub world: Box<dyn Communicator + Sync>,
    pub groups: Vec<GroupComms>,
}

impl RankComms {
    /// This rank's communicator in `tower`'s group; an error when it does not hold that
    /// tower.
    pub fn group(&self, tower: Tower) -> Result<&GroupComms> {
        self.groups
            .iter()
            .find(|g| g.tower == tower)
            .ok_or_else(|| Error::Collective {
                op: "group",
                group: tower.to_string(),
                message: format!("world rank {} holds no {tower} replica", self.world.rank()),
            })
    }

    /// The towers this rank trains, image first.
    pub fn towers(&self) -> Vec<Tower> {
        self.groups.iter().map(|g| g.tower).collect()
    }
}

/// Which rows a rank's tensor holds, given every rank's count.
#[derive(Clone, Copy)]
pub(crate) enum RowsHeld {
    /// Its own (an all-gather's input).
    Own,
    /// Every rank's, rank 0's first (a reduce-scatter's input).
    Everyones,
}

/// That `rows` has one count per rank and `t` the rows it should hold: what a collective
/// given every rank's row count can check before it starts.
pub(crate) fn check_rows<C: Communicator + ?Sized>(
    comm: &C,
    op: &'static str,
    t: &Tensor,
    rows: &[usize],
    held: RowsHeld,
) -> Result<()> {
    let fail = |message: String| Error::Collective {
        op,
        group: comm.name().to_string(),
        message,
    };
    if rows.len() != comm.size() {
        return Err(fail(format!(
            "{} row counts for {} ranks",
            rows.len(),
            comm.size()
        )));
    }
    let (want, whose) = match held {
        RowsHeld::Own => (rows[comm.rank()], "its count"),
        RowsHeld::Everyones => (rows.iter().sum(), "the blocks"),
    };
    if t.rank() == 0 || t.dim(0)? != want {
        return Err(fail(format!(
            "rank {} passed {:?}, but {whose} say {want} rows",
            comm.rank(),
            t.dims(),
        )));
    }
    Ok(())
}

/// Why the ranks' tensors of one collective do not fit together, in the words every
/// backend uses: the first rank whose shape differs from rank 0's. With
/// `rows_may_differ` (all-gather), dimension 0 is free but every tensor needs one.
pub(crate) fn shape_mismatch(parts: &[Tensor], rows_may_differ: bool) -> Option<String> {
    let first = parts[0].dims();
    parts.iter().enumerate().find_map(|(peer, p)| {
        let fits = if rows_may_differ {
            p.rank() > 0 && p.dims()[1..] == first[1..]
        } else {
            p.dims() == first
        };
        (!fits).then(|| {
            format!(
                "rank 0 sent shape {first:?} but rank {peer} sent {:?}",
                p.dims()
            )
        })
    })
}

/// Sums a list of tensors in their order: the fixed reduction order of every backend.
pub(crate) fn sum_in_order(parts: &[Tensor]) -> candle_core::Result<Tensor> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        acc = (acc + p)?;
    }
    Ok(acc)
}

/// A tensor of an all-reduce list whose rows are zero on this rank outside `rows` (a
/// token-embedding gradient: only the batch's tokens' rows are looked up).
#[derive(Debug, Clone)]
pub struct SparseRows {
    /// Its position in the list.
    pub index: usize,
    /// Its rows that may be non-zero here, in any order, repeats allowed.
    pub rows: Vec<u32>,
}

/// [`Communicator::all_reduce_sum_many`] for a list in which some tensors are zero outside
/// a few rows on each rank: those travel as the union of the ranks' rows instead of whole.
/// A token-embedding gradient of 49 408 rows has a few thousand non-zero at a batch of
/// 128 captions. Rows outside the union are zero on every rank, so their sum is zero: the
/// result equals the dense all-reduce (and the summed rows are summed the same way).
///
/// First a union of the row sets (an all-reduce of one 0/1 mask per sparse tensor, 4 bytes
/// a row), then one all-reduce of the dense tensors and the packed rows. Where the union
/// covers more than half of a tensor's rows, it travels whole (every rank sees the same
/// union, so all decide alike).
pub fn all_reduce_sum_sparse_rows<C: Communicator + ?Sized>(
    comm: &C,
    tensors: &[Tensor],
    sparse: &[SparseRows],
) -> Result<Vec<Tensor>> {
    if sparse.is_empty() || comm.size() == 1 {
        return comm.all_reduce_sum_many(tensors);
    }
    let mut masks = Vec::new();
    for s in sparse {
        let t = tensors.get(s.index).ok_or_else(|| {
            Error::Msg(format!(
                "sparse-row tensor {} of a list of {}",
                s.index,
                tensors.len()
            ))
        })?;
        let n = t.dim(0)?;
        let mut mask = vec![0f32; n];
        for &r in &s.rows {
            *mask
                .get_mut(r as usize)
                .ok_or_else(|| Error::Msg(format!("sparse row {r} of a tensor with {n} rows")))? =
                1.0;
        }
        masks.extend(mask);
    }
    let device = tensors[sparse[0].index].device();
    let total = masks.len();
    // In the gradients' dtype, so the mask costs what the planner counts (a sum of 0s and
    // 1s is positive exactly where some rank has the row, in bf16 as in f32).
    let mask =
        Tensor::from_vec(masks, total, device)?.to_dtype(tensors[sparse[0].index].dtype())?;
    let union = comm.all_reduce_sum(&mask)?;
    let union = union
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;

    let mut list = tensors.to_vec();
    let mut packed = Vec::new();
    let mut offset = 0;
    for s in sparse {
        let n = tensors[s.index].dim(0)?;
        let rows: Vec<u32> = (0..n as u32)
            .filter(|&r| union[offset + r as usize] > 0.0)
            .collect();
        offset += n;
        if rows.len() * 2 > n {
            continue;
        }
        let index = Tensor::from_vec(rows.clone(), rows.len(), device)?;
        list[s.index] = tensors[s.index].index_select(&index, 0)?;
        packed.push((s.index, index, n));
    }
    let mut reduced = comm.all_reduce_sum_many(&list)?;
    for (i, index, n) in packed {
        reduced[i] = unpack_rows(&reduced[i], &index, n)?;
    }
    Ok(reduced)
}

/// Elements [`all_reduce_sum_sparse_rows`] sends for a table of `rows` rows of `width`
/// when the ranks use at most `rows_in_use` rows between them: the 0/1 row mask, then the
/// packed rows, or the whole table where they would be over half of it.
pub fn sparse_rows_elems(rows: usize, width: usize, rows_in_use: usize) -> usize {
    let sent = if rows_in_use.min(rows) * 2 <= rows {
        rows_in_use * width
    } else {
        rows * width
    };
    rows + sent
}

/// A zero tensor of `rows` rows with `packed`'s rows at `index` (distinct rows). On the
/// CPU the rows are written into one zeroed buffer: `index_add` would first copy a zero
/// tensor of the whole size (for a token table, 50 MB filled and 50 MB copied).
fn unpack_rows(packed: &Tensor, index: &Tensor, rows: usize) -> Result<Tensor> {
    let mut shape = packed.dims().to_vec();
    shape[0] = rows;
    fn scatter<T: candle_core::WithDType>(
        packed: &Tensor,
        index: &Tensor,
        shape: Vec<usize>,
    ) -> Result<Tensor> {
        let row = packed.elem_count() / packed.dim(0)?.max(1);
        let values = packed.flatten_all()?.to_vec1::<T>()?;
        let mut out = vec![T::zero(); shape[0] * row];
        for (&r, v) in index
            .to_vec1::<u32>()?
            .iter()
            .zip(values.chunks_exact(row.max(1)))
        {
            out[r as usize * row..(r as usize + 1) * row].copy_from_slice(v);
        }
        Ok(Tensor::from_vec(out, shape, &candle_core::Device::Cpu)?)
    }
    match (packed.device().is_cpu(), packed.dtype()) {
        (true, candle_core::DType::F32) => scatter::<f32>(packed, index, shape),
        (true, candle_core::DType::F64) => scatter::<f64>(packed, index, shape),
        _ => Ok(Tensor::zeros(shape, packed.dtype(), packed.device())?.index_add(index, packed, 0)?),
    }
}

/// All-reduces many tensors with one collective: flattened into a single bucket, summed,
/// and cut back to their shapes. Order matters: every rank must pass the same list.
pub fn all_reduce_bucket<C: Communicator + ?Sized>(
    comm: &C,
    tensors: &[Tensor],
) -> Result<Vec<Tensor>> {
    if tensors.is_empty() || comm.size() == 1 {
        return Ok(tensors.to_vec());
    }
    let flat: Vec<Tensor> = tensors
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let bucket = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
    let mut out = Vec::with_capacity(tensors.len());
    let mut offset = 0;
    for t in tensors {
        let n = t.elem_count();
        out.push(bucket.narrow(0, offset, n)?.reshape(t.shape())?);
        offset += n;
    }
    Ok(out)
}
