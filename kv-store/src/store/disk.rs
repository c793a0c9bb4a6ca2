//! The disk tier's files: one per block, written whole to a temporary name and renamed, so a
//! crash leaves either the whole object or none; a header names the block and checksums the
//! payload, so a file damaged on disk is found when it is read, and reopening the directory
//! re-indexes it (kv-store/SPEC.md, § Disk tier).
//!
//! A file: `TKVD` · format version (u32) · block hash (u64) · slab bytes (u32) · slabs (u32) ·
//! CRC-32 of the payload (u32) · the payload (slabs × slab bytes: layer 0's slab, layer 1's, …),
//! integers little-endian. Named `<dir>/<first two hex digits>/<16 hex digits>.kvb`.

use crate::Checksum;
use frontend::block::BlockHash;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"TKVD";
/// The disk file format's version.
pub const VERSION: u32 = 1;
/// Header bytes before the payload.
pub const HEADER: usize = 4 + 4 + 8 + 4 + 4 + 4;

/// What a file holds, as its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub slab_bytes: u32,
    pub slabs: u32,
}

impl Shape {
    pub fn bytes(&self) -> usize {
        self.slab_bytes as usize * self.slabs as usize
    }
}

/// A block directory.
#[derive(Clone)]
pub struct Dir {
    root: PathBuf,
}

/// Why a file could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{path}: {what}")]
    Corrupt { path: PathBuf, what: String },
}

impl Dir {
    /// Opens (creating, readable by this user only: every block is some request's KV) the
    /// directory.
    pub fn open(root: &Path) -> io::Result<Dir> {
        private_dir(root)?;
        Ok(Dir {
            root: root.to_owned(),
        })
    }

    pub fn path(&self, h: BlockHash) -> PathBuf {
        let name = h.to_string();
        self.root.join(&name[..2]).join(format!("{name}.kvb"))
    }

    /// Writes a block's payload whole: a temporary file, flushed, then renamed into place.
    pub fn write(&self, h: BlockHash, shape: Shape, payload: &[u8]) -> io::Result<()> {
        assert_eq!(payload.len(), shape.bytes(), "payload of the shape");
        let path = self.path(h);
        private_dir(path.parent().expect("a block file has a parent"))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut c = Checksum::new();
        c.update(payload);
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&h.0.to_le_bytes());
        header.extend_from_slice(&shape.slab_bytes.to_le_bytes());
        header.extend_from_slice(&shape.slabs.to_le_bytes());
        header.extend_from_slice(&(c.digest() as u32).to_le_bytes());
        let result = (|| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&header)?;
            f.write_all(payload)?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads a block's payload back, checking its header and checksum (returned: the CRC-32
    /// of the payload).
    pub fn read(&self, h: BlockHash) -> Result<(Shape, Vec<u8>, u32), ReadError> {
        let path = self.path(h);
        let mut f = fs::File::open(&path)?;
        let mut header = [0u8; HEADER];
        f.read_exact(&mut header)?;
        let (hash, shape, crc) = parse_header(&header).map_err(|what| ReadError::Corrupt {
            path: path.clone(),
            what,
        })?;
        let corrupt = |what: String| ReadError::Corrupt {
            path: path.clone(),
            what,
        };
        if hash != h {
            return Err(corrupt(format!("holds block {hash}")));
        }
        let mut payload = vec![0u8; shape.bytes()];
        f.read_exact(&mut payload)
            .map_err(|e| corrupt(format!("short payload: {e}")))?;
        if f.read(&mut [0u8; 1])? != 0 {
            return Err(corrupt("bytes past the payload".into()));
        }
        let mut c = Checksum::new();
        c.update(&payload);
        if c.digest() as u32 != crc {
            return Err(corrupt("checksum mismatch".into()));
        }
        Ok((shape, payload, crc))
    }

    pub fn remove(&self, h: BlockHash) {
        let _ = fs::remove_file(self.path(h));
    }

    /// Every block file here (header read, payload not), with its modification time; temporary
    /// files a crash left and files whose header is unreadable are removed.
    pub fn scan(&self) -> io::Result<Vec<(BlockHash, Shape, std::time::SystemTime)>> {
        let mut found = Vec::new();
        for sub in fs::read_dir(&self.root)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for e in fs::read_dir(sub.path())? {
                let e = e?;
                let path = e.path();
                if path.extension().and_then(|x| x.to_str()) != Some("kvb") {
                    if path
                        .extension()
                        .is_some_and(|x| x.to_string_lossy().starts_with("tmp"))
                    {
                        let _ = fs::remove_file(&path);
                    }
                    continue;
                }
                let mut header = [0u8; HEADER];
                let ok = fs::File::open(&path)
                    .and_then(|mut f| f.read_exact(&mut header))
                    .ok()
                    .and_then(|()| parse_header(&header).ok())
                    .filter(|(h, shape, _)| {
                        self.path(*h) == path
                            && e.metadata()
                                .is_ok_and(|m| m.len() == (HEADER + shape.bytes()) as u64)
                    });
                match ok {
                    Some((h, shape, _)) => {
                        let mtime = e.metadata()?.modified()?;
                        found.push((h, shape, mtime));
                    }
                    None => {
                        tracing::warn!(path = %path.display(), "removing an unreadable block file");
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        Ok(found)
    }
}

/// Creates `dir` (and its parents) with mode 0700 where it does not exist.
fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn parse_header(h: &[u8; HEADER]) -> Result<(BlockHash, Shape, u32), String> {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if &h[..4] != MAGIC {
        return Err("not a block file".into());
    }
    if u32_at(4) != VERSION {
        return Err(format!("format version {}", u32_at(4)));
    }
    let hash = BlockHash(u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")));
    let shape = Shape {
        slab_bytes: u32_at(16),
        slabs: u32_at(20),
    };
    Ok((hash, shape, u32_at(24)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header of kv-store/SPEC.md § Disk files.
    #[test]
    fn spec_header() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open(dir.path()).unwrap();
        let h = BlockHash(0x0123_4567_89ab_cdef);
        d.write(
            h,
            Shape {
                slab_bytes: 4,
                slabs: 2,
            },
            b"12345678",
        )
        .unwrap();
        let path = d.path(h);
        assert!(
            path.ends_with("01/0123456789abcdef.kvb"),
            "{}",
            path.display()
        );
        let bytes = fs::read(&path).unwrap();
        let hex: String = bytes[..HEADER].iter().map(|b| format!("{b:02x}")).collect();
        // CRC-32 of "12345678" is 0x9ae0daaf.
        assert_eq!(
            hex,
            "544b564401000000efcdab89674523010400000002000000afdae09a"
        );
        assert_eq!(&bytes[HEADER..], b"12345678");
    }

    #[test]
    fn round_trip_and_damage_found() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dir::open(dir.path()).unwrap();
        let shape = Shape {
            slab_bytes: 24,
            slabs: 3,
        };
        let payload: Vec<u8> = (0..72u8).map(|i| i.wrapping_mul(37) ^ 5).collect();
        let h = BlockHash(0xfeed_beef_0000_0001);
        d.write(h, shape, &payload).unwrap();
        assert_eq!(
            d.read(h).unwrap(),
            (shape, payload.clone(), crc32fast::hash(&payload))
        );
        let found = d.scan().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0, found[0].1), (h, shape));

        // One flipped payload byte: the checksum finds it.
        let path = d.path(h);
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 40] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(d.read(h), Err(ReadError::Corrupt { .. })));

        // A truncated file and a crash's temporary file are swept by the scan.
        fs::write(&path, &bytes[..HEADER + 10]).unwrap();
        fs::write(path.with_extension("tmp77"), b"half").unwrap();
        assert!(d.scan().unwrap().is_empty());
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 0);
    }
}
