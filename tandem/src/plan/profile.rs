//! `tandem plan profile`: measures the engine's forward calls on this machine — prefill passes,
//! decode steps of batches over contexts, colocated steps mixing both — at each thread count,
//! fits the cost model (`scheduler::plan::cost`) and measures the loopback link.
//!
//! The compute pool is sized once per process, so each thread count is measured by a child
//! (`tandem plan measure`, pinned to that many cores) that prints its samples as JSON.

use engine::{Engine, EngineConfig, ForwardItem, LogitsWanted};
use scheduler::plan::cost::{Sample, Work};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::time::Instant;

/// What one thread count's child reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct Measured {
    pub threads: usize,
    pub model_id: String,
    pub fingerprint: u64,
    pub kv_bytes_per_token: u64,
    pub samples: Vec<Sample>,
}

/// The shapes measured.
struct Shapes {
    prefill: &'static [usize],
    /// (batch, context per sequence).
    decode: &'static [(usize, usize)],
    /// (batch, context per sequence, prefill chunk): a colocated step.
    mixed: &'static [(usize, usize, usize)],
    reps: usize,
}

const FULL: Shapes = Shapes {
    prefill: &[16, 64, 256, 1024, 2048],
    decode: &[
        (1, 32),
        (1, 1024),
        (4, 256),
        (8, 1024),
        (16, 128),
        (32, 512),
        (64, 256),
    ],
    mixed: &[(8, 256, 248), (32, 256, 224)],
    reps: 3,
};

const QUICK: Shapes = Shapes {
    prefill: &[32, 256, 1024],
    decode: &[(1, 64), (8, 512), (32, 256)],
    mixed: &[(16, 256, 240)],
    reps: 2,
};

/// Measures on the compute pool this process was given.
pub fn measure(
    path: &std::path::Path,
    model: &crate::args::ModelArgs,
    threads: usize,
    quick: bool,
) -> anyhow::Result<Measured> {
    let shapes = if quick { &QUICK } else { &FULL };
    let e = Engine::load(
        path,
        &EngineConfig {
            kv_budget_bytes: 1 << 30,
            model_id: model.model_id(),
            precision: model.precision,
            kv_dtype: model.kv_cache_dtype,
            kv_shared_path: None,
            device: Default::default(),
        },
    )?;
    let vocab = e.model.config().vocab_size as u32;
    let token = |i: usize| ((i as u32).wrapping_mul(2_654_435_761) >> 7) % vocab;
    let layout = e.kv.layout();
    let mut samples = Vec::new();
    // Warm-up: page the weights in.
    e.prefill(&mut e.new_sequence(), &[1, 2, 3, 4], LogitsWanted::Last)?;
    for &n in shapes.prefill {
        let prompt: Vec<u32> = (0..n).map(token).collect();
        for _ in 0..shapes.reps {
            let mut seq = e.new_sequence();
            let t = Instant::now();
            e.prefill(&mut seq, &prompt, LogitsWanted::Last)?;
            samples.push(Sample {
                work: Work::prefill(0, n),
                seconds: t.elapsed().as_secs_f64(),
            });
        }
    }
    // Decode steps over sequences whose caches are marked full without computing them:
    // a step's time does not depend on the values it reads.
    let steps = 4 + 4 * shapes.reps;
    let seqs = |b: usize, ctx: usize, extra: usize| -> anyhow::Result<Vec<engine::KvSequence>> {
        (0..b)
            .map(|_| {
                let mut s = e.new_sequence();
                s.reserve(ctx + extra)?;
                s.set_filled(ctx);
                Ok(s)
            })
            .collect()
    };
    for &(b, ctx) in shapes.decode {
        let mut batch = seqs(b, ctx, steps + 1)?;
        let mut times = Vec::new();
        for i in 0..steps {
            let mut items: Vec<(&mut engine::KvSequence, u32)> =
                batch.iter_mut().map(|s| (s, token(i))).collect();
            let t = Instant::now();
            e.decode_step(&mut items)?;
            if i >= 4 {
                times.push((t.elapsed().as_secs_f64(), b * (ctx + i + 1)));
            }
        }
        samples.extend(times.into_iter().map(|(seconds, context)| Sample {
            work: Work::decode(b, context),
            seconds,
        }));
    }
    for &(b, ctx, chunk) in shapes.mixed {
        let prompt: Vec<u32> = (0..chunk).map(token).collect();
        for rep in 0..shapes.reps {
            let mut batch = seqs(b, ctx, 2)?;
            let mut fresh = e.new_sequence();
            fresh.reserve(chunk)?;
            let toks: Vec<[u32; 1]> = (0..b).map(|i| [token(i + rep)]).collect();
            let mut items: Vec<ForwardItem<'_>> = batch
                .iter_mut()
                .zip(&toks)
                .map(|(seq, t)| ForwardItem {
                    seq,
                    tokens: t,
                    logits: LogitsWanted::Last,
                })
                .collect();
            items.push(ForwardItem {
                seq: &mut fresh,
                tokens: &prompt,
                logits: LogitsWanted::Last,
            });
            let t = Instant::now();
            e.model.forward(&mut items)?;
            samples.push(Sample {
                work: Work::decode(b, b * (ctx + 1)) + Work::prefill(0, chunk),
                seconds: t.elapsed().as_secs_f64(),
            });
        }
    }
    Ok(Measured {
        threads,
        model_id: e.frontend.model_id.clone(),
        fingerprint: e.frontend.fingerprint,
        kv_bytes_per_token: (layout.block_bytes() / layout.block_size) as u64,
        samples,
    })
}

/// Loopback TCP: the time of three request/response round trips (a disaggregated request's
/// Reserve, Prefill and Generate calls, before their own work) and bulk throughput.
pub fn link() -> anyhow::Result<scheduler::plan::cost::LinkCost> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    const BULK: usize = 64 << 20;
    const ROUNDS: usize = 200;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        for _ in 0..ROUNDS {
            s.read_exact(&mut b)?;
            s.write_all(&b)?;
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut left = BULK;
        while left > 0 {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            left -= n.min(left);
        }
        s.write_all(&[1])
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut b = [7u8; 64];
    let t = Instant::now();
    for _ in 0..ROUNDS {
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
    }
    let rtt = t.elapsed().as_secs_f64() / ROUNDS as f64;
    let chunk = vec![3u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..BULK >> 20 {
        c.write_all(&chunk)?;
    }
    c.read_exact(&mut b[..1])?;
    let secs = t.elapsed().as_secs_f64();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the link measurement's server panicked"))??;
    Ok(scheduler::plan::cost::LinkCost {
        calls_s: 3.0 * rtt,
        tcp_bytes_per_s: BULK as f64 / secs,
    })
}
