//! The workers' status servers (`--status-listen`), as Kubernetes' probes and Prometheus see
//! them: real `tandem prefill`, `tandem decode` and `tandem scheduler` processes on loopback,
//! the default model. `/live` answers from the start; `/health` turns 200 once the worker
//! serves; `/metrics` carries the autoscaling gauges once work went through.

mod common;

use common::{Proc, free_port, model, until};
use serde_json::json;
use std::process::{Command, Stdio};

fn tandem(args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .args(["--model", &model(), "--served-model-name", "m"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A status server's `/metrics` page.
async fn metrics_page(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of an unlabelled metric in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_answer_probes_and_export_the_autoscaling_gauges() {
    let (dp, ds, pp, ps, http) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let dec_status = format!("http://127.0.0.1:{ds}");
    let pre_status = format!("http://127.0.0.1:{ps}");
    let _decode = tandem(&[
        "decode",
        "--listen",
        &format!("127.0.0.1:{dp}"),
        "--status-listen",
        &format!("127.0.0.1:{ds}"),
        "--kv-cache-mib",
        "64",
    ]);
    let _prefill = tandem(&[
        "prefill",
        "--listen",
        &format!("127.0.0.1:{pp}"),
        "--status-listen",
        &format!("127.0.0.1:{ps}"),
        "--kv-cache-mib",
        "64",
    ]);
    for s in [&dec_status, &pre_status] {
        until(&format!("{s}/live"), "live", |c, _| c == 200).await;
        let body = until(&format!("{s}/health"), "ready", |c, _| c == 200).await;
        assert!(body.contains("\"serving\""), "{body}");
    }
    let _scheduler = tandem(&[
        "scheduler",
        "--port",
        &http.to_string(),
        "--prefill",
        &format!("127.0.0.1:{pp}"),
        "--decode",
        &format!("127.0.0.1:{dp}"),
        "--disagg-min-tokens",
        "8",
    ]);
    let api = format!("http://127.0.0.1:{http}");
    until(&format!("{api}/live"), "live", |c, _| c == 200).await;
    until(&format!("{api}/health"), "healthy", |c, _| c == 200).await;
    let c = reqwest::Client::new();
    for i in 0..4 {
        let r = c
            .post(format!("{api}/v1/completions"))
            .json(&json!({"model": "m", "max_tokens": 4, "seed": i,
                "prompt": format!("Request {i}: tell me about the lighthouse keeper and the sea.")}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
    let page = metrics_page(&pre_status).await;
    let prefilled = metric(&page, "tandem_prefill_tokens_total").unwrap_or(0.0);
    assert!(
        prefilled > 0.0,
        "the prefill worker computed nothing:\n{page}"
    );
    // Nothing queued now, and a rate measured: 0 seconds of backlog.
    assert_eq!(
        metric(&page, "tandem_prefill_backlog_seconds"),
        Some(0.0),
        "{page}"
    );
    let page = metrics_page(&dec_status).await;
    let usage = metric(&page, "tandem_kv_cache_usage_ratio").expect("kv usage gauge");
    assert!((0.0..=1.0).contains(&usage), "{page}");
    assert!(
        metric(&page, "tandem_kv_blocks_total").unwrap_or(0.0) > 0.0,
        "{page}"
    );
}
