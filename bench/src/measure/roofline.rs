//! `tandem kernels roofline`: the machine's int8 and f32 multiply-accumulate peaks and memory
//! read bandwidth, where the W8A8 kernels sit against them at this model's shapes, and the
//! least time a long prompt's prefill can take at those peaks.

use super::peaks::{
    f32_peak, gemm_rate, gemm_rate_with, gemv_bandwidth, int8_peak, qgemm_rate, qgemv_bandwidth,
    read_bandwidth,
};
use clap::Args;
use frontend::config::LlamaConfig;
use kernels::int8::I8Acts;
use kernels::qmatmul::QFormat;

#[derive(Args, Debug)]
pub struct RooflineArgs {
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Rows of the prefill GEMM (prompt tokens in one forward).
    #[arg(long, default_value_t = 512)]
    pub m: usize,
    /// The model whose shapes are measured (a GGUF; default: the default model).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Prompt tokens of the prefill floor (the mixed workload's long prompts: 2,000).
    #[arg(long, default_value_t = 2000)]
    pub prompt: usize,
}

/// Prints the measurements for `g`'s shapes on the kernels' pool of `threads` (sized by the
/// caller).
pub fn run(a: &RooflineArgs, threads: usize, g: &LlamaConfig) -> anyhow::Result<()> {
    let lvl = kernels::dispatch::level();
    println!("threads {threads}, level {lvl:?}");
    let peak = int8_peak();
    match peak {
        Some(p) => println!(
            "int8 peak ({} chains, registers only): {:.1} GMAC/s",
            if lvl >= kernels::SimdLevel::Avx512 {
                "vpdpbusd"
            } else {
                "maddubs+madd+add"
            },
            p / 1e9
        ),
        None => println!("int8 peak: no SIMD level, not measured"),
    }
    let fpeak = f32_peak();
    match fpeak {
        Some(p) => println!(
            "f32 FMA peak ({}-bit chains, registers only): {:.1} GMAC/s",
            if lvl >= kernels::SimdLevel::Avx512 {
                512
            } else {
                256
            },
            p / 1e9
        ),
        None => println!("f32 FMA peak: no SIMD level, not measured"),
    }
    let bw = read_bandwidth(1 << 30);
    println!("memory read bandwidth (1 GiB summed): {:.1} GB/s", bw / 1e9);
    let (d, ff, kv) = (g.d_model, g.d_ff, g.kv_dim());
    let shapes = [
        ("attn_q / attn_output", d, d),
        ("attn_k / attn_v", kv, d),
        ("ffn_gate / ffn_up", ff, d),
        ("ffn_down", d, ff),
    ];
    println!("\nW8A8 GEMM, m = {}:", a.m);
    for (name, n, k) in shapes {
        let r = gemm_rate(a.m, k, n);
        let pct = peak.map_or(String::new(), |p| {
            format!(" ({:.0}% of peak)", 100.0 * r / p)
        });
        println!("  {name:<22} n={n:<5} k={k:<5} {:.1} GMAC/s{pct}", r / 1e9);
    }
    println!("\nw4a8 GEMM (Q4_1 blocks as stored), m = {}:", a.m);
    for (name, n, k) in shapes {
        let r = qgemm_rate(QFormat::Q4_1, a.m, k, n);
        let pct = peak.map_or(String::new(), |p| {
            format!(" ({:.0}% of peak)", 100.0 * r / p)
        });
        println!("  {name:<22} n={n:<5} k={k:<5} {:.1} GMAC/s{pct}", r / 1e9);
    }
    // What batch invariance costs: the shipped scheme (per token, a scale per 64 inputs) and a
    // per-token scale over the whole row are both invariant; one scale for the whole batch
    // (per tensor) is not, and is the cheapest arithmetic there is for this kernel.
    println!("\nCost of batch invariance, ffn_gate/up shape (GMAC/s; higher is faster):");
    for m in [32, a.m] {
        let shipped = gemm_rate(m, d, ff);
        let row = gemm_rate_with(m, d, ff, |x, m, k| {
            I8Acts::quantize_grouped(x, m, k, k.next_multiple_of(4))
        });
        let tensor = gemm_rate_with(m, d, ff, I8Acts::quantize_per_tensor);
        println!(
            "  m={m:<4} per-token groups of {} (invariant, shipped) {:.1} | per-token whole row (invariant) {:.1} | per-tensor (not invariant) {:.1}  -> invariant/non-invariant {:.2}",
            kernels::int8::GROUP,
            shipped / 1e9,
            row / 1e9,
            tensor / 1e9,
            row / tensor
        );
    }
    // The matrices as the engine runs them: Q/K/V stacked, output, gate/up stacked, down.
    let layer = [(d + 2 * kv, d), (d, d), (2 * ff, d), (d, ff)];
    println!(
        "\nDecode GEMV (m = 1) over {} layers' distinct matrices (Q/K/V and gate/up stacked, as the engine runs them), each against a plain read of as many bytes measured in alternation:",
        g.n_layers
    );
    let show = |name: &str, r: super::peaks::GemvRate, bytes: usize| {
        println!(
            "  {name:<30} {:>4} MiB  best {:.1} GB/s, read best {:.1} GB/s; median of per-round ratios {:.0}%",
            bytes >> 20,
            r.gemv / 1e9,
            r.read / 1e9,
            100.0 * r.ratio
        )
    };
    let macs = layer.iter().map(|(n, k)| n * k).sum::<usize>() * g.n_layers;
    show(
        "W8A8 (int8 weights)",
        gemv_bandwidth(&layer, g.n_layers),
        macs,
    );
    // Q4_1 is 5/8 of int8's bytes: twice the layers keep the working set well past the
    // last-level cache, as the int8 one is (a smaller one partly hits in L3 and flatters reads).
    show(
        &format!("w4a8 (Q4_1 as stored), {} layers", 2 * g.n_layers),
        qgemv_bandwidth(QFormat::Q4_1, &layer, 2 * g.n_layers),
        2 * macs * 20 / 32,
    );
    if let (Some(ip), Some(fp)) = (peak, fpeak) {
        prefill_floor(a, g, threads, ip, fp);
    }
    Ok(())
}

/// The least time a prompt's prefill can take on these threads: every weight
/// multiply-accumulate at the int8 peak plus every attention one (scores and weighted sums,
/// causal) at the f32 peak — perfect kernels, nothing else (no norms, no activation
/// quantization, no memory stalls). What a TTFT goal has to fit under.
fn prefill_floor(a: &RooflineArgs, g: &LlamaConfig, threads: usize, int8_peak: f64, f32_peak: f64) {
    let (d, ff, kv, p) = (g.d_model, g.d_ff, g.kv_dim(), a.prompt);
    let per_token = (d * (d + 2 * kv) + d * d + d * 2 * ff + ff * d) * g.n_layers;
    let weights = (per_token * p) as f64;
    let attention = (2 * g.n_heads * g.head_dim * g.n_layers) as f64 * (p * (p + 1) / 2) as f64;
    let (tw, ta) = (weights / int8_peak, attention / f32_peak);
    println!(
        "\nPrefill of a {p}-token prompt on {threads} thread(s), the arithmetic floor at the peaks above:"
    );
    println!(
        "  weights   {:>6.1} GMAC at the int8 peak  {:.2} s",
        weights / 1e9,
        tw
    );
    println!(
        "  attention {:>6.1} GMAC at the f32 peak   {:.2} s",
        attention / 1e9,
        ta
    );
    println!(
        "  floor     {:.2} s ({:.0} tokens/s); `tandem model bench --prompt {p}` measures the engine",
        tw + ta,
        p as f64 / (tw + ta)
    );
    let all8 = (weights + attention) / int8_peak;
    println!("  (with an 8-bit attention at the int8 peak too: {all8:.2} s)");
}
