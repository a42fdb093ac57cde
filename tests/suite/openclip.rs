//! OpenCLIP compatibility: state_dicts from OpenCLIP's own `CLIP` (3.3.0, the test model's
//! config, with and without the attentional pooler), saved as safetensors with fixed
//! inputs and OpenCLIP's outputs for them (`scripts/reference/openclip_fixture.py`), load
//! into mmpipe by name and give the same features.

use std::path::Path;

use candle_core::{DType, Device};
use mmpipe::model::{checkpoint, ClipConfig, Encoder, ParamBuilder};

use super::common::Clip;
use mmpipe::topology::Tower;

use super::common::{test_model, worst_violation, Relative, TEST_MODEL};

#[test]
fn an_openclip_state_dict_loads_and_gives_openclips_features() {
    check(
        "tests/fixtures/openclip-tiny.safetensors",
        &test_model(),
        62,
    );
}

#[test]
fn an_openclip_vit_with_attentional_pooling_matches_too() {
    let body = TEST_MODEL.replace(
        "[vision]\n",
        "[vision]\nattentional_pool = true\nattn_pooler_queries = 4\nattn_pooler_heads = 2\n",
    );
    let cfg = ClipConfig::from_str(&body, Path::new("attn-pool.toml")).unwrap();
    let built = ParamBuilder::new(0, DType::F32, &Device::Cpu);
    Encoder::new(&built, &cfg, Tower::Image).unwrap();
    assert_eq!(
        built.params().num_elements(),
        cfg.vision.size().num_params(cfg.embed_dim)
    );
    check(
        "tests/fixtures/openclip-tiny-attnpool.safetensors",
        &cfg,
        73,
    );
}

/// Loads the fixture's state_dict (it must set every parameter, from `tensors` model
/// tensors) and compares both towers' features with OpenCLIP's.
fn check(fixture: &str, cfg: &ClipConfig, tensors: usize) {
    let pb = ParamBuilder::new(0, DType::F32, &Device::Cpu);
    let model = Clip::new(&pb, cfg);
    let report = checkpoint::load(&pb.params(), Path::new(fixture)).unwrap();
    assert_eq!(
        report.loaded, tensors,
        "every tensor of OpenCLIP's state_dict"
    );
    assert_eq!(
        report.unused,
        vec![
            "input.images",
            "input.tokens",
            "output.image_features",
            "output.text_features"
        ]
    );

    let t = checkpoint::read_tensors(Path::new(fixture)).unwrap();
    let tokens = t["input.tokens"].to_dtype(DType::U32).unwrap();
    // OpenCLIP pools at the largest id; our towers take the position explicitly.
    let eot = tokens.argmax(1).unwrap();
    let image = model.visual.forward(&t["input.images"]).unwrap();
    let text = model.text.forward(&tokens, &eot).unwrap();
    for (name, ours, theirs) in [
        ("image", &image, &t["output.image_features"]),
        ("text", &text, &t["output.text_features"]),
    ] {
        if let Some((i, a, b)) = worst_violation(ours, theirs, 1e-5, 1e-5, Relative::Element) {
            panic!("{fixture}: {name} feature {i}: mmpipe {a}, OpenCLIP {b}");
        }
    }
}
