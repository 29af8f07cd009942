//! A matmul per attention head, for MLA's absorbed form: each head's query slice times that
//! head's block of `kv_b_proj` (and the attention's latent output times the value block).

use crate::error::{ensure, Result};
use crate::gpu::{Batch, GpuBuffer, GpuWeight, KernelFeatures, ShaderBuilder, ShaderSource, WeightDtype};
use crate::kernels::{need, u32_of};

const WG: u32 = 64;
const TOK: u32 = 4;

pub fn shader(dtype: WeightDtype, features: KernelFeatures) -> ShaderSource {
    ShaderBuilder::new("head_matmul")
        .constant("WG", WG)
        .constant("TOK", TOK)
        .weights(dtype, features)
        .body(include_str!("../../shaders/head_matmul.wgsl"))
}

/// Where each token's heads sit in a buffer: token t, head h starts at
/// `t * stride + h * head_stride + col0`.
#[derive(Clone, Copy, Debug)]
pub struct HeadLayout {
    pub stride: usize,
    pub head_stride: usize,
    pub col0: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    tokens: u32,
    heads: u32,
    out_dim: u32,
    in_dim: u32,
    x_stride: u32,
    x_head_stride: u32,
    x_col0: u32,
    y_stride: u32,
    y_head_stride: u32,
    y_col0: u32,
    _pad: [u32; 2],
}

/// `y[t, h, :out] = w[h] . x[t, h, :in]` with `w` `[heads * out, in]`, for `tokens` tokens.
#[allow(clippy::too_many_arguments)]
pub fn head_matmul(b: &mut Batch, x: &GpuBuffer, xl: HeadLayout, w: &GpuWeight, heads: usize, y: &GpuBuffer, yl: HeadLayout, tokens: usize) -> Result<()> {
    ensure!(tokens > 0 && heads > 0, "head_matmul", "empty input");
    ensure!(w.rows.is_multiple_of(heads), "head_matmul", "{} weight rows do not split into {heads} heads", w.rows);
    ensure!(w.parts.len() == 1, "head_matmul", "weight split into {} buffers", w.parts.len());
    let (out, inner) = (w.rows / heads, w.cols);
    ensure!(tokens.div_ceil(TOK as usize) <= 65535 && heads <= 65535, "head_matmul", "{tokens} tokens of {heads} heads exceed one dispatch");
    need(x, (tokens - 1) * xl.stride + (heads - 1) * xl.head_stride + xl.col0 + inner, "head_matmul input")?;
    need(y, (tokens - 1) * yl.stride + (heads - 1) * yl.head_stride + yl.col0 + out, "head_matmul output")?;
    if b.on_host() {
        let (x, w, y) = (x.clone(), w.clone(), y.clone());
        return b.host("head_matmul", move || crate::cpu::ops::head_matmul(&x, xl, &w, heads, &y, yl, tokens));
    }
    let params = Params {
        tokens: u32_of(tokens, "head_matmul tokens")?,
        heads: heads as u32,
        out_dim: u32_of(out, "head_matmul rows")?,
        in_dim: u32_of(inner, "head_matmul inner dim")?,
        x_stride: u32_of(xl.stride, "head_matmul stride")?,
        x_head_stride: u32_of(xl.head_stride, "head_matmul stride")?,
        x_col0: xl.col0 as u32,
        y_stride: u32_of(yl.stride, "head_matmul stride")?,
        y_head_stride: u32_of(yl.head_stride, "head_matmul stride")?,
        y_col0: yl.col0 as u32,
        _pad: [0; 2],
    };
    let pipeline = b.ctx().pipeline(&shader(w.dtype, b.ctx().features()))?;
    let groups = [params.out_dim.div_ceil(WG), params.heads, params.tokens.div_ceil(TOK)];
    b.dispatch("head_matmul", &pipeline, &params, &[x, &w.parts[0].buffer, y], groups)
}

/// The CPU reference, in f64, writing into a copy of `y`.
#[allow(clippy::too_many_arguments)]
pub fn reference(x: &[f32], xl: HeadLayout, w: &[f32], heads: usize, out: usize, inner: usize, y: &[f32], yl: HeadLayout, tokens: usize) -> Vec<f32> {
    let mut y = y.to_vec();
    for t in 0..tokens {
        for h in 0..heads {
            let xs = &x[t * xl.stride + h * xl.head_stride + xl.col0..][..inner];
            for o in 0..out {
                let wr = &w[(h * out + o) * inner..][..inner];
                let dot: f64 = xs.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                y[t * yl.stride + h * yl.head_stride + yl.col0 + o] = dot as f32;
            }
        }
    }
    y
}
