//! One request's life across the workers: reserve, prefill (with retries), the token stream,
//! and resuming it elsewhere when a decode worker fails.

use super::policy::{LocalReason, PrefillPlace, PromptShape};
use super::{Busy, Decode, Prefill, Remote};
use frontend::TokenId;
use frontend::request::{CancellationToken, GenerationParams, WorkerError, WorkerEvent};
use protocol::pb;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tracing::Instrument;

/// Drives request `id` on a task of its own; its events go to `tx`.
pub(super) fn spawn(
    remote: Arc<Remote>,
    id: u64,
    prompt: Vec<TokenId>,
    params: GenerationParams,
    cancel: CancellationToken,
    tx: mpsc::UnboundedSender<WorkerEvent>,
    admitted: tokio::sync::OwnedSemaphorePermit,
) {
    // Called inside the HTTP request: its span is the parent of the driver's.
    let parent = tracing::Span::current();
    let request_id = crate::trace::request_id();
    tokio::spawn(async move {
        // The request's place among those in flight, taken by `submit`, given back at the end.
        let _admitted = admitted;
        Driver {
            remote: &remote,
            id,
            prompt,
            params,
            cancel,
            tx,
            sent: Vec::new(),
            reported: false,
            route: tracing::Span::none(),
            parent,
            request_id,
        }
        .run()
        .await;
    });
}

/// Why a phase of a request stopped.
enum Fault {
    /// The decode worker is gone (or lost the lease): start over on another one.
    DecodeLost,
    /// The request ends with this error.
    Fatal(WorkerError),
    /// The client went away.
    Cancelled,
}

fn is_lost(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::NotFound
            | Code::DataLoss
            | Code::DeadlineExceeded
    )
}

fn fatal(s: &Status) -> WorkerError {
    match s.code() {
        Code::ResourceExhausted => WorkerError::Overloaded(s.message().to_string()),
        _ => WorkerError::Internal(s.message().to_string()),
    }
}

/// One request's life across the workers.
struct Driver<'a> {
    remote: &'a Remote,
    id: u64,
    prompt: Vec<TokenId>,
    params: GenerationParams,
    cancel: CancellationToken,
    tx: mpsc::UnboundedSender<WorkerEvent>,
    /// Tokens already forwarded to the client.
    sent: Vec<TokenId>,
    /// The prompt's report (prefilled / prompt log-probabilities) was forwarded.
    reported: bool,
    /// The HTTP request's span, and this attempt's `route` span under it (the parent of the
    /// workers' spans: its context rides in every call's metadata).
    parent: tracing::Span,
    route: tracing::Span,
    request_id: String,
}

/// What forwarding an event did.
enum Forwarded {
    More,
    Finished,
}

impl Driver<'_> {
    fn gone(&self) -> bool {
        self.cancel.is_cancelled() || self.tx.is_closed()
    }

    fn forward(&mut self, ev: WorkerEvent) -> Forwarded {
        match ev {
            WorkerEvent::Prefilled { .. } | WorkerEvent::PromptLogprobs(_) => {
                // A re-prefill reports the prompt again; the client heard it once.
                if !self.reported {
                    self.reported = true;
                    let _ = self.tx.send(ev);
                }
                Forwarded::More
            }
            WorkerEvent::Token(t) => {
                let done = t.finish.is_some();
                self.sent.push(t.token);
                let _ = self.tx.send(WorkerEvent::Token(t));
                if done {
                    Forwarded::Finished
                } else {
                    Forwarded::More
                }
            }
            ev @ (WorkerEvent::Done | WorkerEvent::Error(_)) => {
                let _ = self.tx.send(ev);
                Forwarded::Finished
            }
        }
    }

    fn fail(&self, e: WorkerError) {
        let _ = self.tx.send(WorkerEvent::Error(e));
    }

    /// Every token whose KV a prefill of this request produces now.
    fn prefill_tokens(&self) -> Vec<TokenId> {
        let mut t = self.prompt.clone();
        if let Some((_, head)) = self.sent.split_last() {
            t.extend_from_slice(head);
        }
        t
    }

    async fn run(mut self) {
        let mut attempts = 0usize;
        loop {
            if self.gone() {
                return;
            }
            attempts += 1;
            if attempts > 16 {
                self.fail(WorkerError::Internal(
                    "the request failed on every attempt (workers keep failing)".into(),
                ));
                return;
            }
            let queue = tracing::info_span!(parent: &self.parent, "queue",
                x_request_id = %self.request_id, tandem.attempt = attempts as i64);
            let tokens = self.prefill_tokens();
            let Some((d, cached)) = self
                .remote
                .decode_worker(&tokens, &self.cancel)
                .instrument(queue)
                .await
            else {
                if !self.gone() {
                    self.fail(WorkerError::Overloaded(format!(
                        "no decode worker became available within {:?}",
                        self.remote.cfg.hold
                    )));
                }
                return;
            };
            let _busy = Busy::on(&d.inflight);
            self.route = tracing::info_span!(parent: &self.parent, "route",
                x_request_id = %self.request_id,
                tandem.attempt = attempts as i64,
                tandem.decode.worker = %d.addr,
                tandem.prompt_tokens = self.prompt.len() as i64,
                tandem.prefill.expected_cached_tokens = cached as i64,
                tandem.prefill.worker = tracing::field::Empty,
                tandem.prefill.placement = tracing::field::Empty,
                tandem.prefill.predicted_ttft_ms = tracing::field::Empty,
                tandem.prefill.predicted_tpot_ms = tracing::field::Empty,
            );
            let route = self.route.clone();
            let commit = {
                match self
                    .prefill_phase(&d, cached)
                    .instrument(route.clone())
                    .await
                {
                    Ok(Some((commit, events))) => {
                        let mut finished = false;
                        for ev in events {
                            if let Forwarded::Finished = self.forward(ev) {
                                finished = true;
                            }
                        }
                        if finished {
                            release(&d, commit.lease_id);
                            return;
                        }
                        Some(commit)
                    }
                    // No prefill worker could: the decode worker prefills.
                    Ok(None) => None,
                    Err(Fault::DecodeLost) => continue,
                    Err(Fault::Cancelled) => return,
                    Err(Fault::Fatal(e)) => {
                        self.fail(e);
                        return;
                    }
                }
            };
            match self.generate_phase(&d, commit).instrument(route).await {
                Ok(()) => return,
                Err(Fault::DecodeLost) => {
                    if !self.sent.is_empty() {
                        self.remote.resumed.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("tandem_stream_resumes_total").increment(1);
                    }
                    continue;
                }
                Err(Fault::Cancelled) => return,
                Err(Fault::Fatal(e)) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    /// Reserve on `d`, then prefill on a prefill worker: the commit and the events for the
    /// client, or `None` when the decode worker prefills (no prefill worker is left, or the
    /// placement keeps it local — judged on the tokens past the `cached` ones routing expects
    /// `d` to hold or fetch).
    async fn prefill_phase(
        &mut self,
        d: &Arc<Decode>,
        cached: usize,
    ) -> Result<Option<(pb::Commit, Vec<WorkerEvent>)>, Fault> {
        let fingerprint = d.stats().fingerprint;
        let shape = PromptShape {
            tokens: self.prompt.len(),
            cached,
            prompt_logprobs: self.params.prompt_logprobs.is_some(),
        };
        let (place, decision) = self.remote.place_prefill(shape, d, self.params.max_tokens);
        self.route.record(
            "tandem.prefill.placement",
            match place {
                PrefillPlace::PrefillWorker(_) => "prefill worker",
                PrefillPlace::Decode(LocalReason::PrefillBusy) => "decode worker: prefill busy",
                PrefillPlace::Decode(LocalReason::Short) => "decode worker: short prompt",
                PrefillPlace::Decode(LocalReason::Predicted) => "decode worker: predicted better",
                PrefillPlace::Decode(LocalReason::NoPrefillWorker) => {
                    "decode worker: no prefill worker"
                }
                PrefillPlace::Decode(LocalReason::PromptLogprobs) => {
                    "decode worker: prompt logprobs"
                }
            },
        );
        if let Some(dec) = decision {
            let chosen = match place {
                PrefillPlace::PrefillWorker(_) => dec.prefill.unwrap_or(dec.decode),
                PrefillPlace::Decode(_) => dec.decode,
            };
            self.route.record(
                "tandem.prefill.predicted_ttft_ms",
                (chosen.ttft_s * 1e3).round() as i64,
            );
            self.route.record(
                "tandem.prefill.predicted_tpot_ms",
                (chosen.tpot_s * 1e3).round() as i64,
            );
        }
        let (where_, count) = match place {
            PrefillPlace::PrefillWorker(_) => ("prefill", &self.remote.placed_prefill),
            PrefillPlace::Decode(_) => ("decode", &self.remote.placed_decode),
        };
        count.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tandem_prefill_placements_total", "worker" => where_).increment(1);
        match place {
            PrefillPlace::PrefillWorker(_) => {}
            PrefillPlace::Decode(LocalReason::PrefillBusy) => {
                metrics::counter!("tandem_prefill_spills_total").increment(1);
                return Ok(None);
            }
            PrefillPlace::Decode(
                LocalReason::Short
                | LocalReason::NoPrefillWorker
                | LocalReason::PromptLogprobs
                | LocalReason::Predicted,
            ) => {
                return Ok(None);
            }
        }
        let tokens = self.prefill_tokens();
        let st = d.stats();
        let need = tokens.len().div_ceil(st.block_size.max(1) as usize) as u64;
        if need > st.kv_blocks_total {
            return Err(Fault::Fatal(WorkerError::Overloaded(format!(
                "the prompt needs {need} KV blocks, more than the decode worker's {}",
                st.kv_blocks_total
            ))));
        }
        // Blocks free up as other sequences finish: wait for them (bounded), as a colocated
        // worker's queue would.
        let deadline = tokio::time::Instant::now() + self.remote.cfg.hold;
        let target = loop {
            let mut dc = d.client.clone();
            let mut req = tonic::Request::new(pb::ReserveRequest {
                request_id: self.id,
                tokens: tokens.clone(),
                fingerprint,
                use_prefix_cache: self.params.prompt_logprobs.is_none(),
            });
            protocol::trace::inject(&self.route, &self.request_id, req.metadata_mut());
            let reserve = dc.reserve(req);
            match self.until_gone(reserve).await? {
                Ok(r) => {
                    break r
                        .into_inner()
                        .target
                        .ok_or(Fault::Fatal(WorkerError::Internal(
                            "the decode worker reserved no target".into(),
                        )))?;
                }
                Err(s) if is_lost(&s) => {
                    d.down(&s);
                    return Err(Fault::DecodeLost);
                }
                Err(s)
                    if s.code() == Code::ResourceExhausted
                        && tokio::time::Instant::now() < deadline =>
                {
                    self.until_gone(tokio::time::sleep(Duration::from_millis(20)))
                        .await?;
                }
                Err(s) => return Err(Fault::Fatal(fatal(&s))),
            }
        };
        let lease = target.lease_id.clone();
        let mut tried = Vec::new();
        loop {
            let Some(p) = self.remote.prefill_worker(fingerprint, &tried) else {
                release(d, lease.clone());
                return Ok(None);
            };
            tried.push(p.addr.clone());
            self.route.record("tandem.prefill.worker", p.addr.as_str());
            let _busy = Busy::on(&p.inflight);
            let _tokens = Busy::add(&p.prefill_tokens, tokens.len());
            let mut pc = p.client.clone();
            let mut req = tonic::Request::new(pb::PrefillRequest {
                request_id: self.id,
                prompt: self.prompt.clone(),
                generated: self.sent.clone(),
                params: Some(pb::GenerationParams::from(&self.params)),
                target: Some(target.clone()),
                transport: protocol::KvTransport::wire(self.remote.cfg.transport),
            });
            // A worker that never answers (stalled, black-holed) costs this much at most.
            req.set_timeout(self.remote.cfg.prefill_timeout);
            protocol::trace::inject(&self.route, &self.request_id, req.metadata_mut());
            let call = pc.prefill(req);
            match self.until_gone(call).await {
                Err(Fault::Cancelled) => {
                    cancel_prefill(&p, self.id);
                    release(d, lease.clone());
                    return Err(Fault::Cancelled);
                }
                Err(f) => return Err(f),
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    let mut events = Vec::with_capacity(r.events.len());
                    for e in &r.events {
                        events.push(
                            WorkerEvent::try_from(e)
                                .map_err(|e| Fault::Fatal(WorkerError::Internal(e.to_string())))?,
                        );
                    }
                    metrics::counter!("tandem_kv_transfers_total", "transport" => r.transport)
                        .increment(1);
                    let commit = pb::Commit {
                        lease_id: lease.clone(),
                        checksum: r.checksum,
                        filled: r.filled,
                    };
                    return Ok(Some((commit, events)));
                }
                Ok(Err(s)) => {
                    match s.code() {
                        Code::Unavailable => p.down(&s),
                        // Past its deadline it may still be computing: stop it.
                        Code::DeadlineExceeded | Code::Cancelled => cancel_prefill(&p, self.id),
                        _ => {}
                    }
                    self.remote.prefill_retries.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("tandem_prefill_retries_total").increment(1);
                    tracing::warn!(worker = %p.addr, error = %s.message(), "prefill failed; trying another worker");
                }
            }
        }
    }

    /// Streams the rest of the request from `d`.
    async fn generate_phase(
        &mut self,
        d: &Arc<Decode>,
        commit: Option<pb::Commit>,
    ) -> Result<(), Fault> {
        let mut dc = d.client.clone();
        let lease = commit.as_ref().map(|c| c.lease_id.clone());
        // Prefilled there: its tokens weigh on the worker until the first event comes back.
        let mut local = commit
            .is_none()
            .then(|| Busy::add(&d.prefill_tokens, self.prefill_tokens().len()));
        let mut req = tonic::Request::new(pb::GenerateRequest {
            request_id: self.id,
            prompt: self.prompt.clone(),
            generated: self.sent.clone(),
            params: Some(pb::GenerationParams::from(&self.params)),
            commit,
        });
        protocol::trace::inject(&self.route, &self.request_id, req.metadata_mut());
        let call = dc.generate(req);
        let opened = self.until_gone(call).await;
        if !matches!(opened, Ok(Ok(_)))
            && let Some(lease) = lease
        {
            // The commit may not have reached the worker (the client left, the call failed):
            // give the blocks back now rather than at the lease's expiry (a lease already
            // taken is unknown there, and this is a no-op).
            release(d, lease);
        }
        let mut stream = match opened? {
            Ok(s) => s.into_inner(),
            Err(s) if is_lost(&s) => {
                if s.code() == Code::Unavailable {
                    d.down(&s);
                }
                return Err(Fault::DecodeLost);
            }
            Err(s) => return Err(Fault::Fatal(fatal(&s))),
        };
        loop {
            let msg = match self.until_gone(stream.message()).await {
                Ok(m) => m,
                Err(f) => {
                    cancel_decode(d, self.id);
                    return Err(f);
                }
            };
            match msg {
                Ok(Some(e)) => {
                    drop(local.take());
                    let ev = WorkerEvent::try_from(&e)
                        .map_err(|e| Fault::Fatal(WorkerError::Internal(e.to_string())))?;
                    if let Forwarded::Finished = self.forward(ev) {
                        return Ok(());
                    }
                }
                // The stream broke (or ended early): the worker died or is shutting down.
                Ok(None) => return Err(Fault::DecodeLost),
                Err(s) => {
                    d.down(&s);
                    tracing::warn!(worker = %d.addr, error = %s.message(), tokens = self.sent.len(), "decode stream broke; resuming elsewhere");
                    return Err(Fault::DecodeLost);
                }
            }
        }
    }

    /// Awaits `f` unless the client goes away first (its stream dropped or cancelled).
    async fn until_gone<T>(&self, f: impl std::future::Future<Output = T>) -> Result<T, Fault> {
        tokio::select! {
            v = f => Ok(v),
            _ = self.cancel.cancelled() => Err(Fault::Cancelled),
            _ = self.tx.closed() => Err(Fault::Cancelled),
        }
    }
}

fn release(d: &Arc<Decode>, lease: Vec<u8>) {
    let mut c = d.client.clone();
    tokio::spawn(async move {
        let _ = c.release(pb::ReleaseRequest { lease_id: lease }).await;
    });
}

fn cancel_decode(d: &Arc<Decode>, id: u64) {
    let mut c = d.client.clone();
    tokio::spawn(async move {
        let _ = c.cancel(pb::CancelRequest { request_id: id }).await;
    });
}

fn cancel_prefill(p: &Arc<Prefill>, id: u64) {
    let mut c = p.client.clone();
    tokio::spawn(async move {
        let _ = c.cancel(pb::CancelRequest { request_id: id }).await;
    });
}
