//! `tandem plan`: the engine's measured costs on this machine (`tandem plan profile`) and, for
//! a workload and an SLO, the cluster that meets it at least cost (`scheduler::plan::capacity`).
//!
//! # Layout
//! - this file: the commands, where profiles are cached, and running the measuring children;
//! - [`profile`]: the measurements themselves;
//! - [`kustomize`]: the overlay `--pods --emit-kustomize` writes.

pub mod kustomize;
pub mod profile;

use crate::args::ModelArgs;
use crate::process::cores;
use anyhow::Context;
use clap::{Args, Subcommand};
use scheduler::plan::cost::{COST_MODEL_VERSION, CostModel, ForwardCost};
use scheduler::plan::workload::Prompts;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlanArgs {
    #[command(subcommand)]
    pub command: Option<PlanCommand>,
    #[command(flatten)]
    pub plan: PlanFlags,
}

/// The workload and SLO to plan for.
#[derive(Args, Debug, Clone)]
pub struct PlanFlags {
    /// The cost profile (default: this machine's cached one, from `tandem plan profile`).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// The model the cached profile is of (default: the default model).
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Prompt tokens: N, a range LO-HI, or a weighted mix (`900-1100:0.25,32-256:0.75`, bench's mixed dataset).
    #[arg(long, required_unless_present_any = ["from_bench", "trace"])]
    pub isl: Option<Prompts>,
    /// Mean output tokens.
    #[arg(long, required_unless_present_any = ["from_bench", "trace"])]
    pub osl: Option<usize>,
    /// Requests per second (Poisson arrivals).
    #[arg(long, required_unless_present_any = ["from_bench", "trace"])]
    pub rate: Option<f64>,
    /// Replay the very requests of a `tandem bench` run (its `requests.jsonl`: each request's
    /// arrival, prompt and output tokens) instead of a workload's Poisson arrivals: what the
    /// cost model predicts for the run measured, apart from the sampling of a short run.
    #[arg(long, conflicts_with_all = ["isl", "osl", "rate", "from_bench", "pods"])]
    pub trace: Option<PathBuf>,
    /// The workload of a `tandem bench` run (its summary.json: mean prompt and output tokens, achieved rate); the flags above override it.
    #[arg(long)]
    pub from_bench: Option<PathBuf>,
    /// Time to first token bound, ms.
    #[arg(long, default_value_t = 1000.0)]
    pub slo_ttft_ms: f64,
    /// Time per output token bound, ms.
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_ms: f64,
    /// Cores to lay out (default: this machine's).
    #[arg(long)]
    pub cores: Option<usize>,
    /// Plan worker pods on a cluster's nodes (KV over TCP) instead of this machine's cores: how many prefill and decode pods of --pod-cores each.
    #[arg(long)]
    pub pods: bool,
    /// Cores per worker pod (default: the most threads the profile measured; profile a node of the pool's type).
    #[arg(long, requires = "pods")]
    pub pod_cores: Option<usize>,
    /// Worker pods at most.
    #[arg(long, default_value_t = 8, requires = "pods")]
    pub max_pods: usize,
    /// Write a kustomize overlay for the chosen pods into this directory: the pool sizes, each pod's cores and threads, the SLO, and the cost profile as a ConfigMap the scheduler places prompts with.
    #[arg(long, requires = "pods", value_name = "DIR")]
    pub emit_kustomize: Option<PathBuf>,
    /// The kustomization the overlay builds on.
    #[arg(
        long,
        default_value = "deploy/kubernetes/base",
        requires = "emit_kustomize"
    )]
    pub kustomize_base: PathBuf,
    /// Print only the chosen layout's `tandem up` flags.
    #[arg(long, conflicts_with = "pods")]
    pub emit: bool,
    /// Print the layouts as JSON (one array, best first).
    #[arg(long, conflicts_with = "emit")]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum PlanCommand {
    /// Measure the engine's costs on this machine (prefill passes, decode steps, colocated steps, the loopback link) and save the fitted cost model; a minute or two.
    Profile(ProfileArgs),
    /// One thread count's measurements as JSON (what `profile` runs in a child per thread count).
    #[command(hide = true)]
    Measure {
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ProfileArgs {
    /// Where to write the profile (default: this machine's cache, where `tandem up` looks).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Thread counts to measure (default: 1 and every core).
    #[arg(long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Fewer and shorter measurements (what `tandem up` runs when no profile is cached).
    #[arg(long)]
    pub quick: bool,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    match args.command {
        Some(PlanCommand::Profile(p)) => {
            let path = crate::process::model_path(p.model.model.as_deref())?;
            let out = match &p.out {
                Some(o) => o.clone(),
                None => cached_profile_path(&path, &p.model)?,
            };
            let m = profile(&path, &p, &|line| eprintln!("tandem: {line}"))?;
            save(&m, &out)?;
            report(&m);
            println!("{}", out.display());
            Ok(())
        }
        Some(PlanCommand::Measure {
            threads,
            quick,
            model,
        }) => {
            // On that many cores, as a worker given them would be.
            crate::process::pin(&(0..threads).collect::<Vec<_>>())?;
            let n = crate::process::init_compute_threads(Some(threads))?;
            let path = crate::process::model_path(model.model.as_deref())?;
            let m = profile::measure(&path, &model, n, quick)?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        None => plan(&args.plan),
    }
}

/// Prints the layouts for the workload, best first (or, with `--emit`, the best one's flags).
fn plan(a: &PlanFlags) -> anyhow::Result<()> {
    use scheduler::plan::capacity::{candidates, pod_candidates};
    use scheduler::plan::placement::Slo;
    use scheduler::plan::workload::Workload;
    let profile = match &a.profile {
        Some(p) => p.clone(),
        None => {
            let model = crate::process::model_path(a.model.as_deref())?;
            cached_profile_path(&model, &ModelArgs::default_for(model.clone()))?
        }
    };
    let cost = CostModel::load(&profile).map_err(|e| {
        anyhow::anyhow!("{e}; `tandem plan profile` measures this machine's (a minute or two)")
    })?;
    let slo = Slo {
        ttft_s: a.slo_ttft_ms / 1e3,
        tpot_s: a.slo_tpot_ms / 1e3,
    };
    if let Some(path) = &a.trace {
        let trace = read_trace(path)?;
        let horizon = (trace.iter().map(|r| r.osl).sum::<usize>() as f64 / trace.len() as f64)
            .round() as usize;
        let cores = a.cores.unwrap_or(cost.cores);
        let c = scheduler::plan::capacity::candidates_on(
            &cost,
            &trace,
            horizon,
            slo,
            cores,
            scheduler::plan::PACE,
        );
        let span = trace.last().map_or(0.0, |r| r.at).max(1e-9);
        let header = format!(
            "trace: the {} requests of {} (mean prompt {:.0} tokens, mean output {horizon}, {:.2} req/s); SLO: TTFT <= {} ms, TPOT <= {} ms; {cores} cores; profile {}",
            trace.len(),
            path.display(),
            trace.iter().map(|r| r.prompt).sum::<usize>() as f64 / trace.len() as f64,
            (trace.len() - 1) as f64 / span,
            a.slo_ttft_ms,
            a.slo_tpot_ms,
            profile.display(),
        );
        return print_layouts(a, &c, slo, &header);
    }
    let from = match &a.from_bench {
        Some(p) => Some(bench_workload(p)?),
        None => None,
    };
    let pick = |x: Option<f64>, i: usize, name: &str| {
        x.or(from.map(|f: [f64; 3]| f[i]))
            .with_context(|| format!("--{name} is needed"))
    };
    let prompts = match &a.isl {
        Some(p) => p.clone(),
        None => Prompts::fixed(pick(None, 0, "isl")?.round().max(1.0) as usize),
    };
    let w = Workload {
        prompts,
        osl: pick(a.osl.map(|v| v as f64), 1, "osl")?.round().max(1.0) as usize,
        rate: pick(a.rate, 2, "rate")?,
    };
    anyhow::ensure!(
        w.rate > 0.0 && w.rate.is_finite(),
        "--rate must be a positive number of requests per second"
    );
    let cores = a.cores.unwrap_or(cost.cores);
    let c = if a.pods {
        let threads = a
            .pod_cores
            .unwrap_or_else(|| cost.forward.iter().map(|f| f.threads).max().unwrap_or(1));
        anyhow::ensure!(
            threads >= 1 && a.max_pods >= 1,
            "--pod-cores and --max-pods must be at least 1"
        );
        pod_candidates(&cost, &w, slo, threads, a.max_pods)
    } else {
        candidates(&cost, &w, slo, cores, scheduler::plan::PACE)
    };
    if let Some(dir) = &a.emit_kustomize {
        let file = kustomize::write(dir, &a.kustomize_base, &profile, &c[0], &w, slo)?;
        eprintln!("tandem: wrote {} ({})", file.display(), c[0].layout);
        if !c[0].prediction.meets {
            eprintln!(
                "tandem: no split of {} pods meets the SLO at this rate: this one comes closest",
                a.max_pods
            );
        }
        return Ok(());
    }
    let room = if a.pods {
        format!("up to {} worker pods", a.max_pods)
    } else {
        format!("{cores} cores")
    };
    let header = format!(
        "workload: {} prompt tokens (mean {:.0}), {} output tokens, {} req/s; SLO: TTFT <= {} ms, TPOT <= {} ms; {room}; profile {}; {} requests replayed per layout",
        w.prompts,
        w.prompts.mean(),
        w.osl,
        w.rate,
        a.slo_ttft_ms,
        a.slo_tpot_ms,
        profile.display(),
        scheduler::plan::capacity::REQUESTS
    );
    print_layouts(a, &c, slo, &header)
}

/// The ranked layouts: as JSON (`--json`), or a header line and a table.
fn print_layouts(
    a: &PlanFlags,
    c: &[scheduler::plan::capacity::Candidate],
    slo: scheduler::plan::placement::Slo,
    header: &str,
) -> anyhow::Result<()> {
    if a.emit {
        println!("{}", c[0].layout.up_flags(slo).join(" "));
        return Ok(());
    }
    if a.json {
        let rows: Vec<serde_json::Value> = c
            .iter()
            .map(|x| {
                let p = x.prediction;
                let finite = |v: f64| v.is_finite().then_some(v);
                serde_json::json!({
                    "layout": x.layout.to_string(),
                    "cores": x.layout.cores(),
                    "flags": x.layout.up_flags(slo),
                    "ttft_ms": finite(p.ttft_s * 1e3),
                    "ttft_p90_ms": finite(p.ttft_p90_s * 1e3),
                    "tpot_ms": finite(p.tpot_s * 1e3),
                    "tpot_p90_ms": finite(p.tpot_p90_s * 1e3),
                    "attainment": p.attainment,
                    "prefill_load": finite(p.prefill_load),
                    "decode_batch": finite(p.batch),
                    "meets": p.meets,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{header}");
    println!(
        "| layout | cores | TTFT ms (median) | TTFT ms (p90) | TPOT ms (median) | TPOT ms (p90) | attainment | prefill load | decode batch | meets SLO | tandem up flags |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for x in c {
        let p = x.prediction;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} | {} | `{}` |",
            x.layout,
            x.layout.cores(),
            p.ttft_s * 1e3,
            p.ttft_p90_s * 1e3,
            p.tpot_s * 1e3,
            p.tpot_p90_s * 1e3,
            p.attainment,
            p.prefill_load,
            p.batch,
            if p.meets { "yes" } else { "no" },
            x.layout.up_flags(slo).join(" ")
        );
    }
    if !c[0].prediction.meets {
        println!("no layout meets the SLO at this rate: the first row comes closest");
    }
    Ok(())
}

/// The requests of a `tandem bench` run's `requests.jsonl`, in arrival order: when each was
/// scheduled, its prompt tokens (the server's count, else the client's) and the tokens it got
/// (else the tokens it asked for).
fn read_trace(path: &Path) -> anyhow::Result<Vec<scheduler::plan::simulate::Arrival>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut trace = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        let num = |keys: &[&str]| keys.iter().find_map(|k| v[*k].as_f64());
        let field = |keys: &[&str]| {
            num(keys).with_context(|| {
                format!(
                    "{} line {}: no {}",
                    path.display(),
                    i + 1,
                    keys.join(" or ")
                )
            })
        };
        trace.push(scheduler::plan::simulate::Arrival {
            at: field(&["scheduled_s"])?,
            prompt: field(&["prompt_tokens", "client_input_len"])?.max(1.0) as usize,
            osl: field(&["completion_tokens", "requested_output_len"])?.max(1.0) as usize,
        });
    }
    anyhow::ensure!(!trace.is_empty(), "{} holds no requests", path.display());
    trace.sort_by(|a, b| a.at.total_cmp(&b.at));
    Ok(trace)
}

/// Mean prompt tokens, mean output tokens and achieved rate of a `tandem bench` summary.
fn bench_workload(path: &Path) -> anyhow::Result<[f64; 3]> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    // A sweep's summary is an array: plan for its last (highest) rate.
    let s = v.as_array().and_then(|a| a.last()).unwrap_or(&v);
    let num = |k: &str| {
        s[k].as_f64()
            .with_context(|| format!("{} has no {k}", path.display()))
    };
    let n = num("completed")?.max(1.0);
    Ok([
        num("total_input_tokens")? / n,
        num("total_output_tokens")? / n,
        num("request_throughput")?,
    ])
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Where the profile of this model file, these numerics and this machine is cached.
pub fn cached_profile_path(model: &Path, args: &ModelArgs) -> anyhow::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let meta = std::fs::metadata(model).with_context(|| format!("reading {}", model.display()))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        model.file_name(),
        meta.len(),
        args.precision.to_string(),
        args.kv_cache_dtype.to_string(),
        cpu_name(),
        cores(),
        COST_MODEL_VERSION,
    )
        .hash(&mut h);
    let dir = engine::fetch::cache_dir()
        .parent()
        .map(|p| p.join("profiles"))
        .unwrap_or_else(|| PathBuf::from("profiles"));
    Ok(dir.join(format!("{:016x}.json", h.finish())))
}

/// Measures every thread count asked for (each in a child pinned to that many cores), fits
/// the model and measures the link.
pub fn profile(
    model_path: &Path,
    args: &ProfileArgs,
    progress: &dyn Fn(&str),
) -> anyhow::Result<CostModel> {
    let all = cores();
    let mut threads = if args.threads.is_empty() {
        vec![1, all]
    } else {
        args.threads.clone()
    };
    threads.sort_unstable();
    threads.dedup();
    anyhow::ensure!(
        threads.iter().all(|&t| (1..=all).contains(&t)),
        "thread counts must be between 1 and this machine's {all} cores"
    );
    let exe = std::env::current_exe().context("finding the tandem executable")?;
    let mut forward = Vec::new();
    let mut samples = Vec::new();
    let mut first: Option<profile::Measured> = None;
    for &t in &threads {
        progress(&format!(
            "profiling {} on {t} thread(s){}…",
            model_path.display(),
            if args.quick { " (quick)" } else { "" }
        ));
        let model = ModelArgs {
            model: Some(model_path.to_path_buf()),
            ..args.model.clone()
        };
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["plan", "measure", "--threads", &t.to_string()])
            .args(model.to_args());
        if args.quick {
            cmd.arg("--quick");
        }
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running the measuring child")?;
        anyhow::ensure!(
            out.status.success(),
            "measuring on {t} thread(s) failed ({})",
            out.status
        );
        let m: profile::Measured =
            serde_json::from_slice(&out.stdout).context("reading the measuring child's samples")?;
        let fit = ForwardCost::fit(t, &m.samples)
            .with_context(|| format!("fitting the {t}-thread samples"))?;
        forward.push(fit);
        samples.push((t, m.samples.clone()));
        first.get_or_insert(m);
    }
    let m = first.expect("at least one thread count");
    Ok(CostModel {
        version: COST_MODEL_VERSION,
        model_id: m.model_id,
        fingerprint: m.fingerprint,
        cpu: cpu_name(),
        cores: all,
        kv_bytes_per_token: m.kv_bytes_per_token,
        forward,
        link: profile::link()?,
        samples,
    })
}

pub fn save(m: &CostModel, out: &Path) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(m)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Each fit and how far it lands from what it was fitted to.
fn report(m: &CostModel) {
    eprintln!(
        "tandem: {} on {} ({} cores); loopback: {:.2} ms for three calls, TCP {:.2} GB/s",
        m.model_id,
        m.cpu,
        m.cores,
        m.link.calls_s * 1e3,
        m.link.tcp_bytes_per_s / 1e9
    );
    for (f, (_, samples)) in m.forward.iter().zip(&m.samples) {
        let errs: Vec<f64> = samples
            .iter()
            .map(|s| (f.seconds(s.work) / s.seconds - 1.0).abs())
            .collect();
        let worst = errs.iter().cloned().fold(0.0, f64::max);
        let mean = errs.iter().sum::<f64>() / errs.len().max(1) as f64;
        eprintln!(
            "tandem: {} thread(s): {:.2} ms + {:.3} ms/token + {:.1} ns/prefill pair + {:.1} ns/decode pair; fit error mean {:.1}%, worst {:.1}% over {} samples",
            f.threads,
            f.fixed_s * 1e3,
            f.per_token_s * 1e3,
            f.per_prefill_pair_s * 1e9,
            f.per_decode_pair_s * 1e9,
            mean * 100.0,
            worst * 100.0,
            samples.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use scheduler::plan::simulate::{MAX_RUNNING, PREFILL_BUDGET, STEP_BUDGET};

    #[test]
    fn the_replay_batches_as_the_workers_do_by_default() {
        assert_eq!(STEP_BUDGET, decode_worker::DEFAULT_MAX_BATCH_TOKENS);
        assert_eq!(MAX_RUNNING, decode_worker::DEFAULT_MAX_RUNNING);
        assert_eq!(PREFILL_BUDGET, prefill_worker::DEFAULT_MAX_BATCH_TOKENS);
    }

    #[test]
    fn a_bench_runs_requests_are_read_as_a_trace_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("requests.jsonl");
        // As `tandem bench` writes them; a failed request has no server counts.
        std::fs::write(
            &path,
            concat!(
                r#"{"index":1,"scheduled_s":0.5,"client_input_len":30,"requested_output_len":16,"prompt_tokens":31,"completion_tokens":16,"success":true}"#,
                "\n",
                r#"{"index":0,"scheduled_s":0.0,"client_input_len":900,"requested_output_len":64,"prompt_tokens":null,"completion_tokens":null,"success":false}"#,
                "\n\n"
            ),
        )
        .unwrap();
        let t = super::read_trace(&path).unwrap();
        let got: Vec<(f64, usize, usize)> = t.iter().map(|r| (r.at, r.prompt, r.osl)).collect();
        assert_eq!(got, vec![(0.0, 900, 64), (0.5, 31, 16)]);
        std::fs::write(&path, r#"{"index":0,"client_input_len":9}"#).unwrap();
        let e = super::read_trace(&path).unwrap_err().to_string();
        assert!(e.contains("scheduled_s"), "{e}");
        std::fs::write(&path, "").unwrap();
        assert!(super::read_trace(&path).is_err());
    }
}
