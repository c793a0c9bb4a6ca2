//! The expert worker's server: answers runs of routed rows with its experts' outputs, one
//! thread per connection (a prefill or decode worker keeps one open).

use crate::wire::{self, Hello};
use engine::moe::shard::ExpertShard;
use kv_store::shm::mailbox::Mailbox;
use protocol::auth::{self, ClusterSecret, Plane};
use std::io::{self, BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// A listening expert worker.
pub struct ExpertServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl ExpertServer {
    /// Serves `shard` on `addr` (port 0 picks one) to peers that pass the handshake under
    /// `secret`, saying `fingerprint` (`wire::fingerprint` of the model file and precision);
    /// loads more experts from `source` (the model file) when asked, if given.
    pub fn bind(
        addr: &str,
        shard: ExpertShard,
        source: Option<PathBuf>,
        fingerprint: u64,
        secret: Option<ClusterSecret>,
    ) -> io::Result<ExpertServer> {
        Self::serve(TcpListener::bind(addr)?, shard, source, fingerprint, secret)
    }

    /// [`bind`](Self::bind) on a listener already bound.
    pub fn serve(
        listener: TcpListener,
        shard: ExpertShard,
        source: Option<PathBuf>,
        fingerprint: u64,
        secret: Option<ClusterSecret>,
    ) -> io::Result<ExpertServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let hello = Hello {
            n_layers: shard.cfg.n_layers as u32,
            n_experts: shard.cfg.moe.map_or(0, |m| m.n_experts) as u32,
            d: shard.cfg.d_model as u32,
            fingerprint,
            held: Vec::new(),
        };
        let shard = Arc::new(Shared {
            shard: RwLock::new(shard),
            source,
        });
        let (st, cs) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("tandem-expert-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    if let Ok(c) = conn.try_clone() {
                        cs.lock().expect("connections").push(c);
                    }
                    let (shard, secret, hello) = (shard.clone(), secret.clone(), hello.clone());
                    let _ = std::thread::Builder::new()
                        .name("tandem-expert-conn".into())
                        .spawn(move || {
                            let peer = conn.peer_addr().ok();
                            if let Err(e) = connection(conn, &shard, secret.as_ref(), &hello) {
                                tracing::warn!(?peer, error = %e, "expert connection ended");
                            }
                        });
                }
            })?;
        Ok(ExpertServer {
            addr,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and cuts every open connection (their clients see the worker gone).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for c in self.conns.lock().expect("connections").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

impl Drop for ExpertServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

/// The experts served, and the file more come from.
struct Shared {
    shard: RwLock<ExpertShard>,
    source: Option<PathBuf>,
}

impl Shared {
    fn held(&self) -> Vec<u32> {
        let s = self.shard.read().expect("shard");
        s.held.iter().map(|&e| e as u32).collect()
    }

    /// Holds `more` too (from the model file); the experts now held.
    fn load(&self, more: &[u32]) -> Result<Vec<u32>, String> {
        let path = self
            .source
            .as_ref()
            .ok_or("this worker was started without its model file to load more experts from")?;
        let g = engine::gguf::GgufFile::open(path).map_err(|e| e.to_string())?;
        let more: Vec<usize> = more.iter().map(|&e| e as usize).collect();
        // Loaded beside the shard, no lock held (runs go on meanwhile, and a writer waiting
        // cannot hold them up), then added under the lock.
        let (cfg, precision, held) = {
            let s = self.shard.read().expect("shard");
            (s.cfg.clone(), s.precision, s.held.clone())
        };
        let new = ExpertShard::load_missing(&cfg, precision, &held, &g, &more)
            .map_err(|e| e.to_string())?;
        let mut s = self.shard.write().expect("shard");
        s.merge(new);
        tracing::info!(experts = ?more, held = ?s.held, "took over experts");
        Ok(s.held.iter().map(|&e| e as u32).collect())
    }
}

/// One client's connection: the handshake, the hello, then runs until it closes.
fn connection(
    mut conn: TcpStream,
    shared: &Shared,
    secret: Option<&ClusterSecret>,
    hello: &Hello,
) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
    auth::server(&mut conn, secret, Plane::Experts).map_err(io::Error::other)?;
    conn.set_read_timeout(None)?;
    let mut w = BufWriter::with_capacity(1 << 16, conn.try_clone()?);
    Hello {
        held: shared.held(),
        ..hello.clone()
    }
    .write(&mut w)?;
    io::Write::flush(&mut w)?;
    let mut r = BufReader::with_capacity(1 << 16, conn);
    let d = hello.d as usize;
    // Rows and outputs move through this, once the client attached one (same host).
    let mut mailbox: Option<Mailbox> = None;
    loop {
        // Waiting for the next request: idle compute threads sleep rather than spin on cores
        // the prefill or decode worker may share.
        kernels::pool::rest();
        let Some(req) = wire::read_request(&mut r, d, mailbox.is_some())? else {
            break;
        };
        let run = match req {
            wire::Request::Load(more) => {
                wire::write_loaded(&mut w, shared.load(&more).as_deref().map_err(Clone::clone))?;
                continue;
            }
            wire::Request::Attach { path, nonce } => {
                mailbox = None;
                // Only a mailbox in this host's shared-memory folder, where clients make them.
                let path = Path::new(&path);
                let done = if path.parent() != Some(kv_store::shm::dir().as_path()) {
                    Err(format!(
                        "{} is not in {}",
                        path.display(),
                        kv_store::shm::dir().display()
                    ))
                } else {
                    Mailbox::attach(path, nonce)
                        .map(|m| mailbox = Some(m))
                        .map_err(|e| format!("cannot map the mailbox {}: {e}", path.display()))
                };
                wire::write_attached(&mut w, done)?;
                continue;
            }
            wire::Request::Run(run) => run,
        };
        let t = std::time::Instant::now();
        let n = run.n as usize * d;
        let result = match &mut mailbox {
            None => compute(shared, &run, &run.rows, d),
            Some(m) => {
                let (request, reply) = m.answer();
                match request.get(..n) {
                    None => Err(format!("{} rows past the mailbox's end", run.n)),
                    Some(rows) => compute(shared, &run, rows, d).and_then(|o| {
                        let mut at = 0;
                        for o in &o {
                            reply
                                .get_mut(at..at + o.len())
                                .ok_or("outputs past the mailbox's end")?
                                .copy_from_slice(o);
                            at += o.len();
                        }
                        Ok(Vec::new()) // in the mailbox
                    }),
                }
            }
        };
        let micros = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
        wire::write_result(
            &mut w,
            result.as_deref().map(|o| (o, micros)).map_err(Clone::clone),
        )?;
    }
    Ok(())
}

/// Each group's outputs, in order, for a run whose rows are `rows`.
fn compute(
    shared: &Shared,
    run: &wire::Run,
    rows: &[f32],
    d: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let shard = shared.shard.read().expect("shard");
    run.groups
        .iter()
        .map(|g| {
            let mut x = Vec::with_capacity(g.rows.len() * d);
            for &i in &g.rows {
                x.extend_from_slice(&rows[i as usize * d..(i as usize + 1) * d]);
            }
            shard
                .run(run.layer as usize, g.expert as usize, &x, g.rows.len())
                .map_err(|e| e.to_string())
        })
        .collect()
}
