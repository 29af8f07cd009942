//! `y = x W^T (+ b)` with W in the Hugging Face `[out, in]` layout, f32/f16/bf16 weights.
//!
//! Two paths: for a few rows (decode), one workgroup per output column reduces over `in`, so each
//! weight is read once and the GPU stays busy with many columns; for many rows, BM x BN tiles
//! staged in workgroup memory reuse each loaded weight across BM rows.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, GpuWeight, KernelFeatures, ShaderBuilder, ShaderSource, WeightDtype};
use crate::kernels::{need, u32_of, unused_binding};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPath {
    /// Up to `tok` rows per workgroup, reduced across the workgroup.
    Vector { tok: u32 },
    /// Tiles of `bm` rows x 64 columns.
    Tiled { bm: u32 },
}

impl MatmulPath {
    pub const ALL: [MatmulPath; 6] = [
        MatmulPath::Vector { tok: 1 },
        MatmulPath::Vector { tok: 2 },
        MatmulPath::Vector { tok: 4 },
        MatmulPath::Vector { tok: 8 },
        MatmulPath::Tiled { bm: 16 },
        MatmulPath::Tiled { bm: 64 },
    ];

    /// The path for `m` rows. Past four rows the tiles' reuse of each loaded weight wins (measured
    /// on llvmpipe, see BENCHMARKS.md); the planner will choose from measurements per device.
    pub fn for_rows(m: usize) -> Self {
        match m {
            0..=4 => MatmulPath::Vector { tok: (m.max(1) as u32).next_power_of_two() },
            9..=32 => MatmulPath::Tiled { bm: 16 },
            _ => MatmulPath::Tiled { bm: 64 },
        }
    }
}

/// Tile shape constants shared with the grouped expert matmul (each thread computes 4 x 8).
pub(crate) fn tile_constants(builder: ShaderBuilder, bm: u32) -> ShaderBuilder {
    builder.constant("BM", bm).constant("BN", TILE_BN).constant("BK", 32)
}

pub(crate) const TILE_BN: u32 = 128;
/// Output columns (one per thread) per workgroup on the vector path.
const VEC_WG: u32 = 64;

pub fn shader(path: MatmulPath, dtype: WeightDtype, features: KernelFeatures) -> ShaderSource {
    match path {
        MatmulPath::Vector { tok } => ShaderBuilder::new("matmul_vec")
            .constant("WG", VEC_WG)
            .constant("TOK", tok)
            .weights(dtype, features)
            .body(concat!(include_str!("../../shaders/lib/matmul_bindings.wgsl"), include_str!("../../shaders/matmul_vec.wgsl"))),
        MatmulPath::Tiled { bm } => tile_constants(ShaderBuilder::new("matmul_tiled"), bm)
            .weights(dtype, features)
            .body(concat!(
                include_str!("../../shaders/lib/matmul_bindings.wgsl"),
                include_str!("../../shaders/lib/matmul_tile.wgsl"),
                include_str!("../../shaders/matmul_tiled.wgsl")
            )),
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    x_row0: u32,
    y_row0: u32,
    y_stride: u32,
    y_col0: u32,
    has_bias: u32,
}

/// Which rows a matmul reads and writes: rows `x_row0..x_row0 + m` of x (each `w.cols` wide) go
/// to rows `y_row0..` of y (each `y_stride` wide, `w.rows` by default).
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub m: usize,
    pub x_row0: usize,
    pub y_row0: usize,
    pub y_stride: Option<usize>,
}

impl Rows {
    pub fn all(m: usize) -> Self {
        Rows { m, x_row0: 0, y_row0: 0, y_stride: None }
    }
}

/// `y = x W^T (+ bias)` over `m` rows.
pub fn matmul(b: &mut Batch, x: &GpuBuffer, w: &GpuWeight, bias: Option<&GpuBuffer>, y: &GpuBuffer, m: usize) -> Result<()> {
    matmul_rows(b, x, w, bias, y, Rows::all(m), None)
}

/// [`matmul`] over a range of rows, on the path chosen for their count unless `path` forces one.
pub fn matmul_rows(
    b: &mut Batch,
    x: &GpuBuffer,
    w: &GpuWeight,
    bias: Option<&GpuBuffer>,
    y: &GpuBuffer,
    rows: Rows,
    path: Option<MatmulPath>,
) -> Result<()> {
    let (n, k, m) = (w.rows, w.cols, rows.m);
    let y_stride = rows.y_stride.unwrap_or(n);
    ensure!(m > 0, "matmul", "no rows");
    ensure!(y_stride >= n, "matmul", "output stride {y_stride} is narrower than {n} columns");
    need(x, (rows.x_row0 + m) * k, "matmul input")?;
    need(y, (rows.y_row0 + m) * y_stride, "matmul output")?;
    if let Some(bias) = bias {
        need(bias, n, "matmul bias")?;
    }
    if b.on_host() {
        let (x, w, bias, y) = (x.clone(), w.clone(), bias.cloned(), y.clone());
        return b.host("matmul", move || crate::cpu::ops::matmul(&x, &w, bias.as_ref(), &y, m, rows.x_row0, rows.y_row0, y_stride));
    }
    let path = path.unwrap_or_else(|| MatmulPath::for_rows(m));
    let ctx = b.ctx().clone();
    let pipeline = ctx.pipeline(&shader(path, w.dtype, ctx.features()))?;
    let placeholder;
    let bias_buf = match bias {
        Some(buf) => buf,
        None => {
            placeholder = unused_binding(&ctx)?;
            &placeholder
        }
    };
    for part in &w.parts {
        let params = Params {
            m: u32_of(m, "matmul rows")?,
            n: u32_of(part.rows, "matmul columns")?,
            k: u32_of(k, "matmul inner dim")?,
            x_row0: u32_of(rows.x_row0, "matmul input row")?,
            y_row0: u32_of(rows.y_row0, "matmul output row")?,
            y_stride: u32_of(y_stride, "matmul output stride")?,
            y_col0: u32_of(part.first_row, "matmul column offset")?,
            has_bias: bias.is_some() as u32,
        };
        let groups = match path {
            MatmulPath::Vector { tok } => {
                let [gx, gy, _] = grid(&ctx, params.n.div_ceil(VEC_WG));
                [gx, gy, params.m.div_ceil(tok)]
            }
            MatmulPath::Tiled { bm } => [params.n.div_ceil(TILE_BN), params.m.div_ceil(bm), 1],
        };
        b.dispatch("matmul", &pipeline, &params, &[x, &part.buffer, bias_buf, y], groups)?;
    }
    Ok(())
}

/// `y[m, n] = x[m, k] . w[n, k]^T + bias`, accumulated in f64.
pub fn reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        for c in 0..n {
            let wr = &w[c * k..(c + 1) * k];
            let dot: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            y[r * n + c] = (dot + bias.map_or(0.0, |b| b[c] as f64)) as f32;
        }
    }
    y
}
