//! `tandem model ep-bench`: a mixture-of-experts model (a) in one process, (b) with its experts
//! on `tandem expert` worker processes split evenly, (c) placed by EPLB from (b)'s measured
//! load with replicas, in one run: batched decode and a long prefill, where a decode step's
//! time goes (dispatch and combine vs the experts' compute), and each worker's load.

use clap::Args;
use engine::{Engine, EngineConfig, ForwardItem, LogitsWanted};
use expert_worker::{EpStats, Expect, RemoteExperts, eplb};
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

fn measure(e: &Engine, args: &EpBenchArgs, mut between: impl FnMut()) -> anyhow::Result<Measured> {
    // Real text (what the router was calibrated on, for a made model): prompt i starts at
    // token 7·i of it, repeated as needed.
    let text = e
        .frontend
        .tokenizer
        .encode(engine::moe::make::CALIBRATION_TEXT, false)?;
    let tok = |i: usize, j: usize| text[(7 * i + j) % text.len()];
    // Prefill, timed alone.
    let prompt: Vec<u32> = (0..args.prompt).map(|j| tok(0, j)).collect();
    let mut seq = e.new_sequence();
    let t = Instant::now();
    e.prefill(&mut seq, &prompt, LogitsWanted::Last)?;
    let prefill_tok_s = args.prompt as f64 / t.elapsed().as_secs_f64();
    drop(seq);
    // A batch of short prompts, then decode steps.
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|i| (0..32).map(|j| tok(i, j)).collect())
        .collect();
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
    let mut next: Vec<u32> = e
        .model
        .forward(&mut items)?
        .iter()
        .map(|l| engine::sampler::argmax(l))
        .collect();
    drop(items);
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
/// expert plane's figures over the decode steps alone.
fn with_workers(
    args: &EpBenchArgs,
    exe: &Path,
    cfg: &EngineConfig,
    placement: &eplb::Placement,
) -> anyhow::Result<(Measured, EpStats)> {
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
    let remote = Arc::new(remote);
    e.model.set_expert_backend(remote.clone())?;
    eprintln!("tandem: expert workers holding {placement:?}…");
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
    let (b, b_stats) = with_workers(args, exe, &cfg, &even)?;
    let window: Vec<f64> = b_stats.expert_rows.iter().map(|&n| n as f64).collect();
    let slots = (moe.n_experts + args.redundant_experts).div_ceil(args.experts);
    let planned = eplb::plan(&window, args.experts, slots);
    let (c, c_stats) = with_workers(args, exe, &cfg, &planned)?;
    for (name, m) in [("(b)", &b), ("(c)", &c)] {
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
        ("(c) EPLB", &c, &c_stats, &planned),
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
    println!("| logits of (a), (b), (c) | bit-identical | |");
    Ok(())
}
