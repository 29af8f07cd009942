//! Host matmul over bf16 weights with bf16 products (`--cpu-compute bf16`): the input rows are
//! rounded to bf16 and multiplied with AVX512-BF16's dot-product instruction (`vdpbf16ps`, two
//! products into each f32 lane, accumulated in f32), as torch's and llama.cpp's bf16 CPU paths
//! do. That is twice the arithmetic of a lane of f32 FMAs, without widening the weights; the price
//! is the inputs' rounding, so it is a choice, not the default (f32 compute matches transformers'
//! f32 logits within 5e-6). Each output element is summed in the same lanes and order whatever
//! tile computes it, so a row's result does not depend on the rows batched with it.

// Elsewhere than x86-64 the path is never taken (`supported` is false): its pieces go unused.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_imports, unused_mut, unused_variables))]

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::cpu::matmul::{Out, Prefetch, WeightRows};
use crate::gpu::WeightDtype;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// What the host's matmuls over bf16 weights multiply in (`--cpu-compute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuCompute {
    /// Inputs stay f32; bf16 weights are widened to f32 (exact products).
    F32,
    /// Inputs rounded to bf16, bf16 dot-product instructions (AVX512-BF16 CPUs).
    Bf16,
    /// K-format weights (Q4_K, Q5_K, Q6_K) against inputs quantised to 8 bits per 256 elements,
    /// 8-bit dot-product instructions (AVX512-VNNI, else AVX2; NEON's widening multiplies); Q8_0
    /// and Q4_0 against inputs quantised to 8 bits per 32 (`cpu::gpu_int8`); bf16 weights as with
    /// `bf16` where the CPU has AVX512-BF16, f32 otherwise.
    Int8,
}

/// Whether this CPU has the instructions of the bf16 path and the host kernels use AVX-512 (not
/// narrowed by `MOEGEN_CPU_ISA`).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::simd::Isa::detected() == crate::cpu::simd::Isa::Avx512
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sets the process's choice; `Err` says why `bf16` cannot be had on this CPU (f32 stays).
pub fn set(compute: CpuCompute) -> Result<(), String> {
    if compute == CpuCompute::Int8 {
        if !crate::cpu::int8_products::supported() {
            ENABLED.store(false, Ordering::Relaxed);
            crate::cpu::int8_products::set_enabled(false);
            return Err(format!(
                "--cpu-compute int8 needs the host kernels' avx2 path (or avx512 with AVX512-VNNI and AVX512-BW); this CPU runs the {} path, so the host's matmuls stay in f32",
                crate::cpu::simd::Isa::detected().name()
            ));
        }
        crate::cpu::int8_products::set_enabled(true);
        ENABLED.store(supported(), Ordering::Relaxed);
        return Ok(());
    }
    crate::cpu::int8_products::set_enabled(false);
    let on = compute == CpuCompute::Bf16;
    if on && !supported() {
        return Err(format!(
            "--cpu-compute bf16 needs AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids or later; AMD Zen 4 or later) and the host kernels' avx512 path; this CPU {}, so the host's matmuls stay in f32",
            why_not()
        ));
    }
    ENABLED.store(on, Ordering::Relaxed);
    Ok(())
}

/// What this CPU lacks for the bf16 path.
fn why_not() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::cpu::simd::Isa;
        if Isa::available().contains(&Isa::Avx512) && Isa::detected() != Isa::Avx512 {
            return format!("runs the {} path (MOEGEN_CPU_ISA)", Isa::detected().name());
        }
    }
    "lacks them".to_string()
}

/// Whether the host's matmuls over bf16 weights take this path.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// `v` rounded to bf16 as `vcvtne2ps2bf16` rounds it: to nearest, ties to even, subnormals to a
/// signed zero, NaN kept quiet.
pub fn round_to_bf16(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `o[i] = round_to_bf16(r[i])`, 32 at a time by the instruction itself where the CPU has it.
fn round_row(r: &[f32], o: &mut [u16]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: `supported` found AVX512-BF16; `o` holds at least `r`'s elements (asserted).
        unsafe { done = round_row_avx512(r, o) };
    }
    for (o, &v) in o[done..].iter_mut().zip(&r[done..]) {
        *o = round_to_bf16(v);
    }
}

/// The whole 32-element chunks of [`round_row`]; returns how many elements it rounded.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn round_row_avx512(r: &[f32], o: &mut [u16]) -> usize {
    use std::arch::x86_64::*;
    assert!(o.len() >= r.len(), "rounded row length");
    let body = r.len() / 32 * 32;
    for at in (0..body).step_by(32) {
        let p = r.as_ptr().add(at);
        let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p));
        _mm512_storeu_si512(o.as_mut_ptr().add(at) as *mut _, std::mem::transmute::<__m512bh, __m512i>(v));
    }
    body
}

/// Elements a dot-product step takes (one 512-bit register of bf16).
const STEP: usize = 32;
/// Input rows of a task at most, and the bytes of weight rows a task keeps in L2 while they go by.
const TASK_ROWS: usize = 128;
const WEIGHT_BLOCK_BYTES: usize = 128 << 10;

/// `y[r * y_stride + c] = bf16(x[r]) . w[w_row0 + c] + bias[c]` for `r < m`, `c < n`, as
/// [`crate::cpu::matmul::matmul`] with bf16 weights. The caller checks [`supported`].
#[allow(clippy::too_many_arguments)]
pub fn matmul(x: &[f32], m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    assert!(supported() && w.dtype == WeightDtype::Bf16, "the bf16 product path needs AVX512-BF16 and bf16 weights");
    let k = w.cols;
    assert!(x.len() >= m * k && y.len() >= (m - 1) * y_stride + n && y_stride >= n, "matmul shapes");
    assert!((w_row0 + n) * k <= w.words.len() * 2, "weight rows");
    // On AMX tiles where the CPU has them and the shape is whole tiles (decided by the weight's
    // shape alone, so every batch of rows takes the same path); they round the inputs themselves.
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::amx::fits(k, n) {
        return crate::cpu::amx::matmul(x, m, w, w_row0, n, bias, y, y_stride);
    }
    // The inputs in bf16, each row padded with zeros to whole steps (the weights' last step is
    // loaded under a mask, so the padding meets zeros).
    let kp = k.div_ceil(STEP) * STEP;
    let mut xb = vec![0u16; m * kp];
    xb.par_chunks_mut(kp).zip(x[..m * k].par_chunks(k)).for_each(|(o, r)| round_row(r, o));
    let block = ((WEIGHT_BLOCK_BYTES / (2 * k).max(1)) / 4 * 4).clamp(4, 64);
    let (row_tasks, col_tasks) = (m.div_ceil(TASK_ROWS), n.div_ceil(block));
    let out = Out(y.as_mut_ptr());
    (0..row_tasks * col_tasks).into_par_iter().for_each(|t| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        let (r0, c0) = ((t / col_tasks) * TASK_ROWS, (t % col_tasks) * block);
        let (r1, c1) = ((r0 + TASK_ROWS).min(m), (c0 + block).min(n));
        for r in (r0..r1).step_by(4) {
            let mr = 4.min(r1 - r);
            // One input row: eight weight rows at a time, so that eight sums hide the
            // instruction's latency (each sum is computed the same way whatever the tile).
            let wide = if mr == 1 { 8 } else { 4 };
            for c in (c0..c1).step_by(wide) {
                let nr = wide.min(c1 - c);
                // The first rows' pass also fetches the next weight rows (the next block's at the
                // end), so that memory is read while it computes (later passes find them cached).
                let next = c + nr;
                let ahead = if r == r0 && next < n { Prefetch { row: w_row0 + next, rows: wide.min(n - next) } } else { Prefetch::NONE };
                let mut tile = [[0f32; 8]; 4];
                // SAFETY: `supported` was checked; the rows r..r + mr of `xb` and the weight rows
                // w_row0 + c..+ nr lie inside their slices (checked above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512bf16::tile(&xb[r * kp..(r + mr) * kp], kp, mr, w, w_row0 + c, nr, ahead, &mut tile)
                };
                for (i, row) in tile.iter().enumerate().take(mr) {
                    for (j, &v) in row.iter().enumerate().take(nr) {
                        // SAFETY: each task writes only its own rows r0..r1 and columns c0..c1.
                        unsafe { *out.0.add((r + i) * y_stride + c + j) = v + bias.map_or(0.0, |b| b[c + j]) };
                    }
                }
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::x86_64::*;

    use super::{Prefetch, WeightRows, STEP};

    /// `out[i][j] = xb[i] . w[w_row + j]` for `i < mr <= 4` input rows (bf16, `kp` apart, zero
    /// padded) and `j < nr <= 8` weight rows (`mr * nr <= 16`), prefetching the `ahead` weight
    /// rows as it goes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(xb: &[u16], kp: usize, mr: usize, w: WeightRows, w_row: usize, nr: usize, ahead: Prefetch, out: &mut [[f32; 8]; 4]) {
        macro_rules! pick {
            ($(($m:literal, $n:literal)),*) => {
                match (mr, nr) {
                    $(($m, $n) => fixed::<$m, $n>(xb, kp, w, w_row, ahead, out),)*
                    _ => unreachable!("a {mr} x {nr} tile"),
                }
            };
        }
        pick!((1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 1), (2, 2), (2, 3), (2, 4), (3, 1), (3, 2), (3, 3), (3, 4), (4, 1), (4, 2), (4, 3), (4, 4))
    }

    /// The tile at a size known when compiled, so that its `MR x NR` 16-lane accumulators stay in
    /// registers; the weights' last step is loaded under a mask.
    // `j` picks the weight row as well as the accumulator.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn fixed<const MR: usize, const NR: usize>(xb: &[u16], kp: usize, w: WeightRows, w_row: usize, ahead: Prefetch, out: &mut [[f32; 8]; 4]) {
        let k = w.cols;
        let wp = w.words.as_ptr() as *const u16;
        let xp = xb.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut at = 0;
        while at < k {
            let left = k - at;
            let mask: __mmask32 = if left >= STEP { !0 } else { (1u32 << left) - 1 };
            let mut xs = [_mm512_setzero_si512(); MR];
            for (i, v) in xs.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(xp.add(i * kp + at) as *const __m512i);
            }
            for j in 0..NR {
                let wv: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(mask, wp.add((w_row + j) * k + at) as *const i16));
                for i in 0..MR {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], std::mem::transmute::<__m512i, __m512bh>(xs[i]), wv);
                }
            }
            // A hint: it never faults, and the rows lie inside the weight (checked by the caller).
            for j in 0..ahead.rows {
                _mm_prefetch::<_MM_HINT_T1>(wp.add((ahead.row + j) * k + at) as *const i8);
            }
            at += STEP;
        }
        for i in 0..MR {
            for j in 0..NR {
                out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::reference;

    #[test]
    fn rounding_matches_the_instruction() {
        for (v, want) in [(1.0f32, 0x3f80u16), (f32::from_bits(0x3f80_8000), 0x3f80), (f32::from_bits(0x3f81_8000), 0x3f82), (f32::from_bits(1), 0), (-f32::from_bits(0x7f_ffff), 0x8000), (f32::MAX, 0x7f80), (f32::INFINITY, 0x7f80)] {
            assert_eq!(round_to_bf16(v), want, "{v:e}");
        }
        assert!(f32::from_bits((round_to_bf16(f32::NAN) as u32) << 16).is_nan());
    }

    /// The vector rounding gives `round_to_bf16`'s bits on every kind of value (ties both
    /// ways, subnormals, infinities, NaNs), over a length that leaves a scalar tail.
    #[test]
    fn rows_round_as_the_scalar_rounding() {
        let specials = [0x3f80_8000u32, 0x3f81_8000, 0x3f80_7fff, 0x0000_0001, 0x8070_0000, 0x7f80_0000, 0xff80_0000, 0x7fc0_0001, 0xffa0_0000, 0x7f7f_ffff, 0x0080_0000, 0x0000_0000, 0x8000_0000];
        let mut seed = 5u64;
        let r: Vec<f32> = (0..203)
            .map(|i| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                f32::from_bits(if i % 3 == 0 { specials[i / 3 % specials.len()] } else { (seed >> 32) as u32 })
            })
            .collect();
        let mut o = vec![0xdeadu16; r.len()];
        round_row(&r, &mut o);
        for (i, (&v, &got)) in r.iter().zip(&o).enumerate() {
            assert_eq!(got, round_to_bf16(v), "element {i}: {:#010x}", v.to_bits());
        }
    }

    /// Against the reference on the inputs rounded to bf16, at awkward shapes (rows and weight
    /// rows not multiples of the tile, lengths not multiples of a step), the output poisoned and
    /// written at a stride; and a row's result is the same bits alone as among others.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn matches_the_reference_on_rounded_inputs() {
        if !supported() {
            eprintln!("no AVX512-BF16 on this CPU: the bf16 product path cannot be picked here");
            return;
        }
        let mut seed = 11u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        // The last ones are whole AMX tiles (k of whole steps, weight rows in pairs of tiles):
        // those take AMX where this CPU has it, with an unpaired last input group (17, 33, 130,
        // 300 rows) and with the weight rows copied into tile order (130 and 300 rows: over 8 groups).
        for (m, n, k) in [(1, 1, 1), (3, 17, 33), (7, 5, 31), (16, 9, 64), (37, 70, 129), (130, 21, 40), (257, 67, 96), (5, 130, 1000), (1, 32, 64), (17, 64, 96), (33, 96, 256), (130, 32, 1024), (300, 64, 96)] {
            let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let wv: Vec<f32> = (0..(n + 3) * k).map(|_| rand()).collect();
            let bytes = crate::gpu::encode_weights(&wv, WeightDtype::Bf16);
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
            let rounded = crate::gpu::round_weights(&wv, WeightDtype::Bf16);
            let xr: Vec<f32> = x.iter().map(|&v| f32::from_bits((round_to_bf16(v) as u32) << 16)).collect();
            let bias: Vec<f32> = (0..n).map(|_| rand()).collect();
            let stride = n + 5;
            let mut y = vec![f32::NAN; m * stride + 2];
            let w = WeightRows { words: &words, dtype: WeightDtype::Bf16, cols: k };
            matmul(&x, m, w, 3, n, Some(&bias), &mut y[2..], stride);
            let want = reference(&xr, &rounded[3 * k..], Some(&bias), m, n, k);
            let got: Vec<f32> = (0..m).flat_map(|r| y[2 + r * stride..2 + r * stride + n].to_vec()).collect();
            let e = crate::cpu::matmul::tests::nmse(&got, &want);
            assert!(e < 1e-10, "{m}x{n}x{k}: nmse {e:e}");
            assert!(y[..2].iter().all(|v| v.is_nan()), "wrote before the output");
            let last = m - 1;
            let mut alone = vec![f32::NAN; n];
            matmul(&x[last * k..], 1, w, 3, n, Some(&bias), &mut alone, n);
            assert_eq!(alone, got[last * n..], "{m}x{n}x{k}: the last row alone");
        }
    }
}
