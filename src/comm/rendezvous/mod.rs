//! How processes of one run find each other: the launcher's variables (torchrun's or
//! Slurm's) say who this process is, and the process with rank 0 serves a small TCP store
//! that every rank joins. Joining checks that all ranks run the same job (hashes of the
//! topology and of the config: a mismatch names both hashes and the ranks), and hands out
//! what rank 0 generated for everyone (NCCL's unique ids for the world and each group).
//!
//! A stranger on the port changes nothing:
//! - rank 0 listens on the address of `MASTER_ADDR` (every address it resolves to is
//!   tried), not on all interfaces;
//! - every join proves the run's secret (`MMPIPE_RUN_SECRET`, which `scripts/launch.sh`
//!   generates) with an HMAC-SHA256 over a nonce rank 0 sent, and every answer proves it
//!   back over the joiner's nonce: the secret never travels, a recorded join does not
//!   replay, and a rank takes NCCL ids only from the real rank 0;
//! - each connection is read on its own thread, one bounded line (64 KiB for a join) under
//!   one deadline (10 s) for the whole exchange: a line that never ends, megabytes of junk
//!   or a byte every few seconds cost that connection, not the run;
//! - joins that do not prove the secret, or do not parse, are logged and ignored: they
//!   never abort the run and get no answer (so no hash, no id, no rank numbers).

mod env;
mod wire;

pub use env::{first_slurm_host, LaunchEnv, DEFAULT_PORT};
use wire::{
    mac, mac_ok, nonce, parse, read_bounded_line, run_key, write_line, Hello, SignedJoin,
    SignedReply, JOIN_DEADLINE, MAX_JOIN_LINE, MAX_PENDING, MAX_REPLY_LINE,
};

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A stable 64-bit hash (FNV-1a) of a run's description: the same on every machine and
/// build, unlike std's hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// What each rank tells the store when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    pub rank: usize,
    pub world_size: usize,
    pub topology_hash: u64,
    pub config_hash: u64,
    /// The joining host, for messages.
    pub host: String,
}

/// The store's answer: everyone's joins (by rank) and rank 0's shared values, or why
/// the run cannot start.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Reply {
    Ready {
        joins: Vec<Join>,
        shared: Vec<(String, Vec<u8>)>,
    },
    Refused(String),
}

/// What every rank gets back from a successful rendezvous.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    /// Every rank's join, in rank order.
    pub joins: Vec<Join>,
    /// Values rank 0 generated for everyone, by name.
    pub shared: Vec<(String, Vec<u8>)>,
}

impl Rendezvous {
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.shared
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// Finds the first disagreement between the joins: a rank whose world size or hashes
/// differ from rank 0's.
fn check_agreement(joins: &[Join]) -> std::result::Result<(), String> {
    let lead = &joins[0];
    for j in &joins[1..] {
        if j.world_size != lead.world_size {
            return Err(format!(
                "rank {} ({}) says the world has {} ranks, rank 0 ({}) says {}",
                j.rank, j.host, j.world_size, lead.host, lead.world_size
            ));
        }
        for (what, mine, theirs) in [
            ("topology", lead.topology_hash, j.topology_hash),
            ("config", lead.config_hash, j.config_hash),
        ] {
            if mine != theirs {
                return Err(format!(
                    "ranks run different jobs: rank 0 ({}) has {what} hash {mine:016x}, rank {} ({}) has \
                     {theirs:016x}; start every rank with the same topology file, model and training config",
                    lead.host, j.rank, j.host
                ));
            }
        }
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into())
}

/// Joins the run's rendezvous. Rank 0 listens on `env.master_port`, waits up to
/// `timeout` for every other rank, checks they agree, and answers everyone with the
/// joins and `shared` (what rank 0 generated; other ranks pass nothing). Other ranks
/// connect to `env.master_addr` (retrying until `timeout`) and wait for the answer.
pub fn join(
    env: &LaunchEnv,
    topology_hash: u64,
    config_hash: u64,
    shared: Vec<(String, Vec<u8>)>,
    timeout: Duration,
) -> Result<Rendezvous> {
    let me = Join {
        rank: env.rank,
        world_size: env.world_size,
        topology_hash,
        config_hash,
        host: hostname(),
    };
    if env.rank == 0 {
        serve(env, me, shared, timeout)
    } else {
        connect(env, me, timeout)
    }
}

/// A connection that proved the secret: its join, its nonce and its stream.
struct Joined {
    join: Join,
    nonce: String,
    stream: TcpStream,
}

/// Greets one connection and reads its join, under one deadline: `Err` says why it is
/// not a rank of this run.
fn admit(mut stream: TcpStream, key: &[u8]) -> std::result::Result<Joined, String> {
    let deadline = Instant::now() + JOIN_DEADLINE;
    stream
        .set_write_timeout(Some(JOIN_DEADLINE))
        .map_err(|e| e.to_string())?;
    let hello = nonce();
    write_line(
        &mut stream,
        &Hello {
            nonce: hello.clone(),
        },
    )
    .map_err(|e| format!("greeting: {e}"))?;
    let line =
        read_bounded_line(&mut stream, MAX_JOIN_LINE, deadline).map_err(|e| e.to_string())?;
    let signed: SignedJoin = parse(&line).map_err(|e| format!("not a join: {e}"))?;
    if !mac_ok(
        key,
        &[
            b"join",
            hello.as_bytes(),
            signed.join.as_bytes(),
            signed.nonce.as_bytes(),
        ],
        &signed.mac,
    ) {
        return Err("a join not signed with this run's secret".into());
    }
    let join: Join = parse(signed.join.as_bytes()).map_err(|e| format!("not a join: {e}"))?;
    stream.set_read_timeout(None).ok();
    Ok(Joined {
        join,
        nonce: signed.nonce,
        stream,
    })
}

/// Sends `reply` to a joined rank, signed over its nonce.
fn answer(j: &mut Joined, key: &[u8], reply: &Reply) -> std::io::Result<()> {
    let json = serde_json::to_string(reply).expect("plain data");
    let tag = mac(key, &[b"reply", j.nonce.as_bytes(), json.as_bytes()]);
    write_line(
        &mut j.stream,
        &SignedReply {
            reply: json,
            mac: tag,
        },
    )
}

/// Rank 0, as errors name it: its address.
fn rank0(env: &LaunchEnv) -> String {
    format!("rank 0 at {}:{}", env.master_addr, env.master_port)
}

/// Rank 0's listener: on the address `MASTER_ADDR` names (each one it resolves to, in
/// turn), so that the port is open on that interface only.
fn listen(env: &LaunchEnv) -> Result<TcpListener> {
    let addrs: Vec<SocketAddr> = (env.master_addr.as_str(), env.master_port)
        .to_socket_addrs()
        .map_err(|e| Error::Rendezvous {
            peer: rank0(env),
            message: format!("rank 0 cannot resolve MASTER_ADDR={}: {e}", env.master_addr),
        })?
        .collect();
    let mut tried = Vec::new();
    for addr in &addrs {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => tried.push(format!("{addr}: {e}")),
        }
    }
    Err(Error::Rendezvous {
        peer: rank0(env),
        message: format!(
        "rank 0 cannot serve the rendezvous at MASTER_ADDR={}, MASTER_PORT={} ({}): rank 0 must \
         run on that host, and the port be free (is another run using it?)",
        env.master_addr,
        env.master_port,
        if tried.is_empty() {
            "it resolves to no address".to_string()
        } else {
            tried.join("; ")
        }
        ),
    })
}

fn serve(
    env: &LaunchEnv,
    me: Join,
    shared: Vec<(String, Vec<u8>)>,
    timeout: Duration,
) -> Result<Rendezvous> {
    let key = run_key(env);
    if env.secret.is_none() {
        tracing::warn!(
            "rendezvous without MMPIPE_RUN_SECRET: joins are keyed on the job's id only, so \
             anyone who can reach port {} and knows the job can join; scripts/launch.sh sets a \
             secret (for torchrun or srun: export MMPIPE_RUN_SECRET=$(openssl rand -hex 16))",
            env.master_port
        );
    }
    let listener = listen(env)?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Rendezvous {
            peer: rank0(env),
            message: format!("the listener: {e}"),
        })?;
    let started = Instant::now();
    let mut joins: Vec<Option<Join>> = vec![None; env.world_size];
    joins[0] = Some(me);
    let mut joined: Vec<Joined> = Vec::new();
    let (admitted_tx, admitted) =
        crossbeam_channel::unbounded::<(SocketAddr, std::result::Result<Joined, String>)>();
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Every joined rank is told why the run cannot start, instead of hanging.
    let refuse_all = |joined: &mut Vec<Joined>, key: &[u8], message: &str| {
        for j in joined.iter_mut() {
            let _ = answer(j, key, &Reply::Refused(message.to_string()));
        }
    };
    while joins.iter().any(Option::is_none) {
        if started.elapsed() > timeout {
            let missing: Vec<String> = joins
                .iter()
                .enumerate()
                .filter(|(_, j)| j.is_none())
                .map(|(r, _)| r.to_string())
                .collect();
            let message = format!(
                "rank{} {} of {} did not join within {} s",
                if missing.len() > 1 { "s" } else { "" },
                missing.join(", "),
                env.world_size,
                timeout.as_secs()
            );
            refuse_all(&mut joined, &key, &message);
            return Err(Error::Rendezvous {
                peer: missing.join(", "),
                message,
            });
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                use std::sync::atomic::Ordering;
                if pending.load(Ordering::SeqCst) >= MAX_PENDING {
                    continue; // dropped unread: too many connections at once
                }
                stream.set_nonblocking(false).ok();
                pending.fetch_add(1, Ordering::SeqCst);
                let (tx, key, pending) = (admitted_tx.clone(), key.clone(), pending.clone());
                std::thread::spawn(move || {
                    let result = admit(stream, &key);
                    pending.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send((peer, result));
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                return Err(Error::Rendezvous {
                    peer: rank0(env),
                    message: format!("accept failed: {e}"),
                })
            }
        }
        while let Ok((peer, result)) = admitted.try_recv() {
            let mut j = match result {
                Ok(j) => j,
                Err(why) => {
                    // Not a rank of this run: no answer, and the run goes on.
                    tracing::warn!("rendezvous: ignored a connection from {peer}: {why}");
                    continue;
                }
            };
            let rank = j.join.rank;
            if rank >= env.world_size || rank == 0 {
                let _ = answer(
                    &mut j,
                    &key,
                    &Reply::Refused(format!(
                        "rank {rank} is not a rank of a world of {} (or is rank 0 twice)",
                        env.world_size
                    )),
                );
                continue;
            }
            if let Some(before) = &joins[rank] {
                let message = format!(
                    "rank {rank} joined twice (from {} and {}): two processes were given the same RANK",
                    before.host, j.join.host
                );
                joined.push(j);
                refuse_all(&mut joined, &key, &message);
                return Err(Error::Rendezvous {
                    peer: format!("rank {rank}"),
                    message,
                });
            }
            joins[rank] = Some(j.join.clone());
            joined.push(j);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let joins: Vec<Join> = joins.into_iter().map(|j| j.expect("all joined")).collect();
    let reply = match check_agreement(&joins) {
        Ok(()) => Reply::Ready {
            joins: joins.clone(),
            shared: shared.clone(),
        },
        Err(message) => Reply::Refused(message),
    };
    for j in &mut joined {
        answer(j, &key, &reply).map_err(|e| Error::Rendezvous {
            peer: format!("rank {} ({})", j.join.rank, j.join.host),
            message: format!("answering rank {} failed: {e}", j.join.rank),
        })?;
    }
    match reply {
        Reply::Ready { .. } => Ok(Rendezvous { joins, shared }),
        Reply::Refused(message) => Err(Error::Rendezvous {
            peer: "every rank".into(),
            message,
        }),
    }
}

/// One attempt at joining through `addr`: greeted, joined, answered, the answer checked.
fn attempt(
    addr: &SocketAddr,
    me: &Join,
    key: &[u8],
    answer_by: Instant,
) -> std::result::Result<Reply, String> {
    let mut stream =
        TcpStream::connect_timeout(addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    let greeted_by = Instant::now() + JOIN_DEADLINE;
    let hello: Hello = parse(
        &read_bounded_line(&mut stream, MAX_JOIN_LINE, greeted_by).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("not a rendezvous: {e}"))?;
    let mine = nonce();
    let join = serde_json::to_string(me).expect("plain data");
    let tag = mac(
        key,
        &[
            b"join",
            hello.nonce.as_bytes(),
            join.as_bytes(),
            mine.as_bytes(),
        ],
    );
    stream
        .set_write_timeout(Some(JOIN_DEADLINE))
        .map_err(|e| e.to_string())?;
    write_line(
        &mut stream,
        &SignedJoin {
            join,
            nonce: mine.clone(),
            mac: tag,
        },
    )
    .map_err(|e| format!("sending the join: {e}"))?;
    let line = read_bounded_line(&mut stream, MAX_REPLY_LINE, answer_by)
        .map_err(|e| format!("no answer: {e}"))?;
    let signed: SignedReply = parse(&line).map_err(|e| format!("not an answer: {e}"))?;
    if !mac_ok(
        key,
        &[b"reply", mine.as_bytes(), signed.reply.as_bytes()],
        &signed.mac,
    ) {
        return Err(
            "it answered without this run's secret (another process on MASTER_PORT?)".into(),
        );
    }
    parse(signed.reply.as_bytes()).map_err(|e| format!("not an answer: {e}"))
}

fn connect(env: &LaunchEnv, me: Join, timeout: Duration) -> Result<Rendezvous> {
    let target = format!("{}:{}", env.master_addr, env.master_port);
    let key = run_key(env);
    let started = Instant::now();
    // Rank 0 answers once everyone has joined: wait as long as it may wait, and a little.
    let answer_by = started + timeout + Duration::from_secs(10);
    let mut last = String::from("no address");
    loop {
        let addrs: Vec<SocketAddr> = match target.to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last = e.to_string();
                Vec::new()
            }
        };
        for addr in &addrs {
            match attempt(addr, &me, &key, answer_by) {
                Ok(Reply::Ready { joins, shared }) => return Ok(Rendezvous { joins, shared }),
                Ok(Reply::Refused(message)) => {
                    return Err(Error::Rendezvous {
                        peer: rank0(env),
                        message,
                    })
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        if started.elapsed() > timeout {
            return Err(Error::Rendezvous {
                peer: rank0(env),
                message: format!(
                    "rank {} of {} could not reach rank 0 at {target} within {} s ({last}); \
                 check MASTER_ADDR and MASTER_PORT, that rank 0 started, and that every rank has \
                 the same MMPIPE_RUN_SECRET",
                    env.rank,
                    env.world_size,
                    timeout.as_secs()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
