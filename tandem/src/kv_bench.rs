//! `tandem kv bench`: how fast each KV transport moves a prompt's KV, against what the machine
//! can do at all — memcpy for shared memory, a raw loopback socket for TCP — measured in one
//! run, alternating, median of the rounds.
//!
//! - shm: a prefill worker writes slabs into the blocks of a decode worker's shared pool file
//!   through its own mapping (`KvPool::attach`). In a real prefill the forward pass writes
//!   there directly, so the transfer costs nothing beyond this write; measured here as slab
//!   copies into the shared mapping vs the same copies between private buffers.
//! - tcp: the data plane (`kv_store::tcp`): framed slabs from a `KvSender` to a `KvReceiver`
//!   that copies each into its block, vs one socket streaming the same bytes in
//!   1 MiB writes into one buffer; and the same frames without the sender's checksum pass,
//!   which separates the transport's cost from the integrity check's.

use clap::Args;
use engine::kv::{KvDtype, KvLayout};
use engine::{KvPool, KvSequence};
use kv_store::tcp::{KvReceiver, KvSender, SlabSink, Slot};
use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct KvBenchArgs {
    /// MiB of KV per round (SmolLM2-135M's f16 geometry: 30 layers, 192 K/V values per position).
    #[arg(long, default_value_t = 256)]
    pub mib: usize,
    /// Rounds per transport; the report gives the median.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

fn layout() -> KvLayout {
    KvLayout {
        n_layers: 30,
        kv_dim: 192,
        head_dim: 64,
        block_size: engine::kv::BLOCK_SIZE,
        dtype: KvDtype::F16,
    }
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
}

impl SlabSink for Sink {
    fn slot(&self, _lease: u64, block: u32, layer: u32, len: usize) -> Option<Slot> {
        let mut s = self.seq.lock().unwrap();
        Some(Slot {
            ptr: s.slab_mut_ptr(block as usize, layer as usize),
            len,
        })
    }
    fn end(&self, _lease: u64, _slabs: u32, checksum: u64) {
        let _ = self.done.lock().unwrap().send(checksum);
    }
    fn abort(&self, _lease: u64) {}
}

pub fn run(args: KvBenchArgs) -> anyhow::Result<()> {
    let l = layout();
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
            lent.write_slab(b, layer, &src[layer * slab..][..slab]);
        }
    }
    private.iter_mut().step_by(4096).for_each(|b| *b = 1);

    // The same writes into a private (anonymous) pool: what the mapping itself costs.
    let anon = KvPool::new(l, blocks);
    let mut anon_seq = KvSequence::new(anon);
    anon_seq.reserve(blocks * l.block_size)?;
    for b in 0..blocks {
        for layer in 0..l.n_layers {
            anon_seq.write_slab(b, layer, &src[layer * slab..][..slab]);
        }
    }

    // TCP: the data plane into the same blocks (through another view: the lease's), and a
    // raw socket.
    let (done_tx, done_rx) = mpsc::channel();
    let sink = Arc::new(Sink {
        seq: Mutex::new(KvSequence::adopt(
            KvPool::attach(l, blocks, &path)?,
            held.block_table().to_vec(),
            0,
        )?),
        done: Mutex::new(done_tx),
    });
    let receiver = KvReceiver::bind("127.0.0.1:0", sink.clone())?;
    let mut sender = KvSender::connect(&receiver.local_addr().to_string())?;
    let raw_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let raw_addr = raw_listener.local_addr()?;
    let raw_reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = raw_listener.accept()?;
        c.set_nodelay(true)?;
        // Reads of the data plane receiver's size (256 KiB), which was the faster here.
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let mut len = [0u8; 8];
            if c.read_exact(&mut len).is_err() {
                return Ok(());
            }
            let mut left = u64::from_le_bytes(len) as usize;
            while left > 0 {
                let n = left.min(buf.len());
                c.read_exact(&mut buf[..n])?;
                left -= n;
            }
            c.write_all(&[1])?;
        }
    });
    let mut raw = std::net::TcpStream::connect(raw_addr)?;
    raw.set_nodelay(true)?;
    let chunk = vec![7u8; 1 << 20];

    let (mut memcpy, mut shm, mut shm_layers, mut anon_pool, mut tcp, mut tcp_bare, mut sock) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..args.rounds {
        let t = Instant::now();
        for (i, dst) in private.chunks_exact_mut(slab).enumerate() {
            dst.copy_from_slice(&src[(i % l.n_layers) * slab..][..slab]);
        }
        std::hint::black_box(&private);
        memcpy.push(gbs(bytes, t.elapsed().as_secs_f64()));

        // In the pool's storage order (a bulk copy's order), then layer by layer (the order
        // a forward pass produces).
        let t = Instant::now();
        for b in 0..blocks {
            for layer in 0..l.n_layers {
                lent.write_slab(b, layer, &src[layer * slab..][..slab]);
            }
        }
        shm.push(gbs(bytes, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        for b in 0..blocks {
            for layer in 0..l.n_layers {
                anon_seq.write_slab(b, layer, &src[layer * slab..][..slab]);
            }
        }
        anon_pool.push(gbs(bytes, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        for layer in 0..l.n_layers {
            for b in 0..blocks {
                lent.write_slab(b, layer, &src[layer * slab..][..slab]);
            }
        }
        shm_layers.push(gbs(bytes, t.elapsed().as_secs_f64()));

        let t = Instant::now();
        let mut sum = kv_store::Checksum::new();
        for layer in 0..l.n_layers {
            // As the prefill worker's push thread: a layer's slabs, hashed, in one batch.
            let s = &src[layer * slab..][..slab];
            let frames: Vec<(u32, &[u8])> = (0..blocks)
                .map(|b| {
                    sum.update(s);
                    (b as u32, s)
                })
                .collect();
            sender.slabs(1, layer as u32, &frames)?;
        }
        sender.end(1, (blocks * l.n_layers) as u32, sum.digest())?;
        let got = done_rx.recv()?;
        tcp.push(gbs(bytes, t.elapsed().as_secs_f64()));
        anyhow::ensure!(got == sum.digest(), "the TCP transfer's checksum differs");

        // The same frames without the sender's hashing pass: the transport alone.
        let t = Instant::now();
        for layer in 0..l.n_layers {
            let s = &src[layer * slab..][..slab];
            let frames: Vec<(u32, &[u8])> = (0..blocks).map(|b| (b as u32, s)).collect();
            sender.slabs(1, layer as u32, &frames)?;
        }
        sender.end(1, (blocks * l.n_layers) as u32, sum.digest())?;
        done_rx.recv()?;
        tcp_bare.push(gbs(bytes, t.elapsed().as_secs_f64()));

        let t = Instant::now();
        raw.write_all(&(bytes as u64).to_le_bytes())?;
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            raw.write_all(&chunk[..n])?;
            left -= n;
        }
        let mut ack = [0u8; 1];
        raw.read_exact(&mut ack)?;
        sock.push(gbs(bytes, t.elapsed().as_secs_f64()));
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
    let t = Instant::now();
    std::hint::black_box(kv_store::sequence_checksum(&held, 0..blocks));
    let hash = gbs(bytes, t.elapsed().as_secs_f64());
    drop(raw);
    let _ = raw_reader.join();

    let (memcpy, shm, shm_layers, anon_pool, tcp, tcp_bare, sock) = (
        median(memcpy),
        median(shm),
        median(shm_layers),
        median(anon_pool),
        median(tcp),
        median(tcp_bare),
        median(sock),
    );
    println!("| transport | GB/s | baseline | baseline GB/s | ratio |");
    println!("|---|---|---|---|---|");
    println!(
        "| shm (slab writes into the shared pool) | {shm:.2} | memcpy (same slabs, private memory) | {memcpy:.2} | {:.0}% |",
        100.0 * shm / memcpy
    );
    println!(
        "| shm, layer by layer (a forward pass's order) | {shm_layers:.2} | memcpy | {memcpy:.2} | {:.0}% |",
        100.0 * shm_layers / memcpy
    );
    println!(
        "| the same slab writes into a private pool (anonymous mapping) | {anon_pool:.2} | memcpy | {memcpy:.2} | {:.0}% |",
        100.0 * anon_pool / memcpy
    );
    println!(
        "| tcp (framed slabs into the blocks, checksummed) | {tcp:.2} | raw loopback socket (1 MiB writes, 256 KiB reads) | {sock:.2} | {:.0}% |",
        100.0 * tcp / sock
    );
    println!(
        "| tcp, the same frames without the sender's hashing pass | {tcp_bare:.2} | raw loopback socket | {sock:.2} | {:.0}% |",
        100.0 * tcp_bare / sock
    );
    println!("| CRC-32 checksum over the blocks | {hash:.2} | | | |");
    println!(
        "{}",
        serde_json::json!({
            "bytes": bytes, "rounds": args.rounds,
            "shm_gbs": shm, "shm_layer_order_gbs": shm_layers, "memcpy_gbs": memcpy, "private_pool_gbs": anon_pool, "shm_ratio": shm / memcpy,
            "tcp_gbs": tcp, "tcp_unhashed_gbs": tcp_bare, "socket_gbs": sock, "tcp_ratio": tcp / sock, "checksum_gbs": hash,
        })
    );
    Ok(())
}
