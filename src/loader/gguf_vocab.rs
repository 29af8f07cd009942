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

/// llama.cpp's pre-tokenizer regexes for `deepseek-llm` (DeepSeek-V2) and `deepseek-v3`, in order
/// (the text of its `llama-vocab.cpp`, llama-cpp-python 0.3.36's vendored copy).
const DEEPSEEK_LLM_SPLITS: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];
const DEEPSEEK_V3_SPLITS: &[&str] = &[
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];

/// A sequence of `Isolated` regex splits, then `last`.
fn isolated_splits(regexes: &[&str], last: Value) -> Value {
    let mut steps: Vec<Value> = regexes.iter().map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false})).collect();
    steps.push(last);
    json!({"type": "Sequence", "pretokenizers": steps})
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
        // DeepSeek-V2's and V3's: llama.cpp's splits for these names, each regex applied to the
        // pieces of the one before (matches and the text between them kept, as HF's `Isolated`
        // splits), then the bytes mapped without a split of their own.
        "deepseek-llm" => (Value::Null, isolated_splits(DEEPSEEK_LLM_SPLITS, byte_level(false))),
        "deepseek-v3" => (Value::Null, isolated_splits(DEEPSEEK_V3_SPLITS, byte_level(false))),
        other => {
            return Err(Error::invalid(
                file,
                format!("tokenizer.ggml.pre `{other}` is not supported (supported: default, gpt2, olmo, qwen2, deepseek-llm, deepseek-v3); give the model's tokenizer.json beside a safetensors checkpoint instead"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper};

    /// The pieces the regex splits of a pre-tokenizer name cut `text` into (before the bytes
    /// are mapped).
    fn pieces(regexes: &[&str], text: &str) -> Vec<String> {
        let steps: Vec<Value> = regexes.iter().map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false})).collect();
        let pre: PreTokenizerWrapper = serde_json::from_value(json!({"type": "Sequence", "pretokenizers": steps})).unwrap();
        let mut s = PreTokenizedString::from(text);
        pre.pre_tokenize(&mut s).unwrap();
        s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(p, _, _)| p.to_string()).collect()
    }

    #[test]
    fn deepseek_pre_tokenizers_split_as_llama_cpp_does() {
        // Worked by hand from llama.cpp's regexes: V3 groups digits by three and keeps CJK runs
        // whole; V2 splits lines, letter runs with one leading space, punctuation, trailing
        // spaces, CJK and digit runs in that order.
        let v3 = pieces(DEEPSEEK_V3_SPLITS, "Hello, 世界! 12345 x\n\nok");
        assert_eq!(v3, ["Hello", ",", " ", "世界", "!", " ", "123", "45", " x", "\n\n", "ok"]);
        let v2 = pieces(DEEPSEEK_LLM_SPLITS, "Hello, World! 12345\n日本 ok  ");
        assert_eq!(v2, ["Hello", ",", " World", "!", " ", "12345", "\n", "日本", " ok", "  "]);
        // The names build a tokenizer.json whose pre-tokenizer the tokenizers crate takes.
        for name in ["deepseek-llm", "deepseek-v3"] {
            let (normalizer, pre) = pre_tokenizer(name, "test.gguf").unwrap();
            assert!(normalizer.is_null());
            let _: PreTokenizerWrapper = serde_json::from_value(pre).unwrap();
        }
        let err = pre_tokenizer("deepseek-coder", "test.gguf").unwrap_err().to_string();
        assert!(err.contains("test.gguf") && err.contains("deepseek-coder") && err.contains("deepseek-v3"), "{err}");
    }
}
