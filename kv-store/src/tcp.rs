//! The TCP data plane: a prefill worker on another host streams slabs to the decode worker
//! that reserved the blocks. Each layer's slabs travel as one frame (a header, the block
//! indices, the slabs), sent with vectored writes; the receiver reads the header and the
//! indices, then has the kernel scatter the slabs straight into their blocks.
//!
//! Plain blocking sockets on threads: one connection carries one transfer at a time, and the
//! receiver runs a thread per connection (a handful of prefill workers), so there is nothing
//! to multiplex.

use crate::frame::{self, Frame, HEADER};
use protocol::LeaseId;
use protocol::auth::{self, ClusterSecret, Plane};
use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where a slab's bytes go: `len` bytes that only this transfer writes until its lease ends.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub ptr: *mut u8,
    pub len: usize,
}

/// Names one data-plane connection for the life of the receiver.
pub type ConnId = u64;

/// The decode side of transfers: finds the memory for each slab and hears when a lease's
/// transfer is complete. Every call names the connection the frame came on: a lease's frames
/// belong to the connection that opened it.
///
/// # Safety
/// The receiver writes through the slots [`slots`](Self::slots) returns: each must be `len`
/// bytes of valid memory that nothing else reads or writes until [`end`](Self::end) or
/// [`abort`](Self::abort) is called for the lease on that connection. The implementor vouches
/// for that, so a safe impl does not compile:
///
/// ```compile_fail
/// struct Anywhere;
/// impl kv_store::tcp::SlabSink for Anywhere {
///     fn slots(&self, _: u64, _: protocol::LeaseId, _: u32, _: &[u32], _: usize, _: &mut Vec<Option<kv_store::tcp::Slot>>) {}
///     fn end(&self, _: u64, _: protocol::LeaseId, _: u32, _: u64) {}
///     fn abort(&self, _: u64, _: protocol::LeaseId) {}
/// }
/// ```
pub unsafe trait SlabSink: Send + Sync + 'static {
    /// The destinations of the slabs of `blocks` (indices into the lease's block list) for
    /// `layer` of `lease`, arriving on `conn`, each of exactly `len` bytes, pushed to `out` in
    /// order; `None` for a slab with no place (unknown, expired or another connection's
    /// lease, a block out of range: its bytes are read and dropped).
    /// (The memory's validity is the trait's safety contract.)
    fn slots(
        &self,
        conn: ConnId,
        lease: LeaseId,
        layer: u32,
        blocks: &[u32],
        len: usize,
        out: &mut Vec<Option<Slot>>,
    );
    /// Every slab of `lease` arrived on `conn` (`slabs` of them); the sender's checksum.
    fn end(&self, conn: ConnId, lease: LeaseId, slabs: u32, checksum: u64);
    /// The connection `conn` carrying `lease`'s transfer broke (or was revoked) before its
    /// end: no more bytes come, and none will be written.
    fn abort(&self, conn: ConnId, lease: LeaseId);
}

/// How long a sender's TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one send may stall (a peer that stops reading): the transfer fails after it.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends slabs to one decode worker's data plane.
pub struct KvSender {
    stream: TcpStream,
}

impl KvSender {
    /// Connects (within [`CONNECT_TIMEOUT`]) and runs the cluster handshake; sends that stall
    /// for [`SEND_TIMEOUT`] fail.
    pub fn connect(addr: &str, secret: Option<&ClusterSecret>) -> io::Result<KvSender> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(mut stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(auth::HANDSHAKE_TIMEOUT))?;
                    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
                    auth::client(&mut stream, secret, Plane::KvData)?;
                    return Ok(KvSender { stream });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Slabs of one layer, `(block index, bytes)`, all of one size: one frame (header, block
    /// indices, slabs) sent with vectored writes, as few system calls as the socket takes.
    pub fn slabs(&mut self, lease: LeaseId, layer: u32, slabs: &[(u32, &[u8])]) -> io::Result<()> {
        for group in slabs.chunks(frame::MAX_SLABS) {
            let len = group[0].1.len();
            assert!(
                group.iter().all(|(_, s)| s.len() == len),
                "slabs of one layer have one size"
            );
            let header = Frame::Slabs {
                lease,
                layer,
                n: group.len() as u32,
                len: len as u32,
            }
            .encode();
            let blocks = frame::encode_blocks(group.iter().map(|&(b, _)| b));
            let mut parts: Vec<&[u8]> = Vec::with_capacity(group.len() + 2);
            parts.push(&header);
            parts.push(&blocks);
            parts.extend(group.iter().map(|&(_, s)| s));
            write_all_vectored(&mut self.stream, &parts)?;
        }
        Ok(())
    }

    /// The connection itself (for tests that misbehave on it).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    pub fn end(&mut self, lease: LeaseId, slabs: u32, checksum: u64) -> io::Result<()> {
        let mut f = [0u8; HEADER + 8];
        f[..HEADER].copy_from_slice(&Frame::End { lease, slabs }.encode());
        f[HEADER..].copy_from_slice(&checksum.to_le_bytes());
        self.stream.write_all(&f)?;
        self.stream.flush()
    }
}

/// Writes every byte of `parts`, in order, with vectored writes.
fn write_all_vectored(w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
    let (mut i, mut off) = (0, 0);
    while i < parts.len() {
        let slices: Vec<io::IoSlice<'_>> = std::iter::once(&parts[i][off..])
            .chain(parts[i + 1..].iter().copied())
            .take(1024)
            .map(io::IoSlice::new)
            .collect();
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Advance past what was written.
        while i < parts.len() && n >= parts[i].len() - off {
            n -= parts[i].len() - off;
            i += 1;
            off = 0;
        }
        off += n;
    }
    Ok(())
}

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
                    let (sink, secret, conns, limits) =
                        (sink.clone(), secret.clone(), cs.clone(), limits.clone());
                    let spawned = std::thread::Builder::new()
                        .name("tandem-kv-recv".into())
                        .spawn(move || {
                            let mut open = Vec::new();
                            match accept_peer(conn, secret.as_ref()) {
                                Ok(conn) => {
                                    if let Err(e) = serve(conn, id, &*sink, &mut open, &limits) {
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
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// The receiver's read buffer: big enough for a frame's header and a typical frame's block
/// indices in one system call; the slabs themselves bypass it.
const HEADER_BUFFER: usize = 4096;

/// Iovecs per `recvmsg` (Linux's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;

/// Receives frames on connection `id` until the peer closes; `open` holds the leases begun
/// and not ended.
fn serve(
    conn: TcpStream,
    id: ConnId,
    sink: &dyn SlabSink,
    open: &mut Vec<LeaseId>,
    limits: &ReceiverLimits,
) -> io::Result<()> {
    let mut conn = io::BufReader::with_capacity(HEADER_BUFFER, conn);
    let (mut index, mut slots) = (Vec::new(), Vec::new());
    loop {
        // A clean close comes between frames; a connection idle too long is closed.
        conn.get_ref().set_read_timeout(Some(limits.idle))?;
        if conn.fill_buf()?.is_empty() {
            return Ok(());
        }
        conn.get_ref().set_read_timeout(Some(limits.stall))?;
        let mut h = [0u8; HEADER];
        conn.read_exact(&mut h)?;
        let f = Frame::decode(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match f {
            Frame::Slabs {
                lease,
                layer,
                n,
                len,
            } => {
                let len = len as usize;
                index.resize(4 * n as usize, 0);
                conn.read_exact(&mut index)?;
                slots.clear();
                sink.slots(
                    id,
                    lease,
                    layer,
                    &frame::decode_blocks(&index),
                    len,
                    &mut slots,
                );
                slots.resize(n as usize, None);
                if slots.iter().any(Option::is_some) && !open.contains(&lease) {
                    open.push(lease);
                }
                let placed = slots.iter().all(|s| s.is_some_and(|s| s.len == len));
                if placed {
                    let dst: Vec<*mut u8> = slots.iter().flatten().map(|s| s.ptr).collect();
                    // SAFETY: every pointer has `len` writable bytes that only this transfer
                    // writes (the sink's contract).
                    unsafe { recv_slabs(&mut conn, &dst, len)? };
                } else {
                    // Some slab has no place: one at a time, the homeless ones read and dropped.
                    for s in &slots {
                        match s {
                            // SAFETY: as above.
                            Some(s) if s.len == len => unsafe {
                                recv_slabs(&mut conn, &[s.ptr], len)?
                            },
                            _ => discard(&mut conn, len)?,
                        }
                    }
                }
            }
            Frame::End { lease, slabs } => {
                let mut c = [0u8; 8];
                conn.read_exact(&mut c)?;
                open.retain(|&l| l != lease);
                sink.end(id, lease, slabs, u64::from_le_bytes(c));
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc;

    const L7: LeaseId = LeaseId([7; 16]);
    const L8: LeaseId = LeaseId([8; 16]);

    /// Destination buffers per (lease [`L7`], block, layer), and completions.
    struct Buffers {
        mem: Mutex<Vec<u8>>,
        slab: usize,
        blocks: u32,
        done: Mutex<mpsc::Sender<(LeaseId, u32, u64)>>,
    }

    unsafe impl SlabSink for Buffers {
        fn slots(
            &self,
            _conn: ConnId,
            lease: LeaseId,
            layer: u32,
            blocks: &[u32],
            len: usize,
            out: &mut Vec<Option<Slot>>,
        ) {
            let mut m = self.mem.lock().unwrap();
            for &block in blocks {
                out.push(
                    (lease == L7 && len == self.slab && block < self.blocks).then(|| {
                        let at = (layer * self.blocks + block) as usize * self.slab;
                        Slot {
                            ptr: m[at..].as_mut_ptr(),
                            len,
                        }
                    }),
                );
            }
        }
        fn end(&self, _conn: ConnId, lease: LeaseId, slabs: u32, checksum: u64) {
            let _ = self.done.lock().unwrap().send((lease, slabs, checksum));
        }
        fn abort(&self, _conn: ConnId, lease: LeaseId) {
            let _ = self.done.lock().unwrap().send((lease, u32::MAX, 0));
        }
    }

    fn slab_bytes(slab: usize, block: u32, layer: u32) -> Vec<u8> {
        (0..slab)
            .map(|i| (i as u32 * 7 + block * 31 + layer) as u8)
            .collect()
    }

    /// Slabs of every size class (smaller and larger than the header buffer, odd sizes that
    /// leave it holding part of a slab), sent in frames of one to more than [`MAX_IOV`] slabs
    /// (block indices larger than the buffer too), land in their slots; slabs of an unknown
    /// lease or past the blocks are read and dropped without desynchronising the stream.
    #[test]
    fn slabs_land_in_their_slots_and_the_rest_is_dropped() {
        for (slab, blocks) in [
            (1, 2500u32),
            (1000, 5),
            (1000, 1500),
            (12_288, 5),
            ((1 << 20) + 3, 5),
        ] {
            let (tx, rx) = mpsc::channel();
            let sink = Arc::new(Buffers {
                mem: Mutex::new(vec![0; 3 * blocks as usize * slab]),
                slab,
                blocks,
                done: Mutex::new(tx),
            });
            let r =
                KvReceiver::bind("127.0.0.1:0", sink.clone(), None, Default::default()).unwrap();
            let mut s = KvSender::connect(&r.local_addr().to_string(), None).unwrap();
            let mut sum = crate::Checksum::new();
            for layer in 0..3u32 {
                let data: Vec<Vec<u8>> = (0..blocks).map(|b| slab_bytes(slab, b, layer)).collect();
                for d in &data {
                    sum.update(d);
                }
                // Layer 0 a slab per frame, the others in one frame; block 9 has no slot.
                if layer == 0 {
                    for (b, d) in data.iter().enumerate() {
                        s.slabs(L7, layer, &[(b as u32, d)]).unwrap();
                    }
                } else {
                    let mut frames: Vec<(u32, &[u8])> = data
                        .iter()
                        .enumerate()
                        .map(|(b, d)| (b as u32, &d[..]))
                        .collect();
                    frames.insert(2, (9, &data[0]));
                    s.slabs(L7, layer, &frames).unwrap();
                }
                s.slabs(L8, layer, &[(0, &data[1])]).unwrap(); // unknown lease
            }
            s.end(L7, 3 * blocks, sum.digest()).unwrap();
            let got = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
            assert_eq!(got, (L7, 3 * blocks, sum.digest()));
            let m = sink.mem.lock().unwrap();
            for layer in 0..3 {
                for b in 0..blocks {
                    let at = (layer * blocks + b) as usize * slab;
                    assert!(
                        m[at..at + slab] == slab_bytes(slab, b, layer)[..],
                        "slab {slab} B, block {b}, layer {layer}"
                    );
                }
            }
        }
    }

    /// A connection that breaks inside a frame aborts the leases it carried.
    #[test]
    fn a_transfer_cut_mid_frame_is_aborted() {
        let (tx, rx) = mpsc::channel();
        let sink = Arc::new(Buffers {
            mem: Mutex::new(vec![0; 4 * 1000]),
            slab: 1000,
            blocks: 4,
            done: Mutex::new(tx),
        });
        let r = KvReceiver::bind("127.0.0.1:0", sink, None, Default::default()).unwrap();
        let mut c = TcpStream::connect(r.local_addr()).unwrap();
        auth::client(&mut c, None, Plane::KvData).unwrap();
        let h = Frame::Slabs {
            lease: L7,
            layer: 0,
            n: 2,
            len: 1000,
        }
        .encode();
        c.write_all(&h).unwrap();
        c.write_all(&frame::encode_blocks([0, 1])).unwrap();
        c.write_all(&[1u8; 1500]).unwrap();
        drop(c);
        let got = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(got, (L7, u32::MAX, 0));
    }

    fn sink(tx: mpsc::Sender<(LeaseId, u32, u64)>) -> Arc<Buffers> {
        Arc::new(Buffers {
            mem: Mutex::new(vec![0; 3 * 4 * 1000]),
            slab: 1000,
            blocks: 4,
            done: Mutex::new(tx),
        })
    }

    /// A sender with another secret (or none) is refused at connect and delivers nothing; one
    /// with the cluster's gets through.
    #[test]
    fn only_holders_of_the_secret_connect() {
        let k = ClusterSecret::from_bytes(b"the-cluster-secret").unwrap();
        let wrong = ClusterSecret::from_bytes(b"not-the-cluster-secret").unwrap();
        let (tx, rx) = mpsc::channel();
        let sink = sink(tx);
        let r = KvReceiver::bind(
            "127.0.0.1:0",
            sink.clone(),
            Some(k.clone()),
            Default::default(),
        )
        .unwrap();
        let addr = r.local_addr().to_string();
        assert!(KvSender::connect(&addr, Some(&wrong)).is_err());
        assert!(KvSender::connect(&addr, None).is_err());
        // Raw frames without a handshake are not read as frames.
        let mut raw = TcpStream::connect(&addr).unwrap();
        let _ = raw.write_all(
            &Frame::End {
                lease: L7,
                slabs: 0,
            }
            .encode(),
        );
        let _ = raw.write_all(&[0; 8]);
        let mut s = KvSender::connect(&addr, Some(&k)).unwrap();
        s.slabs(L7, 0, &[(0, &[5u8; 1000][..])]).unwrap();
        s.end(L7, 1, 42).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            got,
            (L7, 1, 42),
            "only the authenticated sender's end arrives"
        );
        assert_eq!(sink.mem.lock().unwrap()[..1000], [5u8; 1000]);
    }

    /// Revoking a connection stalled inside a frame stops it, and only then is its lease
    /// reported aborted: the fence a lease expiry relies on.
    #[test]
    fn a_revoked_connection_stops_and_then_aborts_its_lease() {
        let (tx, rx) = mpsc::channel();
        let r = KvReceiver::bind("127.0.0.1:0", sink(tx), None, Default::default()).unwrap();
        let mut s = KvSender::connect(&r.local_addr().to_string(), None).unwrap();
        s.slabs(L7, 0, &[(0, &[1u8; 1000][..])]).unwrap();
        // Half a frame, then silence.
        let h = Frame::Slabs {
            lease: L7,
            layer: 1,
            n: 1,
            len: 1000,
        }
        .encode();
        s.stream.write_all(&h).unwrap();
        s.stream.write_all(&frame::encode_blocks([1])).unwrap();
        s.stream.write_all(&[2u8; 10]).unwrap();
        let conns = r.connections();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while conns.len() != 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(rx.try_recv().is_err(), "nothing ended or aborted yet");
        assert!(conns.revoke(0), "connection 0 is open");
        let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, (L7, u32::MAX, 0));
        while !conns.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(conns.is_empty());
        assert!(
            s.end(L7, 2, 0).is_err() || s.end(L7, 2, 0).is_err(),
            "the sender is cut off"
        );
    }

    /// Beyond the cap, connections are closed at accept; the ones inside it still work.
    #[test]
    fn connections_beyond_the_cap_are_refused() {
        let (tx, rx) = mpsc::channel();
        let limits = ReceiverLimits {
            max_connections: 2,
            ..Default::default()
        };
        let r = KvReceiver::bind("127.0.0.1:0", sink(tx), None, limits).unwrap();
        let addr = r.local_addr().to_string();
        let mut a = KvSender::connect(&addr, None).unwrap();
        let _b = KvSender::connect(&addr, None).unwrap();
        assert!(
            KvSender::connect(&addr, None).is_err(),
            "a third connection"
        );
        a.end(L7, 0, 9).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), (L7, 0, 9));
    }
}
