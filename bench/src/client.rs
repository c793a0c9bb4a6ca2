//! One streamed request against an OpenAI-compatible endpoint, timed chunk by chunk.
//! Anything that goes wrong (connection, HTTP status, malformed SSE, time-out) ends up in the
//! record as an error, never as a crash.

use crate::dataset::RequestSpec;
use frontend::Tokenizer;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// What the client saw of one request. Times are seconds since the run's start.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RequestRecord {
    pub index: usize,
    pub kind: String,
    /// Prompt tokens by the client's tokenizer (diagnostic).
    pub client_input_len: usize,
    pub requested_output_len: usize,
    /// When the load schedule wanted it sent, and when it was.
    pub scheduled_s: f64,
    pub sent_s: f64,
    /// Every content chunk: (arrival time, tokens by client re-tokenization, at least 1).
    pub chunks: Vec<(f64, usize)>,
    pub end_s: f64,
    /// Server-reported usage: authoritative.
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: Option<usize>,
    pub cached_tokens: Option<usize>,
    pub status: Option<u16>,
    /// The first send failed at the connection level and the request was sent again.
    pub retried: bool,
    pub error: Option<String>,
}

impl RequestRecord {
    pub fn success(&self) -> bool {
        self.error.is_none()
    }
    /// Output tokens: the server's count, else the client's.
    pub fn output_tokens(&self) -> usize {
        self.completion_tokens
            .unwrap_or_else(|| self.chunks.iter().map(|c| c.1).sum())
    }
    pub fn ttft(&self) -> Option<f64> {
        self.chunks.first().map(|c| c.0 - self.sent_s)
    }
    pub fn e2el(&self) -> f64 {
        self.end_s - self.sent_s
    }
    /// (E2EL − TTFT) / (n_out − 1), vLLM's definition.
    pub fn tpot(&self) -> Option<f64> {
        let n = self.output_tokens();
        match (self.ttft(), n > 1) {
            (Some(t), true) => Some((self.e2el() - t) / (n - 1) as f64),
            _ => None,
        }
    }
    /// Gaps between consecutive chunks.
    pub fn itl_chunks(&self) -> Vec<f64> {
        self.chunks.windows(2).map(|w| w[1].0 - w[0].0).collect()
    }
    /// Each chunk's gap spread over the tokens it carried.
    pub fn itl_tokens(&self) -> Vec<f64> {
        let mut out = Vec::new();
        for w in self.chunks.windows(2) {
            let per = (w[1].0 - w[0].0) / w[1].1.max(1) as f64;
            out.extend(std::iter::repeat_n(per, w[1].1.max(1)));
        }
        out
    }
}

/// Everything a request needs besides its spec.
pub struct Target {
    pub http: reqwest::Client,
    pub url: String,
    pub chat: bool,
    pub model: String,
    pub ignore_eos: bool,
    pub timeout: Duration,
    /// Sent as `response_format` with every request (`--json-schema`).
    pub response_format: Option<Value>,
}

impl Target {
    pub fn new(
        base_url: &str,
        endpoint: &str,
        model: String,
        ignore_eos: bool,
        timeout: Duration,
    ) -> Target {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            // Below common servers' keep-alive timeouts (llama-server's is 5 s), so a pooled
            // connection is never reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(2))
            .http1_only()
            .tcp_nodelay(true)
            .build()
            .expect("HTTP client");
        let endpoint = if endpoint.starts_with('/') {
            endpoint.to_string()
        } else {
            format!("/{endpoint}")
        };
        Target {
            http,
            url: format!("{}{endpoint}", base_url.trim_end_matches('/')),
            chat: endpoint.contains("chat"),
            model,
            ignore_eos,
            timeout,
            response_format: None,
        }
    }

    fn body(&self, r: &RequestSpec) -> Value {
        let mut b = if self.chat {
            let mut msgs = Vec::new();
            if let Some(s) = &r.system {
                msgs.push(json!({"role": "system", "content": s}));
            }
            msgs.push(json!({"role": "user", "content": r.prompt}));
            json!({"model": self.model, "messages": msgs})
        } else {
            let prompt = match &r.system {
                Some(s) => format!("{s}\n\n{}", r.prompt),
                None => r.prompt.clone(),
            };
            json!({"model": self.model, "prompt": prompt})
        };
        b["max_tokens"] = json!(r.output_len);
        b["temperature"] = json!(0.0);
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
        if self.ignore_eos {
            b["ignore_eos"] = json!(true);
        }
        if let Some(rf) = &self.response_format {
            b["response_format"] = rf.clone();
        }
        b
    }

    /// Sends one request and records it; `t0` is the run's start.
    pub async fn send(
        &self,
        index: usize,
        spec: &RequestSpec,
        tok: &Tokenizer,
        t0: Instant,
        scheduled_s: f64,
    ) -> RequestRecord {
        let mut rec = RequestRecord {
            index,
            kind: spec.kind.to_string(),
            client_input_len: spec.input_len,
            requested_output_len: spec.output_len,
            scheduled_s,
            ..Default::default()
        };
        rec.sent_s = t0.elapsed().as_secs_f64();
        let result = tokio::time::timeout(self.timeout, self.stream(spec, tok, t0, &mut rec)).await;
        rec.end_s = t0.elapsed().as_secs_f64();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => rec.error = Some(e),
            Err(_) => rec.error = Some(format!("timed out after {:?}", self.timeout)),
        }
        rec
    }

    async fn stream(
        &self,
        spec: &RequestSpec,
        tok: &Tokenizer,
        t0: Instant,
        rec: &mut RequestRecord,
    ) -> Result<(), String> {
        let body = self.body(spec);
        let resp = match self.http.post(&self.url).json(&body).send().await {
            Ok(r) => r,
            // A pooled keep-alive connection the server closed just as we reused it fails
            // before the request reaches the server: resend once, on a fresh connection.
            Err(e) if e.is_request() && !e.is_timeout() => {
                rec.retried = true;
                self.http
                    .post(&self.url)
                    .json(&body)
                    .send()
                    .await
                    .map_err(|e| format!("request failed: {}", chain(&e)))?
            }
            Err(e) => return Err(format!("request failed: {}", chain(&e))),
        };
        let status = resp.status();
        rec.status = Some(status.as_u16());
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(format!(
                "HTTP {}: {}",
                status.as_u16(),
                body.chars().take(300).collect::<String>()
            ));
        }
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut done = false;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| format!("stream broke: {}", chain(&e)))?;
            let now = t0.elapsed().as_secs_f64();
            buf.extend_from_slice(&piece);
            // Events end at a blank line.
            while let Some(end) = find_event_end(&buf) {
                let event: Vec<u8> = buf.drain(..end.1).collect();
                let event = String::from_utf8_lossy(&event[..end.0]).into_owned();
                for line in event.lines() {
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim();
                    if data == "[DONE]" {
                        done = true;
                        continue;
                    }
                    let v: Value = serde_json::from_str(data).map_err(|_| {
                        format!(
                            "malformed SSE data: {}",
                            data.chars().take(120).collect::<String>()
                        )
                    })?;
                    if let Some(err) = v.get("error") {
                        return Err(format!("error event: {err}"));
                    }
                    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                        rec.prompt_tokens = u["prompt_tokens"].as_u64().map(|n| n as usize);
                        rec.completion_tokens = u["completion_tokens"].as_u64().map(|n| n as usize);
                        rec.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                            .as_u64()
                            .map(|n| n as usize);
                    }
                    let text = v["choices"][0]["text"]
                        .as_str()
                        .or_else(|| v["choices"][0]["delta"]["content"].as_str())
                        .unwrap_or("");
                    if !text.is_empty() {
                        let n = tok.encode(text, false).map(|t| t.len()).unwrap_or(1).max(1);
                        rec.chunks.push((now, n));
                    }
                }
            }
        }
        if !done {
            return Err("stream ended without [DONE]".into());
        }
        if rec.chunks.is_empty() && spec.output_len > 0 {
            return Err("no tokens were streamed".into());
        }
        Ok(())
    }
}

/// An error with its causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// (end of the event's content, end including the separator).
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| (i, i + 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The first model id the server lists.
pub async fn first_model(http: &reqwest::Client, base_url: &str) -> anyhow::Result<String> {
    let url = format!("{}/v1/models", base_url.trim_end_matches('/'));
    let v: Value = http
        .get(&url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("{url} lists no model"))
}
