//! The kernels of `src/kernels/` on the CPU device: each GPU op's `Batch` function records one of
//! these when its batch runs on the host, over the same buffers (host memory in 4-byte words),
//! with the same arguments and the same meaning. Rows are spread over rayon's threads; dot
//! products run on the [`simd`](super::simd) path this CPU has. The tests of `tests/kernels.rs`
//! hold each to the same reference as its GPU kernel.

use std::ops::Deref;

use rayon::prelude::*;

use crate::cpu::matmul::{self as cpu_matmul, WeightRows};
use crate::cpu::simd::{dot, Isa, Values};
use crate::error::{ensure, Result};
use crate::gpu::{GpuBuffer, GpuWeight, HostRead};
use crate::kernels::attention::AttentionShape;
use crate::kernels::elementwise::Cols;
use crate::kernels::head_matmul::HeadLayout;
use crate::kernels::rope::RopeLayout;
use crate::kernels::router::RouterConfig;

/// Rows of output per rayon task: enough work to pay for the task.
const MIN_TASK_ELEMENTS: usize = 1 << 14;

/// An input's words: locked for reading, or copied when the op also writes that buffer.
pub(crate) enum Words<'a> {
    Locked(HostRead<'a>),
    Copied(Vec<u32>),
}

impl Deref for Words<'_> {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        match self {
            Words::Locked(g) => g,
            Words::Copied(v) => v,
        }
    }
}

/// `input`'s words, copied first when it is one of `written` (so the write lock can be taken).
pub(crate) fn input<'a>(input: &'a GpuBuffer, written: &[&GpuBuffer]) -> Words<'a> {
    if written.iter().any(|w| w.same(input)) {
        Words::Copied(input.read_host().to_vec())
    } else {
        Words::Locked(input.read_host())
    }
}

pub(crate) fn f32s(w: &[u32]) -> &[f32] {
    bytemuck::cast_slice(w)
}

pub(crate) fn f32s_mut(w: &mut [u32]) -> &mut [f32] {
    bytemuck::cast_slice_mut(w)
}

/// Rows per task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (MIN_TASK_ELEMENTS / width.max(1)).max(1)
}

/// A weight part's stored rows.
fn rows_of<'a>(words: &'a [u32], w: &GpuWeight) -> WeightRows<'a> {
    WeightRows { words, dtype: w.dtype, cols: w.cols }
}

/// [`crate::kernels::matmul::matmul_rows`] on the host.
#[allow(clippy::too_many_arguments)]
pub fn matmul(x: &GpuBuffer, w: &GpuWeight, bias: Option<&GpuBuffer>, y: &GpuBuffer, m: usize, x_row0: usize, y_row0: usize, y_stride: usize) -> Result<()> {
    let isa = Isa::detected();
    let k = w.cols;
    let xs = input(x, &[y]);
    let xr = &f32s(&xs)[x_row0 * k..(x_row0 + m) * k];
    let bias_words = bias.map(|b| input(b, &[y]));
    let bias = bias_words.as_deref().map(f32s);
    let parts: Vec<_> = w.parts.iter().map(|p| (p.first_row, p.rows, input(&p.buffer, &[y]))).collect();
    let mut yw = y.write_host();
    let ys = &mut f32s_mut(&mut yw)[y_row0 * y_stride..];
    for (first, rows, words) in &parts {
        let out = &mut ys[*first..];
        cpu_matmul::matmul(isa, xr, m, rows_of(words, w), 0, *rows, bias.map(|b| &b[*first..]), out, y_stride);
    }
    Ok(())
}

/// [`crate::kernels::head_matmul::head_matmul`] on the host.
#[allow(clippy::too_many_arguments)]
pub fn head_matmul(x: &GpuBuffer, xl: HeadLayout, w: &GpuWeight, heads: usize, y: &GpuBuffer, yl: HeadLayout, tokens: usize) -> Result<()> {
    let isa = Isa::detected();
    let (out_dim, inner) = (w.rows / heads, w.cols);
    let xs = input(x, &[y]);
    let xs = f32s(&xs);
    let words = input(&w.parts[0].buffer, &[y]);
    let results: Vec<Vec<f32>> = (0..heads)
        .into_par_iter()
        .map_init(Vec::new, |wide, h| {
            rows_of(&words, w).widen(h * out_dim, out_dim, wide);
            let mut out = vec![0f32; tokens * out_dim];
            for t in 0..tokens {
                let xv = &xs[t * xl.stride + h * xl.head_stride + xl.col0..][..inner];
                for o in 0..out_dim {
                    out[t * out_dim + o] = dot(isa, xv, Values::F32(&wide[o * inner..(o + 1) * inner]));
                }
            }
            out
        })
        .collect();
    let mut yw = y.write_host();
    let ys = f32s_mut(&mut yw);
    for (h, out) in results.iter().enumerate() {
        for t in 0..tokens {
            ys[t * yl.stride + h * yl.head_stride + yl.col0..][..out_dim].copy_from_slice(&out[t * out_dim..(t + 1) * out_dim]);
        }
    }
    Ok(())
}

/// [`crate::kernels::embedding::embed`] on the host.
pub fn embed(table: &GpuWeight, ids: &GpuBuffer, n: usize, out: &GpuBuffer) -> Result<()> {
    let ids: Vec<u32> = input(ids, &[out])[..n].to_vec();
    let dim = table.cols;
    let mut ow = out.write_host();
    let os = f32s_mut(&mut ow);
    let mut wide = Vec::new();
    for part in &table.parts {
        let words = part.buffer.read_host();
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= part.first_row && id < part.first_row + part.rows {
                rows_of(&words, table).widen(id - part.first_row, 1, &mut wide);
                os[t * dim..(t + 1) * dim].copy_from_slice(&wide);
            }
        }
    }
    Ok(())
}

/// [`crate::kernels::norm::rms_norm_strided`] on the host.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(x: &GpuBuffer, gamma: &GpuBuffer, y: &GpuBuffer, rows: usize, dim: usize, stride: usize, eps: f32) -> Result<()> {
    let xs = input(x, &[y]);
    let gs = input(gamma, &[y]);
    let (xs, gs) = (f32s(&xs), f32s(&gs));
    let mut yw = y.write_host();
    let ys = &mut f32s_mut(&mut yw)[..(rows - 1) * stride + dim];
    let norm_row = |r: usize, yr: &mut [f32]| {
        let xr = &xs[r * stride..r * stride + dim];
        let sum_sq: f32 = xr.iter().map(|v| v * v).sum();
        let scale = 1.0 / (sum_sq / dim as f32 + eps).sqrt();
        for ((o, &v), &g) in yr[..dim].iter_mut().zip(xr).zip(gs) {
            *o = v * scale * g;
        }
    };
    if stride == dim {
        ys.par_chunks_mut(dim).with_min_len(rows_per_task(dim)).enumerate().for_each(|(r, yr)| norm_row(r, yr));
    } else {
        for r in 0..rows {
            norm_row(r, &mut ys[r * stride..]);
        }
    }
    Ok(())
}

/// [`crate::kernels::rope::rope_at`] on the host, in place.
#[allow(clippy::too_many_arguments)]
pub fn rope(x: &GpuBuffer, positions: &GpuBuffer, table: &GpuBuffer, table_rows: usize, rot_dim: usize, tokens: usize, heads: usize, head_dim: usize, offset: usize, layout: RopeLayout) -> Result<()> {
    let pos: Vec<u32> = input(positions, &[x])[..tokens].to_vec();
    let cs = input(table, &[x]);
    let cs = f32s(&cs);
    let half = rot_dim / 2;
    let mut xw = x.write_host();
    let xs = &mut f32s_mut(&mut xw)[..tokens * heads * head_dim];
    xs.par_chunks_mut(heads * head_dim).with_min_len(rows_per_task(heads * head_dim)).enumerate().for_each(|(t, row)| {
        let p = pos[t] as usize;
        for h in 0..heads {
            let base = h * head_dim + offset;
            for i in 0..half {
                let (a, b) = match layout {
                    RopeLayout::HalfSplit => (base + i, base + i + half),
                    RopeLayout::Interleaved => (base + 2 * i, base + 2 * i + 1),
                };
                if p >= table_rows {
                    // As the GPU kernel: a position past the table is a scheduler bug, made visible.
                    row[a] = f32::NAN;
                    row[b] = f32::NAN;
                    continue;
                }
                let (c, s) = (cs[2 * (p * half + i)], cs[2 * (p * half + i) + 1]);
                let (x1, x2) = (row[a], row[b]);
                row[a] = x1 * c - x2 * s;
                row[b] = x2 * c + x1 * s;
            }
        }
    });
    Ok(())
}

/// `acc[i] += x[i]`.
pub fn add_assign(acc: &GpuBuffer, x: &GpuBuffer, n: usize) -> Result<()> {
    let xs = input(x, &[acc]);
    let xs = &f32s(&xs)[..n];
    let mut aw = acc.write_host();
    let a = &mut f32s_mut(&mut aw)[..n];
    a.par_chunks_mut(MIN_TASK_ELEMENTS).zip(xs.par_chunks(MIN_TASK_ELEMENTS)).for_each(|(a, x)| {
        for (a, x) in a.iter_mut().zip(x) {
            *a += x;
        }
    });
    Ok(())
}

/// `out[i] = silu(gate[i]) * up[i]` over `offset..offset + n`.
pub fn swiglu(gate: &GpuBuffer, up: &GpuBuffer, out: &GpuBuffer, offset: usize, n: usize) -> Result<()> {
    let g = input(gate, &[out]);
    let u = input(up, &[out]);
    let (g, u) = (&f32s(&g)[offset..offset + n], &f32s(&u)[offset..offset + n]);
    let mut ow = out.write_host();
    let o = &mut f32s_mut(&mut ow)[offset..offset + n];
    let isa = Isa::detected();
    o.par_chunks_mut(MIN_TASK_ELEMENTS).zip(g.par_chunks(MIN_TASK_ELEMENTS)).zip(u.par_chunks(MIN_TASK_ELEMENTS)).for_each(|((o, g), u)| crate::cpu::simd::swiglu(isa, g, u, o));
    Ok(())
}

/// `acc[t, :] += sigmoid(gate[t]) * x[t, :]`.
pub fn add_gated(acc: &GpuBuffer, x: &GpuBuffer, gate: &GpuBuffer, tokens: usize, dim: usize) -> Result<()> {
    let xs = input(x, &[acc]);
    let gs = input(gate, &[acc]);
    let (xs, gs) = (f32s(&xs), f32s(&gs));
    let mut aw = acc.write_host();
    let a = &mut f32s_mut(&mut aw)[..tokens * dim];
    a.par_chunks_mut(dim).with_min_len(rows_per_task(dim)).enumerate().for_each(|(t, row)| {
        let g = 1.0 / (1.0 + (-gs[t]).exp());
        for (o, &v) in row.iter_mut().zip(&xs[t * dim..(t + 1) * dim]) {
            *o = g.mul_add(v, *o);
        }
    });
    Ok(())
}

/// `dst[dst_rows[i], :] = src[src_rows[i], :]` (`None`: the identity).
pub fn copy_rows(src: &GpuBuffer, src_rows: Option<&GpuBuffer>, dst: &GpuBuffer, dst_rows: Option<&GpuBuffer>, n: usize, dim: usize) -> Result<()> {
    let si: Option<Vec<u32>> = src_rows.map(|r| input(r, &[dst])[..n].to_vec());
    let di: Option<Vec<u32>> = dst_rows.map(|r| input(r, &[dst])[..n].to_vec());
    let s = input(src, &[dst]);
    let mut dw = dst.write_host();
    for i in 0..n {
        let from = si.as_ref().map_or(i, |r| r[i] as usize);
        let to = di.as_ref().map_or(i, |r| r[i] as usize);
        ensure!((from + 1) * dim <= s.len() && (to + 1) * dim <= dw.len(), "copy_rows", "row {from} -> {to} outside the buffers");
        dw[to * dim..(to + 1) * dim].copy_from_slice(&s[from * dim..(from + 1) * dim]);
    }
    Ok(())
}

/// Copies `width` columns of `rows` rows.
pub fn copy_cols(src: &GpuBuffer, from: Cols, dst: &GpuBuffer, to: Cols, rows: usize, width: usize) -> Result<()> {
    let s = input(src, &[dst]);
    let mut dw = dst.write_host();
    for r in 0..rows {
        dw[r * to.stride + to.col0..][..width].copy_from_slice(&s[r * from.stride + from.col0..][..width]);
    }
    Ok(())
}

/// The nearest bf16 of `v` (ties to even; NaN stays NaN), as the GPU kernels round.
fn bf16_bits(v: f32) -> u32 {
    let bits = v.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return (bits >> 16) | 0x40;
    }
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}

/// Rounds `n` values in place to bf16.
pub fn round_bf16(x: &GpuBuffer, n: usize) -> Result<()> {
    let mut xw = x.write_host();
    for v in f32s_mut(&mut xw)[..n].iter_mut() {
        *v = f32::from_bits(bf16_bits(*v) << 16);
    }
    Ok(())
}

/// Widens `n` packed bf16 values to f32.
pub fn expand_bf16(src: &GpuBuffer, dst: &GpuBuffer, n: usize) -> Result<()> {
    let s = input(src, &[dst]);
    let h: &[u16] = bytemuck::cast_slice(&s);
    let mut dw = dst.write_host();
    for (o, &b) in f32s_mut(&mut dw)[..n].iter_mut().zip(h) {
        *o = f32::from_bits((b as u32) << 16);
    }
    Ok(())
}

/// FP8 e4m3 bytes times their block scales, to packed bf16: the run of
/// [`crate::kernels::dequant::dequant_fp8`].
#[allow(clippy::too_many_arguments)]
pub fn dequant_fp8(src: &GpuBuffer, scales: &GpuBuffer, dst: &GpuBuffer, rows: usize, row0: usize, src_byte0: usize, scale0: usize, dst_byte0: usize, cols: usize, block: (usize, usize)) -> Result<()> {
    let s = input(src, &[dst]);
    let bytes: &[u8] = bytemuck::cast_slice(&s);
    let sc = input(scales, &[dst]);
    let sc = f32s(&sc);
    let scale_cols = cols.div_ceil(block.1);
    let mut dw = dst.write_host();
    let out: &mut [u16] = bytemuck::cast_slice_mut(&mut dw[..]);
    let out = &mut out[dst_byte0 / 2..dst_byte0 / 2 + rows * cols];
    let table = crate::kernels::dequant::e4m3_table();
    out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let (src, scales) = (&bytes[src_byte0 + r * cols..][..cols], &sc[scale0 + ((row0 + r) / block.0) * scale_cols..]);
        for (c, (o, &q)) in row.iter_mut().zip(src).enumerate() {
            *o = bf16_bits(table[q as usize] * scales[c / block.1]) as u16;
        }
    });
    Ok(())
}

/// [`crate::kernels::attention::attention`] on the host: the host attention kernel over the
/// contiguous rows as one page.
#[allow(clippy::too_many_arguments)]
pub fn attention(shape: &AttentionShape, q: &GpuBuffer, k: &GpuBuffer, v: &GpuBuffer, ranges: &GpuBuffer, out: &GpuBuffer, n: usize, kv_rows: usize) -> Result<()> {
    let qs = input(q, &[out]);
    let ks = input(k, &[out]);
    let vs = input(v, &[out]);
    let rs: Vec<u32> = input(ranges, &[out])[..2 * n].to_vec();
    let key_width = shape.n_kv_heads * shape.head_dim;
    let value_width = shape.n_kv_heads * shape.v_dim;
    let page = [0u32];
    let spans: Vec<crate::cpu::attention::KeySpan> =
        rs.chunks(2).map(|r| crate::cpu::attention::KeySpan { pages: &page, first: r[0] as usize, len: r[1] as usize }).collect();
    let rows = crate::cpu::attention::PagedRows {
        keys: Values::F32(&f32s(&ks)[..kv_rows * key_width]),
        values: if shape.values_in_keys { Values::F32(&[]) } else { Values::F32(&f32s(&vs)[..kv_rows * value_width]) },
        page_tokens: kv_rows.max(1),
    };
    let mut ow = out.write_host();
    let o = &mut f32s_mut(&mut ow)[..n * shape.n_heads * shape.v_dim];
    crate::cpu::attention::attention(shape, &rows, &f32s(&qs)[..n * shape.n_heads * shape.head_dim], &spans, o)
}

/// The router on the host: the reference's choice, written where the GPU kernel writes it.
pub fn route(cfg: &RouterConfig, logits: &GpuBuffer, bias: Option<&GpuBuffer>, ids: &GpuBuffer, weights: &GpuBuffer, tokens: usize) -> Result<()> {
    let l = input(logits, &[ids, weights]);
    let b = bias.map(|b| input(b, &[ids, weights]));
    let (chosen, w) = crate::kernels::router::reference(cfg, &f32s(&l)[..tokens * cfg.n_experts], b.as_deref().map(f32s));
    ids.write_host()[..chosen.len()].copy_from_slice(&chosen);
    f32s_mut(&mut weights.write_host())[..w.len()].copy_from_slice(&w);
    Ok(())
}

/// The MoE plan: rows grouped by expert in assignment order (`u32::MAX` for an id out of range).
#[allow(clippy::too_many_arguments)]
pub fn moe_plan(ids: &GpuBuffer, n_assign: usize, n_experts: usize, tile_rows: usize, offsets: &GpuBuffer, tile_starts: &GpuBuffer, assign_row: &GpuBuffer, row_assign: &GpuBuffer) -> Result<()> {
    let ids: Vec<u32> = ids.read_host()[..n_assign].to_vec();
    let mut counts = vec![0u32; n_experts];
    for &e in &ids {
        if (e as usize) < n_experts {
            counts[e as usize] += 1;
        }
    }
    let (mut off, mut tiles) = (vec![0u32; n_experts + 1], vec![0u32; n_experts + 1]);
    for e in 0..n_experts {
        off[e + 1] = off[e] + counts[e];
        tiles[e + 1] = tiles[e] + counts[e].div_ceil(tile_rows as u32);
    }
    let mut cursor = off.clone();
    let mut ar = assign_row.write_host();
    let mut ra = row_assign.write_host();
    for (a, &e) in ids.iter().enumerate() {
        if (e as usize) < n_experts {
            let row = cursor[e as usize];
            cursor[e as usize] += 1;
            ar[a] = row;
            ra[row as usize] = a as u32;
        } else {
            ar[a] = u32::MAX;
        }
    }
    offsets.write_host()[..=n_experts].copy_from_slice(&off);
    tile_starts.write_host()[..=n_experts].copy_from_slice(&tiles);
    Ok(())
}

/// `xg[row] = x[token of row]` for the rows of real assignments.
#[allow(clippy::too_many_arguments)]
pub fn moe_gather(x: &GpuBuffer, row_assign: &GpuBuffer, offsets: &GpuBuffer, n_experts: usize, n_rows: usize, dim: usize, top_k: usize, xg: &GpuBuffer) -> Result<()> {
    let rows = (offsets.read_host()[n_experts] as usize).min(n_rows);
    let ra: Vec<u32> = row_assign.read_host()[..rows].to_vec();
    let xs = input(x, &[xg]);
    let mut gw = xg.write_host();
    for (row, &a) in ra.iter().enumerate() {
        let t = a as usize / top_k;
        gw[row * dim..(row + 1) * dim].copy_from_slice(&xs[t * dim..(t + 1) * dim]);
    }
    Ok(())
}

/// Every expert's rows of `xg` times its matrix of the stacked `w`, into `y` (`[n_assign, n]`).
pub fn grouped_matmul(xg: &GpuBuffer, w: &GpuWeight, offsets: &GpuBuffer, n_experts: usize, y: &GpuBuffer) -> Result<()> {
    let isa = Isa::detected();
    let (n, k) = (w.rows / n_experts, w.cols);
    let off: Vec<u32> = offsets.read_host()[..=n_experts].to_vec();
    let xs = input(xg, &[y]);
    let xs = f32s(&xs);
    let parts: Vec<_> = w.parts.iter().map(|p| (p.first_row, p.rows, input(&p.buffer, &[y]))).collect();
    let mut yw = y.write_host();
    let ys = f32s_mut(&mut yw);
    // Every expert's rows at once: small experts share one parallel loop.
    let mut jobs = Vec::new();
    for (first, rows, words) in &parts {
        for pe in 0..rows / n {
            let e = first / n + pe;
            let (r0, r1) = (off[e] as usize, off[e + 1] as usize);
            if r1 > r0 {
                jobs.push((&xs[r0 * k..r1 * k], r1 - r0, rows_of(words, w), pe * n, n, r0 * n));
            }
        }
    }
    cpu_matmul::matmul_many(isa, &jobs, ys);
    Ok(())
}

/// `out[t] = fma(w_j, y[row_j], ..)` over the slots j in order, rows `u32::MAX` skipped.
#[allow(clippy::too_many_arguments)]
pub fn combine(y: &GpuBuffer, assign_row: &GpuBuffer, n_assign: usize, weights: &GpuBuffer, top_k: usize, dim: usize, out: &GpuBuffer) -> Result<()> {
    let rows: Vec<u32> = input(assign_row, &[out])[..n_assign].to_vec();
    let ws: Vec<f32> = f32s(&input(weights, &[out]))[..n_assign].to_vec();
    let ys = input(y, &[out]);
    let ys = f32s(&ys);
    let mut ow = out.write_host();
    let o = &mut f32s_mut(&mut ow)[..n_assign / top_k * dim];
    o.par_chunks_mut(dim).with_min_len(rows_per_task(dim)).enumerate().for_each(|(t, row)| {
        for j in 0..top_k {
            let a = t * top_k + j;
            if rows[a] != u32::MAX {
                let yr = &ys[rows[a] as usize * dim..][..dim];
                for (o, &v) in row.iter_mut().zip(yr) {
                    *o = ws[a].mul_add(v, *o);
                }
            }
        }
    });
    Ok(())
}

/// Row-wise softmax.
pub fn softmax(x: &GpuBuffer, y: &GpuBuffer, rows: usize, dim: usize) -> Result<()> {
    let xs = input(x, &[y]);
    let out = crate::kernels::softmax::softmax_reference(&f32s(&xs)[..rows * dim], dim);
    f32s_mut(&mut y.write_host())[..rows * dim].copy_from_slice(&out);
    Ok(())
}

/// Row-wise argmax, the lowest index on ties.
pub fn argmax(x: &GpuBuffer, ids: &GpuBuffer, rows: usize, dim: usize) -> Result<()> {
    let xs = input(x, &[ids]);
    let out: Vec<u32> = f32s(&xs)[..rows * dim].par_chunks(dim).map(|row| crate::kernels::softmax::argmax_reference(row, dim)[0]).collect();
    ids.write_host()[..rows].copy_from_slice(&out);
    Ok(())
}
