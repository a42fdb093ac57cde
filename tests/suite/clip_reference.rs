//! Our trainable CLIP towers against candle-transformers' inference CLIP (an independent
//! implementation, HF's layout) on the same weights: OpenCLIP names mapped to HF's, the
//! packed attention projection split into q/k/v. candle-transformers' CLIP knows only
//! quick GELU, so the towers here use it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use mmpipe::model::{ClipConfig, ParamBuilder, Params, TowerInput};

use super::common::{worst_violation, Relative};

const MODEL: &str = r#"
embed_dim = 12
[vision]
kind = "vit"
image_size = 16
patch_size = 4
width = 16
layers = 2
heads = 4
act = "quick_gelu"
[text]
kind = "clip"
vocab_size = 30
context_length = 7
width = 16
layers = 2
heads = 4
act = "quick_gelu"
"#;

/// Our parameters under HF CLIP's names (`prefix` "visual." or "").
fn to_hf(params: &Params, prefix: &str, width: usize) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, var) in params.iter() {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let t = var.as_tensor().clone();
        match rest {
            "conv1.weight" => drop(out.insert("embeddings.patch_embedding.weight".into(), t)),
            "class_embedding" => drop(out.insert("embeddings.class_embedding".into(), t)),
            "positional_embedding" => {
                drop(out.insert("embeddings.position_embedding.weight".into(), t))
            }
            "token_embedding.weight" => {
                drop(out.insert("embeddings.token_embedding.weight".into(), t))
            }
            "ln_pre.weight" | "ln_pre.bias" => {
                drop(out.insert(rest.replace("ln_pre", "pre_layrnorm"), t))
            }
            "ln_post.weight" | "ln_post.bias" => {
                drop(out.insert(rest.replace("ln_post", "post_layernorm"), t))
            }
            "ln_final.weight" | "ln_final.bias" => {
                drop(out.insert(rest.replace("ln_final", "final_layer_norm"), t))
            }
            _ => {
                if let Some((i, r)) = rest
                    .strip_prefix("transformer.resblocks.")
                    .and_then(|r| r.split_once('.'))
                {
                    let p = format!("encoder.layers.{i}.");
                    if let Some(kind) = r.strip_prefix("attn.in_proj_") {
                        let suffix = if kind == "weight" { "weight" } else { "bias" };
                        for (j, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            out.insert(
                                format!("{p}self_attn.{q}.{suffix}"),
                                t.narrow(0, j * width, width).unwrap(),
                            );
                        }
                    } else {
                        let r = r
                            .replace("attn.out_proj", "self_attn.out_proj")
                            .replace("ln_1", "layer_norm1")
                            .replace("ln_2", "layer_norm2")
                            .replace("mlp.c_fc", "mlp.fc1")
                            .replace("mlp.c_proj", "mlp.fc2");
                        out.insert(format!("{p}{r}"), t);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn our_vit_and_text_tower_equal_candle_transformers_clip() {
    let cfg = ClipConfig::from_str(MODEL, Path::new("quick-gelu.toml")).unwrap();
    let dev = Device::Cpu;
    let pb = ParamBuilder::new(21, DType::F32, &dev);
    let (image, text) = mmpipe::model::build_all(&pb, &cfg).unwrap();
    let params = pb.params();

    // Vision: pooled, normalised class token, then our projection on both sides.
    let vb = candle_nn::VarBuilder::from_tensors(to_hf(&params, "visual.", 16), DType::F32, &dev);
    let hf = ClipVisionTransformer::new(
        vb,
        &ClipVisionConfig {
            embed_dim: 16,
            activation: Activation::QuickGelu,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 12,
            num_channels: 3,
            image_size: 16,
            patch_size: 4,
        },
    )
    .unwrap();
    let images = Tensor::randn(0f32, 1.0, (3, 3, 16, 16), &dev).unwrap();
    let proj = params.get("visual.proj").unwrap().as_tensor().clone();
    let theirs = hf.forward(&images).unwrap().matmul(&proj).unwrap();
    let ours = image.forward(&TowerInput::Images(images)).unwrap();
    if let Some((i, a, b)) = worst_violation(&ours, &theirs, 1e-5, 1e-5, Relative::Element) {
        panic!("vision feature {i}: ours {a}, candle-transformers {b}");
    }

    // Text: they pool at the largest id, so the end-of-text token is the vocabulary's last.
    let vb = candle_nn::VarBuilder::from_tensors(to_hf(&params, "", 16), DType::F32, &dev);
    let hf = ClipTextTransformer::new(
        vb,
        &ClipTextConfig {
            vocab_size: 30,
            embed_dim: 16,
            activation: Activation::QuickGelu,
            intermediate_size: 64,
            max_position_embeddings: 7,
            pad_with: None,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 12,
        },
    )
    .unwrap();
    let tokens = Tensor::new(&[[1u32, 5, 9, 29, 0, 0, 0], [1, 7, 7, 3, 11, 8, 29]], &dev).unwrap();
    let eot = Tensor::new(&[3u32, 6], &dev).unwrap();
    let proj = params.get("text_projection").unwrap().as_tensor().clone();
    let theirs = hf.forward(&tokens).unwrap().matmul(&proj).unwrap();
    let input = TowerInput::Captions {
        mask: tokens.ones_like().unwrap(),
        tokens,
        eot,
    };
    let ours = text.forward(&input).unwrap();
    if let Some((i, a, b)) = worst_violation(&ours, &theirs, 1e-5, 1e-5, Relative::Element) {
        panic!("text feature {i}: ours {a}, candle-transformers {b}");
    }
}
