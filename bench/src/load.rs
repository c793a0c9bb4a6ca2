//! Offering load: arrival schedules (Poisson, gamma, constant, all-at-once), an optional cap on
//! requests in flight (closed loop), and warm-up.

use crate::args::Arrival;
use crate::client::{RequestRecord, Target};
use crate::dataset::RequestSpec;
use frontend::Tokenizer;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Gamma};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// When each request should be sent, in seconds from the start.
pub fn schedule(
    n: usize,
    rate: Option<f64>,
    burstiness: f64,
    arrival: Arrival,
    seed: u64,
) -> Vec<f64> {
    let Some(rate) = rate.filter(|r| r.is_finite() && *r > 0.0) else {
        return vec![0.0; n];
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let gamma =
        Gamma::new(burstiness, 1.0 / (rate * burstiness)).expect("positive shape and scale");
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let at = t;
            t += match arrival {
                Arrival::Constant => 1.0 / rate,
                Arrival::Poisson => gamma.sample(&mut rng),
            };
            at
        })
        .collect()
}

/// How one run offers its load.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub rate: Option<f64>,
    pub burstiness: f64,
    pub arrival: Arrival,
    pub max_concurrency: Option<usize>,
    pub seed: u64,
    /// Multi-turn: mean seconds a user thinks between a turn's answer and the next turn.
    pub think_time: f64,
}

/// Multi-turn: the conversations' start times — an arrival process at `rate / turns` (so that
/// turns arrive at about `rate`) — and each think time between a turn's end and the next.
/// Conversation `c`'s turns are spec indices `turns_of[c]`, in order.
fn schedule_conversations(turns_of: &[Vec<usize>], load: &Load) -> (Vec<f64>, Vec<Vec<f64>>) {
    let per = turns_of.iter().map(Vec::len).max().unwrap_or(1).max(1) as f64;
    let starts = schedule(
        turns_of.len(),
        load.rate.map(|r| r / per),
        load.burstiness,
        load.arrival,
        load.seed,
    );
    let mut rng = StdRng::seed_from_u64(load.seed ^ 0x7417_7417);
    let think = rand_distr::Exp::new(1.0 / load.think_time.max(1e-3)).expect("positive rate");
    let thinks = turns_of
        .iter()
        .map(|t| t.iter().map(|_| think.sample(&mut rng)).collect())
        .collect();
    (starts, thinks)
}

/// Multi-turn: each conversation sends its turns in order, the next one a think time after
/// the previous one's answer ended (a user reads, then types).
async fn run_conversations(
    target: Arc<Target>,
    specs: Arc<Vec<RequestSpec>>,
    tok: Arc<Tokenizer>,
    load: Load,
    progress: Option<ProgressBar>,
) -> Vec<RequestRecord> {
    let mut turns_of: Vec<Vec<usize>> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let (c, _) = s.turn.expect("every multi-turn spec has its turn");
        if turns_of.len() <= c {
            turns_of.resize(c + 1, Vec::new());
        }
        turns_of[c].push(i);
    }
    let (starts, thinks) = schedule_conversations(&turns_of, &load);
    let sem = load
        .max_concurrency
        .map(|c| Arc::new(Semaphore::new(c.max(1))));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for ((turns, start), think) in turns_of.into_iter().zip(starts).zip(thinks) {
        let (target, specs, tok, sem, progress) = (
            target.clone(),
            specs.clone(),
            tok.clone(),
            sem.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut at = start;
            let mut out = Vec::with_capacity(turns.len());
            for (i, pause) in turns.into_iter().zip(think) {
                tokio::time::sleep_until(
                    tokio::time::Instant::from_std(t0) + Duration::from_secs_f64(at),
                )
                .await;
                let rec = {
                    let _permit = match &sem {
                        Some(s) => Some(s.clone().acquire_owned().await.expect("semaphore open")),
                        None => None,
                    };
                    target.send(i, &specs[i], &tok, t0, at).await
                };
                if let Some(p) = &progress {
                    p.inc(1);
                }
                at = rec.end_s + pause;
                out.push((i, rec));
            }
            out
        }));
    }
    // A conversation whose task failed leaves its turns as errors.
    let failed = RequestRecord {
        error: Some("client task failed".into()),
        ..Default::default()
    };
    let mut records = vec![failed; specs.len()];
    for t in tasks {
        if let Ok(done) = t.await {
            for (i, r) in done {
                records[i] = r;
            }
        }
    }
    records
}

/// Sends every spec on the schedule; returns the records (in spec order) and the duration.
pub async fn run(
    target: Arc<Target>,
    specs: Arc<Vec<RequestSpec>>,
    tok: Arc<Tokenizer>,
    load: Load,
    progress: Option<ProgressBar>,
) -> (Vec<RequestRecord>, f64) {
    if specs.iter().any(|s| s.turn.is_some()) {
        let records = run_conversations(target, specs, tok, load, progress).await;
        let duration = records.iter().map(|r| r.end_s).fold(0.0, f64::max);
        return (records, duration);
    }
    let times = schedule(
        specs.len(),
        load.rate,
        load.burstiness,
        load.arrival,
        load.seed,
    );
    let sem = load
        .max_concurrency
        .map(|c| Arc::new(Semaphore::new(c.max(1))));
    let t0 = Instant::now();
    let start = tokio::time::Instant::from_std(t0);
    let mut tasks = Vec::with_capacity(specs.len());
    for (i, at) in times.into_iter().enumerate() {
        let (target, specs, tok, sem, progress) = (
            target.clone(),
            specs.clone(),
            tok.clone(),
            sem.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
            let _permit = match &sem {
                Some(s) => Some(s.clone().acquire_owned().await.expect("semaphore open")),
                None => None,
            };
            let rec = target.send(i, &specs[i], &tok, t0, at).await;
            if let Some(p) = progress {
                p.inc(1);
            }
            rec
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.unwrap_or_else(|e| RequestRecord {
            error: Some(format!("client task failed: {e}")),
            ..Default::default()
        }));
    }
    let duration = records.iter().map(|r| r.end_s).fold(0.0, f64::max);
    (records, duration)
}

/// Sends warm-up requests (not measured), a few at a time.
pub async fn warm_up(
    target: Arc<Target>,
    specs: Arc<Vec<RequestSpec>>,
    tok: Arc<Tokenizer>,
    concurrency: usize,
) -> usize {
    let load = Load {
        rate: None,
        burstiness: 1.0,
        arrival: Arrival::Poisson,
        max_concurrency: Some(concurrency),
        seed: 0,
        think_time: 0.0,
    };
    let (records, _) = run(target, specs, tok, load, None).await;
    records.iter().filter(|r| !r.success()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_and_gamma_have_the_asked_mean_and_burstiness() {
        let n = 20000;
        for (b, arrival) in [
            (1.0, Arrival::Poisson),
            (0.25, Arrival::Poisson),
            (4.0, Arrival::Poisson),
            (1.0, Arrival::Constant),
        ] {
            let t = schedule(n, Some(8.0), b, arrival, 3);
            let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            assert!((mean - 0.125).abs() < 0.01, "mean gap {mean}");
            // Gamma(k, θ): CV² = 1/k; constant: 0.
            let cv2 = var / (mean * mean);
            let want = if arrival == Arrival::Constant {
                0.0
            } else {
                1.0 / b
            };
            assert!(
                (cv2 - want).abs() < 0.1 * want.max(0.1),
                "b={b}: cv² {cv2}, want {want}"
            );
        }
        assert_eq!(schedule(3, None, 1.0, Arrival::Poisson, 0), vec![0.0; 3]);
        assert_eq!(
            schedule(4, Some(2.0), 1.0, Arrival::Poisson, 9),
            schedule(4, Some(2.0), 1.0, Arrival::Poisson, 9)
        );
    }
}
