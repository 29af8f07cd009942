//! llama.cpp's block formats (GGUF's Q8_0, Q4_0, Q4_K, Q5_K, Q6_K): their layouts, the
//! dequantisation every kernel path must match bit for bit, and the reference quantisers of Q8_0,
//! Q4_0 and Q4_K (`--quantize`), which give the same bytes as llama.cpp's `quantize_row_*_ref`
//! (the functions `llama-quantize` runs without an importance matrix): the same f32 operations in
//! the same order, none fused.
//!
//! A quantised matrix is its rows one after another, each a whole number of blocks along the
//! inner dimension, exactly as a GGUF file stores it; so element `i` of a matrix (row-major) is
//! element `i % B` of block `i / B`, and a run of rows is a run of bytes.

mod quantize;

pub use quantize::{quantize, quantize_into};

use crate::gpu::WeightDtype;

/// Elements per super-block of the K formats.
pub const QK_K: usize = 256;

/// The f16 at `b[at..at + 2]` (little-endian), as f32.
#[inline(always)]
fn half_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Sub-block `j`'s 6-bit scale and min from a K block's 12 packed bytes (Q4_K, Q5_K).
#[inline(always)]
pub fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Decodes whole blocks of `dtype` from `src` into `out` (`out.len()` elements, a multiple of
/// the block size). f32, f16 and bf16 are one-element blocks. Always inlined, so that the host
/// matmul's per-instruction-set callers compile it with their vector width.
#[inline(always)]
pub fn dequantize(dtype: WeightDtype, src: &[u8], out: &mut [f32]) {
    let (be, bb) = (dtype.block_elems(), dtype.block_bytes());
    assert!(out.len().is_multiple_of(be) && src.len() >= out.len() / be * bb, "dequantize: {} elements of {} from {} bytes", out.len(), dtype.name(), src.len());
    match dtype {
        WeightDtype::F32 => out.copy_from_slice(bytemuck::cast_slice(&src[..out.len() * 4])),
        WeightDtype::F16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        WeightDtype::Bf16 => {
            for (o, b) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        WeightDtype::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(34)) {
                let d = half_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = q as i8 as f32 * d;
                }
            }
        }
        WeightDtype::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(src.chunks_exact(18)) {
                let d = half_at(b, 0);
                let (lo, hi) = o.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..18]) {
                    *l = ((q & 0xf) as i32 - 8) as f32 * d;
                    *h = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        WeightDtype::Q4K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(src.chunks_exact(144)) {
                let (d, dmin, scales, qs) = (half_at(b, 0), half_at(b, 2), &b[4..16], &b[16..144]);
                for c in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * c, scales);
                    let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                    let (d1, m1, d2, m2) = (d * s1 as f32, dmin * m1 as f32, d * s2 as f32, dmin * m2 as f32);
                    let (lo, hi) = o[64 * c..64 * c + 64].split_at_mut(32);
                    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&qs[32 * c..32 * c + 32]) {
                        *l = d1 * (q & 0xf) as f32 - m1;
                        *h = d2 * (q >> 4) as f32 - m2;
                    }
                }
            }
        }
        WeightDtype::Q5K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(src.chunks_exact(176)) {
                let (d, dmin, scales, qh, qs) = (half_at(b, 0), half_at(b, 2), &b[4..16], &b[16..48], &b[48..176]);
                for c in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * c, scales);
                    let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                    let (d1, m1, d2, m2) = (d * s1 as f32, dmin * m1 as f32, d * s2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                    let (lo, hi) = o[64 * c..64 * c + 64].split_at_mut(32);
                    for (((l, h), &q), &h5) in lo.iter_mut().zip(hi).zip(&qs[32 * c..32 * c + 32]).zip(qh) {
                        *l = d1 * ((q & 0xf) + if h5 & u1 != 0 { 16 } else { 0 }) as f32 - m1;
                        *h = d2 * ((q >> 4) + if h5 & u2 != 0 { 16 } else { 0 }) as f32 - m2;
                    }
                }
            }
        }
        WeightDtype::Fp8 { block } => {
            let n = block as usize;
            let table = crate::kernels::dequant::e4m3_table();
            for (o, b) in out.chunks_exact_mut(n).zip(src.chunks_exact(n + 4)) {
                let scale = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for (o, &q) in o.iter_mut().zip(&b[4..]) {
                    *o = half::bf16::from_f32(table[q as usize] * scale).to_f32();
                }
            }
        }
        WeightDtype::Q6K => {
            for (o, b) in out.chunks_exact_mut(QK_K).zip(src.chunks_exact(210)) {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], half_at(b, 208));
                for n in 0..2 {
                    let (ql, qh, sc, o) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..], &mut o[128 * n..128 * n + 128]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        o[l] = d * sc[is] as i8 as f32 * q1 as f32;
                        o[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                        o[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                        o[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// Elements per unit of the host matmul's in-register decoding (`cpu/unpack.rs`): a Q8_0/Q4_0
/// block, a K format's sub-block.
pub const UNIT: usize = 32;

/// Each unit's scales, per row, as the scalar decoder computes them: `[d, 0]` for a Q8_0/Q4_0
/// block, `[d * scale, dmin * min]` for a Q4_K sub-block. Computed once for a task's weight rows, so that the tiles of input rows that
/// pass over them share the scalar work (which, per tile, cost more than the decoding itself):
/// the host matmul's in-register decoding (`cpu/unpack.rs`) reads them.
pub fn unit_scales(dtype: WeightDtype, row: &[u8], cols: usize, out: &mut [[f32; 2]]) {
    let units = cols / UNIT;
    match dtype {
        WeightDtype::Q8_0 | WeightDtype::Q4_0 => {
            let bytes = dtype.block_bytes();
            for (o, b) in out[..units].iter_mut().zip(row.chunks_exact(bytes)) {
                *o = [half_at(b, 0), 0.0];
            }
        }
        WeightDtype::Q4K => {
            for (o, b) in out[..units].chunks_exact_mut(8).zip(row.chunks_exact(144)) {
                let (d, dmin) = (half_at(b, 0), half_at(b, 2));
                for (s, o) in o.iter_mut().enumerate() {
                    let (sc, m) = scale_min_k4(s, &b[4..16]);
                    *o = [d * sc as f32, dmin * m as f32];
                }
            }
        }
        _ => unreachable!("{} has no 32-element units", dtype.name()),
    }
}

/// An FP8 matrix (`rows x cols` e4m3 values, scales per `block` of rows x columns) in the
/// [`WeightDtype::Fp8`] layout, or None when the scale blocks do not divide the rows' length.
pub fn pack_fp8_rows(data: &[u8], scales: &[f32], block: (usize, usize), rows: usize, cols: usize) -> Option<(Vec<u8>, WeightDtype)> {
    let (br, bc) = block;
    if bc == 0 || !cols.is_multiple_of(bc) || !bc.is_multiple_of(4) || bc > u32::MAX as usize || data.len() != rows * cols {
        return None;
    }
    let scale_cols = cols / bc;
    let mut out = Vec::with_capacity(rows * (cols + 4 * scale_cols));
    for r in 0..rows {
        for j in 0..scale_cols {
            out.extend_from_slice(&scales[(r / br) * scale_cols + j].to_le_bytes());
            out.extend_from_slice(&data[r * cols + j * bc..r * cols + (j + 1) * bc]);
        }
    }
    Some((out, WeightDtype::Fp8 { block: bc as u32 }))
}

/// Random valid blocks of `dtype` for tests: random quants, and f16 scales between 2^-8 and 1,
/// with `extremes` also some over the whole f16 range (subnormal, zero, the largest, negative) so
/// that every decoding path meets them.
pub fn random_blocks(dtype: WeightDtype, blocks: usize, seed: u64, extremes: bool) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = vec![0u8; blocks * dtype.block_bytes()];
    for b in out.iter_mut() {
        *b = next() as u8;
    }
    // f16 scales: mostly moderate (so products stay finite), some extreme.
    let scale = |n: u64, r: u64| -> [u8; 2] {
        let bits: u16 = match n % 8 {
            0 => 0x0001,                        // smallest subnormal
            1 => 0x0000,                        // zero
            2 => 0x7bff,                        // largest finite
            3 => 0x8000 | (r as u16 & 0x3bff),  // negative, below 1
            _ => 0x1c00 + (r as u16 % 0x2000), // 2^-8 .. 2^0
        };
        bits.to_le_bytes()
    };
    let scale_at: &[usize] = match dtype {
        WeightDtype::Q8_0 | WeightDtype::Q4_0 => &[0],
        WeightDtype::Q4K | WeightDtype::Q5K => &[0, 2],
        WeightDtype::Q6K => &[208],
        WeightDtype::F32 | WeightDtype::F16 | WeightDtype::Bf16 => &[],
        WeightDtype::Fp8 { .. } => {
            // f32 scales (extremes: tiny, huge, negative), values without e4m3fn's NaN.
            for (i, block) in out.chunks_exact_mut(dtype.block_bytes()).enumerate() {
                let s: f32 = match (next() % 8, extremes) {
                    (0, true) => 1e-30,
                    (1, true) => 3e30,
                    (2, _) => -0.5,
                    _ => (1 + i % 7) as f32 / 64.0,
                };
                block[..4].copy_from_slice(&s.to_le_bytes());
                for q in &mut block[4..] {
                    if *q & 0x7f == 0x7f {
                        *q &= 0xfe;
                    }
                }
            }
            return out;
        }
    };
    for (i, block) in out.chunks_exact_mut(dtype.block_bytes()).enumerate() {
        for &at in scale_at {
            let (n, r) = (next() % 64, next());
            block[at..at + 2].copy_from_slice(&scale(if n < 8 && extremes { n } else { 4 + i as u64 }, r));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decoding one element at a time, as the GPU kernels do, from the definitions of the
    /// formats (an independent reading of the layouts, for the block decoders above).
    fn element(dtype: WeightDtype, b: &[u8], j: usize) -> f32 {
        match dtype {
            WeightDtype::Q8_0 => b[2 + j] as i8 as f32 * half_at(b, 0),
            WeightDtype::Q4_0 => (((b[2 + j % 16] >> (4 * (j / 16))) & 0xf) as i32 - 8) as f32 * half_at(b, 0),
            WeightDtype::Q4K | WeightDtype::Q5K => {
                let (c, l) = (j / 64, j % 64);
                let sub = 2 * c + l / 32;
                let qs = if dtype == WeightDtype::Q4K { &b[16..] } else { &b[48..] };
                let mut q = (qs[32 * c + l % 32] >> (4 * (l / 32))) & 0xf;
                if dtype == WeightDtype::Q5K {
                    q += ((b[16 + l % 32] >> sub) & 1) * 16;
                }
                let (s, m) = scale_min_k4(sub, &b[4..16]);
                half_at(b, 0) * s as f32 * q as f32 - half_at(b, 2) * m as f32
            }
            WeightDtype::Q6K => {
                let (n, r) = (j / 128, j % 128);
                let (quarter, l) = (r / 32, r % 32);
                let low = b[64 * n + l + 32 * (quarter % 2)] >> (4 * (quarter / 2)) & 0xf;
                let high = (b[128 + 32 * n + l] >> (2 * quarter)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                half_at(b, 208) * b[192 + 8 * n + l / 16 + 2 * quarter] as i8 as f32 * q as f32
            }
            _ => unreachable!(),
        }
    }

    #[test]
    fn block_decoders_match_the_element_definitions() {
        for dtype in WeightDtype::QUANTISED {
            let blocks = 37;
            let src = random_blocks(dtype, blocks, 7, true);
            let mut out = vec![f32::NAN; blocks * dtype.block_elems()];
            dequantize(dtype, &src, &mut out);
            for (i, &v) in out.iter().enumerate() {
                let (bi, j) = (i / dtype.block_elems(), i % dtype.block_elems());
                let want = element(dtype, &src[bi * dtype.block_bytes()..], j);
                assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "{} element {i}: {v} vs {want}", dtype.name());
            }
        }
    }
}
