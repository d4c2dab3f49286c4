//! Every wire protocol, over real HTTP, against the project's upstream simulator: normal streams,
//! each fault, what the client receives and what is persisted; retries, fallbacks, and a cancel
//! that closes the upstream connection.

use std::time::{Duration, Instant};

use sluice_client::StreamEvent;
use sluice_protocol::api::{MessageStatus, RunStatus};
use sluice_protocol::{ErrorCode, EventBody, EventKind};
use sluice_providers::http::{HttpClient, ProviderSpec, Retry, Timeouts, WireKind};
use sluice_providers::registry::Alias;

use crate::{Opts, TestServer, collect, req, simulator, text_of};

const SECRET: &str = "sk-test-SECRET-never-shown";

/// Both HTTP clients: Sluice's own (plain-HTTP upstreams) and reqwest (HTTPS, proxies).
const CLIENTS: [HttpClient; 2] = [HttpClient::Auto, HttpClient::Reqwest];

fn spec(name: &str, kind: WireKind, base: &str, client: HttpClient) -> ProviderSpec {
    let mut s = ProviderSpec::new(name, kind, base);
    s.http_client = client;
    s.api_key = Some(SECRET.into());
    s.timeouts = Timeouts {
        connect: Duration::from_secs(2),
        first_token: Duration::from_secs(5),
        idle: Duration::from_millis(400),
    };
    s.retry = Retry {
        max_retries: 2,
        base_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
    };
    s
}

const KINDS: [(&str, WireKind); 4] = [
    ("openai", WireKind::OpenAiResponses),
    ("openai-chat", WireKind::OpenAiChat),
    ("anthropic", WireKind::Anthropic),
    ("ollama", WireKind::Ollama),
];

async fn server_with_simulator(
    aliases: Vec<(String, Alias)>,
    client: HttpClient,
) -> (TestServer, String) {
    let sim = simulator().await;
    let mut providers: Vec<ProviderSpec> = KINDS
        .iter()
        .map(|(name, kind)| {
            let base = match kind {
                WireKind::OpenAiResponses | WireKind::OpenAiChat => format!("{sim}/v1"),
                _ => sim.clone(),
            };
            spec(name, *kind, &base, client)
        })
        .collect();
    // Nothing listens on port 1: every connection is refused.
    providers.push(spec(
        "offline",
        WireKind::OpenAiChat,
        "http://127.0.0.1:1/v1",
        client,
    ));
    let mut slow = spec(
        "impatient",
        WireKind::OpenAiChat,
        &format!("{sim}/v1"),
        client,
    );
    slow.timeouts.first_token = Duration::from_millis(300);
    slow.retry.max_retries = 0;
    providers.push(slow);
    // One model call per run: these tests are about the wire protocols, not the tool loop.
    let server = TestServer::start(Opts {
        providers,
        aliases,
        max_steps: 1,
        ..Opts::default()
    })
    .await;
    (server, sim)
}

async fn run(server: &TestServer, model: &str) -> Vec<StreamEvent> {
    let mut r = req("hello");
    r.model = Some(model.to_string());
    collect(server.client().stream_run(None, &r).await.expect("stream")).await
}

fn kinds(events: &[StreamEvent]) -> Vec<EventKind> {
    events.iter().map(|e| e.event.body.kind()).collect()
}

async fn stored_message(
    server: &TestServer,
    events: &[StreamEvent],
) -> sluice_protocol::api::MessageView {
    let thread_id = crate::thread_of(events);
    let thread = server
        .client()
        .get_thread(&thread_id)
        .await
        .expect("thread");
    thread
        .messages
        .expect("messages")
        .into_iter()
        .nth(1)
        .expect("assistant message")
}

async fn sim_stats(sim: &str) -> serde_json::Value {
    reqwest::get(format!("{sim}/sim/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn each_wire_protocol_streams_reasoning_text_tool_calls_and_usage_and_persists_them() {
    for client in CLIENTS {
        each_wire_protocol_streams_reasoning_text_tool_calls_and_usage_and_persists_them_with(
            client,
        )
        .await;
    }
}

async fn each_wire_protocol_streams_reasoning_text_tool_calls_and_usage_and_persists_them_with(
    client: HttpClient,
) {
    let (server, _sim) = server_with_simulator(Vec::new(), client).await;
    for (provider, kind) in KINDS {
        // Ollama streams neither reasoning summaries nor call fragments, but thinking and whole calls.
        let model = format!("{provider}/sim?tokens=12&reasoning=4&tools=2&gap_us=200");
        let events = run(&server, &model).await;
        let k = kinds(&events);
        assert_eq!(k.first(), Some(&EventKind::RunStarted), "{kind:?}");
        assert_eq!(k.last(), Some(&EventKind::RunCompleted), "{kind:?}: {k:?}");
        crate::assert_seqs_follow_the_log(&events);
        let text = text_of(&events);
        assert_eq!(
            text,
            (0..12).map(|i| format!("tok{i} ")).collect::<String>(),
            "{kind:?}"
        );
        let reasoning: String = events
            .iter()
            .filter_map(|e| match &e.event.body {
                EventBody::ReasoningDelta { delta } => Some(delta.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reasoning, "think0 think1 think2 think3 ", "{kind:?}");
        let calls: Vec<(String, String)> = events
            .iter()
            .filter_map(|e| match &e.event.body {
                EventBody::FunctionCallDone {
                    call_id, arguments, ..
                } => Some((call_id.clone(), arguments.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(calls.len(), 2, "{kind:?}");
        for (i, (_, args)) in calls.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(args).expect("arguments are JSON");
            assert_eq!(v["limit"], i, "{kind:?}");
        }
        let fragments = k
            .iter()
            .filter(|k| **k == EventKind::FunctionCallDelta)
            .count();
        if kind != WireKind::Ollama {
            assert!(
                fragments >= 8,
                "{kind:?}: argument fragments are forwarded as they come ({fragments})"
            );
        }
        let EventBody::RunCompleted { usage, .. } = &events.last().expect("last").event.body else {
            unreachable!()
        };
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (10, 16),
            "{kind:?}"
        );
        if matches!(kind, WireKind::OpenAiResponses | WireKind::OpenAiChat) {
            assert_eq!(usage.reasoning_tokens, 4, "{kind:?}");
        }
        let message = stored_message(&server, &events).await;
        assert_eq!(
            (message.content.as_str(), message.status),
            (text.as_str(), MessageStatus::Complete)
        );
        assert_eq!(message.reasoning, reasoning);
        let stored = server
            .client()
            .get_run(&events[0].event.run_id)
            .await
            .expect("run");
        assert_eq!(
            stored.usage, *usage,
            "{kind:?}: usage is stored with the run"
        );
    }
    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert!(
        metrics.contains("sluice_tokens_total{kind=\"output\"} 64"),
        "{metrics}"
    );
}

/// What a faulty run ends with.
async fn failed_with(server: &TestServer, model: &str) -> (ErrorCode, String, Vec<StreamEvent>) {
    let events = run(server, model).await;
    let k = kinds(&events);
    assert_eq!(
        &k[k.len() - 2..],
        [EventKind::Error, EventKind::RunFailed],
        "{model}: {k:?}"
    );
    let EventBody::RunFailed { error } = &events.last().expect("last").event.body else {
        unreachable!()
    };
    assert!(
        !error.message.contains(SECRET),
        "the key never appears in errors"
    );
    (error.code, error.message.clone(), events)
}

#[tokio::test]
async fn each_fault_ends_the_run_as_a_user_expects_for_each_protocol() {
    for client in CLIENTS {
        each_fault_ends_the_run_as_a_user_expects_for_each_protocol_with(client).await;
    }
}

async fn each_fault_ends_the_run_as_a_user_expects_for_each_protocol_with(client: HttpClient) {
    let (server, sim) = server_with_simulator(Vec::new(), client).await;
    for (provider, kind) in KINDS {
        // A drop mid-stream: error + run_failed, the partial message kept.
        let (code, msg, events) = failed_with(
            &server,
            &format!("{provider}/sim?tokens=10&fault=drop&after=3"),
        )
        .await;
        assert_eq!(code, ErrorCode::UpstreamError, "{kind:?}: {msg}");
        assert_eq!(text_of(&events), "tok0 tok1 tok2 ", "{kind:?}");
        let message = stored_message(&server, &events).await;
        assert_eq!(
            (message.content.as_str(), message.status),
            ("tok0 tok1 tok2 ", MessageStatus::Incomplete)
        );
        let stored = server
            .client()
            .get_run(&events[0].event.run_id)
            .await
            .expect("run");
        assert_eq!(stored.status, RunStatus::Failed);
        assert_eq!(stored.error.map(|e| e.code), Some(ErrorCode::UpstreamError));

        // A malformed chunk: a clear error naming it, never a panic.
        let (code, msg, events) = failed_with(
            &server,
            &format!("{provider}/sim?tokens=10&fault=malformed&after=2"),
        )
        .await;
        assert_eq!(code, ErrorCode::UpstreamError, "{kind:?}");
        assert!(msg.contains("malformed"), "{kind:?}: {msg}");
        assert_eq!(text_of(&events), "tok0 tok1 ");

        // A stall: the idle timeout ends it.
        let (code, msg, _) = failed_with(
            &server,
            &format!("{provider}/sim?tokens=10&fault=stall&after=2"),
        )
        .await;
        assert_eq!(code, ErrorCode::UpstreamTimeout, "{kind:?}: {msg}");

        // An error status that persists: retried, then a clear error; 429 is RATE_LIMITED.
        let (code, msg, _) =
            failed_with(&server, &format!("{provider}/sim?fault=status&status=503")).await;
        assert_eq!(code, ErrorCode::UpstreamError, "{kind:?}: {msg}");
        assert!(msg.contains("503"), "{msg}");
        let (code, _, _) =
            failed_with(&server, &format!("{provider}/sim?fault=status&status=429")).await;
        assert_eq!(code, ErrorCode::RateLimited, "{kind:?}");

        // A 500 on the first try only: retried and completed, nothing duplicated.
        let model =
            format!("{provider}/sim?tokens=5&fault=status&status=500&times=1&id={provider}");
        let events = run(&server, &model).await;
        assert_eq!(
            kinds(&events).last(),
            Some(&EventKind::RunCompleted),
            "{kind:?}"
        );
        assert_eq!(text_of(&events), "tok0 tok1 tok2 tok3 tok4 ");
    }
    // An unreachable provider: retried, then a clear error that names it and not its key.
    let (code, msg, _) = failed_with(&server, "offline/any-model").await;
    assert_eq!(code, ErrorCode::UpstreamError);
    assert!(msg.contains("cannot reach offline"), "{msg}");
    // No first token in time.
    let (code, msg, _) = failed_with(&server, "impatient/sim?ttft_ms=3000").await;
    assert_eq!(code, ErrorCode::UpstreamTimeout, "{msg}");
    // A provider that quotes the key back: the key is redacted from what the client sees.
    let (_, msg, _) = failed_with(
        &server,
        "openai-chat/sim?fault=status&status=401&echo_auth=1",
    )
    .await;
    assert!(msg.contains("<redacted>"), "{msg}");
    // Persistent failures were tried 1 + max_retries times.
    let stats = sim_stats(&sim).await;
    // Per protocol: drop, malformed and stall once each (output had begun: never retried), the
    // persistent 503 and 429 three times each (1 + max_retries), the one-off 500 twice; then the
    // impatient provider once (no retries) and the 401 once (not retryable).
    assert_eq!(
        stats["requests"],
        4 * (1 + 1 + 1 + 3 + 3 + 2) + 1 + 1,
        "{stats}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_before_the_first_token() {
    let (server, _) = server_with_simulator(Vec::new(), HttpClient::Auto).await;
    let started = Instant::now();
    let events = run(
        &server,
        "openai-chat/sim?tokens=3&fault=status&status=429&retry_after=1&times=1",
    )
    .await;
    assert_eq!(kinds(&events).last(), Some(&EventKind::RunCompleted));
    // The retry waited for the upstream's Retry-After (1 s), far longer than our own 20 ms backoff.
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_fallback_model_takes_over_when_the_first_fails_before_any_token() {
    let aliases = vec![(
        "resilient".to_string(),
        Alias {
            target: "openai-chat/sim?fault=status&status=500".into(),
            fallbacks: vec!["anthropic/sim?tokens=4".into()],
        },
    )];
    let (server, _) = server_with_simulator(aliases, HttpClient::Auto).await;
    let events = run(&server, "resilient").await;
    assert_eq!(kinds(&events).last(), Some(&EventKind::RunCompleted));
    assert_eq!(text_of(&events), "tok0 tok1 tok2 tok3 ");
    let models: serde_json::Value = reqwest::get(format!("{}/v1/models", server.url))
        .await
        .expect("m")
        .json()
        .await
        .expect("j");
    let ids: Vec<&str> = models["models"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"resilient") && ids.contains(&"anthropic/*") && ids.contains(&"demo"),
        "{ids:?}"
    );
}

/// A streamed run's response head never waits for the model: `run_started` arrives while the
/// model has sent nothing and the run is still going.
#[tokio::test]
async fn run_started_does_not_wait_for_a_silent_model() {
    let (server, _sim) = server_with_simulator(Vec::new(), HttpClient::Auto).await;
    let client = server.client();
    let mut r = req("hello");
    r.model = Some("openai-chat/sim?tokens=5&fault=stall&after=0".into());
    let mut stream = client.stream_run(None, &r).await.expect("stream");
    let first = stream.next().await.expect("an event").expect("readable");
    assert_eq!(first.event.body.kind(), EventKind::RunStarted);
    let view = client.get_run(&first.event.run_id).await.expect("run");
    assert_eq!(
        view.status,
        RunStatus::Running,
        "run_started came only once the run had ended"
    );
    let view = client.cancel(&first.event.run_id).await.expect("cancel");
    assert_eq!(view.status, RunStatus::Cancelled);
}

#[tokio::test]
async fn cancelling_a_run_closes_the_upstream_connection() {
    for client in CLIENTS {
        cancelling_a_run_closes_the_upstream_connection_with(client).await;
    }
}

async fn cancelling_a_run_closes_the_upstream_connection_with(client: HttpClient) {
    let (server, sim) = server_with_simulator(Vec::new(), client).await;
    for (provider, kind) in KINDS {
        let before = sim_stats(&sim).await["client_closed"].as_u64().unwrap_or(0);
        let mut r = req("long");
        r.model = Some(format!("{provider}/sim?tokens=100000&gap_ms=5"));
        let client = server.client();
        let mut stream = client.stream_run(None, &r).await.expect("stream");
        let mut texts = 0;
        let mut run_id = String::new();
        while let Some(ev) = stream.next().await {
            let ev = ev.expect("event");
            run_id = ev.event.run_id.clone();
            if ev.event.body.kind() == EventKind::TextDelta {
                texts += 1;
                if texts == 3 {
                    break;
                }
            }
        }
        let view = client.cancel(&run_id).await.expect("cancel");
        assert_eq!(view.status, RunStatus::Cancelled);
        // The simulator sees its client (Sluice) go away.
        let mut closed = before;
        for _ in 0..200 {
            let stats = sim_stats(&sim).await;
            closed = stats["client_closed"].as_u64().unwrap_or(0);
            if closed > before && stats["active"] == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            closed,
            before + 1,
            "{kind:?}: the upstream stream was closed by the cancel"
        );
    }
}
