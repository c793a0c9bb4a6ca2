//! The `tandem` binary: parses arguments and calls into the service libraries.

mod args;
mod edge;
mod generate;
mod make_moe;
mod plan;
mod process;
mod roles;
mod status;
mod telemetry;
mod up;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: disaggregated LLM serving, from a laptop CPU up"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole cluster on this machine (a scheduler, prefill and decode worker processes, supervised) and serve the OpenAI API; `--colocated`: one process, one worker.
    Up(args::UpArgs),
    /// Run the scheduler alone: the OpenAI API in front of prefill and decode workers.
    Scheduler(args::SchedulerArgs),
    /// Run a prefill worker: computes prompts' KV caches into decode workers' blocks.
    Prefill(args::PrefillArgs),
    /// Run a decode worker: continuous batching over its KV pool, streaming tokens.
    Decode(args::DecodeArgs),
    /// Run an expert worker: holds some of a mixture-of-experts model's experts and computes them for the prefill and decode workers (expert parallelism).
    Expert(args::ExpertArgs),
    /// Run the pooled KV store: KV blocks by prefix hash in RAM, spilling to disk, for every decode worker of a model.
    KvStore(args::KvStoreArgs),
    /// Load-test any OpenAI-compatible endpoint against latency SLOs (`tandem bench compare DIR...` overlays runs).
    Bench(Box<bench::args::BenchCommand>),
    /// Plan a cluster from the engine's measured costs: `tandem plan profile` measures them; `tandem plan --isl N --osl N --rate R --slo-ttft-ms T --slo-tpot-ms T` lays out the cores to meet the SLO.
    Plan(plan::PlanArgs),
    /// Size a model for a hard memory budget and write an edge bundle (weights packed for mmap, tokenizer, manifest); refuses (exit 2) a budget that cannot hold it.
    ExportEdge(edge::ExportEdgeArgs),
    /// Serve an edge bundle in one process within its memory budget (the OpenAI API, as `tandem up`).
    Edge(edge::EdgeArgs),
    /// Manage model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Kernel-level measurements.
    #[command(subcommand)]
    Kernels(KernelsCommand),
    /// KV cache transport measurements.
    #[command(subcommand)]
    Kv(KvCommand),
}

#[derive(Subcommand)]
enum KernelsCommand {
    /// The machine's int8 peak and read bandwidth, and the W8A8 kernels against them.
    Roofline(bench::measure::roofline::RooflineArgs),
}

#[derive(Subcommand)]
enum KvCommand {
    /// KV transfer throughput per transport (shared memory, TCP) against memcpy and a raw loopback socket.
    Bench(bench::measure::kv::KvBenchArgs),
    /// The pooled store's reads (RAM tier over TCP, disk tier) against a raw loopback socket and a sequential read of the same files.
    StoreBench(bench::measure::store::StoreBenchArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1) into the cache and verify it.
    Fetch {
        /// Cache directory (default: $TANDEM_MODEL_DIR, else $XDG_CACHE_HOME/tandem/models).
        #[arg(long, env = "TANDEM_MODEL_DIR")]
        dir: Option<PathBuf>,
    },
    /// Write an exact F32 copy of a GGUF (every tensor dequantized), e.g. as a reference for llama.cpp.
    ExportF32 { input: PathBuf, output: PathBuf },
    /// Make a mixture-of-experts GGUF from a dense model: random experts with a skewed router, or the dense FFN upcycled into every expert.
    MakeMoe(make_moe::MakeMoeArgs),
    /// Single-stream prefill (pp) and decode (tg) speed of the engine, like llama-bench.
    Bench(bench::measure::engine::BenchArgs),
    /// A device backend (CUDA) against the CPU: logits, golden prompts, batch invariance, speed.
    DeviceCheck(bench::measure::device::DeviceCheckArgs),
    /// A mixture-of-experts model in one process against its experts on `tandem expert` worker processes: decode and prefill speed, where a decode step's time goes, each worker's load.
    EpBench(bench::measure::moe::EpBenchArgs),
    /// One chat prompt through the engine alone, greedy and seeded: JSON lines with the SIMD level, the tokens and a hash of every step's logits (to compare builds and levels bit for bit).
    Generate(generate::GenerateArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Traces from the cluster's processes; `up` passes the flags on to its children.
    let (role, telemetry) = match &cli.command {
        Command::Scheduler(a) => ("scheduler", a.telemetry.clone()),
        Command::Prefill(a) => ("prefill", a.telemetry.clone()),
        Command::Decode(a) => ("decode", a.telemetry.clone()),
        Command::KvStore(a) => ("kv-store", a.telemetry.clone()),
        Command::Expert(a) => ("expert", a.telemetry.clone()),
        Command::Up(a) if a.colocated => ("up", a.telemetry.clone()),
        Command::Up(a) => (
            "up",
            args::TelemetryArgs {
                otlp_endpoint: None,
                ..a.telemetry.clone()
            },
        ),
        _ => ("tandem", args::TelemetryArgs::default()),
    };
    let _telemetry = match telemetry::init(role, &telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tandem: error: starting telemetry: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    process::raise_fd_limit();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line (with its causes), not a backtrace.
            eprintln!("tandem: error: {e:#}");
            if e.downcast_ref::<edge::Refused>().is_some() {
                // A request that cannot be met as asked (not a failure): exit 2, like a usage error.
                return std::process::ExitCode::from(2);
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up::run(args),
        Command::Scheduler(args) => roles::scheduler(args),
        Command::Prefill(args) => roles::prefill(args),
        Command::Decode(args) => roles::decode(args),
        Command::KvStore(args) => roles::kv_store(args),
        Command::Expert(args) => roles::expert(args),
        Command::Plan(args) => plan::run(args),
        Command::ExportEdge(args) => edge::export(&args),
        Command::Edge(args) => edge::serve(args),
        Command::Bench(cmd) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(bench::main(*cmd)),
        Command::Model(ModelCommand::Fetch { dir }) => {
            let dir = dir.unwrap_or_else(engine::fetch::cache_dir);
            let path = engine::fetch::ensure(&engine::fetch::DEFAULT_MODEL, &dir, &|m| {
                eprintln!("tandem: {m}")
            })?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Model(ModelCommand::Bench(args)) => {
            let threads = process::init_compute_threads(args.threads)?;
            bench::measure::engine::run(
                &args,
                threads,
                &process::model_path(args.model.as_deref())?,
            )
        }
        Command::Model(ModelCommand::Generate(args)) => {
            process::init_compute_threads(args.threads)?;
            generate::run(&args, &process::model_path(args.model.as_deref())?)
        }
        Command::Model(ModelCommand::EpBench(args)) => {
            let threads = process::init_compute_threads(None)?;
            bench::measure::moe::run(&args, threads, &std::env::current_exe()?)
        }
        Command::Model(ModelCommand::DeviceCheck(args)) => {
            process::init_compute_threads(None)?;
            bench::measure::device::run(&args)
        }
        Command::Kernels(KernelsCommand::Roofline(args)) => {
            let threads = process::init_compute_threads(args.threads)?;
            let model = process::model_config(args.model.as_deref())?;
            bench::measure::roofline::run(&args, threads, &model)
        }
        Command::Kv(KvCommand::Bench(args)) => {
            let model = process::model_config(args.model.as_deref())?;
            bench::measure::kv::run(&args, &model, &process::pin)
        }
        Command::Kv(KvCommand::StoreBench(args)) => {
            let model = process::model_config(args.model.as_deref())?;
            bench::measure::store::run(&args, &model)
        }
        Command::Model(ModelCommand::MakeMoe(args)) => make_moe::run(&args),
        Command::Model(ModelCommand::ExportF32 { input, output }) => {
            let g = engine::gguf::GgufFile::open(&input)?;
            engine::weights::export_f32(&g, &output)?;
            eprintln!("tandem: wrote {}", output.display());
            Ok(())
        }
    }
}
