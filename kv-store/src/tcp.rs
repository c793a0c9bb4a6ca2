//! The TCP data plane: a prefill worker on another host streams slabs to the decode worker
//! that reserved the blocks; the receiver reads the stream in large chunks and copies each
//! slab into its block (one user-space copy costs less than a system call per slab).
//!
//! Plain blocking sockets on threads: one connection carries one transfer at a time, and the
//! receiver runs a thread per connection (a handful of prefill workers), so there is nothing
//! to multiplex.

use crate::frame::{Frame, HEADER};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Where a slab's bytes go: `len` bytes that only this transfer writes until its lease ends.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub ptr: *mut u8,
    pub len: usize,
}

/// The decode side of transfers: finds the memory for each slab and hears when a lease's
/// transfer is complete.
pub trait SlabSink: Send + Sync + 'static {
    /// The destination of slab `(block, layer)` of `lease`, of exactly `len` bytes; `None`
    /// when the lease is unknown or expired (the bytes are read and dropped).
    ///
    /// # Safety contract
    /// The returned memory must stay valid, and be written by nobody else, until
    /// [`end`](Self::end) or [`abort`](Self::abort) is called for the lease.
    fn slot(&self, lease: u64, block: u32, layer: u32, len: usize) -> Option<Slot>;
    /// Every slab of `lease` arrived (`slabs` of them); the sender's checksum.
    fn end(&self, lease: u64, slabs: u32, checksum: u64);
    /// The connection carrying `lease`'s transfer broke before its end: no more bytes come.
    fn abort(&self, lease: u64);
}

/// Sends slabs to one decode worker's data plane.
pub struct KvSender {
    stream: TcpStream,
}

impl KvSender {
    pub fn connect(addr: &str) -> io::Result<KvSender> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(KvSender { stream })
    }

    pub fn slab(&mut self, lease: u64, block: u32, layer: u32, bytes: &[u8]) -> io::Result<()> {
        self.slabs(lease, layer, &[(block, bytes)])
    }

    /// Several slabs of one layer, in as few system calls as the socket takes (each frame's
    /// header and payload go out in one vectored write, many frames per call).
    pub fn slabs(&mut self, lease: u64, layer: u32, slabs: &[(u32, &[u8])]) -> io::Result<()> {
        const FRAMES_PER_CALL: usize = 256;
        for group in slabs.chunks(FRAMES_PER_CALL) {
            let headers: Vec<[u8; HEADER]> = group
                .iter()
                .map(|&(block, bytes)| {
                    Frame::Slab {
                        lease,
                        block,
                        layer,
                        len: bytes.len() as u32,
                    }
                    .encode()
                })
                .collect();
            let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * group.len());
            for (h, &(_, bytes)) in headers.iter().zip(group) {
                parts.push(h);
                parts.push(bytes);
            }
            write_all_vectored(&mut self.stream, &parts)?;
        }
        Ok(())
    }

    pub fn end(&mut self, lease: u64, slabs: u32, checksum: u64) -> io::Result<()> {
        self.stream
            .write_all(&Frame::End { lease, slabs }.encode())?;
        self.stream.write_all(&checksum.to_le_bytes())?;
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

/// A running data-plane server; stops accepting when dropped.
pub struct KvReceiver {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl KvReceiver {
    /// Listens on `addr` (port 0 picks one) and delivers every slab to `sink`.
    pub fn bind(addr: &str, sink: Arc<dyn SlabSink>) -> io::Result<KvReceiver> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let accept = std::thread::Builder::new()
            .name("tandem-kv-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::Acquire) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let sink = sink.clone();
                    let _ = std::thread::Builder::new()
                        .name("tandem-kv-recv".into())
                        .spawn(move || {
                            let mut open = Vec::new();
                            if let Err(e) = serve(conn, &*sink, &mut open) {
                                tracing::debug!(error = %e, "KV data connection closed");
                            }
                            for lease in open {
                                sink.abort(lease);
                            }
                        });
                }
            })?;
        Ok(KvReceiver {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
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

/// Bytes the receiver reads from the socket at a time.
const RECV_BUFFER: usize = 1 << 20;

/// Receives frames until the peer closes; `open` holds the leases begun and not ended.
fn serve(conn: TcpStream, sink: &dyn SlabSink, open: &mut Vec<u64>) -> io::Result<()> {
    conn.set_nodelay(true)?;
    // Large reads: one system call brings in many frames, whose payloads are then copied
    // into their blocks (a user-space copy is cheaper than a system call per 12 KiB slab;
    // payloads larger than the buffer go straight from the socket into their blocks).
    let mut conn = io::BufReader::with_capacity(RECV_BUFFER, conn);
    let mut scratch = Vec::new();
    loop {
        let mut h = [0u8; HEADER];
        match conn.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let f = Frame::decode(&h).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match f {
            Frame::Slab {
                lease,
                block,
                layer,
                len,
            } => {
                if !open.contains(&lease) {
                    open.push(lease);
                }
                match sink.slot(lease, block, layer, len as usize) {
                    Some(s) if s.len == len as usize => {
                        // SAFETY: the sink guarantees `len` writable bytes owned by this
                        // transfer.
                        let dst = unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) };
                        conn.read_exact(dst)?;
                    }
                    _ => {
                        scratch.resize(len as usize, 0);
                        conn.read_exact(&mut scratch)?;
                    }
                }
            }
            Frame::End { lease, slabs } => {
                let mut c = [0u8; 8];
                conn.read_exact(&mut c)?;
                open.retain(|&l| l != lease);
                sink.end(lease, slabs, u64::from_le_bytes(c));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc;

    /// Destination buffers per (lease, block, layer), and completions.
    struct Buffers {
        mem: Mutex<Vec<u8>>,
        slab: usize,
        done: Mutex<mpsc::Sender<(u64, u32, u64)>>,
    }

    impl SlabSink for Buffers {
        fn slot(&self, lease: u64, block: u32, layer: u32, len: usize) -> Option<Slot> {
            if lease != 7 || len != self.slab {
                return None;
            }
            let mut m = self.mem.lock().unwrap();
            let at = (layer as usize * 4 + block as usize) * self.slab;
            Some(Slot {
                ptr: m[at..].as_mut_ptr(),
                len,
            })
        }
        fn end(&self, lease: u64, slabs: u32, checksum: u64) {
            let _ = self.done.lock().unwrap().send((lease, slabs, checksum));
        }
        fn abort(&self, lease: u64) {
            let _ = self.done.lock().unwrap().send((lease, u32::MAX, 0));
        }
    }

    #[test]
    fn slabs_land_in_their_slots_and_unknown_leases_are_dropped() {
        let slab = 1000;
        let (tx, rx) = mpsc::channel();
        let sink = Arc::new(Buffers {
            mem: Mutex::new(vec![0; 4 * 3 * slab]),
            slab,
            done: Mutex::new(tx),
        });
        let r = KvReceiver::bind("127.0.0.1:0", sink.clone()).unwrap();
        let mut s = KvSender::connect(&r.local_addr().to_string()).unwrap();
        let mut sum = crate::Checksum::new();
        for layer in 0..3u32 {
            for block in 0..4u32 {
                let bytes: Vec<u8> = (0..slab)
                    .map(|i| (i as u32 * 7 + block * 31 + layer) as u8)
                    .collect();
                sum.update(&bytes);
                s.slab(7, block, layer, &bytes).unwrap();
                s.slab(8, block, layer, &bytes).unwrap(); // unknown lease: read and dropped
            }
        }
        s.end(7, 12, sum.digest()).unwrap();
        let (lease, slabs, got) = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!((lease, slabs, got), (7, 12, sum.digest()));
        let m = sink.mem.lock().unwrap();
        let mut check = crate::Checksum::new();
        for layer in 0..3 {
            for block in 0..4 {
                check.update(&m[(layer * 4 + block) * slab..][..slab]);
            }
        }
        assert_eq!(check.digest(), sum.digest());
    }
}
