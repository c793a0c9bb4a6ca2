//! Measures the machine's ceilings and how close the kernels get to them: the integer
//! multiply-accumulate peak, the memory read bandwidth, the W8A8 GEMM at prefill shapes and
//! the decode GEMV over a model-sized set of weights. `tandem kernels roofline` prints them.

#[cfg(target_arch = "x86_64")]
use kernels::dispatch::{SimdLevel, level};
use kernels::int8::{I8Acts, I8Weights, gemm};
use kernels::pool;
use kernels::qmatmul::{QActs, QFormat, QWeights, qmatmul};
use std::time::{Duration, Instant};

/// Seeded measurement data: uniform in [−1, 1), never exactly zero.
fn test_data(len: usize, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| match rng.random_range(-1.0f32..1.0) {
            0.0 => 1e-4,
            v => v,
        })
        .collect()
}

/// Runs `f` until at least `min` has passed (and at least twice); returns the best seconds per call.
pub fn best_time(min: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut best = f64::INFINITY;
    let mut runs = 0;
    while runs < 2 || start.elapsed() < min {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

/// Integer multiply-accumulates per second on every pool thread, running the instruction
/// sequence the int8 kernels are built from at the process's level with independent chains
/// per thread (no memory traffic): AVX-512 VNNI `vpdpbusd` (64 MACs), or AVX2 `maddubs` +
/// `madd` + `add` (32 MACs). `None` below AVX2.
pub fn int8_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    // SAFETY (both closures): the level's instructions are present (checked first).
    return match level() {
        l if l >= SimdLevel::Avx512 => Some(chain_rate(12 * 64, &|t, n| unsafe {
            std::hint::black_box(x86::vnni_loop(n, t as i8 + 1));
        })),
        l if l >= SimdLevel::Avx2 => Some(chain_rate(8 * 32, &|t, n| unsafe {
            std::hint::black_box(x86::mac_loop(n, t as i8 + 1));
        })),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// f32 fused multiply-adds per second on every pool thread (the arithmetic of attention and
/// the f32 path), twelve independent chains per thread on registers: 512-bit at AVX-512,
/// 256-bit at AVX2. `None` below AVX2.
pub fn f32_peak() -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    // SAFETY (both closures): the level's instructions are present (checked first).
    return match level() {
        l if l >= SimdLevel::Avx512 => Some(chain_rate(12 * 16, &|t, n| unsafe {
            std::hint::black_box(x86::fma512_loop(n, t as f32 + 1.0));
        })),
        l if l >= SimdLevel::Avx2 => Some(chain_rate(12 * 8, &|t, n| unsafe {
            std::hint::black_box(x86::fma256_loop(n, t as f32 + 1.0));
        })),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Multiply-accumulates per second of a register-only loop run on every pool thread at once:
/// `run(thread, iters)` does `macs_per_iter` per iteration; the best of repeated runs.
#[cfg(target_arch = "x86_64")]
fn chain_rate(macs_per_iter: usize, run: &(dyn Fn(usize, usize) + Sync)) -> f64 {
    const ITERS: usize = 4_000_000;
    let threads = pool::global().threads();
    let secs = best_time(Duration::from_millis(300), || {
        pool::global().run(threads, &|t| run(t, ITERS))
    });
    (threads * ITERS * macs_per_iter) as f64 / secs
}

/// Bytes per second read from memory by every pool thread together (a buffer far larger than
/// any cache, summed once with the widest loads the level has; the best of several passes).
pub fn read_bandwidth(bytes: usize) -> f64 {
    let buf = ReadBuffer::new(bytes);
    let secs = best_time(Duration::from_millis(500), || buf.pass());
    buf.bytes() as f64 / secs
}

/// A buffer summed by every pool thread, a share each.
struct ReadBuffer(Vec<u64>);

impl ReadBuffer {
    fn new(bytes: usize) -> ReadBuffer {
        ReadBuffer(
            (0..(bytes / 8) as u64)
                .map(|i| i.wrapping_mul(0x9e37))
                .collect(),
        )
    }
    fn bytes(&self) -> usize {
        self.0.len() * 8
    }
    fn pass(&self) {
        let words = self.0.len();
        let threads = pool::global().threads();
        let per = words.div_ceil(threads * 64) * 64;
        pool::global().run(threads, &|t| {
            let s = &self.0[(t * per).min(words)..((t + 1) * per).min(words)];
            std::hint::black_box(sum_words(s));
        });
    }
}

/// A decode GEMV's rate against the machine's read bandwidth, both in bytes per second.
#[derive(Debug, Clone, Copy)]
pub struct GemvRate {
    pub gemv: f64,
    /// Plain summing of a buffer of the same size, measured in alternation with the GEMV so
    /// both see the same machine (memory bandwidth on a shared host swings by ±30%).
    pub read: f64,
    /// The median over rounds of (GEMV rate / read rate) within each round: the figure least
    /// moved by other tenants' load.
    pub ratio: f64,
}

/// Best rates of `pass` (which reads `bytes`) and of a read pass over as many bytes.
fn versus_read(bytes: usize, mut pass: impl FnMut()) -> GemvRate {
    let buf = ReadBuffer::new(bytes);
    let (mut g, mut r) = (f64::INFINITY, f64::INFINITY);
    let mut ratios = Vec::new();
    let start = Instant::now();
    while ratios.len() < 15 || start.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        pass();
        let tg = t.elapsed().as_secs_f64();
        let t = Instant::now();
        buf.pass();
        let tr = t.elapsed().as_secs_f64();
        (g, r) = (g.min(tg), r.min(tr));
        ratios.push(tr / tg);
    }
    ratios.sort_by(f64::total_cmp);
    GemvRate {
        gemv: bytes as f64 / g,
        read: buf.bytes() as f64 / r,
        ratio: ratios[ratios.len() / 2],
    }
}

fn sum_words(s: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if level() >= SimdLevel::Avx512 {
        // SAFETY: AVX-512 F is present.
        return unsafe { sum_words_avx512(s) };
    }
    #[cfg(target_arch = "x86_64")]
    if level() >= SimdLevel::Avx2 {
        // SAFETY: AVX2 is present.
        return unsafe { sum_words_avx2(s) };
    }
    sum_words_plain(s)
}

/// The same loop with 256-bit loads available to the compiler.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(s: &[u64]) -> u64 {
    sum_words_plain(s)
}

/// Four independent 512-bit accumulators fed by 512-bit loads.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_words_avx512(s: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let full = s.len() / 32 * 32;
    let p = s.as_ptr();
    // SAFETY: every load reads 8 words below `full`.
    unsafe {
        let mut acc = [_mm512_setzero_si512(); 4];
        let mut i = 0;
        while i < full {
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm512_add_epi64(*a, _mm512_loadu_si512(p.add(i + 8 * u) as *const _));
            }
            i += 32;
        }
        let v = _mm512_add_epi64(
            _mm512_add_epi64(acc[0], acc[1]),
            _mm512_add_epi64(acc[2], acc[3]),
        );
        (_mm512_reduce_add_epi64(v) as u64).wrapping_add(sum_words_plain(&s[full..]))
    }
}

#[inline(always)]
fn sum_words_plain(s: &[u64]) -> u64 {
    // Sixteen independent lanes so the adds keep up with the loads (vectorized by the compiler).
    let mut acc = [0u64; 16];
    for c in s.chunks_exact(16) {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().fold(0, |a, b| a.wrapping_add(*b))
}

/// W8A8 GEMM rate (MAC/s) for `[m × k] · [n × k]ᵀ`, activations quantized as shipped.
pub fn gemm_rate(m: usize, k: usize, n: usize) -> f64 {
    gemm_rate_with(m, k, n, I8Acts::quantize)
}

/// [`gemm_rate`] with activations quantized by `quantize` (to compare quantization schemes).
pub fn gemm_rate_with(
    m: usize,
    k: usize,
    n: usize,
    quantize: impl Fn(&[f32], usize, usize) -> I8Acts,
) -> f64 {
    let x = test_data(m * k, 1);
    let w = I8Weights::quantize(&test_data(n * k, 2), n, k);
    let a = quantize(&x, m, k);
    let mut y = vec![0f32; m * n];
    let secs = best_time(Duration::from_millis(400), || gemm(&a, &w, &mut y));
    (m * n * k) as f64 / secs
}

/// Decode GEMV over `layers` copies of the given matrices (one activation row, every weight
/// byte read once per pass, as in one decode step): weight bytes read per second.
pub fn gemv_bandwidth(shapes: &[(usize, usize)], layers: usize) -> GemvRate {
    let ws: Vec<Vec<I8Weights>> = (0..layers)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(s, &(n, k))| {
                    I8Weights::quantize(&test_data(n * k, (l * 16 + s) as u64 + 3), n, k)
                })
                .collect()
        })
        .collect();
    let nmax = shapes.iter().map(|s| s.0).max().unwrap_or(0);
    let acts: Vec<I8Acts> = shapes
        .iter()
        .map(|&(_, k)| I8Acts::quantize(&test_data(k, 9), 1, k))
        .collect();
    let mut y = vec![0f32; nmax];
    let bytes: usize = ws.iter().flatten().map(|w| w.bytes()).sum();
    versus_read(bytes, || {
        for layer in &ws {
            for (w, a) in layer.iter().zip(&acts) {
                gemm(a, w, &mut y[..w.n()]);
            }
        }
    })
}

/// [`gemv_bandwidth`] for GGUF block weights run by the w4a8 kernel (`format` blocks as
/// stored, e.g. Q4_1): weight bytes (values and scales) read per second.
pub fn qgemv_bandwidth(format: QFormat, shapes: &[(usize, usize)], layers: usize) -> GemvRate {
    let quantize = |x: &[f32]| match format {
        QFormat::Q4_0 => kernels::quant::quantize_q4_0(x),
        QFormat::Q4_1 => kernels::quant::quantize_q4_1(x),
        QFormat::Q8_0 => kernels::quant::quantize_q8_0(x),
    };
    let ws: Vec<Vec<QWeights>> = (0..layers)
        .map(|l| {
            shapes
                .iter()
                .enumerate()
                .map(|(s, &(n, k))| {
                    let x = test_data(n * k, (l * 16 + s) as u64 + 3);
                    QWeights::pack(format, &quantize(&x), n, k)
                })
                .collect()
        })
        .collect();
    let nmax = shapes.iter().map(|s| s.0).max().unwrap_or(0);
    let acts: Vec<QActs> = shapes
        .iter()
        .map(|&(_, k)| QActs::quantize(&test_data(k, 9), 1, k))
        .collect();
    let mut y = vec![0f32; nmax];
    let bytes: usize = ws.iter().flatten().map(|w| w.bytes()).sum();
    versus_read(bytes, || {
        for layer in &ws {
            for (w, a) in layer.iter().zip(&acts) {
                qmatmul(a, w, &mut y[..w.n()]);
            }
        }
    })
}

/// w4a8 GEMM rate (MAC/s) for `[m × k] · [n × k]ᵀ` with `format` weights.
pub fn qgemm_rate(format: QFormat, m: usize, k: usize, n: usize) -> f64 {
    let x = test_data(m * k, 1);
    let wf = test_data(n * k, 2);
    let bytes = match format {
        QFormat::Q4_0 => kernels::quant::quantize_q4_0(&wf),
        QFormat::Q4_1 => kernels::quant::quantize_q4_1(&wf),
        QFormat::Q8_0 => kernels::quant::quantize_q8_0(&wf),
    };
    let w = QWeights::pack(format, &bytes, n, k);
    let a = QActs::quantize(&x, m, k);
    let mut y = vec![0f32; m * n];
    let secs = best_time(Duration::from_millis(400), || qmatmul(&a, &w, &mut y));
    (m * n * k) as f64 / secs
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Twelve independent accumulator chains `c[i] = insn(c[i], a, b)`, `iters` times, in
    /// assembly (so nothing is hoisted out of the loop): the peak loops below.
    macro_rules! twelve_chains {
        ($insn:literal, $class:ident, $iters:expr, $a:expr, $b:expr, $c:ident) => {
            std::arch::asm!(
                "2:",
                concat!($insn, " {c0}, {a}, {b}"),
                concat!($insn, " {c1}, {a}, {b}"),
                concat!($insn, " {c2}, {a}, {b}"),
                concat!($insn, " {c3}, {a}, {b}"),
                concat!($insn, " {c4}, {a}, {b}"),
                concat!($insn, " {c5}, {a}, {b}"),
                concat!($insn, " {c6}, {a}, {b}"),
                concat!($insn, " {c7}, {a}, {b}"),
                concat!($insn, " {c8}, {a}, {b}"),
                concat!($insn, " {c9}, {a}, {b}"),
                concat!($insn, " {c10}, {a}, {b}"),
                concat!($insn, " {c11}, {a}, {b}"),
                "dec {n}",
                "jnz 2b",
                n = inout(reg) $iters.max(1) => _,
                a = in($class) $a,
                b = in($class) $b,
                c0 = inout($class) $c[0],
                c1 = inout($class) $c[1],
                c2 = inout($class) $c[2],
                c3 = inout($class) $c[3],
                c4 = inout($class) $c[4],
                c5 = inout($class) $c[5],
                c6 = inout($class) $c[6],
                c7 = inout($class) $c[7],
                c8 = inout($class) $c[8],
                c9 = inout($class) $c[9],
                c10 = inout($class) $c[10],
                c11 = inout($class) $c[11],
                options(pure, nomem, nostack),
            )
        };
    }

    /// Twelve independent `vpdpbusd` chains per iteration (768 MACs) in assembly.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn vnni_loop(iters: usize, seed: i8) -> i32 {
        let a = _mm512_set1_epi8(seed);
        let b = _mm512_set1_epi8(3);
        let mut c = [_mm512_setzero_si512(); 12];
        // SAFETY: register-only AVX-512 arithmetic; the features are enabled for this function.
        unsafe {
            twelve_chains!("vpdpbusd", zmm_reg, iters, a, b, c);
        }
        let mut s = _mm512_setzero_si512();
        for v in c {
            s = _mm512_add_epi32(s, v);
        }
        _mm512_reduce_add_epi32(s)
    }

    /// Twelve independent 512-bit FMA chains per iteration (192 MACs).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma512_loop(iters: usize, seed: f32) -> f32 {
        let a = _mm512_set1_ps(seed);
        let b = _mm512_set1_ps(0.999);
        let mut c = [_mm512_setzero_ps(); 12];
        // SAFETY: register-only AVX-512 arithmetic; the features are enabled for this function.
        unsafe {
            twelve_chains!("vfmadd231ps", zmm_reg, iters, a, b, c);
        }
        let mut s = _mm512_setzero_ps();
        for v in c {
            s = _mm512_add_ps(s, v);
        }
        _mm512_reduce_add_ps(s)
    }

    /// Twelve independent 256-bit FMA chains per iteration (96 MACs).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma256_loop(iters: usize, seed: f32) -> f32 {
        let a = _mm256_set1_ps(seed);
        let b = _mm256_set1_ps(0.999);
        let mut c = [_mm256_setzero_ps(); 12];
        // SAFETY: register-only AVX2/FMA arithmetic; the features are enabled for this function.
        unsafe {
            twelve_chains!("vfmadd231ps", ymm_reg, iters, a, b, c);
        }
        let mut s = [0f32; 8];
        let mut v = _mm256_setzero_ps();
        for x in c {
            v = _mm256_add_ps(v, x);
        }
        // SAFETY: 8 floats fit.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) };
        s.iter().sum()
    }

    /// Eight independent `maddubs` → `madd` → `add` chains per iteration (256 MACs), written
    /// in assembly so the compiler cannot hoist the loop-invariant multiplies.
    #[target_feature(enable = "avx2")]
    pub unsafe fn mac_loop(iters: usize, seed: i8) -> i32 {
        let a = _mm256_set1_epi8(seed);
        let b = _mm256_set1_epi8(3);
        let ones = _mm256_set1_epi16(1);
        let mut c = [_mm256_setzero_si256(); 8];
        // SAFETY: register-only AVX2 arithmetic; AVX2 is enabled for this function.
        unsafe {
            std::arch::asm!(
                "2:",
                "vpmaddubsw {t0}, {a}, {b}",
                "vpmaddubsw {t1}, {a}, {b}",
                "vpmaddubsw {t2}, {a}, {b}",
                "vpmaddubsw {t3}, {a}, {b}",
                "vpmaddwd {t0}, {t0}, {o}",
                "vpmaddwd {t1}, {t1}, {o}",
                "vpmaddwd {t2}, {t2}, {o}",
                "vpmaddwd {t3}, {t3}, {o}",
                "vpaddd {c0}, {c0}, {t0}",
                "vpaddd {c1}, {c1}, {t1}",
                "vpaddd {c2}, {c2}, {t2}",
                "vpaddd {c3}, {c3}, {t3}",
                "vpmaddubsw {t0}, {a}, {b}",
                "vpmaddubsw {t1}, {a}, {b}",
                "vpmaddubsw {t2}, {a}, {b}",
                "vpmaddubsw {t3}, {a}, {b}",
                "vpmaddwd {t0}, {t0}, {o}",
                "vpmaddwd {t1}, {t1}, {o}",
                "vpmaddwd {t2}, {t2}, {o}",
                "vpmaddwd {t3}, {t3}, {o}",
                "vpaddd {c4}, {c4}, {t0}",
                "vpaddd {c5}, {c5}, {t1}",
                "vpaddd {c6}, {c6}, {t2}",
                "vpaddd {c7}, {c7}, {t3}",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters.max(1) => _,
                a = in(ymm_reg) a,
                b = in(ymm_reg) b,
                o = in(ymm_reg) ones,
                t0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                t2 = out(ymm_reg) _,
                t3 = out(ymm_reg) _,
                c0 = inout(ymm_reg) c[0],
                c1 = inout(ymm_reg) c[1],
                c2 = inout(ymm_reg) c[2],
                c3 = inout(ymm_reg) c[3],
                c4 = inout(ymm_reg) c[4],
                c5 = inout(ymm_reg) c[5],
                c6 = inout(ymm_reg) c[6],
                c7 = inout(ymm_reg) c[7],
                options(pure, nomem, nostack),
            );
        }
        let mut s = _mm256_setzero_si256();
        for v in c {
            s = _mm256_add_epi32(s, v);
        }
        _mm256_extract_epi32(s, 0)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The peak loops run the chains they claim: every lane of every chain holds `iters`
    /// fused multiply-adds of the seed (the same value a scalar chain reaches).
    #[test]
    fn fma_loops_compute_their_chains() {
        let (iters, seed) = (1000, 1.5f32);
        let mut chain = 0f32;
        for _ in 0..iters {
            chain = seed.mul_add(0.999, chain);
        }
        let close = |got: f32, lanes: f32| (got - lanes * chain).abs() <= 1e-4 * lanes * chain;
        if SimdLevel::detect() >= SimdLevel::Avx2 {
            // SAFETY: AVX2 and FMA are present.
            let got = unsafe { x86::fma256_loop(iters, seed) };
            assert!(close(got, 96.0), "{got} vs 96 × {chain}");
        }
        if SimdLevel::detect() >= SimdLevel::Avx512 {
            // SAFETY: AVX-512 F is present.
            let got = unsafe { x86::fma512_loop(iters, seed) };
            assert!(close(got, 192.0), "{got} vs 192 × {chain}");
            assert!(f32_peak().is_some_and(|p| p > 0.0));
        }
    }

    /// The int8 peak loops too: each 32-bit lane gains four `u8 × i8` products (`seed × 3`)
    /// per chain and iteration.
    #[test]
    fn int8_loops_compute_their_chains() {
        let (iters, seed) = (1000usize, 5i8);
        let per_lane = iters as i32 * 4 * 5 * 3;
        if SimdLevel::detect() >= SimdLevel::Avx2 {
            // SAFETY: AVX2 is present. Lane 0 of the eight chains' sum.
            let got = unsafe { x86::mac_loop(iters, seed) };
            assert_eq!(got, 8 * per_lane);
        }
        if SimdLevel::detect() >= SimdLevel::Avx512 {
            // SAFETY: AVX-512 VNNI is present. Every lane of twelve chains.
            let got = unsafe { x86::vnni_loop(iters, seed) };
            assert_eq!(got, 12 * 16 * per_lane);
        }
    }
}
