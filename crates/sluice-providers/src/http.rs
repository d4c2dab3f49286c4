//! A model behind HTTP: one configured provider speaking one of the four wire protocols.
//!
//! The request is sent when the stream is first polled. Before the first model event, connection
//! errors, 429 and 5xx answers, and a first-token timeout are retried with exponential backoff and
//! full jitter, honouring `Retry-After`. After the first event nothing is retried (it would repeat
//! output): a broken or stalled stream ends with an error. Dropping the stream drops the response,
//! which closes the upstream connection — that is how a cancel reaches the provider.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use rand::Rng;
use reqwest::StatusCode;
use sluice_protocol::ErrorCode;
use tokio::time::Instant;

use crate::decode::{ByteDecoder, Decoder, Framing};
use crate::{
    Model, ModelEvent, ModelRequest, ModelStream, ProviderError, anthropic, ollama, openai_chat,
    openai_responses,
};

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireKind {
    OpenAiResponses,
    OpenAiChat,
    Anthropic,
    Ollama,
}

impl WireKind {
    /// Parses the `kind` of a configured provider.
    pub fn parse(s: &str) -> Option<WireKind> {
        match s {
            "openai-responses" | "openai" => Some(WireKind::OpenAiResponses),
            "openai-chat" | "openai-compatible" => Some(WireKind::OpenAiChat),
            "anthropic" => Some(WireKind::Anthropic),
            "ollama" => Some(WireKind::Ollama),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WireKind::OpenAiResponses => "openai-responses",
            WireKind::OpenAiChat => "openai-chat",
            WireKind::Anthropic => "anthropic",
            WireKind::Ollama => "ollama",
        }
    }

    /// The path appended to the provider's base URL (OpenAI's base URLs include `/v1`, as
    /// `OPENAI_BASE_URL` does; Anthropic's and Ollama's do not).
    pub fn path(self) -> &'static str {
        match self {
            WireKind::OpenAiResponses => "/responses",
            WireKind::OpenAiChat => "/chat/completions",
            WireKind::Anthropic => "/v1/messages",
            WireKind::Ollama => "/api/chat",
        }
    }

    fn framing(self) -> Framing {
        match self {
            WireKind::Ollama => Framing::Ndjson,
            _ => Framing::Sse,
        }
    }

    fn decoder(self) -> Box<dyn Decoder> {
        match self {
            WireKind::OpenAiResponses => Box::<openai_responses::ResponsesDecoder>::default(),
            WireKind::OpenAiChat => Box::<openai_chat::ChatDecoder>::default(),
            WireKind::Anthropic => Box::<anthropic::AnthropicDecoder>::default(),
            WireKind::Ollama => Box::<ollama::OllamaDecoder>::default(),
        }
    }

    fn body(self, request: &ModelRequest, max_tokens: u32) -> serde_json::Value {
        let (model, messages, tools) = (&request.model, &request.messages, &request.tools);
        match self {
            WireKind::OpenAiResponses => openai_responses::request_body(model, messages, tools),
            WireKind::OpenAiChat => openai_chat::request_body(model, messages, tools),
            WireKind::Anthropic => anthropic::request_body(model, messages, tools, max_tokens),
            WireKind::Ollama => ollama::request_body(model, messages, tools),
        }
    }
}

/// Time limits for one upstream call.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP (and TLS) connection.
    pub connect: Duration,
    /// From sending the request to the first model event.
    pub first_token: Duration,
    /// The longest silence between two chunks once streaming.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            first_token: Duration::from_secs(120),
            idle: Duration::from_secs(60),
        }
    }
}

/// Retries before the first token.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub max_retries: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_retries: 2,
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
        }
    }
}

/// One configured provider.
#[derive(Clone)]
pub struct ProviderSpec {
    /// The name runs use: `openai` in `openai/gpt-5`.
    pub name: String,
    pub kind: WireKind,
    pub base_url: String,
    pub api_key: Option<String>,
    pub timeouts: Timeouts,
    pub retry: Retry,
    /// Anthropic requires `max_tokens`.
    pub max_tokens: u32,
}

impl std::fmt::Debug for ProviderSpec {
    // The key never appears in logs or errors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeouts", &self.timeouts)
            .field("retry", &self.retry)
            .finish()
    }
}

impl ProviderSpec {
    pub fn new(name: impl Into<String>, kind: WireKind, base_url: impl Into<String>) -> Self {
        ProviderSpec {
            name: name.into(),
            kind,
            base_url: base_url.into(),
            api_key: None,
            timeouts: Timeouts::default(),
            retry: Retry::default(),
            max_tokens: 8192,
        }
    }

    pub fn url(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        let base = if base.contains("://") {
            base.to_string()
        } else {
            // OLLAMA_HOST is often given as host:port.
            format!("http://{base}")
        };
        format!("{base}{}", self.kind.path())
    }
}

/// A provider as a [`Model`].
pub struct HttpModel {
    spec: Arc<ProviderSpec>,
    client: reqwest::Client,
}

impl HttpModel {
    pub fn new(spec: ProviderSpec) -> Result<HttpModel, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(spec.timeouts.connect)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            // Enough idle connections to absorb bursts without keeping every connection of the
            // last burst (each holds buffers) for the whole idle timeout.
            .pool_max_idle_per_host(256)
            .build()
            .map_err(|e| ProviderError::new(ErrorCode::Internal, format!("HTTP client: {e}")))?;
        Ok(HttpModel {
            spec: Arc::new(spec),
            client,
        })
    }

    pub fn spec(&self) -> &ProviderSpec {
        &self.spec
    }
}

impl Model for HttpModel {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let body = self.spec.kind.body(&request, self.spec.max_tokens);
        let call = Call {
            spec: self.spec.clone(),
            client: self.client.clone(),
            body: Bytes::from(body.to_string()),
            started: Instant::now(),
            attempt: 0,
            emitted: false,
            body_stream: None,
            decoder: None,
            pending: VecDeque::new(),
            deferred: None,
            finished: false,
        };
        Box::pin(stream::unfold(call, |mut call| async move {
            let item = call.next().await?;
            Some((item, call))
        }))
    }
}

struct Call {
    spec: Arc<ProviderSpec>,
    client: reqwest::Client,
    body: Bytes,
    started: Instant,
    attempt: u32,
    /// Whether a model event has been handed out: from then on nothing is retried.
    emitted: bool,
    body_stream: Option<BoxStream<'static, reqwest::Result<Bytes>>>,
    decoder: Option<ByteDecoder>,
    pending: VecDeque<ModelEvent>,
    /// A failure that arrived with events: handed out after them.
    deferred: Option<ProviderError>,
    finished: bool,
}

/// The longest `Retry-After` honoured before giving up waiting.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Why an attempt failed, and whether another may succeed.
struct Failure {
    error: ProviderError,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Call {
    async fn next(&mut self) -> Option<Result<ModelEvent, ProviderError>> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                self.emitted = true;
                return Some(Ok(ev));
            }
            if let Some(error) = self.deferred.take() {
                self.finished = true;
                return Some(Err(self.redact(error)));
            }
            if self.finished {
                return None;
            }
            let failure = if self.body_stream.is_none() {
                match self.connect().await {
                    Ok(()) => continue,
                    Err(f) => f,
                }
            } else {
                match self.read().await {
                    Ok(()) => continue,
                    Err(f) => f,
                }
            };
            self.body_stream = None;
            self.decoder = None;
            if failure.retryable && !self.emitted && self.attempt < self.spec.retry.max_retries {
                // The provider's Retry-After wins over our own backoff (within reason).
                let delay = match failure.retry_after {
                    Some(after) => after.min(MAX_RETRY_AFTER),
                    None => self.backoff(),
                };
                tracing::warn!(provider = %self.spec.name, attempt = self.attempt + 1, delay_ms = delay.as_millis() as u64, error = %self.redact(failure.error.clone()), "retrying upstream request");
                self.attempt += 1;
                self.finished = false;
                tokio::time::sleep(delay).await;
                self.started = Instant::now();
                continue;
            }
            self.finished = true;
            return Some(Err(self.redact(failure.error)));
        }
    }

    /// Removes the API key from a message that may quote the provider's answer (some providers
    /// echo part of a bad key back).
    fn redact(&self, mut error: ProviderError) -> ProviderError {
        if let Some(key) = self.spec.api_key.as_deref().filter(|k| k.len() >= 8) {
            error.message = error.message.replace(key, "<redacted>");
        }
        error
    }

    fn backoff(&self) -> Duration {
        let exp = self
            .spec
            .retry
            .base_backoff
            .saturating_mul(1u32 << self.attempt.min(16));
        let cap = exp.min(self.spec.retry.max_backoff);
        // Full jitter between half and all of the capped backoff.
        let ms = cap.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
    }

    fn first_token_left(&self) -> Duration {
        self.spec
            .timeouts
            .first_token
            .saturating_sub(self.started.elapsed())
    }

    async fn connect(&mut self) -> Result<(), Failure> {
        let mut req = self
            .client
            .post(self.spec.url())
            .header("content-type", "application/json")
            .body(self.body.clone());
        if let Some(key) = &self.spec.api_key {
            req = match self.spec.kind {
                WireKind::Anthropic => req.header("x-api-key", key),
                _ => req.bearer_auth(key),
            };
        }
        if self.spec.kind == WireKind::Anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        let name = self.spec.name.clone();
        let resp = match tokio::time::timeout(self.first_token_left(), req.send()).await {
            Err(_) => {
                return Err(Failure {
                    error: ProviderError::new(
                        ErrorCode::UpstreamTimeout,
                        format!("{name} did not answer within the first-token timeout"),
                    ),
                    retryable: true,
                    retry_after: None,
                });
            }
            Ok(Err(e)) => {
                let code = if e.is_timeout() {
                    ErrorCode::UpstreamTimeout
                } else {
                    ErrorCode::UpstreamError
                };
                return Err(Failure {
                    error: ProviderError::new(
                        code,
                        format!("cannot reach {name}: {}", describe(&e)),
                    ),
                    retryable: true,
                    retry_after: None,
                });
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status();
        if !status.is_success() {
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
            let text = match tokio::time::timeout(Duration::from_secs(5), resp.text()).await {
                Ok(Ok(t)) => t.chars().take(500).collect::<String>(),
                _ => String::new(),
            };
            let detail = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    let e = v.get("error").cloned().unwrap_or(v);
                    e.get("message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                        .or_else(|| e.as_str().map(str::to_string))
                })
                .unwrap_or(text);
            let (code, retryable) = match status {
                StatusCode::TOO_MANY_REQUESTS => (ErrorCode::RateLimited, true),
                StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
                    (ErrorCode::UpstreamTimeout, true)
                }
                s if s.is_server_error() || s.as_u16() == 529 => (ErrorCode::UpstreamError, true),
                StatusCode::BAD_REQUEST
                | StatusCode::NOT_FOUND
                | StatusCode::UNPROCESSABLE_ENTITY => (ErrorCode::InvalidRequest, false),
                _ => (ErrorCode::UpstreamError, false),
            };
            return Err(Failure {
                error: ProviderError::new(
                    code,
                    format!("{name} answered HTTP {}: {detail}", status.as_u16()),
                ),
                retryable,
                retry_after,
            });
        }
        tracing::debug!(provider = %self.spec.name, attempt = self.attempt, headers_us = self.started.elapsed().as_micros() as u64, "upstream answered");
        self.body_stream = Some(resp.bytes_stream().boxed());
        self.decoder = Some(ByteDecoder::new(
            self.spec.kind.framing(),
            self.spec.kind.decoder(),
        ));
        Ok(())
    }

    async fn read(&mut self) -> Result<(), Failure> {
        let name = &self.spec.name;
        let (Some(body), Some(decoder)) = (self.body_stream.as_mut(), self.decoder.as_mut()) else {
            return Ok(());
        };
        let (limit, what) = if self.emitted {
            (self.spec.timeouts.idle, "sent nothing for the idle timeout")
        } else {
            (
                self.spec
                    .timeouts
                    .first_token
                    .saturating_sub(self.started.elapsed()),
                "sent no first token within the first-token timeout",
            )
        };
        let mut out = Vec::new();
        let result = match tokio::time::timeout(limit, body.next()).await {
            Err(_) => Err(Failure {
                error: ProviderError::new(ErrorCode::UpstreamTimeout, format!("{name} {what}")),
                retryable: !self.emitted,
                retry_after: None,
            }),
            Ok(Some(Ok(bytes))) => decoder.feed(&bytes, &mut out).map_err(|error| Failure {
                error,
                retryable: false,
                retry_after: None,
            }),
            Ok(Some(Err(e))) => Err(Failure {
                error: ProviderError::new(
                    ErrorCode::UpstreamError,
                    format!("the connection to {name} broke: {}", describe(&e)),
                ),
                retryable: true,
                retry_after: None,
            }),
            Ok(None) => {
                let res = decoder.finish(&mut out);
                self.finished = true;
                res.map_err(|error| Failure {
                    // A body that ended before any event is a dropped connection: worth another try.
                    retryable: !self.emitted && out.is_empty(),
                    error,
                    retry_after: None,
                })
            }
        };
        if decoder.is_done() {
            self.finished = true;
            // Read the (normally empty) rest of the body so the connection goes back to the pool
            // instead of being closed: the next request then skips connection setup.
            let drain = async { while let Some(Ok(_)) = body.next().await {} };
            let _ = tokio::time::timeout(Duration::from_millis(50), drain).await;
        }
        self.pending.extend(out);
        match result {
            // Deliver what arrived before the failure; the failure ends the stream after it.
            Err(f) if !self.pending.is_empty() => {
                self.deferred = Some(f.error);
                Ok(())
            }
            other => other,
        }
    }
}

/// A reqwest error without its URL (which could carry credentials in a misconfigured base URL),
/// with its underlying cause.
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "reading the response failed"
    } else {
        "request failed"
    };
    let mut cause = std::error::Error::source(e);
    let mut msg = what.to_string();
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    msg
}
