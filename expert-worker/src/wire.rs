//! The expert plane's messages, after the cluster handshake (`protocol::auth`, plane
//! `Experts`) on a TCP connection. All integers little-endian, activations raw `f32`.
//!
//! ```text
//! server → client  hello   "TEX1" | n_layers u32 | n_experts u32 | d u32 | fingerprint u64
//!                          | n_held u32 | held experts u32 × n_held
//! client → server  run     layer u32 | n_rows u32 | n_groups u32
//!                          | (expert u32, count u32) × n_groups
//!                          | row indices u32 × Σ count   (into this message's rows)
//!                          | rows f32 × n_rows·d
//! server → client  result  status u32 (0) | compute µs u32 | outputs f32 × Σ count·d
//!                          (group order)
//!                   or     status u32 (1) | length u32 | UTF-8 reason
//! client → server  load    0xFFFF_FFFF u32 | n u32 | experts u32 × n
//! server → client  loaded  status u32 (0) | n_held u32 | held experts u32 × n_held
//!                   or     status u32 (1) | length u32 | UTF-8 reason
//! client → server  attach  0xFFFF_FFFE u32 | nonce u64 | length u32 | UTF-8 path
//! server → client  attached status u32 (0)
//!                   or     status u32 (1) | length u32 | UTF-8 reason
//! ```
//!
//! `attach` (one host only) names a mailbox (`kv_store::shm::mailbox`) the client made; once
//! the worker has mapped it, every later `run` on the connection leaves its rows out (they are
//! in the mailbox's request area) and every `result` its outputs (in the reply area). Another
//! `attach` replaces the mailbox (a bigger one); one that fails leaves the connection on the
//! socket for rows and outputs.
//!
//! A step sends each peer one `run` per layer: the rows any of its experts needs, each once
//! (a row routed to two experts of one peer crosses the wire once), with each expert's list.
//! `load` (a run's layer is never `0xFFFF_FFFF`) asks a worker to hold more experts, of every
//! layer, from its model file: how a survivor takes over a lost worker's experts.

use engine::Precision;
use engine::gguf::GgufFile;
use std::io::{self, Read, Write};

const MAGIC: &[u8; 4] = b"TEX1";
/// Largest run accepted, in rows (a prefill chunk of many sequences fits easily).
pub const MAX_ROWS: u32 = 1 << 16;
/// Largest group count (experts per model) accepted.
pub const MAX_GROUPS: u32 = 1 << 12;

/// What an expert worker serves: the model (by fingerprint) and which experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub n_layers: u32,
    pub n_experts: u32,
    pub d: u32,
    pub fingerprint: u64,
    pub held: Vec<u32>,
}

/// One expert's share of a run: which expert, and which of the run's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub expert: u32,
    pub rows: Vec<u32>,
}

/// The model's identity for the expert plane: xxh3-64 of the GGUF's bytes, salted with the
/// precision (both sides must compute the same bits).
pub fn fingerprint(g: &GgufFile, precision: Precision) -> u64 {
    twox_hash::XxHash3_64::oneshot_with_seed(0x7e78_0000 | precision as u64, g.bytes())
}

fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u32s(r: &mut impl Read, n: usize) -> io::Result<Vec<u32>> {
    let mut b = vec![0u8; n * 4];
    r.read_exact(&mut b)?;
    Ok(b.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// Reads `n` f32s.
pub fn read_f32s(r: &mut impl Read, n: usize) -> io::Result<Vec<f32>> {
    let mut out = vec![0f32; n];
    // SAFETY: any bit pattern is an f32; the slice covers exactly `out`'s bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), n * 4) };
    r.read_exact(bytes)?;
    if cfg!(target_endian = "big") {
        out.iter_mut()
            .for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
    }
    Ok(out)
}

/// `x` as little-endian bytes, without a copy on little-endian machines.
pub fn f32_bytes(x: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding; the slice covers exactly `x`'s bytes.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x))
        })
    } else {
        std::borrow::Cow::Owned(x.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Hello {
    pub fn write(&self, w: &mut impl Write) -> io::Result<()> {
        let mut b = MAGIC.to_vec();
        b.extend(u32s(&[self.n_layers, self.n_experts, self.d]));
        b.extend(self.fingerprint.to_le_bytes());
        b.extend((self.held.len() as u32).to_le_bytes());
        b.extend(u32s(&self.held));
        w.write_all(&b)
    }

    pub fn read(r: &mut impl Read) -> io::Result<Hello> {
        let mut m = [0u8; 4];
        r.read_exact(&mut m)?;
        if &m != MAGIC {
            return Err(invalid("not an expert worker (bad hello)".into()));
        }
        let h = read_u32s(r, 3)?;
        let mut f = [0u8; 8];
        r.read_exact(&mut f)?;
        let n = read_u32(r)?;
        if n > MAX_GROUPS {
            return Err(invalid(format!("{n} experts held")));
        }
        Ok(Hello {
            n_layers: h[0],
            n_experts: h[1],
            d: h[2],
            fingerprint: u64::from_le_bytes(f),
            held: read_u32s(r, n as usize)?,
        })
    }
}

/// Writes a run of `n` rows and each group's row indices into them; the rows (`[n × d]`)
/// follow on the socket, or are in the connection's mailbox (`None`).
pub fn write_run(
    w: &mut impl Write,
    layer: u32,
    n: usize,
    rows: Option<&[f32]>,
    groups: &[Group],
) -> io::Result<()> {
    let mut head = u32s(&[layer, n as u32, groups.len() as u32]);
    for g in groups {
        head.extend(u32s(&[g.expert, g.rows.len() as u32]));
    }
    for g in groups {
        head.extend(u32s(&g.rows));
    }
    w.write_all(&head)?;
    if let Some(rows) = rows {
        w.write_all(&f32_bytes(rows))?;
    }
    w.flush()
}

/// A run as read by the server.
#[derive(Debug)]
pub struct Run {
    pub layer: u32,
    /// How many rows.
    pub n: u32,
    /// The rows, when they came on the socket (else empty: they are in the mailbox).
    pub rows: Vec<f32>,
    pub groups: Vec<Group>,
}

/// The first word of a `load`.
const LOAD: u32 = u32::MAX;
/// The first word of an `attach`.
const ATTACH: u32 = u32::MAX - 1;
/// The longest mailbox path accepted.
const MAX_PATH: u32 = 4096;

/// What a client asks.
#[derive(Debug)]
pub enum Request {
    Run(Run),
    /// Hold these experts too.
    Load(Vec<u32>),
    /// Move rows and outputs through this mailbox from now on.
    Attach {
        path: String,
        nonce: u64,
    },
}

/// Asks the worker to map the mailbox at `path` saying `nonce`.
pub fn write_attach(w: &mut impl Write, path: &str, nonce: u64) -> io::Result<()> {
    let mut b = ATTACH.to_le_bytes().to_vec();
    b.extend(nonce.to_le_bytes());
    b.extend((path.len() as u32).to_le_bytes());
    b.extend(path.as_bytes());
    w.write_all(&b)?;
    w.flush()
}

/// Whether the worker mapped the mailbox, or why not.
pub fn write_attached(w: &mut impl Write, done: Result<(), String>) -> io::Result<()> {
    match done {
        Ok(()) => w.write_all(&0u32.to_le_bytes())?,
        Err(why) => write_reason(w, &why)?,
    }
    w.flush()
}

/// Reads the reply to an `attach`.
pub fn read_attached(r: &mut impl Read) -> io::Result<Result<(), String>> {
    match read_u32(r)? {
        0 => Ok(Ok(())),
        1 => Ok(Err(read_reason(r)?)),
        s => Err(invalid(format!("attach status {s}"))),
    }
}

/// Status 1 and why (after the status word).
fn write_reason(w: &mut impl Write, why: &str) -> io::Result<()> {
    w.write_all(&1u32.to_le_bytes())?;
    w.write_all(&(why.len() as u32).to_le_bytes())?;
    w.write_all(why.as_bytes())
}

/// A reason, after status 1.
fn read_reason(r: &mut impl Read) -> io::Result<String> {
    let n = read_u32(r)?.min(1 << 16) as usize;
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Asks the worker to hold `experts` too.
pub fn write_load(w: &mut impl Write, experts: &[u32]) -> io::Result<()> {
    let mut b = u32s(&[LOAD, experts.len() as u32]);
    b.extend(u32s(experts));
    w.write_all(&b)?;
    w.flush()
}

/// The experts held after a `load`, or why not.
pub fn write_loaded(w: &mut impl Write, held: Result<&[u32], String>) -> io::Result<()> {
    match held {
        Ok(h) => {
            let mut b = u32s(&[0, h.len() as u32]);
            b.extend(u32s(h));
            w.write_all(&b)?;
        }
        Err(why) => write_reason(w, &why)?,
    }
    w.flush()
}

/// Reads the reply to a `load`: the experts now held, or the worker's reason.
pub fn read_loaded(r: &mut impl Read) -> io::Result<Result<Vec<u32>, String>> {
    match read_u32(r)? {
        0 => {
            let n = read_u32(r)?;
            if n > MAX_GROUPS {
                return Err(invalid(format!("{n} experts held")));
            }
            Ok(Ok(read_u32s(r, n as usize)?))
        }
        1 => Ok(Err(read_reason(r)?)),
        s => Err(invalid(format!("load status {s}"))),
    }
}

/// Reads a request for rows of `d`, a run's rows from the socket unless they are in the
/// connection's mailbox (`in_mailbox`); `Ok(None)` at a clean end of the connection.
pub fn read_request(r: &mut impl Read, d: usize, in_mailbox: bool) -> io::Result<Option<Request>> {
    let mut first = [0u8; 4];
    match r.read(&mut first)? {
        0 => return Ok(None),
        n if n < 4 => r.read_exact(&mut first[n..])?,
        _ => {}
    }
    let layer = u32::from_le_bytes(first);
    if layer == LOAD {
        let n = read_u32(r)?;
        if n > MAX_GROUPS {
            return Err(invalid(format!("a load of {n} experts")));
        }
        return Ok(Some(Request::Load(read_u32s(r, n as usize)?)));
    }
    if layer == ATTACH {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        let n = read_u32(r)?;
        if n > MAX_PATH {
            return Err(invalid(format!("a mailbox path of {n} bytes")));
        }
        let mut path = vec![0u8; n as usize];
        r.read_exact(&mut path)?;
        let path =
            String::from_utf8(path).map_err(|_| invalid("a mailbox path not UTF-8".into()))?;
        return Ok(Some(Request::Attach {
            path,
            nonce: u64::from_le_bytes(b),
        }));
    }
    let n = read_u32(r)?;
    let ng = read_u32(r)?;
    if n > MAX_ROWS || ng > MAX_GROUPS {
        return Err(invalid(format!("a run of {n} rows in {ng} groups")));
    }
    let heads = read_u32s(r, 2 * ng as usize)?;
    let mut groups = Vec::with_capacity(ng as usize);
    for h in heads.chunks_exact(2) {
        if h[1] > n {
            return Err(invalid(format!("{} rows of a run of {n}", h[1])));
        }
        groups.push(Group {
            expert: h[0],
            rows: Vec::new(),
        });
    }
    for (g, h) in groups.iter_mut().zip(heads.chunks_exact(2)) {
        g.rows = read_u32s(r, h[1] as usize)?;
        if let Some(bad) = g.rows.iter().find(|&&i| i >= n) {
            return Err(invalid(format!("row {bad} of a run of {n}")));
        }
    }
    let rows = if in_mailbox {
        Vec::new()
    } else {
        read_f32s(r, n as usize * d)?
    };
    Ok(Some(Request::Run(Run {
        layer,
        n,
        rows,
        groups,
    })))
}

/// The result of a run: each group's outputs in order (none when they are in the mailbox) and
/// the microseconds they took to compute, or why not.
pub fn write_result(
    w: &mut impl Write,
    result: Result<(&[Vec<f32>], u32), String>,
) -> io::Result<()> {
    match result {
        Ok((outputs, micros)) => {
            w.write_all(&0u32.to_le_bytes())?;
            w.write_all(&micros.to_le_bytes())?;
            for o in outputs {
                w.write_all(&f32_bytes(o))?;
            }
        }
        Err(why) => write_reason(w, &why)?,
    }
    w.flush()
}

/// A worker's outputs for a run, and how long they took it.
pub type RunOutput = (Vec<Vec<f32>>, u32);

/// Reads a result for groups of `counts` rows of `d`: the outputs (from the socket, or from
/// the mailbox's reply area `mailbox`) and the worker's compute microseconds, or the worker's
/// reason.
pub fn read_result(
    r: &mut impl Read,
    counts: &[usize],
    d: usize,
    mailbox: Option<&[f32]>,
) -> io::Result<Result<RunOutput, String>> {
    match read_u32(r)? {
        0 => {
            let micros = read_u32(r)?;
            let outputs = match mailbox {
                Some(reply) => {
                    let mut at = 0;
                    counts
                        .iter()
                        .map(|&c| {
                            let o = reply.get(at..at + c * d).map(<[f32]>::to_vec);
                            at += c * d;
                            o.ok_or_else(|| invalid("outputs past the mailbox's end".into()))
                        })
                        .collect::<io::Result<Vec<_>>>()?
                }
                None => counts
                    .iter()
                    .map(|&c| read_f32s(r, c * d))
                    .collect::<io::Result<Vec<_>>>()?,
            };
            Ok(Ok((outputs, micros)))
        }
        1 => Ok(Err(read_reason(r)?)),
        s => Err(invalid(format!("result status {s}"))),
    }
}
