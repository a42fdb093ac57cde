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
    // [tower (1 image, 2 text; 0 none), size high, size low, CRC-32] from every rank.
    let mine: [u32; 4] = if comms.group.rank() == 0 {
        let path = partial.join(part_file(trainer.tower));
        trainer.save_part(&path)?;
        let r = part_record(&path)?;
        let tower = match trainer.tower {
            Tower::Image => 1,
            Tower::Text => 2,
        };
        [tower, (r.bytes >> 32) as u32, r.bytes as u32, r.crc32]
    } else {
        [0; 4]
    };
    let reports: Vec<Vec<u32>> = comms
        .world
        .all_gather(&Tensor::from_vec(mine.to_vec(), (1, 4), &Device::Cpu)?)?
        .to_vec2()?;
    if lead {
        let parts = reports
            .iter()
            .filter_map(|r| {
                let tower = match r[0] {
                    1 => Tower::Image,
                    2 => Tower::Text,
                    _ => return None,
                };
                Some((
                    part_file(tower).to_string(),
                    PartRecord {
                        bytes: u64::from(r[1]) << 32 | u64::from(r[2]),
                        crc32: r[3],
                    },
                ))
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
        let config = toml::to_string(cfg)
            .map_err(|e| Error::Msg(format!("{}: {e}", config_path.display())))?;
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

/// Why a candidate save cannot be resumed from.
enum Unusable {
    /// Missing, unreadable or not what `state.json` recorded: try an older save.
    Damaged(String),
    /// Complete, but trained with other settings: an error, whatever the older saves.
    Mismatch(Error),
}

/// The checks one rank can make of a save: its state, the settings it was trained with,
/// and this rank's tower's part against its recorded size and checksum.
fn check(
    checkpoint: &Path,
    tower: Tower,
    cfg: &TrainConfig,
    identity: &RunIdentity,
) -> std::result::Result<(CheckpointState, u32), Unusable> {
    let (state, bytes) =
        read_state_file(checkpoint).map_err(|e| Unusable::Damaged(e.to_string()))?;
    check_identity(checkpoint, &state, cfg, identity).map_err(Unusable::Mismatch)?;
    let part = checkpoint.join(part_file(tower));
    if state.parts.is_empty() {
        tracing::warn!(
            "{}: a save from before checksums: its parts load unchecked",
            checkpoint.display()
        );
        if !part.is_file() {
            return Err(Unusable::Damaged(format!("{} is missing", part.display())));
        }
    } else {
        let recorded = state.parts.get(part_file(tower)).ok_or_else(|| {
            Unusable::Damaged(format!("state.json records no {}", part_file(tower)))
        })?;
        let found = part_record(&part).map_err(|e| Unusable::Damaged(e.to_string()))?;
        if found != *recorded {
            return Err(Unusable::Damaged(format!(
                "{} is {} bytes with CRC-32 {:08x}, state.json recorded {} bytes with {:08x}",
                part.display(),
                found.bytes,
                found.crc32,
                recorded.bytes,
                recorded.crc32
            )));
        }
    }
    Ok((state, crc32fast::hash(&bytes)))
}

/// The save this run resumes from, the same on every rank (call on all ranks at once):
/// `resume` itself when it names a folder (which must check out), or, for `latest`, the
/// newest complete save of `dir` that every rank's checks pass, starting at what `latest`
/// names and falling back, with a warning, past damaged ones. Every rank must see the same
/// save (step and `state.json` hash): on stale or node-local storage the run stops, naming
/// the ranks that differ from rank 0.
pub fn resume_point(
    comms: &RankComms,
    dir: Option<&Path>,
    resume: &Path,
    tower: Tower,
    cfg: &TrainConfig,
    identity: &RunIdentity,
) -> Result<(PathBuf, CheckpointState)> {
    let lead = comms.world.rank() == 0;
    let candidates: Vec<PathBuf> = if resume == Path::new("latest") {
        let dir = dir.ok_or_else(|| {
            Error::Msg("--resume latest needs --checkpoint-dir (or checkpoint_dir)".into())
        })?;
        // Rank 0's view of the folder, for every rank: [what `latest` names, then every
        // save from the newest] as steps.
        let mut steps: Vec<u32> = Vec::new();
        if lead {
            let latest = dir.join("latest");
            match std::fs::read_to_string(&latest) {
                Ok(name) => match name
                    .trim()
                    .strip_prefix("step-")
                    .and_then(|s| s.parse().ok())
                {
                    Some(step) => steps.push(step),
                    None => {
                        tracing::warn!("{} names `{}`, not a save", latest.display(), name.trim())
                    }
                },
                Err(e) => tracing::warn!("{}: {e}", latest.display()),
            }
            for (step, _) in saves(dir)?.into_iter().rev() {
                if !steps.contains(&(step as u32)) {
                    steps.push(step as u32);
                }
            }
        }
        let n = comms
            .world
            .broadcast(&Tensor::new(&[steps.len() as u32], &Device::Cpu)?, 0)?
            .to_vec1::<u32>()?[0] as usize;
        let steps: Vec<u32> = if n == 0 {
            Vec::new()
        } else {
            // Other ranks' tensor only says where the answer goes.
            let mine = if lead { steps } else { vec![0; n] };
            comms
                .world
                .broadcast(&Tensor::from_vec(mine, n, &Device::Cpu)?, 0)?
                .to_vec1()?
        };
        if steps.is_empty() {
            return Err(Error::Msg(format!(
                "--resume latest: {} holds no save",
                dir.display()
            )));
        }
        steps
            .into_iter()
            .map(|s| dir.join(format!("step-{s:08}")))
            .collect()
    } else {
        vec![resume.to_path_buf()]
    };
    let mut reasons = Vec::new();
    for checkpoint in &candidates {
        let mine = match check(checkpoint, tower, cfg, identity) {
            Ok((state, hash)) => Ok((state, hash)),
            Err(Unusable::Mismatch(e)) => return Err(e),
            Err(Unusable::Damaged(why)) => Err(why),
        };
        let row: Vec<u32> = match &mine {
            Ok((state, hash)) => vec![1, state.step as u32, *hash],
            Err(_) => vec![0, 0, 0],
        };
        let all: Vec<Vec<u32>> = comms
            .world
            .all_gather(&Tensor::from_vec(row, (1, 3), &Device::Cpu)?)?
            .to_vec2()?;
        if all.iter().all(|r| r[0] == 1) {
            let differ: Vec<String> = all
                .iter()
                .enumerate()
                .filter(|(_, r)| r[1..] != all[0][1..])
                .map(|(rank, r)| format!("rank {rank} (step {}, state hash {:08x})", r[1], r[2]))
                .collect();
            if !differ.is_empty() {
                return Err(Error::Msg(format!(
                    "{}: the ranks see different saves: rank 0 step {} (state hash {:08x}), {}: \
                     every rank must read the same checkpoint folder (shared storage)",
                    checkpoint.display(),
                    all[0][1],
                    all[0][2],
                    differ.join(", ")
                )));
            }
            let (state, _) = mine.expect("every rank's checks passed");
            if lead {
                report_changes(checkpoint, cfg);
            }
            if !reasons.is_empty() && lead {
                tracing::warn!(
                    "resuming from {}, the newest complete save (passed over: {})",
                    checkpoint.display(),
                    reasons.join("; ")
                );
            }
            return Ok((checkpoint.clone(), state));
        }
        // Every rank's reason, for every rank's error and warning.
        let why = gather_text(comms, mine.as_ref().err().map_or("", String::as_str))?;
        let failed: Vec<String> = why
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.is_empty())
            .map(|(rank, w)| format!("rank {rank}: {w}"))
            .collect();
        reasons.push(format!("{} ({})", checkpoint.display(), failed.join("; ")));
    }
    Err(Error::Msg(format!(
        "no complete save to resume from: {}",
        reasons.join("; ")
    )))
}

/// Every rank's `text`, in rank order (a world all-gather of the lengths, then the bytes).
fn gather_text(comms: &RankComms, text: &str) -> Result<Vec<String>> {
    let lens: Vec<u32> = comms
        .world
        .all_gather(&Tensor::new(&[text.len() as u32], &Device::Cpu)?)?
        .to_vec1()?;
    let bytes: Vec<u8> = if lens.iter().all(|&l| l == 0) {
        Vec::new()
    } else {
        comms
            .world
            .all_gather(&Tensor::from_vec(
                text.as_bytes().to_vec(),
                text.len(),
                &Device::Cpu,
            )?)?
            .to_vec1()?
    };
    let mut at = 0;
    Ok(lens
        .iter()
        .map(|&l| {
            let t = String::from_utf8_lossy(&bytes[at..at + l as usize]).into_owned();
            at += l as usize;
            t
        })
        .collect())
}

/// Settings that make another run, not a continuation: a resume refuses a change in any of
/// them (unless `resume_despite_changes`). Dotted keys of `train.toml`; a key covers what
/// is below it.
const IDENTITY_KEYS: [&str; 12] = [
    "global_batch",
    "seed",
    "loss.kind",
    "data.kind",
    "data.shards",
    "data.sources",
    "data.csv",
    "data.image_column",
    "data.caption_column",
    "data.shuffle_buffer",
    "data.resample",
    "data.random_crop",
];

/// Keys whose change says nothing about the run (where it reads from and writes to, and
/// the override itself).
const UNREPORTED_KEYS: [&str; 4] = [
    "resume",
    "checkpoint_dir",
    "metrics",
    "resume_despite_changes",
];

/// `(dotted key, saved, now)` for every leaf that differs between two TOML values.
fn toml_diff(
    saved: &toml::Value,
    now: &toml::Value,
    at: &str,
    out: &mut Vec<(String, String, String)>,
) {
    match (saved, now) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let key = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => toml_diff(x, y, &key, out),
                    (x, y) => out.push((
                        key,
                        x.map_or("(unset)".into(), ToString::to_string),
                        y.map_or("(unset)".into(), ToString::to_string),
                    )),
                }
            }
        }
        (a, b) if a != b => out.push((at.to_string(), a.to_string(), b.to_string())),
        _ => {}
    }
}

/// The settings that differ between the save's `train.toml` and this run's (None: the
/// save has none, or it does not parse).
fn changes(checkpoint: &Path, cfg: &TrainConfig) -> Option<Vec<(String, String, String)>> {
    let saved: toml::Value =
        toml::from_str(&std::fs::read_to_string(checkpoint.join("train.toml")).ok()?).ok()?;
    let now = toml::Value::try_from(cfg).ok()?;
    let mut out = Vec::new();
    toml_diff(&saved, &now, "", &mut out);
    out.retain(|(k, _, _)| {
        !UNREPORTED_KEYS
            .iter()
            .any(|u| k == u || k.starts_with(&format!("{u}.")))
    });
    Some(out)
}

fn is_identity_key(key: &str) -> bool {
    IDENTITY_KEYS
        .iter()
        .any(|k| key == *k || key.starts_with(&format!("{k}.")))
}

/// Refuses a resume into another run: another model, other data (files of other sizes
/// under the same names count), or a changed identity setting of `train.toml`, each named.
/// `resume_despite_changes` turns the refusal into a warning.
fn check_identity(
    checkpoint: &Path,
    state: &CheckpointState,
    cfg: &TrainConfig,
    identity: &RunIdentity,
) -> Result<()> {
    let mut refused = Vec::new();
    // The settings state.json records (in every save, train.toml or not).
    for (key, saved, now) in [
        (
            "global_batch",
            state.global_batch.to_string(),
            cfg.global_batch.to_string(),
        ),
        ("seed", state.seed.to_string(), cfg.seed.to_string()),
        ("loss.kind", state.loss.clone(), cfg.loss.kind.to_string()),
    ] {
        if saved != now {
            refused.push(format!("`{key}` was {saved}, is {now}"));
        }
    }
    if !state.model.is_empty() && state.model != identity.model {
        refused.push(
            "the model (not the config it was trained with; that one's model.toml is in the save)"
                .to_string(),
        );
    }
    if !state.data.is_empty() && state.data != identity.data {
        refused.push("the data files (other names or sizes than it was trained on)".to_string());
    }
    for (key, saved, now) in changes(checkpoint, cfg).unwrap_or_default() {
        let recorded = ["global_batch", "seed", "loss.kind"].contains(&key.as_str());
        if is_identity_key(&key) && !recorded {
            refused.push(format!("`{key}` was {saved}, is {now}"));
        }
    }
    if refused.is_empty() {
        return Ok(());
    }
    let what = refused.join("; ");
    if cfg.resume_despite_changes {
        tracing::warn!(
            "{}: resuming despite changes (resume_despite_changes): {what}",
            checkpoint.display()
        );
        return Ok(());
    }
    Err(Error::invalid(
        checkpoint.join("state.json"),
        "resume",
        format!(
            "this run is not the one that saved it: {what}. A resume continues a run: start a \
             new one, or pass --resume-despite-changes to continue anyway"
        ),
    ))
}

/// Says which other settings (the learning rate, the steps, evaluation, checkpoints, ...)
/// the resumed run changes: accepted, and shown.
fn report_changes(checkpoint: &Path, cfg: &TrainConfig) {
    let changed: Vec<String> = changes(checkpoint, cfg)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _, _)| !is_identity_key(k))
        .map(|(k, a, b)| format!("{k} {a} -> {b}"))
        .collect();
    if !changed.is_empty() {
        tracing::warn!(
            "resuming {} with changed settings: {}",
            checkpoint.display(),
            changed.join(", ")
        );
    }
}
