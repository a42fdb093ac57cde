//! Retrieval on held-out pairs. Items often share a caption (the synthetic set repeats
//! them), so a retrieval counts as a hit when the retrieved item carries the same caption
//! as the true partner; chance is computed under the same rule.

pub mod distributed;
pub mod retrieval;
pub mod zero_shot;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::data::fashion_mnist::{FashionMnist, Split, CLASSES, SIDE};
use crate::data::HeldOut;
use crate::error::{Error, Result};
use crate::model::layers::l2_normalize;
use crate::model::{ClipConfig, TowerInput};
use crate::topology::Tower;

/// Recall@k both ways at each `k`: a query hits when an item carrying its partner's
/// caption ranks among the `k` most similar. Returns `(k, image→text, text→image)`.
/// Similarities are computed a block of queries at a time, so 10,000 pairs stay small.
pub fn recall_at_k(
    image: &Tensor,
    text: &Tensor,
    captions: &[String],
    ks: &[usize],
) -> Result<Vec<(usize, f64, f64)>> {
    const BLOCK: usize = 512;
    let n = captions.len();
    // Captions as small ids: equal captions, equal ids.
    let mut ids = std::collections::HashMap::new();
    let caption_id: Vec<usize> = captions
        .iter()
        .map(|c| {
            let next = ids.len();
            *ids.entry(c.as_str()).or_insert(next)
        })
        .collect();
    // The rank of each query's best correct candidate: how many candidates score higher.
    let ranks = |queries: &Tensor, candidates: &Tensor| -> Result<Vec<usize>> {
        let mut out = Vec::with_capacity(n);
        for start in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - start);
            let sim: Vec<Vec<f32>> = queries
                .narrow(0, start, len)?
                .matmul(&candidates.t()?)?
                .to_dtype(DType::F32)?
                .to_vec2()?;
            for (row, q) in sim.iter().zip(start..) {
                let best_correct = row
                    .iter()
                    .zip(&caption_id)
                    .filter(|(_, &c)| c == caption_id[q])
                    .map(|(&s, _)| s)
                    .fold(f32::NEG_INFINITY, f32::max);
                out.push(row.iter().filter(|&&s| s > best_correct).count());
            }
        }
        Ok(out)
    };
    let i2t = ranks(image, text)?;
    let t2i = ranks(text, image)?;
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
    Ok(accuracy(&best, labels))
}

/// The fraction of `predicted` classes that equal `labels`.
fn accuracy(predicted: &[u32], labels: &[usize]) -> f64 {
    predicted
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p as usize == **l)
        .count() as f64
        / labels.len().max(1) as f64
}

/// What an evaluation measured: retrieval both ways on held-out pairs, and zero-shot
/// accuracy where the pairs carry class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalScores {
    pub pairs: usize,
    /// `(k, image→text, text→image)` for k = 1, 5, 10.
    pub recall: Vec<(usize, f64, f64)>,
    /// Recall@1 of a uniformly random pick, under the same-caption rule.
    pub chance: f64,
    /// Zero-shot classification accuracy over class names × prompt templates.
    pub zero_shot: Option<f64>,
    /// The named sets (`[[eval.sets]]`), each scored.
    pub sets: Vec<(String, SetScores)>,
}

/// A named evaluation set of a run (`[[eval.sets]]`).
pub enum EvalSet {
    ZeroShot(zero_shot::ZeroShotSet),
    Retrieval(retrieval::RetrievalSet),
}

impl EvalSet {
    pub fn name(&self) -> &str {
        match self {
            EvalSet::ZeroShot(s) => &s.name,
            EvalSet::Retrieval(s) => &s.name,
        }
    }
}

/// What a named set scored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum SetScores {
    ZeroShot(zero_shot::ZeroShotScores),
    Retrieval(retrieval::RetrievalScores),
}

impl SetScores {
    pub fn summary(&self) -> String {
        match self {
            SetScores::ZeroShot(s) => format!("zero-shot {}", s.summary()),
            SetScores::Retrieval(s) => format!("retrieval {}", s.summary()),
        }
    }
}

impl EvalScores {
    /// Recall@1 image→text and text→image.
    pub fn recall_at_1(&self) -> (f64, f64) {
        self.recall
            .iter()
            .find(|r| r.0 == 1)
            .map_or((f64::NAN, f64::NAN), |r| (r.1, r.2))
    }

    /// One line for logs and the progress bar.
    pub fn summary(&self) -> String {
        let recall: Vec<String> = self
            .recall
            .iter()
            .map(|(k, a, b)| format!("R@{k} {:.1}/{:.1}%", 100.0 * a, 100.0 * b))
            .collect();
        let zero_shot = self
            .zero_shot
            .map_or(String::new(), |z| format!("zero-shot {:.1}%, ", 100.0 * z));
        let mut parts = Vec::new();
        if self.pairs > 0 {
            parts.push(format!(
                "{zero_shot}image->text/text->image {} (R@1 chance {:.1}%) on {} pairs",
                recall.join(", "),
                100.0 * self.chance,
                self.pairs
            ));
        }
        for (name, s) in &self.sets {
            parts.push(format!("{name}: {}", s.summary()));
        }
        parts.join("; ")
    }

    /// Only named sets, no held-out pairs.
    pub fn sets_only(sets: Vec<(String, SetScores)>) -> Self {
        EvalScores {
            pairs: 0,
            recall: Vec::new(),
            chance: f64::NAN,
            zero_shot: None,
            sets,
        }
    }
}

/// Scores normalised features: `image[i]`, `text[i]` and `captions[i]` are pair `i`;
/// `classes` (`[C, D]` class features and each pair's label) adds zero-shot accuracy.
pub fn score(
    image: &Tensor,
    text: &Tensor,
    captions: &[String],
    classes: Option<(&Tensor, &[usize])>,
) -> Result<EvalScores> {
    Ok(EvalScores {
        pairs: captions.len(),
        recall: recall_at_k(image, text, captions, &[1, 5, 10])?,
        chance: same_caption_chance(captions),
        zero_shot: classes
            .map(|(c, labels)| zero_shot_accuracy(image, c, labels))
            .transpose()?,
        sets: Vec::new(),
    })
}

/// Expected recall@1 of a uniformly random pick when any item with the partner's caption
/// counts.
fn same_caption_chance(captions: &[String]) -> f64 {
    let n = captions.len() as f64;
    let mut counts = std::collections::HashMap::new();
    for c in captions {
        *counts.entry(c.as_str()).or_insert(0usize) += 1;
    }
    counts.values().map(|&k| (k * k) as f64 / n).sum::<f64>() / n
}

/// The linear probe: multinomial logistic regression fitted on `train` features
/// (standardised with the training statistics, a little L2), then scored on `test`.
/// Full-batch Adam with the gradient written out: `X^T (softmax(XW + b) - Y) / n`.
pub fn linear_probe(
    train: &Tensor,
    train_labels: &[usize],
    test: &Tensor,
    test_labels: &[usize],
    classes: usize,
) -> Result<f64> {
    const STEPS: usize = 500;
    const LR: f64 = 0.05;
    const L2: f64 = 1e-4;
    let train = train.to_dtype(DType::F32)?;
    let test = test.to_dtype(DType::F32)?;
    let (n, d) = train.dims2()?;
    let mean = train.mean_keepdim(0)?;
    let std = (train.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    let standardise = |x: &Tensor| x.broadcast_sub(&mean)?.broadcast_div(&std);
    let (x, x_test) = (standardise(&train)?, standardise(&test)?);
    let mut one_hot = vec![0f32; n * classes];
    for (i, &l) in train_labels.iter().enumerate() {
        one_hot[i * classes + l] = 1.0;
    }
    let y = Tensor::from_vec(one_hot, (n, classes), &Device::Cpu)?;
    let mut w = Tensor::zeros((d, classes), DType::F32, &Device::Cpu)?;
    let mut b = Tensor::zeros((1, classes), DType::F32, &Device::Cpu)?;
    let (mut mw, mut vw) = (w.zeros_like()?, w.zeros_like()?);
    let (mut mb, mut vb) = (b.zeros_like()?, b.zeros_like()?);
    let xt = x.t()?.contiguous()?;
    let (beta1, beta2) = (0.9f64, 0.999f64);
    for t in 1..=STEPS as i32 {
        let p = candle_nn::ops::softmax(&x.matmul(&w)?.broadcast_add(&b)?, 1)?;
        let g = ((p - &y)? / n as f64)?;
        let gw = (xt.matmul(&g)? + (&w * L2)?)?;
        let gb = g.sum_keepdim(0)?;
        let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let adam = |param: &Tensor, grad: &Tensor, m: &mut Tensor, v: &mut Tensor| {
            *m = ((&*m * beta1)? + (grad * (1.0 - beta1))?)?;
            *v = ((&*v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let step = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + 1e-8)?)?;
            param - (step * LR)?
        };
        w = adam(&w, &gw, &mut mw, &mut vw)?;
        b = adam(&b, &gb, &mut mb, &mut vb)?;
    }
    let predicted: Vec<u32> = x_test.matmul(&w)?.broadcast_add(&b)?.argmax(1)?.to_vec1()?;
    Ok(accuracy(&predicted, test_labels))
}

/// Linear-probe accuracies on Fashion-MNIST's test images: on the image tower's features,
/// and on the raw pixels (the supervised baseline a representation should beat).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeScores {
    pub train_images: usize,
    pub features: f64,
    pub pixels: f64,
}

/// `tower`'s normalised features of `x`, detached: the parameters are variables, and a
/// kept output would keep its whole forward graph (every activation) alive.
fn encode_detached(tower: &crate::model::Encoder, x: &TowerInput) -> Result<Tensor> {
    Ok(l2_normalize(&tower.forward_eval(x)?.detach())?.detach())
}

/// Recall@k both ways as named numbers: `image_to_text_r1`, `text_to_image_r1`, … (what
/// the metrics file, TensorBoard's tags and `mmpipe eval --format json` show).
pub fn recall_json(recall: &[(usize, f64, f64)]) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for (k, i2t, t2i) in recall {
        out.insert(format!("image_to_text_r{k}"), serde_json::json!(i2t));
        out.insert(format!("text_to_image_r{k}"), serde_json::json!(t2i));
    }
    out
}

fn serialize_recall<S: serde::Serializer>(
    recall: &[(usize, f64, f64)],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&recall_json(recall), s)
}

/// Tensors of a whole-model state_dict that are not the towers' (the loss's scalars, and
/// OpenCLIP's causal mask where a save kept it).
const NOT_TOWER_TENSORS: [&str; 3] = ["logit_scale", "logit_bias", "attn_mask"];

/// Both towers on the CPU with a checkpoint loaded: a training checkpoint folder's parts
/// (parameters, and the image tower's batch-norm statistics), or one safetensors file
/// holding both towers under OpenCLIP's names (an OpenCLIP `state_dict`, or mmpipe's
/// export). A tensor of that file that no parameter takes is an error naming it: it
/// means the model config does not match the weights.
fn load_towers(
    checkpoint: &Path,
    model: &ClipConfig,
) -> Result<(crate::model::Encoder, crate::model::Encoder)> {
    use crate::model::{checkpoint as ckpt, cpu_builder, Encoder};

    // Each tower's parameters are what building it registered.
    let pb = cpu_builder(0);
    let image_tower = Encoder::new(&pb, model, Tower::Image)?;
    let image_params = pb.params();
    let text_tower = Encoder::new(&pb, model, Tower::Text)?;
    let text_params = pb.params().without(&image_params);
    if checkpoint.is_file() {
        let tensors = ckpt::read_state_dict(checkpoint)?;
        let buffers = image_tower.load_buffers(&tensors)?;
        let report = ckpt::load_tensors(&pb.params(), tensors, checkpoint)?;
        let stray: Vec<&String> = report
            .unused
            .iter()
            .filter(|name| !NOT_TOWER_TENSORS.contains(&name.as_str()))
            .filter(|name| !(buffers > 0 && ckpt::is_norm_statistic(name)))
            .collect();
        if !stray.is_empty() {
            return Err(Error::File {
                path: checkpoint.to_path_buf(),
                message: format!(
                    "{} tensor(s) that the model config has no parameter for ({}): the \
                     config does not match these weights",
                    stray.len(),
                    stray
                        .iter()
                        .take(5)
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        return Ok((image_tower, text_tower));
    }
    let image_part = checkpoint.join(ckpt::part_file(Tower::Image));
    ckpt::load(&image_params, &image_part)?;
    image_tower.load_buffers(&ckpt::read_tensors(&image_part)?)?;
    ckpt::load(&text_params, &checkpoint.join(ckpt::part_file(Tower::Text)))?;
    Ok((image_tower, text_tower))
}

/// Runs `encode` on `0..n` in chunks of 256, with a progress bar (images/s) when
/// `progress`; returns the items per second.
fn in_chunks(
    n: usize,
    progress: bool,
    mut encode: impl FnMut(std::ops::Range<usize>) -> Result<()>,
) -> Result<f64> {
    const CHUNK: usize = 256;
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}<{eta_precise}] {wide_bar} {pos}/{len} images · {per_sec}",
            )
            .expect("valid template"),
        );
        bar
    });
    let started = std::time::Instant::now();
    for start in (0..n).step_by(CHUNK) {
        let range = start..(start + CHUNK).min(n);
        let len = range.len();
        encode(range)?;
        if let Some(bar) = &bar {
            bar.inc(len as u64);
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A checkpoint's zero-shot classification of a labelled image set (`set`'s classes
/// prompted with `templates`), on the CPU; with `progress`, a bar with images/s. Returns
/// the scores and the images/s of decoding and encoding them.
pub fn zero_shot_checkpoint(
    checkpoint: &Path,
    model: &ClipConfig,
    set: &zero_shot::ZeroShotSet,
    progress: bool,
) -> Result<(zero_shot::ZeroShotScores, f64)> {
    let (image_tower, text_tower) = load_towers(checkpoint, model)?;
    let encode_text = |prompts: &[String]| encode_detached(&text_tower, &set.text_input(prompts)?);
    let classes = zero_shot::class_features(&set.images.classes, &set.templates, &encode_text)?;
    let mut features = Vec::new();
    let rate = in_chunks(set.images.images.len(), progress, |range| {
        features.push(encode_detached(&image_tower, &set.image_input(range)?)?);
        Ok(())
    })?;
    let labels = set.images.labels();
    let scores = zero_shot::zero_shot_scores(&Tensor::cat(&features, 0)?, &classes, &labels)?;
    Ok((scores, rate))
}

/// A checkpoint's retrieval on held-out pairs of the user's data, on the CPU: recall@k
/// both ways; with `progress`, a bar with pairs/s. Returns the scores and the pairs/s of
/// decoding and encoding them.
pub fn retrieval_checkpoint(
    checkpoint: &Path,
    model: &ClipConfig,
    set: &retrieval::RetrievalSet,
    progress: bool,
) -> Result<(retrieval::RetrievalScores, f64)> {
    let (image_tower, text_tower) = load_towers(checkpoint, model)?;
    let (mut image, mut text) = (Vec::new(), Vec::new());
    let rate = in_chunks(set.pairs.len(), progress, |range| {
        image.push(encode_detached(
            &image_tower,
            &set.image_input(range.clone())?,
        )?);
        text.push(encode_detached(&text_tower, &set.text_input(range)?)?);
        Ok(())
    })?;
    let scores = set.score(&Tensor::cat(&image, 0)?, &Tensor::cat(&text, 0)?)?;
    Ok((scores, rate))
}

/// Loads a training checkpoint's parts into both towers on the CPU and evaluates them on
/// the first `images` of Fashion-MNIST's test split (from `dir`); with `probe`, also fits
/// linear probes on that many training images.
pub fn evaluate_checkpoint(
    checkpoint: &Path,
    model: &ClipConfig,
    dir: &Path,
    images: usize,
    probe: Option<usize>,
) -> Result<(EvalScores, Option<ProbeScores>)> {
    let (image_tower, text_tower) = load_towers(checkpoint, model)?;
    let held_out = HeldOut::fashion_mnist(dir, model)?;
    let n = images.min(held_out.pairs().unwrap_or(images)).max(1);
    let encode_image = |x: &TowerInput| encode_detached(&image_tower, x);
    let encode_text = |x: &TowerInput| encode_detached(&text_tower, x);
    let encode_all = |tower: Tower, encode: &dyn Fn(&TowerInput) -> Result<Tensor>| {
        let mut parts = Vec::new();
        for start in (0..n as u64).step_by(256) {
            let indices: Vec<u64> = (start..(start + 256).min(n as u64)).collect();
            parts.push(encode(&held_out.tower_input(tower, &indices)?)?);
        }
        Ok::<_, Error>(Tensor::cat(&parts, 0)?)
    };
    let image = encode_all(Tower::Image, &encode_image)?;
    let text = encode_all(Tower::Text, &encode_text)?;
    let classes = held_out
        .class_features(&encode_text)?
        .expect("Fashion-MNIST has classes");
    let labels = held_out.labels(n).expect("Fashion-MNIST has labels");
    let captions: Vec<String> = (0..n as u64).map(|i| held_out.caption(i)).collect();
    let scores = score(&image, &text, &captions, Some((&classes, &labels)))?;
    let probe = match (probe, &held_out) {
        (Some(train_images), HeldOut::FashionMnist { set, transform, .. }) => {
            let train_set = FashionMnist::load(dir, Split::Train)?;
            let m = train_images.min(train_set.len()).max(classes.dim(0)?);
            let side = transform.size;
            let mut features = Vec::new();
            for start in (0..m).step_by(256) {
                let len = 256.min(m - start);
                let mut pixels = Vec::with_capacity(len * 3 * side * side);
                for i in start..start + len {
                    pixels.extend(
                        transform
                            .apply_rgb(SIDE as u32, SIDE as u32, train_set.rgb(i), 0)
                            .map_err(Error::Msg)?,
                    );
                }
                let x = Tensor::from_vec(pixels, (len, 3, side, side), &Device::Cpu)?;
                features.push(encode_image(&TowerInput::Images(x))?);
            }
            let train_labels: Vec<usize> = (0..m).map(|i| train_set.label(i)).collect();
            let grey = |set: &FashionMnist, count: usize| -> Result<Tensor> {
                let values: Vec<f32> = (0..count)
                    .flat_map(|i| {
                        set.rgb(i)
                            .into_iter()
                            .step_by(3)
                            .map(|g| f32::from(g) / 255.0)
                    })
                    .collect();
                Ok(Tensor::from_vec(
                    values,
                    (count, SIDE * SIDE),
                    &Device::Cpu,
                )?)
            };
            let c = CLASSES.len();
            Some(ProbeScores {
                train_images: m,
                features: linear_probe(
                    &Tensor::cat(&features, 0)?,
                    &train_labels,
                    &image,
                    &labels,
                    c,
                )?,
                pixels: linear_probe(
                    &grey(&train_set, m)?,
                    &train_labels,
                    &grey(set, n)?,
                    &labels,
                    c,
                )?,
            })
        }
        _ => None,
    };
    Ok((scores, probe))
}
