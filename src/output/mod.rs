//! The JSONL job files: prompts in, one result line per prompt out, written as each sequence
//! finishes, so an interrupted job keeps what it finished and `--resume` can skip it.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One line of the input.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLine {
    /// 1-based line number in the input file, for error messages.
    pub line: usize,
    pub id: Value,
    pub prompt: PromptText,
    pub max_new_tokens: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PromptText {
    Text(String),
    Ids(Vec<u32>),
}

impl PromptLine {
    /// The id as canonical JSON text: how outputs are matched on resume and how a sequence's
    /// random stream is seeded.
    pub fn id_key(&self) -> String {
        self.id.to_string()
    }
}

fn line_error(path: &Path, line: usize, detail: impl Into<String>) -> Error {
    Error::invalid(format!("{}:{line}", path.display()), detail)
}

/// Parses one input line (`{"id": .., "prompt": ".."}` or `{"id": .., "prompt_ids": [..]}`,
/// optionally with `max_new_tokens`).
pub fn parse_prompt_line(text: &str, path: &Path, line: usize) -> Result<PromptLine> {
    let v: Value = serde_json::from_str(text).map_err(|e| line_error(path, line, format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| line_error(path, line, "expected a JSON object"))?;
    let id = obj.get("id").cloned().ok_or_else(|| line_error(path, line, "missing `id`"))?;
    let prompt = match (obj.get("prompt"), obj.get("prompt_ids")) {
        (Some(Value::String(s)), None) => PromptText::Text(s.clone()),
        (None, Some(Value::Array(a))) => PromptText::Ids(
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| line_error(path, line, format!("`prompt_ids` holds {x}, not a token id")))
                })
                .collect::<Result<_>>()?,
        ),
        (Some(_), Some(_)) => return Err(line_error(path, line, "give either `prompt` or `prompt_ids`, not both")),
        (Some(p), None) => return Err(line_error(path, line, format!("`prompt` should be a string, found {p}"))),
        (None, Some(p)) => return Err(line_error(path, line, format!("`prompt_ids` should be a list of ids, found {p}"))),
        (None, None) => return Err(line_error(path, line, "missing `prompt` (text) or `prompt_ids` (token ids)")),
    };
    let max_new_tokens = match obj.get("max_new_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| line_error(path, line, format!("`max_new_tokens` should be a non-negative integer, found {v}")))?
                as usize,
        ),
    };
    Ok(PromptLine { line, id, prompt, max_new_tokens })
}

/// Reads every prompt of a JSONL file (blank lines skipped); ids must be unique.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptLine>> {
    let file = File::open(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let text = line.map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        if text.trim().is_empty() {
            continue;
        }
        let p = parse_prompt_line(&text, path, i + 1)?;
        if !seen.insert(p.id_key()) {
            return Err(line_error(path, i + 1, format!("id {} appears twice", p.id)));
        }
        out.push(p);
    }
    Ok(out)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

pub fn result_line(id: &Value, prompt_tokens: usize, output_ids: &[u32], text: &str, finish: FinishReason) -> String {
    json!({
        "id": id,
        "prompt_tokens": prompt_tokens,
        "output_ids": output_ids,
        "text": text,
        "finish_reason": finish.as_str(),
    })
    .to_string()
}

/// Where result lines go: a file (flushed line by line) or stdout.
pub enum ResultSink {
    File { file: File, path: PathBuf },
    Stdout,
}

impl ResultSink {
    /// Opens `path` for the job: created (or truncated) unless `resume`, in which case the ids
    /// already finished in it are returned and new lines are appended after the last whole line
    /// (a line cut off by an interruption is dropped).
    pub fn open(path: &Path, resume: bool) -> Result<(Self, HashSet<String>)> {
        let io = |error| Error::Io { path: path.to_path_buf(), error };
        let mut done = HashSet::new();
        if resume && path.exists() {
            let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
            let mut text = String::new();
            file.read_to_string(&mut text).map_err(io)?;
            let whole = text.rfind('\n').map_or(0, |i| i + 1);
            for (i, line) in text[..whole].lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| line_error(path, i + 1, format!("the output to resume is not valid JSONL: {e}")))?;
                let id = v.get("id").ok_or_else(|| line_error(path, i + 1, "a line of the output to resume has no `id`"))?;
                done.insert(id.to_string());
            }
            file.set_len(whole as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
            return Ok((ResultSink::File { file, path: path.to_path_buf() }, done));
        }
        let file = File::create(path).map_err(io)?;
        Ok((ResultSink::File { file, path: path.to_path_buf() }, done))
    }

    pub fn write_line(&mut self, line: &str) -> Result<()> {
        match self {
            ResultSink::File { file, path } => {
                let io = |error| Error::Io { path: path.clone(), error };
                file.write_all(line.as_bytes()).map_err(io)?;
                file.write_all(b"\n").map_err(io)?;
                file.flush().map_err(io)
            }
            ResultSink::Stdout => {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}").and_then(|_| out.flush()).map_err(|error| Error::Io { path: "<stdout>".into(), error })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<PromptLine> {
        parse_prompt_line(s, Path::new("in.jsonl"), 3)
    }

    #[test]
    fn both_prompt_forms_and_bad_lines() {
        let p = parse(r#"{"id": 5, "prompt": "hi", "max_new_tokens": 4}"#).unwrap();
        assert_eq!((p.id_key().as_str(), p.prompt, p.max_new_tokens), ("5", PromptText::Text("hi".into()), Some(4)));
        assert_eq!(parse(r#"{"id": "a", "prompt_ids": [1, 2]}"#).unwrap().prompt, PromptText::Ids(vec![1, 2]));
        for (bad, says) in [
            ("{", "in.jsonl:3"),
            (r#"{"prompt": "x"}"#, "missing `id`"),
            (r#"{"id": 1}"#, "missing `prompt`"),
            (r#"{"id": 1, "prompt_ids": [1, -2]}"#, "prompt_ids"),
            (r#"{"id": 1, "prompt": "x", "max_new_tokens": "many"}"#, "max_new_tokens"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("in.jsonl:3"), "{bad}: {e}");
        }
    }

    #[test]
    fn resume_keeps_whole_lines_and_drops_a_cut_one() {
        let dir = std::env::temp_dir().join(format!("moegen-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        std::fs::write(&path, "{\"id\":1,\"text\":\"a\"}\n{\"id\":\"two\",\"text\":\"b\"}\n{\"id\":3,\"te").unwrap();
        let (mut sink, done) = ResultSink::open(&path, true).unwrap();
        assert_eq!(done, HashSet::from(["1".to_string(), "\"two\"".to_string()]));
        sink.write_line("{\"id\":3}").unwrap();
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("{\"id\":3}\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
