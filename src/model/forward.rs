//! One forward pass over a ragged set of tokens from many sequences, prefill and decode alike:
//! every token carries its position, the cache row its key and value go to, and the cache rows it
//! attends to.

use crate::error::{ensure, Result};
use crate::gpu::{Batch, GpuBuffer, GpuContext, GpuWeight, WeightPart};
use crate::kernels::attention::{attention, AttentionShape};
use crate::kernels::elementwise::{add_assign, add_gated, copy_rows, swiglu, swiglu_range};
use crate::kernels::embedding::embed;
use crate::kernels::matmul::{matmul, matmul_rows, Rows};
use crate::kernels::moe::{combine, expert_ffn, gather, plan, GroupTile};
use crate::kernels::norm::rms_norm;
use crate::kernels::rope::{rope, RopeLayout, RopeTable};
use crate::kernels::router::{route, RouterConfig};
use crate::loader::config::{ModelConfig, QkNorm};
use crate::model::weights::{Experts, Ffn, HostExperts, Mlp, Weights};

/// Keys and values of every layer for `rows` cache rows, on the GPU.
pub struct KvCache {
    pub k: Vec<GpuBuffer>,
    pub v: Vec<GpuBuffer>,
    pub rows: usize,
}

impl KvCache {
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, rows: usize) -> Result<Self> {
        let bytes = (rows * cfg.num_kv_heads * cfg.head_dim * 4) as u64;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for layer in 0..cfg.num_layers {
            k.push(ctx.storage(&format!("key cache of layer {layer}"), bytes)?);
            v.push(ctx.storage(&format!("value cache of layer {layer}"), bytes)?);
        }
        Ok(KvCache { k, v, rows })
    }

    /// The most cache rows one layer's buffer can hold on this device.
    pub fn max_rows(ctx: &GpuContext, cfg: &ModelConfig) -> usize {
        (ctx.binding_limit() / (cfg.num_kv_heads * cfg.head_dim * 4) as u64) as usize
    }
}

/// The tokens of one forward pass, described on the host.
#[derive(Clone, Debug, Default)]
pub struct StepInput {
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    /// The cache row each token's key and value are written to.
    pub cache_rows: Vec<u32>,
    /// (first cache row, count) each token attends to, its own row included.
    pub ranges: Vec<u32>,
    /// The tokens whose logits are wanted, in output order.
    pub logit_rows: Vec<u32>,
}

impl StepInput {
    /// Appends the tokens of one sequence whose cache starts at `cache_start` and which already
    /// holds `past` tokens; logits are asked for every new token (`all_logits`) or the last only.
    /// With a sliding `window`, a token sees at most the last `window` positions, itself included.
    pub fn push_sequence(&mut self, tokens: &[u32], past: usize, cache_start: usize, window: Option<usize>, all_logits: bool) {
        for (j, &t) in tokens.iter().enumerate() {
            let pos = past + j;
            let seen = pos + 1;
            let len = window.map_or(seen, |w| seen.min(w));
            if all_logits || j + 1 == tokens.len() {
                self.logit_rows.push(self.tokens.len() as u32);
            }
            self.tokens.push(t);
            self.positions.push(pos as u32);
            self.cache_rows.push((cache_start + pos) as u32);
            self.ranges.extend([(cache_start + seen - len) as u32, len as u32]);
        }
    }
}

/// A model ready to run: its config, weights and rope table on one device.
pub struct Model {
    pub cfg: ModelConfig,
    pub weights: Weights,
    pub rope: RopeTable,
    pub ctx: GpuContext,
    /// The GPU slots streamed experts rotate through (empty when every expert is resident).
    pub slots: Vec<ExpertSlot>,
    /// Holds streamed uploads to a rate, to reproduce a slower host-to-GPU link.
    pub upload_limit: Option<UploadLimit>,
    /// Which expert each slot holds, so an expert still in a slot is not uploaded again.
    pub slot_cache: std::sync::Mutex<SlotCache>,
}

/// The experts the slots hold, least recently used first out, and what streaming has cost.
#[derive(Debug, Default)]
pub struct SlotCache {
    /// (layer, expert) per slot.
    held: Vec<Option<(usize, usize)>>,
    last_used: Vec<u64>,
    clock: u64,
    pub stats: StreamStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Experts uploaded, and their bytes.
    pub uploads: u64,
    pub bytes: u64,
    /// Experts found already in a slot.
    pub hits: u64,
}

impl SlotCache {
    pub fn new(slots: usize) -> Self {
        SlotCache { held: vec![None; slots], last_used: vec![0; slots], ..Default::default() }
    }

    /// Slots for `wanted` (layer, expert) pairs, all different; for each, whether it must be
    /// uploaded. A slot already holding its expert is reused; others take the least recently
    /// used slots that no wanted expert occupies.
    fn assign(&mut self, wanted: &[(usize, usize)]) -> Vec<(usize, bool)> {
        self.clock += 1;
        let mut taken = vec![false; self.held.len()];
        let mut out = vec![(usize::MAX, true); wanted.len()];
        for (i, w) in wanted.iter().enumerate() {
            if let Some(s) = self.held.iter().position(|h| *h == Some(*w)) {
                taken[s] = true;
                out[i] = (s, false);
            }
        }
        for (i, w) in wanted.iter().enumerate() {
            if out[i].0 != usize::MAX {
                continue;
            }
            let s = (0..self.held.len())
                .filter(|&s| !taken[s])
                .min_by_key(|&s| self.last_used[s])
                .expect("no more experts wanted at once than there are slots");
            taken[s] = true;
            self.held[s] = Some(*w);
            out[i] = (s, true);
        }
        for &(s, _) in &out {
            self.last_used[s] = self.clock;
        }
        out
    }
}

/// A cap on host-to-GPU bytes per second: each upload waits until the bytes sent so far fit the
/// rate since the first one.
pub struct UploadLimit {
    bytes_per_s: f64,
    state: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
}

impl UploadLimit {
    pub fn new(bytes_per_s: u64) -> Self {
        UploadLimit { bytes_per_s: bytes_per_s as f64, state: std::sync::Mutex::new(None) }
    }

    /// Waits until `bytes` more may go.
    pub fn admit(&self, bytes: usize) {
        let mut state = self.state.lock().unwrap();
        let (start, sent) = state.get_or_insert_with(|| (std::time::Instant::now(), 0));
        *sent += bytes as u64;
        let due = std::time::Duration::from_secs_f64(*sent as f64 / self.bytes_per_s);
        let elapsed = start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Room on the GPU for one streamed expert's three matrices.
pub struct ExpertSlot {
    pub gate: GpuBuffer,
    pub up: GpuBuffer,
    pub down: GpuBuffer,
}

impl ExpertSlot {
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, dtype: crate::gpu::WeightDtype) -> Result<Self> {
        let bytes = ((cfg.moe_intermediate_size * cfg.hidden_size * dtype.bytes()) as u64).next_multiple_of(4);
        Ok(ExpertSlot {
            gate: ctx.storage("expert slot (gate)", bytes)?,
            up: ctx.storage("expert slot (up)", bytes)?,
            down: ctx.storage("expert slot (down)", bytes)?,
        })
    }
}

/// A one-part weight over a slot buffer.
fn slot_view(buffer: &GpuBuffer, rows: usize, cols: usize, dtype: crate::gpu::WeightDtype) -> GpuWeight {
    GpuWeight { parts: vec![WeightPart { buffer: buffer.clone(), first_row: 0, rows }], rows, cols, dtype }
}

fn linear(b: &mut Batch, x: &GpuBuffer, w: &GpuWeight, bias: Option<&GpuBuffer>, m: usize, what: &str) -> Result<GpuBuffer> {
    let y = b.ctx().storage(what, (m * w.rows * 4) as u64)?;
    matmul(b, x, w, bias, &y, m)?;
    Ok(y)
}

impl Model {
    /// Runs the tokens of `input` through the model, writing their keys and values into `cache`;
    /// returns the logits `[input.logit_rows.len(), vocab]`, or None when none were asked for.
    pub fn forward(&self, cache: &KvCache, input: &StepInput) -> Result<Option<GpuBuffer>> {
        let ctx = &self.ctx;
        let cfg = &self.cfg;
        let n = input.tokens.len();
        ensure!(n > 0, "forward pass", "no tokens");
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let ids = ctx.storage_from("token ids", &input.tokens)?;
        let positions = ctx.storage_from("positions", &input.positions)?;
        let cache_rows = ctx.storage_from("cache rows", &input.cache_rows)?;
        let ranges = ctx.storage_from("attention ranges", &input.ranges)?;
        let x = ctx.storage("hidden states", (n * h * 4) as u64)?;
        let mut b = Batch::new(ctx);
        embed(&mut b, &self.weights.embed, &ids, n, &x)?;
        b.submit()?;
        let shape = AttentionShape::new(cfg.num_heads, cfg.num_kv_heads, hd);
        let router_cfg = RouterConfig {
            n_experts: cfg.num_experts,
            top_k: cfg.experts_per_token,
            sigmoid: false,
            renormalize: cfg.norm_topk_prob,
            scale: 1.0,
        };
        for (li, layer) in self.weights.layers.iter().enumerate() {
            // One submission per layer, so its temporaries return to the pool for the next.
            let mut b = Batch::new(ctx);
            let hn = ctx.storage("normed hidden", (n * h * 4) as u64)?;
            rms_norm(&mut b, &x, &layer.input_norm, &hn, n, h, cfg.rms_norm_eps)?;
            let mut q = linear(&mut b, &hn, &layer.q, layer.q_bias.as_ref(), n, "queries")?;
            let mut k = linear(&mut b, &hn, &layer.k, layer.k_bias.as_ref(), n, "keys")?;
            let v = linear(&mut b, &hn, &layer.v, layer.v_bias.as_ref(), n, "values")?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                let (q_rows, q_width, k_rows, k_width) = match cfg.qk_norm {
                    QkNorm::PerHead => (n * cfg.num_heads, hd, n * cfg.num_kv_heads, hd),
                    _ => (n, q_dim, n, kv_dim),
                };
                let q2 = ctx.storage("normed queries", (n * q_dim * 4) as u64)?;
                let k2 = ctx.storage("normed keys", (n * kv_dim * 4) as u64)?;
                rms_norm(&mut b, &q, qn, &q2, q_rows, q_width, cfg.rms_norm_eps)?;
                rms_norm(&mut b, &k, kn, &k2, k_rows, k_width, cfg.rms_norm_eps)?;
                q = q2;
                k = k2;
            }
            rope(&mut b, &q, &positions, &self.rope, n, cfg.num_heads, hd, RopeLayout::HalfSplit)?;
            rope(&mut b, &k, &positions, &self.rope, n, cfg.num_kv_heads, hd, RopeLayout::HalfSplit)?;
            copy_rows(&mut b, &k, None, &cache.k[li], Some(&cache_rows), n, kv_dim)?;
            copy_rows(&mut b, &v, None, &cache.v[li], Some(&cache_rows), n, kv_dim)?;
            let attn = ctx.storage("attention output", (n * q_dim * 4) as u64)?;
            attention(&mut b, &shape, &q, &cache.k[li], &cache.v[li], &ranges, &attn, n, cache.rows)?;
            let o = linear(&mut b, &attn, &layer.o, None, n, "attention projection")?;
            add_assign(&mut b, &x, &o, n * h)?;
            let hn2 = ctx.storage("normed hidden", (n * h * 4) as u64)?;
            rms_norm(&mut b, &x, &layer.post_attention_norm, &hn2, n, h, cfg.rms_norm_eps)?;
            match &layer.ffn {
                Ffn::Moe { router, experts, shared } => {
                    let logits = linear(&mut b, &hn2, router, None, n, "router logits")?;
                    let ids = ctx.storage("expert ids", (n * cfg.experts_per_token * 4) as u64)?;
                    let weights = ctx.storage("expert weights", (n * cfg.experts_per_token * 4) as u64)?;
                    route(&mut b, &router_cfg, &logits, None, &ids, &weights, n)?;
                    match experts {
                        Experts::Resident(stacked) => expert_ffn(&mut b, &hn2, &ids, &weights, n, cfg.experts_per_token, stacked, &x)?,
                        Experts::Streamed(host) => b = self.streamed_experts(b, li, host, &hn2, &ids, &weights, n, &x)?,
                    }
                    if let Some(s) = shared {
                        let y = mlp_out(&mut b, &hn2, &s.mlp, n)?;
                        let g = linear(&mut b, &hn2, &s.gate, None, n, "shared expert gate")?;
                        add_gated(&mut b, &x, &y, &g, n, h)?;
                    }
                }
                Ffn::Dense(m) => {
                    let y = mlp_out(&mut b, &hn2, m, n)?;
                    add_assign(&mut b, &x, &y, n * h)?;
                }
            }
            b.submit()?;
        }
        if input.logit_rows.is_empty() {
            return Ok(None);
        }
        let mut b = Batch::new(ctx);
        let r = input.logit_rows.len();
        let picked = ctx.storage("rows for logits", (r * h * 4) as u64)?;
        let rows = ctx.storage_from("logit rows", &input.logit_rows)?;
        copy_rows(&mut b, &x, Some(&rows), &picked, None, r, h)?;
        let normed = ctx.storage("final norm", (r * h * 4) as u64)?;
        rms_norm(&mut b, &picked, &self.weights.final_norm, &normed, r, h, cfg.rms_norm_eps)?;
        let logits = linear(&mut b, &normed, self.weights.lm_head(), None, r, "logits")?;
        b.submit()?;
        Ok(Some(logits))
    }
}

impl Model {
    /// The routed experts of a layer whose weights live in host memory: the routing comes back to
    /// the host, then only the experts that received tokens and are not still in a slot are
    /// uploaded, each running over its rows. A group of as many experts as there are slots is one
    /// submission; the next group's uploads are staged while the GPU computes this one, and the
    /// queue orders them after it. Submits `b` and returns the batch to carry on with.
    #[allow(clippy::too_many_arguments)]
    fn streamed_experts(
        &self,
        b: Batch,
        layer: usize,
        host: &HostExperts,
        hn: &GpuBuffer,
        ids: &GpuBuffer,
        weights: &GpuBuffer,
        n: usize,
        x: &GpuBuffer,
    ) -> Result<Batch> {
        let ctx = &self.ctx;
        let (top_k, n_experts) = (self.cfg.experts_per_token, self.cfg.num_experts);
        let (h, inter) = (host.hidden, host.inter);
        ensure!(self.slots.len() >= 2, "streamed experts", "{} expert slots; at least two are needed", self.slots.len());
        let n_assign = n * top_k;
        b.submit()?;
        let chosen = ctx.read_u32(ids, n_assign)?;
        let mut counts = vec![0usize; n_experts];
        for &e in &chosen {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
        let mut b = Batch::new(ctx);
        let moe_plan = plan(&mut b, ids, n_assign, n_experts, GroupTile::Small)?;
        let xg = gather(&mut b, hn, &moe_plan, h, top_k)?;
        b.submit()?;
        let gate = ctx.storage("streamed gate", (n_assign * inter * 4) as u64)?;
        let up = ctx.storage("streamed up", (n_assign * inter * 4) as u64)?;
        let act = ctx.storage("streamed activations", (n_assign * inter * 4) as u64)?;
        let y = ctx.storage("streamed expert outputs", (n_assign * h * 4) as u64)?;
        // Rows of expert e start where the plan puts them: after every lower expert's rows.
        let offsets: Vec<usize> = counts.iter().scan(0, |acc, &c| Some(std::mem::replace(acc, *acc + c))).collect();
        let active: Vec<usize> = (0..n_experts).filter(|&e| counts[e] > 0).collect();
        let [g_range, u_range, d_range] = host.sections();
        let mut tally = StreamStats::default();
        for group in active.chunks(self.slots.len()) {
            let wanted: Vec<(usize, usize)> = group.iter().map(|&e| (layer, e)).collect();
            let assigned = self.slot_cache.lock().unwrap().assign(&wanted);
            let mut b = Batch::new(ctx);
            for (&e, &(s, upload)) in group.iter().zip(&assigned) {
                let slot = &self.slots[s];
                let pack = &host.packs[e];
                if upload {
                    if let Some(limit) = &self.upload_limit {
                        limit.admit(pack.len());
                    }
                    ctx.upload(&slot.gate, 0, &pack[g_range.clone()])?;
                    ctx.upload(&slot.up, 0, &pack[u_range.clone()])?;
                    ctx.upload(&slot.down, 0, &pack[d_range.clone()])?;
                }
                if upload {
                    tally.uploads += 1;
                    tally.bytes += pack.len() as u64;
                } else {
                    tally.hits += 1;
                }
                let rows = Rows { m: counts[e], x_row0: offsets[e], y_row0: offsets[e], y_stride: None };
                matmul_rows(&mut b, &xg, &slot_view(&slot.gate, inter, h, host.dtype), None, &gate, rows, None)?;
                matmul_rows(&mut b, &xg, &slot_view(&slot.up, inter, h, host.dtype), None, &up, rows, None)?;
                swiglu_range(&mut b, &gate, &up, &act, offsets[e] * inter, counts[e] * inter)?;
                matmul_rows(&mut b, &act, &slot_view(&slot.down, h, inter, host.dtype), None, &y, rows, None)?;
            }
            b.submit()?;
        }
        let mut cache = self.slot_cache.lock().unwrap();
        cache.stats.uploads += tally.uploads;
        cache.stats.bytes += tally.bytes;
        cache.stats.hits += tally.hits;
        drop(cache);
        let mut b = Batch::new(ctx);
        combine(&mut b, &y, &moe_plan, weights, top_k, h, x)?;
        Ok(b)
    }
}

/// `down(silu(gate(x)) * up(x))`.
fn mlp_out(b: &mut Batch, x: &GpuBuffer, m: &Mlp, n: usize) -> Result<GpuBuffer> {
    let gate = linear(b, x, &m.gate, None, n, "mlp gate")?;
    let up = linear(b, x, &m.up, None, n, "mlp up")?;
    let act = b.ctx().storage("mlp activations", (n * m.gate.rows * 4) as u64)?;
    swiglu(b, &gate, &up, &act, n * m.gate.rows)?;
    linear(b, &act, &m.down, None, n, "mlp down")
}

#[cfg(test)]
mod tests {
    use super::StepInput;

    #[test]
    fn step_input_ranges_follow_the_cache_and_the_window() {
        let mut s = StepInput::default();
        s.push_sequence(&[7, 8, 9], 0, 10, None, false);
        s.push_sequence(&[5], 4, 40, Some(3), true);
        assert_eq!(s.positions, vec![0, 1, 2, 4]);
        assert_eq!(s.cache_rows, vec![10, 11, 12, 44]);
        assert_eq!(s.ranges, vec![10, 1, 10, 2, 10, 3, 42, 3]);
        assert_eq!(s.logit_rows, vec![2, 3]);
    }
}

#[cfg(test)]
mod slot_tests {
    use super::SlotCache;

    #[test]
    fn slots_keep_what_is_reused_and_evict_the_least_recent() {
        let mut c = SlotCache::new(3);
        assert_eq!(c.assign(&[(0, 1), (0, 2)]), vec![(0, true), (1, true)]);
        assert_eq!(c.assign(&[(1, 5)]), vec![(2, true)]);
        // (0, 2) is still held; (0, 7) takes the least recently used slot, 0.
        assert_eq!(c.assign(&[(0, 7), (0, 2)]), vec![(0, true), (1, false)]);
        // Wanted together, two held experts and a new one never share a slot.
        assert_eq!(c.assign(&[(1, 9), (0, 7), (0, 2)]), vec![(2, true), (0, false), (1, false)]);
    }
}
