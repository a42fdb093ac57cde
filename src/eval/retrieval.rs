//! Retrieval on held-out image–caption pairs of the user's own data: WebDataset shards
//! (`KEY.jpg|png|webp` + `KEY.txt`, as training reads them), or a CSV/TSV of image paths
//! and captions (as `data.kind = "csv"` reads it). Recall@1/5/10 both ways,
//! a retrieval counting as a hit when the retrieved item carries the partner's caption
//! (the rule of every mmpipe retrieval score: [`super::recall_at_k`]).

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::zero_shot::{decode_batch, ImageRef};
use crate::data::convert::CsvColumns;
use crate::data::transform::{Crop, ImageTransform};
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::{ClipConfig, TowerInput};

/// What retrieval on a set scored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetrievalScores {
    pub pairs: usize,
    /// `(k, image→text, text→image)` for k = 1, 5, 10; written as the held-out
    /// evaluation's are (`image_to_text_r1`, `text_to_image_r1`, …).
    #[serde(serialize_with = "super::serialize_recall")]
    pub recall: Vec<(usize, f64, f64)>,
    /// Recall@1 of a uniformly random pick, under the same-caption rule.
    pub chance_r1: f64,
}

impl RetrievalScores {
    pub fn summary(&self) -> String {
        let recall: Vec<String> = self
            .recall
            .iter()
            .map(|(k, a, b)| format!("R@{k} {:.1}/{:.1}%", 100.0 * a, 100.0 * b))
            .collect();
        format!(
            "image->text/text->image {} (R@1 chance {:.1}%) on {} pairs",
            recall.join(", "),
            100.0 * self.chance_r1,
            self.pairs
        )
    }
}

/// Held-out pairs of a run's own data, shaped for the model.
pub struct RetrievalSet {
    pub name: String,
    /// Each pair's image and caption.
    pub pairs: Vec<(ImageRef, String)>,
    transform: ImageTransform,
    tokenizer: TextTokenizer,
    context: usize,
}

impl RetrievalSet {
    /// Every sample of `shards` with an image and a caption, in shard order; a sample
    /// missing either, a caption that is not UTF-8, or a shard that cannot be read is an
    /// error naming the shard and the sample.
    pub fn from_shards(name: &str, shards: &[PathBuf], model: &ClipConfig) -> Result<Self> {
        let mut pairs = Vec::new();
        for sample in super::zero_shot::every_sample(shards)? {
            let shard = sample.shard.as_ref();
            let bad = |message: String| Error::File {
                path: shard.clone(),
                message: format!("sample `{}`: {message}", sample.key),
            };
            let image = sample
                .image()
                .cloned()
                .ok_or_else(|| bad("no image member".into()))?;
            let caption = sample
                .caption()
                .ok_or_else(|| bad("no `.txt` caption".into()))?;
            let bytes = sample
                .read(caption)
                .map_err(|e| bad(format!("cannot read its caption: {e}")))?;
            let caption = String::from_utf8(bytes)
                .map_err(|_| bad("its caption is not UTF-8".into()))?
                .trim()
                .to_string();
            pairs.push((
                ImageRef::Member {
                    sample: sample.clone(),
                    member: image,
                },
                caption,
            ));
        }
        Self::new(
            name,
            pairs,
            &shards.first().cloned().unwrap_or_default(),
            model,
        )
    }

    /// Every row of a CSV/TSV (`.tsv`: tab-separated) of image paths (relative to the
    /// file) and captions, in file order; a missing image or a blank caption is an error
    /// naming the file and the line.
    pub fn from_csv(
        name: &str,
        path: &Path,
        columns: &CsvColumns,
        model: &ClipConfig,
    ) -> Result<Self> {
        let pairs = super::zero_shot::csv_rows(path, &columns.image, &columns.caption)?
            .into_iter()
            .map(|(file, caption)| (ImageRef::File(file), caption))
            .collect();
        Self::new(name, pairs, path, model)
    }

    fn new(
        name: &str,
        pairs: Vec<(ImageRef, String)>,
        origin: &Path,
        model: &ClipConfig,
    ) -> Result<Self> {
        if pairs.len() < 2 {
            return Err(Error::File {
                path: origin.to_path_buf(),
                message: format!("{} image–caption pairs: retrieval needs two", pairs.len()),
            });
        }
        Ok(RetrievalSet {
            name: name.to_string(),
            pairs,
            transform: ImageTransform::clip(model.image_size(), Crop::Centre),
            tokenizer: crate::data::tokenizer::caption_tokenizer(model)?,
            context: model.context_length(),
        })
    }

    pub fn captions(&self) -> Vec<String> {
        self.pairs.iter().map(|(_, c)| c.clone()).collect()
    }

    /// Images `range` as the image tower's input, decoded in parallel.
    pub fn image_input(&self, range: std::ops::Range<usize>) -> Result<TowerInput> {
        let refs: Vec<&ImageRef> = self.pairs[range].iter().map(|(image, _)| image).collect();
        Ok(TowerInput::Images(decode_batch(&refs, &self.transform)?))
    }

    /// Captions `range` as the text tower's input.
    pub fn text_input(&self, range: std::ops::Range<usize>) -> Result<TowerInput> {
        let captions: Vec<&str> = self.pairs[range].iter().map(|(_, c)| c.as_str()).collect();
        self.tokenizer
            .caption_input(&captions, self.context, &candle_core::Device::Cpu)
    }

    /// Scores normalised features of every pair (`[n, D]` each, in pair order).
    pub fn score(&self, image: &Tensor, text: &Tensor) -> Result<RetrievalScores> {
        let scores = super::score(image, text, &self.captions(), None)?;
        Ok(RetrievalScores {
            pairs: scores.pairs,
            recall: scores.recall,
            chance_r1: scores.chance,
        })
    }
}
