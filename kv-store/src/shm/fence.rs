//! The fence between a decode worker and the prefill workers writing its shared pool in place.
//!
//! A prefill worker on the decode worker's host writes a lease's blocks straight into the
//! mapped pool: nothing the decode worker does to its own mapping can stop a write already
//! under way. So before the decode worker reuses blocks it lent — the lease expired, was
//! released, cancelled, or committed — it must know that no writer is inside them and that
//! none will enter later. The fence gives both, with no clock and no message:
//!
//! - Beside the pool lies a **fence file** (`….pool.fence`, 0600, the decode worker's) holding
//!   one 8-byte **tag** per block. Granting a lease writes the lease's tag over the blocks the
//!   writer may fill; taking it back writes zeros.
//! - A writer **holds** its blocks for the whole pass: it takes an exclusive open-file-
//!   description byte-range lock (`F_OFD_SETLK`) over each block's tag, then checks that
//!   every tag is its lease's. A mismatch (the lease was taken back, or the blocks lent to
//!   another) refuses the write before it starts.
//! - Taking a lease back **revokes** its blocks: the decode worker try-locks each tag, and
//!   only with all locks in hand writes zeros and lets the blocks go. A lock held elsewhere
//!   means a writer is inside: the blocks stay **quarantined** (out of the free list) and the
//!   revoke is retried until the writer finishes — or dies, since the kernel drops a dead
//!   process's locks with its files.
//!
//! Locks are per open file description, so each writer opens the fence file for itself and
//! the decode worker keeps one description of its own: the two conflict even inside one
//! process (the tests rely on it), and threads sharing a description never block each other
//! (the decode worker's revokes touch disjoint blocks).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes of one block's tag.
const TAG: u64 = 8;

/// The tag of a lease: its id's first 8 bytes, never zero (zero means "lent to nobody").
pub fn lease_tag(lease: &[u8; 16]) -> u64 {
    u64::from_le_bytes(lease[..8].try_into().expect("8 bytes")) | 1
}

/// Where the fence of the pool at `pool` lies.
pub fn fence_path(pool: &Path) -> PathBuf {
    let mut p = pool.as_os_str().to_owned();
    p.push(".fence");
    PathBuf::from(p)
}

/// A writer could not hold its blocks.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    #[error("block {0} is being taken back by the decode worker")]
    Busy(u32),
    #[error("block {0} is no longer lent to this lease (it was taken back)")]
    Revoked(u32),
    #[error("the fence file: {0}")]
    Io(#[from] io::Error),
}

/// The decode worker's side: creates the fence, grants and revokes.
pub struct Fence {
    file: File,
    path: PathBuf,
    n_blocks: u32,
}

impl Fence {
    /// Creates the fence of a pool of `n_blocks` at `pool` (every block lent to nobody);
    /// removed when dropped.
    pub fn create(pool: &Path, n_blocks: u32) -> io::Result<Fence> {
        let path = fence_path(pool);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.set_len(n_blocks as u64 * TAG)?;
        Ok(Fence {
            file,
            path,
            n_blocks,
        })
    }

    /// Lends `blocks` to the lease tagged `tag`: a writer holding that lease's grant may now
    /// hold them. The blocks must be lent to nobody (fresh from the free list).
    pub fn grant(&self, blocks: &[u32], tag: u64) -> io::Result<()> {
        for (first, n, _) in runs(blocks) {
            self.check(first + (n - 1))?;
            self.file
                .write_all_at(&tag.to_le_bytes().repeat(n as usize), first as u64 * TAG)?;
        }
        Ok(())
    }

    /// Takes `blocks` back. `Ok(true)`: no writer is inside and none can enter now; the blocks
    /// may be reused. `Ok(false)`: a writer holds some of them: nothing changed, try again
    /// later (until then the blocks must stay out of use).
    pub fn revoke(&self, blocks: &[u32]) -> io::Result<bool> {
        let mut locked = Vec::new();
        let result = (|| {
            for (first, n, _) in runs(blocks) {
                self.check(first + (n - 1))?;
                if !lock(&self.file, first, n, libc::F_WRLCK as i16)? {
                    return Ok(false);
                }
                locked.push((first, n));
            }
            for &(first, n) in &locked {
                self.file
                    .write_all_at(&vec![0; (n as u64 * TAG) as usize], first as u64 * TAG)?;
            }
            Ok(true)
        })();
        for (first, n) in locked {
            let _ = lock(&self.file, first, n, libc::F_UNLCK as i16);
        }
        result
    }

    fn check(&self, b: u32) -> io::Result<()> {
        if b >= self.n_blocks {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block {b} outside a fence of {}", self.n_blocks),
            ));
        }
        Ok(())
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A writer's hold on the blocks it fills: while it lives, the decode worker cannot take them
/// back. Dropping it (closing its own description of the fence file) lets go.
#[derive(Debug)]
pub struct Hold {
    _file: File,
}

impl Hold {
    /// Holds `blocks` of the pool at `pool` for the lease tagged `tag`: all of them, or an
    /// error and none.
    pub fn take(pool: &Path, blocks: &[u32], tag: u64) -> Result<Hold, HoldError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(fence_path(pool))?;
        let tags = file.metadata()?.len() / TAG;
        let mut got = Vec::new();
        for (low, n, falling) in runs(blocks) {
            // Blocks past the fence are lent to nobody: the first of them in the list's order
            // is refused — after the run's blocks before it, checked first.
            let inside = tags.saturating_sub(low as u64).min(n as u64) as u32;
            let outside = (inside < n).then_some(if falling { low + n - 1 } else { low + inside });
            if falling && let Some(b) = outside {
                return Err(HoldError::Revoked(b));
            }
            if inside > 0 {
                if !lock(&file, low, inside, libc::F_WRLCK as i16)? {
                    return Err(HoldError::Busy(if falling { low + n - 1 } else { low }));
                }
                got.resize((inside as u64 * TAG) as usize, 0);
                file.read_exact_at(&mut got, low as u64 * TAG)?;
                let lent = |t: &[u8]| u64::from_le_bytes(t.try_into().expect("8 bytes")) == tag;
                let mut tags = got.chunks_exact(TAG as usize);
                let bad = if falling {
                    tags.rposition(|t| !lent(t))
                } else {
                    tags.position(|t| !lent(t))
                };
                if let Some(k) = bad {
                    return Err(HoldError::Revoked(low + k as u32));
                }
            }
            if let Some(b) = outside {
                return Err(HoldError::Revoked(b));
            }
        }
        Ok(Hold { _file: file })
    }
}

/// `blocks` as runs of consecutive ids, rising or falling (a pool hands out free blocks in
/// either order): `(lowest, count, falling)` in the list's order. The fence takes a run with
/// one system call where it took one per block.
fn runs(blocks: &[u32]) -> impl Iterator<Item = (u32, u32, bool)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *blocks.get(i)?;
        let next = |n: u32, up: bool| {
            let want = if up {
                first.checked_add(n)
            } else {
                first.checked_sub(n)
            };
            want.is_some() && blocks.get(i + n as usize) == want.as_ref()
        };
        let up = !next(1, false);
        let mut n = 1u32;
        while next(n, up) {
            n += 1;
        }
        i += n as usize;
        Some(if up {
            (first, n, false)
        } else {
            (first + 1 - n, n, true)
        })
    })
}

/// Sets (`F_WRLCK`) or clears (`F_UNLCK`) this description's lock on the tags of blocks
/// `b..b + n` without waiting; `Ok(false)` when another description holds any of them.
fn lock(file: &File, b: u32, n: u32, kind: i16) -> io::Result<bool> {
    // SAFETY: an all-zero `flock` is valid; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = (b as u64 * TAG) as libc::off_t;
    fl.l_len = (n as u64 * TAG) as libc::off_t;
    fl.l_pid = 0; // required for OFD locks
    // SAFETY: `file` is an open descriptor and `fl` a valid flock for the call's duration.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tandem-kv-1-0000abcd.pool");
        (d, p)
    }

    #[test]
    fn a_writer_holds_only_what_its_lease_was_lent() {
        let (_d, p) = pool();
        let f = Fence::create(&p, 8).unwrap();
        let (a, b) = (lease_tag(&[7; 16]), lease_tag(&[9; 16]));
        f.grant(&[1, 2, 5], a).unwrap();
        f.grant(&[3], b).unwrap();
        // Its own blocks: yes; one of another lease's, or one lent to nobody: no.
        drop(Hold::take(&p, &[1, 2, 5], a).unwrap());
        assert!(matches!(
            Hold::take(&p, &[1, 3], a),
            Err(HoldError::Revoked(3))
        ));
        assert!(matches!(
            Hold::take(&p, &[4], a),
            Err(HoldError::Revoked(4))
        ));
        assert!(matches!(
            Hold::take(&p, &[8], a),
            Err(HoldError::Revoked(8))
        ));
        // Taken back while nobody writes: the writer is refused from then on.
        assert!(f.revoke(&[1, 2, 5]).unwrap());
        assert!(matches!(
            Hold::take(&p, &[1], a),
            Err(HoldError::Revoked(1))
        ));
        // Lent again, to another lease: still not the first writer's.
        f.grant(&[1, 2], b).unwrap();
        assert!(matches!(
            Hold::take(&p, &[1], a),
            Err(HoldError::Revoked(1))
        ));
        assert!(Hold::take(&p, &[1, 2, 3], b).is_ok());
    }

    #[test]
    fn runs_cover_the_blocks_in_order() {
        let r = |b: &[u32]| runs(b).collect::<Vec<_>>();
        assert_eq!(r(&[]), []);
        assert_eq!(r(&[4]), [(4, 1, false)]);
        assert_eq!(
            r(&[1, 2, 3, 7, 8, 5, 5, 9, 8, 7, 6]),
            [
                (1, 3, false),
                (7, 2, false),
                (5, 1, false),
                (5, 1, false),
                (6, 4, true)
            ]
        );
        assert_eq!(
            r(&[u32::MAX - 1, u32::MAX, 0, 1, 0]),
            [(u32::MAX - 1, 2, false), (0, 2, false), (0, 1, false)]
        );
        assert_eq!(r(&[2, 1, 0, 0]), [(0, 3, true), (0, 1, false)]);
    }

    /// Runs and lone blocks mixed: a writer is refused at the first block of a run that is not
    /// its lease's, and a revoke under a writer inside one block of a run changes nothing.
    #[test]
    fn runs_of_blocks_are_held_and_revoked_block_by_block() {
        let (_d, p) = pool();
        let f = Fence::create(&p, 16).unwrap();
        let (a, b) = (lease_tag(&[2; 16]), lease_tag(&[4; 16]));
        f.grant(&[3, 4, 5, 6, 9], a).unwrap();
        f.grant(&[7], b).unwrap();
        f.grant(&[14, 15], a).unwrap();
        assert!(matches!(
            Hold::take(&p, &[3, 4, 5, 6, 7, 8], a),
            Err(HoldError::Revoked(7))
        ));
        assert!(matches!(
            Hold::take(&p, &[9, 10, 11], a),
            Err(HoldError::Revoked(10))
        ));
        assert!(matches!(
            Hold::take(&p, &[14, 15, 16, 17], a),
            Err(HoldError::Revoked(16))
        ));
        // Falling runs, as a pool's free list hands blocks out.
        assert!(matches!(
            Hold::take(&p, &[9, 8, 7, 6], a),
            Err(HoldError::Revoked(8))
        ));
        assert!(matches!(
            Hold::take(&p, &[17, 16, 15, 14], a),
            Err(HoldError::Revoked(17))
        ));
        assert!(Hold::take(&p, &[6, 5, 4, 3], a).is_ok());
        let h = Hold::take(&p, &[5], a).unwrap();
        assert!(
            !f.revoke(&[3, 4, 5, 6, 9]).unwrap(),
            "revoked under a writer"
        );
        assert!(
            Hold::take(&p, &[3, 4], a).is_ok(),
            "a failed revoke changed nothing"
        );
        drop(h);
        assert!(f.revoke(&[3, 4, 5, 6, 9]).unwrap());
        for blk in [3, 4, 5, 6, 9] {
            assert!(matches!(
                Hold::take(&p, &[blk], a),
                Err(HoldError::Revoked(x)) if x == blk
            ));
        }
        assert!(
            Hold::take(&p, &[7], b).is_ok(),
            "another lease's block untouched"
        );
    }

    #[test]
    fn blocks_a_writer_holds_cannot_be_taken_back_until_it_lets_go() {
        let (_d, p) = pool();
        let f = Fence::create(&p, 4).unwrap();
        let t = lease_tag(&[1; 16]);
        f.grant(&[0, 2], t).unwrap();
        let h = Hold::take(&p, &[0, 2], t).unwrap();
        for _ in 0..3 {
            assert!(!f.revoke(&[0, 2]).unwrap(), "revoked under a writer");
            assert!(!f.revoke(&[2]).unwrap());
        }
        // A failed revoke changed nothing: the writer's lease still holds, and a second
        // writer of the same lease waits its turn rather than writing alongside.
        assert!(matches!(Hold::take(&p, &[2], t), Err(HoldError::Busy(2))));
        drop(h);
        assert!(f.revoke(&[0, 2]).unwrap());
        assert!(matches!(
            Hold::take(&p, &[0], t),
            Err(HoldError::Revoked(0))
        ));
    }

    /// A writer killed (SIGKILL) while holding blocks: the kernel drops its locks with its
    /// files, and the blocks can be taken back.
    #[test]
    fn a_killed_writers_hold_is_gone_with_it() {
        let (_d, p) = pool();
        let f = Fence::create(&p, 2).unwrap();
        f.grant(&[1], lease_tag(&[3; 16])).unwrap();
        let path =
            std::ffi::CString::new(fence_path(&p).into_os_string().into_encoded_bytes()).unwrap();
        let mut pipe = [0i32; 2];
        // SAFETY: plain libc calls; the child only makes async-signal-safe calls (open, fcntl,
        // write, pause) on memory prepared before the fork, then is killed.
        unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let fd = libc::open(path.as_ptr(), libc::O_RDWR);
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = libc::F_WRLCK as _;
                fl.l_whence = libc::SEEK_SET as _;
                fl.l_start = TAG as _;
                fl.l_len = TAG as _;
                let ok = fd >= 0 && libc::fcntl(fd, libc::F_OFD_SETLK, &mut fl) == 0;
                libc::write(pipe[1], [ok as u8].as_ptr().cast(), 1);
                loop {
                    libc::pause();
                }
            }
            let mut ok = [0u8];
            assert_eq!(libc::read(pipe[0], ok.as_mut_ptr().cast(), 1), 1);
            assert_eq!(ok[0], 1, "the child could not lock");
            assert!(!f.revoke(&[1]).unwrap(), "revoked under a live writer");
            libc::kill(pid, libc::SIGKILL);
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            libc::close(pipe[0]);
            libc::close(pipe[1]);
        }
        assert!(
            f.revoke(&[1]).unwrap(),
            "the dead writer's hold outlived it"
        );
        // Out of range; and the file goes with the fence.
        assert!(f.grant(&[2], 1).is_err());
        let path = fence_path(&p);
        assert!(path.exists());
        drop(f);
        assert!(!path.exists());
    }
}
