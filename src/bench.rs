//! `moegen bench` and `moegen plan`: the batching policies side by side on one model (a
//! checkpoint or a synthetic preset) and one synthetic job, with measured and predicted figures.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::json;

use crate::engine::{job_shape, plan_kv_dtype, plan_policy, run_policy, Budgets, PolicyReport, RunSettings};
use crate::gpu::{AdapterChoice, GpuContext};
use crate::loader::checkpoint::Checkpoint;
use crate::loader::config::ModelConfig;
use crate::loader::synthetic::{preset_config, synthetic_checkpoint};
use crate::planner::{plan_job, HardwareProfile, WeightBytes};
use crate::scheduler::{AttentionChoice, Batching, CpuExperts, Request};

/// Which model: a checkpoint directory or a synthetic preset.
#[derive(Clone, Debug)]
pub enum ModelSource {
    Dir(PathBuf),
    Synthetic(String),
}

impl ModelSource {
    pub fn from_flags(model: Option<PathBuf>, synthetic: Option<String>) -> anyhow::Result<Self> {
        match (model, synthetic) {
            (Some(d), None) => Ok(ModelSource::Dir(d)),
            (None, Some(s)) => Ok(ModelSource::Synthetic(s)),
            (None, None) => Ok(ModelSource::Synthetic("ci-small".into())),
            (Some(_), Some(_)) => bail!("give --model or --synthetic, not both"),
        }
    }

    pub fn config(&self) -> anyhow::Result<ModelConfig> {
        Ok(match self {
            ModelSource::Dir(d) => crate::loader::ModelFiles::config(d)?,
            ModelSource::Synthetic(s) => preset_config(s)?,
        })
    }

    /// The weights' sizes under each of `cfgs` (the same model with other `--quantize` choices),
    /// reading the checkpoint's index once and never building a synthetic model's values.
    pub fn weight_bytes(&self, cfgs: &[ModelConfig]) -> anyhow::Result<Vec<WeightBytes>> {
        Ok(match self {
            ModelSource::Dir(d) => {
                let ck = crate::loader::ModelFiles::checkpoint(d)?;
                // A tensor missing or misshapen fails here, before calibration and planning.
                for c in cfgs {
                    crate::model::weights::check(&ck, c)?;
                }
                cfgs.iter().map(|c| WeightBytes::of(&ck, c)).collect()
            }
            ModelSource::Synthetic(_) => cfgs.iter().map(|c| WeightBytes::of_config(c, 2)).collect(),
        })
    }

    pub fn checkpoint(&self, cfg: &ModelConfig) -> anyhow::Result<Checkpoint> {
        Ok(match self {
            ModelSource::Dir(d) => crate::loader::ModelFiles::checkpoint(d)?,
            ModelSource::Synthetic(s) => synthetic_checkpoint(s, cfg)?,
        })
    }

    pub fn name(&self) -> String {
        match self {
            ModelSource::Dir(d) => d.display().to_string(),
            ModelSource::Synthetic(s) => format!("synthetic {s}"),
        }
    }
}

/// The model, synthetic job, policies, limits and hardware of a `bench` or `plan`.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub source: ModelSource,
    pub batching: Vec<Batching>,
    pub gpu_memory: Option<u64>,
    pub host_memory: Option<u64>,
    pub sequences: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    pub max_step_tokens: usize,
    pub upload_bandwidth: Option<u64>,
    pub download_bandwidth: Option<u64>,
    /// Module-based batching runs once per placement listed, and per `--cpu-experts` choice.
    pub attention: Vec<AttentionChoice>,
    pub cpu_experts: Vec<CpuExperts>,
    pub hardware: Option<PathBuf>,
    pub adapter: AdapterChoice,
    /// Keys and values in 16 bits in host memory and over the link (None: the planner's choice
    /// per run).
    pub kv_bf16: Option<bool>,
    /// `--quantize`: each run list is run once per format (None: as stored).
    pub quantize: Vec<Option<crate::gpu::WeightDtype>>,
    pub quantize_attention: bool,
}

impl JobSpec {
    /// The formats to run, at least the stored one.
    fn formats(&self) -> Vec<Option<crate::gpu::WeightDtype>> {
        if self.quantize.is_empty() {
            vec![None]
        } else {
            self.quantize.clone()
        }
    }
}

/// The name of a `--quantize` choice.
fn format_name(q: Option<crate::gpu::WeightDtype>) -> &'static str {
    q.map_or("as stored", |d| d.name())
}

#[derive(Clone, Debug)]
pub struct BenchArgs {
    pub spec: JobSpec,
    pub json: bool,
    pub trace: Option<PathBuf>,
}

/// Random prompts of `len` tokens (seeded, so every policy and run gets the same job).
pub fn synthetic_requests(cfg: &ModelConfig, sequences: usize, len: usize, new_tokens: usize) -> Vec<Request> {
    let mut s = 0x2545F4914F6CDD1Du64;
    (0..sequences)
        .map(|i| {
            let prompt = (0..len.max(1))
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % cfg.vocab_size as u64) as u32
                })
                .collect();
            // Every sequence runs its whole length, as the plan assumes.
            Request { ignore_eos: true, ..Request::new(serde_json::Value::from(i), prompt, new_tokens) }
        })
        .collect()
}

fn check_job(cfg: &ModelConfig, sequences: usize, prompt_len: usize, new_tokens: usize) -> anyhow::Result<()> {
    if sequences == 0 || prompt_len == 0 {
        bail!("--sequences and --prompt-len must be at least 1");
    }
    if prompt_len + new_tokens > cfg.max_position_embeddings {
        bail!(
            "--prompt-len {prompt_len} plus --new-tokens {new_tokens} exceed the model's context of {}",
            cfg.max_position_embeddings
        );
    }
    Ok(())
}

pub fn run_bench(args: &BenchArgs) -> anyhow::Result<Vec<PolicyReport>> {
    let spec = &args.spec;
    let cfg = spec.source.config()?.with_kv_bf16(spec.kv_bf16 == Some(true))?;
    check_job(&cfg, spec.sequences, spec.prompt_len, spec.new_tokens)?;
    // Each --quantize choice checked against the model before any device work.
    let formats = spec.formats();
    let variants = formats.iter().map(|&q| cfg.clone().with_quantize(q, spec.quantize_attention)).collect::<crate::Result<Vec<_>>>()?;
    // Every tensor checked before a device is opened or calibrated.
    let checkpoint = spec.source.checkpoint(&cfg)?;
    for v in &variants {
        crate::model::weights::check(&checkpoint, v)?;
    }
    let ctx = GpuContext::new(&spec.adapter)?;
    let budgets = Budgets::resolve(spec.gpu_memory, spec.host_memory, &ctx);
    eprintln!("{} on {}: {}", spec.source.name(), ctx.info().name, budgets.describe());
    let hw = match &spec.hardware {
        Some(p) => HardwareProfile::load(p)?,
        None => HardwareProfile::for_adapter(&ctx, budgets.gpu, budgets.host)?,
    };
    let requests = synthetic_requests(&cfg, spec.sequences, spec.prompt_len, spec.new_tokens);
    let settings = RunSettings {
        budgets,
        upload_bandwidth: spec.upload_bandwidth,
        download_bandwidth: spec.download_bandwidth,
        attention: AttentionChoice::Auto,
        cpu_experts: CpuExperts::Auto,
        max_step_tokens: spec.max_step_tokens,
        trace: true,
    };
    let mut reports = Vec::new();
    let mut labels = Vec::new();
    let mut traces = Vec::new();
    for (q, cfg) in formats.iter().copied().zip(&variants) {
        let weights = WeightBytes::of(&checkpoint, cfg);
        for (b, attention, cpu_experts) in runs(&spec.batching, &spec.attention, &spec.cpu_experts) {
            let settings = RunSettings { attention, cpu_experts, ..settings.clone() };
            let mut what = run_name(b, attention, cpu_experts, &spec.attention, &spec.cpu_experts);
            if formats.len() > 1 {
                what = format!("{what}, experts {}", format_name(q));
            }
            let (cfg, plan) = plan_kv_dtype(cfg, spec.kv_bf16, |c| plan_policy(&ctx, c, &weights, &requests, b, &settings, &hw)).with_context(|| format!("batching {what}"))?;
            eprintln!("{}", plan.describe(&cfg, &weights));
            let report = run_policy(&ctx, &cfg, &checkpoint, &requests, plan, &settings, |_| Ok(())).with_context(|| format!("batching {what}"))?;
            eprintln!("{}", report.describe());
            if args.json {
                let mut j = report_json(&report);
                j["experts"] = json!(format_name(q));
                println!("{j}");
            }
            if let Some(t) = &report.trace_json {
                traces.push((what, t.clone()));
            }
            reports.push(report);
            labels.push(format_name(q));
        }
    }
    if !args.json {
        print!("{}", table(&reports, if formats.len() > 1 { Some(&labels) } else { None }));
    }
    if let Some(path) = &args.trace {
        write_traces(path, &traces).with_context(|| format!("--trace {}", path.display()))?;
    }
    Ok(reports)
}

/// The runs of a bench or plan: each policy once, module-based once per attention placement
/// and CPU-experts choice.
fn runs(batching: &[Batching], attention: &[AttentionChoice], cpu_experts: &[CpuExperts]) -> Vec<(Batching, AttentionChoice, CpuExperts)> {
    let placements = if attention.is_empty() { &[AttentionChoice::Auto][..] } else { attention };
    let experts = if cpu_experts.is_empty() { &[CpuExperts::Auto][..] } else { cpu_experts };
    batching
        .iter()
        .flat_map(|&b| match b {
            Batching::Module => placements.iter().flat_map(|&a| experts.iter().map(move |&c| (b, a, c))).collect::<Vec<_>>(),
            _ => vec![(b, AttentionChoice::Auto, CpuExperts::Never)],
        })
        .collect()
}

/// A run's name: the policy, with its attention placement and CPU-experts choice when several
/// are compared.
fn run_name(b: Batching, attention: AttentionChoice, cpu_experts: CpuExperts, all: &[AttentionChoice], all_experts: &[CpuExperts]) -> String {
    let mut parts = Vec::new();
    if b == Batching::Module && all.len() > 1 {
        parts.push(format!("attention {}", attention.name()));
    }
    if b == Batching::Module && all_experts.len() > 1 {
        parts.push(format!("cpu experts {}", cpu_experts.name()));
    }
    if parts.is_empty() {
        b.name().to_string()
    } else {
        format!("{} ({})", b.name(), parts.join(", "))
    }
}

/// One policy's figures as the bench contract's JSON object.
pub fn report_json(r: &PolicyReport) -> serde_json::Value {
    json!({
        "batching": r.batching.name(),
        // What ran it: the two devices, and what the host's and the GPU's matmuls multiply in.
        "device": if r.plan.cpu_device { "cpu" } else { "gpu" },
        "cpu_compute": if crate::cpu::int8_products::enabled() { "int8" } else if crate::cpu::bf16_products::enabled() { "bf16" } else { "f32" },
        "gpu_compute": if r.gpu_int8 { "int8" } else { "f32" },
        "tokens_per_s": r.tokens_per_s(),
        "prefill_tokens_per_s": r.prefill_tokens_per_s(),
        "decode_tokens_per_s": r.decode_tokens_per_s(),
        "bytes_uploaded": r.bytes_uploaded(),
        "bytes_downloaded": r.bytes_downloaded(),
        "states_on_gpu": r.plan.sizes.as_ref().is_some_and(|z| z.gpu_state_rows >= z.step_tokens),
        "states_on_gpu_up_to": r.plan.sizes.as_ref().map_or(0, |z| z.gpu_state_rows.min(z.step_tokens)),
        "normed_states_on_gpu_up_to": r.plan.sizes.as_ref().map_or(0, |z| z.gpu_state_rows.max(z.gpu_norm_rows).min(z.step_tokens)),
        "attention": r.plan.sizes.as_ref().map_or_else(|| json!({"site": "gpu", "kv": "gpu", "host_share": 0.0}), |z| z.attention.json(z.gpu_kv_rows > 0)),
        "gpu_busy_fraction": r.trace.map(|t| t.gpu_busy),
        "gpu_busy_while_uploading": r.trace.map(|t| t.gpu_busy_while_uploading),
        "predicted_tokens_per_s": r.plan.prediction.tokens_per_s,
        "sequences_in_flight": r.plan.sequences_in_flight,
        "seconds": r.elapsed.as_secs_f64(),
    })
}

/// The runs side by side; `formats` names each run's expert format when several were run (the
/// ratio is then to the first run of the same policy).
pub fn table(reports: &[PolicyReport], formats: Option<&[&str]>) -> String {
    // On the CPU device "the GPU" is the host's cores: the columns say "device".
    let cpu_device = reports.first().is_some_and(|r| r.plan.cpu_device);
    let (device_site, busy) = if cpu_device { ("device", "busy") } else { ("gpu", "GPU busy") };
    let (sent, back) = if cpu_device { ("copied in", "copied out") } else { ("uploaded", "downloaded") };
    let mut s = format!(
        "{:<11} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>9} {:>9} {:>8}\n",
        "batching", "experts", "attention", "tokens/s", "predicted", "prefill", "decode", sent, back, busy, "in flight", "ratio"
    );
    for (i, r) in reports.iter().enumerate() {
        let base = match formats {
            Some(_) => reports.iter().find(|o| o.batching == r.batching).map(|o| o.tokens_per_s()),
            None => reports.iter().find(|r| r.batching == Batching::Model).map(|r| r.tokens_per_s()),
        };
        let format = formats.map_or("", |f| f[i]);
        let ratio = base.map(|b| format!("{:.1}x", r.tokens_per_s() / b.max(1e-12))).unwrap_or_default();
        let site = match &r.plan.sizes {
            Some(z) if z.gpu_kv_rows == 0 && z.attention != crate::scheduler::AttentionSite::Gpu => match z.attention {
                crate::scheduler::AttentionSite::Split { .. } => format!("split {:.0}%", 100.0 * z.attention.host_share()),
                _ => "host".into(),
            },
            _ => device_site.into(),
        };
        s += &format!(
            "{:<11} {:>9} {:>10} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12} {:>12} {:>8.0}% {:>9} {:>8}\n",
            r.batching.name(),
            format,
            site,
            r.tokens_per_s(),
            r.plan.prediction.tokens_per_s,
            r.prefill_tokens_per_s(),
            r.decode_tokens_per_s(),
            crate::planner::format_size(r.bytes_uploaded()),
            crate::planner::format_size(r.bytes_downloaded()),
            100.0 * r.trace.map_or(0.0, |t| t.gpu_busy),
            r.plan.sequences_in_flight,
            ratio
        );
    }
    s
}

/// One trace file per policy when several ran (`FILE` gets the policy's name before its extension).
fn write_traces(path: &std::path::Path, traces: &[(String, String)]) -> anyhow::Result<()> {
    for (name, json) in traces {
        let tag: String = name.chars().filter_map(|c| if c.is_ascii_alphanumeric() { Some(c) } else if c == ' ' { Some('-') } else { None }).collect();
        let p = if traces.len() == 1 {
            path.to_path_buf()
        } else {
            let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "trace".into());
            let ext = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
            path.with_file_name(format!("{stem}.{tag}{ext}"))
        };
        std::fs::write(&p, json).with_context(|| p.display().to_string())?;
        eprintln!("trace of batching {name} written to {} (open it in https://ui.perfetto.dev)", p.display());
    }
    Ok(())
}

/// Prints each policy's plan and predicted throughput. With `--hardware` no GPU is needed; the
/// budgets default to the profile's memories.
/// The plan of each requested policy as text, and whether any of them fits the budgets.
pub fn run_plan(args: &JobSpec) -> anyhow::Result<(String, bool)> {
    let cfg = args.source.config()?.with_kv_bf16(args.kv_bf16 == Some(true))?;
    check_job(&cfg, args.sequences, args.prompt_len, args.new_tokens)?;
    let formats = args.formats();
    let variants = formats.iter().map(|&q| cfg.clone().with_quantize(q, args.quantize_attention)).collect::<crate::Result<Vec<_>>>()?;
    // The weights as stored (for the header), then under each format.
    let mut sizes = args.source.weight_bytes(&[std::slice::from_ref(&cfg), &variants[..]].concat())?;
    let weights = sizes.remove(0);
    let (hw, budgets) = match &args.hardware {
        Some(p) => {
            let hw = HardwareProfile::load(p)?;
            if args.adapter.int8_products {
                eprintln!("note: {} prices block formats by its own rates; --gpu-compute int8 does not change the plan", p.display());
            }
            let budgets = Budgets {
                gpu: args.gpu_memory.unwrap_or(hw.gpu_memory),
                gpu_source: if args.gpu_memory.is_some() { "--gpu-memory".into() } else { "the hardware file".into() },
                host: args.host_memory.unwrap_or(hw.host_memory),
                host_source: if args.host_memory.is_some() { "--host-memory".into() } else { "the hardware file".into() },
                cpu_device: false,
            };
            (hw, budgets)
        }
        None => {
            let ctx = GpuContext::new(&args.adapter)?;
            let budgets = Budgets::resolve(args.gpu_memory, args.host_memory, &ctx);
            (HardwareProfile::for_adapter(&ctx, budgets.gpu, budgets.host)?, budgets)
        }
    };
    let hw = hw.with_link_caps(args.upload_bandwidth, args.download_bandwidth);
    let requests = synthetic_requests(&cfg, args.sequences, args.prompt_len, args.new_tokens);
    let shape = job_shape(&requests, args.max_step_tokens);
    let non_expert = weights.resident + weights.attention_per_layer * cfg.num_layers as u64;
    let streamed_as = if weights.per_expert_stream != weights.per_expert {
        format!(", {} in host memory and over the link (FP8)", crate::planner::format_size(weights.per_expert_stream))
    } else {
        String::new()
    };
    let mut out = format!(
        "{}: {} of weights on the {} ({} non-expert, {} experts of {} each{streamed_as})\nhardware: {} [{}]{}\nbudgets: {}\njob: {} sequences, prompts of {}, {} new tokens each\n",
        args.source.name(),
        crate::planner::format_size(non_expert + weights.per_layer() * weights.moe_layers as u64),
        crate::planner::device_noun(hw.cpu_device),
        crate::planner::format_size(non_expert),
        weights.experts_per_layer * weights.moe_layers,
        crate::planner::format_size(weights.per_expert),
        hw.name,
        hw.source,
        hw.kernels.as_ref().map_or(String::new(), |k| {
            let unused = if std::env::var_os("MOEGEN_DEFAULT_KERNELS").is_some() { " (not used: MOEGEN_DEFAULT_KERNELS keeps the defaults)" } else { "" };
            format!("\nkernels: {}{unused}", k.describe())
        }),
        budgets.describe(),
        args.sequences,
        args.prompt_len,
        args.new_tokens
    );
    let mut any = false;
    for ((q, cfg), weights) in formats.iter().copied().zip(&variants).zip(&sizes) {
        if formats.len() > 1 || q.is_some() {
            out += &format!("experts {}: {} each\n", format_name(q), crate::planner::format_size(weights.per_expert));
        }
        for (b, attention, cpu_experts) in runs(&args.batching, &args.attention, &args.cpu_experts) {
            match plan_kv_dtype(cfg, args.kv_bf16, |c| plan_job(c, weights, &shape, b, attention, cpu_experts, budgets.gpu, budgets.host, hw.binding_limit, &hw)) {
                Ok((cfg, plan)) => {
                    any = true;
                    out += &format!("{}\n", plan.describe(&cfg, weights));
                    if args.kv_bf16.is_none() {
                        out += &format!("  KV dtype {} (--kv-dtype auto: the faster prediction)\n", if cfg.kv_bf16 { "bf16" } else { "f32" });
                    }
                }
                Err(e) => out += &format!("batching {}: {e}\n", b.name()),
            }
        }
    }
    Ok((out, any))
}
