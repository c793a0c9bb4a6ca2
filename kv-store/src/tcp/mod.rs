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
use std::io::{self, Write};
use std::net::{TcpStream, ToSocketAddrs};
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
        FrameWriter(&self.stream).slabs(lease, layer, slabs)
    }

    /// How long a read (a fetch's slabs) may stall.
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(d)
    }

    /// The connection itself (for tests that misbehave on it).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    pub fn end(&mut self, lease: LeaseId, slabs: u32, checksum: u64) -> io::Result<()> {
        FrameWriter(&self.stream).end(lease, slabs, checksum)
    }

    /// Sends whole blocks and ends the transfer ([`FrameWriter::blocks`]).
    pub fn blocks(
        &mut self,
        lease: LeaseId,
        blocks: &[impl AsRef<[u8]>],
        slab_bytes: usize,
    ) -> io::Result<()> {
        FrameWriter(&self.stream).blocks(lease, blocks, slab_bytes)
    }

    /// Sends get `id` to a store and reads its answer ([`recv::get`]).
    pub fn get(
        &mut self,
        id: LeaseId,
        body: &[u8],
        sink: Option<&dyn SlabSink>,
    ) -> io::Result<recv::GetAnswer> {
        recv::get(&self.stream, id, body, sink)
    }
}

/// The store side of gets: what a receiver answers a get frame with.
pub trait SlabSource: Send + Sync + 'static {
    /// Answers get `id` (asked on `conn`, with `body`) through `out`: a got frame under `id`,
    /// then whatever the get's kind sends after it (`store::get`). An error closes the
    /// connection.
    fn get(
        &self,
        conn: ConnId,
        id: LeaseId,
        body: &[u8],
        out: &mut FrameWriter<'_>,
    ) -> io::Result<()>;
}

/// Writes frames on a connection.
pub struct FrameWriter<'a>(pub(crate) &'a TcpStream);

impl FrameWriter<'_> {
    /// See [`KvSender::slabs`].
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
            write_all_vectored(&mut self.0, &parts)?;
        }
        Ok(())
    }

    pub fn end(&mut self, lease: LeaseId, slabs: u32, checksum: u64) -> io::Result<()> {
        self.frame(&Frame::End { lease, slabs }, &checksum.to_le_bytes())
    }

    /// A store's answer to get `id`.
    pub fn got(&mut self, id: LeaseId, body: &[u8]) -> io::Result<()> {
        self.frame(
            &Frame::Got {
                id,
                len: body.len() as u32,
            },
            body,
        )
    }

    /// Whole blocks (each its slabs of `slab_bytes`, layer after layer — the store's object
    /// layout) as one transfer: a slabs frame per layer, block indices `0..` in order, then
    /// the end frame with the [`Checksum`](crate::Checksum) of the slabs in `(layer, block)`
    /// order.
    pub fn blocks(
        &mut self,
        lease: LeaseId,
        blocks: &[impl AsRef<[u8]>],
        slab_bytes: usize,
    ) -> io::Result<()> {
        let mut c = crate::Checksum::new();
        let slabs = self.layers(lease, blocks, slab_bytes, Some(&mut c))?;
        self.end(lease, slabs, c.digest())
    }

    /// The slabs frames of [`blocks`](Self::blocks) — summed into `sum` when given — without
    /// the end frame; returns how many slabs went.
    pub fn layers(
        &mut self,
        lease: LeaseId,
        blocks: &[impl AsRef<[u8]>],
        slab_bytes: usize,
        mut sum: Option<&mut crate::Checksum>,
    ) -> io::Result<u32> {
        let layers = blocks
            .first()
            .map_or(0, |b| b.as_ref().len() / slab_bytes.max(1));
        for layer in 0..layers {
            let slabs: Vec<(u32, &[u8])> = blocks
                .iter()
                .enumerate()
                .map(|(i, b)| (i as u32, &b.as_ref()[layer * slab_bytes..][..slab_bytes]))
                .collect();
            if let Some(c) = sum.as_deref_mut() {
                for (_, s) in &slabs {
                    c.update(s);
                }
            }
            self.slabs(lease, layer as u32, &slabs)?;
        }
        Ok((blocks.len() * layers) as u32)
    }

    /// A frame's header and payload in one write.
    pub(crate) fn frame(&mut self, f: &Frame, payload: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(HEADER + payload.len());
        b.extend_from_slice(&f.encode());
        b.extend_from_slice(payload);
        self.0.write_all(&b)?;
        self.0.flush()
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

mod recv;

pub use recv::{Connections, GetAnswer, KvReceiver, ReceiverLimits, get, recv_exact_waitall};

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
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
