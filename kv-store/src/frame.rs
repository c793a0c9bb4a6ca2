//! The TCP data plane's frames: a 40-byte header, then the payload. A connection carries them
//! only after the cluster handshake (`protocol::auth`, which checks the version too).
//!
//! ```text
//! offset  size  field
//!      0     4  magic "TKV3" (the format version is in the magic)
//!      4     1  kind: 1 = slabs of one layer, 2 = end of a lease's transfer,
//!                 4 = get: a request to a store, 5 = got: the store's answer
//!      5     3  zero
//!      8    16  lease id (16 random bytes; a get's request id)
//!     24     4  slabs: how many (n); end: slabs sent in all (little-endian, as every field)
//!     28     4  slabs: the layer; end, get, got: zero
//!     32     4  slabs: bytes of each slab; end: 8 (the checksum); get, got: the body's bytes
//!     36     4  zero
//! ```
//!
//! A slabs frame's payload is `n` block indices (`u32`, indices into the lease's block list),
//! then the `n` slabs in that order. The receiver learns every destination before the first
//! payload byte arrives, so it reads the slabs straight from the socket into their blocks
//! with one scattered read (no copy through a staging buffer). An end frame's payload is the
//! sender's checksum (`u64`). A get frame's body asks a store for the longest held prefix of
//! some blocks (`store::get`); the store answers on the same connection with a got frame and,
//! unless it copied them into the asker's shared pool, their slabs frames (layer by layer,
//! block indices 0.. in order) and an end frame under the get's id (kv-store/SPEC.md).

use protocol::LeaseId;

/// Bytes of a frame header.
pub const HEADER: usize = 40;
const MAGIC: &[u8; 4] = b"TKV3";
/// Largest slab accepted (a slab of a big model is well under this).
pub const MAX_SLAB: usize = 64 << 20;
/// Most slabs in one frame (a layer of a 1M-token prompt in 16-token blocks).
pub const MAX_SLABS: usize = 1 << 16;
/// Largest get or got body (a get of [`MAX_SLABS`] blocks into a pool is under 1 MiB).
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// `n` slabs of `layer`, `len` bytes each, follow (after their block indices).
    Slabs {
        lease: LeaseId,
        layer: u32,
        n: u32,
        len: u32,
    },
    /// Every slab of the lease was sent; 8 bytes of checksum follow.
    End { lease: LeaseId, slabs: u32 },
    /// A request to a store; `len` bytes of body follow.
    Get { id: LeaseId, len: u32 },
    /// A store's answer to get `id`; `len` bytes of body follow.
    Got { id: LeaseId, len: u32 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a Tandem KV frame of this version (bad magic)")]
    Magic,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame of {n} slabs of {len} bytes is too large")]
    TooLarge { n: u32, len: u32 },
}

impl Frame {
    pub fn encode(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..4].copy_from_slice(MAGIC);
        let (kind, lease, a, b, len) = match *self {
            Frame::Slabs {
                lease,
                layer,
                n,
                len,
            } => (1u8, lease, n, layer, len),
            Frame::End { lease, slabs } => (2, lease, slabs, 0, 8),
            Frame::Get { id, len } => (4, id, 0, 0, len),
            Frame::Got { id, len } => (5, id, 0, 0, len),
        };
        h[4] = kind;
        h[8..24].copy_from_slice(&lease.0);
        h[24..28].copy_from_slice(&a.to_le_bytes());
        h[28..32].copy_from_slice(&b.to_le_bytes());
        h[32..36].copy_from_slice(&len.to_le_bytes());
        h
    }

    pub fn decode(h: &[u8; HEADER]) -> Result<Frame, FrameError> {
        if &h[..4] != MAGIC {
            return Err(FrameError::Magic);
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let lease = LeaseId(h[8..24].try_into().expect("16 bytes"));
        match h[4] {
            1 => {
                let (n, len) = (u32_at(24), u32_at(32));
                if n as usize > MAX_SLABS || len as usize > MAX_SLAB {
                    return Err(FrameError::TooLarge { n, len });
                }
                Ok(Frame::Slabs {
                    lease,
                    layer: u32_at(28),
                    n,
                    len,
                })
            }
            2 => Ok(Frame::End {
                lease,
                slabs: u32_at(24),
            }),
            4 | 5 => {
                let len = u32_at(32);
                if len as usize > MAX_BODY {
                    return Err(FrameError::TooLarge { n: 1, len });
                }
                Ok(if h[4] == 4 {
                    Frame::Get { id: lease, len }
                } else {
                    Frame::Got { id: lease, len }
                })
            }
            k => Err(FrameError::Kind(k)),
        }
    }
}

/// The block indices of a slabs frame, as sent.
pub fn encode_blocks(blocks: impl IntoIterator<Item = u32>) -> Vec<u8> {
    blocks.into_iter().flat_map(u32::to_le_bytes).collect()
}

/// The block indices of a slabs frame from their bytes.
pub fn decode_blocks(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers of kv-store/SPEC.md § Frames.
    #[test]
    fn spec_vectors() {
        let hex = |f: Frame| {
            f.encode()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let slabs = Frame::Slabs {
            lease: LeaseId([0x11; 16]),
            layer: 3,
            n: 2,
            len: 12_288,
        };
        assert_eq!(
            hex(slabs),
            "544b563301000000111111111111111111111111111111110200000003000000\
             0030000000000000"
        );
        let end = Frame::End {
            lease: LeaseId([0x11; 16]),
            slabs: 60,
        };
        assert_eq!(
            hex(end),
            "544b563302000000111111111111111111111111111111113c000000000000000800000000000000"
        );
        let get = Frame::Get {
            id: LeaseId([0x22; 16]),
            len: 745,
        };
        assert_eq!(
            hex(get),
            "544b563304000000222222222222222222222222222222220000000000000000e902000000000000"
        );
        let got = Frame::Got {
            id: LeaseId([0x22; 16]),
            len: 16,
        };
        assert_eq!(
            hex(got),
            "544b5633050000002222222222222222222222222222222200000000000000001000000000000000"
        );
    }

    #[test]
    fn frames_round_trip_and_garbage_is_refused() {
        for f in [
            Frame::Slabs {
                lease: LeaseId([0xfe; 16]),
                layer: 29,
                n: 125,
                len: 12_288,
            },
            Frame::End {
                lease: LeaseId::random(),
                slabs: 3_750,
            },
            Frame::Get {
                id: LeaseId::random(),
                len: 12,
            },
            Frame::Got {
                id: LeaseId::random(),
                len: MAX_BODY as u32,
            },
        ] {
            assert_eq!(Frame::decode(&f.encode()), Ok(f));
        }
        let mut h = Frame::End {
            lease: LeaseId([1; 16]),
            slabs: 1,
        }
        .encode();
        h[4] = 9;
        assert_eq!(Frame::decode(&h), Err(FrameError::Kind(9)));
        h[0] = b'X';
        assert_eq!(Frame::decode(&h), Err(FrameError::Magic));
        let slabs = |n: u32, len: u32| {
            Frame::Slabs {
                lease: LeaseId([1; 16]),
                layer: 0,
                n,
                len,
            }
            .encode()
        };
        let mut h = slabs(1, 0);
        h[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Frame::decode(&h),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            Frame::decode(&slabs(MAX_SLABS as u32 + 1, 16)),
            Err(FrameError::TooLarge { .. })
        ));
        let mut h = Frame::Got {
            id: LeaseId([1; 16]),
            len: 0,
        }
        .encode();
        h[32..36].copy_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
        assert!(matches!(
            Frame::decode(&h),
            Err(FrameError::TooLarge { .. })
        ));
        h[4] = 3; // the fetch frame of format version 1's store: gone
        assert_eq!(Frame::decode(&h), Err(FrameError::Kind(3)));
        let blocks = [0, 7, u32::MAX];
        assert_eq!(decode_blocks(&encode_blocks(blocks)), blocks);
    }
}
