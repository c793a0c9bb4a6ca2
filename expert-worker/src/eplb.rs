//! Expert placement with load balancing (DeepSeek-V3's EPLB, one node group): from each
//! expert's load over a window, give the most loaded experts extra replicas (each next
//! replica to the expert with the highest load per replica), then pack the replicas onto the
//! workers, heaviest first, each to the least loaded worker with a free slot that does not
//! hold that expert yet. A replicated expert's rows are split evenly over its replicas
//! ([`split`]), so a worker's load is the sum of its replicas' shares.

/// Which experts each worker holds.
pub type Placement = Vec<Vec<usize>>;

/// Places `load.len()` experts on `workers` workers of `slots` experts each (`workers ×
/// slots ≥ experts`; the slots beyond one per expert hold replicas); never less balanced than
/// [`even`].
pub fn plan(load: &[f64], workers: usize, slots: usize) -> Placement {
    let n = load.len();
    assert!(
        workers >= 1 && workers * slots >= n,
        "{workers} × {slots} slots for {n} experts"
    );
    let extra = (workers * slots - n).min(n * (workers - 1));
    let mut replicas = vec![1usize; n];
    for _ in 0..extra {
        // The expert with the most load per replica that can still take one (at most one
        // replica per worker); ties to the lower expert.
        let e = (0..n)
            .filter(|&e| replicas[e] < workers)
            .max_by(|&a, &b| {
                let (la, lb) = (load[a] / replicas[a] as f64, load[b] / replicas[b] as f64);
                la.total_cmp(&lb).then(b.cmp(&a))
            })
            .expect("some expert has fewer replicas than workers");
        replicas[e] += 1;
    }
    let mut items: Vec<(usize, f64)> = (0..n)
        .flat_map(|e| std::iter::repeat_n((e, load[e] / replicas[e] as f64), replicas[e]))
        .collect();
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut held: Placement = vec![Vec::new(); workers];
    let mut weight = vec![0f64; workers];
    for (e, l) in items {
        let w = (0..workers)
            .filter(|&w| held[w].len() < slots && !held[w].contains(&e))
            .min_by(|&a, &b| weight[a].total_cmp(&weight[b]).then(a.cmp(&b)))
            .expect("a worker with a free slot without this expert");
        held[w].push(e);
        weight[w] += l;
    }
    for h in &mut held {
        h.sort_unstable();
    }
    // Greedy packing can lose to the plain split on a few experts: keep the better.
    let base = even(n, workers);
    if imbalance(&loads(load, &base)) < imbalance(&loads(load, &held)) {
        return base;
    }
    held
}

/// Experts split evenly and in order over `workers` (no replicas): what `tandem up
/// --experts` starts with.
pub fn even(experts: usize, workers: usize) -> Placement {
    (0..workers)
        .map(|i| (i * experts / workers..(i + 1) * experts / workers).collect())
        .collect()
}

/// Each worker's expected load under `placement`: a replicated expert's load shared evenly.
pub fn loads(load: &[f64], placement: &Placement) -> Vec<f64> {
    let mut replicas = vec![0usize; load.len()];
    placement.iter().flatten().for_each(|&e| replicas[e] += 1);
    placement
        .iter()
        .map(|h| h.iter().map(|&e| load[e] / replicas[e] as f64).sum())
        .collect()
}

/// The busiest worker's load over the mean (1: balanced).
pub fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    loads.iter().cloned().fold(0.0, f64::max) / mean.max(f64::MIN_POSITIVE)
}

/// `rows` split over `k` replicas as evenly as possible, in order: replica `i`'s share.
pub fn split(rows: &[u32], k: usize, i: usize) -> &[u32] {
    let (q, r) = (rows.len() / k, rows.len() % k);
    let start = i * q + i.min(r);
    &rows[start..start + q + usize::from(i < r)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    }

    #[test]
    fn every_expert_is_placed_each_worker_fills_its_slots_and_no_worker_holds_one_twice() {
        let mut s = 7u64;
        for _ in 0..500 {
            let n = 2 + (rng(&mut s) * 30.0) as usize;
            let workers = 1 + (rng(&mut s) * 5.0) as usize;
            let slots = n.div_ceil(workers) + (rng(&mut s) * 3.0) as usize;
            let load: Vec<f64> = (0..n).map(|_| rng(&mut s).powi(3) * 100.0 + 0.1).collect();
            let p = plan(&load, workers, slots);
            let mut seen = vec![0usize; n];
            for h in &p {
                assert!(h.len() <= slots);
                let mut u = h.clone();
                u.dedup();
                assert_eq!(&u, h, "a worker holds an expert twice: {h:?}");
                h.iter().for_each(|&e| seen[e] += 1);
            }
            assert!(seen.iter().all(|&c| c >= 1), "{seen:?}");
            // Never worse than the even placement when there is room for replicas.
            let (planned, base) = (
                imbalance(&loads(&load, &p)),
                imbalance(&loads(&load, &even(n, workers))),
            );
            assert!(planned <= base + 1e-9, "{planned} > {base} for {load:?}");
        }
    }

    #[test]
    fn a_skewed_load_is_balanced_by_replicas() {
        // Experts 0-3 take 80% of the rows: 2.0× the mean on the first of two workers, evenly.
        let load = [40.0, 20.0, 12.0, 8.0, 6.0, 6.0, 4.0, 4.0];
        assert!((imbalance(&loads(&load, &even(8, 2))) - 1.6).abs() < 1e-9);
        let p = plan(&load, 2, 5);
        assert!(imbalance(&loads(&load, &p)) <= 1.10, "{p:?}");
        assert_eq!(p.iter().flatten().filter(|&&e| e == 0).count(), 2);
    }

    #[test]
    fn splits_cover_the_rows_in_order() {
        let rows: Vec<u32> = (0..11).collect();
        for k in 1..5 {
            let parts: Vec<u32> = (0..k).flat_map(|i| split(&rows, k, i).to_vec()).collect();
            assert_eq!(parts, rows);
        }
    }
}
