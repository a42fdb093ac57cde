//! Named, seeded parameters. candle's `VarMap` draws from an RNG that cannot be seeded and
//! iterates in hash order; here every parameter is drawn from an RNG seeded by (seed, name),
//! so a tower built on any rank, alone or inside the whole model, gets identical weights,
//! and parameters are always listed sorted by name.
//!
//! Under mixed precision a parameter is two variables: the master weight in full precision
//! (what the optimizer updates and checkpoints hold) and the working copy in the compute
//! dtype (what the model reads, and what backward hands gradients for). The optimizer
//! writes the working copy from the master after every update.

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

/// Every parameter a builder made: the variables the model reads, and the master weights
/// of those whose compute dtype is not the master dtype.
#[derive(Default)]
struct Store {
    working: BTreeMap<String, Var>,
    masters: BTreeMap<String, Var>,
}

#[derive(Clone)]
pub struct ParamBuilder {
    store: Arc<Mutex<Store>>,
    prefix: String,
    seed: u64,
    /// What the model computes with.
    dtype: DType,
    /// What the optimizer keeps: `dtype`, unless mixed precision.
    master: DType,
    device: Device,
}

impl ParamBuilder {
    pub fn new(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::mixed(seed, dtype, dtype, device)
    }

    /// Parameters computed with in `compute` and kept in `master` (bf16 and f32 under mixed
    /// precision): each one a master variable and, when the dtypes differ, a working copy.
    pub fn mixed(seed: u64, compute: DType, master: DType, device: &Device) -> Self {
        ParamBuilder {
            store: Arc::default(),
            prefix: String::new(),
            seed,
            dtype: compute,
            master,
            device: device.clone(),
        }
    }

    /// The same store and names, with parameters that the model reads in the master dtype
    /// (no working copy): the loss's scalars, which the loss uses in full precision.
    pub fn full_precision(&self) -> Self {
        let mut b = self.clone();
        b.dtype = self.master;
        b
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

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dtype of the master weights (and of statistics kept across steps).
    pub fn master_dtype(&self) -> DType {
        self.master
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Creates (or returns, if it exists) the parameter `name` under this prefix.
    pub fn get(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Tensor> {
        let shape = shape.into();
        let path = self.path(name);
        let mut store = self.store.lock().expect("parameter store poisoned");
        if let Some(v) = store.working.get(&path) {
            if v.shape() != &shape {
                return Err(Error::Msg(format!(
                    "parameter {path} requested with shape {shape:?} but exists with {:?}",
                    v.shape()
                )));
            }
            return Ok(v.as_tensor().clone());
        }
        let values = draw(&shape, init, self.seed, &path);
        let master = Tensor::from_vec(values, shape, &self.device)?.to_dtype(self.master)?;
        let master = Var::from_tensor(&master)?;
        let working = if self.dtype == self.master {
            master
        } else {
            let copy = Var::from_tensor(&master.as_tensor().to_dtype(self.dtype)?)?;
            store.masters.insert(path.clone(), master);
            copy
        };
        store.working.insert(path, working.clone());
        Ok(working.as_tensor().clone())
    }

    /// [`Self::get`], returning the master variable (the one the optimizer updates; the
    /// working copy is rewritten from it).
    pub fn var(&self, shape: impl Into<Shape>, name: &str, init: Init) -> Result<Var> {
        self.get(shape, name, init)?;
        let path = self.path(name);
        let store = self.store.lock().expect("parameter store poisoned");
        Ok(store
            .masters
            .get(&path)
            .or_else(|| store.working.get(&path))
            .expect("registered above")
            .clone())
    }

    /// The variables the model reads (the working copies under mixed precision).
    pub fn params(&self) -> Params {
        Params {
            vars: self
                .store
                .lock()
                .expect("parameter store poisoned")
                .working
                .clone(),
        }
    }

    /// The master weights, under the same names: the working variables themselves where
    /// there is no separate copy.
    pub fn masters(&self) -> Params {
        let store = self.store.lock().expect("parameter store poisoned");
        Params {
            vars: store
                .working
                .iter()
                .map(|(name, v)| (name.clone(), store.masters.get(name).unwrap_or(v).clone()))
                .collect(),
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

    /// Bytes the parameters' values take.
    pub fn num_bytes(&self) -> usize {
        self.vars
            .values()
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }

    /// Sets each of `working`'s variables that is a separate copy of one of these (same
    /// name, another variable) to its master's values, rounded to the copy's dtype: after
    /// the masters were loaded from a checkpoint.
    pub fn write_working_copies(&self, working: &Params) -> Result<()> {
        for (name, copy) in working.iter() {
            if let Some(master) = self.vars.get(name) {
                if master.id() != copy.id() {
                    copy.set(&master.as_tensor().to_dtype(copy.dtype())?)?;
                }
            }
        }
        Ok(())
    }

    /// These parameters less `other`'s (by variable): what was built after `other` was
    /// taken from the same builder.
    pub fn without(&self, other: &Params) -> Params {
        let taken: std::collections::HashSet<_> = other.vars.values().map(|v| v.id()).collect();
        Params {
            vars: self
                .vars
                .iter()
                .filter(|(_, v)| !taken.contains(&v.id()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
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
