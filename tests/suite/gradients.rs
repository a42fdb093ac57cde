//! The single-device reference is only a reference if its autograd is right: candle's fused
//! ops drop gradients silently. Central finite differences in f64 check every parameter.

use candle_core::{DType, Tensor};
use mmpipe::data::SyntheticSource;

use super::common::{
    batch, check_against_finite_differences, scalar, squared_error, test_model, values,
    worst_violation, FdTolerance, Reference, Relative,
};

#[test]
fn every_parameter_gradient_matches_finite_differences() {
    let cfg = test_model();
    let reference = Reference::new(&cfg, 3, DType::F64);
    let source = SyntheticSource::new(3, &cfg).unwrap();
    let (images, texts) = batch(&source, &[0, 1, 2, 3, 4], DType::F64);
    let (_, grads) = reference.grads(&images, &texts);
    let grads: Vec<Tensor> = reference
        .params
        .names()
        .iter()
        .map(|n| grads[*n].clone())
        .collect();
    let checked = check_against_finite_differences(
        &reference.params,
        &grads,
        || scalar(&reference.loss(&images, &texts)),
        FdTolerance {
            step: 1e-5,
            abs: 1e-7,
            rel: 1e-4,
        },
    );
    assert!(checked >= 3 * 30, "only {checked} entries checked");
}

/// Both backwards that go one segment at a time (recomputing each block, or keeping
/// every block's graph for the overlapped gradient sums) equal candle's whole-graph
/// backward, and hand over one batch of gradients per segment, the head's first.
#[test]
fn checkpointed_and_segmented_backward_equal_plain_autograd_for_every_tower() {
    use mmpipe::model::checkpointing::{
        backward_recomputing, forward_in_segments, forward_keeping_block_inputs, GradAccumulator,
    };
    use mmpipe::model::layers::l2_normalize;
    use mmpipe::model::{ClipConfig, Encoder, ParamBuilder};
    use mmpipe::topology::Tower;

    let bert = r#"
embed_dim = 6
[vision]
kind = "vit"
image_size = 16
patch_size = 8
width = 8
layers = 2
heads = 2
[text]
kind = "bert"
vocab_size = 40
hidden_size = 8
layers = 3
heads = 2
intermediate_size = 16
max_position_embeddings = 12
context_length = 12
pooling = "mean"
"#;
    let models = [
        test_model(),
        ClipConfig::from_str(super::resnet::TINY, std::path::Path::new("resnet.toml")).unwrap(),
        ClipConfig::from_str(bert, std::path::Path::new("bert.toml")).unwrap(),
    ];
    for (m, cfg) in models.iter().enumerate() {
        let source = SyntheticSource::new(1, cfg).unwrap();
        let (images, texts) = batch(&source, &[3, 4, 5], DType::F64);
        for (tower, input) in [(Tower::Image, &images), (Tower::Text, &texts)] {
            let pb = ParamBuilder::new(9, DType::F64, &candle_core::Device::Cpu);
            let encoder = Encoder::new(&pb, cfg, tower).unwrap();
            let params = pb.params();
            // OpenCLIP zero-initialises each bottleneck's last norm; move it off zero so
            // every parameter has a gradient to compare.
            for (_, var) in params
                .iter()
                .filter(|(n, _)| n.contains(".layer") && n.ends_with("bn3.weight"))
            {
                var.set(&super::common::fixed_values(var.dims(), 3.0))
                    .unwrap();
            }
            let plain = l2_normalize(&encoder.forward(input).unwrap()).unwrap();
            let upstream =
                Tensor::randn(0f64, 1.0, plain.shape(), &candle_core::Device::Cpu).unwrap();
            let store = (&plain * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let want = params.grads(&store).unwrap();
            let (out, saved) = forward_keeping_block_inputs(&encoder, input, l2_normalize).unwrap();
            assert_eq!(
                values(&out),
                values(&plain),
                "model {m} {tower}: forward differs"
            );
            let recomputed =
                backward_recomputing(&encoder, input, &saved, &upstream, l2_normalize, &params)
                    .unwrap();
            let (features, segments) = forward_in_segments(&encoder, input, l2_normalize).unwrap();
            assert_eq!(
                values(&features),
                values(&plain),
                "model {m} {tower}: the segmented forward differs"
            );
            let mut acc = GradAccumulator::new(&params);
            let mut handed = Vec::new();
            segments
                .backward(&upstream, &params, &mut |g| {
                    handed.push(g.iter().map(|(i, _)| *i).collect::<Vec<_>>());
                    acc.add(g)
                })
                .unwrap();
            let segmented = acc.finish().unwrap();
            assert_eq!(
                handed.len(),
                encoder.num_blocks() + 2,
                "model {m} {tower}: one hand-over per segment"
            );
            // No parameter is read by two segments: each comes once, whole.
            let mut all: Vec<usize> = handed.concat();
            all.sort_unstable();
            assert_eq!(
                all,
                (0..params.len()).collect::<Vec<_>>(),
                "model {m} {tower}: parameters handed over {handed:?}"
            );
            for (how, got) in [("recomputed", &recomputed), ("segmented", &segmented)] {
                for ((name, _), (g, w)) in params.iter().zip(got.iter().zip(&want)) {
                    assert!(
                        values(w).iter().any(|v| *v != 0.0),
                        "model {m} {tower} {name}: zero gradient"
                    );
                    if let Some((i, a, b)) = worst_violation(g, w, 1e-10, 1e-12, Relative::Element)
                    {
                        panic!("model {m} {tower} {how} {name}[{i}]: {a} vs {b}");
                    }
                }
            }
        }
    }
}

#[test]
fn the_attentional_pooler_trains_every_parameter() {
    use mmpipe::model::{ClipConfig, Encoder, ParamBuilder, TowerInput};
    use mmpipe::topology::Tower;
    let body = super::common::TEST_MODEL.replace(
        "[vision]\n",
        "[vision]\nattentional_pool = true\nattn_pooler_queries = 3\nattn_pooler_heads = 2\n",
    );
    let cfg = ClipConfig::from_str(&body, std::path::Path::new("attn-pool.toml")).unwrap();
    let pb = ParamBuilder::new(8, DType::F64, &candle_core::Device::Cpu);
    let encoder = Encoder::new(&pb, &cfg, Tower::Image).unwrap();
    let params = pb.params();
    let input = TowerInput::Images(super::common::fixed_values(&[2, 3, 16, 16], 0.0));
    let target = super::common::fixed_values(&[2, 16], 1.0);
    let loss = || squared_error(encoder.forward(&input).unwrap(), &target);
    let grads = params.grads(&loss().backward().unwrap()).unwrap();
    check_against_finite_differences(
        &params,
        &grads,
        || scalar(&loss()),
        FdTolerance {
            step: 1e-6,
            abs: 1e-7,
            rel: 1e-5,
        },
    );
}
