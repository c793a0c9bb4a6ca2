//! The HTTP server's bounds: beyond `max_connections` open connections, new ones are closed at
//! accept (the server keeps serving the ones it has); once they go, new ones are served again.
//! (The header and body read timeouts, 10 s and 30 s, are exercised by
//! `scripts/check/http_abuse.py`'s slowloris run.)

mod common;

use std::io::Read;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_accept() {
    let srv = common::start(common::Options {
        max_connections: 3,
        ..Default::default()
    })
    .await;
    let addr = srv.url.trim_start_matches("http://").to_string();
    let health = format!("{}/health", srv.url);
    assert!(reqwest::get(&health).await.unwrap().status().is_success());
    let a2 = addr.clone();
    let held = tokio::task::spawn_blocking(move || {
        // Three idle sockets fill the server.
        let held: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect(&a2).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        // One beyond is closed at once: it reads end of stream, not a timeout. (On a loaded
        // machine the server may not have accepted all three yet, so the first extra one may
        // still fit: it is kept open and the next one tried.)
        let mut extras = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let mut extra = std::net::TcpStream::connect(&a2).unwrap();
            extra
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut b = [0u8; 1];
            let r = extra.read(&mut b);
            let closed = matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
            if closed {
                last = None;
                break;
            }
            last = Some(format!("{r:?}"));
            extras.push(extra);
        }
        assert!(
            last.is_none(),
            "no connection beyond the cap was closed: {last:?}"
        );
        drop(extras);
        held
    })
    .await
    .unwrap();
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(reqwest::get(&health).await.unwrap().status().is_success());
}
