//! The GPU's int8 products (`--gpu-compute int8`, `kernels::matmul_int8`) on the host, bit for
//! bit: the host experts beside such a GPU compute what its slots would, so that `--cpu-experts
//! always` and `never` write the same files. Inputs are quantised by the GPU's quantiser (exact
//! on every device), each output adds its sub-blocks in order with the kernels' operations
//! (`sub_product`), and the integer sums, exact whatever their order, run 16 output columns to a
//! register: a block of 16 weight rows is decoded once (each row's quants by vectorised loops,
//! then transposed in registers) into pairs of 16-bit values, column-major within the register,
//! and each input row's pair of values is broadcast against them (`vpmaddwd` on AVX-512 and
//! AVX2, `vmlal_s16` on NEON, several input rows to a pass; plain code the compiler vectorises
//! elsewhere).

use rayon::prelude::*;

use crate::cpu::int8_products::Job;
use crate::cpu::matmul::{Out, WeightRows};
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
#[derive(Default)]
struct Block {
    pairs: Vec<u32>,
    maps: Vec<[f32; LANES]>,
}

/// A task's buffers, kept between the blocks it decodes.
#[derive(Default)]
struct Scratch {
    q: Vec<i8>,
    a: Vec<[f32; 3]>,
    block: Block,
}

fn decode(isa: Isa, w: WeightRows, c0: usize, nb: usize, scratch: &mut Scratch) {
    let (k, rb) = (w.cols, w.dtype.row_bytes(w.cols));
    let subs = k / SUB;
    let bytes = bytemuck::cast_slice::<u32, u8>(w.words);
    // Each column's quants in a row of their own (the rows past `nb` zero), then turned into
    // the register layout by a transpose in registers: a few tens of kilobytes, in L2.
    let Scratch { q, a, block } = scratch;
    q.resize(LANES * k, 0);
    a.resize(LANES * subs, [0.0; 3]);
    q[nb * k..].fill(0);
    a[nb * subs..].fill([0.0; 3]);
    let rows = &bytes[c0 * rb..(c0 + nb) * rb];
    match isa {
        // SAFETY: as in `rows`, a path is only taken where detection found its instructions.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::quants_avx2(w.dtype, rows, rb, &mut q[..nb * k], &mut a[..nb * subs]) },
        _ => quants(w.dtype, rows, rb, &mut q[..nb * k], &mut a[..nb * subs]),
    }
    block.pairs.resize(subs * PAIRS * LANES, 0);
    block.maps.resize(3 * subs, [0.0; LANES]);
    for s in 0..subs {
        for j in 0..LANES {
            for (i, &v) in a[j * subs + s].iter().enumerate() {
                block.maps[3 * s + i][j] = v;
            }
        }
    }
    match isa {
        // SAFETY: as above; the buffers have the sizes the transposes assert.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if is_x86_feature_detected!("avx512bw") => unsafe { x86::transpose_avx512(q, k, &mut block.pairs) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::transpose_avx2(q, k, &mut block.pairs) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe { neon::transpose(q, k, &mut block.pairs) },
        _ => transpose_portable(q, k, &mut block.pairs),
    }
}

/// Each weight row of `rows` (`rb` bytes apart) decoded into its quants and affine maps.
#[inline(always)]
fn quants(dtype: crate::gpu::WeightDtype, rows: &[u8], rb: usize, q: &mut [i8], a: &mut [[f32; 3]]) {
    let (per_q, per_a) = (q.len() / (rows.len() / rb), a.len() / (rows.len() / rb));
    for ((row, q), a) in rows.chunks_exact(rb).zip(q.chunks_exact_mut(per_q)).zip(a.chunks_exact_mut(per_a)) {
        sub_blocks_into(dtype, row, q, a);
    }
}

/// Sixteen rows of quants (`q[j * k..]`, one per output column) into the register layout:
/// `pairs[(s * 16 + p) * 16 + j]` holds values `2p` and `2p + 1` of sub-block `s` of row `j`.
fn transpose_portable(q: &[i8], k: usize, pairs: &mut [u32]) {
    for s in 0..k / SUB {
        for p in 0..PAIRS {
            for j in 0..LANES {
                let at = j * k + s * SUB + 2 * p;
                pairs[(s * PAIRS + p) * LANES + j] = pair(q[at], q[at + 1]);
            }
        }
    }
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
    use super::{Block, Quantised, LANES, PAIRS, SUB};
    use std::arch::x86_64::*;

    /// [`super::quants`] compiled with 256-bit vectors.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quants_avx2(dtype: crate::gpu::WeightDtype, rows: &[u8], rb: usize, q: &mut [i8], a: &mut [[f32; 3]]) {
        super::quants(dtype, rows, rb, q, a)
    }

    /// [`super::transpose_portable`]: per sub-block, each row's 32 values widened to 16 pairs in
    /// a register, and the 16 x 16 pairs transposed (32-bit, then 64-bit interleaves within
    /// 128-bit lanes, then the lanes themselves).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn transpose_avx512(q: &[i8], k: usize, pairs: &mut [u32]) {
        assert!(q.len() >= LANES * k && pairs.len() >= k / 2 * LANES);
        for s in 0..k / SUB {
            let mut r = [_mm512_setzero_si512(); 16];
            for (j, r) in r.iter_mut().enumerate() {
                *r = _mm512_cvtepi8_epi16(_mm256_loadu_si256(q.as_ptr().add(j * k + s * SUB) as *const __m256i));
            }
            // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved by pairs.
            let mut t = [_mm512_setzero_si512(); 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
            }
            // u[4g + c], lane L: pair 4L + c of rows 4g..4g + 4.
            let mut u = [_mm512_setzero_si512(); 16];
            for g in (0..16).step_by(4) {
                u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
                u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
                u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
                u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
            }
            let out = pairs.as_mut_ptr().add(s * PAIRS * LANES) as *mut __m512i;
            for c in 0..4 {
                let (v0, v1) = (_mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]), _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]));
                let (v2, v3) = (_mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]), _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]));
                _mm512_storeu_si512(out.add(c), _mm512_shuffle_i32x4::<0x88>(v0, v2));
                _mm512_storeu_si512(out.add(4 + c), _mm512_shuffle_i32x4::<0xDD>(v0, v2));
                _mm512_storeu_si512(out.add(8 + c), _mm512_shuffle_i32x4::<0x88>(v1, v3));
                _mm512_storeu_si512(out.add(12 + c), _mm512_shuffle_i32x4::<0xDD>(v1, v3));
            }
        }
    }

    /// [`super::transpose_portable`] in 8 x 8 squares of pairs: rows `8h..8h + 8` against pairs
    /// `8ph..8ph + 8` of each sub-block.
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose_avx2(q: &[i8], k: usize, pairs: &mut [u32]) {
        assert!(q.len() >= LANES * k && pairs.len() >= k / 2 * LANES);
        for s in 0..k / SUB {
            for h in 0..2 {
                for ph in 0..2 {
                    let mut r = [_mm256_setzero_si256(); 8];
                    for (j, r) in r.iter_mut().enumerate() {
                        *r = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add((8 * h + j) * k + s * SUB + 16 * ph) as *const __m128i));
                    }
                    let mut t = [_mm256_setzero_si256(); 8];
                    for i in 0..4 {
                        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
                    }
                    let mut u = [_mm256_setzero_si256(); 8];
                    for g in [0, 4] {
                        u[g] = _mm256_unpacklo_epi64(t[g], t[g + 2]);
                        u[g + 1] = _mm256_unpackhi_epi64(t[g], t[g + 2]);
                        u[g + 2] = _mm256_unpacklo_epi64(t[g + 1], t[g + 3]);
                        u[g + 3] = _mm256_unpackhi_epi64(t[g + 1], t[g + 3]);
                    }
                    let out = pairs.as_mut_ptr().add((s * PAIRS + 8 * ph) * LANES + 8 * h);
                    for c in 0..4 {
                        _mm256_storeu_si256(out.add(c * LANES) as *mut __m256i, _mm256_permute2x128_si256::<0x20>(u[c], u[4 + c]));
                        _mm256_storeu_si256(out.add((4 + c) * LANES) as *mut __m256i, _mm256_permute2x128_si256::<0x31>(u[c], u[4 + c]));
                    }
                }
            }
        }
    }

    /// [`super::row_portable`] for `R` input rows at once (each weight register loaded once
    /// for all of them), 16 lanes in one register.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn rows_avx512<const R: usize>(b: &Block, x: &Quantised, r0: usize) -> [[f32; LANES]; R] {
        let subs = x.k / SUB;
        let (xp, xs) = (x.pairs.as_ptr().add(r0 * x.k / 2), &x.scales[r0 * subs..(r0 + R) * subs]);
        let mut acc = [_mm512_setzero_ps(); R];
        for s in 0..subs {
            // Each half's sums in registers of their own (an index computed in the loop would
            // put them in memory).
            let half = |first: usize| {
                let mut sums = [_mm512_setzero_si512(); R];
                for p in first..first + PAIRS / 2 {
                    let w = _mm512_loadu_si512(b.pairs.as_ptr().add((s * PAIRS + p) * LANES) as *const _);
                    for (r, sum) in sums.iter_mut().enumerate() {
                        let xv = _mm512_set1_epi32(*xp.add(r * x.k / 2 + s * PAIRS + p) as i32);
                        *sum = _mm512_add_epi32(*sum, _mm512_madd_epi16(w, xv));
                    }
                }
                sums
            };
            let (lo, hi) = (half(0), half(PAIRS / 2));
            let map = |i: usize| _mm512_loadu_ps(b.maps[3 * s + i].as_ptr());
            let (a0, a1, a2) = (map(0), map(1), map(2));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xr = xs[r * subs + s];
                let l = _mm512_mul_ps(a0, _mm512_cvtepi32_ps(lo[r]));
                let u = _mm512_mul_ps(a1, _mm512_cvtepi32_ps(hi[r]));
                let v = _mm512_add_ps(_mm512_add_ps(l, u), _mm512_mul_ps(a2, _mm512_set1_ps(xr[1])));
                *acc = _mm512_add_ps(*acc, _mm512_mul_ps(_mm512_set1_ps(xr[0]), v));
            }
        }
        let mut out = [[0f32; LANES]; R];
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), acc);
        }
        out
    }

    /// [`super::row_portable`] for `R` input rows at once, 16 lanes in two registers.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rows_avx2<const R: usize>(b: &Block, x: &Quantised, r0: usize) -> [[f32; LANES]; R] {
        let subs = x.k / SUB;
        let (xp, xs) = (x.pairs.as_ptr().add(r0 * x.k / 2), &x.scales[r0 * subs..(r0 + R) * subs]);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for s in 0..subs {
            let half = |first: usize| {
                let mut sums = [[_mm256_setzero_si256(); 2]; R];
                for p in first..first + PAIRS / 2 {
                    let w = b.pairs.as_ptr().add((s * PAIRS + p) * LANES);
                    let (w0, w1) = (_mm256_loadu_si256(w as *const _), _mm256_loadu_si256(w.add(8) as *const _));
                    for (r, sum) in sums.iter_mut().enumerate() {
                        let xv = _mm256_set1_epi32(*xp.add(r * x.k / 2 + s * PAIRS + p) as i32);
                        sum[0] = _mm256_add_epi32(sum[0], _mm256_madd_epi16(w0, xv));
                        sum[1] = _mm256_add_epi32(sum[1], _mm256_madd_epi16(w1, xv));
                    }
                }
                sums
            };
            let (lo, hi) = (half(0), half(PAIRS / 2));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xr = xs[r * subs + s];
                for (h, acc) in acc.iter_mut().enumerate() {
                    let map = |i: usize| _mm256_loadu_ps(b.maps[3 * s + i].as_ptr().add(8 * h));
                    let l = _mm256_mul_ps(map(0), _mm256_cvtepi32_ps(lo[r][h]));
                    let u = _mm256_mul_ps(map(1), _mm256_cvtepi32_ps(hi[r][h]));
                    let v = _mm256_add_ps(_mm256_add_ps(l, u), _mm256_mul_ps(map(2), _mm256_set1_ps(xr[1])));
                    *acc = _mm256_add_ps(*acc, _mm256_mul_ps(_mm256_set1_ps(xr[0]), v));
                }
            }
        }
        let mut out = [[0f32; LANES]; R];
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm256_storeu_ps(o.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(8), acc[1]);
        }
        out
    }
}

#[cfg(target_arch = "aarch64")]
mod neon {
    use super::{Block, Quantised, LANES, PAIRS, SUB};
    use std::arch::aarch64::*;

    /// [`super::transpose_portable`] in 4 x 4 squares of pairs: each row's 32 values widened to
    /// 16 pairs in four registers, four rows' registers transposed by 32- and 64-bit interleaves.
    #[target_feature(enable = "neon")]
    pub unsafe fn transpose(q: &[i8], k: usize, pairs: &mut [u32]) {
        assert!(q.len() >= LANES * k && pairs.len() >= k / 2 * LANES);
        for s in 0..k / SUB {
            for g in 0..LANES / 4 {
                // r[j][c]: pairs 4c..4c + 4 of row 4g + j.
                let mut r = [[vdupq_n_u32(0); 4]; 4];
                for (j, r) in r.iter_mut().enumerate() {
                    let at = q.as_ptr().add((4 * g + j) * k + s * SUB);
                    let (lo, hi) = (vld1q_s8(at), vld1q_s8(at.add(16)));
                    *r = [
                        vreinterpretq_u32_s16(vmovl_s8(vget_low_s8(lo))),
                        vreinterpretq_u32_s16(vmovl_high_s8(lo)),
                        vreinterpretq_u32_s16(vmovl_s8(vget_low_s8(hi))),
                        vreinterpretq_u32_s16(vmovl_high_s8(hi)),
                    ];
                }
                for (c, [r0, r1, r2, r3]) in (0..4).map(|c| [r[0][c], r[1][c], r[2][c], r[3][c]]).enumerate() {
                    let (t0, t1) = (vtrn1q_u32(r0, r1), vtrn2q_u32(r0, r1));
                    let (t2, t3) = (vtrn1q_u32(r2, r3), vtrn2q_u32(r2, r3));
                    let (t0, t1, t2, t3) = (vreinterpretq_u64_u32(t0), vreinterpretq_u64_u32(t1), vreinterpretq_u64_u32(t2), vreinterpretq_u64_u32(t3));
                    let out = pairs.as_mut_ptr().add((s * PAIRS + 4 * c) * LANES + 4 * g);
                    vst1q_u32(out, vreinterpretq_u32_u64(vtrn1q_u64(t0, t2)));
                    vst1q_u32(out.add(LANES), vreinterpretq_u32_u64(vtrn1q_u64(t1, t3)));
                    vst1q_u32(out.add(2 * LANES), vreinterpretq_u32_u64(vtrn2q_u64(t0, t2)));
                    vst1q_u32(out.add(3 * LANES), vreinterpretq_u32_u64(vtrn2q_u64(t1, t3)));
                }
            }
        }
    }

    /// [`super::row_portable`] for `R` input rows at once, 16 lanes in four registers. Each
    /// lane's two products per pair accumulate apart (`vmlal_s16`) and are added at the end of
    /// each half: the same exact integers as `vpmaddwd`'s pair sums.
    #[target_feature(enable = "neon")]
    pub unsafe fn rows<const R: usize>(b: &Block, x: &Quantised, r0: usize) -> [[f32; LANES]; R] {
        let subs = x.k / SUB;
        let (xp, xs) = (x.pairs.as_ptr().add(r0 * x.k / 2), &x.scales[r0 * subs..(r0 + R) * subs]);
        let mut acc = [[vdupq_n_f32(0.0); 4]; R];
        for s in 0..subs {
            let half = |first: usize| {
                // sums[r][q]: products of lanes 2q and 2q + 1 (eight to a register pair).
                let mut sums = [[vdupq_n_s32(0); 8]; R];
                for p in first..first + PAIRS / 2 {
                    let w = b.pairs.as_ptr().add((s * PAIRS + p) * LANES);
                    let wv: [int16x8_t; 4] = std::array::from_fn(|i| vreinterpretq_s16_u32(vld1q_u32(w.add(4 * i))));
                    for (r, sum) in sums.iter_mut().enumerate() {
                        let xv = vreinterpretq_s16_u32(vdupq_n_u32(*xp.add(r * x.k / 2 + s * PAIRS + p)));
                        for i in 0..4 {
                            sum[2 * i] = vmlal_s16(sum[2 * i], vget_low_s16(wv[i]), vget_low_s16(xv));
                            sum[2 * i + 1] = vmlal_high_s16(sum[2 * i + 1], wv[i], xv);
                        }
                    }
                }
                let mut out = [[vdupq_n_s32(0); 4]; R];
                for (o, sum) in out.iter_mut().zip(sums) {
                    for i in 0..4 {
                        o[i] = vpaddq_s32(sum[2 * i], sum[2 * i + 1]);
                    }
                }
                out
            };
            let (lo, hi) = (half(0), half(PAIRS / 2));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xr = xs[r * subs + s];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let map = |m: usize| vld1q_f32(b.maps[3 * s + m].as_ptr().add(4 * i));
                    let l = vmulq_f32(map(0), vcvtq_f32_s32(lo[r][i]));
                    let u = vmulq_f32(map(1), vcvtq_f32_s32(hi[r][i]));
                    let v = vaddq_f32(vaddq_f32(l, u), vmulq_f32(map(2), vdupq_n_f32(xr[1])));
                    *acc = vaddq_f32(*acc, vmulq_f32(vdupq_n_f32(xr[0]), v));
                }
            }
        }
        let mut out = [[0f32; LANES]; R];
        for (o, acc) in out.iter_mut().zip(acc) {
            for (i, a) in acc.into_iter().enumerate() {
                vst1q_f32(o.as_mut_ptr().add(4 * i), a);
            }
        }
        out
    }
}

/// Every input row of `x` against a decoded block: each row's 16 outputs. Several rows to a
/// pass where the registers allow; each output adds the same operations in the same order
/// whichever pass computes it.
fn rows(isa: Isa, b: &Block, x: &Quantised) -> Vec<[f32; LANES]> {
    let mut out = Vec::with_capacity(x.m);
    match isa {
        // SAFETY: a path is only chosen where detection found its instructions (AVX512-BW with
        // AVX512F, as Isa::Avx512 requires); each pass reads rows that exist.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if is_x86_feature_detected!("avx512bw") => unsafe {
            while out.len() + 4 <= x.m {
                out.extend(x86::rows_avx512::<4>(b, x, out.len()));
            }
            while out.len() < x.m {
                out.extend(x86::rows_avx512::<1>(b, x, out.len()));
            }
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => unsafe {
            while out.len() + 2 <= x.m {
                out.extend(x86::rows_avx2::<2>(b, x, out.len()));
            }
            while out.len() < x.m {
                out.extend(x86::rows_avx2::<1>(b, x, out.len()));
            }
        },
        // SAFETY: NEON is part of every aarch64 target this builds for; each pass reads rows
        // that exist.
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => unsafe {
            while out.len() + 2 <= x.m {
                out.extend(neon::rows::<2>(b, x, out.len()));
            }
            while out.len() < x.m {
                out.extend(neon::rows::<1>(b, x, out.len()));
            }
        },
        _ => {
            let subs = x.k / SUB;
            for r in 0..x.m {
                out.push(row_portable(b, &x.pairs[r * x.k / 2..(r + 1) * x.k / 2], &x.scales[r * subs..(r + 1) * subs]));
            }
        }
    }
    out
}

/// `y[r * n + c] = xq[r] . w[c]` for the quantised rows and the first `n` rows of block-format
/// weights `w`: the GPU int8 matmul's bits. In parallel over blocks of 16 weight rows.
pub fn matmul(isa: Isa, x: &Quantised, w: WeightRows, n: usize, y: &mut [f32]) {
    assert!(y.len() >= x.m * n, "int8 matmul shapes");
    run(isa, &[QuantisedJob { x, w, w_row0: 0, n, bias: None, y: Out(y.as_mut_ptr()), y_stride: n }]);
}

/// [`crate::cpu::matmul::matmul`]'s jobs over Q8_0 and Q4_0 weights with `--cpu-compute int8`:
/// each input row quantised to 8 bits per 32 (the GPU's quantiser, as llama.cpp's Q8_0 x Q8_0
/// dot products quantise theirs) and multiplied as the GPU's int8 kernels multiply, bias added
/// after. The integer sums are exact, so a row gets the same bits at any row count. All the
/// jobs' blocks of 16 weight rows run in one parallel loop. The caller checks that each output
/// lies inside memory it owns.
pub(crate) fn matmul_many(isa: Isa, jobs: &[Job]) {
    let xs: Vec<Quantised> = jobs.iter().map(|j| quantise(j.x, j.m, j.w.cols)).collect();
    let quantised: Vec<QuantisedJob> =
        jobs.iter().zip(&xs).map(|(j, x)| QuantisedJob { x, w: j.w, w_row0: j.w_row0, n: j.n, bias: j.bias, y: j.y, y_stride: j.y_stride }).collect();
    run(isa, &quantised);
}

/// One matmul of [`run`]: `y[r * y_stride + c] = x[r] . w[w_row0 + c] (+ bias[c])`.
struct QuantisedJob<'a> {
    x: &'a Quantised,
    w: WeightRows<'a>,
    w_row0: usize,
    n: usize,
    bias: Option<&'a [f32]>,
    y: Out,
    y_stride: usize,
}

fn run(isa: Isa, jobs: &[QuantisedJob]) {
    for j in jobs {
        let k = j.x.k;
        assert!(j.w.cols == k && j.y_stride >= j.n && j.bias.is_none_or(|b| b.len() >= j.n), "int8 matmul shapes");
        assert!((j.w_row0 + j.n) * j.w.dtype.row_bytes(k) <= j.w.words.len() * 4, "int8 matmul weight rows");
    }
    let tasks = crate::cpu::matmul::block_tasks(jobs.iter().map(|j| (j.x.m, j.x.k, j.n)), LANES);
    tasks.into_par_iter().for_each_init(Scratch::default, |scratch, (i, b0, b1)| {
        let j = &jobs[i];
        for blk in b0..b1 {
            let c0 = blk * LANES;
            let nb = LANES.min(j.n - c0);
            decode(isa, j.w, j.w_row0 + c0, nb, scratch);
            for (r, out) in rows(isa, &scratch.block, j.x).iter().enumerate() {
                for (c, &v) in out[..nb].iter().enumerate() {
                    let v = j.bias.map_or(v, |b| v + b[c0 + c]);
                    // SAFETY: output (r, c0 + c) lies inside the job's output (checked by the
                    // caller), and only this task writes the block's columns.
                    unsafe { *j.y.0.add(r * j.y_stride + c0 + c) = v };
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::WeightDtype;
    use crate::kernels::matmul_int8::{model, quantize_reference, sub_blocks};

    /// `--cpu-compute int8`'s jobs over Q8_0 and Q4_0: at a weight-row offset, with a bias and
    /// an output stride, several jobs at once, on every path: the model's bits plus the bias,
    /// each row the same whatever the row count, nothing written outside the outputs.
    #[test]
    fn jobs_give_the_models_bits_at_offsets_with_bias() {
        let mut state = 11u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for dtype in [WeightDtype::Q8_0, WeightDtype::Q4_0] {
            let (rows, row0, n, k) = (45, 5, 37, 96);
            let bytes = crate::quant::random_blocks(dtype, rows * k / dtype.block_elems(), 3, true);
            let mut words = vec![0u32; bytes.len().div_ceil(4) + 1];
            bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
            let (wq, wa) = sub_blocks(dtype, &bytes);
            let (wq, wa) = (&wq[row0 * k..(row0 + n) * k], &wa[row0 * k / SUB..(row0 + n) * k / SUB]);
            let bias: Vec<f32> = (0..n).map(|_| next()).collect();
            let w = WeightRows { words: &words, dtype, cols: k };
            let ms = [1usize, 6];
            let xs: Vec<Vec<f32>> = ms.iter().map(|&m| (0..m * k).map(|_| next() * 2.0).collect()).collect();
            let stride = n + 3;
            for isa in Isa::available() {
                let mut y = vec![f32::NAN; (1 + 6) * stride];
                let (y1, y6) = y.split_at_mut(stride);
                let jobs = [
                    Job { x: &xs[0], m: 1, w, w_row0: row0, n, bias: Some(&bias), y: Out(y1.as_mut_ptr()), y_stride: stride },
                    Job { x: &xs[1], m: 6, w, w_row0: row0, n, bias: Some(&bias), y: Out(y6.as_mut_ptr()), y_stride: stride },
                ];
                matmul_many(isa, &jobs);
                for (j, &m) in ms.iter().enumerate() {
                    let (q, sc) = quantize_reference(&xs[j]);
                    let want = model(&q, &sc, wq, wa, Some(&bias), m, n, k);
                    let at = if j == 0 { 0 } else { stride };
                    for r in 0..m {
                        for c in 0..stride {
                            let got = y[at + r * stride + c];
                            if c < n {
                                assert_eq!(got.to_bits(), want[r * n + c].to_bits(), "{dtype:?} {} m={m}: output ({r}, {c})", isa.name());
                            } else {
                                assert!(got.is_nan(), "{dtype:?} {}: ({r}, {c}) is outside the output and was written", isa.name());
                            }
                        }
                    }
                }
                // A row alone: the same bits as among the others.
                let mut alone = vec![f32::NAN; n];
                matmul_many(isa, &[Job { x: &xs[1][3 * k..4 * k], m: 1, w, w_row0: row0, n, bias: Some(&bias), y: Out(alone.as_mut_ptr()), y_stride: n }]);
                for c in 0..n {
                    assert_eq!(alone[c].to_bits(), y[stride + 3 * stride + c].to_bits(), "{dtype:?} {}: row 3 alone, column {c}", isa.name());
                }
            }
        }
    }

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
