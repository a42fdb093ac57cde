//! Weights in safetensors under OpenCLIP's parameter names (`visual.conv1.weight`,
//! `token_embedding.weight`, `logit_scale`, …): what mmpipe writes loads into OpenCLIP's
//! model of the same config, and an OpenCLIP `state_dict` saved as safetensors loads here.
//! Writes are atomic and durable ([`crate::durable`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::params::Params;
use super::ClipConfig;
use crate::error::{Error, Result};
use crate::topology::Tower;

/// The file of a training checkpoint folder (`step-NNNNNNNN/`) that holds `tower`'s
/// part: its parameters, batch-norm statistics and optimizer state.
pub fn part_file(tower: Tower) -> &'static str {
    match tower {
        Tower::Image => "image.safetensors",
        Tower::Text => "text.safetensors",
    }
}

/// The model config a training checkpoint folder keeps beside its parts.
pub const MODEL_FILE: &str = "model.toml";

/// The model of training checkpoint folder `dir`: `model` when given, else the config
/// saved in the folder, else the built-in clip-tiny (saves from before configs were kept).
///
/// `dir` may instead be one safetensors file of both towers (an OpenCLIP `state_dict`):
/// then `model` is required (mmpipe's TOML or OpenCLIP's JSON model config).
pub fn checkpoint_model(dir: &Path, model: Option<&Path>) -> Result<ClipConfig> {
    let saved = dir.join(MODEL_FILE);
    match model {
        Some(m) => ClipConfig::from_file(m),
        None if dir.is_file() => Err(Error::File {
            path: dir.to_path_buf(),
            message: "a single weights file carries no model config: name it with --model \
                      (OpenCLIP's model config JSON, as ViT-B-32.json, or an mmpipe model TOML)"
                .into(),
        }),
        None if saved.is_file() => ClipConfig::from_file(&saved),
        None => Ok(ClipConfig::default_tiny()),
    }
}

/// Writes `tensors` to `path` atomically and durably (a temporary file in the same folder,
/// fsync, rename, fsync of the folder).
pub fn write_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    crate::durable::write_with(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(|e| Error::File {
            path: tmp.to_path_buf(),
            message: e.to_string(),
        })
    })
}

/// Saves every parameter under its name.
pub fn save(params: &Params, path: &Path) -> Result<()> {
    save_with_buffers(params, &[], path)
}

/// Saves every parameter and the given buffers (batch-norm statistics) under their names.
pub fn save_with_buffers(params: &Params, buffers: &[(String, Tensor)], path: &Path) -> Result<()> {
    let mut tensors = params
        .iter()
        .map(|(n, v)| Ok((n.to_string(), v.as_tensor().contiguous()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    for (n, t) in buffers {
        tensors.insert(n.clone(), t.contiguous()?);
    }
    write_tensors(&tensors, path)
}

pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint"),
        });
    }
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Parse {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// What a load did: the checkpoint's tensors that no parameter took.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub loaded: usize,
    pub unused: Vec<String>,
}

/// Sets every parameter from the checkpoint tensor named `name_in_file(parameter name)`.
/// A missing tensor or a shape mismatch is an error naming the file and the tensor;
/// values are cast to the parameter's dtype.
pub fn load_into(
    params: &Params,
    path: &Path,
    name_in_file: impl Fn(&str) -> String,
) -> Result<LoadReport> {
    assign(params, read_tensors(path)?, path, name_in_file)
}

/// [`load_into`] from tensors already read from `path` (named in errors).
fn assign(
    params: &Params,
    mut tensors: HashMap<String, Tensor>,
    path: &Path,
    name_in_file: impl Fn(&str) -> String,
) -> Result<LoadReport> {
    let mut loaded = 0;
    for (name, var) in params.iter() {
        let key = name_in_file(name);
        let t = tensors.remove(&key).ok_or_else(|| {
            Error::invalid(
                path,
                &key,
                format!("the checkpoint has no tensor for parameter `{name}`"),
            )
        })?;
        if t.shape() != var.shape() {
            return Err(Error::invalid(
                path,
                &key,
                format!(
                    "shape {:?} does not match parameter `{name}` {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        loaded += 1;
    }
    let mut unused: Vec<String> = tensors.into_keys().collect();
    unused.sort();
    Ok(LoadReport { loaded, unused })
}

/// The prefix DDP puts before every name of a state_dict saved from a wrapped model
/// (OpenCLIP's own training checkpoints): OpenCLIP strips it on load, and so do we.
const DDP_PREFIX: &str = "module.";

/// `tensors` with DDP's `module.` taken off their names, where every name has it.
fn without_ddp_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    if tensors.is_empty() || !tensors.keys().all(|k| k.starts_with(DDP_PREFIX)) {
        return tensors;
    }
    tensors
        .into_iter()
        .map(|(k, v)| (k[DDP_PREFIX.len()..].to_string(), v))
        .collect()
}

/// A state_dict file's tensors under the names parameters go by: DDP's `module.` taken
/// off where a save has it.
pub fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(without_ddp_prefix(read_tensors(path)?))
}

/// Loads an mmpipe or OpenCLIP checkpoint (same names, with or without DDP's `module.`
/// before them) into `params`.
pub fn load(params: &Params, path: &Path) -> Result<LoadReport> {
    load_tensors(params, read_state_dict(path)?, path)
}

/// [`load`] from a state_dict already read from `path` ([`read_state_dict`]), for callers
/// that also take its buffers.
pub fn load_tensors(
    params: &Params,
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<LoadReport> {
    assign(params, tensors, path, str::to_string)
}

/// Whether `name` is a batch norm's running statistic: a buffer, not a parameter.
pub fn is_norm_statistic(name: &str) -> bool {
    [".running_mean", ".running_var", ".num_batches_tracked"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Loads an HF BERT checkpoint (`model.safetensors`, names with or without `bert.`) into
/// the BERT tower's parameters under `text.transformer.`; others are left as they are.
pub fn load_hf_bert(params: &Params, path: &Path) -> Result<LoadReport> {
    const PREFIX: &str = "text.transformer.";
    let tower = params.filter(|n| n.starts_with(PREFIX));
    if tower.is_empty() {
        return Err(Error::Msg(
            "the model has no BERT text tower to load into".into(),
        ));
    }
    let prefixed = read_tensors(path)?.keys().any(|k| k.starts_with("bert."));
    load_into(&tower, path, |name| {
        let hf = &name[PREFIX.len()..];
        if prefixed {
            format!("bert.{hf}")
        } else {
            hf.to_string()
        }
    })
}
