//! The in-process backend: one thread per rank, one crossbeam channel per ordered pair of
//! ranks. Per-pair channels keep messages of consecutive collectives from overtaking each
//! other, so every collective reads exactly one message from each peer, in order.
//!
//! A rank's channels close when its communicator is dropped, which happens when its thread
//! returns or unwinds; peers blocked on it then get [`Error::PeerLost`] at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use candle_core::{Device, Tensor};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

use super::{shape_mismatch, sum_in_order, Communicator, GroupComms, RankComms};
use crate::error::{Error, Result};
use crate::topology::{Topology, Tower};

/// How long a collective waits for a peer that is alive but silent (stuck elsewhere).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

enum Message {
    Tensor(Tensor),
    /// A list of tensors (a replica's gradients): shared, not copied into a bucket.
    Tensors(Vec<Tensor>),
    Barrier,
}

pub struct ThreadCommunicator {
    name: String,
    rank: usize,
    size: usize,
    /// `to[r]` sends to rank r (None for self).
    to: Vec<Option<Sender<Message>>>,
    /// `from[r]` receives from rank r (None for self).
    from: Vec<Option<Receiver<Message>>>,
    timeout: Duration,
    payload: AtomicU64,
}

/// Creates the communicators of one group of `size` ranks, indexed by rank.
pub fn group(name: &str, size: usize, timeout: Duration) -> Vec<ThreadCommunicator> {
    let mut to: Vec<Vec<Option<Sender<Message>>>> = (0..size)
        .map(|_| (0..size).map(|_| None).collect())
        .collect();
    let mut from: Vec<Vec<Option<Receiver<Message>>>> = (0..size)
        .map(|_| (0..size).map(|_| None).collect())
        .collect();
    for src in 0..size {
        for dst in 0..size {
            if src != dst {
                let (s, r) = unbounded();
                to[src][dst] = Some(s);
                from[dst][src] = Some(r);
            }
        }
    }
    to.into_iter()
        .zip(from)
        .enumerate()
        .map(|(rank, (to, from))| ThreadCommunicator {
            name: name.to_string(),
            rank,
            size,
            to,
            from,
            timeout,
            payload: AtomicU64::new(0),
        })
        .collect()
}

impl ThreadCommunicator {
    fn send(&self, op: &'static str, peer: usize, m: Message) -> Result<()> {
        self.to[peer]
            .as_ref()
            .expect("no channel to self")
            .send(m)
            .map_err(|_| self.lost(op, peer))
    }

    fn recv(&self, op: &'static str, peer: usize) -> Result<Message> {
        match self.from[peer]
            .as_ref()
            .expect("no channel from self")
            .recv_timeout(self.timeout)
        {
            Ok(m) => Ok(m),
            Err(RecvTimeoutError::Disconnected) => Err(self.lost(op, peer)),
            Err(RecvTimeoutError::Timeout) => Err(Error::PeerTimeout {
                op,
                group: self.name.clone(),
                peer,
                size: self.size,
                secs: self.timeout.as_secs_f64(),
            }),
        }
    }

    /// A peer's tensor, on `device`: rank threads on different GPUs (or a CPU tensor
    /// meeting CUDA ones) each get the result where their own tensor lives.
    fn recv_tensor(&self, op: &'static str, peer: usize, device: &Device) -> Result<Tensor> {
        match self.recv(op, peer)? {
            Message::Tensor(t) => Ok(t.to_device(device)?),
            Message::Tensors(_) => {
                Err(self.mismatch(op, format!("rank {peer} sent a list of tensors instead")))
            }
            Message::Barrier => {
                Err(self.mismatch(op, format!("rank {peer} entered a barrier instead")))
            }
        }
    }

    /// A peer's list of tensors, each on `device`.
    fn recv_tensors(&self, op: &'static str, peer: usize, device: &Device) -> Result<Vec<Tensor>> {
        match self.recv(op, peer)? {
            Message::Tensors(ts) => Ok(ts
                .iter()
                .map(|t| t.to_device(device))
                .collect::<candle_core::Result<_>>()?),
            Message::Tensor(_) => {
                Err(self.mismatch(op, format!("rank {peer} sent one tensor, not a list")))
            }
            Message::Barrier => {
                Err(self.mismatch(op, format!("rank {peer} entered a barrier instead")))
            }
        }
    }

    fn lost(&self, op: &'static str, peer: usize) -> Error {
        Error::PeerLost {
            op,
            group: self.name.clone(),
            peer,
            size: self.size,
        }
    }

    fn count(&self, t: &Tensor) {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.payload.fetch_add(bytes, Ordering::Relaxed);
    }

    fn mismatch(&self, op: &'static str, message: String) -> Error {
        Error::Collective {
            op,
            group: self.name.clone(),
            message,
        }
    }

    /// Every rank's tensor, indexed by rank.
    fn exchange(&self, op: &'static str, t: &Tensor) -> Result<Vec<Tensor>> {
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            self.send(op, peer, Message::Tensor(t.clone()))?;
        }
        let mut parts = Vec::with_capacity(self.size);
        for peer in 0..self.size {
            parts.push(if peer == self.rank {
                t.clone()
            } else {
                self.recv_tensor(op, peer, t.device())?
            });
        }
        Ok(parts)
    }

    fn check_same_shape(&self, op: &'static str, parts: &[Tensor]) -> Result<()> {
        match shape_mismatch(parts, false) {
            Some(message) => Err(self.mismatch(op, message)),
            None => Ok(()),
        }
    }
}

impl Communicator for ThreadCommunicator {
    fn payload_bytes(&self) -> u64 {
        self.payload.load(Ordering::Relaxed)
    }

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
            return Err(self.mismatch("all_gather", message));
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

    /// The peers' tensors are shared in memory, so the sum reads them in place: no bucket
    /// to copy them into and cut them out of (two full passes over a tower's gradients).
    /// Each tensor is summed in rank order, the same arithmetic as the bucket's.
    fn all_reduce_sum_many(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        const OP: &str = "all_reduce";
        if tensors.is_empty() || self.size == 1 {
            return Ok(tensors.to_vec());
        }
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            self.send(OP, peer, Message::Tensors(tensors.to_vec()))?;
        }
        let device = tensors[0].device();
        let mut lists = Vec::with_capacity(self.size);
        for peer in 0..self.size {
            lists.push(if peer == self.rank {
                tensors.to_vec()
            } else {
                self.recv_tensors(OP, peer, device)?
            });
        }
        if let Some((peer, list)) = lists
            .iter()
            .enumerate()
            .find(|(_, l)| l.len() != tensors.len())
        {
            return Err(self.mismatch(
                OP,
                format!(
                    "rank {peer} passed {} tensors, rank {} passed {}",
                    list.len(),
                    self.rank,
                    tensors.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(tensors.len());
        for (i, t) in tensors.iter().enumerate() {
            let parts: Vec<Tensor> = lists.iter().map(|l| l[i].clone()).collect();
            self.check_same_shape(OP, &parts)?;
            self.count(t);
            out.push(sum_in_order(&parts)?);
        }
        Ok(out)
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        const OP: &str = "reduce_scatter";
        let rows = t.dims().first().copied().unwrap_or(0);
        if rows % self.size != 0 {
            return Err(self.mismatch(
                OP,
                format!("{rows} rows do not split into {} equal blocks", self.size),
            ));
        }
        let block = rows / self.size;
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            self.send(OP, peer, Message::Tensor(t.narrow(0, peer * block, block)?))?;
        }
        let mut parts = Vec::with_capacity(self.size);
        for peer in 0..self.size {
            parts.push(if peer == self.rank {
                t.narrow(0, self.rank * block, block)?
            } else {
                self.recv_tensor(OP, peer, t.device())?
            });
        }
        self.check_same_shape(OP, &parts)?;
        self.count(t);
        Ok(sum_in_order(&parts)?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        if root >= self.size {
            return Err(self.mismatch(
                OP,
                format!("root {root} is not a rank of a group of {}", self.size),
            ));
        }
        if self.rank == root {
            for peer in (0..self.size).filter(|&p| p != root) {
                self.send(OP, peer, Message::Tensor(t.clone()))?;
            }
            self.count(t);
            Ok(t.clone())
        } else {
            let t = self.recv_tensor(OP, root, t.device())?;
            self.count(&t);
            Ok(t)
        }
    }

    fn barrier(&self) -> Result<()> {
        const OP: &str = "barrier";
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            self.send(OP, peer, Message::Barrier)?;
        }
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            if let Message::Tensor(_) = self.recv(OP, peer)? {
                return Err(self.mismatch(
                    OP,
                    format!("rank {peer} sent a tensor instead of entering the barrier"),
                ));
            }
        }
        Ok(())
    }
}

/// Builds every rank's communicators for a topology: the world and the groups of the
/// towers each rank holds. Indexed by global rank.
pub fn rank_comms(topology: &Topology, timeout: Duration) -> Vec<RankComms> {
    let mut out: Vec<RankComms> = group("world", topology.world_size(), timeout)
        .into_iter()
        .map(|world| RankComms {
            world: Box::new(world),
            groups: Vec::new(),
        })
        .collect();
    for tower in [Tower::Image, Tower::Text] {
        let members = topology.group(tower);
        let stats = group(&format!("{tower}-stats"), members.len(), timeout);
        let comms = group(tower.name(), members.len(), timeout);
        for ((comm, stats), &global) in comms.into_iter().zip(stats).zip(&members) {
            out[global].groups.push(GroupComms {
                tower,
                comm: Box::new(comm),
                stats: std::sync::Arc::new(stats),
            });
        }
    }
    out
}

/// Runs `work` on one thread per rank and waits for all of them. If ranks fail, the error
/// returned is the first that is not merely "a peer left" (the root cause); a panic becomes
/// an error naming the rank.
///
/// A rank stuck outside any collective (a read that never returns, say) would keep the
/// process waiting for ever: its peers' collectives fail (`timeout`), but the stuck thread
/// is never joined. So once a rank has failed, the others get `timeout` more to finish;
/// a rank still running then is named and the process ends (exit status 3, as the
/// collective watchdog ends a process whose collective hangs).
pub fn run_ranks<T, F>(topology: &Topology, timeout: Duration, work: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(usize, RankComms) -> Result<T> + Sync,
{
    let comms = rank_comms(topology, timeout);
    let n = comms.len();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<usize>();
    /// Says "rank r is done" when its thread leaves `work`, by return or by unwinding.
    struct Done(usize, crossbeam_channel::Sender<usize>);
    impl Drop for Done {
        fn drop(&mut self) {
            let _ = self.1.send(self.0);
        }
    }
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let mut handles: Vec<Option<_>> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| {
                let (work, done) = (&work, Done(rank, done_tx.clone()));
                Some(
                    std::thread::Builder::new()
                        .name(format!("rank-{rank}"))
                        .spawn_scoped(s, move || {
                            let _done = done;
                            work(rank, c)
                        })
                        .expect("spawn rank thread"),
                )
            })
            .collect();
        let mut results: Vec<Option<Result<T>>> = (0..n).map(|_| None).collect();
        let mut failed_at: Option<(usize, std::time::Instant)> = None;
        while results.iter().any(Option::is_none) {
            let wait = failed_at.map_or(Duration::from_secs(3600), |(_, at)| {
                timeout.saturating_sub(at.elapsed())
            });
            match done_rx.recv_timeout(wait) {
                Ok(rank) => {
                    let h = handles[rank].take().expect("each rank finishes once");
                    let r = match h.join() {
                        Ok(r) => r.map_err(|e| match e {
                            e @ (Error::PeerLost { .. }
                            | Error::PeerTimeout { .. }
                            | Error::Rank { .. }) => e,
                            e => Error::Rank {
                                rank,
                                message: e.to_string(),
                            },
                        }),
                        Err(panic) => Err(Error::Rank {
                            rank,
                            message: format!("panicked: {}", panic_message(&panic)),
                        }),
                    };
                    if r.is_err() && failed_at.is_none() {
                        failed_at = Some((rank, std::time::Instant::now()));
                    }
                    results[rank] = Some(r);
                }
                Err(_) if failed_at.is_none() => continue,
                Err(_) => {
                    let (first, _) = failed_at.expect("checked");
                    let stuck: Vec<String> = (0..n)
                        .filter(|&r| results[r].is_none())
                        .map(|r| format!("{} ({})", r, topology.ranks[r].label()))
                        .collect();
                    let cause = results[first]
                        .as_ref()
                        .and_then(|r| r.as_ref().err())
                        .map(ToString::to_string)
                        .unwrap_or_default();
                    eprintln!(
                        "mmpipe: rank {} still running {:.0} s after rank {first} failed ({cause}): stuck \
                         outside any collective (a read that never returns?); ending the run",
                        stuck.join(", "),
                        timeout.as_secs_f64()
                    );
                    std::process::exit(3);
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every rank finished"))
            .collect()
    });
    let mut first_peer_error = None;
    let mut ok = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) if e.is_peer_failure() => {
                first_peer_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match first_peer_error {
        Some(e) => Err(e),
        None => Ok(ok),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
