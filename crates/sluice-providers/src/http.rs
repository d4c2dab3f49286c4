//! A model behind HTTP: one configured provider speaking one of the four wire protocols.
//!
//! The request is sent when the stream is first polled. Before the first model event, connection
//! errors, 429 and 5xx answers, and a first-token timeout are retried with exponential backoff and
//! full jitter, honouring `Retry-After`. After the first event nothing is retried (it would repeat
//! output): a broken or stalled stream ends with an error. Dropping the stream drops the response,
//! which closes the upstream connection — that is how a cancel reaches the provider.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use rand::Rng;
use sluice_protocol::ErrorCode;
use tokio::time::Instant;

use crate::decode::{ByteDecoder, Decoder, Framing};
use crate::h1;
use crate::{
    Model, ModelEvent, ModelRequest, ModelStream, ProviderError, ToolSpec, anthropic, ollama,
    openai_chat, openai_responses,
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

    /// The request body without its `tools` (see [`HttpModel::body`]).
    fn body_without_tools(self, request: &ModelRequest, max_tokens: u32) -> String {
        let (model, messages) = (&request.model, &request.messages);
        match self {
            WireKind::OpenAiResponses => {
                crate::json(&openai_responses::request_body(model, messages, &[]))
            }
            WireKind::OpenAiChat => crate::json(&openai_chat::request_body(model, messages, &[])),
            WireKind::Anthropic => {
                crate::json(&anthropic::request_body(model, messages, &[], max_tokens))
            }
            WireKind::Ollama => crate::json(&ollama::request_body(model, messages, &[])),
        }
    }

    /// The request's `tools` in this protocol's form.
    fn tools(self, tools: &[ToolSpec]) -> serde_json::Value {
        match self {
            WireKind::OpenAiResponses => openai_responses::tools_json(tools),
            WireKind::Anthropic => anthropic::tools_json(tools),
            WireKind::OpenAiChat | WireKind::Ollama => crate::function_tools(tools),
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
    /// Which HTTP client sends the requests.
    pub http_client: HttpClient,
}

/// Which HTTP client talks to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpClient {
    /// Sluice's own HTTP/1.1 client ([`crate::h1`]) for plain-HTTP URLs with no proxy
    /// configured; reqwest for the rest (HTTPS, proxies).
    #[default]
    Auto,
    /// reqwest whatever the URL.
    Reqwest,
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
            .field("http_client", &self.http_client)
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
            http_client: HttpClient::default(),
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

/// How long an idle kept-alive connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Enough idle connections to absorb bursts without keeping every connection of the last burst
/// (each holds buffers) for the whole idle timeout.
const POOL_MAX_IDLE: usize = 256;

/// A provider as a [`Model`].
pub struct HttpModel {
    spec: Arc<ProviderSpec>,
    client: Client,
    /// The last request's tool list and its JSON text: every run of an agent offers the same
    /// tools, and turning their schemas into JSON was most of the time spent building a request
    /// body (~100 µs of the first token's path with the built-in artifact tools).
    tools_text: Mutex<Option<KeptTools>>,
}

/// A tool list and its JSON text in one protocol's form.
type KeptTools = (Arc<[ToolSpec]>, Arc<str>);

/// The HTTP client a provider's requests go through.
#[derive(Clone)]
enum Client {
    /// Sluice's own HTTP/1.1 client, read and written inside the run's task.
    Direct(Arc<h1::Pool>),
    Reqwest(reqwest::Client),
}

impl HttpModel {
    pub fn new(spec: ProviderSpec) -> Result<HttpModel, ProviderError> {
        let url = reqwest::Url::parse(&spec.url()).map_err(|e| {
            ProviderError::new(
                ErrorCode::InvalidRequest,
                format!("invalid base URL `{}`: {e}", spec.base_url),
            )
        })?;
        let client = if spec.http_client == HttpClient::Auto && h1::eligible(&url) {
            let pool = h1::Pool::new(&url, POOL_MAX_IDLE, POOL_IDLE_TIMEOUT)
                .map_err(|e| ProviderError::new(ErrorCode::InvalidRequest, e.message))?;
            Client::Direct(Arc::new(pool))
        } else {
            let client = reqwest::Client::builder()
                .connect_timeout(spec.timeouts.connect)
                .tcp_nodelay(true)
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .pool_max_idle_per_host(POOL_MAX_IDLE)
                .build()
                .map_err(|e| {
                    ProviderError::new(ErrorCode::Internal, format!("HTTP client: {e}"))
                })?;
            Client::Reqwest(client)
        };
        Ok(HttpModel {
            spec: Arc::new(spec),
            client,
            tools_text: Mutex::new(None),
        })
    }

    pub fn spec(&self) -> &ProviderSpec {
        &self.spec
    }

    /// The JSON request body: the conversation, then the tools' JSON (kept from the last
    /// request when the tool list is the same) spliced in as the last member.
    fn body(&self, request: &ModelRequest) -> String {
        let kind = self.spec.kind;
        let mut text = kind.body_without_tools(request, self.spec.max_tokens);
        if request.tools.is_empty() || !text.ends_with('}') {
            return text;
        }
        let tools = {
            let mut cached = self
                .tools_text
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match &*cached {
                Some((specs, text))
                    if Arc::ptr_eq(specs, &request.tools) || specs[..] == request.tools[..] =>
                {
                    text.clone()
                }
                _ => {
                    let text: Arc<str> = kind.tools(&request.tools).to_string().into();
                    *cached = Some((request.tools.clone(), text.clone()));
                    text
                }
            }
        };
        text.pop();
        text.push_str(",\"tools\":");
        text.push_str(&tools);
        text.push('}');
        text
    }

    /// Whether requests go through Sluice's own HTTP/1.1 client (else reqwest).
    pub fn uses_direct_client(&self) -> bool {
        matches!(self.client, Client::Direct(_))
    }
}

impl Model for HttpModel {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let body = self.body(&request);
        let call = Call {
            spec: self.spec.clone(),
            client: self.client.clone(),
            body: Bytes::from(body),
            started: Instant::now(),
            attempt: 0,
            emitted: false,
            body_stream: None,
            timer: None,
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
    client: Client,
    body: Bytes,
    started: Instant,
    attempt: u32,
    /// Whether a model event has been handed out: from then on nothing is retried.
    emitted: bool,
    body_stream: Option<Body>,
    decoder: Option<ByteDecoder>,
    /// The first-token / idle deadline's timer, made on the first read.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
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

    /// Sends the request and answers the response's status, its `Retry-After`, and its body.
    /// (A function of the call's parts rather than of the call, so the future stays `Send`.)
    async fn send(
        spec: &ProviderSpec,
        client: &Client,
        body: &Bytes,
    ) -> Result<(u16, Option<String>, Body), Failure> {
        let name = &spec.name;
        let anthropic = spec.kind == WireKind::Anthropic;
        match client {
            Client::Direct(pool) => {
                let bearer = spec.api_key.as_ref().map(|k| format!("Bearer {k}"));
                let mut headers = vec![("Content-Type", "application/json")];
                match (&spec.api_key, &bearer) {
                    (Some(key), _) if anthropic => headers.push(("x-api-key", key)),
                    (_, Some(bearer)) => headers.push(("Authorization", bearer)),
                    _ => {}
                }
                if anthropic {
                    headers.push(("anthropic-version", ANTHROPIC_VERSION));
                }
                let resp = pool
                    .post(&headers, body, spec.timeouts.connect)
                    .await
                    .map_err(|e| Failure {
                        error: ProviderError::new(
                            match e.kind {
                                h1::ErrorKind::ConnectTimeout => ErrorCode::UpstreamTimeout,
                                _ => ErrorCode::UpstreamError,
                            },
                            format!("cannot reach {name}: {e}"),
                        ),
                        retryable: e.kind != h1::ErrorKind::Request,
                        retry_after: None,
                    })?;
                let retry_after = resp.header("retry-after").map(str::to_string);
                Ok((resp.status(), retry_after, Body::Direct(resp)))
            }
            Client::Reqwest(client) => {
                let mut req = client
                    .post(spec.url())
                    .header("content-type", "application/json")
                    .body(body.clone());
                if let Some(key) = &spec.api_key {
                    req = if anthropic {
                        req.header("x-api-key", key)
                    } else {
                        req.bearer_auth(key)
                    };
                }
                if anthropic {
                    req = req.header("anthropic-version", ANTHROPIC_VERSION);
                }
                let resp = req.send().await.map_err(|e| Failure {
                    error: ProviderError::new(
                        if e.is_timeout() {
                            ErrorCode::UpstreamTimeout
                        } else {
                            ErrorCode::UpstreamError
                        },
                        format!("cannot reach {name}: {}", describe(&e)),
                    ),
                    retryable: true,
                    retry_after: None,
                })?;
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Ok((
                    resp.status().as_u16(),
                    retry_after,
                    Body::Reqwest(resp.bytes_stream().boxed()),
                ))
            }
        }
    }

    async fn connect(&mut self) -> Result<(), Failure> {
        let name = self.spec.name.clone();
        let (status, retry_after, mut body) = match tokio::time::timeout(
            self.first_token_left(),
            Self::send(&self.spec, &self.client, &self.body),
        )
        .await
        {
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
            Ok(Err(failure)) => return Err(failure),
            Ok(Ok(answer)) => answer,
        };
        if !(200..300).contains(&status) {
            let retry_after = retry_after
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
            let text = tokio::time::timeout(Duration::from_secs(5), body.text(500))
                .await
                .unwrap_or_default();
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
                429 => (ErrorCode::RateLimited, true),
                408 | 504 => (ErrorCode::UpstreamTimeout, true),
                500..=599 => (ErrorCode::UpstreamError, true),
                400 | 404 | 422 => (ErrorCode::InvalidRequest, false),
                _ => (ErrorCode::UpstreamError, false),
            };
            return Err(Failure {
                error: ProviderError::new(code, format!("{name} answered HTTP {status}: {detail}")),
                retryable,
                retry_after,
            });
        }
        tracing::debug!(provider = %self.spec.name, attempt = self.attempt, headers_us = self.started.elapsed().as_micros() as u64, "upstream answered");
        self.body_stream = Some(body);
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
        // One timer for the whole call, moved only when it fires early or must fire sooner: a
        // fresh timeout per chunk would cost a timer-wheel insert and removal (and often a
        // wake-up of the runtime's driver) for every chunk.
        let deadline = Instant::now()
            .checked_add(limit)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        let next = loop {
            tokio::select! {
                biased;
                item = body.next() => break Some(item),
                () = timer.as_mut() => {
                    if Instant::now() >= deadline {
                        break None;
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        };
        let mut out = Vec::new();
        let result = match next {
            None => Err(Failure {
                error: ProviderError::new(ErrorCode::UpstreamTimeout, format!("{name} {what}")),
                retryable: !self.emitted,
                retry_after: None,
            }),
            Some(Some(Ok(bytes))) => decoder.feed(&bytes, &mut out).map_err(|error| Failure {
                error,
                retryable: false,
                retry_after: None,
            }),
            Some(Some(Err(e))) => Err(Failure {
                error: ProviderError::new(
                    ErrorCode::UpstreamError,
                    format!("the connection to {name} broke: {e}"),
                ),
                retryable: true,
                retry_after: None,
            }),
            Some(None) => {
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

/// The Anthropic API version requested.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// A response body from either client.
enum Body {
    Direct(h1::Response),
    Reqwest(BoxStream<'static, reqwest::Result<Bytes>>),
}

impl Body {
    /// The next piece of the body; `None` at its end.
    async fn next(&mut self) -> Option<Result<Bytes, String>> {
        match self {
            Body::Direct(resp) => resp.chunk().await.map(|r| r.map_err(|e| e.message)),
            Body::Reqwest(stream) => stream.next().await.map(|r| r.map_err(|e| describe(&e))),
        }
    }

    /// Up to `limit` bytes of the body as text (an error answer's explanation); what arrived
    /// before a failure.
    async fn text(&mut self, limit: usize) -> String {
        let mut out = Vec::new();
        while let Some(Ok(piece)) = self.next().await {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&piece[..piece.len().min(room)]);
        }
        String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn plain_http_upstreams_use_the_direct_client_unless_told_otherwise() {
        let model = |base: &str, client: HttpClient| {
            let mut spec = ProviderSpec::new("p", WireKind::OpenAiChat, base);
            spec.http_client = client;
            HttpModel::new(spec).unwrap().uses_direct_client()
        };
        let no_proxy = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .all(|v| std::env::var_os(v).is_none());
        if no_proxy {
            assert!(model("http://127.0.0.1:8000/v1", HttpClient::Auto));
            assert!(
                model("localhost:11434", HttpClient::Auto),
                "OLLAMA_HOST style"
            );
        }
        assert!(!model("http://127.0.0.1:8000/v1", HttpClient::Reqwest));
        assert!(!model("https://api.openai.com/v1", HttpClient::Auto));
        assert!(HttpModel::new(ProviderSpec::new("p", WireKind::Ollama, "http://[bad")).is_err());
    }

    #[test]
    fn the_body_with_kept_tools_is_the_adapters_own_body() {
        let tool = |name: &str| ToolSpec {
            name: name.into(),
            description: format!("{name} things"),
            parameters: serde_json::json!({"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}),
        };
        let messages = vec![
            crate::ChatMessage::text(crate::Role::System, "be brief"),
            crate::ChatMessage::text(crate::Role::User, "hi \"there\""),
        ];
        let first: Arc<[ToolSpec]> = vec![tool("a"), tool("b")].into();
        let other: Arc<[ToolSpec]> = vec![tool("c")].into();
        for kind in [
            WireKind::OpenAiResponses,
            WireKind::OpenAiChat,
            WireKind::Anthropic,
            WireKind::Ollama,
        ] {
            let model = HttpModel::new(ProviderSpec::new("p", kind, "http://127.0.0.1:9")).unwrap();
            let request = |tools: &Arc<[ToolSpec]>| ModelRequest {
                model: "m".into(),
                messages: messages.clone(),
                tools: tools.clone(),
            };
            let own = |tools: &[ToolSpec]| {
                match kind {
                    WireKind::OpenAiResponses => {
                        serde_json::to_value(openai_responses::request_body("m", &messages, tools))
                    }
                    WireKind::OpenAiChat => {
                        serde_json::to_value(openai_chat::request_body("m", &messages, tools))
                    }
                    WireKind::Anthropic => {
                        serde_json::to_value(anthropic::request_body("m", &messages, tools, 8192))
                    }
                    WireKind::Ollama => {
                        serde_json::to_value(ollama::request_body("m", &messages, tools))
                    }
                }
                .unwrap()
            };
            let parse = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
            // Built, then kept (the same list, and an equal list in another Arc), then replaced.
            let copy: Arc<[ToolSpec]> = first.iter().cloned().collect::<Vec<_>>().into();
            for tools in [&first, &first, &copy, &other, &first] {
                assert_eq!(parse(model.body(&request(tools))), own(tools), "{kind:?}");
            }
            let none: Arc<[ToolSpec]> = Vec::new().into();
            assert_eq!(parse(model.body(&request(&none))), own(&[]), "{kind:?}");
        }
    }
}
