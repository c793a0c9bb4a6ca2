//! `tandem up --experts N` as a user runs it (with EPLB at run time and two microbatches): an
//! MoE made by `tandem model make-moe`, two expert worker processes shared by the prefill and
//! decode workers, the same tokens as one colocated process, also across a kill -9 of an
//! expert worker under load; a dense model refused; every child stopped with `up`.

mod common;

use common::{children, children_running, free_port, model};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

fn up(moe: &str, port: u16, extra: &[&str]) -> Up {
    Up(tandem()
        .args(["up", "--port", &port.to_string(), "--model", moe])
        .args(["--kv-cache-mib", "64", "--served-model-name", "m"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap())
}

async fn wait_healthy(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !matches!(reqwest::get(format!("{url}/health")).await, Ok(r) if r.status().is_success()) {
        assert!(Instant::now() < deadline, "{url} never became healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn complete(url: &str, i: usize) -> Value {
    complete_n(url, i, 12).await
}

async fn complete_n(url: &str, i: usize, max_tokens: usize) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(&json!({
            "model": "m",
            "prompt": format!("Request {i}: the history of the river and the town beside it"),
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "seed": 40 + i,
            "ignore_eos": true,
            "logprobs": 1,
        }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    v["choices"][0]["logprobs"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn experts_on_worker_processes_give_the_colocated_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let moe = dir.path().join("moe.gguf");
    let made = tandem()
        .args(["model", "make-moe", "--model", &model(), "--out"])
        .arg(&moe)
        .args([
            "--num-experts",
            "8",
            "--top-k",
            "2",
            "--skew",
            "0.5",
            "--layers",
            "4",
        ])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let moe = moe.to_str().unwrap();

    // A dense model with --experts: refused at once, with the reason.
    let dense = tandem()
        .args(["up", "--model", &model(), "--experts", "2", "--port"])
        .arg(free_port().to_string())
        .output()
        .unwrap();
    assert!(!dense.status.success());
    assert!(String::from_utf8_lossy(&dense.stderr).contains("dense"));

    let (p1, p2) = (free_port(), free_port());
    // With EPLB at run time (a plan every 4 steps, 2 replicas) and two microbatches in flight:
    // whatever it moves and whenever, the tokens stay one process's.
    let ep = up(
        moe,
        p1,
        &[
            "--experts",
            "2",
            "--eplb-interval",
            "4",
            "--redundant-experts",
            "2",
            "--microbatches",
            "2",
        ],
    );
    let _one = up(moe, p2, &["--colocated"]);
    let (u1, u2) = (
        format!("http://127.0.0.1:{p1}"),
        format!("http://127.0.0.1:{p2}"),
    );
    wait_healthy(&u1).await;
    wait_healthy(&u2).await;
    let experts: Vec<Vec<String>> = children(ep.0.id())
        .into_iter()
        .map(|(_, args)| args)
        .filter(|c| c.get(1).map(String::as_str) == Some("expert"))
        .collect();
    assert_eq!(experts.len(), 2, "{experts:?}");
    assert!(experts.iter().any(|c| c.contains(&"0-3".to_string())));
    assert!(experts.iter().any(|c| c.contains(&"4-7".to_string())));
    let decode: Vec<Vec<String>> = children(ep.0.id())
        .into_iter()
        .map(|(_, args)| args)
        .filter(|c| c.get(1).map(String::as_str) == Some("decode"))
        .collect();
    assert!(
        decode
            .iter()
            .all(|c| c.windows(2).any(|w| w == ["--eplb-interval", "4"])),
        "{decode:?}"
    );
    for i in 0..4 {
        assert_eq!(
            complete(&u1, i).await,
            complete(&u2, i).await,
            "request {i}"
        );
    }
    // kill -9 of an expert worker under load: its experts move to the other (which loads
    // them), no request fails, and every token is what one process gives.
    let load: Vec<_> = (10..16)
        .map(|i| {
            let u = u1.clone();
            tokio::spawn(async move { complete_n(&u, i, 48).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = children_running(ep.0.id(), "expert");
    // SAFETY: plain kill(2) of our grandchild.
    unsafe {
        libc::kill(victim[1] as i32, libc::SIGKILL);
    }
    for (i, h) in (10..16).zip(load) {
        let got = h.await.expect("the request did not fail");
        assert_eq!(
            got,
            complete_n(&u2, i, 48).await,
            "request {i} after the kill"
        );
    }
    let pid = ep.0.id();
    drop(ep);
    std::thread::sleep(Duration::from_millis(500));
    assert!(children(pid).is_empty(), "children outlived tandem up");
}
