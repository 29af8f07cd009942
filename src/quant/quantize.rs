//! The reference quantisers: the bytes llama.cpp's `quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`
//! and `quantize_row_q4_K_ref` write for the same input (checked against bytes llama.cpp wrote,
//! `tests/fixtures/quant/`). Every f32 operation is the C code's, in its order; Rust never fuses a
//! multiply and an add, and llama.cpp builds these in its base library without FMA.

use super::{scale_min_k4, QK_K};
use crate::error::{Error, Result};
use crate::gpu::WeightDtype;

/// `x` (rows of `cols`, `cols` a multiple of the block size) quantised to `dtype`.
pub fn quantize(dtype: WeightDtype, x: &[f32], cols: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; x.len() / cols.max(1) * dtype.row_bytes(cols)];
    quantize_into(dtype, x, cols, &mut out)?;
    Ok(out)
}

/// [`quantize`] into `out` (exactly the rows' size).
pub fn quantize_into(dtype: WeightDtype, x: &[f32], cols: usize, out: &mut [u8]) -> Result<()> {
    let be = dtype.block_elems();
    if cols == 0 || !cols.is_multiple_of(be) || !x.len().is_multiple_of(cols) {
        return Err(Error::invalid("--quantize", format!("{} needs rows of a multiple of {be} elements; these have {cols}", dtype.name())));
    }
    assert_eq!(out.len(), x.len() / be * dtype.block_bytes(), "quantize: output size");
    let blocks = x.chunks_exact(be).zip(out.chunks_exact_mut(dtype.block_bytes()));
    match dtype {
        WeightDtype::Q8_0 => blocks.for_each(|(x, y)| q8_0(x, y)),
        WeightDtype::Q4_0 => blocks.for_each(|(x, y)| q4_0(x, y)),
        WeightDtype::Q4K => blocks.for_each(|(x, y)| q4_k(x, y)),
        other => return Err(Error::invalid("--quantize", format!("no quantiser for {}; supported: q8_0, q4_0, q4_k", other.name()))),
    }
    Ok(())
}

fn put_half(y: &mut [u8], v: f32) {
    y[..2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

fn half(y: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([y[0], y[1]])).to_f32()
}

fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_half(y, d);
    for (q, &v) in y[2..34].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

fn q4_0(x: &[f32], y: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_half(y, d);
    for j in 0..16 {
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[16 + j] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = lo | (hi << 4);
    }
}

/// llama.cpp's `nearest_int`: round half to even through the float adder (for |v| < 2^22).
fn nearest_int(v: f32) -> i32 {
    let t = v + 12582912.0;
    (t.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// llama.cpp's `make_qkx2_quants` without `use_mad`: the scale and (negated) min of levels
/// `0..=nmax` over `x` minimising the weighted squared error, searched over `nstep + 1`
/// candidate scales; the levels go to `levels`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(nmax: i32, x: &[f32], weights: &[f32], levels: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                levels[..n].copy_from_slice(&aux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

fn q4_k(x: &[f32], y: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let sum_x2 = xs.iter().fold(0f32, |s, &v| s + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: Vec<f32> = xs.iter().map(|v| av_x + v.abs()).collect();
        let (scale, min) = make_qkx2_quants(15, xs, &weights, &mut levels[32 * j..32 * j + 32], -1.0, 0.1, 20);
        (scales[j], mins[j]) = (scale, min);
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut y[4..16];
    packed.iter_mut().for_each(|b| *b = 0);
    for j in 0..8 {
        // C stores nearest_int's result in a uint8_t, then clamps to 63.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    put_half(&mut y[0..2], max_scale / 63.0);
    put_half(&mut y[2..4], max_min / 63.0);
    let (d, dmin) = (half(&y[0..2]), half(&y[2..4]));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &y[4..16]);
        let d = d * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    for (c, q) in y[16..144].chunks_exact_mut(32).enumerate() {
        for (l, q) in q.iter_mut().enumerate() {
            *q = levels[64 * c + l] | (levels[64 * c + l + 32] << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                let v = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                // Blocks of every magnitude, a constant block and a zero one.
                match (i / 256) % 6 {
                    0 => v,
                    1 => v * 3e-2,
                    2 => v * 3e3,
                    3 => 0.25,
                    4 => 0.0,
                    _ => v + 0.4,
                }
            })
            .collect()
    }

    #[test]
    fn quantised_values_dequantise_close_to_the_input() {
        let x = rows(6 * 512, 3);
        for (dtype, bound) in [(WeightDtype::Q8_0, 0.006), (WeightDtype::Q4_0, 0.13), (WeightDtype::Q4K, 0.1)] {
            let q = quantize(dtype, &x, 512).unwrap();
            let mut back = vec![0f32; x.len()];
            super::super::dequantize(dtype, &q, &mut back);
            for (blk, (a, b)) in x.chunks(256).zip(back.chunks(256)).enumerate() {
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
                let err = a.iter().zip(b).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
                assert!(err <= bound, "{} block {blk}: error {err} of its largest value", dtype.name());
            }
        }
    }

    /// Bytes llama.cpp's quantiser wrote (scripts/make_llama_fixtures.sh) for rows of every kind of
    /// data: normal, tiny, huge, constant, zero, one outlier, all negative, all positive, ...
    #[test]
    fn the_same_bytes_as_llama_cpp() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant");
        let x: Vec<f32> = bytemuck::pod_collect_to_vec(&std::fs::read(dir.join("input.f32")).unwrap());
        for dtype in [WeightDtype::Q8_0, WeightDtype::Q4_0, WeightDtype::Q4K] {
            let theirs = std::fs::read(dir.join(format!("{}.bin", dtype.name()))).unwrap();
            let ours = quantize(dtype, &x, 512).unwrap();
            assert_eq!(ours.len(), theirs.len(), "{}", dtype.name());
            if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
                panic!("{}: byte {i} (block {}) is {:#04x}, llama.cpp wrote {:#04x}", dtype.name(), i / dtype.block_bytes(), ours[i], theirs[i]);
            }
        }
    }

    #[test]
    fn rows_not_a_whole_number_of_blocks_are_refused() {
        let e = quantize(WeightDtype::Q4K, &[0.0; 128], 128).unwrap_err().to_string();
        assert!(e.contains("256") && e.contains("128"), "{e}");
    }
}
