//! One connection to an expert worker: the handshake, `load`, and a layer's run — its rows
//! and outputs through a shared-memory mailbox when the worker is on this host
//! (`kv_store::shm::mailbox`), else on the socket.

use super::err;
use crate::wire::{self, Group, Hello, RunOutput};
use engine::Result;
use kv_store::shm::mailbox::Mailbox;
use protocol::auth::{self, ClusterSecret, Plane};
use std::io::{self, BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long connecting to an expert worker may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one layer's reply may take before the worker is taken for gone.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The `f32`s a first mailbox's request area has room for (1 MiB: a decode step's rows; it
/// grows for prefill), and its reply area twice that (top-2 outputs).
const MAILBOX_FLOATS: usize = 1 << 18;

/// An open connection to an expert worker.
pub(super) struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
    /// Where rows and outputs go, once the worker attached it.
    mailbox: Option<Mailbox>,
    /// A mailbox was refused (another host, or a separate `/dev/shm`): the socket only.
    socket_only: bool,
}

/// Connects to `addr`, trying again until `deadline` while nothing listens there yet (a
/// worker still loading); a handshake or hello that fails is an error at once.
pub(super) fn connect(
    addr: &str,
    secret: Option<&ClusterSecret>,
    deadline: Instant,
) -> Result<(Conn, Hello)> {
    let mut last = err(addr, "no address");
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(|e| err(addr, e))?.collect();
    let mut s = 'found: loop {
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => break 'found s,
                Err(e) => last = err(addr, e),
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let setup = |s: &mut TcpStream| -> io::Result<Hello> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
        s.set_write_timeout(Some(REPLY_TIMEOUT))?;
        auth::client(s, secret, Plane::Experts).map_err(io::Error::other)?;
        let hello = Hello::read(s)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(hello)
    };
    let hello = setup(&mut s).map_err(|e| err(addr, e))?;
    let conn = Conn {
        r: BufReader::with_capacity(1 << 16, s.try_clone().map_err(|e| err(addr, e))?),
        w: BufWriter::with_capacity(1 << 16, s),
        mailbox: None,
        socket_only: false,
    };
    Ok((conn, hello))
}

impl Conn {
    /// Asks the worker to hold `experts` too; the experts it holds then.
    pub(super) fn load(&mut self, addr: &str, experts: &[u32]) -> Result<Vec<u32>> {
        wire::write_load(&mut self.w, experts).map_err(|e| err(addr, e))?;
        wire::read_loaded(&mut self.r)
            .map_err(|e| err(addr, e))?
            .map_err(|why| err(addr, why))
    }

    /// Whether rows and outputs go through shared memory.
    pub(super) fn over_shm(&self) -> bool {
        self.mailbox.is_some()
    }

    /// Sends a run of `rows` of `h` (`[· × d]`) and each group's indices into them; through a
    /// mailbox when `shm` and the worker can map one.
    pub(super) fn send(
        &mut self,
        shm: bool,
        layer: u32,
        rows: &[u32],
        h: &[f32],
        d: usize,
        groups: &[Group],
    ) -> io::Result<()> {
        if shm {
            let out_rows: usize = groups.iter().map(|g| g.rows.len()).sum();
            self.fit(rows.len() * d, out_rows * d)?;
        }
        let gather = |x: &mut [f32]| {
            for (dst, &r) in x.chunks_exact_mut(d).zip(rows) {
                dst.copy_from_slice(&h[r as usize * d..(r as usize + 1) * d]);
            }
        };
        match &mut self.mailbox {
            Some(m) => {
                gather(&mut m.request_mut()[..rows.len() * d]);
                wire::write_run(&mut self.w, layer, rows.len(), None, groups)
            }
            None => {
                let mut x = vec![0f32; rows.len() * d];
                gather(&mut x);
                wire::write_run(&mut self.w, layer, rows.len(), Some(&x), groups)
            }
        }
    }

    /// Reads the result of the run sent last, for groups of `counts` rows of `d`.
    pub(super) fn recv(
        &mut self,
        counts: &[usize],
        d: usize,
    ) -> io::Result<std::result::Result<RunOutput, String>> {
        wire::read_result(
            &mut self.r,
            counts,
            d,
            self.mailbox.as_ref().map(Mailbox::reply),
        )
    }

    /// Makes sure a mailbox with room for `request` and `reply` `f32`s is attached, growing
    /// it (doubling) if need be; one the worker refuses leaves the connection on the socket.
    fn fit(&mut self, request: usize, reply: usize) -> io::Result<()> {
        let (have_req, have_rep) = match &self.mailbox {
            Some(m) if m.request_len() >= request && m.reply_len() >= reply => return Ok(()),
            Some(m) => (2 * m.request_len(), 2 * m.reply_len()),
            None if self.socket_only => return Ok(()),
            None => (0, 0),
        };
        let (request, reply) = (
            request.max(have_req).max(MAILBOX_FLOATS),
            reply.max(have_rep).max(2 * MAILBOX_FLOATS),
        );
        self.mailbox = None;
        let made = Mailbox::create(&kv_store::shm::dir(), request * 4, reply * 4);
        // A mailbox that cannot be made here is sent as an empty path: the worker refuses it
        // and drops the one it had, so both ends are on the socket.
        let (path, nonce) = match &made {
            Ok(m) => (
                m.path().map(|p| p.to_string_lossy().into_owned()),
                m.nonce(),
            ),
            Err(_) => (None, 0),
        };
        wire::write_attach(&mut self.w, path.as_deref().unwrap_or(""), nonce)?;
        match (wire::read_attached(&mut self.r)?, made) {
            (Ok(()), Ok(mut m)) => {
                m.unlink();
                self.mailbox = Some(m);
            }
            (refused, made) => {
                tracing::info!(
                    refused = ?refused.err(),
                    made = ?made.err(),
                    "expert worker: no shared-memory mailbox (another host?); rows go on the socket"
                );
                self.socket_only = true;
            }
        }
        Ok(())
    }
}
