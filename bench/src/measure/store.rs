//! `tandem kv store-bench`: how fast the pooled store hands a prompt's prefix back, against what
//! the machine can do at all — measured in one run, rounds alternating, each ratio the median
//! of the per-round ratios:
//!
//! - **RAM tier over TCP**: a `tandem kv-store` (in this process, on loopback) holding a
//!   prompt's blocks; a fetch as a decode worker makes it — one get frame, the got frame, the
//!   slabs written by the kernel straight into a sequence's blocks — against the raw loopback
//!   socket of `tandem kv bench` (1 MiB writes into a 256 KiB buffer that stays in cache: the
//!   socket's peak, with none of the fetch's reads and writes of memory), and against the same
//!   socket moving the same blocks from memory into a buffer as large (the socket doing the
//!   fetch's memory traffic, without its frames and its scatter into blocks).
//! - **RAM tier over shared memory**: the same store copying the blocks straight into a
//!   decode worker's shared pool as a worker fetches (blocks lent through the pool's fence,
//!   the get into the pool — lease, each block copied whole, release — and the blocks taken
//!   back), against copying the same bytes from memory into private memory with `memcpy`,
//!   block by block.
//! - **Disk tier**: the same fetch from a store whose RAM holds none of them (every block read
//!   from its file, checked, and sent), against reading the same files in a row as `dd` does
//!   (`read(2)` into one 1 MiB buffer; in this process, so that starting a `dd` per file does
//!   not flatter the store). Both from the page cache: the files were just written; a cold
//!   disk is slower for both.

use super::kv::{Series, raw_round, raw_round_parts, spawn_raw_reader};
use anyhow::Context;
use engine::config::LlamaConfig;
use engine::kv::{KvDtype, KvLayout};
use engine::{KvPool, KvSequence};
use frontend::block::BlockHash;
use kv_store::shm::fence::Fence;
use kv_store::store::client::StoreClient;
use kv_store::store::fetch::SequenceSink;
use kv_store::store::pool::PoolTarget;
use kv_store::store::{BlockShape, Limits, Store};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct StoreBenchArgs {
    /// MiB of KV per round (SmolLM2-135M: 32 MiB is a ~1,400-token prompt's KV).
    #[arg(long, default_value_t = 32)]
    pub mib: usize,
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
    /// The model whose KV geometry is moved (default: the default model).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
}

/// A store serving on loopback until the runtime drops.
async fn serve(rt: &tokio::runtime::Runtime, limits: Limits) -> anyhow::Result<StoreClient> {
    let store = Arc::new(Store::open(limits.clone())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    rt.spawn(kv_store::store::service::serve(
        store,
        limits,
        listener,
        "127.0.0.1:0",
        "127.0.0.1",
        None,
        std::future::pending(),
    ));
    StoreClient::new(&addr, None).map_err(anyhow::Error::msg)
}

pub fn run(args: &StoreBenchArgs, model: &LlamaConfig) -> anyhow::Result<()> {
    let l = KvLayout::for_model(model, KvDtype::F16);
    let shape = BlockShape {
        slab_bytes: (2 * l.plane_bytes()) as u32,
        slabs: l.n_layers as u32,
    };
    let n = ((args.mib << 20) / shape.bytes()).max(1);
    let bytes = n * shape.bytes();
    eprintln!(
        "tandem: {n} blocks of {} KiB = {:.0} MiB per round",
        shape.bytes() >> 10,
        bytes as f64 / (1 << 20) as f64
    );
    let hashes: Vec<BlockHash> = (0..n as u64).map(|i| BlockHash(0xbe7c_0000 + i)).collect();
    let payloads: Vec<Arc<[u8]>> = (0..n)
        .map(|b| {
            (0..shape.bytes())
                .map(|i| ((i * 31 + b * 7) % 251) as u8 | 1)
                .collect::<Vec<u8>>()
                .into()
        })
        .collect();
    let disk = tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (ram, on_disk) = rt.block_on(async {
        let ram = serve(
            &rt,
            Limits {
                ram_bytes: 2 * bytes,
                staging_bytes: 2 * bytes,
                ..Limits::default()
            },
        )
        .await?;
        // RAM for one block: every other block is spilled to disk as the put lands.
        let on_disk = serve(
            &rt,
            Limits {
                ram_bytes: shape.bytes(),
                staging_bytes: 2 * bytes,
                disk: Some((disk.clone(), 4 * bytes as u64)),
                ..Limits::default()
            },
        )
        .await?;
        for c in [&ram, &on_disk] {
            c.put(&hashes, shape, payloads.clone()).await?;
        }
        anyhow::Ok((ram, on_disk))
    })?;
    // Wait until both published every block (the end frame is handled on the store's thread).
    let held = |c: &StoreClient| rt.block_on(c.lookup(&hashes)).map(|t| t.len()).unwrap_or(0);
    let t0 = std::time::Instant::now();
    while held(&ram) < n || held(&on_disk) < n {
        anyhow::ensure!(
            t0.elapsed().as_secs() < 30,
            "the store never held the blocks"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let files = block_files(&disk)?;
    // The disk tier's own read path, in this process (no socket): lease, then each block read
    // from its file and checked, as the store's fetch does before it sends.
    let local_dir = disk.join("local");
    let local = Store::open(Limits {
        ram_bytes: shape.bytes(),
        staging_bytes: 2 * bytes,
        disk: Some((local_dir.clone(), 4 * bytes as u64)),
        ..Limits::default()
    })?;
    let put = local.put_start(&hashes, shape)?;
    let mut sum = kv_store::Checksum::new();
    let len = shape.slab_bytes as usize;
    for layer in 0..l.n_layers {
        for (i, p) in payloads.iter().enumerate() {
            local.write(put.id, i, layer, &p[layer * len..][..len])?;
            sum.update(&p[layer * len..][..len]);
        }
    }
    local.put_end(put.id, None, sum.digest())?;
    let local_files = block_files(&local_dir)?;
    anyhow::ensure!(
        local_files.len() + 1 >= n,
        "{} of {n} blocks on disk",
        local_files.len()
    );
    let read_local = || -> anyhow::Result<()> {
        let lease = local.lease(&hashes, shape, n).context("leased")?;
        for (h, _) in &lease.blocks {
            std::hint::black_box(local.read(lease.id, *h)?);
        }
        local.release(lease.id);
        Ok(())
    };
    anyhow::ensure!(
        files.len() + 1 >= n,
        "{} of {n} blocks on disk",
        files.len()
    );

    let pool = KvPool::new(l, n);
    let mut seq = KvSequence::new(pool);
    seq.reserve(n * l.block_size)?;
    // Fetched slabs land in a sequence's blocks, as in a worker.
    let into = Arc::new(SequenceSink::new(seq, 0, n));
    // A decode worker's shared pool and its fence, the fetch's blocks lent to the store.
    let pool_path = kv_store::shm::pool_path(&kv_store::shm::dir());
    let shared = KvPool::new_shared(l, n, &pool_path)?;
    let fence = Fence::create(&pool_path, n as u32)?;
    let mut shared_seq = KvSequence::new(shared);
    shared_seq.reserve(n * l.block_size)?;
    let lent: Vec<u32> = shared_seq
        .writable_blocks(0..n)?
        .iter()
        .map(|b| b.0)
        .collect();
    let target = PoolTarget {
        path: pool_path.clone(),
        blocks: lent,
        tag: kv_store::shm::fence::lease_tag(&[0x5a; 16]),
    };
    // As a decode worker fetches: the blocks lent through the fence, the call, taken back.
    let fetch_shm = |c: &StoreClient| -> anyhow::Result<()> {
        fence.grant(&target.blocks, target.tag)?;
        let (tiers, _) = rt.block_on(c.fetch_into(&hashes, shape, &target))?;
        anyhow::ensure!(
            fence.revoke(&target.blocks)?,
            "the store still holds the blocks"
        );
        anyhow::ensure!(tiers.len() == n, "copied {} of {n} blocks", tiers.len());
        Ok(())
    };
    let mut private = vec![1u8; bytes];
    let memcpy = |private: &mut Vec<u8>| {
        for (dst, p) in private.chunks_exact_mut(shape.bytes()).zip(&payloads) {
            dst.copy_from_slice(p);
        }
        std::hint::black_box(&private);
    };
    let (raw_addr, raw_reader) = spawn_raw_reader(false, 0)?;
    let mut raw = std::net::TcpStream::connect(raw_addr)?;
    raw.set_nodelay(true)?;
    // The same blocks' bytes from memory into memory as large: the socket doing a fetch's
    // work without its frames and scatter.
    let (mem_addr, mem_reader) = spawn_raw_reader(false, bytes)?;
    let mut raw_mem = std::net::TcpStream::connect(mem_addr)?;
    raw_mem.set_nodelay(true)?;
    let chunk = vec![7u8; 1 << 20];
    let fetch = |c: &StoreClient| -> anyhow::Result<()> {
        let (tiers, _) = rt.block_on(c.fetch(&hashes, shape, into.clone()))?;
        anyhow::ensure!(tiers.len() == n, "fetched {} of {n} blocks", tiers.len());
        Ok(())
    };
    let mut m = Series::default();
    for round in 0..args.rounds {
        // Rotating order: whichever transfer comes first in a round measures slower.
        m.try_time("disk_tier", bytes, read_local)?;
        m.try_time("read_local", bytes, || read_all(&local_files))?;
        for i in 0..7 {
            match (round + i) % 7 {
                0 => m.try_time("store_ram", bytes, || fetch(&ram))?,
                1 => m.try_time("socket", bytes, || raw_round(&mut raw, &chunk, bytes))?,
                5 => m.try_time("socket_mem", bytes, || {
                    raw_round_parts(&mut raw_mem, &payloads)
                })?,
                2 => m.try_time("store_disk", files.len() * shape.bytes(), || {
                    fetch(&on_disk)
                })?,
                3 => m.try_time("read", files.len() * shape.bytes(), || read_all(&files))?,
                4 => m.try_time("store_shm", bytes, || fetch_shm(&ram))?,
                _ => m.time("memcpy", bytes, || memcpy(&mut private)),
            }
        }
    }
    // What landed is what was put, over TCP and over shared memory.
    let seq = into.sequence();
    for (b, p) in payloads.iter().enumerate() {
        for layer in 0..l.n_layers {
            let want = &p[layer * shape.slab_bytes as usize..][..shape.slab_bytes as usize];
            anyhow::ensure!(
                seq.slab(b, layer) == want && shared_seq.slab(b, layer) == want,
                "block {b} layer {layer} differs"
            );
        }
    }
    drop(fence);
    drop((raw, raw_mem));
    let _ = (raw_reader.join(), mem_reader.join());
    let _ = std::fs::remove_dir_all(&disk);
    println!(
        "| read | GB/s | baseline | baseline GB/s | ratio: median of {} rounds' ratios | best / best |",
        args.rounds
    );
    println!("|---|---|---|---|---|---|");
    let mut json = serde_json::Map::new();
    for (what, label, base, base_label) in [
        (
            "store_ram",
            "store, RAM tier, over TCP into a sequence's blocks",
            "socket",
            "raw loopback socket",
        ),
        (
            "store_ram",
            "store, RAM tier, over TCP into a sequence's blocks",
            "socket_mem",
            "raw loopback socket, the same blocks from memory into memory",
        ),
        (
            "store_shm",
            "store, RAM tier, copied into a shared pool (a get into the pool)",
            "memcpy",
            "memcpy of the same blocks into private memory",
        ),
        (
            "store_disk",
            "store, disk tier, over TCP (files read, checked, sent)",
            "read",
            "the same files read in a row (as dd)",
        ),
        (
            "disk_tier",
            "the disk tier's reads in process (leased, read, checked)",
            "read_local",
            "the same files read in a row (as dd)",
        ),
    ] {
        let (r, best) = (m.ratio(what, base), m.best(what) / m.best(base));
        println!(
            "| {label} | {:.2} | {base_label} | {:.2} | {:.0}% | {:.0}% |",
            m.median(what),
            m.median(base),
            100.0 * r,
            100.0 * best
        );
        json.insert(format!("{what}_vs_{base}"), r.into());
        json.insert(format!("{what}_gbs"), m.median(what).into());
        json.insert(format!("{base}_gbs"), m.median(base).into());
    }
    json.insert("bytes".into(), bytes.into());
    json.insert("rounds".into(), args.rounds.into());
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("tandem-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Every block file under `dir`.
fn block_files(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir)? {
        for f in std::fs::read_dir(sub?.path())? {
            out.push(f?.path());
        }
    }
    out.sort();
    Ok(out)
}

/// The files read one after another, 1 MiB at a time into one buffer (what `dd bs=1M` does).
fn read_all(files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut f = std::fs::File::open(f)?;
        while f.read(&mut buf)? > 0 {}
    }
    std::hint::black_box(&buf);
    Ok(())
}
