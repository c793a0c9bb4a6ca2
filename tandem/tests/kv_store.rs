//! The pooled KV store with real processes and the default model: a decode worker that lost
//! its prefix cache (killed with SIGKILL, restarted) gets a prompt's prefix back from the
//! store — from its RAM tier and from its disk tier — and the tokens and log-probabilities
//! are bit-identical to the first run, which computed everything; with a prefill worker the
//! fetch lands in the blocks reserved for the transfer instead, with the same result; over TCP
//! the prefill worker fetches the prefix into its own pool, with the same result again.

mod common;

use common::{Proc, free_port, model, until};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::Duration;

fn spawn(args: &[&str], with_model: bool) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.args(args);
    if with_model {
        c.args(["--model", &model(), "--served-model-name", "m"]);
    }
    Proc(
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The sum over a labelled metric's series whose labels contain `label`.
fn metric(page: &str, name: &str, label: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A store with 2 MiB of RAM (5 of the model's 360 KiB blocks: the rest spills) and a disk
/// tier in `disk`, ready; its status server's address.
async fn store(disk: &std::path::Path, port: u16) -> (Proc, String) {
    let status = free_port();
    let p = spawn(
        &[
            "kv-store",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--ram-mib",
            "2",
            "--disk-dir",
            disk.to_str().unwrap(),
            "--status-listen",
            &format!("127.0.0.1:{status}"),
        ],
        false,
    );
    let url = format!("http://127.0.0.1:{status}");
    until(&format!("{url}/health"), "ready", |c, _| c == 200).await;
    (p, url)
}

fn decode(port: u16, store: u16) -> Proc {
    decode_with(port, store, &[])
}

fn decode_with(port: u16, store: u16, extra: &[&str]) -> Proc {
    let (listen, store) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{store}"));
    let mut args = vec![
        "decode",
        "--listen",
        &listen,
        "--kv-cache-mib",
        "64",
        "--kv-store-addr",
        &store,
        "--kv-store-write-through",
    ];
    args.extend_from_slice(extra);
    spawn(&args, true)
}

/// A scheduler on HTTP port `http` over the decode worker on `decode`, with `extra` flags.
fn scheduler(http: u16, decode: u16, extra: &[&str]) -> Proc {
    let (port, decode) = (http.to_string(), format!("127.0.0.1:{decode}"));
    let mut args = vec!["scheduler", "--port", &port, "--decode", &decode];
    args.extend_from_slice(extra);
    spawn(&args, true)
}

fn kill9(p: Proc) {
    // SAFETY: our own child.
    unsafe {
        libc::kill(p.0.id() as i32, libc::SIGKILL);
    }
    drop(p);
}

/// One seeded, sampled completion with log-probabilities: what must not change.
async fn complete(api: &str, prompt: &str) -> (Value, u64) {
    let r = reqwest::Client::new()
        .post(format!("{api}/v1/completions"))
        .json(
            &json!({"model": "m", "prompt": prompt, "max_tokens": 12, "seed": 7,
            "temperature": 0.9, "logprobs": 3}),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (v["choices"][0].clone(), cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_gets_its_prefixes_back_from_the_store_bit_identical() {
    let disk = tempfile::tempdir().unwrap();
    let (sp, dp, http) = (free_port(), free_port(), free_port());
    let (_store, store_status) = store(disk.path(), sp).await;
    let mut dec = decode(dp, sp);
    let _sched = scheduler(http, dp, &[]);
    let api = format!("http://127.0.0.1:{http}");
    until(&format!("{api}/health"), "healthy", |c, _| c == 200).await;

    let prompt: String = (0..30)
        .map(|i| format!("Line {i} of the keeper's log: the lamp burned, the sea rose. "))
        .collect();
    let (first, cached) = complete(&api, &prompt).await;
    assert_eq!(cached, 0, "nothing cached anywhere yet");
    // Write-through: the prompt's blocks reach the store when the request ends.
    let page = until(
        &format!("{store_status}/metrics"),
        "holding blocks",
        |_, p| metric(p, "tandem_kv_store_blocks", "tier=\"disk\"") >= 10.0,
    )
    .await;
    assert!(
        metric(&page, "tandem_kv_store_blocks", "tier=\"ram\"") >= 1.0,
        "{page}"
    );

    // Round 0: the pool is shared, so the store copies into it in place; round 1: a private
    // pool, fetched over the data plane.
    for round in 0..2 {
        kill9(dec);
        dec = decode_with(dp, sp, if round == 0 { &[] } else { &["--no-shm"] });
        until(&format!("{api}/health"), "healthy again", |c, _| c == 200).await;
        let (again, cached) = complete(&api, &prompt).await;
        assert!(cached >= 16 * 20, "round {round}: {cached} tokens cached");
        assert_eq!(
            again, first,
            "round {round}: tokens or log-probabilities changed"
        );
    }
    // Disaggregated: the decode worker fetches into the blocks it reserves for the prefill
    // worker, which reads them in place and computes only the rest.
    let (pp, http2, pstatus) = (free_port(), free_port(), free_port());
    let _prefill = spawn(
        &[
            "prefill",
            "--listen",
            &format!("127.0.0.1:{pp}"),
            "--kv-cache-mib",
            "64",
            "--kv-store-addr",
            &format!("127.0.0.1:{sp}"),
            "--status-listen",
            &format!("127.0.0.1:{pstatus}"),
        ],
        true,
    );
    let pp_addr = format!("127.0.0.1:{pp}");
    let disaggregated = ["--prefill", &pp_addr, "--disagg-min-tokens", "1"];
    let _sched2 = scheduler(http2, dp, &disaggregated);
    kill9(dec);
    let dec = decode(dp, sp);
    let api2 = format!("http://127.0.0.1:{http2}");
    until(&format!("{api2}/health"), "healthy", |c, _| c == 200).await;
    let (again, cached) = complete(&api2, &prompt).await;
    assert!(cached >= 16 * 20, "disaggregated: {cached} tokens cached");
    assert_eq!(
        again, first,
        "disaggregated: tokens or log-probabilities changed"
    );
    // Over TCP (as when the decode worker is on another host) the prefill worker computes in
    // its own pool: it takes the prefix from the store too, and computes only the rest.
    let http3 = free_port();
    let _sched3 = scheduler(
        http3,
        dp,
        &[&disaggregated[..], &["--kv-transport", "tcp"]].concat(),
    );
    let api3 = format!("http://127.0.0.1:{http3}");
    until(&format!("{api3}/health"), "healthy", |c, _| c == 200).await;
    let (again, _) = complete(&api3, &prompt).await;
    assert_eq!(
        again, first,
        "over TCP: tokens or log-probabilities changed"
    );
    let page = until(
        &format!("http://127.0.0.1:{pstatus}/metrics"),
        "the prefill worker's metrics",
        |c, _| c == 200,
    )
    .await;
    assert!(
        metric(&page, "tandem_kv_store_fetched_blocks_total", "tier=") >= 20.0,
        "the prefill worker fetched nothing from the store:\n{page}"
    );

    let page = until(&format!("{store_status}/metrics"), "metrics", |c, _| {
        c == 200
    })
    .await;
    for tier in ["hits_ram", "hits_disk"] {
        assert!(
            metric(
                &page,
                "tandem_kv_store_events",
                &format!("event=\"{tier}\"")
            ) > 0.0,
            "no {tier}:\n{page}"
        );
    }
    for transport in ["shm", "tcp"] {
        assert!(
            metric(
                &page,
                "tandem_kv_store_bytes_sent_total",
                &format!("transport=\"{transport}\"")
            ) > 0.0,
            "nothing fetched over {transport}:\n{page}"
        );
    }
    drop(dec);
}

/// kill -9 of the store while requests run: none fails (a fetch that breaks is a miss, a
/// write-back that fails is dropped), and every output stays what it was with the store up;
/// a store restarted on the same disk directory serves its blocks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_killed_under_load_costs_no_request() {
    let disk = tempfile::tempdir().unwrap();
    let (sp, dp, http) = (free_port(), free_port(), free_port());
    let (store_proc, store_status) = store(disk.path(), sp).await;
    let _dec = decode(dp, sp);
    let _sched = scheduler(http, dp, &[]);
    let api = format!("http://127.0.0.1:{http}");
    until(&format!("{api}/health"), "healthy", |c, _| c == 200).await;
    let prompts: Vec<String> = (0..6)
        .map(|i| {
            let shared: String = (0..12)
                .map(|j| format!("Entry {j}: the tide turned at dawn and the gulls came back. "))
                .collect();
            format!("{shared}Question {i}: what did the keeper see?")
        })
        .collect();
    let round = |api: String, prompts: Vec<String>| async move {
        let calls = prompts.iter().map(|p| complete(&api, p));
        futures::future::join_all(calls).await
    };
    let first = round(api.clone(), prompts.clone()).await;
    // The first round's blocks are written back after their requests end: wait until some
    // have reached the disk tier, so the restart below has something to find (without this,
    // a loaded machine could kill the store before any write-back landed).
    until(
        &format!("{store_status}/metrics"),
        "spilled to disk",
        |c, p| c == 200 && metric(p, "tandem_kv_store_blocks", "tier=\"disk\"") >= 1.0,
    )
    .await;
    // Under load: the store dies while the second round runs.
    let running = tokio::spawn(round(api.clone(), prompts.clone()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    kill9(store_proc);
    let second = running.await.unwrap();
    let third = round(api.clone(), prompts.clone()).await;
    for (i, f) in first.iter().enumerate() {
        assert_eq!(second[i].0, f.0, "request {i} changed while the store died");
        assert_eq!(third[i].0, f.0, "request {i} changed without a store");
    }
    // Restarted on the same directory, the store has its spilled blocks back.
    let (_store, status) = store(disk.path(), free_port()).await;
    until(&format!("{status}/metrics"), "re-indexed", |c, p| {
        c == 200 && metric(p, "tandem_kv_store_blocks", "tier=\"disk\"") >= 1.0
    })
    .await;
}
