//! Resuming: which save to continue from (every rank must agree on it), whether it is
//! usable, and whether the run is still the one that saved it (model, data, batch, seed,
//! loss; anything else that changed is reported).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::super::config::TrainConfig;
use super::{part_file, part_record, read_state_file, saves, CheckpointState, RunIdentity};
use crate::comm::RankComms;
use crate::error::{Error, Result};
use crate::topology::Tower;

/// Why a candidate save cannot be resumed from.
enum Unusable {
    /// Missing, unreadable or not what `state.json` recorded: try an older save.
    Damaged(String),
    /// Complete, but trained with other settings: an error, whatever the older saves.
    Mismatch(Error),
}

/// The checks one rank can make of a save: its state, the settings it was trained with,
/// and the parts of this rank's towers against their recorded sizes and checksums.
fn check(
    checkpoint: &Path,
    towers: &[Tower],
    cfg: &TrainConfig,
    identity: &RunIdentity,
) -> std::result::Result<(CheckpointState, u32), Unusable> {
    let (state, bytes) =
        read_state_file(checkpoint).map_err(|e| Unusable::Damaged(e.to_string()))?;
    check_identity(checkpoint, &state, cfg, identity).map_err(Unusable::Mismatch)?;
    for &tower in towers {
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
    towers: &[Tower],
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
            return Err(Error::File {
                path: dir.to_path_buf(),
                message: "--resume latest: the folder holds no save".into(),
            });
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
        let mine = match check(checkpoint, towers, cfg, identity) {
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
                return Err(Error::File {
                    path: checkpoint.to_path_buf(),
                    message: format!(
                        "the ranks see different saves: rank 0 step {} (state hash {:08x}), {}: \
                     every rank must read the same checkpoint folder (shared storage)",
                        all[0][1],
                        all[0][2],
                        differ.join(", ")
                    ),
                });
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
