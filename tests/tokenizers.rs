//! The real Mixtral (SentencePiece BPE with byte fallback) and Qwen2 (byte-level BPE) vocabularies:
//! BOS added where the tokenizer adds it, and text back without mangled multi-byte characters.

use std::path::PathBuf;

use moegen::loader::tokenizer::TextCodec;

fn codec(name: &str) -> TextCodec {
    TextCodec::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers").join(name)).unwrap()
}

const TEXTS: [&str; 4] = [
    "Hello, world!",
    "naïve café — déjà vu",
    "日本語のテキストと中文",
    "emoji 🎉🚀 and ünïcödé, tabs\tand\nnewlines",
];

#[test]
fn mixtral_adds_bos_and_round_trips_multibyte_text() {
    let c = codec("mixtral-v1.tokenizer.json");
    assert_eq!(c.vocab_size(), 32000);
    let ids = c.encode("Hello").unwrap();
    assert_eq!(ids[0], 1, "Mixtral's tokenizer starts with <s> = 1");
    for text in TEXTS {
        let ids = c.encode(text).unwrap();
        assert_eq!(c.decode(&ids).unwrap(), text, "{ids:?}");
    }
    // The emoji falls back to bytes: several tokens for one character, decoded whole.
    let ids = c.encode("🎉").unwrap();
    assert!(ids.len() >= 3, "{ids:?}");
}

#[test]
fn qwen2_round_trips_multibyte_text() {
    let c = codec("qwen2.tokenizer.json");
    assert_eq!(c.vocab_size(), 151936);
    for text in TEXTS {
        let ids = c.encode(text).unwrap();
        assert_eq!(c.decode(&ids).unwrap(), text, "{ids:?}");
    }
}

#[test]
fn a_broken_tokenizer_file_is_an_error_naming_it() {
    let dir = std::env::temp_dir().join(format!("moegen-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, "{\"model\": 3").unwrap();
    let e = TextCodec::load(&path).err().expect("a broken file is refused").to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same vocabularies embedded in GGUF files by llama.cpp's converter (`--vocab-only`,
/// scripts/make_llama_fixtures.sh): the tokenizer built from the metadata encodes and decodes as
/// the tokenizer.json does.
#[test]
fn gguf_vocabularies_tokenize_as_their_tokenizer_json() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let more = [
        "  leading spaces and trailing  ",
        "code: fn main() { println!(\"{}\", 1 + 2); }",
        "Numbers 1234567 and 3.14159, URLs https://example.com/a?b=c",
        "<|im_start|>user\nHi<|im_end|>",
        "",
    ];
    for (json, gguf) in [("mixtral-v1.tokenizer.json", "mixtral-vocab.gguf"), ("qwen2.tokenizer.json", "qwen2-vocab.gguf")] {
        let want = codec(json);
        let g = moegen::loader::gguf::open(&dir.join(gguf)).unwrap();
        let got = TextCodec::from_gguf(&g.metadata, gguf).unwrap().expect("an embedded vocabulary");
        for text in TEXTS.iter().chain(&more) {
            let (a, b) = (got.encode(text).unwrap(), want.encode(text).unwrap());
            assert_eq!(a, b, "{gguf}: {text:?}");
            assert_eq!(got.decode(&a).unwrap(), want.decode(&b).unwrap(), "{gguf}: decoding {text:?}");
        }
    }
}

/// Log-probabilities name each token by its own bytes: joined over a text's tokens (BOS left out)
/// they must give the text exactly, on both kinds of vocabulary, byte-fallback pieces and
/// characters split across tokens included; a piece that ends mid-character shows as `bytes:`.
#[test]
fn token_bytes_join_to_the_text_on_both_vocabularies() {
    for (name, skip) in [("mixtral-v1.tokenizer.json", 1), ("qwen2.tokenizer.json", 0)] {
        let c = codec(name);
        for text in TEXTS {
            let ids = c.encode(text).unwrap();
            let joined: Vec<u8> = ids[skip..].iter().flat_map(|&t| c.token_bytes(t)).collect();
            // SentencePiece prefixes the first word with a space, which decoding drops.
            let joined = if skip == 1 { joined.strip_prefix(b" ").unwrap_or(&joined).to_vec() } else { joined };
            assert_eq!(String::from_utf8_lossy(&joined), text, "{name}: {ids:?}");
        }
        // A character neither vocabulary holds whole (cuneiform).
        let ids = c.encode("\u{12000}").unwrap();
        let partial: Vec<String> = ids[skip..].iter().map(|&t| moegen::loader::tokenizer::token_display(&c.token_bytes(t))).collect();
        assert!(partial.iter().any(|p| p.starts_with("bytes:\\x")), "{name}: {partial:?}");
    }
    // A word with its leading space, as the chat API shows it.
    let q = codec("qwen2.tokenizer.json");
    let ids = q.encode_raw("a cat").unwrap();
    assert_eq!(q.token_bytes(*ids.last().unwrap()), b" cat");
}

/// DeepSeek-V2's and V3's pre-tokenizers (`tokenizer.ggml.pre` = `deepseek-llm`, `deepseek-v3`),
/// here over the Qwen2 vocabulary with the name written in its place: the token ids llama.cpp's
/// llama-tokenize gives for texts that reach every split (scripts/make_llama_fixtures.sh). This
/// vocabulary has no multi-digit tokens, so V3's digit groups show only in the splits' unit test
/// (`loader::gguf_vocab`).
#[test]
fn deepseek_pre_tokenizers_tokenize_as_llama_cpp_does() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    let recorded: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("deepseek-pre-tokens.json")).unwrap()).unwrap();
    let texts: Vec<&str> = recorded["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let g = moegen::loader::gguf::open(&dir.join("qwen2-vocab.gguf")).unwrap();
    for pre in ["deepseek-llm", "deepseek-v3"] {
        let mut metadata = g.metadata.clone();
        metadata.insert("tokenizer.ggml.pre".into(), moegen::loader::gguf::Meta::Str(pre.into()));
        let codec = TextCodec::from_gguf(&metadata, pre).unwrap().expect("an embedded vocabulary");
        for (text, want) in texts.iter().zip(recorded["llama_cpp"][pre].as_array().unwrap()) {
            let want: Vec<u32> = want.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(codec.encode(text).unwrap(), want, "{pre}: {text:?}");
            assert_eq!(codec.decode(&want).unwrap(), *text, "{pre}: decoding {text:?}");
        }
    }
}
