//! OpenCLIP's model config files (`open_clip/model_configs/ViT-B-32.json`) as mmpipe
//! models, so that an OpenCLIP `state_dict` evaluates, resumes or fine-tunes with the
//! config it was trained with. The parameter names already agree (`checkpoint`).
//!
//! What OpenCLIP's `CLIPVisionCfg` and `CLIPTextCfg` can say that mmpipe's towers do not
//! build (layer scale, timm or HF towers, other pooling) is refused with the field named,
//! unless it holds OpenCLIP's default: a field that would change the model must never be
//! dropped silently.

use std::path::Path;

use serde_json::{Map, Value};

use super::config::{
    Activation, ClipConfig, ImageTowerConfig, ResNetConfig, TextTowerConfig, TextTransformerConfig,
    VitConfig,
};
use crate::error::{Error, Result};

/// OpenCLIP's `head_width` default: heads = width / 64.
const HEAD_WIDTH: u64 = 64;

/// Fields mmpipe does not model, accepted at these values only (OpenCLIP's defaults, and
/// what leaves the model unchanged): both towers' (`CLIPVisionCfg` and `CLIPTextCfg`
/// share them), then each tower's own, then the model's.
const TOWER_DEFAULTS: &[(&str, &[&str])] = &[
    ("ls_init_value", &["null"]),
    ("final_ln_after_pool", &["false"]),
    ("output_tokens", &["false"]),
    ("act_kwargs", &["null"]),
    ("norm_kwargs", &["null"]),
    ("block_type", &["null"]),
    ("qk_norm", &["false"]),
    ("scaled_cosine_attn", &["false"]),
    ("scale_heads", &["false"]),
    ("scale_attn_inner", &["false"]),
    ("scale_attn", &["false"]),
    ("scale_fc", &["false"]),
];
const VISION_DEFAULTS: &[(&str, &[&str])] = &[
    ("patch_dropout", &["0", "0.0"]),
    ("no_ln_pre", &["false"]),
    ("pos_embed_type", &["\"learnable\""]),
    ("pool_type", &["\"tok\""]),
    ("input_patchnorm", &["false"]),
    ("global_average_pool", &["false"]),
    ("timm_model_name", &["null"]),
    ("timm_model_pretrained", &["false"]),
    ("timm_pool", &["\"avg\""]),
    ("timm_proj", &["\"linear\""]),
    ("timm_proj_bias", &["false"]),
    ("timm_drop", &["0", "0.0"]),
    ("timm_drop_path", &["null"]),
];
const TEXT_DEFAULTS: &[(&str, &[&str])] = &[
    ("embed_cls", &["false"]),
    ("pad_id", &["0"]),
    ("no_causal_mask", &["false"]),
    ("pool_type", &["\"argmax\""]),
    ("proj_bias", &["false"]),
    ("proj_type", &["\"linear\""]),
    ("hf_model_name", &["null"]),
    ("hf_tokenizer_name", &["null"]),
    ("hf_model_pretrained", &["true"]),
    ("hf_proj_type", &["\"mlp\""]),
    ("hf_pooler_type", &["\"mean_pooler\""]),
    ("tokenizer_kwargs", &["null"]),
    ("tokenizer_mode", &["null"]),
];
const TOP_DEFAULTS: &[(&str, &[&str])] = &[
    ("custom_text", &["false"]),
    ("cast_dtype", &["null"]),
    ("init_logit_bias", &["null"]),
];

/// Reads an OpenCLIP model config (JSON) as an mmpipe model; an error names the file and
/// the field it cannot take.
pub fn from_file(path: &Path) -> Result<ClipConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    from_str(&text, path)
}

/// Parses OpenCLIP model config text; `origin` names it in errors.
pub fn from_str(text: &str, origin: &Path) -> Result<ClipConfig> {
    let value: Value = serde_json::from_str(text).map_err(|e| Error::Parse {
        path: origin.to_path_buf(),
        message: format!("not an OpenCLIP model config (JSON): {e}"),
    })?;
    let top = Fields::new(&value, "", origin)?;
    top.only(
        &["embed_dim", "quick_gelu", "vision_cfg", "text_cfg"],
        &[TOP_DEFAULTS],
    )?;
    let act = if top.boolean("quick_gelu", false)? {
        Activation::QuickGelu
    } else {
        Activation::Gelu
    };
    let vision = Fields::new(top.required("vision_cfg")?, "vision_cfg.", origin)?;
    let text = Fields::new(top.required("text_cfg")?, "text_cfg.", origin)?;
    let config = ClipConfig {
        embed_dim: top.int("embed_dim", None)?,
        vision: vision_tower(&vision, act)?,
        text: text_tower(&text, act)?,
        locked: Vec::new(),
        pretrained_text: None,
    };
    config.validate(origin)?;
    Ok(config)
}

fn vision_tower(v: &Fields, act: Activation) -> Result<ImageTowerConfig> {
    let image_size = v.int("image_size", Some(224))?;
    let width = v.int("width", Some(768))?;
    let head_width = v.int("head_width", Some(HEAD_WIDTH as usize))?;
    match v.get("layers") {
        // A list of blocks per stage: OpenCLIP's ModifiedResNet.
        Some(Value::Array(stages)) => {
            v.only(
                &["image_size", "layers", "width", "head_width", "patch_size"],
                &[TOWER_DEFAULTS, VISION_DEFAULTS],
            )?;
            let layers: Vec<usize> = stages
                .iter()
                .map(|s| s.as_u64().map(|n| n as usize))
                .collect::<Option<_>>()
                .filter(|l: &Vec<usize>| l.len() == 4)
                .ok_or_else(|| {
                    v.bad(
                        "layers",
                        "a ResNet takes four stage depths, as [3, 4, 6, 3]",
                    )
                })?;
            Ok(ImageTowerConfig::Resnet(ResNetConfig {
                image_size,
                layers: [layers[0], layers[1], layers[2], layers[3]],
                width,
                // OpenCLIP: vision_heads = width * 32 // head_width.
                heads: (width * 32 / head_width.max(1)).max(1),
                channels: 3,
                sync_batch_norm: false,
            }))
        }
        _ => {
            v.only(
                &[
                    "image_size",
                    "layers",
                    "width",
                    "head_width",
                    "mlp_ratio",
                    "patch_size",
                    "attentional_pool",
                    "attn_pooler_queries",
                    "attn_pooler_heads",
                ],
                &[TOWER_DEFAULTS, VISION_DEFAULTS],
            )?;
            if !width.is_multiple_of(head_width.max(1)) {
                return Err(v.bad(
                    "head_width",
                    format!("{head_width} does not divide width {width}"),
                ));
            }
            Ok(ImageTowerConfig::Vit(VitConfig {
                image_size,
                patch_size: v.int("patch_size", Some(16))?,
                channels: 3,
                width,
                layers: v.int("layers", Some(12))?,
                heads: width / head_width.max(1),
                mlp_ratio: v.ratio("mlp_ratio")?,
                act,
                attentional_pool: v.boolean("attentional_pool", false)?,
                attn_pooler_queries: v.int("attn_pooler_queries", Some(256))?,
                attn_pooler_heads: v.int("attn_pooler_heads", Some(8))?,
            }))
        }
    }
}

fn text_tower(t: &Fields, act: Activation) -> Result<TextTowerConfig> {
    t.only(
        &[
            "context_length",
            "vocab_size",
            "width",
            "heads",
            "layers",
            "mlp_ratio",
            // Read by OpenCLIP's `eos` pooling only; its argmax pooling (the one built
            // here) finds the end-of-text token as the largest id.
            "eos_id",
        ],
        &[TOWER_DEFAULTS, TEXT_DEFAULTS],
    )?;
    Ok(TextTowerConfig::Clip(TextTransformerConfig {
        vocab_size: t.int("vocab_size", Some(49408))?,
        context_length: t.int("context_length", Some(77))?,
        width: t.int("width", Some(512))?,
        layers: t.int("layers", Some(12))?,
        heads: t.int("heads", Some(8))?,
        mlp_ratio: t.ratio("mlp_ratio")?,
        act,
    }))
}

/// One JSON object of the file, `prefix` naming it in errors (`vision_cfg.`).
struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: &'static str,
    origin: &'a Path,
}

impl<'a> Fields<'a> {
    fn new(value: &'a Value, prefix: &'static str, origin: &'a Path) -> Result<Self> {
        let map = value.as_object().ok_or_else(|| {
            Error::invalid(
                origin,
                prefix.trim_end_matches('.'),
                "must be a JSON object",
            )
        })?;
        Ok(Fields {
            map,
            prefix,
            origin,
        })
    }

    fn bad(&self, field: &str, message: impl Into<String>) -> Error {
        Error::invalid(self.origin, format!("{}{field}", self.prefix), message)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn required(&self, field: &str) -> Result<&'a Value> {
        self.get(field).ok_or_else(|| self.bad(field, "missing"))
    }

    /// Every field is one of `known`, or in one of the `defaults` lists at a value listed
    /// there.
    fn only(&self, known: &[&str], defaults: &[&[(&str, &[&str])]]) -> Result<()> {
        for (field, value) in self.map {
            if known.contains(&field.as_str()) {
                continue;
            }
            match defaults
                .iter()
                .flat_map(|d| d.iter())
                .find(|(name, _)| name == field)
            {
                Some((_, allowed)) if allowed.contains(&value.to_string().as_str()) => {}
                Some((_, allowed)) => {
                    return Err(self.bad(
                        field,
                        format!(
                            "{value}: mmpipe builds this tower only with {} (OpenCLIP's default)",
                            allowed[0]
                        ),
                    ))
                }
                None => return Err(self.bad(field, "not a field mmpipe knows how to build")),
            }
        }
        Ok(())
    }

    fn int(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match self.get(field) {
            None => default.ok_or_else(|| self.bad(field, "missing")),
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.bad(field, format!("{v}: must be a whole number"))),
        }
    }

    fn boolean(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(field, format!("{v}: must be true or false"))),
        }
    }

    /// The MLP's hidden width over the width (OpenCLIP's float, 4.0 by default): mmpipe's
    /// MLPs take whole ratios.
    fn ratio(&self, field: &str) -> Result<usize> {
        match self.get(field) {
            None => Ok(4),
            Some(v) => v
                .as_f64()
                .filter(|r| *r >= 1.0 && r.fract() == 0.0)
                .map(|r| r as usize)
                .ok_or_else(|| self.bad(field, format!("{v}: mmpipe takes whole MLP ratios"))),
        }
    }
}
