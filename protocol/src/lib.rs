//! Tandem's wire protocol: the gRPC control plane `tandem.v2` (`proto/tandem/v2/*.proto`,
//! compiled by protox at build time) and its one mapping to and from the request types.
//!
//! # Layout
//! - [`pb`]: the generated messages, clients and servers.
//! - this file: conversions between `pb` and `frontend::request` / `frontend::sampling`.
//! - [`blocks`]: what block events (KV-aware routing) say a holder holds.
//! - [`auth`]: the cluster secret and the handshake that opens every internal connection.
//! - [`cores`]: a prefill and a decode worker sharing one host's cores, the decode steps first.
//! - [`grant`]: lease ids and the signed grants (`KvTarget`s) a decode worker hands out.
//! - [`net`]: gRPC servers and channels that run the handshake.
//! - `discovery`: workers registering in etcd, the scheduler watching (the client: feature `etcd`).

pub mod auth;
pub mod blocks;
pub mod cores;
pub mod discovery;
pub mod grant;
pub mod net;
pub mod trace;

/// The generated `tandem.v2` code.
pub mod pb {
    tonic::include_proto!("tandem.v2");
}

use frontend::TokenId;
use frontend::request::{FinishReason, GenerationParams, TokenEvent, WorkerError, WorkerEvent};
use frontend::sampling::{SamplingParams, TokenLogprobs};

/// The protocol version this build speaks (the `.proto` package's).
pub const VERSION: &str = "tandem.v2";

pub use grant::LeaseId;

/// How a prompt's KV moves from a prefill worker to a decode worker (the `transport` field of
/// `Prefill` and its reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvTransport {
    /// The prefill worker maps the decode worker's pool file and writes in place (one host).
    Shm,
    /// The prefill worker streams slabs to the decode worker's data plane.
    Tcp,
}

impl KvTransport {
    pub fn name(self) -> &'static str {
        match self {
            KvTransport::Shm => "shm",
            KvTransport::Tcp => "tcp",
        }
    }

    /// The wire field: `"shm"`, `"tcp"`, or `""` / `"auto"` (the prefill worker picks).
    pub fn parse(s: &str) -> Result<Option<KvTransport>, String> {
        match s {
            "" | "auto" => Ok(None),
            "shm" => Ok(Some(KvTransport::Shm)),
            "tcp" => Ok(Some(KvTransport::Tcp)),
            other => Err(format!("unknown KV transport '{other}' (shm, tcp or auto)")),
        }
    }

    /// The wire field of an optional choice.
    pub fn wire(t: Option<KvTransport>) -> String {
        t.map(|t| t.name().to_string()).unwrap_or_default()
    }
}

/// A message that does not map onto the request types.
#[derive(Debug, thiserror::Error)]
#[error("malformed {0}")]
pub struct Malformed(pub &'static str);

impl From<&GenerationParams> for pb::GenerationParams {
    fn from(p: &GenerationParams) -> Self {
        let s = &p.sampling;
        pb::GenerationParams {
            sampling: Some(pb::SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k as u32,
                top_p: s.top_p,
                min_p: s.min_p,
                frequency_penalty: s.frequency_penalty,
                presence_penalty: s.presence_penalty,
                seed: s.seed,
            }),
            max_tokens: p.max_tokens as u32,
            min_tokens: p.min_tokens as u32,
            ignore_eos: p.ignore_eos,
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs.map(|n| n as u32),
            prompt_logprobs: p.prompt_logprobs.map(|n| n as u32),
            logit_bias: p
                .logit_bias
                .iter()
                .map(|&(token, bias)| pb::LogitBias { token, bias })
                .collect(),
            constraint: p.constraint.as_ref().map(|c| c.to_wire()),
        }
    }
}

impl TryFrom<&pb::GenerationParams> for GenerationParams {
    type Error = Malformed;
    fn try_from(p: &pb::GenerationParams) -> Result<Self, Malformed> {
        let s = p
            .sampling
            .as_ref()
            .ok_or(Malformed("sampling parameters"))?;
        Ok(GenerationParams {
            sampling: SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k as usize,
                top_p: s.top_p,
                min_p: s.min_p,
                frequency_penalty: s.frequency_penalty,
                presence_penalty: s.presence_penalty,
                seed: s.seed,
            },
            max_tokens: p.max_tokens as usize,
            min_tokens: p.min_tokens as usize,
            ignore_eos: p.ignore_eos,
            stop_token_ids: p.stop_token_ids.clone(),
            logprobs: p.logprobs.map(|n| n as usize),
            prompt_logprobs: p.prompt_logprobs.map(|n| n as usize),
            logit_bias: p.logit_bias.iter().map(|b| (b.token, b.bias)).collect(),
            constraint: p
                .constraint
                .as_deref()
                .map(frontend::constraint::Constraint::from_wire)
                .transpose()
                .map_err(|_| Malformed("constraint"))?,
        })
    }
}

fn lp_to_pb(l: &TokenLogprobs) -> pb::TokenLogprobs {
    pb::TokenLogprobs {
        logprob: l.logprob,
        top: l
            .top
            .iter()
            .map(|&(token, logprob)| pb::TopLogprob { token, logprob })
            .collect(),
    }
}

fn lp_from_pb(l: &pb::TokenLogprobs) -> TokenLogprobs {
    TokenLogprobs {
        logprob: l.logprob,
        top: l
            .top
            .iter()
            .map(|t| (t.token as TokenId, t.logprob))
            .collect(),
    }
}

impl From<&WorkerEvent> for pb::WorkerEvent {
    fn from(e: &WorkerEvent) -> Self {
        use pb::worker_event::Event;
        let event = match e {
            WorkerEvent::Prefilled { cached_tokens } => {
                Event::PrefilledCachedTokens(*cached_tokens as u32)
            }
            WorkerEvent::PromptLogprobs(l) => Event::PromptLogprobs(pb::PromptLogprobs {
                tokens: l.iter().map(lp_to_pb).collect(),
            }),
            WorkerEvent::Token(t) => Event::Token(pb::TokenEvent {
                token: t.token,
                logprobs: t.logprobs.as_ref().map(lp_to_pb),
                finish: match t.finish {
                    None => pb::FinishReason::Unspecified,
                    Some(FinishReason::Stop) => pb::FinishReason::Stop,
                    Some(FinishReason::Length) => pb::FinishReason::Length,
                } as i32,
            }),
            WorkerEvent::Done => Event::Done(pb::Empty {}),
            WorkerEvent::Error(err) => Event::Error(error_to_pb(err)),
        };
        pb::WorkerEvent { event: Some(event) }
    }
}

/// A worker error as the wire carries it.
pub fn error_to_pb(err: &WorkerError) -> pb::WorkerError {
    let (kind, message) = match err {
        WorkerError::Overloaded(m) => (pb::worker_error::Kind::Overloaded, m.clone()),
        WorkerError::Internal(m) => (pb::worker_error::Kind::Internal, m.clone()),
    };
    pb::WorkerError {
        kind: kind as i32,
        message,
    }
}

/// A wire error as the request types' one.
pub fn error_from_pb(e: &pb::WorkerError) -> WorkerError {
    match pb::worker_error::Kind::try_from(e.kind) {
        Ok(pb::worker_error::Kind::Overloaded) => WorkerError::Overloaded(e.message.clone()),
        _ => WorkerError::Internal(e.message.clone()),
    }
}

impl TryFrom<&pb::WorkerEvent> for WorkerEvent {
    type Error = Malformed;
    fn try_from(e: &pb::WorkerEvent) -> Result<Self, Malformed> {
        use pb::worker_event::Event;
        Ok(match e.event.as_ref().ok_or(Malformed("worker event"))? {
            Event::PrefilledCachedTokens(n) => WorkerEvent::Prefilled {
                cached_tokens: *n as usize,
            },
            Event::PromptLogprobs(l) => {
                WorkerEvent::PromptLogprobs(l.tokens.iter().map(lp_from_pb).collect())
            }
            Event::Token(t) => WorkerEvent::Token(TokenEvent {
                token: t.token,
                logprobs: t.logprobs.as_ref().map(lp_from_pb),
                finish: match pb::FinishReason::try_from(t.finish) {
                    Ok(pb::FinishReason::Stop) => Some(FinishReason::Stop),
                    Ok(pb::FinishReason::Length) => Some(FinishReason::Length),
                    Ok(pb::FinishReason::Unspecified) => None,
                    Err(_) => return Err(Malformed("finish reason")),
                },
            }),
            Event::Done(_) => WorkerEvent::Done,
            Event::Error(err) => WorkerEvent::Error(error_from_pb(err)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_events_round_trip() {
        let p = GenerationParams {
            sampling: SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.05,
                frequency_penalty: 0.5,
                presence_penalty: -0.25,
                seed: u64::MAX - 3,
            },
            max_tokens: 17,
            min_tokens: 2,
            ignore_eos: true,
            stop_token_ids: vec![5, 9],
            logprobs: Some(3),
            prompt_logprobs: None,
            logit_bias: vec![(3, -1.5), (9, 100.0)],
            constraint: Some(frontend::constraint::Constraint::Regex("[ab]+".into())),
        };
        let back = GenerationParams::try_from(&pb::GenerationParams::from(&p)).unwrap();
        assert_eq!(format!("{back:?}"), format!("{p:?}"));
        let lp = TokenLogprobs {
            logprob: -0.5,
            top: vec![(3, -0.5), (8, -1.25)],
        };
        for e in [
            WorkerEvent::Prefilled { cached_tokens: 32 },
            WorkerEvent::PromptLogprobs(vec![lp.clone(), lp.clone()]),
            WorkerEvent::Token(TokenEvent {
                token: 42,
                logprobs: Some(lp.clone()),
                finish: Some(FinishReason::Length),
            }),
            WorkerEvent::Token(TokenEvent {
                token: 7,
                logprobs: None,
                finish: None,
            }),
            WorkerEvent::Done,
            WorkerEvent::Error(WorkerError::Overloaded("full".into())),
            WorkerEvent::Error(WorkerError::Internal("boom".into())),
        ] {
            assert_eq!(
                WorkerEvent::try_from(&pb::WorkerEvent::from(&e)).unwrap(),
                e
            );
        }
        assert!(WorkerEvent::try_from(&pb::WorkerEvent { event: None }).is_err());
    }
}
