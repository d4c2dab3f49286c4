//! Integration tests: the real server on a free port, spoken to over real HTTP and WebSocket.
//! `process.rs` runs the real binary as a child process (for kill -9).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent;
mod api;
mod durability;
mod mcp_server;
mod process;
mod providers;
mod resume;
mod streaming;

use std::sync::Arc;
use std::time::Duration;

use sluice::config::Config;
use sluice_client::{Client, StreamEvent};
use sluice_engine::{Coalesce, EngineConfig};
use sluice_protocol::api::RunRequest;
use sluice_server::{ApiKeys, HttpConfig};

pub struct Opts {
    pub tokens_per_sec: f64,
    pub keys: &'static str,
    pub coalesce_bytes: usize,
    pub retention: Duration,
    pub heartbeat: Duration,
    pub max_body: usize,
    pub cors_origins: Vec<String>,
    pub max_runs_per_owner: usize,
    pub providers: Vec<sluice_providers::http::ProviderSpec>,
    pub aliases: Vec<(String, sluice_providers::registry::Alias)>,
    pub default_model: Option<String>,
    pub tools: sluice_engine::ToolRegistry,
    pub max_steps: u32,
    pub agents: std::collections::HashMap<String, sluice_engine::Agent>,
    pub default_agent: Option<String>,
    pub mcp: Vec<(String, sluice::config::McpSection)>,
    pub history_cache: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            tokens_per_sec: 400.0,
            keys: "",
            coalesce_bytes: 16 * 1024,
            retention: Duration::from_secs(60),
            heartbeat: Duration::from_secs(15),
            max_body: 64 * 1024,
            cors_origins: Vec::new(),
            max_runs_per_owner: 0,
            providers: Vec::new(),
            aliases: Vec::new(),
            default_model: None,
            tools: sluice_engine::ToolRegistry::new(),
            max_steps: 8,
            history_cache: true,
            agents: Default::default(),
            default_agent: None,
            mcp: Vec::new(),
        }
    }
}

pub struct TestServer {
    pub running: Option<sluice::Running>,
    pub url: String,
    pub _dir: Arc<tempfile::TempDir>,
}

impl TestServer {
    pub async fn start(opts: Opts) -> TestServer {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_path_buf(),
            store: Default::default(),
            demo_tokens_per_sec: opts.tokens_per_sec,
            keys: ApiKeys::parse(opts.keys).expect("keys"),
            engine: EngineConfig {
                coalesce: Coalesce {
                    max_bytes: opts.coalesce_bytes,
                    max_delay: Duration::ZERO,
                },
                retention: opts.retention,
                max_active_runs_per_owner: opts.max_runs_per_owner,
                default_model: opts.default_model.unwrap_or_else(|| "demo".into()),
                max_steps: opts.max_steps,
                agents: opts.agents,
                default_agent: opts.default_agent,
                history_cache: opts.history_cache,
                ..EngineConfig::default()
            },
            http: HttpConfig {
                heartbeat: opts.heartbeat,
                max_body_bytes: opts.max_body,
                cors_origins: opts.cors_origins,
            },
            providers: opts.providers,
            aliases: opts.aliases,
            tools: opts.tools,
            mcp: opts.mcp,
        };
        let running = sluice::start(config).await.expect("server starts");
        let url = running.url();
        TestServer {
            running: Some(running),
            url,
            _dir: dir,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.url.clone())
    }
}

pub fn req(content: &str) -> RunRequest {
    RunRequest {
        content: content.into(),
        model: None,
        on_busy: Default::default(),
        on_disconnect: Default::default(),
        agent: None,
    }
}

/// Reads a run stream to its end.
pub async fn collect(mut stream: sluice_client::RunStream) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        events.push(ev.expect("stream event"));
    }
    events
}

/// Seqs rise, and skip only where the protocol lets a subscriber that fell behind skip: into a
/// merged text/reasoning delta (which carries the last merged seq) or over superseded artifact
/// intermediates (docs/protocol.md, "Merged deltas"). A subscriber that keeps up sees 1, 2, 3, …;
/// one that starts behind a burst (the run's task may append several events before the stream's
/// first poll) sees merged deltas.
pub fn assert_seqs_follow_the_log(events: &[StreamEvent]) {
    let mut prev = 0;
    for e in events {
        let seq = e.event.seq;
        assert!(seq > prev, "seq {seq} after {prev}");
        if seq > prev + 1 {
            use sluice_protocol::EventKind as K;
            let kind = e.event.body.kind();
            // Skipped intermediates can be followed by any event, but only in a run that makes
            // artifacts.
            let makes_artifacts = events.iter().any(|x| {
                matches!(
                    x.event.body.kind(),
                    K::ArtifactIntermediate | K::ArtifactFinal
                )
            });
            assert!(
                matches!(kind, K::TextDelta | K::ReasoningDelta) || makes_artifacts,
                "seq jumps from {prev} to {seq} at a {kind:?}, which is not a merged delta"
            );
        }
        assert_eq!(e.id, seq.to_string(), "the SSE id is the seq");
        prev = seq;
    }
}

pub fn text_of(events: &[StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match &e.event.body {
            sluice_protocol::EventBody::TextDelta { delta } => Some(delta.as_str()),
            _ => None,
        })
        .collect()
}

/// The project's upstream simulator on a free port; answers its base URL.
pub async fn simulator() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(sluice_providers::simulator::serve(listener));
    format!("http://{addr}")
}

/// A provider named `sim` speaking Chat Completions to a fresh simulator.
pub async fn sim_provider() -> sluice_providers::http::ProviderSpec {
    let base = format!("{}/v1", simulator().await);
    sluice_providers::http::ProviderSpec::new(
        "sim",
        sluice_providers::http::WireKind::OpenAiChat,
        base,
    )
}

/// The thread a run belongs to, from its `run_started` event.
pub fn thread_of(events: &[StreamEvent]) -> String {
    match &events[0].event.body {
        sluice_protocol::EventBody::RunStarted { thread_id, .. } => thread_id.clone(),
        other => panic!("the first event is not run_started: {other:?}"),
    }
}
