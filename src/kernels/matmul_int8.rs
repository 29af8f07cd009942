//! `y = x W^T (+ b)` for block-format weights (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) with 8-bit inputs,
//! on `dot4I8Packed` (`--gpu-compute int8`, as llama.cpp's MMVQ/MMQ kernels multiply).
//!
//! The input rows are first quantised 32 elements at a time (`quantize_q8.wgsl`: one f32 scale
//! and the sum of the values per 32, as llama.cpp's Q8_1). Each weight sub-block of 32 is read as
//! signed bytes with an affine map back to its weights (`shaders/lib/wsub_*.wgsl`: a scale per 16,
//! and an offset for the formats with minimums), so a sub-block's product is two exact integer
//! sums of 16 products, scaled once. naga emits the packed dot product where the device has it
//! (SPIR-V `OpSDot`, Metal `packed_char4`, HLSL `dot4add_i8packed`) and plain integer code
//! otherwise.
//!
//! Two paths like the f32 matmul's (few rows: a thread per column; many: staged tiles), adding
//! the sub-blocks in order with the same operations (`sub_product`), each product rounded before
//! its sum (no fused multiply-adds, whose use drivers choose by the code's shape), so a row gets
//! the same bits on either path, alone or in any batch, and on any device: [`model`] performs
//! those operations on the host, the tests' oracle, bit for bit.

use crate::error::{ensure, Result};
use crate::gpu::{grid, Batch, GpuBuffer, GpuWeight, ShaderBuilder, ShaderSource, WeightDtype};
use crate::kernels::matmul::{MatmulPath, Rows, TILE_BN};
use crate::kernels::{need, optional_binding, u32_of};

/// Elements per quantised unit of the inputs and per weight sub-block.
pub const SUB: usize = 32;
const QUANTIZE_WG: u32 = 64;

/// Whether the int8 path multiplies weights of `dtype`.
pub fn supports(dtype: WeightDtype) -> bool {
    WeightDtype::QUANTISED.contains(&dtype)
}

/// The int8 kernel's variant: the f32 path's choice for the row count, its tiles capped at 64
/// rows (the largest the workgroup's 256 threads cover).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Path {
    Vector { tok: u32, wg: u32 },
    Tiled { bm: u32 },
}

impl Int8Path {
    pub fn of(path: MatmulPath) -> Self {
        match path {
            MatmulPath::Vector { tok, wg } => Int8Path::Vector { tok, wg },
            MatmulPath::Tiled { bm } => Int8Path::Tiled { bm: bm.min(64) },
            MatmulPath::Coop { .. } => Int8Path::Tiled { bm: 64 },
        }
    }
}

pub fn quantize_shader() -> ShaderSource {
    ShaderBuilder::new("quantize_q8").constant("WG", QUANTIZE_WG).body(include_str!("../../shaders/quantize_q8.wgsl"))
}

pub fn shader(path: Int8Path, dtype: WeightDtype) -> ShaderSource {
    match path {
        Int8Path::Vector { tok, wg } => ShaderBuilder::new("matmul_vec_i8")
            .constant("WG", wg)
            .constant("TOK", tok)
            .weights_int8(dtype)
            .body(concat!(
                include_str!("../../shaders/lib/matmul_i8_bindings.wgsl"),
                include_str!("../../shaders/lib/int8_product.wgsl"),
                include_str!("../../shaders/matmul_vec_i8.wgsl")
            )),
        Int8Path::Tiled { bm } => ShaderBuilder::new("matmul_tiled_i8")
            .constant("BM", bm)
            .constant("BN", TILE_BN)
            .weights_int8(dtype)
            .body(concat!(
                include_str!("../../shaders/lib/matmul_i8_bindings.wgsl"),
                include_str!("../../shaders/lib/int8_product.wgsl"),
                include_str!("../../shaders/lib/matmul_tile_i8.wgsl"),
                include_str!("../../shaders/matmul_tiled_i8.wgsl")
            )),
    }
}

/// The grouped expert matmul on 8-bit inputs, in tiles of `bm` rows.
pub fn grouped_shader(bm: u32, dtype: WeightDtype) -> ShaderSource {
    ShaderBuilder::new("moe_matmul_i8").constant("BM", bm).constant("BN", TILE_BN).weights_int8(dtype).body(concat!(
        include_str!("../../shaders/moe_matmul_i8.wgsl"),
        include_str!("../../shaders/lib/moe_tiles.wgsl"),
        include_str!("../../shaders/lib/int8_product.wgsl"),
        include_str!("../../shaders/lib/matmul_tile_i8.wgsl")
    ))
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GroupedParams {
    n: u32,
    k: u32,
    first: u32,
    count: u32,
    zero: u32,
    pad: [u32; 3],
}

/// [`crate::kernels::moe::grouped_matmul`] on rows quantised by [`quantize`] (`plan.n_assign` of
/// them): every expert's rows against its matrix of the stacked `w`, one dispatch per part.
/// Returns `[n_assign, n]`.
pub fn grouped_matmul(b: &mut Batch, xq: &QuantisedRows, w: &GpuWeight, plan: &crate::kernels::moe::MoePlan) -> Result<GpuBuffer> {
    let (n, k) = (w.rows / plan.n_experts, w.cols);
    ensure!(xq.k == k && xq.m == plan.n_assign, "int8 grouped matmul", "{} rows of {} against {} assignments of {k}", xq.m, xq.k, plan.n_assign);
    let ctx = b.ctx().clone();
    let y = ctx.storage("grouped matmul output", plan.n_assign as u64 * n as u64 * 4)?;
    let bm = plan.tile.rows();
    let pipeline = ctx.pipeline(&grouped_shader(bm, w.dtype))?;
    for (part, first, count) in crate::kernels::moe::expert_parts(w, n)? {
        let params = GroupedParams { n: u32_of(n, "expert width")?, k: u32_of(k, "expert inner dim")?, first: first as u32, count: count as u32, zero: 0, pad: [0; 3] };
        let max_tiles = plan.n_assign.div_ceil(bm as usize) + count;
        let groups = [params.n.div_ceil(TILE_BN), u32_of(max_tiles, "grouped matmul tiles")?, 1];
        b.dispatch("moe_matmul_i8", &pipeline, &params, &[&xq.q, &xq.s, &part.buffer, &plan.offsets, &plan.tile_starts, &y], groups)?;
    }
    Ok(y)
}

/// Rows `rows` of `x` quantised once for matmuls over each of `weights` (an expert's gate and
/// up), when the int8 path takes them all; None when it does not (each matmul then reads `x`).
pub fn shared_inputs(b: &mut Batch, x: &GpuBuffer, rows: Rows, weights: &[&GpuWeight]) -> Result<Option<QuantisedRows>> {
    let Some(first) = weights.first() else { return Ok(None) };
    if b.on_host() || !b.ctx().int8_products() || !weights.iter().all(|w| supports(w.dtype) && w.cols == first.cols) {
        return Ok(None);
    }
    quantize(b, x, rows.x_row0, rows.m, first.cols).map(Some)
}

/// [`crate::kernels::matmul::matmul_rows`] (no bias, the tuned path) on rows from
/// [`shared_inputs`], written to `rows`' output rows.
pub fn matmul_shared(b: &mut Batch, xq: &QuantisedRows, w: &GpuWeight, y: &GpuBuffer, rows: Rows) -> Result<()> {
    let path = Int8Path::of(b.ctx().matmul_path(rows.m));
    matmul_quantised(b, xq, w, None, y, rows.y_row0, rows.y_stride, path)
}

/// Input rows quantised for the int8 matmul: `q` holds each row's units of 32 values as signed
/// bytes (`m * k` bytes), `s` each unit's `(scale, sum of values)` as two f32.
pub struct QuantisedRows {
    pub q: GpuBuffer,
    pub s: GpuBuffer,
    pub m: usize,
    pub k: usize,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct QuantizeParams {
    m: u32,
    k: u32,
    x_row0: u32,
    pad: u32,
}

/// Quantises rows `x_row0 .. x_row0 + m` of `x` (each `k` wide, a multiple of 32).
pub fn quantize(b: &mut Batch, x: &GpuBuffer, x_row0: usize, m: usize, k: usize) -> Result<QuantisedRows> {
    ensure!(m > 0 && k > 0 && k.is_multiple_of(SUB), "int8 quantise", "{m} rows of {k}: rows must be whole units of {SUB}");
    need(x, (x_row0 + m) * k, "int8 quantise input")?;
    let ctx = b.ctx().clone();
    let units = m * k / SUB;
    let q = ctx.storage("int8 inputs", (m * k) as u64)?;
    let s = ctx.storage("int8 input scales", (units * 8) as u64)?;
    let params = QuantizeParams { m: u32_of(m, "int8 quantise rows")?, k: u32_of(k, "int8 quantise width")?, x_row0: u32_of(x_row0, "int8 quantise row")?, pad: 0 };
    let pipeline = ctx.pipeline(&quantize_shader())?;
    let groups = grid(&ctx, u32_of(units, "int8 quantise units")?.div_ceil(QUANTIZE_WG));
    b.dispatch("quantize_q8", &pipeline, &params, &[x, &q, &s], groups)?;
    Ok(QuantisedRows { q, s, m, k })
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    y_row0: u32,
    y_stride: u32,
    y_col0: u32,
    has_bias: u32,
    /// Always 0: the kernels' opaque identity (`kept`), which keeps products from being fused.
    zero: u32,
}

/// `y[y_row0 + r] = xq[r] W^T (+ bias)` for the `xq.m` quantised rows, on `path`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_quantised(b: &mut Batch, xq: &QuantisedRows, w: &GpuWeight, bias: Option<&GpuBuffer>, y: &GpuBuffer, y_row0: usize, y_stride: Option<usize>, path: Int8Path) -> Result<()> {
    ensure!(supports(w.dtype), "int8 matmul", "no int8 path for {} weights", w.dtype.name());
    ensure!(w.cols == xq.k, "int8 matmul", "inputs of {} against weights of {} columns", xq.k, w.cols);
    let (n, m) = (w.rows, xq.m);
    let y_stride = y_stride.unwrap_or(n);
    ensure!(y_stride >= n, "int8 matmul", "output stride {y_stride} is narrower than {n} columns");
    need(y, (y_row0 + m) * y_stride, "int8 matmul output")?;
    if let Some(bias) = bias {
        need(bias, n, "int8 matmul bias")?;
    }
    let ctx = b.ctx().clone();
    let pipeline = ctx.pipeline(&shader(path, w.dtype))?;
    let bias_buf = &optional_binding(&ctx, bias)?;
    for part in &w.parts {
        let params = Params {
            m: u32_of(m, "int8 matmul rows")?,
            n: u32_of(part.rows, "int8 matmul columns")?,
            k: u32_of(xq.k, "int8 matmul inner dim")?,
            y_row0: u32_of(y_row0, "int8 matmul output row")?,
            y_stride: u32_of(y_stride, "int8 matmul output stride")?,
            y_col0: u32_of(part.first_row, "int8 matmul column offset")?,
            has_bias: bias.is_some() as u32,
            zero: 0,
        };
        let groups = match path {
            Int8Path::Vector { tok, wg } => {
                let [gx, gy, _] = grid(&ctx, params.n.div_ceil(wg));
                [gx, gy, params.m.div_ceil(tok)]
            }
            Int8Path::Tiled { bm } => [params.n.div_ceil(TILE_BN), params.m.div_ceil(bm), 1],
        };
        b.dispatch("matmul_i8", &pipeline, &params, &[&xq.q, &xq.s, &part.buffer, bias_buf, y], groups)?;
    }
    Ok(())
}

/// [`crate::kernels::matmul::matmul_rows`] on the int8 path: the rows quantised, then multiplied.
pub fn matmul_rows(b: &mut Batch, x: &GpuBuffer, w: &GpuWeight, bias: Option<&GpuBuffer>, y: &GpuBuffer, rows: Rows, path: MatmulPath) -> Result<()> {
    let xq = quantize(b, x, rows.x_row0, rows.m, w.cols)?;
    matmul_quantised(b, &xq, w, bias, y, rows.y_row0, rows.y_stride, Int8Path::of(path))
}

/// `f32` nearest 1 / 127: a unit's scale is its largest magnitude times this (a product, exact
/// on every device, where a quotient need not be).
pub const RECIP_127: f32 = f32::from_bits(0x3c01_0204);
/// Units whose largest magnitude is below 2^-64 quantise to zeros (their products would need
/// subnormals, which devices may flush).
pub const TINY: f32 = f32::from_bits(0x1f80_0000);

/// The quantiser on the host, as the GPU's gives it on every device: per unit of 32, `(values,
/// [scale, sum])` with scale = max |x| * [`RECIP_127`] and each value the integer nearest
/// x / scale, ties to even (an f64 quotient decides exactly: one that is not a half lies at least
/// 2^-27 from one, and the f64 rounding moves it by under 2^-46).
pub fn quantize_reference(x: &[f32]) -> (Vec<i8>, Vec<[f32; 2]>) {
    let mut q = vec![0i8; x.len()];
    let mut s = vec![[0f32; 2]; x.len() / SUB];
    for ((unit, q), s) in x.chunks_exact(SUB).zip(q.chunks_exact_mut(SUB)).zip(&mut s) {
        *s = quantize_unit(unit, q);
    }
    (q, s)
}

/// One unit of [`quantize_reference`]: its values into `q`, its `[scale, sum]` returned.
#[inline]
pub fn quantize_unit(unit: &[f32], q: &mut [i8]) -> [f32; 2] {
    let amax = unit.iter().fold(0f32, |a, v| a.max(v.abs()));
    if amax.is_nan() || amax < TINY {
        q.fill(0);
        return [0.0, 0.0];
    }
    let d = amax * RECIP_127;
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(unit) {
        let value = ((v as f64 / d as f64).round_ties_even() as i32).clamp(-127, 127);
        sum += value;
        *o = value as i8;
    }
    [d, sum as f32]
}

/// Weight sub-blocks as the kernels read them: every element's signed byte and, per sub-block of
/// 32, `[scale of elements 0-15, scale of 16-31, offset]`, decoded from the blocks' bytes here
/// independently of the shaders.
pub fn sub_blocks(dtype: WeightDtype, bytes: &[u8]) -> (Vec<i8>, Vec<[f32; 3]>) {
    let elems = bytes.len() / dtype.block_bytes() * dtype.block_elems();
    let (mut q, mut a) = (vec![0i8; elems], vec![[0f32; 3]; elems / SUB]);
    sub_blocks_into(dtype, bytes, &mut q, &mut a);
    (q, a)
}

/// [`sub_blocks`] into `q` (an element each) and `a` (a sub-block each), for the whole blocks
/// of `bytes` (the host experts decode a weight row at a time). The quants of each sub-block are
/// one loop over fixed-size arrays, which the compiler vectorises; always inlined, so that the
/// host's per-instruction-set callers compile it with their vector width.
#[inline(always)]
pub fn sub_blocks_into(dtype: WeightDtype, bytes: &[u8], q: &mut [i8], a: &mut [[f32; 3]]) {
    use crate::quant::scale_min_k4;
    #[inline(always)]
    fn half(b: &[u8], at: usize) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
    }
    #[inline(always)]
    fn sub(q: &mut [i8], i: usize) -> &mut [i8; SUB] {
        (&mut q[i * SUB..(i + 1) * SUB]).try_into().expect("a sub-block")
    }
    #[inline(always)]
    fn bytes32(b: &[u8], at: usize) -> [u8; 32] {
        b[at..at + 32].try_into().expect("32 bytes")
    }
    let (be, bs) = (dtype.block_elems(), dtype.block_elems() / SUB);
    for ((block, q), a) in bytes.chunks_exact(dtype.block_bytes()).zip(q.chunks_exact_mut(be)).zip(a.chunks_exact_mut(bs)) {
        match dtype {
            WeightDtype::Q8_0 => {
                let d = half(block, 0);
                let src = bytes32(block, 2);
                for (o, v) in sub(q, 0).iter_mut().zip(src) {
                    *o = v as i8;
                }
                a[0] = [d, d, -0.0];
            }
            WeightDtype::Q4_0 => {
                let d = half(block, 0);
                let src: [u8; 16] = block[2..18].try_into().expect("16 bytes");
                let out = sub(q, 0);
                for (i, v) in src.into_iter().enumerate() {
                    out[i] = (v & 0xf) as i8;
                    out[16 + i] = (v >> 4) as i8;
                }
                a[0] = [d, d, -8.0 * d];
            }
            WeightDtype::Q4K | WeightDtype::Q5K => {
                let (d, dmin, scales) = (half(block, 0), half(block, 2), &block[4..16]);
                let (qh, qs) = if dtype == WeightDtype::Q5K { (Some(bytes32(block, 16)), &block[48..176]) } else { (None, &block[16..144]) };
                // Sub-blocks 2p and 2p + 1 are the low and high nibbles of the same 32 bytes.
                for p in 0..4 {
                    let src = bytes32(qs, 32 * p);
                    for (j, shift) in [(2 * p, 0), (2 * p + 1, 4)] {
                        let out = sub(q, j);
                        for (o, v) in out.iter_mut().zip(src) {
                            *o = ((v >> shift) & 0xf) as i8;
                        }
                        if let Some(h) = qh {
                            for (o, hb) in out.iter_mut().zip(h) {
                                *o |= (((hb >> j) & 1) << 4) as i8;
                            }
                        }
                    }
                }
                for (j, a) in a.iter_mut().enumerate() {
                    let (sc, m) = scale_min_k4(j, scales);
                    let scale = d * sc as f32;
                    *a = [scale, scale, -(dmin * m as f32)];
                }
            }
            WeightDtype::Q6K => {
                let (ql, qh, sc, d) = (&block[0..128], &block[128..192], &block[192..208], half(block, 208));
                for (j, a) in a.iter_mut().enumerate() {
                    let (n, r) = (j / 4, j % 4);
                    let (low, high) = (bytes32(ql, 64 * n + 32 * (r % 2)), bytes32(qh, 32 * n));
                    for ((o, l), h) in sub(q, j).iter_mut().zip(low).zip(high) {
                        *o = (((l >> (4 * (r / 2))) & 0xf) | (((h >> (2 * r)) & 3) << 4)).wrapping_sub(32) as i8;
                    }
                    let s = |i: usize| d * sc[8 * n + 2 * r + i] as i8 as f32;
                    *a = [s(0), s(1), -0.0];
                }
            }
            other => panic!("sub_blocks: {} has no int8 path", other.name()),
        }
    }
}

/// What the kernels compute, operation for operation, each product and sum rounded on its own:
/// for each output, per sub-block in order, `acc += x_scale * ((a0 * lo + a1 * hi) + a2 * x_sum)`
/// with `lo`/`hi` the exact sums of the first and last 16 products; then the bias added.
#[allow(clippy::too_many_arguments)]
pub fn model(xq: &[i8], xs: &[[f32; 2]], wq: &[i8], wa: &[[f32; 3]], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let subs = k / SUB;
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let mut acc = 0f32;
            for s in 0..subs {
                let (xo, wo) = ((r * subs + s) * SUB, (c * subs + s) * SUB);
                let dot = |from: usize| (from..from + 16).map(|i| xq[xo + i] as i32 * wq[wo + i] as i32).sum::<i32>() as f32;
                let (ws, x) = (wa[c * subs + s], xs[r * subs + s]);
                let v = (ws[0] * dot(0) + ws[1] * dot(16)) + ws[2] * x[1];
                acc += x[0] * v;
            }
            y[r * n + c] = bias.map_or(acc, |b| acc + b[c]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_blocks_map_back_to_the_decoders_bits() {
        // Extreme scales included: the affine map, fma(a, q, c), must give dequantize's values
        // exactly, so the int8 kernels multiply the very weights the f32 path does.
        for dtype in WeightDtype::QUANTISED {
            for (seed, extremes) in [(1, false), (2, true)] {
                let blocks = 5;
                let bytes = crate::quant::random_blocks(dtype, blocks, seed, extremes);
                let mut want = vec![0f32; blocks * dtype.block_elems()];
                crate::quant::dequantize(dtype, &bytes, &mut want);
                let (q, a) = sub_blocks(dtype, &bytes);
                assert_eq!((q.len(), a.len()), (want.len(), want.len() / SUB));
                for (i, w) in want.iter().enumerate() {
                    let s = a[i / SUB];
                    let got = s[if i % SUB < 16 { 0 } else { 1 }].mul_add(q[i] as f32, s[2]);
                    assert_eq!(got.to_bits(), w.to_bits(), "{dtype:?} extremes={extremes}: element {i} maps to {got} not {w}");
                }
            }
        }
    }

    #[test]
    fn the_model_is_the_product_of_the_rounded_inputs_and_the_weights() {
        let (m, n, k) = (3, 5, 512);
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1664525).wrapping_add(1013904223);
            (state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        };
        let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
        let (xq, xs) = quantize_reference(&x);
        let rounded: Vec<f32> = xq.iter().enumerate().map(|(i, &q)| q as f32 * xs[i / SUB][0]).collect();
        for dtype in WeightDtype::QUANTISED {
            let bytes = crate::quant::random_blocks(dtype, n * k / dtype.block_elems(), 3, false);
            let mut w = vec![0f32; n * k];
            crate::quant::dequantize(dtype, &bytes, &mut w);
            let (wq, wa) = sub_blocks(dtype, &bytes);
            let got = model(&xq, &xs, &wq, &wa, None, m, n, k);
            let want = crate::kernels::matmul::reference(&rounded, &w, None, m, n, k);
            let (err, norm) = got.iter().zip(&want).fold((0f64, 0f64), |(e, s), (&g, &w)| (e + (g as f64 - w as f64).powi(2), s + (w as f64).powi(2)));
            assert!(err / norm < 1e-10, "{dtype:?}: normalised error {:e}", err / norm);
            // And each rounded input is within half a step of the input.
            for (i, (&r, &v)) in rounded.iter().zip(&x).enumerate() {
                assert!((r - v).abs() <= 0.5 * xs[i / SUB][0] * (1.0 + 1e-6), "element {i}: {r} from {v}");
            }
        }
    }
}
