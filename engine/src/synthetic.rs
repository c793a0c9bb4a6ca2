//! Tiny synthetic Llama models written as real GGUF files, for fast tests of the loader, the
//! forward pass and the servers. Weights are pseudo-random (never zero) and stored in a mix of
//! every tensor type the loader reads.

use crate::error::Result;
use crate::gguf::{GgmlType, GgufWriter, Value};
use crate::tokenizer::byte_to_char;
use crate::weights::encode;
use std::path::Path;

/// Shape of a synthetic model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_ff: usize,
    pub n_ctx: usize,
    pub seed: u64,
    /// Write a separate `output.weight` instead of tying it to the embeddings.
    pub untied_output: bool,
    /// `tokenizer.chat_template` (default: ChatML).
    pub chat_template: Option<String>,
    /// Every matrix in a GGML block format (Q4_1, Q4_0, Q8_0; the default mixes in f16, bf16
    /// and f32): a model every backend's w4a8 path runs as stored, bit for bit comparable.
    pub block_formats_only: bool,
    /// A mixture of experts in every layer: `(experts, used per token)`.
    pub experts: Option<(usize, usize)>,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            n_layers: 2,
            d_model: 64,
            n_heads: 4,
            n_kv_heads: 2,
            d_ff: 96,
            n_ctx: 512,
            seed: 7,
            untied_output: false,
            chat_template: None,
            block_formats_only: false,
            experts: None,
        }
    }
}

/// Extra tokens after the 256 byte tokens: merged pieces, then specials.
const MERGES: &[(&str, &str)] = &[
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
];
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let u = (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        (u - 0.5) * 0.6 + 1e-3
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// The vocabulary of a synthetic model: tokens and their GGUF types.
pub fn vocab() -> (Vec<String>, Vec<i32>) {
    let table = byte_to_char();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1i32; 256];
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    for s in [IM_START, IM_END] {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, types)
}

/// Builds the GGUF for `spec` in memory.
pub fn build(spec: &TinySpec) -> GgufWriter {
    let (tokens, types) = vocab();
    let n_vocab = tokens.len() as u64;
    let mut w = GgufWriter::new();
    let s = |x: &str| Value::String(x.to_string());
    let u = |x: usize| Value::U32(x as u32);
    w.meta("general.architecture", s("llama"))
        .meta("general.name", s("tandem-tiny"))
        .meta("llama.context_length", u(spec.n_ctx))
        .meta("llama.embedding_length", u(spec.d_model))
        .meta("llama.block_count", u(spec.n_layers))
        .meta("llama.feed_forward_length", u(spec.d_ff))
        .meta("llama.attention.head_count", u(spec.n_heads))
        .meta("llama.attention.head_count_kv", u(spec.n_kv_heads))
        .meta("llama.rope.freq_base", Value::F32(10000.0))
        .meta("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .meta("tokenizer.ggml.model", s("gpt2"))
        .meta("tokenizer.ggml.pre", s("smollm"))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        )
        .meta(
            "tokenizer.ggml.merges",
            Value::Array(MERGES.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect()),
        )
        .meta("tokenizer.ggml.bos_token_id", u(n_vocab as usize - 2))
        .meta("tokenizer.ggml.eos_token_id", u(n_vocab as usize - 1))
        .meta("tokenizer.ggml.add_bos_token", Value::Bool(false))
        .meta(
            "tokenizer.chat_template",
            s(spec.chat_template.as_deref().unwrap_or(crate::chat::CHATML)),
        );
    if let Some((ne, used)) = spec.experts {
        w.meta("llama.expert_count", u(ne))
            .meta("llama.expert_used_count", u(used));
    }
    let mut rng = Rng(spec.seed.max(1));
    let (d, ff) = (spec.d_model as u64, spec.d_ff as u64);
    let kvd = (spec.d_model / spec.n_heads * spec.n_kv_heads) as u64;
    let mut t = |w: &mut GgufWriter, name: &str, dims: &[u64], ty: GgmlType| {
        let n: u64 = dims.iter().product();
        let mut data = rng.vec(n as usize);
        if name.ends_with("norm.weight") {
            data.iter_mut().for_each(|v| *v += 1.0);
        }
        w.tensor(name, dims, ty, encode(ty, &data));
    };
    t(&mut w, "token_embd.weight", &[d, n_vocab], GgmlType::Q8_0);
    t(&mut w, "output_norm.weight", &[d], GgmlType::F32);
    if spec.untied_output {
        t(&mut w, "output.weight", &[d, n_vocab], GgmlType::F16);
    }
    let blocks = spec.block_formats_only;
    let pick = |other: GgmlType, block: GgmlType| if blocks { block } else { other };
    for i in 0..spec.n_layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        t(&mut w, &n("attn_norm"), &[d], GgmlType::F32);
        t(&mut w, &n("attn_q"), &[d, d], GgmlType::Q4_1);
        t(&mut w, &n("attn_k"), &[d, kvd], GgmlType::Q4_0);
        t(
            &mut w,
            &n("attn_v"),
            &[d, kvd],
            pick(GgmlType::F16, GgmlType::Q8_0),
        );
        t(
            &mut w,
            &n("attn_output"),
            &[d, d],
            pick(GgmlType::Bf16, GgmlType::Q4_1),
        );
        t(&mut w, &n("ffn_norm"), &[d], GgmlType::F32);
        if let Some((ne, _)) = spec.experts {
            let ne = ne as u64;
            t(&mut w, &n("ffn_gate_inp"), &[d, ne], GgmlType::F32);
            t(&mut w, &n("ffn_gate_exps"), &[d, ff, ne], GgmlType::Q4_1);
            t(&mut w, &n("ffn_up_exps"), &[d, ff, ne], GgmlType::Q8_0);
            t(
                &mut w,
                &n("ffn_down_exps"),
                &[ff, d, ne],
                pick(GgmlType::F16, GgmlType::Q4_0),
            );
            continue;
        }
        t(&mut w, &n("ffn_gate"), &[d, ff], GgmlType::Q4_1);
        t(&mut w, &n("ffn_up"), &[d, ff], GgmlType::Q8_0);
        t(
            &mut w,
            &n("ffn_down"),
            &[ff, d],
            pick(GgmlType::F32, GgmlType::Q4_0),
        );
    }
    w
}

/// Writes a synthetic model to `path`.
pub fn write(spec: &TinySpec, path: impl AsRef<Path>) -> Result<()> {
    Ok(build(spec).write(path)?)
}

/// Test support shared by the determinism tests of the engine and the workers.
pub mod testing {
    use crate::generation::GenerationState;
    use crate::model::ForwardItem;
    use crate::request::GenerationParams;
    use crate::sampler::SamplingParams;
    use crate::{Engine, KvSequence, LogitsWanted};

    /// A seeded xorshift generator (test data only).
    pub struct Rng(pub u64);

    impl Rng {
        /// Uniform in `0..n`.
        pub fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Request `i` of a mixed batch: every third greedy, the rest seeded temperature + top-p
    /// (+ top-k on even `i`), exactly `n_gen` tokens, logprobs on.
    pub fn mixed_params(i: usize, n_gen: usize, seed_base: u64) -> GenerationParams {
        let sampling = if i.is_multiple_of(3) {
            SamplingParams::greedy()
        } else {
            SamplingParams {
                temperature: 0.9,
                top_p: 0.95,
                top_k: if i.is_multiple_of(2) { 20 } else { 0 },
                seed: seed_base + i as u64,
                ..Default::default()
            }
        };
        GenerationParams {
            sampling,
            max_tokens: n_gen,
            min_tokens: n_gen,
            ignore_eos: true,
            stop_token_ids: vec![],
            logprobs: Some(2),
            prompt_logprobs: None,
            logit_bias: Vec::new(),
            constraint: None,
        }
    }

    /// `n` prompts of tokens below `vocab`: the even ones a shared 40-token prefix and then
    /// 1–60 tokens of their own, the odd ones only their own.
    pub fn mixed_prompts(rng: &mut Rng, n: usize, vocab: u64) -> Vec<Vec<u32>> {
        let shared: Vec<u32> = (0..40).map(|_| rng.next(vocab) as u32).collect();
        (0..n)
            .map(|i| {
                let own: Vec<u32> = (0..1 + rng.next(60))
                    .map(|_| rng.next(vocab) as u32)
                    .collect();
                if i % 2 == 0 {
                    [shared.clone(), own].concat()
                } else {
                    own
                }
            })
            .collect()
    }

    /// Tokens and the bits of each chosen token's log-probability.
    pub type Trace = (Vec<u32>, Vec<u32>);

    /// The request alone, straight on the engine: whole-prompt prefill, then one token a step.
    pub fn generate_alone(e: &Engine, prompt: &[u32], p: GenerationParams) -> Trace {
        let mut seq = e.new_sequence();
        let logits = e.prefill(&mut seq, prompt, LogitsWanted::Last).unwrap();
        let mut st = GenerationState::new(p, prompt.len());
        let mut ev = st.next(&e.frontend, &logits, e.max_context()).unwrap();
        let lp = |ev: &crate::request::TokenEvent| ev.logprobs.as_ref().unwrap().logprob.to_bits();
        let mut t: Trace = (vec![ev.token], vec![lp(&ev)]);
        while ev.finish.is_none() {
            let l = e
                .decode_step(&mut [(&mut seq, ev.token)])
                .unwrap()
                .pop()
                .unwrap();
            ev = st.next(&e.frontend, &l, e.max_context()).unwrap();
            t.0.push(ev.token);
            t.1.push(lp(&ev));
        }
        t
    }

    /// Every request together on one engine, as a busy server runs them: the first prompt
    /// prefilled alone and published, the rest attaching what the prefix cache holds of
    /// theirs, then prefill in random chunks (`rng`) with several sequences per forward call,
    /// then every sequence decoded in one batch per step. Returns each request's trace and
    /// the prompt tokens served from the prefix cache.
    pub fn generate_batched(
        e: &Engine,
        prompts: &[Vec<u32>],
        params: impl Fn(usize) -> GenerationParams,
        rng: &mut Rng,
    ) -> (Vec<Trace>, usize) {
        let n_seq = prompts.len();
        let mut seqs: Vec<KvSequence> = (0..n_seq).map(|_| e.new_sequence()).collect();
        let mut done = vec![0usize; n_seq];
        let mut hits = 0;
        let mut last_logits: Vec<Option<Vec<f32>>> = vec![None; n_seq];
        last_logits[0] = Some(
            e.prefill(&mut seqs[0], &prompts[0], LogitsWanted::Last)
                .unwrap(),
        );
        seqs[0].publish_prefix(&prompts[0]);
        done[0] = prompts[0].len();
        for (i, s) in seqs.iter_mut().enumerate().skip(1) {
            done[i] = s.attach_prefix(&prompts[i]);
            hits += done[i];
        }
        while done.iter().zip(prompts).any(|(d, p)| d < &p.len()) {
            let mut group: Vec<(usize, usize)> = Vec::new();
            for i in 0..n_seq {
                if done[i] < prompts[i].len() && rng.next(3) != 0 {
                    let n = (1 + rng.next(24) as usize).min(prompts[i].len() - done[i]);
                    group.push((i, n));
                }
            }
            let mut refs: Vec<(usize, &mut KvSequence)> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| group.iter().any(|g| g.0 == *i))
                .collect();
            let mut items: Vec<ForwardItem> = refs
                .iter_mut()
                .map(|(i, s)| {
                    let n = group.iter().find(|g| g.0 == *i).unwrap().1;
                    ForwardItem {
                        seq: s,
                        tokens: &prompts[*i][done[*i]..done[*i] + n],
                        logits: LogitsWanted::Last,
                    }
                })
                .collect();
            let out = e.model.forward(&mut items).unwrap();
            drop(items);
            for ((i, n), l) in group.iter().zip(out) {
                done[*i] += n;
                if done[*i] == prompts[*i].len() {
                    last_logits[*i] = Some(l);
                    seqs[*i].publish_prefix(&prompts[*i]);
                }
            }
        }
        let mut states: Vec<GenerationState> = (0..n_seq)
            .map(|i| GenerationState::new(params(i), prompts[i].len()))
            .collect();
        let mut traces: Vec<Trace> = vec![(vec![], vec![]); n_seq];
        let mut last = vec![0u32; n_seq];
        let mut finished = vec![false; n_seq];
        for i in 0..n_seq {
            let ev = states[i]
                .next(
                    &e.frontend,
                    last_logits[i].as_ref().unwrap(),
                    e.max_context(),
                )
                .unwrap();
            last[i] = ev.token;
            finished[i] = ev.finish.is_some();
            traces[i].0.push(ev.token);
            traces[i].1.push(ev.logprobs.unwrap().logprob.to_bits());
        }
        while finished.iter().any(|f| !f) {
            let live: Vec<usize> = (0..n_seq).filter(|&i| !finished[i]).collect();
            let mut batch: Vec<(&mut KvSequence, u32)> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| !finished[*i])
                .map(|(i, s)| (s, last[i]))
                .collect();
            let out = e.decode_step(&mut batch).unwrap();
            for (&i, l) in live.iter().zip(&out) {
                let ev = states[i].next(&e.frontend, l, e.max_context()).unwrap();
                last[i] = ev.token;
                finished[i] = ev.finish.is_some();
                traces[i].0.push(ev.token);
                traces[i].1.push(ev.logprobs.unwrap().logprob.to_bits());
            }
        }
        (traces, hits)
    }
}
