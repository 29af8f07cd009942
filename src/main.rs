use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use moegen::gpu::{describe_adapters, AdapterChoice, DeviceChoice, GpuContext};
use moegen::bench::{run_bench, run_plan, BenchArgs, JobSpec, ModelSource};
use moegen::job::{run_job, JobArgs};
use moegen::scheduler::{AttentionChoice, Batching, CpuExperts};
use moegen::planner::{parse_rate, parse_size};
use moegen::sampler::SamplingParams;

#[derive(Parser)]
#[command(name = "moegen", version, about = "High-throughput offline inference of Mixture-of-Experts LLMs on one GPU, any vendor")]
struct Cli {
    /// The GPU to use: an index from `moegen devices`, or part of its name (else WGPU_ADAPTER_NAME,
    /// else the fastest kind present). WGPU_BACKEND limits the backends searched.
    #[arg(long, global = true)]
    adapter: Option<String>,
    /// Where the model runs: `auto` takes a GPU adapter when there is one, else the CPU; `gpu`
    /// any adapter (a software one too); `cpu` the host's cores. Default: MOEGEN_DEVICE, else auto.
    #[arg(long, global = true, value_enum)]
    device: Option<DeviceChoice>,
    /// What the host's matmuls multiply in (the CPU device, CPU experts): `f32` (exact products,
    /// matching transformers' f32 logits); `bf16`: over bf16 weights, inputs rounded to bf16 and
    /// multiplied on AMX tiles where the CPU has AMX-BF16 (about 6x the arithmetic rate), else
    /// with the AVX512-BF16 dot-product instructions (about 2x), as torch and llama.cpp do on such
    /// CPUs; `int8`: also over K-format weights (Q4_K, Q5_K, Q6_K: what Q4_K_M and Q5_K_M files
    /// hold), inputs quantised to 8 bits per 256 and multiplied with 8-bit dot products
    /// (AVX512-VNNI, else AVX2, or NEON), and over Q8_0 and Q4_0, inputs quantised to 8 bits per
    /// 32 (the products of `--gpu-compute int8`), as llama.cpp does. Where the CPU lacks them,
    /// `bf16` and `int8` warn and stay f32.
    #[arg(long, global = true, value_enum, default_value = "f32")]
    cpu_compute: moegen::cpu::bf16_products::CpuCompute,
    /// What a GPU's matmuls over block-format weights (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K: GGUF files,
    /// --quantize) multiply in: `f32` (weights decoded in registers, exact products); `int8`:
    /// inputs quantised to 8 bits per 32 and multiplied with dot4I8Packed (the packed 8-bit dot
    /// product where the GPU has one), as llama.cpp's GPU kernels do. The CPU device ignores it.
    /// Not yet run on a real GPU.
    #[arg(long, global = true, value_enum, default_value = "f32")]
    gpu_compute: moegen::gpu::GpuCompute,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter with its backend, type, driver, features and limits, the CPU (threads,
    /// vector instructions, memory), and the device moegen would pick.
    Devices,
    /// Generate completions for a JSONL file of prompts. Without --model, runs the embedded
    /// default model on the sample prompts in assets/ and prints readable completions.
    Generate(GenerateArgs),
    /// Join the outputs of a job's shards (`generate --shard I/N`) into one file in the input's
    /// order; fails naming any id missing, present twice, or not in the input.
    Merge(MergeCli),
    /// Run the batching policies side by side on a model (a checkpoint or a synthetic preset)
    /// and a synthetic job; prints measured and predicted tokens/s.
    Bench(BenchCli),
    /// Print the plan of a job (what stays on the GPU, batch sizes, predicted tokens/s and the
    /// limiting resource) for this adapter or a hardware file.
    Plan(PlanCli),
}

#[derive(Args)]
struct MergeCli {
    /// The job's input file, whose order the merged file follows.
    #[arg(long)]
    input: PathBuf,
    /// The merged file (written only when every check passes).
    #[arg(long)]
    output: PathBuf,
    /// The shards' output files.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
}

/// The batching policy, or all three side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BatchingChoice {
    Module,
    Model,
    Continuous,
    All,
}

impl BatchingChoice {
    fn policies(self) -> Vec<Batching> {
        match self {
            BatchingChoice::Module => vec![Batching::Module],
            BatchingChoice::Model => vec![Batching::Model],
            BatchingChoice::Continuous => vec![Batching::Continuous],
            BatchingChoice::All => vec![Batching::Model, Batching::Continuous, Batching::Module],
        }
    }
}

#[derive(Args)]
struct ModelFlags {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A synthetic model with random weights (default ci-small): ci-small, mixtral-small, mixtral-8x7b,
    /// mixtral-8x22b, qwen3-30b-a3b, olmoe-1b-7b.
    #[arg(long, conflicts_with = "model")]
    synthetic: Option<String>,
}

/// The synthetic job of `bench` and `plan`.
#[derive(Args)]
struct JobFlags {
    /// Sequences in the job.
    #[arg(long, default_value_t = 64)]
    sequences: usize,
    /// Tokens of each (random) prompt.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    #[command(flatten)]
    limits: LimitFlags,
}

/// Memory, link and step limits, and the hardware to plan for: the same on every command.
#[derive(Args)]
struct LimitFlags {
    /// Most tokens in one forward pass of model-based and continuous batching (longer prompts are
    /// fed in chunks); under module-based batching the fewest prompt tokens a step takes in.
    #[arg(long, default_value_t = 2048)]
    max_step_tokens: usize,
    /// GPU memory the job may use (e.g. 512MiB, 24GiB): the weights that do not fit live in host
    /// memory and stream to the GPU. Default: printed at start (wgpu does not report an adapter's
    /// memory, so a conservative figure).
    #[arg(long, value_parser = parse_size)]
    gpu_memory: Option<u64>,
    /// Host memory the job may use: streamed weights, the KV pages and hidden states of the
    /// sequences in flight. Default: 80% of what the OS reports available.
    #[arg(long, value_parser = parse_size)]
    host_memory: Option<u64>,
    /// A hardware profile (JSON) to plan with instead of calibrating this adapter, e.g.
    /// assets/hardware/rtx-a5000-pcie4.json.
    #[arg(long)]
    hardware: Option<PathBuf>,
    /// Hold everything sent to the GPU (weights, KV pages, hidden states, queries, attention
    /// outputs, routing) to this rate (e.g. 4MB/s, 2GB/s), to reproduce a slower host-to-GPU link
    /// than the machine has; the plan assumes it too.
    #[arg(long, value_parser = parse_rate)]
    upload_bandwidth: Option<u64>,
    /// Hold everything read back from the GPU (logits, new keys and values, hidden states,
    /// routing, queries) to this rate. Default: the --upload-bandwidth figure.
    #[arg(long, value_parser = parse_rate)]
    download_bandwidth: Option<u64>,
    /// Where module-based batching runs attention: gpu (KV pages sent up), host (on the CPU over
    /// the KV pages, only queries and outputs cross), split (micro-batches divided between both
    /// so they finish together), or auto (the planner's choice). The baselines keep KV on the GPU.
    /// bench and plan take a list (gpu,host) and run module-based batching once per placement.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    attention: Vec<AttentionChoice>,
    /// Whether module-based batching may compute a streamed expert on the host from host memory
    /// instead of sending it, when it received few tokens in a step: auto (where the calibrated
    /// host matmul beats the link), never, always. bench and plan take a list (never,auto).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    cpu_experts: Vec<CpuExperts>,
    /// How keys and values are kept in host memory and sent over the link: f32 (exact), bf16
    /// (half the bytes; every policy then rounds keys and values to bf16 as it caches them), or
    /// auto (the planner's faster choice). Default: auto for plan, f32 for generate and bench.
    #[arg(long, value_enum)]
    kv_dtype: Option<KvDtype>,
    /// Quantise the routed experts at load into one of llama.cpp's block formats (the bytes
    /// llama.cpp's own quantiser writes): they stay packed in host memory, over the link and on
    /// the GPU. none, q8_0, q4_0, q4_k. Weights already quantised (GGUF) stay as they are. bench
    /// and plan take a list (none,q8_0,q4_k) and run each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    quantize: Vec<QuantizeChoice>,
    /// With --quantize, quantise the attention projections too.
    #[arg(long)]
    quantize_attention: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum QuantizeChoice {
    None,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
}

use moegen::gpu::WeightDtype;

impl QuantizeChoice {
    fn dtype(self) -> Option<WeightDtype> {
        match self {
            QuantizeChoice::None => None,
            QuantizeChoice::Q8_0 => Some(WeightDtype::Q8_0),
            QuantizeChoice::Q4_0 => Some(WeightDtype::Q4_0),
            QuantizeChoice::Q4K => Some(WeightDtype::Q4K),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum KvDtype {
    F32,
    Bf16,
    Auto,
}

impl KvDtype {
    /// Whether keys and values are bf16, or None for the planner's choice.
    fn bf16(flag: Option<KvDtype>, default: KvDtype) -> Option<bool> {
        match flag.unwrap_or(default) {
            KvDtype::F32 => Some(false),
            KvDtype::Bf16 => Some(true),
            KvDtype::Auto => None,
        }
    }
}

#[derive(Args)]
struct BenchCli {
    #[command(flatten)]
    model: ModelFlags,
    #[command(flatten)]
    job: JobFlags,
    #[arg(long, value_enum, default_value = "all")]
    batching: BatchingChoice,
    /// One JSON object per policy per line instead of the table.
    #[arg(long)]
    json: bool,
    /// Write a Chrome trace per policy (FILE, or FILE's name with the policy's when several run).
    #[arg(long)]
    trace: Option<PathBuf>,
}

#[derive(Args)]
struct PlanCli {
    #[command(flatten)]
    model: ModelFlags,
    #[command(flatten)]
    job: JobFlags,
    #[arg(long, value_enum, default_value = "all")]
    batching: BatchingChoice,
}

#[derive(Args)]
struct GenerateArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompts, one JSON object a line: {"id": .., "prompt": "text"} or {"id": .., "prompt_ids": [..]},
    /// optionally with "max_new_tokens".
    #[arg(long)]
    input: Option<PathBuf>,
    /// Where result lines go, one per prompt as each finishes (default: stdout).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Tokens to generate per prompt, unless its line says otherwise.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy decoding (the default for moegen's own lines; OpenAI batch lines without a
    /// `temperature` sample at the API's default of 1 unless this is given).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed of the sampling streams; each prompt's stream also depends on its id only.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Skip the ids already in --output and append the rest.
    #[arg(long)]
    resume: bool,
    /// The chat template for `messages` lines: a Jinja file, or the name of one of the model's
    /// templates (default: the model's `default`, from tokenizer_config.json or the GGUF file).
    #[arg(long)]
    chat_template: Option<String>,
    /// Take only this process's share I of N of the input lines (by a hash of each id, so shares
    /// stay stable when lines are added); `moegen merge` joins the shards' outputs.
    #[arg(long)]
    shard: Option<moegen::input::Shard>,
    #[command(flatten)]
    limits: LimitFlags,
    /// module: sequences accumulate in host memory, each module at its own batch size; model: one
    /// fixed batch through the whole model at a time; continuous: a fixed set of running
    /// sequences refilled as they finish.
    #[arg(long, value_enum, default_value = "module")]
    batching: Batching,
    /// Write a Chrome trace of uploads and GPU work (open it in https://ui.perfetto.dev).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn job_spec(model: ModelFlags, job: JobFlags, batching: BatchingChoice, adapter: Option<String>, device: Option<DeviceChoice>, gpu_compute: moegen::gpu::GpuCompute, default_kv: KvDtype) -> anyhow::Result<JobSpec> {
    let l = job.limits;
    Ok(JobSpec {
        source: ModelSource::from_flags(model.model, model.synthetic)?,
        batching: batching.policies(),
        gpu_memory: l.gpu_memory,
        host_memory: l.host_memory,
        sequences: job.sequences,
        prompt_len: job.prompt_len,
        new_tokens: job.new_tokens,
        max_step_tokens: l.max_step_tokens,
        upload_bandwidth: l.upload_bandwidth,
        download_bandwidth: l.download_bandwidth,
        attention: l.attention,
        cpu_experts: l.cpu_experts,
        hardware: l.hardware,
        adapter: choice(adapter, device, gpu_compute),
        kv_bf16: KvDtype::bf16(l.kv_dtype, default_kv),
        quantize: l.quantize.iter().map(|q| q.dtype()).collect(),
        quantize_attention: l.quantize_attention,
    })
}

/// The device the flags and the environment name (`--device` over MOEGEN_DEVICE).
fn choice(adapter: Option<String>, device: Option<DeviceChoice>, gpu_compute: moegen::gpu::GpuCompute) -> AdapterChoice {
    let mut c = AdapterChoice::from_env(adapter);
    if let Some(d) = device {
        c.device = d;
    }
    c.int8_products = gpu_compute == moegen::gpu::GpuCompute::Int8;
    c
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    if let Err(why) = moegen::cpu::bf16_products::set(cli.cpu_compute) {
        eprintln!("warning: {why}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Devices => {
            let choice = choice(cli.adapter, cli.device, cli.gpu_compute);
            let (report, count) = describe_adapters(choice.backends);
            print!("{report}");
            if count == 0 {
                println!("(no GPU adapter: install a GPU driver, or Mesa's software Vulkan driver, Debian/Ubuntu: apt-get install mesa-vulkan-drivers)");
            }
            let host = moegen::cpu::HostInfo::detect();
            println!("[cpu] {}", host.model);
            println!("    threads: {}   vector paths: {} (using {})", host.cores, host.paths.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "), host.isa.name());
            if moegen::cpu::bf16_products::supported() {
                let using = if moegen::cpu::bf16_products::enabled() { "in use" } else { "available with --cpu-compute bf16" };
                #[cfg(target_arch = "x86_64")]
                let unit = if moegen::cpu::amx::available() { "AMX tiles, else AVX512-BF16" } else { "AVX512-BF16" };
                #[cfg(not(target_arch = "x86_64"))]
                let unit = "AVX512-BF16";
                println!("    bf16 products ({unit}): {using}");
            }
            if moegen::cpu::int8_products::supported() {
                let using = if moegen::cpu::int8_products::enabled() { "in use" } else { "available with --cpu-compute int8" };
                let blocks = if moegen::cpu::matmul::int8_32_on(host.isa) { "K-format, Q8_0 and Q4_0 weights" } else { "K-format weights" };
                println!("    int8 products over {blocks} ({}): {using}", moegen::cpu::int8_products::instructions());
            }
            if let Some(m) = host.memory_bytes {
                println!("    memory: {:.1} GiB", m as f64 / (1u64 << 30) as f64);
            }
            let ctx = GpuContext::new(&choice)?;
            let f = ctx.features();
            println!(
                "selected: {} ({:?}); kernels use f16: {}, subgroups: {}, timestamps: {}{}{}{}; binding limit {} MiB",
                ctx.info().name,
                ctx.info().backend,
                f.f16,
                f.subgroups,
                f.timestamps,
                f.coop.map_or(String::new(), |c| format!(", cooperative matrices {0}x{0} ({1} inputs)", c.size, if c.f16_inputs { "f16" } else { "f32" })),
                if f.subgroup_attention { ", subgroup attention" } else { "" },
                if ctx.int8_products() { ", int8 products over block formats (dot4I8Packed)" } else { "" },
                ctx.binding_limit() >> 20
            );
            Ok(())
        }
        Command::Generate(g) => {
            let demo = g.model.is_none() && g.input.is_none();
            let args = JobArgs {
                model: g.model,
                input: g.input,
                output: g.output,
                max_new_tokens: g.max_new_tokens,
                sampling: SamplingParams { temperature: g.temperature.unwrap_or(0.0), top_k: g.top_k, top_p: g.top_p, seed: g.seed },
                temperature_given: g.temperature.is_some(),
                ignore_eos: g.ignore_eos,
                chat_template: g.chat_template,
                shard: g.shard,
                resume: g.resume,
                max_step_tokens: g.limits.max_step_tokens,
                gpu_memory: g.limits.gpu_memory,
                host_memory: g.limits.host_memory,
                upload_bandwidth: g.limits.upload_bandwidth,
                download_bandwidth: g.limits.download_bandwidth,
                attention: match g.limits.attention[..] {
                    [one] => one,
                    _ => anyhow::bail!("--attention takes one placement for generate (gpu, host, split or auto)"),
                },
                cpu_experts: match g.limits.cpu_experts[..] {
                    [one] => one,
                    _ => anyhow::bail!("--cpu-experts takes one choice for generate (auto, never or always)"),
                },
                batching: g.batching,
                hardware: g.limits.hardware,
                trace: g.trace,
                kv_bf16: KvDtype::bf16(g.limits.kv_dtype, KvDtype::F32),
                quantize: match g.limits.quantize[..] {
                    [one] => one.dtype(),
                    _ => anyhow::bail!("--quantize takes one format for generate (none, q8_0, q4_0 or q4_k)"),
                },
                quantize_attention: g.limits.quantize_attention,
                adapter: choice(cli.adapter, cli.device, cli.gpu_compute),
                progress: !g.quiet,
            };
            let summary = run_job(&args, demo)?;
            eprintln!("{}", summary.report());
            Ok(())
        }
        Command::Merge(m) => {
            let n = moegen::output::merge::merge(&m.input, &m.output, &m.shards)?;
            eprintln!("{n} results merged into {}", m.output.display());
            Ok(())
        }
        Command::Bench(b) => {
            let spec = job_spec(b.model, b.job, b.batching, cli.adapter, cli.device, cli.gpu_compute, KvDtype::F32)?;
            run_bench(&BenchArgs { spec, json: b.json, trace: b.trace })?;
            Ok(())
        }
        Command::Plan(p) => {
            let (plan, any) = run_plan(&job_spec(p.model, p.job, p.batching, cli.adapter, cli.device, cli.gpu_compute, KvDtype::Auto)?)?;
            print!("{plan}");
            if !any {
                anyhow::bail!("no batching policy fits these budgets (see above)");
            }
            Ok(())
        }
    }
}
