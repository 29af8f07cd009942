//! One forward pass over a ragged set of tokens from many sequences, prefill and decode alike:
//! every token carries its position, the cache row its key and value go to, and the cache rows it
//! attends to.

use crate::error::{ensure, Result};
use crate::gpu::{Batch, GpuBuffer, GpuContext, GpuWeight, Track, WeightPart};
use crate::kernels::attention::{attention, AttentionShape};
use crate::kernels::elementwise::{add_assign, add_gated, copy_cols, copy_rows, round_bf16, swiglu, swiglu_range, Cols};
use crate::kernels::dequant::{dequant_fp8, DequantRun};
use crate::kernels::head_matmul::{head_matmul, HeadLayout};
use crate::kernels::embedding::embed;
use crate::kernels::matmul::{matmul, matmul_rows, Rows};
use crate::kernels::moe::{combine, expert_ffn, gather, plan, GroupTile};
use crate::kernels::norm::{rms_norm, rms_norm_strided};
use crate::kernels::rope::{rope, rope_at, RopeTable};
use crate::kernels::router::{route, RouterConfig};
use crate::loader::config::{ModelConfig, QkNorm};
use crate::model::streamer::{ExpertSlot, SlotCache};
use crate::model::weights::{Experts, Ffn, HostExperts, Mlp, Projections, Weights};

/// Keys and values of every layer for `rows` cache rows, on the GPU.
pub struct KvCache {
    pub k: Vec<GpuBuffer>,
    pub v: Vec<GpuBuffer>,
    pub rows: usize,
}

impl KvCache {
    /// Under MLA the key buffer holds each token's latent and rope key and the values are read
    /// from it; the value buffers are then placeholders.
    pub fn new(ctx: &GpuContext, cfg: &ModelConfig, rows: usize) -> Result<Self> {
        let [kw, vw] = cfg.kv_widths();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for layer in 0..cfg.num_layers {
            k.push(ctx.storage(&format!("key cache of layer {layer}"), (rows * kw * 4) as u64)?);
            v.push(ctx.storage(&format!("value cache of layer {layer}"), (rows * vw * 4).max(4) as u64)?);
        }
        Ok(KvCache { k, v, rows })
    }

    /// The most cache rows one layer's buffer can hold on this device.
    pub fn max_rows(ctx: &GpuContext, cfg: &ModelConfig) -> usize {
        (ctx.binding_limit() / (cfg.kv_widths()[0] * 4) as u64) as usize
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

/// The eps of MLA's two low-rank norms, whatever `rms_norm_eps` says.
const MLA_NORM_EPS: f32 = 1e-6;

/// A model ready to run: its config, weights and rope table on one device.
pub struct Model {
    pub cfg: ModelConfig,
    pub weights: Weights,
    pub rope: RopeTable,
    pub ctx: GpuContext,
    /// The GPU slots streamed experts rotate through (empty when every expert is resident).
    pub slots: Vec<ExpertSlot>,
    /// Which expert each slot holds, so an expert still in a slot is not uploaded again.
    pub slot_cache: std::sync::Mutex<SlotCache>,
    /// Room for one layer's streamed attention projections, and the layer it holds.
    pub attn_slot: Option<Vec<GpuBuffer>>,
    /// Where streamed FP8 attention matrices land before the GPU dequantises them into the slot.
    pub attn_staging: Option<GpuBuffer>,
    pub attn_held: std::sync::Mutex<Option<usize>>,
}


pub(crate) fn linear(b: &mut Batch, x: &GpuBuffer, w: &GpuWeight, bias: Option<&GpuBuffer>, m: usize, what: &str) -> Result<GpuBuffer> {
    let y = b.ctx().storage(what, (m * w.rows * 4) as u64)?;
    matmul(b, x, w, bias, &y, m)?;
    Ok(y)
}

/// Where one pass's tokens are and what they attend to, on the GPU.
pub(crate) struct TokenPlaces {
    pub n: usize,
    pub positions: GpuBuffer,
    /// The KV rows each token's key and value go to.
    pub cache_rows: GpuBuffer,
    /// (first row, count) of the KV rows each token attends to.
    pub ranges: GpuBuffer,
}

impl TokenPlaces {
    pub fn upload(ctx: &GpuContext, positions: &[u32], cache_rows: &[u32], ranges: &[u32]) -> Result<Self> {
        Ok(TokenPlaces {
            n: positions.len(),
            positions: ctx.storage_from("positions", positions)?,
            cache_rows: ctx.storage_from("cache rows", cache_rows)?,
            ranges: ctx.storage_from("attention ranges", ranges)?,
        })
    }
}

/// One layer's keys and values for `rows` rows, f32.
pub(crate) struct LayerKv<'a> {
    pub k: &'a GpuBuffer,
    pub v: &'a GpuBuffer,
    pub rows: usize,
}

/// The new keys and values of a pass (`[n, width]` each, after the norm and rope), which the
/// host KV store keeps; under MLA the keys are the cache rows and the values empty.
pub(crate) struct NewKv {
    pub k: GpuBuffer,
    pub v: GpuBuffer,
}

/// What a layer's attention kernel reads of a pass's own tokens: the queries in the kernel's
/// layout (under MLA the absorbed ones, `[n, heads * cache width]`) and the new rows for the cache.
pub(crate) struct AttnInputs {
    pub q: GpuBuffer,
    pub new: NewKv,
}

impl Model {
    /// The attention kernel's shape for this model (MLA: one latent row per token for every head).
    pub(crate) fn attention_shape(&self) -> AttentionShape {
        let cfg = &self.cfg;
        match &cfg.mla {
            Some(m) => AttentionShape::latent(cfg.num_heads, m.cache_width(), m.kv_lora_rank, m.softmax_scale),
            None => AttentionShape::new(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
        }
    }

    /// The attention half of layer `li`: `x += o(attention(norm(x)))`, keys and values written to
    /// `kv`. Returns the post-attention normed hidden states and the new keys and values.
    pub(crate) fn attention_block(&self, b: &mut Batch, li: usize, x: &GpuBuffer, t: &TokenPlaces, kv: &LayerKv) -> Result<(GpuBuffer, NewKv)> {
        let [kw, vw] = self.cfg.kv_widths();
        let n = t.n;
        let inputs = self.attention_inputs(b, li, x, t)?;
        copy_rows(b, &inputs.new.k, None, kv.k, Some(&t.cache_rows), n, kw)?;
        if vw > 0 {
            copy_rows(b, &inputs.new.v, None, kv.v, Some(&t.cache_rows), n, vw)?;
        }
        let shape = self.attention_shape();
        let attn = self.ctx.storage("attention output", (n * shape.n_heads * shape.v_dim * 4) as u64)?;
        // Under MLA the values are the cache rows' first columns (the kernel reads them from k).
        let values = if shape.values_in_keys { kv.k } else { kv.v };
        attention(b, &shape, &inputs.q, kv.k, values, &t.ranges, &attn, n, kv.rows)?;
        let hn2 = self.attention_output(b, li, x, &attn, n)?;
        Ok((hn2, inputs.new))
    }

    /// The first half of layer `li`'s attention, everything before the attention kernel: the
    /// norm, the projections, q/k norms, rope, and the rounding of bf16 KV.
    pub(crate) fn attention_inputs(&self, b: &mut Batch, li: usize, x: &GpuBuffer, t: &TokenPlaces) -> Result<AttnInputs> {
        let cfg = &self.cfg;
        let (n, h) = (t.n, cfg.hidden_size);
        let hn = self.ctx.storage("normed hidden", (n * h * 4) as u64)?;
        rms_norm(b, x, &self.weights.layers[li].input_norm, &hn, n, h, cfg.rms_norm_eps)?;
        let w = self.projections(li)?;
        match &cfg.mla {
            Some(_) => self.latent_inputs(b, li, &hn, t, &w),
            None => self.head_inputs(b, li, &hn, t, &w),
        }
    }

    /// The second half: the heads' outputs `attn` (the kernel's layout) through MLA's value block
    /// and `o_proj`, added into `x`; returns the post-attention normed hidden states.
    pub(crate) fn attention_output(&self, b: &mut Batch, li: usize, x: &GpuBuffer, attn: &GpuBuffer, n: usize) -> Result<GpuBuffer> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        let w = self.projections(li)?;
        let missing = || crate::error::Error::invalid("attention", "no output projection");
        let wo = w.last().ok_or_else(missing)?;
        let heads_out = match &cfg.mla {
            Some(m) => {
                let absorb_v = w.len().checked_sub(2).map(|i| &w[i]).ok_or_else(missing)?;
                let (heads, r, dv) = (cfg.num_heads, m.kv_lora_rank, m.v_head_dim);
                let out = self.ctx.storage("attention output", (n * heads * dv * 4) as u64)?;
                let lat = HeadLayout { stride: heads * r, head_stride: r, col0: 0 };
                head_matmul(b, attn, lat, absorb_v, heads, &out, HeadLayout { stride: heads * dv, head_stride: dv, col0: 0 }, n)?;
                out
            }
            None => attn.clone(),
        };
        let o = linear(b, &heads_out, wo, None, n, "attention projection")?;
        add_assign(b, x, &o, n * h)?;
        let hn2 = self.ctx.storage("normed hidden", (n * h * 4) as u64)?;
        rms_norm(b, x, &self.weights.layers[li].post_attention_norm, &hn2, n, h, cfg.rms_norm_eps)?;
        Ok(hn2)
    }

    /// Multi-head (grouped-query) attention's queries and new keys and values.
    fn head_inputs(&self, b: &mut Batch, li: usize, hn: &GpuBuffer, t: &TokenPlaces, w: &[GpuWeight]) -> Result<AttnInputs> {
        let ctx = &self.ctx;
        let cfg = &self.cfg;
        let layer = &self.weights.layers[li];
        let (n, hd) = (t.n, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let [wq, wk, wv, _] = w else { return Err(crate::error::Error::invalid("attention", "expected q, k, v and o projections")) };
        let mut q = linear(b, hn, wq, layer.q_bias.as_ref(), n, "queries")?;
        let mut k = linear(b, hn, wk, layer.k_bias.as_ref(), n, "keys")?;
        let v = linear(b, hn, wv, layer.v_bias.as_ref(), n, "values")?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let (q_rows, q_width, k_rows, k_width) = match cfg.qk_norm {
                QkNorm::PerHead => (n * cfg.num_heads, hd, n * cfg.num_kv_heads, hd),
                _ => (n, q_dim, n, kv_dim),
            };
            let q2 = ctx.storage("normed queries", (n * q_dim * 4) as u64)?;
            let k2 = ctx.storage("normed keys", (n * kv_dim * 4) as u64)?;
            rms_norm(b, &q, qn, &q2, q_rows, q_width, cfg.rms_norm_eps)?;
            rms_norm(b, &k, kn, &k2, k_rows, k_width, cfg.rms_norm_eps)?;
            q = q2;
            k = k2;
        }
        rope(b, &q, &t.positions, &self.rope, n, cfg.num_heads, hd, cfg.rope_layout)?;
        rope(b, &k, &t.positions, &self.rope, n, cfg.num_kv_heads, hd, cfg.rope_layout)?;
        if cfg.kv_bf16 {
            round_bf16(b, &k, n * kv_dim)?;
            round_bf16(b, &v, n * kv_dim)?;
        }
        Ok(AttnInputs { q, new: NewKv { k, v } })
    }

    /// DeepSeek's multi-head latent attention in its absorbed form, prefill and decode alike:
    /// the cache row of a token is its normed KV latent and its roped shared key; each head's
    /// query is multiplied into that head's key block of `kv_b_proj`, so scores and values come
    /// straight from the cache rows, and the heads' latent outputs go through the value block
    /// ([`Self::attention_output`]).
    fn latent_inputs(&self, b: &mut Batch, li: usize, hn: &GpuBuffer, t: &TokenPlaces, w: &[GpuWeight]) -> Result<AttnInputs> {
        let ctx = &self.ctx;
        let cfg = &self.cfg;
        let m = cfg.mla.as_ref().expect("latent attention on an MLA model");
        let norms = self.weights.layers[li].mla.as_ref().expect("MLA norms loaded");
        // DeepSeek's code builds q_a_layernorm and kv_a_layernorm without the config's eps, so
        // they keep RMSNorm's default (transformers does the same).
        let (n, heads, eps) = (t.n, cfg.num_heads, MLA_NORM_EPS);
        let (dn, dr, r) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank);
        let (qk, cw) = (m.qk_head_dim(), m.cache_width());
        let (q, rest) = match (m.q_lora_rank, norms.q_a.as_ref(), w) {
            (Some(qr), Some(q_norm), [wqa, wqb, rest @ ..]) => {
                let qa = linear(b, hn, wqa, None, n, "low-rank queries")?;
                let qa_normed = ctx.storage("normed low-rank queries", (n * qr * 4) as u64)?;
                rms_norm(b, &qa, q_norm, &qa_normed, n, qr, eps)?;
                (linear(b, &qa_normed, wqb, None, n, "queries")?, rest)
            }
            (None, _, [wq, rest @ ..]) => (linear(b, hn, wq, None, n, "queries")?, rest),
            _ => return Err(crate::error::Error::invalid("attention", "MLA query weights missing")),
        };
        let [wkv_a, absorb_k, _absorb_v, _wo] = rest else {
            return Err(crate::error::Error::invalid("attention", "MLA expects kv_a_proj_with_mqa, kv_b_proj's halves and o_proj"));
        };
        let compressed = linear(b, hn, wkv_a, None, n, "compressed kv")?;
        rope_at(b, &compressed, &t.positions, &self.rope, n, 1, cw, r, cfg.rope_layout)?;
        rope_at(b, &q, &t.positions, &self.rope, n, heads, qk, dn, cfg.rope_layout)?;
        let rows = ctx.storage("latent cache rows", (n * cw * 4) as u64)?;
        rms_norm_strided(b, &compressed, &norms.kv_a, &rows, n, r, cw, eps)?;
        copy_cols(b, &compressed, Cols { stride: cw, col0: r }, &rows, Cols { stride: cw, col0: r }, n, dr)?;
        if cfg.kv_bf16 {
            round_bf16(b, &rows, n * cw)?;
        }
        // Absorbed queries: per head, the latent-space query then the roped part.
        let q_latent = ctx.storage("absorbed queries", (n * heads * cw * 4) as u64)?;
        let q_heads = HeadLayout { stride: heads * qk, head_stride: qk, col0: 0 };
        head_matmul(b, &q, q_heads, absorb_k, heads, &q_latent, HeadLayout { stride: heads * cw, head_stride: cw, col0: 0 }, n)?;
        copy_cols(b, &q, Cols { stride: qk, col0: dn }, &q_latent, Cols { stride: cw, col0: r }, n * heads, dr)?;
        // No values under MLA: the host store keeps none (its value width is 0).
        Ok(AttnInputs { q: q_latent, new: NewKv { v: rows.clone(), k: rows } })
    }

    /// Layer `li`'s attention projections; streamed ones are uploaded into the attention slot
    /// unless it holds them already (the work reading the slot's previous layer was submitted
    /// before, and the queue orders the writes after it).
    fn projections(&self, li: usize) -> Result<Vec<GpuWeight>> {
        let host = match &self.weights.layers[li].attn {
            Projections::Resident(w) => return Ok(w.clone()),
            Projections::Streamed(h) => h,
        };
        let slot = self.attn_slot.as_ref().ok_or_else(|| crate::error::Error::invalid("attention", "streamed attention without a slot"))?;
        let mut held = self.attn_held.lock().unwrap();
        if *held != Some(li) {
            let tracer = self.ctx.tracer();
            let start = tracer.as_ref().map(|t| t.now_ns());
            for (i, (buf, data)) in slot.iter().zip(&host.data).enumerate() {
                match (host.fp8[i], &self.attn_staging) {
                    (Some(block), Some(staging)) => {
                        // Submitted before the staging buffer is written again, so each
                        // dequantisation reads its own matrix.
                        let (rows, cols) = host.shapes[i];
                        self.ctx.upload(staging, 0, data)?;
                        let mut b = Batch::named(&self.ctx, format!("layer {li} attention: dequantising FP8"));
                        let run = DequantRun { rows, row0: 0, src_byte0: 0, scale0: (rows * cols).div_ceil(4), dst_byte0: 0 };
                        dequant_fp8(&mut b, staging, staging, buf, run, cols, block)?;
                        b.submit()?;
                    }
                    _ => self.ctx.upload(buf, 0, data)?,
                }
            }
            if let (Some(t), Some(s)) = (tracer, start) {
                t.finish(Track::Upload, format!("layer {li} attention ({} KiB)", host.bytes() >> 10), s);
            }
            *held = Some(li);
        }
        Ok(slot
            .iter()
            .zip(&host.shapes)
            .zip(&host.dtypes)
            .map(|((buffer, &(rows, cols)), &dtype)| GpuWeight { parts: vec![WeightPart { buffer: buffer.clone(), first_row: 0, rows }], rows, cols, dtype })
            .collect())
    }

    pub(crate) fn router_config(&self) -> RouterConfig {
        let r = &self.cfg.routing;
        RouterConfig {
            n_experts: self.cfg.num_experts,
            top_k: self.cfg.experts_per_token,
            sigmoid: r.sigmoid,
            renormalize: self.cfg.norm_topk_prob,
            scale: r.scale,
            n_group: r.n_group,
            topk_group: r.topk_group,
            group_by_top_two: r.group_by_top_two,
        }
    }

    /// The router of MoE layer `li` over `hn`: each token's chosen experts and their weights,
    /// `[n, top_k]` each.
    pub(crate) fn route_block(&self, b: &mut Batch, li: usize, hn: &GpuBuffer, n: usize) -> Result<(GpuBuffer, GpuBuffer)> {
        let ctx = &self.ctx;
        let Ffn::Moe { router, correction_bias, .. } = &self.weights.layers[li].ffn else {
            return Err(crate::error::Error::invalid("router", format!("layer {li} has no experts")));
        };
        let k = self.cfg.experts_per_token;
        let logits = linear(b, hn, router, None, n, "router logits")?;
        let ids = ctx.storage("expert ids", (n * k * 4) as u64)?;
        let weights = ctx.storage("expert weights", (n * k * 4) as u64)?;
        route(b, &self.router_config(), &logits, correction_bias.as_ref(), &ids, &weights, n)?;
        Ok((ids, weights))
    }

    /// What layer `li` adds besides its routed experts: the shared expert of a MoE layer, or the
    /// whole MLP of a dense one, into `x`.
    pub(crate) fn unrouted_ffn(&self, b: &mut Batch, li: usize, hn: &GpuBuffer, n: usize, x: &GpuBuffer) -> Result<()> {
        match &self.weights.layers[li].ffn {
            Ffn::Moe { shared: Some(s), .. } => {
                let y = mlp_out(b, hn, &s.mlp, n)?;
                match &s.gate {
                    Some(gate) => {
                        let g = linear(b, hn, gate, None, n, "shared expert gate")?;
                        add_gated(b, x, &y, &g, n, self.cfg.hidden_size)
                    }
                    None => add_assign(b, x, &y, n * self.cfg.hidden_size),
                }
            }
            Ffn::Moe { shared: None, .. } => Ok(()),
            Ffn::Dense(m) => {
                let y = mlp_out(b, hn, m, n)?;
                add_assign(b, x, &y, n * self.cfg.hidden_size)
            }
        }
    }

    /// Final norm and LM head over `rows` hidden states picked from `x` by `picks`.
    pub(crate) fn logits_block(&self, b: &mut Batch, x: &GpuBuffer, picks: Option<&GpuBuffer>, rows: usize) -> Result<GpuBuffer> {
        let ctx = &self.ctx;
        let h = self.cfg.hidden_size;
        let picked = match picks {
            Some(p) => {
                let picked = ctx.storage("rows for logits", (rows * h * 4) as u64)?;
                copy_rows(b, x, Some(p), &picked, None, rows, h)?;
                picked
            }
            None => x.clone(),
        };
        let normed = ctx.storage("final norm", (rows * h * 4) as u64)?;
        rms_norm(b, &picked, &self.weights.final_norm, &normed, rows, h, self.cfg.rms_norm_eps)?;
        linear(b, &normed, self.weights.lm_head(), None, rows, "logits")
    }

    /// Runs the tokens of `input` through the model, writing their keys and values into `cache`;
    /// returns the logits `[input.logit_rows.len(), vocab]`, or None when none were asked for.
    pub fn forward(&self, cache: &KvCache, input: &StepInput) -> Result<Option<GpuBuffer>> {
        let ctx = &self.ctx;
        let cfg = &self.cfg;
        let n = input.tokens.len();
        ensure!(n > 0, "forward pass", "no tokens");
        let h = cfg.hidden_size;
        let ids = ctx.storage_from("token ids", &input.tokens)?;
        let places = TokenPlaces::upload(ctx, &input.positions, &input.cache_rows, &input.ranges)?;
        let x = ctx.storage("hidden states", (n * h * 4) as u64)?;
        let mut b = Batch::named(ctx, "embedding");
        embed(&mut b, &self.weights.embed, &ids, n, &x)?;
        b.submit()?;
        for li in 0..cfg.num_layers {
            // One submission per layer, so its temporaries return to the pool for the next.
            let mut b = Batch::named(ctx, format!("layer {li}"));
            let kv = LayerKv { k: &cache.k[li], v: &cache.v[li], rows: cache.rows };
            let (hn2, _) = self.attention_block(&mut b, li, &x, &places, &kv)?;
            if let Ffn::Moe { experts, .. } = &self.weights.layers[li].ffn {
                let (ids, weights) = self.route_block(&mut b, li, &hn2, n)?;
                match experts {
                    Experts::Resident(stacked) => expert_ffn(&mut b, &hn2, &ids, &weights, n, cfg.experts_per_token, stacked, &x)?,
                    Experts::Streamed(host) => b = self.streamed_experts(b, li, host, &hn2, &ids, &weights, n, &x)?,
                }
            }
            self.unrouted_ffn(&mut b, li, &hn2, n, &x)?;
            b.submit()?;
        }
        if input.logit_rows.is_empty() {
            return Ok(None);
        }
        let mut b = Batch::named(ctx, "logits");
        let rows = ctx.storage_from("logit rows", &input.logit_rows)?;
        let logits = self.logits_block(&mut b, &x, Some(&rows), input.logit_rows.len())?;
        b.submit()?;
        Ok(Some(logits))
    }

    /// Runs one streamed expert over rows `row0..row0 + m` of `xg` into the same rows of `y`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn slot_ffn(&self, b: &mut Batch, slot: &ExpertSlot, host: &HostExperts, xg: &GpuBuffer, row0: usize, m: usize, scratch: [&GpuBuffer; 3], y: &GpuBuffer) -> Result<()> {
        let (h, inter) = (host.hidden, host.inter);
        let [gate, up, act] = scratch;
        let [wg, wu, wd] = slot.weights(inter, h, host.dtypes);
        let rows = Rows { m, x_row0: row0, y_row0: row0, y_stride: None };
        // With 8-bit inputs, the gate and up matmuls share one quantising of the rows.
        match crate::kernels::matmul_int8::shared_inputs(b, xg, rows, &[&wg, &wu])? {
            Some(xq) => {
                crate::kernels::matmul_int8::matmul_shared(b, &xq, &wg, gate, rows)?;
                crate::kernels::matmul_int8::matmul_shared(b, &xq, &wu, up, rows)?;
            }
            None => {
                matmul_rows(b, xg, &wg, None, gate, rows, None)?;
                matmul_rows(b, xg, &wu, None, up, rows, None)?;
            }
        }
        swiglu_range(b, gate, up, act, row0 * inter, m * inter)?;
        matmul_rows(b, act, &wd, None, y, rows, None)
    }

    /// The routed experts of a layer whose weights live in host memory: the routing comes back to
    /// the host, then only the experts that received tokens stream to the slots, each running
    /// over its rows as soon as its upload is queued. Submits `b` and returns the batch to carry on with.
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
        let n_assign = n * top_k;
        b.submit()?;
        let chosen = ctx.read_u32(ids, n_assign)?;
        let mut counts = vec![0usize; n_experts];
        for &e in &chosen {
            if let Some(c) = counts.get_mut(e as usize) {
                *c += 1;
            }
        }
        let mut b = Batch::named(ctx, format!("layer {layer} routing"));
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
        crate::model::streamer::stream_layer(ctx, &self.slots, &self.slot_cache, layer, host, &active, || Ok(()), |_, u, slot| {
            let mut b = Batch::named(ctx, format!("layer {layer} expert {}", u.expert));
            self.slot_ffn(&mut b, slot, host, &xg, offsets[u.expert], counts[u.expert], [&gate, &up, &act], &y)?;
            b.submit().map(|_| ())
        })?;
        let mut b = Batch::named(ctx, format!("layer {layer} combine"));
        combine(&mut b, &y, &moe_plan, weights, top_k, h, x)?;
        Ok(b)
    }
}

/// `down(silu(gate(x)) * up(x))`.
pub(crate) fn mlp_out(b: &mut Batch, x: &GpuBuffer, m: &Mlp, n: usize) -> Result<GpuBuffer> {
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

