//! Data for the towers. Each rank materialises only its own modality for its own slice of
//! the global batch.

pub mod synthetic;
pub mod vocab;

use candle_core::{Device, Tensor};

pub use synthetic::{Stream, SyntheticShapes};
pub use vocab::WordVocab;

use crate::error::{Error, Result};
use crate::model::{ClipConfig, TowerInput};
use crate::topology::Tower;

/// The synthetic shapes set, ready to hand any slice of samples to either tower.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    pub shapes: SyntheticShapes,
    pub vocab: WordVocab,
    context: usize,
    channels: usize,
}

impl SyntheticSource {
    pub fn new(seed: u64, model: &ClipConfig) -> Result<Self> {
        let words = synthetic::SHAPES
            .iter()
            .chain(synthetic::SIZES.iter())
            .chain(synthetic::COLOURS.iter().map(|(c, _)| c))
            .flat_map(|s| s.split_whitespace())
            .chain(
                synthetic::POSITIONS
                    .iter()
                    .flat_map(|p| p.split_whitespace()),
            )
            .chain(["a", "at", "the"]);
        let vocab = WordVocab::new(words);
        if vocab.size() > model.vocab_size() {
            return Err(Error::Msg(format!(
                "the synthetic captions need a vocabulary of {} tokens but text.vocab_size is {}",
                vocab.size(),
                model.vocab_size()
            )));
        }
        if model.channels() != 3 {
            return Err(Error::Msg(
                "the synthetic images are RGB: vision.channels must be 3".into(),
            ));
        }
        Ok(SyntheticSource {
            shapes: SyntheticShapes::new(seed, model.image_size()),
            vocab,
            context: model.context_length(),
            channels: model.channels(),
        })
    }

    pub fn caption(&self, stream: Stream, index: u64) -> String {
        SyntheticShapes::caption(&self.shapes.sample(stream, index))
    }

    /// The input for `tower` of samples `indices` of `stream`.
    pub fn tower_input(
        &self,
        tower: Tower,
        stream: Stream,
        indices: &[u64],
        device: &Device,
    ) -> Result<TowerInput> {
        let n = indices.len();
        match tower {
            Tower::Image => {
                let size = self.shapes.image_size;
                let mut pixels = Vec::with_capacity(n * self.channels * size * size);
                for &i in indices {
                    pixels.extend(self.shapes.render(&self.shapes.sample(stream, i)));
                }
                Ok(TowerInput::Images(Tensor::from_vec(
                    pixels,
                    (n, self.channels, size, size),
                    device,
                )?))
            }
            Tower::Text => {
                let mut tokens = Vec::with_capacity(n * self.context);
                let mut eot = Vec::with_capacity(n);
                for &i in indices {
                    let (ids, e) = self.vocab.encode(&self.caption(stream, i), self.context)?;
                    tokens.extend(ids);
                    eot.push(e);
                }
                Ok(TowerInput::Captions {
                    tokens: Tensor::from_vec(tokens, (n, self.context), device)?,
                    eot: Tensor::from_vec(eot, n, device)?,
                })
            }
        }
    }
}
