//! AdamW with decoupled weight decay and its state in plain tensors (so it can be
//! checkpointed), plus the learning-rate schedule.
//!
//! Under mixed precision the optimizer holds the master weights (f32) and, beside each,
//! the working copy the model reads (bf16): every update writes both. On the CPU each
//! parameter is updated in place; on a GPU every parameter of the model is updated by one
//! kernel launch ([`cuda`]: the moments, the master and the working copy in one pass).

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
    /// The master weight.
    var: Var,
    /// The model's copy in its compute dtype, when that is not the master's.
    working: Option<Var>,
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
        Self::with_working_copies(params, &Params::default(), cfg)
    }

    /// Updates `masters`; after each update, the variable of the same name in `working`,
    /// where that is a separate copy, takes the new values in its own dtype.
    pub fn with_working_copies(
        masters: &Params,
        working: &Params,
        cfg: AdamWConfig,
    ) -> Result<Self> {
        let slots = masters
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    decay: decays(name, var),
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                    working: working.get(name).filter(|w| w.id() != var.id()).cloned(),
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

    /// Bytes of the optimizer's state (the two moments).
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| (s.m.elem_count() + s.v.elem_count()) * s.m.dtype().size_in_bytes())
            .sum()
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

    /// One update; `grads` in the same (name) order as the parameters, in the master
    /// weights' dtype.
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
        #[cfg(feature = "cuda")]
        if cuda::applies(&self.slots, grads) {
            return cuda::step(&self.slots, grads, c, bias1, bias2, lr);
        }
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let w = slot.var.as_tensor();
            let decay = if slot.decay {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            if cpu_fused::applies(w, &slot.m, &slot.v, g) {
                cpu_fused::step(w, &slot.m, &slot.v, g, c, bias1, bias2, lr, decay)?;
            } else {
                // Detached: the state must not chain a graph from step to step.
                let g = g.detach();
                slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?.detach();
                slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
                let update = ((&slot.m / bias1)? / ((&slot.v / bias2)?.sqrt()? + c.eps)?)?;
                let decayed = if slot.decay { (w * decay)? } else { w.clone() };
                slot.var.set(&(decayed - (update * lr)?)?.detach())?;
            }
            if let Some(copy) = &slot.working {
                copy.set(&slot.var.as_tensor().to_dtype(copy.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// The same update in place on CPU tensors: three passes over memory (m, v, then the
/// weights) and no allocation, where the composed ops above make about twelve temporaries
/// per parameter. Each element goes through the same operations in the same order as the
/// composed path, with the scalars rounded to the element type the way candle's `affine`
/// rounds them.
mod cpu_fused {
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};

    use super::AdamWConfig;
    use crate::error::Result;
    use crate::model::fused::{slice, slice_mut, Real};

    pub fn applies(w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> bool {
        w.device().is_cpu()
            && matches!(w.dtype(), DType::F32 | DType::F64)
            && [m, v, g]
                .iter()
                .all(|t| t.dtype() == w.dtype() && t.shape() == w.shape())
            && [w, m, v].iter().all(|t| t.is_contiguous())
    }

    /// `state = state·beta + f(g)·(1 − beta)`, f the identity or the square.
    struct Moment {
        beta: f64,
        square: bool,
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "adamw-moment"
        }

        fn cpu_fwd(
            &self,
            s: &mut CpuStorage,
            l: &Layout,
            gs: &CpuStorage,
            gl: &Layout,
        ) -> candle_core::Result<()> {
            fn run<T: Real>(
                op: &Moment,
                s: &mut CpuStorage,
                l: &Layout,
                gs: &CpuStorage,
                gl: &Layout,
            ) -> candle_core::Result<()> {
                let (b, rest) = (T::from_f64(op.beta), T::from_f64(1.0 - op.beta));
                let g = slice::<T>(gs, gl)?;
                let state = slice_mut::<T>(s, l)?;
                if op.square {
                    for (m, &g) in state.iter_mut().zip(g) {
                        *m = *m * b + (g * g) * rest;
                    }
                } else {
                    for (m, &g) in state.iter_mut().zip(g) {
                        *m = *m * b + g * rest;
                    }
                }
                Ok(())
            }
            match s.dtype() {
                DType::F32 => run::<f32>(self, s, l, gs, gl),
                _ => run::<f64>(self, s, l, gs, gl),
            }
        }
    }

    /// `w = w·decay − lr · (m/bias1) / (sqrt(v/bias2) + eps)`.
    struct Update {
        lr: f64,
        decay: f64,
        inv_bias1: f64,
        inv_bias2: f64,
        eps: f64,
    }

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "adamw-update"
        }

        fn cpu_fwd(
            &self,
            ws: &mut CpuStorage,
            wl: &Layout,
            ms: &CpuStorage,
            ml: &Layout,
            vs: &CpuStorage,
            vl: &Layout,
        ) -> candle_core::Result<()> {
            fn run<T: Real>(
                op: &Update,
                ws: &mut CpuStorage,
                wl: &Layout,
                ms: &CpuStorage,
                ml: &Layout,
                vs: &CpuStorage,
                vl: &Layout,
            ) -> candle_core::Result<()> {
                let c = |x: f64| T::from_f64(x);
                let (lr, decay, ib1, ib2, eps) = (
                    c(op.lr),
                    c(op.decay),
                    c(op.inv_bias1),
                    c(op.inv_bias2),
                    c(op.eps),
                );
                let (m, v) = (slice::<T>(ms, ml)?, slice::<T>(vs, vl)?);
                let w = slice_mut::<T>(ws, wl)?;
                let decays = op.decay != 1.0;
                for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                    let update = (m * ib1) / ((v * ib2).sqrt() + eps);
                    let kept = if decays { *w * decay } else { *w };
                    *w = kept - update * lr;
                }
                Ok(())
            }
            match ws.dtype() {
                DType::F32 => run::<f32>(self, ws, wl, ms, ml, vs, vl),
                _ => run::<f64>(self, ws, wl, ms, ml, vs, vl),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn step(
        w: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        c: AdamWConfig,
        bias1: f64,
        bias2: f64,
        lr: f64,
        decay: f64,
    ) -> Result<()> {
        let g = g.contiguous()?;
        m.inplace_op2(
            &g,
            &Moment {
                beta: c.beta1,
                square: false,
            },
        )?;
        v.inplace_op2(
            &g,
            &Moment {
                beta: c.beta2,
                square: true,
            },
        )?;
        w.inplace_op3(
            m,
            v,
            &Update {
                lr,
                decay,
                inv_bias1: 1.0 / bias1,
                inv_bias2: 1.0 / bias2,
                eps: c.eps,
            },
        )?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod plan;

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
