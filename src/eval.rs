//! Retrieval on held-out pairs. Items often share a caption (the synthetic set repeats
//! them), so a retrieval counts as a hit when the retrieved item carries the same caption
//! as the true partner; chance is computed under the same rule.

use candle_core::{DType, Tensor};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retrieval {
    pub pairs: usize,
    pub image_to_text_r1: f64,
    pub text_to_image_r1: f64,
    /// Expected recall@1 of a uniformly random pick, under the same-caption rule.
    pub chance: f64,
}

/// Recall@1 both ways for normalised `image` and `text` features `[n, D]`, pair `i` being
/// (`image[i]`, `text[i]`), with `captions[i]` the caption of pair `i`.
pub fn recall_at_1(image: &Tensor, text: &Tensor, captions: &[String]) -> Result<Retrieval> {
    let n = captions.len();
    let sim = image.matmul(&text.t()?)?.to_dtype(DType::F32)?;
    let i2t: Vec<u32> = sim.argmax(1)?.to_vec1()?;
    let t2i: Vec<u32> = sim.argmax(0)?.to_vec1()?;
    let hits = |best: &[u32]| {
        best.iter()
            .enumerate()
            .filter(|(q, &r)| captions[*q] == captions[r as usize])
            .count() as f64
            / n as f64
    };
    let chance = captions
        .iter()
        .map(|c| captions.iter().filter(|d| *d == c).count() as f64 / n as f64)
        .sum::<f64>()
        / n as f64;
    Ok(Retrieval {
        pairs: n,
        image_to_text_r1: hits(&i2t),
        text_to_image_r1: hits(&t2i),
        chance,
    })
}
