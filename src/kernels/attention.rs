//! Attention with grouped-query heads over ragged batches: causal prefill of prompts and decode
//! over a KV cache run through the same kernel, told by host-built key ranges which rows each
//! query row sees.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, KernelFeatures, ShaderBuilder, ShaderSource};
use crate::kernels::{need, u32_of};

/// Keys each thread scores per block (a block is `wg * KEYS_PER_THREAD` keys).
const KEYS_PER_THREAD: u32 = 4;
/// Most query heads one workgroup serves (workgroup memory holds their queries and scores).
const MAX_HEADS_PER_WORKGROUP: usize = 8;

/// The variant of the kernel a device runs (its tuning chooses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct AttentionKernel {
    /// Threads per workgroup.
    pub wg: u32,
    /// Each subgroup scores one key at a time, its lanes reading consecutive elements of the key
    /// row (coalesced) and adding the products by `subgroupAdd`; otherwise each thread scores
    /// whole keys. Experimental (`MOEGEN_EXPERIMENTAL=subgroup-attention`).
    pub subgroup_keys: bool,
}

impl Default for AttentionKernel {
    fn default() -> Self {
        AttentionKernel { wg: 64, subgroup_keys: false }
    }
}

impl AttentionKernel {
    /// What the calibration times on a device with `features` (at most `threads` per workgroup).
    pub fn candidates(features: KernelFeatures, threads: u32) -> Vec<AttentionKernel> {
        let keys = if features.subgroup_attention { vec![false, true] } else { vec![false] };
        keys.into_iter()
            .flat_map(|subgroup_keys| [32, 64, 128].map(|wg| AttentionKernel { wg, subgroup_keys }))
            .filter(|k| k.wg <= threads)
            .collect()
    }

    pub fn runs_with(&self, features: KernelFeatures) -> bool {
        !self.subgroup_keys || (features.subgroup_attention && features.subgroups)
    }

    /// Query heads per workgroup: the largest divisor of the group size within the maximum whose
    /// queries and scores fit the device's workgroup memory (`wg_bytes`).
    fn heads_per_workgroup(&self, group: usize, slots: usize, wg_bytes: u32) -> usize {
        let fit = (wg_bytes as usize / self.bytes_per_head(slots)).max(1);
        (1..=MAX_HEADS_PER_WORKGROUP.min(group).min(fit)).rev().find(|d| group.is_multiple_of(*d)).unwrap_or(1)
    }

    fn bytes_per_head(&self, slots: usize) -> usize {
        (slots * self.wg as usize + (self.wg * KEYS_PER_THREAD) as usize) * 4
    }

    /// Per-thread slots of a head's query (or value) elements.
    fn slots(&self, shape: &AttentionShape) -> usize {
        shape.head_dim.max(shape.v_dim).div_ceil(self.wg as usize)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Width of a query and key head.
    pub head_dim: usize,
    /// Width of a value and output head.
    pub v_dim: usize,
    /// Values are the first `v_dim` columns of the key rows (MLA's latent), read from the key
    /// buffer.
    pub values_in_keys: bool,
    /// Multiplies q.k (1/sqrt(head_dim) unless the model says otherwise).
    pub scale: f32,
}

impl AttentionShape {
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        AttentionShape { n_heads, n_kv_heads, head_dim, v_dim: head_dim, values_in_keys: false, scale: 1.0 / (head_dim as f32).sqrt() }
    }

    /// MLA's absorbed form: every query head attends to one row per token of `key_dim` values
    /// (latent then rope key) and takes the first `value_dim` of them as the value.
    pub fn latent(n_heads: usize, key_dim: usize, value_dim: usize, scale: f32) -> Self {
        AttentionShape { n_heads, n_kv_heads: 1, head_dim: key_dim, v_dim: value_dim, values_in_keys: true, scale }
    }

    /// Floats of one value row (the key row when values live in it).
    fn v_stride(&self) -> usize {
        self.n_kv_heads * if self.values_in_keys { self.head_dim } else { self.v_dim }
    }
}

/// Key ranges for causal prefill of prompts of `lens` tokens laid out one after another: query j
/// of a prompt sees that prompt's rows 0..=j. Returns (start, len) pairs, one per query row.
pub fn prefill_ranges(lens: &[usize]) -> Vec<u32> {
    let mut ranges = Vec::new();
    let mut start = 0;
    for &len in lens {
        for j in 0..len {
            ranges.extend([start as u32, j as u32 + 1]);
        }
        start += len;
    }
    ranges
}

/// Key ranges for decode: sequence s (one query row) sees cache rows `starts[s]..starts[s] + lens[s]`
/// (its new token's key and value already appended).
pub fn decode_ranges(starts: &[usize], lens: &[usize]) -> Vec<u32> {
    starts.iter().zip(lens).flat_map(|(&s, &l)| [s as u32, l as u32]).collect()
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n_queries: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    q_stride: u32,
    kv_stride: u32,
    v_dim: u32,
    v_stride: u32,
    out_stride: u32,
    v_head_stride: u32,
    _pad: u32,
}

/// The kernel for `shape` on a device with `wg_bytes` of workgroup memory.
pub fn shader(kernel: AttentionKernel, features: KernelFeatures, shape: &AttentionShape, wg_bytes: u32) -> ShaderSource {
    let slots = kernel.slots(shape);
    let group = shape.n_heads / shape.n_kv_heads.max(1);
    let scores = if kernel.subgroup_keys {
        include_str!("../../shaders/lib/attention_scores_subgroup.wgsl")
    } else {
        include_str!("../../shaders/lib/attention_scores_thread.wgsl")
    };
    ShaderBuilder::new("attention")
        .constant("WG", kernel.wg)
        .constant("HD_SLOTS", slots as u32)
        .constant("KEYS_PER_THREAD", KEYS_PER_THREAD)
        .constant("GS", kernel.heads_per_workgroup(group, slots, wg_bytes) as u32)
        .reductions(features)
        .declare(if kernel.subgroup_keys { "scores=subgroup" } else { "scores=thread" }, scores)
        .body(include_str!("../../shaders/attention.wgsl"))
}

/// `out[q, h, :] = softmax(scale * q[q, h] . k[r, h']^T) v[r, h']` over the rows r of each query's
/// range, h' the kv head of h. q is `[n_queries, n_heads * head_dim]`, out
/// `[n_queries, n_heads * v_dim]`, k `[kv_rows, n_kv_heads * head_dim]`, v
/// `[kv_rows, n_kv_heads * v_dim]` (or k itself, see [`AttentionShape::values_in_keys`]);
/// `ranges` has a (start, len) pair per query.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    b: &mut Batch,
    shape: &AttentionShape,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    ranges: &GpuBuffer,
    out: &GpuBuffer,
    n_queries: usize,
    kv_rows: usize,
) -> Result<()> {
    let kernel = if b.on_host() { AttentionKernel::default() } else { b.ctx().tuned(|t| t.attention) };
    attention_with(b, kernel, shape, q, k, v, ranges, out, n_queries, kv_rows)
}

/// [`attention`] through a given variant of the kernel.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    b: &mut Batch,
    kernel: AttentionKernel,
    shape: &AttentionShape,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    ranges: &GpuBuffer,
    out: &GpuBuffer,
    n_queries: usize,
    kv_rows: usize,
) -> Result<()> {
    let AttentionShape { n_heads, n_kv_heads, head_dim, v_dim, scale, .. } = *shape;
    ensure!(n_queries > 0, "attention", "no queries");
    ensure!(
        n_kv_heads > 0 && n_heads % n_kv_heads == 0,
        "attention",
        "{n_heads} query heads cannot share {n_kv_heads} kv heads evenly"
    );
    ensure!(head_dim > 0 && head_dim <= 1024 && v_dim > 0 && v_dim <= 1024, "attention", "head dims {head_dim}/{v_dim} outside 1..=1024");
    ensure!(!shape.values_in_keys || v_dim <= head_dim, "attention", "values of {v_dim} inside keys of {head_dim}");
    if b.on_host() {
        need(q, n_queries * n_heads * head_dim, "attention queries")?;
        need(out, n_queries * n_heads * v_dim, "attention output")?;
        need(k, kv_rows * n_kv_heads * head_dim, "attention keys")?;
        need(v, kv_rows * shape.v_stride(), "attention values")?;
        need(ranges, 2 * n_queries, "attention key ranges")?;
        let (shape, q, k, v, ranges, out) = (*shape, q.clone(), k.clone(), v.clone(), ranges.clone(), out.clone());
        return b.host("attention", move || crate::cpu::ops::attention(&shape, &q, &k, &v, &ranges, &out, n_queries, kv_rows));
    }
    ensure!(kernel.runs_with(b.ctx().features()), "attention", "kernel {kernel:?} needs features this device lacks");
    let wg_bytes = b.ctx().limits().max_compute_workgroup_storage_size;
    let slots = kernel.slots(shape);
    let group = n_heads / n_kv_heads;
    let gs = kernel.heads_per_workgroup(group, slots, wg_bytes);
    ensure!(
        (gs * kernel.bytes_per_head(slots)) as u32 <= wg_bytes,
        "attention",
        "heads of {head_dim} need more workgroup memory than the device's {wg_bytes} bytes"
    );
    need(q, n_queries * n_heads * head_dim, "attention queries")?;
    need(out, n_queries * n_heads * v_dim, "attention output")?;
    need(k, kv_rows * n_kv_heads * head_dim, "attention keys")?;
    need(v, kv_rows * shape.v_stride(), "attention values")?;
    need(ranges, 2 * n_queries, "attention key ranges")?;
    let params = Params {
        n_queries: u32_of(n_queries, "attention queries")?,
        n_heads: n_heads as u32,
        n_kv_heads: n_kv_heads as u32,
        head_dim: head_dim as u32,
        scale,
        q_stride: (n_heads * head_dim) as u32,
        kv_stride: (n_kv_heads * head_dim) as u32,
        v_dim: v_dim as u32,
        v_stride: shape.v_stride() as u32,
        out_stride: (n_heads * v_dim) as u32,
        v_head_stride: (shape.v_stride() / n_kv_heads) as u32,
        _pad: 0,
    };
    let pipeline = b.ctx().pipeline(&shader(kernel, b.ctx().features(), shape, wg_bytes))?;
    let workgroups = n_queries * n_kv_heads * (group / gs);
    let groups = grid(b.ctx(), u32_of(workgroups, "attention grid")?);
    b.dispatch("attention", &pipeline, &params, &[q, k, v, ranges, out], groups)
}

/// The CPU reference, in f64 (`v` is ignored when the values live in the keys).
pub fn reference(shape: &AttentionShape, q: &[f32], k: &[f32], v: &[f32], ranges: &[u32]) -> Vec<f32> {
    let AttentionShape { n_heads, n_kv_heads, head_dim: hd, v_dim: vd, scale, .. } = *shape;
    let group = n_heads / n_kv_heads;
    let n_queries = ranges.len() / 2;
    let (v, v_stride) = if shape.values_in_keys { (k, n_kv_heads * hd) } else { (v, n_kv_heads * vd) };
    let mut out = vec![0f32; n_queries * n_heads * vd];
    for qi in 0..n_queries {
        let (start, len) = (ranges[2 * qi] as usize, ranges[2 * qi + 1] as usize);
        for h in 0..n_heads {
            let kvh = h / group;
            let qv = &q[(qi * n_heads + h) * hd..][..hd];
            let scores: Vec<f64> = (start..start + len)
                .map(|r| {
                    let kr = &k[(r * n_kv_heads + kvh) * hd..][..hd];
                    qv.iter().zip(kr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() * scale as f64
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let total: f64 = weights.iter().sum();
            let v_col = kvh * if shape.values_in_keys { hd } else { vd };
            for d in 0..vd {
                let acc: f64 = (start..start + len).zip(&weights).map(|(r, w)| w * v[r * v_stride + v_col + d] as f64).sum();
                out[(qi * n_heads + h) * vd + d] = (acc / total) as f32;
            }
        }
    }
    out
}
