//! `moegen generate`: a JSONL job from prompts to results, with checks on every input before the
//! GPU work starts, results written as sequences finish, and a closing summary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::gpu::{AdapterChoice, GpuContext};
use crate::loader::config::ModelConfig;
use crate::loader::tokenizer::TextCodec;
use crate::engine::{plan_kv_dtype, plan_policy, run_policy, Budgets, RunSettings};
use crate::output::{read_prompts, result_line, PromptLine, PromptText, ResultSink};
use crate::planner::{HardwareProfile, WeightBytes};
use crate::sampler::SamplingParams;
use crate::scheduler::{AttentionChoice, Batching, CpuExperts, Request};

/// The embedded default model and its sample prompts, in the source tree's `assets/`.
pub fn default_assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets")
}

#[derive(Clone, Debug)]
pub struct JobArgs {
    pub model: Option<PathBuf>,
    pub input: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub resume: bool,
    pub max_step_tokens: usize,
    /// GPU memory the job may use; experts that do not fit stream from host memory.
    pub gpu_memory: Option<u64>,
    /// Host memory the job may use (streamed experts, KV pages, the population's hidden states).
    pub host_memory: Option<u64>,
    /// Bytes per second that everything sent to (read back from) the GPU is held to, to emulate
    /// a slower link; downloads default to the upload figure.
    pub upload_bandwidth: Option<u64>,
    pub download_bandwidth: Option<u64>,
    /// Where module-based batching runs attention.
    pub attention: AttentionChoice,
    pub cpu_experts: CpuExperts,
    pub batching: Batching,
    /// A hardware profile to plan with instead of this adapter's calibration.
    pub hardware: Option<PathBuf>,
    /// Where to write a Chrome trace of the run.
    pub trace: Option<PathBuf>,
    /// Keys and values in 16 bits in host memory and over the link (None: the planner's choice).
    pub kv_bf16: Option<bool>,
    /// `--quantize`: the experts' block format, and whether attention is quantised too.
    pub quantize: Option<crate::gpu::WeightDtype>,
    pub quantize_attention: bool,
    pub adapter: AdapterChoice,
    pub progress: bool,
}

#[derive(Clone, Debug, Default)]
pub struct JobSummary {
    pub prompts: usize,
    pub skipped: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Tokens fed by decode steps.
    pub decode_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub wall: Duration,
    /// Measured against predicted throughput, uploads, GPU busy time.
    pub policy: Option<String>,
}

impl JobSummary {
    pub fn report(&self) -> String {
        let rate = |n: usize, t: Duration| if t.is_zero() { 0.0 } else { n as f64 / t.as_secs_f64() };
        let streaming = match &self.policy {
            Some(p) => format!("\n{p}"),
            None => String::new(),
        };
        format!(
            "{} prompts ({} already done), {} prompt tokens, {} generated tokens; prefill {:.1} tokens/s, decode {:.1} tokens/s; wall time {:.2} s{streaming}",
            self.prompts,
            self.skipped,
            self.prompt_tokens,
            self.generated_tokens,
            rate(self.prompt_tokens, self.prefill_time),
            rate(self.decode_tokens, self.decode_time),
            self.wall.as_secs_f64()
        )
    }
}

fn check_flags(args: &JobArgs) -> anyhow::Result<()> {
    let s = &args.sampling;
    if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
        bail!("--temperature must be a finite number >= 0, got {}", s.temperature);
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {}", s.top_p);
    }
    if args.max_step_tokens == 0 {
        bail!("--max-step-tokens must be at least 1");
    }
    if args.resume && args.output.is_none() {
        bail!("--resume needs --output: the file whose finished ids are skipped");
    }
    Ok(())
}

/// Turns input lines into requests: tokenised, checked against the vocabulary and the context.
fn requests(lines: &[PromptLine], input: &Path, codec: Option<&TextCodec>, cfg: &ModelConfig, default_new: usize) -> anyhow::Result<Vec<Request>> {
    let context = cfg.max_position_embeddings;
    let mut out = Vec::new();
    for l in lines {
        let at = format!("{}:{}", input.display(), l.line);
        let prompt = match &l.prompt {
            PromptText::Ids(ids) => ids.clone(),
            PromptText::Text(text) => match codec {
                Some(c) => c.encode(text).with_context(|| at.clone())?,
                None => bail!("{at}: a text prompt needs the model's tokenizer.json, which is missing; give `prompt_ids` instead"),
            },
        };
        if prompt.is_empty() {
            bail!("{at}: the prompt is empty");
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!("{at}: token id {bad} is outside the model's vocabulary of {}", cfg.vocab_size);
        }
        if prompt.len() >= context {
            bail!("{at}: the prompt has {} tokens, the model's context holds {context}", prompt.len());
        }
        let wanted = l.max_new_tokens.unwrap_or(default_new);
        out.push(Request { id: l.id.clone(), prompt: prompt.clone(), max_new_tokens: wanted.min(context - prompt.len()) });
    }
    Ok(out)
}

/// Runs a whole job. `demo` prints readable completions to stdout instead of JSONL.
pub fn run_job(args: &JobArgs, demo: bool) -> anyhow::Result<JobSummary> {
    let started = Instant::now();
    check_flags(args)?;
    let model_dir = args.model.clone().unwrap_or_else(|| default_assets().join("default-model"));
    let input = match &args.input {
        Some(p) => p.clone(),
        None if args.model.is_none() => default_assets().join("prompts.jsonl"),
        None => bail!("--input is required with --model (a JSONL file of prompts)"),
    };
    // The KV dtype (auto: the planner's choice) is settled with the plan below.
    // Every tensor the model needs is checked when it loads, before any output is written.
    let files = crate::loader::ModelFiles::open(&model_dir)?;
    let cfg = files.config.clone().with_kv_bf16(args.kv_bf16 == Some(true))?.with_quantize(args.quantize, args.quantize_attention)?;
    let codec = files.codec;
    let lines = read_prompts(&input)?;
    let (mut sink, done) = match &args.output {
        Some(p) => ResultSink::open(p, args.resume).with_context(|| format!("--output {}", p.display()))?,
        None => (ResultSink::Stdout, Default::default()),
    };
    let todo: Vec<PromptLine> = lines.iter().filter(|l| !done.contains(&l.id_key())).cloned().collect();
    let reqs = requests(&todo, &input, codec.as_ref(), &cfg, args.max_new_tokens)?;
    let mut summary = JobSummary { prompts: lines.len(), skipped: lines.len() - todo.len(), ..Default::default() };
    if reqs.is_empty() {
        summary.wall = started.elapsed();
        return Ok(summary);
    }

    let checkpoint = files.checkpoint;
    let ctx = GpuContext::new(&args.adapter)?;
    let budgets = Budgets::resolve(args.gpu_memory, args.host_memory, &ctx);
    eprintln!("{}: {}", ctx.info().name, budgets.describe());
    let hw = match &args.hardware {
        Some(path) => HardwareProfile::load(path)?,
        None => HardwareProfile::for_adapter(&ctx, budgets.gpu, budgets.host)?,
    };
    let settings = RunSettings {
        budgets,
        upload_bandwidth: args.upload_bandwidth,
        download_bandwidth: args.download_bandwidth,
        attention: args.attention,
        cpu_experts: args.cpu_experts,
        max_step_tokens: args.max_step_tokens,
        sampling: args.sampling,
        ignore_eos: args.ignore_eos,
        trace: args.trace.is_some(),
    };
    let weights = WeightBytes::of(&checkpoint, &cfg);
    let (cfg, plan) = plan_kv_dtype(&cfg, args.kv_bf16, |c| plan_policy(&ctx, c, &weights, &reqs, args.batching, &settings, &hw))?;
    eprintln!("{}", plan.describe(&cfg, &weights));

    let bar = ProgressBar::with_draw_target(
        Some(reqs.len() as u64),
        if args.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} sequences, {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut written = 0usize;
    let mut generated = 0usize;
    let result = run_policy(&ctx, &cfg, &checkpoint, &reqs, plan, &settings, |f| {
        let r = &reqs[f.index];
        let text = match &codec {
            Some(c) => c.decode(&f.output)?,
            None => String::new(),
        };
        if demo {
            let prompt = match &codec {
                Some(c) => c.decode(&r.prompt)?,
                None => format!("{:?}", r.prompt),
            };
            // The completion in bold on a terminal, plain in a file or pipe.
            let (on, off) = if std::io::IsTerminal::is_terminal(&std::io::stdout()) { ("\x1b[1m", "\x1b[0m") } else { ("", "") };
            bar.suspend(|| println!("--- {} ({})\n{prompt}{on}{text}{off}\n", r.id, f.finish.as_str()));
        }
        // JSONL goes to --output always, and to stdout unless the demo prints there.
        if !demo || args.output.is_some() {
            sink.write_line(&result_line(&r.id, r.prompt.len(), &f.output, &text, f.finish))?;
        }
        written += 1;
        generated += f.output.len();
        bar.inc(1);
        bar.set_message(format!("{generated} tokens"));
        Ok(())
    });
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let whereto = args.output.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "stdout".into());
            let hint = if args.output.is_some() { "; rerun with --resume to finish the rest" } else { "" };
            return Err(anyhow::Error::new(e)
                .context(format!("the job stopped after {written} of {} results were written to {whereto}{hint}", reqs.len())));
        }
    };
    if let (Some(path), Some(json)) = (&args.trace, &report.trace_json) {
        std::fs::write(path, json).with_context(|| format!("--trace {}", path.display()))?;
        eprintln!("trace written to {} (open it in https://ui.perfetto.dev)", path.display());
    }
    summary.prompt_tokens = report.stats.prompt_tokens;
    summary.generated_tokens = report.stats.generated_tokens;
    summary.decode_tokens = report.stats.decode_tokens;
    summary.prefill_time = report.stats.prefill_time;
    summary.decode_time = report.stats.decode_time;
    summary.wall = started.elapsed();
    summary.policy = Some(report.describe());
    Ok(summary)
}
