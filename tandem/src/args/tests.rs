//! Every child command line `tandem up` generates parses back to its values.

use super::*;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "tandem")]
enum Role {
    Expert(ExpertArgs),
    Decode(DecodeArgs),
    Prefill(PrefillArgs),
    Scheduler(SchedulerArgs),
    KvStore(KvStoreArgs),
}

fn parse(args: Vec<String>) -> Role {
    Role::try_parse_from(std::iter::once("tandem".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn model() -> ModelArgs {
    ModelArgs {
        model: Some("/models/m.gguf".into()),
        served_model_name: Some("m".into()),
        precision: engine::Precision::Int8,
        kv_cache_dtype: engine::KvDtype::F32,
        device: engine::Device::Cuda,
    }
}

fn compute(cpus: Vec<usize>) -> ComputeArgs {
    ComputeArgs {
        threads: Some(3),
        kv_cache_mib: 77,
        cpus,
    }
}

/// What `tandem up` generates for its children parses back to the very values, with every
/// field away from its default (so a flag dropped or misnamed fails here).
#[test]
fn child_command_lines_parse_back_to_their_values() {
    let d = DecodeArgs {
        listen: "127.0.0.1:1234".into(),
        kv_listen: Some("127.0.0.1:0".into()),
        no_shm: true,
        status_listen: Some("0.0.0.0:9090".into()),
        cluster: ClusterArgs {
            cluster_secret_file: Some("/run/secrets/tandem".into()),
        },
        discovery: DiscoveryArgs {
            etcd: EtcdArgs {
                etcd: vec!["https://a:1".into(), "https://b:2".into()],
                etcd_user: Some("tandem".into()),
                etcd_password_file: Some("/run/secrets/etcd-pw".into()),
                etcd_ca_file: Some("/etc/etcd/ca.pem".into()),
                etcd_cert_file: Some("/etc/etcd/client.pem".into()),
                etcd_key_file: Some("/etc/etcd/client-key.pem".into()),
            },
            etcd_ttl_secs: 9,
            advertise_host: Some("10.0.0.2".into()),
        },
        batch: BatchArgs {
            max_num_batched_tokens: 100,
            max_num_seqs: 7,
            max_queue: 5,
        },
        sharing: SharingArgs {
            share_cores: Some("/tmp/up/cores".into()),
            pace_ms: Some(12.5),
            hold_ms: Some(2500.0),
            pace_profile: Some("/var/cache/tandem/profile.json".into()),
        },
        store: StoreUseArgs {
            kv_store_addr: Some("10.0.0.9:50071".into()),
            kv_store_write_through: true,
        },
        experts: ExpertUseArgs {
            expert_workers: vec!["127.0.0.1:5".into(), "10.0.0.3:6".into()],
            serving: ExpertServingArgs {
                microbatches: 2,
                eplb_interval: Some(50),
                redundant_experts: 2,
                expert_placement: Some("/etc/tandem/placement.json".into()),
                no_expert_shm: true,
            },
        },
        model: model(),
        compute: compute(vec![1, 2]),
        telemetry: TelemetryArgs {
            otlp_endpoint: Some("http://collector:4317".into()),
            log_format: LogFormat::Json,
        },
    };
    match parse(d.to_args()) {
        Role::Decode(got) => assert_eq!(got, d),
        other => panic!("{other:?}"),
    }
    let p = PrefillArgs {
        listen: "127.0.0.1:99".into(),
        max_prefill_tokens: 300,
        max_prefill_waiting: 3,
        status_listen: Some("[::]:9091".into()),
        kv_store_addr: Some("10.0.0.9:50071".into()),
        cluster: ClusterArgs {
            cluster_secret_file: Some("/s".into()),
        },
        discovery: DiscoveryArgs {
            etcd: EtcdArgs::default(),
            etcd_ttl_secs: 2,
            advertise_host: None,
        },
        sharing: SharingArgs {
            share_cores: Some("/tmp/up/cores".into()),
            pace_ms: None,
            hold_ms: None,
            pace_profile: None,
        },
        experts: ExpertUseArgs {
            expert_workers: vec!["127.0.0.1:7".into()],
            serving: ExpertServingArgs::default(),
        },
        model: model(),
        compute: compute(vec![0]),
        telemetry: TelemetryArgs::default(),
    };
    match parse(p.to_args()) {
        Role::Prefill(got) => assert_eq!(got, p),
        other => panic!("{other:?}"),
    }
    let s = SchedulerArgs {
        http: HttpArgs {
            host: "0.0.0.0".into(),
            port: 1,
            max_body_bytes: 12,
            max_connections: 17,
            api_key: None,
            max_model_len: Some(96),
        },
        prefill: vec!["a:1".into(), "b:2".into()],
        decode: vec!["c:3".into()],
        etcd: EtcdArgs {
            etcd: vec!["http://e:4".into()],
            etcd_user: Some("sched".into()),
            etcd_password_file: Some("/pw".into()),
            ..Default::default()
        },
        cluster: ClusterArgs {
            cluster_secret_file: Some("/t".into()),
        },
        routing: RoutingArgs {
            disagg_min_tokens: Some(5),
            max_prefill_queue: Some(2),
            cost_profile: Some("/p.json".into()),
            slo_ttft_ms: 3000,
            slo_tpot_ms: 25,
            kv_transport: KvTransportArg::Tcp,
            hold_secs: 4,
            max_inflight: 11,
            prefill_timeout_secs: 13,
            router_mode: RouterMode::Load,
            router_temperature: 0.25,
            router_credit_ram: 0.5,
            router_credit_disk: 0.125,
        },
        kv_store_addr: Some("10.0.0.9:50071".into()),
        model: model(),
        telemetry: TelemetryArgs {
            otlp_endpoint: Some("http://otel:4317".into()),
            log_format: LogFormat::Text,
        },
    };
    match parse(s.to_args()) {
        Role::Scheduler(got) => assert_eq!(got, s),
        other => panic!("{other:?}"),
    }
    let k = KvStoreArgs {
        listen: "0.0.0.0:7".into(),
        data_listen: Some("0.0.0.0:8".into()),
        tiers: StoreTierArgs {
            ram_mib: 5,
            disk_dir: Some("/var/lib/tandem/kv".into()),
            disk_gib: 0.5,
        },
        status_listen: Some("0.0.0.0:9".into()),
        advertise_host: Some("10.1.2.3".into()),
        cluster: ClusterArgs {
            cluster_secret_file: Some("/k".into()),
        },
        telemetry: TelemetryArgs::default(),
    };
    match parse(k.to_args()) {
        Role::KvStore(got) => assert_eq!(got, k),
        other => panic!("{other:?}"),
    }
    let x = ExpertArgs {
        listen: "127.0.0.1:11".into(),
        experts: vec!["0-3".into(), "6".into()],
        status_listen: Some("127.0.0.1:12".into()),
        cluster: ClusterArgs {
            cluster_secret_file: Some("/x".into()),
        },
        model: model(),
        compute: compute(vec![1]),
        telemetry: TelemetryArgs::default(),
    };
    match parse(x.to_args()) {
        Role::Expert(got) => assert_eq!(got, x),
        other => panic!("{other:?}"),
    }
    assert_eq!(parse_experts(&x.experts).unwrap(), [0, 1, 2, 3, 6]);
    assert!(parse_experts(&["3-1".into()]).is_err());
    assert!(parse_experts(&["x".into()]).is_err());
    // The API key never appears on a command line; it travels in the environment.
    let keyed = HttpArgs {
        api_key: Some("sk-secret".into()),
        ..s.http.clone()
    };
    assert!(!keyed.to_args().concat().contains("sk-secret"));
    assert_eq!(
        keyed.child_env(),
        [("TANDEM_API_KEY".to_string(), "sk-secret".to_string())]
    );
}

/// Flags left out take the libraries' defaults.
#[test]
fn defaults_are_the_libraries() {
    let Role::Decode(d) = parse(vec!["decode".into()]) else {
        unreachable!()
    };
    let w = d.batch.worker_config();
    let lib = decode_worker::WorkerConfig::default();
    assert_eq!(
        (w.max_batch_tokens, w.max_running, w.max_waiting),
        (lib.max_batch_tokens, lib.max_running, lib.max_waiting)
    );
    let Role::Scheduler(s) = parse(vec!["scheduler".into(), "--decode".into(), "x:1".into()])
    else {
        unreachable!()
    };
    let (got, lib) = (
        s.routing.config().unwrap(),
        scheduler::remote::RemoteConfig::default(),
    );
    assert_eq!(
        (
            got.disagg_min_tokens,
            got.hold,
            got.max_inflight,
            got.transport,
            got.placement.is_none()
        ),
        (
            lib.disagg_min_tokens,
            lib.hold,
            lib.max_inflight,
            lib.transport,
            true
        )
    );
}
