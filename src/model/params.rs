//! Named, seeded parameters. candle's `VarMap` draws from an RNG that cannot be seeded and
//! iterates in hash order; here every parameter is drawn from an RNG seeded by (seed, name),
//! so a tower built on any rank, alone or inside the whole model, gets identical weights,
//! and parameters are always listed sorted by name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{backprop::GradStore, DType, Device, Shape, Tensor, Var};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Ones,
    Const(f64),
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
}

#[derive(Clone)]
pub struct ParamBuilder {
    store: Arc<Mutex<BTreeMap<String, Var>>>,
    prefix: String,
    seed: u64,
    dtype: DType,
    device: Device,
}

impl ParamBuilder {
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        ParamBuilder {
            store: Arc::default(),
            prefix: String::new(),
            seed,
            dtype,
            device: device.clone(),
        }
    }

    /// A builder whose names are prefixed with `name.` (as `VarBuilder::pp`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut b = self.clone();
        b.prefix = self.path(&name.to_string());
        b
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Creates (or returns, if it exists) the parameter `name` under this prefix.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let path = self.path(name);
        let mut store = self.store.lock().expect("parameter store poisoned");
        if let Some(v) = store.get(&path) {
            if v.shape() != &shape {
                return Err(Error::Msg(format!(
                    "parameter {path} requested with shape {shape:?} but exists with {:?}",
                    v.shape()
                )));
            }
            return Ok(v.as_tensor().clone());
        }
        let values = draw(&shape, init, self.seed, &path);
        let t = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        store.insert(path, var.clone());
        Ok(var.as_tensor().clone())
    }

    pub fn params(&self) -> Params {
        Params {
            vars: self.store.lock().expect("parameter store poisoned").clone(),
        }
    }
}

fn draw(shape: &Shape, init: Init, seed: u64, name: &str) -> Vec<f64> {
    let n = shape.elem_count();
    match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Const(c) => vec![c; n],
        Init::Normal(std) => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ fnv1a(name));
            let normal = Normal::new(0.0, std).expect("finite std");
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        }
    }
}

/// FNV-1a: a stable hash of the parameter name (std's hasher may change between releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A model's parameters, sorted by name: the order every collective over them uses.
#[derive(Clone, Default)]
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn names(&self) -> Vec<&str> {
        self.vars.keys().map(String::as_str).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// The parameters whose names satisfy `keep`.
    pub fn filter(&self, keep: impl Fn(&str) -> bool) -> Params {
        Params {
            vars: self
                .vars
                .iter()
                .filter(|(k, _)| keep(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Gradients in name order, detached; a parameter the backward pass did not reach gets
    /// zeros. (candle's gradients keep references to the forward graph: holding one past
    /// the step would keep the whole graph alive.)
    pub fn grads(&self, store: &GradStore) -> Result<Vec<Tensor>> {
        self.vars
            .values()
            .map(|v| match store.get(v.as_tensor()) {
                Some(g) => Ok(g.detach()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }
}
