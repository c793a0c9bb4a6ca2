//! The receiving side of the data plane: the listener (handshake, connection cap, revocable
//! connections) and each connection's frame loop, which has the kernel scatter slabs straight
//! into the blocks the sink lends.

use super::{ConnId, SlabSink, SlabSource};
use crate::frame::{self, Frame, HEADER};
use protocol::LeaseId;
use protocol::auth::{self, ClusterSecret, Plane};
use std::collections::HashMap;
use std::io::{self, BufRead, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the receiver allows its peers.
#[derive(Debug, Clone)]
pub struct ReceiverLimits {
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// How long a connection may sit between frames (a sender keeps idle ones for reuse).
    pub idle: Duration,
    /// How long a frame's bytes may stall once its header came.
    pub stall: Duration,
}

impl Default for ReceiverLimits {
    fn default() -> Self {
        ReceiverLimits {
            max_connections: 64,
            idle: Duration::from_secs(300),
            stall: Duration::from_secs(30),
        }
    }
}

/// The receiver's open connections, so one can be cut off: a lease that expires under its
/// writer is fenced by shutting the writer's connection down; the connection's thread then
/// stops writing and only after that reports the abort (which frees the blocks).
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<ConnId, TcpStream>>,
    next: AtomicU64,
}

impl Connections {
    /// Cuts `conn` off; whether it was open.
    pub fn revoke(&self, conn: ConnId) -> bool {
        let open = self.open.lock().expect("connection table poisoned");
        open.get(&conn)
            .map(|s| s.shutdown(Shutdown::Both).is_ok())
            .unwrap_or(false)
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.open.lock().expect("connection table poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn add(&self, s: &TcpStream, max: usize) -> Option<ConnId> {
        let mut open = self.open.lock().expect("connection table poisoned");
        if open.len() >= max {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        open.insert(id, s.try_clone().ok()?);
        Some(id)
    }

    fn remove(&self, id: ConnId) {
        self.open
            .lock()
            .expect("connection table poisoned")
            .remove(&id);
    }
}

/// A running data-plane server; stops accepting when dropped.
pub struct KvReceiver {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Connections>,
}

impl KvReceiver {
    /// Listens on `addr` (port 0 picks one) and delivers every slab to `sink`, from peers
    /// that pass the handshake under `secret`, within `limits`.
    pub fn bind(
        addr: &str,
        sink: Arc<dyn SlabSink>,
        secret: Option<ClusterSecret>,
        limits: ReceiverLimits,
    ) -> io::Result<KvReceiver> {
        Self::bind_with_source(addr, sink, None, secret, limits)
    }

    /// [`bind`](Self::bind), also answering get frames from `source` (the store).
    pub fn bind_with_source(
        addr: &str,
        sink: Arc<dyn SlabSink>,
        source: Option<Arc<dyn SlabSource>>,
        secret: Option<ClusterSecret>,
        limits: ReceiverLimits,
    ) -> io::Result<KvReceiver> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Connections::default());
        let (st, cs) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("tandem-kv-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else {
                        // Out of descriptors and the like: back off rather than spin.
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let peer = conn.peer_addr().ok();
                    let Some(id) = cs.add(&conn, limits.max_connections) else {
                        tracing::warn!(
                            ?peer,
                            max = limits.max_connections,
                            "KV data connection refused: too many open"
                        );
                        continue;
                    };
                    let (sink, source, secret, conns, limits) = (
                        sink.clone(),
                        source.clone(),
                        secret.clone(),
                        cs.clone(),
                        limits.clone(),
                    );
                    let spawned = std::thread::Builder::new()
                        .name("tandem-kv-recv".into())
                        .spawn(move || {
                            let mut open = Vec::new();
                            match accept_peer(conn, secret.as_ref()) {
                                Ok(conn) => {
                                    if let Err(e) = serve(
                                        conn,
                                        id,
                                        &*sink,
                                        source.as_deref(),
                                        &mut open,
                                        &limits,
                                    ) {
                                        tracing::debug!(error = %e, "KV data connection closed");
                                    }
                                }
                                Err(e) => tracing::warn!(?peer, error = %e,
                                    "KV data connection refused"),
                            }
                            // The last write through a slot is done: now the leases may go.
                            for lease in open {
                                sink.abort(id, lease);
                            }
                            conns.remove(id);
                        });
                    if spawned.is_err() {
                        cs.remove(id);
                    }
                }
            })?;
        Ok(KvReceiver {
            addr,
            stop,
            accept: Some(accept),
            conns,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The open connections (to revoke one).
    pub fn connections(&self) -> Arc<Connections> {
        self.conns.clone()
    }
}

/// The server's handshake within [`auth::HANDSHAKE_TIMEOUT`].
fn accept_peer(mut conn: TcpStream, secret: Option<&ClusterSecret>) -> io::Result<TcpStream> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
    conn.set_write_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
    auth::server(&mut conn, secret, Plane::KvData)?;
    Ok(conn)
}

impl Drop for KvReceiver {
    /// Stops accepting and cuts the open connections off: a receiver gone serves nothing more
    /// (a store stopped in a process that lives on must not answer gets on kept connections).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self
            .conns
            .open
            .lock()
            .expect("connection table poisoned")
            .values()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// The receiver's read buffer: big enough for a frame's header and a typical frame's block
/// indices in one system call; the slabs themselves bypass it.
const HEADER_BUFFER: usize = 4096;

/// Iovecs per `recvmsg` (Linux's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// Receives frames on connection `id` until the peer closes; `open` holds the leases begun
/// and not ended. A get frame is answered from `source` on the same connection (none: the
/// connection is closed).
fn serve(
    conn: TcpStream,
    id: ConnId,
    sink: &dyn SlabSink,
    source: Option<&dyn SlabSource>,
    open: &mut Vec<LeaseId>,
    limits: &ReceiverLimits,
) -> io::Result<()> {
    let mut conn = io::BufReader::with_capacity(HEADER_BUFFER, conn);
    let mut scratch = Scratch::default();
    loop {
        // A clean close comes between frames; a connection idle too long is closed.
        conn.get_ref().set_read_timeout(Some(limits.idle))?;
        if conn.fill_buf()?.is_empty() {
            return Ok(());
        }
        conn.get_ref().set_read_timeout(Some(limits.stall))?;
        match read_frame(&mut conn)? {
            Frame::Get { id: get, len } => {
                let Some(source) = source else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a get frame on a receiver with nothing to send",
                    ));
                };
                let mut body = vec![0; len as usize];
                conn.read_exact(&mut body)?;
                let mut out = super::FrameWriter(conn.get_ref());
                source.get(id, get, &body, &mut out)?;
            }
            f => {
                receive(&mut conn, f, id, sink, open, &mut scratch)?;
            }
        }
    }
}

/// A frame's header from the stream.
fn read_frame(conn: &mut io::BufReader<TcpStream>) -> io::Result<Frame> {
    let mut h = [0u8; HEADER];
    conn.read_exact(&mut h)?;
    Frame::decode(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reused buffers of a connection's frame loop.
#[derive(Default)]
struct Scratch {
    index: Vec<u8>,
    slots: Vec<Option<super::Slot>>,
}

/// Receives the payload of a slabs or end frame into `sink`; an end frame's `(lease, slabs,
/// checksum)` is returned (after the sink heard it).
fn receive(
    conn: &mut io::BufReader<TcpStream>,
    f: Frame,
    id: ConnId,
    sink: &dyn SlabSink,
    open: &mut Vec<LeaseId>,
    scratch: &mut Scratch,
) -> io::Result<Option<(LeaseId, u32, u64)>> {
    let Scratch { index, slots } = scratch;
    match f {
        Frame::Slabs {
            lease,
            layer,
            n,
            len,
        } => {
            let len = len as usize;
            index.resize(4 * n as usize, 0);
            conn.read_exact(index)?;
            slots.clear();
            sink.slots(id, lease, layer, &frame::decode_blocks(index), len, slots);
            slots.resize(n as usize, None);
            if slots.iter().any(Option::is_some) && !open.contains(&lease) {
                open.push(lease);
            }
            let placed = slots.iter().all(|s| s.is_some_and(|s| s.len == len));
            if placed {
                let dst: Vec<*mut u8> = slots.iter().flatten().map(|s| s.ptr).collect();
                // SAFETY: every pointer has `len` writable bytes that only this transfer
                // writes (the sink's contract).
                unsafe { recv_slabs(conn, &dst, len)? };
            } else {
                // Some slab has no place: one at a time, the homeless ones read and dropped.
                for s in slots.iter() {
                    match s {
                        // SAFETY: as above.
                        Some(s) if s.len == len => unsafe { recv_slabs(conn, &[s.ptr], len)? },
                        _ => discard(conn, len)?,
                    }
                }
            }
            Ok(None)
        }
        Frame::End { lease, slabs } => {
            let mut c = [0u8; 8];
            conn.read_exact(&mut c)?;
            open.retain(|&l| l != lease);
            let checksum = u64::from_le_bytes(c);
            sink.end(id, lease, slabs, checksum);
            Ok(Some((lease, slabs, checksum)))
        }
        Frame::Get { .. } | Frame::Got { .. } => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a get or got frame where slabs were expected",
        )),
    }
}

/// A get's answer: the got frame's body, and the end frame's `(slabs, checksum)` when slabs
/// followed it.
pub type GetAnswer = (Vec<u8>, Option<(u32, u64)>);

/// The asking side of a get (`store::get`): sends get frame `id` with `body` on `conn`, reads
/// the store's got frame and returns its body; with a `sink`, then receives the slabs that
/// follow into it (its slots, as a receiver would) up to the end frame under `id`, returning
/// the store's `(slabs, checksum)` too. The sink hears `end` on success, `abort` when the
/// connection fails mid-transfer (the connection is then unusable).
pub fn get(
    conn: &TcpStream,
    id: LeaseId,
    body: &[u8],
    sink: Option<&dyn SlabSink>,
) -> io::Result<GetAnswer> {
    let mut w = super::FrameWriter(conn);
    w.frame(
        &Frame::Get {
            id,
            len: body.len() as u32,
        },
        body,
    )?;
    let mut conn = io::BufReader::with_capacity(HEADER_BUFFER, conn.try_clone()?);
    let got = match read_frame(&mut conn)? {
        Frame::Got { id: g, len } if g == id => {
            let mut b = vec![0; len as usize];
            conn.read_exact(&mut b)?;
            b
        }
        f => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{f:?} where a got frame was expected"),
            ));
        }
    };
    let Some(sink) = sink else {
        return match conn.buffer().is_empty() {
            true => Ok((got, None)),
            false => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bytes after a got frame",
            )),
        };
    };
    let (mut open, mut scratch) = (Vec::new(), Scratch::default());
    let ended = (|| -> io::Result<(u32, u64)> {
        loop {
            let f = read_frame(&mut conn)?;
            if let Some((l, slabs, checksum)) =
                receive(&mut conn, f, 0, sink, &mut open, &mut scratch)?
                && l == id
            {
                return Ok((slabs, checksum));
            }
        }
    })();
    if ended.is_err() {
        for l in open {
            sink.abort(0, l);
        }
    }
    if !conn.buffer().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bytes after a get's end",
        ));
    }
    Ok((got, Some(ended?)))
}

/// Reads and drops `len` bytes through a small buffer (a homeless slab costs no memory).
fn discard(conn: &mut impl Read, len: usize) -> io::Result<()> {
    let copied = io::copy(&mut conn.take(len as u64), &mut io::sink())?;
    if copied < len as u64 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Fills `len` bytes at each of `dst`, in order, from the stream: what the read buffer already
/// holds is copied, the rest the kernel writes straight into place (`recvmsg` with
/// `MSG_WAITALL` over up to [`MAX_IOV`] slabs per call). One copy, into the blocks; measured
/// 4–24% faster here than reading 1 MiB at a time into a buffer in cache and copying each slab
/// out of it (`tandem kv bench`; plain `readv`, which returns whatever has arrived, was slower
/// than both).
///
/// # Safety
/// Each pointer must address `len` writable bytes (several may be the same scratch bytes).
unsafe fn recv_slabs(
    conn: &mut io::BufReader<TcpStream>,
    dst: &[*mut u8],
    len: usize,
) -> io::Result<()> {
    // Bytes of the slabs received so far: slab `done / len`, `done % len` bytes into it.
    let (total, mut done) = (dst.len() * len, 0);
    let buffered = conn.buffer();
    let mut taken = 0;
    while done < total && taken < buffered.len() {
        let (i, off) = (done / len, done % len);
        let n = (len - off).min(buffered.len() - taken);
        // SAFETY: `dst[i] + off .. + n` lies within slab i (the caller's contract).
        unsafe { std::ptr::copy_nonoverlapping(buffered[taken..].as_ptr(), dst[i].add(off), n) };
        taken += n;
        done += n;
    }
    conn.consume(taken);
    let mut iov = Vec::with_capacity(dst.len().min(MAX_IOV));
    while done < total {
        let (i, off) = (done / len, done % len);
        iov.clear();
        iov.extend(dst[i..].iter().take(MAX_IOV).map(|&p| libc::iovec {
            iov_base: p.cast(),
            iov_len: len,
        }));
        // SAFETY: still within slab i.
        iov[0].iov_base = unsafe { dst[i].add(off) }.cast();
        iov[0].iov_len = len - off;
        // SAFETY: the iovecs address writable memory (the caller's contract).
        done += unsafe { recv_waitall(conn.get_ref(), &mut iov)? };
    }
    Ok(())
}

/// Fills `buf` from the stream the way the receiver reads slabs: `recv` with `MSG_WAITALL`,
/// woken once the whole buffer has arrived rather than at each arrival.
pub fn recv_exact_waitall(conn: &TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let mut iov = [libc::iovec {
            iov_base: buf[at..].as_mut_ptr().cast(),
            iov_len: buf.len() - at,
        }];
        // SAFETY: the iovec addresses `buf[at..]`.
        at += unsafe { recv_waitall(conn, &mut iov)? };
    }
    Ok(())
}

/// One `recvmsg(MSG_WAITALL)` into `iov`: the bytes received (short only after a signal,
/// which gives 0 and is for the caller to retry); the peer's close is `UnexpectedEof`.
///
/// # Safety
/// Every iovec must address writable memory of its length.
unsafe fn recv_waitall(conn: &TcpStream, iov: &mut [libc::iovec]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len() as _;
    // SAFETY: the iovecs address writable memory (the caller's contract).
    match unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_WAITALL) } {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        r if r < 0 => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            }
        }
        r => Ok(r as usize),
    }
}
