//! BERT with real pretrained weights (all-MiniLM-L6-v2), the tokenizers, and checkpoints.
//!
//! Reference values come from `scripts/reference/minilm_reference.py`: HF `tokenizers`
//! (Python) for the ids and a plain-numpy BERT forward in float64 for the embeddings, an
//! implementation that shares no code with mmpipe.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mmpipe::data::TextTokenizer;
use mmpipe::model::checkpoint;
use mmpipe::model::layers::l2_normalize;
use mmpipe::model::{ClipConfig, Encoder, ParamBuilder};
use mmpipe::topology::Tower;

use super::common::{
    check_against_finite_differences, squared_error, values, worst_violation, FdTolerance, Relative,
};

/// The fixture `scripts/fetch-fixtures.sh` fetches (CI runs it first).
fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("MMPIPE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/fixtures/all-minilm-l6-v2"));
    assert!(
        dir.join("model.safetensors").exists(),
        "{} has no all-MiniLM-L6-v2: run `bash scripts/fetch-fixtures.sh`",
        dir.display()
    );
    dir
}

const MINILM_MODEL: &str = r#"
embed_dim = 16
text = "towers/minilm-l6.toml"
[vision]
kind = "vit"
image_size = 16
patch_size = 8
width = 8
layers = 1
heads = 2
"#;

/// (sentence, token ids, first six embedding values), from the reference script.
const REFERENCE: [(&str, &[u32], [f64; 6]); 4] = [
    (
        "a cat",
        &[101, 1037, 4937, 102],
        [
            0.0617337, 0.0414598, 0.0087633, 0.0625123, -0.1272042, 0.0062686,
        ],
    ),
    (
        "a kitten",
        &[101, 1037, 18401, 102],
        [
            0.0024826, 0.0158743, -0.0200424, 0.0311843, -0.0410885, 0.0028971,
        ],
    ),
    (
        "stock market finance",
        &[101, 4518, 3006, 5446, 102],
        [
            0.0169541, -0.0398635, -0.0835423, 0.0600759, 0.0049412, 0.0297068,
        ],
    ),
    (
        "A photo of a dog playing in the snow.",
        &[
            101, 1037, 6302, 1997, 1037, 3899, 2652, 1999, 1996, 4586, 1012, 102,
        ],
        [
            -0.0517115, 0.0125072, 0.0797975, 0.0191698, -0.0066703, 0.0348672,
        ],
    ),
];

fn minilm() -> (Encoder, mmpipe::model::Params) {
    let cfg = ClipConfig::from_str(MINILM_MODEL, Path::new("configs/minilm-test.toml")).unwrap();
    let pb = ParamBuilder::new(0, DType::F32, &Device::Cpu);
    let encoder = Encoder::new(&pb, &cfg, Tower::Text).unwrap();
    let params = pb.params();
    let report =
        checkpoint::load_hf_bert(&params, &minilm_dir().join("model.safetensors")).unwrap();
    // 104 tensors in the file: all but the pooler (2) and HF's position_ids buffer.
    assert_eq!(report.loaded, 101, "every tower tensor but the projection");
    assert!(
        report
            .unused
            .iter()
            .all(|k| k.starts_with("pooler.") || k == "embeddings.position_ids"),
        "{:?}",
        report.unused
    );
    (encoder, params)
}

#[test]
fn hf_tokenizer_matches_the_reference_ids_with_padding_and_mask() {
    let tok = TextTokenizer::from_hf_file(&minilm_dir().join("tokenizer.json")).unwrap();
    for (text, ids, _) in REFERENCE {
        let t = tok.encode_batch(&[text], 16).unwrap();
        assert_eq!(&t.ids[..ids.len()], ids, "{text}");
        assert!(
            t.ids[ids.len()..].iter().all(|&i| i == 0),
            "padded with [PAD] = 0"
        );
        assert_eq!(t.mask.iter().sum::<u32>() as usize, ids.len());
        assert_eq!(t.eot[0] as usize, ids.len() - 1);
    }
    // Truncation keeps [SEP] last.
    let t = tok
        .encode_batch(&["A photo of a dog playing in the snow."], 6)
        .unwrap();
    assert_eq!(t.ids, vec![101, 1037, 6302, 1997, 1037, 102]);
    assert_eq!(t.mask, vec![1; 6]);
}

#[test]
fn clip_bpe_matches_openai_ids() {
    // OpenAI CLIP's tokenizer on its README example: <start> a photo of a cat <end>.
    let tok = TextTokenizer::clip();
    let t = tok
        .encode_batch(&["a photo of a cat", "A Photo of a CAT!"], 10)
        .unwrap();
    assert_eq!(
        &t.ids[..10],
        &[49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
    );
    assert_eq!(t.eot, vec![6, 7]);
    assert_eq!(t.ids[10 + 7], 49407);
}

#[test]
fn minilm_sentence_embeddings_match_the_independent_reference() {
    let (encoder, _) = minilm();
    let Encoder::Bert(bert) = &encoder else {
        panic!("a BERT tower")
    };
    let tok = TextTokenizer::from_hf_file(&minilm_dir().join("tokenizer.json")).unwrap();
    let texts: Vec<&str> = REFERENCE.iter().map(|r| r.0).collect();
    let t = tok.encode_batch(&texts, 16).unwrap();
    let n = texts.len();
    let tokens = Tensor::from_vec(t.ids, (n, 16), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(t.mask, (n, 16), &Device::Cpu).unwrap();
    // Mean pooling over the mask, then unit norm: sentence-transformers' embedding.
    let emb = l2_normalize(&bert.pooled(&tokens, &mask).unwrap()).unwrap();
    for (i, (text, _, want)) in REFERENCE.iter().enumerate() {
        let got = values(&emb.get(i).unwrap().narrow(0, 0, 6).unwrap());
        for (g, w) in got.iter().zip(want) {
            // The reference is rounded to 7 decimals; f32 adds ~1e-7.
            assert!((g - w).abs() < 1e-6, "{text}: {got:?} vs {want:?}");
        }
    }
    let cos = |a: usize, b: usize| {
        values(
            &(emb.get(a).unwrap() * emb.get(b).unwrap())
                .unwrap()
                .sum_all()
                .unwrap(),
        )[0]
    };
    assert!((cos(0, 1) - 0.766277).abs() < 1e-5, "{}", cos(0, 1));
    assert!((cos(0, 2) - 0.098111).abs() < 1e-5, "{}", cos(0, 2));
    assert!(
        cos(0, 1) > cos(0, 2),
        "a cat is closer to a kitten than to stock market finance"
    );
}

#[test]
fn a_checkpoint_reads_back_bit_for_bit() {
    let cfg = super::common::test_model();
    let pb = ParamBuilder::new(11, DType::F32, &Device::Cpu);
    mmpipe::model::build_all(&pb, &cfg).unwrap();
    let params = pb.params();
    let dir = std::env::temp_dir().join(format!("mmpipe-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    checkpoint::save(&params, &path).unwrap();
    let names: Vec<String> = checkpoint::read_tensors(&path)
        .unwrap()
        .into_keys()
        .collect();
    assert!(names
        .iter()
        .any(|n| n == "visual.transformer.resblocks.0.attn.in_proj_weight"));
    assert!(
        names.iter().any(|n| n == "token_embedding.weight")
            && names.iter().any(|n| n == "logit_scale")
    );

    let other = ParamBuilder::new(12, DType::F32, &Device::Cpu);
    mmpipe::model::build_all(&other, &cfg).unwrap();
    let report = checkpoint::load(&other.params(), &path).unwrap();
    assert_eq!((report.loaded, report.unused.len()), (params.len(), 0));
    for (name, var) in params.iter() {
        let a = values(var.as_tensor());
        let b = values(other.params().get(name).unwrap().as_tensor());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}"
        );
    }
    // A checkpoint of another shape is an error naming file and tensor.
    let mut wide = cfg.clone();
    wide.embed_dim = 8;
    let pb = ParamBuilder::new(0, DType::F32, &Device::Cpu);
    mmpipe::model::build_all(&pb, &wide).unwrap();
    let e = checkpoint::load(&pb.params(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("shape"),
        "{e}"
    );
    let e = checkpoint::load(&pb.params(), &dir.join("none.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.safetensors"), "{e}");
}

#[test]
fn every_bert_parameter_gets_a_gradient_matching_finite_differences() {
    let body = r#"
embed_dim = 6
[vision]
kind = "vit"
image_size = 16
patch_size = 8
width = 8
layers = 1
heads = 2
[text]
kind = "bert"
vocab_size = 40
hidden_size = 8
layers = 2
heads = 2
intermediate_size = 16
max_position_embeddings = 12
context_length = 8
pooling = "cls"
pooler = true
"#;
    let cfg = ClipConfig::from_str(body, Path::new("bert-tiny.toml")).unwrap();
    let pb = ParamBuilder::new(5, DType::F64, &Device::Cpu);
    let Encoder::Bert(bert) = Encoder::new(&pb, &cfg, Tower::Text).unwrap() else {
        panic!()
    };
    let params = pb.params();
    assert_eq!(params.num_elements(), cfg.text.size().num_params(6));
    let tokens = Tensor::new(
        &[[1u32, 5, 9, 2, 0, 0, 0, 0], [1, 7, 7, 3, 11, 2, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(
        &[[1u32, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let target = Tensor::new(
        &[
            [0.3f64, -0.2, 0.5, 0.1, -0.4, 0.2],
            [0.1, 0.4, -0.3, 0.2, 0.0, -0.1],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let loss = || squared_error(bert.forward(&tokens, &mask).unwrap(), &target);
    let grads = params.grads(&loss().backward().unwrap()).unwrap();
    check_against_finite_differences(
        &params,
        &grads,
        || values(&loss())[0],
        FdTolerance {
            step: 1e-6,
            abs: 1e-6,
            rel: 1e-5,
        },
    );
    // Padding takes no part: changing a padded token changes nothing.
    let padded = Tensor::new(
        &[[1u32, 5, 9, 2, 33, 33, 33, 33], [1, 7, 7, 3, 11, 2, 39, 39]],
        &Device::Cpu,
    )
    .unwrap();
    let a = bert.forward(&tokens, &mask).unwrap();
    let b = bert.forward(&padded, &mask).unwrap();
    assert!(worst_violation(&a, &b, 0.0, 1e-12, Relative::Element).is_none());
}

#[test]
fn our_bert_equals_candle_transformers_bert_on_the_same_weights() {
    use candle_transformers::models::bert::{BertModel, Config};
    let dir = minilm_dir();
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let files = [dir.join("model.safetensors")];
    // SAFETY: the fixture file is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap()
    };
    let reference = BertModel::load(vb, &config).unwrap();

    let (encoder, _) = minilm();
    let Encoder::Bert(bert) = &encoder else {
        panic!("a BERT tower")
    };
    let tok = TextTokenizer::from_hf_file(&dir.join("tokenizer.json")).unwrap();
    let texts: Vec<&str> = REFERENCE.iter().map(|r| r.0).collect();
    let t = tok.encode_batch(&texts, 14).unwrap();
    let n = texts.len();
    let tokens = Tensor::from_vec(t.ids, (n, 14), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(t.mask.clone(), (n, 14), &Device::Cpu).unwrap();
    let theirs = reference
        .forward(&tokens, &tokens.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    let ours = bert.hidden_states(&tokens, &mask).unwrap();
    // Compare the real tokens' states (padding rows are don't-cares in both).
    let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(2).unwrap();
    let (a, b) = (
        ours.broadcast_mul(&keep).unwrap(),
        theirs.broadcast_mul(&keep).unwrap(),
    );
    if let Some((i, x, y)) = worst_violation(&a, &b, 0.0, 1e-5, Relative::Element) {
        panic!("hidden state {i}: ours {x}, candle-transformers {y}");
    }
}
