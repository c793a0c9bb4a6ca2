//! `tandem kv bench` end to end, small: every transport moves the bytes it claims (the bench
//! itself checks the TCP transfers' checksums and, at the end, the blocks' contents) and the
//! report carries every series it prints.

use serde_json::Value;
use std::process::Command;

#[test]
fn kv_bench_moves_the_bytes_and_reports_every_series() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["kv", "bench", "--mib", "2", "--rounds", "3"])
        .output()
        .expect("run tandem kv bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tandem kv bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line"))
        .expect("the last line is JSON");
    assert_eq!(json["rounds"], 3);
    for series in [
        "memcpy",
        "shm",
        "private",
        "shm_layers",
        "private_layers",
        "tcp",
        "socket",
        "socket_plain",
        "socket_wait",
        "checksum_hook",
        "checksum",
    ] {
        let gbs = json[format!("{series}_gbs")].as_f64();
        assert!(gbs.is_some_and(|g| g > 0.0), "{series}: {gbs:?}");
    }
    for ratio in [
        "shm_vs_memcpy",
        "tcp_vs_socket",
        "shm_layers_vs_private_layers",
    ] {
        assert!(json[ratio].as_f64().is_some_and(|r| r > 0.0), "{ratio}");
    }
    assert!(stdout.contains("| tcp: a layer's slabs per frame into the blocks |"));
}
