//! `tandem model ep-bench`: a mixture-of-experts model (a) in one process, (b) with its experts
//! on `tandem expert` worker processes split evenly, (c) placed by EPLB from (b)'s measured
//! load with replicas (static), (c0) the same without replicas (a permutation of the experts:
//! what the replicas' per-step split adds), (d) started as (b) with EPLB at run time, (b2) and (c2) as (b)
//! and (c) with two microbatches in flight, (b-tcp) as (b) with rows on the socket instead of
//! shared-memory mailboxes — all set up at once and measured in rounds taken in
//! turn, so that the ratios compare runs side by side on a noisy machine: batched decode and a
//! long prefill, where a decode step's time goes (dispatch and combine vs the experts'
//! compute), each worker's load, and for (d) how many steps the new placement took and the
//! slowest step while its experts loaded.

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

/// Timed rounds: each setup's decode steps split over them, one prefill each.
const ROUNDS: usize = 4;
/// Untimed decode steps of (b) whose load (c)'s placement is planned from.
const WARM_STEPS: usize = 8;

/// Real text (what the router was calibrated on, for a made model): prompt `i` of `n` tokens
/// starts at token 7·i of it, repeated as needed.
fn prompt(text: &[u32], i: usize, n: usize) -> Vec<u32> {
    (0..n).map(|j| text[(7 * i + j) % text.len()]).collect()
}

/// The calibration text's tokens.
fn text(e: &Engine) -> anyhow::Result<Vec<u32>> {
    Ok(e.frontend
        .tokenizer
        .encode(engine::moe::make::CALIBRATION_TEXT, false)?)
}

/// `args.batch` sequences of 32-token prompts, prefilled together, and their next tokens.
fn batch(e: &Engine, args: &EpBenchArgs) -> anyhow::Result<(Vec<engine::KvSequence>, Vec<u32>)> {
    let text = text(e)?;
    let prompts: Vec<Vec<u32>> = (0..args.batch).map(|i| prompt(&text, i, 32)).collect();
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

/// One greedy decode step of `seqs` fed `next`: `next` becomes the step's argmaxes; the
/// step's logits.
fn step(
    e: &Engine,
    seqs: &mut [engine::KvSequence],
    next: &mut Vec<u32>,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut b: Vec<_> = seqs
        .iter_mut()
        .zip(next.iter())
        .map(|(s, &t)| (s, t))
        .collect();
    let out = e.decode_step(&mut b)?;
    *next = out.iter().map(|l| engine::sampler::argmax(l)).collect();
    Ok(out)
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
        step(e, &mut seqs, &mut next)?;
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One way to run the model, measured in rounds taken in turn with the others (this machine is
/// shared and noisy: each ratio compares rounds run side by side).
struct Setup {
    name: String,
    engine: Engine,
    remote: Option<Arc<RemoteExperts>>,
    _children: Children,
    /// The decode batch, carried from round to round.
    seqs: Vec<engine::KvSequence>,
    next: Vec<u32>,
    decode_s: f64,
    decode_tokens: usize,
    prefill_s: f64,
    prefill_tokens: usize,
    /// The expert plane over the timed decode steps.
    stats: EpStats,
    /// Every logit's bits of the last decode step (all setups must agree).
    last: Vec<u32>,
}

impl Setup {
    fn new(
        name: String,
        engine: Engine,
        remote: Option<Arc<RemoteExperts>>,
        children: Children,
        args: &EpBenchArgs,
    ) -> anyhow::Result<Setup> {
        let (seqs, next) = batch(&engine, args)?;
        Ok(Setup {
            name,
            engine,
            remote,
            _children: children,
            seqs,
            next,
            decode_s: 0.0,
            decode_tokens: 0,
            prefill_s: 0.0,
            prefill_tokens: 0,
            stats: EpStats::default(),
            last: Vec::new(),
        })
    }

    /// `steps` timed decode steps of the batch.
    fn decode(&mut self, steps: usize) -> anyhow::Result<()> {
        let before = self.remote.as_ref().map(|r| r.stats()).unwrap_or_default();
        let t = Instant::now();
        for _ in 0..steps {
            let out = step(&self.engine, &mut self.seqs, &mut self.next)?;
            self.last = out.iter().flatten().map(|x| x.to_bits()).collect();
        }
        self.decode_s += t.elapsed().as_secs_f64();
        self.decode_tokens += steps * self.seqs.len();
        if let Some(r) = &self.remote {
            self.stats = self.stats.plus(&r.stats().since(&before));
        }
        Ok(())
    }

    /// One timed prefill of `prompt` (a sequence of its own, dropped after).
    fn prefill(&mut self, prompt: &[u32]) -> anyhow::Result<()> {
        let mut seq = self.engine.new_sequence();
        let t = Instant::now();
        self.engine.prefill(&mut seq, prompt, LogitsWanted::Last)?;
        self.prefill_s += t.elapsed().as_secs_f64();
        self.prefill_tokens += prompt.len();
        Ok(())
    }

    fn decode_tok_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_s
    }

    fn prefill_tok_s(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_s
    }
}

/// The load window EPLB plans from — the workload measured, untimed: rows per expert of each
/// layer over `WARM_STEPS` decode steps of a batch of its own and one prefill of `prompt` —
/// and the fixed cost of running an expert over that window, in rows (the workers' run times
/// fitted: per run, times the steps).
fn warm_load(
    s: &Setup,
    args: &EpBenchArgs,
    prompt: &[u32],
) -> anyhow::Result<(eplb::LayerLoad, f64)> {
    let remote = s.remote.as_ref().expect("a setup with expert workers");
    let before = remote.stats();
    let (mut seqs, mut next) = batch(&s.engine, args)?;
    for _ in 0..WARM_STEPS {
        step(&s.engine, &mut seqs, &mut next)?;
    }
    let mut seq = s.engine.new_sequence();
    s.engine.prefill(&mut seq, prompt, LogitsWanted::Last)?;
    let window = remote.stats().since(&before);
    let rows = window.layer_load();
    let steps = window.layers as f64 / rows.len().max(1) as f64;
    Ok((rows, window.fit.fixed_rows() * steps))
}

/// How a setup with expert workers runs.
#[derive(Clone, Copy)]
struct How {
    /// EPLB at run time.
    live: Option<EplbConfig>,
    microbatches: usize,
    /// Rows and outputs through shared-memory mailboxes (else the socket).
    shm: bool,
}

/// The default: one microbatch, shared memory, no EPLB at run time.
const PLAIN: How = How {
    live: None,
    microbatches: 1,
    shm: true,
};

/// An engine whose experts run on worker processes started from `exe`, holding `placement`;
/// with `how.live`, EPLB runs at run time and is given steps until it has placed the experts
/// anew.
fn with_workers(
    args: &EpBenchArgs,
    exe: &Path,
    cfg: &EngineConfig,
    name: &str,
    placement: &eplb::Placement,
    how: How,
) -> anyhow::Result<(Setup, Option<Switch>)> {
    let How {
        live,
        microbatches,
        shm,
    } = how;
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
    remote.set_shm(shm);
    remote.set_placement(placement)?;
    if let Some(live) = live {
        remote.enable_eplb(live)?;
    }
    let remote = Arc::new(remote);
    e.model.set_expert_backend(remote.clone())?;
    e.model.set_microbatches(microbatches)?;
    let switch = match live {
        Some(_) => Some(until_placed(&e, &remote, args)?),
        None => None,
    };
    let setup = Setup::new(name.to_string(), e, Some(remote.clone()), children, args)?;
    // Mailboxes are attached at a connection's first run (the batch's prefill, by now).
    let links = remote.links();
    eprintln!(
        "tandem: {name}: expert workers holding {placement:?}, {microbatches} microbatch(es), links {links:?}…"
    );
    anyhow::ensure!(
        links.iter().all(|l| *l == if shm { "shm" } else { "tcp" }),
        "{name}: links {links:?} (shared memory {})",
        if shm { "asked for" } else { "off" }
    );
    Ok((setup, switch))
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
    anyhow::ensure!(
        args.steps >= ROUNDS,
        "--steps {}: at least {ROUNDS} (one per round)",
        args.steps
    );
    let a = Setup::new(
        format!("(a) one process ({threads} threads)"),
        one,
        None,
        Children(Vec::new()),
        args,
    )?;
    // (b) experts split evenly over the workers; (c) placed by EPLB from (b)'s load (a first,
    // untimed round), with replicas; (d) started as (b) with EPLB at run time; (b2), (c2) as
    // (b), (c) with two microbatches in flight.
    let even = eplb::even(moe.n_experts, args.experts);
    let (b, _) = with_workers(args, exe, &cfg, "(b) even", &even, PLAIN)?;
    let prompt = prompt(&text(&b.engine)?, 0, args.prompt);
    let (window, fixed) = warm_load(&b, args, &prompt)?;
    let slots = (moe.n_experts + args.redundant_experts).div_ceil(args.experts);
    let planned = eplb::plan_costed(&window, args.experts, slots, fixed);
    let (c, _) = with_workers(args, exe, &cfg, "(c) EPLB, static", &planned, PLAIN)?;
    let permuted = eplb::plan_costed(
        &window,
        args.experts,
        moe.n_experts.div_ceil(args.experts),
        fixed,
    );
    let (c0, _) = with_workers(
        args,
        exe,
        &cfg,
        "(c0) EPLB, static, no replicas",
        &permuted,
        PLAIN,
    )?;
    let live = EplbConfig {
        interval: args.eplb_interval,
        redundant: args.redundant_experts,
    };
    let (d, switch) = with_workers(
        args,
        exe,
        &cfg,
        "(d) EPLB at run time",
        &even,
        How {
            live: Some(live),
            ..PLAIN
        },
    )?;
    let switch = switch.expect("started with EPLB at run time");
    let two = How {
        microbatches: 2,
        ..PLAIN
    };
    let (b2, _) = with_workers(args, exe, &cfg, "(b2) even, 2 microbatches", &even, two)?;
    let (c2, _) = with_workers(
        args,
        exe,
        &cfg,
        "(c2) EPLB, static, 2 microbatches",
        &planned,
        two,
    )?;
    let tcp = How {
        shm: false,
        ..PLAIN
    };
    let (bt, _) = with_workers(args, exe, &cfg, "(b-tcp) even, over TCP", &even, tcp)?;
    let mut setups = [a, b, c, c0, d, b2, c2, bt];
    // The timed rounds: every setup in turn, each round a share of the decode steps and one
    // prefill.
    for round in 0..ROUNDS {
        eprintln!("tandem: round {} of {ROUNDS}…", round + 1);
        let steps = args.steps / ROUNDS + usize::from(round < args.steps % ROUNDS);
        for s in &mut setups {
            s.decode(steps)?;
            s.prefill(&prompt)?;
        }
    }
    let [a, b, c, c0, d, b2, c2, bt] = &setups;
    for s in &setups[1..] {
        anyhow::ensure!(
            s.last == a.last,
            "{}: expert parallelism changed the logits (they must be bit-identical)",
            s.name
        );
    }
    println!(
        "| {} | {} layers, {} experts, top-{}, {} | one run, {ROUNDS} rounds taken in turn |",
        args.model.display(),
        model_cfg.n_layers,
        moe.n_experts,
        moe.n_used,
        args.precision
    );
    println!("|---|---|---|");
    println!(
        "| {} | decode batch {} {:.1} tok/s | prefill {} tokens {:.1} tok/s |",
        a.name,
        args.batch,
        a.decode_tok_s(),
        args.prompt,
        a.prefill_tok_s()
    );
    let placements = [
        &even,
        &planned,
        &permuted,
        &switch.placement,
        &even,
        &planned,
        &even,
    ];
    for (s, placement) in setups[1..].iter().zip(placements) {
        let st = &s.stats;
        let rows: Vec<f64> = st.rows.iter().map(|&n| n as f64).collect();
        println!(
            "| {}, {} expert workers × {} thread(s), placement {placement:?} | decode {:.1} tok/s ({:.2}× (a)) | prefill {:.1} tok/s ({:.2}× (a)) |",
            s.name,
            args.experts,
            args.expert_threads,
            s.decode_tok_s(),
            s.decode_tok_s() / a.decode_tok_s(),
            s.prefill_tok_s(),
            s.prefill_tok_s() / a.prefill_tok_s()
        );
        // With two microbatches a layer's wall time also holds the wait for the other's.
        let wait = if s.name.contains("microbatches") {
            " + waiting for the other microbatch"
        } else {
            ""
        };
        // Per layer and step: each layer run's busiest worker over the mean, as the steps
        // met it (what a step waits for when the expert phase is bound by rows).
        let per_layer =
            st.busiest_rows as f64 * args.experts as f64 / rows.iter().sum::<f64>().max(1.0);
        println!(
            "| {}: a decode step on the expert plane | dispatch + combine{wait} {:.1}%, expert compute (slowest worker) {:.1}% | worker rows {:?}: busiest / mean {:.2}, per layer and step {per_layer:.2}; {:.2} MB per step |",
            s.name,
            100.0 * (st.wall_s - st.compute_s) / s.decode_s,
            100.0 * st.compute_s / s.decode_s,
            st.rows,
            eplb::imbalance(&rows),
            st.bytes as f64 / (s.decode_tokens / args.batch) as f64 / 1e6
        );
    }
    // Where the runs tell a cost per expert from one per run (their expert counts varied).
    for st in setups[1..].iter() {
        if let Some((fixed, per_row)) = st.stats.fit.solve() {
            println!(
                "| {}: the expert workers' compute per run, fitted | {:.0} µs per expert run + {:.1} µs per row: an expert run costs {:.1} rows | EPLB weighs each replica by it |",
                st.name,
                fixed * 1e6,
                per_row * 1e6,
                fixed / per_row
            );
        }
    }
    for (x, y, what) in [
        (c, b, "(c) over (b)"),
        (c0, b, "(c0) over (b)"),
        (c, c0, "(c) over (c0): replicas split per layer and step"),
        (d, b, "(d) over (b)"),
        (b2, b, "(b2) over (b): 2 microbatches"),
        (c2, c, "(c2) over (c): 2 microbatches"),
        (c2, b2, "(c2) over (b2)"),
        (b, bt, "(b) over (b-tcp): shared memory"),
    ] {
        println!(
            "| {what} | decode {:.2}× | prefill {:.2}× |",
            x.decode_tok_s() / y.decode_tok_s(),
            x.prefill_tok_s() / y.prefill_tok_s()
        );
    }
    println!(
        "| (d) the switch, planning every {} steps | in force after {} decode steps of batch {} | slowest step meanwhile {:.0} ms, median {:.0} ms |",
        args.eplb_interval, switch.steps, args.batch, switch.slowest_ms, switch.median_ms
    );
    println!(
        "| logits of (a) to (d), (c0), (b2), (c2), (b-tcp) after the last round | bit-identical | |"
    );
    Ok(())
}
