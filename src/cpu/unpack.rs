//! Block-format weights (Q8_0, Q4_0, Q4_K) decoded in vector registers, a 32-element unit (a
//! Q8_0/Q4_0 block, a Q4_K sub-block) at a time, for the host matmul's intrinsics
//! tiles: the weights stay packed in memory and cache all the way to the products. Each format is
//! written once over [`Lanes`] (AVX-512's 16 and AVX2's 8), and gives exactly the values of
//! [`crate::quant::dequantize`] (the same f32 operations in the same order, none fused). Q5_K and
//! Q6_K, whose quants take twice the operations to assemble, are widened into memory a block of
//! rows at a time instead: decoded in registers they were slower at one row and from eight.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use crate::gpu::WeightDtype;


/// The integer and float vector operations a format's decoding needs, on `N` lanes.
pub(crate) trait Lanes {
    const N: usize;
    /// Whether [`Lanes::lookup`] exists: a 16-entry table of floats in one register.
    const TABLE: bool;
    type I: Copy;
    type F: Copy;
    /// Lanes `0, 1, .., N - 1`.
    unsafe fn iota() -> Self::I;
    /// `table[idx & 15]` in each lane (only where [`Lanes::TABLE`]).
    unsafe fn lookup(table: Self::F, idx: Self::I) -> Self::F;
    unsafe fn shr(v: Self::I, shift: u32) -> Self::I;
    /// `N` bytes at `p`, zero-extended to i32 lanes.
    unsafe fn u8s(p: *const u8) -> Self::I;
    /// `N` bytes at `p`, sign-extended to i32 lanes.
    unsafe fn i8s(p: *const u8) -> Self::I;
    unsafe fn shr_and(v: Self::I, shift: u32, mask: i32) -> Self::I;
    unsafe fn sub_i(v: Self::I, c: i32) -> Self::I;
    unsafe fn float(v: Self::I) -> Self::F;
    unsafe fn zero() -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    /// `a * b + c`, fused.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn mul(v: Self::F, c: f32) -> Self::F;
    unsafe fn sub(v: Self::F, c: f32) -> Self::F;
}

pub(crate) struct Avx512;
pub(crate) struct Avx2;

impl Lanes for Avx512 {
    const N: usize = 16;
    const TABLE: bool = true;
    type I = __m512i;
    type F = __m512;
    #[inline(always)]
    unsafe fn iota() -> __m512i {
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    }
    #[inline(always)]
    unsafe fn lookup(table: __m512, idx: __m512i) -> __m512 {
        _mm512_permutexvar_ps(idx, table)
    }
    #[inline(always)]
    unsafe fn shr(v: __m512i, shift: u32) -> __m512i {
        _mm512_srl_epi32(v, _mm_cvtsi32_si128(shift as i32))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn i8s(p: *const u8) -> __m512i {
        _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn shr_and(v: __m512i, shift: u32, mask: i32) -> __m512i {
        _mm512_and_si512(_mm512_srl_epi32(v, _mm_cvtsi32_si128(shift as i32)), _mm512_set1_epi32(mask))
    }
    #[inline(always)]
    unsafe fn sub_i(v: __m512i, c: i32) -> __m512i {
        _mm512_sub_epi32(v, _mm512_set1_epi32(c))
    }
    #[inline(always)]
    unsafe fn float(v: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(v)
    }
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(v: __m512, c: f32) -> __m512 {
        _mm512_mul_ps(v, _mm512_set1_ps(c))
    }
    #[inline(always)]
    unsafe fn sub(v: __m512, c: f32) -> __m512 {
        _mm512_sub_ps(v, _mm512_set1_ps(c))
    }
}

impl Lanes for Avx2 {
    const N: usize = 8;
    const TABLE: bool = false;
    type I = __m256i;
    type F = __m256;
    #[inline(always)]
    unsafe fn iota() -> __m256i {
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
    }
    #[inline(always)]
    unsafe fn lookup(_: __m256, _: __m256i) -> __m256 {
        unreachable!("eight lanes hold no 16-entry table")
    }
    #[inline(always)]
    unsafe fn shr(v: __m256i, shift: u32) -> __m256i {
        _mm256_srl_epi32(v, _mm_cvtsi32_si128(shift as i32))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn i8s(p: *const u8) -> __m256i {
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn shr_and(v: __m256i, shift: u32, mask: i32) -> __m256i {
        _mm256_and_si256(_mm256_srl_epi32(v, _mm_cvtsi32_si128(shift as i32)), _mm256_set1_epi32(mask))
    }
    #[inline(always)]
    unsafe fn sub_i(v: __m256i, c: i32) -> __m256i {
        _mm256_sub_epi32(v, _mm256_set1_epi32(c))
    }
    #[inline(always)]
    unsafe fn float(v: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(v)
    }
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(v: __m256, c: f32) -> __m256 {
        _mm256_mul_ps(v, _mm256_set1_ps(c))
    }
    #[inline(always)]
    unsafe fn sub(v: __m256, c: f32) -> __m256 {
        _mm256_sub_ps(v, _mm256_set1_ps(c))
    }
}

/// One row's unit, ready for its parts: where its quants are, its scales and shifts.
#[derive(Clone, Copy)]
pub(crate) struct Unit<S: Lanes> {
    /// Q4_0 and Q4_K where the lanes hold a 16-entry table: the unit's value of each nibble
    /// (computed as the scalar decoder computes it), so that a part is a lookup.
    table: S::F,
    q: *const u8,
    d: [f32; 2],
    shift: u32,
}

/// Unit `u` of a row of `dtype` blocks stored at `row` (checked by the caller to hold it), with
/// its [`unit_scales`](crate::quant::unit_scales).
#[inline(always)]
pub(crate) unsafe fn unit<S: Lanes>(dtype: WeightDtype, row: *const u8, u: usize, d: [f32; 2]) -> Unit<S> {
    // SAFETY: vector registers have no invalid bit patterns.
    let table = std::mem::zeroed();
    match dtype {
        WeightDtype::Q8_0 => Unit { table, q: row.add(34 * u + 2), d, shift: 0 },
        WeightDtype::Q4_0 => {
            let table = if S::TABLE { S::mul(S::float(S::sub_i(S::iota(), 8)), d[0]) } else { table };
            Unit { table, q: row.add(18 * u + 2), d, shift: 0 }
        }
        WeightDtype::Q4K => {
            let s = u % 8;
            let table = if S::TABLE { S::sub(S::mul(S::float(S::iota()), d[0]), d[1]) } else { table };
            // Sub-blocks 2c and 2c + 1 share 32 bytes of quants: low nibbles, then high.
            Unit { table, q: row.add(144 * (u / 8) + 16 + 32 * (s / 2)), d, shift: 4 * (s % 2) as u32 }
        }
        _ => unreachable!("{} has no 32-element units", dtype.name()),
    }
}

/// Elements `p * N .. (p + 1) * N` of a unit (`p < 32 / N`).
#[inline(always)]
pub(crate) unsafe fn part<S: Lanes>(dtype: WeightDtype, w: &Unit<S>, p: usize) -> S::F {
    let at = p * S::N;
    match dtype {
        WeightDtype::Q8_0 => S::mul(S::float(S::i8s(w.q.add(at))), w.d[0]),
        // The lookup reads an index's low four bits: the nibble, once shifted down.
        WeightDtype::Q4_0 if S::TABLE => S::lookup(w.table, S::shr(S::u8s(w.q.add(at % 16)), 4 * (at / 16) as u32)),
        WeightDtype::Q4K if S::TABLE => S::lookup(w.table, S::shr(S::u8s(w.q.add(at)), w.shift)),
        WeightDtype::Q4_0 => {
            // Elements 0..16 are the 16 bytes' low nibbles, 16..32 their high ones.
            let q = S::shr_and(S::u8s(w.q.add(at % 16)), 4 * (at / 16) as u32, 0xf);
            S::mul(S::float(S::sub_i(q, 8)), w.d[0])
        }
        WeightDtype::Q4K => S::sub(S::mul(S::float(S::shr_and(S::u8s(w.q.add(at)), w.shift, 0xf)), w.d[0]), w.d[1]),
        _ => unreachable!("{} has no 32-element units", dtype.name()),
    }
}

/// `$body` for each unit `$u` along the `$j` block-format weight rows from `$rows` (`$rb` bytes
/// apart, `$cols` elements; their [`unit_scales`](crate::quant::unit_scales) at `$scales`, one row after another), with
/// `$units[j]` row `j`'s and `$dt` the format (a constant in each loop, so that [`part`]'s match
/// folds away), then `$prefetch` with the unit's first byte in a row. A macro, not a function
/// taking a closure: a closure call per unit kept the tile's accumulators in memory.
macro_rules! for_each_unit {
    ($dtype:expr, $lanes:ty, $rows:expr, $rb:expr, $cols:expr, $scales:expr, $j:expr, |$dt:ident, $u:ident, $units:ident| $body:block, |$at:ident| $prefetch:block) => {{
        let (rows, rb, cols, scales): (*const u8, usize, usize, &[[f32; 2]]) = ($rows, $rb, $cols, $scales);
        let n_units = cols / $crate::quant::UNIT;
        assert!(scales.len() >= $j * n_units, "unit scales");
        let unit_bytes = rb / n_units;
        match $dtype {
            $crate::gpu::WeightDtype::Q8_0 => $crate::cpu::unpack::unit_loop!(Q8_0, $lanes, rows, rb, n_units, scales, unit_bytes, $j, |$dt, $u, $units| $body, |$at| $prefetch),
            $crate::gpu::WeightDtype::Q4_0 => $crate::cpu::unpack::unit_loop!(Q4_0, $lanes, rows, rb, n_units, scales, unit_bytes, $j, |$dt, $u, $units| $body, |$at| $prefetch),
            $crate::gpu::WeightDtype::Q4K => $crate::cpu::unpack::unit_loop!(Q4K, $lanes, rows, rb, n_units, scales, unit_bytes, $j, |$dt, $u, $units| $body, |$at| $prefetch),
            d => unreachable!("{} has no 32-element units", d.name()),
        }
    }};
}

/// One format's loop of [`for_each_unit`].
macro_rules! unit_loop {
    ($format:ident, $lanes:ty, $rows:ident, $rb:ident, $n_units:ident, $scales:ident, $unit_bytes:ident, $j:expr, |$dt:ident, $u:ident, $units:ident| $body:block, |$at:ident| $prefetch:block) => {{
        let $dt = $crate::gpu::WeightDtype::$format;
        for $u in 0..$n_units {
            // SAFETY: zeroed units are never read: the body reads the first `$j`.
            let mut $units: [$crate::cpu::unpack::Unit<$lanes>; 4] = std::mem::zeroed();
            for (j, slot) in $units.iter_mut().enumerate().take($j) {
                *slot = $crate::cpu::unpack::unit::<$lanes>($dt, $rows.add(j * $rb), $u, *$scales.get_unchecked(j * $n_units + $u));
            }
            $body
            let $at = $u * $unit_bytes;
            $prefetch
        }
    }};
}
pub(crate) use {for_each_unit, unit_loop};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::Isa;
    use crate::quant::{unit_scales, UNIT};

    /// Every unit of every format on both widths, the extreme scales included, bit for bit
    /// against `dequantize`.
    #[test]
    fn units_decode_in_registers_as_dequantize_does() {
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn wide(dtype: WeightDtype, row: &[u8], scales: &[[f32; 2]], u: usize, out: &mut [f32; UNIT]) {
            let w = unit::<Avx512>(dtype, row.as_ptr(), u, scales[u]);
            for p in 0..2 {
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * p), part::<Avx512>(dtype, &w, p));
            }
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn narrow(dtype: WeightDtype, row: &[u8], scales: &[[f32; 2]], u: usize, out: &mut [f32; UNIT]) {
            let w = unit::<Avx2>(dtype, row.as_ptr(), u, scales[u]);
            for p in 0..4 {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * p), part::<Avx2>(dtype, &w, p));
            }
        }
        let available = Isa::available();
        for dtype in [WeightDtype::Q8_0, WeightDtype::Q4_0, WeightDtype::Q4K] {
            let (rows, cols) = (3, 2 * crate::quant::QK_K);
            let src = crate::quant::random_blocks(dtype, rows * cols / dtype.block_elems(), 13, true);
            let mut whole = vec![f32::NAN; rows * cols];
            crate::quant::dequantize(dtype, &src, &mut whole);
            let rb = dtype.row_bytes(cols);
            for (isa, decode) in [(Isa::Avx512, wide as unsafe fn(WeightDtype, &[u8], &[[f32; 2]], usize, &mut [f32; UNIT])), (Isa::Avx2, narrow)] {
                if !available.contains(&isa) {
                    continue;
                }
                for r in 0..rows {
                    let row = &src[r * rb..(r + 1) * rb];
                    let mut scales = vec![[f32::NAN; 2]; cols / UNIT];
                    unit_scales(dtype, row, cols, &mut scales);
                    for u in 0..cols / UNIT {
                        let mut got = [f32::NAN; UNIT];
                        // SAFETY: detection found the path's instructions; the row holds the unit.
                        unsafe { decode(dtype, row, &scales, u, &mut got) };
                        for (l, v) in got.iter().enumerate() {
                            let want = whole[r * cols + u * UNIT + l];
                            assert!(v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()), "{} {} row {r} unit {u} element {l}: {v} vs {want}", isa.name(), dtype.name());
                        }
                    }
                }
            }
        }
    }
}
