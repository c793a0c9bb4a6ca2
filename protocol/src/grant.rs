//! Leases and grants: a decode worker lends blocks of its pool to one prefill under a lease id
//! nobody can guess, and describes them in a [`pb::KvTarget`] it signs with the cluster
//! secret. A prefill worker writes only where a target it can verify says; the data plane
//! accepts a lease's frames only from the connection that opened it.

use crate::auth::ClusterSecret;
use crate::pb;
use std::fmt;

/// A lease id: 128 random bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub [u8; 16]);

impl LeaseId {
    /// A fresh id from the operating system's random source.
    pub fn random() -> LeaseId {
        let mut b = [0u8; 16];
        rand::fill(&mut b);
        LeaseId(b)
    }

    /// The id as a message carries it (exactly 16 bytes).
    pub fn from_wire(b: &[u8]) -> Result<LeaseId, crate::Malformed> {
        b.try_into()
            .map(LeaseId)
            .map_err(|_| crate::Malformed("lease id (16 bytes)"))
    }

    pub fn wire(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Half of it names the lease in logs without handing the whole id to whoever reads them.
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({self})")
    }
}

/// The bytes a grant's MAC covers: every field of the target but the MAC, each
/// length-prefixed, so no two targets share an encoding.
fn signed_bytes(t: &pb::KvTarget) -> Vec<u8> {
    let mut b = Vec::with_capacity(96 + 4 * t.block_ids.len() + t.shm_path.len());
    let mut field = |bytes: &[u8]| {
        b.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        b.extend_from_slice(bytes);
    };
    field(b"tandem grant v2");
    field(&t.lease_id);
    let blocks: Vec<u8> = t.block_ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    field(&blocks);
    field(&t.cached_tokens.to_le_bytes());
    field(t.shm_path.as_bytes());
    field(t.host_id.as_bytes());
    field(&t.pool_blocks.to_le_bytes());
    field(t.kv_data_addr.as_bytes());
    field(&t.fingerprint.to_le_bytes());
    field(&t.expires_unix_ms.to_le_bytes());
    b
}

/// Signs `t` (sets its `grant`).
pub fn sign(secret: Option<&ClusterSecret>, t: &mut pb::KvTarget) {
    let bytes = signed_bytes(t);
    t.grant = match secret {
        Some(s) => s.mac(&[&bytes]).to_vec(),
        None => open_mac(&bytes).to_vec(),
    };
}

/// Whether `t`'s grant is the decode worker's signature of exactly these fields.
pub fn verify(secret: Option<&ClusterSecret>, t: &pb::KvTarget) -> bool {
    let bytes = signed_bytes(t);
    match secret {
        Some(s) => s.verify(&[&bytes], &t.grant),
        // An open cluster (loopback, no secret): the grant still binds its fields together.
        None => open_mac(&bytes)[..] == t.grant[..],
    }
}

fn open_mac(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Milliseconds since the Unix epoch now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> pb::KvTarget {
        pb::KvTarget {
            lease_id: LeaseId::random().wire(),
            block_ids: vec![3, 9, 4],
            cached_tokens: 16,
            shm_path: "/dev/shm/tandem-kv-1-0000abcd.pool".into(),
            host_id: "h".into(),
            pool_blocks: 100,
            kv_data_addr: "10.0.0.2:7000".into(),
            fingerprint: 77,
            expires_unix_ms: 1_700_000_000_000,
            grant: Vec::new(),
        }
    }

    /// A signed target verifies; changing any field, or the key, breaks it.
    #[test]
    fn every_field_is_signed() {
        let k = ClusterSecret::from_bytes(b"sixteen-bytes-or-more").unwrap();
        let other = ClusterSecret::from_bytes(b"another-secret-entirely").unwrap();
        let mut t = target();
        sign(Some(&k), &mut t);
        assert!(verify(Some(&k), &t));
        assert!(!verify(Some(&other), &t));
        assert!(!verify(None, &t));
        let edits: [fn(&mut pb::KvTarget); 11] = [
            |t| t.lease_id[0] ^= 1,
            |t| t.block_ids[1] = 10,
            |t| t.block_ids.push(11),
            |t| t.cached_tokens = 0,
            |t| t.shm_path = "/etc/passwd".into(),
            |t| t.host_id.push('x'),
            |t| t.pool_blocks = 101,
            |t| t.kv_data_addr = "10.0.0.3:7000".into(),
            |t| t.fingerprint = 78,
            |t| t.expires_unix_ms += 1,
            |t| t.grant[31] ^= 1,
        ];
        for (i, e) in edits.iter().enumerate() {
            let mut bad = t.clone();
            e(&mut bad);
            assert!(!verify(Some(&k), &bad), "edit {i} still verifies");
        }
        let mut open = target();
        sign(None, &mut open);
        assert!(verify(None, &open) && !verify(Some(&k), &open));
    }

    #[test]
    fn lease_ids_are_random_and_exactly_16_bytes() {
        let (a, b) = (LeaseId::random(), LeaseId::random());
        assert_ne!(a, b);
        assert_eq!(LeaseId::from_wire(&a.wire()).unwrap(), a);
        assert!(LeaseId::from_wire(&[1; 15]).is_err());
        assert!(LeaseId::from_wire(&[1; 17]).is_err());
        assert_eq!(a.to_string().len(), 16 + "…".len());
    }
}
