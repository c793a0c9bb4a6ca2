//! Expert placement with load balancing (DeepSeek-V3's EPLB, one node group): from each
//! expert's load over a window, give the most loaded experts extra replicas (each next
//! replica to the expert with the highest load per replica), then pack the replicas onto the
//! workers, heaviest first, each to the least loaded worker with a free slot that does not
//! hold that expert yet.
//!
//! A replicated expert's rows are not split by a fixed rule: in every layer of every step,
//! [`assign`] gives them to its replicas so as to level the workers' costs for the rows that
//! step really routed — the placement is shared by the layers, the split is each layer's own
//! (DeepSeek's EPLB places per layer; here the replicas absorb each layer's and each step's
//! imbalance, with one set of weights per worker). Any split gives the same bits: the kernels
//! are batch-invariant and the outputs are combined in row order.
//!
//! Rows are not the whole cost, and a step pays each layer's busiest worker, not the busiest
//! over the layers' sum: running an expert at all costs about as much as some rows (its weights
//! are read once per run however few rows it has: at decode batches, where each expert gets a
//! few rows, this share is large), and one placement serves every layer, whose loads differ.
//! [`plan_costed`] packs the summed load with every number of replicas the slots allow and
//! keeps the plan whose [`step_cost`] — per layer, the busiest worker's rows plus a fixed cost
//! per replica run (measured: [`CostFit`]) — is least: replicas where they pay (a hot expert's
//! replicas split its rows in every layer), a permutation where they do not.

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
    // Greedy packing can lose to the plain split on a few experts: keep the better.
    let planned = pack(load, workers, slots, extra, 0.0);
    let base = even(n, workers);
    if imbalance(&loads(load, &base)) < imbalance(&loads(load, &planned)) {
        return base;
    }
    planned
}

/// Rows per expert of each layer over a window: `[layer][expert]`.
pub type LayerLoad = Vec<Vec<f64>>;

/// What a window of `layer_load` costs under `placement`: over the layers, the busiest
/// worker's cost once [`assign`] has split the replicated experts' rows — its rows plus
/// `fixed` (in rows, over the window) for each expert it gets rows of in that layer.
pub fn step_cost(layer_load: &[Vec<f64>], placement: &Placement, fixed: f64) -> f64 {
    let owner = owners(placement, layer_load.first().map_or(0, Vec::len));
    layer_load
        .iter()
        .map(|load| {
            let rows: Vec<usize> = load.iter().map(|&r| r.round() as usize).collect();
            assign(&rows, &owner, placement.len(), fixed)
                .cost
                .into_iter()
                .fold(0.0, f64::max)
        })
        .sum()
}

/// Each expert's workers under `placement`, in worker order.
pub fn owners(placement: &Placement, experts: usize) -> Vec<Vec<usize>> {
    let mut owner = vec![Vec::new(); experts];
    for (w, held) in placement.iter().enumerate() {
        for &e in held {
            if !owner[e].contains(&w) {
                owner[e].push(w);
            }
        }
    }
    owner
}

/// How one layer's rows go to the workers in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    /// Rows of each expert for each of its replicas: `shares[e][i]` for worker `owner[e][i]`.
    pub shares: Vec<Vec<usize>>,
    /// Each worker's cost: its rows plus `fixed` for every expert it gets rows of.
    pub cost: Vec<f64>,
}

/// Splits `rows[e]` rows of each expert over its replicas `owner[e]` (workers below
/// `workers`) so that the busiest worker's cost — rows, plus `fixed` rows' worth for each
/// expert it runs (its weights are read however few its rows) — is low: an expert with one
/// replica goes to it; replicated experts start whole on their least costly replica (the
/// largest first), whole on their first, or split evenly, and from each start, while it
/// lowers the busiest worker's cost, rows of one of its replicated experts move to another
/// replica (all of them, when that saves the busiest worker the expert's run); the best of the
/// three is kept. Deterministic; never costlier than the even split or than every expert on
/// its first replica.
pub fn assign(rows: &[usize], owner: &[Vec<usize>], workers: usize, fixed: f64) -> Assignment {
    let mut base = Assignment {
        shares: owner.iter().map(|o| vec![0; o.len()]).collect(),
        cost: vec![0f64; workers],
    };
    let mut replicated = Vec::new();
    for (e, &n) in rows.iter().enumerate() {
        match owner[e].len() {
            _ if n == 0 => {}
            1 => base.give(e, 0, n, owner, fixed),
            _ => replicated.push(e),
        }
    }
    if replicated.is_empty() {
        return base;
    }
    replicated.sort_by(|&a, &b| rows[b].cmp(&rows[a]).then(a.cmp(&b)));
    let mut least = base.clone();
    for &e in &replicated {
        let c = &least.cost;
        let i = (0..owner[e].len())
            .min_by(|&a, &b| c[owner[e][a]].total_cmp(&c[owner[e][b]]).then(a.cmp(&b)))
            .expect("replicated");
        least.give(e, i, rows[e], owner, fixed);
    }
    let (mut first, mut even) = (base.clone(), base);
    for &e in &replicated {
        first.give(e, 0, rows[e], owner, fixed);
        let k = owner[e].len();
        for i in 0..k {
            even.give(
                e,
                i,
                rows[e] / k + usize::from(i < rows[e] % k),
                owner,
                fixed,
            );
        }
    }
    [least, first, even]
        .into_iter()
        .map(|mut a| {
            a.level(&replicated, owner, fixed);
            a
        })
        .min_by(|a, b| a.busiest().total_cmp(&b.busiest()))
        .expect("three starts")
}

impl Assignment {
    /// The busiest worker's cost.
    pub fn busiest(&self) -> f64 {
        self.cost.iter().cloned().fold(0.0, f64::max)
    }

    /// `n` more rows of expert `e` to its replica `i`.
    fn give(&mut self, e: usize, i: usize, n: usize, owner: &[Vec<usize>], fixed: f64) {
        if n == 0 {
            return;
        }
        let open = if self.shares[e][i] == 0 { fixed } else { 0.0 };
        self.shares[e][i] += n;
        self.cost[owner[e][i]] += open + n as f64;
    }

    /// `n` rows of expert `e` off its replica `i`.
    fn take(&mut self, e: usize, i: usize, n: usize, owner: &[Vec<usize>], fixed: f64) {
        let closed = if self.shares[e][i] == n { fixed } else { 0.0 };
        self.shares[e][i] -= n;
        self.cost[owner[e][i]] -= closed + n as f64;
    }

    /// Moves rows of `replicated` experts off the busiest worker while a move lowers its cost
    /// without another worker rising to it: each move lowers the maximum or the number of
    /// workers at it (bounded all the same).
    fn level(&mut self, replicated: &[usize], owner: &[Vec<usize>], fixed: f64) {
        let workers = self.cost.len();
        for _ in 0..4 * (replicated.len() + 1) * workers {
            let c = &self.cost;
            let b = (0..workers)
                .max_by(|&x, &y| c[x].total_cmp(&c[y]).then(y.cmp(&x)))
                .expect("a worker");
            let top = c[b];
            // (new max of the pair, expert, from replica, to replica, rows moved)
            let mut best: Option<(f64, usize, usize, usize, usize)> = None;
            for &e in replicated {
                let Some(from) = owner[e].iter().position(|&w| w == b) else {
                    continue;
                };
                let have = self.shares[e][from];
                if have == 0 {
                    continue;
                }
                for to in (0..owner[e].len()).filter(|&to| to != from) {
                    let o = owner[e][to];
                    let open = if self.shares[e][to] == 0 { fixed } else { 0.0 };
                    let half = ((top - c[o] - open) / 2.0).floor().max(0.0) as usize;
                    for x in [half, half + 1, have] {
                        let x = x.clamp(1, have);
                        let freed = if x == have { fixed } else { 0.0 };
                        let after = (top - x as f64 - freed).max(c[o] + open + x as f64);
                        if after < top - 1e-9 && best.is_none_or(|m| after < m.0 - 1e-9) {
                            best = Some((after, e, from, to, x));
                        }
                    }
                }
            }
            let Some((_, e, from, to, x)) = best else {
                return;
            };
            self.take(e, from, x, owner, fixed);
            self.give(e, to, x, owner, fixed);
        }
    }
}

/// The experts of `layer_load` (`[layer][expert]`) on `workers` workers of up to `slots`
/// experts: the summed load packed with every number of replicas up to the slots' room, and
/// the even split, and the one of least [`step_cost`] kept (the fewer replicas on a tie).
pub fn plan_costed(layer_load: &[Vec<f64>], workers: usize, slots: usize, fixed: f64) -> Placement {
    let n = layer_load.first().map_or(0, Vec::len);
    assert!(
        workers >= 1 && workers * slots >= n,
        "{workers} × {slots} slots for {n} experts"
    );
    let load: Vec<f64> = (0..n)
        .map(|e| layer_load.iter().map(|l| l[e]).sum())
        .collect();
    let most = (workers * slots - n).min(n * (workers - 1));
    let cost = |p: &Placement| step_cost(layer_load, p, fixed);
    let mut best = even(n, workers);
    for extra in 0..=most {
        let p = pack(&load, workers, slots, extra, fixed);
        if cost(&p) < cost(&best) {
            best = p;
        }
    }
    best
}

/// `extra` replicas to the experts with the most load per replica, then every replica, the
/// heaviest first, to the least loaded worker with a free slot not holding that expert (a
/// replica weighing its share of the load plus `fixed`, what running it costs).
fn pack(load: &[f64], workers: usize, slots: usize, extra: usize, fixed: f64) -> Placement {
    let n = load.len();
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
        weight[w] += l + fixed;
    }
    for h in &mut held {
        h.sort_unstable();
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

/// A least-squares fit of a worker's compute time for a run to `per_run + fixed · experts +
/// per_row · rows`, from the runs' measured times: the fixed cost of running an expert (its
/// weights read however few its rows), apart from what every run costs (the message, waking
/// up). Runs that always have as many experts (a placement that never changes) cannot tell
/// the two apart: the fit then gives none, and EPLB weighs rows alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CostFit {
    /// Σ of x xᵀ over the runs, x = (1, experts, rows), upper triangle row by row.
    xx: [f64; 6],
    /// Σ of x · seconds.
    xt: [f64; 3],
}

impl CostFit {
    /// A run of `experts` experts over `rows` rows (their sum) that took `secs`.
    pub fn add(&mut self, experts: usize, rows: usize, secs: f64) {
        let x = [1.0, experts as f64, rows as f64];
        let mut k = 0;
        for i in 0..3 {
            for j in i..3 {
                self.xx[k] += x[i] * x[j];
                k += 1;
            }
            self.xt[i] += x[i] * secs;
        }
    }

    fn zip(&self, other: &CostFit, f: impl Fn(f64, f64) -> f64) -> CostFit {
        CostFit {
            xx: std::array::from_fn(|i| f(self.xx[i], other.xx[i])),
            xt: std::array::from_fn(|i| f(self.xt[i], other.xt[i])),
        }
    }

    /// The runs of `self` not in `earlier` (a window).
    pub fn since(&self, earlier: &CostFit) -> CostFit {
        self.zip(earlier, |a, b| a - b)
    }

    /// The runs of both.
    pub fn plus(&self, more: &CostFit) -> CostFit {
        self.zip(more, |a, b| a + b)
    }

    /// `(fixed seconds per expert run, seconds per row)`, if the runs determine them (their
    /// experts and rows varied enough) and both came out positive.
    pub fn solve(&self) -> Option<(f64, f64)> {
        let [a, b, c, d, e, f] = self.xx;
        let m = [[a, b, c], [b, d, e], [c, e, f]];
        let det3 = |m: &[[f64; 3]; 3]| {
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
                - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        };
        let det = det3(&m);
        // Relative to the diagonal's product: near 0 when a column is (nearly) a multiple of
        // another, e.g. every run with as many experts.
        if det.is_nan() || det <= 1e-6 * a * d * f {
            return None;
        }
        // Cramer's rule for the experts' and the rows' coefficients.
        let with = |col: usize| {
            let mut m = m;
            (0..3).for_each(|r| m[r][col] = self.xt[r]);
            det3(&m) / det
        };
        let (fixed, per_row) = (with(1), with(2));
        (fixed > 0.0 && per_row > 0.0).then_some((fixed, per_row))
    }

    /// The fixed cost of running an expert, in rows (0 if not determined).
    pub fn fixed_rows(&self) -> f64 {
        self.solve().map_or(0.0, |(f, r)| f / r)
    }
}

/// The busiest worker's load over the mean (1: balanced).
pub fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    loads.iter().cloned().fold(0.0, f64::max) / mean.max(f64::MIN_POSITIVE)
}

/// Replica `i`'s rows of `rows` when its replicas take `shares` of them, in order.
pub fn part<'a>(rows: &'a [u32], shares: &[usize], i: usize) -> &'a [u32] {
    let start: usize = shares[..i].iter().sum();
    &rows[start..start + shares[i]]
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
    fn a_fixed_cost_per_replica_uses_only_the_replicas_that_pay() {
        // Expert 0 takes 48% of the rows (a hot expert at top-2): a permutation levels the
        // workers to within a row of (100 rows + 8 runs × 6) / 2 = 74, and a replica would add
        // a run.
        let load = [48.0, 20.0, 12.0, 8.0, 5.0, 4.0, 2.0, 1.0];
        let p = plan_costed(&[load.to_vec()], 2, 5, 6.0);
        assert!(step_cost(&[load.to_vec()], &p, 6.0) <= 75.0, "{p:?}");
        // Without a fixed cost the slots are all used (DeepSeek's EPLB).
        assert_eq!(plan(&load, 2, 5).iter().map(Vec::len).sum::<usize>(), 10);
        // One expert with 70%: only a replica balances it, and it pays.
        let hot = vec![vec![70.0, 10.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0]];
        let p = plan_costed(&hot, 2, 5, 6.0);
        assert_eq!(p.iter().flatten().filter(|&&e| e == 0).count(), 2, "{p:?}");
        assert!(step_cost(&hot, &p, 6.0) < step_cost(&hot, &even(8, 2), 6.0) * 0.8);
        // Never costlier than the even split, whatever the loads and fixed cost.
        let mut s = 11u64;
        for _ in 0..300 {
            let n = 2 + (rng(&mut s) * 20.0) as usize;
            let workers = 1 + (rng(&mut s) * 4.0) as usize;
            let slots = n.div_ceil(workers) + (rng(&mut s) * 3.0) as usize;
            let layers = 1 + (rng(&mut s) * 4.0) as usize;
            let load: LayerLoad = (0..layers)
                .map(|_| (0..n).map(|_| rng(&mut s).powi(3) * 100.0).collect())
                .collect();
            let fixed = rng(&mut s) * 20.0;
            let p = plan_costed(&load, workers, slots, fixed);
            assert!(p.iter().all(|h| h.len() <= slots));
            assert!(step_cost(&load, &p, fixed) <= step_cost(&load, &even(n, workers), fixed));
        }
    }

    #[test]
    fn each_layers_busiest_worker_is_what_a_step_pays() {
        // Layer 0's hot expert is 0, layer 1's is 1: 0 and 1 on different workers balance the
        // sum, but each layer waits on one worker; a replica of each splits them in every layer.
        let load = vec![
            vec![60.0, 4.0, 10.0, 10.0, 4.0, 4.0, 4.0, 4.0],
            vec![4.0, 60.0, 10.0, 10.0, 4.0, 4.0, 4.0, 4.0],
        ];
        let p = plan_costed(&load, 2, 5, 1.0);
        for e in [0, 1] {
            assert_eq!(p.iter().flatten().filter(|&&x| x == e).count(), 2, "{p:?}");
        }
        let one = |p: &Placement| step_cost(&load, p, 1.0);
        let sum_balanced: Placement = vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]];
        assert!(
            one(&p) < one(&sum_balanced) * 0.85,
            "{} vs {}",
            one(&p),
            one(&sum_balanced)
        );
        // A fixed cost far above the rows: replicas may let a layer run an expert where it
        // costs least, but never split one's rows.
        let p = plan_costed(&load, 2, 5, 100.0);
        let owner = owners(&p, 8);
        for l in &load {
            let rows: Vec<usize> = l.iter().map(|&r| r as usize).collect();
            let a = assign(&rows, &owner, 2, 100.0);
            assert!(
                a.shares
                    .iter()
                    .all(|s| s.iter().filter(|&&n| n > 0).count() <= 1),
                "{a:?}"
            );
        }
    }

    #[test]
    fn the_cost_fit_recovers_a_fixed_and_a_per_row_cost() {
        let mut f = CostFit::default();
        assert_eq!(f.solve(), None);
        let mut s = 3u64;
        for _ in 0..200 {
            let g = 1 + (rng(&mut s) * 5.0) as usize;
            let r = g + (rng(&mut s) * 120.0) as usize;
            let noise = 1.0 + (rng(&mut s) - 0.5) * 0.02;
            // 40 µs every run, 115 µs per expert, 18.5 µs per row.
            f.add(
                g,
                r,
                (40e-6 + 115e-6 * g as f64 + 18.5e-6 * r as f64) * noise,
            );
        }
        let (fixed, per_row) = f.solve().unwrap();
        assert!((fixed / 115e-6 - 1.0).abs() < 0.05, "{fixed}");
        assert!((per_row / 18.5e-6 - 1.0).abs() < 0.05, "{per_row}");
        assert!((f.fixed_rows() - 115.0 / 18.5).abs() < 0.4);
        // Runs all with 4 experts cannot tell a cost per expert from one per run.
        let mut four = CostFit::default();
        for i in 0..50 {
            four.add(4, 20 + i, 500e-6 + 18.5e-6 * (20 + i) as f64);
        }
        assert_eq!(four.solve(), None);
        assert_eq!(four.fixed_rows(), 0.0);
        assert_eq!(f.since(&f).solve(), None);
        let back = four.plus(&f).since(&four).solve().unwrap();
        assert!((back.0 / fixed - 1.0).abs() < 1e-6 && (back.1 / per_row - 1.0).abs() < 1e-6);
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
    fn parts_cover_the_rows_in_order() {
        let rows: Vec<u32> = (0..11).collect();
        for shares in [
            vec![11],
            vec![0, 11],
            vec![4, 7],
            vec![3, 0, 8],
            vec![1, 1, 9],
        ] {
            let k = shares.len();
            let parts: Vec<u32> = (0..k)
                .flat_map(|i| part(&rows, &shares, i).to_vec())
                .collect();
            assert_eq!(parts, rows);
        }
    }

    /// The busiest worker's cost of `shares`, computed afresh.
    fn busiest(
        rows: &[usize],
        owner: &[Vec<usize>],
        shares: &[Vec<usize>],
        workers: usize,
        fixed: f64,
    ) -> f64 {
        let mut cost = vec![0f64; workers];
        for e in 0..rows.len() {
            assert_eq!(
                shares[e].iter().sum::<usize>(),
                rows[e],
                "expert {e}'s rows"
            );
            for (i, &n) in shares[e].iter().enumerate() {
                if n > 0 {
                    cost[owner[e][i]] += fixed + n as f64;
                }
            }
        }
        cost.into_iter().fold(0.0, f64::max)
    }

    #[test]
    fn assignments_keep_every_row_and_level_the_workers() {
        let mut s = 5u64;
        for _ in 0..2000 {
            let workers = 1 + (rng(&mut s) * 4.0) as usize;
            let n = 1 + (rng(&mut s) * 12.0) as usize;
            let slots = n.div_ceil(workers) + (rng(&mut s) * 3.0) as usize;
            let load: Vec<f64> = (0..n).map(|_| rng(&mut s).powi(2) * 60.0).collect();
            let placement = plan(&load, workers, slots);
            let owner = owners(&placement, n);
            let rows: Vec<usize> = (0..n)
                .map(|_| (rng(&mut s).powi(3) * 80.0) as usize)
                .collect();
            let fixed = (rng(&mut s) * 12.0).floor();
            let a = assign(&rows, &owner, workers, fixed);
            let top = busiest(&rows, &owner, &a.shares, workers, fixed);
            assert_eq!(top, a.cost.iter().cloned().fold(0.0, f64::max));
            // Never worse than every expert's rows on its first replica, or than the even
            // split of before.
            let first: Vec<Vec<usize>> = (0..n)
                .map(|e| {
                    (0..owner[e].len())
                        .map(|i| if i == 0 { rows[e] } else { 0 })
                        .collect()
                })
                .collect();
            let even: Vec<Vec<usize>> = (0..n)
                .map(|e| {
                    let k = owner[e].len();
                    (0..k)
                        .map(|i| rows[e] / k + usize::from(i < rows[e] % k))
                        .collect()
                })
                .collect();
            for other in [first, even] {
                let theirs = busiest(&rows, &owner, &other, workers, fixed);
                assert!(
                    top <= theirs + 1e-9,
                    "{top} > {theirs}: {rows:?} on {owner:?}, fixed {fixed}"
                );
            }
        }
    }

    #[test]
    fn a_hot_replicated_expert_is_split_to_level_each_step() {
        // Expert 0 on both workers, the others once each: whatever a step routes, the busiest
        // worker ends within a row of the level (fixed 0), and whole when splitting costs more
        // than it saves (fixed 10).
        let owner = vec![vec![0, 1], vec![0], vec![0], vec![1], vec![1]];
        let a = assign(&[60, 10, 2, 14, 4], &owner, 2, 0.0);
        assert_eq!(a.cost, vec![45.0, 45.0]);
        assert_eq!(a.shares[0], vec![33, 27]);
        let a = assign(&[60, 10, 2, 14, 4], &owner, 2, 10.0);
        // Level with a split: (90 rows + 6 runs × 10) / 2 = 75 a worker.
        assert_eq!(a.cost, vec![75.0, 75.0]);
        assert_eq!(a.shares[0], vec![33, 27]);
        // A row is not worth a second run of the expert.
        let a = assign(&[1, 10, 2, 9, 4], &owner, 2, 10.0);
        assert_eq!(a.cost, vec![43.0, 33.0]);
        assert_eq!(a.shares[0].iter().filter(|&&n| n > 0).count(), 1, "{a:?}");
    }
}
