use super::*;
use crate::plan::cost::tests::model;
use crate::plan::workload::Prompts;

const SLO: Slo = Slo {
    ttft_s: 1.0,
    tpot_s: 0.1,
};

fn workload(prompts: &str, osl: usize, rate: f64) -> Workload {
    Workload {
        prompts: prompts.parse::<Prompts>().unwrap(),
        osl,
        rate,
    }
}

/// A request alone: its own steps and nothing else.
fn alone(layout: Layout, prompt: usize, osl: usize) -> Served {
    let run = simulate(
        &model(),
        &workload(&prompt.to_string(), osl, 1e-4),
        SLO,
        layout,
        0.8,
        3,
        1,
    );
    let same =
        |a: &Served| close(a.ttft_s, run.served[0].ttft_s) && close(a.tpot_s, run.served[0].tpot_s);
    assert!(run.served.iter().all(same), "{run:?}");
    run.served[0]
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9
}

#[test]
fn a_trace_replays_each_requests_own_arrival_and_lengths() {
    let m = model();
    let layout = Layout::Colocated { threads: 2 };
    // A workload's arrivals replayed are the workload simulated.
    let w = workload("200-400", 16, 2.0);
    assert_eq!(
        replay(&m, &arrivals(&w, 40, 9), w.osl, SLO, layout, 0.8),
        simulate(&m, &w, SLO, layout, 0.8, 40, 9)
    );
    // Requests far apart, each alone: its own chunks, then its own output's steps.
    let f = m.forward(2);
    let trace = [
        Arrival {
            at: 0.0,
            prompt: 100,
            osl: 1,
        },
        Arrival {
            at: 50.0,
            prompt: 300,
            osl: 3,
        },
    ];
    let run = replay(&m, &trace, 2, SLO, layout, 0.8);
    let (a, b) = (run.served[0], run.served[1]);
    assert!(
        close(a.ttft_s, f.seconds(Work::prefill(0, 100))) && a.tpot_s == 0.0,
        "{a:?}"
    );
    let ttft = f.seconds(Work::prefill(0, 256)) + f.seconds(Work::prefill(256, 300));
    let tpot = (f.seconds(Work::decode(1, 300)) + f.seconds(Work::decode(1, 301))) / 2.0;
    assert!(close(b.ttft_s, ttft) && close(b.tpot_s, tpot), "{b:?}");
}

#[test]
fn a_request_alone_costs_its_chunks_and_then_its_decode_steps() {
    let m = model();
    let f = m.forward(2);
    // 600 tokens: chunks of 256, 256, 88, the first token at the end of the last.
    let ttft: f64 = [(0, 256), (256, 512), (512, 600)]
        .iter()
        .map(|&(a, b)| f.seconds(Work::prefill(a, b)))
        .sum();
    let tpot = (600..603)
        .map(|c| f.seconds(Work::decode(1, c)))
        .sum::<f64>()
        / 3.0;
    let s = alone(Layout::Colocated { threads: 2 }, 600, 4);
    assert!(
        close(s.ttft_s, ttft) && close(s.tpot_s, tpot),
        "{s:?} vs {ttft} {tpot}"
    );
    // Sharing the cores, alone it misses nothing either way: it stays, chunked as colocated.
    let s = alone(Layout::Shared { threads: 2 }, 600, 4);
    assert!(close(s.ttft_s, ttft) && close(s.tpot_s, tpot), "{s:?}");

    let one = m.forward(1);
    let s = alone(
        Layout::Pinned {
            prefill: 1,
            decode: 1,
        },
        600,
        4,
    );
    assert!(
        close(
            s.ttft_s,
            one.seconds(Work::prefill(0, 600)) + m.link.calls_s
        ),
        "{s:?}"
    );
}

#[test]
fn arrivals_are_poisson_at_the_rate_and_the_same_for_a_seed() {
    let w = workload("32-256", 8, 4.0);
    let a = arrivals(&w, 20_000, 9);
    let gaps: Vec<f64> = a.windows(2).map(|p| p[1].at - p[0].at).collect();
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
    assert!((mean - 0.25).abs() < 0.01, "{mean}");
    // An exponential's standard deviation is its mean.
    assert!((var.sqrt() / mean - 1.0).abs() < 0.05, "{var}");
    let again = arrivals(&w, 20_000, 9);
    assert!(
        a.iter()
            .zip(&again)
            .all(|(x, y)| x.at == y.at && x.prompt == y.prompt)
    );
    assert_ne!(arrivals(&w, 10, 10)[0].at, a[0].at);
}

#[test]
fn sharing_the_cores_a_long_prompt_is_chunked_into_steps_that_keep_the_pace() {
    let m = model();
    // Streams decoding, then long prompts: the decode worker chunks them itself, each step
    // within the 20 ms period and the streams' credit against it, so the streams keep the pace
    // (but for the credit lent, `protocol::cores::AHEAD_MARGIN`) and the prompts take longer
    // than at full speed.
    let w = workload("1000", 200, 0.4);
    let slo = Slo {
        ttft_s: 3.0,
        tpot_s: 0.025,
    };
    let run = simulate(&m, &w, slo, Layout::Shared { threads: 2 }, 0.8, 200, 3);
    let f = m.forward(2);
    let alone = f.seconds(Work::prefill(0, 1000));
    let slowest = run.served.iter().map(|s| s.ttft_s).fold(0.0, f64::max);
    assert!(slowest > alone * 1.2, "{slowest} {alone}");
    let mut tpot: Vec<f64> = run.served.iter().map(|s| s.tpot_s).collect();
    tpot.sort_by(f64::total_cmp);
    let lent = 1.0 + protocol::cores::AHEAD_MARGIN;
    assert!(tpot[tpot.len() / 2] <= 0.02 * lent, "{tpot:?}");
    assert!(run.prefill_load < 0.05, "{}", run.prefill_load);
    // Colocated on the same cores, whole chunk steps break the bound for more streams (the
    // shared worker runs whole steps only where its queue could not wait).
    let colocated = simulate(&m, &w, slo, Layout::Colocated { threads: 2 }, 0.8, 200, 3);
    let over = |r: &Run| r.served.iter().filter(|s| s.tpot_s > slo.tpot_s).count();
    assert!(
        over(&run) * 2 < over(&colocated),
        "{} {}",
        over(&run),
        over(&colocated)
    );
}

#[test]
fn pods_pay_the_kv_transfer_over_tcp() {
    let mut m = model();
    // Calls so dear that one pass beats eight chunks on an idle decode pod.
    for f in &mut m.forward {
        f.fixed_s = 0.2;
    }
    let w = workload("2000", 4, 1e-4);
    let slo = Slo {
        ttft_s: 10.0,
        tpot_s: 0.1,
    };
    // The prompt goes to the prefill pod; its first token waits for the KV to cross.
    let pods = Layout::Pods {
        prefill: 1,
        decode: 1,
        threads: 2,
    };
    let run = simulate(&m, &w, slo, pods, 1.0, 2, 1);
    let pass = m.forward(2).seconds(Work::prefill(0, 2000));
    let want = pass + m.link.calls_s + m.tcp_seconds(2000);
    assert!(run.prefill_load > 0.0, "{run:?}");
    assert!(
        close(run.served[0].ttft_s, want),
        "{:?} vs {want}",
        run.served[0]
    );
}

#[test]
fn pinned_decode_workers_split_the_streams() {
    let m = model();
    let w = workload("100", 50, 2.0);
    let one = simulate(
        &m,
        &w,
        SLO,
        Layout::Pinned {
            prefill: 1,
            decode: 1,
        },
        0.8,
        300,
        5,
    );
    let mut more = m.clone();
    more.cores = 3;
    let two = simulate(
        &more,
        &w,
        SLO,
        Layout::Pinned {
            prefill: 1,
            decode: 2,
        },
        0.8,
        300,
        5,
    );
    assert!(
        two.batch < one.batch * 0.75,
        "{} vs {}",
        two.batch,
        one.batch
    );
    let median = |r: &Run| {
        let mut t: Vec<f64> = r.served.iter().map(|s| s.tpot_s).collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    assert!(
        median(&two) < median(&one),
        "{} vs {}",
        median(&two),
        median(&one)
    );
}
