//! OpenCLIP compatibility: a state_dict from OpenCLIP's own `CLIP` (3.3.0, the test model's
//! config), saved as safetensors with fixed inputs and OpenCLIP's outputs for them
//! (`scripts/reference/openclip_fixture.py write`), loads into mmpipe by name and gives
//! the same features.

use std::path::Path;

use candle_core::{DType, Device};
use mmpipe::model::{checkpoint, Clip, ParamBuilder};

use super::common::{test_model, worst_violation, Relative};

const FIXTURE: &str = "tests/fixtures/openclip-tiny.safetensors";

#[test]
fn an_openclip_state_dict_loads_and_gives_openclips_features() {
    let pb = ParamBuilder::new(0, DType::F32, &Device::Cpu);
    let model = Clip::new(&pb, &test_model()).unwrap();
    let report = checkpoint::load(&pb.params(), Path::new(FIXTURE)).unwrap();
    assert_eq!(report.loaded, 62, "every tensor of OpenCLIP's state_dict");
    assert_eq!(
        report.unused,
        vec![
            "input.images",
            "input.tokens",
            "output.image_features",
            "output.text_features"
        ]
    );

    let t = checkpoint::read_tensors(Path::new(FIXTURE)).unwrap();
    let images = &t["input.images"];
    let tokens = t["input.tokens"].to_dtype(DType::U32).unwrap();
    // OpenCLIP pools at the largest id; our towers take the position explicitly.
    let eot = tokens.argmax(1).unwrap();
    let image = model.visual.forward(images).unwrap();
    let text = model.text.forward(&tokens, &eot).unwrap();
    for (name, ours, theirs) in [
        ("image", &image, &t["output.image_features"]),
        ("text", &text, &t["output.text_features"]),
    ] {
        if let Some((i, a, b)) = worst_violation(ours, theirs, 1e-5, 1e-5, Relative::Element) {
            panic!("{name} feature {i}: mmpipe {a}, OpenCLIP {b}");
        }
    }
}
