//! `tandem bench compare DIR...`: overlays several result directories and prints goodput ratios.

use crate::plot::{AttainmentSeries, CdfSeries, attainment_vs_rate, latency_cdfs};
use crate::summary::Attainment;
use anyhow::{Context, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};

struct Run {
    label: String,
    summaries: Vec<Value>,
    dir: PathBuf,
}

fn read(dir: &Path) -> anyhow::Result<Run> {
    let p = dir.join("summary.json");
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
    )?;
    let summaries = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    let label = summaries
        .first()
        .and_then(|s| s["label"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| dir.display().to_string());
    Ok(Run {
        label,
        summaries,
        dir: dir.to_path_buf(),
    })
}

fn points(r: &Run) -> Vec<(f64, Attainment)> {
    let mut p: Vec<(f64, Attainment)> = r
        .summaries
        .iter()
        .filter_map(|s| {
            Some((
                s["request_rate"].as_f64()?,
                Attainment {
                    all: s["slo_attainment"].as_f64()?,
                    ttft: s["ttft_attainment"].as_f64()?,
                    tpot: s["tpot_attainment"].as_f64()?,
                },
            ))
        })
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    p
}

/// The highest measured rate whose attainment meets `target` (0 if none).
pub fn max_rate_meeting(points: &[(f64, Attainment)], target: f64) -> f64 {
    points
        .iter()
        .filter(|(_, a)| a.all >= target)
        .map(|(r, _)| *r)
        .fold(0.0, f64::max)
}

pub fn run(dirs: &[PathBuf], out: Option<&Path>, target: f64) -> anyhow::Result<()> {
    let runs: Vec<Run> = dirs
        .iter()
        .map(|d| read(d))
        .collect::<anyhow::Result<_>>()?;
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| runs[0].dir.clone());
    std::fs::create_dir_all(&out)?;
    let series: Vec<AttainmentSeries> = runs
        .iter()
        .map(|r| AttainmentSeries {
            label: r.label.clone(),
            points: points(r),
        })
        .collect();
    let base = max_rate_meeting(&series[0].points, target);
    println!(
        "| run | highest rate with ≥{:.0}% SLO attainment (req/s) | max goodput (req/s) | ratio vs {} |",
        target * 100.0,
        runs[0].label
    );
    for (r, s) in runs.iter().zip(&series) {
        let best = max_rate_meeting(&s.points, target);
        let goodput = r
            .summaries
            .iter()
            .filter_map(|x| x["request_goodput"].as_f64())
            .fold(0.0, f64::max);
        let ratio = if base > 0.0 {
            format!("{:.2}x", best / base)
        } else {
            "n/a".into()
        };
        println!("| {} | {best:.3} | {goodput:.3} | {ratio} |", r.label);
    }
    if series.iter().all(|s| s.points.is_empty()) {
        bail!("no run has finite rates with --goodput results to overlay");
    }
    let mut notes = Vec::new();
    if let Err(e) = attainment_vs_rate(
        &out.join("compare_attainment.png"),
        "SLO attainment (both SLOs)",
        &series,
        target,
        true,
    ) {
        notes.push(format!("{e:#}"));
    }
    // CDFs of each run's highest rate.
    let cdfs: Vec<CdfSeries> = runs
        .iter()
        .filter_map(|r| {
            let top = r
                .summaries
                .iter()
                .filter_map(|s| s["request_rate"].as_f64())
                .fold(f64::NAN, f64::max);
            let sub = r
                .dir
                .join(crate::output::rate_name(top.is_finite().then_some(top)));
            let text = std::fs::read_to_string(sub.join("requests.jsonl")).ok()?;
            let recs: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|v: &Value| v["success"] == true)
                .collect();
            let col = |k: &str| {
                recs.iter()
                    .filter_map(|v| v[k].as_f64().map(|x| x / 1e3))
                    .collect()
            };
            Some(CdfSeries {
                label: format!("{} @ {top:.2} req/s", r.label),
                ttft: col("ttft_ms"),
                tpot: col("tpot_ms"),
                e2el: col("e2el_ms"),
            })
        })
        .collect();
    if !cdfs.is_empty()
        && let Err(e) = latency_cdfs(
            &out.join("compare_latency_cdf.png"),
            "Latency CDFs at each run's highest rate",
            &cdfs,
        )
    {
        notes.push(format!("{e:#}"));
    }
    for n in notes {
        eprintln!("tandem bench compare: plot skipped: {n}");
    }
    eprintln!("tandem bench compare: plots in {}", out.display());
    Ok(())
}
