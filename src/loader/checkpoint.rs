//! Safetensors checkpoints, single-file or sharded, memory-mapped: tensors are read in place from
//! the page cache and never copied whole into RAM.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::gpu::WeightDtype;
use crate::loader::config::read_json;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    /// FP8 e4m3 (fn: no infinities), with block scales in a `*_scale_inv` tensor beside it.
    F8E4M3,
    /// One of llama.cpp's block formats (GGUF files), read by the kernels as stored.
    Block(WeightDtype),
}

impl Dtype {
    /// Bytes of `elements` stored elements.
    pub fn bytes_of(self, elements: usize) -> usize {
        match self {
            Dtype::F32 => 4 * elements,
            Dtype::F16 | Dtype::Bf16 => 2 * elements,
            Dtype::F8E4M3 => elements,
            Dtype::Block(q) => q.bytes_of(elements),
        }
    }

    /// The dtype the GPU kernels read: FP8 weights are dequantised to bf16 on the GPU.
    pub fn weight(self) -> WeightDtype {
        match self {
            Dtype::F32 => WeightDtype::F32,
            Dtype::F16 => WeightDtype::F16,
            Dtype::Bf16 | Dtype::F8E4M3 => WeightDtype::Bf16,
            Dtype::Block(q) => q,
        }
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Bytes shared between a checkpoint and the buffers that read them in place.
pub(crate) type SharedBytes = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A checkpoint file's bytes: mapped from disk, or built in memory (synthetic models). Shared,
/// so that the CPU device's weight buffers can read them in place and keep them alive.
#[derive(Clone)]
struct Bytes(std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>);

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Bytes)>,
    tensors: HashMap<String, Entry>,
}

/// A tensor's bytes, in place in the mapped file.
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorRef<'_> {
    /// The values as f32 (norm weights and biases, which the kernels take in f32).
    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            Dtype::F32 => bytemuck::pod_collect_to_vec(self.data),
            Dtype::F16 => self.data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::Bf16 => self.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F8E4M3 => self.data.iter().map(|&b| crate::kernels::dequant::e4m3_to_f32(b)).collect(),
            Dtype::Block(q) => {
                let mut out = vec![0f32; self.shape.iter().product()];
                crate::quant::dequantize(q, self.data, &mut out);
                out
            }
        }
    }
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::invalid(path.display().to_string(), detail)
}

impl Checkpoint {
    /// Lends the files' bytes to the CPU device, whose weight buffers then read them in place
    /// instead of copying them (no effect on a GPU).
    pub fn lend_to(&self, ctx: &crate::gpu::GpuContext) {
        for (_, bytes) in &self.files {
            ctx.lend_host_bytes(bytes.0.clone());
        }
    }

    /// Opens `model.safetensors`, or the shards that `model.safetensors.index.json` lists.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| bad(&index, "no `weight_map` object"))?;
            let mut shards: Vec<String> = Vec::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| bad(&index, format!("the shard of `{tensor}` is not a file name")))?;
                if !shards.iter().any(|s| s == shard) {
                    shards.push(shard.to_string());
                }
            }
            shards.sort();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(bad(dir, "no model.safetensors or model.safetensors.index.json in the model directory"));
        };
        let mut checkpoint = Checkpoint { files: Vec::new(), tensors: HashMap::new() };
        for path in files {
            checkpoint.add_file(path)?;
        }
        Ok(checkpoint)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<()> {
        let file = File::open(&path).map_err(|error| Error::Io { path: path.clone(), error })?;
        // SAFETY: the mapping is read-only; a file changed underneath a running job is outside
        // what the engine can defend against, as for any memory-mapped reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|error| Error::Io { path: path.clone(), error })?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map[..])
            .map_err(|e| bad(&path, format!("not a readable safetensors file: {e}")))?;
        let data_start = 8 + header_len;
        let index = self.files.len();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                safetensors::Dtype::F32 => Dtype::F32,
                safetensors::Dtype::F16 => Dtype::F16,
                safetensors::Dtype::BF16 => Dtype::Bf16,
                safetensors::Dtype::F8_E4M3 => Dtype::F8E4M3,
                other => return Err(bad(&path, format!("tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16, F8_E4M3"))),
            };
            let (start, end) = (data_start + info.data_offsets.0, data_start + info.data_offsets.1);
            if end > map.len() {
                return Err(bad(&path, format!("truncated: tensor `{name}` ends at byte {end}, the file has {}", map.len())));
            }
            let elements: usize = info.shape.iter().product();
            if dtype.bytes_of(elements) != end - start {
                return Err(bad(&path, format!("tensor `{name}`: shape {:?} does not match its {} bytes", info.shape, end - start)));
            }
            self.tensors.insert(name.clone(), Entry { file: index, dtype, shape: info.shape.clone(), start, end });
        }
        self.files.push((path, Bytes(std::sync::Arc::new(MapBytes(map)))));
        Ok(())
    }

    /// A checkpoint held in memory: `tensors` are (name, dtype, shape, index into `blobs`);
    /// several tensors may share one blob (synthetic models reuse random bytes).
    pub fn in_memory(label: &str, blobs: Vec<Vec<u8>>, tensors: Vec<(String, Dtype, Vec<usize>, usize)>) -> Result<Self> {
        let mut data = Vec::new();
        let mut starts = Vec::new();
        for b in &blobs {
            starts.push(data.len());
            data.extend_from_slice(b);
        }
        let mut map = HashMap::new();
        for (name, dtype, shape, blob) in tensors {
            let len = dtype.bytes_of(shape.iter().product::<usize>());
            if blobs[blob].len() != len {
                return Err(Error::invalid(label, format!("tensor `{name}` needs {len} bytes, its blob has {}", blobs[blob].len())));
            }
            map.insert(name, Entry { file: 0, dtype, shape, start: starts[blob], end: starts[blob] + len });
        }
        Ok(Checkpoint { files: vec![(PathBuf::from(label), Bytes(std::sync::Arc::new(data)))], tensors: map })
    }

    /// A checkpoint over files already read (GGUF models): `tensors` are (name, file index,
    /// dtype, shape, byte range in that file), each checked against its file and its size.
    pub(crate) fn assemble(
        files: Vec<(PathBuf, SharedBytes)>,
        tensors: Vec<(String, usize, Dtype, Vec<usize>, usize, usize)>,
    ) -> Result<Self> {
        let mut map = HashMap::new();
        for (name, file, dtype, shape, start, end) in tensors {
            let (path, bytes) = &files[file];
            let len = dtype.bytes_of(shape.iter().product::<usize>());
            if end > (**bytes).as_ref().len() || end < start || end - start != len {
                return Err(bad(path, format!("tensor `{name}`: bytes {start}..{end} do not hold shape {shape:?}")));
            }
            map.insert(name, Entry { file, dtype, shape, start, end });
        }
        Ok(Checkpoint { files: files.into_iter().map(|(p, b)| (p, Bytes(b))).collect(), tensors: map })
    }

    /// The same checkpoint with every block-quantised tensor widened to f32 (`--dequantize`: the
    /// reference the packed kernels are checked against), in memory.
    pub fn dequantized(&self) -> Result<Self> {
        let mut blobs = Vec::new();
        let mut tensors = Vec::new();
        for (name, e) in &self.tensors {
            let t = TensorRef { name, dtype: e.dtype, shape: &e.shape, data: &self.files[e.file].1[e.start..e.end] };
            let (dtype, bytes) = match e.dtype {
                Dtype::Block(_) => (Dtype::F32, bytemuck::cast_slice(&t.to_f32()).to_vec()),
                d => (d, t.data.to_vec()),
            };
            tensors.push((name.clone(), dtype, e.shape.clone(), blobs.len()));
            blobs.push(bytes);
        }
        let label = self.files.first().map(|(p, _)| format!("{} (dequantised)", p.display())).unwrap_or_default();
        Self::in_memory(&label, blobs, tensors)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored size of a tensor (0 for a name not in the checkpoint).
    pub fn bytes_of(&self, name: &str) -> u64 {
        self.tensors.get(name).map_or(0, |e| (e.end - e.start) as u64)
    }

    /// The shape of a tensor (empty for a name not in the checkpoint).
    pub fn shape_of(&self, name: &str) -> &[usize] {
        self.tensors.get(name).map_or(&[], |e| &e.shape)
    }

    /// Elements of a tensor (0 for a name not in the checkpoint).
    pub fn elements_of(&self, name: &str) -> usize {
        self.tensors.get(name).map_or(0, |e| e.shape.iter().product())
    }

    pub fn dtype_of(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(name).map(|e| e.dtype)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor `name`, which must have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let (key, e) = self.tensors.get_key_value(name).ok_or_else(|| {
            // A GGUF model is named by its file, a Hugging Face one by its directory.
            let first = self.files.first().map(|(p, _)| p.as_path());
            let dir = match first {
                Some(p) if p.extension().is_some_and(|e| e == "gguf") => Some(p),
                _ => first.and_then(|p| p.parent()),
            };
            let dir = dir.map(|p| p.display().to_string()).unwrap_or_default();
            Error::invalid(format!("checkpoint {dir}"), format!("tensor `{name}` is missing"))
        })?;
        let (path, map) = &self.files[e.file];
        if e.shape != shape {
            return Err(bad(path, format!("tensor `{name}` has shape {:?}, expected {shape:?}", e.shape)));
        }
        Ok(TensorRef { name: key, dtype: e.dtype, shape: &e.shape, data: &map[e.start..e.end] })
    }

    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<TensorRef<'_>>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// A mapping as bytes.
struct MapBytes(Mmap);

impl AsRef<[u8]> for MapBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}
