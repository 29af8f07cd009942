//! Attention on the host, straight over the KV store's pages: decode tokens and prompt chunks,
//! ragged, GQA/MQA/MHA and MLA's latent rows (values inside the keys), f32 or bf16 pages, a
//! sliding window through each query's span. Online softmax: one pass over the keys, nothing
//! materialised per key. Threads take (query, run of heads of one kv head), so each key and value
//! row is read once for the heads of a run; the inner loops are the vector primitives of
//! [`simd`](super::simd). The test oracle is the GPU kernel's f64 reference
//! ([`crate::kernels::attention::reference`]) on the pages gathered into rows.

use rayon::prelude::*;

use crate::cpu::simd::{dot, scale_add, Isa, Values};
use crate::error::{ensure, Result};
use crate::kernels::attention::AttentionShape;

/// Most query heads one task serves: enough to reuse each key row, few enough that the MLA's
/// 16 to 128 heads still split over the threads.
const MAX_HEADS_PER_TASK: usize = 16;

/// One layer's KV rows as the host store keeps them: slot `s` holds the key row
/// `keys[s * key_stride..]` and the value row `values[s * value_stride..]`, slots grouped in
/// pages of `page_tokens`.
#[derive(Clone, Copy, Debug)]
pub struct PagedRows<'a> {
    pub keys: Values<'a>,
    /// Unused when the values live in the keys.
    pub values: Values<'a>,
    pub page_tokens: usize,
}

/// The keys one query row sees: positions `first..first + len` of the sequence whose pages are
/// `pages` (its own position last, so `len >= 1`).
#[derive(Clone, Copy, Debug)]
pub struct KeySpan<'a> {
    pub pages: &'a [u32],
    pub first: usize,
    pub len: usize,
}

/// Heads per task: the largest divisor of the group size within the maximum.
fn heads_per_task(group: usize) -> usize {
    (1..=MAX_HEADS_PER_TASK.min(group)).rev().find(|d| group.is_multiple_of(*d)).unwrap_or(1)
}

/// `out[q, h, :] = softmax(scale * q[q, h] . k[p, h']) v[p, h']` over the positions p of each
/// query's span, h' the kv head of h; q is `[spans, n_heads * head_dim]`, out
/// `[spans, n_heads * v_dim]`. On the widest instruction set this CPU has.
pub fn attention(shape: &AttentionShape, kv: &PagedRows, q: &[f32], spans: &[KeySpan], out: &mut [f32]) -> Result<()> {
    attention_with(Isa::detected(), shape, kv, q, spans, out)
}

/// [`attention`] on a given instruction set (tests run each).
pub fn attention_with(isa: Isa, shape: &AttentionShape, kv: &PagedRows, q: &[f32], spans: &[KeySpan], out: &mut [f32]) -> Result<()> {
    let AttentionShape { n_heads, n_kv_heads, head_dim: hd, v_dim: vd, scale, values_in_keys } = *shape;
    let n = spans.len();
    ensure!(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "host attention", "{n_heads} query heads cannot share {n_kv_heads} kv heads evenly");
    ensure!(!values_in_keys || vd <= hd, "host attention", "values of {vd} inside keys of {hd}");
    ensure!(q.len() == n * n_heads * hd, "host attention", "{} query values for {n} rows of {n_heads} x {hd}", q.len());
    ensure!(out.len() == n * n_heads * vd, "host attention", "{} output values for {n} rows of {n_heads} x {vd}", out.len());
    let pt = kv.page_tokens;
    ensure!(pt > 0, "host attention", "pages of no tokens");
    let key_stride = n_kv_heads * hd;
    let (values, value_stride) = if values_in_keys { (kv.keys, key_stride) } else { (kv.values, n_kv_heads * vd) };
    let slots = kv.keys.len() / key_stride;
    ensure!(values.len() >= slots * value_stride, "host attention", "{} value elements for {slots} key rows", values.len());
    for (i, s) in spans.iter().enumerate() {
        ensure!(s.len > 0, "host attention", "query {i} sees no keys");
        let last_page = (s.first + s.len - 1) / pt;
        ensure!(last_page < s.pages.len(), "host attention", "query {i} reaches position {} past its {} pages", s.first + s.len - 1, s.pages.len());
        for &p in &s.pages[s.first / pt..=last_page] {
            ensure!((p as usize + 1) * pt <= slots, "host attention", "query {i}: page {p} outside the store's {slots} rows");
        }
    }
    let group = n_heads / n_kv_heads;
    let hpt = heads_per_task(group);
    let tasks_per_query = n_heads / hpt;
    out.par_chunks_mut(hpt * vd).enumerate().for_each(|(task, o)| {
        let (qi, h0) = (task / tasks_per_query, (task % tasks_per_query) * hpt);
        let kvh = h0 / group;
        let span = &spans[qi];
        let queries = &q[(qi * n_heads + h0) * hd..(qi * n_heads + h0 + hpt) * hd];
        let mut m = [f32::NEG_INFINITY; MAX_HEADS_PER_TASK];
        let mut l = [0f32; MAX_HEADS_PER_TASK];
        // The output rows are the accumulators; zero them (the caller may have poisoned them).
        o.fill(0.0);
        let value_col = kvh * if values_in_keys { hd } else { vd };
        let (mut pos, end) = (span.first, span.first + span.len);
        while pos < end {
            let run = (pt - pos % pt).min(end - pos);
            let slot0 = span.pages[pos / pt] as usize * pt + pos % pt;
            for slot in slot0..slot0 + run {
                let key = kv.keys.slice(slot * key_stride + kvh * hd, hd);
                let value = values.slice(slot * value_stride + value_col, vd);
                for j in 0..hpt {
                    let s = dot(isa, &queries[j * hd..(j + 1) * hd], key) * scale;
                    let acc = &mut o[j * vd..(j + 1) * vd];
                    // A new maximum rescales what came before; otherwise the key adds with its weight.
                    if s > m[j] {
                        let c = (m[j] - s).exp();
                        l[j] = l[j] * c + 1.0;
                        m[j] = s;
                        scale_add(isa, acc, c, 1.0, value);
                    } else {
                        let p = (s - m[j]).exp();
                        l[j] += p;
                        scale_add(isa, acc, 1.0, p, value);
                    }
                }
            }
            pos += run;
        }
        for j in 0..hpt {
            let inv = 1.0 / l[j];
            o[j * vd..(j + 1) * vd].iter_mut().for_each(|x| *x *= inv);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::reference;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn values(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
            (0..n).map(|_| (self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0) * amplitude).collect()
        }
    }

    /// One case: sequences of `lens` tokens in a store of shuffled pages, each contributing
    /// queries for its last `chunk` positions (a decode token when 1, a prompt chunk otherwise).
    struct Case {
        shape: AttentionShape,
        lens: Vec<usize>,
        chunk: usize,
        page_tokens: usize,
        window: Option<usize>,
        bf16: bool,
    }

    fn check(case: &Case, seed: u64) {
        let mut rng = Rng(seed);
        let s = case.shape;
        let pt = case.page_tokens;
        let kw = s.n_kv_heads * s.head_dim;
        let vw = if s.values_in_keys { 0 } else { s.n_kv_heads * s.v_dim };
        let pages_needed: usize = case.lens.iter().map(|l| l.div_ceil(pt)).sum::<usize>() + 3;
        // Pages handed out in a scrambled order, with spare ones between.
        let mut free: Vec<u32> = (0..pages_needed as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.next() as usize % (i + 1));
        }
        let slots = pages_needed * pt;
        let mut keys = rng.values(slots * kw, 1.5);
        let mut vals = rng.values(slots * vw, 1.0);
        if case.bf16 {
            for x in keys.iter_mut().chain(vals.iter_mut()) {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        }
        let bits = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect() };
        let (k16, v16) = (bits(&keys), bits(&vals));
        let kv = if case.bf16 {
            PagedRows { keys: Values::Bf16(&k16), values: Values::Bf16(&v16), page_tokens: pt }
        } else {
            PagedRows { keys: Values::F32(&keys), values: Values::F32(&vals), page_tokens: pt }
        };
        let page_tables: Vec<Vec<u32>> = case.lens.iter().map(|l| (0..l.div_ceil(pt)).map(|_| free.pop().unwrap()).collect()).collect();
        // The reference reads each sequence's rows gathered contiguously.
        let (mut rk, mut rv, mut ranges, mut spans) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (pages, &len) in page_tables.iter().zip(&case.lens) {
            let base = rk.len() / kw;
            for pos in 0..len {
                let slot = pages[pos / pt] as usize * pt + pos % pt;
                rk.extend_from_slice(&keys[slot * kw..(slot + 1) * kw]);
                rv.extend_from_slice(&vals[slot * vw..(slot + 1) * vw]);
            }
            for pos in len.saturating_sub(case.chunk)..len {
                let seen = pos + 1;
                let n = case.window.map_or(seen, |w| seen.min(w));
                ranges.extend([(base + seen - n) as u32, n as u32]);
                spans.push(KeySpan { pages, first: seen - n, len: n });
            }
        }
        let q = rng.values(spans.len() * s.n_heads * s.head_dim, 1.0);
        let want = reference(&s, &q, &rk, &rv, &ranges);
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; spans.len() * s.n_heads * s.v_dim];
            attention_with(isa, &s, &kv, &q, &spans, &mut out).unwrap();
            let peak = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let err = out.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / peak;
            assert!(err < 2e-6, "{isa:?} {:?} lens {:?} chunk {} pages of {pt} window {:?} bf16 {}: normalised error {err}", s, case.lens, case.chunk, case.window, case.bf16);
        }
    }

    #[test]
    fn decode_and_prompt_chunks_match_the_reference() {
        let shapes = [
            AttentionShape::new(8, 2, 16),   // GQA
            AttentionShape::new(4, 1, 20),   // MQA, a head not a multiple of any lane count
            AttentionShape::new(3, 3, 33),   // MHA
            AttentionShape::new(32, 4, 8),   // groups of 8
            AttentionShape::latent(5, 40, 32, 0.11), // MLA: values are the keys' first columns
            AttentionShape::latent(18, 24, 17, 0.2), // heads split into tasks of 9
        ];
        let mut seed = 1;
        for shape in shapes {
            for bf16 in [false, true] {
                for (lens, chunk) in [(vec![1, 7, 33, 257], 1), (vec![16, 17, 15, 32], 1), (vec![7, 33], 7), (vec![1], 1), (vec![40, 3], 3)] {
                    for page_tokens in [16, 5] {
                        let case = Case { shape, lens: lens.clone(), chunk, page_tokens, window: None, bf16 };
                        check(&case, seed);
                        seed += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn a_sliding_window_limits_what_each_query_sees() {
        for window in [1, 4, 16, 17] {
            let case = Case { shape: AttentionShape::new(4, 2, 12), lens: vec![33, 7, 20], chunk: 5, page_tokens: 16, window: Some(window), bf16: false };
            check(&case, 100 + window as u64);
        }
    }

    #[test]
    fn large_scores_stay_finite() {
        // Scores in the hundreds: without the running maximum exp() would overflow.
        let mut rng = Rng(7);
        let shape = AttentionShape { scale: 40.0, ..AttentionShape::new(2, 1, 8) };
        let keys = rng.values(16 * 8, 3.0);
        let vals = rng.values(16 * 8, 1.0);
        let kv = PagedRows { keys: Values::F32(&keys), values: Values::F32(&vals), page_tokens: 16 };
        let pages = [0u32];
        let spans = [KeySpan { pages: &pages, first: 0, len: 16 }];
        let q = rng.values(2 * 8, 3.0);
        let mut out = vec![f32::NAN; 16];
        attention(&shape, &kv, &q, &spans, &mut out).unwrap();
        let ranges = [0u32, 16];
        let want = reference(&shape, &q, &keys, &vals, &ranges);
        assert!(out.iter().all(|x| x.is_finite()));
        let err = out.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        // A score near 300 carries an f32 rounding of about 2e-5, which its weight inherits.
        assert!(err < 1e-4, "error {err}");
    }

    #[test]
    fn bad_spans_are_refused() {
        let shape = AttentionShape::new(2, 1, 4);
        let keys = vec![0.5f32; 2 * 4 * 4];
        let kv = PagedRows { keys: Values::F32(&keys), values: Values::F32(&keys), page_tokens: 4 };
        let q = vec![1.0; 8];
        let mut out = vec![0.0; 8];
        let pages = [1u32];
        let past_pages = [KeySpan { pages: &pages, first: 2, len: 3 }];
        assert!(attention(&shape, &kv, &q, &past_pages, &mut out).is_err());
        let far = [5u32];
        let outside = [KeySpan { pages: &far, first: 0, len: 1 }];
        assert!(attention(&shape, &kv, &q, &outside, &mut out).is_err());
        let empty = [KeySpan { pages: &pages, first: 0, len: 0 }];
        assert!(attention(&shape, &kv, &q, &empty, &mut out).is_err());
    }
}
