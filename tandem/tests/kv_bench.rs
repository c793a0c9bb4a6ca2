//! `tandem kv bench` end to end, small: every transport moves the bytes it claims (the bench
//! itself checks the TCP transfers' checksums and, at the end, the blocks' contents) and the
//! report carries every series it prints.

use serde_json::Value;
use std::process::Command;

/// Runs `tandem ARGS`, which must succeed: its output and the JSON of its last line.
fn run(args: &[&str]) -> (String, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .expect("run tandem");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tandem {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_str(stdout.lines().last().expect("a JSON line"))
        .expect("the last line is JSON");
    (stdout, json)
}

#[test]
fn kv_bench_moves_the_bytes_and_reports_every_series() {
    let (stdout, json) = run(&["kv", "bench", "--mib", "2", "--rounds", "3"]);
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

    // What the bench moved, checked here independently of its own checks: every TCP transfer
    // landed exactly one round's bytes in the blocks, and the blocks hold the source pattern
    // (each layer's slab of it in every block), summed in (layer, block) order.
    let field = |k: &str| json[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    let (bytes, blocks, layers, slab) = (
        field("bytes") as usize,
        field("blocks") as usize,
        field("layers") as usize,
        field("slab_bytes") as usize,
    );
    assert_eq!(bytes, blocks * layers * slab);
    assert!(
        field("tcp_transfers") >= 3,
        "one TCP transfer a round at least"
    );
    assert_eq!(
        field("tcp_landed_bytes"),
        field("tcp_transfers") * bytes as u64
    );
    let src: Vec<u8> = (0..slab * layers)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect();
    let mut crc = crc32fast::Hasher::new();
    for layer in 0..layers {
        for _ in 0..blocks {
            crc.update(&src[layer * slab..][..slab]);
        }
    }
    assert_eq!(field("blocks_checksum"), crc.finalize() as u64);
}

/// `tandem kv store-bench`, small: every read path of the pooled store runs (the bench checks
/// that what landed over TCP and in the shared pool is what was put) and reports its ratio.
#[test]
fn store_bench_reads_every_path_and_reports_its_ratios() {
    let (_, json) = run(&["kv", "store-bench", "--mib", "2", "--rounds", "2"]);
    for ratio in [
        "store_ram_vs_socket",
        "store_ram_vs_socket_mem",
        "store_shm_vs_memcpy",
        "store_disk_vs_read",
        "disk_tier_vs_read_local",
    ] {
        assert!(json[ratio].as_f64().is_some_and(|r| r > 0.0), "{ratio}");
    }
}
