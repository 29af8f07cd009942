use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use moegen::gpu::{describe_adapters, AdapterChoice, GpuContext};
use moegen::job::{run_job, JobArgs};
use moegen::planner::{parse_rate, parse_size};
use moegen::sampler::SamplingParams;

#[derive(Parser)]
#[command(name = "moegen", version, about = "High-throughput offline inference of Mixture-of-Experts LLMs on one GPU, any vendor")]
struct Cli {
    /// The GPU to use: an index from `moegen devices`, or part of its name (else WGPU_ADAPTER_NAME,
    /// else the fastest kind present). WGPU_BACKEND limits the backends searched.
    #[arg(long, global = true)]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter with its backend, type, driver, features and limits, and the one
    /// moegen would pick.
    Devices,
    /// Generate completions for a JSONL file of prompts. Without --model, runs the embedded
    /// default model on the sample prompts in assets/ and prints readable completions.
    Generate(GenerateArgs),
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
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
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
    /// Most tokens in one forward pass; longer prompts are fed in chunks.
    #[arg(long, default_value_t = 2048)]
    max_step_tokens: usize,
    /// GPU memory the job may use (e.g. 512MiB, 24GiB): the experts that do not fit live in host
    /// memory and stream to the GPU when tokens are routed to them. Default: everything resident.
    #[arg(long, value_parser = parse_size)]
    gpu_memory: Option<u64>,
    /// Cap the streaming of experts to this rate (e.g. 4MB/s, 2GB/s), to reproduce a slower
    /// host-to-GPU link than the machine has.
    #[arg(long, value_parser = parse_rate)]
    upload_bandwidth: Option<u64>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
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
            let choice = AdapterChoice::from_env(cli.adapter);
            let (report, count) = describe_adapters(choice.backends);
            print!("{report}");
            if count == 0 {
                anyhow::bail!(
                    "no GPU adapter found; install a GPU driver, or Mesa's software Vulkan driver \
                     (Debian/Ubuntu: apt-get install mesa-vulkan-drivers)"
                );
            }
            let ctx = GpuContext::new(&choice)?;
            let f = ctx.features();
            println!(
                "selected: {} ({:?}); kernels use f16: {}, subgroups: {}, timestamps: {}; binding limit {} MiB",
                ctx.info().name,
                ctx.info().backend,
                f.f16,
                f.subgroups,
                f.timestamps,
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
                sampling: SamplingParams { temperature: g.temperature, top_k: g.top_k, top_p: g.top_p, seed: g.seed },
                ignore_eos: g.ignore_eos,
                resume: g.resume,
                max_step_tokens: g.max_step_tokens,
                gpu_memory: g.gpu_memory,
                upload_bandwidth: g.upload_bandwidth,
                adapter: AdapterChoice::from_env(cli.adapter),
                progress: !g.quiet,
            };
            let summary = run_job(&args, demo)?;
            eprintln!("{}", summary.report());
            Ok(())
        }
    }
}
