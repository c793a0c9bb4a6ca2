//! The numeric formats a model runs at: weight precision and KV cache storage. Both are part
//! of a model's [fingerprint](crate::Frontend::fingerprint): KV blocks computed at one never
//! mix with another.

/// How the weight matrices compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Every weight dequantized to f32: exact arithmetic, the golden-test reference.
    F32,
    /// W8A8 with per-output-channel weight scales and per-token activation scales: any GGUF
    /// type becomes 8-bit; for the default model a little faster to prefill than w4a8, but it
    /// reads 40% more bytes per decoded token and is less accurate.
    Int8,
    /// The default: GGUF block weights as stored (Q4_1 is 5 bits a weight), activations
    /// 8-bit per block of 32 — the GGUF's own accuracy, the least memory, the fastest decode.
    /// Tensors in a format without a block kernel run as int8.
    #[default]
    W4A8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            "w4a8" => Ok(Precision::W4A8),
            other => Err(format!("unknown precision '{other}' (int8, w4a8 or f32)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
            Precision::W4A8 => "w4a8",
        })
    }
}

/// How K and V values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// IEEE half precision: half the memory and attention bandwidth of f32 (llama.cpp's default
    /// too); values are rounded once, when written.
    #[default]
    F16,
    /// Exact: the golden tests compare against llama.cpp run with an f32 cache.
    F32,
    /// 8 bits with an f32 scale per position and KV head: about a quarter of f32's memory
    /// (more sequences per byte of budget); slower to read on this CPU path than f16.
    Int8,
}

impl KvDtype {
    /// Bytes per stored value (scales of `Int8` come on top).
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
            KvDtype::Int8 => 1,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "f16" | "auto" => Ok(KvDtype::F16),
            "f32" => Ok(KvDtype::F32),
            "int8" => Ok(KvDtype::Int8),
            other => Err(format!(
                "unknown KV cache type '{other}' (f16, f32 or int8)"
            )),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
            KvDtype::Int8 => "int8",
        })
    }
}

/// What runs the forward passes. Part of the fingerprint for any device but the CPU (whose
/// fingerprints stay as they were): a GPU's sums differ from the CPU's in the last bits, so
/// KV blocks computed on one are never mixed with the other's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The SIMD kernels of the `kernels` crate (the default).
    #[default]
    Cpu,
    /// An NVIDIA GPU through CUDA (a binary built with the `cuda` feature).
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => Err(format!("unknown device '{other}' (cpu or cuda)")),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}
