//! Text in and out through the model's `tokenizer.json`.

use std::path::Path;

use std::str::FromStr;

use crate::error::{Error, Result};

#[path = "gguf_vocab.rs"]
mod gguf_vocab;

pub struct TextCodec {
    inner: tokenizers::Tokenizer,
    path: String,
    /// The vocabulary spells bytes in GPT-2's byte-level alphabet (its decoder says so).
    byte_level: bool,
}

/// GPT-2's byte-level alphabet read backwards: the byte each vocabulary character stands for.
/// Bytes 33..=126, 161..=172 and 174..=255 are their own characters; the others, in order,
/// became U+0100 onwards.
fn byte_of_char(c: char) -> Option<u8> {
    let own = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if c < 256 {
        return own(c).then_some(c as u8);
    }
    (0u32..256).filter(|&b| !own(b)).nth((c - 256) as usize).map(|b| b as u8)
}

/// A token's bytes as log-probabilities show them: the text where the bytes are whole UTF-8,
/// else `bytes:\xe2\x80` as OpenAI's API writes a token that ends mid-character.
pub fn token_display(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => bytes.iter().fold(String::from("bytes:"), |mut s, b| {
            s.push_str(&format!("\\x{b:02x}"));
            s
        }),
    }
}

impl TextCodec {
    fn new(inner: tokenizers::Tokenizer, path: String) -> Self {
        let byte_level = inner.get_decoder().and_then(|d| serde_json::to_string(d).ok()).is_some_and(|j| j.contains("\"ByteLevel\""));
        TextCodec { inner, path, byte_level }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::invalid(path.display().to_string(), format!("cannot read the tokenizer: {e}")))?;
        Ok(TextCodec::new(inner, path.display().to_string()))
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

    /// The bytes one token adds to a text, as it would mid-sequence (a leading space included):
    /// a byte-level vocabulary's characters map back to their bytes; a SentencePiece one reads
    /// `▁` as a space and `<0xHH>` as that byte. Added and special tokens are their text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(token) = self.inner.id_to_token(id) else { return Vec::new() };
        if self.inner.get_added_tokens_decoder().contains_key(&id) {
            return token.into_bytes();
        }
        if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')).filter(|h| h.len() == 2) {
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                return vec![b];
            }
        }
        if self.byte_level {
            if let Some(bytes) = token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
                return bytes;
            }
        }
        token.replace('\u{2581}', " ").into_bytes()
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
        Ok(Some(TextCodec::new(inner, file.to_string())))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
