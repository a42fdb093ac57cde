//! CLIP's modified ResNet: trainable (every parameter, finite differences), real size.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use mmpipe::model::{ClipConfig, Encoder, ParamBuilder, TowerInput};
use mmpipe::topology::Tower;

use super::common::{check_against_finite_differences, values, FdTolerance};

const TINY: &str = r#"
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
        var.set(&Tensor::randn(0f64, 1.0, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let images = Tensor::randn(0f64, 1.0, (3, 3, 32, 32), &Device::Cpu).unwrap();
    let target = Tensor::randn(0f64, 1.0, (3, 6), &Device::Cpu).unwrap();
    let loss = || {
        (net.forward(&images, true).unwrap() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
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
