//! `tandem model device-check`: a device backend (CUDA) against the CPU, in one run on the
//! machine that has the device, and its speed against the device's bounds.
//!
//! 1. Synthetic models generated here from the tests' seeded generator (no file to carry):
//!    every logit of a 500-token prompt, f32 path and quantized path, device against CPU.
//! 2. Seeded generation (greedy and sampled, 32 requests with a shared prefix): each request
//!    alone against all of them batched with random prefill chunks, on the device.
//! 3. With `--model` (the real model): greedy continuations of the golden prompts
//!    (`engine/tests/fixtures/greedy.json`), device against CPU and against llama.cpp's.
//! 4. Speed with `--model`: 2,000-token prefill, single-stream and batch-64 decode, against
//!    the HBM bandwidth bound (the weights read once per step) and the bf16 peak.
//!
//! `--device cpu` runs the same harness CPU against CPU (every figure must then be exact).

use clap::Args;
use engine::synthetic::testing::{
    Rng, generate_alone, generate_batched, mixed_params, mixed_prompts,
};
use engine::synthetic::{TinySpec, write};
use engine::{Device, Engine, EngineConfig, KvDtype, LogitsWanted, Precision};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct DeviceCheckArgs {
    /// The device to check against the CPU.
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// The real model (correctness of the golden prompts and the speed figures); without it,
    /// synthetic models only.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The golden prompts: llama.cpp's greedy continuations.
    #[arg(long, default_value = "engine/tests/fixtures/greedy.json")]
    pub golden: PathBuf,
    /// The device's memory bandwidth, GB/s (H200: 4,800).
    #[arg(long, default_value_t = 4800.0)]
    pub hbm_gbps: f64,
    /// The device's dense bf16 peak, TFLOP/s (H200: 989).
    #[arg(long, default_value_t = 989.0)]
    pub bf16_tflops: f64,
    /// Prompt tokens of the prefill measurement.
    #[arg(long, default_value_t = 2000)]
    pub prefill: usize,
}

fn load(path: &Path, precision: Precision, kv: KvDtype, device: Device) -> anyhow::Result<Engine> {
    Ok(Engine::load(
        path,
        &EngineConfig {
            kv_budget_bytes: 1 << 30,
            model_id: None,
            precision,
            kv_dtype: kv,
            kv_shared_path: None,
            device,
        },
    )?)
}

/// Largest |a − b| over every logit of a `n`-token prompt's positions, and how many
/// positions' argmax differ.
fn logits_diff(a: &Engine, b: &Engine, prompt: &[u32]) -> anyhow::Result<(f32, usize)> {
    let la = a.prefill(&mut a.new_sequence(), prompt, LogitsWanted::All)?;
    let lb = b.prefill(&mut b.new_sequence(), prompt, LogitsWanted::All)?;
    let v = a.model.config().vocab_size;
    let max = la
        .iter()
        .zip(&lb)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let flips = la
        .chunks_exact(v)
        .zip(lb.chunks_exact(v))
        .filter(|(x, y)| engine::sampler::argmax(x) != engine::sampler::argmax(y))
        .count();
    Ok((max, flips))
}

/// 32 prompts, half sharing a 40-token prefix; each alone, then all batched: how many traces
/// (tokens and log-probability bits) are identical.
fn batch_invariance(e: &Engine, n_gen: usize) -> (usize, usize) {
    let vocab = e.model.config().vocab_size as u64 - 2;
    let mut rng = Rng(0x9e37_79b9);
    let prompts = mixed_prompts(&mut rng, 32, vocab);
    let params = |i| mixed_params(i, n_gen, 1000);
    let alone: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| generate_alone(e, p, params(i)))
        .collect();
    let (batched, _) = generate_batched(e, &prompts, params, &mut rng);
    let same = alone.iter().zip(&batched).filter(|(a, b)| a == b).count();
    (same, prompts.len())
}

fn greedy(e: &Engine, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
    let mut seq = e.new_sequence();
    let mut tok = engine::sampler::argmax(&e.prefill(&mut seq, prompt, LogitsWanted::Last)?);
    let mut out = vec![tok];
    while out.len() < n {
        tok = engine::sampler::argmax(&e.decode_step(&mut [(&mut seq, tok)])?[0]);
        out.push(tok);
    }
    Ok(out)
}

/// Speed of `e`: (prefill ms of `n` tokens, single-stream tok/s, batch-64 tok/s).
fn speed(e: &Engine, n: usize) -> anyhow::Result<(f64, f64, f64)> {
    let vocab = e.model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..n as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab)
        .collect();
    e.prefill(&mut e.new_sequence(), &prompt[..32], LogitsWanted::Last)?;
    let mut pf = f64::MAX;
    e.model.profile();
    for _ in 0..3 {
        let t = Instant::now();
        e.prefill(&mut e.new_sequence(), &prompt, LogitsWanted::Last)?;
        pf = pf.min(t.elapsed().as_secs_f64() * 1e3);
    }
    let profile = |what: &str| {
        if let Some(p) = e.model.profile() {
            println!("| {} {what} | {p} |", e.model.name());
        }
    };
    profile(&format!("prefill {n}"));
    let mut seq = e.new_sequence();
    e.prefill(&mut seq, &prompt[..32], LogitsWanted::Last)?;
    let (steps, mut tok) = (128, 1u32);
    let t = Instant::now();
    for _ in 0..steps {
        tok = engine::sampler::argmax(&e.decode_step(&mut [(&mut seq, tok)])?[0]);
    }
    let single = steps as f64 / t.elapsed().as_secs_f64();
    profile("decode, 1 stream");
    let mut seqs: Vec<_> = (0..64).map(|_| e.new_sequence()).collect();
    for (i, s) in seqs.iter_mut().enumerate() {
        e.prefill(s, &prompt[i..i + 32], LogitsWanted::Last)?;
    }
    let steps = 64;
    let t = Instant::now();
    for step in 0..steps {
        let mut batch: Vec<_> = seqs.iter_mut().map(|s| (s, step as u32 + 1)).collect();
        e.decode_step(&mut batch)?;
    }
    let batch = (64 * steps) as f64 / t.elapsed().as_secs_f64();
    profile("decode, batch 64");
    Ok((pf, single, batch))
}

pub fn run(args: &DeviceCheckArgs) -> anyhow::Result<()> {
    let dev = args.device;
    let dir = tempfile::tempdir()?;
    let spec = TinySpec {
        n_layers: 4,
        d_model: 256,
        n_heads: 4,
        n_kv_heads: 2,
        d_ff: 512,
        n_ctx: 1024,
        seed: 11,
        ..TinySpec::default()
    };
    let tiny = dir.path().join("tiny.gguf");
    write(&spec, &tiny)?;
    // Every matrix in a block format: the CPU's w4a8 runs them all as stored too.
    let tiny_q = dir.path().join("tiny-q.gguf");
    write(
        &TinySpec {
            block_formats_only: true,
            ..spec.clone()
        },
        &tiny_q,
    )?;
    let mut rng = Rng(0x5eed);
    let prompt: Vec<u32> = (0..500).map(|_| rng.next(250) as u32).collect();
    println!("## {dev} against the CPU\n");
    println!("| check | result |\n|---|---|");
    for (precision, kv, path, what) in [
        (Precision::F32, KvDtype::F32, &tiny, "synthetic"),
        (
            Precision::W4A8,
            KvDtype::F16,
            &tiny_q,
            "synthetic, block formats",
        ),
        (
            Precision::W4A8,
            KvDtype::F32,
            &tiny_q,
            "synthetic, block formats",
        ),
    ] {
        let cpu = load(path, precision, kv, Device::Cpu)?;
        let gpu = load(path, precision, kv, dev)?;
        if precision == Precision::F32 {
            println!("| backend | {} |", gpu.model.name());
        }
        let (max, flips) = logits_diff(&cpu, &gpu, &prompt)?;
        println!(
            "| {what} {precision}/{kv} KV: logits of a 500-token prompt, max abs diff | {max:.3e} ({flips} of 500 argmax differ) |"
        );
        let (same, n) = batch_invariance(&gpu, 16);
        println!(
            "| {what} {precision}/{kv} KV: seeded traces alone = batched ({n} requests, 16 tokens) | {same}/{n} |"
        );
    }
    let Some(model) = &args.model else {
        return Ok(());
    };
    let mut rng = Rng(0xface);
    let prompt: Vec<u32> = (0..500).map(|_| rng.next(49152) as u32).collect();
    for (precision, kv) in [
        (Precision::F32, KvDtype::F32),
        (Precision::W4A8, KvDtype::F32),
    ] {
        let (max, flips) = logits_diff(
            &load(model, precision, kv, Device::Cpu)?,
            &load(model, precision, kv, dev)?,
            &prompt,
        )?;
        println!(
            "| real model {precision}/{kv} KV: logits of a 500-token prompt, max abs diff | {max:.3e} ({flips} of 500 argmax differ) |"
        );
    }
    let cpu = load(model, Precision::W4A8, KvDtype::F16, Device::Cpu)?;
    let gpu = load(model, Precision::W4A8, KvDtype::F16, dev)?;
    let (max, flips) = logits_diff(&cpu, &gpu, &prompt)?;
    println!(
        "| real model w4a8/f16 KV: logits of a 500-token prompt, max abs diff | {max:.3e} ({flips} of 500 argmax differ) |"
    );
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&args.golden)?)?;
    // llama.cpp's continuations come from the f32 weights: the device's f32 path is compared
    // with them, its w4a8 path with the CPU's w4a8.
    let gpu_f32 = load(model, Precision::F32, KvDtype::F32, dev)?;
    let (mut same_cpu, mut same_ref, mut n) = (0, 0, 0);
    for case in golden.as_array().into_iter().flatten() {
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_u64().map(|x| x as u32))
                .collect()
        };
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["continuation"]);
        let c = greedy(&cpu, &prompt, want.len())?;
        let g = greedy(&gpu, &prompt, want.len())?;
        n += 1;
        same_cpu += (c == g) as usize;
        same_ref += (greedy(&gpu_f32, &prompt, want.len())? == want) as usize;
        if c != g {
            let at = c.iter().zip(&g).position(|(a, b)| a != b).unwrap_or(0);
            println!(
                "| golden {:?}: first difference from the CPU | token {at} of {} |",
                case["message"].as_str().unwrap_or(""),
                want.len()
            );
        }
    }
    println!("| golden prompts: greedy = CPU w4a8 ({dev} w4a8) | {same_cpu}/{n} |");
    println!("| golden prompts: greedy = llama.cpp f32 ({dev} f32) | {same_ref}/{n} |");
    drop(gpu_f32);
    let (same, total) = batch_invariance(&gpu, 32);
    println!(
        "| real model w4a8: seeded traces alone = batched ({total} requests, 32 tokens) | {same}/{total} |"
    );

    let c = gpu.model.config();
    let params = c.n_layers
        * (c.d_model * (c.d_model + 2 * c.kv_dim())
            + c.d_model * c.d_model
            + 3 * c.d_model * c.d_ff)
        + c.vocab_size * c.d_model;
    // The bytes a decode step reads: the weights as stored (the CPU's copy; the device holds
    // them in two layouts and reads one).
    let bytes = cpu.model.weight_bytes() as f64;
    let bw = args.hbm_gbps * 1e9;
    println!("\n| where the time goes | per forward call |\n|---|---|");
    let (pf, single, batch) = speed(&gpu, args.prefill)?;
    let (cpf, csingle, cbatch) = speed(&cpu, args.prefill)?;
    let pf_bound = 2.0 * params as f64 * args.prefill as f64 / (args.bf16_tflops * 1e12) * 1e3;
    println!(
        "\n## Speed, {} (w4a8, f16 KV; weights {:.1} MB, {:.1} M matmul parameters)\n",
        gpu.model.name(),
        bytes / 1e6,
        params as f64 / 1e6
    );
    println!("| measure | {dev} | CPU (this host) | {dev} bound |\n|---|---|---|---|");
    println!(
        "| prefill {} tokens, ms | {pf:.1} | {cpf:.1} | {pf_bound:.3} (bf16 peak {} TFLOP/s, matmuls only) |",
        args.prefill, args.bf16_tflops
    );
    println!(
        "| decode, 1 stream, tok/s | {single:.0} | {csingle:.0} | {:.0} (weights once per token at {} GB/s) |",
        bw / bytes,
        args.hbm_gbps
    );
    println!(
        "| decode, batch 64, tok/s | {batch:.0} | {cbatch:.0} | {:.0} (weights once per step) |",
        64.0 * bw / bytes
    );
    Ok(())
}
