use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moegen::gpu::{describe_adapters, AdapterChoice, GpuContext};

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
    }
}
