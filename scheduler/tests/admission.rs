//! Admission to the disaggregated cluster: a request takes its place among those in flight
//! before it starts, so a burst submitted at once cannot pass `max_inflight` (it could while
//! the check and the count were made by different tasks).

use frontend::request::{CancellationToken, GenerationParams, RequestId};
use scheduler::error::ApiError;
use scheduler::remote::{Remote, RemoteConfig};
use std::time::Duration;

#[tokio::test]
async fn a_burst_cannot_pass_the_in_flight_limit() {
    // No decode worker answers: every admitted request waits (for `hold`), holding its place.
    let remote = Remote::start(RemoteConfig {
        decode: vec!["127.0.0.1:9".into()],
        max_inflight: 3,
        hold: Duration::from_secs(30),
        ..Default::default()
    })
    .unwrap();
    let params = GenerationParams {
        sampling: Default::default(),
        max_tokens: 4,
        min_tokens: 0,
        ignore_eos: false,
        stop_token_ids: Vec::new(),
        logprobs: None,
        prompt_logprobs: None,
        logit_bias: Vec::new(),
        constraint: None,
    };
    let cancels: Vec<CancellationToken> = (0..10).map(|_| CancellationToken::new()).collect();
    let results: Vec<_> = cancels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            remote.submit(
                RequestId(i as u64),
                vec![1, 2, 3],
                params.clone(),
                c.clone(),
            )
        })
        .collect();
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(ApiError::Overloaded(_))))
        .count();
    assert_eq!((admitted, refused), (3, 7));
    // Places come back when requests end: cancelled ones free theirs.
    for c in &cancels {
        c.cancel();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let again = remote.submit(
            RequestId(99),
            vec![1],
            params.clone(),
            CancellationToken::new(),
        );
        if again.is_ok() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no place came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
