//! Text in and out through the model's `tokenizer.json`.

use std::path::Path;

use crate::error::{Error, Result};

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

    /// Text of `ids`, special tokens skipped; the whole sequence at once, so characters spread
    /// over several byte tokens come out whole.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::invalid(&self.path, format!("decoding failed: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
