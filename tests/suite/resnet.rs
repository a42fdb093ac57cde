//! CLIP's modified ResNet: trainable (every parameter, finite differences), real size.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mmpipe::model::{ClipConfig, Encoder, ParamBuilder, TowerInput};
use mmpipe::topology::Tower;

use super::common::{
    check_against_finite_differences, fixed_values, squared_error, values, worst_violation,
    FdTolerance, Relative,
};

/// A ResNet CLIP small enough for finite differences (also used by `gradients.rs`).
pub const TINY: &str = r#"
embed_dim = 6
[vision]
kind = "resnet"
image_size = 32
layers = [1, 2, 1, 1]
width = 8
heads = 2
[text]
kind = "clip"
vocab_size = 40
context_length = 8
width = 8
layers = 1
heads = 2
"#;

#[test]
fn every_resnet_parameter_gets_its_finite_difference_gradient() {
    let cfg = ClipConfig::from_str(TINY, Path::new("rn-tiny.toml")).unwrap();
    let pb = ParamBuilder::new(2, DType::F64, &Device::Cpu);
    let Encoder::ResNet(net) = Encoder::new(&pb, &cfg, Tower::Image).unwrap() else {
        panic!("a ResNet")
    };
    let params = pb.params();
    assert_eq!(params.num_elements(), cfg.vision.size().num_params(6));
    // OpenCLIP starts every block's last norm at zero (blocks are identities, and their
    // convolutions get no gradient on the first step); move them off zero, as any step does.
    for (name, var) in params
        .iter()
        .filter(|(n, _)| n.contains(".layer") && n.ends_with("bn3.weight"))
    {
        assert!(
            values(var.as_tensor()).iter().all(|v| *v == 0.0),
            "{name} starts at zero"
        );
        var.set(&fixed_values(var.dims(), 2.0)).unwrap();
    }
    let images = fixed_values(&[3, 3, 32, 32], 0.0);
    let target = fixed_values(&[3, 6], 1.0);
    let loss = || squared_error(net.forward(&images, true).unwrap(), &target);
    let grads = params.grads(&loss().backward().unwrap()).unwrap();
    // A ReLU input within ±step of zero would break a finite difference; none is, at this seed.
    check_against_finite_differences(
        &params,
        &grads,
        || values(&loss())[0],
        FdTolerance {
            step: 1e-6,
            abs: 1e-6,
            rel: 1e-4,
        },
    );
}

#[test]
fn rn50_builds_at_its_real_size_with_openclips_names() {
    let cfg = ClipConfig::from_file(Path::new("configs/RN50.toml")).unwrap();
    let pb = mmpipe::model::cpu_builder(0);
    let encoder = Encoder::new(&pb, &cfg, Tower::Image).unwrap();
    let params = pb.params();
    assert_eq!(params.num_elements(), 38_316_896);
    for name in [
        "visual.conv1.weight",
        "visual.bn3.bias",
        "visual.layer1.0.downsample.0.weight",
        "visual.layer4.2.conv3.weight",
        "visual.attnpool.positional_embedding",
        "visual.attnpool.c_proj.weight",
    ] {
        assert!(params.get(name).is_some(), "missing {name}");
    }
    let out = encoder
        .forward(&TowerInput::Images(
            Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap(),
        ))
        .unwrap();
    assert_eq!(out.dims(), &[1, 1024]);
}

#[test]
fn batch_norm_statistics_travel_with_the_checkpoint() {
    use mmpipe::model::checkpoint;
    let cfg = ClipConfig::from_str(TINY, Path::new("rn-tiny.toml")).unwrap();
    let build = |seed| {
        let pb = ParamBuilder::new(seed, DType::F32, &Device::Cpu);
        let e = Encoder::new(&pb, &cfg, Tower::Image).unwrap();
        (e, pb.params())
    };
    let (trained, params) = build(1);
    let images = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    trained.forward(&TowerInput::Images(images)).unwrap();
    let path = std::env::temp_dir().join(format!("mmpipe-rn-{}.safetensors", std::process::id()));
    checkpoint::save_with_buffers(&params, &trained.buffers().unwrap(), &path).unwrap();
    let tensors = checkpoint::read_tensors(&path).unwrap();
    assert!(tensors.contains_key("visual.layer2.0.downsample.1.running_var"));
    assert_eq!(
        tensors["visual.bn1.num_batches_tracked"]
            .to_scalar::<i64>()
            .unwrap(),
        1
    );

    let (fresh, fresh_params) = build(2);
    checkpoint::load(&fresh_params, &path).unwrap();
    assert!(fresh.load_buffers(&tensors).unwrap() > 0);
    for ((n, a), (_, b)) in trained
        .buffers()
        .unwrap()
        .iter()
        .zip(fresh.buffers().unwrap().iter())
    {
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        assert_eq!(values(&a), values(&b), "{n}");
    }
}

/// A step's loss and its gradients by name: from every rank of the split, and from one device.
type SplitStep = (f64, Vec<(String, Tensor)>);
type SingleStep = (f64, std::collections::BTreeMap<String, Tensor>);

/// Loss and gradients (by name) of one step on 2 image ranks + 1 text rank, and of one
/// device on the whole batch, for the tiny ResNet CLIP with or without synchronised
/// batch norm.
fn split_and_single(sync: bool) -> (SplitStep, SingleStep) {
    split_and_single_on(sync, &super::common::cpu_topology(2, 1))
}

/// [`split_and_single`] on any layout (devices may hold both towers).
fn split_and_single_on(
    sync: bool,
    topology: &mmpipe::topology::Topology,
) -> (SplitStep, SingleStep) {
    use super::common::batch_indices;
    use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
    use mmpipe::data::{Stream, SyntheticSource};
    use mmpipe::loss::clip_loss_reference;
    use mmpipe::model::layers::l2_normalize;
    use mmpipe::train::RankTrainer;

    let body = TINY.replace(
        "heads = 2\n[text]",
        &format!("heads = 2\nsync_batch_norm = {sync}\n[text]"),
    );
    let cfg = ClipConfig::from_str(&body, Path::new("rn-sync.toml")).unwrap();
    assert_eq!(cfg.sync_batch_norm(), sync);
    let train = super::common::train_config(6);
    let source = SyntheticSource::new(train.seed, &cfg).unwrap();

    let pb = ParamBuilder::new(train.seed, DType::F64, &Device::Cpu);
    let (image, text) = mmpipe::model::build_all(&pb, &cfg).unwrap();
    let params = pb.params();
    let (images, texts) = super::common::batch(&source, &batch_indices(0, 6, 0, 6), DType::F64);
    let x = l2_normalize(&image.forward(&images).unwrap()).unwrap();
    let y = l2_normalize(&text.forward(&texts).unwrap()).unwrap();
    let loss = clip_loss_reference(&x, &y, params.get("logit_scale").unwrap().as_tensor()).unwrap();
    let grads = params.grads(&loss.backward().unwrap()).unwrap();
    let single = (
        values(&loss)[0],
        params
            .names()
            .iter()
            .map(|n| n.to_string())
            .zip(grads)
            .collect(),
    );

    let ranks = run_ranks(topology, DEFAULT_TIMEOUT, |rank, comms| {
        let mut t = RankTrainer::new(topology, rank, &cfg, &train, DType::F64, &Device::Cpu)?;
        t.attach(&comms)?;
        let inputs = t
            .towers
            .iter()
            .map(|tower| {
                let indices = batch_indices(0, 6, tower.offset, tower.local_batch);
                source.tower_input(tower.tower, Stream::Train, &indices, &Device::Cpu)
            })
            .collect::<mmpipe::error::Result<Vec<_>>>()?;
        let g = t.compute_grads(&comms, &inputs, None)?;
        let mut named = Vec::new();
        for (tower, grads) in t.towers.iter().zip(g.grads) {
            let names = tower.trainable().names();
            named.extend(names.iter().map(|s| s.to_string()).zip(grads));
        }
        Ok((g.loss, named))
    })
    .unwrap();
    let loss = ranks[0].0;
    let grads = ranks.into_iter().flat_map(|(_, g)| g).collect();
    ((loss, grads), single)
}

/// The distributed step's loss and every gradient equal one device's.
fn assert_exact(((loss, grads), (want_loss, want)): &(SplitStep, SingleStep)) {
    assert!(
        (loss - want_loss).abs() < 1e-10 * want_loss.abs(),
        "loss {loss} vs {want_loss}"
    );
    for (name, g) in grads {
        if let Some((i, a, b)) = worst_violation(g, &want[name], 1e-8, 1e-11, Relative::Element) {
            panic!("{name}[{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn synchronised_batch_norm_makes_the_split_resnet_step_exact() {
    assert_exact(&split_and_single(true));
}

/// The same on two devices each holding both towers: the ResNet replicas' batch norm
/// takes its statistics over the image group, through the rank that also runs text.
#[test]
fn synchronised_batch_norm_is_exact_under_data_parallelism_too() {
    let topology = super::common::cpu_layout(2, "0-1", "0-1");
    let synchronised = split_and_single_on(true, &topology);
    assert_exact(&synchronised);
    let want_loss = synchronised.1 .0;
    let ((loss, _), _) = split_and_single_on(false, &topology);
    assert!(
        (loss - want_loss).abs() > 1e-6 * want_loss.abs(),
        "without synchronisation the statistics are per rank: loss {loss} vs {want_loss}"
    );
}

#[test]
fn without_synchronisation_the_split_resnet_step_differs() {
    // The control for the test above: per-rank statistics change the maths, visibly.
    let ((loss, _), (want_loss, _)) = split_and_single(false);
    assert!(
        (loss - want_loss).abs() > 1e-6 * want_loss.abs(),
        "loss {loss} vs {want_loss}"
    );
}
