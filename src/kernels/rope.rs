//! Rotary position embedding, half-split (neox) or interleaved, with a position per token.
//!
//! The cos/sin values come from a table built on the host, as transformers builds them (the angle
//! `position * inv_freq` rounded to f32, then cos and sin), so the GPU never evaluates
//! trigonometry of large angles, whose precision drivers do not guarantee, and every rope scaling
//! (linear, YaRN, llama3) is only a different `inv_freq` and `attention_scaling`.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, GpuContext, ShaderBuilder, ShaderSource};
use crate::kernels::{need, u32_of, ELEMENT_WG};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (i, i + rot_dim/2): Llama, Mixtral, Qwen, OLMoE.
    HalfSplit,
    /// Pairs (2i, 2i+1): GPT-J style, and DeepSeek's rope dims after its permutation.
    Interleaved,
}

/// The standard frequencies `theta^(-2i/rot_dim)`, in f32 as transformers computes them.
pub fn default_inv_freq(theta: f32, rot_dim: usize) -> Vec<f32> {
    (0..rot_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / rot_dim as f32)).collect()
}

/// `(cos, sin) * attention_scaling` for positions `0..positions`, row-major by position.
pub fn cos_sin_table(inv_freq: &[f32], attention_scaling: f32, positions: usize) -> Vec<[f32; 2]> {
    let mut table = Vec::with_capacity(positions * inv_freq.len());
    for pos in 0..positions {
        for &f in inv_freq {
            let angle = (pos as f32 * f) as f64;
            table.push([(angle.cos() as f32) * attention_scaling, (angle.sin() as f32) * attention_scaling]);
        }
    }
    table
}

/// The cos/sin table on the GPU.
pub struct RopeTable {
    pub buffer: GpuBuffer,
    /// Rotated dims per head (twice the frequencies).
    pub rot_dim: usize,
    pub positions: usize,
}

impl RopeTable {
    pub fn new(ctx: &GpuContext, inv_freq: &[f32], attention_scaling: f32, positions: usize) -> Result<Self> {
        ensure!(!inv_freq.is_empty() && positions > 0, "rope table", "{} frequencies, {positions} positions", inv_freq.len());
        let table = cos_sin_table(inv_freq, attention_scaling, positions);
        let buffer = ctx.storage_from("rope cos/sin table", &table)?;
        Ok(RopeTable { buffer, rot_dim: inv_freq.len() * 2, positions })
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    rot_dim: u32,
    interleaved: u32,
    table_rows: u32,
    offset: u32,
    _pad: u32,
}

pub fn shader() -> ShaderSource {
    ShaderBuilder::new("rope").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/rope.wgsl"))
}

/// Rotates `x[token, head, :rot_dim]` in place by the position of each token.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    b: &mut Batch,
    x: &GpuBuffer,
    positions: &GpuBuffer,
    table: &RopeTable,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    layout: RopeLayout,
) -> Result<()> {
    rope_at(b, x, positions, table, tokens, heads, head_dim, 0, layout)
}

/// [`rope`] on the dims `offset..offset + rot_dim` of each head (DeepSeek's rope part follows
/// the unrotated one).
#[allow(clippy::too_many_arguments)]
pub fn rope_at(
    b: &mut Batch,
    x: &GpuBuffer,
    positions: &GpuBuffer,
    table: &RopeTable,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    offset: usize,
    layout: RopeLayout,
) -> Result<()> {
    ensure!(tokens > 0 && heads > 0, "rope", "empty input");
    ensure!(offset + table.rot_dim <= head_dim, "rope", "rotary dims {}..{} exceed the head dim {head_dim}", offset, offset + table.rot_dim);
    need(x, tokens * heads * head_dim, "rope input")?;
    need(positions, tokens, "rope positions")?;
    if b.on_host() {
        let (x, positions, cs, rows, rot) = (x.clone(), positions.clone(), table.buffer.clone(), table.positions, table.rot_dim);
        return b.host("rope", move || crate::cpu::ops::rope(&x, &positions, &cs, rows, rot, tokens, heads, head_dim, offset, layout));
    }
    let params = Params {
        tokens: u32_of(tokens, "rope tokens")?,
        heads: heads as u32,
        head_dim: head_dim as u32,
        rot_dim: table.rot_dim as u32,
        interleaved: (layout == RopeLayout::Interleaved) as u32,
        table_rows: u32_of(table.positions, "rope positions")?,
        offset: offset as u32,
        _pad: 0,
    };
    let threads = tokens * heads * table.rot_dim / 2;
    let pipeline = b.ctx().pipeline(&shader())?;
    let groups = grid(b.ctx(), u32_of(threads.div_ceil(ELEMENT_WG as usize), "rope grid")?);
    b.dispatch("rope", &pipeline, &params, &[x, positions, &table.buffer], groups)
}

/// The CPU reference, from the same table, rotating dims `offset..offset + rot_dim` of each head.
#[allow(clippy::too_many_arguments)]
pub fn reference(x: &[f32], positions: &[u32], table: &[[f32; 2]], rot_dim: usize, heads: usize, head_dim: usize, offset: usize, layout: RopeLayout) -> Vec<f32> {
    let half = rot_dim / 2;
    let mut out = x.to_vec();
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim + offset;
            for i in 0..half {
                let (a, b) = match layout {
                    RopeLayout::HalfSplit => (base + i, base + i + half),
                    RopeLayout::Interleaved => (base + 2 * i, base + 2 * i + 1),
                };
                let [c, s] = table[pos as usize * half + i];
                out[a] = x[a] * c - x[b] * s;
                out[b] = x[b] * c + x[a] * s;
            }
        }
    }
    out
}
