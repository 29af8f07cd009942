//! The job's results: one line per input line, in the input line's format (moegen's own, or the
//! OpenAI batch output format), written and flushed as each finishes, so an interrupted job keeps
//! what it finished and `--resume` can skip it; `moegen merge` puts shards' outputs back together.

pub mod merge;
pub mod openai;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::loader::tokenizer::token_display;
use crate::error::{Error, Result};

fn line_error(path: &Path, line: usize, detail: impl Into<String>) -> Error {
    Error::invalid(format!("{}:{line}", path.display()), detail)
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

/// One completion of a request.
#[derive(Clone, Debug)]
pub struct Choice {
    pub output_ids: Vec<u32>,
    /// Decoded, and cut before a stop string.
    pub text: String,
    pub finish: FinishReason,
    /// When the request asked for them.
    pub logprobs: Option<Vec<crate::sampler::TokenLogprob>>,
}

/// moegen's own result line: `id`, `prompt_tokens`, and the completion's `output_ids`, `text`,
/// `finish_reason` (and `logprobs`), or with `n` > 1 a `choices` list of them.
/// `token_bytes` gives a token's bytes (shown as text, or `bytes:\x..` where they end
/// mid-character).
pub fn result_line(id: &Value, prompt_tokens: usize, choices: &[Choice], token_bytes: &dyn Fn(u32) -> Vec<u8>) -> String {
    let choice = |c: &Choice| {
        let mut o = json!({"output_ids": c.output_ids, "text": c.text, "finish_reason": c.finish.as_str()});
        if let Some(lps) = &c.logprobs {
            let entry = |t: u32, lp: f32| json!({"token_id": t, "token": token_display(&token_bytes(t)), "logprob": lp});
            o["logprobs"] = lps
                .iter()
                .map(|l| {
                    let mut e = entry(l.token, l.logprob);
                    e["top"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                    e
                })
                .collect();
        }
        o
    };
    let mut line = json!({"id": id, "prompt_tokens": prompt_tokens});
    match choices {
        [one] => {
            for (k, v) in choice(one).as_object().expect("an object") {
                line[k] = v.clone();
            }
        }
        many => line["choices"] = many.iter().enumerate().map(|(i, c)| { let mut o = choice(c); o["index"] = i.into(); o }).collect(),
    }
    line.to_string()
}

/// The id a result line answers: an OpenAI line's `custom_id`, else moegen's `id`.
pub fn answered_id(line: &Value) -> Option<&Value> {
    line.get("custom_id").or_else(|| line.get("id"))
}

/// What an output to resume holds: the ids finished in it, and the bytes of its whole lines (a
/// line cut off by an interruption after them is dropped when the job appends).
#[derive(Debug, Default)]
pub struct Finished {
    pub ids: HashSet<String>,
    whole: u64,
}

/// Where result lines go: a file (flushed line by line) or stdout.
pub enum ResultSink {
    /// A file opened only when the first line is written (or the job ends), so a job that fails
    /// before its first result (a tensor missing at load, say) leaves the file as it was.
    /// `resume_at`: append after this many bytes of whole lines instead of starting afresh.
    Later { path: PathBuf, resume_at: Option<u64>, held: Vec<String> },
    File { file: File, path: PathBuf },
    Stdout,
}

impl ResultSink {
    /// What the output `path` already holds (nothing when it does not exist yet), read once and
    /// without changing it.
    pub fn finished(path: &Path) -> Result<Finished> {
        let mut done = Finished::default();
        if !path.exists() {
            return Ok(done);
        }
        let bytes = std::fs::read(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let text = std::str::from_utf8(&bytes[..whole]).map_err(|e| Error::invalid(path.display().to_string(), format!("the output to resume is not UTF-8: {e}")))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| line_error(path, i + 1, format!("the output to resume is not valid JSONL: {e}")))?;
            let id = answered_id(&v).ok_or_else(|| line_error(path, i + 1, "a line of the output to resume has no `id` or `custom_id`"))?;
            done.ids.insert(id.to_string());
        }
        done.whole = whole as u64;
        Ok(done)
    }

    /// Opens `path`: created (or truncated), or with `resume_at` trimmed to that many bytes of
    /// whole lines and appended to.
    fn open(path: &Path, resume_at: Option<u64>) -> Result<Self> {
        let io = |error| Error::Io { path: path.to_path_buf(), error };
        if let Some(whole) = resume_at.filter(|_| path.exists()) {
            let mut file = OpenOptions::new().write(true).open(path).map_err(io)?;
            file.set_len(whole).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
            return Ok(ResultSink::File { file, path: path.to_path_buf() });
        }
        let file = File::create(path).map_err(io)?;
        Ok(ResultSink::File { file, path: path.to_path_buf() })
    }

    /// The sink for `path`, checked now (its folder exists; an existing file can be written) but
    /// created, truncated or (resuming what [`finished`](Self::finished) read) trimmed of a
    /// cut-off last line only on first use.
    pub fn later(path: &Path, resume: Option<&Finished>) -> Result<Self> {
        let io = |error| Error::Io { path: path.to_path_buf(), error };
        if path.exists() {
            OpenOptions::new().write(true).open(path).map_err(io)?;
        } else {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(io(std::io::Error::new(std::io::ErrorKind::NotFound, format!("the folder {} does not exist", parent.display()))));
            }
        }
        Ok(ResultSink::Later { path: path.to_path_buf(), resume_at: resume.map(|f| f.whole), held: Vec::new() })
    }

    /// A line written with the first result (an error line known before the run starts).
    pub fn hold(&mut self, line: String) -> Result<()> {
        match self {
            ResultSink::Later { held, .. } => {
                held.push(line);
                Ok(())
            }
            _ => self.write_line(&line),
        }
    }

    /// Opens a `Later` sink now (a finished job's file exists even when it holds no line).
    pub fn finish(&mut self) -> Result<()> {
        if let ResultSink::Later { path, resume_at, held } = self {
            let held = std::mem::take(held);
            let sink = ResultSink::open(path, *resume_at)?;
            *self = sink;
            for line in held {
                self.write_line(&line)?;
            }
        }
        Ok(())
    }

    pub fn write_line(&mut self, line: &str) -> Result<()> {
        self.finish()?;
        match self {
            ResultSink::Later { .. } => unreachable!("opened by finish"),
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

    #[test]
    fn resume_keeps_whole_lines_and_drops_a_cut_one() {
        let dir = std::env::temp_dir().join(format!("moegen-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        std::fs::write(&path, "{\"id\":1,\"text\":\"a\"}\n{\"id\":\"two\",\"text\":\"b\"}\n{\"id\":3,\"te").unwrap();
        let done = ResultSink::finished(&path).unwrap();
        assert_eq!(done.ids, HashSet::from(["1".to_string(), "\"two\"".to_string()]));
        let mut sink = ResultSink::later(&path, Some(&done)).unwrap();
        sink.write_line("{\"id\":3}").unwrap();
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("{\"id\":3}\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
