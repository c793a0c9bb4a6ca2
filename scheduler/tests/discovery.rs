//! Discovery through a real etcd (Debian's `etcd-server`; the test starts it on loopback with
//! a temporary data directory and stops it by its own PID): workers that register join the
//! scheduler's routing table and serve, a worker whose lease expires (it died) leaves it, and a
//! new one joins. Runs with `--features etcd` (CI); skipped without it.
#![cfg(feature = "etcd")]

mod common;

use common::nodes::*;
use scheduler::cluster::Cluster;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "tandem-test", "--data-dir"])
        .arg(dir.path())
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("tandem-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (apt-get install etcd-server)");
    let e = Etcd {
        child,
        url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    e
}

/// A worker registered in etcd for as long as its node lives.
fn registered(role: &'static str, node: fn(&Path) -> Node, model: &Path, etcd: &str) -> Node {
    let n = node(model);
    let (addr, endpoints) = (n.addr.clone(), vec![etcd.to_string()]);
    // The registration runs on a runtime of its own that dies with the node: its lease
    // then expires as a killed worker's would.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.spawn(protocol::discovery::register(
            endpoints,
            role.into(),
            addr,
            Duration::from_secs(2),
            std::future::pending(),
        ));
        let _ = stop_rx.recv();
        rt.shutdown_background();
    });
    n.with_companion(stop_tx)
}

fn decode(model: &Path) -> Node {
    let dir = model.parent().unwrap().to_path_buf();
    decode_node(model, &dir, "127.0.0.1:0", 64)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_and_leave_the_routing_table_through_etcd() {
    let e = etcd();
    let (_dir, model) = tiny();
    let c = case(&model, 12, 8, 0xe7cd);
    let d = registered("decode", decode, &model, &e.url);
    let p1 = registered("prefill", prefill_node, &model, &e.url);
    let (fe, mut cfg) = remote(&model, &[] as &[&Node], &[], "");
    cfg.etcd = vec![e.url.clone()];
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    until("both workers joined", || {
        r.decode_workers().len() == 1 && r.prefill_workers().len() == 1
    })
    .await;
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    assert_eq!(r.decode_workers()[0].addr, d.addr);
    check(&cluster, &c, "discovered 1P+1D").await;

    // The prefill worker dies: its lease (2 s) expires and it leaves the table.
    let gone = p1.addr.clone();
    p1.kill();
    let t0 = Instant::now();
    until("the dead worker left", || r.prefill_workers().is_empty()).await;
    eprintln!("left the routing table {:?} after the kill", t0.elapsed());
    // Requests still work (the decode worker prefills), and a new prefill worker joins.
    check(&cluster, &c, "decode only").await;
    let p2 = registered("prefill", prefill_node, &model, &e.url);
    until("the new worker joined", || {
        r.prefill_workers()
            .iter()
            .any(|w| w.addr == p2.addr && w.healthy())
    })
    .await;
    assert!(r.prefill_workers().iter().all(|w| w.addr != gone));
    check(&cluster, &c, "rejoined 1P+1D").await;
    drop(d);
}
