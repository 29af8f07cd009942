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

fn completion_logprobs(lps: &[crate::sampler::TokenLogprob], token_bytes: &dyn Fn(u32) -> Vec<u8>) -> Value {
    let token_text = |t: u32| token_display(&token_bytes(t));
    let tokens: Vec<String> = lps.iter().map(|l| token_text(l.token)).collect();
    let mut offset = 0usize;
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|t| {
            let at = offset;
            offset += t.chars().count();
            at
        })
        .collect();
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
