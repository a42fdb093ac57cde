//! How processes of one run find each other: the launcher's variables (torchrun's or
//! Slurm's) say who this process is, and the process with rank 0 serves a small TCP store
//! that every rank joins. Joining checks that all ranks run the same job (hashes of the
//! topology and of the config: a mismatch names both hashes and the ranks), and hands out
//! what rank 0 generated for everyone (NCCL's unique ids for the world and each group).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who this process is in the run, from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this node: which GPU to take.
    pub local_rank: usize,
    /// Where rank 0 serves the store.
    pub master_addr: String,
    pub master_port: u16,
    /// "torchrun" or "slurm": named in errors.
    pub launcher: &'static str,
}

/// torchrun's default port, used when Slurm gives no `MASTER_PORT`.
pub const DEFAULT_PORT: u16 = 29500;

impl LaunchEnv {
    /// Reads the process's environment; None when no launcher variables are set (a
    /// single-process run).
    pub fn from_env() -> Result<Option<LaunchEnv>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`Self::from_env`], from any variable lookup. torchrun's `RANK`/`WORLD_SIZE`
    /// win over Slurm's (srun inside a torchrun-style script sets both).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>> {
        let number = |name: &str| -> Result<Option<usize>> {
            get(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Msg(format!(
                            "environment variable {name}={v:?} is not a non-negative integer"
                        ))
                    })
                })
                .transpose()
        };
        let port = |launcher: &str| -> Result<u16> {
            match get("MASTER_PORT") {
                None if launcher == "slurm" => Ok(DEFAULT_PORT),
                None => Err(Error::Msg(
                    "RANK and WORLD_SIZE are set but MASTER_PORT is not: set the port rank 0 listens on"
                        .into(),
                )),
                Some(v) => v.trim().parse::<u16>().map_err(|_| {
                    Error::Msg(format!("environment variable MASTER_PORT={v:?} is not a port number"))
                }),
            }
        };
        let (launcher, rank, world_size, local_rank, master_addr) = match (
            number("RANK")?,
            number("WORLD_SIZE")?,
        ) {
            (Some(rank), Some(world)) => {
                let addr = get("MASTER_ADDR").ok_or_else(|| {
                    Error::Msg(
                        "RANK and WORLD_SIZE are set but MASTER_ADDR is not: set rank 0's host"
                            .into(),
                    )
                })?;
                (
                    "torchrun",
                    rank,
                    world,
                    number("LOCAL_RANK")?.unwrap_or(0),
                    addr,
                )
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(Error::Msg(
                    "only one of RANK and WORLD_SIZE is set: a launcher sets both".into(),
                ))
            }
            (None, None) => match (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
                (Some(rank), Some(world)) => {
                    let addr = match get("MASTER_ADDR") {
                        Some(a) => a,
                        None => {
                            let list = get("SLURM_NODELIST")
                                    .or_else(|| get("SLURM_JOB_NODELIST"))
                                    .ok_or_else(|| {
                                        Error::Msg(
                                            "SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_NODELIST: \
                                             cannot tell where rank 0 runs"
                                                .into(),
                                        )
                                    })?;
                            first_slurm_host(&list)?
                        }
                    };
                    (
                        "slurm",
                        rank,
                        world,
                        number("SLURM_LOCALID")?.unwrap_or(0),
                        addr,
                    )
                }
                _ => return Ok(None),
            },
        };
        if world_size == 0 || rank >= world_size {
            return Err(Error::Msg(format!(
                "{launcher}: rank {rank} is not a rank of a world of {world_size}"
            )));
        }
        Ok(Some(LaunchEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port: port(launcher)?,
            launcher,
        }))
    }
}

/// The first host of a Slurm node list: `node[03-05,07],gpu1` → `node03`.
pub fn first_slurm_host(list: &str) -> Result<String> {
    let bad = || Error::Msg(format!("SLURM_NODELIST={list:?}: not a node list"));
    let list = list.trim();
    let first_end = {
        // The first comma outside brackets ends the first entry.
        let mut depth = 0i32;
        let mut end = list.len();
        for (i, c) in list.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        end
    };
    let entry = &list[..first_end];
    if entry.is_empty() {
        return Err(bad());
    }
    match entry.split_once('[') {
        None => Ok(entry.to_string()),
        Some((prefix, rest)) => {
            let ranges = rest.strip_suffix(']').ok_or_else(bad)?;
            let first = ranges.split(',').next().ok_or_else(bad)?;
            let start = first.split('-').next().ok_or_else(bad)?;
            if start.is_empty() || !start.chars().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            Ok(format!("{prefix}{start}"))
        }
    }
}

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

fn write_line<T: Serialize>(stream: &mut TcpStream, value: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).expect("plain data");
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

fn read_line<T: for<'de> Deserialize<'de>>(stream: &TcpStream) -> std::io::Result<T> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    serde_json::from_str(&line)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
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

fn serve(
    env: &LaunchEnv,
    me: Join,
    shared: Vec<(String, Vec<u8>)>,
    timeout: Duration,
) -> Result<Rendezvous> {
    let bind = SocketAddr::from(([0, 0, 0, 0], env.master_port));
    let listener = TcpListener::bind(bind).map_err(|e| {
        Error::Msg(format!(
            "rank 0 cannot serve the rendezvous on port {}: {e} (is another run using MASTER_PORT={}?)",
            env.master_port, env.master_port
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Msg(e.to_string()))?;
    let started = Instant::now();
    let mut joins: Vec<Option<Join>> = vec![None; env.world_size];
    joins[0] = Some(me);
    let mut streams: Vec<TcpStream> = Vec::new();
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
            for s in &mut streams {
                let _ = write_line(s, &Reply::Refused(message.clone()));
            }
            return Err(Error::Msg(format!("rendezvous: {message}")));
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).ok();
                stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let join: Join = match read_line(&stream) {
                    Ok(j) => j,
                    // A stray connection (a port scan, a health check): not a rank.
                    Err(_) => continue,
                };
                if join.rank >= env.world_size || join.rank == 0 {
                    let mut stream = stream;
                    let _ = write_line(
                        &mut stream,
                        &Reply::Refused(format!(
                            "rank {} is not a rank of a world of {} (or is rank 0 twice)",
                            join.rank, env.world_size
                        )),
                    );
                    continue;
                }
                if let Some(before) = &joins[join.rank] {
                    let message = format!(
                        "rank {} joined twice (from {} and {}): two processes were given the same RANK",
                        join.rank, before.host, join.host
                    );
                    streams.push(stream);
                    for s in &mut streams {
                        let _ = write_line(s, &Reply::Refused(message.clone()));
                    }
                    return Err(Error::Msg(format!("rendezvous: {message}")));
                }
                let rank = join.rank;
                joins[rank] = Some(join);
                streams.push(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(Error::Msg(format!("rendezvous: accept failed: {e}"))),
        }
    }
    let joins: Vec<Join> = joins.into_iter().map(|j| j.expect("all joined")).collect();
    let reply = match check_agreement(&joins) {
        Ok(()) => Reply::Ready {
            joins: joins.clone(),
            shared: shared.clone(),
        },
        Err(message) => Reply::Refused(message),
    };
    for s in &mut streams {
        write_line(s, &reply)
            .map_err(|e| Error::Msg(format!("rendezvous: answering a rank failed: {e}")))?;
    }
    match reply {
        Reply::Ready { .. } => Ok(Rendezvous { joins, shared }),
        Reply::Refused(message) => Err(Error::Msg(format!("rendezvous: {message}"))),
    }
}

fn connect(env: &LaunchEnv, me: Join, timeout: Duration) -> Result<Rendezvous> {
    let target = format!("{}:{}", env.master_addr, env.master_port);
    let started = Instant::now();
    let mut stream = loop {
        let attempt = target
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut addrs| addrs.next().ok_or_else(|| "no address".to_string()))
            .and_then(|addr| {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())
            });
        match attempt {
            Ok(s) => break s,
            Err(e) if started.elapsed() > timeout => {
                return Err(Error::Msg(format!(
                "rendezvous: rank {} of {} could not reach rank 0 at {target} within {} s ({e}); \
                     check MASTER_ADDR and MASTER_PORT, and that rank 0 started",
                env.rank,
                env.world_size,
                timeout.as_secs()
            )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    write_line(&mut stream, &me)
        .map_err(|e| Error::Msg(format!("rendezvous: sending to {target} failed: {e}")))?;
    // Rank 0 answers once everyone has joined: wait as long as it may wait, and a little.
    stream
        .set_read_timeout(Some(
            timeout.saturating_sub(started.elapsed()) + Duration::from_secs(10),
        ))
        .ok();
    match read_line::<Reply>(&stream) {
        Ok(Reply::Ready { joins, shared }) => Ok(Rendezvous { joins, shared }),
        Ok(Reply::Refused(message)) => Err(Error::Msg(format!("rendezvous: {message}"))),
        Err(e) => Err(Error::Msg(format!(
            "rendezvous: rank {} got no answer from rank 0 at {target}: {e}",
            env.rank
        ))),
    }
}
