//! A Rust client for Sluice: the API calls, and run streams that resume by themselves.
//!
//! [`RunStream`] reads an SSE run stream with [`sse::SseParser`]; when the connection breaks before
//! the terminal event it reconnects with `Last-Event-ID` (with backoff), so its caller sees every
//! event exactly once. The integration tests and `sluice chat` both use it.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use sluice_protocol::WireEvent;
use sluice_protocol::api::{ErrorBody, RunRequest, RunView, ThreadView};

pub use sluice_protocol::sse::{self, SseEvent, SseParser};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP {status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("network: {0}")]
    Network(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("gave up after {0} reconnection attempts")]
    MaxRetries(u32),
}

#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

/// One event of a run stream: its SSE id (the resume cursor), and the decoded event.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub id: String,
    pub event: WireEvent,
    /// The raw JSON, as the server sent it.
    pub data: String,
}

impl Client {
    /// `base` like `http://127.0.0.1:7420`.
    pub fn new(base: impl Into<String>) -> Self {
        Client {
            base: base.into().trim_end_matches('/').to_string(),
            key: None,
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{}", self.base, path));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn json<T: DeserializeOwned>(r: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = r
            .send()
            .await
            .map_err(|e| ClientError::Network(e.to_string()))?;
        let resp = check(resp).await?;
        resp.json()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    pub async fn create_thread(&self) -> Result<ThreadView, ClientError> {
        Self::json(
            self.req(reqwest::Method::POST, "/v1/threads")
                .json(&serde_json::json!({})),
        )
        .await
    }

    pub async fn get_thread(&self, id: &str) -> Result<ThreadView, ClientError> {
        Self::json(self.req(reqwest::Method::GET, &format!("/v1/threads/{id}"))).await
    }

    pub async fn get_run(&self, id: &str) -> Result<RunView, ClientError> {
        Self::json(self.req(reqwest::Method::GET, &format!("/v1/runs/{id}"))).await
    }

    pub async fn cancel(&self, id: &str) -> Result<RunView, ClientError> {
        Self::json(self.req(reqwest::Method::POST, &format!("/v1/runs/{id}/cancel"))).await
    }

    /// Starts a background run (`202`) and answers it.
    pub async fn start_run(
        &self,
        thread: Option<&str>,
        req: &RunRequest,
    ) -> Result<RunView, ClientError> {
        let path = match thread {
            Some(t) => format!("/v1/threads/{t}/runs"),
            None => "/v1/runs".to_string(),
        };
        Self::json(self.req(reqwest::Method::POST, &path).json(req)).await
    }

    /// Starts a run and follows its stream.
    pub async fn stream_run(
        &self,
        thread: Option<&str>,
        req: &RunRequest,
    ) -> Result<RunStream, ClientError> {
        let path = match thread {
            Some(t) => format!("/v1/threads/{t}/runs/stream"),
            None => "/v1/runs/stream".to_string(),
        };
        let resp = self
            .req(reqwest::Method::POST, &path)
            .json(req)
            .send()
            .await
            .map_err(|e| ClientError::Network(e.to_string()))?;
        let resp = check(resp).await?;
        Ok(RunStream::new(
            self.clone(),
            None,
            String::new(),
            Some(resp),
        ))
    }

    /// Follows a run from after `last_id` (`""` or `"0"` for the start).
    pub async fn follow(&self, run_id: &str, last_id: &str) -> Result<RunStream, ClientError> {
        let mut s = RunStream::new(
            self.clone(),
            Some(run_id.to_string()),
            last_id.to_string(),
            None,
        );
        s.connect().await?;
        Ok(s)
    }
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => (b.error.code.as_str().to_string(), b.error.message),
        Err(_) => ("UNKNOWN".to_string(), text),
    };
    Err(ClientError::Api {
        status,
        code,
        message,
    })
}

/// A run's events, resumed across dropped connections; ends after the terminal event.
pub struct RunStream {
    client: Client,
    run_id: Option<String>,
    last_id: String,
    parser: SseParser,
    body: Option<futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    pending: VecDeque<SseEvent>,
    done: bool,
    /// Reconnections so far (for tests and diagnostics).
    pub reconnects: u32,
    pub max_retries: u32,
}

impl RunStream {
    fn new(
        client: Client,
        run_id: Option<String>,
        last_id: String,
        resp: Option<reqwest::Response>,
    ) -> Self {
        RunStream {
            client,
            run_id,
            last_id,
            parser: SseParser::new(),
            body: resp.map(|r| r.bytes_stream().boxed()),
            pending: VecDeque::new(),
            done: false,
            reconnects: 0,
            max_retries: 10,
        }
    }

    pub fn run_id(&self) -> Option<&str> {
        self.run_id.as_deref()
    }

    /// The id of the last event handed out: the cursor to resume from.
    pub fn last_id(&self) -> &str {
        &self.last_id
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        let run_id = self.run_id.clone().ok_or_else(|| {
            ClientError::Protocol("the stream broke before its run id was known".into())
        })?;
        let mut r = self
            .client
            .req(reqwest::Method::GET, &format!("/v1/runs/{run_id}/events"));
        if !self.last_id.is_empty() {
            r = r.header("Last-Event-ID", &self.last_id);
        }
        let resp = r
            .send()
            .await
            .map_err(|e| ClientError::Network(e.to_string()))?;
        let resp = check(resp).await?;
        self.parser = SseParser::new();
        self.body = Some(resp.bytes_stream().boxed());
        Ok(())
    }

    /// Drops the connection as a network failure would (tests use this to force a resume).
    pub fn drop_connection(&mut self) {
        self.body = None;
        self.parser = SseParser::new();
        self.pending.clear();
    }

    /// The next event; `None` after the terminal event.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, ClientError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(ev) = self.pending.pop_front() {
                let event: WireEvent = match serde_json::from_str(&ev.data) {
                    Ok(e) => e,
                    Err(e) => {
                        return Some(Err(ClientError::Protocol(format!("bad event data: {e}"))));
                    }
                };
                self.last_id = ev.id.clone();
                self.run_id.get_or_insert_with(|| event.run_id.clone());
                if matches!(
                    event.body.kind(),
                    k if k.is_terminal()
                ) {
                    self.done = true;
                }
                return Some(Ok(StreamEvent {
                    id: ev.id,
                    event,
                    data: ev.data,
                }));
            }
            let chunk = match self.body.as_mut() {
                Some(body) => body.next().await,
                None => None,
            };
            match chunk {
                Some(Ok(bytes)) => {
                    let events = self.parser.feed(&bytes);
                    self.pending.extend(events);
                }
                // The connection ended or broke before the terminal event: resume.
                Some(Err(_)) | None => {
                    self.drop_connection();
                    loop {
                        if self.reconnects >= self.max_retries {
                            self.done = true;
                            return Some(Err(ClientError::MaxRetries(self.reconnects)));
                        }
                        let backoff = Duration::from_millis(50 * (1u64 << self.reconnects.min(6)));
                        if self.reconnects > 0 {
                            tokio::time::sleep(backoff).await;
                        }
                        self.reconnects += 1;
                        match self.connect().await {
                            Ok(()) => break,
                            Err(e @ ClientError::Api { status, .. }) if status < 500 => {
                                self.done = true;
                                return Some(Err(e));
                            }
                            Err(_) => continue,
                        }
                    }
                }
            }
        }
    }
}
