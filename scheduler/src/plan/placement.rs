//! Where one request's prompt is prefilled, decided from the cost model and the SLO: on its
//! decode worker (chunks mixed into the running batch's steps, as a colocated server does) or
//! on a prefill worker (its own pass, the KV shipped over). Each option's time to first token
//! and its effect on the running batch's time per output token are predicted, and the option
//! that makes fewer requests miss the SLO wins, then the one with the earlier first token; on
//! cores shared with the prefill worker, a prompt goes out only where that spares running
//! streams a miss (see [`decide`]).
//!
//! This replaces fixed thresholds (a minimum prompt length, a maximum prefill queue): a short
//! prompt stays local because its chunk fits in one step; a long one moves out when its chunks
//! would slow every running stream past the TPOT bound; a busy prefill worker loses to an idle
//! decode worker; on one host, where both workers share the cores, the decode worker's paced
//! steps carry only the prompt chunks that keep them within their period and the streams'
//! credit against it (beside a prefill pass, half of what the decode tokens leave of it, the
//! rest the prefill worker's; see `protocol::cores`), so there a prompt rarely goes out.

use super::cost::{CostModel, Work};
use protocol::cores::{Pace, STEP_SHARE};

/// The latency bounds a request should meet (seconds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slo {
    pub ttft_s: f64,
    pub tpot_s: f64,
}

/// A decode worker as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeView {
    pub threads: usize,
    /// Sequences decoding now.
    pub running: usize,
    /// Positions they hold between them.
    pub context: usize,
    /// Prompt tokens it still has to prefill itself (requests placed there before this one).
    pub backlog: usize,
    /// Its step budget (decode tokens first, prefill chunks fill the rest).
    pub max_batch_tokens: usize,
    /// Output tokens a stream makes, about (the new request's `max_tokens` stands in for the
    /// running ones'): what a slower stretch of steps is averaged over (see `slack_tokens`).
    pub horizon: usize,
    /// When it shares the cores with a prefill worker: the step period it paces to while that
    /// worker computes (`protocol::cores`); `None`: the workers have cores of their own.
    pub pace_s: Option<f64>,
}

/// A prefill worker as the decision sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillView {
    pub threads: usize,
    /// Prompt tokens queued or computing on it.
    pub backlog: usize,
    /// The KV goes over TCP (another host) rather than into shared memory.
    pub tcp: bool,
}

/// One option's predicted effect.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub ttft_s: f64,
    /// The running streams' mean time per output token while this prefill happens.
    pub tpot_s: f64,
    /// Requests predicted to miss the SLO: this one (late first token) and the running ones
    /// (slowed past the TPOT bound).
    pub misses: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Chunked into the decode worker's steps.
    Decode,
    /// On the prefill worker.
    Prefill,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub place: Place,
    pub decode: Outcome,
    pub prefill: Option<Outcome>,
}

/// Where a prompt of `prompt` tokens, `cached` of them already in the decode worker's cache,
/// is prefilled. `prefill`: the best prefill worker that could take it, if any.
pub fn decide(
    cost: &CostModel,
    slo: Slo,
    prompt: usize,
    cached: usize,
    d: &DecodeView,
    prefill: Option<&PrefillView>,
) -> Decision {
    let pass = prefill.and_then(|p| pass_beside(cost, prompt, cached, d, p));
    let local = on_decode(cost, slo, prompt, cached, d, pass);
    let remote = prefill.map(|p| on_prefill(cost, slo, prompt, cached, d, p));
    // Sharing the cores, a pass adds no compute: it runs ahead of the decode worker's own
    // queued prompts (their chunks shrink to a share of each period) and, preempted every
    // period by the paced steps and every other process's threads, slower than its profile.
    // What it buys is the running streams' pace, so it goes out only to spare streams a
    // miss; a first token it would bring forward is taken from the local queue's. With cores
    // of its own, fewer misses decide, then the earlier first token.
    let place = match remote {
        Some(r) if d.pace_s.is_some() => {
            let late = |o: &Outcome| o.misses - usize::from(o.ttft_s > slo.ttft_s);
            if r.misses < local.misses && late(&r) < late(&local) {
                Place::Prefill
            } else {
                Place::Decode
            }
        }
        Some(r) if r.misses < local.misses => Place::Prefill,
        Some(r) if r.misses == local.misses && r.ttft_s < local.ttft_s => Place::Prefill,
        _ => Place::Decode,
    };
    Decision {
        place,
        decode: local,
        prefill: remote,
    }
}

/// The running batch's step alone.
fn base_step(cost: &CostModel, d: &DecodeView) -> f64 {
    if d.running == 0 {
        return 0.0;
    }
    cost.forward(d.threads)
        .seconds(Work::decode(d.running, d.context))
}

/// Mean TPOT of a running stream that sees `slow` steps of `step` seconds among `horizon`
/// tokens, its other steps taking `base`.
fn mean_tpot(base: f64, step: f64, slow: f64, horizon: usize) -> f64 {
    let h = (horizon.max(1) as f64).max(slow);
    base + (step - base) * slow / h
}

/// The output tokens over which one prompt's slow steps are averaged into a running stream's
/// TPOT: a quarter of its output. A stream has about half of it left, and it shares that slack
/// with the other prompts placed while it runs. Averaged over the whole output, each prompt
/// looked harmless alone while a run of them pushed streams past the bound; the replay
/// (`super::simulate`, §5's mix at 2–3 req/s, TPOT ≤ 25 ms) kept it within at a quarter, and
/// under heavy decode load (250 → 128 tokens, 7–9 req/s) nothing changed.
fn slack_tokens(d: &DecodeView) -> usize {
    d.horizon.div_ceil(4)
}

fn misses(slo: Slo, ttft: f64, tpot: f64, running: usize) -> usize {
    usize::from(ttft > slo.ttft_s) + if tpot > slo.tpot_s { running } else { 0 }
}

/// The decode worker prefilling `todo` tokens (pairs per token `pairs`) in chunks beside its
/// batch: how many steps, each one's time, and the time of them all. Sharing the cores, with
/// streams running and no pass, its steps hold to the period (the credit the streams may have
/// saved against it is not counted) where that makes fewer requests miss than whole steps
/// (`protocol::cores::holds`, for streams halfway through their output): full chunks shrink to
/// what the period leaves beside the decode tokens.
fn chunked(cost: &CostModel, slo: Slo, d: &DecodeView, todo: usize, pairs: f64) -> (f64, f64, f64) {
    let f = cost.forward(d.threads);
    let decode = Work::decode(d.running, d.context);
    let full = d.max_batch_tokens.saturating_sub(d.running).max(1);
    let chunk = match d.pace_s {
        Some(period) if d.running > 0 => {
            let base = f.seconds(decode);
            let held = f.chunk_within(pairs, period - base);
            // The queue: what was placed before, then this prompt; the streams halfway
            // through their output, at decode-only steps so far.
            let queue = [
                (d.backlog as f64, 0.0),
                (todo.saturating_sub(d.backlog) as f64, 0.0),
            ];
            let h = d.horizon.max(2);
            let (made, since) = (h / 2, (h / 2) as f64 * base);
            let credit = protocol::cores::stream_credit(period, since, made, h - made, h, base);
            let whole = f.seconds(decode + Work::prefill(0, full));
            let streams = protocol::cores::overrun(&vec![credit; d.running], whole, period);
            let at_held = Pace {
                work: held as f64,
                step_s: period,
            };
            let at_whole = Pace {
                work: full as f64,
                step_s: whole,
            };
            if protocol::cores::holds(streams, &queue, at_held, at_whole, slo.ttft_s) {
                full.min(held)
            } else {
                full
            }
        }
        _ => full,
    };
    let steps = todo.div_ceil(chunk).max(1) as f64;
    let all = Work {
        tokens: decode.tokens * steps + todo as f64,
        prefill_pairs: pairs * todo as f64,
        decode_pairs: decode.decode_pairs * steps,
    };
    // Linear in the work: `steps` calls cost `steps` fixed costs plus the summed work.
    let total = f.seconds(all) + f.fixed_s * (steps - 1.0);
    let step = f.seconds(Work {
        tokens: decode.tokens + chunk.min(todo) as f64,
        prefill_pairs: pairs * chunk.min(todo) as f64,
        decode_pairs: decode.decode_pairs,
    });
    (steps, step, total)
}

/// Attention pairs per computed token of this prompt (the chunks before it, other prompts
/// already placed there, are taken to be about as long).
fn pairs_per_token(prompt: usize, cached: usize) -> f64 {
    Work::prefill(cached, prompt).prefill_pairs / prompt.saturating_sub(cached).max(1) as f64
}

/// A prefill pass running beside a paced decode worker (both on the same cores): how long it
/// goes on, and the period the decode steps pace to meanwhile.
#[derive(Debug, Clone, Copy)]
struct Pass {
    left_s: f64,
    period_s: f64,
}

/// The share of the cores a paced decode worker leaves its prefill neighbour while a pass runs:
/// the rest of each period after its decode step and, with prompts of its own to prefill,
/// their chunks (`STEP_SHARE` of what the decode step leaves).
fn prefill_share(base: f64, period: f64, own_prompts: bool) -> f64 {
    let left = 1.0 - base / period.max(base);
    let own = if own_prompts { STEP_SHARE } else { 0.0 };
    (left * (1.0 - own)).max(MIN_SHARE)
}

/// The prompt-chunk tokens each of the decode worker's paced steps carries beside a pass.
fn paced_chunk(cost: &CostModel, d: &DecodeView, pairs: f64, period: f64) -> usize {
    let decode = Work::decode(d.running, d.context);
    cost.forward(d.threads).paced_chunk(decode, pairs, period)
}

/// How long prefill work of `pass` seconds (at full speed) takes beside a decode worker pacing
/// to `period`: while the decode worker's own queued prompts move in paced chunks, at the share
/// they leave; after them, at the whole rest of each period.
fn beside_paced(cost: &CostModel, d: &DecodeView, pairs: f64, pass: f64, period: f64) -> f64 {
    let base = base_step(cost, d);
    let full = prefill_share(base, period, false);
    if d.backlog == 0 {
        return pass / full;
    }
    let half = prefill_share(base, period, true);
    let k = paced_chunk(cost, d, pairs, period);
    let own = d.backlog.div_ceil(k) as f64 * period.max(base);
    if pass <= own * half {
        pass / half
    } else {
        own + (pass - own * half) / full
    }
}

fn pass_beside(
    cost: &CostModel,
    prompt: usize,
    cached: usize,
    d: &DecodeView,
    p: &PrefillView,
) -> Option<Pass> {
    let period_s = d.pace_s?;
    if p.backlog == 0 {
        return None;
    }
    let pairs = pairs_per_token(prompt, cached);
    let mut work = Work::prefill(0, 0);
    work.tokens = p.backlog as f64;
    work.prefill_pairs = pairs * p.backlog as f64;
    let pass = cost.forward(p.threads).seconds(work);
    Some(Pass {
        left_s: beside_paced(cost, d, pairs, pass, period_s),
        period_s,
    })
}

fn on_decode(
    cost: &CostModel,
    slo: Slo,
    prompt: usize,
    cached: usize,
    d: &DecodeView,
    pass: Option<Pass>,
) -> Outcome {
    let todo = d.backlog + prompt.saturating_sub(cached);
    let pairs = pairs_per_token(prompt, cached);
    // Beside a pass, the steps carry only the chunks that fit their share of the period.
    let (paced_steps, paced_s, todo) = match pass {
        Some(p) => {
            let k = paced_chunk(cost, d, pairs, p.period_s);
            let steps = ((p.left_s / p.period_s).floor()).min(todo.div_ceil(k) as f64);
            let done = (steps as usize * k).min(todo);
            (steps, steps * p.period_s, todo - done)
        }
        None => (0.0, 0.0, todo),
    };
    let (steps, step, rest) = if todo > 0 || paced_steps == 0.0 {
        chunked(cost, slo, d, todo, pairs)
    } else {
        (0.0, 0.0, 0.0)
    };
    let ttft = paced_s + rest;
    let tpot = if d.running == 0 {
        0.0
    } else {
        let base = base_step(cost, d);
        let paced = pass.map_or(base, |p| p.period_s.max(base));
        let slack = slack_tokens(d);
        mean_tpot(base, paced, paced_steps, slack) + mean_tpot(base, step, steps, slack) - base
    };
    Outcome {
        ttft_s: ttft,
        tpot_s: tpot,
        misses: misses(slo, ttft, tpot, d.running),
    }
}

/// The least share of the cores a paced decode worker leaves its prefill neighbour.
const MIN_SHARE: f64 = 0.05;

fn on_prefill(
    cost: &CostModel,
    slo: Slo,
    prompt: usize,
    cached: usize,
    d: &DecodeView,
    p: &PrefillView,
) -> Outcome {
    let f = cost.forward(p.threads);
    let new = prompt.saturating_sub(cached);
    let mut work = Work::prefill(cached, prompt);
    work.tokens += p.backlog as f64;
    let pass = f.seconds(work);
    let base = base_step(cost, d);
    let left = slack_tokens(d);
    let pairs = pairs_per_token(prompt, cached);
    let (wall, tpot) = match d.pace_s {
        // Sharing the cores: while it computes, the decode worker runs each step — its decode
        // tokens and the chunks of its own prompts that fit its share of the period — and then
        // idles to the end of the period; prefill gets the rest. The streams meet the period
        // meanwhile, the decode worker's own prompts included.
        Some(period) if d.running > 0 || d.backlog > 0 => {
            let wall = beside_paced(cost, d, pairs, pass, period);
            let paced = period.max(base);
            let slow = (wall / paced).max(1.0);
            let tpot = mean_tpot(base, paced, slow, left);
            // The decode worker's own queue moves a paced chunk a period meanwhile; what is left
            // of it after the pass is chunked into full steps, which slow the streams whichever
            // way this prompt goes (the local option counts them too).
            let after = d
                .backlog
                .saturating_sub(slow.floor() as usize * paced_chunk(cost, d, pairs, period));
            let tpot = if after > 0 && d.running > 0 {
                let (steps, step, _) = chunked(cost, slo, d, after, pairs);
                tpot + mean_tpot(base, step, steps, left) - base
            } else {
                tpot
            };
            (wall, tpot)
        }
        // Cores of its own: the decode worker's own queued prompts, chunked into its steps,
        // slow its streams wherever this one goes.
        _ if d.backlog > 0 => {
            let (steps, step, _) = chunked(cost, slo, d, d.backlog, pairs);
            (pass, mean_tpot(base, step, steps, left))
        }
        _ => (pass, base),
    };
    let link = cost.link.calls_s + if p.tcp { cost.tcp_seconds(new) } else { 0.0 };
    let ttft = wall + link;
    Outcome {
        ttft_s: ttft,
        tpot_s: tpot,
        misses: misses(slo, ttft, tpot, d.running),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::cost::tests::model;

    const CHAT: Slo = Slo {
        ttft_s: 1.0,
        tpot_s: 0.1,
    };
    const TIGHT_TPOT: Slo = Slo {
        ttft_s: 3.0,
        tpot_s: 0.025,
    };

    fn decode(running: usize, context: usize, backlog: usize, pace_s: Option<f64>) -> DecodeView {
        DecodeView {
            threads: 2,
            running,
            context,
            backlog,
            max_batch_tokens: 256,
            horizon: 64,
            pace_s,
        }
    }

    const IDLE_PREFILL: PrefillView = PrefillView {
        threads: 2,
        backlog: 0,
        tcp: false,
    };

    #[test]
    fn without_a_prefill_worker_the_decode_worker_prefills() {
        let m = model();
        let d = decide(&m, CHAT, 500, 0, &decode(4, 1000, 0, None), None);
        assert_eq!(d.place, Place::Decode);
        assert!(d.prefill.is_none());
    }

    #[test]
    fn a_short_prompt_stays_on_its_decode_worker() {
        // One chunk, inside one step: moving it only adds the calls.
        let m = model();
        let d = decide(
            &m,
            CHAT,
            40,
            0,
            &decode(8, 2000, 0, Some(0.08)),
            Some(&IDLE_PREFILL),
        );
        assert_eq!(d.place, Place::Decode, "{d:?}");
        assert_eq!(d.decode.misses, 0);
        // On an idle decode worker too.
        let d = decide(&m, CHAT, 40, 0, &decode(0, 0, 0, None), Some(&IDLE_PREFILL));
        assert_eq!(d.place, Place::Decode, "{d:?}");
    }

    #[test]
    fn a_long_prompt_moves_out_when_its_chunks_would_break_the_tpot_bound() {
        let m = model();
        let busy = decode(8, 2000, 0, None);
        let d = decide(&m, TIGHT_TPOT, 1000, 0, &busy, Some(&IDLE_PREFILL));
        assert!(d.decode.tpot_s > TIGHT_TPOT.tpot_s, "{d:?}");
        assert_eq!(d.decode.misses, 8);
        assert_eq!(d.place, Place::Prefill, "{d:?}");
        let p = d.prefill.unwrap();
        assert!(
            p.tpot_s <= TIGHT_TPOT.tpot_s && p.ttft_s <= TIGHT_TPOT.ttft_s,
            "{p:?}"
        );
        // Sharing the cores, the decode worker's own steps hold to the pace (its chunks shrink
        // to what the period leaves beside the decode tokens): the prompt stays, in time, and
        // no stream misses.
        let paced = decode(8, 2000, 0, Some(0.02));
        let d = decide(&m, TIGHT_TPOT, 1000, 0, &paced, Some(&IDLE_PREFILL));
        assert_eq!(d.decode.misses, 0, "{d:?}");
        assert!(d.decode.tpot_s <= 0.02 + 1e-12, "{d:?}");
        assert!(d.decode.ttft_s <= TIGHT_TPOT.ttft_s, "{d:?}");
        assert_eq!(d.place, Place::Decode, "{d:?}");
        // It takes longer than the chunks of a worker with cores of its own, which take
        // whole steps.
        let own = decide(&m, TIGHT_TPOT, 1000, 0, &busy, None);
        assert!(d.decode.ttft_s > own.decode.ttft_s, "{d:?} {own:?}");
    }

    #[test]
    fn a_prompts_slow_steps_count_against_a_quarter_of_a_streams_output() {
        let m = model();
        let queued = PrefillView {
            backlog: 500,
            ..IDLE_PREFILL
        };
        let d = decide(
            &m,
            TIGHT_TPOT,
            1000,
            0,
            &decode(1, 500, 0, None),
            Some(&queued),
        );
        let local = d.decode;
        // Spread over the whole output, the four chunk steps would pass (and the local first
        // token comes sooner): that let runs of such prompts break the bound together.
        let (steps, step, _) = chunked(&m, CHAT, &decode(1, 500, 0, None), 1000, 500.5);
        let base = base_step(&m, &decode(1, 500, 0, None));
        assert!(mean_tpot(base, step, steps, 64) < TIGHT_TPOT.tpot_s);
        assert!(local.ttft_s < d.prefill.unwrap().ttft_s, "{d:?}");
        assert!(
            local.tpot_s > TIGHT_TPOT.tpot_s && local.misses == 1,
            "{d:?}"
        );
        assert_eq!(d.place, Place::Prefill, "{d:?}");
    }

    #[test]
    fn a_busy_prefill_worker_loses_to_the_decode_worker() {
        let m = model();
        let queued = PrefillView {
            backlog: 8000,
            ..IDLE_PREFILL
        };
        let d = decide(
            &m,
            CHAT,
            250,
            0,
            &decode(16, 4000, 0, Some(0.08)),
            Some(&queued),
        );
        assert!(d.prefill.unwrap().ttft_s > CHAT.ttft_s);
        assert_eq!(d.place, Place::Decode, "{d:?}");
        // And a queue of local prompts sends the next one out, to cores of its own.
        let d = decide(
            &m,
            CHAT,
            250,
            0,
            &decode(16, 4000, 3000, None),
            Some(&IDLE_PREFILL),
        );
        assert!(d.decode.ttft_s > d.prefill.unwrap().ttft_s, "{d:?}");
        assert_eq!(d.place, Place::Prefill, "{d:?}");
        // Sharing the cores, the queue's chunks fill only their share of each paced step and
        // the prefill worker keeps the rest of the period, so the pass would be in time, and
        // its chunks slow the streams past the bound; the local queue is too long for its
        // prompts' first tokens in time whether its steps run whole or held, so they hold to
        // the pace and keep the streams within it, and a first token alone does not send the
        // prompt out.
        let shared = decide(
            &m,
            CHAT,
            250,
            0,
            &decode(16, 4000, 3000, Some(0.08)),
            Some(&IDLE_PREFILL),
        );
        let p = shared.prefill.unwrap();
        let alone = m.forward(2).seconds(Work::prefill(0, 250));
        let base = m.forward(2).seconds(Work::decode(16, 4000));
        let share = (1.0 - base / 0.08) * (1.0 - STEP_SHARE);
        assert!(
            (p.ttft_s - alone / share - m.link.calls_s).abs() < 1e-9,
            "{p:?}"
        );
        assert!(
            p.ttft_s < CHAT.ttft_s && shared.decode.ttft_s > CHAT.ttft_s,
            "{shared:?}"
        );
        assert!(
            p.tpot_s > CHAT.tpot_s && shared.decode.tpot_s <= CHAT.tpot_s,
            "{shared:?}"
        );
        assert_eq!(shared.place, Place::Decode, "{shared:?}");
        // Where both options miss alike, sharing keeps the prompt: a pass would take the cores
        // from the decode worker's own queue, a cost this request's prediction does not see.
        // With cores of its own, the earlier first token goes out.
        let tie = decide(
            &m,
            CHAT,
            40,
            0,
            &decode(4, 500, 0, Some(0.08)),
            Some(&IDLE_PREFILL),
        );
        assert_eq!(tie.decode.misses, tie.prefill.unwrap().misses);
        assert_eq!(tie.place, Place::Decode, "{tie:?}");
    }

    #[test]
    fn sharing_the_cores_a_prompt_does_not_jump_the_local_queue_for_its_first_token_alone() {
        // A burst: the decode worker's queue makes this prompt's first token late, and a pass
        // beside it would be in time — but on the same cores the pass only runs ahead of the
        // queued prompts. With no stream to spare, the prompt waits its turn.
        let m = model();
        let burst = decode(0, 0, 3000, Some(0.09));
        let d = decide(&m, CHAT, 250, 0, &burst, Some(&IDLE_PREFILL));
        let p = d.prefill.unwrap();
        assert!(
            d.decode.ttft_s > CHAT.ttft_s && p.ttft_s < CHAT.ttft_s,
            "{d:?}"
        );
        assert_eq!((d.decode.misses, p.misses), (1, 0));
        assert_eq!(d.place, Place::Decode, "{d:?}");
        // With cores of its own the pass adds compute, and the prompt goes out.
        let own = decide(
            &m,
            CHAT,
            250,
            0,
            &decode(0, 0, 3000, None),
            Some(&IDLE_PREFILL),
        );
        assert_eq!(own.place, Place::Prefill, "{own:?}");
    }

    #[test]
    fn beside_a_pass_the_decode_workers_own_prompts_move_a_paced_chunk_a_period() {
        let m = model();
        let d = decode(8, 2000, 0, Some(0.08));
        let pass = PrefillView {
            backlog: 4000,
            ..IDLE_PREFILL
        };
        let paced = decide(&m, CHAT, 200, 0, &d, Some(&pass)).decode;
        let free = decide(&m, CHAT, 200, 0, &d, Some(&IDLE_PREFILL)).decode;
        // The chunks that fit half of what 8 decode tokens leave of each 80 ms period, one
        // step a period, all within the pass.
        let k = m.forward(2).paced_chunk(Work::decode(8, 2000), 100.5, 0.08);
        assert!((protocol::cores::MIN_CHUNK..200).contains(&k), "{k}");
        let want = 200usize.div_ceil(k) as f64 * 0.08;
        assert!((paced.ttft_s - want).abs() < 1e-9, "{paced:?} {want}");
        assert!(paced.ttft_s > free.ttft_s, "{paced:?} {free:?}");
        // The streams run at the period meanwhile.
        assert!(
            paced.tpot_s > free.tpot_s && paced.tpot_s <= 0.08 + 1e-12,
            "{paced:?}"
        );
        // Without pacing (cores of their own) a busy prefill worker changes nothing locally.
        let own = decode(8, 2000, 0, None);
        let a = decide(&m, CHAT, 200, 0, &own, Some(&pass)).decode;
        let b = decide(&m, CHAT, 200, 0, &own, Some(&IDLE_PREFILL)).decode;
        assert_eq!(a, b);
    }

    #[test]
    fn cached_tokens_are_not_computed_again() {
        let m = model();
        let cold = decide(&m, CHAT, 1000, 0, &decode(0, 0, 0, None), None);
        let warm = decide(&m, CHAT, 1000, 960, &decode(0, 0, 0, None), None);
        assert!(
            warm.decode.ttft_s < cold.decode.ttft_s / 5.0,
            "{warm:?} {cold:?}"
        );
    }

    #[test]
    fn sharing_cores_slows_the_remote_prefill_by_what_the_paced_steps_take() {
        let m = model();
        let own = decide(
            &m,
            CHAT,
            800,
            0,
            &decode(8, 2000, 0, None),
            Some(&IDLE_PREFILL),
        );
        let shared = decide(
            &m,
            CHAT,
            800,
            0,
            &decode(8, 2000, 0, Some(0.02)),
            Some(&IDLE_PREFILL),
        );
        let (o, s) = (own.prefill.unwrap(), shared.prefill.unwrap());
        assert!(s.ttft_s > o.ttft_s);
        // The batch is paced to the period while the prefill runs, never slower.
        assert!(s.tpot_s > o.tpot_s && s.tpot_s <= 0.02 + 1e-12, "{s:?}");
        // TCP adds the bytes' time.
        let tcp = PrefillView {
            tcp: true,
            ..IDLE_PREFILL
        };
        let t = decide(&m, CHAT, 800, 0, &decode(8, 2000, 0, None), Some(&tcp));
        let dt = t.prefill.unwrap().ttft_s - o.ttft_s;
        assert!((dt - m.tcp_seconds(800)).abs() < 1e-9);
    }
}
