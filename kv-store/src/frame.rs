//! The TCP data plane's frames: a 32-byte header, then the payload.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "TKV1" (the format version is in the magic)
//!      4     1  kind: 1 = slab, 2 = end of a lease's transfer
//!      5     3  zero
//!      8     8  lease id (little-endian, as every field)
//!     16     4  slab: index of the block in the lease's block list; end: slabs sent
//!     20     4  slab: layer; end: zero
//!     24     4  payload bytes (slab: the slab; end: 8, the checksum)
//!     28     4  zero
//! ```

/// Bytes of a frame header.
pub const HEADER: usize = 32;
const MAGIC: &[u8; 4] = b"TKV1";
/// Largest payload accepted (a slab of a big model is well under this).
pub const MAX_PAYLOAD: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// One `(block, layer)` slab follows (`len` bytes).
    Slab {
        lease: u64,
        block: u32,
        layer: u32,
        len: u32,
    },
    /// Every slab of the lease was sent; 8 bytes of checksum follow.
    End { lease: u64, slabs: u32 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a Tandem KV frame (bad magic)")]
    Magic,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame payload of {0} bytes is too large")]
    TooLarge(u32),
}

impl Frame {
    pub fn encode(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(MAGIC);
        let (kind, lease, a, b, len) = match *self {
            Frame::Slab {
                lease,
                block,
                layer,
                len,
            } => (1u8, lease, block, layer, len),
            Frame::End { lease, slabs } => (2, lease, slabs, 0, 8),
        };
        h[4] = kind;
        h[8..16].copy_from_slice(&lease.to_le_bytes());
        h[16..20].copy_from_slice(&a.to_le_bytes());
        h[20..24].copy_from_slice(&b.to_le_bytes());
        h[24..28].copy_from_slice(&len.to_le_bytes());
        h
    }

    pub fn decode(h: &[u8; HEADER]) -> Result<Frame, FrameError> {
        if &h[..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let lease = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let len = u32_at(24);
        if len as usize > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        match h[4] {
            1 => Ok(Frame::Slab {
                lease,
                block: u32_at(16),
                layer: u32_at(20),
                len,
            }),
            2 => Ok(Frame::End {
                lease,
                slabs: u32_at(16),
            }),
            k => Err(FrameError::Kind(k)),
        }
    }

    /// Payload bytes after the header.
    pub fn payload(&self) -> usize {
        match *self {
            Frame::Slab { len, .. } => len as usize,
            Frame::End { .. } => 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        for f in [
            Frame::Slab {
                lease: u64::MAX - 1,
                block: 7,
                layer: 29,
                len: 12_288,
            },
            Frame::End {
                lease: 3,
                slabs: 3_750,
            },
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        let mut h = Frame::End { lease: 1, slabs: 1 }.encode();
        h[4] = 9;
        assert_eq!(Frame::decode(&h), Err(FrameError::Kind(9)));
        h[0] = b'X';
        assert_eq!(Frame::decode(&h), Err(FrameError::Magic));
        let mut h = Frame::Slab {
            lease: 1,
            block: 0,
            layer: 0,
            len: 0,
        }
        .encode();
        h[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Frame::decode(&h), Err(FrameError::TooLarge(_))));
    }
}
