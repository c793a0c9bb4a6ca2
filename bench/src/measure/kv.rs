//! `tandem kv bench`: how fast each KV transport moves a prompt's KV, against what the machine
//! can do at all — memcpy for shared memory, a raw loopback socket for TCP — measured in one
//! run, alternating; each ratio is the median over rounds of the ratio within a round, and
//! the ratio of the two sides' best rounds.
//!
//! - shm: a prefill worker writes slabs into the blocks of a decode worker's shared pool file
//!   through its own mapping (`KvPool::attach`). In a real prefill the forward pass writes
//!   there directly, so the transfer costs nothing beyond this write; measured here as slab
//!   copies into the shared mapping vs the same copies between private buffers, and vs the
//!   same copies into a private pool.
//! - tcp: the data plane (`kv_store::tcp`) as the prefill worker's sender thread runs it: a
//!   frame of slabs per layer from a `KvSender` to a `KvReceiver` that has the kernel write
//!   each into its block, then the end frame with the checksum, vs a socket streaming the
//!   same bytes in 1 MiB writes read into one 256 KiB buffer that stays in cache (what the
//!   socket can do at all) — with plain reads and with reads that wait for all 256 KiB, the
//!   faster of the two over the run; the three transfers in rotating order. The checksum
//!   itself is summed by the forward pass's layer hook while each layer is in cache: its rate
//!   is reported beside, as is the rate of the decode worker's check over the blocks.

use clap::Args;
use engine::config::LlamaConfig;
use engine::kv::{KvDtype, KvLayout};
use engine::{KvPool, KvSequence};
use kv_store::tcp::{ConnId, KvReceiver, KvSender, SlabSink, Slot};
use protocol::LeaseId;

/// The one lease the bench's transfers name.
const LEASE: LeaseId = LeaseId([1; 16]);
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct KvBenchArgs {
    /// MiB of KV per round, in the model's f16 geometry (SmolLM2-135M: 30 layers, 192 K/V
    /// values per position; 32 MiB is a ~1,400-token prompt's KV). Short rounds, many of them: a pair of
    /// measurements taken close together sees the same machine.
    #[arg(long, default_value_t = 32)]
    pub mib: usize,
    /// Rounds; the report gives the median of the per-round ratios, and the ratio of the bests.
    #[arg(long, default_value_t = 31)]
    pub rounds: usize,
    /// Leave threads where the OS puts them. By default (on 2+ cores) the receiving threads
    /// run on core 1 and the sending one on core 0, for the data plane and the raw socket
    /// alike, as `tandem up --pin` places a decode and a prefill worker: left to the OS, the
    /// two ends sometimes share a core and a round's figure halves.
    #[arg(long)]
    pub no_pin: bool,
    /// The model whose KV geometry is moved (a GGUF; default: the default model).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn gbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// The decode side of the TCP bench: slabs land in `seq`'s blocks.
struct Sink {
    seq: Mutex<KvSequence>,
    done: Mutex<mpsc::Sender<u64>>,
    /// Bytes the data plane was given places for, and transfers ended.
    landed: AtomicU64,
    transfers: AtomicU64,
}

unsafe impl SlabSink for Sink {
    fn slots(
        &self,
        _conn: ConnId,
        _lease: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    ) {
        let mut s = self.seq.lock().unwrap();
        out.extend(blocks.iter().map(|&b| {
            let ptr = s.slab_mut_ptr(b as usize, layer as usize).ok()?;
            self.landed.fetch_add(len as u64, Ordering::Relaxed);
            Some(Slot { ptr, len })
        }));
    }
    fn end(&self, _conn: ConnId, _lease: LeaseId, _slabs: u32, checksum: u64) {
        self.transfers.fetch_add(1, Ordering::Relaxed);
        let _ = self.done.lock().unwrap().send(checksum);
    }
    fn abort(&self, _conn: ConnId, _lease: LeaseId) {}
}

/// Runs the bench over `model`'s KV geometry; `pin(cores)` moves the calling thread to those
/// cores (threads started after inherit it).
pub fn run(
    args: &KvBenchArgs,
    model: &LlamaConfig,
    pin: &dyn Fn(&[usize]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let l = KvLayout::for_model(model, KvDtype::F16);
    let slab = 2 * l.plane_bytes();
    let blocks = ((args.mib << 20) / (slab * l.n_layers)).max(1);
    let bytes = blocks * l.n_layers * slab;
    eprintln!(
        "tandem: {blocks} blocks × {} layers × {slab}-byte slabs = {:.0} MiB per round",
        l.n_layers,
        bytes as f64 / (1 << 20) as f64
    );
    let src: Vec<u8> = (0..slab * l.n_layers)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect();

    // Shared memory: the decode worker's pool file, the prefill worker's view of it.
    let dir = kv_store::shm::dir();
    let path = kv_store::shm::pool_path(&dir);
    let owner = KvPool::new_shared(l, blocks, &path)?;
    let mut held = KvSequence::new(owner.clone());
    held.reserve(blocks * l.block_size)?;
    let view = KvPool::attach(l, blocks, &path)?;
    let mut lent = KvSequence::adopt(view, held.block_table().to_vec(), 0)?;
    let mut private = vec![0u8; bytes];
    // Touch every page once (a pool's pages are committed on first use, then reused).
    for b in 0..blocks {
        for layer in 0..l.n_layers {
            lent.write_slab(b, layer, &src[layer * slab..][..slab])?;
        }
    }
    private.iter_mut().step_by(4096).for_each(|b| *b = 1);

    // The same writes into a private (anonymous) pool: what the mapping itself costs.
    let anon = KvPool::new(l, blocks);
    let mut anon_seq = KvSequence::new(anon);
    anon_seq.reserve(blocks * l.block_size)?;
    for b in 0..blocks {
        for layer in 0..l.n_layers {
            anon_seq.write_slab(b, layer, &src[layer * slab..][..slab])?;
        }
    }

    // TCP: the data plane into the same blocks (through another view: the lease's), and a
    // raw socket. Their receiving threads are started on core 1 (threads inherit the
    // affinity of the thread that starts them), the sender then moves to core 0.
    let pinned = !args.no_pin && std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    if pinned {
        pin(&[1])?;
    }
    let (done_tx, done_rx) = mpsc::channel();
    let sink = Arc::new(Sink {
        seq: Mutex::new(KvSequence::adopt(
            KvPool::attach(l, blocks, &path)?,
            held.block_table().to_vec(),
            0,
        )?),
        done: Mutex::new(done_tx),
        landed: AtomicU64::new(0),
        transfers: AtomicU64::new(0),
    });
    let receiver = KvReceiver::bind("127.0.0.1:0", sink.clone(), None, Default::default())?;
    let mut sender = KvSender::connect(&receiver.local_addr().to_string(), None)?;
    let (raw_addr, raw_reader) = spawn_raw_reader(false, 0)?;
    let (wait_addr, wait_reader) = spawn_raw_reader(true, 0)?;
    if pinned {
        pin(&[0])?;
    }
    let mut raw = std::net::TcpStream::connect(raw_addr)?;
    raw.set_nodelay(true)?;
    let mut raw_wait = std::net::TcpStream::connect(wait_addr)?;
    raw_wait.set_nodelay(true)?;
    let chunk = vec![7u8; 1 << 20];

    // Every series is measured once per round; ratios are taken within a round (both sides
    // under the same load from the rest of the machine), then the median over rounds.
    let mut m = Series::default();
    for round in 0..args.rounds {
        m.time("memcpy", bytes, || {
            for (i, dst) in private.chunks_exact_mut(slab).enumerate() {
                dst.copy_from_slice(&src[(i % l.n_layers) * slab..][..slab]);
            }
            std::hint::black_box(&private);
        });
        // In the pool's storage order (a bulk copy's order), then layer by layer (the order
        // a forward pass produces), into the shared pool and into a private one.
        m.time("shm", bytes, || {
            for b in 0..blocks {
                for layer in 0..l.n_layers {
                    lent.write_slab(b, layer, &src[layer * slab..][..slab])
                        .expect("the bench holds its blocks alone");
                }
            }
        });
        m.time("private", bytes, || {
            for b in 0..blocks {
                for layer in 0..l.n_layers {
                    anon_seq
                        .write_slab(b, layer, &src[layer * slab..][..slab])
                        .expect("the bench holds its blocks alone");
                }
            }
        });
        m.time("shm_layers", bytes, || {
            for layer in 0..l.n_layers {
                for b in 0..blocks {
                    lent.write_slab(b, layer, &src[layer * slab..][..slab])
                        .expect("the bench holds its blocks alone");
                }
            }
        });
        m.time("private_layers", bytes, || {
            for layer in 0..l.n_layers {
                for b in 0..blocks {
                    anon_seq
                        .write_slab(b, layer, &src[layer * slab..][..slab])
                        .expect("the bench holds its blocks alone");
                }
            }
        });

        // The forward pass's layer hook: the checksum of each layer's slabs while they are in
        // cache (the slabs here are always in cache).
        let mut sum = kv_store::Checksum::new();
        m.time("checksum_hook", bytes, || {
            for layer in 0..l.n_layers {
                for _ in 0..blocks {
                    sum.update(&src[layer * slab..][..slab]);
                }
            }
        });
        // The prefill worker's sender thread: each layer's slabs in one frame, then the end
        // frame with the hook's checksum; done when the receiver has every byte in its blocks.
        let mut tcp = |m: &mut Series| {
            m.try_time("tcp", bytes, || {
                for layer in 0..l.n_layers {
                    let s = &src[layer * slab..][..slab];
                    let frames: Vec<(u32, &[u8])> = (0..blocks).map(|b| (b as u32, s)).collect();
                    sender.slabs(LEASE, layer as u32, &frames)?;
                }
                sender.end(LEASE, (blocks * l.n_layers) as u32, sum.digest())?;
                let got = done_rx.recv()?;
                anyhow::ensure!(got == sum.digest(), "the TCP transfer's checksum differs");
                Ok(())
            })
        };
        // The three transfers in rotating order: the first socket transfer after the
        // compute-only series above measures slower, whichever it is (a fixed order put the
        // data plane there in every round and cost it 10-30% against the socket).
        for i in 0..3 {
            match (round + i) % 3 {
                0 => tcp(&mut m)?,
                1 => m.try_time("socket_plain", bytes, || raw_round(&mut raw, &chunk, bytes))?,
                _ => m.try_time("socket_wait", bytes, || {
                    raw_round(&mut raw_wait, &chunk, bytes)
                })?,
            }
        }
        // The decode worker's check of a commit: the checksum over its blocks, from memory.
        m.time("checksum", bytes, || {
            std::hint::black_box(kv_store::sequence_checksum(&held, 0..blocks));
        });
    }
    // What arrived over TCP is what was sent.
    let check = kv_store::sequence_checksum(&held, 0..blocks);
    let mut want = kv_store::Checksum::new();
    for layer in 0..l.n_layers {
        for _ in 0..blocks {
            want.update(&src[layer * slab..][..slab]);
        }
    }
    anyhow::ensure!(
        check == want.digest(),
        "the blocks do not hold what was sent"
    );
    drop((raw, raw_wait));
    let _ = (raw_reader.join(), wait_reader.join());
    // The raw socket's baseline: its faster read strategy in this run (by median; taking the
    // faster of the two in each round would favour it by the noise alone).
    let (raw_best, raw_label) = if m.median("socket_plain") >= m.median("socket_wait") {
        (
            "socket_plain",
            "raw loopback socket (1 MiB writes, plain 256 KiB reads: the faster of two ways this run)",
        )
    } else {
        (
            "socket_wait",
            "raw loopback socket (1 MiB writes, 256 KiB reads waiting for all: the faster of two ways this run)",
        )
    };
    m.0.push(("socket", m.get(raw_best).to_vec()));

    println!(
        "| transport | GB/s | baseline | baseline GB/s | ratio: median of {} rounds' ratios | best / best |",
        args.rounds
    );
    println!("|---|---|---|---|---|---|");
    let rows = [
        (
            "shm",
            "shm: slab writes into the shared pool, storage order",
            "memcpy",
            "memcpy (same slabs, private memory)",
        ),
        (
            "private",
            "the same writes into a private pool (anonymous mapping)",
            "memcpy",
            "memcpy",
        ),
        (
            "shm_layers",
            "shm, layer by layer (a forward pass's order)",
            "memcpy",
            "memcpy",
        ),
        (
            "shm_layers",
            "shm, layer by layer",
            "private_layers",
            "the same order into a private pool",
        ),
        (
            "tcp",
            "tcp: a layer's slabs per frame into the blocks",
            "socket",
            raw_label,
        ),
    ];
    let mut json = serde_json::Map::new();
    for (what, label, base, base_label) in rows {
        let (r, best) = (m.ratio(what, base), m.best(what) / m.best(base));
        println!(
            "| {label} | {:.2} | {base_label} | {:.2} | {:.0}% | {:.0}% |",
            m.median(what),
            m.median(base),
            100.0 * r,
            100.0 * best
        );
        json.insert(format!("{what}_vs_{base}"), r.into());
        json.insert(format!("{what}_vs_{base}_best"), best.into());
    }
    println!(
        "| CRC-32 of slabs in cache (the prefill's layer hook) | {:.2} | | | | |",
        m.median("checksum_hook")
    );
    println!(
        "| CRC-32 over the blocks in memory (the decode worker's commit check) | {:.2} | | | | |",
        m.median("checksum")
    );
    for (k, _) in &m.0 {
        json.insert(format!("{k}_gbs"), m.median(k).into());
    }
    if std::env::var_os("TANDEM_KV_BENCH_ROUNDS").is_some() {
        for (k, v) in &m.0 {
            eprintln!(
                "{k:>16}: {}",
                v.iter()
                    .map(|x| format!("{x:5.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    json.insert("bytes".into(), bytes.into());
    json.insert("blocks".into(), blocks.into());
    json.insert("layers".into(), l.n_layers.into());
    json.insert("slab_bytes".into(), slab.into());
    json.insert("blocks_checksum".into(), check.into());
    json.insert(
        "tcp_transfers".into(),
        sink.transfers.load(Ordering::Relaxed).into(),
    );
    json.insert(
        "tcp_landed_bytes".into(),
        sink.landed.load(Ordering::Relaxed).into(),
    );
    json.insert("rounds".into(), args.rounds.into());
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}

/// A raw loopback socket's reading end, on a thread: each round is a length then that many
/// bytes, read 256 KiB at a time into one buffer (which stays in cache: what the socket can
/// do at all), with plain reads or, `wait`, reads that wait for all 256 KiB (`MSG_WAITALL`,
/// as the data plane's receiver reads; which is faster depends on the host's load);
/// acknowledged with one byte. With `into` bytes (0: none), reads go one after another
/// through a buffer that large instead (a round as large lands in memory, as a fetch's does).
pub(crate) fn spawn_raw_reader(
    wait: bool,
    into: usize,
) -> std::io::Result<(
    std::net::SocketAddr,
    std::thread::JoinHandle<std::io::Result<()>>,
)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = listener.accept()?;
        c.set_nodelay(true)?;
        let step = 256 << 10;
        let mut buf = vec![0u8; into.max(step)];
        loop {
            let mut len = [0u8; 8];
            if c.read_exact(&mut len).is_err() {
                return Ok(());
            }
            let (mut left, mut at) = (u64::from_le_bytes(len) as usize, 0);
            while left > 0 {
                let n = left.min(step);
                if at + n > buf.len() {
                    at = 0;
                }
                if wait {
                    kv_store::tcp::recv_exact_waitall(&c, &mut buf[at..at + n])?;
                } else {
                    c.read_exact(&mut buf[at..at + n])?;
                }
                left -= n;
                at = if into > 0 { at + n } else { 0 };
            }
            c.write_all(&[1])?;
        }
    });
    Ok((addr, reader))
}

/// One raw-socket round: `bytes` sent from `chunk` (1 MiB writes), then the reader's ack.
pub(crate) fn raw_round(
    raw: &mut std::net::TcpStream,
    chunk: &[u8],
    bytes: usize,
) -> anyhow::Result<()> {
    raw.write_all(&(bytes as u64).to_le_bytes())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        raw.write_all(&chunk[..n])?;
        left -= n;
    }
    let mut ack = [0u8; 1];
    raw.read_exact(&mut ack)?;
    Ok(())
}

/// One raw-socket round of `parts`, each written whole and in order (bytes in memory, not a
/// buffer in cache), then the reader's ack.
pub(crate) fn raw_round_parts(
    raw: &mut std::net::TcpStream,
    parts: &[impl AsRef<[u8]>],
) -> anyhow::Result<()> {
    let bytes: usize = parts.iter().map(|p| p.as_ref().len()).sum();
    raw.write_all(&(bytes as u64).to_le_bytes())?;
    for p in parts {
        raw.write_all(p.as_ref())?;
    }
    let mut ack = [0u8; 1];
    raw.read_exact(&mut ack)?;
    Ok(())
}

/// GB/s per named measurement, one entry per round.
#[derive(Default)]
pub(crate) struct Series(Vec<(&'static str, Vec<f64>)>);

impl Series {
    pub(crate) fn push(&mut self, name: &'static str, gbs: f64) {
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(gbs),
            None => self.0.push((name, vec![gbs])),
        }
    }
    pub(crate) fn time(&mut self, name: &'static str, bytes: usize, f: impl FnOnce()) {
        let t = Instant::now();
        f();
        self.push(name, gbs(bytes, t.elapsed().as_secs_f64()));
    }
    pub(crate) fn try_time(
        &mut self,
        name: &'static str,
        bytes: usize,
        f: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let t = Instant::now();
        f()?;
        self.push(name, gbs(bytes, t.elapsed().as_secs_f64()));
        Ok(())
    }
    pub(crate) fn get(&self, name: &str) -> &[f64] {
        &self.0.iter().find(|(n, _)| *n == name).expect("measured").1
    }
    pub(crate) fn median(&self, name: &str) -> f64 {
        median(self.get(name).to_vec())
    }
    /// The fastest round: what the path does when nothing else on the machine gets in the way
    /// (interference only ever slows a round down).
    pub(crate) fn best(&self, name: &str) -> f64 {
        self.get(name).iter().copied().fold(0.0, f64::max)
    }
    /// Median over rounds of `a / b` within each round.
    pub(crate) fn ratio(&self, a: &str, b: &str) -> f64 {
        median(
            self.get(a)
                .iter()
                .zip(self.get(b))
                .map(|(x, y)| x / y)
                .collect(),
        )
    }
}
