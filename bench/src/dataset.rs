//! Workloads: prompts of exact token lengths (by the model's tokenizer) and their output
//! lengths. Text comes from a seeded generator of English-like sentences, or from a file;
//! nothing is fetched.

use crate::args::{DatasetName, RunArgs};
use anyhow::{Context, bail};
use frontend::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// One request of a workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestSpec {
    /// A shared system prompt (shared-prefix workload); sent as the system message in chat.
    pub system: Option<String>,
    pub prompt: String,
    /// Prompt tokens by the client's tokenizer (diagnostic; the server's usage is authoritative).
    pub input_len: usize,
    pub output_len: usize,
    /// Which part of a mixed workload this is ("long", "chat"), or the dataset name.
    pub kind: &'static str,
    /// Multi-turn: `(conversation, turn)`; the turns of a conversation are sent in order,
    /// a think time apart ([`crate::load::schedule_turns`]).
    pub turn: Option<(usize, usize)>,
}

const WORDS: &str = "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they \
you were her she there been one all we their has would when if so no what up out more can time other about into than them only \
could new these some two may first then do any like my now over such our man me even most made after also did many before must \
through back years where much your way well down should because each just those people how too little state good very make world \
still own see men work long get here between both life being under never day same another know while last might us great old \
year off come since against go came right used take three system model request token cache server memory worker batch queue \
latency stream prefill decode river mountain garden window music story science history market energy water language number";

/// Seeded English-like text.
pub fn corpus(rng: &mut StdRng, words: usize) -> String {
    let vocab: Vec<&str> = WORDS.split_whitespace().collect();
    let mut s = String::with_capacity(words * 6);
    let mut sentence = 0;
    for i in 0..words {
        let w = vocab[rng.random_range(0..vocab.len())];
        if sentence == 0 {
            let mut c = w.chars();
            if let Some(f) = c.next() {
                s.extend(f.to_uppercase());
                s.push_str(c.as_str());
            }
        } else {
            s.push_str(w);
        }
        sentence += 1;
        if sentence > 6 && rng.random_bool(0.15) {
            s.push_str(if rng.random_bool(0.8) { ". " } else { "? " });
            sentence = 0;
        } else if i + 1 < words {
            s.push(if rng.random_bool(0.05) { ',' } else { ' ' });
            if s.ends_with(',') {
                s.push(' ');
            }
        }
    }
    s
}

/// Cuts text of exactly `n` tokens (when the tokenizer allows it) from a token stream.
pub struct TextSource {
    tok: Arc<Tokenizer>,
    ids: Vec<u32>,
}

impl TextSource {
    pub fn new(tok: Arc<Tokenizer>, rng: &mut StdRng) -> anyhow::Result<TextSource> {
        let text = corpus(rng, 40_000);
        let ids = tok.encode(&text, false)?;
        Ok(TextSource { tok, ids })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tok
    }

    /// Text whose tokenization has `n` tokens (or the closest found in a few tries).
    pub fn text(&self, rng: &mut StdRng, n: usize) -> anyhow::Result<(String, usize)> {
        if n == 0 {
            return Ok((String::new(), 0));
        }
        let mut want = n;
        let mut best = (String::new(), 0usize);
        for _ in 0..8 {
            let take = want.min(self.ids.len());
            let start = rng.random_range(0..=self.ids.len() - take);
            let text = self.tok.decode(&self.ids[start..start + take]);
            let got = self.tok.encode(&text, false)?.len();
            if got.abs_diff(n) < best.1.abs_diff(n) || best.0.is_empty() {
                best = (text, got);
            }
            if got == n {
                break;
            }
            want = (want as isize + n as isize - got as isize).max(1) as usize;
        }
        Ok(best)
    }
}

fn jitter(rng: &mut StdRng, len: usize, ratio: f64) -> usize {
    if ratio <= 0.0 || len == 0 {
        return len.max(1);
    }
    let lo = ((len as f64) * (1.0 - ratio)).floor().max(1.0) as usize;
    let hi = ((len as f64) * (1.0 + ratio)).ceil() as usize;
    rng.random_range(lo..=hi.max(lo))
}

/// Builds `count` requests of the chosen workload. `seed` fixes the shape of the workload
/// (each request's kind and lengths); `text_seed` fixes the text, so runs of a sweep can share
/// the same mix while sending different prompts (no cross-run prefix-cache hits).
pub fn build(
    args: &RunArgs,
    src: &TextSource,
    count: usize,
    seed: u64,
    text_seed: u64,
) -> anyhow::Result<Vec<RequestSpec>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut text_rng = StdRng::seed_from_u64(text_seed ^ 0x7e57_5eed);
    let ratio = args.random_range_ratio;
    let mut out = Vec::with_capacity(count);
    match args.dataset_name {
        DatasetName::Random => {
            for _ in 0..count {
                let n = jitter(&mut rng, args.random_input_len, ratio);
                let (prompt, input_len) = src.text(&mut text_rng, n)?;
                let output_len = jitter(&mut rng, args.random_output_len, ratio);
                out.push(RequestSpec {
                    system: None,
                    prompt,
                    input_len,
                    output_len,
                    kind: "random",
                    turn: None,
                });
            }
        }
        DatasetName::SharedPrefix => {
            let groups = args.num_prefix_groups.max(1);
            let prefixes: Vec<(String, usize)> = (0..groups)
                .map(|_| src.text(&mut text_rng, args.shared_prefix_len))
                .collect::<Result<_, _>>()?;
            for i in 0..count {
                let (system, plen) = prefixes[i % groups].clone();
                let n = jitter(&mut rng, args.random_input_len, ratio);
                let (prompt, slen) = src.text(&mut text_rng, n)?;
                let output_len = jitter(&mut rng, args.random_output_len, ratio);
                out.push(RequestSpec {
                    system: Some(system),
                    prompt,
                    input_len: plen + slen,
                    output_len,
                    kind: "shared-prefix",
                    turn: None,
                });
            }
        }
        DatasetName::LongPrompt => {
            for _ in 0..count {
                let n = rng.random_range(2000..=8000);
                let (prompt, input_len) = src.text(&mut text_rng, n)?;
                out.push(RequestSpec {
                    system: None,
                    prompt,
                    input_len,
                    output_len: 128,
                    kind: "long-prompt",
                    turn: None,
                });
            }
        }
        DatasetName::DecodeHeavy => {
            for _ in 0..count {
                let (prompt, input_len) = src.text(&mut text_rng, 128)?;
                out.push(RequestSpec {
                    system: None,
                    prompt,
                    input_len,
                    output_len: 1024,
                    kind: "decode-heavy",
                    turn: None,
                });
            }
        }
        DatasetName::Mixed => {
            for _ in 0..count {
                if rng.random_bool(args.mixed_long_fraction.clamp(0.0, 1.0)) {
                    let n = jitter(&mut rng, args.mixed_long_len, 0.1);
                    let (prompt, input_len) = src.text(&mut text_rng, n)?;
                    out.push(RequestSpec {
                        system: None,
                        prompt,
                        input_len,
                        output_len: 64,
                        kind: "long",
                        turn: None,
                    });
                } else {
                    let n = rng.random_range(32..=256);
                    let (prompt, input_len) = src.text(&mut text_rng, n)?;
                    let output_len = jitter(&mut rng, args.random_output_len, ratio);
                    out.push(RequestSpec {
                        system: None,
                        prompt,
                        input_len,
                        output_len,
                        kind: "chat",
                        turn: None,
                    });
                }
            }
        }
        DatasetName::MultiTurn => {
            let turns = args.num_turns.max(1);
            let groups = args.num_prefix_groups.max(1);
            let prefixes: Vec<(String, usize)> = (0..groups)
                .map(|_| src.text(&mut text_rng, args.shared_prefix_len))
                .collect::<Result<_, _>>()?;
            let conversations = count.div_ceil(turns);
            for c in 0..conversations {
                // The history as one prompt: what a chat template renders, turn after turn.
                let (mut history, mut len) = prefixes[c % groups].clone();
                if args.conversation_prefix_len > 0 {
                    let (own, olen) = src.text(&mut text_rng, args.conversation_prefix_len)?;
                    history.push('\n');
                    history.push_str(&own);
                    len += olen + 1;
                }
                for t in 0..turns.min(count - c * turns) {
                    let n = jitter(&mut rng, args.random_input_len, ratio);
                    let (user, ulen) = src.text(&mut text_rng, n)?;
                    history.push_str("\nUser: ");
                    history.push_str(&user);
                    history.push_str("\nAssistant:");
                    len += ulen + 4;
                    let output_len = jitter(&mut rng, args.random_output_len, ratio);
                    out.push(RequestSpec {
                        system: None,
                        prompt: history.clone(),
                        input_len: len,
                        output_len,
                        kind: "multi-turn",
                        turn: Some((c, t)),
                    });
                    // The assistant's answer joins the history (text of its length: the
                    // next turn's prompt extends this one's, as a chat's does).
                    let (answer, alen) = src.text(&mut text_rng, output_len)?;
                    history.push(' ');
                    history.push_str(&answer);
                    len += alen;
                }
            }
        }
        DatasetName::File => {
            let path = args
                .dataset_path
                .as_ref()
                .context("--dataset-name file needs --dataset-path")?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.is_empty() {
                bail!("{} has no requests", path.display());
            }
            for i in 0..count {
                let line = lines[i % lines.len()];
                let (prompt, output_len) = match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(v) if v.is_object() => (
                        v["prompt"]
                            .as_str()
                            .context("each JSONL line needs a \"prompt\" string")?
                            .to_string(),
                        v["output_len"]
                            .as_u64()
                            .map(|n| n as usize)
                            .unwrap_or(args.random_output_len),
                    ),
                    _ => (line.to_string(), args.random_output_len),
                };
                let input_len = src.tokenizer().encode(&prompt, false)?.len();
                out.push(RequestSpec {
                    system: None,
                    prompt,
                    input_len,
                    output_len,
                    kind: "file",
                    turn: None,
                });
            }
        }
    }
    Ok(out)
}

/// What an unbounded prefix cache would have served of the run's prompts: each prompt, in the
/// order the requests were sent, gets the longest run of its leading 16-token blocks (short of
/// its last token, which is always computed) that any earlier prompt had — the ideal a
/// server's `cached_tokens` is measured against. Prompts as the client tokenized them.
pub fn ideal_cached_tokens(
    specs: &[RequestSpec],
    sent_order: &[usize],
    tok: &Tokenizer,
) -> anyhow::Result<usize> {
    const BLOCK: usize = 16;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for &i in sent_order {
        let s = &specs[i];
        let mut ids = Vec::new();
        if let Some(sys) = &s.system {
            ids.extend(tok.encode(sys, false)?);
        }
        ids.extend(tok.encode(&s.prompt, false)?);
        let usable = ids.len().saturating_sub(1) / BLOCK;
        let mut h = 0u64;
        let mut hit = true;
        for b in 0..usable {
            let bytes: Vec<u8> = ids[b * BLOCK..(b + 1) * BLOCK]
                .iter()
                .flat_map(|t| t.to_le_bytes())
                .collect();
            h = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, h);
            if hit && seen.contains(&h) {
                total += BLOCK;
            } else {
                hit = false;
            }
            seen.insert(h);
        }
    }
    Ok(total)
}
