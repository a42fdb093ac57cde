//! Data for the towers. Each rank materialises only its own modality for its own slice of
//! the global batch.

pub mod synthetic;
pub mod tokenizer;
pub mod vocab;

use candle_core::{Device, Tensor};

pub use synthetic::{Stream, SyntheticShapes};
pub use tokenizer::{TextTokenizer, Tokens};
pub use vocab::WordVocab;

use crate::error::{Error, Result};
use crate::model::{ClipConfig, TowerInput};
use crate::topology::Tower;

/// The synthetic shapes set, ready to hand any slice of samples to either tower.
pub struct SyntheticSource {
    pub shapes: SyntheticShapes,
    tokenizer: TextTokenizer,
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
            tokenizer: TextTokenizer::Words(vocab),
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
                let captions: Vec<String> =
                    indices.iter().map(|&i| self.caption(stream, i)).collect();
                let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
                let t = self.tokenizer.encode_batch(&refs, self.context)?;
                Ok(TowerInput::Captions {
                    tokens: Tensor::from_vec(t.ids, (n, self.context), device)?,
                    mask: Tensor::from_vec(t.mask, (n, self.context), device)?,
                    eot: Tensor::from_vec(t.eot, n, device)?,
                })
            }
        }
    }
}
