//! `tandem model ep-bench`: a mixture-of-experts model (a) in one process, (b) with its experts
//! on `tandem expert` worker processes split evenly, (c) placed by EPLB from (b)'s measured
//! load with replicas (static), (d) started as (b) with EPLB at run time, in one run: batched
//! decode and a long prefill, where a decode step's time goes (dispatch and combine vs the
//! experts' compute), each worker's load, and for (d) how many steps the new placement took
//! and the slowest step while its experts loaded.

use clap::Args;
use engine::{Engine, EngineConfig, ForwardItem, LogitsWanted};
use expert_worker::{EpStats, EplbConfig, Expect, RemoteExperts, eplb};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct EpBenchArgs {
    /// A mixture-of-experts GGUF (e.g. from `tandem model make-moe`).
    #[arg(long)]
    pub model: PathBuf,
    /// Expert worker processes (the experts split evenly, in order).
    #[arg(long, default_value_t = 2)]
    pub experts: usize,
    /// Compute threads of each expert worker.
    #[arg(long, default_value_t = 1)]
    pub expert_threads: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Decode steps timed.
    #[arg(long, default_value_t = 16)]
    pub steps: usize,
    /// Tokens of the prefill timed.
    #[arg(long, default_value_t = 2000)]
    pub prompt: usize,
    /// Weight precision.
    #[arg(long, default_value = "w4a8")]
    pub precision: engine::Precision,
    /// Extra expert slots over all workers for EPLB's replicas of the busiest experts.
    #[arg(long, default_value_t = 2)]
    pub redundant_experts: usize,
    /// (d): decode steps between EPLB's plans at run time.
    #[arg(long, default_value_t = 8)]
    pub eplb_interval: u64,
}

/// Expert worker children, killed when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Measured {
    decode_tok_s: f64,
    decode_s: f64,
    prefill_tok_s: f64,
    /// Every logit's bits of the last decode step (one process and EP must agree).
    last: Vec<u32>,
}

/// Real text (what the router was calibrated on, for a made model): prompt `i` of `n` tokens
/// starts at token 7·i of it, repeated as needed.
fn prompt(e: &Engine, i: usize, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = e
        .frontend
        .tokenizer
        .encode(engine::moe::make::CALIBRATION_TEXT, false)?;
    Ok((0..n).map(|j| text[(7 * i + j) % text.len()]).collect())
}

/// `args.batch` sequences of 32-token prompts, prefilled together, and their next tokens.
fn batch(e: &Engine, args: &EpBenchArgs) -> anyhow::Result<(Vec<engine::KvSequence>, Vec<u32>)> {
    let prompts = (0..args.batch)
        .map(|i| prompt(e, i, 32))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut seqs: Vec<_> = prompts.iter().map(|_| e.new_sequence()).collect();
    let mut items: Vec<ForwardItem> = seqs
        .iter_mut()
        .zip(&prompts)
        .map(|(seq, p)| ForwardItem {
            seq,
            tokens: p,
            logits: LogitsWanted::Last,
        })
        .collect();
    let next = e
        .model
        .forward(&mut items)?
        .iter()
        .map(|l| engine::sampler::argmax(l))
        .collect();
    drop(items);
    Ok((seqs, next))
}

/// How EPLB at run time went: decode steps until the new placement was in force, and step
/// times meanwhile.
struct Switch {
    steps: usize,
    slowest_ms: f64,
    median_ms: f64,
    placement: eplb::Placement,
}

/// Decodes a batch until `remote`'s placement changes (at most 96 steps), then 2 steps more.
fn until_placed(e: &Engine, remote: &RemoteExperts, args: &EpBenchArgs) -> anyhow::Result<Switch> {
    let start = remote.current();
    let (mut seqs, mut next) = batch(e, args)?;
    let (mut times, mut switched) = (Vec::new(), None);
    while switched.is_none_or(|s| times.len() < s + 2) {
        anyhow::ensure!(
            times.len() < 96,
            "EPLB at run time: the placement did not change in 96 steps"
        );
        let t = Instant::now();
        let mut b: Vec<_> = seqs.iter_mut().zip(&next).map(|(s, &t)| (s, t)).collect();
        next = e
            .decode_step(&mut b)?
            .iter()
            .map(|l| engine::sampler::argmax(l))
            .collect();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if switched.is_none() && remote.current() != start {
            switched = Some(times.len());
        }
    }
    let steps = switched.expect("loop ends switched");
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Switch {
        steps,
        slowest_ms: sorted[sorted.len() - 1],
        median_ms: sorted[sorted.len() / 2],
        placement: remote.current(),
    })
}

fn measure(e: &Engine, args: &EpBenchArgs, mut between: impl FnMut()) -> anyhow::Result<Measured> {
    // Prefill, timed alone.
    let prompt = prompt(e, 0, args.prompt)?;
    let mut seq = e.new_sequence();
    let t = Instant::now();
    e.prefill(&mut seq, &prompt, LogitsWanted::Last)?;
    let prefill_tok_s = args.prompt as f64 / t.elapsed().as_secs_f64();
    drop(seq);
    // A batch of short prompts, then decode steps.
    let (mut seqs, mut next) = batch(e, args)?;
    between();
    let t = Instant::now();
    let mut last = Vec::new();
    for _ in 0..args.steps {
        let mut batch: Vec<_> = seqs.iter_mut().zip(&next).map(|(s, &t)| (s, t)).collect();
        let out = e.decode_step(&mut batch)?;
        next = out.iter().map(|l| engine::sampler::argmax(l)).collect();
        last = out.iter().flatten().map(|x| x.to_bits()).collect();
    }
    let decode_s = t.elapsed().as_secs_f64();
    Ok(Measured {
        decode_tok_s: (args.batch * args.steps) as f64 / decode_s,
        decode_s,
        prefill_tok_s,
        last,
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `args.model` measured with expert workers started from `exe` holding `placement`; the
/// expert plane's figures over the decode steps alone. With `live`, EPLB runs at run time and
/// the measuring starts once it has placed the experts anew.
fn with_workers(
    args: &EpBenchArgs,
    exe: &Path,
    cfg: &EngineConfig,
    placement: &eplb::Placement,
    live: Option<EplbConfig>,
    microbatches: usize,
) -> anyhow::Result<(Measured, EpStats, Option<Switch>)> {
    let mut children = Children(Vec::new());
    let mut addrs = Vec::new();
    for held in placement {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let list: Vec<String> = held.iter().map(ToString::to_string).collect();
        children.0.push(
            Command::new(exe)
                .args(["expert", "--listen", &addr, "--experts", &list.join(",")])
                .arg("--model")
                .arg(&args.model)
                .args(["--precision", &args.precision.to_string()])
                .args(["--threads", &args.expert_threads.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        addrs.push(addr);
    }
    let mut e = Engine::load(&args.model, cfg)?;
    let c = e.model.config().clone();
    let g = engine::gguf::GgufFile::open(&args.model)?;
    let mut remote = RemoteExperts::connect_waiting(
        &addrs,
        None,
        Expect {
            n_layers: c.n_layers,
            n_experts: c.moe.map_or(0, |m| m.n_experts),
            d: c.d_model,
            fingerprint: expert_worker::wire::fingerprint(&g, args.precision),
        },
        Duration::from_secs(300),
    )?;
    drop(g);
    remote.set_placement(placement)?;
    if let Some(live) = live {
        remote.enable_eplb(live)?;
    }
    let remote = Arc::new(remote);
    e.model.set_expert_backend(remote.clone())?;
    e.model.set_microbatches(microbatches)?;
    eprintln!("tandem: expert workers holding {placement:?}, {microbatches} microbatch(es)…");
    let switch = match live {
        Some(_) => Some(until_placed(&e, &remote, args)?),
        None => None,
    };
    let mut before = EpStats::default();
    let m = measure(&e, args, || before = remote.stats())?;
    let after = remote.stats();
    let sub = |a: &[u64], b: &[u64]| -> Vec<u64> {
        a.iter()
            .enumerate()
            .map(|(i, x)| x - b.get(i).copied().unwrap_or(0))
            .collect()
    };
    Ok((
        m,
        EpStats {
            layers: after.layers - before.layers,
            wall_s: after.wall_s - before.wall_s,
            compute_s: after.compute_s - before.compute_s,
            bytes: after.bytes - before.bytes,
            rows: sub(&after.rows, &before.rows),
            expert_rows: sub(&after.expert_rows, &before.expert_rows),
        },
        switch,
    ))
}

/// Measures `args.model` in one process and with expert workers started from `exe`.
pub fn run(args: &EpBenchArgs, threads: usize, exe: &Path) -> anyhow::Result<()> {
    let cfg = EngineConfig {
        kv_budget_bytes: 512 << 20,
        precision: args.precision,
        ..Default::default()
    };
    let one = Engine::load(&args.model, &cfg)?;
    let model_cfg = one.model.config().clone();
    let moe = model_cfg.moe.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is dense: ep-bench needs a mixture of experts",
            args.model.display()
        )
    })?;
    anyhow::ensure!(
        (1..=moe.n_experts).contains(&args.experts),
        "--experts {}: the model has {} experts",
        args.experts,
        moe.n_experts
    );
    eprintln!("tandem: one process ({threads} threads)…");
    let a = measure(&one, args, || {})?;
    drop(one);

    // (b) experts split evenly over the workers; (c) placed by EPLB from (b)'s load, with
    // replicas.
    let even = eplb::even(moe.n_experts, args.experts);
    let (b, b_stats, _) = with_workers(args, exe, &cfg, &even, None, 1)?;
    let window: Vec<f64> = b_stats.expert_rows.iter().map(|&n| n as f64).collect();
    let slots = (moe.n_experts + args.redundant_experts).div_ceil(args.experts);
    let planned = eplb::plan(&window, args.experts, slots);
    let (c, c_stats, _) = with_workers(args, exe, &cfg, &planned, None, 1)?;
    // (d) (b)'s start, placed anew by EPLB at run time from the load it sees.
    let live = EplbConfig {
        interval: args.eplb_interval,
        redundant: args.redundant_experts,
    };
    let (d, d_stats, switch) = with_workers(args, exe, &cfg, &even, Some(live), 1)?;
    let switch = switch.expect("measured with EPLB at run time");
    // (b) and (c) again with two microbatches in flight.
    let (b2, b2_stats, _) = with_workers(args, exe, &cfg, &even, None, 2)?;
    let (c2, c2_stats, _) = with_workers(args, exe, &cfg, &planned, None, 2)?;
    for (name, m) in [
        ("(b)", &b),
        ("(c)", &c),
        ("(d)", &d),
        ("(b2)", &b2),
        ("(c2)", &c2),
    ] {
        anyhow::ensure!(
            a.last == m.last,
            "{name}: expert parallelism changed the logits (they must be bit-identical)"
        );
    }
    println!(
        "| {} | {} layers, {} experts, top-{}, {} | one run |",
        args.model.display(),
        model_cfg.n_layers,
        moe.n_experts,
        moe.n_used,
        args.precision
    );
    println!("|---|---|---|");
    println!(
        "| (a) one process ({threads} threads) | decode batch {} {:.1} tok/s | prefill {} tokens {:.1} tok/s |",
        args.batch, a.decode_tok_s, args.prompt, a.prefill_tok_s
    );
    for (name, m, st, placement) in [
        ("(b) even", &b, &b_stats, &even),
        ("(c) EPLB, static", &c, &c_stats, &planned),
        ("(d) EPLB at run time", &d, &d_stats, &switch.placement),
        ("(b2) even, 2 microbatches", &b2, &b2_stats, &even),
        (
            "(c2) EPLB, static, 2 microbatches",
            &c2,
            &c2_stats,
            &planned,
        ),
    ] {
        let rows: Vec<f64> = st.rows.iter().map(|&n| n as f64).collect();
        println!(
            "| {name}, {} expert workers × {} thread(s), placement {placement:?} | decode {:.1} tok/s ({:.2}× (a)) | prefill {:.1} tok/s ({:.2}× (a)) |",
            args.experts,
            args.expert_threads,
            m.decode_tok_s,
            m.decode_tok_s / a.decode_tok_s,
            m.prefill_tok_s,
            m.prefill_tok_s / a.prefill_tok_s
        );
        println!(
            "| {name}: a decode step on the expert plane | dispatch + combine {:.1}%, expert compute (slowest worker) {:.1}% | worker rows {:?}: busiest / mean {:.2}; {:.2} MB per step |",
            100.0 * (st.wall_s - st.compute_s) / m.decode_s,
            100.0 * st.compute_s / m.decode_s,
            st.rows,
            eplb::imbalance(&rows),
            st.bytes as f64 / args.steps as f64 / 1e6
        );
    }
    println!(
        "| (c) over (b) | decode {:.2}× | prefill {:.2}× |",
        c.decode_tok_s / b.decode_tok_s,
        c.prefill_tok_s / b.prefill_tok_s
    );
    println!(
        "| (d) over (b) | decode {:.2}× | prefill {:.2}× |",
        d.decode_tok_s / b.decode_tok_s,
        d.prefill_tok_s / b.prefill_tok_s
    );
    println!(
        "| (d) the switch, planning every {} steps | in force after {} decode steps of batch {} | slowest step meanwhile {:.0} ms, median {:.0} ms |",
        args.eplb_interval, switch.steps, args.batch, switch.slowest_ms, switch.median_ms
    );
    println!(
        "| 2 microbatches over 1: (b2) over (b), (c2) over (c) | decode {:.2}×, {:.2}× | prefill {:.2}×, {:.2}× (one sequence: not split) |",
        b2.decode_tok_s / b.decode_tok_s,
        c2.decode_tok_s / c.decode_tok_s,
        b2.prefill_tok_s / b.prefill_tok_s,
        c2.prefill_tok_s / c.prefill_tok_s
    );
    println!(
        "| (c2) over (b2) | decode {:.2}× | |",
        c2.decode_tok_s / b2.decode_tok_s
    );
    println!("| logits of (a) to (d), (b2), (c2) | bit-identical | |");
    Ok(())
}
