//! A test server with known, injected latencies and faults proves that `tandem bench` measures
//! TTFT, TPOT and goodput correctly and counts bad responses as errors without crashing.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use bench::args::{Arrival, DatasetName, RunArgs};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FAST_TTFT_MS: u64 = 60;
const SLOW_TTFT_MS: u64 = 400;
const TPOT_MS: u64 = 25;

#[derive(Default)]
struct Fake {
    n: AtomicUsize,
    /// Per request: (fast, served correctly).
    log: Mutex<Vec<(bool, bool)>>,
}

async fn completions(State(f): State<Arc<Fake>>, body: String) -> Response {
    let i = f.n.fetch_add(1, Ordering::SeqCst);
    let req: Value = serde_json::from_str(&body).unwrap();
    let n_out = req["max_tokens"].as_u64().unwrap() as usize;
    // Every 5th request fails with HTTP 500, every 7th sends malformed SSE; odd ones are slow.
    let (fast, fail, malformed) = (i % 2 == 0, i % 5 == 4, i % 7 == 6);
    f.log.lock().unwrap().push((fast, !fail && !malformed));
    if fail {
        return Response::builder()
            .status(500)
            .body(Body::from("{\"error\":{\"message\":\"injected\"}}"))
            .unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(4);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(if fast {
            FAST_TTFT_MS
        } else {
            SLOW_TTFT_MS
        }))
        .await;
        for t in 0..n_out {
            if t > 0 {
                tokio::time::sleep(Duration::from_millis(TPOT_MS)).await;
            }
            let chunk = if malformed && t == 1 {
                "data: {not json\n\n".to_string()
            } else {
                format!(
                    "data: {}\n\n",
                    json!({"choices": [{"index": 0, "text": " the"}]})
                )
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        let usage = json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": n_out, "total_tokens": 10 + n_out}});
        let _ = tx
            .send(Ok(format!("data: {usage}\n\ndata: [DONE]\n\n")))
            .await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap()
}

fn args(base_url: String, tokenizer: std::path::PathBuf, dir: std::path::PathBuf) -> RunArgs {
    RunArgs {
        base_url,
        endpoint: "/v1/completions".into(),
        model: None,
        dataset_name: DatasetName::Random,
        dataset_path: None,
        num_prompts: 35,
        random_input_len: 20,
        random_output_len: 6,
        random_range_ratio: 0.0,
        request_rate: vec!["inf".into()],
        burstiness: 1.0,
        arrival: Arrival::Poisson,
        max_concurrency: Some(8),
        goodput: vec!["ttft:200".into(), "tpot:80".into()],
        slo_search: false,
        slo_target: 0.9,
        slo_search_steps: 3,
        seed: 1,
        num_warmups: 0,
        result_dir: Some(dir),
        label: Some("fake".into()),
        tokenizer: Some(tokenizer),
        num_prefix_groups: 2,
        shared_prefix_len: 30,
        conversation_prefix_len: 0,
        mixed_long_fraction: 0.25,
        mixed_long_len: 50,
        num_turns: 5,
        think_time: 2.0,
        ignore_eos: true,
        request_timeout: 30.0,
        json_schema: None,
        quiet: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measures_injected_latencies_goodput_and_errors() {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route(
            "/v1/models",
            get(|| async {
                axum::Json(json!({"object": "list", "data": [{"id": "fake", "object": "model"}]}))
            }),
        )
        .route("/v1/completions", post(completions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok.gguf");
    engine::synthetic::write(&engine::synthetic::TinySpec::default(), &tok).unwrap();

    let runs = bench::run(args(url, tok, dir.path().join("out")))
        .await
        .unwrap();
    let run = &runs[0];
    let log = fake.log.lock().unwrap().clone();
    assert_eq!(log.len(), 35);
    let served_ok = log.iter().filter(|l| l.1).count();
    let fast_ok = log.iter().filter(|l| l.0 && l.1).count();
    let s = &run.summary;
    assert_eq!(s["completed"].as_u64().unwrap() as usize, served_ok);
    assert_eq!(s["failed"].as_u64().unwrap() as usize, 35 - served_ok);
    // Good = fast and served: exactly what the server did.
    let good = run
        .records
        .iter()
        .filter(|r| {
            bench::summary::Slo::parse(&["ttft:200 tpot:80".into()])
                .unwrap()
                .good(r)
        })
        .count();
    assert_eq!(good, fast_ok);
    assert!((s["slo_attainment"].as_f64().unwrap() - fast_ok as f64 / 35.0).abs() < 1e-9);
    // Latencies as injected (scheduling noise only ever adds).
    for r in run.records.iter().filter(|r| r.success()) {
        let ttft = r.ttft().unwrap() * 1e3;
        let tpot = r.tpot().unwrap() * 1e3;
        let near = |x: f64, want: u64| x >= want as f64 - 2.0 && x <= want as f64 + 60.0;
        assert!(
            near(ttft, FAST_TTFT_MS) || near(ttft, SLOW_TTFT_MS),
            "ttft {ttft}"
        );
        assert!(near(tpot, TPOT_MS), "tpot {tpot}");
        assert_eq!(r.output_tokens(), 6);
        assert_eq!(r.chunks.len(), 6);
    }
    let errs: Vec<&str> = run
        .records
        .iter()
        .filter_map(|r| r.error.as_deref())
        .collect();
    assert!(errs.iter().any(|e| e.contains("HTTP 500")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("malformed SSE")), "{errs:?}");
    // The result directory has what it promises.
    for f in [
        "config.json",
        "summary.json",
        "sweep.csv",
        "rate-inf/requests.jsonl",
        "rate-inf/summary.json",
    ] {
        assert!(dir.path().join("out").join(f).exists(), "{f}");
    }
    if bench::plot::font_ready() {
        assert!(dir.path().join("out/latency_cdf.png").exists());
    }
    let lines = std::fs::read_to_string(dir.path().join("out/rate-inf/requests.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 35);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_all_errors_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok.gguf");
    engine::synthetic::write(&engine::synthetic::TinySpec::default(), &tok).unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut a = args(
        format!("http://127.0.0.1:{port}"),
        tok,
        dir.path().join("out"),
    );
    a.model = Some("x".into());
    a.num_prompts = 5;
    let runs = bench::run(a).await.unwrap();
    assert_eq!(runs[0].summary["failed"], 5);
    assert_eq!(runs[0].summary["completed"], 0);
    assert!(
        runs[0]
            .records
            .iter()
            .all(|r| r.error.as_deref().unwrap().contains("request failed"))
    );
}

#[test]
fn sweep_runs_share_the_mix_but_not_the_text_and_lengths_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("tok.gguf");
    engine::synthetic::write(&engine::synthetic::TinySpec::default(), &tok).unwrap();
    let g = engine::gguf::GgufFile::open(&tok).unwrap();
    let t = std::sync::Arc::new(engine::Tokenizer::from_metadata(&g).unwrap());
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let src = bench::dataset::TextSource::new(t.clone(), &mut rng).unwrap();
    let mut a = args(String::new(), tok, dir.path().join("x"));
    a.dataset_name = DatasetName::Mixed;
    a.mixed_long_len = 120;
    let r0 = bench::dataset::build(&a, &src, 40, 5, 5).unwrap();
    let r1 = bench::dataset::build(&a, &src, 40, 5, 6).unwrap();
    let kinds = |r: &[bench::dataset::RequestSpec]| {
        r.iter().map(|x| (x.kind, x.output_len)).collect::<Vec<_>>()
    };
    assert_eq!(kinds(&r0), kinds(&r1));
    assert!(r0.iter().zip(&r1).all(|(x, y)| x.prompt != y.prompt));
    let exact = r0
        .iter()
        .filter(|x| t.encode(&x.prompt, false).unwrap().len() == x.input_len)
        .count();
    assert_eq!(
        exact,
        r0.len(),
        "input_len is the prompt's real token count"
    );
    let wanted = r0
        .iter()
        .zip(&r1)
        .filter(|(x, y)| x.input_len == y.input_len)
        .count();
    assert!(
        wanted >= 36,
        "lengths hit their targets: {wanted} of 40 equal across text seeds"
    );
}

/// A tiny model's tokenizer, text cut from it, and multi-turn arguments over it (in `dir`).
fn multi_turn(
    dir: &std::path::Path,
) -> (
    std::sync::Arc<engine::Tokenizer>,
    bench::dataset::TextSource,
    RunArgs,
) {
    let tok = dir.join("tok.gguf");
    engine::synthetic::write(&engine::synthetic::TinySpec::default(), &tok).unwrap();
    let g = engine::gguf::GgufFile::open(&tok).unwrap();
    let t = std::sync::Arc::new(engine::Tokenizer::from_metadata(&g).unwrap());
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let src = bench::dataset::TextSource::new(t.clone(), &mut rng).unwrap();
    let mut a = args(String::new(), tok, dir.join("x"));
    a.dataset_name = DatasetName::MultiTurn;
    (t, src, a)
}

/// Multi-turn: each turn's prompt extends the one before it (the history grows, so the next
/// turn can reuse the last one's cached prefix), conversations open with shared system
/// prompts, and the ideal hit rate counts exactly those reuses.
#[test]
fn multi_turn_histories_grow_and_the_ideal_reuse_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let (t, src, mut a) = multi_turn(dir.path());
    a.num_turns = 4;
    a.num_prefix_groups = 2;
    a.shared_prefix_len = 48;
    let specs = bench::dataset::build(&a, &src, 14, 5, 5).unwrap();
    assert_eq!(specs.len(), 14, "3 conversations of 4 turns and one of 2");
    let turns: Vec<(usize, usize)> = specs.iter().map(|s| s.turn.unwrap()).collect();
    assert_eq!(turns[..6], [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]);
    assert_eq!(turns[12..], [(3, 0), (3, 1)]);
    for w in specs.windows(2) {
        if w[0].turn.unwrap().0 == w[1].turn.unwrap().0 {
            assert!(
                w[1].prompt.starts_with(&w[0].prompt),
                "a turn extends the last one"
            );
            assert!(w[1].input_len > w[0].input_len + 10);
        }
    }
    // Sent in order, every turn after the first reuses its whole previous prompt (but what
    // the last, partial block and the token before it cover).
    let order: Vec<usize> = (0..specs.len()).collect();
    let ideal = bench::dataset::ideal_cached_tokens(&specs, &order, &t).unwrap();
    let lens: Vec<usize> = specs
        .iter()
        .map(|s| t.encode(&s.prompt, false).unwrap().len())
        .collect();
    let floor: usize = (0..specs.len())
        .filter(|&i| specs[i].turn.unwrap().1 > 0)
        .map(|i| (lens[i - 1] - 1) / 16 * 16 - 16)
        .sum();
    assert!(ideal >= floor, "ideal {ideal} < {floor}");
    let total: usize = lens.iter().sum();
    assert!(ideal < total, "nothing is free: {ideal} of {total}");
    // Alone (one request), nothing is reused.
    assert_eq!(
        bench::dataset::ideal_cached_tokens(&specs, &[3], &t).unwrap(),
        0
    );
}

/// Multi-turn with a context of each conversation's own: every conversation's first turn is
/// its shared prefix, then its own context of about the asked length (which no other
/// conversation shares), then the user turn.
#[test]
fn multi_turn_conversations_have_contexts_of_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let (t, src, mut a) = multi_turn(dir.path());
    a.num_turns = 2;
    a.num_prefix_groups = 1;
    a.shared_prefix_len = 32;
    a.random_input_len = 8;
    let plain = bench::dataset::build(&a, &src, 6, 5, 5).unwrap();
    a.conversation_prefix_len = 200;
    let specs = bench::dataset::build(&a, &src, 6, 5, 5).unwrap();
    let firsts: Vec<&str> = specs
        .iter()
        .filter(|s| s.turn.unwrap().1 == 0)
        .map(|s| s.prompt.as_str())
        .collect();
    assert_eq!(firsts.len(), 3);
    for (i, p) in firsts.iter().enumerate() {
        let grew = t.encode(p, false).unwrap().len() as isize
            - t.encode(&plain[2 * i].prompt, false).unwrap().len() as isize;
        assert!(
            (180..=230).contains(&grew),
            "conversation {i}'s own context is {grew} tokens"
        );
    }
    // The shared prefix is common to all; past it the contexts part at once.
    let common = |a: &str, b: &str| a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let shared = common(firsts[0], firsts[1]);
    assert!(shared > 0 && shared < firsts[0].len() / 2);
    assert!(common(firsts[1], firsts[2]) < firsts[1].len() / 2);
}
