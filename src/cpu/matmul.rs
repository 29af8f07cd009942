//! `y = x W^T (+ bias)` on the host, for every weight type the GPU kernels read. Many input rows
//! (prefill, expert chunks): the `gemm` crate's f32 kernel, with bf16/f16 weights widened to f32
//! a bounded block of rows at a time (f32 weights are read in place). Few rows (decode): dot
//! products in register tiles (AVX-512 and AVX2 intrinsics reading bf16 rows directly, NEON and
//! portable tiles left to the compiler over widened rows), one row through the
//! [`simd`](super::simd) primitives; this is bound by reading the weights, as decode is.

use rayon::prelude::*;

use crate::cpu::simd::{dot, Isa, Values};
use crate::gpu::WeightDtype;

/// From this many input rows the gemm path pays for its packing and widening, on each path
/// (measured with `cargo bench -- "cpu matmul"` and at the benchmark model's expert shapes: the
/// AVX-512 tile beats gemm by 10-25% at 511 rows and matches it at 768, where its re-reads of the
/// inputs start to cost; the AVX2 tile matches gemm up to 512; the compiler-vectorised tiles lose
/// to it from about 128).
pub fn gemm_min_rows(isa: Isa) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => 768,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => 512,
        _ => 128,
    }
}
/// Weight elements widened at once on the gemm path (16 MiB of f32).
const WIDE_BLOCK: usize = 4 << 20;
/// Input bytes the dot path's tiles pass over at once (half of a typical L2).
const X_BLOCK_BYTES: usize = 256 << 10;
/// Up to this many input rows the intrinsics tiles decode a block format a unit at a time in
/// registers (each tile of input rows decodes again), beyond them the task's weight rows are
/// widened into memory once (the same values and sums either way). Measured at 5632x2048 on 2
/// threads, both ways interleaved: on AVX-512 Q8_0 and Q4_0 in registers are 1.2-1.9x the widened
/// rows from 1 to 64 rows, Q4_K 1.1-1.5x up to 16 and even at 32; on AVX2 Q8_0 1.1-1.4x up to 8,
/// Q4_0 and Q4_K 1.05-1.15x at 1-2 rows, behind from 4.
fn unit_decode_rows(isa: Isa, dtype: WeightDtype) -> usize {
    match (isa, dtype) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, WeightDtype::Q8_0 | WeightDtype::Q4_0) => 64,
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, WeightDtype::Q4K) => 16,
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, WeightDtype::Q8_0) => 8,
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, WeightDtype::Q4_0 | WeightDtype::Q4K) => 2,
        _ => 0,
    }
}
/// Weight rows one task of the dot path takes (at least).
const DOT_BLOCK: usize = 16;
/// Multiply-adds worth a rayon task.
const MIN_TASK_MACS: usize = 1 << 18;

/// A weight matrix's stored elements, `[rows, cols]` row-major.
#[derive(Clone, Copy)]
pub struct WeightRows<'a> {
    pub words: &'a [u32],
    pub dtype: WeightDtype,
    pub cols: usize,
}

impl WeightRows<'_> {
    /// Rows `r0..r0 + n` as f32 into `out`.
    pub fn widen(&self, r0: usize, n: usize, out: &mut Vec<f32>) {
        out.resize(n * self.cols, 0.0);
        self.widen_into(r0, out);
    }

    /// Rows from `r0` as f32 into all of `out` (a whole number of rows).
    fn widen_into(&self, r0: usize, out: &mut [f32]) {
        let (a, b) = (r0 * self.cols, r0 * self.cols + out.len());
        match self.dtype {
            WeightDtype::F32 => out.copy_from_slice(&bytemuck::cast_slice::<u32, f32>(self.words)[a..b]),
            WeightDtype::Bf16 => {
                for (o, &h) in out.iter_mut().zip(&bytemuck::cast_slice::<u32, u16>(self.words)[a..b]) {
                    *o = f32::from_bits((h as u32) << 16);
                }
            }
            WeightDtype::F16 => {
                for (o, &h) in out.iter_mut().zip(&bytemuck::cast_slice::<u32, u16>(self.words)[a..b]) {
                    *o = half::f16::from_bits(h).to_f32();
                }
            }
            q => {
                // Element by element, so the vector width changes no bit.
                let start = r0 * q.row_bytes(self.cols);
                decode(Isa::detected(), q, &bytemuck::cast_slice::<u32, u8>(self.words)[start..], out);
            }
        }
    }

    /// Row `r` as the vector primitives read it (f16 has no such form: widened first).
    fn row_values(&self, r: usize) -> Values<'_> {
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match self.dtype {
            WeightDtype::F32 => Values::F32(&bytemuck::cast_slice::<u32, f32>(self.words)[a..b]),
            WeightDtype::Bf16 => Values::Bf16(&bytemuck::cast_slice::<u32, u16>(self.words)[a..b]),
            _ => unreachable!("f16 and block-quantised rows are widened before the dot products"),
        }
    }

    /// Rows `r0..r0 + n` of an f32 weight, in place.
    fn f32_rows(&self, r0: usize, n: usize) -> &[f32] {
        assert_eq!(self.dtype, WeightDtype::F32, "the compiler-vectorised tiles read f32 rows");
        &bytemuck::cast_slice::<u32, f32>(self.words)[r0 * self.cols..(r0 + n) * self.cols]
    }

    /// Rows `r0..r0 + n` widened in parallel (the gemm path's blocks).
    fn widen_par(&self, r0: usize, n: usize, out: &mut Vec<f32>) {
        let k = self.cols;
        out.resize(n * k, 0.0);
        out.par_chunks_mut(k * 64).enumerate().for_each(|(i, chunk)| self.widen_into(r0 + i * 64, chunk));
    }
}

/// The output's base pointer, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y[r * y_stride + c] = x[r] . w[w_row0 + c] + bias[c]` for `r < m`, `c < n`: `x` is
/// `[m, w.cols]`, `y` starts at the first output element and holds `(m - 1) * y_stride + n`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(isa: Isa, x: &[f32], m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    let k = w.cols;
    assert!(x.len() >= m * k && y.len() >= (m - 1) * y_stride + n && y_stride >= n, "matmul shapes");
    #[cfg(target_arch = "x86_64")]
    if w.dtype == WeightDtype::Bf16 && isa == Isa::Avx512 && crate::cpu::bf16_products::enabled() {
        return crate::cpu::bf16_products::matmul(x, m, w, w_row0, n, bias, y, y_stride);
    }
    if int8_path(isa, w.dtype) {
        return crate::cpu::int8_products::matmul(isa, x, m, w, w_row0, n, bias, y, y_stride);
    }
    if takes_int8_32(isa, w.dtype) {
        let job = crate::cpu::int8_products::Job { x, m, w, w_row0, n, bias, y: Out(y.as_mut_ptr()), y_stride };
        return crate::cpu::gpu_int8::matmul_many(isa, &[job]);
    }
    if m >= gemm_min_rows(isa) {
        gemm_path(x, m, w, w_row0, n, bias, y, y_stride);
    } else {
        dot_path(isa, x, m, w, w_row0, n, bias, y, y_stride);
    }
}

/// Whether a matmul over `dtype` takes the int8 product path (`--cpu-compute int8`).
fn int8_path(isa: Isa, dtype: WeightDtype) -> bool {
    crate::cpu::int8_products::takes(dtype) && crate::cpu::int8_products::supported_on(isa)
}

/// Whether `isa` is a path where Q8_0 and Q4_0 take 8-bit products under `--cpu-compute int8`.
pub fn int8_32_on(isa: Isa) -> bool {
    isa.name() == "avx2"
}

/// Whether a matmul over `dtype` on `isa` takes the 8-bit path of the 32-element block formats
/// (`--cpu-compute int8` over Q8_0 and Q4_0: `cpu::gpu_int8`). Only on AVX2, where it is faster
/// than decoding the blocks into f32 (1.27x on the benchmark model's Q8_0 job, where the AVX-512
/// path's f32 tiles, which decode the blocks in registers, were 1.15-1.2x faster than it; NEON
/// unmeasured): elsewhere they keep f32 compute.
pub fn takes_int8_32(isa: Isa, dtype: WeightDtype) -> bool {
    int8_32_on(isa) && crate::cpu::int8_products::enabled() && matches!(dtype, WeightDtype::Q8_0 | WeightDtype::Q4_0)
}

#[allow(clippy::too_many_arguments)]
fn gemm_path(x: &[f32], m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    let k = w.cols;
    if let Some(b) = bias {
        for r in 0..m {
            y[r * y_stride..r * y_stride + n].copy_from_slice(&b[..n]);
        }
    }
    let block = (WIDE_BLOCK / k.max(1)).max(1);
    let mut wide = Vec::new();
    for c0 in (0..n).step_by(block) {
        let nb = block.min(n - c0);
        let rows: &[f32] = if w.dtype == WeightDtype::F32 {
            &bytemuck::cast_slice::<u32, f32>(w.words)[(w_row0 + c0) * k..(w_row0 + c0 + nb) * k]
        } else {
            w.widen_par(w_row0 + c0, nb, &mut wide);
            &wide
        };
        // SAFETY: every pointer and stride describes memory inside `x`, `rows` and `y`, checked
        // above: lhs `[m, k]` row-major, rhs `W^T` (`[k, nb]` read from `[nb, k]` rows), dst
        // `[m, nb]` at column `c0` with rows `y_stride` apart.
        unsafe {
            gemm::gemm(
                m,
                nb,
                k,
                y.as_mut_ptr().add(c0),
                1,
                y_stride as isize,
                bias.is_some(),
                x.as_ptr(),
                1,
                k as isize,
                rows.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn dot_path(isa: Isa, x: &[f32], m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    let job = DotJob { x, m, w, w_row0, n, bias, y: Out(y.as_mut_ptr()), y_stride };
    // Small matrices in few tasks: a task costs more than a few thousand multiply-adds.
    let per_task = (MIN_TASK_MACS / (DOT_BLOCK * w.cols * m).max(1)).max(1);
    (0..n.div_ceil(DOT_BLOCK)).into_par_iter().with_min_len(per_task).for_each_init(Scratch::default, |scratch, blk| dot_block(isa, &job, blk, scratch));
}

/// One matmul of the dot path, its output behind a pointer so that the matmuls of a batch
/// ([`matmul_many`]) can run in one parallel loop.
#[derive(Clone, Copy)]
struct DotJob<'a> {
    x: &'a [f32],
    m: usize,
    w: WeightRows<'a>,
    w_row0: usize,
    n: usize,
    bias: Option<&'a [f32]>,
    y: Out,
    y_stride: usize,
}

/// A task's buffers: widened weight rows, the block's unit scales.
type Scratch = (Vec<f32>, Vec<[f32; 2]>);

/// Weight rows `blk * DOT_BLOCK..` of a dot-path matmul, all its input rows.
fn dot_block(isa: Isa, job: &DotJob, blk: usize, (wide, scales): &mut Scratch) {
    let DotJob { x, m, w, w_row0, n, bias, y: out, y_stride } = *job;
    let k = w.cols;
    let c0 = blk * DOT_BLOCK;
    let nb = DOT_BLOCK.min(n - c0);
    // SAFETY: each task writes only its own columns c0..c0 + nb of the rows of `y`.
    let put = |r: usize, c: usize, v: f32| unsafe { *out.0.add(r * y_stride + c0 + c) = v + bias.map_or(0.0, |b| b[c0 + c]) };
    // The intrinsics tiles read the stored rows (bf16 widened in registers, and block formats
    // decoded there up to `unit_decode_rows`); other paths, and block formats past that, widen
    // the block's rows to f32 first. One row of a block format widened: its weight rows decoded
    // a few at a time into a buffer that stays in L1 (the same values and products as the
    // widened block's).
    let in_units = m <= unit_decode_rows(isa, w.dtype);
    if m == 1 && w.dtype.is_quantised() && !in_units {
        // On the intrinsics paths four rows at a time, through the one-row tile that the
        // same row takes in a batch.
        let group = if reads_stored_rows(isa) { 4 } else { 1 };
        wide.resize(group * k, 0.0);
        for c in (0..nb).step_by(group) {
            let jn = group.min(nb - c);
            for j in 0..jn {
                let start = (w_row0 + c0 + c + j) * w.dtype.row_bytes(k);
                decode(isa, w.dtype, &bytemuck::cast_slice::<u32, u8>(w.words)[start..], &mut wide[j * k..(j + 1) * k]);
            }
            if reads_stored_rows(isa) {
                let rows = WeightRows { words: bytemuck::cast_slice(&wide[..jn * k]), dtype: WeightDtype::F32, cols: k };
                let mut tile = [[0f32; 4]; 4];
                dot_tile(isa, 1, jn, &x[..k], rows, 0, &[], Prefetch::NONE, &mut tile);
                for (j, &v) in tile[0].iter().enumerate().take(jn) {
                    put(0, c + j, v);
                }
            } else {
                put(0, c, dot(isa, &x[..k], Values::F32(&wide[..k])));
            }
        }
        return;
    }
    let direct = in_units || matches!(w.dtype, WeightDtype::F32 | WeightDtype::Bf16) && (m == 1 || reads_stored_rows(isa));
    // Decoded in registers: the block's unit scales first, shared by its tiles of input rows.
    let units = if in_units { k / crate::quant::UNIT } else { 0 };
    if in_units {
        scales.resize(nb * units, [0.0; 2]);
        let (rb, bytes) = (w.dtype.row_bytes(k), bytemuck::cast_slice::<u32, u8>(w.words));
        for (j, out) in scales.chunks_exact_mut(units).enumerate() {
            let r = w_row0 + c0 + j;
            crate::quant::unit_scales(w.dtype, &bytes[r * rb..(r + 1) * rb], k, out);
        }
    }
    let tile_scales = |c: usize| if in_units { &scales[c * units..] } else { &[][..] };
    let (rows, row0) = if direct {
        (w, w_row0 + c0)
    } else {
        w.widen(w_row0 + c0, nb, wide);
        (WeightRows { words: bytemuck::cast_slice(&wide[..]), dtype: WeightDtype::F32, cols: k }, 0)
    };
    let mr = tile_rows(isa);
    if reads_stored_rows(isa) {
        // The intrinsics tiles take every output, the edges in smaller tiles of the same
        // sums: a row's result does not depend on the rows batched with it.
        // The input rows a block at a time, small enough to stay in L2 while the block's
        // weight rows pass over them (all of them at once, re-read for each group of four
        // weight rows, came from L3 at prefill sizes).
        let row_block = ((X_BLOCK_BYTES / (4 * k).max(1)) / mr * mr).max(mr);
        for rb in (0..m).step_by(row_block) {
            let rb_end = (rb + row_block).min(m);
            for c in (0..nb).step_by(4) {
                let jn = 4.min(nb - c);
                // The first row tile of a group also fetches the next group's weight rows
                // (the next block's, at its end), so that memory is read while the other
                // row tiles compute: without it, each group waited for its rows from memory.
                let next = row0 + c + 4;
                let ahead = if direct && rb == 0 && next < w_row0 + n { Prefetch { row: next, rows: 4.min(w_row0 + n - next) } } else { Prefetch::NONE };
                for r in (rb..rb_end).step_by(mr) {
                    let rn = mr.min(rb_end - r);
                    let mut tile = [[0f32; 4]; 4];
                    let ahead = if r == rb { ahead } else { Prefetch::NONE };
                    dot_tile(isa, rn, jn, &x[r * k..(r + rn) * k], rows, row0 + c, tile_scales(c), ahead, &mut tile);
                    for (i, row) in tile.iter().enumerate().take(rn) {
                        for (j, &v) in row.iter().enumerate().take(jn) {
                            put(r + i, c + j, v);
                        }
                    }
                }
            }
        }
        return;
    }
    if m == 1 {
        for c in 0..nb {
            put(0, c, dot(isa, &x[..k], rows.row_values(row0 + c)));
        }
        return;
    }
    let (full_m, full_n) = (m / mr * mr, nb / 4 * 4);
    for c in (0..full_n).step_by(4) {
        for r in (0..full_m).step_by(mr) {
            let mut tile = [[0f32; 4]; 4];
            dot_tile(isa, mr, 4, &x[r * k..(r + mr) * k], rows, row0 + c, &[], Prefetch::NONE, &mut tile);
            for (i, row) in tile.iter().enumerate().take(mr) {
                for (j, &v) in row.iter().enumerate() {
                    put(r + i, c + j, v);
                }
            }
        }
    }
    // What the tiles leave: the last rows, and the last weight rows of the block.
    for r in 0..m {
        let cols = if r < full_m { full_n..nb } else { 0..nb };
        for c in cols {
            put(r, c, dot(isa, &x[r * k..(r + 1) * k], rows.row_values(row0 + c)));
        }
    }
}

/// One matmul of [`matmul_many`]: `(x, m, w, w_row0, n, y offset)`, for
/// `y[off + r * n + c] = x[r] . w[w_row0 + c]`.
pub type ManyJob<'a> = (&'a [f32], usize, WeightRows<'a>, usize, usize, usize);

/// Several matmuls into disjoint outputs (a grouped expert matmul's experts). Those
/// of few rows run in one parallel loop over all their blocks, so small experts cost one
/// fork-join in all rather than one each (at the default model's sizes that was most of their
/// time); those of many rows run one after another, each split as `matmul` splits it. Every
/// output gets the bits `matmul` gives it alone.
pub fn matmul_many(isa: Isa, jobs: &[ManyJob], y: &mut [f32]) {
    for &(x, m, w, _, n, off) in jobs {
        assert!(m >= 1 && x.len() >= m * w.cols && y.len() >= off + m * n, "matmul_many shapes");
    }
    #[cfg(target_arch = "x86_64")]
    let products = isa == Isa::Avx512 && crate::cpu::bf16_products::enabled();
    #[cfg(not(target_arch = "x86_64"))]
    let products = false;
    let int8 = |j: &ManyJob| int8_path(isa, j.2.dtype);
    let int8_32 = |j: &ManyJob| takes_int8_32(isa, j.2.dtype);
    let alone = |j: &ManyJob| !int8(j) && !int8_32(j) && (j.1 >= gemm_min_rows(isa) || (products && j.2.dtype == WeightDtype::Bf16));
    for &(x, m, w, w_row0, n, off) in jobs.iter().filter(|j| alone(j)) {
        matmul(isa, x, m, w, w_row0, n, None, &mut y[off..], n);
    }
    let base = Out(y.as_mut_ptr());
    // The jobs `keep` picks, with their outputs behind pointers.
    let picked = |keep: &dyn Fn(&ManyJob) -> bool| -> Vec<crate::cpu::int8_products::Job> {
        jobs.iter()
            .filter(|j| keep(j))
            // SAFETY: each job's output lies inside `y` (checked above).
            .map(|&(x, m, w, w_row0, n, off)| crate::cpu::int8_products::Job { x, m, w, w_row0, n, bias: None, y: Out(unsafe { base.0.add(off) }), y_stride: n })
            .collect()
    };
    // K formats with int8 products: all of them in one loop of their own; Q8_0 and Q4_0 with
    // int8 products in theirs.
    let int8_jobs = picked(&int8);
    if !int8_jobs.is_empty() {
        crate::cpu::int8_products::matmul_many(isa, &int8_jobs);
    }
    let int8_32_jobs = picked(&int8_32);
    if !int8_32_jobs.is_empty() {
        crate::cpu::gpu_int8::matmul_many(isa, &int8_32_jobs);
    }
    let dot: Vec<DotJob> = jobs
        .iter()
        .filter(|j| !alone(j) && !int8(j) && !int8_32(j))
        // SAFETY: each job's output lies inside `y` (checked above).
        .map(|&(x, m, w, w_row0, n, off)| DotJob { x, m, w, w_row0, n, bias: None, y: Out(unsafe { base.0.add(off) }), y_stride: n })
        .collect();
    let tasks = block_tasks(dot.iter().map(|j| (j.m, j.w.cols, j.n)), DOT_BLOCK);
    tasks.into_par_iter().for_each_init(Scratch::default, |scratch, (i, b0, b1)| {
        for blk in b0..b1 {
            dot_block(isa, &dot[i], blk, scratch);
        }
    });
}

/// The tasks of several matmuls (`(rows, k, weight rows)` each) over blocks of `block` weight
/// rows: `(matmul, first block, end block)`, at least MIN_TASK_MACS each (as one matmul's are),
/// never spanning matmuls.
pub(crate) fn block_tasks(jobs: impl Iterator<Item = (usize, usize, usize)>, block: usize) -> Vec<(usize, usize, usize)> {
    let mut tasks = Vec::new();
    for (i, (m, k, n)) in jobs.enumerate() {
        let per_task = (MIN_TASK_MACS / (block * k * m).max(1)).max(1);
        let blocks = n.div_ceil(block);
        tasks.extend((0..blocks).step_by(per_task).map(|b| (i, b, (b + per_task).min(blocks))));
    }
    tasks
}

/// Block-format rows into f32, compiled for the path's vector width (the decoder is inlined
/// into each wrapper; each enables exactly what `Isa::available` detected for its path).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn decode(isa: Isa, dtype: WeightDtype, src: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(dtype: WeightDtype, src: &[u8], out: &mut [f32]) {
            crate::quant::dequantize(dtype, src, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(dtype: WeightDtype, src: &[u8], out: &mut [f32]) {
            crate::quant::dequantize(dtype, src, out)
        }
        match isa {
            // SAFETY: the path is only chosen where detection found its instructions.
            Isa::Avx512 => return unsafe { avx512(dtype, src, out) },
            Isa::Avx2 => return unsafe { avx2(dtype, src, out) },
            _ => {}
        }
    }
    crate::quant::dequantize(dtype, src, out)
}

/// Whether the path's tile reads stored f32/bf16 rows itself (the intrinsics tiles do).
fn reads_stored_rows(isa: Isa) -> bool {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => true,
        _ => false,
    }
}

/// Input rows of one register tile on each path (by 4 weight rows): every (row, weight row) pair
/// of the tile shares the loads of both.
fn tile_rows(isa: Isa) -> usize {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => 4,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => 3,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => 4,
        Isa::Portable => 2,
    }
}

/// Weight rows a tile asks the memory system for while it computes (`rows` = 0: none).
#[derive(Clone, Copy)]
pub(crate) struct Prefetch {
    pub(crate) row: usize,
    pub(crate) rows: usize,
}

impl Prefetch {
    pub(crate) const NONE: Prefetch = Prefetch { row: 0, rows: 0 };
}

/// `out[i][j] = x[i * k..][..k] . w[w_row + j]` for `rows` rows of `x` (at most [`tile_rows`])
/// and `cols` weight rows (at most 4; f32 rows on the paths that do not [`reads_stored_rows`],
/// where only full tiles are asked for; block formats on those that do, with the rows' unit
/// scales, one row after another).
#[allow(clippy::too_many_arguments)]
fn dot_tile(isa: Isa, rows: usize, cols: usize, x: &[f32], w: WeightRows, w_row: usize, scales: &[[f32; 2]], ahead: Prefetch, out: &mut [[f32; 4]; 4]) {
    let k = w.cols;
    assert!(rows >= 1 && rows <= tile_rows(isa) && (1..=4).contains(&cols), "tile size");
    assert!(x.len() >= rows * k && (w_row + cols) * w.dtype.row_bytes(k) <= w.words.len() * 4, "tile shapes");
    assert!((ahead.row + ahead.rows) * w.dtype.row_bytes(k) <= w.words.len() * 4, "prefetched rows");
    assert!(!w.dtype.is_quantised() || (reads_stored_rows(isa) && scales.len() >= cols * (k / crate::quant::UNIT)), "unit scales");
    // One instance per size, so that the accumulators stay in registers.
    #[cfg(target_arch = "x86_64")]
    macro_rules! sized {
        ($m:ident, $($r:literal)+) => {
            match (rows, cols) {
                $( ($r, 1) => $m::tile::<$r, 1>(x, w, w_row, scales, ahead, out), ($r, 2) => $m::tile::<$r, 2>(x, w, w_row, scales, ahead, out), ($r, 3) => $m::tile::<$r, 3>(x, w, w_row, scales, ahead, out), ($r, 4) => $m::tile::<$r, 4>(x, w, w_row, scales, ahead, out), )+
                _ => unreachable!("checked above"),
            }
        };
    }
    match isa {
        // SAFETY: the path is only chosen where detection found its instructions; the bounds are
        // checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { sized!(avx512, 1 2 3 4) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { sized!(avx2, 1 2 3) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => tile::<4, 4, true>(x, w.f32_rows(w_row, 4), k, out),
        Isa::Portable => tile::<2, 8, false>(x, w.f32_rows(w_row, 4), k, out),
    }
}

/// Asks for the cache lines of the `ahead` rows at element `at` (a hint: it never faults, and
/// changes no result).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(w: WeightRows, ahead: Prefetch, at: usize) {
    let size = if w.dtype == WeightDtype::Bf16 { 2 } else { 4 };
    prefetch_bytes(w, w.cols * size, ahead, at * size);
}

/// [`prefetch`] at byte `at` of each row of `row_bytes`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_bytes(w: WeightRows, rb: usize, ahead: Prefetch, at: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let base = w.words.as_ptr() as *const i8;
    for j in 0..ahead.rows {
        // SAFETY: a prefetch reads nothing and never faults; the rows lie inside the weight
        // (checked by the caller).
        unsafe { _mm_prefetch::<_MM_HINT_T1>(base.add((ahead.row + j) * rb + at)) };
    }
}

/// The intrinsics tiles over block-format rows, on either width: each unit of weight rows
/// `w_row..w_row + J` decoded in registers ([`unpack`](super::unpack)) and multiplied into the
/// `R` input rows' accumulators (`acc[4 * i + j]`) a part at a time, each element into the lane
/// and in the order the widened rows' tile adds it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn unit_tile<S: super::unpack::Lanes, const R: usize, const J: usize>(acc: &mut [S::F; 16], x: &[f32], w: WeightRows, w_row: usize, scales: &[[f32; 2]], ahead: Prefetch) {
    use super::unpack::{self, part};
    let (k, rb) = (w.cols, w.dtype.row_bytes(w.cols));
    let rows = (w.words.as_ptr() as *const u8).add(w_row * rb);
    unpack::for_each_unit!(w.dtype, S, rows, rb, k, scales, J, |dt, u, units| {
        for p in 0..crate::quant::UNIT / S::N {
            let mut xv = [S::zero(); 4];
            for (i, v) in xv.iter_mut().enumerate().take(R) {
                *v = S::load(x.as_ptr().add(i * k + crate::quant::UNIT * u + S::N * p));
            }
            for (j, unit) in units.iter().enumerate().take(J) {
                let wv = part::<S>(dt, unit, p);
                for i in 0..R {
                    acc[4 * i + j] = S::fma(xv[i], wv, acc[4 * i + j]);
                }
            }
        }
    }, |at| { prefetch_bytes(w, rb, ahead, at) });
}

/// What an intrinsics tile's vector loop leaves past `body`, zero-padded to `lanes` (the padding
/// multiplies to nothing): of `rows` input rows into `xt`, and of weight rows `w_row..w_row + cols`
/// as stored (f32, or bf16 two to a word) into `wt`, each `lanes` elements apart.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn padded_tail(x: &[f32], rows: usize, cols: usize, w: WeightRows, w_row: usize, body: usize, lanes: usize, xt: &mut [f32], wt: &mut [u32]) {
    let k = w.cols;
    let rest = k - body;
    for i in 0..rows {
        xt[lanes * i..lanes * i + rest].copy_from_slice(&x[i * k + body..(i + 1) * k]);
    }
    let row0 = w_row * k;
    for j in 0..cols {
        let (from, to) = (row0 + j * k + body, row0 + (j + 1) * k);
        if w.dtype == WeightDtype::Bf16 {
            bytemuck::cast_slice_mut::<u32, u16>(wt)[lanes * j..lanes * j + rest].copy_from_slice(&bytemuck::cast_slice::<u32, u16>(w.words)[from..to]);
        } else {
            wt[lanes * j..lanes * j + rest].copy_from_slice(&w.words[from..to]);
        }
    }
}

/// The compiler-vectorised tile: `MR x 4` accumulators of `L` lanes (one vector register each
/// once the lane loops are vectorised), over f32 weight rows, then reduced.
#[inline(always)]
fn tile<const MR: usize, const L: usize, const FMA: bool>(x: &[f32], w: &[f32], k: usize, out: &mut [[f32; 4]; 4]) {
    let mut acc = [[[0f32; L]; 4]; MR];
    let body = k / L * L;
    let mut at = 0;
    while at < body {
        let mut xv = [[0f32; L]; MR];
        for (i, v) in xv.iter_mut().enumerate() {
            v.copy_from_slice(&x[i * k + at..i * k + at + L]);
        }
        for j in 0..4 {
            let mut wv = [0f32; L];
            wv.copy_from_slice(&w[j * k + at..j * k + at + L]);
            for i in 0..MR {
                for l in 0..L {
                    acc[i][j][l] = if FMA { xv[i][l].mul_add(wv[l], acc[i][j][l]) } else { xv[i][l] * wv[l] + acc[i][j][l] };
                }
            }
        }
        at += L;
    }
    for i in 0..MR {
        for j in 0..4 {
            let tail: f32 = (body..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            out[i][j] = acc[i][j].iter().sum::<f32>() + tail;
        }
    }
}

/// The AVX-512 register tile over stored weight rows: `R` input rows (up to 4) by `J` weight rows
/// (up to 4), a 16-lane accumulator each, bf16 widened by a shift as it is loaded; the last
/// `k % 16` products in one more step over zero-padded copies, and the sums reduced together by
/// a transposing tree (a reduction each cost as much as the loop at k = 256). Every size adds
/// each product into the same lane in the same order and reduces the same way, so an output does
/// not depend on the tile it came from. The caller checks the bounds.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::WeightRows;
    use crate::cpu::unpack;
    use crate::gpu::WeightDtype;

    /// One step: input rows at `xp` (stride `xs`), weight rows at element `i0 + j * ws`.
    #[inline(always)]
    unsafe fn step<const R: usize, const J: usize>(acc: &mut [__m512; 16], xp: *const f32, xs: usize, w: *const u32, bf16: bool, i0: usize, ws: usize) {
        let mut xv = [_mm512_setzero_ps(); 4];
        for (i, v) in xv.iter_mut().enumerate().take(R) {
            *v = _mm512_loadu_ps(xp.add(i * xs));
        }
        for j in 0..J {
            let at = i0 + j * ws;
            let wv = if bf16 {
                let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((w as *const u16).add(at) as *const __m256i));
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
            } else {
                _mm512_loadu_ps((w as *const f32).add(at))
            };
            for i in 0..R {
                acc[4 * i + j] = _mm512_fmadd_ps(xv[i], wv, acc[4 * i + j]);
            }
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn tile<const R: usize, const J: usize>(x: &[f32], w: WeightRows, w_row: usize, scales: &[[f32; 2]], ahead: super::Prefetch, out: &mut [[f32; 4]; 4]) {
        if w.dtype.is_quantised() {
            let mut acc = [_mm512_setzero_ps(); 16];
            super::unit_tile::<unpack::Avx512, R, J>(&mut acc, x, w, w_row, scales, ahead);
            return finish::<R, J>(&acc, out);
        }
        let k = w.cols;
        let mut acc = [_mm512_setzero_ps(); 16];
        let body = k / 16 * 16;
        let bf16 = w.dtype == WeightDtype::Bf16;
        // The loop compiled once per weight type, with nothing in it but the products and the
        // prefetches: left to the optimiser, the type test and the prefetch's bounds stayed in
        // it, reloaded from the stack, or not, as the crate's codegen units fell (10% of a run).
        if bf16 {
            body_loop::<R, J, true>(&mut acc, x, w, w_row, body, ahead);
        } else {
            body_loop::<R, J, false>(&mut acc, x, w, w_row, body, ahead);
        }
        if body < k {
            let (mut xt, mut wt) = ([0f32; 64], [0u32; 64]);
            super::padded_tail(x, R, J, w, w_row, body, 16, &mut xt, &mut wt);
            step::<R, J>(&mut acc, xt.as_ptr(), 16, wt.as_ptr(), bf16, 0, 16);
        }
        finish::<R, J>(&acc, out)
    }

    /// The tile's whole steps (`body` elements), each weight line of the `ahead` rows fetched
    /// once, at the step that starts it.
    #[inline(always)]
    unsafe fn body_loop<const R: usize, const J: usize, const BF16: bool>(acc: &mut [__m512; 16], x: &[f32], w: WeightRows, w_row: usize, body: usize, ahead: super::Prefetch) {
        let k = w.cols;
        let size = if BF16 { 2 } else { 4 };
        let (words, row0, row_bytes) = (w.words.as_ptr(), w_row * k, k * size);
        let next = (w.words.as_ptr() as *const i8).add(ahead.row * row_bytes);
        let mut at = 0;
        while at < body {
            step::<R, J>(acc, x.as_ptr().add(at), k, words, BF16, row0 + at, k);
            if (at * size).is_multiple_of(64) {
                for j in 0..ahead.rows {
                    _mm_prefetch::<_MM_HINT_T1>(next.add(j * row_bytes + at * size));
                }
            }
            at += 16;
        }
    }

    /// The sums of the tile's accumulators into `out`.
    #[inline(always)]
    unsafe fn finish<const R: usize, const J: usize>(acc: &[__m512; 16], out: &mut [[f32; 4]; 4]) {
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(acc));
        for (i, row) in out.iter_mut().enumerate().take(R) {
            row[..J].copy_from_slice(&sums[4 * i..4 * i + J]);
        }
    }

    /// Lane `n` of the result is the sum of `a[n]`'s sixteen lanes: pairs interleaved and added
    /// within 128-bit lanes, then the 128-bit lanes transposed and added. Each lane's sum reads
    /// only its own accumulator, in one order.
    #[inline(always)]
    unsafe fn reduce16(a: &[__m512; 16]) -> __m512 {
        let mut b = [_mm512_setzero_ps(); 8];
        for (p, v) in b.iter_mut().enumerate() {
            *v = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
        }
        let mut c = [_mm512_setzero_ps(); 4];
        for (q, v) in c.iter_mut().enumerate() {
            *v = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(b[2 * q], b[2 * q + 1]), _mm512_shuffle_ps::<0xEE>(b[2 * q], b[2 * q + 1]));
        }
        let d0 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c[0], c[1]), _mm512_shuffle_f32x4::<0xDD>(c[0], c[1]));
        let d1 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c[2], c[3]), _mm512_shuffle_f32x4::<0xDD>(c[2], c[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(d0, d1), _mm512_shuffle_f32x4::<0xDD>(d0, d1))
    }
}

/// The AVX2 register tile over stored weight rows: `R` input rows (up to 3) by `J` weight rows
/// (up to 4), an 8-lane accumulator each (with the three rows and one weight vector, the sixteen
/// registers); the tail and the invariance as the AVX-512 tile's. The caller checks the bounds.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::WeightRows;
    use crate::cpu::unpack;
    use crate::gpu::WeightDtype;

    /// One step: input rows at `xp` (stride `xs`), weight rows at element `i0 + j * ws`.
    #[inline(always)]
    unsafe fn step<const R: usize, const J: usize>(acc: &mut [__m256; 12], xp: *const f32, xs: usize, w: *const u32, bf16: bool, i0: usize, ws: usize) {
        let mut xv = [_mm256_setzero_ps(); 3];
        for (i, v) in xv.iter_mut().enumerate().take(R) {
            *v = _mm256_loadu_ps(xp.add(i * xs));
        }
        for j in 0..J {
            let at = i0 + j * ws;
            let wv = if bf16 {
                let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((w as *const u16).add(at) as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
            } else {
                _mm256_loadu_ps((w as *const f32).add(at))
            };
            for i in 0..R {
                acc[4 * i + j] = _mm256_fmadd_ps(xv[i], wv, acc[4 * i + j]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const R: usize, const J: usize>(x: &[f32], w: WeightRows, w_row: usize, scales: &[[f32; 2]], ahead: super::Prefetch, out: &mut [[f32; 4]; 4]) {
        if w.dtype.is_quantised() {
            let mut acc = [_mm256_setzero_ps(); 16];
            super::unit_tile::<unpack::Avx2, R, J>(&mut acc, x, w, w_row, scales, ahead);
            return finish::<R, J>(&acc, out);
        }
        let k = w.cols;
        let mut acc = [_mm256_setzero_ps(); 12];
        let body = k / 8 * 8;
        let bf16 = w.dtype == WeightDtype::Bf16;
        let row0 = w_row * k;
        let mut at = 0;
        while at < body {
            step::<R, J>(&mut acc, x.as_ptr().add(at), k, w.words.as_ptr(), bf16, row0 + at, k);
            super::prefetch(w, ahead, at);
            at += 8;
        }
        if body < k {
            let (mut xt, mut wt) = ([0f32; 24], [0u32; 32]);
            super::padded_tail(x, R, J, w, w_row, body, 8, &mut xt, &mut wt);
            step::<R, J>(&mut acc, xt.as_ptr(), 8, wt.as_ptr(), bf16, 0, 8);
        }
        finish::<R, J>(&acc, out)
    }

    /// Each row's four sums at once: horizontal adds within 128-bit lanes, then the halves.
    #[inline(always)]
    unsafe fn finish<const R: usize, const J: usize>(acc: &[__m256], out: &mut [[f32; 4]; 4]) {
        for (i, row) in out.iter_mut().enumerate().take(R) {
            let a = &acc[4 * i..4 * i + 4];
            let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            let mut sums = [0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t)));
            row[..J].copy_from_slice(&sums[..J]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::matmul::reference;

    pub(crate) fn nmse(a: &[f32], b: &[f32]) -> f64 {
        let e: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
        e / b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().max(f64::MIN_POSITIVE)
    }

    /// Both paths, every weight type and every vector path, at awkward shapes, the output poisoned
    /// and written at a stride with a column offset.
    #[test]
    fn both_paths_match_the_reference() {
        let mut seed = 7u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for isa in Isa::available() {
            for (m, n, k) in [(1, 1, 1), (3, 17, 33), (15, 40, 130), (16, 9, 7), (37, 70, 129), (130, 21, 40), (515, 18, 33), (1, 9, 96), (1, 11, 512), (5, 13, 768), (515, 6, 256), (770, 5, 33)] {
                for dtype in crate::gpu::WeightDtype::ALL {
                    if !dtype.fits_cols(k) || matches!(dtype, WeightDtype::Q5K | WeightDtype::Q6K) {
                        continue; // those two have no quantiser: tested on random blocks below
                    }
                    let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                    let wv: Vec<f32> = (0..(n + 3) * k).map(|_| rand()).collect();
                    let bytes = crate::gpu::encode_weights(&wv, dtype);
                    let mut words = vec![0u32; bytes.len().div_ceil(4)];
                    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
                    let rounded = crate::gpu::round_weights(&wv, dtype);
                    let bias: Vec<f32> = (0..n).map(|_| rand()).collect();
                    let stride = n + 5;
                    let mut y = vec![f32::NAN; m * stride + 2];
                    let w = WeightRows { words: &words, dtype, cols: k };
                    matmul(isa, &x, m, w, 3, n, Some(&bias), &mut y[2..], stride);
                    let want = reference(&x, &rounded[3 * k..], Some(&bias), m, n, k);
                    let got: Vec<f32> = (0..m).flat_map(|r| y[2 + r * stride..2 + r * stride + n].to_vec()).collect();
                    let e = nmse(&got, &want);
                    assert!(e < 1e-10, "{} {m}x{n}x{k} {dtype:?}: nmse {e:e}", isa.name());
                    assert!(y[..2].iter().all(|v| v.is_nan()), "wrote before the output");
                }
            }
        }
    }

    /// A row's outputs are the same bits whatever rows are batched with it (alone, at a tile's
    /// edge, inside a full tile) on the intrinsics paths: a job's lines do not depend on their
    /// neighbours.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        let mut seed = 11u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for isa in Isa::available().into_iter().filter(|&i| reads_stored_rows(i)) {
            // Batches decoded in registers and batches widened first (block formats past
            // `unit_decode_rows`) alike.
            for (k, m) in [(33, 9), (130, 9), (256, 9), (256, 70)] {
                for dtype in [WeightDtype::Bf16, WeightDtype::F32].into_iter().chain(WeightDtype::QUANTISED) {
                    if !dtype.fits_cols(k) {
                        continue;
                    }
                    let n = 23;
                    let bytes = if dtype.is_quantised() {
                        crate::quant::random_blocks(dtype, n * k / dtype.block_elems(), 5, true)
                    } else {
                        crate::gpu::encode_weights(&(0..n * k).map(|_| rand()).collect::<Vec<f32>>(), dtype)
                    };
                    let mut words = vec![0u32; bytes.len().div_ceil(4)];
                    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
                    let w = WeightRows { words: &words, dtype, cols: k };
                    let x: Vec<f32> = (0..m * k).map(|_| rand()).collect();
                    let mut all = vec![f32::NAN; m * n];
                    matmul(isa, &x, m, w, 0, n, None, &mut all, n);
                    for r in 0..m {
                        let mut one = vec![f32::NAN; n];
                        matmul(isa, &x[r * k..(r + 1) * k], 1, w, 0, n, None, &mut one, n);
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&one), bits(&all[r * n..(r + 1) * n]), "{} k {k} {dtype:?} row {r}", isa.name());
                    }
                }
            }
        }
    }

    /// A batch of matmuls gives each output the bits `matmul` gives it alone: few-row jobs in
    /// one parallel loop, many-row ones alone, every weight type, the output poisoned first.
    #[test]
    fn matmul_many_gives_each_job_its_own_bits() {
        let mut seed = 3u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let (k, n, experts) = (256, 37, 4);
        for isa in Isa::available() {
            for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::Q8_0, WeightDtype::Q4K] {
                let bytes = crate::gpu::encode_weights(&(0..experts * n * k).map(|_| rand()).collect::<Vec<f32>>(), dtype);
                let mut words = vec![0u32; bytes.len().div_ceil(4)];
                bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
                let w = WeightRows { words: &words, dtype, cols: k };
                // Rows per expert: one, a few, none, and enough for the gemm path.
                let rows = [1, 5, 0, gemm_min_rows(isa) + 3];
                let x: Vec<f32> = (0..rows.iter().sum::<usize>() * k).map(|_| rand()).collect();
                let mut jobs = Vec::new();
                let mut r0 = 0;
                for (e, &m) in rows.iter().enumerate() {
                    if m > 0 {
                        jobs.push((&x[r0 * k..(r0 + m) * k], m, w, e * n, n, r0 * n));
                    }
                    r0 += m;
                }
                let mut all = vec![f32::NAN; r0 * n];
                matmul_many(isa, &jobs, &mut all);
                for &(xs, m, w, row0, n, off) in &jobs {
                    let mut one = vec![f32::NAN; m * n];
                    matmul(isa, xs, m, w, row0, n, None, &mut one, n);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&one), bits(&all[off..off + m * n]), "{} {dtype:?} {m} rows", isa.name());
                }
            }
        }
    }

    #[test]
    fn blocks_without_a_quantiser_match_the_reference() {
        for isa in Isa::available() {
            for dtype in [WeightDtype::Q5K, WeightDtype::Q6K] {
                for (m, n) in [(1, 7), (6, 9), (70, 6), (515, 5)] {
                    let k = 512;
                    let bytes = crate::quant::random_blocks(dtype, n * k / 256, 3, false);
                    let mut words = vec![0u32; bytes.len().div_ceil(4)];
                    bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
                    let mut values = vec![0f32; n * k];
                    crate::quant::dequantize(dtype, &bytes, &mut values);
                    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0).collect();
                    let mut y = vec![f32::NAN; m * n];
                    matmul(isa, &x, m, WeightRows { words: &words, dtype, cols: k }, 0, n, None, &mut y, n);
                    let e = nmse(&y, &reference(&x, &values, None, m, n, k));
                    assert!(e < 1e-10, "{} {m}x{n}x{k} {dtype:?}: nmse {e:e}", isa.name());
                }
            }
        }
    }
}
