//! bf16 products on AMX tiles (`--cpu-compute bf16` on CPUs with AMX-BF16: Intel Sapphire Rapids
//! and later), the matrix unit torch's oneDNN uses for its bf16 matmuls there. One `tdpbf16ps`
//! multiplies a 16 x 32 tile of weights (rows of the stored bf16 matrix, read in place for few
//! input rows, copied into tile order for many) with 32 products for each of 16 input rows, into
//! a 16 x 16 tile of f32 sums: sixteen times the work of an AVX-512 dot-product instruction. The
//! inputs are rounded to bf16 as on the AVX512-BF16 path, and packed for the B operand (pairs of
//! elements of 16 rows side by side) once per call; the sums come out transposed in registers.
//!
//! Each output element is summed by the same instructions in the same order whatever the other
//! rows of its tile and wherever its weights were loaded from (padding rows are zeros, and a
//! tile's elements are computed independently),
//! so a row's result does not depend on the rows batched with it. The kernel must be allowed to
//! use AMX's state first (Linux: `arch_prctl(ARCH_REQ_XCOMP_PERM)`); where that fails, or the CPU
//! lacks AMX, the AVX512-BF16 path runs instead.

#![cfg(target_arch = "x86_64")]

use std::arch::asm;
use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::cpu::matmul::{Out, WeightRows};

/// Elements of `k` one tile step takes (a 64-byte tile row of bf16).
const STEP: usize = 32;
/// Rows of a tile (weight rows of an A tile, input rows of a B tile's columns).
const TILE: usize = 16;
/// Input groups above which a task copies its weight rows into tile order first (the copy pays
/// for itself once enough groups reuse it: measured on Sapphire Rapids at expert shapes).
const COPY_FROM_GROUPS: usize = 8;

/// Whether this CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use them.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        if std::env::var_os("MOEGEN_NO_AMX").is_some() {
            return false;
        }
        // CPUID leaf 7 exists on every x86-64 CPU that has AVX-512 (checked by callers before
        // this path is asked for); reading it has no effect.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (bf16, tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        bf16 && tile && permitted()
    })
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM` for `XFEATURE_XTILEDATA`): without
/// it the first tile instruction faults.
#[cfg(target_os = "linux")]
fn permitted() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the syscall takes two integers and changes only this process's permissions.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn permitted() -> bool {
    false
}

/// Whether a weight of rows of `k` and `n` rows of it takes the AMX path: whole tile steps and
/// whole tiles of weight rows (every call on the same rows takes the same path, whatever its
/// input rows).
pub fn fits(k: usize, n: usize) -> bool {
    k.is_multiple_of(STEP) && n.is_multiple_of(2 * TILE) && available()
}

/// Palette 1: tmm0-3 the sums (16 rows x 64 bytes), tmm4-5 two tiles of weight rows, tmm6-7 two
/// tiles of packed inputs.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// `y[r * y_stride + c] = bf16(x[r]) . w[w_row0 + c] + bias[c]` for `r < m`, `c < n`, the inputs
/// rounded to bf16 as [`crate::cpu::bf16_products::round_to_bf16`] rounds them. The caller checks
/// [`fits`] and the shapes.
#[allow(clippy::too_many_arguments)]
pub fn matmul(x: &[f32], m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    let k = w.cols;
    assert!(fits(k, n) && x.len() >= m * k && (w_row0 + n) * k <= w.words.len() * 2, "AMX matmul shapes");
    // The inputs as B tiles: for each 16-row group (the last padded with zero rows) and each step
    // of k, 16 rows of 64 bytes, row p holding elements 2p and 2p + 1 of the 16 inputs.
    let steps = k / STEP;
    let groups = m.div_ceil(TILE);
    let tile_elems = TILE * STEP;
    let mut packed = vec![0u16; groups * steps * tile_elems];
    packed.par_chunks_mut(steps * tile_elems).enumerate().for_each(|(g, out)| {
        // SAFETY: `available` implies AVX-512 with BF16 (checked by the callers, who take this
        // path only where `bf16_products::supported`); the group's rows lie inside `x`.
        unsafe { pack_group(x, k, m, g, out) }
    });
    let out = Out(y.as_mut_ptr());
    let words = w.words;
    let strip_elems = 2 * TILE * k;
    // A task: 32 weight rows (two A tiles) over every input group, two at a time (a last unpaired
    // group alone, so that a lone row does not pay for a zero group).
    (0..n / (2 * TILE)).into_par_iter().for_each_init(Vec::<u16>::new, |strip, t| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        let c0 = t * 2 * TILE;
        // SAFETY: the rows w_row0 + c0..+32 lie inside `words` (checked above).
        let rows = unsafe { std::slice::from_raw_parts((words.as_ptr() as *const u16).add((w_row0 + c0) * k), strip_elems) };
        // Many input groups: the task's 32 weight rows copied in tile order first (step by step,
        // each tile's 16 rows of 64 bytes side by side), so that the tile loads of every group
        // after the first read contiguous kilobytes instead of lines 2 KiB or more apart, which
        // collide in a few cache sets. Few groups: the tiles load the stored rows, and the first
        // group's pass fetches the next task's rows (the next 32: rayon hands a thread adjacent
        // tasks) while it computes, since few-row matmuls wait on memory.
        let copied = groups > COPY_FROM_GROUPS;
        if copied {
            strip.resize(strip_elems, 0);
            for (r, row) in rows.chunks_exact(k).enumerate() {
                let (wi, rr) = (r / TILE, r % TILE);
                for (s, piece) in row.chunks_exact(STEP).enumerate() {
                    let at = ((2 * s + wi) * TILE + rr) * STEP;
                    strip[at..at + STEP].copy_from_slice(piece);
                }
            }
        }
        let next = (!copied && c0 + 2 * TILE < n).then(|| rows.as_ptr().wrapping_add(strip_elems));
        // Where the A tiles' rows start, how far apart their rows are, and where the second starts.
        let (a, a_stride, a_second) = if copied { (strip.as_ptr(), 64, tile_elems) } else { (rows.as_ptr(), 2 * k, TILE * k) };
        let mut sums = [[0f32; TILE * TILE]; 4];
        // SAFETY: `available` found AMX and the permission; the strip and the packed groups lie
        // inside their buffers (sized above); the tiles written to are `sums`' four 1 KiB arrays.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const Config, options(nostack, readonly));
            for g in (0..groups).step_by(2) {
                let pair = g + 1 < groups;
                let b0 = packed.as_ptr().add(g * steps * tile_elems);
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                for s in 0..steps {
                    let a0 = if copied { a.add(2 * s * tile_elems) } else { a.add(s * STEP) };
                    let b = b0.add(s * tile_elems);
                    if let (Some(next), 0) = (next, g) {
                        // The next rows' k / 32 lines per step: all of them over the steps.
                        for line in 0..2 * TILE {
                            _mm_prefetch::<_MM_HINT_T1>(next.add((s * 2 * TILE + line) * 32) as *const i8);
                        }
                    }
                    // Tile registers keep their values between the two blocks (the compiler
                    // never uses them); each sum tile takes its steps in the same order either way.
                    asm!(
                        "tileloadd tmm4, [{a0} + {astride}*1]",
                        "tileloadd tmm5, [{a1} + {astride}*1]",
                        "tileloadd tmm6, [{b0} + {stride}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        a0 = in(reg) a0,
                        a1 = in(reg) a0.add(a_second),
                        astride = in(reg) a_stride,
                        b0 = in(reg) b,
                        stride = in(reg) 64usize,
                        options(nostack, readonly),
                    );
                    if pair {
                        asm!(
                            "tileloadd tmm7, [{b1} + {stride}*1]",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            b1 = in(reg) b.add(steps * tile_elems),
                            stride = in(reg) 64usize,
                            options(nostack, readonly),
                        );
                    }
                }
                asm!(
                    "tilestored [{s0} + {stride}*1], tmm0",
                    "tilestored [{s1} + {stride}*1], tmm1",
                    "tilestored [{s2} + {stride}*1], tmm2",
                    "tilestored [{s3} + {stride}*1], tmm3",
                    s0 = in(reg) sums[0].as_mut_ptr(),
                    s1 = in(reg) sums[1].as_mut_ptr(),
                    s2 = in(reg) sums[2].as_mut_ptr(),
                    s3 = in(reg) sums[3].as_mut_ptr(),
                    stride = in(reg) 64usize,
                    options(nostack),
                );
                // sums[2 * wi + gi][c * 16 + r]: weight row c of A tile wi, input row r of group
                // g + gi; each tile transposed in registers and stored row by row.
                for gi in 0..if pair { 2 } else { 1 } {
                    let row0 = (g + gi) * TILE;
                    let rows = TILE.min(m - row0);
                    // SAFETY: each task writes only its own columns c0..c0 + 32 of the rows
                    // row0..row0 + rows of `y`, inside it (checked above).
                    store_group(&sums, gi, rows, bias.map(|b| &b[c0..c0 + 2 * TILE]), out.0.add(row0 * y_stride + c0), y_stride);
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    });
}

/// Group `g`'s inputs (rows 16g.. of `x`, zeros past `m`) rounded to bf16 and laid out as B
/// tiles, a step at a time: each row's 32 elements rounded into one register (`vcvtne2ps2bf16`,
/// the rounding `round_to_bf16` copies), and the 16 registers, as 16 x 16 pairs, transposed.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_group(x: &[f32], k: usize, m: usize, g: usize, out: &mut [u16]) {
    use std::arch::x86_64::*;
    let tile_elems = TILE * STEP;
    assert!(out.len() >= k / STEP * tile_elems && x.len() >= m * k, "packed group shapes");
    let rows = TILE.min(m - g * TILE);
    for s in 0..k / STEP {
        let mut r = [_mm512_setzero_ps(); TILE];
        for (i, v) in r.iter_mut().enumerate().take(rows) {
            let p = x.as_ptr().add((g * TILE + i) * k + s * STEP);
            let pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(p.add(16)), _mm512_loadu_ps(p));
            *v = std::mem::transmute::<__m512bh, __m512>(pairs);
        }
        for (p, v) in transpose16(r).iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(s * tile_elems + p * 2 * TILE) as *mut f32, *v);
        }
    }
}

/// Writes `rows` output rows of 32 columns from the sum tiles of input group `gi` (weight rows
/// down each tile's rows), each 16 x 16 tile transposed in registers (the summed values, plus
/// the bias after, exactly as a scalar copy would give them).
#[target_feature(enable = "avx512f")]
unsafe fn store_group(sums: &[[f32; TILE * TILE]; 4], gi: usize, rows: usize, bias: Option<&[f32]>, dst: *mut f32, stride: usize) {
    use std::arch::x86_64::*;
    for wi in 0..2 {
        let tile = &sums[2 * wi + gi];
        let t = transpose16(std::array::from_fn(|i| _mm512_loadu_ps(tile[i * TILE..].as_ptr())));
        let b = bias.map(|b| _mm512_loadu_ps(b[wi * TILE..].as_ptr()));
        for (r, &v) in t.iter().enumerate().take(rows) {
            let v = b.map_or(v, |b| _mm512_add_ps(v, b));
            _mm512_storeu_ps(dst.add(r * stride + wi * TILE), v);
        }
    }
}

/// The 16 x 16 matrix of 32-bit lanes in `r` (a row in each register) transposed: four passes, each
/// swapping one bit of the row index with the same bit of the column index (for rows i and
/// i + d with bit d clear, the elements whose column has bit d set trade places).
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(mut r: [std::arch::x86_64::__m512; TILE]) -> [std::arch::x86_64::__m512; TILE] {
    use std::arch::x86_64::*;
    for d in [1usize, 2, 4, 8] {
        let low: [i32; 16] = std::array::from_fn(|c| if c & d == 0 { c as i32 } else { (16 + c - d) as i32 });
        let high: [i32; 16] = std::array::from_fn(|c| if c & d == 0 { (c + d) as i32 } else { (16 + c) as i32 });
        let (low, high) = (_mm512_loadu_si512(low.as_ptr() as *const _), _mm512_loadu_si512(high.as_ptr() as *const _));
        for i in (0..TILE).filter(|i| i & d == 0) {
            let (x, y) = (r[i], r[i + d]);
            r[i] = _mm512_permutex2var_ps(x, low, y);
            r[i + d] = _mm512_permutex2var_ps(x, high, y);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let a: [f32; TILE * TILE] = std::array::from_fn(|i| (i as f32 * 0.37).sin() * 100.0);
        // SAFETY: AVX-512F was detected above.
        let t = unsafe { transpose16(std::array::from_fn(|i| std::arch::x86_64::_mm512_loadu_ps(a[i * TILE..].as_ptr()))) };
        for (r, row) in t.iter().enumerate() {
            let mut got = [0f32; TILE];
            // SAFETY: as above; `got` holds 16 floats.
            unsafe { std::arch::x86_64::_mm512_storeu_ps(got.as_mut_ptr(), *row) };
            for (c, &v) in got.iter().enumerate() {
                assert_eq!(v.to_bits(), a[c * TILE + r].to_bits(), "element ({r}, {c})");
            }
        }
    }
}
