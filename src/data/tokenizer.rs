//! Caption tokenizers behind one interface: CLIP's BPE (vocabulary built into
//! `instant-clip-tokenizer`), any HF `tokenizer.json` (BERT's WordPiece and others), and
//! the synthetic set's word vocabulary. Every caption becomes exactly `context` ids:
//! truncated with its end token kept last, padded, with an attention mask and the position
//! of the end token (CLIP pools there).

use std::path::Path;

use candle_core::{Device, Tensor};

use crate::data::vocab::WordVocab;
use crate::error::{Error, Result};
use crate::model::{ClipConfig, TowerInput};

/// The tokenizer for captions from files (shards, a CSV, Fashion-MNIST's prompts): the
/// pretrained BERT's own, or CLIP's BPE for a CLIP text tower with its vocabulary.
pub fn caption_tokenizer(model: &ClipConfig) -> Result<TextTokenizer> {
    if let Some(dir) = &model.pretrained_text {
        return TextTokenizer::from_hf_file(&dir.join("tokenizer.json"));
    }
    const CLIP_VOCAB: usize = 49408;
    if model.vocab_size() < CLIP_VOCAB {
        return Err(Error::Msg(format!(
            "captions from shards are tokenised with CLIP's BPE ({CLIP_VOCAB} tokens), but the \
             model's text.vocab_size is {}: use a model with a CLIP vocabulary (e.g. \
             configs/clip-tiny-bpe.toml) or a pretrained BERT text tower",
            model.vocab_size()
        )));
    }
    Ok(TextTokenizer::clip())
}

/// A batch of tokenised captions, row-major `[n, context]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// 1 for real tokens (specials included), 0 for padding.
    pub mask: Vec<u32>,
    /// Per caption: the position of its last real token (end-of-text / [SEP]).
    pub eot: Vec<u32>,
    pub context: usize,
}

pub enum TextTokenizer {
    ClipBpe(Box<instant_clip_tokenizer::Tokenizer>),
    HuggingFace {
        tokenizer: Box<tokenizers::Tokenizer>,
        pad: u32,
    },
    Words(WordVocab),
}

impl TextTokenizer {
    pub fn clip() -> Self {
        TextTokenizer::ClipBpe(Box::new(instant_clip_tokenizer::Tokenizer::new()))
    }

    /// Loads an HF `tokenizer.json`. Its own padding and truncation settings are turned
    /// off: lengths are ours to set.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let mut tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let pad = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(TextTokenizer::HuggingFace {
            tokenizer: Box::new(tokenizer),
            pad,
        })
    }

    /// Token ids of one caption, special tokens included, before truncation and padding.
    fn raw_ids(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            TextTokenizer::ClipBpe(t) => {
                let mut tokens = vec![t.start_of_text()];
                t.encode(text, &mut tokens);
                tokens.push(t.end_of_text());
                Ok(tokens.into_iter().map(|t| t.to_u16() as u32).collect())
            }
            TextTokenizer::HuggingFace { tokenizer, .. } => Ok(tokenizer
                .encode(text, true)
                .map_err(|e| Error::Msg(format!("caption `{text}`: {e}")))?
                .get_ids()
                .to_vec()),
            TextTokenizer::Words(v) => v.ids(text),
        }
    }

    fn pad_id(&self) -> u32 {
        match self {
            // OpenCLIP pads CLIP captions with 0 and pools at the end-of-text position.
            TextTokenizer::ClipBpe(_) | TextTokenizer::Words(_) => 0,
            TextTokenizer::HuggingFace { pad, .. } => *pad,
        }
    }

    /// The text tower's input for `captions`, `context` tokens each, on `device`: the one
    /// constructor the data pipeline, the synthetic set and evaluation share.
    pub fn caption_input<S: AsRef<str>>(
        &self,
        captions: &[S],
        context: usize,
        device: &Device,
    ) -> Result<TowerInput> {
        let refs: Vec<&str> = captions.iter().map(AsRef::as_ref).collect();
        let t = self.encode_batch(&refs, context)?;
        let n = captions.len();
        Ok(TowerInput::Captions {
            tokens: Tensor::from_vec(t.ids, (n, context), device)?,
            mask: Tensor::from_vec(t.mask, (n, context), device)?,
            eot: Tensor::from_vec(t.eot, n, device)?,
        })
    }

    pub fn encode_batch(&self, texts: &[&str], context: usize) -> Result<Tokens> {
        if context < 2 {
            return Err(Error::Msg(format!(
                "context length {context} leaves no room for a caption"
            )));
        }
        let mut out = Tokens {
            ids: Vec::with_capacity(texts.len() * context),
            mask: Vec::with_capacity(texts.len() * context),
            eot: Vec::with_capacity(texts.len()),
            context,
        };
        for text in texts {
            let mut ids = self.raw_ids(text)?;
            if ids.len() > context {
                let last = *ids.last().expect("special tokens");
                ids.truncate(context - 1);
                ids.push(last);
            }
            let n = ids.len();
            out.eot.push((n - 1) as u32);
            out.mask
                .extend(std::iter::repeat_n(1, n).chain(std::iter::repeat_n(0, context - n)));
            ids.resize(context, self.pad_id());
            out.ids.extend(ids);
        }
        Ok(out)
    }
}
