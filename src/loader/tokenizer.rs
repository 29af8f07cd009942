//! Text in and out through the model's `tokenizer.json`.

use std::path::Path;

use std::str::FromStr;

use crate::error::{Error, Result};

#[path = "gguf_vocab.rs"]
mod gguf_vocab;

pub struct TextCodec {
    inner: tokenizers::Tokenizer,
    path: String,
}

impl TextCodec {
    pub fn load(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::invalid(path.display().to_string(), format!("cannot read the tokenizer: {e}")))?;
        Ok(TextCodec { inner, path: path.display().to_string() })
    }

    /// Token ids of `text`, with the special tokens the tokenizer adds (BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| Error::invalid(&self.path, format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` as it stands: a rendered chat prompt already holds its special tokens.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::invalid(&self.path, format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of one token, special tokens included (log-probabilities name their tokens).
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Text of `ids`, special tokens skipped; the whole sequence at once, so characters spread
    /// over several byte tokens come out whole.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::invalid(&self.path, format!("decoding failed: {e}")))
    }

    /// The tokenizer embedded in a GGUF file's metadata, or None when it has none.
    pub fn from_gguf(metadata: &std::collections::BTreeMap<String, crate::loader::gguf::Meta>, file: &str) -> Result<Option<Self>> {
        let Some(json) = gguf_vocab::tokenizer_json(metadata, file)? else { return Ok(None) };
        let inner = tokenizers::Tokenizer::from_str(&json.to_string())
            .map_err(|e| Error::invalid(file, format!("cannot build the tokenizer from the embedded vocabulary: {e}")))?;
        Ok(Some(TextCodec { inner, path: file.to_string() }))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
