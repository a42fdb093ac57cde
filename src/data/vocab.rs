//! A word-level tokenizer over a fixed vocabulary, CLIP's layout: start-of-text, the words,
//! end-of-text, then zero padding; captions longer than the context are truncated with the
//! end-of-text token kept last. Real BPE tokenizers come with the real-data pipeline.

use crate::error::{Error, Result};

pub const PAD: u32 = 0;
pub const SOT: u32 = 1;
pub const EOT: u32 = 2;

#[derive(Debug, Clone)]
pub struct WordVocab {
    words: Vec<String>,
}

impl WordVocab {
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(words: I) -> Self {
        let mut words: Vec<String> = words.into_iter().map(|w| w.as_ref().to_string()).collect();
        words.sort();
        words.dedup();
        WordVocab { words }
    }

    /// Ids in use, the special tokens included.
    pub fn size(&self) -> usize {
        self.words.len() + 3
    }

    /// Start-of-text, the words' ids, end-of-text: unpadded, untruncated.
    pub fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = vec![SOT];
        for w in text.split_whitespace() {
            let id = self
                .words
                .binary_search_by(|v| v.as_str().cmp(w))
                .map_err(|_| {
                    Error::Msg(format!(
                        "caption `{text}`: word `{w}` is not in the vocabulary"
                    ))
                })?;
            ids.push(id as u32 + 3);
        }
        ids.push(EOT);
        Ok(ids)
    }

    /// Token ids padded to `context`, and the position of the end-of-text token.
    pub fn encode(&self, text: &str, context: usize) -> Result<(Vec<u32>, u32)> {
        if context < 2 {
            return Err(Error::Msg(format!(
                "context length {context} leaves no room for a caption"
            )));
        }
        let mut ids = self.ids(text)?;
        if ids.len() > context {
            ids.truncate(context - 1);
            ids.push(EOT);
        }
        let eot = (ids.len() - 1) as u32;
        ids.resize(context, PAD);
        Ok((ids, eot))
    }
}
