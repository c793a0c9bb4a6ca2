//! `tandem up` as a user runs it: real processes, the default model, kill -9.
//!
//! One cluster (1 prefill + 1 decode, every prompt disaggregated) and one colocated server
//! for reference. Killing the only decode worker mid-stream leaves the client's stream
//! unbroken and bit-identical; killing the only prefill worker under load loses no request;
//! the supervisor restarts both; SIGTERM stops every process.

mod common;

use common::{free_port, model};
use futures::StreamExt;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Up {
    child: Child,
    url: String,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

fn up(extra: &[&str]) -> Up {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["up", "--port", &port.to_string(), "--model", &model()])
        .args(["--kv-cache-mib", "64", "--served-model-name", "m"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Up {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never became healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Pids of `parent`'s children running `tandem <role>`.
fn children(parent: u32, role: &str) -> Vec<i32> {
    common::children_running(parent, role)
        .into_iter()
        .map(|p| p as i32)
        .collect()
}

fn kill9(pids: &[i32]) {
    assert!(!pids.is_empty(), "no such worker");
    for &p in pids {
        // SAFETY: plain kill(2).
        unsafe {
            libc::kill(p, libc::SIGKILL);
        }
    }
}

fn request(i: usize, max_tokens: usize, repeat: usize) -> Value {
    let story = "Once upon a time, in a kingdom by the sea, there lived a dragon who wanted \
                 to learn to cook. ";
    json!({
        "model": "m",
        "prompt": format!("Request {i}. {} Every morning the dragon", story.repeat(repeat)),
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": 100 + i,
        "ignore_eos": true,
    })
}

async fn complete(url: &str, body: &Value) -> String {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_any_worker_loses_nothing_and_changes_nothing() {
    let reference = up(&["--colocated"]);
    let cluster = up(&["--disagg-min-tokens", "1"]);
    wait_healthy(&reference.url).await;
    wait_healthy(&cluster.url).await;
    let sup = cluster.child.id();

    // 1. The only decode worker dies mid-stream.
    let body = request(0, 240, 1);
    let want = complete(&reference.url, &body).await;
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", cluster.url))
        .json(&stream_body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let mut bytes = resp.bytes_stream();
    let mut sse = String::new();
    let mut chunks = 0;
    let mut killed = false;
    while let Some(b) = bytes.next().await {
        sse.push_str(std::str::from_utf8(&b.unwrap()).unwrap());
        chunks = sse.matches("data: ").count();
        if !killed && chunks >= 10 {
            kill9(&children(sup, "decode"));
            killed = true;
        }
    }
    assert!(
        killed,
        "the stream ended after {chunks} chunks, before the kill"
    );
    let mut text = String::new();
    for line in sse.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "the stream carried an error: {v}");
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert!(sse.contains("[DONE]"), "the stream did not finish");
    assert_eq!(
        text, want,
        "the resumed stream differs from an undisturbed run"
    );

    // 2. The only prefill worker dies under load (long prompts: it is busy when it dies).
    wait_healthy(&cluster.url).await;
    let bodies: Vec<Value> = (1..=8).map(|i| request(i, 16, 40)).collect();
    let mut wants = Vec::new();
    for b in &bodies {
        wants.push(complete(&reference.url, b).await);
    }
    let tasks: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| {
            let url = cluster.url.clone();
            tokio::spawn(async move { complete(&url, &b).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill9(&children(sup, "prefill"));
    for (t, want) in tasks.into_iter().zip(wants) {
        let got = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("a request hung after the prefill worker died")
            .unwrap();
        assert_eq!(got, want);
    }

    // 3. Both were restarted, and serve again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while children(sup, "prefill").is_empty() || children(sup, "decode").is_empty() {
        assert!(Instant::now() < deadline, "a worker was not restarted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let b = request(9, 8, 10);
    assert_eq!(
        complete(&cluster.url, &b).await,
        complete(&reference.url, &b).await
    );

    // 4. SIGTERM stops the whole cluster.
    let mut cluster = cluster;
    let all: Vec<i32> = ["scheduler", "prefill", "decode"]
        .iter()
        .flat_map(|r| children(sup, r))
        .collect();
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(sup as i32, libc::SIGTERM);
    }
    let t0 = Instant::now();
    loop {
        if let Some(status) = cluster.child.try_wait().unwrap() {
            assert!(status.success(), "tandem up exited with {status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tandem up did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in all {
        assert!(
            !std::path::Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "worker {p} outlived the cluster"
        );
    }
}
