//! The continuous-batching worker against each request run alone: 64 random requests (half
//! sharing a prefix) submitted at once, under random per-step token budgets (so prompts are
//! prefilled in chunks of every size, mixed with decode tokens) and a KV pool far too small for
//! all of them (so sequences are preempted and recomputed), give every request the tokens and
//! log-probabilities it gets alone, bit for bit — greedy and sampled, f32 and int8.

use decode_worker::{DecodeHandle, NewRequest, SubmitError, WorkerConfig};
use engine::request::{CancellationToken, GenerationParams, RequestId, WorkerError, WorkerEvent};
use engine::synthetic::testing::{Rng, Trace, generate_alone, mixed_params};
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig, Precision};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const N_SEQ: usize = 64;
const N_GEN: usize = 12;

fn load(precision: Precision, kv_budget_bytes: usize) -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write(&TinySpec::default(), &path).unwrap();
    let cfg = EngineConfig {
        kv_budget_bytes,
        model_id: None,
        precision,
        kv_dtype: Default::default(),
        kv_shared_path: None,
        device: Default::default(),
    };
    (dir, Arc::new(Engine::load(&path, &cfg).unwrap()))
}

fn params(i: usize) -> GenerationParams {
    mixed_params(i, N_GEN, 7000)
}

fn collect(mut rx: UnboundedReceiver<WorkerEvent>) -> Result<Trace, WorkerError> {
    let mut t: Trace = (vec![], vec![]);
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            WorkerEvent::Token(ev) => {
                t.0.push(ev.token);
                t.1.push(ev.logprobs.unwrap().logprob.to_bits());
                if ev.finish.is_some() {
                    break;
                }
            }
            WorkerEvent::Error(e) => return Err(e),
            _ => {}
        }
    }
    Ok(t)
}

fn submit(
    h: &DecodeHandle,
    i: usize,
    prompt: Vec<u32>,
    p: GenerationParams,
) -> UnboundedReceiver<WorkerEvent> {
    let (tx, rx) = unbounded_channel();
    h.submit_request(NewRequest {
        id: RequestId(i as u64),
        generated: Vec::new(),
        prompt,
        params: p,
        events: tx,
        cancel: CancellationToken::default(),
    })
    .unwrap();
    rx
}

/// Request `i` is `prompts[i]` with `params(i)`; their event streams, in order.
fn submit_all(h: &DecodeHandle, prompts: &[Vec<u32>]) -> Vec<UnboundedReceiver<WorkerEvent>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| submit(h, i, p.clone(), params(i)))
        .collect()
}

fn prompts(rng: &mut Rng) -> Vec<Vec<u32>> {
    let shared: Vec<u32> = (0..40).map(|_| rng.next(250) as u32 + 3).collect();
    (0..N_SEQ)
        .map(|i| {
            let own = rng.next(50) as usize + 1;
            let mut p = if i.is_multiple_of(2) {
                shared.clone()
            } else {
                vec![]
            };
            p.extend((0..own).map(|_| rng.next(250) as u32 + 3));
            p
        })
        .collect()
}

#[test]
fn continuous_batching_with_chunks_and_preemption_equals_each_request_alone() {
    for precision in [Precision::F32, Precision::Int8, Precision::W4A8] {
        let (_d, solo_engine) = load(precision, 64 << 20);
        let mut rng = Rng(0x5eed_1234 ^ precision as u64);
        let prompts = prompts(&mut rng);
        let want: Vec<Trace> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| generate_alone(&solo_engine, p, params(i)))
            .collect();
        let block_bytes = solo_engine.kv.layout().block_bytes();
        let mut preemptions = 0;
        for budget in [1usize, 7, 16, 64, 256] {
            // Room for about a tenth of the requests at once: preemption is certain.
            let (_d2, e) = load(precision, 40 * block_bytes);
            let (h, th) = decode_worker::spawn(
                e.clone(),
                WorkerConfig {
                    max_batch_tokens: budget,
                    max_running: 64,
                    max_waiting: 64,
                },
            );
            for (i, rx) in submit_all(&h, &prompts).into_iter().enumerate() {
                let got = collect(rx).unwrap_or_else(|e| panic!("request {i}: {e}"));
                assert_eq!(
                    got, want[i],
                    "{precision:?} budget {budget}: request {i} differs"
                );
            }
            let n = h.stats().preemptions.load(Ordering::Relaxed);
            eprintln!("{precision:?} budget {budget}: {n} preemptions");
            preemptions += n;
            assert_eq!(h.stats().waiting.load(Ordering::Relaxed), 0);
            drop(h);
            th.join().unwrap();
            // Every block is back (only prefix-cached ones stay, unreferenced).
            assert_eq!(e.kv.free_blocks(), e.kv.n_blocks());
        }
        assert!(preemptions > 0, "the pool was meant to be too small");
    }
}

#[test]
fn a_request_that_cannot_fit_alone_fails_and_the_rest_are_served() {
    let (_d, e) = load(Precision::F32, 64 << 20);
    let block_bytes = e.kv.layout().block_bytes();
    let (_d2, small) = load(Precision::F32, 4 * block_bytes); // 64 positions
    let (h, th) = decode_worker::spawn(small.clone(), WorkerConfig::default());
    let big = submit(&h, 0, (0..100).map(|t| t % 200 + 3).collect(), params(0));
    let ok = submit(&h, 1, vec![5, 6, 7, 8], params(1));
    assert!(matches!(collect(big), Err(WorkerError::Overloaded(_))));
    assert_eq!(
        collect(ok).unwrap(),
        generate_alone(&e, &[5, 6, 7, 8], params(1))
    );
    drop(h);
    th.join().unwrap();
}

#[test]
fn a_full_queue_refuses_at_once_and_cancelled_requests_free_their_place() {
    let (_d, e) = load(Precision::F32, 64 << 20);
    let (h, th) = decode_worker::spawn(
        e.clone(),
        WorkerConfig {
            max_batch_tokens: 4,
            max_running: 1,
            max_waiting: 3,
        },
    );
    let mut long = params(0);
    long.max_tokens = 200;
    long.min_tokens = 200;
    let cancels: Vec<CancellationToken> = (0..3).map(|_| CancellationToken::default()).collect();
    let mut rxs = Vec::new();
    for (i, c) in cancels.iter().enumerate() {
        let (tx, rx) = unbounded_channel();
        h.submit_request(NewRequest {
            id: RequestId(i as u64),
            generated: Vec::new(),
            prompt: (0..30).map(|t| t + 3).collect(),
            params: long.clone(),
            events: tx,
            cancel: c.clone(),
        })
        .unwrap();
        rxs.push(rx);
    }
    // The queue holds three not yet admitted or just admitted; a burst beyond it is refused.
    let mut refused = 0;
    for i in 0..8 {
        let (tx, _rx) = unbounded_channel();
        if let Err(SubmitError::QueueFull) = h.submit_request(NewRequest {
            id: RequestId(100 + i),
            generated: Vec::new(),
            prompt: vec![3, 4, 5],
            params: params(1),
            events: tx,
            cancel: CancellationToken::default(),
        }) {
            refused += 1;
        }
    }
    assert!(refused >= 5, "only {refused} of 8 refused");
    for c in &cancels {
        c.cancel();
    }
    drop(rxs);
    // Cancelled and dropped requests leave; the queue drains and new work is accepted again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while h.stats().waiting.load(Ordering::Relaxed) > 0
        || h.stats().running.load(Ordering::Relaxed) > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker did not drain"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let rx = submit(&h, 200, vec![9, 10, 11], params(2));
    assert_eq!(
        collect(rx).unwrap(),
        generate_alone(&e, &[9, 10, 11], params(2))
    );
    drop(h);
    th.join().unwrap();
}

#[test]
fn paced_beside_a_prefill_pass_every_request_gets_what_it_gets_alone() {
    // Sharing the cores with a prefill worker that is computing, the worker's steps carry only
    // the chunks that fit their share of the period (sizes from its running fit of its own
    // steps, so they vary) and rest to the period: the outputs do not change, and nothing
    // stalls.
    paced_requests_get_what_they_get_alone(true);
}

#[test]
fn paced_with_no_pass_every_request_gets_what_it_gets_alone() {
    // Sharing the cores with an idle prefill worker, the worker's steps hold to the period and
    // the streams' credit against it (`protocol::cores::stream_credit`; a 2 ms period, so the
    // chunks shrink and grow as the credit does): the outputs do not change, and nothing
    // stalls.
    paced_requests_get_what_they_get_alone(false);
}

fn paced_requests_get_what_they_get_alone(pass: bool) {
    let (_d, e) = load(Precision::Int8, 64 << 20);
    let mut rng = Rng(0x9ace_d00d);
    let prompts: Vec<Vec<u32>> = prompts(&mut rng).into_iter().take(16).collect();
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("cores");
    let prefill = protocol::cores::CoreArbiter::open(&page).unwrap();
    let _pass = pass.then(|| prefill.computing());
    let pacer = protocol::cores::Pacer::new(
        protocol::cores::CoreArbiter::open(&page).unwrap(),
        std::time::Duration::from_millis(2),
        std::time::Duration::from_secs(1),
    );
    let (h, th) = decode_worker::spawn_paced(e.clone(), WorkerConfig::default(), Some(pacer));
    for (i, rx) in submit_all(&h, &prompts).into_iter().enumerate() {
        let got = collect(rx).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(
            got,
            generate_alone(&e, &prompts[i], params(i)),
            "request {i}"
        );
    }
    drop(h);
    th.join().unwrap();
}
