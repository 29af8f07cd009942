//! One policy's run of a set of requests, shared by `generate` and `bench`: budgets resolved,
//! the job planned, the model placed and loaded, the sequences generated, the figures taken.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::gpu::{GpuContext, Link, TraceSummary, Tracer};
use crate::loader::checkpoint::Checkpoint;
use crate::loader::config::ModelConfig;
use crate::model::{Model, StreamStats};
use crate::planner::{format_size, plan_job, HardwareProfile, JobPlan, JobShape, WeightBytes};
use crate::scheduler::{generate, generate_module, AttentionChoice, CpuExperts, Batching, Finished, GenerateOptions, GenerateStats, Request};

/// The memory a job may use, and where each figure came from.
#[derive(Clone, Debug)]
pub struct Budgets {
    pub gpu: u64,
    pub gpu_source: String,
    pub host: u64,
    pub host_source: String,
    /// The device is the CPU (`--device cpu`): its memory is host memory, which `describe` says.
    pub cpu_device: bool,
}

impl Budgets {
    pub fn resolve(gpu: Option<u64>, host: Option<u64>, ctx: &GpuContext) -> Self {
        let (host, host_source) = match host {
            Some(h) => (h, "--host-memory".to_string()),
            None => {
                let (h, why) = crate::planner::default_host_memory();
                (h, why.to_string())
            }
        };
        let (gpu, gpu_source) = match gpu {
            Some(g) => (g, "--gpu-memory".to_string()),
            None => {
                let (g, why) = crate::planner::default_gpu_memory(ctx, host);
                (g, why.to_string())
            }
        };
        Budgets { gpu, gpu_source, host, host_source, cpu_device: ctx.is_cpu() }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} memory {} ({}), host memory {} ({})",
            crate::planner::device_noun(self.cpu_device),
            format_size(self.gpu),
            self.gpu_source,
            format_size(self.host),
            self.host_source
        )
    }
}

/// What every policy of a run shares.
#[derive(Clone)]
pub struct RunSettings {
    pub budgets: Budgets,
    /// Rates every byte to and from the GPU is held to (the download one defaults to the upload's).
    pub upload_bandwidth: Option<u64>,
    pub download_bandwidth: Option<u64>,
    /// Where module-based batching runs attention (`auto`: the planner's choice).
    pub attention: AttentionChoice,
    /// Whether module-based batching may compute streamed experts on the host.
    pub cpu_experts: CpuExperts,
    pub max_step_tokens: usize,
    /// Record a timeline (needed for the GPU-busy figure and --trace).
    pub trace: bool,
}

/// The figures of one policy's run.
#[derive(Clone, Debug)]
pub struct PolicyReport {
    pub batching: Batching,
    pub plan: JobPlan,
    pub stats: GenerateStats,
    /// Generation time, model load excluded.
    pub elapsed: Duration,
    pub streaming: StreamStats,
    /// Every byte sent to the GPU during generation (weights, KV, hidden states, queries,
    /// attention outputs, routing, parameters), and every byte read back.
    pub uploaded: u64,
    pub downloaded: u64,
    pub trace: Option<TraceSummary>,
    pub trace_json: Option<String>,
    /// The GPU's block-format matmuls took 8-bit inputs (`--gpu-compute int8`).
    pub gpu_int8: bool,
}

impl PolicyReport {
    pub fn tokens_per_s(&self) -> f64 {
        (self.stats.prompt_tokens + self.stats.generated_tokens) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.stats.prompt_tokens, self.stats.prefill_time)
    }
    /// Tokens fed by decode steps over their time (0 when no step decoded: a sequence's first
    /// new token comes with its prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.stats.decode_tokens, self.stats.decode_time)
    }
    pub fn bytes_uploaded(&self) -> u64 {
        self.uploaded
    }
    pub fn bytes_downloaded(&self) -> u64 {
        self.downloaded
    }

    /// A line for the summary: measured against predicted, and what moved over the link.
    pub fn describe(&self) -> String {
        let p = &self.plan.prediction;
        let device = crate::planner::device_noun(self.plan.cpu_device);
        let mut s = format!(
            "batching {}: {:.1} tokens/s over the job (predicted {:.1}, {:+.0}%); prefill {:.1} tokens/s (predicted {:.1}), decode {:.1} tokens/s (predicted {:.1}); {} {} (experts {}: {} {}, {} found in a slot, {} computed on the host), {} {}",
            self.batching.name(),
            self.tokens_per_s(),
            p.tokens_per_s,
            100.0 * (p.tokens_per_s / self.tokens_per_s().max(1e-9) - 1.0),
            self.prefill_tokens_per_s(),
            p.prefill_tokens_per_s,
            self.decode_tokens_per_s(),
            p.decode_tokens_per_s,
            // The CPU device's "uploads" are copies within host memory: no link is crossed.
            if self.plan.cpu_device { "copied to the CPU device" } else { "uploaded" },
            format_size(self.bytes_uploaded()),
            format_size(self.streaming.bytes),
            self.streaming.uploads,
            if self.plan.cpu_device { "copies" } else { "uploads" },
            self.streaming.hits,
            self.streaming.on_host,
            if self.plan.cpu_device { "copied back" } else { "downloaded" },
            format_size(self.bytes_downloaded()),
        );
        if let Some(z) = &self.plan.sizes {
            s += &format!("; attention {}", z.attention.describe(device));
            if z.gpu_kv_rows == 0 {
                s += &format!(", hidden states {}", z.describe_states(device));
            }
        }
        if let Some(t) = &self.trace {
            s += &format!("; {device} busy {:.0}% of the time", 100.0 * t.gpu_busy);
            // On the CPU device copies and kernels take turns on the same cores: no overlap to report.
            if !self.plan.cpu_device {
                s += &format!(", {:.0}% while uploads were in flight", 100.0 * t.gpu_busy_while_uploading);
            }
        }
        s
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// The job's shape for the planner.
pub fn job_shape(requests: &[Request], max_step_tokens: usize) -> JobShape {
    let n = requests.len().max(1) as f64;
    JobShape {
        sequences: requests.len(),
        prompt_len: requests.iter().map(|r| r.prompt.len()).sum::<usize>() as f64 / n,
        new_tokens: requests.iter().map(|r| r.max_new_tokens).sum::<usize>() as f64 / n,
        longest: requests.iter().map(|r| r.prompt.len() + r.max_new_tokens).max().unwrap_or(1).max(1),
        max_step_tokens,
    }
}

/// The plan of `requests` under `batching` with these settings on this device.
pub fn plan_policy(
    ctx: &GpuContext,
    cfg: &ModelConfig,
    weights: &WeightBytes,
    requests: &[Request],
    batching: Batching,
    settings: &RunSettings,
    hw: &HardwareProfile,
) -> Result<JobPlan> {
    let shape = job_shape(requests, settings.max_step_tokens);
    let hw = hw.with_link_caps(settings.upload_bandwidth, settings.download_bandwidth);
    plan_job(cfg, weights, &shape, batching, settings.attention, settings.cpu_experts, settings.budgets.gpu, settings.budgets.host, ctx.binding_limit(), &hw)
}

/// The config and plan under `--kv-dtype`: `Some` keeps what it says; `None` (auto) plans with
/// f32 and with bf16 keys and values and keeps the faster (f32, being exact, unless bf16 is
/// predicted more than 2% faster).
pub fn plan_kv_dtype(cfg: &ModelConfig, kv_bf16: Option<bool>, plan: impl Fn(&ModelConfig) -> Result<JobPlan>) -> Result<(ModelConfig, JobPlan)> {
    if let Some(on) = kv_bf16 {
        let cfg = cfg.clone().with_kv_bf16(on)?;
        let p = plan(&cfg)?;
        return Ok((cfg, p));
    }
    let exact = cfg.clone().with_kv_bf16(false)?;
    let full = plan(&exact);
    let Ok(half_cfg) = cfg.clone().with_kv_bf16(true) else { return Ok((exact, full?)) };
    match (full, plan(&half_cfg)) {
        (Ok(f), Ok(h)) if h.prediction.tokens_per_s > 1.02 * f.prediction.tokens_per_s => Ok((half_cfg, h)),
        (Ok(f), _) => Ok((exact, f)),
        (Err(_), Ok(h)) => Ok((half_cfg, h)),
        (Err(e), Err(_)) => Err(e),
    }
}

/// Loads the model as `plan` places it and runs `requests`, calling `on_finish` per finished
/// sequence.
pub fn run_policy(
    ctx: &GpuContext,
    cfg: &ModelConfig,
    checkpoint: &Checkpoint,
    requests: &[Request],
    plan: JobPlan,
    settings: &RunSettings,
    on_finish: impl FnMut(Finished) -> Result<()>,
) -> Result<PolicyReport> {
    let batching = plan.batching;
    let longest = job_shape(requests, settings.max_step_tokens).longest;
    let mut model = Model::load_placed(ctx, cfg.clone(), checkpoint, longest, &plan.placement)?;
    // From here on every transfer counts (the load above does not).
    let link = Arc::new(Link::new(settings.upload_bandwidth, settings.download_bandwidth.or(settings.upload_bandwidth)));
    model.ctx = model.ctx.with_link(link.clone());
    let tracer = if settings.trace { Some(Tracer::new(ctx)?) } else { None };
    ctx.set_tracer(tracer.clone());
    let started = Instant::now();
    let opts = GenerateOptions {
        max_step_tokens: plan.step_tokens,
        cache_rows: plan.cache_rows,
        fixed_batch: batching == Batching::Model,
    };
    let result = match &plan.sizes {
        Some(sizes) => generate_module(&model, requests, sizes, on_finish),
        None => generate(&model, requests, &opts, on_finish),
    };
    ctx.set_tracer(None);
    let stats = result?;
    ctx.wait_idle("finishing the run")?;
    let elapsed = started.elapsed();
    let streaming = model.slot_cache.lock().unwrap().stats;
    Ok(PolicyReport {
        batching,
        plan,
        stats,
        elapsed,
        streaming,
        uploaded: link.uploaded(),
        downloaded: link.downloaded(),
        trace: tracer.as_ref().map(|t| t.summary()),
        trace_json: tracer.as_ref().map(|t| t.chrome_json()),
        gpu_int8: ctx.int8_products(),
    })
}
