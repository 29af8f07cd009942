//! Result lines in the OpenAI Batch API's output format: `{"id", "custom_id", "response":
//! {"status_code", "request_id", "body"}, "error"}`, the body a `chat.completion` or a
//! `text_completion` as the API returns them, and `error` for a request that cannot run.

use serde_json::{json, Value};

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
    token_text: &dyn Fn(u32) -> String,
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
                "logprobs": c.logprobs.as_ref().map(|l| chat_logprobs(l, token_text)),
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
                "logprobs": c.logprobs.as_ref().map(|l| completion_logprobs(l, token_text)),
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

fn token_entry(text: String, logprob: f32) -> Value {
    let bytes: Vec<u8> = text.as_bytes().to_vec();
    json!({"token": text, "logprob": logprob, "bytes": bytes})
}

fn chat_logprobs(lps: &[crate::sampler::TokenLogprob], token_text: &dyn Fn(u32) -> String) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = token_entry(token_text(l.token), l.logprob);
            e["top_logprobs"] = l.top.iter().map(|&(t, lp)| token_entry(token_text(t), lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

fn completion_logprobs(lps: &[crate::sampler::TokenLogprob], token_text: &dyn Fn(u32) -> String) -> Value {
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
