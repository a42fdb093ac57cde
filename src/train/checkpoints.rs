//! Training checkpoints: a folder per save, `step-00000010/` with each tower's part
//! (`image.safetensors`, `text.safetensors`: parameters under OpenCLIP's names, batch-norm
//! statistics, optimizer moments) and `state.json` (step, data position, seed, batch),
//! written under a `.partial` name and renamed when complete; `latest` names the newest
//! and is replaced atomically. A run killed mid-save leaves the previous one loadable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::step::RankTrainer;
use crate::comm::RankComms;
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
}

pub fn part_file(tower: Tower) -> &'static str {
    match tower {
        Tower::Image => "image.safetensors",
        Tower::Text => "text.safetensors",
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Saves step `step` from every rank (call on all ranks at once): each group's first
/// rank writes its tower's part, world rank 0 the state, the rename and `latest`, and
/// removes checkpoints beyond the newest `cfg.keep_checkpoints`.
pub fn save(
    dir: &Path,
    step: usize,
    comms: &RankComms,
    trainer: &RankTrainer,
    cfg: &TrainConfig,
) -> Result<PathBuf> {
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
    if comms.group.rank() == 0 {
        trainer.save_part(&partial.join(part_file(trainer.tower)))?;
    }
    comms.world.barrier()?;
    if lead {
        let state = CheckpointState {
            step,
            position: (step * cfg.global_batch) as u64,
            global_batch: cfg.global_batch,
            seed: cfg.seed,
            loss: cfg.loss.kind.to_string(),
        };
        let json = serde_json::to_string_pretty(&state).expect("plain data");
        let state_path = partial.join("state.json");
        std::fs::write(&state_path, json).map_err(io(&state_path))?;
        // The settings it was trained with, and the model's own file: enough to evaluate
        // or continue it without the original command line.
        let config_path = partial.join("train.toml");
        let config = toml::to_string(cfg)
            .map_err(|e| Error::Msg(format!("{}: {e}", config_path.display())))?;
        std::fs::write(&config_path, config).map_err(io(&config_path))?;
        if let Some(model) = &cfg.model {
            let copy = partial.join("model.toml");
            std::fs::copy(model, &copy).map_err(io(model))?;
        }
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(io(&done))?;
        }
        std::fs::rename(&partial, &done).map_err(io(&done))?;
        let latest = dir.join("latest");
        let tmp = dir.join("latest.tmp");
        std::fs::write(&tmp, &name).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &latest).map_err(io(&latest))?;
        prune(dir, cfg.keep_checkpoints.max(1))?;
    }
    comms.world.barrier()?;
    Ok(done)
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let mut saved: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".partial"))
        })
        .collect();
    saved.sort();
    let excess = saved.len().saturating_sub(keep);
    for old in &saved[..excess] {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(())
}

/// The checkpoint folder `resume` names: `latest` (in `dir`) or a path.
pub fn resolve(dir: Option<&Path>, resume: &Path) -> Result<PathBuf> {
    if resume == Path::new("latest") {
        let dir = dir.ok_or_else(|| {
            Error::Msg("--resume latest needs --checkpoint-dir (or checkpoint_dir)".into())
        })?;
        let latest = dir.join("latest");
        let name = std::fs::read_to_string(&latest).map_err(io(&latest))?;
        Ok(dir.join(name.trim()))
    } else {
        Ok(resume.to_path_buf())
    }
}

/// Reads a checkpoint's state and checks that this run can continue it.
pub fn read_state(checkpoint: &Path, cfg: &TrainConfig) -> Result<CheckpointState> {
    let path = checkpoint.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state: CheckpointState = serde_json::from_str(&text).map_err(|e| Error::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let differs = |field: &str, saved: String, now: String| {
        Error::invalid(
            &path,
            field,
            format!("the checkpoint was trained with {saved}, this run asks for {now}: an exact resume needs the same"),
        )
    };
    if state.global_batch != cfg.global_batch {
        return Err(differs(
            "global_batch",
            state.global_batch.to_string(),
            cfg.global_batch.to_string(),
        ));
    }
    if state.seed != cfg.seed {
        return Err(differs(
            "seed",
            state.seed.to_string(),
            cfg.seed.to_string(),
        ));
    }
    if state.loss != cfg.loss.kind.to_string() {
        return Err(differs(
            "loss",
            state.loss.clone(),
            cfg.loss.kind.to_string(),
        ));
    }
    Ok(state)
}
