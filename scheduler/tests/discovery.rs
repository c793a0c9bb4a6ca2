//! Discovery through a real etcd (Debian's `etcd-server`; the test starts it on loopback with
//! a temporary data directory and stops it by its own PID): workers that register join the
//! scheduler's routing table and serve, a worker whose lease expires (it died) leaves it, and a
//! new one joins; an entry announcing another model's fingerprint is never dialled; and the
//! same over a locked-down etcd (TLS with client certificates made by `openssl`, RBAC users,
//! a role limited to Tandem's prefix) that refuses whoever lacks the credentials. Runs with
//! `--features etcd` (CI); skipped without it.
#![cfg(feature = "etcd")]

mod common;

use common::nodes::*;
use protocol::discovery::etcd_client::{self, Permission};
use protocol::discovery::{Entry, EtcdConfig, EtcdTls};
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
    etcd_with("http", &[])
}

/// etcd listening for clients on `scheme` (`https` needs `extra` to name its certificates).
fn etcd_with(scheme: &str, extra: &[String]) -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("{scheme}://127.0.0.1:{client}");
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
        .args(extra)
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

fn plain(url: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![url.to_string()],
        ..Default::default()
    }
}

/// A worker registered in etcd, announcing `fingerprint`, for as long as its node lives.
fn registered(
    role: &'static str,
    node: fn(&Path) -> Node,
    model: &Path,
    etcd: &EtcdConfig,
    fingerprint: u64,
) -> Node {
    let n = node(model);
    let entry = Entry {
        addr: n.addr.clone(),
        fingerprint,
    };
    let etcd = etcd.clone();
    // The registration runs on a runtime of its own that dies with the node: its lease
    // then expires as a killed worker's would.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.spawn(protocol::discovery::register(
            etcd,
            role.into(),
            entry,
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
    let etcd = plain(&e.url);
    let (_dir, model) = tiny();
    let c = case(&model, 12, 8, 0xe7cd);
    let (fe, mut cfg) = remote(&model, &[] as &[&Node], &[], "");
    let fp = fe.fingerprint;
    // A worker announcing another model is listed first: it must never be dialled.
    let foreign = registered("decode", decode, &model, &etcd, fp ^ 1);
    let d = registered("decode", decode, &model, &etcd, fp);
    let p1 = registered("prefill", prefill_node, &model, &etcd, fp);
    cfg.etcd = etcd.clone();
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    until("both workers joined", || {
        r.decode_workers().len() == 1 && r.prefill_workers().len() == 1
    })
    .await;
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    assert_eq!(r.decode_workers()[0].addr, d.addr);
    check(&cluster, &c, "discovered 1P+1D").await;
    assert!(r.decode_workers().iter().all(|w| w.addr != foreign.addr));

    // The prefill worker dies: its lease (2 s) expires and it leaves the table.
    let gone = p1.addr.clone();
    p1.kill();
    let t0 = Instant::now();
    until("the dead worker left", || r.prefill_workers().is_empty()).await;
    eprintln!("left the routing table {:?} after the kill", t0.elapsed());
    // Requests still work (the decode worker prefills), and a new prefill worker joins.
    check(&cluster, &c, "decode only").await;
    let p2 = registered("prefill", prefill_node, &model, &etcd, fp);
    until("the new worker joined", || {
        r.prefill_workers()
            .iter()
            .any(|w| w.addr == p2.addr && w.healthy())
    })
    .await;
    assert!(r.prefill_workers().iter().all(|w| w.addr != gone));
    check(&cluster, &c, "rejoined 1P+1D").await;
    assert_eq!(
        r.decode_workers().len(),
        1,
        "the foreign worker never joined"
    );
    drop((d, foreign));
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a certificate it signs for `name` (`usage`: serverAuth or clientAuth), P-256.
fn certificate(dir: &Path, name: &str, usage: &str) {
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
    )
    .unwrap();
    let key = format!("{name}-key.pem");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.pem");
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &crt,
        ],
    );
}

/// A client with the client certificate `name` and no password: etcd takes the certificate's
/// common name for the user.
async fn by_certificate(url: &str, pki: &Path, name: &str) -> etcd_client::Client {
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read("ca.pem")))
        .identity(etcd_client::Identity::from_pem(
            read(&format!("{name}.pem")),
            read(&format!("{name}-key.pem")),
        ));
    etcd_client::Client::connect(
        [url],
        Some(etcd_client::ConnectOptions::new().with_tls(tls)),
    )
    .await
    .unwrap()
}

/// TLS with client certificates and RBAC: workers and the scheduler that hold a user of a
/// role limited to Tandem's prefix, over TLS, with a client certificate, discover each other
/// and serve; without the password, or without the client certificate, etcd refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_through_a_locked_down_etcd() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca-key.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/CN=tandem-test-ca",
            "-days",
            "1",
            "-out",
            "ca.pem",
        ],
    );
    certificate(d, "etcd", "serverAuth");
    certificate(d, "tandem", "clientAuth");
    certificate(d, "stranger", "clientAuth");
    let p = |f: &str| d.join(f).display().to_string();
    let e = etcd_with(
        "https",
        &[
            "--cert-file".into(),
            p("etcd.pem"),
            "--key-file".into(),
            p("etcd-key.pem"),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            p("ca.pem"),
        ],
    );
    let tls = EtcdTls {
        ca_file: d.join("ca.pem"),
        cert_file: Some(d.join("tandem.pem")),
        key_file: Some(d.join("tandem-key.pem")),
    };
    let with = |user: Option<(&str, &str)>, tls: EtcdTls| EtcdConfig {
        endpoints: vec![e.url.clone()],
        user: user.map(|(u, p)| (u.to_string(), p.to_string())),
        tls: Some(tls),
    };

    // Lock it down: a root, a role for Tandem's prefix only, a user with that role.
    let mut admin = by_certificate(&e.url, d, "tandem").await;
    admin.user_add("root", "root-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("tandem").await.unwrap();
    admin
        .role_grant_permission(
            "tandem",
            Permission::read_write(protocol::discovery::PREFIX).with_prefix(),
        )
        .await
        .unwrap();
    admin.user_add("tandem", "tandem-pw", None).await.unwrap();
    admin.user_grant_role("tandem", "tandem").await.unwrap();
    admin.auth_enable().await.unwrap();

    let etcd = with(Some(("tandem", "tandem-pw")), tls.clone());
    let (_dir, model) = tiny();
    let c = case(&model, 12, 8, 0x7151);
    let (fe, mut cfg) = remote(&model, &[] as &[&Node], &[], "");
    let fp = fe.fingerprint;
    let dn = registered("decode", decode, &model, &etcd, fp);
    cfg.etcd = etcd.clone();
    let cluster = Cluster::remote(fe, cfg).unwrap();
    let r = cluster.remote_workers().unwrap().clone();
    until("the worker joined", || r.decode_workers().len() == 1).await;
    assert!(r.wait_ready(Duration::from_secs(10)).await);
    check(&cluster, &c, "discovered over TLS with RBAC").await;

    // A certificate the CA signed, but of no etcd user: no reads of the prefix.
    let mut anon = by_certificate(&e.url, d, "stranger").await;
    assert!(
        anon.get(
            protocol::discovery::PREFIX,
            Some(etcd_client::GetOptions::new().with_prefix())
        )
        .await
        .is_err(),
        "etcd served the registry without credentials"
    );
    // With the wrong password, or without the client certificate: a scheduler discovers
    // nothing.
    for (what, bad) in [
        (
            "a wrong password",
            with(Some(("tandem", "guess")), tls.clone()),
        ),
        (
            "no client certificate",
            with(
                Some(("tandem", "tandem-pw")),
                EtcdTls {
                    cert_file: None,
                    key_file: None,
                    ..tls.clone()
                },
            ),
        ),
    ] {
        let (fe, mut cfg) = remote(&model, &[] as &[&Node], &[], "");
        cfg.etcd = bad;
        let other = Cluster::remote(fe, cfg).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            other.remote_workers().unwrap().decode_workers().is_empty(),
            "{what}: a worker was discovered"
        );
    }
    drop(dn);
}
