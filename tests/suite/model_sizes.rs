//! Parameters and forward FLOPs computed from the configs, against published figures:
//! OpenCLIP's `docs/model_profile.csv` (parameters in millions, GFLOPs per sample at a
//! multiply-add = 2 FLOPs), the anchor's exact counts, and the BERT-family model cards.

use std::path::Path;

use mmpipe::model::ClipConfig;

fn load(name: &str) -> ClipConfig {
    ClipConfig::from_file(&Path::new("configs").join(name)).unwrap_or_else(|e| panic!("{e}"))
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want,
        "{what}: computed {got}, published {want}"
    );
}

/// (model file, image Mparams, text Mparams, image GFLOPs, text GFLOPs), from OpenCLIP.
const OPENCLIP_PROFILE: [(&str, f64, f64, f64, f64); 4] = [
    ("ViT-B-32.toml", 87.85, 63.43, 8.82, 5.96),
    ("ViT-B-16.toml", 86.19, 63.43, 35.13, 5.96),
    ("ViT-L-14.toml", 303.97, 123.65, 162.03, 13.3),
    ("RN50.toml", 38.32, 63.69, 12.22, 5.96),
];

#[test]
fn openclip_towers_match_the_published_profile() {
    for (file, img_m, txt_m, img_gf, txt_gf) in OPENCLIP_PROFILE {
        let m = load(file);
        let e = m.embed_dim;
        // The profile rounds to 0.01 M and 0.01 GFLOP.
        close(
            m.vision.size().num_params(e) as f64 / 1e6,
            img_m,
            0.0002,
            &format!("{file} image params"),
        );
        close(
            m.text.size().num_params(e) as f64 / 1e6,
            txt_m,
            0.0002,
            &format!("{file} text params"),
        );
        close(
            m.vision.size().forward_flops(e) / 1e9,
            img_gf,
            0.002,
            &format!("{file} image GFLOPs"),
        );
        close(
            m.text.size().forward_flops(e) / 1e9,
            txt_gf,
            0.002,
            &format!("{file} text GFLOPs"),
        );
    }
}

#[test]
fn vit_b_16_is_5_9_times_its_text_tower() {
    let m = load("ViT-B-16.toml");
    let ratio = m.vision.size().forward_flops(512) / m.text.size().forward_flops(512);
    close(ratio, 35.13 / 5.96, 0.003, "image/text FLOP ratio");
}

#[test]
fn the_anchor_model_has_its_exact_parameter_count() {
    let m = load("openclip-anchor.toml");
    assert_eq!(m.vision.size().num_params(256), 4_871_168);
    assert_eq!(m.text.size().num_params(256), 15_881_728);
    // Forward MFLOPs per sample from the anchor's README: image 645.8, text 205.7.
    close(
        m.vision.size().forward_flops(256) / 1e6,
        645.8,
        0.001,
        "anchor image MFLOPs",
    );
    close(
        m.text.size().forward_flops(256) / 1e6,
        205.7,
        0.001,
        "anchor text MFLOPs",
    );
}

#[test]
fn bert_family_encoders_match_their_model_cards() {
    // Encoder alone (no CLIP projection): BERT-base 109,482,240 (HF's count with the
    // pooler), all-MiniLM-L6-v2 22,713,216 with the pooler its checkpoint carries; mean
    // pooling leaves that pooler (384² + 384) out of the tower.
    let bert = load("ViT-B-16-bert-base.toml");
    assert_eq!(bert.text.size().num_params(0), 109_482_240);
    let minilm = load("ViT-B-32-minilm-l6.toml");
    assert_eq!(
        minilm.text.size().num_params(0) + 384 * 384 + 384,
        22_713_216
    );
    // With the projection into the shared embedding.
    assert_eq!(
        minilm.text.size().num_params(384),
        22_713_216 - 384 * 384 - 384 + 384 * 384
    );
}

#[test]
fn checkpointing_cuts_activation_memory() {
    for file in ["ViT-B-16.toml", "RN50.toml", "ViT-B-16-bert-base.toml"] {
        let m = load(file);
        for size in [m.vision.size(), m.text.size()] {
            let (full, ckpt) = (
                size.activation_elems(false, true),
                size.activation_elems(true, true),
            );
            assert!(
                ckpt > 0.0 && ckpt < 0.5 * full,
                "{file} {}: {ckpt} vs {full}",
                size.family()
            );
        }
    }
}

/// Flash attention keeps no probabilities: a transformer's activations lose exactly
/// Korthikanti's `2.5·a·s²` a layer; a ResNet has none to lose.
#[test]
fn flash_attention_drops_the_kept_probabilities_from_the_activations() {
    let m = load("ViT-B-16.toml");
    let vit = m.vision.size();
    let (s, heads, layers) = (197.0, 12.0, 12.0);
    let kept = vit.activation_elems(false, true);
    let flash = vit.activation_elems(false, false);
    assert_eq!(vit.attention_head_width(), Some(64));
    assert!(
        ((kept - flash) - layers * 2.5 * heads * s * s).abs() < 1e-6 * kept,
        "{kept} - {flash}"
    );
    let rn50 = load("RN50.toml");
    let rn = rn50.vision.size();
    assert_eq!(rn.attention_head_width(), None);
    assert_eq!(
        rn.activation_elems(false, true),
        rn.activation_elems(false, false)
    );
}

#[test]
fn bad_model_files_name_file_and_field() {
    let cases = [
        ("embed_dim = 8\nvision = \"towers/none.toml\"\ntext = \"towers/text-12x512.toml\"\n", "none.toml"),
        ("embed_dim = 8\nvision = 3\ntext = \"towers/text-12x512.toml\"\n", "`vision`"),
        (
            "embed_dim = 8\ntext = \"towers/text-12x512.toml\"\n[vision]\nkind = \"vit\"\nimage_size = 30\npatch_size = 8\nwidth = 8\nlayers = 1\nheads = 2\n",
            "`vision.patch_size`",
        ),
        (
            "embed_dim = 8\ntext = \"towers/text-12x512.toml\"\n[vision]\nkind = \"swin\"\nimage_size = 32\n",
            "`vision`",
        ),
        ("embed_dim = 0\nvision = \"towers/rn50.toml\"\ntext = \"towers/text-12x512.toml\"\n", "`embed_dim`"),
    ];
    for (body, needle) in cases {
        let e = ClipConfig::from_str(body, Path::new("configs/broken.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "expected {needle} in: {e}");
    }
}

/// Builds a tower at its real size (nothing is trained) and counts what was built.
fn built_params(file: &str, tower: mmpipe::topology::Tower) -> usize {
    let m = load(file);
    let pb = mmpipe::model::cpu_builder(0);
    mmpipe::model::Encoder::new(&pb, &m, tower).unwrap();
    pb.params().num_elements()
}

#[test]
fn real_size_towers_build_with_the_published_parameter_counts() {
    use mmpipe::topology::Tower;
    // One at a time: ViT-B/16's tower alone is 345 MB of f32.
    assert_eq!(built_params("ViT-B-16.toml", Tower::Image), 86_192_640);
    assert_eq!(built_params("ViT-B-16.toml", Tower::Text), 63_428_096);
    // BERT-base with the projection into 512 and HF's pooler (CLS pooling).
    assert_eq!(
        built_params("ViT-B-16-bert-base.toml", Tower::Text),
        109_482_240 + 768 * 512
    );
}

/// The planner's count of a transformer layer's activations is what mmpipe's block leaves
/// in the graph: one ViT block's forward on the CPU in f32, then every tensor the graph
/// holds (each storage once: views share theirs), the parameters and the input aside. It
/// keeps `activation_elems` (flash's count: the CPU attention keeps its probabilities in
/// the op, not in the graph) and `stream_activation_elems` of a layer, floats a sample.
#[test]
fn a_blocks_graph_keeps_what_the_planner_counts() {
    use candle_core::{DType, Device, Tensor, Var};
    use mmpipe::model::{ImageTowerConfig, ParamBuilder, VisionTower};
    let m = load("clip-tiny.toml");
    let ImageTowerConfig::Vit(vit) = &m.vision else {
        panic!("clip-tiny.toml has a ViT")
    };
    let pb = ParamBuilder::new(3, DType::F32, &Device::Cpu);
    let tower = VisionTower::new(&pb.pp("visual"), vit, m.embed_dim).unwrap();
    let block = &tower.token_blocks()[0];
    let (n, s, w) = (3, vit.num_patches() + 1, vit.width);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, s, w), &Device::Cpu).unwrap()).unwrap();
    let out = block.forward(x.as_tensor(), None).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut kept = 0usize;
    for node in out.sorted_nodes() {
        if node.is_variable() {
            continue;
        }
        let (storage, _) = node.storage_and_layout();
        if seen.insert(&*storage as *const candle_core::Storage as usize) {
            kept += node.elem_count();
        }
    }
    let size = m.vision.size();
    let layers = vit.layers as f64;
    let per_sample =
        (size.activation_elems(false, false) + size.stream_activation_elems(false)) / layers;
    assert_eq!(
        kept as f64,
        n as f64 * per_sample,
        "{kept} floats kept for {n} samples"
    );
}
