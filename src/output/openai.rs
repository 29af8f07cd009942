//! Result lines in the OpenAI Batch API's output format: `{"id", "custom_id", "response":
//! {"status_code", "request_id", "body"}, "error"}`, the body a `chat.completion` or a
//! `text_completion` as the API returns them, and `error` for a request that cannot run.

use serde_json::{json, Value};

use crate::loader::tokenizer::token_display;
use crate::input::Endpoint;
use crate::output::Choice;
use crate::sampler::stable_hash;

/// The batch output line of a request that ran.
#[allow(clippy::too_many_arguments)]
pub fn response_line(
    custom_id: &Value,
    endpoint: Endpoint,
    model: &str,
    created: u64,
    prompt_tokens: usize,
    choices: &[Choice],
    token_bytes: &dyn Fn(u32) -> Vec<u8>,
) -> String {
    let tag = request_tag(custom_id);
    let completion_tokens: usize = choices.iter().map(|c| c.output_ids.len()).sum();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let body = match endpoint {
        Endpoint::Chat => json!({
            "id": format!("chatcmpl-{tag}"),
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": null},
                "logprobs": c.logprobs.as_ref().map(|l| chat_logprobs(l, token_bytes)),
                "finish_reason": c.finish.as_str(),
            })).collect::<Vec<_>>(),
            "usage": usage,
        }),
        Endpoint::Completion => json!({
            "id": format!("cmpl-{tag}"),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "text": c.text,
                "logprobs": c.logprobs.as_ref().map(|l| completion_logprobs(l, token_bytes)),
                "finish_reason": c.finish.as_str(),
            })).collect::<Vec<_>>(),
            "usage": usage,
        }),
    };
    json!({
        "id": format!("batch_req_{tag}"),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": tag, "body": body},
        "error": null,
    })
    .to_string()
}

/// The batch output line of a request that cannot run, with the reason.
pub fn error_line(custom_id: &Value, message: &str) -> String {
    json!({
        "id": format!("batch_req_{}", request_tag(custom_id)),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": "invalid_request", "message": message},
    })
    .to_string()
}

/// A stable tag per request (the same on every run and shard, so outputs compare and merge).
fn request_tag(custom_id: &Value) -> String {
    format!("{:016x}", stable_hash(custom_id.to_string().as_bytes()))
}

/// A token as the chat API reports it: its text (or `bytes:\x..` where it ends mid-character)
/// and its own bytes, which joined over a completion give its text exactly.
fn token_entry(bytes: Vec<u8>, logprob: f32) -> Value {
    json!({"token": token_display(&bytes), "logprob": logprob, "bytes": bytes})
}

fn chat_logprobs(lps: &[crate::sampler::TokenLogprob], token_bytes: &dyn Fn(u32) -> Vec<u8>) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = token_entry(token_bytes(l.token), l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(t, lp)| token_entry(token_bytes(t), lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Where each token starts in the completion's text, in characters (as the text is decoded:
/// invalid bytes one U+FFFD each, as `String::from_utf8_lossy` writes them). A token that
/// continues a character begun by the one before starts at that character.
fn text_offsets(tokens: impl Iterator<Item = Vec<u8>>) -> Vec<usize> {
    // `chars`: characters decoded before `pending`, the bytes of a character not yet finished.
    let (mut chars, mut pending) = (0usize, Vec::<u8>::new());
    tokens
        .map(|bytes| {
            let begins = pending.len();
            pending.extend_from_slice(&bytes);
            // The token starts at the first character that does not end before its first byte.
            let mut at = None;
            let mut pos = 0;
            let unit = |end: usize, chars: &mut usize, at: &mut Option<usize>| {
                if end > begins && at.is_none() {
                    *at = Some(*chars);
                }
                *chars += 1;
            };
            loop {
                let rest = &pending[pos..];
                let (valid, bad) = match std::str::from_utf8(rest) {
                    Ok(_) => (rest.len(), None),
                    Err(e) => (e.valid_up_to(), Some(e.error_len())),
                };
                for (i, c) in std::str::from_utf8(&rest[..valid]).unwrap_or_default().char_indices() {
                    unit(pos + i + c.len_utf8(), &mut chars, &mut at);
                }
                pos += valid;
                match bad {
                    // An invalid sequence is one U+FFFD.
                    Some(Some(n)) => {
                        pos += n;
                        unit(pos, &mut chars, &mut at);
                    }
                    // Done, or a character the next token may finish.
                    _ => break,
                }
            }
            pending.drain(..pos);
            at.unwrap_or(chars)
        })
        .collect()
}

fn completion_logprobs(lps: &[crate::sampler::TokenLogprob], token_bytes: &dyn Fn(u32) -> Vec<u8>) -> Value {
    let token_text = |t: u32| token_display(&token_bytes(t));
    let tokens: Vec<String> = lps.iter().map(|l| token_text(l.token)).collect();
    let offsets = text_offsets(lps.iter().map(|l| token_bytes(l.token)));
    let top: Vec<Value> = lps
        .iter()
        .map(|l| Value::Object(l.top.iter().map(|&(t, lp)| (token_text(t), json!(lp))).collect()))
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::text_offsets;

    /// Offsets count characters of the decoded text, whatever the tokens' byte boundaries.
    #[test]
    fn text_offsets_count_characters_across_split_tokens() {
        let t = |parts: &[&[u8]]| text_offsets(parts.iter().map(|p| p.to_vec()));
        assert_eq!(t(&[b"ab", b"c", b" d"]), [0, 2, 3]);
        // ’ (e2 80 99) split over two tokens, then an emoji (4 bytes) over three.
        assert_eq!(t(&[b"a", b"\xe2\x80", b"\x99b", b"c", b"\xf0\x9f", b"\x99", b"\x82!", b"x"]), [0, 1, 1, 3, 4, 4, 4, 6]);
        // An invalid byte is one replacement character.
        assert_eq!(t(&[b"\xff", b"a", b"\xe2", b"\xff", b"b"]), [0, 1, 2, 3, 4]);
        let text = String::from_utf8_lossy(b"\xffa\xe2\xffb");
        assert_eq!(text.chars().count(), 5);
    }
}
