//! FP8 e4m3 weights with block scales (DeepSeek-V3's release format), dequantised to bf16 on
//! the GPU: they stay FP8 in host memory and across the link, half of bf16's bytes.

use crate::error::{ensure, Error, Result};
use crate::gpu::{grid, stacked_parts, Batch, GpuBuffer, GpuContext, GpuWeight, ShaderBuilder, ShaderSource, WeightDtype, WeightPart};
use crate::kernels::{u32_of, ELEMENT_WG};

pub fn shader() -> ShaderSource {
    ShaderBuilder::new("dequant_fp8").constant("WG", ELEMENT_WG).body(concat!(include_str!("../../shaders/lib/fp8.wgsl"), include_str!("../../shaders/dequant_fp8.wgsl")))
}

/// One FP8 matrix: its bytes, its `[ceil(rows / block.0), ceil(cols / block.1)]` scales.
#[derive(Clone, Copy, Debug)]
pub struct Fp8Matrix<'a> {
    pub data: &'a [u8],
    pub scales: &'a [f32],
    pub block: (usize, usize),
}

/// The shape of a matrix's scales.
pub fn scale_shape(rows: usize, cols: usize, block: (usize, usize)) -> [usize; 2] {
    [rows.div_ceil(block.0), cols.div_ceil(block.1)]
}

/// The value of an e4m3fn byte.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((byte >> 3) & 0xf, (byte & 7) as f32);
    if e == 15 && byte & 7 == 7 {
        return f32::NAN;
    }
    if e == 0 {
        return sign * m / 8.0 * 2f32.powi(-6);
    }
    sign * (1.0 + m / 8.0) * 2f32.powi(e as i32 - 7)
}

/// [`e4m3_to_f32`] of every byte, built once: the CPU device's decoding looks values up instead
/// of computing two powers per element (which made an FP8 matmul of one row 280x bf16's).
pub fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3_to_f32(b as u8)))
}

/// The CPU reference: the bf16 values (as f32) of `rows x cols` FP8 values times their scales.
pub fn reference(m: &Fp8Matrix, rows: usize, cols: usize) -> Vec<f32> {
    let scale_cols = cols.div_ceil(m.block.1);
    (0..rows * cols)
        .map(|i| {
            let (r, c) = (i / cols, i % cols);
            let v = e4m3_to_f32(m.data[i]) * m.scales[(r / m.block.0) * scale_cols + c / m.block.1];
            half::bf16::from_f32(v).to_f32()
        })
        .collect()
}

/// The dequantised matrix as bf16 bytes, on the host (for weights the host rearranges first).
pub fn to_bf16_bytes(m: &Fp8Matrix, rows: usize, cols: usize) -> Vec<u8> {
    reference(m, rows, cols).iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row0: u32,
    src_word0: u32,
    scale0: u32,
    scale_cols: u32,
    block_rows: u32,
    block_cols: u32,
    dst_word0: u32,
    _pad: [u32; 3],
}

/// Where a run of FP8 rows is read from and its bf16 rows written to.
#[derive(Clone, Copy, Debug)]
pub struct DequantRun {
    /// Rows to convert, and the first one's index in its matrix (for the scales).
    pub rows: usize,
    pub row0: usize,
    /// Byte offset of the first row's FP8 values in `src` (a multiple of 4).
    pub src_byte0: usize,
    /// Float offset of the matrix's scales in `scales`.
    pub scale0: usize,
    /// Byte offset of the first output row in `dst` (a multiple of 4).
    pub dst_byte0: usize,
}

/// Records the dequantisation of one run of rows of a `[.., cols]` matrix with `block` scales.
pub fn dequant_fp8(b: &mut Batch, src: &GpuBuffer, scales: &GpuBuffer, dst: &GpuBuffer, run: DequantRun, cols: usize, block: (usize, usize)) -> Result<()> {
    ensure!(cols.is_multiple_of(2) && cols > 0, "fp8 weights", "{cols} columns; FP8 weights need an even number");
    ensure!(run.src_byte0.is_multiple_of(4) && run.dst_byte0.is_multiple_of(4), "fp8 weights", "unaligned run");
    ensure!(block.0 > 0 && block.1 > 0, "fp8 weights", "empty scale block");
    let n = run.rows * cols;
    ensure!(src.size() >= (run.src_byte0 + n) as u64 && dst.size() >= (run.dst_byte0 + 2 * n) as u64, "fp8 weights", "run past its buffers");
    if b.on_host() {
        let (src, scales, dst) = (src.clone(), scales.clone(), dst.clone());
        return b.host("dequant_fp8", move || crate::cpu::ops::dequant_fp8(&src, &scales, &dst, run.rows, run.row0, run.src_byte0, run.scale0, run.dst_byte0, cols, block));
    }
    let params = Params {
        rows: u32_of(run.rows, "fp8 rows")?,
        cols: u32_of(cols, "fp8 columns")?,
        row0: u32_of(run.row0, "fp8 row")?,
        src_word0: u32_of(run.src_byte0 / 4, "fp8 offset")?,
        scale0: u32_of(run.scale0, "fp8 scale offset")?,
        scale_cols: cols.div_ceil(block.1) as u32,
        block_rows: block.0 as u32,
        block_cols: block.1 as u32,
        dst_word0: u32_of(run.dst_byte0 / 4, "bf16 offset")?,
        _pad: [0; 3],
    };
    let pipeline = b.ctx().pipeline(&shader())?;
    let groups = grid(b.ctx(), u32_of((n / 2).div_ceil(ELEMENT_WG as usize), "fp8 grid")?);
    b.dispatch("dequant_fp8", &pipeline, &params, &[src, scales, dst], groups)
}

/// Uploads FP8 matrices of `rows_each x cols` stacked into one bf16 `[pieces * rows_each, cols]`
/// weight, each piece with its own scales; parts split between pieces, as [`GpuWeight::stack`].
pub fn upload_fp8(ctx: &GpuContext, what: &str, pieces: &[Fp8Matrix], rows_each: usize, cols: usize) -> Result<GpuWeight> {
    ensure!(rows_each > 0 && cols > 0 && !pieces.is_empty(), what, "empty weight {rows_each}x{cols}");
    if !cols.is_multiple_of(2) {
        return Err(Error::invalid(what, format!("FP8 weights need an even number of columns, found {cols}")));
    }
    let scale_len: usize = scale_shape(rows_each, cols, pieces[0].block).iter().product();
    for (i, p) in pieces.iter().enumerate() {
        ensure!(p.data.len() == rows_each * cols, what, "piece {i}: {} FP8 bytes for {rows_each}x{cols}", p.data.len());
        ensure!(p.scales.len() == scale_len, what, "piece {i}: {} scales, expected {scale_len}", p.scales.len());
    }
    let row_bytes = cols * 2;
    let mut parts = Vec::new();
    for layout in stacked_parts(ctx, what, pieces.len(), rows_each, row_bytes)? {
        let buffer = ctx.storage(what, (layout.rows * row_bytes) as u64)?;
        let mut b = Batch::named(ctx, format!("dequantising {what}"));
        // Each run is staged whole rows at a time, so it starts on a 4-byte boundary.
        for run in &layout.runs {
            let m = &pieces[run.piece];
            let mut bytes = m.data[run.piece_row * cols..(run.piece_row + run.rows) * cols].to_vec();
            bytes.resize(bytes.len().next_multiple_of(4), 0);
            let src = ctx.storage_from::<u8>("fp8 staging", &bytes)?;
            let scales = ctx.storage_from("fp8 scales", m.scales)?;
            let at = DequantRun { rows: run.rows, row0: run.piece_row, src_byte0: 0, scale0: 0, dst_byte0: run.part_row * row_bytes };
            dequant_fp8(&mut b, &src, &scales, &buffer, at, cols, m.block)?;
        }
        b.submit()?;
        parts.push(WeightPart { buffer, first_row: layout.first_row, rows: layout.rows });
    }
    let rows = rows_each * pieces.len();
    Ok(GpuWeight { parts, rows, cols, dtype: WeightDtype::Bf16 })
}
