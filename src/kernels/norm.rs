//! RMSNorm over rows: whole hidden states, or per-head slices (rows of head_dim).

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, KernelFeatures, ShaderBuilder, ShaderSource};
use crate::kernels::{need, u32_of, ROW_WG};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    stride: u32,
}

pub fn rms_norm_shader(features: KernelFeatures) -> ShaderSource {
    ShaderBuilder::new("rms_norm")
        .constant("WG", ROW_WG)
        .reductions(features)
        .body(include_str!("../../shaders/rms_norm.wgsl"))
}

/// `y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * gamma` for `rows` rows of `dim`.
pub fn rms_norm(b: &mut Batch, x: &GpuBuffer, gamma: &GpuBuffer, y: &GpuBuffer, rows: usize, dim: usize, eps: f32) -> Result<()> {
    rms_norm_strided(b, x, gamma, y, rows, dim, dim, eps)
}

/// [`rms_norm`] over the first `dim` columns of rows `stride` apart, in x and y alike (MLA's
/// latent, which shares its rows with the rope key).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_strided(b: &mut Batch, x: &GpuBuffer, gamma: &GpuBuffer, y: &GpuBuffer, rows: usize, dim: usize, stride: usize, eps: f32) -> Result<()> {
    ensure!(rows > 0 && dim > 0 && stride >= dim, "rms_norm", "input {rows}x{dim} with rows {stride} apart");
    need(x, (rows - 1) * stride + dim, "rms_norm input")?;
    need(gamma, dim, "rms_norm weight")?;
    need(y, (rows - 1) * stride + dim, "rms_norm output")?;
    if b.on_host() {
        let (x, gamma, y) = (x.clone(), gamma.clone(), y.clone());
        return b.host("rms_norm", move || crate::cpu::ops::rms_norm(&x, &gamma, &y, rows, dim, stride, eps));
    }
    let pipeline = b.ctx().pipeline(&rms_norm_shader(b.ctx().features()))?;
    let params = Params { rows: u32_of(rows, "rms_norm rows")?, dim: u32_of(dim, "rms_norm dim")?, eps, stride: u32_of(stride, "rms_norm stride")? };
    let groups = grid(b.ctx(), params.rows);
    b.dispatch("rms_norm", &pipeline, &params, &[x, gamma, y], groups)
}

pub fn reference(x: &[f32], gamma: &[f32], dim: usize, eps: f32) -> Vec<f32> {
    x.chunks(dim)
        .flat_map(|row| {
            let mean_sq = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dim as f64;
            let scale = 1.0 / (mean_sq + eps as f64).sqrt();
            row.iter().zip(gamma).map(move |(&v, &g)| (v as f64 * scale * g as f64) as f32)
        })
        .collect()
}
