use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mmpipe::data::{Stream, SyntheticSource};
use mmpipe::loss::{clip_loss_reference, siglip_loss_reference, LossKind};
use mmpipe::model::layers::l2_normalize;
use mmpipe::model::{
    loss_scalars, ClipConfig, ImageTowerConfig, ParamBuilder, Params, TextTower, TextTowerConfig,
    TowerInput, VisionTower,
};
use mmpipe::topology::{Topology, Tower};
use mmpipe::train::TrainConfig;

/// Small enough for many runs per test, with every kind of layer (two blocks per tower).
pub const TEST_MODEL: &str = include_str!("../fixtures/test-model.toml");

pub fn test_model() -> ClipConfig {
    ClipConfig::from_str(TEST_MODEL, Path::new("tests/fixtures/test-model.toml")).unwrap()
}

/// A CPU topology of `image` + `text` rank threads, through the real parser.
pub fn cpu_topology(image: usize, text: usize) -> Topology {
    let text_toml = format!(
        "device = \"cpu\"\n[[nodes]]\nname = \"host\"\ndevices = {}\n[groups]\nimage = [\"host:0-{}\"]\ntext = [\"host:{}-{}\"]\n",
        image + text,
        image - 1,
        image,
        image + text - 1
    );
    Topology::from_str(&text_toml, Path::new(&format!("cpu-{image}x{text}.toml"))).unwrap()
}

/// `devices` CPU ranks on one host with the groups as listed ("0-2", "1-2"): devices may
/// be in both groups (data parallel, hybrids).
pub fn cpu_layout(devices: usize, image: &str, text: &str) -> Topology {
    let text_toml = format!(
        "device = \"cpu\"\n[[nodes]]\nname = \"host\"\ndevices = {devices}\n[groups]\nimage = [\"host:{image}\"]\ntext = [\"host:{text}\"]\n"
    );
    Topology::from_str(
        &text_toml,
        Path::new(&format!("cpu-{devices}-image{image}-text{text}.toml")),
    )
    .unwrap()
}

pub fn train_config(global_batch: usize) -> TrainConfig {
    TrainConfig {
        seed: 7,
        global_batch,
        steps: 5,
        progress: false,
        eval: mmpipe::train::config::EvalConfig {
            every: 0,
            pairs: 0,
            sets: Vec::new(),
        },
        ..TrainConfig::default()
    }
}

/// Both modalities of samples `indices`.
pub fn batch(source: &SyntheticSource, indices: &[u64], dtype: DType) -> (TowerInput, TowerInput) {
    let dev = Device::Cpu;
    let images = match source
        .tower_input(Tower::Image, Stream::Train, indices, &dev)
        .unwrap()
    {
        TowerInput::Images(t) => TowerInput::Images(t.to_dtype(dtype).unwrap()),
        other => other,
    };
    (
        images,
        source
            .tower_input(Tower::Text, Stream::Train, indices, &dev)
            .unwrap(),
    )
}

/// The whole CLIP on one device, as OpenCLIP writes it: a ViT, CLIP's text transformer and
/// the loss's scalars. The reference every distributed path is checked against (the
/// library trains towers apart, as `Encoder`s).
pub struct Clip {
    pub visual: VisionTower,
    pub text: TextTower,
    pub logit_scale: Tensor,
    /// SigLIP's learnable logit bias.
    pub logit_bias: Option<Tensor>,
}

impl Clip {
    pub fn new(pb: &ParamBuilder, cfg: &ClipConfig) -> Self {
        Self::with_loss_scalars(pb, cfg, mmpipe::model::LOGIT_SCALE_INIT, None)
    }

    /// With the loss's own initial temperature, and a logit bias when `bias_init` is given.
    pub fn with_loss_scalars(
        pb: &ParamBuilder,
        cfg: &ClipConfig,
        scale_init: f64,
        bias_init: Option<f64>,
    ) -> Self {
        let (ImageTowerConfig::Vit(vit), TextTowerConfig::Clip(text)) = (&cfg.vision, &cfg.text)
        else {
            panic!("the single-device reference pairs a ViT with CLIP's text tower")
        };
        let visual = VisionTower::new(&pb.pp("visual"), vit, cfg.embed_dim).unwrap();
        let text = TextTower::new(pb, text, cfg.embed_dim).unwrap();
        let scalars = loss_scalars(pb, scale_init, bias_init).unwrap();
        Clip {
            visual,
            text,
            logit_scale: scalars.scale.as_tensor().clone(),
            logit_bias: scalars.bias.map(|b| b.as_tensor().clone()),
        }
    }
}

/// Samples of step `step` owned by a rank: rows `offset..offset+len` of the global batch.
pub fn batch_indices(step: usize, global_batch: usize, offset: usize, len: usize) -> Vec<u64> {
    let start = (step * global_batch + offset) as u64;
    (start..start + len as u64).collect()
}

/// The samples of step `step` a tower replica owns (its slice of the global batch).
pub fn slice_indices(
    tower: &mmpipe::train::trainer::TowerTrainer,
    step: usize,
    global_batch: usize,
) -> Vec<u64> {
    batch_indices(step, global_batch, tower.offset, tower.local_batch)
}

/// Each of a rank's towers' inputs for step `step` of the synthetic set: what
/// [`mmpipe::train::RankTrainer::step`] takes.
pub fn slice_inputs(
    trainer: &mmpipe::train::RankTrainer,
    source: &mmpipe::data::SyntheticSource,
    step: usize,
    global_batch: usize,
) -> mmpipe::error::Result<Vec<TowerInput>> {
    trainer
        .towers
        .iter()
        .map(|t| {
            source.tower_input(
                t.tower,
                mmpipe::data::Stream::Train,
                &slice_indices(t, step, global_batch),
                &Device::Cpu,
            )
        })
        .collect()
}

/// The step losses a `--metrics` file recorded, in order (evaluation lines left out).
pub fn metric_losses(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval").is_none())
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// The whole model on one device.
pub struct Reference {
    pub model: Clip,
    pub params: Params,
    pub kind: LossKind,
}

impl Reference {
    pub fn new(cfg: &ClipConfig, seed: u64, dtype: DType) -> Self {
        Self::with_loss(cfg, seed, dtype, LossKind::Clip)
    }

    /// With the loss's own initial temperature (and SigLIP's bias).
    pub fn with_loss(cfg: &ClipConfig, seed: u64, dtype: DType, kind: LossKind) -> Self {
        let pb = ParamBuilder::new(seed, dtype, &Device::Cpu);
        let model = Clip::with_loss_scalars(
            &pb,
            cfg,
            kind.initial_logit_scale(),
            kind.initial_logit_bias(),
        );
        Reference {
            model,
            params: pb.params(),
            kind,
        }
    }

    pub fn loss(&self, images: &TowerInput, texts: &TowerInput) -> Tensor {
        let (TowerInput::Images(img), TowerInput::Captions { tokens, eot, .. }) = (images, texts)
        else {
            panic!("inputs of the wrong modality")
        };
        let x = l2_normalize(&self.model.visual.forward(img).unwrap()).unwrap();
        let y = l2_normalize(&self.model.text.forward(tokens, eot).unwrap()).unwrap();
        match (self.kind, &self.model.logit_bias) {
            (LossKind::Siglip, Some(bias)) => {
                siglip_loss_reference(&x, &y, &self.model.logit_scale, bias).unwrap()
            }
            _ => clip_loss_reference(&x, &y, &self.model.logit_scale).unwrap(),
        }
    }

    /// Loss and every parameter's gradient by plain autograd, keyed by name.
    pub fn grads(
        &self,
        images: &TowerInput,
        texts: &TowerInput,
    ) -> (f64, BTreeMap<String, Tensor>) {
        let loss = self.loss(images, texts);
        let store = loss.backward().unwrap();
        let grads = self
            .params
            .names()
            .into_iter()
            .zip(self.params.grads(&store).unwrap())
            .map(|(n, g)| (n.to_string(), g))
            .collect();
        (scalar(&loss), grads)
    }
}

pub fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

pub fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// What a tolerance is relative to.
#[derive(Debug, Clone, Copy)]
pub enum Relative {
    /// Each element's own magnitude (`allclose`).
    Element,
    /// The tensor's largest magnitude: f32 rounding in a sum is relative to the terms
    /// summed, so an element that is small only by cancellation carries the error of the
    /// large ones.
    Tensor,
}

/// Largest violation of `|a − b| ≤ abs + rel·|b|` (or `rel·max|b|`), as (index, a, b);
/// None when all pass.
pub fn worst_violation(
    a: &Tensor,
    b: &Tensor,
    rel: f64,
    abs: f64,
    relative: Relative,
) -> Option<(usize, f64, f64)> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (values(a), values(b));
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    let bound = |y: f64| match relative {
        Relative::Element => abs + rel * y.abs(),
        Relative::Tensor => abs + rel * scale,
    };
    a.iter()
        .zip(&b)
        .enumerate()
        .filter(|(_, (x, y))| (*x - *y).abs() > bound(**y) || !x.is_finite())
        .max_by(|(_, (x1, y1)), (_, (x2, y2))| (*x1 - *y1).abs().total_cmp(&(*x2 - *y2).abs()))
        .map(|(i, (x, y))| (i, *x, *y))
}

/// Tolerance of a finite-difference check: `|fd − g| ≤ abs + rel·|g|`.
pub struct FdTolerance {
    pub step: f64,
    pub abs: f64,
    pub rel: f64,
}

/// For every parameter: its gradient (name order, as `Params::grads`) is not all zero, and
/// central finite differences of `loss` agree with it at the largest entry and at two more
/// spread over the tensor. Returns how many entries were checked.
pub fn check_against_finite_differences(
    params: &Params,
    grads: &[Tensor],
    loss: impl Fn() -> f64,
    tol: FdTolerance,
) -> usize {
    let mut checked = 0;
    for ((name, var), g) in params.iter().zip(grads) {
        let g = values(g);
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{name}: the gradient is all zero"
        );
        let largest = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for idx in [largest, g.len() / 3, (7 * g.len()) / 9] {
            let original = var.as_tensor().copy().unwrap();
            let at = |delta: f64| {
                let mut w = values(&original);
                w[idx] += delta;
                var.set(&Tensor::from_vec(w, original.shape(), original.device()).unwrap())
                    .unwrap();
                loss()
            };
            let fd = (at(tol.step) - at(-tol.step)) / (2.0 * tol.step);
            var.set(&original).unwrap();
            assert!(
                (fd - g[idx]).abs() <= tol.abs + tol.rel * g[idx].abs(),
                "{name}[{idx}]: autograd {} vs finite difference {fd}",
                g[idx]
            );
            checked += 1;
        }
    }
    checked
}

/// A deterministic tensor of values in [-1, 1] (candle's CPU RNG cannot be seeded, and a
/// finite-difference check must not depend on the draw).
pub fn fixed_values(shape: &[usize], phase: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| ((i as f64 + 1.0) * 0.7311 + phase).sin())
        .collect();
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}

/// `Σ (prediction − target)²`: the loss the tower-level gradient tests differentiate.
pub fn squared_error(prediction: Tensor, target: &Tensor) -> Tensor {
    (prediction - target)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
}

/// The step an interrupted `mmpipe train` reports stopping after ("stopped after step N;").
pub fn stopped_after_step(stdout: &str) -> usize {
    stdout
        .split("stopped after step ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stop message:\n{stdout}"))
}

/// The first rank's pipeline for image batches of `len` from `tests/fixtures/real-photos.tar`,
/// normalised where `normalise_on` says for a rank on `device`, moved by `upload`.
pub fn photo_pipeline(
    normalise_on: mmpipe::data::NormaliseOn,
    device: &Device,
    len: usize,
    upload: Option<mmpipe::data::pipeline::Upload>,
) -> mmpipe::data::pipeline::RankData {
    use mmpipe::data::source::{RankSlice, Source};
    use mmpipe::data::{DataConfig, DataKind};
    let model = ClipConfig::from_file(Path::new("configs/clip-tiny-bpe.toml")).unwrap();
    let data = DataConfig {
        kind: DataKind::Webdataset,
        shards: vec!["tests/fixtures/real-photos.tar".into()],
        base_dir: ".".into(),
        normalise_on,
        ..DataConfig::default()
    };
    let slice = RankSlice {
        tower: Tower::Image,
        offset: 0,
        len,
        global_batch: len,
        start_step: 0,
    };
    Source::new(&data, &model, 0, 0, None)
        .unwrap()
        .rank_pipeline_onto(slice, false, device, upload)
}
