//! The edge bundle: a model's weights already in the kernels' panel layout, so that loading
//! is one read-only `mmap` (no dequantizing, no repacking), beside the model's metadata as a
//! tensor-less GGUF (tokenizer, chat template, hyper-parameters) and a manifest.
//!
//! ```text
//! DIR/manifest.json   what the bundle is and what it was sized for (the caller's fields),
//!                     the source fingerprint, the weights file's size and the xxh3 of each
//!                     4 MiB chunk of it (checked in parallel at load), every tensor's place
//! DIR/model.gguf      the source GGUF's metadata, no tensors
//! DIR/weights.bin     every matrix's packed lines, each at a 64-byte-aligned offset
//! ```
//! The panel layout is the same on every architecture (x86-64 and AArch64 kernels read the
//! same lines), so one bundle serves either; the manifest's target only sizes threads.

use crate::error::Result;
use crate::gguf::{GgufFile, GgufWriter, Metadata};
use crate::linear::{Linear, Precision};
use crate::model::{Layer, LlamaModel};
use crate::moe::{Ffn, FfnBlock};
use frontend::ModelError;
use kernels::int8::I8Weights;
use kernels::panel::SharedBytes;
use kernels::qmatmul::{QFormat, QWeights};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub const MANIFEST: &str = "manifest.json";
pub const METADATA: &str = "model.gguf";
pub const WEIGHTS: &str = "weights.bin";
/// The manifest's `format`: readers refuse any other.
pub const FORMAT: &str = "tandem-edge/2";
/// Bytes per checksummed chunk of the weights file (the last may be shorter).
pub const CHUNK_BYTES: usize = 4 << 20;

/// Where one matrix lives in `weights.bin`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MatrixIndex {
    F32 {
        n: usize,
        k: usize,
        offset: usize,
    },
    Quant {
        format: String,
        n: usize,
        k: usize,
        offset: usize,
    },
    Int8 {
        n: usize,
        k: usize,
        offset: usize,
        scale_offset: usize,
        scales: usize,
    },
    Parts {
        parts: Vec<MatrixIndex>,
    },
}

/// An f32 vector (a norm's weights) in `weights.bin`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VectorIndex {
    pub offset: usize,
    pub len: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerIndex {
    pub attn_norm: VectorIndex,
    pub wqkv: MatrixIndex,
    pub wo: MatrixIndex,
    pub ffn_norm: VectorIndex,
    pub w_gate_up: MatrixIndex,
    pub w_down: MatrixIndex,
}

/// Every tensor's place in `weights.bin`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TensorIndex {
    pub token_embd: MatrixIndex,
    pub output: Option<MatrixIndex>,
    pub output_norm: VectorIndex,
    pub layers: Vec<LayerIndex>,
}

/// The weights file: its size and checksums, checked before a byte of it is used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WeightsFile {
    pub file: String,
    pub bytes: u64,
    pub chunk_bytes: usize,
    /// xxh3-64 of each chunk, hex: chunks are checked by as many threads as help.
    pub chunk_xxh3: Vec<String>,
}

/// What [`Packed::write`] records of the model itself; the caller adds what the bundle was sized for
/// (`serving`: context, memory budget, threads — the engine does not read it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub model_id: String,
    /// The source GGUF's fingerprint at this precision and KV dtype (what block hashes are
    /// salted with), so a bundle's KV is interchangeable with the source model's.
    pub fingerprint: String,
    #[serde(with = "as_text")]
    pub precision: Precision,
    #[serde(with = "as_text")]
    pub kv_cache_dtype: crate::KvDtype,
    pub weights: WeightsFile,
    pub tensors: TensorIndex,
    #[serde(default)]
    pub serving: serde_json::Value,
}

/// A type with `Display` and `FromStr` (clap's forms: `w4a8`, `f16`) as a JSON string.
mod as_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "{}: format {:?}, this build reads {FORMAT:?}",
                path.display(),
                m.format
            )));
        }
        Ok(m)
    }

    pub fn fingerprint(&self) -> Result<u64> {
        u64::from_str_radix(&self.fingerprint, 16)
            .map_err(|_| bad(format!("manifest fingerprint {:?}", self.fingerprint)))
    }
}

/// The bundle's model without its weights: tokenizer, template, hyper-parameters and the
/// source's fingerprint (what a scheduler in front of bundle-loaded workers needs).
pub fn frontend(
    dir: &Path,
    manifest: &Manifest,
    model_id: Option<&str>,
    numerics: frontend::Numerics,
) -> Result<frontend::Frontend> {
    let g = GgufFile::open(dir.join(METADATA))?;
    let id = model_id.map_or_else(|| manifest.model_id.clone(), str::to_string);
    Ok(frontend::Frontend::from_metadata(
        &g,
        id,
        numerics,
        manifest.fingerprint()?,
    )?)
}

/// Whether `path` is a bundle directory (rather than a GGUF file).
pub fn is_bundle(path: &Path) -> bool {
    path.join(MANIFEST).is_file()
}

fn bad(msg: String) -> crate::EngineError {
    crate::EngineError::Bundle(msg)
}

/// Appends 64-byte-aligned sections.
struct Blob(Vec<u8>);

impl Blob {
    fn put(&mut self, bytes: &[u8]) -> usize {
        let at = self.0.len().next_multiple_of(64);
        self.0.resize(at, 0);
        self.0.extend_from_slice(bytes);
        at
    }

    fn put_f32(&mut self, v: &[f32]) -> usize {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put(&bytes)
    }

    fn vector(&mut self, v: &[f32]) -> VectorIndex {
        VectorIndex {
            offset: self.put_f32(v),
            len: v.len(),
        }
    }

    fn matrix(&mut self, l: &Linear) -> MatrixIndex {
        match l {
            Linear::F32 { w, n, k } => MatrixIndex::F32 {
                n: *n,
                k: *k,
                offset: self.put_f32(w),
            },
            Linear::Quant(q) => MatrixIndex::Quant {
                format: format!("{:?}", q.format()),
                n: q.n(),
                k: q.k(),
                offset: self.put(q.packed_bytes()),
            },
            Linear::Int8(w) => MatrixIndex::Int8 {
                n: w.n(),
                k: w.k(),
                offset: self.put(w.packed_bytes()),
                scale_offset: self.put_f32(w.scale()),
                scales: w.scale().len(),
            },
            Linear::Parts(ps) => MatrixIndex::Parts {
                parts: ps.iter().map(|p| self.matrix(p)).collect(),
            },
        }
    }
}

/// A model packed for a bundle, in memory, before anything is written: what
/// `tandem export-edge` sizes the budget from.
pub struct Packed {
    source: GgufFile,
    frontend: frontend::Frontend,
    precision: Precision,
    kv_cache_dtype: crate::KvDtype,
    blob: Vec<u8>,
    tensors: TensorIndex,
}

impl Packed {
    /// Loads the GGUF at `source` at `cfg`'s precision (on the CPU) and packs its weights.
    pub fn new(source: &Path, cfg: &crate::EngineConfig) -> Result<Packed> {
        let g = GgufFile::open(source)?;
        let frontend =
            frontend::Frontend::from_gguf(&g, source, cfg.model_id.as_deref(), cfg.numerics())?;
        let model = LlamaModel::load(&g, cfg.precision)?;
        let dense: Vec<&Ffn> = model
            .layers
            .iter()
            .map(|l| match &l.ffn {
                FfnBlock::Dense(f) => Ok(f),
                FfnBlock::Moe(_) => Err(bad(
                    "the edge profile packs dense models only; serve an MoE model with tandem up"
                        .into(),
                )),
            })
            .collect::<Result<_>>()?;
        let mut blob = Blob(Vec::new());
        let tensors = TensorIndex {
            token_embd: blob.matrix(&model.token_embd),
            output: model.output.as_ref().map(|o| blob.matrix(o)),
            output_norm: blob.vector(&model.output_norm),
            layers: model
                .layers
                .iter()
                .zip(dense)
                .map(|(l, f)| LayerIndex {
                    attn_norm: blob.vector(&l.attn_norm),
                    wqkv: blob.matrix(&l.wqkv),
                    wo: blob.matrix(&l.wo),
                    ffn_norm: blob.vector(&l.ffn_norm),
                    w_gate_up: blob.matrix(&f.w_gate_up),
                    w_down: blob.matrix(&f.w_down),
                })
                .collect(),
        };
        Ok(Packed {
            source: g,
            frontend,
            precision: cfg.precision,
            kv_cache_dtype: cfg.kv_dtype,
            blob: blob.0,
            tensors,
        })
    }

    /// Bytes of `weights.bin` (all of it is mapped, and resident once every layer has run).
    pub fn weight_bytes(&self) -> usize {
        self.blob.len()
    }

    pub fn frontend(&self) -> &frontend::Frontend {
        &self.frontend
    }

    /// Writes the bundle into `dir` (created), with `serving` recorded as given.
    pub fn write(&self, dir: &Path, serving: serde_json::Value) -> Result<Manifest> {
        let io = |path: PathBuf| move |source| ModelError::Io { path, source };
        std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
        let weights_path = dir.join(WEIGHTS);
        std::fs::write(&weights_path, &self.blob).map_err(io(weights_path.clone()))?;
        let mut meta = GgufWriter::new();
        for k in self.source.keys() {
            if k != "general.alignment" {
                meta.meta(k.clone(), self.source.get(k).expect("key listed").clone());
            }
        }
        meta.write(dir.join(METADATA))?;
        let manifest = Manifest {
            format: FORMAT.into(),
            model_id: self.frontend.model_id.clone(),
            fingerprint: format!("{:016x}", self.frontend.fingerprint),
            precision: self.precision,
            kv_cache_dtype: self.kv_cache_dtype,
            weights: WeightsFile {
                file: WEIGHTS.into(),
                bytes: self.blob.len() as u64,
                chunk_bytes: CHUNK_BYTES,
                chunk_xxh3: self
                    .blob
                    .chunks(CHUNK_BYTES)
                    .map(|c| format!("{:016x}", twox_hash::XxHash3_64::oneshot(c)))
                    .collect(),
            },
            tensors: self.tensors.clone(),
            serving,
        };
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
        std::fs::write(&path, text + "\n").map_err(io(path))?;
        Ok(manifest)
    }
}

/// The weights file, mapped read-only.
struct Mapped(memmap2::Mmap);

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A bundle's weights, mapped read-only and being checked: any number of threads may
/// [`help`](Self::help) check the chunks; [`finish`](Self::finish) gives the bytes only when
/// every chunk matched.
pub struct Weights {
    path: PathBuf,
    map: Arc<Mapped>,
    chunk: usize,
    want: Vec<String>,
    next: AtomicUsize,
    bad: AtomicBool,
}

impl Weights {
    /// Maps `dir`'s weights (size checked here, contents by the helpers).
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<Weights> {
        let path = dir.join(&manifest.weights.file);
        let file = std::fs::File::open(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the bundle is read-only by contract; the checksums catch a file changed
        // before this point (one changed while mapped is the same hazard as any mapped GGUF).
        // Populated: the checksums read every page, and one call maps them faster than faults.
        let map =
            unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(|source| {
                ModelError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
        let w = &manifest.weights;
        if map.len() as u64 != w.bytes
            || w.chunk_bytes == 0
            || map.len().div_ceil(w.chunk_bytes) != w.chunk_xxh3.len()
        {
            return Err(bad(format!(
                "{} does not match the manifest (size): re-export the bundle",
                path.display()
            )));
        }
        Ok(Weights {
            path,
            map: Arc::new(Mapped(map)),
            chunk: w.chunk_bytes,
            want: w.chunk_xxh3.clone(),
            next: AtomicUsize::new(0),
            bad: AtomicBool::new(false),
        })
    }

    /// Checks chunks until none is left unclaimed (xxh3-64 by `twox-hash`, which picks AVX2
    /// or NEON at run time: 1.5× the SSE2 baseline `xxhash-rust` is built with).
    pub fn help(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(want) = self.want.get(i) else { return };
            let start = i * self.chunk;
            let chunk = &self.map.0[start..start.saturating_add(self.chunk).min(self.map.0.len())];
            if format!("{:016x}", twox_hash::XxHash3_64::oneshot(chunk)) != *want {
                self.bad.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The bytes, once every chunk is checked (checking what no helper took).
    pub fn finish(self) -> Result<SharedBytes> {
        self.help();
        if self.bad.load(Ordering::Relaxed) {
            return Err(bad(format!(
                "{} does not match the manifest (checksum): re-export the bundle",
                self.path.display()
            )));
        }
        Ok(self.map)
    }
}

/// Builds the model over mapped weights in place.
pub fn load_model(
    bytes: SharedBytes,
    manifest: &Manifest,
    cfg: crate::config::LlamaConfig,
) -> Result<LlamaModel> {
    let t = &manifest.tensors;
    if cfg.moe.is_some() {
        return Err(bad("an edge bundle holds a dense model".into()));
    }
    if t.layers.len() != cfg.n_layers {
        return Err(bad(format!(
            "{} layers indexed, the model has {}",
            t.layers.len(),
            cfg.n_layers
        )));
    }
    let layers = t
        .layers
        .iter()
        .map(|l| {
            Ok(Layer {
                attn_norm: vector(&bytes, &l.attn_norm)?,
                wqkv: matrix(&bytes, &l.wqkv)?,
                wo: matrix(&bytes, &l.wo)?,
                ffn_norm: vector(&bytes, &l.ffn_norm)?,
                ffn: FfnBlock::Dense(Ffn {
                    w_gate_up: matrix(&bytes, &l.w_gate_up)?,
                    w_down: matrix(&bytes, &l.w_down)?,
                }),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let model = LlamaModel {
        cfg,
        precision: manifest.precision,
        token_embd: matrix(&bytes, &t.token_embd)?,
        output: t.output.as_ref().map(|o| matrix(&bytes, o)).transpose()?,
        output_norm: vector(&bytes, &t.output_norm)?,
        layers,
        expert_backend: None,
        microbatches: 1,
    };
    model.check_shapes()?;
    Ok(model)
}

fn f32s(bytes: &SharedBytes, offset: usize, len: usize) -> Result<Vec<f32>> {
    let b = (**bytes).as_ref();
    let src = len
        .checked_mul(4)
        .and_then(|bytes| offset.checked_add(bytes))
        .and_then(|end| b.get(offset..end))
        .ok_or_else(|| bad(format!("{len} floats at {offset} overrun the weights file")))?;
    Ok(src
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

fn vector(bytes: &SharedBytes, v: &VectorIndex) -> Result<Vec<f32>> {
    f32s(bytes, v.offset, v.len)
}

fn matrix(bytes: &SharedBytes, m: &MatrixIndex) -> Result<Linear> {
    let misfit = || bad(format!("{m:?} does not fit the weights file"));
    Ok(match m {
        MatrixIndex::F32 { n, k, offset } => Linear::F32 {
            w: f32s(bytes, *offset, n.checked_mul(*k).ok_or_else(misfit)?)?,
            n: *n,
            k: *k,
        },
        MatrixIndex::Quant {
            format,
            n,
            k,
            offset,
        } => {
            let format = match format.as_str() {
                "Q4_0" => QFormat::Q4_0,
                "Q4_1" => QFormat::Q4_1,
                "Q8_0" => QFormat::Q8_0,
                other => return Err(bad(format!("block format {other:?}"))),
            };
            Linear::Quant(
                QWeights::from_packed(format, *n, *k, bytes.clone(), *offset).ok_or_else(misfit)?,
            )
        }
        MatrixIndex::Int8 {
            n,
            k,
            offset,
            scale_offset,
            scales,
        } => Linear::Int8(
            I8Weights::from_packed(
                *n,
                *k,
                f32s(bytes, *scale_offset, *scales)?,
                bytes.clone(),
                *offset,
            )
            .ok_or_else(misfit)?,
        ),
        MatrixIndex::Parts { parts } => Linear::Parts(
            parts
                .iter()
                .map(|p| matrix(bytes, p))
                .collect::<Result<_>>()?,
        ),
    })
}
