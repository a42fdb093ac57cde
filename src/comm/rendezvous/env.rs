//! Who this process is in a run, from the launcher's variables: torchrun's (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or Slurm's.

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
    /// `MMPIPE_RUN_SECRET`: what every join proves. Without it the rendezvous keys on the
    /// job's id alone (and says so).
    pub secret: Option<String>,
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
                    v.trim().parse::<usize>().map_err(|_| Error::Launcher {
                        variable: name.to_string(),
                        message: format!(
                            "environment variable {name}={v:?} is not a non-negative integer"
                        ),
                    })
                })
                .transpose()
        };
        let port = |launcher: &str| -> Result<u16> {
            match get("MASTER_PORT") {
                None if launcher == "slurm" => Ok(DEFAULT_PORT),
                None => Err(Error::Launcher {
                    variable: "MASTER_PORT".into(),
                    message: "RANK and WORLD_SIZE are set but MASTER_PORT is not: set the port rank 0 listens on"
                        .into(),
                }),
                Some(v) => v.trim().parse::<u16>().map_err(|_| {
                    Error::Launcher {
                        variable: "MASTER_PORT".into(),
                        message: format!("environment variable MASTER_PORT={v:?} is not a port number"),
                    }
                }),
            }
        };
        let (launcher, rank, world_size, local_rank, master_addr) = match (
            number("RANK")?,
            number("WORLD_SIZE")?,
        ) {
            (Some(rank), Some(world)) => {
                let addr = get("MASTER_ADDR").ok_or_else(|| Error::Launcher {
                    variable: "MASTER_ADDR".into(),
                    message:
                        "RANK and WORLD_SIZE are set but MASTER_ADDR is not: set rank 0's host"
                            .into(),
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
                return Err(Error::Launcher {
                    variable: "RANK".into(),
                    message: "only one of RANK and WORLD_SIZE is set: a launcher sets both".into(),
                })
            }
            (None, None) => match (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
                (Some(rank), Some(world)) => {
                    let addr = match get("MASTER_ADDR") {
                        Some(a) => a,
                        None => {
                            let list = get("SLURM_NODELIST")
                                    .or_else(|| get("SLURM_JOB_NODELIST"))
                                    .ok_or_else(|| {
                                        Error::Launcher {
                                            variable: "SLURM_NODELIST".into(),
                                            message: "SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_NODELIST: \
                                             cannot tell where rank 0 runs"
                                                .into(),
                                        }
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
            return Err(Error::Launcher {
                variable: "RANK".into(),
                message: format!(
                    "{launcher}: rank {rank} is not a rank of a world of {world_size}"
                ),
            });
        }
        Ok(Some(LaunchEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port: port(launcher)?,
            launcher,
            secret: get("MMPIPE_RUN_SECRET").filter(|s| !s.is_empty()),
        }))
    }
}

/// The first host of a Slurm node list: `node[03-05,07],gpu1` → `node03`.
pub fn first_slurm_host(list: &str) -> Result<String> {
    let bad = || Error::Launcher {
        variable: "SLURM_NODELIST".into(),
        message: format!("SLURM_NODELIST={list:?}: not a node list"),
    };
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
