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
use std::sync::Arc;


use crate::input::chat::{ChatTemplate, ModelTemplates};
use crate::input::{read_lines, JobLine, LineFormat, Prompt, Shard};
use crate::output::{openai, result_line, Choice, ResultSink};
use crate::planner::{HardwareProfile, WeightBytes};
use crate::sampler::{SamplingParams, StopStrings};
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
    /// The flags' sampling: what a line of moegen's format leaves out.
    pub sampling: SamplingParams,
    /// Whether `--temperature` was given: OpenAI lines without a temperature otherwise sample at
    /// the API's default of 1.
    pub temperature_given: bool,
    pub ignore_eos: bool,
    /// `--chat-template`: a template file, or the name of one of the model's templates.
    pub chat_template: Option<String>,
    pub shard: Option<Shard>,
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

/// Where each request's completion goes: the input line (among those to run) and its choice.
#[derive(Clone, Copy)]
struct Slot {
    line: usize,
    choice: usize,
}

/// The job's input turned into requests, and the error lines of OpenAI requests that cannot run.
struct Prepared {
    requests: Vec<Request>,
    slots: Vec<Slot>,
    prompt_tokens: Vec<usize>,
    /// Per line to run: its index among the input lines given to `prepare`.
    runs: Vec<usize>,
    /// Per line to run: the stop strings its text is cut at.
    stops: Vec<Option<Arc<StopStrings>>>,
    errors: Vec<String>,
}

/// The template chat lines are rendered with, compiled when the first one needs it.
struct Templates<'a> {
    flag: Option<&'a str>,
    model: &'a ModelTemplates,
    compiled: Option<ChatTemplate>,
}

impl Templates<'_> {
    fn get(&mut self) -> anyhow::Result<&ChatTemplate> {
        if self.compiled.is_none() {
            let t = match self.flag {
                Some(f) if Path::new(f).exists() => ChatTemplate::from_file(Path::new(f), self.model)?,
                Some(name) => self.model.pick(Some(name))?,
                None => self.model.pick(None)?,
            };
            self.compiled = Some(t);
        }
        Ok(self.compiled.as_ref().expect("set above"))
    }
}

/// Turns input lines into requests: rendered, tokenised, checked against the vocabulary and the
/// context, with each line's own sampling. A bad line of moegen's format fails the job here,
/// before anything is written; an OpenAI line that cannot run becomes an error line.
fn prepare(lines: &[JobLine], input: &Path, codec: Option<&Arc<TextCodec>>, templates: &mut Templates, cfg: &ModelConfig, args: &JobArgs) -> anyhow::Result<Prepared> {
    let context = cfg.max_position_embeddings;
    let mut out = Prepared { requests: Vec::new(), slots: Vec::new(), prompt_tokens: Vec::new(), runs: Vec::new(), stops: Vec::new(), errors: Vec::new() };
    for (index, l) in lines.iter().enumerate() {
        let at = format!("{}:{}", input.display(), l.line);
        let openai = matches!(l.format, LineFormat::OpenAi { .. });
        let checked = (|| -> anyhow::Result<std::result::Result<(Vec<u32>, &crate::input::LineParams), String>> {
            let (prompt, params) = match &l.request {
                Ok((p, q)) => (p, q),
                Err(why) => return Ok(Err(why.clone())),
            };
            let need_codec = |what: &str| codec.ok_or_else(|| anyhow::anyhow!("{at}: {what} needs the model's tokenizer.json, which is missing; give token ids (`prompt_ids`) instead"));
            let ids = match prompt {
                Prompt::Ids(ids) => ids.clone(),
                Prompt::Text(text) => need_codec("a text prompt")?.encode(text).with_context(|| at.clone())?,
                Prompt::Chat(messages) => {
                    let codec = need_codec("a chat prompt")?;
                    let text = match templates.get()?.render(messages) {
                        Ok(t) => t,
                        Err(e) if openai => return Ok(Err(e.to_string())),
                        Err(e) => return Err(anyhow::Error::new(e).context(at.clone())),
                    };
                    codec.encode_raw(&text).with_context(|| at.clone())?
                }
            };
            if !params.stop.is_empty() && codec.is_none() {
                bail!("{at}: `stop` strings need the model's tokenizer.json, which is missing; give `stop_token_ids` instead");
            }
            let problem = if ids.is_empty() {
                Some("the prompt is empty".to_string())
            } else if let Some(&bad) = ids.iter().chain(&params.stop_token_ids).find(|&&t| t as usize >= cfg.vocab_size) {
                Some(format!("token id {bad} is outside the model's vocabulary of {}", cfg.vocab_size))
            } else if ids.len() >= context {
                Some(format!("the prompt has {} tokens, the model's context holds {context}", ids.len()))
            } else {
                None
            };
            Ok(match problem {
                Some(p) => Err(p),
                None => Ok((ids, params)),
            })
        })()?;
        let (ids, params) = match checked {
            Ok(ok) => ok,
            Err(why) if openai => {
                out.errors.push(openai::error_line(&l.id, &why));
                continue;
            }
            Err(why) => bail!("{at}: {why}"),
        };
        let line = out.stops.len();
        let stop = match codec {
            Some(c) => StopStrings::new(&params.stop, c.clone()).map(Arc::new),
            None => None,
        };
        out.runs.push(index);
        out.stops.push(stop.clone());
        out.prompt_tokens.push(ids.len());
        let default_temperature = if openai && !args.temperature_given { 1.0 } else { args.sampling.temperature };
        let base = SamplingParams {
            temperature: params.temperature.unwrap_or(default_temperature),
            top_k: params.top_k.unwrap_or(args.sampling.top_k),
            top_p: params.top_p.unwrap_or(args.sampling.top_p),
            seed: params.seed.unwrap_or(args.sampling.seed),
        };
        let wanted = params.max_tokens.unwrap_or(args.max_new_tokens).min(context - ids.len());
        for choice in 0..params.n {
            // A line's own seed makes its samples depend on that seed alone (as the OpenAI API
            // and vLLM do); otherwise on the job's seed and the line's id.
            let stream = match (params.seed, choice) {
                (Some(_), _) => format!("choice {choice}"),
                (None, 0) => l.id_key(),
                (None, k) => format!("{}#{k}", l.id_key()),
            };
            out.requests.push(Request {
                sampling: base,
                stream,
                ignore_eos: params.ignore_eos.unwrap_or(args.ignore_eos),
                stop_token_ids: params.stop_token_ids.clone(),
                stop_strings: stop.clone(),
                logprobs: params.logprobs,
                ..Request::new(l.id.clone(), ids.clone(), wanted)
            });
            out.slots.push(Slot { line, choice });
        }
    }
    Ok(out)
}

/// The `created` time of OpenAI result lines: `SOURCE_DATE_EPOCH` when set (reproducible files),
/// else now.
fn created_time() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
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
    // Every tensor the model needs is checked here (present, shape, dtype, within its file),
    // before the input is read, a device opened or any output touched.
    let files = crate::loader::ModelFiles::open(&model_dir)?;
    let cfg = files.config.clone().with_kv_bf16(args.kv_bf16 == Some(true))?.with_quantize(args.quantize, args.quantize_attention)?;
    crate::model::weights::check(&files.checkpoint, &cfg)?;
    let codec = files.codec.map(Arc::new);
    let mut lines = read_lines(&input)?;
    if let Some(shard) = args.shard {
        lines.retain(|l| shard.takes(&l.id_key()));
    }
    // The output is opened (and a resumed one read) only once the input is known to be good, and
    // every line is rendered and tokenised before the first result is written.
    let done = match &args.output {
        Some(p) if args.resume => Some(ResultSink::finished(p).with_context(|| format!("--output {}", p.display()))?),
        _ => None,
    };
    let done_ids = done.as_ref().map(|d| &d.ids);
    if let Some(done) = done_ids.filter(|d| !d.is_empty()) {
        // Results for ids this input does not have mean the output belongs to another job (or
        // another shard): appending to it would mix two jobs in one file.
        let ours: std::collections::HashSet<String> = lines.iter().map(|l| l.id_key()).collect();
        let mut foreign: Vec<&String> = done.iter().filter(|id| !ours.contains(*id)).collect();
        if !foreign.is_empty() {
            foreign.sort();
            let shown: Vec<String> = foreign.iter().take(3).map(|id| id.to_string()).collect();
            let part = if args.shard.is_some() { "this shard of --input" } else { "--input" };
            bail!(
                "--output {} holds results for {} id(s) that {part} ({}) does not have ({}{}): it is another job's output; resume with the input it came from, or write to a new --output",
                args.output.as_ref().map_or(String::new(), |p| p.display().to_string()),
                foreign.len(),
                input.display(),
                shown.join(", "),
                if foreign.len() > 3 { ", ..." } else { "" }
            );
        }
    }
    let todo: Vec<JobLine> = lines.iter().filter(|l| !done_ids.is_some_and(|d| d.contains(&l.id_key()))).cloned().collect();
    let mut templates = Templates { flag: args.chat_template.as_deref(), model: &files.chat, compiled: None };
    let prepared = prepare(&todo, &input, codec.as_ref(), &mut templates, &cfg, args)?;
    let mut sink = match &args.output {
        Some(p) => ResultSink::later(p, done.as_ref()).with_context(|| format!("--output {}", p.display()))?,
        None => ResultSink::Stdout,
    };
    for e in &prepared.errors {
        sink.hold(e.clone())?;
    }
    let reqs = &prepared.requests;
    let mut summary = JobSummary { prompts: lines.len(), skipped: lines.len() - todo.len(), ..Default::default() };
    if reqs.is_empty() {
        sink.finish()?;
        summary.wall = started.elapsed();
        return Ok(summary);
    }
    crate::interrupt::install();

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
        trace: args.trace.is_some(),
    };
    let weights = WeightBytes::of(&checkpoint, &cfg);
    let (cfg, plan) = plan_kv_dtype(&cfg, args.kv_bf16, |c| plan_policy(&ctx, c, &weights, reqs, args.batching, &settings, &hw))?;
    eprintln!("{}", plan.describe(&cfg, &weights));

    let bar = ProgressBar::with_draw_target(
        Some(todo.len() as u64),
        if args.progress { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} sequences, {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut written = 0usize;
    let mut generated = 0usize;
    // A line is written once all its choices have finished.
    let mut choices: Vec<Vec<Option<Choice>>> = Vec::new();
    for s in &prepared.slots {
        if s.line == choices.len() {
            choices.push(Vec::new());
        }
        choices[s.line].push(None);
    }
    let created = created_time();
    let model_name = model_dir.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let token_bytes = |t: u32| codec.as_ref().map(|c| c.token_bytes(t)).unwrap_or_default();
    let result = run_policy(&ctx, &cfg, &checkpoint, reqs, plan, &settings, |f| {
        let r = &reqs[f.index];
        let slot = prepared.slots[f.index];
        let mut text = match &codec {
            Some(c) => c.decode(&f.output)?,
            None => String::new(),
        };
        if let Some(at) = prepared.stops[slot.line].as_ref().and_then(|s| s.cut(&text)) {
            text.truncate(at);
        }
        if demo {
            let prompt = match &codec {
                Some(c) => c.decode(&r.prompt)?,
                None => format!("{:?}", r.prompt),
            };
            // The completion in bold on a terminal, plain in a file or pipe.
            let (on, off) = if std::io::IsTerminal::is_terminal(&std::io::stdout()) { ("\x1b[1m", "\x1b[0m") } else { ("", "") };
            bar.suspend(|| println!("--- {} ({})\n{prompt}{on}{text}{off}\n", r.id, f.finish.as_str()));
        }
        generated += f.output.len();
        let logprobs = r.logprobs.map(|_| f.logprobs);
        choices[slot.line][slot.choice] = Some(Choice { output_ids: f.output, text, finish: f.finish, logprobs });
        if choices[slot.line].iter().all(Option::is_some) {
            let all: Vec<Choice> = choices[slot.line].iter_mut().map(|c| c.take().expect("all finished")).collect();
            let line = &todo[prepared.runs[slot.line]];
            let prompt_tokens = prepared.prompt_tokens[slot.line];
            let json = match &line.format {
                LineFormat::Native => result_line(&line.id, prompt_tokens, &all, &token_bytes),
                LineFormat::OpenAi { endpoint, model } => {
                    openai::response_line(&line.id, *endpoint, model.as_deref().unwrap_or(&model_name), created, prompt_tokens, &all, &token_bytes)
                }
            };
            // JSONL goes to --output always, and to stdout unless the demo prints there.
            if !demo || args.output.is_some() {
                sink.write_line(&json)?;
            }
            written += 1;
            bar.inc(1);
        }
        bar.set_message(format!("{generated} tokens"));
        Ok(())
    });
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        // Nothing written (the sink opens on the first result): the output is as it was.
        Err(e) if matches!(sink, ResultSink::Later { .. }) => {
            let untouched = args.output.as_ref().map(|p| format!("; {} was not touched", p.display())).unwrap_or_default();
            return Err(anyhow::Error::new(e).context(format!("the job stopped before its first result{untouched}")));
        }
        Err(e) => {
            let whereto = args.output.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "stdout".into());
            let hint = if args.output.is_some() { "; rerun with --resume to finish the rest" } else { "" };
            return Err(anyhow::Error::new(e)
                .context(format!("the job stopped after {written} of {} results were written to {whereto}{hint}", prepared.runs.len())));
        }
    };
    sink.finish()?;
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
