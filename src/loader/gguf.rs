//! GGUF files (llama.cpp's format, v2 and v3, little-endian), single or split into
//! `*-00001-of-0000N.gguf` parts: the header, metadata and tensor index are validated (every
//! length against the bytes left before anything is allocated, every tensor's type, shape, offset
//! and size against the file), then the model is presented as the engine reads a Hugging Face
//! checkpoint: a `config.json` built from the metadata and the tensors under their Hugging Face
//! names, read in place from the mapped file. Expert tensors stacked per layer
//! (`ffn_*_exps`) are split into one slice per expert; llama-arch query and key rows, which
//! llama.cpp's converter interleaves for its rope, are put back in Hugging Face's order; MLA's
//! `kv_b_proj`, which it splits in two per-head halves, is put back together.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::gpu::WeightDtype;
use crate::loader::checkpoint::{Checkpoint, Dtype};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Meta {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Meta>),
}

impl Meta {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Meta::Uint(v) => Some(v),
            Meta::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Meta::Float(v) => Some(v),
            Meta::Uint(v) => Some(v as f64),
            Meta::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Meta::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor of the index: llama.cpp's `ne` order (`dims[0]` is the innermost, a row's length).
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: Dtype,
    /// Byte range in the file.
    pub start: usize,
    pub end: usize,
}

/// A parsed header.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Meta>,
    pub tensors: Vec<TensorInfo>,
}

/// The cursor over the header, failing (never panicking, never allocating more than the bytes
/// left could hold) on anything out of bounds.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn bad(&self, what: impl std::fmt::Display) -> Error {
        Error::invalid(self.file, format!("{what} (at byte {})", self.at))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            return Err(self.bad(format!("truncated: {what} needs {n} bytes, {} left", self.b.len() - self.at)));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A count of items each at least `min_bytes` long, checked against the bytes left.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.at) as u64;
        if n.saturating_mul(min_bytes as u64) > left {
            return Err(self.bad(format!("{what} says {n}, more than the {left} bytes left can hold")));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Meta> {
        Ok(match ty {
            0 => Meta::Uint(self.take(1, key)?[0] as u64),
            1 => Meta::Int(self.take(1, key)?[0] as i8 as i64),
            2 => Meta::Uint(u16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as u64),
            3 => Meta::Int(i16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as i64),
            4 => Meta::Uint(self.u32(key)? as u64),
            5 => Meta::Int(self.u32(key)? as i32 as i64),
            6 => Meta::Float(f32::from_bits(self.u32(key)?) as f64),
            7 => match self.take(1, key)?[0] {
                0 => Meta::Bool(false),
                1 => Meta::Bool(true),
                v => return Err(self.bad(format!("metadata `{key}`: bool byte {v}"))),
            },
            8 => Meta::Str(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(self.bad(format!("metadata `{key}`: arrays nested deeper than one level")));
                }
                let item = self.u32(key)?;
                let size = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.bad(format!("metadata `{key}`: array of unknown type {t}"))),
                };
                let n = self.count(size, key)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, key, depth + 1)?);
                }
                Meta::Array(items)
            }
            10 => Meta::Uint(self.u64(key)?),
            11 => Meta::Int(self.u64(key)? as i64),
            12 => Meta::Float(f64::from_bits(self.u64(key)?)),
            t => return Err(self.bad(format!("metadata `{key}` has unknown type {t}"))),
        })
    }
}

/// GGUF's type ids of the weight types the kernels read.
fn dtype_of(ty: u32) -> Option<Dtype> {
    Some(match ty {
        0 => Dtype::F32,
        1 => Dtype::F16,
        30 => Dtype::Bf16,
        2 => Dtype::Block(WeightDtype::Q4_0),
        8 => Dtype::Block(WeightDtype::Q8_0),
        12 => Dtype::Block(WeightDtype::Q4K),
        13 => Dtype::Block(WeightDtype::Q5K),
        14 => Dtype::Block(WeightDtype::Q6K),
        _ => return None,
    })
}

/// llama.cpp's names of its other types, for the error message.
fn type_name(ty: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS",
        "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
    ];
    names.get(ty as usize).map_or(format!("type {ty}"), |n| n.to_string())
}

/// Parses and validates a GGUF file's header and tensor index against the file's `bytes`.
pub fn parse(bytes: &[u8], file: &str) -> Result<Header> {
    let mut r = Reader { b: bytes, at: 0, file };
    if r.take(4, "the magic")? != b"GGUF" {
        return Err(Error::invalid(file, "not a GGUF file (no GGUF magic)"));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::invalid(file, format!("GGUF version {version}; versions 2 and 3 are supported")));
    }
    // A tensor's index entry takes at least 8 + 4 + 8 + 4 + 8 bytes, a metadata pair 8 + 4 + 1.
    let n_tensors = r.count(32, "the tensor count")?;
    let n_meta = r.count(13, "the metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_meta {
        let key = r.string("a metadata key")?;
        let ty = r.u32(&key)?;
        let v = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(r.bad(format!("metadata `{key}` appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
            _ => return Err(Error::invalid(file, format!("general.alignment {v:?} is not a power of two"))),
        },
    };
    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&name)?;
        if !(1..=4).contains(&n_dims) {
            return Err(r.bad(format!("tensor `{name}` has {n_dims} dimensions")));
        }
        let mut dims = Vec::new();
        for _ in 0..n_dims {
            let d = r.u64(&name)?;
            if d == 0 || d > 1 << 40 {
                return Err(r.bad(format!("tensor `{name}` has a dimension of {d}")));
            }
            dims.push(d as usize);
        }
        let ty = r.u32(&name)?;
        let offset = r.u64(&name)?;
        raw.push((name, dims, ty, offset));
    }
    let data_start = r.at.next_multiple_of(alignment);
    let mut tensors = Vec::with_capacity(raw.len());
    let mut names = std::collections::HashSet::new();
    for (name, dims, ty, offset) in raw {
        let dtype = dtype_of(ty).ok_or_else(|| {
            Error::invalid(file, format!("tensor `{name}` is {}; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K", type_name(ty)))
        })?;
        let elements = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).filter(|&n| n < 1 << 48);
        let elements = elements.ok_or_else(|| Error::invalid(file, format!("tensor `{name}`: shape {dims:?} is too large")))?;
        let be = dtype.weight().block_elems();
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::Bf16) && !dims[0].is_multiple_of(be) {
            return Err(Error::invalid(file, format!("tensor `{name}`: rows of {} are not whole {}-element blocks", dims[0], be)));
        }
        if !(offset as usize).is_multiple_of(alignment) {
            return Err(Error::invalid(file, format!("tensor `{name}`: offset {offset} is not aligned to {alignment}")));
        }
        let size = dtype.bytes_of(elements);
        let start = (data_start as u64).checked_add(offset).filter(|&s| s <= bytes.len() as u64);
        let end = start.and_then(|s| s.checked_add(size as u64)).filter(|&e| e <= bytes.len() as u64);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Error::invalid(file, format!("truncated: tensor `{name}` ({size} bytes at offset {offset}) runs past the end of the file ({} bytes)", bytes.len())));
        };
        if !names.insert(name.clone()) {
            return Err(Error::invalid(file, format!("tensor `{name}` appears twice")));
        }
        tensors.push(TensorInfo { name, dims, dtype, start: start as usize, end: end as usize });
    }
    Ok(Header { version, metadata, tensors })
}

/// Whether `path` names a GGUF model: a `.gguf` file, or a directory holding one.
pub fn is_gguf(path: &Path) -> bool {
    gguf_parts(path).is_ok_and(|p| !p.is_empty())
}

/// The files of a GGUF model: the file itself, or all parts of a split one (given any part or the
/// directory holding them).
pub fn gguf_parts(path: &Path) -> Result<Vec<PathBuf>> {
    let io = |error| Error::Io { path: path.to_path_buf(), error };
    let first = if path.is_dir() {
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        found.sort();
        match found.len() {
            0 => return Ok(Vec::new()),
            1 => found.remove(0),
            _ => match found.iter().find(|p| split_of(p).is_some_and(|(i, _)| i == 1)) {
                Some(p) if found.iter().all(|q| split_of(q).is_some()) => p.clone(),
                _ => return Err(Error::invalid(path.display().to_string(), format!("several GGUF models in one directory: {found:?}"))),
            },
        }
    } else if path.extension().is_some_and(|x| x == "gguf") {
        path.to_path_buf()
    } else {
        return Ok(Vec::new());
    };
    let Some((_, total)) = split_of(&first) else { return Ok(vec![first]) };
    let name = first.file_name().unwrap().to_string_lossy().to_string();
    let stem = &name[..name.len() - "-00001-of-00001.gguf".len()];
    let parts: Vec<PathBuf> = (1..=total).map(|i| first.with_file_name(format!("{stem}-{i:05}-of-{total:05}.gguf"))).collect();
    if let Some(missing) = parts.iter().find(|p| !p.exists()) {
        return Err(Error::invalid(missing.display().to_string(), format!("part of a {total}-part GGUF model is missing")));
    }
    Ok(parts)
}

/// `(i, n)` of a `NAME-0000i-of-0000n.gguf` file name.
fn split_of(p: &Path) -> Option<(usize, usize)> {
    let name = p.file_name()?.to_str()?.strip_suffix(".gguf")?;
    let (rest, n) = name.rsplit_once("-of-")?;
    let (_, i) = rest.rsplit_once('-')?;
    if i.len() != 5 || n.len() != 5 {
        return None;
    }
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// A GGUF model as the engine reads a Hugging Face one.
pub struct GgufModel {
    pub config: Value,
    pub checkpoint: Checkpoint,
    pub metadata: BTreeMap<String, Meta>,
    pub path: PathBuf,
}

/// Opens the GGUF model at `path` (a file, a part of a split model, or a directory).
pub fn open(path: &Path) -> Result<GgufModel> {
    let (parts, files, metadata, tensors, config) = read(path)?;
    let checkpoint = hf_checkpoint(files, tensors, &config, &parts[0].display().to_string())?;
    Ok(GgufModel { config, checkpoint, metadata, path: parts[0].clone() })
}

/// The `config.json` of the GGUF model at `path` and the file it came from, from the headers
/// alone (no tensor is rearranged).
pub fn open_config(path: &Path) -> Result<(Value, PathBuf)> {
    let (parts, _, _, _, config) = read(path)?;
    Ok((config, parts[0].clone()))
}

/// Every part mapped and its header validated, and the config built from the metadata.
#[allow(clippy::type_complexity)]
fn read(path: &Path) -> Result<(Vec<PathBuf>, Vec<(PathBuf, memmap2::Mmap)>, BTreeMap<String, Meta>, Vec<(usize, TensorInfo)>, Value)> {
    let parts = gguf_parts(path)?;
    if parts.is_empty() {
        return Err(Error::invalid(path.display().to_string(), "no .gguf file"));
    }
    let mut files = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut tensors: Vec<(usize, TensorInfo)> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let f = std::fs::File::open(p).map_err(|error| Error::Io { path: p.clone(), error })?;
        // SAFETY: read-only mapping, as for safetensors (see checkpoint.rs).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|error| Error::Io { path: p.clone(), error })?;
        let h = parse(&map[..], &p.display().to_string())?;
        if i == 0 {
            metadata = h.metadata;
        }
        tensors.extend(h.tensors.into_iter().map(|t| (i, t)));
        files.push((p.clone(), map));
    }
    let config = config_json(&metadata, &tensors.iter().map(|(_, t)| t).collect::<Vec<_>>(), &parts[0].display().to_string())?;
    Ok((parts, files, metadata, tensors, config))
}

/// The metadata `key`, required.
fn need<'m>(m: &'m BTreeMap<String, Meta>, key: &str, file: &str) -> Result<&'m Meta> {
    m.get(key).ok_or_else(|| Error::invalid(file, format!("metadata `{key}` is missing")))
}

fn need_u64(m: &BTreeMap<String, Meta>, key: &str, file: &str) -> Result<u64> {
    need(m, key, file)?.as_u64().ok_or_else(|| Error::invalid(file, format!("metadata `{key}` is not an unsigned integer")))
}

/// The `config.json` a Hugging Face checkpoint of the same model would carry, from the metadata
/// of the architectures the engine supports under their llama.cpp names.
fn config_json(m: &BTreeMap<String, Meta>, tensors: &[&TensorInfo], file: &str) -> Result<Value> {
    let arch = need(m, "general.architecture", file)?.as_str().unwrap_or_default().to_string();
    let a = |k: &str| format!("{arch}.{k}");
    let has = |name: &str| tensors.iter().any(|t| t.name == name);
    let (hf, model_type) = match arch.as_str() {
        "llama" | "mixtral" if m.contains_key(&a("expert_count")) => ("MixtralForCausalLM", "mixtral"),
        "qwen2moe" => ("Qwen2MoeForCausalLM", "qwen2_moe"),
        "qwen3moe" => ("Qwen3MoeForCausalLM", "qwen3_moe"),
        "olmoe" => ("OlmoeForCausalLM", "olmoe"),
        "deepseek2" => return deepseek_config(m, tensors, file),
        other => return Err(Error::invalid(file, format!("GGUF architecture `{other}` is not supported; supported: llama (Mixtral, with experts), qwen2moe, qwen3moe, olmoe, deepseek2"))),
    };
    let heads = need_u64(m, &a("attention.head_count"), file)?;
    let hidden = need_u64(m, &a("embedding_length"), file)?;
    let head_dim = m.get(&a("attention.key_length")).and_then(Meta::as_u64).unwrap_or(hidden / heads.max(1));
    if let Some(rot) = m.get(&a("rope.dimension_count")).and_then(Meta::as_u64).filter(|&r| r != head_dim) {
        return Err(Error::invalid(file, format!("rope over {rot} of {head_dim} head dimensions is not supported")));
    }
    let vocab = match m.get("tokenizer.ggml.tokens") {
        Some(Meta::Array(t)) => t.len() as u64,
        _ => need_u64(m, &a("vocab_size"), file)?,
    };
    let ff = need_u64(m, &a("feed_forward_length"), file)?;
    let mut c = json!({
        "architectures": [hf],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "num_hidden_layers": need_u64(m, &a("block_count"), file)?,
        "num_attention_heads": heads,
        "num_key_value_heads": m.get(&a("attention.head_count_kv")).and_then(Meta::as_u64).unwrap_or(heads),
        "head_dim": head_dim,
        "intermediate_size": ff,
        "rms_norm_eps": need(m, &a("attention.layer_norm_rms_epsilon"), file)?.as_f64().unwrap_or(1e-6),
        "rope_theta": m.get(&a("rope.freq_base")).and_then(Meta::as_f64).unwrap_or(10000.0),
        "max_position_embeddings": m.get(&a("context_length")).and_then(Meta::as_u64).unwrap_or(4096),
        "vocab_size": vocab,
        "tie_word_embeddings": !has("output.weight"),
        "num_experts_per_tok": need_u64(m, &a("expert_used_count"), file)?,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id").and_then(Meta::as_u64),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id").and_then(Meta::as_u64),
    });
    let experts = need_u64(m, &a("expert_count"), file)?;
    let o = c.as_object_mut().unwrap();
    if let Some(rope) = rope_parameters(m, &arch, false, file)? {
        o.insert("rope_parameters".into(), rope);
    }
    match model_type {
        "mixtral" => {
            o.insert("num_local_experts".into(), experts.into());
        }
        _ => {
            o.insert("num_experts".into(), experts.into());
            o.insert("moe_intermediate_size".into(), m.get(&a("expert_feed_forward_length")).and_then(Meta::as_u64).unwrap_or(ff).into());
            // llama.cpp's graphs: Qwen3-MoE renormalises the chosen experts' weights, Qwen2-MoE
            // and OLMoE do not.
            o.insert("norm_topk_prob".into(), (model_type == "qwen3_moe").into());
            o.insert("mlp_only_layers".into(), json!([]));
            o.insert("decoder_sparse_step".into(), 1.into());
        }
    }
    if model_type == "qwen2_moe" {
        let shared = m.get(&a("expert_shared_feed_forward_length")).and_then(Meta::as_u64).unwrap_or(0);
        o.insert("shared_expert_intermediate_size".into(), shared.into());
        o.insert("qkv_bias".into(), has("blk.0.attn_q.bias").into());
    }
    Ok(c)
}

/// The rope scaling block of `config.json` (transformers 5's `rope_parameters`) from the
/// `ARCH.rope.*` metadata, None without scaling. DeepSeek's files carry `mscale_all_dim` as
/// `yarn_log_multiplier` (times 0.1) and not `mscale`: llama.cpp's graph takes them as equal
/// (cos and sin unscaled), as in DeepSeek's published configs, and so does this.
fn rope_parameters(m: &BTreeMap<String, Meta>, arch: &str, deepseek: bool, file: &str) -> Result<Option<Value>> {
    let key = |k: &str| format!("{arch}.rope.{k}");
    let f = |k: &str| m.get(&key(k)).and_then(Meta::as_f64);
    let theta = f("freq_base").unwrap_or(10000.0);
    let kind = m.get(&key("scaling.type")).and_then(Meta::as_str).unwrap_or("none");
    let factor = f("scaling.factor");
    let mut p = match (kind, factor) {
        ("none", _) => return Ok(None),
        ("linear", Some(factor)) => json!({"rope_type": "linear", "factor": factor, "rope_theta": theta}),
        ("yarn", Some(factor)) => json!({"rope_type": "yarn", "factor": factor, "rope_theta": theta}),
        ("linear" | "yarn", None) => return Err(Error::invalid(file, format!("metadata `{}` is missing for {kind} rope scaling", key("scaling.factor")))),
        (other, _) => return Err(Error::invalid(file, format!("metadata `{}` = {other}: supported rope scaling types are none, linear and yarn", key("scaling.type")))),
    };
    if kind == "yarn" {
        let o = p.as_object_mut().unwrap();
        if let Some(n) = m.get(&key("scaling.original_context_length")).and_then(Meta::as_u64) {
            o.insert("original_max_position_embeddings".into(), n.into());
        }
        for (gguf, hf) in [("scaling.yarn_beta_fast", "beta_fast"), ("scaling.yarn_beta_slow", "beta_slow"), ("scaling.yarn_attn_factor", "attention_factor")] {
            if let Some(v) = f(gguf) {
                o.insert(hf.into(), v.into());
            }
        }
        if let Some(log_mul) = f("scaling.yarn_log_multiplier").filter(|_| deepseek) {
            // Divided in f32, the precision it was stored in: 0.1 * 1.0 comes back as 1.0.
            let all_dim = (log_mul as f32 / 0.1f32) as f64;
            o.insert("mscale_all_dim".into(), all_dim.into());
            o.insert("mscale".into(), all_dim.into());
        }
    }
    Ok(Some(p))
}

/// The `config.json` of a DeepSeek-V2 or V3 model from llama.cpp's `deepseek2` metadata. The
/// converter writes MLA as one key/value head of `kv_lora_rank + qk_rope_head_dim`; the
/// per-head widths are in the `*_mla` keys. V3 is told apart by its sigmoid gating (and the
/// score correction bias it carries).
fn deepseek_config(m: &BTreeMap<String, Meta>, tensors: &[&TensorInfo], file: &str) -> Result<Value> {
    let a = |k: &str| format!("deepseek2.{k}");
    let u = |k: &str| need_u64(m, &a(k), file);
    let opt = |k: &str| m.get(&a(k)).and_then(Meta::as_u64);
    let has = |name: &str| tensors.iter().any(|t| t.name == name);
    let rope_dim = u("rope.dimension_count")?;
    let key_mla = u("attention.key_length_mla")?;
    if key_mla <= rope_dim {
        return Err(Error::invalid(file, format!("metadata `{}` = {key_mla} leaves no room for {rope_dim} rope dimensions", a("attention.key_length_mla"))));
    }
    // 1 softmax, 2 sigmoid; files from before the key are DeepSeek-V2's softmax.
    let sigmoid = match opt("expert_gating_func") {
        None | Some(0) | Some(1) => false,
        Some(2) => true,
        Some(g) => return Err(Error::invalid(file, format!("metadata `{}` = {g}: supported gating functions are 1 (softmax) and 2 (sigmoid)", a("expert_gating_func")))),
    };
    let v3 = sigmoid || tensors.iter().any(|t| t.name.ends_with(".exp_probs_b.bias"));
    let (n_group, topk_group) = (opt("expert_group_count").unwrap_or(1), opt("expert_group_used_count").unwrap_or(1));
    let heads = u("attention.head_count")?;
    let mut c = json!({
        "architectures": [if v3 { "DeepseekV3ForCausalLM" } else { "DeepseekV2ForCausalLM" }],
        "model_type": if v3 { "deepseek_v3" } else { "deepseek_v2" },
        "hidden_act": "silu",
        "hidden_size": u("embedding_length")?,
        "num_hidden_layers": u("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": u("feed_forward_length")?,
        "moe_intermediate_size": u("expert_feed_forward_length")?,
        "n_routed_experts": u("expert_count")?,
        "num_experts_per_tok": u("expert_used_count")?,
        "n_shared_experts": opt("expert_shared_count").unwrap_or(0),
        "first_k_dense_replace": opt("leading_dense_block_count").unwrap_or(0),
        "q_lora_rank": opt("attention.q_lora_rank"),
        "kv_lora_rank": u("attention.kv_lora_rank")?,
        "qk_nope_head_dim": key_mla - rope_dim,
        "qk_rope_head_dim": rope_dim,
        "v_head_dim": u("attention.value_length_mla")?,
        "rms_norm_eps": need(m, &a("attention.layer_norm_rms_epsilon"), file)?.as_f64().unwrap_or(1e-6),
        "rope_theta": m.get(&a("rope.freq_base")).and_then(Meta::as_f64).unwrap_or(10000.0),
        "rope_interleave": true,
        "max_position_embeddings": opt("context_length").unwrap_or(4096),
        "vocab_size": match m.get("tokenizer.ggml.tokens") {
            Some(Meta::Array(t)) => t.len() as u64,
            _ => u("vocab_size")?,
        },
        "tie_word_embeddings": !has("output.weight"),
        "routed_scaling_factor": m.get(&a("expert_weights_scale")).and_then(Meta::as_f64).unwrap_or(1.0),
        "norm_topk_prob": matches!(m.get(&a("expert_weights_norm")), Some(Meta::Bool(true))),
        "scoring_func": if sigmoid { "sigmoid" } else { "softmax" },
        "topk_method": if v3 { "noaux_tc" } else if n_group > 1 { "group_limited_greedy" } else { "greedy" },
        "n_group": n_group,
        "topk_group": topk_group,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id").and_then(Meta::as_u64),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id").and_then(Meta::as_u64),
    });
    if let Some(rope) = rope_parameters(m, "deepseek2", true, file)? {
        c.as_object_mut().unwrap().insert("rope_parameters".into(), rope);
    }
    Ok(c)
}

/// Per-layer tensors renamed one to one: llama.cpp's name, Hugging Face's after
/// `model.layers.N.` (`MOE` is the architecture's MoE block: `block_sparse_moe` or `mlp`).
const LAYER_TENSORS: [(&str, &str); 13] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    ("ffn_gate_inp.weight", "MOE.gate.weight"),
    ("ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight"),
];

/// The tensors under their Hugging Face names. `files` are the mapped parts.
fn hf_checkpoint(files: Vec<(PathBuf, memmap2::Mmap)>, tensors: Vec<(usize, TensorInfo)>, config: &Value, file: &str) -> Result<Checkpoint> {
    let num = |k: &str| config[k].as_u64().unwrap_or(0) as usize;
    let mixtral = config["model_type"] == "mixtral";
    let deepseek = config["model_type"].as_str().is_some_and(|t| t.starts_with("deepseek"));
    let (heads, kv_heads, head_dim) = (num("num_attention_heads"), num("num_key_value_heads"), num("head_dim"));
    let moe = if mixtral { "block_sparse_moe" } else { "mlp" };
    let expert_names: [&str; 3] = if mixtral { ["w1", "w3", "w2"] } else { ["gate_proj", "up_proj", "down_proj"] };
    let mut entries = Vec::new();
    // Rewritten tensors (un-interleaved query and key rows) live in one extra in-memory file.
    let mut rewritten: Vec<u8> = Vec::new();
    let extra = files.len();
    let mut out_files: Vec<(PathBuf, crate::loader::checkpoint::SharedBytes)> = Vec::new();
    // Each layer's key and value halves: (file index, tensor).
    type Half<'t> = Option<(usize, &'t TensorInfo)>;
    let mut kv_b: BTreeMap<usize, (Half, Half)> = BTreeMap::new();
    for (i, t) in &tensors {
        let data = &files[*i].1[t.start..t.end];
        // HF shape: ne reversed.
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        let mut put = |name: String, shape: Vec<usize>, start: usize, end: usize| entries.push((name, *i, t.dtype, shape, start, end));
        let Some(rest) = t.name.strip_prefix("blk.") else {
            let name = match t.name.as_str() {
                "token_embd.weight" => "model.embed_tokens.weight",
                "output.weight" => "lm_head.weight",
                "output_norm.weight" => "model.norm.weight",
                // Tensors the engine has no use for (rope frequency tables and the like).
                _ => continue,
            };
            put(name.to_string(), shape, t.start, t.end);
            continue;
        };
        let (layer, key) = rest.split_once('.').ok_or_else(|| Error::invalid(file, format!("tensor `{}`: no layer index", t.name)))?;
        let layer: usize = layer.parse().map_err(|_| Error::invalid(file, format!("tensor `{}`: bad layer index", t.name)))?;
        let p = format!("model.layers.{layer}");
        if deepseek {
            if let Some((_, hf)) = DEEPSEEK_TENSORS.iter().find(|(g, _)| *g == key) {
                put(format!("{p}.{hf}"), shape, t.start, t.end);
                continue;
            }
            // MLA's kv_b_proj, which the converter splits per head: put together below.
            if key == "attn_k_b.weight" || key == "attn_v_b.weight" {
                let halves = kv_b.entry(layer).or_insert((None, None));
                if key == "attn_k_b.weight" { halves.0 = Some((*i, t)) } else { halves.1 = Some((*i, t)) }
                continue;
            }
        }
        let simple = LAYER_TENSORS.iter().find(|(g, _)| *g == key).map(|(_, hf)| format!("{p}.{}", hf.replace("MOE", moe)));
        if let Some(name) = simple {
            put(name, shape, t.start, t.end);
            continue;
        }
        // The shared expert's gate is a vector in GGUF, a one-row matrix in transformers.
        if key == "ffn_gate_inp_shexp.weight" {
            put(format!("{p}.mlp.shared_expert_gate.weight"), vec![1, t.dims[0]], t.start, t.end);
            continue;
        }
        if let Some(kind) = ["ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"].iter().position(|k| *k == key) {
            if t.dims.len() != 3 {
                return Err(Error::invalid(file, format!("tensor `{}`: shape {:?}, expected three dimensions", t.name, t.dims)));
            }
            let each = (t.end - t.start) / t.dims[2];
            for e in 0..t.dims[2] {
                let s = t.start + e * each;
                put(format!("{p}.{moe}.experts.{e}.{}.weight", expert_names[kind]), vec![t.dims[1], t.dims[0]], s, s + each);
            }
            continue;
        }
        if key == "attn_q.weight" || key == "attn_k.weight" {
            let name = format!("{p}.self_attn.{}_proj.weight", &key[5..6]);
            if !mixtral {
                put(name, shape, t.start, t.end);
                continue;
            }
            // llama.cpp's converter interleaves each head's two rope halves for Mixtral: GGUF
            // row (h, 2i + j) is Hugging Face row (h, j * d/2 + i).
            let n_heads = if key == "attn_q.weight" { heads } else { kv_heads };
            let rows = shape[0];
            if n_heads == 0 || rows != n_heads * head_dim || !head_dim.is_multiple_of(2) {
                return Err(Error::invalid(file, format!("tensor `{}`: {rows} rows for {n_heads} heads of {head_dim}", t.name)));
            }
            let row_bytes = data.len() / rows;
            let start = rewritten.len();
            let half = head_dim / 2;
            for h in 0..n_heads {
                for j in 0..2 {
                    for i in 0..half {
                        let g = h * head_dim + 2 * i + j;
                        rewritten.extend_from_slice(&data[g * row_bytes..(g + 1) * row_bytes]);
                    }
                }
            }
            rewritten.resize(rewritten.len().next_multiple_of(32), 0);
            entries.push((name, extra, t.dtype, shape, start, start + data.len()));
            continue;
        }
        // Unknown per-layer tensors are left out; a tensor the model needs and lacks fails at
        // load, naming its Hugging Face name.
    }
    for (layer, halves) in kv_b {
        let ((ki, k), (vi, v)) = match halves {
            (Some(k), Some(v)) => (k, v),
            (k, _) => {
                let gone = if k.is_none() { "attn_k_b" } else { "attn_v_b" };
                return Err(Error::invalid(file, format!("tensor `blk.{layer}.{gone}.weight` is missing (MLA's kv_b_proj comes in two halves)")));
            }
        };
        let (heads, nope, v_dim, rank) = (num("num_attention_heads"), num("qk_nope_head_dim"), num("v_head_dim"), num("kv_lora_rank"));
        for (t, want) in [(k, [nope, rank, heads]), (v, [rank, v_dim, heads])] {
            if t.dims != want {
                return Err(Error::invalid(file, format!("tensor `{}`: dims {:?}, expected {want:?} from the metadata", t.name, t.dims)));
            }
        }
        let (dtype, bytes) = joined_kv_b(&files[ki].1[k.start..k.end], &files[vi].1[v.start..v.end], k, v, [heads, nope, v_dim, rank]);
        let start = rewritten.len();
        rewritten.extend_from_slice(&bytes);
        rewritten.resize(rewritten.len().next_multiple_of(32), 0);
        entries.push((format!("model.layers.{layer}.self_attn.kv_b_proj.weight"), extra, dtype, vec![heads * (nope + v_dim), rank], start, start + bytes.len()));
    }
    for (p, map) in files {
        out_files.push((p, std::sync::Arc::new(MmapBytes(map))));
    }
    out_files.push((PathBuf::from(format!("{file} (rearranged tensors)")), std::sync::Arc::new(rewritten)));
    Checkpoint::assemble(out_files, entries)
}

/// DeepSeek's tensors renamed one to one (MLA's projections, dense layers, shared experts,
/// the score correction bias), after `model.layers.N.`.
const DEEPSEEK_TENSORS: [(&str, &str); 13] = [
    ("attn_q_a.weight", "self_attn.q_a_proj.weight"),
    ("attn_q_a_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn_q_b.weight", "self_attn.q_b_proj.weight"),
    ("attn_kv_a_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn_kv_a_norm.weight", "self_attn.kv_a_layernorm.weight"),
    // Files from converters that kept kv_b_proj whole.
    ("attn_kv_b.weight", "self_attn.kv_b_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("ffn_gate_shexp.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn_up_shexp.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn_down_shexp.weight", "mlp.shared_experts.down_proj.weight"),
    ("exp_probs_b.bias", "mlp.gate.e_score_correction_bias"),
];

/// MLA's `kv_b_proj` (`[heads * (nope + v), rank]`: each head's key rows, then its value rows)
/// from the converter's halves: `attn_k_b` holds each head's key rows transposed
/// (`[heads, rank, nope]`), `attn_v_b` its value rows (`[heads, v, rank]`). Float tensors keep
/// their dtype; block formats, whose blocks run along the rank that the key half transposes,
/// are widened to f32 (exact).
fn joined_kv_b(k: &[u8], v: &[u8], kt: &TensorInfo, vt: &TensorInfo, [heads, nope, v_dim, rank]: [usize; 4]) -> (Dtype, Vec<u8>) {
    let widened = |data: &[u8], t: &TensorInfo| -> Vec<u8> {
        let shape: Vec<usize> = t.dims.iter().rev().copied().collect();
        let r = crate::loader::checkpoint::TensorRef { name: &t.name, dtype: t.dtype, shape: &shape, data };
        bytemuck::cast_slice(&r.to_f32()).to_vec()
    };
    let (dtype, k, v) = match (kt.dtype, vt.dtype) {
        (a, b) if a == b && matches!(a, Dtype::F32 | Dtype::F16 | Dtype::Bf16) => (a, Cow::Borrowed(k), Cow::Borrowed(v)),
        _ => (Dtype::F32, Cow::Owned(widened(k, kt)), Cow::Owned(widened(v, vt))),
    };
    let es = dtype.bytes_of(1);
    let mut out = Vec::with_capacity(heads * (nope + v_dim) * rank * es);
    for h in 0..heads {
        for n in 0..nope {
            for r in 0..rank {
                let at = ((h * rank + r) * nope + n) * es;
                out.extend_from_slice(&k[at..at + es]);
            }
        }
        let rows = h * v_dim * rank * es;
        out.extend_from_slice(&v[rows..rows + v_dim * rank * es]);
    }
    (dtype, out)
}

struct MmapBytes(memmap2::Mmap);

impl AsRef<[u8]> for MmapBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid file: two metadata pairs (one an array) and two tensors.
    fn sample() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, v: &str| {
            b.extend_from_slice(&(v.len() as u64).to_le_bytes());
            b.extend_from_slice(v.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&3u64.to_le_bytes());
        for t in ["a", "bc", "d"] {
            s(&mut b, t);
        }
        for (name, dims, ty, offset) in [("w", vec![32u64, 2], 8u32, 0u64), ("n", vec![4], 0, 96)] {
            s(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        b.resize(b.len().next_multiple_of(32) + 96 + 16, 7);
        b
    }

    #[test]
    fn a_valid_header_parses() {
        let h = parse(&sample(), "t.gguf").unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.metadata["general.architecture"], Meta::Str("llama".into()));
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].dtype, Dtype::Block(WeightDtype::Q8_0));
        assert_eq!(h.tensors[0].end - h.tensors[0].start, 68);
    }

    /// Mutated and truncated headers: an error (or a parse), never a panic, and no allocation
    /// beyond what the bytes could hold (the counts are checked before anything is reserved).
    #[test]
    fn mutated_and_truncated_headers_are_errors_not_panics() {
        let good = sample();
        let mut state = 0x2545f4914f6cdd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in 0..good.len() {
            let _ = parse(&good[..len], "t.gguf");
        }
        for _ in 0..20000 {
            let mut b = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % b.len();
                b[at] = match next() % 4 {
                    0 => 0xff,
                    1 => 0,
                    _ => next() as u8,
                };
            }
            let _ = parse(&b, "t.gguf");
        }
        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = parse(&huge, "t.gguf").unwrap_err().to_string();
        assert!(e.contains("tensor count"), "{e}");
    }

    /// kv_b_proj rebuilt from the converter's halves puts each head's key rows (untransposed)
    /// before its value rows, for float halves as stored and block ones widened.
    #[test]
    fn mla_kv_b_is_rebuilt_from_its_halves() {
        let (heads, nope, v_dim, rank) = (3, 32, 32, 64);
        let key = |h: usize, r: usize, n: usize| (h * 10000 + r * 100 + n) as f32 * 0.001 - 7.0;
        let value = |h: usize, j: usize, r: usize| -((h * 10000 + j * 100 + r) as f32) * 0.002 + 3.0;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for h in 0..heads {
            for r in 0..rank {
                k.extend((0..nope).map(|n| key(h, r, n)));
            }
            for j in 0..v_dim {
                v.extend((0..rank).map(|r| value(h, j, r)));
            }
        }
        let info = |name: &str, dims: Vec<usize>, dtype: Dtype| TensorInfo { name: name.into(), dims, dtype, start: 0, end: 0 };
        let (kt, vt) = (info("k", vec![nope, rank, heads], Dtype::F32), info("v", vec![rank, v_dim, heads], Dtype::F32));
        let (dtype, bytes) = joined_kv_b(bytemuck::cast_slice(&k), bytemuck::cast_slice(&v), &kt, &vt, [heads, nope, v_dim, rank]);
        assert_eq!(dtype, Dtype::F32);
        let joined: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
        assert_eq!(joined.len(), heads * (nope + v_dim) * rank);
        for h in 0..heads {
            for r in 0..rank {
                for n in 0..nope {
                    assert_eq!(joined[(h * (nope + v_dim) + n) * rank + r], key(h, r, n));
                }
                for j in 0..v_dim {
                    assert_eq!(joined[(h * (nope + v_dim) + nope + j) * rank + r], value(h, j, r));
                }
            }
        }
        // Q8_0 halves: the same as joining their dequantised values.
        let q = |x: &[f32], cols: usize| crate::quant::quantize(WeightDtype::Q8_0, x, cols).unwrap();
        let (kq, vq) = (q(&k, nope), q(&v, rank));
        let block = Dtype::Block(WeightDtype::Q8_0);
        let (kb, vb) = (info("k", vec![nope, rank, heads], block), info("v", vec![rank, v_dim, heads], block));
        let (dtype, bytes) = joined_kv_b(&kq, &vq, &kb, &vb, [heads, nope, v_dim, rank]);
        assert_eq!(dtype, Dtype::F32);
        let widen = |b: &[u8], n: usize| {
            let mut out = vec![0f32; n];
            crate::quant::dequantize(WeightDtype::Q8_0, b, &mut out);
            out
        };
        let (kw, vw) = (widen(&kq, k.len()), widen(&vq, v.len()));
        let (_, want) = joined_kv_b(bytemuck::cast_slice(&kw), bytemuck::cast_slice(&vw), &kt, &vt, [heads, nope, v_dim, rank]);
        assert_eq!(bytes, want);
        assert_ne!(kw, k, "Q8_0 rounds these values");
    }

    #[test]
    fn split_names() {
        assert_eq!(split_of(Path::new("/m/x-00002-of-00003.gguf")), Some((2, 3)));
        assert_eq!(split_of(Path::new("/m/x.gguf")), None);
    }
}
