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
    eprintln!(
        "tandem: wrote {} ({} layers, {} experts, top-{}); the busiest expert's share of the calibration tokens: mean {mean:.3}, max {max:.3} over layers",
        args.out.display(),
        shares.len(),
        args.num_experts,
        args.top_k
    );
    Ok(())
}
