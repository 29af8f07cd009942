//! Elementwise and row-copy kernels: the residual add, the SwiGLU gate, the gated add of a shared
//! expert, and row copies by index.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, ShaderBuilder, ShaderSource};
use crate::kernels::{need, u32_of, unused_binding, Dims4, ELEMENT_WG, ROW_WG};

pub fn add_shader() -> ShaderSource {
    ShaderBuilder::new("add").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/add.wgsl"))
}

pub fn swiglu_shader() -> ShaderSource {
    ShaderBuilder::new("swiglu").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/swiglu.wgsl"))
}

/// [`swiglu_shader`] in operations fixed by IEEE rounding (`--gpu-compute int8`): the host's
/// `cpu::simd::silu_portable` gives its bits.
pub fn swiglu_portable_shader() -> ShaderSource {
    ShaderBuilder::new("swiglu_portable").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/swiglu_portable.wgsl"))
}

pub fn add_gated_shader() -> ShaderSource {
    ShaderBuilder::new("add_gated").constant("WG", ROW_WG).body(include_str!("../../shaders/add_gated.wgsl"))
}

pub fn copy_rows_shader() -> ShaderSource {
    ShaderBuilder::new("copy_rows").constant("WG", ROW_WG).body(include_str!("../../shaders/copy_rows.wgsl"))
}

fn groups(b: &Batch, n: usize) -> Result<[u32; 3]> {
    Ok(grid(b.ctx(), u32_of(n.div_ceil(ELEMENT_WG as usize), "element count")?))
}

/// `acc[i] += x[i]` for `n` elements.
pub fn add_assign(b: &mut Batch, acc: &GpuBuffer, x: &GpuBuffer, n: usize) -> Result<()> {
    ensure!(n > 0, "add", "no elements");
    need(acc, n, "add accumulator")?;
    need(x, n, "add input")?;
    if b.on_host() {
        let (acc, x) = (acc.clone(), x.clone());
        return b.host("add", move || crate::cpu::ops::add_assign(&acc, &x, n));
    }
    let pipeline = b.ctx().pipeline(&add_shader())?;
    let params = Dims4 { a: u32_of(n, "add elements")?, b: 0, c: 0, d: 0 };
    let g = groups(b, n)?;
    b.dispatch("add", &pipeline, &params, &[acc, x], g)
}

/// `out[i] = silu(gate[i]) * up[i]` for `n` elements (with `--gpu-compute int8`, the portable
/// silu: see [`swiglu_portable_shader`]).
pub fn swiglu(b: &mut Batch, gate: &GpuBuffer, up: &GpuBuffer, out: &GpuBuffer, n: usize) -> Result<()> {
    swiglu_range(b, gate, up, out, 0, n)
}

/// [`swiglu`] over elements `offset..offset + n`.
pub fn swiglu_range(b: &mut Batch, gate: &GpuBuffer, up: &GpuBuffer, out: &GpuBuffer, offset: usize, n: usize) -> Result<()> {
    ensure!(n > 0, "swiglu", "no elements");
    need(gate, offset + n, "swiglu gate")?;
    need(up, offset + n, "swiglu up")?;
    need(out, offset + n, "swiglu output")?;
    if b.on_host() {
        let (gate, up, out) = (gate.clone(), up.clone(), out.clone());
        return b.host("swiglu", move || crate::cpu::ops::swiglu(&gate, &up, &out, offset, n));
    }
    // Under --gpu-compute int8 the activation is the portable one, so that host experts beside
    // the GPU give the GPU's bits (c is the shader's opaque zero).
    let shader = if b.ctx().int8_products() { swiglu_portable_shader() } else { swiglu_shader() };
    let pipeline = b.ctx().pipeline(&shader)?;
    let params = Dims4 { a: u32_of(n, "swiglu elements")?, b: u32_of(offset, "swiglu offset")?, c: 0, d: 0 };
    let g = groups(b, n)?;
    b.dispatch("swiglu", &pipeline, &params, &[gate, up, out], g)
}

/// `acc[t, :] += sigmoid(gate[t]) * x[t, :]` for `tokens` rows of `dim`.
pub fn add_gated(b: &mut Batch, acc: &GpuBuffer, x: &GpuBuffer, gate: &GpuBuffer, tokens: usize, dim: usize) -> Result<()> {
    ensure!(tokens > 0 && dim > 0, "add_gated", "empty input {tokens}x{dim}");
    need(acc, tokens * dim, "add_gated accumulator")?;
    need(x, tokens * dim, "add_gated input")?;
    need(gate, tokens, "add_gated gate")?;
    if b.on_host() {
        let (acc, x, gate) = (acc.clone(), x.clone(), gate.clone());
        return b.host("add_gated", move || crate::cpu::ops::add_gated(&acc, &x, &gate, tokens, dim));
    }
    let pipeline = b.ctx().pipeline(&add_gated_shader())?;
    let params = Dims4 { a: u32_of(tokens, "add_gated rows")?, b: u32_of(dim, "add_gated width")?, c: 0, d: 0 };
    let g = grid(b.ctx(), params.a);
    b.dispatch("add_gated", &pipeline, &params, &[acc, x, gate], g)
}

/// `dst[dst_rows[i], :] = src[src_rows[i], :]` for `n` rows of `dim`; `None` is the identity.
/// The caller guarantees the indices are in range (they index buffers of `src_len`/`dst_len` rows).
#[allow(clippy::too_many_arguments)]
pub fn copy_rows(
    b: &mut Batch,
    src: &GpuBuffer,
    src_rows: Option<&GpuBuffer>,
    dst: &GpuBuffer,
    dst_rows: Option<&GpuBuffer>,
    n: usize,
    dim: usize,
) -> Result<()> {
    ensure!(n > 0 && dim > 0, "copy_rows", "empty copy {n}x{dim}");
    if let Some(rows) = src_rows {
        need(rows, n, "copy_rows source rows")?;
    } else {
        need(src, n * dim, "copy_rows source")?;
    }
    if let Some(rows) = dst_rows {
        need(rows, n, "copy_rows destination rows")?;
    } else {
        need(dst, n * dim, "copy_rows destination")?;
    }
    if b.on_host() {
        let (src, src_rows, dst, dst_rows) = (src.clone(), src_rows.cloned(), dst.clone(), dst_rows.cloned());
        return b.host("copy_rows", move || crate::cpu::ops::copy_rows(&src, src_rows.as_ref(), &dst, dst_rows.as_ref(), n, dim));
    }
    let ctx = b.ctx().clone();
    let placeholder = unused_binding(&ctx)?;
    let params = Dims4 {
        a: u32_of(n, "copy_rows rows")?,
        b: u32_of(dim, "copy_rows width")?,
        c: src_rows.is_none() as u32,
        d: dst_rows.is_none() as u32,
    };
    let pipeline = ctx.pipeline(&copy_rows_shader())?;
    let g = grid(&ctx, params.a);
    b.dispatch(
        "copy_rows",
        &pipeline,
        &params,
        &[src, src_rows.unwrap_or(&placeholder), dst_rows.unwrap_or(&placeholder), dst],
        g,
    )
}

pub fn add_reference(acc: &[f32], x: &[f32]) -> Vec<f32> {
    acc.iter().zip(x).map(|(a, b)| a + b).collect()
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn swiglu_reference(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect()
}

pub fn add_gated_reference(acc: &[f32], x: &[f32], gate: &[f32], dim: usize) -> Vec<f32> {
    acc.iter().zip(x).enumerate().map(|(i, (&a, &v))| a + v / (1.0 + (-gate[i / dim]).exp())).collect()
}

pub fn copy_cols_shader() -> ShaderSource {
    ShaderBuilder::new("copy_cols").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/copy_cols.wgsl"))
}

/// Where a block of columns sits: rows `stride` floats apart, starting at column `col0`.
#[derive(Clone, Copy, Debug)]
pub struct Cols {
    pub stride: usize,
    pub col0: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CopyColsParams {
    rows: u32,
    width: u32,
    src_stride: u32,
    src_col0: u32,
    dst_stride: u32,
    dst_col0: u32,
    _pad: [u32; 2],
}

/// Copies `width` columns of `rows` rows from `src` at `from` to `dst` at `to`.
pub fn copy_cols(b: &mut Batch, src: &GpuBuffer, from: Cols, dst: &GpuBuffer, to: Cols, rows: usize, width: usize) -> Result<()> {
    ensure!(rows > 0 && width > 0, "copy_cols", "empty copy {rows}x{width}");
    ensure!(from.col0 + width <= from.stride && to.col0 + width <= to.stride, "copy_cols", "columns past the row");
    need(src, (rows - 1) * from.stride + from.col0 + width, "copy_cols source")?;
    need(dst, (rows - 1) * to.stride + to.col0 + width, "copy_cols destination")?;
    if b.on_host() {
        let (src, dst) = (src.clone(), dst.clone());
        return b.host("copy_cols", move || crate::cpu::ops::copy_cols(&src, from, &dst, to, rows, width));
    }
    let params = CopyColsParams {
        rows: u32_of(rows, "copy_cols rows")?,
        width: u32_of(width, "copy_cols width")?,
        src_stride: u32_of(from.stride, "copy_cols stride")?,
        src_col0: from.col0 as u32,
        dst_stride: u32_of(to.stride, "copy_cols stride")?,
        dst_col0: to.col0 as u32,
        _pad: [0; 2],
    };
    let pipeline = b.ctx().pipeline(&copy_cols_shader())?;
    let g = groups(b, rows * width)?;
    b.dispatch("copy_cols", &pipeline, &params, &[src, dst], g)
}

pub fn copy_cols_reference(src: &[f32], from: Cols, dst: &[f32], to: Cols, rows: usize, width: usize) -> Vec<f32> {
    let mut out = dst.to_vec();
    for r in 0..rows {
        for c in 0..width {
            out[r * to.stride + to.col0 + c] = src[r * from.stride + from.col0 + c];
        }
    }
    out
}

pub fn round_bf16_shader() -> ShaderSource {
    ShaderBuilder::new("round_bf16").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/round_bf16.wgsl"))
}

pub fn expand_bf16_shader() -> ShaderSource {
    ShaderBuilder::new("expand_bf16").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/expand_bf16.wgsl"))
}

/// Rounds `n` f32 values of `x` in place to the nearest bf16 (ties to even).
pub fn round_bf16(b: &mut Batch, x: &GpuBuffer, n: usize) -> Result<()> {
    ensure!(n > 0, "round_bf16", "no elements");
    need(x, n, "round_bf16 values")?;
    if b.on_host() {
        let x = x.clone();
        return b.host("round_bf16", move || crate::cpu::ops::round_bf16(&x, n));
    }
    let pipeline = b.ctx().pipeline(&round_bf16_shader())?;
    let params = Dims4 { a: u32_of(n, "round_bf16 count")?, b: 0, c: 0, d: 0 };
    let g = groups(b, n)?;
    b.dispatch("round_bf16", &pipeline, &params, &[x], g)
}

/// Widens `n` bf16 values packed two to a word in `src` into f32 `dst`.
pub fn expand_bf16(b: &mut Batch, src: &GpuBuffer, dst: &GpuBuffer, n: usize) -> Result<()> {
    ensure!(n > 0, "expand_bf16", "no elements");
    ensure!(src.size() >= n as u64 * 2, "expand_bf16", "{n} values need {} bytes, the source has {}", n * 2, src.size());
    need(dst, n, "expand_bf16 output")?;
    if b.on_host() {
        let (src, dst) = (src.clone(), dst.clone());
        return b.host("expand_bf16", move || crate::cpu::ops::expand_bf16(&src, &dst, n));
    }
    let pipeline = b.ctx().pipeline(&expand_bf16_shader())?;
    let params = Dims4 { a: u32_of(n, "expand_bf16 count")?, b: 0, c: 0, d: 0 };
    let g = groups(b, n)?;
    b.dispatch("expand_bf16", &pipeline, &params, &[src, dst], g)
}

/// The value a bf16 round trip leaves (nearest, ties to even), as the kernel computes it.
pub fn round_bf16_reference(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}
