//! The pacer's rules against hand-worked cases, and the arbiter across mappings.

use super::*;

#[test]
fn a_pass_in_progress_is_seen_by_another_mapping_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cores");
    let prefill = CoreArbiter::open(&p).unwrap();
    let decode = CoreArbiter::open(&p).unwrap();
    assert!(!decode.prefill_active());
    let mut pacer = Pacer::new(
        CoreArbiter::open(&p).unwrap(),
        Duration::from_millis(50),
        Duration::from_secs(1),
    );
    let step = StepWork {
        decode: 3.0,
        whole: 3.0,
        full: 256.0,
    };
    assert_eq!(pacer.step_work(step, &[], &[]), f64::INFINITY);
    assert_eq!(
        pacer.rest(1, 0.0, std::time::Instant::now()),
        Duration::ZERO
    );
    {
        let _a = prefill.computing();
        let _b = prefill.computing();
        assert!(decode.prefill_active());
        let rest = pacer.rest(1, 0.0, std::time::Instant::now());
        assert!(rest > Duration::from_millis(40) && rest <= Duration::from_millis(50));
        // A step that took its whole period leaves nothing.
        let long_ago = std::time::Instant::now() - Duration::from_millis(60);
        assert_eq!(pacer.rest(1, 0.0, long_ago), Duration::ZERO);
        assert!(pacer.step_work(step, &[], &[]) < 256.0);
    }
    assert!(!decode.prefill_active());
}

#[test]
fn a_streams_credit_is_what_it_saved_against_the_period_and_a_little_lent() {
    // 10 tokens after the first in 100 ms against a 20 ms period saved 100 ms.
    let saved = stream_credit(0.02, 0.1, 10, 0, 64, 0.005);
    assert!((saved - 0.1).abs() < 1e-12, "{saved}");
    // A fresh stream borrows against the tokens ahead that keep the overrun within the
    // margin over its output: 0.1 × 20 ms × 63 / 15 ms = 8.4, so 8 tokens of 15 ms.
    let fresh = stream_credit(0.02, 0.0, 0, 63, 64, 0.005);
    assert!((fresh - 8.0 * 0.015).abs() < 1e-12, "{fresh}");
    // A stream behind the pace has none.
    assert!(stream_credit(0.02, 0.5, 10, 50, 64, 0.005) < 0.0);
}

#[test]
fn a_step_holds_to_the_pace_where_that_makes_fewer_requests_miss() {
    // A 20 ms period leaves 10 chunk tokens; prompts have 1 s for their first token, so
    // 500 tokens drain in time; a whole step takes 150 ms and carries 250 prompt tokens.
    let (per, whole, period, hold) = (10.0, 0.15, 0.02, 1.0);
    let held = Pace {
        work: per,
        step_s: period,
    };
    let full = Pace {
        work: 250.0,
        step_s: whole,
    };
    let poor = [0.01; 6]; // credits a whole step would overrun
    let h = |credits: &[f64], queued: &[(f64, f64)]| {
        holds(overrun(credits, whole, period), queued, held, full, hold)
    };
    let fresh = |n| vec![(200.0, 0.0); n];
    // A chat turn queued: holding keeps it in time and six streams within the bound.
    assert!(h(&poor, &fresh(1)));
    // A burst of prompts that cannot all drain in time: holding would make five miss
    // their first token (the first two of seven are in time), against six streams.
    assert!(h(&poor, &fresh(7)));
    assert!(!h(&poor[..4], &fresh(7)));
    // Streams with credit enough for a whole step lose nothing to it, and streams behind
    // their pace are lost either way.
    assert!(!h(&[0.2; 6], &fresh(7)));
    assert!(!h(&[-0.01; 6], &fresh(7)));
    // A stream a held step left a little short of nothing (the fit's error) is on pace.
    assert!(h(&[-0.001; 6], &fresh(7)));
    // Prompts that waited past the bound already are lost either way.
    assert!(h(&poor[..1], &[(200.0, 1.5); 7]));
    // A tie holds.
    assert!(h(&[0.01; 5], &fresh(7)));
    // A burst that whole steps would not bring in time either (ten prompts of 500
    // tokens: whole steps make seven of them miss, held ones nine): holding costs two
    // prompts, so it spares two streams their bound, but not one.
    let long = vec![(500.0, 0.0); 10];
    assert_eq!(full.late(&long, hold), 7);
    assert_eq!(held.late(&long, hold), 9);
    assert!(h(&poor[..2], &long));
    assert!(!h(&poor[..1], &long));
    assert_eq!(overrun(&[0.2, -0.3], whole, period), 0);
}

#[test]
fn prompts_expected_to_come_count_against_holding_where_held_steps_fall_behind_them() {
    // Five prompts of 250 tokens a second for the last few seconds.
    let mut a = ArrivalRate::default();
    assert_eq!(a.ahead(0.0, 1.0).count(), 0);
    for k in 0..40 {
        a.observe(k as f64 * 0.2, (240 + 20 * (k % 2)) as f64);
    }
    let rate = a.rate(7.8);
    assert!((4.5..5.5).contains(&rate), "{rate}");
    let ahead: Vec<_> = a.ahead(7.8, 1.0).collect();
    assert_eq!(ahead.len(), 5);
    assert!(ahead.iter().all(|&(t, _)| (t - 250.0).abs() < 1.0));
    assert!(ahead.windows(2).all(|w| w[1].1 < w[0].1 && w[0].1 < 0.0));
    // A held step carries at least the ~1,250 tokens a second that come: 113 a 90 ms
    // period.
    let k = a.per_period(7.8, 0.09);
    assert!((110.0..=125.0).contains(&k), "{k}");
    // The rate fades once prompts stop coming.
    assert!(a.rate(17.8) < 0.05 * rate);
    // A 90 ms period that leaves 67 chunk tokens (~740 a second) beside the streams: one
    // queued prompt drains in time, so the held step spares two streams …
    let (whole, period, hold) = (0.18, 0.09, 1.0);
    let held = Pace {
        work: 67.0,
        step_s: period,
    };
    let full = Pace {
        work: 254.0,
        step_s: whole,
    };
    let poor = [0.01, 0.02];
    assert!(holds(
        overrun(&poor, whole, period),
        &[(250.0, 0.0)],
        held,
        full,
        hold
    ));
    // … but with the prompts that come behind it (two seconds of them), held steps make
    // more of them miss.
    let mut queue = vec![(250.0, 0.0)];
    queue.extend(a.ahead(7.8, ArrivalRate::horizon(hold)));
    assert_eq!(full.late(&queue, hold), 0);
    assert!(!holds(
        overrun(&poor, whole, period),
        &queue,
        held,
        full,
        hold
    ));
}

#[test]
fn steps_that_spend_every_credit_keep_a_streams_mean_within_the_margin() {
    // However a queue spends the credit (each step the period plus all of it, or a
    // decode-only step at `base`), the stream's mean time per token after its first stays
    // within the period and the margin lent.
    let mut next = rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..500 {
        let period = 0.005 + 0.2 * next();
        let base = period * (0.05 + 0.9 * next());
        let outputs = 2 + (next() * 300.0) as usize;
        let mut since = 0.0;
        for made in 1..outputs {
            let credit = stream_credit(period, since, made - 1, outputs - made, outputs, base);
            since += if next() < 0.7 {
                (period + credit).max(base)
            } else {
                base
            };
        }
        let mean = since / (outputs - 1) as f64;
        assert!(
            mean <= period * (1.0 + AHEAD_MARGIN) + 1e-12,
            "{mean} {period} {base} {outputs}"
        );
    }
}

#[test]
fn a_paced_step_carries_the_work_that_fits_its_share_of_the_period() {
    // Steps cost 2 ms + 0.1 ms a token.
    let mut f = StepFit::default();
    assert_eq!(f.paced_work(4.0, 0.01), None);
    for t in [1.0, 8.0, 40.0, 3.0, 200.0, 17.0, 64.0] {
        f.observe(t, 0.0, 0.002 + 1e-4 * t);
    }
    let (a, c) = f.line().unwrap();
    assert!(
        (a - 0.002).abs() < 1e-6 && (c - 1e-4).abs() < 1e-8,
        "{a} {c}"
    );
    // A 20 ms period: 2 ms fixed and 0.4 ms for 4 decode tokens leave 17.6 ms, half of
    // it for 88 chunk tokens.
    let k = f.paced_work(4.0, 0.02).unwrap() - 4.0;
    assert!((87.9..=88.1).contains(&k), "{k}");
    // A decode batch that fills the period alone leaves nothing (its plan's floor moves
    // its prompts a little).
    assert_eq!(f.paced_work(200.0, 0.02), Some(200.0));
    // Steps all of one size: every second is charged to the work.
    let mut g = StepFit::default();
    for _ in 0..5 {
        g.observe(10.0, 0.0, 0.003);
    }
    let (a, c) = g.line().unwrap();
    assert_eq!(a, 0.0);
    assert!((c - 3e-4).abs() < 1e-9);
    let k = g.paced_work(10.0, 0.023).unwrap() - 10.0;
    assert!((33.0..=34.0).contains(&k), "{k}");
}

fn rng(mut x: u64) -> impl FnMut() -> f64 {
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[test]
fn a_chunks_work_adds_up_and_the_longest_chunk_within_a_work_is_exact() {
    let mut next = rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..2000 {
        let cost = StepCost {
            prefill_pair: if next() < 0.2 {
                0.0
            } else {
                1e-4 + 0.01 * next()
            },
        };
        let from = (next() * 2000.0) as usize;
        let (mid, to) = (from + (next() * 300.0) as usize, from + 300);
        let split = cost.chunk(from, mid) + cost.chunk(mid, to);
        assert!((split - cost.chunk(from, to)).abs() < 1e-9 * split.max(1.0));
        // By brute force: the longest chunk whose work fits.
        let work = 0.5 + next() * 400.0;
        let want = (0..)
            .take_while(|&n| cost.chunk(from, from + n) <= work)
            .last();
        assert_eq!(
            Some(cost.chunk_within(from, work)),
            want,
            "{cost:?} {from} {work}"
        );
    }
    let cost = StepCost { prefill_pair: 1e-3 };
    assert_eq!(cost.chunk_within(7, -1.0), 0);
    assert_eq!(cost.chunk_within(7, f64::INFINITY), usize::MAX);
    // Tokens alone: the work is the tokens.
    assert_eq!(StepCost::default().chunk_within(900, 37.5), 37);
    assert!((cost.chunk(0, 2) - (2.0 + 3e-3)).abs() < 1e-12);
}

#[test]
fn a_fit_learns_what_attention_costs_live_and_times_deep_chunks_that_tokens_alone_miss() {
    // A machine whose steps cost 4 ms + 0.5 ms a token + 0.3 µs an attended prompt
    // position: the decode steps of 20 streams at ~300 positions, some with a chunk of a
    // 1,000-token prompt at a random depth. The profile said 0.15 µs a pair: the live
    // steps pay twice that.
    let truth = |tokens: f64, pairs: f64| 4e-3 + 5e-4 * tokens + 3e-7 * pairs;
    let profile = StepCost {
        prefill_pair: 1.5e-7 / 5e-4,
    };
    let (mut by_work, mut by_tokens) = (StepFit::default(), StepFit::default());
    let mut next = rng(0x5851_f42d_4c95_7f2d);
    let observe = |fit: &mut StepFit, weight: f64, from: usize, n: usize| {
        let pairs = StepCost { prefill_pair: 1.0 }.chunk(from, from + n) - n as f64;
        let tokens = 20.0 + n as f64;
        fit.observe(tokens, weight * pairs, truth(tokens, pairs));
    };
    // Decode-only steps first: nothing to learn the attention from yet.
    for _ in 0..100 {
        observe(&mut by_work, profile.prefill_pair, 0, 0);
    }
    assert_eq!(by_work.scale(), 1.0);
    for _ in 0..400 {
        let (from, n) = ((next() * 900.0) as usize, (next() * 40.0) as usize);
        observe(&mut by_work, profile.prefill_pair, from, n);
        observe(&mut by_tokens, 0.0, from, n);
    }
    let scale = by_work.scale();
    assert!((scale - 2.0).abs() < 0.05, "{scale}");
    // A 30-token chunk at position 950, priced by the weight learned.
    let live = StepCost {
        prefill_pair: profile.prefill_pair * scale,
    };
    let took = truth(50.0, 30.0 * 950.0 + 30.0 * 31.0 / 2.0);
    let work = by_work.seconds(20.0 + live.chunk(950, 980)).unwrap();
    let tokens = by_tokens.seconds(50.0).unwrap();
    assert!((work - took).abs() < 0.01 * took, "{work} {took}");
    assert!(took - tokens > 3e-3, "{tokens} {took}");
}

#[test]
fn a_dead_prefill_workers_count_is_voided_by_its_heartbeats_age() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cores");
    let a = CoreArbiter::open(&p).unwrap();
    std::mem::forget(a.computing()); // died mid-pass
    assert!(a.prefill_active());
    a.word(1)
        .store(now_ns() - STALE.as_nanos() as u64 - 1, Ordering::Release);
    assert!(!a.prefill_active());
}

#[test]
fn idle_scheduling_applies_to_the_thread_and_those_it_starts() {
    std::thread::spawn(|| {
        yield_cores().unwrap();
        // SAFETY: querying the calling thread's policy (directly: musl's wrapper is a stub).
        let policy = || unsafe { libc::syscall(libc::SYS_sched_getscheduler, 0) };
        assert_eq!(policy(), libc::SCHED_IDLE as libc::c_long);
        let child = std::thread::spawn(policy);
        assert_eq!(child.join().unwrap(), libc::SCHED_IDLE as libc::c_long);
    })
    .join()
    .unwrap();
}
