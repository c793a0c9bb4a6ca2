//! Expert parallelism on loopback (rows through shared-memory mailboxes, and on the socket): a mixture's tokens are bit-identical to one
//! process's whatever the placement (2 and 3 workers, replicas, one expert alone), with one
//! or two microbatches in flight, at every precision; EPLB moves experts while steps run; a worker of another model, experts no one holds and a worker gone are errors,
//! not hangs.

use engine::gguf::GgufFile;
use engine::moe::shard::ExpertShard;
use engine::synthetic::{TinySpec, write};
use engine::{Engine, EngineConfig, ForwardItem, LogitsWanted, Precision};
use expert_worker::{Expect, ExpertServer, RemoteExperts, eplb, wire};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn tiny_moe(dir: &Path) -> PathBuf {
    let path = dir.join("moe.gguf");
    write(
        &TinySpec {
            n_layers: 3,
            experts: Some((8, 2)),
            seed: 5,
            ..Default::default()
        },
        &path,
    )
    .unwrap();
    path
}

fn load(path: &Path, precision: Precision) -> Engine {
    Engine::load(
        path,
        &EngineConfig {
            kv_budget_bytes: 8 << 20,
            precision,
            ..Default::default()
        },
    )
    .unwrap()
}

fn serve(path: &Path, precision: Precision, held: &[usize]) -> ExpertServer {
    let g = GgufFile::open(path).unwrap();
    let shard = ExpertShard::load(&g, precision, held).unwrap();
    let fp = wire::fingerprint(&g, precision);
    ExpertServer::bind("127.0.0.1:0", shard, Some(path.into()), fp, None).unwrap()
}

fn expect(path: &Path, precision: Precision) -> Expect {
    let g = GgufFile::open(path).unwrap();
    let cfg = engine::config::LlamaConfig::from_metadata(&g).unwrap();
    Expect {
        n_layers: cfg.n_layers,
        n_experts: cfg.moe.unwrap().n_experts,
        d: cfg.d_model,
        fingerprint: wire::fingerprint(&g, precision),
    }
}

fn remote(
    path: &Path,
    precision: Precision,
    servers: &[ExpertServer],
) -> engine::Result<RemoteExperts> {
    let addrs: Vec<String> = servers.iter().map(|s| s.local_addr().to_string()).collect();
    RemoteExperts::connect(&addrs, None, expect(path, precision))
}

/// Three prompts prefilled in one call (every position's logits), then four greedy decode
/// steps of the three together: every logit's bits.
fn trace(e: &Engine) -> engine::Result<Vec<u32>> {
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|i| {
            (0..9 + 5 * i)
                .map(|t| (t * 31 + i * 17 + 3) % 262)
                .collect()
        })
        .collect();
    let mut seqs: Vec<_> = prompts.iter().map(|_| e.new_sequence()).collect();
    let mut items: Vec<ForwardItem> = seqs
        .iter_mut()
        .zip(&prompts)
        .map(|(seq, p)| ForwardItem {
            seq,
            tokens: p,
            logits: LogitsWanted::All,
        })
        .collect();
    let out = e.model.forward(&mut items)?;
    drop(items);
    let v = e.model.config().vocab_size;
    let mut bits: Vec<u32> = out.iter().flatten().map(|x| x.to_bits()).collect();
    let mut next: Vec<u32> = out
        .iter()
        .map(|l| engine::sampler::argmax(&l[l.len() - v..]))
        .collect();
    for _ in 0..4 {
        let mut batch: Vec<_> = seqs.iter_mut().zip(&next).map(|(s, &t)| (s, t)).collect();
        let out = e.decode_step(&mut batch)?;
        bits.extend(out.iter().flatten().map(|x| x.to_bits()));
        next = out.iter().map(|l| engine::sampler::argmax(l)).collect();
    }
    Ok(bits)
}

#[test]
fn tokens_are_bit_identical_to_one_process_whatever_the_placement() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let placements: &[&[&[usize]]] = &[
        &[&[0, 1, 2, 3], &[4, 5, 6, 7]],
        &[&[0, 2, 4, 6], &[1, 3, 5, 7]],
        &[&[0, 1, 2], &[3, 4, 5], &[6, 7]],
        &[&[7], &[0, 1, 2, 3, 4, 5, 6]],
        // Replicas: the first worker holding an expert computes it.
        &[&[0, 1, 2, 3, 4, 5, 6, 7], &[0, 1, 2, 3]],
        &[&[4, 5, 6, 7], &[0, 1, 2, 3, 4, 5, 6, 7]],
    ];
    for precision in [Precision::F32, Precision::W4A8, Precision::Int8] {
        let want = trace(&load(&path, precision)).unwrap();
        // Rows through shared-memory mailboxes (the default on one host) and on the socket.
        let ways = placements
            .iter()
            .flat_map(|p| [(p, 1, true), (p, 2, true), (p, 1, false)]);
        for (placement, microbatches, shm) in ways {
            let servers: Vec<ExpertServer> = placement
                .iter()
                .map(|h| serve(&path, precision, h))
                .collect();
            let mut e = load(&path, precision);
            let mut r = remote(&path, precision, &servers).unwrap();
            r.set_shm(shm);
            if placement.len() == 2 && placement[0].len() == 8 {
                // Replicas in use: experts 0-3 split over both workers, 4-7 on the first.
                r.set_placement(&vec![(0..8).collect(), (0..4).collect()])
                    .unwrap();
                assert_eq!(r.placement()[0].len(), 2);
            }
            let owners = r.placement();
            let r = Arc::new(r);
            e.model.set_expert_backend(r.clone()).unwrap();
            // Two microbatches in flight: their layers interleave on the workers.
            e.model.set_microbatches(microbatches).unwrap();
            assert!(e.model.weight_bytes() < load(&path, precision).model.weight_bytes());
            let got = trace(&e).unwrap();
            assert!(
                got == want,
                "{precision} placement {placement:?} ({owners:?}), {microbatches} microbatch(es), shm {shm}, differs"
            );
            // Every worker computed some rows here (each holds an expert placed on it).
            let link = if shm { "shm" } else { "tcp" };
            assert_eq!(r.links(), vec![link; placement.len()], "{placement:?}");
        }
    }
}

#[test]
fn an_eplb_placement_from_the_measured_load_keeps_the_tokens_and_balances_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let p = Precision::W4A8;
    let want = trace(&load(&path, p)).unwrap();
    // Every worker holds every expert; which computes what is the placement's choice.
    let all: Vec<usize> = (0..8).collect();
    let servers = [serve(&path, p, &all), serve(&path, p, &all)];
    let mut r = remote(&path, p, &servers).unwrap();
    r.set_placement(&eplb::even(8, 2)).unwrap();
    let r = Arc::new(r);
    let mut e = load(&path, p);
    e.model.set_expert_backend(r.clone()).unwrap();
    assert!(trace(&e).unwrap() == want);
    let window: Vec<f64> = r.stats().expert_rows.iter().map(|&n| n as f64).collect();
    let even_rows = r.stats().rows;
    let planned = eplb::plan(&window, 2, 5);
    let expect = eplb::imbalance(&eplb::loads(&window, &planned));
    assert!(expect <= eplb::imbalance(&eplb::loads(&window, &eplb::even(8, 2))));
    drop(e);
    let mut r = Arc::try_unwrap(r).ok().expect("the engine is gone");
    r.set_placement(&planned).unwrap();
    let before = r.stats();
    let r = Arc::new(r);
    let mut e = load(&path, p);
    e.model.set_expert_backend(r.clone()).unwrap();
    assert!(
        trace(&e).unwrap() == want,
        "a planned placement changed the tokens"
    );
    // The same rows again: the workers' measured loads are the plan's, or more level (the
    // replicas' rows are split per layer and step to level the workers).
    let rows = r.stats().since(&before).rows;
    let got = eplb::imbalance(&rows.iter().map(|&n| n as f64).collect::<Vec<_>>());
    assert!(
        got < expect + 0.05,
        "measured {got} ({rows:?}), planned {expect}; even {even_rows:?}"
    );
    // Placements that cannot be: an expert no worker holds, one left out, too few workers.
    let mut r = remote(&path, p, &servers).unwrap();
    assert!(r.set_placement(&vec![vec![9], all.clone()]).is_err());
    assert!(r.set_placement(&vec![vec![0], vec![1]]).is_err());
    assert!(r.set_placement(&vec![all.clone()]).is_err());
}

#[test]
fn eplb_at_run_time_moves_experts_between_steps_and_keeps_every_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let p = Precision::W4A8;
    let want = trace(&load(&path, p)).unwrap();
    // A lopsided start: one worker computes 7 experts, the other 1; each holds only its own.
    let servers = [
        serve(&path, p, &[7]),
        serve(&path, p, &[0, 1, 2, 3, 4, 5, 6]),
    ];
    let mut r = remote(&path, p, &servers).unwrap();
    let mut bad = |interval, redundant| {
        r.enable_eplb(expert_worker::EplbConfig {
            interval,
            redundant,
        })
        .is_err()
    };
    assert!(bad(0, 0), "an interval of 0 steps");
    assert!(bad(1, 9), "more replicas than one per expert per worker");
    r.enable_eplb(expert_worker::EplbConfig {
        interval: 2,
        redundant: 2,
    })
    .unwrap();
    let start = r.current();
    let r = Arc::new(r);
    let mut e = load(&path, p);
    e.model.set_expert_backend(r.clone()).unwrap();
    let before = r.stats().rows;
    assert!(trace(&e).unwrap() == want);
    let first: Vec<f64> = r.stats().rows.iter().map(|&n| n as f64).collect();
    // Steps go on while the planned experts load; the plan takes effect at a later step.
    let mut traces = 1;
    while r.current() == start {
        assert!(traces < 50, "no new placement after {traces} traces");
        assert!(trace(&e).unwrap() == want, "a step while experts loaded");
        traces += 1;
    }
    let now = r.current();
    // Up to 2 replicas: as many as pay for the fixed cost of running an expert.
    assert!(
        (8..=10).contains(&now.iter().map(Vec::len).sum::<usize>()),
        "every expert placed, at most 2 replicas: {now:?}"
    );
    let rows0 = r.stats().rows;
    assert!(trace(&e).unwrap() == want, "after the new placement");
    let rows1 = r.stats().rows;
    let last: Vec<f64> = rows1
        .iter()
        .zip(&rows0)
        .map(|(a, b)| (a - b) as f64)
        .collect();
    assert!(
        eplb::imbalance(&last) < eplb::imbalance(&first) - 0.2,
        "imbalance {} before ({before:?} → {first:?}), {} after ({now:?})",
        eplb::imbalance(&first),
        eplb::imbalance(&last)
    );
}

#[test]
fn a_static_placement_loads_what_each_worker_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let p = Precision::Int8;
    let want = trace(&load(&path, p)).unwrap();
    let servers = [
        serve(&path, p, &[0, 1, 2, 3]),
        serve(&path, p, &[4, 5, 6, 7]),
    ];
    let mut r = remote(&path, p, &servers).unwrap();
    let placement = vec![vec![0, 1, 2, 3, 4], vec![0, 4, 5, 6, 7]];
    r.place(&placement).unwrap();
    assert_eq!(r.current(), placement);
    assert!(
        r.place(&vec![vec![0, 9], vec![1]]).is_err(),
        "expert 9 of 8"
    );
    let mut e = load(&path, p);
    e.model.set_expert_backend(Arc::new(r)).unwrap();
    assert!(trace(&e).unwrap() == want);
}

#[test]
fn wrong_model_missing_experts_and_a_dense_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    // Another precision is another fingerprint.
    let s = [serve(&path, Precision::F32, &[0, 1, 2, 3, 4, 5, 6, 7])];
    let err = remote(&path, Precision::W4A8, &s)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another model or precision"), "{err}");
    let s = [
        serve(&path, Precision::W4A8, &[0, 1, 2]),
        serve(&path, Precision::W4A8, &[4, 5]),
    ];
    let err = remote(&path, Precision::W4A8, &s)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("[3, 6, 7]"), "{err}");
    let dense = dir.path().join("dense.gguf");
    write(&TinySpec::default(), &dense).unwrap();
    let g = GgufFile::open(&dense).unwrap();
    assert!(ExpertShard::load(&g, Precision::W4A8, &[0]).is_err());
    let mut e = load(&dense, Precision::W4A8);
    let r = remote(
        &path,
        Precision::W4A8,
        &[serve(&path, Precision::W4A8, &[0, 1, 2, 3, 4, 5, 6, 7])],
    )
    .unwrap();
    let err = e
        .model
        .set_expert_backend(Arc::new(r))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dense"), "{err}");
}

/// An engine on `servers`' experts.
fn engine_on(path: &Path, servers: &[ExpertServer]) -> (Engine, Arc<RemoteExperts>) {
    let mut e = load(path, Precision::W4A8);
    let r = Arc::new(remote(path, Precision::W4A8, servers).unwrap());
    e.model.set_expert_backend(r.clone()).unwrap();
    (e, r)
}

#[test]
fn a_lost_workers_experts_move_to_a_survivor_and_the_tokens_do_not_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let want = trace(&load(&path, Precision::W4A8)).unwrap();
    let mut servers = vec![
        serve(&path, Precision::W4A8, &[0, 1, 2, 3]),
        serve(&path, Precision::W4A8, &[4, 5, 6, 7]),
    ];
    let (e, r) = engine_on(&path, &servers);
    assert!(trace(&e).unwrap() == want);
    // Lost between steps: the survivor loads experts 4-7 from its model file.
    let survivor = servers[0].local_addr().to_string();
    servers.pop().unwrap().stop();
    assert!(trace(&e).unwrap() == want, "after losing a worker");
    assert!(
        r.placement()
            .iter()
            .all(|o| o == std::slice::from_ref(&survivor)),
        "{:?}",
        r.placement()
    );
    // With replicas, nothing needs loading: the replica computes all of the expert's rows.
    let servers = vec![
        serve(&path, Precision::W4A8, &[0, 1, 2, 3, 4, 5, 6, 7]),
        serve(&path, Precision::W4A8, &[0, 1, 2, 3]),
    ];
    let mut r = remote(&path, Precision::W4A8, &servers).unwrap();
    r.set_placement(&vec![(0..8).collect(), (0..4).collect()])
        .unwrap();
    let r = Arc::new(r);
    let mut e = load(&path, Precision::W4A8);
    e.model.set_expert_backend(r.clone()).unwrap();
    assert!(trace(&e).unwrap() == want);
    let mut servers = servers;
    servers.pop().unwrap().stop();
    assert!(trace(&e).unwrap() == want, "after losing a replica");
    assert_eq!(r.placement()[0].len(), 1);
}

#[test]
fn with_no_worker_left_the_step_fails_instead_of_hanging_and_the_restarted_one_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let all: Vec<usize> = (0..8).collect();
    let only = serve(&path, Precision::W4A8, &all);
    let (e, _) = engine_on(&path, std::slice::from_ref(&only));
    let want = trace(&e).unwrap();
    let addr = only.local_addr();
    only.stop();
    let t = std::time::Instant::now();
    let Err(err) = trace(&e) else {
        panic!("a step without its experts succeeded")
    };
    let err = err.to_string();
    assert!(err.contains("expert worker"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(10));
    // Restarted on its address (as `tandem up` restarts it): the next steps reach it again.
    let g = GgufFile::open(&path).unwrap();
    let shard = ExpertShard::load(&g, Precision::W4A8, &all).unwrap();
    let fp = wire::fingerprint(&g, Precision::W4A8);
    let _back = ExpertServer::bind(&addr.to_string(), shard, None, fp, None).unwrap();
    assert!(trace(&e).unwrap() == want, "after the worker came back");
}

#[test]
fn a_run_past_the_first_mailbox_grows_it_and_matches_the_socket() {
    use engine::moe::{ExpertBackend, Groups};
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let precision = Precision::W4A8;
    let servers = vec![
        serve(&path, precision, &[0, 1, 2, 3]),
        serve(&path, precision, &[4, 5, 6, 7]),
    ];
    let d = 64;
    // 10,000 rows of 64 (2.5 MiB), each to 2 experts: either worker needs more than a first
    // mailbox's 1 MiB of rows.
    let n = 10_000usize;
    let mut s = 0x9e37_79b9u32;
    let h: Vec<f32> = (0..n * d)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect();
    let mut rows = vec![Vec::new(); 8];
    for r in 0..n as u32 {
        rows[(r % 8) as usize].push(r);
        rows[((r * 7 + 3) % 8) as usize].push(r);
    }
    for r in &mut rows {
        r.sort_unstable();
        r.dedup();
    }
    let groups = Groups {
        rows,
        at: Vec::new(),
    };
    let shm = remote(&path, precision, &servers).unwrap();
    let mut tcp = remote(&path, precision, &servers).unwrap();
    tcp.set_shm(false);
    let small = Groups {
        rows: (0..8).map(|e| vec![e as u32]).collect(),
        at: Vec::new(),
    };
    let first = shm.run(0, &h, d, &small).unwrap();
    assert_eq!(shm.links(), vec!["shm"; 2]);
    assert_eq!(first, tcp.run(0, &h, d, &small).unwrap());
    for layer in 0..3 {
        let got = shm.run(layer, &h, d, &groups).unwrap();
        assert_eq!(shm.links(), vec!["shm"; 2], "grown, still shared memory");
        let want = tcp.run(layer, &h, d, &groups).unwrap();
        assert_eq!(tcp.links(), vec!["tcp"; 2]);
        assert!(
            got == want,
            "layer {layer}: shared memory and the socket differ"
        );
        assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 2 * n * d);
    }
}

#[test]
fn a_restarted_worker_gets_its_experts_back_between_steps() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_moe(dir.path());
    let p = Precision::W4A8;
    let want = trace(&load(&path, p)).unwrap();
    let (first, second) = ((0..4).collect::<Vec<_>>(), (4..8).collect::<Vec<_>>());
    let servers = vec![serve(&path, p, &first), serve(&path, p, &second)];
    let (e, r) = engine_on(&path, &servers);
    let home = vec![first.clone(), second.clone()];
    assert_eq!(r.current(), home);
    assert!(trace(&e).unwrap() == want);
    let mut servers = servers;
    let gone = servers.pop().unwrap();
    let addr = gone.local_addr();
    gone.stop();
    assert!(trace(&e).unwrap() == want, "after the loss");
    assert_eq!(r.current(), vec![(0..8).collect::<Vec<_>>(), vec![]]);
    // Restarted on its address with its own experts: probed between steps, it gets them back.
    let g = GgufFile::open(&path).unwrap();
    let shard = ExpertShard::load(&g, p, &second).unwrap();
    let fp = wire::fingerprint(&g, p);
    let _back = ExpertServer::bind(&addr.to_string(), shard, Some(path.clone()), fp, None).unwrap();
    let t = std::time::Instant::now();
    while r.current() != home {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "not handed back"
        );
        assert!(trace(&e).unwrap() == want, "a step while it was probed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let before = r.stats().rows;
    assert!(trace(&e).unwrap() == want, "after the hand-back");
    let after = r.stats().rows;
    assert!(
        after[1] > before[1],
        "the restarted worker computes again: {after:?}"
    );
}
