//! Gradient checkpointing per block (transformer block, or ResNet bottleneck): the forward
//! keeps only each block's input; the
//! backward recomputes one segment at a time (head, then the blocks in reverse, then the
//! stem), backpropagating into it the gradient of its output. Peak activation memory
//! falls from all blocks' to one block's plus the saved inputs, for one more forward.
//!
//! candle has no hook to recompute inside `backward()`, so the segments are chained by
//! hand: each segment's input is a fresh variable, and its gradient is the next
//! (earlier) segment's upstream. A ResNet's recomputed forward updates its batch norms'
//! running statistics a second time, as PyTorch's checkpointing does.

use std::collections::HashMap;

use candle_core::{Tensor, TensorId, Var};

use super::params::Params;
use super::{Encoder, TowerInput};
use crate::error::{Error, Result};

impl Encoder {
    /// The blocks' input.
    pub fn stem(&self, input: &TowerInput) -> Result<Tensor> {
        match (self, input) {
            (Encoder::Image(m), TowerInput::Images(x)) => m.stem(x),
            (Encoder::Text(m), TowerInput::Captions { tokens, .. }) => m.stem(tokens),
            (Encoder::Bert(m), TowerInput::Captions { tokens, .. }) => m.stem(tokens),
            (Encoder::ResNet(m), TowerInput::Images(x)) => m.stem(x, true),
            _ => Err(Error::Msg(
                "encoder and input are of different modalities".into(),
            )),
        }
    }

    pub fn num_blocks(&self) -> usize {
        match self {
            Encoder::Image(m) => m.token_blocks().len(),
            Encoder::Text(m) => m.token_blocks().len(),
            Encoder::Bert(m) => m.num_layers(),
            Encoder::ResNet(m) => m.num_blocks(),
        }
    }

    /// Block `i` on `x`.
    pub fn block(&self, i: usize, x: &Tensor, input: &TowerInput) -> Result<Tensor> {
        match (self, input) {
            (Encoder::Image(m), _) => m.token_blocks()[i].forward(x, None),
            (Encoder::ResNet(m), _) => m.block(i, x, true),
            (Encoder::Text(m), _) => m.token_blocks()[i].forward(x, Some(&m.mask(x)?)),
            (Encoder::Bert(m), TowerInput::Captions { mask, .. }) => {
                m.layer(i, x, &m.additive_mask(mask, x)?)
            }
            _ => Err(Error::Msg(
                "encoder and input are of different modalities".into(),
            )),
        }
    }

    /// From the last block's output to the features.
    pub fn head(&self, x: &Tensor, input: &TowerInput) -> Result<Tensor> {
        match (self, input) {
            (Encoder::Image(m), _) => m.head(x),
            (Encoder::ResNet(m), _) => m.head(x),
            (Encoder::Text(m), TowerInput::Captions { eot, .. }) => m.head(x, eot),
            (Encoder::Bert(m), TowerInput::Captions { mask, .. }) => m.head(x, mask),
            _ => Err(Error::Msg(
                "encoder and input are of different modalities".into(),
            )),
        }
    }
}

/// The forward of a checkpointed step: `finish(head(blocks(stem(input))))`, detached, and
/// each block's input (the last entry is the head's input), detached.
pub fn forward_keeping_block_inputs(
    encoder: &Encoder,
    input: &TowerInput,
    finish: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut saved = vec![encoder.stem(input)?.detach()];
    for i in 0..encoder.num_blocks() {
        // The block's graph dies with its output: only the detached copy stays.
        let next = encoder.block(i, &saved[i], input)?.detach();
        saved.push(next);
    }
    let out = finish(&encoder.head(saved.last().expect("stem output"), input)?)?.detach();
    Ok((out, saved))
}

/// Backpropagates `upstream` (the gradient of the forward's output) through the tower,
/// recomputing each segment; returns the gradient of every parameter of `params`, in
/// name order (zeros for any the tower does not touch).
pub fn backward_recomputing(
    encoder: &Encoder,
    input: &TowerInput,
    saved: &[Tensor],
    upstream: &Tensor,
    finish: impl Fn(&Tensor) -> Result<Tensor>,
    params: &Params,
) -> Result<Vec<Tensor>> {
    let blocks = encoder.num_blocks();
    if saved.len() != blocks + 1 {
        return Err(Error::Msg(format!(
            "{} saved inputs for {blocks} blocks",
            saved.len()
        )));
    }
    let mut acc: HashMap<TensorId, Tensor> = HashMap::new();
    let mut collect = |store: &candle_core::backprop::GradStore| -> Result<()> {
        for (_, var) in params.iter() {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
                let id = var.as_tensor().id();
                let sum = match acc.remove(&id) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                acc.insert(id, sum);
            }
        }
        Ok(())
    };
    // Backward of one segment: returns the gradient of its input.
    let mut segment =
        |x: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>, g: &Tensor| -> Result<Tensor> {
            let x = Var::from_tensor(x)?;
            let store = (f(x.as_tensor())? * g)?.sum_all()?.backward()?;
            collect(&store)?;
            Ok(store
                .get(x.as_tensor())
                .map(|t| t.detach())
                .unwrap_or(x.as_tensor().zeros_like()?))
        };
    let mut g = segment(
        &saved[blocks],
        &|x| finish(&encoder.head(x, input)?),
        upstream,
    )?;
    for i in (0..blocks).rev() {
        g = segment(&saved[i], &|x| encoder.block(i, x, input), &g)?;
    }
    // The stem starts from the input itself, not from a saved tensor.
    let store = (encoder.stem(input)? * &g)?.sum_all()?.backward()?;
    collect(&store)?;
    params
        .iter()
        .map(|(_, v)| match acc.remove(&v.as_tensor().id()) {
            Some(g) => Ok(g),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}
