//! bf16 products on AMX tiles (`--cpu-compute bf16` on CPUs with AMX-BF16: Intel Sapphire Rapids
//! and later), the matrix unit torch's oneDNN uses for its bf16 matmuls there. One `tdpbf16ps`
//! multiplies a 16 x 32 tile of weights (read in place: rows of the stored bf16 matrix) with 32
//! products for each of 16 input rows, into a 16 x 16 tile of f32 sums: sixteen times the work of
//! an AVX-512 dot-product instruction. The inputs are rounded to bf16 as on the AVX512-BF16 path,
//! and packed for the B operand (pairs of elements of 16 rows side by side) once per call.
//!
//! Each output element is summed by the same instructions in the same order whatever the other
//! rows of its tile (padding rows are zeros, and a tile's elements are computed independently),
//! so a row's result does not depend on the rows batched with it. The kernel must be allowed to
//! use AMX's state first (Linux: `arch_prctl(ARCH_REQ_XCOMP_PERM)`); where that fails, or the CPU
//! lacks AMX, the AVX512-BF16 path runs instead.

#![cfg(target_arch = "x86_64")]

use std::arch::asm;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::cpu::matmul::{Out, WeightRows};

/// Elements of `k` one tile step takes (a 64-byte tile row of bf16).
const STEP: usize = 32;
/// Rows of a tile (weight rows of an A tile, input rows of a B tile's columns).
const TILE: usize = 16;

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

/// `y[r * y_stride + c] = xb[r] . w[w_row0 + c] + bias[c]` for `r < m`, `c < n`, with `xb` the
/// inputs already rounded to bf16 (`kp` apart). The caller checks [`fits`] and the shapes.
#[allow(clippy::too_many_arguments)]
pub fn matmul(xb: &[u16], kp: usize, m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    let k = w.cols;
    assert!(fits(k, n) && kp >= k && xb.len() >= m * kp && (w_row0 + n) * k <= w.words.len() * 2, "AMX matmul shapes");
    // The inputs as B tiles: for each pair of 16-row groups (the last padded with zero rows) and
    // each step of k, 16 rows of 64 bytes, row p holding elements 2p and 2p + 1 of the 16 inputs.
    let steps = k / STEP;
    let groups = m.div_ceil(TILE).next_multiple_of(2);
    let tile_elems = TILE * STEP;
    let mut packed = vec![0u16; groups * steps * tile_elems];
    packed.par_chunks_mut(steps * tile_elems).enumerate().for_each(|(g, out)| {
        for i in 0..TILE {
            let r = g * TILE + i;
            if r >= m {
                break;
            }
            let row = &xb[r * kp..r * kp + k];
            for (s, tile) in out.chunks_exact_mut(tile_elems).enumerate() {
                for p in 0..STEP / 2 {
                    tile[p * 2 * TILE + 2 * i] = row[s * STEP + 2 * p];
                    tile[p * 2 * TILE + 2 * i + 1] = row[s * STEP + 2 * p + 1];
                }
            }
        }
    });
    let out = Out(y.as_mut_ptr());
    let words = w.words;
    // A task: 32 weight rows (two A tiles) over every input group, two at a time.
    (0..n / (2 * TILE)).into_par_iter().for_each(|t| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        let c0 = t * 2 * TILE;
        let mut sums = [[0f32; TILE * TILE]; 4];
        // SAFETY: `available` found AMX and the permission; the weight rows w_row0 + c0..+32 and
        // the packed groups lie inside their buffers (checked above); the tiles written to are
        // `sums`' four 1 KiB arrays.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const Config, options(nostack, readonly));
            let a = (words.as_ptr() as *const u16).add((w_row0 + c0) * k);
            let stride = k * 2;
            for g in (0..groups).step_by(2) {
                let b0 = packed.as_ptr().add(g * steps * tile_elems);
                let b1 = b0.add(steps * tile_elems);
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                for s in 0..steps {
                    asm!(
                        "tileloadd tmm4, [{a0} + {stride}*1]",
                        "tileloadd tmm5, [{a1} + {stride}*1]",
                        "tileloadd tmm6, [{b0} + {bstride}*1]",
                        "tileloadd tmm7, [{b1} + {bstride}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a.add(s * STEP),
                        a1 = in(reg) a.add(TILE * k + s * STEP),
                        b0 = in(reg) b0.add(s * tile_elems),
                        b1 = in(reg) b1.add(s * tile_elems),
                        stride = in(reg) stride,
                        bstride = in(reg) 64usize,
                        options(nostack, readonly),
                    );
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
                // g + gi. Each output row's 32 columns gathered from the tiles (loads from L1)
                // and written at once (strided single stores cost as much as the products).
                for gi in 0..2 {
                    for r in 0..TILE {
                        let row = (g + gi) * TILE + r;
                        if row >= m {
                            break;
                        }
                        let mut line = [0f32; 2 * TILE];
                        for (c, v) in line.iter_mut().enumerate() {
                            *v = sums[2 * (c / TILE) + gi][(c % TILE) * TILE + r] + bias.map_or(0.0, |b| b[c0 + c]);
                        }
                        // SAFETY: each task writes only its own columns c0..c0 + 32 of `y`.
                        std::ptr::copy_nonoverlapping(line.as_ptr(), out.0.add(row * y_stride + c0), 2 * TILE);
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    });
}
