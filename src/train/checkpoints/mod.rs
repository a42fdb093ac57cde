//! Training checkpoints: a folder per save, `step-00000010/` with each tower's part
//! (`image.safetensors`, `text.safetensors`: parameters under OpenCLIP's names, batch-norm
//! statistics, optimizer moments) and `state.json` (step, data position, seed, batch,
//! the run's id, each part's size and CRC-32), written under a `.partial` name and renamed
//! when complete; `latest` names the newest and is replaced atomically.
//!
//! What a crash, a power loss, a damaged disk or a second run cannot do:
//! - leave a save half written: every file is flushed to the disk before the rename that
//!   makes it visible, and the folder after it ([`crate::durable`]);
//! - make a damaged save load: a resume checks each part against `state.json` and falls
//!   back to the previous complete save, saying so; every rank agrees on the save it
//!   resumes from (its step and a hash of its `state.json`), or the run stops, naming the
//!   ranks that see another;
//! - prune another run's saves: saves carry the run's id (a resumed run keeps it), and
//!   only this run's oldest saves beyond `keep_checkpoints` are removed;
//! - share the folder: a lock ([`DirLock`]) keeps a second run out while one uses it;
//! - fail late: the folder is checked at start (writable, room for a save), and the
//!   `.partial` folders a killed save left are removed.

mod resume;

pub use resume::resume_point;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::trainer::RankTrainer;
use crate::comm::RankComms;
use crate::durable;
use crate::error::{Error, Result};
use crate::topology::Tower;

/// What `state.json` records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Steps completed.
    pub step: usize,
    /// Global samples consumed: where the data order resumes.
    pub position: u64,
    pub global_batch: usize,
    pub seed: u64,
    pub loss: String,
    /// The run's id: saves of other runs in the same folder are never pruned. (Empty in
    /// saves from before ids.)
    #[serde(default)]
    pub run: String,
    /// Each part file's size and CRC-32 as written. (Empty in saves from before them:
    /// those load unchecked, with a warning.)
    #[serde(default)]
    pub parts: BTreeMap<String, PartRecord>,
    /// The model and data it was trained on ([`RunIdentity`]; empty in older saves).
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub data: String,
}

/// What a run is, for a resume to compare: its id, and fingerprints of its model (the
/// resolved config) and its data (each data file's name and size, in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunIdentity {
    pub run: String,
    pub model: String,
    pub data: String,
}

impl RunIdentity {
    pub fn new(run: String, model: &crate::model::ClipConfig, data_files: &[PathBuf]) -> Self {
        let hash = |s: &str| {
            format!(
                "{:016x}",
                crate::comm::rendezvous::stable_hash(s.as_bytes())
            )
        };
        let files: String = data_files
            .iter()
            .map(|p| {
                let name = p.file_name().map_or_else(
                    || p.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                let size = std::fs::metadata(p).map_or(0, |m| m.len());
                format!("{name}:{size};")
            })
            .collect();
        RunIdentity {
            run,
            model: hash(&format!("{model:?}")),
            data: hash(&files),
        }
    }
}

/// A part file's size and checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRecord {
    pub bytes: u64,
    pub crc32: u32,
}

pub use crate::model::checkpoint::part_file;

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The size and CRC-32 of a file as it is on the disk now.
pub fn part_record(path: &Path) -> Result<PartRecord> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok(PartRecord {
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
    })
}

/// A fresh run id: time and process, hashed.
pub fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!("{nanos}-{}", std::process::id());
    format!(
        "{:016x}",
        crate::comm::rendezvous::stable_hash(seed.as_bytes())
    )
}

/// Saves step `step` from every rank (call on all ranks at once): each group's first
/// rank writes its tower's part and reports its size and checksum, world rank 0 the
/// state, the rename and `latest`, and removes this run's saves beyond the newest
/// `cfg.keep_checkpoints`. `identity` is the run's (world rank 0's counts).
pub fn save(
    dir: &Path,
    step: usize,
    comms: &RankComms,
    trainer: &RankTrainer,
    cfg: &TrainConfig,
    identity: &RunIdentity,
) -> Result<PathBuf> {
    let run = identity.run.as_str();
    let name = format!("step-{step:08}");
    let partial = dir.join(format!("{name}.partial"));
    let done = dir.join(&name);
    let lead = comms.world.rank() == 0;
    if lead {
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    }
    comms.world.barrier()?;
    // Per tower (image, text): [written, size high, size low, CRC-32] from every rank;
    // each group's first rank writes its tower's part (a rank first in both writes both).
    let mut mine = [0u32; 8];
    for (slot, tower) in [Tower::Image, Tower::Text].into_iter().enumerate() {
        let (Some(replica), Ok(group)) = (trainer.tower(tower), comms.group(tower)) else {
            continue;
        };
        if group.comm.rank() == 0 {
            let path = partial.join(part_file(tower));
            replica.save_part(&path)?;
            let r = part_record(&path)?;
            mine[slot * 4..slot * 4 + 4].copy_from_slice(&[
                1,
                (r.bytes >> 32) as u32,
                r.bytes as u32,
                r.crc32,
            ]);
        }
    }
    let reports: Vec<Vec<u32>> = comms
        .world
        .all_gather(&Tensor::from_vec(mine.to_vec(), (1, 8), &Device::Cpu)?)?
        .to_vec2()?;
    if lead {
        let parts = reports
            .iter()
            .flat_map(|r| {
                [Tower::Image, Tower::Text]
                    .into_iter()
                    .enumerate()
                    .filter(|(slot, _)| r[slot * 4] == 1)
                    .map(|(slot, tower)| {
                        let r = &r[slot * 4..slot * 4 + 4];
                        (
                            part_file(tower).to_string(),
                            PartRecord {
                                bytes: u64::from(r[1]) << 32 | u64::from(r[2]),
                                crc32: r[3],
                            },
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let state = CheckpointState {
            step,
            position: (step * cfg.global_batch) as u64,
            global_batch: cfg.global_batch,
            seed: cfg.seed,
            loss: cfg.loss.kind.to_string(),
            run: run.to_string(),
            parts,
            model: identity.model.clone(),
            data: identity.data.clone(),
        };
        let json = serde_json::to_string_pretty(&state).expect("plain data");
        durable::write(&partial.join("state.json"), json.as_bytes())?;
        // The settings it was trained with, and the model's own file: enough to evaluate
        // or continue it without the original command line.
        let config_path = partial.join("train.toml");
        let config = toml::to_string(cfg).map_err(|e| Error::File {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        durable::write(&config_path, config.as_bytes())?;
        if let Some(model) = &cfg.model {
            durable::copy(model, &partial.join(crate::model::checkpoint::MODEL_FILE))?;
        }
        durable::sync_dir(&partial)?;
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(io(&done))?;
        }
        durable::rename(&partial, &done)?;
        durable::write(&dir.join("latest"), name.as_bytes())?;
        prune(dir, cfg.keep_checkpoints.max(1), run, &done)?;
    }
    comms.world.barrier()?;
    Ok(done)
}

/// The complete saves in `dir` (`step-N` folders), by step.
fn saves(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((step, p))
        })
        .collect();
    out.sort();
    Ok(out)
}

fn read_state_file(checkpoint: &Path) -> Result<(CheckpointState, Vec<u8>)> {
    let path = checkpoint.join("state.json");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let state = serde_json::from_slice(&bytes).map_err(|e| Error::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok((state, bytes))
}

/// Removes this run's oldest saves beyond the newest `keep`, never `current`; saves of
/// other runs (another id, or none) stay.
fn prune(dir: &Path, keep: usize, run: &str, current: &Path) -> Result<()> {
    let ours: Vec<PathBuf> = saves(dir)?
        .into_iter()
        .filter(|(_, p)| read_state_file(p).is_ok_and(|(s, _)| !run.is_empty() && s.run == run))
        .map(|(_, p)| p)
        .collect();
    let excess = ours.len().saturating_sub(keep);
    for old in ours.iter().take(excess).filter(|p| p.as_path() != current) {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(())
}

/// Holds a run's checkpoint folder: an advisory lock on `DIR/.lock`, released when the
/// process ends, however it ends (the lock file itself stays, naming its last holder).
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// Bytes one save of `model` takes: f32 weights and two f32 moments per parameter, and a
/// twentieth more for names, headers and statistics.
pub fn save_bytes(model: &crate::model::ClipConfig) -> u64 {
    let params = model.vision.size().num_params(model.embed_dim)
        + model.text.size().num_params(model.embed_dim);
    (params as f64 * 12.0 * 1.05) as u64
}

/// Prepares `dir` for a run before any step: creates it, takes its lock (a second run is
/// refused, naming the holder), removes the `.partial` folders of a killed save, checks
/// that it is writable and has room for a save of `save_bytes`. Errors name the folder
/// and `field` (where it was set).
pub fn prepare(dir: &Path, save_bytes: u64, field: &str) -> Result<DirLock> {
    let bad = |message: String| Error::invalid(dir, field, message);
    std::fs::create_dir_all(dir).map_err(|e| bad(format!("cannot create it: {e}")))?;
    let lock_path = dir.join(".lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| bad(format!("cannot open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            return Err(bad(format!(
                "another run is using this folder ({}): give each run its own checkpoint folder, or wait for it to end",
                holder.trim()
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(bad(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
    {
        use std::io::Write;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!("pid {} on {}", std::process::id(), host.trim());
        file.set_len(0)
            .and_then(|()| file.write_all(holder.as_bytes()))
            .map_err(|e| bad(format!("cannot write {}: {e}", lock_path.display())))?;
    }
    // A save killed before its rename left a `.partial` folder: nothing reads it.
    for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let path = entry.path();
        let stale = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("step-") && n.ends_with(".partial"));
        if stale && path.is_dir() {
            tracing::warn!(
                "removing {}, left by a save that did not finish",
                path.display()
            );
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    let probe = dir.join(".write-probe");
    durable::write(&probe, b"mmpipe").map_err(|e| bad(format!("is not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    let vfs = nix::sys::statvfs::statvfs(dir).map_err(|e| bad(format!("statvfs: {e}")))?;
    let free = vfs.blocks_available() as u64 * vfs.fragment_size() as u64;
    if free < save_bytes {
        return Err(bad(format!(
            "{} free, and one save of this model takes about {}: free some room or choose another folder",
            crate::plan::short_bytes(free),
            crate::plan::short_bytes(save_bytes)
        )));
    }
    Ok(DirLock { _file: file })
}
