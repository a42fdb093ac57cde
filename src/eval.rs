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

/// Recall@k both ways at each `k`: a query hits when an item carrying its partner's
/// caption ranks among the `k` most similar. Returns `(k, image→text, text→image)`.
pub fn recall_at_k(
    image: &Tensor,
    text: &Tensor,
    captions: &[String],
    ks: &[usize],
) -> Result<Vec<(usize, f64, f64)>> {
    let n = captions.len();
    let sim: Vec<Vec<f32>> = image.matmul(&text.t()?)?.to_dtype(DType::F32)?.to_vec2()?;
    // The rank of the best correct item for query q over candidates c(q, j).
    let rank = |score: &dyn Fn(usize) -> f32, q: usize| {
        let best_correct = (0..n)
            .filter(|&j| captions[j] == captions[q])
            .map(score)
            .fold(f32::NEG_INFINITY, f32::max);
        (0..n).filter(|&j| score(j) > best_correct).count()
    };
    let i2t: Vec<usize> = (0..n).map(|q| rank(&|j| sim[q][j], q)).collect();
    let t2i: Vec<usize> = (0..n).map(|q| rank(&|j| sim[j][q], q)).collect();
    let share =
        |ranks: &[usize], k: usize| ranks.iter().filter(|&&r| r < k).count() as f64 / n as f64;
    Ok(ks
        .iter()
        .map(|&k| (k, share(&i2t, k), share(&t2i, k)))
        .collect())
}

/// Zero-shot classification accuracy: each image gets the class whose (prompt-averaged,
/// normalised) text feature is most similar. `image` `[n, D]`, `classes` `[C, D]`.
pub fn zero_shot_accuracy(image: &Tensor, classes: &Tensor, labels: &[usize]) -> Result<f64> {
    let best: Vec<u32> = image
        .matmul(&classes.t()?)?
        .to_dtype(DType::F32)?
        .argmax(1)?
        .to_vec1()?;
    Ok(best
        .iter()
        .zip(labels)
        .filter(|(b, l)| **b as usize == **l)
        .count() as f64
        / labels.len().max(1) as f64)
}

/// What `mmpipe eval` reports.
#[derive(Debug, Clone)]
pub struct CheckpointEval {
    pub images: usize,
    /// Fashion-MNIST zero-shot accuracy over the class names × prompt templates.
    pub zero_shot: f64,
    /// `(k, image→text, text→image)` on image–caption pairs (first template).
    pub recall: Vec<(usize, f64, f64)>,
    /// Recall@1 chance under the same-caption rule.
    pub chance: f64,
}

/// Loads a training checkpoint's parts into both towers on the CPU and evaluates them on
/// the first `images` of Fashion-MNIST's test split.
pub fn evaluate_checkpoint(
    checkpoint: &std::path::Path,
    model: &crate::model::ClipConfig,
    images: usize,
) -> Result<CheckpointEval> {
    use crate::data::fashion_mnist::{FashionMnist, Split, CLASSES, DEBIAN_DIR, SIDE, TEMPLATES};
    use crate::data::transform::{Crop, ImageTransform};
    use crate::model::layers::l2_normalize;
    use crate::model::{build_all, checkpoint as ckpt, cpu_builder, TowerInput};
    use candle_core::Device;

    let pb = cpu_builder(0);
    let (image_tower, text_tower) = build_all(&pb, model)?;
    let params = pb.params();
    let image_params = params.filter(|n| n.starts_with("visual."));
    let text_params = params.filter(|n| !n.starts_with("visual.") && !n.starts_with("logit_"));
    let image_part = checkpoint.join("image.safetensors");
    ckpt::load(&image_params, &image_part)?;
    image_tower.load_buffers(&ckpt::read_tensors(&image_part)?)?;
    ckpt::load(&text_params, &checkpoint.join("text.safetensors"))?;

    let set = FashionMnist::load(std::path::Path::new(DEBIAN_DIR), Split::Test)?;
    let n = images.min(set.len()).max(1);
    let t = ImageTransform::clip(model.image_size(), Crop::Centre);
    let side = model.image_size();
    let mut image_features = Vec::new();
    for start in (0..n).step_by(256) {
        let len = 256.min(n - start);
        let mut pixels = Vec::with_capacity(len * 3 * side * side);
        for i in start..start + len {
            pixels.extend(
                t.apply_rgb(SIDE as u32, SIDE as u32, set.rgb(i), 0)
                    .map_err(crate::error::Error::Msg)?,
            );
        }
        let x = Tensor::from_vec(pixels, (len, 3, side, side), &Device::Cpu)?;
        image_features.push(l2_normalize(
            &image_tower.forward_eval(&TowerInput::Images(x))?,
        )?);
    }
    let image_features = Tensor::cat(&image_features, 0)?;

    let tokenizer = crate::train::caption_tokenizer(model)?;
    let context = model.context_length();
    let encode = |texts: &[String]| -> Result<Tensor> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let tok = tokenizer.encode_batch(&refs, context)?;
        let m = texts.len();
        let input = TowerInput::Captions {
            tokens: Tensor::from_vec(tok.ids, (m, context), &Device::Cpu)?,
            mask: Tensor::from_vec(tok.mask, (m, context), &Device::Cpu)?,
            eot: Tensor::from_vec(tok.eot, m, &Device::Cpu)?,
        };
        l2_normalize(&text_tower.forward_eval(&input)?)
    };
    // Each class: its prompts' features averaged, then normalised.
    let mut classes = Vec::new();
    for class in CLASSES {
        let prompts: Vec<String> = TEMPLATES.iter().map(|t| t.replace("{}", class)).collect();
        classes.push(encode(&prompts)?.mean_keepdim(0)?);
    }
    let classes = l2_normalize(&Tensor::cat(&classes, 0)?)?;
    let labels: Vec<usize> = (0..n).map(|i| set.label(i)).collect();
    let zero_shot = zero_shot_accuracy(&image_features, &classes, &labels)?;

    let captions: Vec<String> = (0..n).map(|i| set.caption(i, 0)).collect();
    let mut text_features = Vec::new();
    for chunk in captions.chunks(256) {
        text_features.push(encode(chunk)?);
    }
    let text_features = Tensor::cat(&text_features, 0)?;
    let recall = recall_at_k(&image_features, &text_features, &captions, &[1, 5, 10])?;
    let chance = recall_at_1(&image_features, &text_features, &captions)?.chance;
    Ok(CheckpointEval {
        images: n,
        zero_shot,
        recall,
        chance,
    })
}
