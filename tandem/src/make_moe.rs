//! `tandem model make-moe`: MoE models made from a dense one, for serving and testing
//! expert parallelism (no small real MoE is reachable offline).

use clap::Args;
use engine::moe::make::{MoeKind, MoeSpec, make_moe};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct MakeMoeArgs {
    /// The dense source model (default: the default model, fetched if needed).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to write the MoE GGUF.
    #[arg(long)]
    pub out: PathBuf,
    /// Experts per layer.
    #[arg(long, default_value_t = 8)]
    pub num_experts: usize,
    /// Experts each token is routed to.
    #[arg(long, default_value_t = 2)]
    pub top_k: usize,
    /// Random experts with a router calibrated so that the busiest expert takes this share of the tokens (top-k/experts is even; default 0.25 for 8 experts, top-2). Not with --upcycle.
    #[arg(long, conflicts_with = "upcycle")]
    pub skew: Option<f64>,
    /// With random experts: expert e's router bias falls as (1 − e/(E−1))^FALLOFF from expert 0 to the last; 1 is linear; below 1 the experts after the busiest keep a bias near its own and take more of the remaining choices (the low-numbered half of the experts takes more of the load), above 1 their bias falls faster.
    #[arg(long, default_value_t = 1.0, conflicts_with = "upcycle")]
    pub falloff: f32,
    /// Copy each layer's dense FFN into every expert instead (the model then computes what the dense one does).
    #[arg(long)]
    pub upcycle: bool,
    /// With --upcycle: perturb each expert's weights by this many standard deviations of the FFN's weights (uniform noise); 0 copies them as stored.
    #[arg(long, default_value_t = 0.0, requires = "upcycle")]
    pub noise: f32,
    /// Seed of every random weight.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep only the first N layers (smaller models for tests).
    #[arg(long)]
    pub layers: Option<usize>,
}

pub fn run(args: &MakeMoeArgs) -> anyhow::Result<()> {
    let src = crate::process::model_path(args.model.as_deref())?;
    let g = engine::gguf::GgufFile::open(&src)?;
    let kind = if args.upcycle {
        MoeKind::Upcycled { noise: args.noise }
    } else {
        MoeKind::Random {
            skew: args
                .skew
                .unwrap_or(args.top_k as f64 / args.num_experts as f64),
            falloff: args.falloff,
        }
    };
    let spec = MoeSpec {
        experts: args.num_experts,
        top_k: args.top_k,
        kind,
        seed: args.seed,
        layers: args.layers,
    };
    let made = make_moe(&g, &spec, &args.out)?;
    let shares = &made.busiest_share;
    let mean = shares.iter().sum::<f64>() / shares.len().max(1) as f64;
    let max = shares.iter().cloned().fold(0.0, f64::max);
    // The load over all layers, and what it does to 2 expert workers that split the experts
    // evenly (the case EPLB is measured on).
    let mut load = vec![0f64; args.num_experts];
    for layer in &made.expert_share {
        for (l, s) in load.iter_mut().zip(layer) {
            *l += s;
        }
    }
    use expert_worker::eplb;
    let two = eplb::imbalance(&eplb::loads(&load, &eplb::even(args.num_experts, 2)));
    eprintln!(
        "tandem: wrote {} ({} layers, {} experts, top-{}); the busiest expert's share of the calibration tokens: mean {mean:.3}, max {max:.3} over layers; 2 expert workers splitting the experts evenly: busiest / mean load {two:.2}",
        args.out.display(),
        shares.len(),
        args.num_experts,
        args.top_k
    );
    Ok(())
}
