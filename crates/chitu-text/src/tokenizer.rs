//! Prompt cleaning and tokenizing exactly as diffusers' `WanPipeline` does before the encoder.

use crate::TextError;
use std::path::Path;
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use unicode_normalization::UnicodeNormalization;

/// Cleans a prompt as the pipeline does: NFC (the part of ftfy's `fix_text` that applies to
/// well-formed text), HTML-unescape twice, fold whitespace runs into one space, trim.
pub fn clean_prompt(text: &str) -> String {
    let text: String = text.nfc().collect();
    let once = html_escape::decode_html_entities(&text).into_owned();
    let twice = html_escape::decode_html_entities(&once).into_owned();
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Token ids and attention mask of a batch, each `[B, max_len]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids, `batch * max_len`, padded with the pad id.
    pub ids: Vec<i64>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<i64>,
    /// Prompts in the batch.
    pub batch: usize,
    /// Tokens per prompt.
    pub max_len: usize,
}

impl Encoded {
    /// Tokens of row `i` that are not padding.
    pub fn len(&self, i: usize) -> usize {
        self.mask[i * self.max_len..(i + 1) * self.max_len]
            .iter()
            .filter(|&&m| m > 0)
            .count()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.batch == 0
    }
}

/// The T5 tokenizer of a Wan model folder (`tokenizer/tokenizer.json`).
#[derive(Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    pad_id: u32,
    pad_token: String,
}

impl T5Tokenizer {
    /// Loads a `tokenizer.json`; a missing or malformed file is an error naming it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TextError> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(TextError::Tokenizer(format!("{} does not exist", path.display())));
        }
        let inner = Tokenizer::from_file(path).map_err(|e| TextError::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::from_tokenizer(inner).map_err(|e| TextError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Loads a `tokenizer.json` held in memory (for embedded models).
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, TextError> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        Self::from_tokenizer(inner).map_err(TextError::Tokenizer)
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Self, String> {
        let pad_token = "<pad>".to_string();
        let pad_id = inner.token_to_id(&pad_token).ok_or("no <pad> token")?;
        Ok(Self {
            inner,
            pad_id,
            pad_token,
        })
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Cleans each prompt, tokenizes with the closing `</s>`, truncates to `max_len` (keeping
    /// `</s>`, as transformers does) and pads to `max_len` with `<pad>`.
    pub fn encode(&self, prompts: &[&str], max_len: usize) -> Result<Encoded, TextError> {
        if max_len == 0 {
            return Err(TextError::Input("max_sequence_length must be at least 1".into()));
        }
        let mut tok = self.inner.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        tok.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_len),
            direction: PaddingDirection::Right,
            pad_id: self.pad_id,
            pad_token: self.pad_token.clone(),
            ..Default::default()
        }));
        let cleaned: Vec<String> = prompts.iter().map(|p| clean_prompt(p)).collect();
        let encodings = tok
            .encode_batch(cleaned, true)
            .map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let mut out = Encoded {
            ids: Vec::with_capacity(prompts.len() * max_len),
            mask: Vec::with_capacity(prompts.len() * max_len),
            batch: prompts.len(),
            max_len,
        };
        for e in &encodings {
            out.ids.extend(e.get_ids().iter().map(|&i| i as i64));
            out.mask.extend(e.get_attention_mask().iter().map(|&m| m as i64));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleaning_unescapes_twice_and_folds_whitespace() {
        assert_eq!(clean_prompt("  a\t\tcat \n walks  "), "a cat walks");
        assert_eq!(clean_prompt("fish &amp;amp; chips"), "fish & chips");
        assert_eq!(clean_prompt("caf\u{65}\u{301}"), "caf\u{e9}");
        assert_eq!(clean_prompt(""), "");
    }
}
