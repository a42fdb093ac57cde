//! Gradient checkpointing per block (transformer block, or ResNet bottleneck): the forward
//! keeps only each block's input; the
//! backward recomputes one segment at a time (head, then the blocks in reverse, then the
//! stem), backpropagating into it the gradient of its output. Peak activation memory
//! falls from all blocks' to one block's plus the saved inputs, for one more forward.
//!
//! candle has no hook to recompute inside `backward()`, so the segments are chained by
//! hand: each segment's input is a fresh variable, and its gradient is the next
//! (earlier) segment's upstream.
//!
//! The same chain without recomputing ([`forward_in_segments`]) keeps every segment's
//! graph: backward then hands over each segment's gradients as soon as it is done, so
//! they can be summed over the group while the earlier segments' backward runs
//! (`comm::overlap`). candle's own `backward()` gives every gradient at once, at the end. A ResNet's recomputed forward updates its batch norms'
//! running statistics a second time, as PyTorch's checkpointing does.

use candle_core::{Tensor, Var};

use super::params::Params;
use super::{Encoder, TowerInput};
use crate::error::{Error, Result};

impl Encoder {
    /// The blocks' input.
    pub fn stem(&self, input: &TowerInput) -> Result<Tensor> {
        match (self, input.images()?.as_deref()) {
            (Encoder::Image(m), Some(x)) => return m.stem(x),
            (Encoder::ResNet(m), Some(x)) => return m.stem(x, true),
            _ => {}
        }
        match (self, input) {
            (Encoder::Text(m), TowerInput::Captions { tokens, .. }) => m.stem(tokens),
            (Encoder::Bert(m), TowerInput::Captions { tokens, .. }) => m.stem(tokens),
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

/// One segment's parameter gradients, as backward finishes the segment: (index in the
/// `params` given to backward, gradient), detached. A parameter that several segments
/// read (none of today's towers has one) comes once from each: its gradient is the sum.
pub type SegmentGrads = Vec<(usize, Tensor)>;

/// The forward of a step whose backward runs one segment at a time without recomputing
/// (so each segment's gradients can be summed over the group while the earlier
/// segments' backward runs): every segment's graph is kept, and starts at a variable
/// that holds the previous segment's output.
pub struct Segments {
    /// The stem's output, with its graph into the stem.
    stem: Tensor,
    /// The blocks, then the head with `finish`: each one's input variable and output.
    links: Vec<(Var, Tensor)>,
}

/// `finish(head(blocks(stem(input))))`, detached, and the kept segments for
/// [`Segments::backward`]. The same operations as the whole forward, cut at the blocks.
pub fn forward_in_segments(
    encoder: &Encoder,
    input: &TowerInput,
    finish: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Segments)> {
    let stem = encoder.stem(input)?;
    let mut links: Vec<(Var, Tensor)> = Vec::with_capacity(encoder.num_blocks() + 1);
    for i in 0..=encoder.num_blocks() {
        let previous = links.last().map_or(&stem, |(_, out)| out);
        let x = Var::from_tensor(&previous.detach())?;
        let out = if i < encoder.num_blocks() {
            encoder.block(i, x.as_tensor(), input)?
        } else {
            finish(&encoder.head(x.as_tensor(), input)?)?
        };
        links.push((x, out));
    }
    let features = links.last().expect("the head").1.detach();
    Ok((features, Segments { stem, links }))
}

impl Segments {
    /// Backpropagates `upstream` (the gradient of the features) segment by segment, from
    /// the head to the stem, handing each segment's gradients of `params` to `sink` as
    /// soon as the segment is done; each segment's graph is freed after its backward.
    pub fn backward(
        self,
        upstream: &Tensor,
        params: &Params,
        sink: &mut dyn FnMut(SegmentGrads) -> Result<()>,
    ) -> Result<()> {
        let mut g = upstream.clone();
        for (x, out) in self.links.into_iter().rev() {
            g = segment_backward(Some(&x), &out, &g, params, sink)?.expect("an input variable");
        }
        segment_backward(None, &self.stem, &g, params, sink)?;
        Ok(())
    }
}

/// Backward of one segment whose output `out` gets the gradient `g`: its parameters'
/// gradients go to `sink`; returns the gradient of its input variable `x`.
fn segment_backward(
    x: Option<&Var>,
    out: &Tensor,
    g: &Tensor,
    params: &Params,
    sink: &mut dyn FnMut(SegmentGrads) -> Result<()>,
) -> Result<Option<Tensor>> {
    let store = (out * g)?.sum_all()?.backward()?;
    let grads = params
        .iter()
        .enumerate()
        .filter_map(|(i, (_, var))| store.get(var.as_tensor()).map(|g| (i, g.detach())))
        .collect();
    sink(grads)?;
    x.map(|x| match store.get(x.as_tensor()) {
        Some(g) => Ok(g.detach()),
        None => Ok(x.as_tensor().zeros_like()?),
    })
    .transpose()
}

/// Sums segments' gradients per parameter: the whole gradient of every parameter of
/// `params` once backward is done (zeros for any the tower does not touch).
pub struct GradAccumulator<'a> {
    params: &'a Params,
    sums: Vec<Option<Tensor>>,
}

impl<'a> GradAccumulator<'a> {
    pub fn new(params: &'a Params) -> Self {
        GradAccumulator {
            params,
            sums: vec![None; params.len()],
        }
    }

    pub fn add(&mut self, grads: SegmentGrads) -> Result<()> {
        for (i, g) in grads {
            self.sums[i] = Some(match self.sums[i].take() {
                Some(prev) => (prev + g)?,
                None => g,
            });
        }
        Ok(())
    }

    /// In `params`' order.
    pub fn finish(self) -> Result<Vec<Tensor>> {
        self.params
            .iter()
            .zip(self.sums)
            .map(|((_, v), g)| match g {
                Some(g) => Ok(g),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }
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
    let mut acc = GradAccumulator::new(params);
    backward_recomputing_into(encoder, input, saved, upstream, finish, params, &mut |g| {
        acc.add(g)
    })?;
    acc.finish()
}

/// [`backward_recomputing`], handing each segment's gradients to `sink` as soon as the
/// segment is done (head first, stem last).
pub fn backward_recomputing_into(
    encoder: &Encoder,
    input: &TowerInput,
    saved: &[Tensor],
    upstream: &Tensor,
    finish: impl Fn(&Tensor) -> Result<Tensor>,
    params: &Params,
    sink: &mut dyn FnMut(SegmentGrads) -> Result<()>,
) -> Result<()> {
    let blocks = encoder.num_blocks();
    if saved.len() != blocks + 1 {
        return Err(Error::Msg(format!(
            "{} saved inputs for {blocks} blocks",
            saved.len()
        )));
    }
    let mut g = upstream.clone();
    for i in (0..=blocks).rev() {
        let x = Var::from_tensor(&saved[i])?;
        let out = if i == blocks {
            finish(&encoder.head(x.as_tensor(), input)?)?
        } else {
            encoder.block(i, x.as_tensor(), input)?
        };
        g = segment_backward(Some(&x), &out, &g, params, sink)?.expect("an input variable");
    }
    // The stem starts from the input itself, not from a saved tensor.
    segment_backward(None, &encoder.stem(input)?, &g, params, sink)?;
    Ok(())
}
