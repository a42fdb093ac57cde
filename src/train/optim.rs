//! AdamW with decoupled weight decay and its state in plain tensors (so it can be
//! checkpointed), plus the learning-rate schedule.

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};
use crate::model::Params;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The parameter groups: no weight decay on gains, biases, norms, embeddings and the
/// loss's scalars: every tensor with fewer than two dimensions, and anything named like a
/// norm, a bias or an embedding (token, position, class, BERT's word/position/type).
pub fn decays(name: &str, var: &Var) -> bool {
    !(var.rank() < 2
        || name.contains("bias")
        || name.contains("ln_")
        || name.contains("LayerNorm")
        || name.contains("embedding")
        || name.contains("logit_"))
}

/// How the learning rate moves after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay to 0 at the last step.
    #[default]
    Cosine,
    /// The peak, held.
    Constant,
}

impl Schedule {
    /// The learning rate of `step` (0-based) with linear warm-up over `warmup` steps.
    pub fn lr(self, step: usize, peak: f64, warmup: usize, total: usize) -> f64 {
        match self {
            Schedule::Cosine => cosine_lr(step, peak, warmup, total),
            Schedule::Constant if step < warmup => peak * (step + 1) as f64 / warmup as f64,
            Schedule::Constant => peak,
        }
    }
}

struct Slot {
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    decay: decays(name, var),
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                    var: var.clone(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// The state to checkpoint: each parameter's moments as `optimizer.m.NAME` and
    /// `optimizer.v.NAME` (`names` in parameter order), and the step count.
    pub fn state(&self, names: &[&str]) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for (slot, name) in self.slots.iter().zip(names) {
            out.push((format!("optimizer.m.{name}"), slot.m.clone()));
            out.push((format!("optimizer.v.{name}"), slot.v.clone()));
        }
        out.push((
            "optimizer.step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        ));
        Ok(out)
    }

    /// Restores [`Self::state`]; a missing or misshapen tensor is an error naming it.
    pub fn load_state(
        &mut self,
        names: &[&str],
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        let get = |key: String, like: &Tensor| -> Result<Tensor> {
            let t = tensors
                .get(&key)
                .ok_or_else(|| Error::Msg(format!("the checkpoint has no `{key}`")))?;
            if t.shape() != like.shape() {
                return Err(Error::Msg(format!(
                    "`{key}` has shape {:?}, the model {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
        };
        for (slot, name) in self.slots.iter_mut().zip(names) {
            slot.m = get(format!("optimizer.m.{name}"), &slot.m)?;
            slot.v = get(format!("optimizer.v.{name}"), &slot.v)?;
        }
        let step = tensors
            .get("optimizer.step")
            .ok_or_else(|| Error::Msg("the checkpoint has no `optimizer.step`".into()))?;
        self.step = step
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?
            .first()
            .copied()
            .unwrap_or(0.0) as usize;
        Ok(())
    }

    /// One update; `grads` in the same (name) order as the parameters.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::Msg(format!(
                "optimizer has {} parameters but got {} gradients",
                self.slots.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let c = self.cfg;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2 = 1.0 - c.beta2.powi(self.step as i32);
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            // Detached: the state must not chain a graph from step to step.
            let g = g.detach();
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let update = ((&slot.m / bias1)? / ((&slot.v / bias2)?.sqrt()? + c.eps)?)?;
            let w = slot.var.as_tensor();
            let decayed = if slot.decay {
                (w * (1.0 - lr * c.weight_decay))?
            } else {
                w.clone()
            };
            slot.var.set(&(decayed - (update * lr)?)?.detach())?;
        }
        Ok(())
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to 0 at `total`.
pub fn cosine_lr(step: usize, peak: f64, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        peak * (step + 1) as f64 / warmup as f64
    } else if total <= warmup {
        peak
    } else {
        let progress = (step - warmup) as f64 / (total - warmup) as f64;
        0.5 * peak * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
    }
}
