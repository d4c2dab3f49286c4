//! The agent loop through the real server and the simulator: concurrent tool calls with progress,
//! the model's next step using their results, invalid arguments the model corrects, a cancel that
//! stops a running tool; each run also resumed from random cursors.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sluice_client::StreamEvent;
use sluice_engine::tools::ToolFuture;
use sluice_engine::{Tool, ToolContext, ToolRegistry};
use sluice_protocol::api::{MessageStatus, RunStatus};
use sluice_protocol::{ErrorCode, EventBody, EventKind};
use sluice_providers::ToolSpec;

use crate::{Opts, TestServer, collect, req, text_of};

/// A lookup that takes `delay` and reports two progress steps; counts calls dropped unfinished.
struct Lookup {
    delay: Duration,
    stopped: Arc<AtomicU32>,
}

/// Counts a call as stopped when dropped before it finished.
struct StopGuard(Arc<AtomicU32>, bool);

impl Drop for StopGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Tool for Lookup {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "lookup".into(),
            description: "Looks a query up".into(),
            parameters: json!({
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 0}},
                "required": ["query"],
                "additionalProperties": false
            }),
        }
    }

    fn call(&self, args: Value, ctx: ToolContext) -> ToolFuture {
        let (delay, stopped) = (self.delay, self.stopped.clone());
        Box::pin(async move {
            let mut guard = StopGuard(stopped, false);
            ctx.progress(
                "searching",
                Some(0.5),
                Some(format!("looking up {}", args["query"])),
            )
            .await;
            tokio::time::sleep(delay).await;
            ctx.progress("ranking", Some(1.0), None).await;
            guard.1 = true;
            Ok(json!({"query": args["query"], "hits": args["limit"]}))
        })
    }
}

async fn server(delay: Duration) -> (TestServer, Arc<AtomicU32>) {
    let sim = crate::sim_provider().await;
    let stopped = Arc::new(AtomicU32::new(0));
    let mut tools = ToolRegistry::new();
    tools.add(Arc::new(Lookup {
        delay,
        stopped: stopped.clone(),
    }));
    let server = TestServer::start(Opts {
        providers: vec![sim],
        tools,
        ..Opts::default()
    })
    .await;
    (server, stopped)
}

async fn run(server: &TestServer, model: &str) -> Vec<StreamEvent> {
    let mut r = req("look things up");
    r.model = Some(model.to_string());
    collect(server.client().stream_run(None, &r).await.expect("stream")).await
}

fn position(events: &[StreamEvent], pred: impl Fn(&EventBody) -> bool) -> usize {
    events
        .iter()
        .position(|e| pred(&e.event.body))
        .expect("event present")
}

/// Following the run from random cursors yields exactly the rest of the sequence.
async fn assert_resumable(client: &sluice_client::Client, events: &[StreamEvent]) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(events.len() as u64);
    let run_id = &events[0].event.run_id;
    let whole: Vec<String> = events.iter().map(|e| e.data.clone()).collect();
    for _ in 0..5 {
        // Resume after the event at a random position (or from the start): the seq to resume
        // from is that event's, which with merged deltas may differ from its position.
        let cut = rng.random_range(0..events.len());
        let after = match cut {
            0 => 0,
            i => events[i - 1].event.seq,
        };
        let rest: Vec<String> = collect(
            client
                .follow(run_id, &after.to_string())
                .await
                .expect("follow"),
        )
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
        // Merged deltas may combine several events: compare the texts and the other events.
        let squash = |v: &[String]| -> (String, Vec<String>) {
            let mut text = String::new();
            let mut others = Vec::new();
            for d in v {
                let e: Value = serde_json::from_str(d).expect("json");
                if e["type"] == "text_delta" || e["type"] == "reasoning_delta" {
                    text.push_str(e["delta"].as_str().unwrap_or(""));
                } else if e["type"] != "artifact_intermediate" {
                    // A lagging reader skips superseded intermediate states; finals are compared.
                    others.push(d.clone());
                }
            }
            (text, others)
        };
        assert_eq!(
            squash(&rest),
            squash(&whole[cut..]),
            "resumed after seq {after}"
        );
    }
}

#[tokio::test]
async fn two_concurrent_tool_calls_interleave_and_the_next_step_uses_their_results() {
    let (server, _) = server(Duration::from_millis(60)).await;
    let events = run(&server, "sim/sim?tokens=3&tools=2").await;
    crate::assert_seqs_follow_the_log(&events);
    let started = |id: &'static str| move |b: &EventBody| matches!(b, EventBody::ToolExecutionStarted { call_id, .. } if call_id == id);
    let completed = |id: &'static str| move |b: &EventBody| matches!(b, EventBody::ToolExecutionCompleted { call_id, .. } if call_id == id);
    let (s0, s1) = (
        position(&events, started("call_0")),
        position(&events, started("call_1")),
    );
    let (c0, c1) = (
        position(&events, completed("call_0")),
        position(&events, completed("call_1")),
    );
    // Each call starts as soon as its arguments are complete, and both run at the same time.
    assert!(
        s0 > position(
            &events,
            |b| matches!(b, EventBody::FunctionCallDone { call_id, .. } if call_id == "call_0")
        )
    );
    assert!(s1 < c0 && s0 < c1, "both started before either finished");
    let progress: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::ToolExecutionProgress { call_id, step, .. } => {
                Some((call_id.clone(), step.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 4, "{progress:?}");
    assert_eq!(
        &progress[..2]
            .iter()
            .map(|p| p.1.as_str())
            .collect::<Vec<_>>(),
        &["searching", "searching"]
    );
    let EventBody::ToolExecutionCompleted { result, .. } = &events[c1].event.body else {
        unreachable!()
    };
    assert_eq!(result, &json!({"query": "item 1", "hits": 1}));
    // The model's next step saw both results and answered.
    let text = text_of(&events);
    assert_eq!(text, "tok0 tok1 tok2 Using 2 results. tok0 tok1 tok2 ");
    assert!(
        position(
            &events,
            // (It may arrive merged with the deltas after it.)
            |b| matches!(b, EventBody::TextDelta { delta } if delta.starts_with("Using "))
        ) > c0.max(c1)
    );
    assert_eq!(
        events.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    let thread_id = crate::thread_of(&events);
    let message = &server
        .client()
        .get_thread(&thread_id)
        .await
        .expect("thread")
        .messages
        .expect("m")[1];
    assert_eq!(
        (message.content.as_str(), message.status),
        (text.as_str(), MessageStatus::Complete)
    );
    assert_resumable(&server.client(), &events).await;
}

#[tokio::test]
async fn invalid_arguments_fail_the_call_and_the_model_recovers_on_the_next_step() {
    let (server, _) = server(Duration::from_millis(5)).await;
    let events = run(&server, "sim/sim?tokens=2&tools=2&bad_args=1").await;
    let failed: Vec<(String, ErrorCode, String)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::ToolExecutionFailed { call_id, error, .. } => {
                Some((call_id.clone(), error.code, error.message.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        (failed[0].0.as_str(), failed[0].1),
        ("call_0", ErrorCode::ToolError)
    );
    assert!(
        failed[0].2.contains("/query: expected string, got integer"),
        "{}",
        failed[0].2
    );
    // The model retried with valid arguments, then answered from all three results.
    assert!(events.iter().any(|e| matches!(&e.event.body, EventBody::ToolExecutionCompleted { call_id, .. } if call_id == "call_retry")));
    let text = text_of(&events);
    assert!(
        text.contains("Retrying with valid arguments. ")
            && text.ends_with("Using 3 results. tok0 tok1 "),
        "{text}"
    );
    assert_eq!(
        events.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    assert_resumable(&server.client(), &events).await;
}

#[tokio::test]
async fn cancelling_a_run_in_the_middle_of_a_tool_stops_the_tool() {
    let (server, stopped) = server(Duration::from_secs(30)).await;
    let client = server.client();
    let mut r = req("slow tool");
    r.model = Some("sim/sim?tokens=2&tools=1".into());
    let mut stream = client.stream_run(None, &r).await.expect("stream");
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.expect("event");
        let progressing = ev.event.body.kind() == EventKind::ToolExecutionProgress;
        events.push(ev);
        if progressing {
            break;
        }
    }
    let run_id = events[0].event.run_id.clone();
    let view = client.cancel(&run_id).await.expect("cancel");
    assert_eq!(view.status, RunStatus::Cancelled);
    while let Some(ev) = stream.next().await {
        events.push(ev.expect("event"));
    }
    assert_eq!(
        events.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCancelled)
    );
    assert!(
        !events
            .iter()
            .any(|e| e.event.body.kind() == EventKind::ToolExecutionCompleted)
    );
    for _ in 0..100 {
        if stopped.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stopped.load(Ordering::SeqCst),
        1,
        "the running tool was stopped"
    );
    // Stored: the run cancelled, its message incomplete, its log ending with the terminal event.
    let thread = client.get_thread(&view.thread_id).await.expect("thread");
    assert_eq!(
        thread.messages.expect("m")[1].status,
        MessageStatus::Incomplete
    );
    let replay = collect(client.follow(&run_id, "").await.expect("replay")).await;
    assert_eq!(
        replay.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCancelled)
    );
    assert_resumable(&server.client(), &events).await;
}

#[tokio::test]
async fn artifact_tools_persist_versions_serve_csv_and_belong_to_the_owner() {
    let sim = crate::sim_provider().await;
    let server = TestServer::start(Opts {
        providers: vec![sim],
        keys: "alice:key-a,bob:key-b",
        ..Opts::default()
    })
    .await;
    let alice = server.client().with_key("key-a");
    let mut r = req("make a table");
    r.model = Some("sim/sim?tokens=2&tools=1&tool=create_table".into());
    let events = collect(alice.stream_run(None, &r).await.expect("stream")).await;
    let artifact = events
        .iter()
        .find_map(|e| match &e.event.body {
            EventBody::ArtifactFinal { artifact } => Some(artifact.clone()),
            _ => None,
        })
        .expect("artifact_final");
    let id = artifact["id"].as_str().expect("id").to_string();
    assert_eq!(
        (artifact["kind"].as_str(), artifact["version"].as_u64()),
        (Some("table"), Some(1))
    );
    assert_eq!(artifact["data"]["rows"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        events.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    let thread_id = artifact["thread_id"].as_str().expect("thread").to_string();

    let http = reqwest::Client::new();
    let get = |path: String, key: &'static str| {
        let http = http.clone();
        let url = format!("{}{path}", server.url);
        async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .expect("request")
        }
    };
    let stored: Value = get(format!("/v1/artifacts/{id}"), "key-a")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(stored["status"], "final");
    assert_eq!(stored["data"], artifact["data"]);
    let csv = get(format!("/v1/artifacts/{id}.csv"), "key-a").await;
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        csv.text().await.expect("csv"),
        "item,value\r\nalpha,1\r\n\"beta, b\",2\r\ngamma,3\r\ndelta,4\r\n"
    );

    // An update in the same thread makes version 2; version 1 stays as it was.
    let mut r = req("add a row");
    r.model = Some(format!(
        "sim/sim?tokens=2&tools=1&tool=update_artifact&artifact={id}"
    ));
    let events = collect(
        alice
            .stream_run(Some(&thread_id), &r)
            .await
            .expect("stream"),
    )
    .await;
    assert!(events.iter().any(|e| matches!(&e.event.body, EventBody::ArtifactFinal { artifact } if artifact["version"] == 2)));
    let latest: Value = get(format!("/v1/artifacts/{id}"), "key-a")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        (
            latest["version"].as_u64(),
            latest["data"]["rows"].as_array().map(Vec::len)
        ),
        (Some(2), Some(5))
    );
    let v1: Value = get(format!("/v1/artifacts/{id}/versions/1"), "key-a")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v1["data"]["rows"].as_array().map(Vec::len), Some(4));
    let thread = alice.get_thread(&thread_id).await.expect("thread");
    let listed = thread.artifacts.expect("artifacts");
    assert_eq!(
        (listed.len(), listed[0].version),
        (1, 2),
        "the thread lists the latest version"
    );

    // Another owner sees none of it; bad versions are clear errors.
    for path in [
        format!("/v1/artifacts/{id}"),
        format!("/v1/artifacts/{id}.csv"),
        format!("/v1/artifacts/{id}/versions/1"),
    ] {
        assert_eq!(get(path, "key-b").await.status(), 404);
    }
    assert_eq!(
        get(format!("/v1/artifacts/{id}/versions/9"), "key-a")
            .await
            .status(),
        404
    );
    assert_eq!(
        get(format!("/v1/artifacts/{id}/versions/x"), "key-a")
            .await
            .status(),
        400
    );
}

#[tokio::test]
async fn documents_and_charts_are_created_as_artifacts() {
    let (server, _) = server(Duration::from_millis(1)).await;
    let events = run(&server, "sim/sim?tokens=1&tools=1&tool=create_document").await;
    let doc = events
        .iter()
        .find_map(|e| match &e.event.body {
            EventBody::ArtifactFinal { artifact } => Some(artifact.clone()),
            _ => None,
        })
        .expect("document");
    assert_eq!(doc["data"]["markdown"], "# Report 0\n\nAll good.");
    let events = run(&server, "sim/sim?tokens=1&tools=1&tool=create_chart").await;
    assert!(events.iter().any(|e| matches!(&e.event.body, EventBody::ArtifactFinal { artifact } if artifact["kind"] == "chart")));
}

#[tokio::test]
async fn an_artifact_builds_up_while_its_call_is_written_then_becomes_final() {
    let (server, _) = server(Duration::from_millis(1)).await;
    let events = run(
        &server,
        "sim/sim?tokens=1&tools=1&tool=create_table&gap_ms=60",
    )
    .await;
    let artifacts: Vec<(u64, Value)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::ArtifactIntermediate { artifact }
            | EventBody::ArtifactFinal { artifact } => Some((e.event.seq, artifact.clone())),
            _ => None,
        })
        .collect();
    let (last_seq, last) = artifacts.last().expect("artifacts");
    assert_eq!(last["status"], "final");
    let intermediates: Vec<&Value> = artifacts[..artifacts.len() - 1]
        .iter()
        .map(|(_, a)| a)
        .collect();
    assert!(
        intermediates.len() >= 3,
        "several intermediate states: {}",
        intermediates.len()
    );
    let mut rows = 0;
    for a in &intermediates {
        assert_eq!(
            (a["status"].as_str(), &a["id"]),
            (Some("intermediate"), &last["id"]),
            "one artifact"
        );
        let n = a["data"]["rows"].as_array().map(Vec::len).unwrap_or(0);
        assert!(n >= rows, "a table only gains rows");
        rows = n;
    }
    let counts: std::collections::BTreeSet<usize> = intermediates
        .iter()
        .map(|a| a["data"]["rows"].as_array().map(Vec::len).unwrap_or(0))
        .collect();
    assert!(
        counts.len() >= 2 && rows >= 1,
        "the table gained rows as they were written: {counts:?}"
    );
    // The intermediates came while the call was being written, before the tool ran.
    let call_done = position(&events, |b| matches!(b, EventBody::FunctionCallDone { .. }));
    assert!(
        artifacts[0].0 < events[call_done].event.seq && *last_seq > events[call_done].event.seq
    );
    // Stored as final, version 1, with the complete table.
    let id = last["id"].as_str().expect("id");
    let stored: Value = reqwest::get(format!("{}/v1/artifacts/{id}", server.url))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (stored["status"].as_str(), stored["version"].as_u64()),
        (Some("final"), Some(1))
    );
    assert_eq!(stored["data"]["rows"].as_array().map(Vec::len), Some(4));
    assert_resumable(&server.client(), &events).await;
}

#[tokio::test]
async fn the_demo_model_shows_the_whole_pipeline_with_a_table_then_a_chart_on_request() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 2000.0,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let first = collect(
        client
            .stream_run(None, &req("hello"))
            .await
            .expect("stream"),
    )
    .await;
    let kinds: Vec<EventKind> = first.iter().map(|e| e.event.body.kind()).collect();
    let fragments = kinds
        .iter()
        .filter(|k| **k == EventKind::FunctionCallDelta)
        .count();
    assert!(
        fragments > 10,
        "the call's arguments arrive in pieces ({fragments})"
    );
    let intermediate = kinds
        .iter()
        .filter(|k| **k == EventKind::ArtifactIntermediate)
        .count();
    assert!(intermediate >= 1, "the table builds up live");
    let fin = position(
        &first,
        |b| matches!(b, EventBody::ArtifactFinal { artifact } if artifact["kind"] == "table"),
    );
    assert!(
        text_of(&first[fin..]).contains("That artifact arrived as a tool call"),
        "the answer continues after the result"
    );
    assert_eq!(kinds.last(), Some(&EventKind::RunCompleted));
    let thread_id = crate::thread_of(&first);
    // Not the first answer and no table asked for: plain text.
    let second = collect(
        client
            .stream_run(Some(&thread_id), &req("and then?"))
            .await
            .expect("stream"),
    )
    .await;
    assert!(
        !second
            .iter()
            .any(|e| e.event.body.kind() == EventKind::FunctionCallDelta)
    );
    // Asked for a chart: a chart.
    let third = collect(
        client
            .stream_run(Some(&thread_id), &req("draw me a chart"))
            .await
            .expect("stream"),
    )
    .await;
    assert!(third.iter().any(|e| matches!(&e.event.body, EventBody::ArtifactFinal { artifact } if artifact["kind"] == "chart")));
    let thread = client.get_thread(&thread_id).await.expect("thread");
    assert_eq!(thread.artifacts.expect("artifacts").len(), 2);
}

/// An HTTP tool endpoint that streams NDJSON progress lines, then its result.
async fn ndjson_tool_endpoint() -> String {
    use axum::body::Body;
    use axum::routing::post;
    use futures_util::StreamExt;
    let app = axum::Router::new().route(
        "/lookup",
        post(|axum::Json(args): axum::Json<Value>| async move {
            let lines = vec![
                json!({"progress": {"step": "fetching", "fraction": 0.3}}),
                json!({"progress": {"step": "parsing", "fraction": 0.8, "message": "almost"}}),
                json!({"result": {"temp": 21, "query": args["query"]}}),
            ];
            let stream = futures_util::stream::iter(lines).then(|l| async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok::<_, std::io::Error>(format!("{l}\n"))
            });
            axum::response::Response::builder()
                .header("content-type", "application/x-ndjson")
                .body(Body::from_stream(stream))
                .expect("response")
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/lookup", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn an_http_tool_from_the_config_file_streams_its_progress_lines() {
    let tool_url = ndjson_tool_endpoint().await;
    let sim = format!("{}/v1", crate::simulator().await);
    let dir = tempfile::tempdir().expect("tmp");
    let config_path = dir.path().join("sluice.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
listen = "127.0.0.1:0"
data_dir = "{data}"

[providers.sim]
kind = "openai-chat"
base_url = "{sim}"

[tools.lookup_remote]
url = "{tool_url}"
description = "Looks things up somewhere else"
timeout_ms = 5000

[tools.lookup_remote.parameters]
type = "object"
required = ["query"]

[tools.lookup_remote.parameters.properties.query]
type = "string"
"#,
            data = dir.path().join("data").display()
        ),
    )
    .expect("write config");
    let args = sluice::config::ServeArgs {
        listen: None,
        data_dir: None,
        config: Some(config_path),
        demo_tokens_per_sec: None,
        api_keys: None,
        heartbeat_ms: None,
        default_model: None,
        cors_origins: None,
    };
    let running = sluice::start(sluice::config::load(&args).expect("config"))
        .await
        .expect("start");
    let client = sluice_client::Client::new(running.url());
    let mut r = req("look it up remotely");
    r.model = Some("sim/sim?tokens=1&tools=1&tool=lookup_remote".into());
    let events = collect(client.stream_run(None, &r).await.expect("stream")).await;
    let steps: Vec<(String, Option<f64>)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::ToolExecutionProgress {
                step,
                fraction,
                tool_name,
                ..
            } if tool_name == "lookup_remote" => Some((step.clone(), *fraction)),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            ("fetching".to_string(), Some(0.3)),
            ("parsing".to_string(), Some(0.8))
        ]
    );
    let result = events
        .iter()
        .find_map(|e| match &e.event.body {
            EventBody::ToolExecutionCompleted { result, .. } => Some(result.clone()),
            _ => None,
        })
        .expect("completed");
    assert_eq!(result, json!({"temp": 21, "query": "item 0"}));
    assert!(text_of(&events).contains("Using 1 results."));
    assert_resumable(&client, &events).await;
    running.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_agent_brings_its_model_system_prompt_tools_and_step_limit() {
    let sim = crate::sim_provider().await;
    let mut agents = std::collections::HashMap::new();
    agents.insert(
        "analyst".to_string(),
        sluice_engine::Agent {
            model: Some("sim/sim?describe=1".into()),
            system_prompt: Some("You analyse data".into()),
            tools: Some(vec!["create_table".into(), "create_chart".into()]),
            max_steps: Some(2),
        },
    );
    agents.insert(
        "looper".to_string(),
        sluice_engine::Agent {
            model: Some("sim/sim?tokens=1&tools=1".into()),
            system_prompt: None,
            tools: None,
            max_steps: Some(1),
        },
    );
    let server = TestServer::start(Opts {
        providers: vec![sim],
        agents,
        default_agent: Some("analyst".into()),
        ..Opts::default()
    })
    .await;
    let client = server.client();
    // The default agent: its model, its system prompt and only its tools reach the provider.
    let events = collect(client.stream_run(None, &req("hi")).await.expect("stream")).await;
    assert_eq!(
        text_of(&events),
        "system=You_analyse_data tools=create_chart,create_table history_results=0 "
    );
    // Another agent by name: one step, so the tool call is made but the model is not called again.
    let mut r = req("hi");
    r.agent = Some("looper".into());
    let events = collect(client.stream_run(None, &r).await.expect("stream")).await;
    let EventBody::RunCompleted { stop_reason, .. } = &events.last().expect("last").event.body
    else {
        panic!("completed")
    };
    assert_eq!(stop_reason.as_deref(), Some("max_steps"));
    // An unknown agent is a clear 400.
    let mut r = req("hi");
    r.agent = Some("nobody".into());
    match client.stream_run(None, &r).await {
        Err(sluice_client::ClientError::Api {
            status: 400,
            message,
            ..
        }) => {
            assert!(
                message.contains("unknown agent \"nobody\"") && message.contains("analyst"),
                "{message}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted an unknown agent"),
    }
}

#[tokio::test]
async fn a_later_run_sends_the_earlier_tool_calls_and_results_to_the_model() {
    let (server, _) = server(Duration::from_millis(1)).await;
    let client = server.client();
    let mut r = req("look two things up");
    r.model = Some("sim/sim?tokens=1&tools=2".into());
    let first = collect(client.stream_run(None, &r).await.expect("stream")).await;
    let thread_id = crate::thread_of(&first);
    let thread = client.get_thread(&thread_id).await.expect("thread");
    let turns = thread.messages.expect("messages")[1]
        .turns
        .clone()
        .expect("turns kept");
    let roles: Vec<&str> = turns
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["role"].as_str())
        .collect();
    assert_eq!(roles, ["assistant", "tool", "tool", "assistant"]);
    assert_eq!(turns[0]["tool_calls"][1]["id"], "call_1");
    // The next run on the thread, with a model that reports what it was sent, sees both results.
    let mut r = req("and now?");
    r.model = Some("sim/sim?describe=1".into());
    let second = collect(
        client
            .stream_run(Some(&thread_id), &r)
            .await
            .expect("stream"),
    )
    .await;
    assert!(
        text_of(&second).ends_with("history_results=2 "),
        "{}",
        text_of(&second)
    );
}

#[tokio::test]
async fn a_client_that_joins_late_gets_the_artifacts_final_state_not_its_intermediates() {
    let (server, _) = server(Duration::from_millis(1)).await;
    let events = run(
        &server,
        "sim/sim?tokens=1&tools=1&tool=create_table&gap_ms=40",
    )
    .await;
    assert!(
        events
            .iter()
            .filter(|e| e.event.body.kind() == EventKind::ArtifactIntermediate)
            .count()
            >= 2
    );
    let late = collect(
        server
            .client()
            .follow(&events[0].event.run_id, "")
            .await
            .expect("follow"),
    )
    .await;
    assert_eq!(
        late.iter()
            .filter(|e| e.event.body.kind() == EventKind::ArtifactIntermediate)
            .count(),
        0
    );
    assert_eq!(
        late.iter()
            .filter(|e| e.event.body.kind() == EventKind::ArtifactFinal)
            .count(),
        1
    );
    assert_eq!(
        late.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
}

#[tokio::test]
async fn an_mcp_tool_over_stdio_reports_its_progress_notifications() {
    // Built by `cargo test` with the other examples: crates/sluice/examples/mcp_test_server.rs.
    let exe = std::env::current_exe().expect("test exe");
    let server_bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples").join("mcp_test_server"))
        .expect("target dir");
    assert!(
        server_bin.exists(),
        "build it with `cargo build -p sluice --examples`: {}",
        server_bin.display()
    );
    let sim = crate::sim_provider().await;
    let server = TestServer::start(Opts {
        providers: vec![sim],
        mcp: vec![(
            "counter".into(),
            sluice::config::McpSection {
                command: Some(server_bin.display().to_string()),
                ..Default::default()
            },
        )],
        ..Opts::default()
    })
    .await;
    let models: Value = reqwest::get(format!("{}/v1/models", server.url))
        .await
        .expect("m")
        .json()
        .await
        .expect("j");
    assert!(models["models"].is_array());
    let events = run(
        &server,
        "sim/sim?tokens=1&tools=1&tool=count_up&empty_args=1",
    )
    .await;
    let steps: Vec<(String, Option<f64>)> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::ToolExecutionProgress {
                step,
                fraction,
                tool_name,
                ..
            } if tool_name == "count_up" => Some((step.clone(), *fraction)),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps.len(),
        3,
        "{steps:?} in {:?}",
        events
            .iter()
            .map(|e| e.event.body.kind())
            .collect::<Vec<_>>()
    );
    assert_eq!(steps[0].0, "counted 1");
    assert_eq!(steps[2].1, Some(1.0));
    let result = events
        .iter()
        .find_map(|e| match &e.event.body {
            EventBody::ToolExecutionCompleted { result, .. } => Some(result.clone()),
            _ => None,
        })
        .expect("completed");
    assert!(result.to_string().contains("counted to 3"), "{result}");
    assert!(text_of(&events).contains("Using 1 results."));
    assert_resumable(&server.client(), &events).await;
}

#[tokio::test]
async fn an_mcp_tool_over_streamable_http_reports_its_progress_notifications() {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    let service = StreamableHttpService::new(
        || Ok(crate::mcp_server::CountServer::new()),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let mcp_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mcp_url = format!("http://{}/mcp", mcp_listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        axum::serve(
            mcp_listener,
            axum::Router::new().nest_service("/mcp", service),
        )
        .await
    });
    let sim = crate::sim_provider().await;
    let server = TestServer::start(Opts {
        providers: vec![sim],
        mcp: vec![(
            "counter".into(),
            sluice::config::McpSection {
                url: Some(mcp_url),
                ..Default::default()
            },
        )],
        ..Opts::default()
    })
    .await;
    let events = run(
        &server,
        "sim/sim?tokens=1&tools=1&tool=count_up&empty_args=1",
    )
    .await;
    let steps: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::ToolExecutionProgress { step, .. } => Some(step.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(steps, ["counted 1", "counted 2", "counted 3"]);
    assert_resumable(&server.client(), &events).await;
    assert!(events.iter().any(|e| matches!(&e.event.body, EventBody::ToolExecutionCompleted { result, .. } if result.to_string().contains("counted to 3"))));
}

/// A tool that panics.
struct Boom;

impl Tool for Boom {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "boom".into(),
            description: "Always crashes".into(),
            parameters: json!({"type": "object"}),
        }
    }

    fn call(&self, _args: Value, _ctx: ToolContext) -> ToolFuture {
        Box::pin(async move { panic!("boom") })
    }
}

#[tokio::test]
async fn a_tool_that_panics_fails_its_call_and_the_run_goes_on() {
    let sim = crate::sim_provider().await;
    let mut tools = ToolRegistry::new();
    tools.add(Arc::new(Boom));
    let server = TestServer::start(Opts {
        providers: vec![sim],
        tools,
        ..Opts::default()
    })
    .await;
    let events = run(&server, "sim/sim?tokens=1&tools=1&tool=boom&empty_args=1").await;
    assert!(events.iter().any(|e| matches!(&e.event.body,
        EventBody::ToolExecutionFailed { error, .. } if error.message == "the tool crashed")));
    assert!(
        text_of(&events).contains("Using 1 results."),
        "the model got an answer for the call"
    );
    assert_eq!(
        events.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
}

#[tokio::test]
async fn an_artifact_whose_call_is_cancelled_while_written_is_not_left_half_made() {
    let (server, _) = server(Duration::from_millis(1)).await;
    let client = server.client();
    let mut r = req("table, slowly");
    r.model = Some("sim/sim?tokens=1&tools=1&tool=create_table&gap_ms=150".into());
    let mut stream = client.stream_run(None, &r).await.expect("stream");
    let mut artifact_id = String::new();
    let mut run_id = String::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.expect("event");
        run_id = ev.event.run_id.clone();
        if let EventBody::ArtifactIntermediate { artifact } = &ev.event.body {
            artifact_id = artifact["id"].as_str().unwrap_or_default().to_string();
            break;
        }
    }
    assert!(!artifact_id.is_empty(), "an intermediate state was shown");
    let view = client.cancel(&run_id).await.expect("cancel");
    assert_eq!(view.status, RunStatus::Cancelled);
    let resp = reqwest::get(format!("{}/v1/artifacts/{artifact_id}", server.url))
        .await
        .expect("get");
    assert_eq!(resp.status(), 404, "the abandoned draft is not stored");
    let thread = client.get_thread(&view.thread_id).await.expect("thread");
    assert!(thread.artifacts.expect("artifacts").is_empty());
}

/// Where a run on an existing thread got its history: (from memory, from the store).
async fn history_reads(server: &TestServer) -> (u64, u64) {
    let text = reqwest::get(format!("{}/metrics", server.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let count = |from: &str| {
        let line = format!("sluice_history_reads_total{{from=\"{from}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {line} in /metrics"))
    };
    (count("memory"), count("store"))
}

/// A thread's next run sends the model the same conversation whether the thread's history is
/// kept in memory or read from the store: the same script on two servers, one keeping histories
/// and one not, through tool calls, a system prompt, and a run that fails midway (its partial
/// answer stays in the thread), then a model that answers a fingerprint of what it was sent.
#[tokio::test]
async fn a_thread_sends_the_same_conversation_from_memory_as_from_the_store() {
    let mut fingerprints = Vec::new();
    for history_cache in [true, false] {
        let mut tools = ToolRegistry::new();
        tools.add(Arc::new(Lookup {
            delay: Duration::from_millis(1),
            stopped: Arc::new(AtomicU32::new(0)),
        }));
        let mut agents = std::collections::HashMap::new();
        agents.insert(
            "brief".to_string(),
            sluice_engine::Agent {
                model: None,
                system_prompt: Some("Be brief".into()),
                tools: None,
                max_steps: None,
            },
        );
        let server = TestServer::start(Opts {
            providers: vec![crate::sim_provider().await],
            tools,
            agents,
            default_agent: Some("brief".into()),
            history_cache,
            ..Opts::default()
        })
        .await;
        let client = server.client();
        let mut thread: Option<String> = None;
        let mut seen = Vec::new();
        for (content, model) in [
            ("look two things up", "sim/sim?tokens=1&tools=2"),
            ("what did I say?", "sim/sim?describe=history"),
            ("thanks", "sim/sim?tokens=3"),
            ("once more", "sim/sim?tokens=5&fault=drop&after=2"),
            ("and again", "sim/sim?tokens=2"),
            ("what did I say?", "sim/sim?describe=history"),
        ] {
            let mut r = req(content);
            r.model = Some(model.into());
            let events = collect(
                client
                    .stream_run(thread.as_deref(), &r)
                    .await
                    .expect("stream"),
            )
            .await;
            thread.get_or_insert_with(|| crate::thread_of(&events));
            let end = events.last().map(|e| e.event.body.kind());
            if model.contains("fault=drop") {
                assert_eq!(end, Some(EventKind::RunFailed), "{content}");
            } else {
                assert_eq!(end, Some(EventKind::RunCompleted), "{content}");
            }
            if model.contains("describe") {
                seen.push(text_of(&events));
            }
        }
        // With histories kept, only the run after the failed one read the store.
        let reads = history_reads(&server).await;
        assert_eq!(reads, if history_cache { (4, 1) } else { (0, 5) });
        fingerprints.push(seen);
    }
    // After the tool run: the system prompt, 2 user messages, the tool turns (the calls, 2
    // results, the answer). At the end: 6 user messages, the tool turns, the first fingerprint,
    // two answers and the failed run's partial answer.
    assert!(
        fingerprints[0][0].starts_with("history=7:"),
        "{fingerprints:?}"
    );
    assert!(
        fingerprints[0][1].starts_with("history=15:"),
        "{fingerprints:?}"
    );
    assert_eq!(fingerprints[0], fingerprints[1]);
}
