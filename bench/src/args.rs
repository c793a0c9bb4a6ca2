//! `tandem bench` flags, named after `vllm bench serve`'s so users need not relearn them.

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// Random text of exact token lengths (`--random-input-len`, `--random-output-len`).
    Random,
    /// Groups of prompts sharing a long system prompt (`--num-prefix-groups`, `--shared-prefix-len`).
    SharedPrefix,
    /// 2k–8k tokens in, 128 out.
    LongPrompt,
    /// 128 in, 1,024 out.
    DecodeHeavy,
    /// Long prompts interleaved with chat turns (`--mixed-long-fraction`, `--mixed-long-len`).
    Mixed,
    /// JSONL from `--dataset-path`: {"prompt": "...", "output_len": N} per line.
    File,
    /// Conversations of `--num-turns` turns whose history grows (a system prompt from `--num-prefix-groups` of `--shared-prefix-len` tokens, then user turns of `--random-input-len` and assistant turns of `--random-output-len`); a conversation's next turn comes `--think-time` seconds (exponential) after the previous one was sent, other conversations in between; `--num-prompts` counts turns.
    MultiTurn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arrival {
    /// Poisson arrivals, or gamma when `--burstiness` is not 1.
    Poisson,
    /// Evenly spaced arrivals.
    Constant,
}

/// One load test (or a sweep of rates) against an endpoint.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RunArgs {
    /// Server root, e.g. http://127.0.0.1:8000.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// /v1/completions or /v1/chat/completions.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model id to request (default: the first of /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, value_enum, default_value = "random")]
    pub dataset_name: DatasetName,
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 200)]
    pub num_prompts: usize,
    #[arg(long, default_value_t = 256)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len·(1−r), len·(1+r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Requests per second: one value, a comma list (a sweep), or `inf` (all at once).
    #[arg(long, default_value = "inf", value_delimiter = ',')]
    pub request_rate: Vec<String>,
    /// Gamma shape of inter-arrival times: 1 is Poisson, below 1 burstier, above 1 smoother.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    #[arg(long, value_enum, default_value = "poisson")]
    pub arrival: Arrival,
    /// At most this many requests in flight (closed loop when the rate is `inf`).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// SLOs in milliseconds, e.g. `--goodput ttft:1000 tpot:100`; a request is good only if all hold.
    #[arg(long, num_args = 1.., value_delimiter = ' ')]
    pub goodput: Vec<String>,
    /// Bisect for the highest rate whose SLO attainment reaches `--slo-target` (needs `--goodput`).
    #[arg(long)]
    pub slo_search: bool,
    #[arg(long, default_value_t = 0.9)]
    pub slo_target: f64,
    /// Bisection steps of `--slo-search`, after bracketing.
    #[arg(long, default_value_t = 5)]
    pub slo_search_steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Requests sent (and not measured) before the run, drawn from the workload's own mix.
    #[arg(long, default_value_t = 0)]
    pub num_warmups: usize,
    /// Where to write results (default: bench-results/<label>).
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    #[arg(long)]
    pub label: Option<String>,
    /// GGUF whose tokenizer sets exact prompt lengths (default: Tandem's default model, fetched if needed).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub num_prefix_groups: usize,
    #[arg(long, default_value_t = 1000)]
    pub shared_prefix_len: usize,
    #[arg(long, default_value_t = 0.25)]
    pub mixed_long_fraction: f64,
    #[arg(long, default_value_t = 2000)]
    pub mixed_long_len: usize,
    /// Tokens of context unique to each conversation, after its shared prefix: a document or
    /// a long first message the conversation goes on about (multi-turn; vLLM's multi-turn
    /// bench calls it the conversation's prefix).
    #[arg(long, default_value_t = 0)]
    pub conversation_prefix_len: usize,
    /// Turns per conversation (multi-turn).
    #[arg(long, default_value_t = 5)]
    pub num_turns: usize,
    /// Mean seconds between a conversation's turns (multi-turn; exponential).
    #[arg(long, default_value_t = 2.0)]
    pub think_time: f64,
    /// Send `ignore_eos` so every request produces its full output length (as vLLM's bench does).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// A JSON Schema file: every request asks for output valid under it
    /// (`response_format: json_schema`), to measure what constrained decoding costs.
    #[arg(long)]
    pub json_schema: Option<PathBuf>,
    /// Seconds before one request is abandoned and counted as an error.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchSub {
    /// Overlay several result directories (e.g. disaggregated vs colocated vs llama-server) and print goodput ratios.
    Compare {
        /// Result directories written by `tandem bench`.
        #[arg(required = true, num_args = 2..)]
        dirs: Vec<PathBuf>,
        /// Where to write the overlay plots (default: the first directory).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 0.9)]
        slo_target: f64,
    },
}

/// `tandem bench [run flags] | tandem bench compare DIR...`
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub sub: Option<BenchSub>,
    #[command(flatten)]
    pub run: RunArgs,
}
