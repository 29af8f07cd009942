//! Token embedding gather.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, GpuWeight, KernelFeatures, ShaderBuilder, ShaderSource, WeightDtype};
use crate::kernels::{need, u32_of, Dims4, ROW_WG};

pub fn shader(dtype: WeightDtype, features: KernelFeatures) -> ShaderSource {
    ShaderBuilder::new("embedding")
        .constant("WG", ROW_WG)
        .weights(dtype, features)
        .body(include_str!("../../shaders/embedding.wgsl"))
}

/// `out[t, :] = table[ids[t], :]` for `n_tokens` ids. Ids must be below `table.rows`.
pub fn embed(b: &mut Batch, table: &GpuWeight, ids: &GpuBuffer, n_tokens: usize, out: &GpuBuffer) -> Result<()> {
    need(ids, n_tokens, "embedding ids")?;
    need(out, n_tokens * table.cols, "embedding output")?;
    ensure!(n_tokens > 0, "embedding", "no tokens");
    if b.on_host() {
        let (table, ids, out) = (table.clone(), ids.clone(), out.clone());
        return b.host("embedding", move || crate::cpu::ops::embed(&table, &ids, n_tokens, &out));
    }
    let pipeline = b.ctx().pipeline(&shader(table.dtype, b.ctx().features()))?;
    let groups = grid(b.ctx(), u32_of(n_tokens, "token count")?);
    for part in &table.parts {
        let params = Dims4 {
            a: n_tokens as u32,
            b: u32_of(table.cols, "embedding width")?,
            c: u32_of(part.first_row, "embedding row")?,
            d: u32_of(part.rows, "embedding rows")?,
        };
        b.dispatch("embedding", &pipeline, &params, &[ids, &part.buffer, out], groups)?;
    }
    Ok(())
}

pub fn reference(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    ids.iter().flat_map(|&id| table[id as usize * dim..(id as usize + 1) * dim].iter().copied()).collect()
}
