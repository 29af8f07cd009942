//! `y = x W^T (+ b)` with W in the Hugging Face `[out, in]` layout, f32/f16/bf16 weights.
//!
//! Two paths: for a few rows (decode), one thread per output column multiply-adds along `in`, so
//! each weight is read once and the GPU stays busy with many columns; for many rows, BM x BN
//! tiles staged in workgroup memory reuse each loaded weight across BM rows. Both add along `in`
//! in order, so a row gets the same bits on either. Which path and sizes a row count takes is
//! the device's tuning (`kernels/tuning.rs`). A third, experimental path runs the tiles through
//! cooperative matrices (tensor cores), in f16 or f32 inputs with f32 sums.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, CoopShape, GpuBuffer, GpuWeight, KernelFeatures, ShaderBuilder, ShaderSource, WeightDtype};
use crate::kernels::{need, optional_binding, u32_of};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MatmulPath {
    /// Up to `tok` rows per workgroup of `wg` threads, one output column each.
    Vector { tok: u32, wg: u32 },
    /// Tiles of `bm` rows x 128 columns.
    Tiled { bm: u32 },
    /// Tiles through cooperative matrices (tensor cores): the A and B tiles rounded to f16 (or
    /// f32) in workgroup memory, accumulated in f32. Experimental (`MOEGEN_EXPERIMENTAL`): not
    /// yet run on a real GPU. `emulated` replaces the cooperative-matrix built-ins by plain WGSL
    /// with their documented meaning, so the kernel around them is tested on any adapter.
    Coop { shape: CoopShape, emulated: bool },
}

impl MatmulPath {
    /// The paths every device runs, at their default workgroup sizes.
    pub const ALL: [MatmulPath; 7] = [
        MatmulPath::Vector { tok: 1, wg: VEC_WG },
        MatmulPath::Vector { tok: 2, wg: VEC_WG },
        MatmulPath::Vector { tok: 4, wg: VEC_WG },
        MatmulPath::Vector { tok: 8, wg: VEC_WG },
        MatmulPath::Tiled { bm: 16 },
        MatmulPath::Tiled { bm: 32 },
        MatmulPath::Tiled { bm: 64 },
    ];

    /// What the calibration times on a device with `features` and `limits`: every path of
    /// [`ALL`](Self::ALL), the vector path at other workgroup sizes, and cooperative matrices
    /// where the features have them.
    pub fn candidates(features: KernelFeatures, limits: &wgpu::Limits) -> Vec<MatmulPath> {
        let threads = limits.max_compute_invocations_per_workgroup.min(limits.max_compute_workgroup_size_x);
        let mut out: Vec<MatmulPath> = Self::ALL.to_vec();
        for wg in VEC_WG_CHOICES {
            if wg != VEC_WG {
                out.extend([1, 2, 4, 8].map(|tok| MatmulPath::Vector { tok, wg }));
            }
        }
        out.extend(features.coop.map(|shape| MatmulPath::Coop { shape, emulated: false }));
        out.retain(|p| p.threads() <= threads && p.workgroup_bytes() <= limits.max_compute_workgroup_storage_size);
        out
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        match *self {
            MatmulPath::Vector { wg, .. } => wg,
            MatmulPath::Tiled { bm } => (bm / 4) * (TILE_BN / 8),
            MatmulPath::Coop { shape, .. } => shape.subgroup,
        }
    }

    fn workgroup_bytes(&self) -> u32 {
        match *self {
            MatmulPath::Vector { .. } => 0,
            MatmulPath::Tiled { bm } => TILE_BK * (bm + TILE_BN) * 4,
            MatmulPath::Coop { shape, .. } => coop_workgroup_bytes(shape),
        }
    }

    /// Whether a device with `features` can run this path.
    pub fn runs_with(&self, features: KernelFeatures) -> bool {
        match *self {
            MatmulPath::Coop { shape, emulated: false } => features.coop == Some(shape),
            MatmulPath::Coop { shape, emulated: true } => (!shape.f16_inputs || features.f16) && (shape.size * shape.size) % shape.subgroup == 0,
            _ => true,
        }
    }

    /// Rows of a cooperative tile block, for the grid.
    fn rows_per_group(&self) -> u32 {
        match *self {
            MatmulPath::Vector { tok, .. } => tok,
            MatmulPath::Tiled { bm } => bm,
            MatmulPath::Coop { shape, .. } => COOP_TILES * shape.size,
        }
    }
}

/// Tile shape constants shared with the grouped expert matmul (each thread computes 4 x 8).
pub(crate) fn tile_constants(builder: ShaderBuilder, bm: u32) -> ShaderBuilder {
    builder.constant("BM", bm).constant("BN", TILE_BN).constant("BK", TILE_BK)
}

pub(crate) const TILE_BN: u32 = 128;
const TILE_BK: u32 = 32;
/// Output columns (one per thread) per workgroup on the vector path, by default, and the sizes
/// the calibration tries.
pub(crate) const VEC_WG: u32 = 64;
const VEC_WG_CHOICES: [u32; 4] = [32, 64, 128, 256];
/// A cooperative workgroup (one subgroup) computes COOP_TILES x COOP_TILES tiles of S x S, taking
/// COOP_TILES tiles of k per step.
const COOP_TILES: u32 = 2;

fn coop_workgroup_bytes(shape: CoopShape) -> u32 {
    let block = COOP_TILES * shape.size;
    let ab = if shape.f16_inputs { 2 } else { 4 };
    2 * block * block * ab + block * block * 4
}

/// The cooperative-matrix helpers the kernel calls: `tile_a`, `tile_b` (load S x S tiles of the
/// staged x rows, row-major, and of the staged weight rows, which are B's columns),
/// `tile_mma` (`a . b + c`), `tile_store` (row-major into the staged output), `tile_zero`, and
/// `tile_begin`, called first with the invocation's index.
fn coop_helpers(shape: CoopShape, emulated: bool) -> String {
    let (s, ab) = (shape.size, if shape.f16_inputs { "f16" } else { "f32" });
    if !emulated {
        return format!(
            "alias AB = {ab};\n\
             alias MatA = coop_mat{s}x{s}<AB, A>;\n\
             alias MatB = coop_mat{s}x{s}<AB, B>;\n\
             alias MatC = coop_mat{s}x{s}<f32, C>;\n\
             fn tile_a(off: u32) -> MatA {{ return coopLoadT<MatA>(&xs[off], BK); }}\n\
             fn tile_b(off: u32) -> MatB {{ return coopLoad<MatB>(&ws[off], BK); }}\n\
             fn tile_mma(a: MatA, b: MatB, c: MatC) -> MatC {{ return coopMultiplyAdd(a, b, c); }}\n\
             fn tile_store(c: MatC, off: u32, lane: u32) {{ coopStoreT(c, &cs[off], BN); }}\n\
             fn tile_zero() -> MatC {{ return MatC(); }}\n\
             fn tile_begin(lane: u32) {{}}\n"
        );
    }
    // A and B tiles are read where they were loaded from (xs and ws do not change between a
    // load and the products of the same step, so that means what a load means); each invocation
    // holds the accumulator elements lane, lane + SG, ... of a C tile. Element (r, c) of a
    // row-major load is at off + r * stride + c, of a column-major one at off + c * stride + r.
    format!(
        "alias AB = {ab};\n\
         struct MatA {{ off: u32 }}\n\
         alias MatB = MatA;\n\
         struct MatC {{ e: array<f32, {per_lane}> }}\n\
         fn tile_a(off: u32) -> MatA {{ return MatA(off); }}\n\
         fn tile_b(off: u32) -> MatB {{ return MatB(off); }}\n\
         fn tile_mma(a: MatA, b: MatB, c: MatC) -> MatC {{\n\
             var o = c;\n\
             let lane = tile_lane;\n\
             for (var j = 0u; j < {per_lane}u; j++) {{\n\
                 let i = lane + j * SG;\n\
                 for (var kk = 0u; kk < S; kk++) {{\n\
                     o.e[j] = fma(f32(xs[a.off + (i / S) * BK + kk]), f32(ws[b.off + (i % S) * BK + kk]), o.e[j]);\n\
                 }}\n\
             }}\n\
             return o;\n\
         }}\n\
         fn tile_store(c: MatC, off: u32, lane: u32) {{ for (var j = 0u; j < {per_lane}u; j++) {{ let i = lane + j * SG; cs[off + (i / S) * BN + i % S] = c.e[j]; }} }}\n\
         fn tile_zero() -> MatC {{ return MatC(); }}\n\
         var<private> tile_lane: u32;\n\
         fn tile_begin(lane: u32) {{ tile_lane = lane; }}\n",
        per_lane = s * s / shape.subgroup
    )
}

pub fn shader(path: MatmulPath, dtype: WeightDtype, features: KernelFeatures) -> ShaderSource {
    match path {
        MatmulPath::Vector { tok, wg } => ShaderBuilder::new("matmul_vec")
            .constant("WG", wg)
            .constant("TOK", tok)
            .weights(dtype, features)
            .weights4(dtype)
            .body(concat!(include_str!("../../shaders/lib/matmul_bindings.wgsl"), include_str!("../../shaders/matmul_vec.wgsl"))),
        MatmulPath::Tiled { bm } => tile_constants(ShaderBuilder::new("matmul_tiled"), bm)
            .weights(dtype, features)
            .body(concat!(
                include_str!("../../shaders/lib/matmul_bindings.wgsl"),
                include_str!("../../shaders/lib/matmul_tile.wgsl"),
                include_str!("../../shaders/matmul_tiled.wgsl")
            )),
        MatmulPath::Coop { shape, emulated } => {
            let block = COOP_TILES * shape.size;
            let mut builder = ShaderBuilder::new("matmul_coop");
            if !emulated {
                builder = builder.require("wgpu_cooperative_matrix");
            }
            if shape.f16_inputs {
                builder = builder.require("f16");
            }
            builder
                .constant("S", shape.size)
                .constant("SG", shape.subgroup)
                .constant("BM", block)
                .constant("BN", block)
                .constant("BK", block)
                .weights(dtype, features)
                .declare(if emulated { "tiles=emulated" } else { "tiles=coop" }, &coop_helpers(shape, emulated))
                .body(concat!(include_str!("../../shaders/lib/matmul_bindings.wgsl"), include_str!("../../shaders/matmul_coop.wgsl")))
        }
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

/// [`matmul`] over a range of rows, on the path the device's tuning gives their count unless
/// `path` forces one.
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
    let ctx = b.ctx().clone();
    let path = path.unwrap_or_else(|| ctx.matmul_path(m));
    if ctx.int8_products() && crate::kernels::matmul_int8::supports(w.dtype) {
        return crate::kernels::matmul_int8::matmul_rows(b, x, w, bias, y, rows, path);
    }
    ensure!(path.runs_with(ctx.features()), "matmul", "path {path:?} needs features this device lacks ({:?})", ctx.features());
    let pipeline = ctx.pipeline(&shader(path, w.dtype, ctx.features()))?;
    let bias_buf = &optional_binding(&ctx, bias)?;
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
            MatmulPath::Vector { tok, wg } => {
                let [gx, gy, _] = grid(&ctx, params.n.div_ceil(wg));
                [gx, gy, params.m.div_ceil(tok)]
            }
            MatmulPath::Tiled { .. } => [params.n.div_ceil(TILE_BN), params.m.div_ceil(path.rows_per_group()), 1],
            MatmulPath::Coop { .. } => [params.n.div_ceil(path.rows_per_group()), params.m.div_ceil(path.rows_per_group()), 1],
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
