//! The job's input lines: moegen's own (`{"id", "prompt" | "prompt_ids" | "messages", ...}`) and
//! the OpenAI Batch API's (`{"custom_id", "method", "url", "body"}`, as vLLM's `run_batch` reads
//! them), each with its own sampling settings; and `--shard I/N`, a stable share of them.

pub mod chat;

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which API a line came in, and so how its result is written.
#[derive(Clone, Debug, PartialEq)]
pub enum LineFormat {
    Native,
    OpenAi { endpoint: Endpoint, model: Option<String> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completion,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    /// OpenAI chat messages, rendered with the chat template.
    Chat(Vec<Value>),
}

/// A line's own settings; what it leaves out, the command's flags (or OpenAI's defaults) give.
#[derive(Clone, Debug, PartialEq)]
pub struct LineParams {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// Completions to generate from the prompt.
    pub n: usize,
    /// Log-probabilities of each generated token, with this many alternatives.
    pub logprobs: Option<usize>,
    pub ignore_eos: Option<bool>,
}

impl Default for LineParams {
    fn default() -> Self {
        LineParams {
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            n: 1,
            logprobs: None,
            ignore_eos: None,
        }
    }
}

/// One input line.
#[derive(Clone, Debug, PartialEq)]
pub struct JobLine {
    /// 1-based line number in the input file, for error messages.
    pub line: usize,
    /// `id`, or an OpenAI line's `custom_id`.
    pub id: Value,
    pub format: LineFormat,
    /// What to run, or why an OpenAI line cannot run (its result is an error line; a bad line of
    /// moegen's own format stops the job before it starts instead).
    pub request: std::result::Result<(Prompt, LineParams), String>,
}

impl JobLine {
    /// The id as canonical JSON text: how outputs are matched on resume and merge, shards are
    /// drawn, and a sequence's random stream is seeded.
    pub fn id_key(&self) -> String {
        self.id.to_string()
    }
}

fn line_error(path: &Path, line: usize, detail: impl Into<String>) -> Error {
    Error::invalid(format!("{}:{line}", path.display()), detail)
}

type Fields = Map<String, Value>;

fn uint(o: &Fields, key: &str) -> std::result::Result<Option<u64>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("`{key}` should be a non-negative integer, found {v}")),
    }
}

fn number(o: &Fields, key: &str) -> std::result::Result<Option<f32>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().filter(|x| x.is_finite()).map(|x| Some(x as f32)).ok_or_else(|| format!("`{key}` should be a number, found {v}")),
    }
}

fn flag(o: &Fields, key: &str) -> std::result::Result<Option<bool>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(format!("`{key}` should be true or false, found {v}")),
    }
}

fn token_ids(v: &Value, key: &str) -> std::result::Result<Vec<u32>, String> {
    let a = v.as_array().ok_or_else(|| format!("`{key}` should be a list of token ids, found {v}"))?;
    a.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| format!("`{key}` holds {x}, not a token id"))).collect()
}

/// The sampling and stopping settings of a line (moegen's fields) or an OpenAI body.
fn params(o: &Fields, endpoint: Option<Endpoint>) -> std::result::Result<LineParams, String> {
    let mut p = LineParams::default();
    let given: Vec<&str> = ["max_tokens", "max_completion_tokens", "max_new_tokens"].into_iter().filter(|k| o.get(*k).is_some_and(|v| !v.is_null())).collect();
    if given.len() > 1 {
        return Err(format!("give one of {}, not several", given.join(", ")));
    }
    p.max_tokens = given.first().map(|k| uint(o, k)).transpose()?.flatten().map(|n| n as usize);
    p.temperature = number(o, "temperature")?;
    if let Some(t) = p.temperature {
        if t < 0.0 {
            return Err(format!("`temperature` must be >= 0, found {t}"));
        }
    }
    p.top_p = number(o, "top_p")?;
    if let Some(t) = p.top_p {
        if !(t > 0.0 && t <= 1.0) {
            return Err(format!("`top_p` must be in (0, 1], found {t}"));
        }
    }
    p.top_k = match o.get("top_k") {
        None | Some(Value::Null) => None,
        // vLLM's -1 (and 0) mean no cut.
        Some(v) if v.as_i64() == Some(-1) => Some(0),
        Some(_) => uint(o, "top_k")?.map(|k| k as usize),
    };
    p.seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().map(|s| s as u64).or(v.as_u64()).ok_or_else(|| format!("`seed` should be an integer, found {v}"))?),
    };
    p.stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            a.iter().map(|s| s.as_str().map(str::to_string).ok_or_else(|| format!("`stop` holds {s}, not a string"))).collect::<std::result::Result<_, _>>()?
        }
        Some(v) => return Err(format!("`stop` should be a string or a list of strings, found {v}")),
    };
    if let Some(v) = o.get("stop_token_ids").filter(|v| !v.is_null()) {
        p.stop_token_ids = token_ids(v, "stop_token_ids")?;
    }
    if let Some(n) = uint(o, "n")? {
        if !(1..=128).contains(&n) {
            return Err(format!("`n` must be between 1 and 128, found {n}"));
        }
        p.n = n as usize;
    }
    p.logprobs = match (endpoint, o.get("logprobs")) {
        (_, None | Some(Value::Null)) => None,
        // Chat: `logprobs: true` with `top_logprobs` alternatives.
        (Some(Endpoint::Chat), _) => match flag(o, "logprobs")? {
            Some(true) => Some(uint(o, "top_logprobs")?.unwrap_or(0).min(20) as usize),
            _ => None,
        },
        (_, Some(Value::Bool(b))) => b.then_some(0),
        // Completions (and moegen's own lines): the number of alternatives.
        (_, Some(_)) => uint(o, "logprobs")?.map(|n| n.min(20) as usize),
    };
    if endpoint == Some(Endpoint::Chat) && p.logprobs.is_none() && uint(o, "top_logprobs")?.is_some_and(|n| n > 0) {
        return Err("`top_logprobs` needs `logprobs: true`".into());
    }
    p.ignore_eos = flag(o, "ignore_eos")?;
    // What moegen does not do is refused, not silently ignored.
    let refuse = |key: &str, active: bool| if active { Err(format!("`{key}` is not supported")) } else { Ok(()) };
    let nonzero = |key: &str| o.get(key).and_then(Value::as_f64).is_some_and(|x| x != 0.0);
    refuse("presence_penalty", nonzero("presence_penalty"))?;
    refuse("frequency_penalty", nonzero("frequency_penalty"))?;
    refuse("logit_bias", o.get("logit_bias").is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty())))?;
    refuse("stream", o.get("stream") == Some(&Value::Bool(true)))?;
    refuse("echo", o.get("echo") == Some(&Value::Bool(true)))?;
    refuse("suffix", o.get("suffix").is_some_and(|v| !v.is_null() && v != ""))?;
    refuse("best_of", uint(o, "best_of")?.is_some_and(|b| b as usize > p.n))?;
    for key in ["tools", "functions", "tool_choice", "function_call"] {
        refuse(key, o.get(key).is_some_and(|v| !v.is_null() && v != "none" && v.as_array().is_none_or(|a| !a.is_empty())))?;
    }
    refuse("response_format", o.get("response_format").is_some_and(|v| !v.is_null() && v.get("type").and_then(Value::as_str) != Some("text")))?;
    Ok(p)
}

/// Chat messages as the template expects them: `content` as a string (a list of text parts joined).
fn messages(v: &Value) -> std::result::Result<Vec<Value>, String> {
    let list = v.as_array().filter(|a| !a.is_empty()).ok_or_else(|| format!("`messages` should be a non-empty list, found {v}"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let mut m = m.as_object().cloned().ok_or_else(|| format!("message {i} should be an object"))?;
            if !m.get("role").is_some_and(Value::is_string) {
                return Err(format!("message {i} has no `role` string"));
            }
            if let Some(Value::Array(parts)) = m.get("content") {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        (kind, _) => return Err(format!("message {i} has a content part of type {} (only text is supported)", kind.unwrap_or("?"))),
                    }
                }
                m.insert("content".into(), Value::String(text));
            }
            Ok(Value::Object(m))
        })
        .collect()
}

/// The prompt of a moegen line, or of an OpenAI body (`prompt` for completions, `messages` for chat).
fn prompt(o: &Fields, endpoint: Option<Endpoint>) -> std::result::Result<Prompt, String> {
    let keys: Vec<&str> = ["prompt", "prompt_ids", "messages"].into_iter().filter(|k| o.contains_key(*k)).collect();
    match (endpoint, keys.as_slice()) {
        (Some(Endpoint::Chat), _) => o.get("messages").ok_or_else(|| "a chat completion needs `messages`".to_string()).and_then(messages).map(Prompt::Chat),
        (Some(Endpoint::Completion), _) => match o.get("prompt") {
            Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(Prompt::Text(a[0].as_str().unwrap().to_string())),
            Some(v @ Value::Array(a)) if a.iter().all(Value::is_u64) => token_ids(v, "prompt").map(Prompt::Ids),
            Some(v) => Err(format!("`prompt` should be a string or a list of token ids (one prompt per request), found {v}")),
            None => Err("a completion needs `prompt`".into()),
        },
        (None, ["prompt"]) => match &o["prompt"] {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            p => Err(format!("`prompt` should be a string, found {p}")),
        },
        (None, ["prompt_ids"]) => token_ids(&o["prompt_ids"], "prompt_ids").map(Prompt::Ids),
        (None, ["messages"]) => messages(&o["messages"]).map(Prompt::Chat),
        (None, []) => Err("missing `prompt` (text), `prompt_ids` (token ids) or `messages` (chat)".into()),
        (None, many) => Err(format!("give one of {}, not several", many.join(", "))),
    }
}

/// Parses one input line of either format.
pub fn parse_line(text: &str, path: &Path, line: usize) -> Result<JobLine> {
    let err = |d: String| line_error(path, line, d);
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
    if let Some(custom) = obj.get("custom_id") {
        let id = match custom {
            Value::String(_) => custom.clone(),
            other => return Err(err(format!("`custom_id` should be a string, found {other}"))),
        };
        let url = obj.get("url").and_then(Value::as_str).unwrap_or("");
        let endpoint = match url {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completion),
            _ => None,
        };
        let model = obj.get("body").and_then(|b| b.get("model")).and_then(Value::as_str).map(str::to_string);
        let format = LineFormat::OpenAi { endpoint: endpoint.unwrap_or(Endpoint::Chat), model };
        let request = (|| {
            let Some(endpoint) = endpoint else {
                return Err(format!("`url` {url:?} is not an endpoint moegen serves (/v1/chat/completions, /v1/completions)"));
            };
            match obj.get("method") {
                None => {}
                Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
                Some(m) => return Err(format!("`method` should be \"POST\", found {m}")),
            }
            let body = obj.get("body").and_then(Value::as_object).ok_or_else(|| "`body` should be an object".to_string())?;
            Ok((prompt(body, Some(endpoint))?, params(body, Some(endpoint))?))
        })();
        return Ok(JobLine { line, id, format, request });
    }
    let id = obj.get("id").cloned().ok_or_else(|| err("missing `id` (or `custom_id` for an OpenAI batch line)".into()))?;
    let request = prompt(obj, None).and_then(|p| Ok((p, params(obj, None)?))).map_err(err)?;
    Ok(JobLine { line, id, format: LineFormat::Native, request: Ok(request) })
}

/// Reads every line of a JSONL file (blank lines skipped); ids must be unique.
pub fn read_lines(path: &Path) -> Result<Vec<JobLine>> {
    let file = File::open(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let text = line.map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        if text.trim().is_empty() {
            continue;
        }
        let p = parse_line(&text, path, i + 1)?;
        if !seen.insert(p.id_key()) {
            return Err(line_error(path, i + 1, format!("id {} appears twice", p.id)));
        }
        out.push(p);
    }
    Ok(out)
}

/// `--shard I/N`: this process takes the lines whose id hashes to `I` modulo `N`, so each line's
/// shard stays the same when lines are added or removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or_else(|| format!("expected I/N (for example 0/4), found {s:?}"))?;
        let (index, count) = (i.trim().parse::<u64>(), n.trim().parse::<u64>());
        match (index, count) {
            (Ok(index), Ok(count)) if count > 0 && index < count => Ok(Shard { index, count }),
            _ => Err(format!("expected I/N with 0 <= I < N, found {s:?}")),
        }
    }
}

impl Shard {
    pub fn takes(&self, id_key: &str) -> bool {
        crate::sampler::stable_hash(id_key.as_bytes()) % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<JobLine> {
        parse_line(s, Path::new("in.jsonl"), 3)
    }

    #[test]
    fn both_formats_and_bad_lines() {
        let p = parse(r#"{"id": 5, "prompt": "hi", "max_new_tokens": 4, "temperature": 0.5, "stop": "x", "n": 2}"#).unwrap();
        let (prompt, params) = p.request.clone().unwrap();
        assert_eq!((p.id_key().as_str(), prompt), ("5", Prompt::Text("hi".into())));
        assert_eq!((params.max_tokens, params.temperature, params.stop, params.n), (Some(4), Some(0.5), vec!["x".to_string()], 2));
        assert_eq!(parse(r#"{"id": "a", "prompt_ids": [1, 2]}"#).unwrap().request.unwrap().0, Prompt::Ids(vec![1, 2]));
        let chat = parse(r#"{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 7, "logprobs": true, "top_logprobs": 3}}"#).unwrap();
        assert_eq!(chat.id, Value::from("r1"));
        assert_eq!(chat.format, LineFormat::OpenAi { endpoint: Endpoint::Chat, model: Some("m".into()) });
        let (prompt, params) = chat.request.unwrap();
        assert_eq!(prompt, Prompt::Chat(vec![serde_json::json!({"role": "user", "content": "ab"})]));
        assert_eq!((params.max_tokens, params.logprobs), (Some(7), Some(3)));
        let completion = parse(r#"{"custom_id": "r2", "url": "/v1/completions", "body": {"prompt": [4, 5], "logprobs": 2, "stop": ["a", "b"]}}"#).unwrap();
        assert_eq!(completion.request.unwrap().0, Prompt::Ids(vec![4, 5]));
        // An OpenAI line that cannot run is kept, with its reason, for an error line in the output.
        for (bad, says) in [
            (r#"{"custom_id": "e", "url": "/v1/embeddings", "body": {}}"#, "/v1/embeddings"),
            (r#"{"custom_id": "e", "url": "/v1/chat/completions", "body": {"messages": []}}"#, "messages"),
            (r#"{"custom_id": "e", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1}}"#, "presence_penalty"),
            (r#"{"custom_id": "e", "url": "/v1/completions", "body": {"prompt": "x", "top_p": 0}}"#, "top_p"),
        ] {
            let e = parse(bad).unwrap().request.unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        for (bad, says) in [
            ("{", "in.jsonl:3"),
            (r#"{"prompt": "x"}"#, "missing `id`"),
            (r#"{"id": 1}"#, "missing `prompt`"),
            (r#"{"id": 1, "prompt_ids": [1, -2]}"#, "prompt_ids"),
            (r#"{"id": 1, "prompt": "x", "max_new_tokens": "many"}"#, "max_new_tokens"),
            (r#"{"id": 1, "prompt": "x", "n": 0}"#, "`n`"),
            (r#"{"custom_id": 4, "url": "/v1/completions", "body": {}}"#, "custom_id"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("in.jsonl:3"), "{bad}: {e}");
        }
    }

    #[test]
    fn shards_split_the_ids_and_parse_strictly() {
        let shards: Vec<Shard> = (0..3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        let keys: Vec<String> = (0..300).map(|i| Value::from(format!("req-{i}")).to_string()).collect();
        for k in &keys {
            assert_eq!(shards.iter().filter(|s| s.takes(k)).count(), 1);
        }
        let first = keys.iter().filter(|k| shards[0].takes(k)).count();
        assert!((70..130).contains(&first), "{first} of 300 in shard 0");
        for bad in ["3/3", "1", "a/2", "0/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// xorshift64*: a fixed, seedable stream of mutations.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Truncated, byte-flipped, spliced and duplicated lines of both formats, safetensors headers
    /// and config.json text: an error or a value, never a panic.
    #[test]
    fn mutated_lines_and_configs_give_errors_not_panics() {
        let seeds = [
            r#"{"id": 5, "prompt": "hi", "max_new_tokens": 4, "temperature": 0.5, "stop": ["x", "y"], "n": 2, "logprobs": 3}"#,
            r#"{"id": [1, {"a": null}], "prompt_ids": [1, 2, 4294967295], "seed": -3, "top_k": -1}"#,
            r#"{"id": "c", "messages": [{"role": "user", "content": [{"type": "text", "text": "é"}]}]}"#,
            r#"{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 7, "logprobs": true, "top_logprobs": 3}}"#,
            r#"{"custom_id": "r2", "url": "/v1/completions", "body": {"prompt": [4, 5], "logprobs": 2, "best_of": 1, "stop": null}}"#,
        ];
        let config = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mixtral-f32/config.json")).unwrap();
        let mut rng = Rng(0x9E3779B97F4A7C15);
        let path = Path::new("fuzz.jsonl");
        let mutate = |rng: &mut Rng, text: &str| -> Vec<u8> {
            let mut b = text.as_bytes().to_vec();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len());
                match rng.below(5) {
                    0 => b.truncate(at),
                    1 => {
                        let i = at.min(b.len() - 1);
                        b[i] ^= 1 << rng.below(8);
                    }
                    2 => {
                        let piece: Vec<u8> = b[at..].iter().take(1 + rng.below(12)).copied().collect();
                        let to = rng.below(b.len());
                        b.splice(to..to, piece);
                    }
                    3 => {
                        let digits = b"99999999999999999999-1e308";
                        b.splice(at..at, digits.iter().copied());
                    }
                    _ => {
                        let end = (at + rng.below(8)).min(b.len());
                        b.drain(at..end);
                    }
                }
                if b.is_empty() {
                    break;
                }
            }
            b
        };
        for round in 0..4000 {
            let seed = seeds[round % seeds.len()];
            let text = String::from_utf8_lossy(&mutate(&mut rng, seed)).into_owned();
            if let Ok(line) = parse_line(&text, path, 1) {
                let _ = line.id_key();
            }
        }
        // Safetensors headers: the length field and the JSON mutated, the file truncated; opening
        // checks every offset against the file, so a corrupt length never becomes an allocation.
        let st = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mixtral-f32/model.safetensors")).unwrap();
        let n = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(st[8..8 + n].to_vec()).unwrap();
        let dir = std::env::temp_dir().join(format!("moegen-fuzz-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for round in 0..300 {
            let mut file = Vec::with_capacity(st.len() + 64);
            let h = if round % 4 == 3 { header.as_bytes().to_vec() } else { mutate(&mut rng, &header) };
            let len = match round % 4 {
                0 => u64::MAX - rng.below(1000) as u64,
                1 => (h.len() as u64) << (1 + rng.below(20)),
                _ => h.len() as u64,
            };
            file.extend_from_slice(&len.to_le_bytes());
            file.extend_from_slice(&h);
            file.extend_from_slice(&st[8 + n..]);
            if round % 4 == 3 {
                file.truncate(rng.below(file.len()));
            }
            std::fs::write(dir.join("model.safetensors"), &file).unwrap();
            let _ = crate::loader::checkpoint::Checkpoint::open(&dir);
        }
        std::fs::remove_dir_all(&dir).unwrap();
        for _ in 0..1500 {
            let text = String::from_utf8_lossy(&mutate(&mut rng, &config)).into_owned();
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                let _ = crate::loader::config::ModelConfig::parse(&v, Path::new("config.json"));
            }
        }
    }
}
