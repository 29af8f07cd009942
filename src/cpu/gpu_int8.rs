//! The GPU's int8 products (`--gpu-compute int8`, `kernels::matmul_int8`) on the host, bit for
//! bit: the host experts beside such a GPU compute what its slots would, so that `--cpu-experts
//! always` and `never` write the same files. Inputs are quantised by the GPU's quantiser (exact
//! on every device), each output adds its sub-blocks in order with the kernels' operations
//! (`sub_product`), and the integer sums, exact whatever their order, run 16 output columns to a
//! register: a block of weight rows is decoded once into pairs of 16-bit values, column-major
//! within the register, and each input row's pair of values is broadcast against them
//! (`vpmaddwd` on AVX-512 and AVX2; plain code the compiler vectorises elsewhere).

use rayon::prelude::*;

use crate::cpu::matmul::WeightRows;
use crate::cpu::simd::Isa;
use crate::kernels::matmul_int8::{quantize_unit, sub_blocks_into, SUB};

/// Output columns a register holds, and so a task's block of weight rows.
const LANES: usize = 16;
/// Pairs of values in a sub-block.
const PAIRS: usize = SUB / 2;

/// Input rows quantised as the GPU quantises them: per unit of 32 its `[scale, sum]`, and its
/// values as pairs of 16-bit integers (the broadcast operand).
pub struct Quantised {
    pairs: Vec<u32>,
    scales: Vec<[f32; 2]>,
    m: usize,
    k: usize,
}

fn pair(a: i8, b: i8) -> u32 {
    (a as i16 as u16 as u32) | ((b as i16 as u16 as u32) << 16)
}

/// Quantises `m` rows of `x` (each `k` wide, a multiple of 32), in parallel by rows.
pub fn quantise(x: &[f32], m: usize, k: usize) -> Quantised {
    assert!(k.is_multiple_of(SUB) && x.len() >= m * k, "int8 quantise shapes");
    let mut pairs = vec![0u32; m * k / 2];
    let mut scales = vec![[0f32; 2]; m * k / SUB];
    pairs.par_chunks_mut(PAIRS).zip(scales.par_iter_mut()).zip(x[..m * k].par_chunks(SUB)).for_each(|((p, s), unit)| {
        let mut q = [0i8; SUB];
        *s = quantize_unit(unit, &mut q);
        for (i, o) in p.iter_mut().enumerate() {
            *o = pair(q[2 * i], q[2 * i + 1]);
        }
    });
    Quantised { pairs, scales, m, k }
}

/// A block of up to 16 weight rows decoded for the kernel: per sub-block, its 16 pairs for each
/// lane (`pairs[(s * 16 + p) * 16 + lane]`), and its affine map per lane (`maps[3 * s + i]`).
struct Block {
    pairs: Vec<u32>,
    maps: Vec<[f32; LANES]>,
}

fn decode(w: WeightRows, c0: usize, nb: usize) -> Block {
    let (k, rb, bb, be) = (w.cols, w.dtype.row_bytes(w.cols), w.dtype.block_bytes(), w.dtype.block_elems());
    let (subs, bs) = (k / SUB, be / SUB);
    let bytes = bytemuck::cast_slice::<u32, u8>(w.words);
    let mut block = Block { pairs: vec![0; subs * PAIRS * LANES], maps: vec![[0.0; LANES]; 3 * subs] };
    let (mut q, mut a) = (vec![0i8; be], vec![[0f32; 3]; bs]);
    // A block of every column at a time, so that the columns' pairs are written to a few
    // kilobytes that stay in L1.
    for blk in 0..k / be {
        for j in 0..nb {
            let at = (c0 + j) * rb + blk * bb;
            sub_blocks_into(w.dtype, &bytes[at..at + bb], &mut q, &mut a);
            for t in 0..bs {
                let s = blk * bs + t;
                let out = &mut block.pairs[s * PAIRS * LANES..(s + 1) * PAIRS * LANES];
                for p in 0..PAIRS {
                    out[p * LANES + j] = pair(q[t * SUB + 2 * p], q[t * SUB + 2 * p + 1]);
                }
                for i in 0..3 {
                    block.maps[3 * s + i][j] = a[t][i];
                }
            }
        }
    }
    block
}

/// One input row against a decoded block: each lane's output, the sub-blocks added in order as
/// the GPU adds them, `acc + x_scale * ((a0 * lo + a1 * hi) + a2 * x_sum)`, every operation
/// rounded on its own.
fn row_portable(b: &Block, xp: &[u32], xs: &[[f32; 2]]) -> [f32; LANES] {
    let mut acc = [0f32; LANES];
    for (s, x) in xs.iter().enumerate() {
        let mut sums = [[0i32; LANES]; 2];
        for p in 0..PAIRS {
            let v = xp[s * PAIRS + p];
            let (x0, x1) = (v as u16 as i16 as i32, (v >> 16) as u16 as i16 as i32);
            let w = &b.pairs[(s * PAIRS + p) * LANES..][..LANES];
            let t = &mut sums[p / 8];
            for j in 0..LANES {
                t[j] += (w[j] as u16 as i16 as i32) * x0 + ((w[j] >> 16) as u16 as i16 as i32) * x1;
            }
        }
        let [a0, a1, a2] = [&b.maps[3 * s], &b.maps[3 * s + 1], &b.maps[3 * s + 2]];
        for j in 0..LANES {
            let v = (a0[j] * sums[0][j] as f32 + a1[j] * sums[1][j] as f32) + a2[j] * x[1];
            acc[j] += x[0] * v;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Block, LANES, PAIRS};
    use std::arch::x86_64::*;

    /// [`super::row_portable`] with 16 lanes in one register.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn row_avx512(b: &Block, xp: &[u32], xs: &[[f32; 2]]) -> [f32; LANES] {
        let mut acc = _mm512_setzero_ps();
        for (s, x) in xs.iter().enumerate() {
            let mut sums = [_mm512_setzero_si512(); 2];
            for p in 0..PAIRS {
                let w = _mm512_loadu_si512(b.pairs.as_ptr().add((s * PAIRS + p) * LANES) as *const _);
                let xv = _mm512_set1_epi32(xp[s * PAIRS + p] as i32);
                sums[p / 8] = _mm512_add_epi32(sums[p / 8], _mm512_madd_epi16(w, xv));
            }
            let map = |i: usize| _mm512_loadu_ps(b.maps[3 * s + i].as_ptr());
            let lo = _mm512_mul_ps(map(0), _mm512_cvtepi32_ps(sums[0]));
            let hi = _mm512_mul_ps(map(1), _mm512_cvtepi32_ps(sums[1]));
            let v = _mm512_add_ps(_mm512_add_ps(lo, hi), _mm512_mul_ps(map(2), _mm512_set1_ps(x[1])));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(x[0]), v));
        }
        let mut out = [0f32; LANES];
        _mm512_storeu_ps(out.as_mut_ptr(), acc);
        out
    }

    /// [`super::row_portable`] with 16 lanes in two registers.
    #[target_feature(enable = "avx2")]
    pub unsafe fn row_avx2(b: &Block, xp: &[u32], xs: &[[f32; 2]]) -> [f32; LANES] {
        let mut acc = [_mm256_setzero_ps(); 2];
        for (s, x) in xs.iter().enumerate() {
            let mut sums = [[_mm256_setzero_si256(); 2]; 2];
            for p in 0..PAIRS {
                let xv = _mm256_set1_epi32(xp[s * PAIRS + p] as i32);
                for (h, sum) in sums[p / 8].iter_mut().enumerate() {
                    let w = _mm256_loadu_si256(b.pairs.as_ptr().add((s * PAIRS + p) * LANES + 8 * h) as *const _);
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(w, xv));
                }
            }
            for (h, acc) in acc.iter_mut().enumerate() {
                let map = |i: usize| _mm256_loadu_ps(b.maps[3 * s + i].as_ptr().add(8 * h));
                let lo = _mm256_mul_ps(map(0), _mm256_cvtepi32_ps(sums[0][h]));
                let hi = _mm256_mul_ps(map(1), _mm256_cvtepi32_ps(sums[1][h]));
                let v = _mm256_add_ps(_mm256_add_ps(lo, hi), _mm256_mul_ps(map(2), _mm256_set1_ps(x[1])));
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(_mm256_set1_ps(x[0]), v));
            }
        }
        let mut out = [0f32; LANES];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        out
    }
}

fn row(isa: Isa, b: &Block, xp: &[u32], xs: &[[f32; 2]]) -> [f32; LANES] {
    match isa {
        // SAFETY: a path is only chosen where detection found its instructions (AVX512-BW
        // with AVX512F, as Isa::Avx512 requires).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if is_x86_feature_detected!("avx512bw") => unsafe { x86::row_avx512(b, xp, xs) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::row_avx2(b, xp, xs) },
        _ => row_portable(b, xp, xs),
    }
}

/// `y[r * n + c] = xq[r] . w[c]` for the quantised rows and the first `n` rows of block-format
/// weights `w`: the GPU int8 matmul's bits. In parallel over blocks of 16 weight rows.
pub fn matmul(isa: Isa, x: &Quantised, w: WeightRows, n: usize, y: &mut [f32]) {
    let (m, k) = (x.m, x.k);
    assert!(w.cols == k && y.len() >= m * n, "int8 matmul shapes");
    assert!(n * w.dtype.row_bytes(k) <= w.words.len() * 4, "int8 matmul weight rows");
    let subs = k / SUB;
    let blocks: Vec<Vec<[f32; LANES]>> = (0..n.div_ceil(LANES))
        .into_par_iter()
        .map(|blk| {
            let c0 = blk * LANES;
            let decoded = decode(w, c0, LANES.min(n - c0));
            (0..m).map(|r| row(isa, &decoded, &x.pairs[r * k / 2..(r + 1) * k / 2], &x.scales[r * subs..(r + 1) * subs])).collect()
        })
        .collect();
    for (blk, outs) in blocks.iter().enumerate() {
        let c0 = blk * LANES;
        let nb = LANES.min(n - c0);
        for (r, out) in outs.iter().enumerate() {
            y[r * n + c0..r * n + c0 + nb].copy_from_slice(&out[..nb]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::WeightDtype;
    use crate::kernels::matmul_int8::{model, quantize_reference, sub_blocks};

    /// Every format on every path this CPU has, awkward sizes (columns not a whole register,
    /// three blocks a row), extreme scales: exactly the kernels' model's bits.
    #[test]
    fn gives_the_gpu_models_bits_on_every_path() {
        let mut state = 5u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for dtype in WeightDtype::QUANTISED {
            for extremes in [false, true] {
                let (n, k) = (37, 3 * dtype.block_elems());
                let bytes = crate::quant::random_blocks(dtype, n * k / dtype.block_elems(), 9, extremes);
                let words: Vec<u32> = {
                    let mut v = vec![0u32; bytes.len().div_ceil(4)];
                    bytemuck::cast_slice_mut::<u32, u8>(&mut v)[..bytes.len()].copy_from_slice(&bytes);
                    v
                };
                let (wq, wa) = sub_blocks(dtype, &bytes);
                for m in [1, 3, 5] {
                    let x: Vec<f32> = (0..m * k).map(|_| next() * 3.0).collect();
                    let (q, s) = quantize_reference(&x);
                    let want = model(&q, &s, &wq, &wa, None, m, n, k);
                    let xq = quantise(&x, m, k);
                    for isa in Isa::available() {
                        let mut y = vec![f32::NAN; m * n];
                        matmul(isa, &xq, WeightRows { words: &words, dtype, cols: k }, n, &mut y);
                        for i in 0..m * n {
                            assert_eq!(y[i].to_bits(), want[i].to_bits(), "{dtype:?} extremes={extremes} m={m} {}: output {i} is {} not {}", isa.name(), y[i], want[i]);
                        }
                    }
                }
            }
        }
    }
}
