//! Runs a job's sequences under one of three batching policies, on the same kernels and streamer:
//!
//! - `module` ([`module`]): module-based batching, the population's hidden states and KV in host
//!   memory, each module at its own batch size;
//! - `continuous` (here): a fixed set of running sequences with their KV on the GPU, each step one
//!   ragged forward pass over their pending tokens, finished sequences replaced by waiting ones;
//! - `model` (here): one fixed batch pushed through the whole model until all of it finishes,
//!   then the next batch.

pub mod host_kv;
pub mod module;

pub use module::{generate_module, AttentionChoice, AttentionSite, CpuExperts, ModuleSizes};

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::gpu::{Batch, GpuContext};
use crate::kernels::softmax::argmax;
use crate::model::forward::{KvCache, Model, StepInput};
use crate::output::FinishReason;
use crate::sampler::{token_logprob, SamplingParams, SequenceSampler, StopStrings, TokenLogprob};

/// GPU memory the KV cache may take when the caller sets no size (until memory budgets exist).
const DEFAULT_KV_BYTES: u64 = 2 << 30;

/// One sequence to generate, with its own sampling and stop rules: a sequence's tokens depend on
/// its request only, never on the others in its batch.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: Value,
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// The key of the sequence's random stream (with `sampling.seed`).
    pub stream: String,
    /// Whether the model's end-of-sequence tokens are generated through instead of stopping.
    pub ignore_eos: bool,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Option<Arc<StopStrings>>,
    /// Each generated token's log-probability, with this many alternatives.
    pub logprobs: Option<usize>,
}

impl Request {
    /// Greedy decoding to `max_new_tokens` or an end-of-sequence token.
    pub fn new(id: Value, prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        let stream = id.to_string();
        Request {
            id,
            prompt,
            max_new_tokens,
            sampling: SamplingParams::default(),
            stream,
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            stop_strings: None,
            logprobs: None,
        }
    }

    /// Whether the host needs this sequence's logits (to sample, or for log-probabilities).
    fn needs_logits(&self) -> bool {
        !self.sampling.greedy() || self.logprobs.is_some()
    }

    fn sampler(&self) -> SequenceSampler {
        SequenceSampler::new(self.sampling.seed, &self.stream)
    }

    /// The next token from the GPU's argmax or, when the host has them, the logits.
    fn choose(&self, sampler: &mut SequenceSampler, argmax: u32, logits: Option<&[f32]>) -> (u32, Option<TokenLogprob>) {
        let Some(logits) = logits else { return (argmax, None) };
        let token = if self.sampling.greedy() { argmax } else { sampler.sample(logits, &self.sampling) };
        (token, self.logprobs.map(|top| token_logprob(logits, token, top)))
    }

    /// Whether the sequence stops now that `output` (its generated tokens) has grown by one,
    /// at `len` tokens in all of the `cap` its KV holds.
    fn finish_reason(&self, eos: &[u32], output: &[u32], len: usize, cap: usize) -> Result<Option<FinishReason>> {
        let token = *output.last().expect("called after a token");
        if (!self.ignore_eos && eos.contains(&token)) || self.stop_token_ids.contains(&token) {
            return Ok(Some(FinishReason::Stop));
        }
        if let Some(stop) = &self.stop_strings {
            if stop.matched(output)? {
                return Ok(Some(FinishReason::Stop));
            }
        }
        Ok((output.len() >= self.max_new_tokens || len >= cap).then_some(FinishReason::Length))
    }
}

/// A finished sequence.
#[derive(Clone, Debug)]
pub struct Finished {
    /// Index into the job's requests.
    pub index: usize,
    pub output: Vec<u32>,
    pub finish: FinishReason,
    /// Per generated token, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// How sequences are batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Batching {
    /// Module-based: population in host memory, each module at its own batch size.
    Module,
    /// Model-based (FlexGen, DeepSpeed): one fixed batch through the whole model per step.
    Model,
    /// Continuous (vLLM): a fixed set of running sequences, refilled as they finish.
    Continuous,
}

impl Batching {
    pub fn name(self) -> &'static str {
        match self {
            Batching::Module => "module",
            Batching::Model => "model",
            Batching::Continuous => "continuous",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    /// Most tokens fed through one forward pass (prompts are chunked to fit).
    pub max_step_tokens: usize,
    /// Cache rows to allocate (0: as many as one binding holds, capped by what the job needs).
    pub cache_rows: usize,
    /// Model-based batching: admit a new batch only when the whole running one has finished.
    pub fixed_batch: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_step_tokens: 2048, cache_rows: 0, fixed_batch: false }
    }
}

/// Finishes the requests that ask for no new tokens at once (both schedulers skip them).
pub(crate) fn finish_empty(requests: &[Request], on_finish: &mut impl FnMut(Finished) -> Result<()>) -> Result<()> {
    for (index, r) in requests.iter().enumerate() {
        if r.max_new_tokens == 0 {
            on_finish(Finished { index, output: Vec::new(), finish: FinishReason::Length, logprobs: Vec::new() })?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Default)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Tokens fed by decode steps (a sequence's first new token comes with its prefill).
    pub decode_tokens: usize,
    pub steps: usize,
    /// Step time, split between prompt and generated tokens in proportion to their counts.
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl GenerateStats {
    /// Counts a step that took `elapsed` for its prompt and decode tokens, splitting the time
    /// between them in proportion to their counts.
    pub(crate) fn add_step(&mut self, elapsed: Duration, prefill_tokens: usize, decode_tokens: usize) {
        let fed = (prefill_tokens + decode_tokens).max(1) as u32;
        self.prefill_time += elapsed * prefill_tokens as u32 / fed;
        self.decode_time += elapsed * decode_tokens as u32 / fed;
        self.decode_tokens += decode_tokens;
        self.steps += 1;
    }
}

struct Running {
    index: usize,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens already in the cache.
    cached: usize,
    cache_start: usize,
    cache_len: usize,
    sampler: SequenceSampler,
    logprobs: Vec<TokenLogprob>,
}

/// First-fit allocation of contiguous cache rows per sequence.
pub(crate) struct CacheRegions {
    pub rows: usize,
    pub used: Vec<(usize, usize)>,
}

impl CacheRegions {
    pub(crate) fn alloc(&mut self, len: usize) -> Option<usize> {
        self.used.sort_unstable();
        let mut at = 0;
        for &(start, n) in &self.used {
            if start - at >= len {
                break;
            }
            at = start + n;
        }
        if at + len > self.rows {
            return None;
        }
        self.used.push((at, len));
        Some(at)
    }

    pub(crate) fn free(&mut self, start: usize) {
        self.used.retain(|&(s, _)| s != start);
    }
}

/// Generates every request, calling `on_finish` as each sequence ends (sequences that end in the
/// same step in the job's order).
pub fn generate(
    model: &Model,
    requests: &[Request],
    opts: &GenerateOptions,
    mut on_finish: impl FnMut(Finished) -> Result<()>,
) -> Result<GenerateStats> {
    let cfg = &model.cfg;
    let ctx = &model.ctx;
    let mut stats = GenerateStats::default();
    let need = |r: &Request| (r.prompt.len() + r.max_new_tokens).max(1);
    let longest = requests.iter().map(need).max().unwrap_or(0);
    let device_rows = KvCache::max_rows(ctx, cfg);
    let total: usize = requests.iter().map(need).sum();
    let budget_rows = (DEFAULT_KV_BYTES / crate::planner::kv_row_bytes(cfg)) as usize;
    let rows = if opts.cache_rows > 0 { opts.cache_rows } else { total.min(device_rows).min(budget_rows) }.max(longest);
    if rows > device_rows {
        return Err(Error::invalid(
            "KV cache",
            format!("a sequence of {longest} tokens needs more cache rows than one buffer of this GPU holds ({device_rows})"),
        ));
    }
    let cache = KvCache::new(ctx, cfg, rows)?;
    let (step_tokens, logit_rows) = step_limits(ctx, cfg, opts.max_step_tokens);
    let mut regions = CacheRegions { rows, used: Vec::new() };
    let mut waiting = 0usize;
    let mut running: Vec<Running> = Vec::new();
    finish_empty(requests, &mut on_finish)?;
    loop {
        // Admit waiting sequences, in order, while their whole length fits in the cache (under
        // model-based batching, only once the running batch has finished).
        let admitting = !opts.fixed_batch || running.is_empty();
        while waiting < requests.len() && admitting {
            let r = &requests[waiting];
            if r.max_new_tokens == 0 {
                waiting += 1;
                continue;
            }
            let Some(start) = regions.alloc(need(r)) else { break };
            running.push(Running {
                index: waiting,
                tokens: r.prompt.clone(),
                prompt_len: r.prompt.len(),
                cached: 0,
                cache_start: start,
                cache_len: need(r),
                sampler: r.sampler(),
                logprobs: Vec::new(),
            });
            stats.prompt_tokens += r.prompt.len();
            waiting += 1;
        }
        if running.is_empty() {
            break;
        }
        crate::interrupt::check()?;
        // Decode tokens first (one each), then prompt chunks up to the step's token budget, and no
        // more sampled sequences than one logits buffer holds.
        let mut input = StepInput::default();
        let mut sampled_seqs = Vec::new();
        let (mut prefill_tokens, mut decode_tokens) = (0usize, 0usize);
        let mut order: Vec<usize> = (0..running.len()).collect();
        order.sort_by_key(|&i| running[i].cached < running[i].prompt_len);
        for i in order {
            let s = &running[i];
            let pending = s.tokens.len() - s.cached;
            let room = step_tokens.saturating_sub(input.tokens.len());
            if room == 0 {
                break;
            }
            let take = pending.min(room);
            let completes = take == pending;
            if completes && sampled_seqs.len() == logit_rows {
                continue;
            }
            let before = input.logit_rows.len();
            input.push_sequence(&s.tokens[s.cached..s.cached + take], s.cached, s.cache_start, cfg.sliding_window, false);
            if !completes {
                input.logit_rows.truncate(before);
            } else {
                sampled_seqs.push(i);
            }
            let in_prompt = s.prompt_len.saturating_sub(s.cached).min(take);
            prefill_tokens += in_prompt;
            decode_tokens += take - in_prompt;
            running[i].cached += take;
        }
        let started = Instant::now();
        let chosen = match model.forward(&cache, &input)? {
            Some(logits) => pick_tokens(ctx, model, &logits, &sampled_seqs, &mut running, requests)?,
            None => {
                // Only prompt chunks this step: the cache filled, nothing to sample.
                ctx.wait_idle("a prefill step")?;
                Vec::new()
            }
        };
        stats.add_step(started.elapsed(), prefill_tokens, decode_tokens);

        let mut done = Vec::new();
        for (&i, (token, logprob)) in sampled_seqs.iter().zip(chosen) {
            let s = &mut running[i];
            s.tokens.push(token);
            s.logprobs.extend(logprob);
            stats.generated_tokens += 1;
            let r = &requests[s.index];
            if let Some(f) = r.finish_reason(&cfg.eos_token_ids, &s.tokens[s.prompt_len..], s.tokens.len(), s.cache_len)? {
                done.push((i, f));
            }
        }
        // Remove from the back so positions stay valid; report in the job's order.
        done.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        let mut finished: Vec<(Running, FinishReason)> = done.into_iter().map(|(i, f)| (running.swap_remove(i), f)).collect();
        finished.sort_by_key(|(s, _)| s.index);
        for (s, finish) in finished {
            regions.free(s.cache_start);
            on_finish(Finished { index: s.index, output: s.tokens[s.prompt_len..].to_vec(), finish, logprobs: s.logprobs })?;
        }
    }
    Ok(stats)
}

/// The most tokens one step may feed and the most sequences it may sample, so that every
/// activation of a step (the widest being the routed experts' rows and the logits) fits one
/// storage binding of this device.
pub(crate) fn step_limits(ctx: &GpuContext, cfg: &crate::loader::config::ModelConfig, max_step_tokens: usize) -> (usize, usize) {
    step_limits_for(cfg, ctx.binding_limit(), max_step_tokens)
}

/// [`step_limits`] for a binding limit of `limit` bytes.
pub fn step_limits_for(cfg: &crate::loader::config::ModelConfig, limit: u64, max_step_tokens: usize) -> (usize, usize) {
    let limit = limit as usize;
    let inter = cfg.moe_intermediate_size.max(cfg.intermediate_size);
    let widest = [cfg.experts_per_token * inter, cfg.experts_per_token * cfg.hidden_size, cfg.attention_width(), cfg.hidden_size]
        .into_iter()
        .max()
        .unwrap_or(1);
    let tokens = max_step_tokens.min(limit / (4 * widest)).max(1);
    let rows = (limit / (4 * cfg.vocab_size)).max(1);
    (tokens, rows)
}

/// The next token of each sampled sequence: the argmax on the GPU (a few bytes back per
/// sequence, and greedy tokens never depend on which other sequences share the step), and the
/// logits back to the host only when a sequence samples or reports log-probabilities.
fn pick_tokens(
    ctx: &GpuContext,
    model: &Model,
    logits: &crate::gpu::GpuBuffer,
    seqs: &[usize],
    running: &mut [Running],
    requests: &[Request],
) -> Result<Vec<(u32, Option<TokenLogprob>)>> {
    let vocab = model.cfg.vocab_size;
    let rows = seqs.len();
    let ids = ctx.storage("greedy tokens", (rows * 4) as u64)?;
    let mut b = Batch::new(ctx);
    argmax(&mut b, logits, &ids, rows, vocab)?;
    b.submit()?;
    let best = ctx.read_u32(&ids, rows)?;
    let all = if seqs.iter().any(|&i| requests[running[i].index].needs_logits()) { Some(ctx.read_f32(logits, rows * vocab)?) } else { None };
    Ok(seqs
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            let s = &mut running[i];
            let req = &requests[s.index];
            let row = all.as_ref().filter(|_| req.needs_logits()).map(|a| &a[r * vocab..(r + 1) * vocab]);
            req.choose(&mut s.sampler, best[r], row)
        })
        .collect())
}

/// Logits for every position of each prompt, all prompts in one ragged forward pass (the
/// correctness fixtures compare these with transformers).
pub fn prompt_logits(model: &Model, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    let rows: usize = prompts.iter().map(Vec::len).sum();
    let cache = KvCache::new(&model.ctx, &model.cfg, rows)?;
    let mut input = StepInput::default();
    let mut start = 0;
    for p in prompts {
        input.push_sequence(p, 0, start, model.cfg.sliding_window, true);
        start += p.len();
    }
    let logits = model.forward(&cache, &input)?.expect("every position asked for logits");
    let vocab = model.cfg.vocab_size;
    let all = model.ctx.read_f32(&logits, rows * vocab)?;
    let mut out = Vec::new();
    let mut at = 0;
    for p in prompts {
        out.push(all[at * vocab..(at + p.len()) * vocab].to_vec());
        at += p.len();
    }
    Ok(out)
}
