//! `tandem bench`: load tests for any OpenAI-compatible endpoint (Tandem, llama.cpp's
//! `llama-server`, vLLM), measured with vLLM's metric definitions, judged against latency SLOs.
//!
//! # Layout
//! - [`args`]: flags, named as `vllm bench serve` names them.
//! - [`dataset`]: workloads with exact token lengths.
//! - [`client`]: one streamed request, timed chunk by chunk.
//! - [`load`]: arrival schedules, concurrency caps, warm-up.
//! - [`summary`]: TTFT, TPOT, ITL, E2EL, throughput, goodput, attainment.
//! - [`output`]: the result directory; [`plot`]: PNGs; [`compare`]: overlays of several runs.
//! - [`measure`]: Tandem's own parts measured (engine, kernels' roofline, KV transports).

pub mod args;
pub mod client;
pub mod compare;
pub mod dataset;
pub mod load;
pub mod measure;
pub mod output;
pub mod plot;
pub mod summary;

use anyhow::{Context, bail};
use args::{BenchCommand, BenchSub, RunArgs};
use client::{RequestRecord, Target};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use summary::{Attainment, LoadInfo, Slo};

/// One measured rate.
pub struct RateRun {
    pub rate: Option<f64>,
    pub records: Vec<RequestRecord>,
    pub duration: f64,
    pub summary: Value,
    pub attainment: Attainment,
}

/// Entry point of `tandem bench`.
pub async fn main(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd.sub {
        Some(BenchSub::Compare {
            dirs,
            out,
            slo_target,
        }) => compare::run(&dirs, out.as_deref(), slo_target),
        None => run(cmd.run).await.map(|_| ()),
    }
}

fn parse_rates(items: &[String]) -> anyhow::Result<Vec<Option<f64>>> {
    items
        .iter()
        .map(|s| match s.trim() {
            "inf" | "" => Ok(None),
            x => {
                let r: f64 = x
                    .parse()
                    .with_context(|| format!("--request-rate: '{x}' is not a number"))?;
                if !r.is_finite() || r <= 0.0 {
                    bail!("--request-rate must be positive");
                }
                Ok(Some(r))
            }
        })
        .collect()
}

fn load_tokenizer(args: &RunArgs) -> anyhow::Result<(frontend::Tokenizer, std::path::PathBuf)> {
    let path = match &args.tokenizer {
        Some(p) => p.clone(),
        None => frontend::fetch::ensure(
            &frontend::fetch::DEFAULT_MODEL,
            &frontend::fetch::cache_dir(),
            &|m| eprintln!("tandem bench: {m}"),
        )
        .context("fetching the default model for its tokenizer (or pass --tokenizer GGUF)")?,
    };
    let g = frontend::gguf::GgufFile::open(&path)?;
    Ok((frontend::Tokenizer::from_metadata(&g)?, path))
}

/// Runs the benchmark the flags describe; writes the result directory; returns every rate run.
pub async fn run(args: RunArgs) -> anyhow::Result<Vec<RateRun>> {
    let slo = Slo::parse(&args.goodput)?;
    if args.slo_search && !slo.is_set() {
        bail!("--slo-search needs --goodput");
    }
    let rates = parse_rates(&args.request_rate)?;
    let (tok, tok_path) = load_tokenizer(&args)?;
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("{:?}", args.dataset_name).to_lowercase());
    let dir = args
        .result_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("bench-results").join(&label));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let http = reqwest::Client::new();
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client::first_model(&http, &args.base_url)
            .await
            .context("asking the server for its model (or pass --model)")?,
    };
    let mut target = Target::new(
        &args.base_url,
        &args.endpoint,
        model.clone(),
        args.ignore_eos,
        Duration::from_secs_f64(args.request_timeout),
    );
    if let Some(path) = &args.json_schema {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        target.response_format = Some(serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": "bench", "schema": schema},
        }));
    }
    let target = Arc::new(target);
    let mut rng = StdRng::seed_from_u64(args.seed);
    let src = dataset::TextSource::new(Arc::new(tok), &mut rng)?;
    let tok = src.tokenizer().clone();
    output::write_config(&dir, &args, &model, &tok_path)?;

    if args.num_warmups > 0 {
        let warm = Arc::new(dataset::build(
            &args,
            &src,
            args.num_warmups,
            args.seed ^ 0x5eed,
            args.seed ^ 0x5eed,
        )?);
        let failed = load::warm_up(
            target.clone(),
            warm,
            tok.clone(),
            args.max_concurrency.unwrap_or(4).min(args.num_warmups),
        )
        .await;
        if !args.quiet {
            eprintln!(
                "tandem bench: {} warm-up requests sent ({failed} failed)",
                args.num_warmups
            );
        }
    }

    let mut runs: Vec<RateRun> = Vec::new();
    // Each measured rate gets the same mix of lengths but its own prompt text (seed + run index):
    // a server's prefix cache must not turn one rate's prompts into the next rate's cache hits.
    let mut run_index = 0u64;
    let mut measure = async |rate: Option<f64>| -> anyhow::Result<Attainment> {
        let specs = Arc::new(dataset::build(
            &args,
            &src,
            args.num_prompts,
            args.seed,
            args.seed.wrapping_add(run_index),
        )?);
        run_index += 1;
        let load = load::Load {
            rate,
            burstiness: args.burstiness,
            arrival: args.arrival,
            max_concurrency: args.max_concurrency,
            seed: args.seed,
            think_time: args.think_time,
        };
        let bar = (!args.quiet).then(|| {
            let b = ProgressBar::new(specs.len() as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} requests",
                )
                .expect("template"),
            );
            b.set_prefix(format!(
                "rate {}",
                rate.map_or("inf".into(), |r| format!("{r:.3}"))
            ));
            b
        });
        let (records, duration) = load::run(
            target.clone(),
            specs.clone(),
            tok.clone(),
            load,
            bar.clone(),
        )
        .await;
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let info = LoadInfo {
            request_rate: rate,
            burstiness: args.burstiness,
            max_concurrency: args.max_concurrency,
        };
        let mut summary = summary::summarize(&label, &info, &slo, &records, duration);
        // Prefix reuse against an unbounded cache on the same trace (requests as sent).
        let mut order: Vec<usize> = (0..records.len())
            .filter(|&i| records[i].success())
            .collect();
        order.sort_by(|&a, &b| records[a].sent_s.total_cmp(&records[b].sent_s));
        let ideal = dataset::ideal_cached_tokens(&specs, &order, &tok)?;
        summary::add_prefix_reuse(&mut summary, ideal);
        let attainment = summary::attainment(&slo, &records);
        if !args.quiet {
            output::print_summary(&summary);
        }
        output::write_rate(&dir, rate, &records, &summary)?;
        runs.push(RateRun {
            rate,
            records,
            duration,
            summary,
            attainment,
        });
        Ok(attainment)
    };

    if args.slo_search {
        // Bracket: double from the first rate until attainment drops below target, then bisect.
        let mut lo = 0.0f64;
        let mut hi = rates.iter().flatten().next().copied().unwrap_or(1.0);
        let mut bracketed = false;
        for _ in 0..10 {
            if measure(Some(hi)).await?.all >= args.slo_target {
                lo = hi;
                hi *= 2.0;
            } else {
                bracketed = true;
                break;
            }
        }
        if bracketed {
            for _ in 0..args.slo_search_steps {
                let mid = if lo == 0.0 { hi / 2.0 } else { (lo + hi) / 2.0 };
                if measure(Some(mid)).await?.all >= args.slo_target {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
        }
        eprintln!(
            "tandem bench: highest rate meeting {:.0}% SLO attainment: {}",
            args.slo_target * 100.0,
            if lo > 0.0 {
                format!("{lo:.3} req/s")
            } else {
                format!("none (below {hi:.3} req/s)")
            }
        );
    } else {
        for &rate in &rates {
            measure(rate).await?;
        }
    }
    runs.sort_by(|a, b| {
        a.rate
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.rate.unwrap_or(f64::INFINITY))
    });
    output::write_sweep(&dir, &runs)?;
    if let Err(e) = output::write_plots(&dir, &label, &runs, &slo, args.slo_target) {
        eprintln!("tandem bench: plots skipped: {e:#}");
    }
    if !args.quiet {
        eprintln!("tandem bench: results in {}", dir.display());
    }
    Ok(runs)
}
