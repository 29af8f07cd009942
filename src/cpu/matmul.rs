//! `y = x W^T (+ bias)` on the host, for every weight type the GPU kernels read. Many input rows
//! (prefill, expert chunks): the `gemm` crate's f32 kernel, with bf16/f16 weights widened to f32
//! a bounded block of rows at a time (f32 weights are read in place). Few rows (decode): dot
//! products on the [`simd`](super::simd) path, each weight row widened once and read by every
//! input row while it is in cache; this is bound by reading the weights, as decode is.

use rayon::prelude::*;

use crate::cpu::simd::{dot, Isa, Values};
use crate::gpu::WeightDtype;

/// From this many input rows the gemm path pays for its packing and widening (measured with
/// `cargo bench -- "cpu matmul"`: at 64 rows the dot path is faster, at 256 gemm is).
pub const GEMM_MIN_ROWS: usize = 128;
/// Weight elements widened at once on the gemm path (16 MiB of f32).
const WIDE_BLOCK: usize = 4 << 20;
/// Weight rows one task of the dot path takes.
const DOT_BLOCK: usize = 16;

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
        }
    }

    /// Rows `r0..r0 + n` widened in parallel (the gemm path's blocks).
    fn widen_par(&self, r0: usize, n: usize, out: &mut Vec<f32>) {
        let k = self.cols;
        out.resize(n * k, 0.0);
        out.par_chunks_mut(k * 64).enumerate().for_each(|(i, chunk)| self.widen_into(r0 + i * 64, chunk));
    }
}

/// The output's base pointer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `y[r * y_stride + c] = x[r] . w[w_row0 + c] + bias[c]` for `r < m`, `c < n`: `x` is
/// `[m, w.cols]`, `y` starts at the first output element and holds `(m - 1) * y_stride + n`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(isa: Isa, x: &[f32], m: usize, w: WeightRows, w_row0: usize, n: usize, bias: Option<&[f32]>, y: &mut [f32], y_stride: usize) {
    let k = w.cols;
    assert!(x.len() >= m * k && y.len() >= (m - 1) * y_stride + n && y_stride >= n, "matmul shapes");
    if m >= GEMM_MIN_ROWS {
        gemm_path(x, m, w, w_row0, n, bias, y, y_stride);
    } else {
        dot_path(isa, x, m, w, w_row0, n, bias, y, y_stride);
    }
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
    let k = w.cols;
    let out = Out(y.as_mut_ptr());
    (0..n.div_ceil(DOT_BLOCK)).into_par_iter().for_each_init(Vec::new, |wide, blk| {
        let c0 = blk * DOT_BLOCK;
        let nb = DOT_BLOCK.min(n - c0);
        w.widen(w_row0 + c0, nb, wide);
        let out = out;
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for c in 0..nb {
                let v = dot(isa, xr, Values::F32(&wide[c * k..(c + 1) * k])) + bias.map_or(0.0, |b| b[c0 + c]);
                // SAFETY: each task writes only its own columns c0..c0 + nb of the rows of `y`.
                unsafe { *out.0.add(r * y_stride + c0 + c) = v };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::reference;

    fn nmse(a: &[f32], b: &[f32]) -> f64 {
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
            for (m, n, k) in [(1, 1, 1), (3, 17, 33), (15, 40, 130), (16, 9, 7), (37, 70, 129), (130, 21, 40)] {
                for dtype in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
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
}
