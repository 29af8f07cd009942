//! Stop strings, matched on the decoded text as it grows, across token boundaries.

use std::sync::Arc;

use crate::error::Result;
use crate::loader::tokenizer::TextCodec;

/// A request's stop strings and the vocabulary that turns its tokens into text.
pub struct StopStrings {
    strings: Vec<String>,
    codec: Arc<TextCodec>,
    /// Tokens decoded at the end of the output on each check: enough for the longest string
    /// even when every character is spread over four byte tokens, with a special token or two.
    window: usize,
}

impl std::fmt::Debug for StopStrings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopStrings").field("strings", &self.strings).finish()
    }
}

impl StopStrings {
    /// None when there are no (non-empty) strings.
    pub fn new(strings: &[String], codec: Arc<TextCodec>) -> Option<Self> {
        let strings: Vec<String> = strings.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = strings.iter().map(|s| s.chars().count()).max()?;
        Some(StopStrings { strings, codec, window: 4 * longest + 8 })
    }

    /// Whether the text of `output` now holds one of the strings. Only the tail is decoded; its
    /// first character is not trusted (a tokenizer may drop a leading space there, or a character
    /// may begin in the tokens before), which the window's slack covers.
    pub fn matched(&self, output: &[u32]) -> Result<bool> {
        let start = output.len().saturating_sub(self.window);
        let text = self.codec.decode(&output[start..])?;
        let text = match (start, text.char_indices().nth(1)) {
            (0, _) => &text[..],
            (_, Some((i, _))) => &text[i..],
            (_, None) => "",
        };
        Ok(self.strings.iter().any(|s| text.contains(s.as_str())))
    }

    /// Where the text is cut, as OpenAI does: before the first occurrence of any string.
    pub fn cut(&self, text: &str) -> Option<usize> {
        self.strings.iter().filter_map(|s| text.find(s.as_str())).min()
    }
}
