//! Module-based batching: the hidden states of every sequence in flight (the population) live in
//! host memory between modules, and each module runs at the batch size that suits it. Attention
//! runs layer by layer in micro-batches of sequences whose KV pages are staged from the host
//! store; each routed expert runs once per layer per step over every token of the population
//! routed to it, in chunks; finished sequences leave and waiting prompts join, their prefill
//! tokens sharing the steps with decode tokens.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::{Batch, GpuBuffer, PendingRead, Track};
use crate::kernels::elementwise::{copy_rows, expand_bf16};
use crate::kernels::embedding::embed;
use crate::kernels::moe::{combine_rows, expert_ffn};
use crate::kernels::softmax::argmax;
use crate::model::forward::{KvCache, LayerKv, TokenPlaces};
use crate::model::weights::{Experts, Ffn, HostExperts};
use crate::model::Model;
use crate::output::FinishReason;
use crate::sampler::{SequenceSampler, TokenLogprob};
use crate::scheduler::host_kv::HostKv;
use crate::scheduler::{finish_empty, step_limits, CacheRegions, Finished, GenerateStats, Request};

/// Where the user asks module-based batching to run attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum AttentionChoice {
    /// The planner's choice, from the calibrated rates.
    #[default]
    Auto,
    /// On the GPU, each micro-batch's past KV sent up from the host pages.
    Gpu,
    /// On the host, over the KV pages in place: only queries and outputs cross the link.
    Host,
    /// Each layer's micro-batches divided between the host and the GPU.
    Split,
}

impl CpuExperts {
    pub fn name(self) -> &'static str {
        match self {
            CpuExperts::Auto => "auto",
            CpuExperts::Never => "never",
            CpuExperts::Always => "always",
        }
    }
}

impl AttentionChoice {
    pub fn name(self) -> &'static str {
        match self {
            AttentionChoice::Auto => "auto",
            AttentionChoice::Gpu => "gpu",
            AttentionChoice::Host => "host",
            AttentionChoice::Split => "split",
        }
    }
}

/// Whether module-based batching may compute streamed experts on the host (`--cpu-experts`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum CpuExperts {
    /// An expert with few rows in a step runs on the host when the calibrated rates say reading
    /// its weights there costs less than sending them.
    #[default]
    Auto,
    Never,
    /// Every streamed expert of a step that runs its attention first (decode), unless a slot
    /// holds it already.
    Always,
}

/// Where a plan runs attention: the share of each layer's KV rows attended on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionSite {
    Gpu,
    Host,
    /// Sequences holding this many thousandths of a layer's KV rows go to the host.
    Split { host_permille: u16 },
}

impl AttentionSite {
    pub fn host_share(self) -> f64 {
        match self {
            AttentionSite::Gpu => 0.0,
            AttentionSite::Host => 1.0,
            AttentionSite::Split { host_permille } => host_permille as f64 / 1000.0,
        }
    }

    /// `device` names the compute device ([`crate::planner::device_noun`]).
    pub fn describe(self, device: &str) -> String {
        match self {
            AttentionSite::Gpu => format!("on the {device}"),
            AttentionSite::Host => "on the host over the KV pages".into(),
            AttentionSite::Split { .. } => format!("split, {:.0}% of the KV rows on the host", 100.0 * self.host_share()),
        }
    }

    /// For `bench --json`: where attention ran, where the KV lived, the host's share.
    pub fn json(self, kv_on_gpu: bool) -> serde_json::Value {
        let site = match (self, kv_on_gpu) {
            (_, true) | (AttentionSite::Gpu, _) => "gpu",
            (AttentionSite::Host, _) => "host",
            (AttentionSite::Split { .. }, _) => "split",
        };
        let share = if kv_on_gpu { 0.0 } else { self.host_share() };
        serde_json::json!({"site": site, "kv": if kv_on_gpu { "gpu" } else { "host" }, "host_share": share})
    }
}

/// The batch sizes the planner chose for each module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleSizes {
    /// Most sequences in flight.
    pub population: usize,
    /// Most tokens (prefill and decode) fed per step.
    pub step_tokens: usize,
    /// Most new tokens, and most KV rows (past and new), per attention micro-batch.
    pub attn_tokens: usize,
    pub attn_kv_rows: usize,
    /// Most rows per expert dispatch (and tokens per chunk of resident and dense modules).
    pub expert_chunk: usize,
    /// Most sequences whose logits are computed at once.
    pub logit_rows: usize,
    /// Host memory for the KV store, and its page size in tokens.
    pub host_kv_bytes: u64,
    pub page_tokens: usize,
    /// When above zero, the population's KV stays on the GPU in a cache of this many rows
    /// instead of host pages (the planner's choice when the budget holds it and that is faster).
    pub gpu_kv_rows: usize,
    /// Where attention runs over the host pages (the GPU when the KV is on the GPU).
    pub attention: AttentionSite,
    /// Steps of at most this many tokens keep their hidden states on the GPU between modules
    /// (the planner's choice when the budget holds them: every step's, or those of the decode
    /// steps, the population's tokens, while longer prefill steps keep theirs in host memory):
    /// only new keys and values, routing, host queries and attention outputs cross the link,
    /// not the states themselves. 0: never.
    pub gpu_state_rows: usize,
    /// Otherwise, steps of at most this many tokens keep their normed states on the GPU: the
    /// experts and FFNs gather their rows there, so a token's state goes up once a layer (for
    /// its attention) instead of once for each expert it visits. 0: never.
    pub gpu_norm_rows: usize,
    /// Host micro-batches per layer at least (when it has sequences enough): the host attends
    /// one while the GPU computes the next one's inputs and the previous one's outputs.
    pub host_batches: usize,
    /// A streamed expert that received at most this many rows in a step, and that no slot holds,
    /// is computed on the host from host memory instead of being sent (0: never; the planner
    /// sets it where the host's calibrated matmul beats the link). Only for steps that run
    /// their attention before choosing experts (those whose tokens leave some unused).
    pub host_expert_rows: usize,
}

impl ModuleSizes {
    /// Where the steps' hidden states live, for the plan and the run's summary.
    pub fn describe_states(&self, device: &str) -> String {
        match (self.gpu_state_rows, self.gpu_norm_rows) {
            (rows, _) if rows >= self.step_tokens => format!("kept on the {device}"),
            (0, 0) => "in host memory".to_string(),
            (0, rows) => format!("in host memory, normed states on the {device} in steps of up to {rows} tokens"),
            (rows, _) => format!("kept on the {device} in steps of up to {rows} tokens (decode), in host memory in longer ones"),
        }
    }
}

/// Where the population's KV lives.
enum KvStore {
    Host(HostKv),
    Gpu { cache: KvCache, regions: CacheRegions },
}

/// A sequence's share of the KV store.
enum SeqKv {
    Pages(Vec<u32>),
    /// First row of its region in the GPU cache.
    Rows(usize),
}

impl KvStore {
    fn new(model: &Model, sizes: &ModuleSizes) -> Result<Self> {
        Ok(if sizes.gpu_kv_rows > 0 {
            let cache = KvCache::new(&model.ctx, &model.cfg, sizes.gpu_kv_rows)?;
            KvStore::Gpu { regions: CacheRegions { rows: sizes.gpu_kv_rows, used: Vec::new() }, cache }
        } else {
            KvStore::Host(HostKv::new(&model.cfg, sizes.host_kv_bytes, sizes.page_tokens))
        })
    }

    /// Whether a sequence of `tokens` could ever be admitted, and if not, what holds too little.
    fn holds(&self, tokens: usize) -> std::result::Result<(), String> {
        match self {
            KvStore::Host(kv) if kv.pages_for(tokens) > kv.total_pages() => Err(format!(
                "the host KV store ({} pages) cannot hold one sequence of {tokens} tokens",
                kv.total_pages()
            )),
            KvStore::Gpu { regions, .. } if tokens > regions.rows => {
                Err(format!("the GPU KV cache ({} rows) cannot hold one sequence of {tokens} tokens", regions.rows))
            }
            _ => Ok(()),
        }
    }

    fn admit(&mut self, tokens: usize) -> Option<SeqKv> {
        match self {
            KvStore::Host(kv) => kv.alloc(tokens).map(SeqKv::Pages),
            KvStore::Gpu { regions, .. } => regions.alloc(tokens).map(SeqKv::Rows),
        }
    }

    fn release(&mut self, s: SeqKv) {
        match (self, s) {
            (KvStore::Host(kv), SeqKv::Pages(p)) => kv.release(p),
            (KvStore::Gpu { regions, .. }, SeqKv::Rows(start)) => regions.free(start),
            _ => unreachable!("a sequence's KV comes from the store it returns to"),
        }
    }
}

struct Seq {
    index: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    cached: usize,
    /// Tokens this sequence may reach (prompt and new), which its KV share holds.
    cap: usize,
    kv: SeqKv,
    sampler: SequenceSampler,
    logprobs: Vec<TokenLogprob>,
}

/// One sequence's tokens in a step.
#[derive(Clone, Copy)]
struct Part {
    seq: usize,
    past: usize,
    count: usize,
    /// First row of the step's arrays.
    row0: usize,
    completes: bool,
}

/// The step's hidden states (on the host, or on the GPU), router choices and new tokens.
struct StepState {
    n: usize,
    x: Vec<f32>,
    hn: Vec<f32>,
    expert_ids: Vec<u32>,
    expert_weights: Vec<f32>,
    gpu: Option<GpuStates>,
}

/// The step's post-attention normed states, `[n, hidden]`, kept on the GPU, and with them the
/// hidden states themselves when they fit too: modules gather their rows and scatter their
/// results back there.
struct GpuStates {
    x: Option<GpuBuffer>,
    hn: GpuBuffer,
}

impl StepState {
    /// The hidden states, when they live on the GPU.
    fn x_gpu(&self) -> Option<&GpuBuffer> {
        self.gpu.as_ref().and_then(|g| g.x.as_ref())
    }
    /// The normed states, when they live on the GPU.
    fn hn_gpu(&self) -> Option<&GpuBuffer> {
        self.gpu.as_ref().map(|g| &g.hn)
    }
}

/// The GPU index list of the step rows of `parts`, for gathering and scattering states.
fn part_rows(model: &Model, parts: &[Part]) -> Result<GpuBuffer> {
    let rows: Vec<u32> = parts.iter().flat_map(|p| (p.row0..p.row0 + p.count).map(|r| r as u32)).collect();
    send(model, "state rows", &rows)
}

/// A micro-batch's hidden states on the GPU for its attention: gathered from the step's GPU
/// states where they live (with the index list of the parts' rows, returned for scattering the
/// results back), else sent up from `xs`.
fn micro_batch_states(model: &Model, b: &mut Batch, st: &StepState, mb: &[Part], xs: &[f32]) -> Result<(Option<GpuBuffer>, GpuBuffer)> {
    let rows = st.gpu.as_ref().map(|_| part_rows(model, mb)).transpose()?;
    let m: usize = mb.iter().map(|p| p.count).sum();
    let xb = match (st.x_gpu(), &rows) {
        (Some(x), Some(idx)) => gather_states(b, x, idx, m, model.cfg.hidden_size)?,
        _ => send(model, "hidden states", xs)?,
    };
    Ok((rows, xb))
}

/// Rows `idx` of a GPU states buffer gathered into a buffer of their own.
fn gather_states(b: &mut Batch, from: &GpuBuffer, idx: &GpuBuffer, m: usize, h: usize) -> Result<GpuBuffer> {
    let to = b.ctx().storage("gathered states", (m * h * 4) as u64)?;
    copy_rows(b, from, Some(idx), &to, None, m, h)?;
    Ok(to)
}

/// Sends hidden states (or routing, queries, attention outputs) to the GPU, traced; the link
/// counts them and holds them to its rate like every other byte.
fn send<T: bytemuck::Pod>(model: &Model, what: &str, data: &[T]) -> Result<GpuBuffer> {
    let bytes = std::mem::size_of_val(data);
    let tracer = model.ctx.tracer();
    let start = tracer.as_ref().map(|t| t.now_ns());
    let buf = model.ctx.storage_from(what, data)?;
    if let (Some(t), Some(s)) = (tracer, start) {
        t.finish(Track::Upload, format!("{what} ({} KiB)", bytes >> 10), s);
    }
    Ok(buf)
}

/// Uploads the past KV rows of a micro-batch (`keys` and `values` hold them back to back, as the
/// host store keeps them) to their runs of rows; the rows between runs are the new tokens',
/// written on the GPU. f32 rows go straight to `bufs`; bf16 rows go to 16-bit staging buffers,
/// returned for the micro-batch to widen into `bufs` before its attention. Traced as link traffic.
fn send_kv(model: &Model, what: &str, bufs: [&GpuBuffer; 2], data: [&[u8]; 2], runs: &[(usize, usize)], rows: usize, widths: [usize; 2]) -> Result<Option<[GpuBuffer; 2]>> {
    let vb = model.cfg.kv_value_bytes();
    let staging = if vb == 2 {
        let [k, v] = widths.map(|w| model.ctx.storage("micro-batch KV (bf16)", ((rows * w * 2) as u64).next_multiple_of(4).max(4)));
        Some([k?, v?])
    } else {
        None
    };
    let bytes = data[0].len() + data[1].len();
    if bytes == 0 {
        return Ok(staging);
    }
    let tracer = model.ctx.tracer();
    let start = tracer.as_ref().map(|t| t.now_ns());
    for (i, (values, width)) in data.into_iter().zip(widths).enumerate() {
        let buf = staging.as_ref().map_or(bufs[i], |s| &s[i]);
        let row_bytes = width * vb;
        let mut at = 0;
        for &(row, count) in runs.iter().filter(|r| r.1 > 0) {
            let run = &values[at * row_bytes..(at + count) * row_bytes];
            if !run.is_empty() {
                model.ctx.upload(buf, (row * row_bytes) as u64, run)?;
            }
            at += count;
        }
    }
    if let (Some(t), Some(s)) = (tracer, start) {
        t.finish(Track::Upload, format!("{what} ({} KiB)", bytes >> 10), s);
    }
    Ok(staging)
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytemuck::pod_collect_to_vec(bytes)
}

pub fn generate_module(
    model: &Model,
    requests: &[Request],
    sizes: &ModuleSizes,
    mut on_finish: impl FnMut(Finished) -> Result<()>,
) -> Result<GenerateStats> {
    let cfg = &model.cfg;
    let mut stats = GenerateStats::default();
    let mut kv = KvStore::new(model, sizes)?;
    let need = |r: &Request| (r.prompt.len() + r.max_new_tokens).max(1);
    if let Some(r) = requests.iter().max_by_key(|r| need(r)) {
        let flag = if sizes.gpu_kv_rows > 0 { "--gpu-memory" } else { "--host-memory" };
        kv.holds(need(r)).map_err(|e| Error::invalid(flag, e))?;
    }
    let logit_rows = sizes.logit_rows.min(step_limits(&model.ctx, cfg, sizes.step_tokens).1).max(1);
    let mut waiting = 0usize;
    let mut pop: Vec<Seq> = Vec::new();
    finish_empty(requests, &mut on_finish)?;
    loop {
        while waiting < requests.len() && pop.len() < sizes.population {
            let r = &requests[waiting];
            if r.max_new_tokens == 0 {
                waiting += 1;
                continue;
            }
            let Some(share) = kv.admit(need(r)) else { break };
            pop.push(Seq {
                index: waiting,
                tokens: r.prompt.clone(),
                prompt_len: r.prompt.len(),
                cached: 0,
                cap: need(r),
                kv: share,
                sampler: r.sampler(),
                logprobs: Vec::new(),
            });
            stats.prompt_tokens += r.prompt.len();
            waiting += 1;
        }
        if pop.is_empty() {
            break;
        }
        crate::interrupt::check()?;
        // Decode tokens first, then prompt chunks up to the step's token budget.
        let mut order: Vec<usize> = (0..pop.len()).collect();
        order.sort_by_key(|&i| pop[i].cached < pop[i].prompt_len);
        let mut parts = Vec::new();
        let (mut n, mut prefill_tokens, mut decode_tokens) = (0usize, 0usize, 0usize);
        for i in order {
            let s = &pop[i];
            let pending = s.tokens.len() - s.cached;
            let count = pending.min(sizes.step_tokens.saturating_sub(n)).min(sizes.attn_tokens);
            if count == 0 {
                break;
            }
            parts.push(Part { seq: i, past: s.cached, count, row0: n, completes: count == pending });
            let in_prompt = s.prompt_len.saturating_sub(s.cached).min(count);
            prefill_tokens += in_prompt;
            decode_tokens += count - in_prompt;
            n += count;
        }
        let started = Instant::now();
        let needs_logits: Vec<bool> = parts.iter().filter(|p| p.completes).map(|p| requests[pop[p.seq].index].needs_logits()).collect();
        let chosen = run_step(model, &mut kv, &pop, &parts, n, sizes, logit_rows, &needs_logits)?;
        stats.add_step(started.elapsed(), prefill_tokens, decode_tokens);

        let mut done = Vec::new();
        for p in &parts {
            pop[p.seq].cached += p.count;
        }
        for (p, sampled) in parts.iter().filter(|p| p.completes).zip(chosen) {
            let s = &mut pop[p.seq];
            let r = &requests[s.index];
            let (token, logprob) = r.choose(&mut s.sampler, sampled.argmax, sampled.logits.as_deref());
            s.tokens.push(token);
            s.logprobs.extend(logprob);
            stats.generated_tokens += 1;
            if let Some(f) = r.finish_reason(&cfg.eos_token_ids, &s.tokens[s.prompt_len..], s.tokens.len(), s.cap)? {
                done.push((p.seq, f));
            }
        }
        done.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        let mut finished: Vec<(Seq, FinishReason)> = done.into_iter().map(|(i, f)| (pop.swap_remove(i), f)).collect();
        finished.sort_by_key(|(s, _)| s.index);
        for (s, finish) in finished {
            kv.release(s.kv);
            on_finish(Finished { index: s.index, output: s.tokens[s.prompt_len..].to_vec(), finish, logprobs: s.logprobs })?;
        }
    }
    Ok(stats)
}

/// A completed sequence's greedy token, and its logits when the host needs them.
struct Sampled {
    argmax: u32,
    logits: Option<Vec<f32>>,
}

/// One step through every module: embeddings, then per layer attention micro-batches and the
/// FFN modules, then the logits of the sequences that sample.
#[allow(clippy::too_many_arguments)]
fn run_step(
    model: &Model,
    kv: &mut KvStore,
    pop: &[Seq],
    parts: &[Part],
    n: usize,
    sizes: &ModuleSizes,
    logit_rows: usize,
    needs_logits: &[bool],
) -> Result<Vec<Sampled>> {
    let ctx = &model.ctx;
    let cfg = &model.cfg;
    let (h, k) = (cfg.hidden_size, cfg.experts_per_token);
    let mut ids = Vec::with_capacity(n);
    for p in parts {
        ids.extend_from_slice(&pop[p.seq].tokens[p.past..p.past + p.count]);
    }
    let on_gpu = n <= sizes.gpu_state_rows;
    let norms_on_gpu = on_gpu || n <= sizes.gpu_norm_rows;
    let host_rows = if on_gpu { 0 } else { n };
    let mut st = StepState {
        n,
        x: vec![0.0; host_rows * h],
        hn: vec![0.0; if norms_on_gpu { 0 } else { n * h }],
        expert_ids: vec![0; n * k],
        expert_weights: vec![0.0; n * k],
        gpu: None,
    };
    if norms_on_gpu {
        let hn = ctx.storage("step normed states", (n * h * 4) as u64)?;
        let x = if on_gpu {
            let x = ctx.storage("step hidden states", (n * h * 4) as u64)?;
            let idb = send(model, "token ids", &ids)?;
            let mut b = Batch::named(ctx, "embedding");
            embed(&mut b, &model.weights.embed, &idb, n, &x)?;
            b.submit()?;
            Some(x)
        } else {
            None
        };
        st.gpu = Some(GpuStates { x, hn });
    }
    for (c, rows) in chunks(host_rows, sizes.expert_chunk) {
        let idb = ctx.storage_from("token ids", &ids[c..c + rows])?;
        let xb = ctx.storage("hidden states", (rows * h * 4) as u64)?;
        let mut b = Batch::named(ctx, "embedding");
        embed(&mut b, &model.weights.embed, &idb, rows, &xb)?;
        b.submit()?;
        let out = ctx.read_later(&[(&xb, (rows * h * 4) as u64)])?.wait(ctx)?;
        st.x[c * h..(c + rows) * h].copy_from_slice(&floats(&out[0]));
    }
    for li in 0..cfg.num_layers {
        let mut attention = |st: &mut StepState| attention_layer(model, kv, pop, parts, sizes, li, st);
        if let Ffn::Moe { experts: Experts::Streamed(_), .. } = &model.weights.layers[li].ffn {
            streamed_layer(model, sizes, li, &mut st, attention)?;
        } else {
            attention(&mut st)?;
        }
        match &model.weights.layers[li].ffn {
            Ffn::Moe { experts: Experts::Streamed(_), .. } => {
                if matches!(&model.weights.layers[li].ffn, Ffn::Moe { shared: Some(_), .. }) {
                    chunked_ffn(model, sizes, li, false, &mut st)?;
                }
            }
            Ffn::Moe { experts: Experts::Resident(_), .. } => chunked_ffn(model, sizes, li, true, &mut st)?,
            Ffn::Dense(_) => chunked_ffn(model, sizes, li, false, &mut st)?,
        }
    }
    // Logits of the last token of each completing part.
    let rows: Vec<usize> = parts.iter().filter(|p| p.completes).map(|p| p.row0 + p.count - 1).collect();
    let vocab = cfg.vocab_size;
    let mut out = Vec::with_capacity(rows.len());
    for (c, m) in chunks(rows.len(), logit_rows) {
        let mut b = Batch::named(ctx, "logits");
        let logits = match st.x_gpu() {
            Some(x) => {
                let picks: Vec<u32> = rows[c..c + m].iter().map(|&r| r as u32).collect();
                let picks = send(model, "rows for logits", &picks)?;
                model.logits_block(&mut b, x, Some(&picks), m)?
            }
            None => {
                let mut xs = Vec::with_capacity(m * h);
                for &r in &rows[c..c + m] {
                    xs.extend_from_slice(&st.x[r * h..(r + 1) * h]);
                }
                let xb = send(model, "hidden states for logits", &xs)?;
                model.logits_block(&mut b, &xb, None, m)?
            }
        };
        let idb = ctx.storage("greedy tokens", (m * 4) as u64)?;
        argmax(&mut b, &logits, &idb, m, vocab)?;
        b.submit()?;
        let best = ctx.read_u32(&idb, m)?;
        let wanted = &needs_logits[c..c + m];
        let all = if wanted.iter().any(|&w| w) { Some(ctx.read_f32(&logits, m * vocab)?) } else { None };
        for (r, argmax) in best.into_iter().enumerate() {
            let logits = all.as_ref().filter(|_| wanted[r]).map(|a| a[r * vocab..(r + 1) * vocab].to_vec());
            out.push(Sampled { argmax, logits });
        }
    }
    Ok(out)
}

/// `(first, count)` chunks of `n` items, `size` at most each.
fn chunks(n: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    let size = size.max(1);
    (0..n.div_ceil(size)).map(move |i| (i * size, size.min(n - i * size)))
}

/// Micro-batches of parts, each within the attention sizes (a part too large alone runs alone);
/// KV rows count only when they are staged from host pages.
fn micro_batches(parts: &[Part], sizes: &ModuleSizes, staged_kv: bool) -> Vec<Vec<Part>> {
    let mut out: Vec<Vec<Part>> = Vec::new();
    let (mut tokens, mut rows) = (0, 0);
    for &p in parts {
        let r = if staged_kv { p.past + p.count } else { 0 };
        let fits = tokens + p.count <= sizes.attn_tokens && rows + r <= sizes.attn_kv_rows;
        match out.last_mut() {
            Some(mb) if fits => mb.push(p),
            _ => {
                out.push(vec![p]);
                (tokens, rows) = (0, 0);
            }
        }
        tokens += p.count;
        rows += r;
    }
    out
}

/// What one attention micro-batch sends back.
struct AttnPending {
    read: PendingRead,
    parts: Vec<Part>,
    routed: bool,
    /// The hidden states, and their norms, come back (they live on the host).
    x_back: bool,
    hn_back: bool,
    /// The new keys and values come back for the host pages.
    host_kv: bool,
}

/// A host micro-batch after its first GPU half: its queries and new keys and values on their
/// way back, its hidden states kept on the GPU for the second half.
struct HostInputs {
    read: PendingRead,
    parts: Vec<Part>,
    xb: GpuBuffer,
    /// The parts' rows in the GPU states, when the states live there.
    rows: Option<GpuBuffer>,
    /// Each token's key span as (first position, count): what it attends to in its pages.
    spans: Vec<u32>,
    index: usize,
}

/// Divides a layer's parts between the host and the GPU: the first ones, until they hold
/// `host_share` of the KV rows that the step's attention reads, go to the host.
fn split_for_host(parts: &[Part], host_share: f64) -> (Vec<Part>, Vec<Part>) {
    if host_share <= 0.0 {
        return (Vec::new(), parts.to_vec());
    }
    if host_share >= 1.0 {
        return (parts.to_vec(), Vec::new());
    }
    let total: usize = parts.iter().map(|p| p.past + p.count).sum();
    let (mut host, mut gpu, mut taken) = (Vec::new(), Vec::new(), 0usize);
    for &p in parts {
        if (taken as f64) < host_share * total as f64 {
            taken += p.past + p.count;
            host.push(p);
        } else {
            gpu.push(p);
        }
    }
    (host, gpu)
}

/// One micro-batch of a layer's attention, on the device it was given to.
enum MicroBatch {
    Host(Vec<Part>),
    Gpu(Vec<Part>),
}

/// The attention half of layer `li` over the whole step, micro-batch by micro-batch, each on the
/// GPU (its past KV staged up from the pages) or on the host (its queries brought down and
/// attended over the pages in place). Host and GPU micro-batches alternate, and each is
/// submitted before the previous one's results are taken back, so the host attends micro-batch
/// i while the GPU computes the projections of i + 1 or another micro-batch's whole attention.
fn attention_layer(model: &Model, kv: &mut KvStore, pop: &[Seq], parts: &[Part], sizes: &ModuleSizes, li: usize, st: &mut StepState) -> Result<()> {
    let routed = matches!(model.weights.layers[li].ffn, Ffn::Moe { .. });
    let host_pages = matches!(kv, KvStore::Host(_));
    let share = if host_pages { sizes.attention.host_share() } else { 0.0 };
    let (host_parts, gpu_parts) = split_for_host(parts, share);
    let host_tokens: usize = host_parts.iter().map(|p| p.count).sum();
    let host_sizes = ModuleSizes { attn_tokens: sizes.attn_tokens.min(host_tokens.div_ceil(sizes.host_batches.max(1)).max(1)), ..*sizes };
    let mut host_mbs = micro_batches(&host_parts, &host_sizes, false).into_iter().map(MicroBatch::Host);
    let mut gpu_mbs = micro_batches(&gpu_parts, sizes, host_pages).into_iter().map(MicroBatch::Gpu);
    let mut order = Vec::new();
    loop {
        let (h, g) = (host_mbs.next(), gpu_mbs.next());
        if h.is_none() && g.is_none() {
            break;
        }
        order.extend(h);
        order.extend(g);
    }
    let mut waiting_host: Option<HostInputs> = None;
    let mut outputs: std::collections::VecDeque<AttnPending> = Default::default();
    for (mi, mb) in order.into_iter().enumerate() {
        match mb {
            MicroBatch::Gpu(mb) => outputs.push_back(gpu_micro_batch(model, kv, pop, mb, li, mi, routed, st)?),
            MicroBatch::Host(mb) => {
                let inputs = host_inputs(model, mb, li, mi, st)?;
                if let Some(prev) = waiting_host.replace(inputs) {
                    outputs.push_back(host_attend(model, kv, pop, li, routed, prev, st)?);
                }
            }
        }
        // One result in flight behind the newest keeps the GPU fed while the host takes it.
        while outputs.len() > 2 {
            take_attention(model, kv, pop, li, outputs.pop_front().expect("non-empty"), st)?;
        }
    }
    if let Some(prev) = waiting_host {
        outputs.push_back(host_attend(model, kv, pop, li, routed, prev, st)?);
    }
    while let Some(p) = outputs.pop_front() {
        take_attention(model, kv, pop, li, p, st)?;
    }
    Ok(())
}

/// Positions, cache rows and key ranges of a micro-batch's tokens, and their hidden states;
/// `start(part)` is the first row of the part's sequence in the KV rows the GPU attends over.
fn token_places(model: &Model, mb: &[Part], st: &StepState, mut start: impl FnMut(&Part) -> usize) -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<f32>) {
    let cfg = &model.cfg;
    let h = cfg.hidden_size;
    let (mut positions, mut cache_rows, mut ranges, mut xs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in mb {
        let start = start(p);
        for j in 0..p.count {
            let pos = p.past + j;
            let seen = pos + 1;
            let len = cfg.sliding_window.map_or(seen, |w| seen.min(w));
            positions.push(pos as u32);
            cache_rows.push((start + pos) as u32);
            ranges.extend([(start + seen - len) as u32, len as u32]);
        }
        if st.x_gpu().is_none() {
            xs.extend_from_slice(&st.x[p.row0 * h..(p.row0 + p.count) * h]);
        }
    }
    (positions, cache_rows, ranges, xs)
}

/// A micro-batch's whole attention on the GPU: its past KV staged up from the host pages (or
/// read in place from the GPU cache), the new keys and values coming back for the pages.
#[allow(clippy::too_many_arguments)]
fn gpu_micro_batch(model: &Model, kv: &KvStore, pop: &[Seq], mb: Vec<Part>, li: usize, mi: usize, routed: bool, st: &StepState) -> Result<AttnPending> {
    let ctx = &model.ctx;
    let [kw, vw] = model.cfg.kv_widths();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    // Each sequence's past rows, followed on the GPU by its new ones: (first row, rows).
    let mut past_runs = Vec::new();
    let mut row = 0usize;
    let (positions, cache_rows, ranges, xs) = token_places(model, &mb, st, |p| {
        // Host pages: the past is staged into the micro-batch's rows. GPU cache: the sequence's
        // own region holds it already.
        match (kv, &pop[p.seq].kv) {
            (KvStore::Host(store), SeqKv::Pages(pages)) => {
                store.gather(li, pages, 0, p.past, &mut keys, &mut values);
                past_runs.push((row, p.past));
                let start = row;
                row += p.past + p.count;
                start
            }
            (_, SeqKv::Rows(start)) => *start,
            _ => unreachable!("a sequence's KV comes from the job's store"),
        }
    });
    let m = positions.len();
    let host_kv = matches!(kv, KvStore::Host(_));
    let (kb, vb, kv_rows, staged) = match kv {
        KvStore::Host(_) => {
            let kb = ctx.storage("micro-batch keys", (row * kw * 4) as u64)?;
            let vb = ctx.storage("micro-batch values", (row * vw * 4).max(4) as u64)?;
            let staged = send_kv(model, &format!("layer {li} KV, micro-batch {mi}"), [&kb, &vb], [&keys, &values], &past_runs, row, [kw, vw])?;
            (kb, vb, row, staged)
        }
        KvStore::Gpu { cache, .. } => (cache.k[li].clone(), cache.v[li].clone(), cache.rows, None),
    };
    let places = TokenPlaces::upload(ctx, &positions, &cache_rows, &ranges)?;
    let mut b = Batch::named(ctx, format!("layer {li} attention, micro-batch {mi}"));
    let (rows, xb) = micro_batch_states(model, &mut b, st, &mb, &xs)?;
    // 16-bit KV pages widen to f32 for the attention (the new rows are written after).
    if let Some([ks, vs]) = &staged {
        for (src, dst, w) in [(ks, &kb, kw), (vs, &vb, vw)] {
            if w > 0 && row > 0 {
                expand_bf16(&mut b, src, dst, row * w)?;
            }
        }
    }
    let (hn, new) = model.attention_block(&mut b, li, &xb, &places, &LayerKv { k: &kb, v: &vb, rows: kv_rows })?;
    // New keys and values go back to the host pages; a GPU cache has them in place.
    let new_kv = host_kv.then_some([(&new.k, (m * kw * 4) as u64), (&new.v, (m * vw * 4) as u64)]);
    finish_micro_batch(model, b, li, st, rows.as_ref(), [&xb, &hn], new_kv, routed, mb)
}

/// The end of a micro-batch's attention on the GPU, whichever device attended: its hidden states
/// `x` and their norms `hn` scattered back into the step's GPU states where those live there
/// (else read back), the new keys and values read back when given, the router run on the norms
/// and its choices read back; submits and starts the readback.
#[allow(clippy::too_many_arguments)]
fn finish_micro_batch(
    model: &Model,
    mut b: Batch,
    li: usize,
    st: &StepState,
    rows: Option<&GpuBuffer>,
    [xb, hn]: [&GpuBuffer; 2],
    new_kv: Option<[(&GpuBuffer, u64); 2]>,
    routed: bool,
    parts: Vec<Part>,
) -> Result<AttnPending> {
    let (h, k) = (model.cfg.hidden_size, model.cfg.experts_per_token);
    let m: usize = parts.iter().map(|p| p.count).sum();
    let mut back = Vec::new();
    for (home, states) in [(st.x_gpu(), xb), (st.hn_gpu(), hn)] {
        match (home, rows) {
            (Some(home), Some(idx)) => copy_rows(&mut b, states, None, home, Some(idx), m, h)?,
            _ => back.push((states, (m * h * 4) as u64)),
        }
    }
    back.extend(new_kv.into_iter().flatten());
    let routing = if routed { Some(model.route_block(&mut b, li, hn, m)?) } else { None };
    if let Some((ids, w)) = &routing {
        back.extend([(ids, (m * k * 4) as u64), (w, (m * k * 4) as u64)]);
    }
    b.submit()?;
    let read = model.ctx.read_later(&back)?;
    Ok(AttnPending { read, parts, routed, x_back: st.x_gpu().is_none(), hn_back: st.hn_gpu().is_none(), host_kv: new_kv.is_some() })
}

/// The first GPU half of a host micro-batch: norm and projections; its queries and new keys and
/// values start back to the host.
fn host_inputs(model: &Model, mb: Vec<Part>, li: usize, mi: usize, st: &StepState) -> Result<HostInputs> {
    let ctx = &model.ctx;
    let [kw, vw] = model.cfg.kv_widths();
    // With each sequence starting at row 0, the ranges are the tokens' spans in their own
    // pages, which the host attends over (the GPU half reads only the positions).
    let (positions, cache_rows, ranges, xs) = token_places(model, &mb, st, |_| 0);
    let m = positions.len();
    let places = TokenPlaces::upload(ctx, &positions, &cache_rows, &ranges)?;
    let mut b = Batch::named(ctx, format!("layer {li} attention inputs, micro-batch {mi}"));
    let (rows, xb) = micro_batch_states(model, &mut b, st, &mb, &xs)?;
    let inputs = model.attention_inputs(&mut b, li, &xb, &places)?;
    b.submit()?;
    let shape = model.attention_shape();
    let q_width = shape.n_heads * shape.head_dim;
    let read = ctx.read_later(&[(&inputs.q, (m * q_width * 4) as u64), (&inputs.new.k, (m * kw * 4) as u64), (&inputs.new.v, (m * vw * 4) as u64)])?;
    Ok(HostInputs { read, parts: mb, xb, rows, spans: ranges, index: mi })
}

/// The host half of a host micro-batch: its new keys and values into the pages, attention over
/// the pages, the outputs up to the GPU for the output projection and the router.
fn host_attend(model: &Model, kv: &mut KvStore, pop: &[Seq], li: usize, routed: bool, hi: HostInputs, st: &StepState) -> Result<AttnPending> {
    let ctx = &model.ctx;
    let cfg = &model.cfg;
    let [kw, vw] = cfg.kv_widths();
    let shape = model.attention_shape();
    let got = hi.read.wait(ctx)?;
    let (q, new_k, new_v) = (floats(&got[0]), floats(&got[1]), floats(&got[2]));
    let KvStore::Host(store) = kv else { unreachable!("host attention runs over host pages") };
    let tracer = ctx.tracer();
    let started = tracer.as_ref().map(|t| t.now_ns());
    let mut at = 0;
    for p in &hi.parts {
        let SeqKv::Pages(pages) = &pop[p.seq].kv else { unreachable!("host pages") };
        store.write(li, pages, p.past, &new_k[at * kw..(at + p.count) * kw], &new_v[at * vw..(at + p.count) * vw]);
        at += p.count;
    }
    let mut spans = Vec::with_capacity(at);
    let mut span = hi.spans.chunks_exact(2);
    for p in &hi.parts {
        let SeqKv::Pages(pages) = &pop[p.seq].kv else { unreachable!("host pages") };
        for [first, len] in span.by_ref().take(p.count).map(|s| [s[0] as usize, s[1] as usize]) {
            spans.push(crate::cpu::attention::KeySpan { pages, first, len });
        }
    }
    let m = spans.len();
    let mut out = vec![0f32; m * shape.n_heads * shape.v_dim];
    crate::cpu::attention::attention(&shape, &store.rows(li), &q, &spans, &mut out)?;
    if let (Some(t), Some(s)) = (&tracer, started) {
        t.finish(Track::HostAttention, format!("layer {li} attention, micro-batch {} ({m} queries)", hi.index), s);
    }
    let ob = send(model, "attention outputs", &out)?;
    let mut b = Batch::named(ctx, format!("layer {li} attention output, micro-batch {}", hi.index));
    let hn = model.attention_output(&mut b, li, &hi.xb, &ob, m)?;
    finish_micro_batch(model, b, li, st, hi.rows.as_ref(), [&hi.xb, &hn], None, routed, hi.parts)
}

fn take_attention(model: &Model, kv: &mut KvStore, pop: &[Seq], li: usize, p: AttnPending, st: &mut StepState) -> Result<()> {
    let cfg = &model.cfg;
    let (h, k) = (cfg.hidden_size, cfg.experts_per_token);
    let [kw, vw] = cfg.kv_widths();
    let got = p.read.wait(&model.ctx)?;
    let mut at = 0;
    let mut next = || {
        at += 1;
        &got[at - 1]
    };
    let x = if p.x_back { floats(next()) } else { Vec::new() };
    let hn = if p.hn_back { floats(next()) } else { Vec::new() };
    let (new_k, new_v) = if p.host_kv { (floats(next()), floats(next())) } else { (Vec::new(), Vec::new()) };
    let (ids, weights): (Vec<u32>, Vec<f32>) = if p.routed { (bytemuck::pod_collect_to_vec(next()), floats(next())) } else { (Vec::new(), Vec::new()) };
    let mut at = 0;
    for part in &p.parts {
        let (r0, c) = (part.row0, part.count);
        if p.x_back {
            st.x[r0 * h..(r0 + c) * h].copy_from_slice(&x[at * h..(at + c) * h]);
        }
        if p.hn_back {
            st.hn[r0 * h..(r0 + c) * h].copy_from_slice(&hn[at * h..(at + c) * h]);
        }
        if p.host_kv {
            if let (KvStore::Host(store), SeqKv::Pages(pages)) = (&mut *kv, &pop[part.seq].kv) {
                store.write(li, pages, part.past, &new_k[at * kw..(at + c) * kw], &new_v[at * vw..(at + c) * vw]);
            }
        }
        if p.routed {
            st.expert_ids[r0 * k..(r0 + c) * k].copy_from_slice(&ids[at * k..(at + c) * k]);
            st.expert_weights[r0 * k..(r0 + c) * k].copy_from_slice(&weights[at * k..(at + c) * k]);
        }
        at += c;
    }
    Ok(())
}

/// The FFN modules whose weights are on the GPU, over the step in chunks: the resident routed
/// experts (when `routed`) and the shared expert or dense MLP, added into the hidden states.
fn chunked_ffn(model: &Model, sizes: &ModuleSizes, li: usize, routed: bool, st: &mut StepState) -> Result<()> {
    let ctx = &model.ctx;
    let (h, k) = (model.cfg.hidden_size, model.cfg.experts_per_token);
    let mut pending: Option<(PendingRead, usize, usize)> = None;
    let take = |p: (PendingRead, usize, usize), st: &mut StepState| -> Result<()> {
        let (read, c, rows) = p;
        let got = read.wait(ctx)?;
        st.x[c * h..(c + rows) * h].copy_from_slice(&floats(&got[0]));
        Ok(())
    };
    for (c, rows) in chunks(st.n, sizes.expert_chunk) {
        let mut b = Batch::named(ctx, format!("layer {li} ffn, rows {c}.."));
        let idx = match &st.gpu {
            Some(_) => Some(send(model, "state rows", &(c as u32..(c + rows) as u32).collect::<Vec<u32>>())?),
            None => None,
        };
        let xb = match (st.x_gpu(), &idx) {
            (Some(x), Some(idx)) => gather_states(&mut b, x, idx, rows, h)?,
            _ => send(model, "hidden states", &st.x[c * h..(c + rows) * h])?,
        };
        let hb = match (st.hn_gpu(), &idx) {
            (Some(norms), Some(idx)) => gather_states(&mut b, norms, idx, rows, h)?,
            _ => send(model, "normed hidden states", &st.hn[c * h..(c + rows) * h])?,
        };
        if routed {
            let Ffn::Moe { experts: Experts::Resident(stacked), .. } = &model.weights.layers[li].ffn else { unreachable!() };
            let ids = send(model, "expert ids", &st.expert_ids[c * k..(c + rows) * k])?;
            let w = send(model, "expert weights", &st.expert_weights[c * k..(c + rows) * k])?;
            expert_ffn(&mut b, &hb, &ids, &w, rows, k, stacked, &xb)?;
        }
        model.unrouted_ffn(&mut b, li, &hb, rows, &xb)?;
        if let (Some(x), Some(idx)) = (st.x_gpu(), &idx) {
            // The states stay on the GPU: the chunk's rows go back in place, nothing comes down.
            copy_rows(&mut b, &xb, None, x, Some(idx), rows, h)?;
            b.submit()?;
            continue;
        }
        b.submit()?;
        let read = ctx.read_later(&[(&xb, (rows * h * 4) as u64)])?;
        if let Some(prev) = pending.replace((read, c, rows)) {
            take(prev, st)?;
        }
    }
    if let Some(prev) = pending {
        take(prev, st)?;
    }
    Ok(())
}

/// The step's assignments of layer `li` grouped by expert: assignment indices `t * top_k + j`.
fn group_by_expert(st: &StepState, n_experts: usize) -> Vec<Vec<u32>> {
    let mut groups: Vec<Vec<u32>> = vec![Vec::new(); n_experts];
    for (a, &e) in st.expert_ids.iter().enumerate() {
        if let Some(g) = groups.get_mut(e as usize) {
            g.push(a as u32);
        }
    }
    groups
}

/// Layer `li` with streamed experts: `attention`, then each expert uploaded once and run over all
/// of its rows in chunks (or, with few rows and no slot holding it, computed on the host from its
/// pack meanwhile: [`ModuleSizes::host_expert_rows`]), the outputs summed into the hidden states
/// in the same order as the GPU combine. When the step has so many tokens that every expert is all but sure to be
/// chosen, the experts start uploading before the attention runs, so the link works meanwhile.
fn streamed_layer(model: &Model, sizes: &ModuleSizes, li: usize, st: &mut StepState, attention: impl FnOnce(&mut StepState) -> Result<()>) -> Result<()> {
    let ctx = &model.ctx;
    let cfg = &model.cfg;
    let Ffn::Moe { experts: Experts::Streamed(host), .. } = &model.weights.layers[li].ffn else { unreachable!() };
    let (h, k, inter, e) = (cfg.hidden_size, cfg.experts_per_token, host.inter, cfg.num_experts);
    let unused = e as f64 * (1.0 - k as f64 / e as f64).powf(st.n as f64);
    let mut attention = Some(attention);
    // Grouped here when the attention runs first, else once it has run inside the stream.
    let mut grouped = None;
    // Experts computed on the host this step: few rows, and no slot holding them.
    let mut on_host: Vec<usize> = Vec::new();
    let experts: Vec<usize> = if unused < 0.01 {
        (0..e).collect()
    } else {
        attention.take().expect("not run yet")(st)?;
        let groups = group_by_expert(st, e);
        let cache = model.slot_cache.lock().unwrap();
        let (host_side, gpu_side): (Vec<usize>, Vec<usize>) =
            (0..e).filter(|&x| !groups[x].is_empty()).partition(|&x| groups[x].len() <= sizes.host_expert_rows && !cache.holds(li, x));
        drop(cache);
        on_host = host_side;
        grouped = Some(groups);
        gpu_side
    };
    let host_work = match &grouped {
        Some(groups) if !on_host.is_empty() => host_expert_inputs(model, li, st, groups, &on_host)?,
        _ => Vec::new(),
    };
    struct Work<'s> {
        st: &'s mut StepState,
        groups: Vec<Vec<u32>>,
        y: Vec<f32>,
        /// With the states on the GPU: every assignment's expert output, `[n * top_k, hidden]`.
        y_gpu: Option<GpuBuffer>,
        pending: std::collections::VecDeque<(PendingRead, Vec<u32>)>,
    }
    let take = |(read, rows): (PendingRead, Vec<u32>), y: &mut Vec<f32>| -> Result<()> {
        let got = floats(&read.wait(ctx)?[0]);
        for (j, &a) in rows.iter().enumerate() {
            y[a as usize * h..(a as usize + 1) * h].copy_from_slice(&got[j * h..(j + 1) * h]);
        }
        Ok(())
    };
    let n = st.n;
    let before = move || -> Result<Work<'_>> {
        if let Some(a) = attention {
            a(st)?;
        }
        let groups = match grouped {
            Some(g) => g,
            None => group_by_expert(st, e),
        };
        log::debug!("layer {li}: rows per expert {:?}", groups.iter().map(Vec::len).collect::<Vec<_>>());
        let on_gpu = st.x_gpu().is_some();
        let y_gpu = if on_gpu { Some(ctx.storage("step expert outputs", (n * k * h * 4) as u64)?) } else { None };
        Ok(Work { st, groups, y: if on_gpu { Vec::new() } else { vec![0.0f32; n * k * h] }, y_gpu, pending: Default::default() })
    };
    let (mut w, host_out) = std::thread::scope(|scope| -> Result<_> {
        // The host experts run beside the streamed ones (their uploads and GPU work).
        let host_job = (!host_work.is_empty()).then(|| scope.spawn(|| host_experts(ctx, host, li, &host_work)));
        let (_, mut w) = crate::model::streamer::stream_layer(ctx, &model.slots, &model.slot_cache, li, host, &experts, before, |w, u, slot| {
            for rows in w.groups[u.expert].chunks(sizes.expert_chunk.max(1)) {
                let m = rows.len();
                let mut b = Batch::named(ctx, format!("layer {li} expert {} ({m} rows)", u.expert));
                let xg = match w.st.hn_gpu() {
                    // The GPU gathers the expert's rows from the step's normed states.
                    Some(norms) => {
                        let tokens: Vec<u32> = rows.iter().map(|&a| a / k as u32).collect();
                        gather_states(&mut b, norms, &send(model, "expert token rows", &tokens)?, m, h)?
                    }
                    None => {
                        let mut xs = Vec::with_capacity(m * h);
                        for &a in rows {
                            let t = a as usize / k;
                            xs.extend_from_slice(&w.st.hn[t * h..(t + 1) * h]);
                        }
                        send(model, "expert rows", &xs)?
                    }
                };
                let gate = ctx.storage("expert gate", (m * inter * 4) as u64)?;
                let up = ctx.storage("expert up", (m * inter * 4) as u64)?;
                let act = ctx.storage("expert activations", (m * inter * 4) as u64)?;
                let out = ctx.storage("expert outputs", (m * h * 4) as u64)?;
                model.slot_ffn(&mut b, slot, host, &xg, 0, m, [&gate, &up, &act], &out)?;
                if let Some(y) = &w.y_gpu {
                    // Each output row goes to its assignment's row; the combine sums them later.
                    copy_rows(&mut b, &out, None, y, Some(&send(model, "expert output rows", rows)?), m, h)?;
                    b.submit()?;
                    continue;
                }
                b.submit()?;
                w.pending.push_back((ctx.read_later(&[(&out, (m * h * 4) as u64)])?, rows.to_vec()));
                // Keep one chunk in flight behind the one just submitted.
                while w.pending.len() > 2 {
                    take(w.pending.pop_front().expect("non-empty"), &mut w.y)?;
                }
            }
            Ok(())
        })?;
        while let Some(p) = w.pending.pop_front() {
            take(p, &mut w.y)?;
        }
        let host_out = match host_job {
            Some(j) => j.join().map_err(|_| crate::error::Error::invalid("host experts", "the host expert thread panicked"))??,
            None => Vec::new(),
        };
        Ok((w, host_out))
    })?;
    if !host_out.is_empty() {
        model.slot_cache.lock().unwrap().stats.on_host += host_out.len() as u64;
        put_host_outputs(model, &mut w.y, w.y_gpu.as_ref(), h, host_out)?;
    }
    if let (Some(x), Some(y)) = (w.st.x_gpu(), &w.y_gpu) {
        // The GPU combine, in slot order: the same sums as the host's below.
        let st = &*w.st;
        let assign_row: Vec<u32> = st.expert_ids.iter().enumerate().map(|(a, &e)| if (e as usize) < cfg.num_experts { a as u32 } else { u32::MAX }).collect();
        let rows = send(model, "assignment rows", &assign_row)?;
        let weights = send(model, "expert weights", &st.expert_weights)?;
        let mut b = Batch::named(ctx, format!("layer {li} combine"));
        combine_rows(&mut b, y, &rows, st.n * k, &weights, k, h, x)?;
        b.submit()?;
        return Ok(());
    }
    let (st, y) = (w.st, w.y);
    // out[t] = fma(w_j, y_j, out[t]) in slot order, as the GPU combine sums.
    for t in 0..st.n {
        for j in 0..k {
            let a = t * k + j;
            if (st.expert_ids[a] as usize) < cfg.num_experts {
                let w = st.expert_weights[a];
                let (xr, yr) = (&mut st.x[t * h..(t + 1) * h], &y[a * h..(a + 1) * h]);
                for (xv, yv) in xr.iter_mut().zip(yr) {
                    *xv = w.mul_add(*yv, *xv);
                }
            }
        }
    }
    Ok(())
}

/// One host expert's work: its assignments and their normed input rows `[m, hidden]`.
struct HostExpertWork {
    expert: usize,
    assignments: Vec<u32>,
    rows: Vec<f32>,
}

/// The inputs of the experts computed on the host: each one's rows of the normed states, read
/// back in one piece when those live on the GPU.
fn host_expert_inputs(model: &Model, li: usize, st: &StepState, groups: &[Vec<u32>], experts: &[usize]) -> Result<Vec<HostExpertWork>> {
    let (h, k) = (model.cfg.hidden_size, model.cfg.experts_per_token);
    let tokens: Vec<u32> = experts.iter().flat_map(|&x| groups[x].iter().map(|&a| a / k as u32)).collect();
    let rows: Vec<f32> = match st.hn_gpu() {
        Some(norms) => {
            let ctx = &model.ctx;
            let m = tokens.len();
            let mut b = Batch::named(ctx, format!("layer {li} rows for host experts"));
            let picked = gather_states(&mut b, norms, &send(model, "host expert token rows", &tokens)?, m, h)?;
            b.submit()?;
            floats(&ctx.read_later(&[(&picked, (m * h * 4) as u64)])?.wait(ctx)?[0])
        }
        None => tokens.iter().flat_map(|&t| st.hn[t as usize * h..(t as usize + 1) * h].iter().copied()).collect(),
    };
    let mut at = 0;
    Ok(experts
        .iter()
        .map(|&x| {
            let m = groups[x].len();
            let work = HostExpertWork { expert: x, assignments: groups[x].clone(), rows: rows[at * h..(at + m) * h].to_vec() };
            at += m;
            work
        })
        .collect())
}

/// Runs the host experts, each over its rows; returns `(assignments, outputs [m, hidden])`.
fn host_experts(ctx: &crate::gpu::GpuContext, host: &HostExperts, li: usize, work: &[HostExpertWork]) -> Result<Vec<(Vec<u32>, Vec<f32>)>> {
    let tracer = ctx.tracer();
    let start = tracer.as_ref().map(|t| t.now_ns());
    // Beside a GPU with 8-bit products the host computes its numbers, so where an expert ran
    // does not show in the results.
    let numbers = if ctx.int8_products() { crate::cpu::experts::Numbers::GpuInt8 } else { crate::cpu::experts::Numbers::Host };
    let out = work
        .iter()
        .map(|w| Ok((w.assignments.clone(), crate::cpu::experts::expert_ffn(host, w.expert, &w.rows, w.assignments.len(), numbers)?)))
        .collect::<Result<Vec<_>>>()?;
    if let (Some(t), Some(s)) = (tracer, start) {
        t.finish(Track::HostExperts, format!("layer {li}: {} experts on the host", work.len()), s);
    }
    Ok(out)
}

/// Puts the host experts' outputs where the streamed experts' go: each assignment's row of the
/// step's outputs, on the host or (states on the GPU) sent up and copied into place.
fn put_host_outputs(model: &Model, y: &mut [f32], y_gpu: Option<&GpuBuffer>, h: usize, outs: Vec<(Vec<u32>, Vec<f32>)>) -> Result<()> {
    match y_gpu {
        Some(yb) => {
            let assignments: Vec<u32> = outs.iter().flat_map(|(a, _)| a.iter().copied()).collect();
            let rows: Vec<f32> = outs.into_iter().flat_map(|(_, o)| o).collect();
            let mut b = Batch::named(&model.ctx, "host expert outputs");
            let src = send(model, "host expert outputs", &rows)?;
            copy_rows(&mut b, &src, None, yb, Some(&send(model, "host expert output rows", &assignments)?), assignments.len(), h)?;
            b.submit()
        }
        None => {
            for (assignments, o) in outs {
                for (j, &a) in assignments.iter().enumerate() {
                    y[a as usize * h..(a as usize + 1) * h].copy_from_slice(&o[j * h..(j + 1) * h]);
                }
            }
            Ok(())
        }
    }
}
