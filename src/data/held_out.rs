//! Held-out pairs a run evaluates itself on: the synthetic set's held-out stream, or
//! Fashion-MNIST's test split with its zero-shot classes.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::fashion_mnist::{FashionMnist, Split, CLASSES, SIDE, TEMPLATES};
use super::tokenizer::caption_tokenizer;
use super::transform::{Crop, ImageTransform};
use super::{Stream, SyntheticSource, TextTokenizer};
use crate::error::{Error, Result};
use crate::model::layers::l2_normalize;
use crate::model::{ClipConfig, TowerInput};
use crate::topology::Tower;

/// Held-out pairs a run scores itself on, `len` of them at most.
pub enum HeldOut {
    /// The synthetic set's held-out stream (never trained on).
    Synthetic(Arc<SyntheticSource>),
    /// Fashion-MNIST's test split, captions from the first prompt template, and zero-shot
    /// classes from every template.
    FashionMnist {
        set: Arc<FashionMnist>,
        transform: ImageTransform,
        tokenizer: Arc<TextTokenizer>,
        context: usize,
    },
}

impl HeldOut {
    /// Fashion-MNIST's test split from `dir`, shaped for `model`.
    pub fn fashion_mnist(dir: &Path, model: &ClipConfig) -> Result<Self> {
        Ok(HeldOut::FashionMnist {
            set: Arc::new(FashionMnist::load(dir, Split::Test)?),
            transform: ImageTransform::clip(model.image_size(), Crop::Centre),
            tokenizer: Arc::new(caption_tokenizer(model)?),
            context: model.context_length(),
        })
    }

    /// How many pairs there are (None: endless).
    pub fn pairs(&self) -> Option<usize> {
        match self {
            HeldOut::Synthetic(_) => None,
            HeldOut::FashionMnist { set, .. } => Some(set.len()),
        }
    }

    pub fn caption(&self, i: u64) -> String {
        match self {
            HeldOut::Synthetic(source) => source.caption(Stream::Heldout, i),
            HeldOut::FashionMnist { set, .. } => set.caption(i as usize, 0),
        }
    }

    /// The input of `tower` for pairs `indices`.
    pub fn tower_input(&self, tower: Tower, indices: &[u64]) -> Result<TowerInput> {
        match self {
            HeldOut::Synthetic(source) => {
                source.tower_input(tower, Stream::Heldout, indices, &Device::Cpu)
            }
            HeldOut::FashionMnist { set, transform, .. } if tower == Tower::Image => {
                let side = transform.size;
                let mut pixels = Vec::with_capacity(indices.len() * 3 * side * side);
                for &i in indices {
                    pixels.extend(
                        transform
                            .apply_rgb(SIDE as u32, SIDE as u32, set.rgb(i as usize), 0)
                            .map_err(Error::Msg)?,
                    );
                }
                Ok(TowerInput::Images(Tensor::from_vec(
                    pixels,
                    (indices.len(), 3, side, side),
                    &Device::Cpu,
                )?))
            }
            HeldOut::FashionMnist { .. } => {
                let captions: Vec<String> = indices.iter().map(|&i| self.caption(i)).collect();
                self.text_input(&captions)
                    .map(|t| t.expect("Fashion-MNIST has a tokenizer"))
            }
        }
    }

    fn text_input(&self, texts: &[String]) -> Result<Option<TowerInput>> {
        let HeldOut::FashionMnist {
            tokenizer, context, ..
        } = self
        else {
            return Ok(None);
        };
        tokenizer
            .caption_input(texts, *context, &Device::Cpu)
            .map(Some)
    }

    /// Each pair's class, where the pairs have classes.
    pub fn labels(&self, n: usize) -> Option<Vec<usize>> {
        match self {
            HeldOut::Synthetic(_) => None,
            HeldOut::FashionMnist { set, .. } => Some((0..n).map(|i| set.label(i)).collect()),
        }
    }

    /// Zero-shot class features `[C, D]` with `encode` (a text tower giving normalised
    /// features): each class's prompts encoded, averaged and normalised again. None for a
    /// set without classes.
    pub fn class_features(
        &self,
        encode: &dyn Fn(&TowerInput) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        if !matches!(self, HeldOut::FashionMnist { .. }) {
            return Ok(None);
        }
        let mut classes = Vec::with_capacity(CLASSES.len());
        for class in CLASSES {
            let prompts: Vec<String> = TEMPLATES.iter().map(|t| t.replace("{}", class)).collect();
            let input = self.text_input(&prompts)?.expect("checked above");
            classes.push(encode(&input)?.mean_keepdim(0)?);
        }
        Ok(Some(l2_normalize(&Tensor::cat(&classes, 0)?)?))
    }
}
