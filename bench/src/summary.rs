//! Metrics with vLLM's definitions (see bench/README.md), goodput and SLO attainment.

use crate::client::RequestRecord;
use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

/// Percentiles reported for every latency metric.
pub const PERCENTILES: &[f64] = &[50.0, 90.0, 95.0, 99.0, 99.9];

/// Latency SLOs in milliseconds; a request is good only if every one that is set holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2el_ms: Option<f64>,
}

impl Slo {
    /// Parses `["ttft:1000", "tpot:100"]`.
    pub fn parse(items: &[String]) -> anyhow::Result<Slo> {
        let mut s = Slo::default();
        for item in items.iter().flat_map(|i| i.split_whitespace()) {
            let (k, v) = item
                .split_once(':')
                .with_context(|| format!("--goodput takes NAME:MS, got '{item}'"))?;
            let ms: f64 = v
                .parse()
                .with_context(|| format!("--goodput {k}: '{v}' is not a number"))?;
            if !ms.is_finite() || ms <= 0.0 {
                bail!("--goodput {k} must be positive");
            }
            match k {
                "ttft" => s.ttft_ms = Some(ms),
                "tpot" => s.tpot_ms = Some(ms),
                "e2el" => s.e2el_ms = Some(ms),
                other => bail!("--goodput knows ttft, tpot and e2el, not '{other}'"),
            }
        }
        Ok(s)
    }

    pub fn is_set(&self) -> bool {
        self.ttft_ms.is_some() || self.tpot_ms.is_some() || self.e2el_ms.is_some()
    }

    fn ttft_ok(&self, r: &RequestRecord) -> bool {
        self.ttft_ms
            .is_none_or(|t| r.ttft().is_some_and(|x| x * 1e3 <= t))
    }
    fn tpot_ok(&self, r: &RequestRecord) -> bool {
        // One output token has no TPOT: nothing to violate (vLLM counts it as 0).
        self.tpot_ms
            .is_none_or(|t| r.tpot().is_none_or(|x| x * 1e3 <= t))
    }
    fn e2el_ok(&self, r: &RequestRecord) -> bool {
        self.e2el_ms.is_none_or(|t| r.e2el() * 1e3 <= t)
    }

    /// Failures are misses.
    pub fn good(&self, r: &RequestRecord) -> bool {
        r.success() && self.ttft_ok(r) && self.tpot_ok(r) && self.e2el_ok(r)
    }
}

/// Fractions of all requests (failures included) meeting the SLOs.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Attainment {
    pub all: f64,
    pub ttft: f64,
    pub tpot: f64,
}

pub fn attainment(slo: &Slo, records: &[RequestRecord]) -> Attainment {
    let n = records.len().max(1) as f64;
    let frac = |f: &dyn Fn(&RequestRecord) -> bool| {
        records.iter().filter(|r| r.success() && f(r)).count() as f64 / n
    };
    Attainment {
        all: frac(&|r| slo.good(r)),
        ttft: frac(&|r| slo.ttft_ok(r)),
        tpot: frac(&|r| slo.tpot_ok(r)),
    }
}

/// numpy's default (linear) percentile of sorted data.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

fn stats(out: &mut Map<String, Value>, name: &str, mut xs_s: Vec<f64>) {
    let xs: Vec<f64> = {
        xs_s.iter_mut().for_each(|x| *x *= 1e3);
        xs_s.sort_by(f64::total_cmp);
        xs_s
    };
    let n = xs.len().max(1) as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    out.insert(format!("mean_{name}_ms"), json!(mean));
    out.insert(format!("median_{name}_ms"), json!(percentile(&xs, 50.0)));
    out.insert(format!("std_{name}_ms"), json!(std));
    for &p in PERCENTILES {
        let word = if p.fract() == 0.0 {
            format!("{}", p as u64)
        } else {
            format!("{p}")
        };
        out.insert(format!("p{word}_{name}_ms"), json!(percentile(&xs, p)));
    }
}

/// Describes how load was offered, for the summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadInfo {
    /// Offered requests per second (`None`: all at once).
    pub request_rate: Option<f64>,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
}

/// Adds the prefix hit rate (cached of input tokens, as the server reported) and the ideal one
/// (`ideal_cached` tokens: an unbounded cache on the same trace).
pub fn add_prefix_reuse(summary: &mut Value, ideal_cached: usize) {
    let input = summary["total_input_tokens"]
        .as_f64()
        .unwrap_or(0.0)
        .max(1.0);
    let cached = summary["total_cached_tokens"].as_f64().unwrap_or(0.0);
    if let Some(m) = summary.as_object_mut() {
        m.insert("ideal_cached_tokens".into(), json!(ideal_cached));
        m.insert("prefix_hit_rate".into(), json!(cached / input));
        m.insert(
            "ideal_prefix_hit_rate".into(),
            json!(ideal_cached as f64 / input),
        );
    }
}

/// `summary.json`: vLLM's field names plus attainment, achieved rate and send lag.
pub fn summarize(
    label: &str,
    load: &LoadInfo,
    slo: &Slo,
    records: &[RequestRecord],
    duration_s: f64,
) -> Value {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.success()).collect();
    let input: usize = ok
        .iter()
        .map(|r| r.prompt_tokens.unwrap_or(r.client_input_len))
        .sum();
    let output: usize = ok.iter().map(|r| r.output_tokens()).sum();
    let cached: usize = ok.iter().filter_map(|r| r.cached_tokens).sum();
    let duration = duration_s.max(1e-9);
    let mut m = Map::new();
    m.insert("label".into(), json!(label));
    m.insert(
        "request_rate".into(),
        json!(
            load.request_rate
                .map_or(Value::String("inf".into()), |r| json!(r))
        ),
    );
    m.insert("burstiness".into(), json!(load.burstiness));
    m.insert("max_concurrency".into(), json!(load.max_concurrency));
    m.insert("num_prompts".into(), json!(records.len()));
    m.insert("duration".into(), json!(duration_s));
    m.insert("completed".into(), json!(ok.len()));
    m.insert("failed".into(), json!(records.len() - ok.len()));
    m.insert(
        "retried".into(),
        json!(records.iter().filter(|r| r.retried).count()),
    );
    m.insert("total_input_tokens".into(), json!(input));
    m.insert("total_output_tokens".into(), json!(output));
    m.insert("total_cached_tokens".into(), json!(cached));
    m.insert(
        "request_throughput".into(),
        json!(ok.len() as f64 / duration),
    );
    m.insert("output_throughput".into(), json!(output as f64 / duration));
    m.insert(
        "total_token_throughput".into(),
        json!((input + output) as f64 / duration),
    );
    let sends: Vec<f64> = records.iter().map(|r| r.sent_s).collect();
    let (first, last) = sends
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &s| {
            (a.min(s), b.max(s))
        });
    let achieved = if records.len() > 1 && last > first {
        (records.len() - 1) as f64 / (last - first)
    } else {
        0.0
    };
    m.insert("achieved_request_rate".into(), json!(achieved));
    stats(
        &mut m,
        "send_lag",
        records
            .iter()
            .map(|r| (r.sent_s - r.scheduled_s).max(0.0))
            .collect(),
    );
    stats(&mut m, "ttft", ok.iter().filter_map(|r| r.ttft()).collect());
    stats(&mut m, "tpot", ok.iter().filter_map(|r| r.tpot()).collect());
    stats(
        &mut m,
        "itl",
        ok.iter().flat_map(|r| r.itl_chunks()).collect(),
    );
    stats(
        &mut m,
        "itl_per_token",
        ok.iter().flat_map(|r| r.itl_tokens()).collect(),
    );
    stats(&mut m, "e2el", ok.iter().map(|r| r.e2el()).collect());
    if slo.is_set() {
        let good = records.iter().filter(|r| slo.good(r)).count();
        let a = attainment(slo, records);
        m.insert("goodput_slos".into(), json!(slo));
        m.insert("request_goodput".into(), json!(good as f64 / duration));
        m.insert("slo_attainment".into(), json!(a.all));
        m.insert("ttft_attainment".into(), json!(a.ttft));
        m.insert("tpot_attainment".into(), json!(a.tpot));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sent: f64, chunks: &[f64], tokens: usize, err: bool) -> RequestRecord {
        RequestRecord {
            sent_s: sent,
            scheduled_s: sent,
            chunks: chunks.iter().map(|&t| (t, 1)).collect(),
            end_s: *chunks.last().unwrap_or(&sent),
            completion_tokens: Some(tokens),
            error: err.then(|| "boom".into()),
            ..Default::default()
        }
    }

    #[test]
    fn vllm_definitions_and_goodput() {
        // TTFT 0.1 s, then 4 more tokens 0.05 s apart: TPOT 0.05, E2EL 0.3.
        let a = rec(1.0, &[1.1, 1.15, 1.2, 1.25, 1.3], 5, false);
        // TTFT 0.5 s: misses a 200 ms TTFT SLO.
        let b = rec(2.0, &[2.5, 2.6], 2, false);
        let c = rec(3.0, &[], 0, true);
        assert!((a.ttft().unwrap() - 0.1).abs() < 1e-9);
        assert!((a.tpot().unwrap() - 0.05).abs() < 1e-9);
        assert!((a.e2el() - 0.3).abs() < 1e-9);
        let slo = Slo::parse(&["ttft:200 tpot:60".into()]).unwrap();
        assert!(slo.good(&a) && !slo.good(&b) && !slo.good(&c));
        let att = attainment(&slo, &[a.clone(), b.clone(), c.clone()]);
        assert!((att.all - 1.0 / 3.0).abs() < 1e-9);
        // b misses its TPOT (100 ms) and its TTFT (500 ms); c failed.
        assert!((att.tpot - 1.0 / 3.0).abs() < 1e-9);
        assert!((att.ttft - 1.0 / 3.0).abs() < 1e-9);
        let s = summarize(
            "t",
            &LoadInfo {
                request_rate: Some(1.0),
                burstiness: 1.0,
                max_concurrency: None,
            },
            &slo,
            &[a, b, c],
            4.0,
        );
        assert_eq!(s["completed"], 2);
        assert_eq!(s["failed"], 1);
        assert!((s["request_goodput"].as_f64().unwrap() - 0.25).abs() < 1e-9);
        assert!((s["mean_ttft_ms"].as_f64().unwrap() - 300.0).abs() < 1e-6);
        assert!((s["median_e2el_ms"].as_f64().unwrap() - 450.0).abs() < 1e-6);
        assert!(s.get("p99.9_ttft_ms").is_some() && s.get("p99_tpot_ms").is_some());
        assert_eq!(s["total_output_tokens"], 7);
    }

    #[test]
    fn percentile_is_numpys_linear() {
        let xs = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&xs, 50.0), 2.5);
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&xs, 100.0), 4.0);
        assert!((percentile(&xs, 90.0) - 3.7).abs() < 1e-12);
    }

    #[test]
    fn slo_parsing_rejects_nonsense() {
        assert!(Slo::parse(&["ttft".into()]).is_err());
        assert!(Slo::parse(&["ttft:-1".into()]).is_err());
        assert!(Slo::parse(&["latency:5".into()]).is_err());
        assert_eq!(Slo::parse(&["e2el:5".into()]).unwrap().e2el_ms, Some(5.0));
    }
}
