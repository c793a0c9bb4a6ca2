//! The expert worker's server: answers runs of routed rows with its experts' outputs, one
//! thread per connection (a prefill or decode worker keeps one open).

use crate::wire::{self, Hello};
use engine::moe::shard::ExpertShard;
use protocol::auth::{self, ClusterSecret, Plane};
use std::io::{self, BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    /// `secret`, saying `fingerprint` (`wire::fingerprint` of the model file and precision).
    pub fn bind(
        addr: &str,
        shard: Arc<ExpertShard>,
        fingerprint: u64,
        secret: Option<ClusterSecret>,
    ) -> io::Result<ExpertServer> {
        Self::serve(TcpListener::bind(addr)?, shard, fingerprint, secret)
    }

    /// [`bind`](Self::bind) on a listener already bound.
    pub fn serve(
        listener: TcpListener,
        shard: Arc<ExpertShard>,
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
            held: shard.held.iter().map(|&e| e as u32).collect(),
        };
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

/// One client's connection: the handshake, the hello, then runs until it closes.
fn connection(
    mut conn: TcpStream,
    shard: &ExpertShard,
    secret: Option<&ClusterSecret>,
    hello: &Hello,
) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
    auth::server(&mut conn, secret, Plane::Experts).map_err(io::Error::other)?;
    conn.set_read_timeout(None)?;
    let mut w = BufWriter::with_capacity(1 << 16, conn.try_clone()?);
    hello.write(&mut w)?;
    io::Write::flush(&mut w)?;
    let mut r = BufReader::with_capacity(1 << 16, conn);
    let d = shard.cfg.d_model;
    while let Some(run) = wire::read_run(&mut r, d)? {
        let t = std::time::Instant::now();
        let outputs: Result<Vec<Vec<f32>>, String> = run
            .groups
            .iter()
            .map(|g| {
                let mut x = Vec::with_capacity(g.rows.len() * d);
                for &i in &g.rows {
                    x.extend_from_slice(&run.rows[i as usize * d..(i as usize + 1) * d]);
                }
                shard
                    .run(run.layer as usize, g.expert as usize, &x, g.rows.len())
                    .map_err(|e| e.to_string())
            })
            .collect();
        let micros = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
        wire::write_result(
            &mut w,
            outputs
                .as_deref()
                .map(|o| (o, micros))
                .map_err(Clone::clone),
        )?;
    }
    Ok(())
}
