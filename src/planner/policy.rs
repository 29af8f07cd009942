//! The plan of a job under each batching policy: what stays on the GPU, the batch size of each
//! module, and the predicted throughput with the resource that limits it (DESIGN.md, "The
//! throughput model": a step takes the longer of its link time and its GPU time, plus the host
//! work that does not overlap).

use crate::error::{Error, Result};
use crate::loader::config::ModelConfig;
use crate::planner::hardware::HardwareProfile;
use crate::planner::{activation_bytes, budget_too_small, format_size, kv_row_bytes, Placement, WeightBytes};
use crate::scheduler::host_kv::HostKv;
use crate::scheduler::{AttentionChoice, AttentionSite, Batching, CpuExperts, ModuleSizes};

/// KV page size of the host store, in tokens.
pub const PAGE_TOKENS: usize = 16;
/// Rows per expert dispatch at most in module-based batching.
const MAX_EXPERT_CHUNK: usize = 4096;

/// The job as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobShape {
    pub sequences: usize,
    pub prompt_len: f64,
    pub new_tokens: f64,
    /// Longest prompt plus its new tokens.
    pub longest: usize,
    pub max_step_tokens: usize,
}

impl JobShape {
    pub fn tokens(&self) -> f64 {
        self.sequences as f64 * (self.prompt_len + self.new_tokens)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Host-to-GPU traffic (streamed weights, KV, hidden states).
    Link,
    /// GPU compute (kernels and their dispatch).
    Gpu,
    /// Host-side copies and readbacks that do not overlap the GPU.
    Host,
    /// Attention computed on the host over the KV pages.
    HostAttention,
    /// Streamed experts computed on the host.
    HostExperts,
}

impl Bound {
    /// On the CPU device the "link" is copies within host memory and its compute is the host's.
    pub fn name(self, cpu_device: bool) -> &'static str {
        match self {
            Bound::Link if cpu_device => "copies to the CPU device",
            Bound::Link => "host-to-GPU link",
            Bound::Gpu if cpu_device => "CPU device compute",
            Bound::Gpu => "GPU compute",
            Bound::Host => "host work",
            Bound::HostAttention => "host attention",
            Bound::HostExperts => "host experts",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub tokens_per_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// What limits the decode steps, which dominate long jobs.
    pub bound: Bound,
    /// What limits the batch: the memory that caps the sequences in flight.
    pub batch_limit: &'static str,
}

#[derive(Clone, Debug)]
pub struct JobPlan {
    pub batching: Batching,
    pub placement: Placement,
    /// Sequences in flight at once.
    pub sequences_in_flight: usize,
    /// GPU KV rows (model-based and continuous).
    pub cache_rows: usize,
    /// Most tokens a step feeds.
    pub step_tokens: usize,
    pub sizes: Option<ModuleSizes>,
    pub prediction: Prediction,
    /// Planned for the CPU device (`--device cpu`): what the messages call the device.
    pub cpu_device: bool,
}

/// Memory the streamed experts' packs take in host memory under `placement`.
fn streamed_host_bytes(cfg: &ModelConfig, w: &WeightBytes, placement: &Placement) -> u64 {
    let streamed = (0..cfg.num_layers).filter(|&l| placement.streams(l, cfg)).count() as u64;
    streamed * w.per_layer_stream() + placement.streamed_attention.len() as u64 * w.attention_per_layer_stream
}

/// Checks that host memory holds the streamed weights, what the load stages there, and `kv` bytes
/// of KV pages.
fn host_holds(budget: u64, streamed: u64, staged: u64, kv: u64) -> Result<()> {
    let minimum = streamed + staged + kv;
    if budget >= minimum {
        return Ok(());
    }
    Err(Error::invalid(
        "--host-memory",
        format!(
            "{} is below the minimum of {} for this model and job: streamed weights {}, weights and hidden states staged on the host {}, KV pages of the longest sequence {}",
            format_size(budget),
            format_size(minimum),
            format_size(streamed),
            format_size(staged),
            format_size(kv)
        ),
    ))
}

/// Plans `batching` for the job under the budgets.
#[allow(clippy::too_many_arguments)]
pub fn plan_job(
    cfg: &ModelConfig,
    w: &WeightBytes,
    job: &JobShape,
    batching: Batching,
    attention: AttentionChoice,
    cpu_experts: CpuExperts,
    gpu_budget: u64,
    host_budget: u64,
    binding_limit: u64,
    hw: &HardwareProfile,
) -> Result<JobPlan> {
    let row = kv_row_bytes(cfg);
    let layer_row = row / cfg.num_layers.max(1) as u64;
    match batching {
        Batching::Continuous | Batching::Model => {
            // KV on the GPU: as many sequences as the budget holds after what must stay and a
            // step's activations, capped by the job; the rest keeps experts resident.
            let device_rows = (binding_limit / layer_row.max(1) / 2) as usize;
            let need = job.longest as u64 * row;
            let base = w.resident + w.attention_per_layer + 2 * w.per_expert + need;
            let step_tokens_min = activation_bytes(cfg, 1);
            if gpu_budget < base + step_tokens_min {
                return Err(budget_too_small(gpu_budget, base + step_tokens_min, w, need + step_tokens_min));
            }
            let wanted = job.max_step_tokens.min((job.sequences as f64 * (job.prompt_len + 1.0)) as usize).max(1);
            let all_attention = w.attention_per_layer * cfg.num_layers as u64;
            let total = (job.tokens().ceil() as usize).max(job.longest);
            let per_seq = (job.prompt_len + job.new_tokens).max(1.0);
            // A longer step takes GPU memory from the KV cache and so from the sequences in
            // flight: each step size from the longest wanted down, by quarters, is sized and
            // predicted, and the fastest kept (a shorter one only when it predicts 1% faster).
            let sized = |step_tokens: usize| -> Option<(usize, usize, Placement, Prediction)> {
                let activations = activation_bytes(cfg, step_tokens);
                if base + activations > gpu_budget {
                    return None;
                }
                // Attention stays resident when that leaves room for the longest sequence's KV.
                let attention = if gpu_budget >= w.resident + all_attention + 2 * w.per_expert + activations + need { all_attention } else { w.attention_per_layer };
                let fixed = w.resident + attention + activations + 2 * w.per_expert;
                let rows = ((gpu_budget.saturating_sub(fixed) / row) as usize).min(total).min(device_rows.max(job.longest));
                let placement = Placement::plan(cfg, w, gpu_budget, rows as u64 * row + activations).ok()?;
                let in_flight = ((rows as f64 / per_seq).floor() as usize).clamp(1, job.sequences.max(1));
                let shaped = JobShape { max_step_tokens: step_tokens, ..*job };
                let prediction = predict(cfg, w, &shaped, &placement, hw, in_flight, None);
                Some((rows, in_flight, placement, prediction))
            };
            let mut best: Option<(usize, (usize, usize, Placement, Prediction))> = None;
            let mut step_tokens = wanted;
            loop {
                if let Some(c) = sized(step_tokens) {
                    if best.as_ref().is_none_or(|(_, b)| c.3.tokens_per_s > b.3.tokens_per_s * 1.01) {
                        best = Some((step_tokens, c));
                    }
                }
                if step_tokens == 1 {
                    break;
                }
                step_tokens = (step_tokens * 3 / 4).max(1);
            }
            let Some((step_tokens, (rows, in_flight, placement, prediction))) = best else {
                return Err(budget_too_small(gpu_budget, base + step_tokens_min, w, need + step_tokens_min));
            };
            host_holds(host_budget, streamed_host_bytes(cfg, w, &placement), w.resident, 0)?;
            let batch_limit = kv_cache_limit(in_flight >= job.sequences, hw.cpu_device);
            Ok(JobPlan {
                batching,
                placement,
                sequences_in_flight: in_flight,
                cache_rows: rows,
                step_tokens,
                sizes: None,
                prediction: Prediction { batch_limit, ..prediction },
                cpu_device: hw.cpu_device,
            })
        }
        Batching::Module => {
            // Floats per token and layer: of the keys (the widest KV buffer) and keys plus values.
            let (key_width, kv_row) = (cfg.kv_widths()[0], cfg.kv_row());
            let inter = cfg.moe_intermediate_size.max(cfg.intermediate_size);
            // The widest activation of a chunk must fit one binding.
            let widest = (cfg.hidden_size.max(inter).max(cfg.attention_width()) * 4) as u64;
            let expert_chunk = ((binding_limit / widest) as usize).clamp(1, MAX_EXPERT_CHUNK);
            // In flight at once: three expert chunks, two attention micro-batches, one logits chunk.
            let chunk_bytes = |rows: usize| 3 * (rows * (3 * cfg.hidden_size + 3 * inter) * 4) as u64;
            // An attention micro-batch holds its KV rows and per token: hidden states in and out,
            // two norms, queries, keys, values, attention output, router logits and choices.
            let q_dim = cfg.attention_width();
            let per_token = ((5 * cfg.hidden_size + 2 * q_dim + 2 * kv_row + cfg.num_experts + 2 * cfg.experts_per_token) * 4) as u64;
            // KV rows are f32 on the GPU, with a 16-bit staging copy when pages are bf16.
            let kv_gpu_bytes = 4 + if cfg.kv_bf16 { 2 } else { 0 };
            let attn_bytes = |rows: usize, tokens: usize| 2 * (rows as u64 * kv_row as u64 * kv_gpu_bytes + tokens as u64 * per_token);
            let logit_bytes = |rows: usize| (rows * (cfg.vocab_size + 2 * cfg.hidden_size) * 4) as u64;
            let longest = job.longest;
            let floor = 16usize;
            let min_reserved = attn_bytes(longest, floor.min(longest)) + chunk_bytes(floor) + logit_bytes(floor);
            let minimum = w.resident + w.attention_per_layer + 2 * w.per_expert + min_reserved;
            if gpu_budget < minimum {
                return Err(budget_too_small(gpu_budget, minimum, w, min_reserved));
            }
            // An eighth of what is spare to each of: attention rows, attention tokens, expert
            // chunks, logits; the rest keeps experts resident.
            let share = (gpu_budget - minimum) / 8;
            let binding_rows = (binding_limit / (key_width as u64 * 4)) as usize;
            let job_tokens = (job.tokens().ceil() as usize).max(longest);
            let attn_kv_rows = (longest + (share / (2 * kv_row as u64 * kv_gpu_bytes)) as usize).min(binding_rows.max(longest)).min(job_tokens);
            let (step_cap, logit_cap) = crate::scheduler::step_limits_for(cfg, binding_limit, usize::MAX);
            let attn_tokens = (floor + (share / (2 * per_token)) as usize).min(step_cap).min(attn_kv_rows).max(1);
            let chunk = (floor + (share / chunk_bytes(1)) as usize).min(expert_chunk);
            let logit_rows = (floor + (share / logit_bytes(1)) as usize).min(logit_cap).max(1);
            let reserved = attn_bytes(attn_kv_rows, attn_tokens) + chunk_bytes(chunk) + logit_bytes(logit_rows);
            let placement = Placement::plan(cfg, w, gpu_budget, reserved)?;
            // Host memory: the streamed packs and the step's hidden states first, the rest is KV.
            let page = HostKv::page_bytes(cfg, PAGE_TOKENS);
            let per_seq_pages = ((job.prompt_len + job.new_tokens) / PAGE_TOKENS as f64).ceil().max(1.0) + 1.0;
            let packs = streamed_host_bytes(cfg, w, &placement);
            let per_token_state = ((2 + cfg.experts_per_token) * cfg.hidden_size * 4) as u64;
            let fixed_host = packs + w.resident + (job.max_step_tokens as u64) * per_token_state;
            let longest_pages = longest.div_ceil(PAGE_TOKENS) as u64 * page;
            host_holds(host_budget, packs, fixed_host - packs, longest_pages)?;
            let kv_bytes_cap = host_budget - fixed_host;
            let by_memory = (kv_bytes_cap as f64 / (per_seq_pages * page as f64 + per_token_state as f64)).floor() as usize;
            let population = by_memory.clamp(1, job.sequences.max(1));
            let host_kv_bytes = ((population as f64 * per_seq_pages) as u64 + longest.div_ceil(PAGE_TOKENS) as u64) * page;
            let host_left = kv_bytes_cap.saturating_sub(host_kv_bytes);
            // Prompt tokens a step takes in: at least --max-step-tokens (and a prompt's worth);
            // more where the prediction says larger expert batches pay and host memory holds
            // their hidden states.
            let prompt_tokens = (job.sequences as f64 * job.prompt_len).ceil() as usize;
            let sites = attention_sites(cfg, hw, attention);
            // A step's hidden states kept on the GPU: the states and their norms, and every
            // assignment's expert output, each one binding.
            let (h, k) = (cfg.hidden_size, cfg.experts_per_token);
            let state_bytes = |tokens: usize| (tokens * h * 4 * (2 + k)) as u64;
            let mut best: Option<(ModuleSizes, Prediction, Placement)> = None;
            for doubling in 0..6 {
                let prefill = (job.max_step_tokens.max(longest) << doubling).min(prompt_tokens.max(longest));
                if doubling > 0 && (prefill as u64) * per_token_state > host_left {
                    break;
                }
                let sizes = ModuleSizes {
                    population,
                    step_tokens: population + prefill,
                    attn_tokens,
                    attn_kv_rows,
                    expert_chunk: chunk,
                    logit_rows,
                    host_kv_bytes: host_kv_bytes.min(kv_bytes_cap),
                    page_tokens: PAGE_TOKENS,
                    gpu_kv_rows: 0,
                    attention: AttentionSite::Gpu,
                    gpu_state_rows: 0,
                    gpu_norm_rows: 0,
                    host_batches: 1,
                    host_expert_rows: host_expert_rows(cfg, w, hw, cpu_experts),
                };
                let shaped = JobShape { max_step_tokens: prefill, ..*job };
                let step = sizes.step_tokens;
                let states_fit = (step * k * h * 4) as u64 <= binding_limit;
                let with_states = if states_fit { Placement::plan(cfg, w, gpu_budget, reserved + state_bytes(step)).ok() } else { None };
                // Else the normed states of a decode step (the population's tokens) on the GPU.
                let norm_bytes = (population * h * 4) as u64;
                let with_norms = if norm_bytes <= binding_limit { Placement::plan(cfg, w, gpu_budget, reserved + norm_bytes).ok() } else { None };
                // Or the whole states of the decode steps only (which leaves more of the budget
                // to expert slots, or fits where every step's do not).
                let decode_states = if population < step && (population * k * h * 4) as u64 <= binding_limit {
                    Placement::plan(cfg, w, gpu_budget, reserved + state_bytes(population)).ok()
                } else {
                    None
                };
                let placements = std::iter::once(((0, 0), placement.clone()))
                    .chain(with_norms.map(|p| ((0, population), p)))
                    .chain(decode_states.map(|p| ((population, 0), p)))
                    .chain(with_states.map(|p| ((step, 0), p)));
                for ((gpu_state_rows, gpu_norm_rows), placed) in placements {
                    for &site in &sites {
                        // Host attention pipelined over more micro-batches hides more of it, at a
                        // submission each: the depth that predicts fastest.
                        let depths: &[usize] = if site == AttentionSite::Gpu { &[1] } else { &[1, 2, 4, 8, 16] };
                        for &host_batches in depths {
                            let sizes = ModuleSizes { attention: site, gpu_state_rows, gpu_norm_rows, host_batches, ..sizes };
                            let p = predict(cfg, w, &shaped, &placed, hw, population, Some(&sizes));
                            if best.as_ref().is_none_or(|(_, b, _)| p.tokens_per_s > b.tokens_per_s * 1.01) {
                                best = Some((sizes, p, placed.clone()));
                            }
                        }
                    }
                }
                if prefill >= prompt_tokens {
                    break;
                }
            }
            let (sizes, prediction, placement) = best.expect("the first candidate is always tried");
            let batch_limit = if population >= job.sequences { "the job's size" } else { "host memory for the KV pages" };
            // The same with the KV kept on the GPU, where the budget holds at least the longest
            // sequence's rows beside what must stay: no KV crosses the link, fewer sequences fly.
            let row = kv_row_bytes(cfg);
            let layer_rows = (binding_limit / (key_width as u64 * 4)) as usize;
            let all_attention = w.attention_per_layer * cfg.num_layers as u64;
            let base = w.resident + all_attention + 2 * w.per_expert + attn_bytes(0, attn_tokens) + chunk_bytes(chunk) + logit_bytes(logit_rows);
            let per_seq = (job.prompt_len + job.new_tokens).ceil().max(1.0) as usize;
            let rows = (gpu_budget.saturating_sub(base) / row) as usize;
            let rows = rows.min(layer_rows).min(job_tokens.max(longest) + per_seq);
            // Host and split attention read the host pages: the KV stays there when asked for.
            let gpu_kv_allowed = matches!(attention, AttentionChoice::Auto | AttentionChoice::Gpu);
            if rows >= longest && gpu_kv_allowed {
                let in_flight = (rows / per_seq).clamp(1, job.sequences.max(1));
                let reserved = attn_bytes(0, attn_tokens) + chunk_bytes(chunk) + logit_bytes(logit_rows) + rows as u64 * row;
                if let Ok(on_gpu) = Placement::plan(cfg, w, gpu_budget, reserved) {
                    // A step takes in at most the prompts of the sequences in flight, each no
                    // longer than the longest sequence.
                    let prefill = (sizes.step_tokens - sizes.population).min(in_flight * longest.max(1));
                    let gpu_sizes = ModuleSizes {
                        population: in_flight,
                        step_tokens: in_flight + prefill,
                        host_kv_bytes: 0,
                        gpu_kv_rows: rows,
                        attention: AttentionSite::Gpu,
                        gpu_state_rows: 0,
                        gpu_norm_rows: 0,
                        host_batches: 1,
                        ..sizes
                    };
                    let shaped = JobShape { max_step_tokens: prefill, ..*job };
                    let p = predict(cfg, w, &shaped, &on_gpu, hw, in_flight, Some(&gpu_sizes));
                    if p.tokens_per_s > prediction.tokens_per_s {
                        let batch_limit = kv_cache_limit(in_flight >= job.sequences, hw.cpu_device);
                        return Ok(JobPlan {
                            batching,
                            placement: on_gpu,
                            sequences_in_flight: in_flight,
                            cache_rows: rows,
                            step_tokens: gpu_sizes.step_tokens,
                            sizes: Some(gpu_sizes),
                            prediction: Prediction { batch_limit, ..p },
                            cpu_device: hw.cpu_device,
                        });
                    }
                }
            }
            Ok(JobPlan {
                batching,
                placement,
                sequences_in_flight: population,
                cache_rows: 0,
                step_tokens: sizes.step_tokens,
                sizes: Some(sizes),
                prediction: Prediction { batch_limit, ..prediction },
                cpu_device: hw.cpu_device,
            })
        }
    }
}


/// Time of one step of `t` tokens that read `kv_rows` KV rows in all (the sequences' past
/// holding `kv_past`), and its bound.
struct StepCost {
    io: f64,
    /// Link time that nothing overlaps (module-based: a layer's KV pages go up before its
    /// attention can run, after the previous layer's experts).
    io_serial: f64,
    gpu: f64,
    host: f64,
    /// Attention on the host over the KV pages, and the micro-batches it comes in: it overlaps
    /// the GPU's work but for about one micro-batch's worth a layer.
    host_attn: f64,
    host_batches: f64,
    /// Streamed experts computed on the host, beside the GPU's experts.
    host_experts: f64,
    /// Kernels and host work share the CPU (software adapter): they add up.
    shared: bool,
}

impl StepCost {
    fn time(&self) -> f64 {
        self.io_serial
            + if self.shared {
                self.io.max(self.gpu + self.host + self.host_attn + self.host_experts)
            } else {
                let unhidden = self.gpu.min(self.host_attn) / self.host_batches.max(1.0);
                self.io.max(self.gpu.max(self.host_attn + self.host_experts) + unhidden) + self.host
            }
    }
    fn bound(&self) -> Bound {
        let compute = if self.shared { self.gpu + self.host + self.host_attn + self.host_experts } else { self.gpu.max(self.host_attn + self.host_experts) };
        if self.io + self.io_serial > compute {
            Bound::Link
        } else if self.host_experts > self.gpu && self.host_experts >= self.host_attn {
            Bound::HostExperts
        } else if self.host_attn > self.gpu && self.host_attn >= self.host {
            Bound::HostAttention
        } else if self.host > self.gpu {
            Bound::Host
        } else {
            Bound::Gpu
        }
    }
}

/// Query heads and the widths of a key and a value row that the attention kernel reads per head
/// (MLA: every head reads the full latent row).
fn attention_dims(cfg: &ModelConfig) -> (f64, f64, f64) {
    match &cfg.mla {
        Some(m) => (cfg.num_heads as f64, m.cache_width() as f64, m.kv_lora_rank as f64),
        None => (cfg.num_heads as f64, cfg.head_dim as f64, cfg.head_dim as f64),
    }
}

/// Seconds per KV row (one token, one layer) of decode attention: on the GPU over host pages
/// (the row's upload, which nothing overlaps, and the kernel's read), and on the host (None when
/// the profile does not know the host).
fn attention_row_s(cfg: &ModelConfig, hw: &HardwareProfile) -> (f64, Option<f64>) {
    let kv_row = cfg.kv_row() as f64;
    let stored = kv_row * cfg.kv_value_bytes() as f64;
    let (heads, kd, vd) = attention_dims(cfg);
    let mut gpu = kv_row * 4.0 / hw.attention_bytes_per_s + stored / hw.upload_bytes_per_s;
    if cfg.mla.is_some() {
        gpu += 2.0 * heads * (kd + vd) / hw.peak_flops().max(1.0);
    }
    let host = hw.host.as_ref().map(|h| h.attention_s(stored, 2.0 * heads * (kd + vd)));
    (gpu, host)
}

/// The attention placements to weigh: the one asked for, or under `auto` the GPU, the host and
/// the split that makes both finish together (the host ones when the profile knows the host).
fn attention_sites(cfg: &ModelConfig, hw: &HardwareProfile, choice: AttentionChoice) -> Vec<AttentionSite> {
    let split = || {
        let (gpu, host) = attention_row_s(cfg, hw);
        // Both finish together when the host takes gpu / (gpu + host) of the rows.
        let share = host.map_or(0.5, |h| gpu / (gpu + h));
        AttentionSite::Split { host_permille: ((share * 1000.0).round() as u16).clamp(50, 950) }
    };
    match choice {
        AttentionChoice::Gpu => vec![AttentionSite::Gpu],
        AttentionChoice::Host => vec![AttentionSite::Host],
        AttentionChoice::Split => vec![split()],
        AttentionChoice::Auto if hw.host.is_some() => vec![AttentionSite::Gpu, AttentionSite::Host, split()],
        AttentionChoice::Auto => vec![AttentionSite::Gpu],
    }
}

/// The most rows a streamed expert may have in a step to be computed on the host instead: where
/// reading its weights from host memory and its rows' matmuls take less than sending it (0 when
/// the profile does not know the host's matmul).
pub fn host_expert_rows(cfg: &ModelConfig, w: &WeightBytes, hw: &HardwareProfile, choice: CpuExperts) -> usize {
    let Some(m) = hw.host.as_ref().and_then(|h| h.matmul) else { return if choice == CpuExperts::Always { usize::MAX } else { 0 } };
    match choice {
        CpuExperts::Never => 0,
        CpuExperts::Always => usize::MAX,
        CpuExperts::Auto => {
            let (h, inter) = (cfg.hidden_size as f64, cfg.moe_intermediate_size as f64);
            let send_s = w.per_expert_stream as f64 / hw.upload_bytes_per_s.max(1.0);
            // Its rows go down and its outputs come back up.
            let rows_s = |x: f64| x * h * 4.0 * (1.0 / hw.readback_bytes_per_s.max(1.0) + 1.0 / hw.upload_bytes_per_s.max(1.0));
            (1..=4096).take_while(|&x| m.expert_s(x as f64, h, inter) + rows_s(x as f64) < send_s).last().unwrap_or(0)
        }
    }
}

/// Of the `active` experts a layer's `t` tokens reach (top-k of `e`, uniform routing: an
/// expert's rows are close to Poisson with mean `t k / e`), those with at most `max_rows` rows:
/// their expected number, and the host time of their matmuls.
fn host_expert_share(cfg: &ModelConfig, hw: &HardwareProfile, t: f64, active: f64, max_rows: usize) -> (f64, f64) {
    let Some(m) = hw.host.as_ref().and_then(|h| h.matmul) else { return (0.0, 0.0) };
    let (e, k) = (cfg.num_experts as f64, cfg.experts_per_token as f64);
    // The scheduler chooses host experts only when the step leaves some expert unused.
    if max_rows == 0 || e * (1.0 - k / e).powf(t) < 0.01 {
        return (0.0, 0.0);
    }
    let (h, inter) = (cfg.hidden_size as f64, cfg.moe_intermediate_size as f64);
    let lambda = t * k / e;
    let (mut p, mut share, mut secs) = ((-lambda).exp(), 0.0, 0.0);
    let reached = 1.0 - p;
    for x in 1..=max_rows.min(4096) {
        p *= lambda / x as f64;
        share += p / reached.max(1e-12);
        secs += p / reached.max(1e-12) * m.expert_s(x as f64, h, inter);
    }
    (active * share.min(1.0), active * secs)
}

#[allow(clippy::too_many_arguments)]
fn step_cost(
    cfg: &ModelConfig,
    w: &WeightBytes,
    placement: &Placement,
    hw: &HardwareProfile,
    t: f64,
    kv_rows: f64,
    kv_past: f64,
    logits: f64,
    module: Option<&ModuleSizes>,
    tokens_per_seq: f64,
) -> StepCost {
    let h = cfg.hidden_size as f64;
    // Floats per token and layer of the KV cache (keys and values, or MLA's latent and rope key).
    let kv_row = cfg.kv_row() as f64;
    let attention_matrices = cfg.attention_matrices();
    let (e, k) = (cfg.num_experts as f64, cfg.experts_per_token as f64);
    let inter = cfg.moe_intermediate_size as f64;
    let mut io_bytes = 0.0;
    let mut io_serial_bytes = 0.0;
    let mut gpu = 0.0;
    let mut host = 0.0;
    // Experts a layer's tokens reach, expected for uniform routing.
    let active = e * (1.0 - (1.0 - k / e).powf(t));
    let per_expert_rows = t * k / active.max(1.0);
    let streamed_layers = (0..cfg.num_layers).filter(|&l| placement.streams(l, cfg)).count() as f64;
    // Streamed experts computed on the host instead: not sent, and their work beside the GPU's.
    let (host_experts, host_expert_s) = module.map_or((0.0, 0.0), |s| host_expert_share(cfg, hw, t, active, s.host_expert_rows));
    let host_experts = host_experts.min(active);
    // The share of the KV rows attended on the host (module-based over host pages).
    let host_share = module.map_or(0.0, |s| if s.gpu_kv_rows > 0 { 0.0 } else { s.attention.host_share() });
    // Attention runs in micro-batches under module-based batching, once per step otherwise.
    // Micro-batches hold whole sequences: as many as fit the tokens and KV rows of one (host
    // ones only the tokens: their KV stays on the host).
    let (gpu_batches, host_batches) = module.map_or((1.0, 0.0), |s| {
        let seqs = (t / tokens_per_seq).max(1.0);
        // KV rows bound a micro-batch only when they are staged from host pages.
        let staged = if s.gpu_kv_rows > 0 { 0.0 } else { kv_past / seqs };
        let rows_per_seq = (staged + tokens_per_seq).max(1.0);
        let per_batch = (s.attn_tokens as f64 / tokens_per_seq).min(s.attn_kv_rows as f64 / rows_per_seq).floor().max(1.0);
        let per_host_batch = (s.attn_tokens as f64 / tokens_per_seq).floor().max(1.0);
        let host_seqs = (seqs * host_share).round();
        let gpu_seqs = seqs - host_seqs;
        let pipelined = (s.host_batches as f64).min(host_seqs);
        ((gpu_seqs / per_batch).ceil(), (host_seqs / per_host_batch).ceil().max(pipelined))
    });
    let micro_batches = (gpu_batches + host_batches).max(1.0);
    let tm = t / micro_batches;
    let (heads, kd, vd) = attention_dims(cfg);
    let mut host_attn = 0.0;
    for l in 0..cfg.num_layers {
        gpu += micro_batches * attention_matrices.iter().map(|&(_, r, c)| hw.matmul_s_as(w.attention_dtype, tm, r as f64, c as f64)).sum::<f64>();
        gpu += (1.0 - host_share) * kv_rows * kv_row * 4.0 / hw.attention_bytes_per_s + (gpu_batches * 10.0 + host_batches * 12.0) * hw.dispatch_s;
        if let Some(m) = &cfg.mla {
            // Absorbed MLA is compute-bound: every head scores and sums the full latent rows.
            let per_row = (cfg.num_heads * (m.cache_width() + m.kv_lora_rank)) as f64;
            gpu += hw.matmul_s((1.0 - host_share) * kv_rows, per_row, 1.0);
        }
        if host_share > 0.0 {
            let rows = host_share * kv_rows;
            let stored = rows * kv_row * cfg.kv_value_bytes() as f64;
            host_attn += hw.host.as_ref().map_or(stored / hw.host_copy_bytes_per_s, |hp| hp.attention_s(stored, rows * 2.0 * heads * (kd + vd)));
        }
        if cfg.is_moe_layer(l) {
            gpu += micro_batches * (hw.matmul_s(tm, e, h) + hw.dispatch_s);
            // Each active expert runs its three matrices over its rows (per chunk in module-based).
            let chunks = module.map_or(1.0, |s| (per_expert_rows / s.expert_chunk as f64).ceil().max(1.0));
            let rows = per_expert_rows / chunks;
            let on_gpu = if placement.streams(l, cfg) { active - host_experts } else { active };
            let [gate_up, down] = w.expert_dtypes;
            gpu += on_gpu * chunks * (2.0 * hw.matmul_s_as(gate_up, rows, inter, h) + hw.matmul_s_as(down, rows, h, inter) + hw.dispatch_s);
            if let Some(si) = cfg.shared_expert_intermediate_size {
                gpu += 3.0 * hw.matmul_s(t, si as f64, h);
            }
        } else {
            gpu += 3.0 * hw.matmul_s(t, cfg.intermediate_size as f64, h);
        }
    }
    // The ops between the matmuls (norms, rope, residual adds, copies; the experts' gather,
    // activation and combine), by the bytes they read and write.
    if let Some(rate) = hw.elementwise_bytes_per_s {
        let moe_layers = (0..cfg.num_layers).filter(|&l| cfg.is_moe_layer(l)).count() as f64;
        let dense_layers = cfg.num_layers as f64 - moe_layers;
        let shared = cfg.shared_expert_intermediate_size.map_or(0.0, |si| si as f64);
        let per_layer = 14.0 * h;
        let floats = moe_layers * t * (per_layer + 3.0 * k * h + 3.0 * k * inter + 3.0 * shared) + dense_layers * t * (per_layer + 3.0 * cfg.intermediate_size as f64);
        gpu += floats * 4.0 / rate;
    }
    let streamed_bytes = streamed_layers * (active - host_experts) * w.per_expert_stream as f64 + placement.streamed_attention.len() as f64 * w.attention_per_layer_stream as f64;
    io_bytes += streamed_bytes;
    gpu += hw.matmul_s(logits, cfg.vocab_size as f64, h);
    let layers = cfg.num_layers as f64;
    if let Some(s) = module {
        // KV pages of the sequences attended on the GPU, staged up once per layer (none when
        // the KV stays on the GPU); hidden states up and down; host micro-batches bring their
        // queries down and send their attention outputs up.
        let kv_up = if s.gpu_kv_rows > 0 { 0.0 } else { (1.0 - host_share) * kv_past * kv_row * cfg.kv_value_bytes() as f64 * layers };
        let host_tokens = host_share * t;
        // Assignments of host experts: their rows and outputs stay on the host when the states
        // live there, and cross once each way when the states are on the GPU.
        let host_rows = t * k * streamed_layers * host_experts / active.max(1e-9);
        let states_on_gpu = t <= s.gpu_state_rows as f64;
        let norms_on_gpu = !states_on_gpu && t <= s.gpu_norm_rows as f64;
        let (state_up, state_down) = if norms_on_gpu {
            // The states go up for each layer's attention and down after it; experts and FFNs
            // gather the normed rows on the GPU (row lists up) and their outputs come down.
            let ffn_layers = layers - streamed_layers;
            let up = t * h * 4.0 * (layers + 1.0 + ffn_layers) + layers * t * 4.0 * 2.0 + streamed_layers * t * k * 4.0 + host_tokens * heads * vd * 4.0 * layers;
            let down = t * 4.0 * (h + kv_row + 2.0 * k) * layers + t * k * h * 4.0 * streamed_layers + t * h * 4.0 * ffn_layers + host_tokens * heads * kd * 4.0 * layers;
            (up, down)
        } else if states_on_gpu {
            // Only row indices, routing and the host's attention traffic cross: per layer the
            // micro-batches' and chunks' row lists, the combine's rows and weights.
            let up = t * 4.0 + layers * t * 4.0 * 3.0 + streamed_layers * t * k * 4.0 * 4.0 + host_tokens * heads * vd * 4.0 * layers + host_rows * h * 4.0;
            let down = t * 4.0 * (kv_row + 2.0 * k) * layers + host_tokens * heads * kd * 4.0 * layers + host_rows * h * 4.0;
            (up, down)
        } else {
            let sent_rows = t * k * streamed_layers - host_rows;
            let up = t * h * 4.0 * (layers + 1.0) + sent_rows * h * 4.0 + t * h * 8.0 * (layers - streamed_layers) + host_tokens * heads * vd * 4.0 * layers;
            let down = t * 4.0 * (2.0 * h + kv_row + 2.0 * k) * layers + sent_rows * h * 4.0 + host_tokens * heads * kd * 4.0 * layers;
            (up, down)
        };
        // Every byte is held to the link's rate: the KV of a layer before its attention can
        // run, the hidden states beside the streamed weights.
        io_serial_bytes += kv_up;
        io_bytes += state_up;
        // Host copies: KV gathered from pages and written back, rows gathered for the experts;
        // every micro-batch and chunk is a submission whose results come back pipelined.
        let expert_chunks = active * (per_expert_rows / s.expert_chunk as f64).ceil().max(1.0);
        let resident_chunks = (t / s.expert_chunk as f64).ceil().max(1.0);
        let submits = layers * (gpu_batches + 2.0 * host_batches)
            + streamed_layers * expert_chunks
            + (layers - streamed_layers) * resident_chunks
            + 2.0 * (logits / s.logit_rows as f64).ceil().max(1.0);
        host += (kv_up + 2.0 * state_up) / hw.host_copy_bytes_per_s;
        if hw.held_link {
            // Readbacks wait on the scheduler's thread behind the uploads it made: in series.
            io_bytes += state_down * hw.upload_bytes_per_s / hw.readback_bytes_per_s;
        } else {
            host += state_down / hw.readback_bytes_per_s;
        }
        host += submits * hw.submit_s;
        gpu += submits * hw.pass_s;
        let dispatches = layers * micro_batches * 18.0 + streamed_layers * expert_chunks * 4.0 + (layers - streamed_layers) * resident_chunks * 10.0;
        host += dispatches * hw.record_s;
    } else {
        // One submission per layer and per streamed expert; the routing of a streamed layer
        // comes back to the host while the GPU waits, as does the step's result.
        let submits = 2.0 + layers + streamed_layers * (1.0 + active);
        let syncs = 1.0 + streamed_layers;
        host += submits * hw.submit_s + syncs * hw.sync_s + streamed_layers * t * k * 4.0 / hw.readback_bytes_per_s;
        gpu += submits * hw.pass_s;
        let dispatches = layers * 20.0 + streamed_layers * (3.0 + 4.0 * active);
        host += dispatches * hw.record_s;
    }
    log::debug!(
        "step of {t} tokens ({} in module chunks): link {:.3} s + {:.3} s serial, GPU {:.3} s, host {:.3} s, host attention {:.3} s",
        module.is_some(),
        io_bytes / hw.upload_bytes_per_s,
        io_serial_bytes / hw.upload_bytes_per_s,
        gpu,
        host,
        host_attn
    );
    StepCost {
        io: io_bytes / hw.upload_bytes_per_s,
        io_serial: io_serial_bytes / hw.upload_bytes_per_s,
        gpu,
        host,
        host_attn,
        host_batches,
        host_experts: streamed_layers * host_expert_s,
        shared: hw.shares_cpu,
    }
}

/// What limits the sequences in flight when the KV cache lives on the device.
fn kv_cache_limit(whole_job: bool, cpu_device: bool) -> &'static str {
    match (whole_job, cpu_device) {
        (true, _) => "the job's size",
        (false, true) => "CPU device memory for the KV cache",
        (false, false) => "GPU memory for the KV cache",
    }
}

/// Predicts the job's throughput with `in_flight` sequences at once.
fn predict(cfg: &ModelConfig, w: &WeightBytes, job: &JobShape, placement: &Placement, hw: &HardwareProfile, in_flight: usize, module: Option<&ModuleSizes>) -> Prediction {
    let (p, d) = (job.prompt_len.max(1.0), job.new_tokens.max(0.0));
    let step = job.max_step_tokens.max(1) as f64;
    let decode_steps = (d - 1.0).max(0.0);
    // One wave of `b` sequences: its prefill time, its decode time and a decode step's cost.
    let wave = |b: f64| {
        // Prefill: the wave's prompt tokens in steps of the step budget. Each prompt token reads
        // half its prompt on average; a step holds (t / p) sequences' prompts.
        let steps = (b * p / step).ceil().max(1.0);
        let t = b * p / steps;
        let prefill = steps * step_cost(cfg, w, placement, hw, t, t * p / 2.0, 0.0, (t / p).max(1.0), module, p.min(t)).time();
        // Decode: one token per sequence per step (the first new token comes with the prefill),
        // attending to its prompt and half the new tokens.
        let past = b * (p + d / 2.0);
        // The baselines feed at most a step's tokens per forward: more sequences than that
        // decode in several forwards, each streaming what a whole one does.
        let forwards = if module.is_none() { (b / step).ceil().max(1.0) } else { 1.0 };
        let (bf, pf) = (b / forwards, past / forwards);
        let decode_step = step_cost(cfg, w, placement, hw, bf, pf, pf, bf, module, 1.0);
        (prefill, decode_steps * forwards * decode_step.time(), decode_step)
    };
    let b = (in_flight.max(1) as f64).min(job.sequences.max(1) as f64);
    let (prefill, decode, decode_step) = wave(b);
    // Full waves, then the sequences left over as a smaller wave: it streams as many weights a
    // step as a full one, so it costs more than its share of tokens.
    let full = (job.sequences as f64 / b).floor().max(1.0);
    let rest = (job.sequences as f64 - full * b).max(0.0);
    let rest_time = if rest >= 1.0 {
        let (rp, rd, _) = wave(rest);
        rp + rd
    } else {
        0.0
    };
    let total_time = full * (prefill + decode) + rest_time;
    Prediction {
        tokens_per_s: job.tokens() / total_time.max(1e-12),
        prefill_tokens_per_s: b * p / prefill.max(1e-12),
        decode_tokens_per_s: if decode_steps > 0.0 { b * decode_steps / decode.max(1e-12) } else { 0.0 },
        bound: decode_step.bound(),
        batch_limit: "",
    }
}

impl JobPlan {
    pub fn describe(&self, cfg: &ModelConfig, w: &WeightBytes) -> String {
        let device = crate::planner::device_noun(self.cpu_device);
        let mut s = format!("batching {}: {}\n", self.batching.name(), self.placement.describe(cfg, w, device));
        match &self.sizes {
            Some(z) if z.gpu_kv_rows > 0 => s += &format!(
                "  population {} sequences (limited by {}), {} tokens a step; KV kept on the {device} ({} rows), attention on the {device}; micro-batches of up to {} tokens; expert chunks of up to {} rows\n",
                z.population,
                self.prediction.batch_limit,
                z.step_tokens,
                z.gpu_kv_rows,
                z.attn_tokens,
                z.expert_chunk
            ),
            Some(z) => s += &format!(
                "  population {} sequences (limited by {}), {} tokens a step, hidden states {}; attention {}, micro-batches of up to {} tokens / {} KV rows; expert chunks of up to {} rows; host KV store {} in pages of {} tokens ({})\n",
                z.population,
                self.prediction.batch_limit,
                z.step_tokens,
                z.describe_states(device),
                match z.attention {
                    _ if z.host_batches > 1 && z.attention != AttentionSite::Gpu => {
                        format!("{}, pipelined in at least {} micro-batches a layer", z.attention.describe(device), z.host_batches)
                    }
                    _ => z.attention.describe(device),
                },
                z.attn_tokens,
                z.attn_kv_rows,
                z.expert_chunk,
                format_size(z.host_kv_bytes),
                z.page_tokens,
                if cfg.kv_bf16 { "bf16" } else { "f32" }
            ),
            None => s += &format!(
                "  {} sequences at once (limited by {}), {device} KV cache of {} rows, steps of up to {} tokens\n",
                self.sequences_in_flight, self.prediction.batch_limit, self.cache_rows, self.step_tokens
            ),
        }
        if let Some(z) = self.sizes.as_ref().filter(|z| z.host_expert_rows > 0 && self.placement.streams_any(cfg)) {
            s += &match z.host_expert_rows {
                usize::MAX => "  streamed experts computed on the host in decode steps (--cpu-experts always), unless a slot holds them\n".to_string(),
                r => format!("  a streamed expert with at most {r} rows in a step computed on the host instead of sent (the host matmul beats the link)\n"),
            };
        }
        let p = &self.prediction;
        s += &format!(
            "  predicted {:.1} tokens/s over the job (prefill {:.1}, decode {:.1}); decode limited by {}",
            p.tokens_per_s,
            p.prefill_tokens_per_s,
            p.decode_tokens_per_s,
            p.bound.name(self.cpu_device)
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ci-small's shapes in bf16, planned against the A5000 file with its link held to 1 MB/s:
    /// every step's experts cost seconds, as on the issue 10 benchmarks.
    fn baseline(job: JobShape, gpu_budget: u64) -> JobPlan {
        let v = serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 4, "num_local_experts": 32, "num_experts_per_tok": 2, "intermediate_size": 128, "vocab_size": 256
        });
        let cfg = ModelConfig::parse(&v, std::path::Path::new("config.json")).unwrap();
        let w = WeightBytes::of_config(&cfg, 2);
        let mut hw = HardwareProfile::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/hardware/rtx-a5000-pcie4.json")).unwrap();
        hw.upload_bytes_per_s = 1e6;
        plan_job(&cfg, &w, &job, Batching::Model, AttentionChoice::Auto, CpuExperts::Never, gpu_budget, 1 << 34, 1 << 27, &hw).unwrap()
    }

    fn job(prompt_len: usize, new_tokens: usize, max_step_tokens: usize) -> JobShape {
        JobShape { sequences: 512, prompt_len: prompt_len as f64, new_tokens: new_tokens as f64, longest: prompt_len + new_tokens, max_step_tokens }
    }

    /// A long step takes room from the KV cache: a job of long prompts gets longer steps and
    /// fewer sequences in flight than a job of long generations under the same budget.
    #[test]
    fn the_baselines_weigh_a_steps_length_against_the_sequences_in_flight() {
        let budget = 768 << 10;
        let prefill_heavy = baseline(job(48, 2, 2048), budget);
        let decode_heavy = baseline(job(4, 60, 2048), budget);
        assert!(prefill_heavy.step_tokens > decode_heavy.step_tokens, "{prefill_heavy:?}\n{decode_heavy:?}");
        assert!(decode_heavy.sequences_in_flight > prefill_heavy.sequences_in_flight, "{prefill_heavy:?}\n{decode_heavy:?}");
        for p in [&prefill_heavy, &decode_heavy] {
            assert!(p.cache_rows >= 50 && p.step_tokens >= 1, "{p:?}");
        }
    }

    /// More sequences in flight than a step's tokens decode in several forwards, each streaming
    /// the experts its tokens reach: a cap of 8 tokens a step must predict slower decode than 64.
    #[test]
    fn decode_over_more_sequences_than_a_step_holds_costs_several_forwards() {
        let budget = 64 << 20;
        let capped = baseline(job(4, 60, 8), budget);
        let wide = baseline(job(4, 60, 64), budget);
        assert!(capped.sequences_in_flight > 8 && capped.step_tokens <= 8, "{capped:?}");
        let (c, w) = (capped.prediction.decode_tokens_per_s, wide.prediction.decode_tokens_per_s);
        assert!(c < 0.5 * w, "decode with 8-token steps {c} against 64-token steps {w}");
    }
}
