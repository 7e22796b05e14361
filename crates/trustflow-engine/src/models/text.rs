//! Tokenisation through the `tokenizers` crate, from a model's `tokenizer.json`.
//!
//! [`TextTokenizer`] encodes one caption at a time (so that a caption the tokenizer
//! rejects costs only its own row), truncating to the model's context with the
//! tokenizer's own post-processor (so `<start>` and `<end>` are kept, as Hugging Face
//! does with `truncation=True, max_length=...`), and pads a batch to its longest row on
//! the right, as `padding=True` does.

use std::path::Path;

use serde_json::Value;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// Characters kept of a caption before tokenisation for CLIP (docs/method.md section 3).
pub const CLIP_CAPTION_CHARS: usize = 75;

/// The first `max_chars` characters (Unicode scalar values, as Python's `text[:n]`).
pub fn cut_chars(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((byte, _)) => &text[..byte],
        None => text,
    }
}

/// Token ids and attention mask of a batch, row-major `[rows, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
}

/// A tokenizer with the truncation and padding a model needs.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    max_chars: Option<usize>,
    pad_id: u32,
}

impl std::fmt::Debug for TextTokenizer {
    /// Without the vocabulary (49,408 entries for CLIP).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .field("max_chars", &self.max_chars)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Load `tokenizer_json`, truncating to `max_length` tokens (special tokens
    /// included) after cutting captions to `max_chars` characters when set. The pad
    /// token is, in order: the padding set in `tokenizer.json`, the `pad_token` of the
    /// `tokenizer_config.json` beside it, `<|endoftext|>` (CLIP's), `<pad>`, `[PAD]`.
    pub fn load(
        tokenizer_json: &Path,
        max_length: usize,
        max_chars: Option<usize>,
    ) -> Result<Self> {
        if !tokenizer_json.is_file() {
            return Err(Error::input(tokenizer_json, "tokenizer file not found"));
        }
        let mut tokenizer = Tokenizer::from_file(tokenizer_json).map_err(|e| {
            Error::input(tokenizer_json, format!("not a usable tokenizer.json: {e}"))
        })?;
        if max_length < 2 {
            return Err(Error::input(
                tokenizer_json,
                format!("context of {max_length} tokens is too short"),
            ));
        }
        let pad_id = pad_id(&tokenizer, tokenizer_json)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| Error::input(tokenizer_json, format!("cannot truncate: {e}")))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            max_length,
            max_chars,
            pad_id,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids of one caption (cut, tokenised with special tokens, truncated).
    pub fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        let text = match self.max_chars {
            Some(n) => cut_chars(text, n),
            None => text,
        };
        let encoding = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| format!("tokenizer cannot encode the caption: {e}"))?;
        let ids = encoding.get_ids();
        if ids.is_empty() {
            return Err("tokenizer gave no tokens for the caption".to_string());
        }
        Ok(ids.to_vec())
    }

    /// Pad encoded rows on the right to the longest, with the pad token and mask 0.
    pub fn pad(&self, rows: &[Vec<u32>]) -> TokenBatch {
        let seq_len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut input_ids = Vec::with_capacity(rows.len() * seq_len);
        let mut attention_mask = Vec::with_capacity(rows.len() * seq_len);
        for row in rows {
            input_ids.extend(row.iter().map(|&id| i64::from(id)));
            input_ids.extend(std::iter::repeat_n(
                i64::from(self.pad_id),
                seq_len - row.len(),
            ));
            attention_mask.extend(std::iter::repeat_n(1i64, row.len()));
            attention_mask.extend(std::iter::repeat_n(0i64, seq_len - row.len()));
        }
        TokenBatch {
            rows: rows.len(),
            seq_len,
            input_ids,
            attention_mask,
        }
    }
}

fn pad_id(tokenizer: &Tokenizer, path: &Path) -> Result<u32> {
    if let Some(padding) = tokenizer.get_padding() {
        return Ok(padding.pad_id);
    }
    let config_path = path.with_file_name("tokenizer_config.json");
    let configured = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|config| match config.get("pad_token") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        });
    if let Some(token) = &configured {
        return tokenizer.token_to_id(token).ok_or_else(|| {
            Error::input(
                &config_path,
                format!(
                    "pad_token `{token}` is not in the vocabulary of {}",
                    path.display()
                ),
            )
        });
    }
    ["<|endoftext|>", "<pad>", "[PAD]"]
        .iter()
        .find_map(|t| tokenizer.token_to_id(t))
        .ok_or_else(|| {
            Error::input(
                path,
                "no pad token: tokenizer.json sets no padding, there is no \
                 tokenizer_config.json with a pad_token, and none of <|endoftext|>, <pad>, \
                 [PAD] is in the vocabulary",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_chars_counts_characters_not_bytes() {
        assert_eq!(cut_chars("héllo", 2), "hé");
        assert_eq!(cut_chars("🌸🌸🌸", 2), "🌸🌸");
        assert_eq!(cut_chars("abc", 75), "abc");
        assert_eq!(cut_chars("", 3), "");
        assert_eq!(cut_chars("abc", 0), "");
    }
}
