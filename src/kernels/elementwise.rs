//! Elementwise kernels: the residual add and the SwiGLU gate.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, ShaderBuilder, ShaderSource};
use crate::kernels::{need, u32_of, Dims4, ELEMENT_WG};

pub fn add_shader() -> ShaderSource {
    ShaderBuilder::new("add").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/add.wgsl"))
}

pub fn swiglu_shader() -> ShaderSource {
    ShaderBuilder::new("swiglu").constant("WG", ELEMENT_WG).body(include_str!("../../shaders/swiglu.wgsl"))
}

fn groups(b: &Batch, n: usize) -> Result<[u32; 3]> {
    Ok(grid(b.ctx(), u32_of(n.div_ceil(ELEMENT_WG as usize), "element count")?))
}

/// `acc[i] += x[i]` for `n` elements.
pub fn add_assign(b: &mut Batch, acc: &GpuBuffer, x: &GpuBuffer, n: usize) -> Result<()> {
    ensure!(n > 0, "add", "no elements");
    need(acc, n, "add accumulator")?;
    need(x, n, "add input")?;
    let pipeline = b.ctx().pipeline(&add_shader())?;
    let params = Dims4 { a: u32_of(n, "add elements")?, b: 0, c: 0, d: 0 };
    let g = groups(b, n)?;
    b.dispatch("add", &pipeline, &params, &[acc, x], g)
}

/// `out[i] = silu(gate[i]) * up[i]` for `n` elements.
pub fn swiglu(b: &mut Batch, gate: &GpuBuffer, up: &GpuBuffer, out: &GpuBuffer, n: usize) -> Result<()> {
    ensure!(n > 0, "swiglu", "no elements");
    need(gate, n, "swiglu gate")?;
    need(up, n, "swiglu up")?;
    need(out, n, "swiglu output")?;
    let pipeline = b.ctx().pipeline(&swiglu_shader())?;
    let params = Dims4 { a: u32_of(n, "swiglu elements")?, b: 0, c: 0, d: 0 };
    let g = groups(b, n)?;
    b.dispatch("swiglu", &pipeline, &params, &[gate, up, out], g)
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
