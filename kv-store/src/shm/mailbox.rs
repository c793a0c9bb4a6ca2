//! A mailbox: one file under `/dev/shm` that the two ends of a connection on one host both
//! map, so a message's bulk (activations) moves by one `memcpy` instead of through the kernel's
//! socket buffers; the connection itself carries only the message's header, and orders the
//! two ends' turns.
//!
//! One end [creates](Mailbox::create) it (a header naming it with a random nonce, then a
//! *request* area and a *reply* area), tells the other its path and nonce over the connection;
//! the other [attaches](Mailbox::attach), checking name, size and nonce (a file of that name
//! in another `/dev/shm` — separate containers — or on another host fails the check, and the
//! connection stays on its socket); the creator then unlinks the file, so nothing is left
//! behind once either end exits (a creator killed before that leaves a file that
//! [`sweep_stale`](super::sweep_stale) removes).
//!
//! The ends take turns: the requester writes the request area, then sends its header on the
//! socket; the other reads it after receiving that header, writes the reply area, then
//! answers on the socket. The socket's send and receive order the memory accesses (a system
//! call each side), so neither end ever touches an area the other is writing.
//!
//! Trust: the attaching end maps a file its authenticated peer made; a peer that shrank the
//! file afterwards could make it fault (`SIGBUS`), as with the shared KV pool. The cluster's
//! handshake (`protocol::auth`) admits only peers holding the cluster secret.

use super::MAILBOX;
use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"TXMB";
const VERSION: u32 = 1;
/// The header's size; the areas start after it, page-aligned.
const HEADER: usize = 4096;
/// The largest mailbox an end agrees to attach.
pub const MAX_BYTES: u64 = 1 << 30;

/// A mapped mailbox.
pub struct Mailbox {
    map: MmapMut,
    /// The file, while this end (its creator) has not unlinked it.
    path: Option<PathBuf>,
    nonce: u64,
    request: usize,
    reply: usize,
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

fn round_up(bytes: usize) -> usize {
    bytes.div_ceil(HEADER).max(1) * HEADER
}

/// A random 64-bit value (std's hasher keys come from the OS's random source).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl Mailbox {
    /// Creates a mailbox in `dir` with room for `request` and `reply` bytes (each rounded up
    /// to pages).
    pub fn create(dir: &Path, request: usize, reply: usize) -> io::Result<Mailbox> {
        let (request, reply) = (round_up(request), round_up(reply));
        let len = (HEADER + request + reply) as u64;
        if len > MAX_BYTES {
            return Err(invalid(format!("a mailbox of {len} bytes")));
        }
        let nonce = random_u64();
        let (file, path) = loop {
            let path = MAILBOX.path(dir, random_u64() as u32);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        let made = (|| {
            file.set_len(len)?;
            // SAFETY: a file this process just created (O_EXCL) and sized; the peer maps it
            // only after it is told its path and nonce.
            let mut map = unsafe { MmapMut::map_mut(&file)? };
            map[..4].copy_from_slice(MAGIC);
            map[4..8].copy_from_slice(&VERSION.to_le_bytes());
            map[8..16].copy_from_slice(&nonce.to_le_bytes());
            map[16..24].copy_from_slice(&(request as u64).to_le_bytes());
            map[24..32].copy_from_slice(&(reply as u64).to_le_bytes());
            Ok(map)
        })();
        match made {
            Ok(map) => Ok(Mailbox {
                map,
                path: Some(path),
                nonce,
                request,
                reply,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Maps the mailbox the peer created at `path`, if it is one (named as mailboxes are, a
    /// regular file, a valid header of no more than [`MAX_BYTES`]) and says `nonce`.
    pub fn attach(path: &Path, nonce: u64) -> io::Result<Mailbox> {
        if !MAILBOX.is_file(path) {
            return Err(invalid(format!("{} is not a mailbox", path.display())));
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len();
        if !(HEADER as u64..=MAX_BYTES).contains(&len) {
            return Err(invalid(format!("a mailbox of {len} bytes")));
        }
        // SAFETY: a regular file of the peer's, checked below before any area is used; see the
        // module's note on trust.
        let map = unsafe { MmapMut::map_mut(&file)? };
        let word = |at: usize| u64::from_le_bytes(map[at..at + 8].try_into().expect("8 bytes"));
        if &map[..4] != MAGIC || map[4..8] != VERSION.to_le_bytes() {
            return Err(invalid("not a mailbox (header)"));
        }
        if word(8) != nonce {
            return Err(invalid("another mailbox (nonce)"));
        }
        let (request, reply) = (word(16), word(24));
        let aligned = |b: u64| b > 0 && b.is_multiple_of(HEADER as u64);
        if !aligned(request)
            || !aligned(reply)
            || request
                .checked_add(reply)
                .and_then(|b| b.checked_add(HEADER as u64))
                != Some(len)
        {
            return Err(invalid("a mailbox whose areas do not fit its size"));
        }
        Ok(Mailbox {
            map,
            path: None,
            nonce,
            request: request as usize,
            reply: reply as usize,
        })
    }

    /// Where the file is, while this end (the creator) has not unlinked it.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Removes the file (both ends keep their mappings): the creator, once the peer attached.
    pub fn unlink(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The request area's room, in `f32`s.
    pub fn request_len(&self) -> usize {
        self.request / 4
    }

    /// The reply area's room, in `f32`s.
    pub fn reply_len(&self) -> usize {
        self.reply / 4
    }

    fn f32s(bytes: &[u8]) -> &[f32] {
        // SAFETY: every area starts on a page of the mapping and spans whole pages: aligned
        // for f32 and a multiple of 4 bytes; any bit pattern is an f32.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 4) }
    }

    fn f32s_mut(bytes: &mut [u8]) -> &mut [f32] {
        // SAFETY: as in `f32s`.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / 4) }
    }

    /// The request area (the requester writes it, the other end reads it).
    pub fn request(&self) -> &[f32] {
        Self::f32s(&self.map[HEADER..HEADER + self.request])
    }

    pub fn request_mut(&mut self) -> &mut [f32] {
        Self::f32s_mut(&mut self.map[HEADER..HEADER + self.request])
    }

    /// The reply area (the other end writes it, the requester reads it).
    pub fn reply(&self) -> &[f32] {
        Self::f32s(&self.map[HEADER + self.request..])
    }

    /// The request to read and the reply to write at once (the answering end).
    pub fn answer(&mut self) -> (&[f32], &mut [f32]) {
        let (req, rep) = self.map[HEADER..].split_at_mut(self.request);
        (Self::f32s(req), Self::f32s_mut(rep))
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        self.unlink();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_see_each_others_writes() {
        let d = tempfile::tempdir().unwrap();
        let mut a = Mailbox::create(d.path(), 1000, 5000).unwrap();
        assert_eq!((a.request_len(), a.reply_len()), (1024, 2048));
        let path = a.path().unwrap().to_path_buf();
        let mut b = Mailbox::attach(&path, a.nonce()).unwrap();
        a.unlink();
        assert!(!path.exists(), "unlinked once attached");
        a.request_mut()[..3].copy_from_slice(&[1.5, -2.0, 3.25]);
        let (req, rep) = b.answer();
        assert_eq!(&req[..3], &[1.5, -2.0, 3.25]);
        rep[2047] = 7.0;
        assert_eq!(a.reply()[2047], 7.0);
    }

    #[test]
    fn attach_refuses_what_is_not_the_peers_mailbox() {
        let d = tempfile::tempdir().unwrap();
        let a = Mailbox::create(d.path(), 4096, 4096).unwrap();
        let path = a.path().unwrap().to_path_buf();
        assert!(
            Mailbox::attach(&path, a.nonce() ^ 1).is_err(),
            "another nonce"
        );
        let other = d.path().join("notes.txt");
        std::fs::write(&other, vec![0u8; 3 * 4096]).unwrap();
        assert!(
            Mailbox::attach(&other, a.nonce()).is_err(),
            "not a mailbox's name"
        );
        let link = MAILBOX.path(d.path(), 0xabcd);
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(Mailbox::attach(&link, a.nonce()).is_err(), "a link");
        let short = MAILBOX.path(d.path(), 0xbeef);
        std::fs::copy(&path, &short).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&short)
            .unwrap()
            .set_len(2 * 4096)
            .unwrap();
        assert!(
            Mailbox::attach(&short, a.nonce()).is_err(),
            "areas past its end"
        );
        assert!(Mailbox::attach(&path, a.nonce()).is_ok());
        drop(a);
        assert!(!path.exists(), "the creator removes it when dropped");
    }
}
