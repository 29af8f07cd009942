//! A GGUF file's embedded vocabulary as a Hugging Face `tokenizer.json`, for the tokenizers crate:
//! SentencePiece-style (`tokenizer.ggml.model = llama`: byte fallback, `▁` for spaces, merges
//! derived from the pieces' scores as transformers derives them from a SentencePiece model) and
//! GPT-2-style byte-level BPE (`gpt2`, with the merges stored and the pre-tokenizer that
//! `tokenizer.ggml.pre` names). Control tokens become special added tokens; BOS is added when the
//! file says so.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::loader::gguf::Meta;

/// llama.cpp's token types.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

fn strings<'m>(m: &'m BTreeMap<String, Meta>, key: &str, file: &str) -> Result<Vec<&'m str>> {
    match m.get(key) {
        Some(Meta::Array(a)) => a.iter().map(|v| v.as_str().ok_or_else(|| Error::invalid(file, format!("`{key}` holds a non-string")))).collect(),
        Some(_) => Err(Error::invalid(file, format!("`{key}` is not an array"))),
        None => Ok(Vec::new()),
    }
}

fn numbers(m: &BTreeMap<String, Meta>, key: &str, n: usize, file: &str) -> Result<Option<Vec<f64>>> {
    match m.get(key) {
        Some(Meta::Array(a)) if a.len() == n => a.iter().map(|v| v.as_f64().ok_or_else(|| Error::invalid(file, format!("`{key}` holds a non-number")))).collect::<Result<_>>().map(Some),
        Some(_) => Err(Error::invalid(file, format!("`{key}` does not hold one number per token ({n})"))),
        None => Ok(None),
    }
}

/// The Hugging Face pre-tokenizer for llama.cpp's pre-tokenizer name.
fn pre_tokenizer(pre: &str, file: &str) -> Result<(Value, Value)> {
    let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    Ok(match pre {
        // GPT-2's own split (also OLMo's).
        "default" | "gpt2" | "olmo" | "gpt-2" => (Value::Null, byte_level(true)),
        "qwen2" => (
            json!({"type": "NFC"}),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
                 "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
        ),
        other => {
            return Err(Error::invalid(
                file,
                format!("tokenizer.ggml.pre `{other}` is not supported (supported: default, gpt2, olmo, qwen2); give the model's tokenizer.json beside a safetensors checkpoint instead"),
            ))
        }
    })
}

/// Merges for a SentencePiece vocabulary: every split of a piece into two pieces of the
/// vocabulary, ranked by the merged piece's score (highest first; ties in vocabulary order), and
/// within one piece by the ids of its halves, as transformers' SentencePieceExtractor ranks them.
fn spm_merges(tokens: &[&str], scores: &[f64], skip: &[bool]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().filter(|(i, _)| !skip[*i]).map(|(i, t)| (*t, i)).collect();
    let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if skip[id] {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&piece[..at]), ids.get(&piece[at..])) {
                merges.push((scores[id], id, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3)));
    merges.into_iter().map(|(_, _, l, r)| (tokens[l].to_string(), tokens[r].to_string())).collect()
}

/// The `tokenizer.json` of the embedded vocabulary, or None when there is none.
pub fn tokenizer_json(m: &BTreeMap<String, Meta>, file: &str) -> Result<Option<Value>> {
    let Some(model) = m.get("tokenizer.ggml.model").and_then(Meta::as_str) else { return Ok(None) };
    let tokens = strings(m, "tokenizer.ggml.tokens", file)?;
    if tokens.is_empty() {
        return Ok(None);
    }
    let types = numbers(m, "tokenizer.ggml.token_type", tokens.len(), file)?.unwrap_or_else(|| vec![1.0; tokens.len()]);
    let special: Vec<bool> = types.iter().map(|&t| t as u64 == CONTROL || t as u64 == USER_DEFINED).collect();
    let id = |key: &str| m.get(key).and_then(Meta::as_u64).filter(|&i| (i as usize) < tokens.len());
    let bos = id("tokenizer.ggml.bos_token_id");
    let add_bos = match m.get("tokenizer.ggml.add_bos_token") {
        Some(Meta::Bool(b)) => *b,
        _ => model == "llama",
    };
    let added: Vec<Value> = (0..tokens.len())
        .filter(|&i| special[i])
        .map(|i| {
            json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
                   "special": types[i] as u64 == CONTROL})
        })
        .collect();
    let mut vocab = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A repeated piece keeps its first id (llama.cpp looks pieces up the same way).
        vocab.entry(t.to_string()).or_insert(json!(i));
    }
    let post = match (add_bos, bos) {
        (true, Some(b)) => {
            let t = tokens[b as usize];
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
                   "special_tokens": {t: {"id": t, "ids": [b], "tokens": [t]}}})
        }
        _ => Value::Null,
    };
    let json = match model {
        "llama" => {
            let scores = numbers(m, "tokenizer.ggml.scores", tokens.len(), file)?.unwrap_or_else(|| vec![0.0; tokens.len()]);
            // Byte tokens (<0x41>) and special ones take no part in merges.
            let skip: Vec<bool> = (0..tokens.len()).map(|i| special[i] || types[i] as u64 == 6).collect();
            let merges: Vec<Value> = spm_merges(&tokens, &scores, &skip).into_iter().map(|(l, r)| json!([l, r])).collect();
            let unk = id("tokenizer.ggml.unknown_token_id").map(|i| tokens[i as usize]);
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                               {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
                "pre_tokenizer": null,
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        "gpt2" => {
            let pre = m.get("tokenizer.ggml.pre").and_then(Meta::as_str).unwrap_or("default");
            let (normalizer, pre_tokenizer) = pre_tokenizer(pre, file)?;
            // Merges whose halves or result are not in the vocabulary are dropped (llama.cpp
            // ignores them too; the tokenizers crate refuses them).
            let merges: Vec<Value> = strings(m, "tokenizer.ggml.merges", file)?
                .into_iter()
                .filter_map(|s| s.split_once(' '))
                .filter(|(l, r)| vocab.contains_key(*l) && vocab.contains_key(*r) && vocab.contains_key(&format!("{l}{r}")))
                .map(|(l, r)| json!([l, r]))
                .collect();
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
                "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
            })
        }
        other => return Err(Error::invalid(file, format!("tokenizer.ggml.model `{other}` is not supported (supported: llama, gpt2)"))),
    };
    Ok(Some(json))
}
