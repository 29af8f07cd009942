//! Host matmul over K-format weights (Q4_K, Q5_K, Q6_K) with 8-bit products (`--cpu-compute
//! int8`), as llama.cpp multiplies them on such CPUs: each input row is quantised to 8 bits per
//! 256 elements (one f32 scale each, llama.cpp's Q8_K), the weights' 4-, 5- and 6-bit quants are
//! unpacked to bytes, and `vpmaddubsw` + `vpdpwssd` (AVX512-BW, AVX512-VNNI; on AVX2 `vpmaddwd`
//! and an add for the second; on NEON widening multiplies and pairwise adds) multiply them and
//! apply each 16-element chunk's integer scale in exact integer sums. One float step per 256 elements applies the block's two f32 scales; the
//! weights' minimums (Q4_K, Q5_K) and Q6_K's offset of 32 enter through a float dot over the
//! chunks' input sums, first. That is twice the products per instruction of f32 FMAs (64 per
//! pair against 16 per FMA) and no float decoding; the price is the inputs' quantisation, so it
//! is a choice, not the default.
//!
//! Each output element is computed by the same operations in the same order whatever tile or
//! batch computes it, so a row's result does not depend on the rows batched with it; the scalar
//! [`model`] computes exactly those operations, so the vector kernel is tested bit for bit.
//!
//! Layout: both sides are stored in groups of four 256-element blocks, each group as 16 steps
//! of 64 bytes whose four 16-byte lanes are chunk `t` of the group's four blocks. A 512-bit
//! integer sum's lanes 4g..4g+3 then hold block g's sum throughout a group, and one float step
//! per group converts all four (rows are padded with zero blocks to whole groups).

// Elsewhere than x86-64 and aarch64 the path is never taken (`supported` is false): its pieces
// go unused.
#![cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code, unused_imports, unused_variables))]

use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use crate::cpu::matmul::{Out, WeightRows};
use crate::cpu::simd::Isa;
use crate::gpu::WeightDtype;
use crate::quant::{scale_min_k4, QK_K};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Elements of a group (four blocks), of a step (one 512-bit register of bytes), of a chunk
/// (one integer scale).
const GROUP: usize = 4 * QK_K;
const STEP: usize = 64;
const CHUNK: usize = 16;
const STEPS: usize = GROUP / STEP;
/// Weight rows a task unpacks and takes (its bytes, scales and sums stay in L2 while the input
/// rows pass over them), and the input bytes a task's tiles pass over at once.
const BLOCK_ROWS: usize = 16;
const X_BLOCK_BYTES: usize = 256 << 10;

/// Whether the path runs on the host kernels' vector path (the one `MOEGEN_CPU_ISA` leaves).
pub fn supported() -> bool {
    supported_on(Isa::detected())
}

/// Whether the path has a kernel for `isa` on this CPU: AVX-512 with AVX512-VNNI and -BW
/// (`vpdpwssd`), AVX2 (`vpmaddwd` and an add in its place), or NEON (the unpacking and
/// quantising in scalar code there).
pub fn supported_on(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Isa::available().contains(&isa) && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Isa::available().contains(&isa),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => Isa::available().contains(&isa),
        _ => false,
    }
}

/// The instructions the path's kernel uses on this CPU's vector path (`moegen devices`).
pub fn instructions() -> &'static str {
    match Isa::detected() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if supported() => "AVX512-VNNI",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "AVX2",
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => "NEON",
        _ => "none",
    }
}

/// Turns the path on or off for the process (`--cpu-compute`); the caller checks [`supported`].
pub(crate) fn set_enabled(on: bool) {
    ENABLED.store(on && supported(), Ordering::Relaxed);
}

/// Whether the host's matmuls over `dtype` take this path.
pub fn takes(dtype: WeightDtype) -> bool {
    ENABLED.load(Ordering::Relaxed) && handles(dtype)
}

/// Whether any matmul takes the path (the process's choice).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The weight types the path multiplies (the others keep their f32 or bf16 path).
pub fn handles(dtype: WeightDtype) -> bool {
    matches!(dtype, WeightDtype::Q4K | WeightDtype::Q5K | WeightDtype::Q6K)
}

/// Rows in the path's layout: bytes (`kp` per row, `k` padded to whole groups), each step's 32
/// i16 chunk scales (weights only; a chunk's scale in its lane's 8 words), each group's 16 f32
/// block scales (block g's in lanes 4g..4g+3), and per chunk of the unpadded row one f32: the
/// weights' offset coefficient (`-dmin * min`, `-32 * d * scale`), the inputs' scaled sum
/// (`d * sum of the chunk's quants`).
#[derive(Default)]
struct Rows {
    kp: usize,
    k: usize,
    q: Vec<u8>,
    scales: Vec<i16>,
    d: Vec<f32>,
    lin: Vec<f32>,
}

impl Rows {
    fn shape(&mut self, rows: usize, k: usize, weights: bool) {
        self.k = k;
        self.kp = k.div_ceil(GROUP) * GROUP;
        let kp = self.kp;
        self.q.resize(rows * kp, 0);
        self.d.resize(rows * kp / STEP, 0.0);
        self.lin.resize(rows * k / CHUNK, 0.0);
        if weights {
            self.scales.resize(rows * kp / 2, 0);
        }
        // Every element of the row's blocks is written before it is read; the padding blocks of
        // the last group are zeros, so that they multiply as zeros (whatever the buffers held).
        let g = (k / QK_K) / 4;
        for lane in (k / QK_K) % 4..if k == kp { 0 } else { 4 } {
            for r in 0..rows {
                for t in 0..STEPS {
                    self.q[r * kp + g * GROUP + t * STEP + lane * CHUNK..][..CHUNK].fill(0);
                    if weights {
                        self.scales[r * kp / 2 + (g * STEPS + t) * 32 + lane * 8..][..8].fill(0);
                    }
                }
                self.d[r * kp / STEP + g * 16 + lane * 4..][..4].fill(0.0);
            }
        }
    }

    /// Where element `e` of a row goes in `q`, and the index of its step.
    #[inline(always)]
    fn at(e: usize) -> (usize, usize) {
        let (blk, r) = (e / QK_K, e % QK_K);
        let (g, lane, t) = (blk / 4, blk % 4, r / CHUNK);
        (g * GROUP + t * STEP + lane * CHUNK + r % CHUNK, g * STEPS + t)
    }

    /// Where block `blk`'s scale goes in a row's `d` (four lanes from there).
    #[inline(always)]
    fn block_scale_at(blk: usize) -> usize {
        (blk / 4) * 16 + (blk % 4) * 4
    }
}

/// Quantises one input row (`x`, a whole number of blocks) into its slices of the layout: each
/// block's scale is its largest magnitude over 127, each element rounded to the nearest step
/// (ties to even) and clamped to +-127.
#[inline(always)]
fn quantise_row(x: &[f32], q: &mut [u8], d: &mut [f32], lin: &mut [f32]) {
    for blk in 0..x.len() / QK_K {
        let xs = &x[blk * QK_K..(blk + 1) * QK_K];
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for t in 0..QK_K / CHUNK {
            let e = blk * QK_K + t * CHUNK;
            let mut sum = 0i32;
            for (o, &v) in q[Rows::at(e).0..][..CHUNK].iter_mut().zip(&xs[t * CHUNK..(t + 1) * CHUNK]) {
                let v = quantise(v * inv);
                sum += v as i32;
                *o = v as u8;
            }
            lin[e / CHUNK] = scale * sum as f32;
        }
        d[Rows::block_scale_at(blk)..][..4].fill(scale);
    }
}

/// `v` rounded to the nearest integer (ties to even) and clamped to +-127, as `vcvtps2dq`
/// then a clamp give it (NaN and values past the i32 range become i32::MIN first).
#[inline(always)]
fn quantise(v: f32) -> i8 {
    let i = if v.is_nan() || v.abs() >= 2147483648.0 { i32::MIN } else { v.round_ties_even() as i32 };
    i.clamp(-127, 127) as i8
}

/// The input rows quantised, in parallel by rows.
fn quantise_rows(isa: Isa, x: &[f32], m: usize, rows: &mut Rows) {
    let (k, kp) = (rows.k, rows.kp);
    let q = rows.q.par_chunks_mut(kp);
    let d = rows.d.par_chunks_mut(kp / STEP);
    let lin = rows.lin.par_chunks_mut(k / CHUNK);
    q.zip(d).zip(lin).zip(x[..m * k].par_chunks(k)).for_each(|(((q, d), lin), x)| match isa {
        // SAFETY: the caller checked `supported_on(isa)`; the slices are one row's.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512unpack::quantise_row(x, q, d, lin) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::quantise_row(x, q, d, lin) },
        _ => quantise_row(x, q, d, lin),
    });
}

/// Unpacks weight rows `r0..r0 + n` of `w` into slots `0..n` of `rows`.
fn unpack_rows(isa: Isa, w: WeightRows, r0: usize, rows: &mut Rows, n: usize) {
    for j in 0..n {
        match isa {
            // SAFETY: the caller checked `supported_on(isa)`; `rows` has slot j.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512unpack::unpack_row(w, r0 + j, rows, j) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { avx2::unpack_row(w, r0 + j, rows, j) },
            _ => unpack_row(w, r0 + j, rows, j),
        }
    }
}

/// Unpacks weight row `r` of `w` into slot `j` of `rows`: each block's quants in their natural
/// order, then its 16 chunks to their lanes (the reference for the vector unpacking).
#[inline(always)]
fn unpack_row(w: WeightRows, r: usize, rows: &mut Rows, j: usize) {
    let (k, rb, bb) = (w.cols, w.dtype.row_bytes(w.cols), w.dtype.block_bytes());
    let bytes = &bytemuck::cast_slice::<u32, u8>(w.words)[r * rb..(r + 1) * rb];
    let half = |b: &[u8], at: usize| half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32();
    let (kp, chunks) = (rows.kp, k / CHUNK);
    let mut quants = [0u8; QK_K];
    let mut scales = [0i16; QK_K / CHUNK];
    let mut offsets = [0f32; QK_K / CHUNK];
    for (blk, b) in bytes.chunks_exact(bb).enumerate().take(k / QK_K) {
        let d = match w.dtype {
            WeightDtype::Q4K | WeightDtype::Q5K => {
                let (d, dmin) = (half(b, 0), half(b, 2));
                // Four runs of 64: the low nibbles of 32 bytes, then their high ones (Q5_K: and
                // one more bit each from qh).
                let qs: &[u8; 128] = if w.dtype == WeightDtype::Q4K { b[16..144].try_into().unwrap() } else { b[48..176].try_into().unwrap() };
                for c in 0..4 {
                    for l in 0..32 {
                        quants[64 * c + l] = qs[32 * c + l] & 0xf;
                        quants[64 * c + 32 + l] = qs[32 * c + l] >> 4;
                    }
                }
                if w.dtype == WeightDtype::Q5K {
                    let qh: &[u8; 32] = b[16..48].try_into().unwrap();
                    for c in 0..4 {
                        for l in 0..32 {
                            quants[64 * c + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                            quants[64 * c + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
                        }
                    }
                }
                for sub in 0..8 {
                    let (sc, m) = scale_min_k4(sub, &b[4..16]);
                    scales[2 * sub..2 * sub + 2].fill(sc as i16);
                    offsets[2 * sub..2 * sub + 2].fill(-(dmin * m as f32));
                }
                d
            }
            WeightDtype::Q6K => {
                let (ql, qh): (&[u8; 128], &[u8; 64]) = (b[0..128].try_into().unwrap(), b[128..192].try_into().unwrap());
                for n in 0..2 {
                    for l in 0..32 {
                        let (lo, hi, h) = (ql[64 * n + l], ql[64 * n + 32 + l], qh[32 * n + l]);
                        quants[128 * n + l] = (lo & 0xf) | ((h & 3) << 4);
                        quants[128 * n + 32 + l] = (hi & 0xf) | (((h >> 2) & 3) << 4);
                        quants[128 * n + 64 + l] = (lo >> 4) | (((h >> 4) & 3) << 4);
                        quants[128 * n + 96 + l] = (hi >> 4) | (((h >> 6) & 3) << 4);
                    }
                }
                let d = half(b, 208);
                for t in 0..QK_K / CHUNK {
                    let sc = b[192 + t] as i8;
                    scales[t] = sc as i16;
                    offsets[t] = -(d * (32 * sc as i32) as f32);
                }
                d
            }
            _ => unreachable!("{} is not a K format", w.dtype.name()),
        };
        for t in 0..QK_K / CHUNK {
            let (at, step) = Rows::at(blk * QK_K + t * CHUNK);
            rows.q[j * kp + at..][..CHUNK].copy_from_slice(&quants[t * CHUNK..(t + 1) * CHUNK]);
            rows.scales[j * kp / 2 + step * 32 + (blk % 4) * 8..][..8].fill(scales[t]);
        }
        rows.lin[j * chunks + blk * (QK_K / CHUNK)..][..QK_K / CHUNK].copy_from_slice(&offsets);
        let at = j * kp / STEP + Rows::block_scale_at(blk);
        rows.d[at..at + 4].fill(d);
    }
}

/// The sum of a register's 16 lanes, halves added to halves (the vector kernel's order).
fn reduce16(v: [f32; 16]) -> f32 {
    let a: [f32; 8] = std::array::from_fn(|i| v[i] + v[i + 8]);
    let b: [f32; 4] = std::array::from_fn(|i| a[i] + a[i + 4]);
    let c: [f32; 2] = std::array::from_fn(|i| b[i] + b[i + 2]);
    c[0] + c[1]
}

/// Input row `r` of `x` times weight row `j` of `w`, in scalar code doing exactly the vector
/// kernel's operations: per lane, the offset terms first (the chunks' dot in 16 lanes), then
/// each group's exact integer sums converted and scaled into them; the lanes reduced.
fn model(x: &Rows, r: usize, w: &Rows, j: usize) -> f32 {
    let (kp, k) = (x.kp, x.k);
    let mut acc = [0f32; 16];
    let (wl, xl) = (&w.lin[j * (k / CHUNK)..][..k / CHUNK], &x.lin[r * (k / CHUNK)..][..k / CHUNK]);
    for c in (0..k / CHUNK).step_by(16) {
        for l in 0..16 {
            acc[l] = wl[c + l].mul_add(xl[c + l], acc[l]);
        }
    }
    for g in 0..kp / GROUP {
        let mut sums = [0i32; 16];
        for t in 0..STEPS {
            let at = g * GROUP + t * STEP;
            let (wq, xq) = (&w.q[j * kp + at..][..STEP], &x.q[r * kp + at..][..STEP]);
            let sc = &w.scales[j * kp / 2 + (g * STEPS + t) * 32..][..32];
            for (lane, s) in sums.iter_mut().enumerate() {
                for pair in 0..2 {
                    let b = 4 * lane + 2 * pair;
                    let p = wq[b] as i32 * xq[b] as i8 as i32 + wq[b + 1] as i32 * xq[b + 1] as i8 as i32;
                    *s += p * sc[2 * lane + pair] as i32;
                }
            }
        }
        let (wd, xd) = (&w.d[j * kp / STEP + g * 16..][..16], &x.d[r * kp / STEP + g * 16..][..16]);
        for l in 0..16 {
            acc[l] = (sums[l] as f32).mul_add(wd[l] * xd[l], acc[l]);
        }
    }
    reduce16(acc)
}

/// One matmul: `y[r * y_stride + c] = q8(x[r]) . w[w_row0 + c] + bias[c]` for `r < m`, `c < n`.
#[derive(Clone, Copy)]
pub(crate) struct Job<'a> {
    pub x: &'a [f32],
    pub m: usize,
    pub w: WeightRows<'a>,
    pub w_row0: usize,
    pub n: usize,
    pub bias: Option<&'a [f32]>,
    pub y: Out,
    pub y_stride: usize,
}

/// `y[r * y_stride + c] = q8(x[r]) . w[w_row0 + c] + bias[c]`, as
/// [`crate::cpu::matmul::matmul`] with K-format weights, on `isa`'s kernel. The caller checks
/// [`supported_on`].
#[allow(clippy::too_many_arguments)]
pub fn matmul(isa: Isa, x: &[f32], m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    assert!(y.len() >= (m - 1) * y_stride + n && y_stride >= n, "matmul shapes");
    matmul_many(isa, &[Job { x, m, w, w_row0, n, bias, y: Out(y.as_mut_ptr()), y_stride }]);
}

/// Several matmuls into disjoint outputs (a grouped expert matmul's experts) in one parallel
/// loop over all their blocks of weight rows. The caller checks [`supported_on`] and that each
/// output lies inside memory it owns.
pub(crate) fn matmul_many(isa: Isa, jobs: &[Job]) {
    assert!(supported_on(isa), "the int8 product path has no {} kernel on this CPU", isa.name());
    for j in jobs {
        let k = j.w.cols;
        assert!(handles(j.w.dtype) && k.is_multiple_of(QK_K), "int8 products take whole K-format blocks");
        assert!(j.m >= 1 && j.x.len() >= j.m * k && j.y_stride >= j.n, "matmul shapes");
        assert!((j.w_row0 + j.n) * j.w.dtype.row_bytes(k) <= j.w.words.len() * 4, "weight rows");
    }
    let xs: Vec<Rows> = jobs
        .iter()
        .map(|j| {
            let mut rows = Rows::default();
            rows.shape(j.m, j.w.cols, false);
            quantise_rows(isa, j.x, j.m, &mut rows);
            rows
        })
        .collect();
    let tasks = crate::cpu::matmul::block_tasks(jobs.iter().map(|j| (j.m, j.w.cols, j.n)), BLOCK_ROWS);
    tasks.into_par_iter().for_each_init(Rows::default, |wq, (i, b0, b1)| {
        for blk in b0..b1 {
            run_block(isa, &jobs[i], &xs[i], blk, wq);
        }
    });
}

/// Weight rows `blk * BLOCK_ROWS..` of a job, all its input rows.
fn run_block(isa: Isa, job: &Job, xq: &Rows, blk: usize, wq: &mut Rows) {
    let Job { m, w, w_row0, n, bias, y: out, y_stride, .. } = *job;
    let k = w.cols;
    let c0 = blk * BLOCK_ROWS;
    let nb = BLOCK_ROWS.min(n - c0);
    wq.shape(nb, k, true);
    unpack_rows(isa, w, w_row0 + c0, wq, nb);
    // The next block's weight rows (most often this thread's next task) are asked for while the
    // tiles compute, a share at each tile: unpacking waited for them from memory otherwise.
    let rb_bytes = w.dtype.row_bytes(k);
    let next = (c0 + nb < n).then(|| {
        let bytes = bytemuck::cast_slice::<u32, u8>(w.words);
        let start = (w_row0 + c0 + nb) * rb_bytes;
        &bytes[start..start + BLOCK_ROWS.min(n - c0 - nb) * rb_bytes]
    });
    let tiles = nb.div_ceil(4) * m.div_ceil(4);
    let lines_per_tile = next.map_or(0, |b| b.len().div_ceil(64).div_ceil(tiles));
    let mut line = 0;
    let row_block = ((X_BLOCK_BYTES / xq.kp) / 4 * 4).max(4);
    for rb in (0..m).step_by(row_block) {
        let rb_end = (rb + row_block).min(m);
        for c in (0..nb).step_by(4) {
            let jn = 4.min(nb - c);
            for r in (rb..rb_end).step_by(4) {
                if let Some(next) = next {
                    for _ in 0..lines_per_tile {
                        if line * 64 < next.len() {
                            prefetch(&next[line * 64]);
                        }
                        line += 1;
                    }
                }
                let rn = 4.min(rb_end - r);
                let mut tile = [[0f32; 4]; 4];
                tile_of(isa, xq, r, rn, wq, c, jn, &mut tile);
                for (i, row) in tile.iter().enumerate().take(rn) {
                    for (j, &v) in row.iter().enumerate().take(jn) {
                        // SAFETY: each task writes only its own columns c0..c0 + nb of the rows.
                        unsafe { *out.0.add((r + i) * y_stride + c0 + c + j) = v + bias.map_or(0.0, |b| b[c0 + c + j]) };
                    }
                }
            }
        }
    }
}

/// Asks for the cache line of `at` into L2 (a hint: it never faults, and changes no result).
#[inline(always)]
fn prefetch(at: &u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching is a hint about a valid address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(at as *const u8 as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// `out[i][j]` for input rows `r..r + rn` and weight slots `c..c + jn` (each at most 4).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn tile_of(isa: Isa, x: &Rows, r: usize, rn: usize, w: &Rows, c: usize, jn: usize, out: &mut [[f32; 4]; 4]) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! pick {
            ($m:ident, $(($a:literal, $b:literal)),*) => {
                match (rn, jn) {
                    // SAFETY: the caller checked `supported_on(isa)`; the slots lie inside the rows.
                    $(($a, $b) => unsafe { $m::tile::<$a, $b>(x, r, w, c, out) },)*
                    _ => unreachable!("a {rn} x {jn} tile"),
                }
            };
        }
        match isa {
            Isa::Avx512 => return pick!(avx512vnni, (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4), (3, 1), (3, 2), (3, 3), (3, 4), (4, 1), (4, 2), (4, 3), (4, 4)),
            Isa::Avx2 => return pick!(avx2, (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4), (3, 1), (3, 2), (3, 3), (3, 4), (4, 1), (4, 2), (4, 3), (4, 4)),
            _ => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        for i in 0..rn {
            for j in 0..jn {
                // SAFETY: the caller checked `supported_on(isa)`; the slots lie inside the rows.
                out[i][j] = unsafe { neon::pair(x, r + i, w, c + j) };
            }
        }
        return;
    }
    for i in 0..rn {
        for j in 0..jn {
            out[i][j] = model(x, r + i, w, c + j);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512vnni {
    use std::arch::x86_64::*;

    use super::{Rows, CHUNK, GROUP, STEP, STEPS};

    /// [`super::model`] for `MR x NR` pairs at once: each step's input and weight registers are
    /// loaded once for the tile.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn tile<const MR: usize, const NR: usize>(x: &Rows, r: usize, w: &Rows, c: usize, out: &mut [[f32; 4]; 4]) {
        let (kp, k) = (x.kp, x.k);
        assert!(w.kp == kp && (r + MR) * kp <= x.q.len() && (c + NR) * kp <= w.q.len() && (c + NR) * kp / 2 <= w.scales.len(), "tile rows");
        let (xq, wq, sc) = (x.q.as_ptr(), w.q.as_ptr(), w.scales.as_ptr());
        // The offsets' dot first, each step's loads shared by the tile.
        let chunks = k / CHUNK;
        assert!((r + MR) * chunks <= x.lin.len() && (c + NR) * chunks <= w.lin.len(), "tile sums");
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        for at in (0..chunks).step_by(16) {
            let mut xl = [_mm512_setzero_ps(); MR];
            for i in 0..MR {
                xl[i] = _mm512_loadu_ps(x.lin.as_ptr().add((r + i) * chunks + at));
            }
            for j in 0..NR {
                let wl = _mm512_loadu_ps(w.lin.as_ptr().add((c + j) * chunks + at));
                for i in 0..MR {
                    acc[i][j] = _mm512_fmadd_ps(wl, xl[i], acc[i][j]);
                }
            }
        }
        for g in 0..kp / GROUP {
            let mut sums = [[_mm512_setzero_si512(); NR]; MR];
            for t in 0..STEPS {
                let at = g * GROUP + t * STEP;
                let mut xs = [_mm512_setzero_si512(); MR];
                for i in 0..MR {
                    xs[i] = _mm512_loadu_si512(xq.add((r + i) * kp + at) as *const _);
                }
                for j in 0..NR {
                    let wv = _mm512_loadu_si512(wq.add((c + j) * kp + at) as *const _);
                    let s = _mm512_loadu_si512(sc.add((c + j) * kp / 2 + (g * STEPS + t) * 32) as *const _);
                    for i in 0..MR {
                        sums[i][j] = _mm512_dpwssd_epi32(sums[i][j], _mm512_maddubs_epi16(wv, xs[i]), s);
                    }
                }
            }
            for i in 0..MR {
                let xd = _mm512_loadu_ps(x.d.as_ptr().add((r + i) * kp / STEP + g * 16));
                for j in 0..NR {
                    let wd = _mm512_loadu_ps(w.d.as_ptr().add((c + j) * kp / STEP + g * 16));
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[i][j]), _mm512_mul_ps(wd, xd), acc[i][j]);
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                out[i][j] = reduce(acc[i][j]);
            }
        }
    }

    /// [`super::reduce16`]'s order.
    #[inline(always)]
    unsafe fn reduce(v: __m512) -> f32 {
        let a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
    }
}

/// [`model`] in NEON registers, one input row and weight slot at a time (their 16 integer sums
/// and 16 accumulators fill half of NEON's 32 registers; a 4 x 4 tile's would spill).
#[cfg(target_arch = "aarch64")]
mod neon {
    use std::arch::aarch64::*;

    use super::{Rows, CHUNK, GROUP, STEP, STEPS};

    /// Input row `r` of `x` times weight slot `j` of `w`, [`super::model`]'s operations: the
    /// offsets' dot in four registers of four lanes (lanes 4q..4q+3 in register q), then each
    /// step's quarter q (bytes 16q..16q+15: lanes 4q..4q+3) multiplied to i16 pairs, scaled and
    /// paired into its lanes' exact i32 sums, each group's sums converted and scaled in.
    #[target_feature(enable = "neon")]
    pub unsafe fn pair(x: &Rows, r: usize, w: &Rows, j: usize) -> f32 {
        let (kp, k) = (x.kp, x.k);
        let chunks = k / CHUNK;
        assert!(w.kp == kp && (r + 1) * kp <= x.q.len() && (j + 1) * kp <= w.q.len() && (j + 1) * kp / 2 <= w.scales.len(), "pair rows");
        assert!((r + 1) * chunks <= x.lin.len() && (j + 1) * chunks <= w.lin.len() && (r + 1) * kp / STEP <= x.d.len() && (j + 1) * kp / STEP <= w.d.len(), "pair sums");
        let (xl, wl) = (x.lin.as_ptr().add(r * chunks), w.lin.as_ptr().add(j * chunks));
        let mut acc = [vdupq_n_f32(0.0); 4];
        for at in (0..chunks).step_by(16) {
            for (q, a) in acc.iter_mut().enumerate() {
                *a = vfmaq_f32(*a, vld1q_f32(wl.add(at + 4 * q)), vld1q_f32(xl.add(at + 4 * q)));
            }
        }
        let (xq, wq, sc) = (x.q.as_ptr().add(r * kp), w.q.as_ptr().add(j * kp), w.scales.as_ptr().add(j * kp / 2));
        for g in 0..kp / GROUP {
            let mut sums = [vdupq_n_s32(0); 4];
            for t in 0..STEPS {
                let (at, s_at) = (g * GROUP + t * STEP, (g * STEPS + t) * 32);
                for (q, sum) in sums.iter_mut().enumerate() {
                    // The weights' bytes are below 64, so they read as the same signed bytes.
                    let wv = vreinterpretq_s8_u8(vld1q_u8(wq.add(at + 16 * q)));
                    let xv = vld1q_s8(xq.add(at + 16 * q) as *const i8);
                    let pairs = vpaddq_s16(vmull_s8(vget_low_s8(wv), vget_low_s8(xv)), vmull_high_s8(wv, xv));
                    let s = vld1q_s16(sc.add(s_at + 8 * q));
                    let scaled = vpaddq_s32(vmull_s16(vget_low_s16(pairs), vget_low_s16(s)), vmull_high_s16(pairs, s));
                    *sum = vaddq_s32(*sum, scaled);
                }
            }
            let (xd, wd) = (x.d.as_ptr().add(r * kp / STEP + g * 16), w.d.as_ptr().add(j * kp / STEP + g * 16));
            for (q, a) in acc.iter_mut().enumerate() {
                *a = vfmaq_f32(*a, vcvtq_f32_s32(sums[q]), vmulq_f32(vld1q_f32(wd.add(4 * q)), vld1q_f32(xd.add(4 * q))));
            }
        }
        // reduce16's order: lanes i and i + 8, then i and i + 4, then i and i + 2, then the two.
        let b = vaddq_f32(vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[1], acc[3]));
        (vgetq_lane_f32::<0>(b) + vgetq_lane_f32::<2>(b)) + (vgetq_lane_f32::<1>(b) + vgetq_lane_f32::<3>(b))
    }
}

/// The unpacking and quantising above in AVX-512 registers: each 16-byte lane of a register of
/// decoded quants is one chunk, stored to its place in the layout.
#[cfg(target_arch = "x86_64")]
mod avx512unpack {
    use std::arch::x86_64::*;

    use super::{Rows, CHUNK, GROUP, STEP, STEPS};
    use crate::cpu::matmul::WeightRows;
    use crate::gpu::WeightDtype;
    use crate::quant::QK_K;

    #[inline(always)]
    fn half(b: &[u8], at: usize) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
    }

    /// Stores the four chunks of `v` (lane i is chunk `t[i]` of a block) at `q`, where chunk t
    /// goes to `q + t * STEP`.
    #[inline(always)]
    unsafe fn store_chunks(q: *mut u8, v: __m512i, t: [usize; 4]) {
        _mm_storeu_si128(q.add(t[0] * STEP) as *mut _, _mm512_castsi512_si128(v));
        _mm_storeu_si128(q.add(t[1] * STEP) as *mut _, _mm512_extracti32x4_epi32::<1>(v));
        _mm_storeu_si128(q.add(t[2] * STEP) as *mut _, _mm512_extracti32x4_epi32::<2>(v));
        _mm_storeu_si128(q.add(t[3] * STEP) as *mut _, _mm512_extracti32x4_epi32::<3>(v));
    }

    /// [`super::unpack_row`], the same bytes, scales and offsets.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn unpack_row(w: WeightRows, r: usize, rows: &mut Rows, j: usize) {
        let (k, rb, bb) = (w.cols, w.dtype.row_bytes(w.cols), w.dtype.block_bytes());
        let bytes = &bytemuck::cast_slice::<u32, u8>(w.words)[r * rb..(r + 1) * rb];
        let (kp, chunks) = (rows.kp, k / CHUNK);
        assert!((j + 1) * kp <= rows.q.len() && (j + 1) * kp / 2 <= rows.scales.len() && (j + 1) * chunks <= rows.lin.len() && (j + 1) * kp / STEP <= rows.d.len(), "slot {j}");
        let nib = _mm512_set1_epi8(0x0f);
        for (blk, b) in bytes.chunks_exact(bb).enumerate().take(k / QK_K) {
            let (g, lane) = (blk / 4, blk % 4);
            let q = rows.q.as_mut_ptr().add(j * kp + g * GROUP + lane * CHUNK);
            let p = b.as_ptr();
            // The chunks' integer scales (16 i16) and offsets (16 f32), and the block's scale.
            let (scales, offsets, d) = match w.dtype {
                WeightDtype::Q4K | WeightDtype::Q5K => {
                    let qs = p.add(if w.dtype == WeightDtype::Q4K { 16 } else { 48 });
                    let (v0, v1) = (_mm512_loadu_si512(qs as *const _), _mm512_loadu_si512(qs.add(64) as *const _));
                    let mut parts = [_mm512_and_si512(v0, nib), _mm512_and_si512(_mm512_srli_epi16::<4>(v0), nib), _mm512_and_si512(v1, nib), _mm512_and_si512(_mm512_srli_epi16::<4>(v1), nib)];
                    if w.dtype == WeightDtype::Q5K {
                        // Bit `sub` of qh[l] is the fifth bit of element l of sub-block `sub`.
                        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(16) as *const _));
                        let sixteen = _mm512_set1_epi8(16);
                        for (i, part) in parts.iter_mut().enumerate() {
                            // Part i holds sub-blocks (i / 2) * 4 + i % 2 and that + 2.
                            let sub = (i / 2) * 4 + i % 2;
                            let bits = _mm512_inserti64x4::<1>(_mm512_set1_epi8(1 << sub), _mm256_set1_epi8(1 << (sub + 2)));
                            *part = _mm512_mask_add_epi8(*part, _mm512_test_epi8_mask(qh, bits), *part, sixteen);
                        }
                    }
                    store_chunks(q, parts[0], [0, 1, 4, 5]);
                    store_chunks(q, parts[1], [2, 3, 6, 7]);
                    store_chunks(q, parts[2], [8, 9, 12, 13]);
                    store_chunks(q, parts[3], [10, 11, 14, 15]);
                    // The 6-bit scales and mins of the eight sub-blocks, four bytes at a time.
                    let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                    let (s0, s1, s2) = (word(4), word(8), word(12));
                    let sc = (s0 as u64 & 0x3f3f3f3f) | ((((s2 & 0x0f0f0f0f) | (((s0 >> 6) & 0x03030303) << 4)) as u64) << 32);
                    let mn = (s1 as u64 & 0x3f3f3f3f) | (((((s2 >> 4) & 0x0f0f0f0f) | (((s1 >> 6) & 0x03030303) << 4)) as u64) << 32);
                    // Each sub-block's value twice (its two chunks).
                    let pairs = _mm_set_epi8(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
                    let scales = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_cvtsi64_si128(sc as i64), pairs));
                    let mins = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi64_si128(mn as i64), pairs)));
                    (scales, _mm512_mul_ps(mins, _mm512_set1_ps(-half(b, 2))), half(b, 0))
                }
                WeightDtype::Q6K => {
                    let (a, bq) = (_mm512_loadu_si512(p as *const _), _mm512_loadu_si512(p.add(64) as *const _));
                    let (h0, h1) = (_mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128) as *const _)), _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(160) as *const _)));
                    let three = _mm512_set1_epi8(3);
                    // Two high bits from qh, shifted by `lo` in the first half and `hi` in the second.
                    let high = |h: __m512i, lo: u16, hi: u16| {
                        let counts = _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo as i16), _mm256_set1_epi16(hi as i16));
                        _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srlv_epi16(h, counts), three))
                    };
                    store_chunks(q, _mm512_or_si512(_mm512_and_si512(a, nib), high(h0, 0, 2)), [0, 1, 2, 3]);
                    store_chunks(q, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(a), nib), high(h0, 4, 6)), [4, 5, 6, 7]);
                    store_chunks(q, _mm512_or_si512(_mm512_and_si512(bq, nib), high(h1, 0, 2)), [8, 9, 10, 11]);
                    store_chunks(q, _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(bq), nib), high(h1, 4, 6)), [12, 13, 14, 15]);
                    let sc8 = _mm_loadu_si128(p.add(192) as *const _);
                    let d = half(b, 208);
                    let offsets = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_slli_epi32::<5>(_mm512_cvtepi8_epi32(sc8))), _mm512_set1_ps(-d));
                    (_mm256_cvtepi8_epi16(sc8), offsets, d)
                }
                _ => unreachable!("{} is not a K format", w.dtype.name()),
            };
            // Chunk t's scale in its lane's eight words of step t.
            let sc = rows.scales.as_mut_ptr().add(j * kp / 2 + g * STEPS * 32 + lane * 8);
            let scales = _mm512_castsi256_si512(scales);
            for quarter in 0..4 {
                // Scales 4 * quarter..+4, each in eight words.
                const EIGHTS: [i16; 32] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
                let pick = _mm512_add_epi16(_mm512_loadu_si512(EIGHTS.as_ptr() as *const _), _mm512_set1_epi16(4 * quarter as i16));
                let v = _mm512_permutexvar_epi16(pick, scales);
                let t = 4 * quarter;
                _mm_storeu_si128(sc.add(t * 32) as *mut _, _mm512_castsi512_si128(v));
                _mm_storeu_si128(sc.add((t + 1) * 32) as *mut _, _mm512_extracti32x4_epi32::<1>(v));
                _mm_storeu_si128(sc.add((t + 2) * 32) as *mut _, _mm512_extracti32x4_epi32::<2>(v));
                _mm_storeu_si128(sc.add((t + 3) * 32) as *mut _, _mm512_extracti32x4_epi32::<3>(v));
            }
            _mm512_storeu_ps(rows.lin.as_mut_ptr().add(j * chunks + blk * (QK_K / CHUNK)), offsets);
            _mm_storeu_ps(rows.d.as_mut_ptr().add(j * kp / STEP + Rows::block_scale_at(blk)), _mm_set1_ps(d));
        }
    }

    /// [`super::quantise_row`], the same bytes and sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn quantise_row(x: &[f32], q: &mut [u8], d: &mut [f32], lin: &mut [f32]) {
        let blocks = x.len() / QK_K;
        assert!(q.len() >= blocks.div_ceil(4) * GROUP && lin.len() >= blocks * (QK_K / CHUNK) && d.len() >= blocks.div_ceil(4) * 16, "quantised row");
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for blk in 0..blocks {
            let xp = x.as_ptr().add(blk * QK_K);
            let mut amax = _mm512_setzero_ps();
            for t in 0..QK_K / CHUNK {
                amax = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(xp.add(t * CHUNK))), amax);
            }
            // NaN elements are passed over as f32::max passes them (a NaN first operand gives
            // the second).
            let amax = _mm512_reduce_max_ps(amax);
            let scale = amax / 127.0;
            let inv = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            for t in 0..QK_K / CHUNK {
                let e = blk * QK_K + t * CHUNK;
                let v = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xp.add(t * CHUNK)), inv)), lo), hi);
                _mm_storeu_si128(q.as_mut_ptr().add(Rows::at(e).0) as *mut _, _mm512_cvtepi32_epi8(v));
                lin[e / CHUNK] = scale * _mm512_reduce_add_epi32(v) as f32;
            }
            d[Rows::block_scale_at(blk)..][..4].fill(scale);
        }
    }
}

/// The AVX2 kernel: each 64-byte step in two 256-bit halves (the first two blocks of a group,
/// then the other two), `vpmaddubsw` then `vpmaddwd` and an add where AVX-512 has `vpdpwssd`
/// (the same exact integer sums), the float steps in two halves of eight lanes: the same
/// operations as [`super::model`], to the bit. The weight slots are taken two at a time so
/// that the tile's sums stay in the sixteen registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Rows, CHUNK, GROUP, STEP, STEPS};
    use crate::cpu::matmul::WeightRows;
    use crate::gpu::WeightDtype;
    use crate::quant::{scale_min_k4, QK_K};

    #[inline(always)]
    fn half(b: &[u8], at: usize) -> f32 {
        half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
    }

    /// Stores the two chunks of `v` (lane i is chunk `t[i]` of a block) at `q`, where chunk t
    /// goes to `q + t * STEP`.
    #[inline(always)]
    unsafe fn store_chunks(q: *mut u8, v: __m256i, t: [usize; 2]) {
        _mm_storeu_si128(q.add(t[0] * STEP) as *mut _, _mm256_castsi256_si128(v));
        _mm_storeu_si128(q.add(t[1] * STEP) as *mut _, _mm256_extracti128_si256::<1>(v));
    }

    /// [`super::unpack_row`] in 256-bit registers, the same bytes, scales and offsets.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn unpack_row(w: WeightRows, r: usize, rows: &mut Rows, j: usize) {
        let (k, rb, bb) = (w.cols, w.dtype.row_bytes(w.cols), w.dtype.block_bytes());
        let bytes = &bytemuck::cast_slice::<u32, u8>(w.words)[r * rb..(r + 1) * rb];
        let (kp, chunks) = (rows.kp, k / CHUNK);
        assert!((j + 1) * kp <= rows.q.len() && (j + 1) * kp / 2 <= rows.scales.len() && (j + 1) * chunks <= rows.lin.len() && (j + 1) * kp / STEP <= rows.d.len(), "slot {j}");
        let (nib, three) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(3));
        let load = |p: *const u8| _mm256_loadu_si256(p as *const _);
        for (blk, b) in bytes.chunks_exact(bb).enumerate().take(k / QK_K) {
            let (g, lane) = (blk / 4, blk % 4);
            let q = rows.q.as_mut_ptr().add(j * kp + g * GROUP + lane * CHUNK);
            let p = b.as_ptr();
            // Each chunk's integer scale, and its offset (eight a register).
            let mut scales = [0i16; 16];
            let (offsets, d) = match w.dtype {
                WeightDtype::Q4K | WeightDtype::Q5K => {
                    let qs = p.add(if w.dtype == WeightDtype::Q4K { 16 } else { 48 });
                    let qh = load(p.add(16));
                    let sixteen = _mm256_set1_epi8(16);
                    for c in 0..4 {
                        // 32 bytes: the low nibbles are sub-block 2c, the high ones 2c + 1.
                        let v = load(qs.add(32 * c));
                        let mut lo = _mm256_and_si256(v, nib);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                        if w.dtype == WeightDtype::Q5K {
                            let (b0, b1) = (_mm256_set1_epi8((1u8 << (2 * c)) as i8), _mm256_set1_epi8((2u8 << (2 * c)) as i8));
                            lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen));
                            hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen));
                        }
                        store_chunks(q, lo, [4 * c, 4 * c + 1]);
                        store_chunks(q, hi, [4 * c + 2, 4 * c + 3]);
                    }
                    let dmin = half(b, 2);
                    let mut mins = [0f32; 16];
                    for sub in 0..8 {
                        let (sc, m) = scale_min_k4(sub, &b[4..16]);
                        scales[2 * sub..2 * sub + 2].fill(sc as i16);
                        mins[2 * sub..2 * sub + 2].fill(m as f32);
                    }
                    let neg = _mm256_set1_ps(-dmin);
                    ([_mm256_mul_ps(_mm256_loadu_ps(mins.as_ptr()), neg), _mm256_mul_ps(_mm256_loadu_ps(mins.as_ptr().add(8)), neg)], half(b, 0))
                }
                WeightDtype::Q6K => {
                    // Half n of 128: ql's 64 bytes (low nibbles, then high) with qh's 32 (two bits
                    // each, at shifts 0, 2, 4, 6).
                    for n in 0..2 {
                        let (a0, a1, h) = (load(p.add(64 * n)), load(p.add(64 * n + 32)), load(p.add(128 + 32 * n)));
                        let high = |s: i32| {
                            let v = match s {
                                0 => h,
                                2 => _mm256_srli_epi16::<2>(h),
                                4 => _mm256_srli_epi16::<4>(h),
                                _ => _mm256_srli_epi16::<6>(h),
                            };
                            _mm256_slli_epi16::<4>(_mm256_and_si256(v, three))
                        };
                        let t = 8 * n;
                        store_chunks(q, _mm256_or_si256(_mm256_and_si256(a0, nib), high(0)), [t, t + 1]);
                        store_chunks(q, _mm256_or_si256(_mm256_and_si256(a1, nib), high(2)), [t + 2, t + 3]);
                        store_chunks(q, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(a0), nib), high(4)), [t + 4, t + 5]);
                        store_chunks(q, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(a1), nib), high(6)), [t + 6, t + 7]);
                    }
                    let d = half(b, 208);
                    let sc8 = _mm_loadu_si128(p.add(192) as *const _);
                    let neg = _mm256_set1_ps(-d);
                    let off = |v: __m128i| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_slli_epi32::<5>(_mm256_cvtepi8_epi32(v))), neg);
                    for (t, s) in scales.iter_mut().enumerate() {
                        *s = b[192 + t] as i8 as i16;
                    }
                    ([off(sc8), off(_mm_srli_si128::<8>(sc8))], d)
                }
                _ => unreachable!("{} is not a K format", w.dtype.name()),
            };
            // Chunk t's scale in its lane's eight words of step t.
            let sc = rows.scales.as_mut_ptr().add(j * kp / 2 + g * STEPS * 32 + lane * 8);
            for (t, &v) in scales.iter().enumerate() {
                _mm_storeu_si128(sc.add(t * 32) as *mut _, _mm_set1_epi16(v));
            }
            let lin = rows.lin.as_mut_ptr().add(j * chunks + blk * (QK_K / CHUNK));
            _mm256_storeu_ps(lin, offsets[0]);
            _mm256_storeu_ps(lin.add(8), offsets[1]);
            _mm_storeu_ps(rows.d.as_mut_ptr().add(j * kp / STEP + Rows::block_scale_at(blk)), _mm_set1_ps(d));
        }
    }

    /// [`super::quantise_row`] compiled for AVX2.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantise_row(x: &[f32], q: &mut [u8], d: &mut [f32], lin: &mut [f32]) {
        super::quantise_row(x, q, d, lin)
    }

    /// [`super::model`] for `MR x NR` pairs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const MR: usize, const NR: usize>(x: &Rows, r: usize, w: &Rows, c: usize, out: &mut [[f32; 4]; 4]) {
        let mut j = 0;
        while j < NR {
            let mut pair = [[0f32; 4]; 4];
            if NR - j >= 2 {
                half_tile::<MR, 2>(x, r, w, c + j, &mut pair);
            } else {
                half_tile::<MR, 1>(x, r, w, c + j, &mut pair);
            }
            for i in 0..MR {
                out[i][j..j + 2.min(NR - j)].copy_from_slice(&pair[i][..2.min(NR - j)]);
            }
            j += 2;
        }
    }

    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn half_tile<const MR: usize, const NR: usize>(x: &Rows, r: usize, w: &Rows, c: usize, out: &mut [[f32; 4]; 4]) {
        let (kp, k) = (x.kp, x.k);
        assert!(w.kp == kp && (r + MR) * kp <= x.q.len() && (c + NR) * kp <= w.q.len() && (c + NR) * kp / 2 <= w.scales.len(), "tile rows");
        let (xq, wq, sc) = (x.q.as_ptr(), w.q.as_ptr(), w.scales.as_ptr());
        // Lanes 0-7 and 8-15 of each sum; the offsets' dot first.
        let chunks = k / CHUNK;
        assert!((r + MR) * chunks <= x.lin.len() && (c + NR) * chunks <= w.lin.len(), "tile sums");
        let mut acc = [[[_mm256_setzero_ps(); 2]; NR]; MR];
        for at in (0..chunks).step_by(16) {
            for h in 0..2 {
                let mut xl = [_mm256_setzero_ps(); MR];
                for i in 0..MR {
                    xl[i] = _mm256_loadu_ps(x.lin.as_ptr().add((r + i) * chunks + at + 8 * h));
                }
                for j in 0..NR {
                    let wl = _mm256_loadu_ps(w.lin.as_ptr().add((c + j) * chunks + at + 8 * h));
                    for i in 0..MR {
                        acc[i][j][h] = _mm256_fmadd_ps(wl, xl[i], acc[i][j][h]);
                    }
                }
            }
        }
        for g in 0..kp / GROUP {
            for h in 0..2 {
                let mut sums = [[_mm256_setzero_si256(); NR]; MR];
                for t in 0..STEPS {
                    let at = g * GROUP + t * STEP + h * 32;
                    let mut xs = [_mm256_setzero_si256(); MR];
                    for i in 0..MR {
                        xs[i] = _mm256_loadu_si256(xq.add((r + i) * kp + at) as *const _);
                    }
                    for j in 0..NR {
                        let wv = _mm256_loadu_si256(wq.add((c + j) * kp + at) as *const _);
                        let s = _mm256_loadu_si256(sc.add((c + j) * kp / 2 + (g * STEPS + t) * 32 + h * 16) as *const _);
                        for i in 0..MR {
                            sums[i][j] = _mm256_add_epi32(sums[i][j], _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xs[i]), s));
                        }
                    }
                }
                for i in 0..MR {
                    let xd = _mm256_loadu_ps(x.d.as_ptr().add((r + i) * kp / STEP + g * 16 + h * 8));
                    for j in 0..NR {
                        let wd = _mm256_loadu_ps(w.d.as_ptr().add((c + j) * kp / STEP + g * 16 + h * 8));
                        acc[i][j][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i][j]), _mm256_mul_ps(wd, xd), acc[i][j][h]);
                    }
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                // Lanes i and i + 8 first, as the 16-lane reduction adds them.
                let a = _mm256_add_ps(acc[i][j][0], acc[i][j][1]);
                let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let c2 = _mm_add_ps(b, _mm_movehl_ps(b, b));
                out[i][j] = _mm_cvtss_f32(_mm_add_ss(c2, _mm_shuffle_ps::<1>(c2, c2)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::matmul::tests::nmse;
    use crate::kernels::matmul::reference;

    const FORMATS: [WeightDtype; 3] = [WeightDtype::Q4K, WeightDtype::Q5K, WeightDtype::Q6K];

    fn inputs(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0;
                // Some outliers, as activations have.
                if i % 97 == 5 { v * 9.0 } else { v }
            })
            .collect()
    }

    fn weight(dtype: WeightDtype, rows: usize, k: usize, seed: u64, extremes: bool) -> (Vec<u32>, Vec<f32>) {
        let mut bytes = crate::quant::random_blocks(dtype, rows * k / QK_K, seed, extremes);
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        let mut deq = vec![0f32; rows * k];
        crate::quant::dequantize(dtype, &bytes, &mut deq);
        (words, deq)
    }

    /// The unpacked quants, scales and offsets give back the decoder's values: `d * scale * q +
    /// offset` for every element (the decoder's f32 rounding aside).
    #[test]
    fn unpacked_rows_give_the_decoded_values() {
        for dtype in FORMATS {
            let k = 5 * QK_K;
            let (words, deq) = weight(dtype, 3, k, 3, false);
            let w = WeightRows { words: &words, dtype, cols: k };
            let mut rows = Rows::default();
            rows.shape(3, k, true);
            for j in 0..3 {
                unpack_row(w, j, &mut rows, j);
            }
            for j in 0..3 {
                for e in 0..k {
                    let (at, step) = Rows::at(e);
                    let blk = e / QK_K;
                    let d = rows.d[j * rows.kp / STEP + Rows::block_scale_at(blk)];
                    let sc = rows.scales[j * rows.kp / 2 + step * 32 + (blk % 4) * 8] as f32;
                    let q = rows.q[j * rows.kp + at] as f32;
                    let v = d * sc * q + rows.lin[j * (k / CHUNK) + e / CHUNK];
                    let want = deq[j * k + e];
                    assert!((v - want).abs() <= 1e-5 * want.abs().max(d * 64.0), "{} row {j} element {e}: {v} vs {want}", dtype.name());
                }
            }
        }
    }

    /// The vector unpacking and quantising give the scalar code's bytes, scales and sums
    /// (blocks with extreme scales; inputs with NaN, infinities, zeros and huge values).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_unpacking_and_quantising_match_the_scalar_code() {
        if !supported_on(Isa::Avx512) {
            eprintln!("no AVX512-VNNI on this CPU: the vector unpacking cannot be picked here");
            return;
        }
        let k = 7 * QK_K;
        for dtype in FORMATS {
            let (words, _) = weight(dtype, 4, k, 21, true);
            let w = WeightRows { words: &words, dtype, cols: k };
            let (mut a, mut b) = (Rows::default(), Rows::default());
            a.shape(4, k, true);
            b.shape(4, k, true);
            unpack_rows(Isa::Avx512, w, 0, &mut a, 4);
            for j in 0..4 {
                unpack_row(w, j, &mut b, j);
            }
            let mut c = Rows::default();
            c.shape(4, k, true);
            unpack_rows(Isa::Avx2, w, 0, &mut c, 4);
            assert_eq!(c.q, b.q, "{} quants (AVX2)", dtype.name());
            assert_eq!(c.scales, b.scales, "{} scales (AVX2)", dtype.name());
            assert_eq!(c.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} block scales (AVX2)", dtype.name());
            assert_eq!(c.lin.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.lin.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} offsets (AVX2)", dtype.name());
            assert_eq!(a.q, b.q, "{} quants", dtype.name());
            assert_eq!(a.scales, b.scales, "{} scales", dtype.name());
            assert_eq!(a.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} block scales", dtype.name());
            assert_eq!(a.lin.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.lin.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} offsets", dtype.name());
        }
        let mut x = inputs(3 * k, 5);
        for (i, v) in [f32::NAN, f32::INFINITY, -0.0, 3e38, -1e-40, 0.5].into_iter().enumerate() {
            x[QK_K + 37 * i] = v;
        }
        x[2 * QK_K..3 * QK_K].fill(0.0);
        x[4 * QK_K + 9] = f32::NEG_INFINITY;
        let (mut a, mut b) = (Rows::default(), Rows::default());
        a.shape(3, k, false);
        b.shape(3, k, false);
        quantise_rows(Isa::Avx512, &x, 3, &mut a);
        for r in 0..3 {
            let (q, d, lin) = (&mut b.q[r * b.kp..(r + 1) * b.kp], &mut b.d[r * b.kp / STEP..(r + 1) * b.kp / STEP], &mut b.lin[r * (k / CHUNK)..(r + 1) * (k / CHUNK)]);
            quantise_row(&x[r * k..(r + 1) * k], q, d, lin);
        }
        assert_eq!(a.q, b.q, "quantised inputs");
        assert_eq!(a.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.d.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "input scales");
        assert_eq!(a.lin.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.lin.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "input sums");
    }

    /// Buffers that held other rows (garbage where the padding goes) give what fresh ones give.
    #[test]
    fn reused_buffers_give_what_fresh_ones_give() {
        let (m, n) = (2, 3);
        for k in [6 * QK_K, 5 * QK_K] {
            let (words, _) = weight(WeightDtype::Q4K, n, k, 2, false);
            let w = WeightRows { words: &words, dtype: WeightDtype::Q4K, cols: k };
            let x = inputs(m * k, 3);
            let (mut fresh, mut reused, mut xf, mut xr) = (Rows::default(), Rows::default(), Rows::default(), Rows::default());
            for rows in [&mut reused, &mut xr] {
                rows.q = vec![0x7f; 4 * 4 * GROUP];
                rows.scales = vec![-3; 4 * 4 * GROUP];
                rows.d = vec![f32::NAN; 4 * 4 * GROUP];
                rows.lin = vec![f32::NAN; 4 * 4 * GROUP];
            }
            for (rows, xs) in [(&mut fresh, &mut xf), (&mut reused, &mut xr)] {
                rows.shape(n, k, true);
                unpack_rows(Isa::detected(), w, 0, rows, n);
                xs.shape(m, k, false);
                quantise_rows(Isa::detected(), &x, m, xs);
            }
            for r in 0..m {
                for j in 0..n {
                    let mut a = [[0f32; 4]; 4];
                    let mut b = [[0f32; 4]; 4];
                    tile_of(Isa::detected(), &xf, r, 1, &fresh, j, 1, &mut a);
                    tile_of(Isa::detected(), &xr, r, 1, &reused, j, 1, &mut b);
                    assert_eq!(a[0][0].to_bits(), b[0][0].to_bits(), "k {k}: ({r}, {j}): {} vs {}", a[0][0], b[0][0]);
                }
            }
        }
    }

    /// The quantised inputs give back the inputs within half a step of their block's scale.
    #[test]
    fn quantised_inputs_are_within_half_a_step() {
        let k = 3 * QK_K;
        let x = inputs(2 * k, 9);
        let mut rows = Rows::default();
        rows.shape(2, k, false);
        quantise_rows(Isa::Portable, &x, 2, &mut rows);
        for r in 0..2 {
            for e in 0..k {
                let (at, _) = Rows::at(e);
                let blk = e / QK_K;
                let d = rows.d[r * rows.kp / STEP + Rows::block_scale_at(blk)];
                let v = rows.q[r * rows.kp + at] as i8 as f32 * d;
                assert!((v - x[r * k + e]).abs() <= 0.5001 * d, "row {r} element {e}");
            }
        }
    }

    /// The scheme itself (the scalar model, on any CPU) against the reference matmul on the
    /// decoded weights: the inputs' 8-bit rounding is the only difference.
    #[test]
    fn the_model_is_the_product_with_quantised_inputs() {
        for dtype in FORMATS {
            let (m, n, k) = (3, 5, 6 * QK_K);
            let x = inputs(m * k, 4);
            let (words, deq) = weight(dtype, n, k, 8, false);
            let w = WeightRows { words: &words, dtype, cols: k };
            let (mut xq, mut wq) = (Rows::default(), Rows::default());
            xq.shape(m, k, false);
            quantise_rows(Isa::Portable, &x, m, &mut xq);
            wq.shape(n, k, true);
            for j in 0..n {
                unpack_row(w, j, &mut wq, j);
            }
            let got: Vec<f32> = (0..m).flat_map(|r| (0..n).map(|j| model(&xq, r, &wq, j)).collect::<Vec<_>>()).collect();
            let want = reference(&x, &deq, None, m, n, k);
            let e = nmse(&got, &want);
            assert!(e < 1e-3, "{}: nmse {e:e}", dtype.name());
            // And each input row's own rounding explains it: the same product on the rounded inputs.
            let xr: Vec<f32> = (0..m * k)
                .map(|i| {
                    let (r, e) = (i / k, i % k);
                    let (at, _) = Rows::at(e);
                    let blk = e / QK_K;
                    xq.q[r * xq.kp + at] as i8 as f32 * xq.d[r * xq.kp / STEP + Rows::block_scale_at(blk)]
                })
                .collect();
            let exact = reference(&xr, &deq, None, m, n, k);
            let e = nmse(&got, &exact);
            assert!(e < 1e-9, "{} on the rounded inputs: nmse {e:e}", dtype.name());
        }
    }

    /// The vector kernel gives the scalar model's bits at awkward shapes (rows and weight rows
    /// not multiples of the tile, lengths not whole groups, blocks with extreme scales), the
    /// output poisoned and written at a stride, through both `matmul` and `matmul_many`; a row
    /// alone gets the bits it gets among others.
    #[test]
    fn the_kernel_matches_the_model_bit_for_bit() {
        let isas: Vec<Isa> = Isa::available().into_iter().filter(|&i| supported_on(i)).collect();
        if isas.is_empty() {
            eprintln!("no AVX2 or AVX512-VNNI on this CPU: the int8 product path cannot be picked here");
            return;
        }
        for (isa, dtype) in isas.iter().flat_map(|&i| FORMATS.map(|d| (i, d))) {
            for (m, n, k) in [(1, 1, QK_K), (3, 17, 3 * QK_K), (7, 5, 4 * QK_K), (17, 33, 5 * QK_K), (66, 21, 14 * QK_K), (5, 70, 9 * QK_K)] {
                let x = inputs(m * k, (m * n) as u64);
                let (words, _) = weight(dtype, n + 3, k, k as u64, true);
                let w = WeightRows { words: &words, dtype, cols: k };
                let bias = inputs(n, 77);
                let stride = n + 5;
                let mut y = vec![f32::NAN; m * stride + 2];
                matmul(isa, &x, m, w, 3, n, Some(&bias), &mut y[2..], stride);
                assert!(y[..2].iter().all(|v| v.is_nan()), "wrote before the output");
                let (mut xq, mut wq) = (Rows::default(), Rows::default());
                xq.shape(m, k, false);
                quantise_rows(Isa::Portable, &x, m, &mut xq);
                wq.shape(n, k, true);
                for j in 0..n {
                    unpack_row(w, 3 + j, &mut wq, j);
                }
                for r in 0..m {
                    for c in 0..n {
                        let want = model(&xq, r, &wq, c) + bias[c];
                        let got = y[2 + r * stride + c];
                        assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{} {} {m}x{n}x{k} at ({r}, {c}): {got} vs {want}", isa.name(), dtype.name());
                    }
                }
                let last = m - 1;
                let mut alone = vec![f32::NAN; n];
                matmul(isa, &x[last * k..], 1, w, 3, n, Some(&bias), &mut alone, n);
                let among: Vec<f32> = y[2 + last * stride..2 + last * stride + n].to_vec();
                assert_eq!(alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), among.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{} {m}x{n}x{k}: the last row alone", dtype.name());
                // Two jobs in one loop: each gets what it gets alone.
                let mut both = vec![f32::NAN; m * n + n];
                let jobs = [
                    Job { x: &x, m, w, w_row0: 3, n, bias: None, y: Out(both.as_mut_ptr()), y_stride: n },
                    Job { x: &x[last * k..], m: 1, w, w_row0: 3, n, bias: None, y: Out(both[m * n..].as_mut_ptr()), y_stride: n },
                ];
                matmul_many(isa, &jobs);
                for c in 0..n {
                    assert_eq!((both[last * n + c] + bias[c]).to_bits(), among[c].to_bits(), "{}: the first job", dtype.name());
                    assert_eq!(both[m * n + c].to_bits(), both[last * n + c].to_bits(), "{}: the second job", dtype.name());
                }
            }
        }
    }
}
