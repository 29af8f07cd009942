//! Row softmax and row argmax (greedy sampling on the GPU).

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, KernelFeatures, ShaderBuilder, ShaderSource};
use crate::kernels::{need, u32_of, Dims4, ROW_WG};

pub fn softmax_shader(features: KernelFeatures) -> ShaderSource {
    ShaderBuilder::new("softmax")
        .constant("WG", ROW_WG)
        .reductions(features)
        .body(include_str!("../../shaders/softmax.wgsl"))
}

pub fn argmax_shader(features: KernelFeatures) -> ShaderSource {
    ShaderBuilder::new("argmax")
        .constant("WG", ROW_WG)
        .reductions(features)
        .body(include_str!("../../shaders/argmax.wgsl"))
}

fn row_params(rows: usize, dim: usize, what: &str) -> Result<Dims4> {
    ensure!(rows > 0 && dim > 0, what, "empty input {rows}x{dim}");
    Ok(Dims4 { a: u32_of(rows, what)?, b: u32_of(dim, what)?, c: 0, d: 0 })
}

/// `y[r, :] = softmax(x[r, :])`.
pub fn softmax(b: &mut Batch, x: &GpuBuffer, y: &GpuBuffer, rows: usize, dim: usize) -> Result<()> {
    let params = row_params(rows, dim, "softmax")?;
    need(x, rows * dim, "softmax input")?;
    need(y, rows * dim, "softmax output")?;
    if b.on_host() {
        let (x, y) = (x.clone(), y.clone());
        return b.host("softmax", move || crate::cpu::ops::softmax(&x, &y, rows, dim));
    }
    let pipeline = b.ctx().pipeline(&softmax_shader(b.ctx().features()))?;
    let groups = grid(b.ctx(), params.a);
    b.dispatch("softmax", &pipeline, &params, &[x, y], groups)
}

/// `ids[r] = argmax(x[r, :])`, the lowest index on ties.
pub fn argmax(b: &mut Batch, x: &GpuBuffer, ids: &GpuBuffer, rows: usize, dim: usize) -> Result<()> {
    let params = row_params(rows, dim, "argmax")?;
    need(x, rows * dim, "argmax input")?;
    need(ids, rows, "argmax output")?;
    if b.on_host() {
        let (x, ids) = (x.clone(), ids.clone());
        return b.host("argmax", move || crate::cpu::ops::argmax(&x, &ids, rows, dim));
    }
    let pipeline = b.ctx().pipeline(&argmax_shader(b.ctx().features()))?;
    let groups = grid(b.ctx(), params.a);
    b.dispatch("argmax", &pipeline, &params, &[x, ids], groups)
}

pub fn softmax_reference(x: &[f32], dim: usize) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
            row.iter().map(move |&v| (((v - m) as f64).exp() / sum) as f32)
        })
        .collect()
}

pub fn argmax_reference(x: &[f32], dim: usize) -> Vec<u32> {
    x.chunks(dim)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}
