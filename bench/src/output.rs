//! The result directory: `config.json`, `summary.json`, `sweep.csv`, per-rate
//! `rate-*/requests.jsonl` and `rate-*/summary.json`, and PNG plots.

use crate::RateRun;
use crate::args::RunArgs;
use crate::client::RequestRecord;
use crate::plot::{AttainmentSeries, CdfSeries, attainment_vs_rate, latency_cdfs};
use crate::summary::Slo;
use anyhow::Context;
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn rate_name(rate: Option<f64>) -> String {
    rate.map_or("rate-inf".into(), |r| format!("rate-{r:.3}"))
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

pub fn write_config(
    dir: &Path,
    args: &RunArgs,
    model: &str,
    tokenizer: &Path,
) -> anyhow::Result<()> {
    write_json(
        &dir.join("config.json"),
        &json!({"args": args, "model": model, "tokenizer": tokenizer, "tandem_version": env!("CARGO_PKG_VERSION")}),
    )
}

pub fn write_rate(
    dir: &Path,
    rate: Option<f64>,
    records: &[RequestRecord],
    summary: &Value,
) -> anyhow::Result<PathBuf> {
    let sub = dir.join(rate_name(rate));
    std::fs::create_dir_all(&sub)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(sub.join("requests.jsonl"))?);
    for r in records {
        let mut v = serde_json::to_value(r)?;
        v["success"] = json!(r.success());
        v["ttft_ms"] = json!(r.ttft().map(|x| x * 1e3));
        v["tpot_ms"] = json!(r.tpot().map(|x| x * 1e3));
        v["e2el_ms"] = json!(r.e2el() * 1e3);
        writeln!(f, "{}", serde_json::to_string(&v)?)?;
    }
    f.flush()?;
    write_json(&sub.join("summary.json"), summary)?;
    Ok(sub)
}

const SWEEP_COLUMNS: &[&str] = &[
    "request_rate",
    "achieved_request_rate",
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "p99_itl_ms",
    "mean_e2el_ms",
    "p99_e2el_ms",
    "mean_send_lag_ms",
    "request_goodput",
    "slo_attainment",
    "ttft_attainment",
    "tpot_attainment",
];

/// `summary.json` (one object, or an array for several rates) and `sweep.csv`.
pub fn write_sweep(dir: &Path, runs: &[RateRun]) -> anyhow::Result<()> {
    let all: Vec<&Value> = runs.iter().map(|r| &r.summary).collect();
    if all.len() == 1 {
        write_json(&dir.join("summary.json"), all[0])?;
    } else {
        write_json(&dir.join("summary.json"), &all)?;
    }
    let mut csv = SWEEP_COLUMNS.join(",");
    csv.push('\n');
    for s in all {
        let row: Vec<String> = SWEEP_COLUMNS
            .iter()
            .map(|c| match &s[*c] {
                Value::Null => String::new(),
                Value::String(x) => x.clone(),
                v => v.to_string(),
            })
            .collect();
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    std::fs::write(dir.join("sweep.csv"), csv)?;
    Ok(())
}

pub fn write_plots(
    dir: &Path,
    label: &str,
    runs: &[RateRun],
    slo: &Slo,
    target: f64,
) -> anyhow::Result<()> {
    let cdfs: Vec<CdfSeries> = runs
        .iter()
        .map(|r| {
            let ok = r.records.iter().filter(|x| x.success());
            CdfSeries {
                label: rate_name(r.rate).replace("rate-", "rate "),
                ttft: ok.clone().filter_map(|x| x.ttft()).collect(),
                tpot: ok.clone().filter_map(|x| x.tpot()).collect(),
                e2el: ok.map(|x| x.e2el()).collect(),
            }
        })
        .collect();
    latency_cdfs(
        &dir.join("latency_cdf.png"),
        &format!("{label}: latency CDFs"),
        &cdfs,
    )?;
    let points: Vec<(f64, _)> = runs
        .iter()
        .filter_map(|r| r.rate.map(|x| (x, r.attainment)))
        .collect();
    if slo.is_set() && !points.is_empty() {
        let title = format!(
            "{label}: SLO attainment (TTFT ≤ {} ms, TPOT ≤ {} ms)",
            slo.ttft_ms.map_or("-".into(), |v| v.to_string()),
            slo.tpot_ms.map_or("-".into(), |v| v.to_string())
        );
        attainment_vs_rate(
            &dir.join("attainment_vs_rate.png"),
            &title,
            &[AttainmentSeries {
                label: label.into(),
                points,
            }],
            target,
            false,
        )?;
    }
    Ok(())
}

fn ms(v: &Value, k: &str) -> String {
    v[k].as_f64().map_or("-".into(), |x| format!("{x:.2}"))
}

/// A vLLM-style table on stderr.
pub fn print_summary(s: &Value) {
    let line = "=".repeat(52);
    eprintln!(
        "{line}\n{:^52}\n{line}",
        format!("Serving Benchmark Result (rate {})", s["request_rate"])
    );
    let row = |k: &str, v: String| eprintln!("{k:<40}{v:>12}");
    row("Successful requests:", s["completed"].to_string());
    row("Failed requests:", s["failed"].to_string());
    row("Benchmark duration (s):", ms(s, "duration"));
    row(
        "Achieved request rate (req/s):",
        ms(s, "achieved_request_rate"),
    );
    row("Total input tokens:", s["total_input_tokens"].to_string());
    row(
        "Total generated tokens:",
        s["total_output_tokens"].to_string(),
    );
    if s.get("prefix_hit_rate").is_some() {
        row("Prefix hit rate (cached/input):", ms(s, "prefix_hit_rate"));
        row(
            "Ideal prefix hit rate (unbounded):",
            ms(s, "ideal_prefix_hit_rate"),
        );
    }
    row("Request throughput (req/s):", ms(s, "request_throughput"));
    if s.get("request_goodput").is_some() {
        row("Request goodput (req/s):", ms(s, "request_goodput"));
        row("SLO attainment:", ms(s, "slo_attainment"));
    }
    row(
        "Output token throughput (tok/s):",
        ms(s, "output_throughput"),
    );
    for (name, key) in [
        ("Time to First Token", "ttft"),
        ("Time per Output Token (excl. 1st token)", "tpot"),
        ("Inter-token Latency", "itl"),
        ("End-to-end Latency", "e2el"),
    ] {
        eprintln!("{:-^52}", name);
        for stat in ["mean", "median", "p99"] {
            row(
                &format!(
                    "{} {} (ms):",
                    stat[..1].to_uppercase() + &stat[1..],
                    key.to_uppercase()
                ),
                ms(s, &format!("{stat}_{key}_ms")),
            );
        }
    }
    eprintln!("{line}");
}
