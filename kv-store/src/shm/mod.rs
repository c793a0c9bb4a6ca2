//! Shared memory on one host: a decode worker keeps its KV pool in a file under `/dev/shm` that
//! prefill workers (and the pooled store) on the same host map and write into, behind a [`fence`] that keeps a late
//! writer out of blocks taken back; an expert-plane connection moves its activations through a
//! [`mailbox`] both ends map.

pub mod fence;
pub mod mailbox;

use std::path::{Path, PathBuf};

/// Identifies this host (its boot): two workers with equal ids can share memory, unless
/// they sit in containers with separate `/dev/shm`s, which attaching detects.
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown-host".into()))
}

/// Where shared pools go: `/dev/shm` when it exists, else the temp directory.
pub fn dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A kind of shared-memory file: a name prefix and suffix (`PREFIX``PID-NONCE``SUFFIX`).
struct Kind {
    prefix: &'static str,
    suffix: &'static str,
}

/// A decode worker's KV pool.
const POOL: Kind = Kind {
    prefix: "tandem-kv-",
    suffix: ".pool",
};
/// An expert-plane connection's mailbox ([`mailbox`]).
const MAILBOX: Kind = Kind {
    prefix: "tandem-ex-",
    suffix: ".mbox",
};
const KINDS: [&Kind; 2] = [&POOL, &MAILBOX];

impl Kind {
    /// A fresh name for this process in `dir`.
    fn path(&self, dir: &Path, nonce: u32) -> PathBuf {
        dir.join(format!(
            "{}{}-{nonce:08x}{}",
            self.prefix,
            std::process::id(),
            self.suffix
        ))
    }

    /// Whether `path` is named as [`path`](Self::path) makes them and is a regular file,
    /// not a link.
    fn is_file(&self, path: &Path) -> bool {
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(self.prefix))
            .and_then(|n| n.strip_suffix(self.suffix))
            .and_then(|n| n.split_once('-'))
            .is_some_and(|(pid, nonce)| {
                pid.parse::<u32>().is_ok()
                    && nonce.len() == 8
                    && nonce.bytes().all(|b| b.is_ascii_hexdigit())
            });
        named && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
    }
}

/// A fresh pool file name for this process in `dir`.
pub fn pool_path(dir: &Path) -> PathBuf {
    let nonce: u32 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    POOL.path(dir, nonce)
}

/// Whether `path` names a pool file as [`pool_path`] makes them (`tandem-kv-PID-NONCE.pool`)
/// and is a regular file, not a link: what a prefill worker agrees to map and write.
pub fn is_pool_file(path: &Path) -> bool {
    POOL.is_file(path)
}

/// Removes pool files and mailboxes in `dir` left by processes that no longer run (a worker
/// killed with SIGKILL cannot remove its own); returns how many.
pub fn sweep_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| KINDS.iter().find_map(|k| n.strip_prefix(k.prefix)))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_pools_are_swept_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let live = pool_path(d.path());
        std::fs::write(&live, b"x").unwrap();
        // No process has pid 2^22 + 1 (above Linux's pid_max default of 2^22).
        let dead = d.path().join("tandem-kv-4194305-0000abcd.pool");
        let dead_box = d.path().join("tandem-ex-4194305-0000abcd.mbox");
        std::fs::write(&dead_box, b"x").unwrap();
        std::fs::write(&dead, b"x").unwrap();
        let other = d.path().join("unrelated-4194305.pool");
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(sweep_stale(d.path()), 2);
        assert!(live.exists() && !dead.exists() && !dead_box.exists() && other.exists());
        assert!(is_pool_file(&live));
        assert!(!is_pool_file(&other), "not a pool's name");
        assert!(
            !is_pool_file(&d.path().join("tandem-kv-1-0000abcd.pool")),
            "absent"
        );
        let link = d.path().join("tandem-kv-1-0000beef.pool");
        std::os::unix::fs::symlink(&live, &link).unwrap();
        assert!(!is_pool_file(&link), "a link");
        assert!(!host_id().is_empty());
    }
}
