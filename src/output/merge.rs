//! `moegen merge`: the outputs of a job's shards as one file in the input's order, refusing any
//! id that is missing, present twice, or not in the input.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::input::read_lines;
use crate::output::answered_id;

/// Writes `output` from `shards` in `input`'s order; nothing is written unless every check passes.
pub fn merge(input: &Path, output: &Path, shards: &[PathBuf]) -> Result<usize> {
    let lines = read_lines(input)?;
    let order: HashMap<String, usize> = lines.iter().enumerate().map(|(i, l)| (l.id_key(), i)).collect();
    let mut found: Vec<Option<(String, String)>> = vec![None; lines.len()];
    for shard in shards {
        let text = std::fs::read_to_string(shard).map_err(|error| Error::Io { path: shard.clone(), error })?;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", shard.display(), n + 1);
            let v: Value = serde_json::from_str(line).map_err(|e| Error::invalid(&at, format!("not valid JSON: {e}")))?;
            let id = answered_id(&v).ok_or_else(|| Error::invalid(&at, "a result line without `id` or `custom_id`"))?;
            let key = id.to_string();
            let Some(&i) = order.get(&key) else {
                return Err(Error::invalid(&at, format!("id {id} is not in {}", input.display())));
            };
            if let Some((before, _)) = &found[i] {
                return Err(Error::invalid(&at, format!("id {id} is present twice (also at {before})")));
            }
            found[i] = Some((at, line.to_string()));
        }
    }
    let missing: Vec<String> = lines.iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(l, _)| l.id.to_string()).collect();
    if !missing.is_empty() {
        let shown = missing.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
        let more = if missing.len() > 10 { format!(" and {} more", missing.len() - 10) } else { String::new() };
        return Err(Error::invalid(input.display().to_string(), format!("{} ids have no result in the shards: {shown}{more}", missing.len())));
    }
    // Written beside the target and renamed, so a failed write leaves no half file.
    let tmp = output.with_extension("merging");
    let io = |error| Error::Io { path: output.to_path_buf(), error };
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    for (_, line) in found.into_iter().flatten() {
        writeln!(f, "{line}").map_err(io)?;
    }
    f.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    std::fs::rename(&tmp, output).map_err(io)?;
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_in_input_order_and_names_bad_ids() {
        let dir = std::env::temp_dir().join(format!("moegen-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let input = w("in.jsonl", "{\"id\": 1, \"prompt\": \"a\"}\n{\"custom_id\": \"x\", \"url\": \"/v1/completions\", \"body\": {\"prompt\": \"b\"}}\n{\"id\": \"z\", \"prompt\": \"c\"}\n");
        let a = w("a.jsonl", "{\"id\":\"z\",\"text\":\"3\"}\n{\"id\":1,\"text\":\"1\"}\n");
        let b = w("b.jsonl", "{\"id\":\"batch_req_0\",\"custom_id\":\"x\",\"response\":null}\n");
        let out = dir.join("out.jsonl");
        assert_eq!(merge(&input, &out, &[a.clone(), b.clone()]).unwrap(), 3);
        let got: Vec<String> = std::fs::read_to_string(&out).unwrap().lines().map(str::to_string).collect();
        assert_eq!(got[0], "{\"id\":1,\"text\":\"1\"}");
        assert!(got[1].contains("\"custom_id\":\"x\"") && got[2].contains("\"z\""));
        let e = merge(&input, &out, std::slice::from_ref(&a)).unwrap_err().to_string();
        assert!(e.contains("1 ids have no result") && e.contains("\"x\""), "{e}");
        let e = merge(&input, &out, &[a.clone(), b.clone(), a.clone()]).unwrap_err().to_string();
        assert!(e.contains("present twice") && e.contains("a.jsonl:1"), "{e}");
        let stray = w("c.jsonl", "{\"id\": 9}\n");
        let e = merge(&input, &out, &[a, b, stray]).unwrap_err().to_string();
        assert!(e.contains("id 9 is not in") && e.contains("c.jsonl:1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
