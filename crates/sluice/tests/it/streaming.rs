//! Streams as a client sees them: order, persistence, background runs, cancel, SSE vs WebSocket.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use sluice_protocol::api::{MessageStatus, OnBusy, OnDisconnect, RunStatus};
use sluice_protocol::{EventBody, EventKind};
use tokio_tungstenite::tungstenite::Message;

use crate::{Opts, TestServer, collect, req, text_of};

#[tokio::test]
async fn a_streamed_run_is_gapless_and_its_text_is_the_persisted_message() {
    // Merging off, so that every seq arrives as its own event even when the client falls behind
    // (merged deltas are covered in resume.rs and event_log.rs).
    let server = TestServer::start(Opts {
        coalesce_bytes: 0,
        ..Opts::default()
    })
    .await;
    // Raw request first: the headers proxies need.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/runs/stream", server.url))
        .body(r#"{"content":"What is streaming?"}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    drop(resp);

    let client = server.client();
    let events = collect(
        client
            .stream_run(None, &req("What is streaming?"))
            .await
            .expect("stream"),
    )
    .await;
    let kinds: Vec<EventKind> = events.iter().map(|e| e.event.body.kind()).collect();
    assert_eq!(kinds[0], EventKind::RunStarted);
    assert_eq!(*kinds.last().expect("events"), EventKind::RunCompleted);
    let first_text = kinds
        .iter()
        .position(|k| *k == EventKind::TextDelta)
        .expect("text");
    let last_reasoning = kinds
        .iter()
        .rposition(|k| *k == EventKind::ReasoningDelta)
        .expect("reasoning");
    assert!(
        last_reasoning < first_text,
        "reasoning streams before the answer"
    );
    assert!(kinds.contains(&EventKind::ReasoningDone) && kinds.contains(&EventKind::TextDone));
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.event.seq, i as u64 + 1, "seq is 1, 2, 3, … without gaps");
        assert_eq!(e.id, e.event.seq.to_string(), "the SSE id is the seq");
    }
    let EventBody::RunCompleted {
        usage,
        time_to_first_token_ms,
        ..
    } = &events.last().expect("last").event.body
    else {
        unreachable!()
    };
    assert!(usage.output_tokens > 10 && time_to_first_token_ms.is_some());

    let thread_id = crate::thread_of(&events);
    let thread = client.get_thread(&thread_id).await.expect("thread");
    let messages = thread.messages.expect("messages");
    assert_eq!(messages.len(), 2);
    assert_eq!(
        (messages[0].role.as_str(), messages[0].content.as_str()),
        ("user", "What is streaming?")
    );
    assert_eq!(messages[1].role, "assistant");
    assert_eq!(messages[1].status, MessageStatus::Complete);
    assert_eq!(messages[1].content, text_of(&events));
    assert!(messages[1].content.starts_with("## Demo answer"));
    let run = client.get_run(&events[0].event.run_id).await.expect("run");
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.last_seq, events.len() as u64);
    assert_eq!(run.usage, *usage);

    let metrics = reqwest::get(format!("{}/metrics", server.url))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let sent = metrics
        .lines()
        .find(|l| l.starts_with("stream_chunks_sent_total{event_type=\"text_delta\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("text_delta counter");
    assert!(sent > 0);
    let completed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_runs_total{outcome=\"completed\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("runs_total");
    assert!(completed >= 1, "{metrics}");
}

#[tokio::test]
async fn a_background_run_completes_unwatched_and_replays_in_full_from_memory_and_store() {
    let server = TestServer::start(Opts {
        retention: Duration::ZERO,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let run = client
        .start_run(None, &req("background please"))
        .await
        .expect("202");
    assert_eq!(run.status, RunStatus::Running);
    let mut status = run.status;
    for _ in 0..200 {
        status = client.get_run(&run.id).await.expect("run").status;
        if status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, RunStatus::Completed);
    // Retention is zero: within a sweep (1 s) the log leaves memory and replay reads the store.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let replay = collect(client.follow(&run.id, "").await.expect("follow")).await;
    assert_eq!(
        replay.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    let thread = client.get_thread(&run.thread_id).await.expect("thread");
    assert_eq!(
        thread.messages.expect("messages")[1].content,
        text_of(&replay)
    );
    // Seqs covered without gap (merged deltas carry their last part's seq).
    let mut prev = 0;
    for e in &replay {
        assert!(e.event.seq > prev);
        prev = e.event.seq;
    }
    assert_eq!(prev, client.get_run(&run.id).await.expect("run").last_seq);
    // Resume from the middle replays exactly the rest.
    let rest = collect(client.follow(&run.id, "5").await.expect("follow")).await;
    assert!(rest[0].event.seq > 5);
    assert_eq!(rest.last().map(|e| e.event.seq), Some(prev));
}

#[tokio::test]
async fn cancel_ends_the_run_with_run_cancelled_and_keeps_the_partial_message() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 40.0,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let mut stream = client
        .stream_run(None, &req("cancel me"))
        .await
        .expect("stream");
    let mut events = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.expect("event");
        let is_text = ev.event.body.kind() == EventKind::TextDelta;
        events.push(ev);
        if is_text
            && events
                .iter()
                .filter(|e| e.event.body.kind() == EventKind::TextDelta)
                .count()
                == 3
        {
            break;
        }
    }
    let run_id = events[0].event.run_id.clone();
    // The cancel answers once the run has ended.
    let view = client.cancel(&run_id).await.expect("cancel");
    assert_eq!(view.status, RunStatus::Cancelled);
    while let Some(ev) = stream.next().await {
        events.push(ev.expect("event"));
    }
    let last = events.last().expect("events");
    assert!(
        matches!(&last.event.body, EventBody::RunCancelled { reason } if reason.contains("cancel"))
    );
    let full = sluice_providers::demo::script("cancel me").1.concat();
    let partial = text_of(&events);
    assert!(!partial.is_empty() && partial.len() < full.len() && full.starts_with(&partial));
    let thread = client.get_thread(&view.thread_id).await.expect("thread");
    let message = &thread.messages.expect("messages")[1];
    assert_eq!(message.content, partial);
    assert_eq!(message.status, MessageStatus::Incomplete);
    // Cancelling again is harmless and changes nothing.
    assert_eq!(
        client.cancel(&run_id).await.expect("again").status,
        RunStatus::Cancelled
    );
}

#[tokio::test]
async fn a_disconnect_is_not_a_cancel_unless_the_run_asks() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 200.0,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    for (mode, expected) in [
        (OnDisconnect::Continue, RunStatus::Completed),
        (OnDisconnect::Cancel, RunStatus::Cancelled),
    ] {
        let mut r = req("disconnect");
        r.on_disconnect = mode;
        let mut stream = client.stream_run(None, &r).await.expect("stream");
        let first = stream.next().await.expect("first").expect("ok");
        drop(stream);
        let run_id = first.event.run_id;
        let mut status = RunStatus::Running;
        for _ in 0..200 {
            status = client.get_run(&run_id).await.expect("run").status;
            if status.is_terminal() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, expected, "{mode:?}");
    }
}

#[tokio::test]
async fn a_busy_thread_rejects_queues_or_interrupts_as_asked() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 150.0,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let thread = client.create_thread().await.expect("thread");
    let first = client
        .start_run(Some(&thread.id), &req("one"))
        .await
        .expect("first");
    let err = client
        .start_run(Some(&thread.id), &req("two"))
        .await
        .expect_err("busy");
    assert!(
        matches!(err, sluice_client::ClientError::Api { status: 409, ref code, .. } if code == "CONFLICT"),
        "{err}"
    );
    let mut queued = req("two");
    queued.on_busy = OnBusy::Queue;
    let second = client
        .start_run(Some(&thread.id), &queued)
        .await
        .expect("queued");
    let mut interrupting = req("three");
    interrupting.on_busy = OnBusy::Interrupt;
    let third = collect(
        client
            .stream_run(Some(&thread.id), &interrupting)
            .await
            .expect("third"),
    )
    .await;
    assert_eq!(
        third.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    // Interrupting cancels every run ahead of it on the thread: the running one and the queued one.
    assert_eq!(
        client.get_run(&first.id).await.expect("1").status,
        RunStatus::Cancelled
    );
    assert_eq!(
        client.get_run(&second.id).await.expect("2").status,
        RunStatus::Cancelled
    );
    // The third run started after both ended, on the whole history.
    let messages = client
        .get_thread(&thread.id)
        .await
        .expect("t")
        .messages
        .expect("m");
    let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant"
        ]
    );
}

#[tokio::test]
async fn sse_and_websocket_observers_of_one_run_see_the_same_events() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 300.0,
        coalesce_bytes: 0,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let ws_url = format!("{}/v1/ws", server.url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.expect("ws");
    // A run started over the WebSocket…
    ws.send(Message::Text(
        r#"{"type":"user_message","content":"over the socket"}"#.into(),
    ))
    .await
    .expect("send");
    let mut ws_events: Vec<String> = Vec::new();
    while let Some(msg) = ws.next().await {
        let text = msg
            .expect("ws message")
            .into_text()
            .expect("text")
            .to_string();
        let terminal = text.contains("\"type\":\"run_completed\"");
        ws_events.push(text);
        if terminal {
            break;
        }
    }
    let run_id = serde_json::from_str::<serde_json::Value>(&ws_events[0]).expect("json")["run_id"]
        .as_str()
        .expect("run id")
        .to_string();
    // …is the same run over SSE.
    let sse_events: Vec<String> = collect(client.follow(&run_id, "").await.expect("follow"))
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(sse_events, ws_events);

    // Live: one run followed by both at once, plus a bad message and an unknown run on the socket.
    let run = client
        .start_run(None, &req("both at once"))
        .await
        .expect("run");
    ws.send(Message::Text(
        format!(r#"{{"type":"subscribe","run_id":"{}","after":0}}"#, run.id).into(),
    ))
    .await
    .expect("send");
    ws.send(Message::Text("{nope".into())).await.expect("send");
    ws.send(Message::Text(
        r#"{"type":"subscribe","run_id":"missing","after":0}"#.into(),
    ))
    .await
    .expect("send");
    let sse = tokio::spawn({
        let client = client.clone();
        let id = run.id.clone();
        async move { collect(client.follow(&id, "").await.expect("follow")).await }
    });
    let mut live_ws = Vec::new();
    let mut request_errors = Vec::new();
    while let Some(msg) = ws.next().await {
        let text = msg.expect("ws").into_text().expect("text").to_string();
        if text.contains("\"type\":\"request_error\"") {
            request_errors.push(text);
            continue;
        }
        let terminal = text.contains("\"type\":\"run_completed\"");
        live_ws.push(text);
        if terminal {
            break;
        }
    }
    let live_sse: Vec<String> = sse
        .await
        .expect("join")
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(live_sse, live_ws);
    // Errors may arrive after the run ended; wait for both.
    while request_errors.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("error reply");
        request_errors.push(
            msg.expect("msg")
                .expect("ws")
                .into_text()
                .expect("text")
                .to_string(),
        );
    }
    assert!(
        request_errors.iter().any(|e| e.contains("INVALID_REQUEST")),
        "{request_errors:?}"
    );
    assert!(
        request_errors
            .iter()
            .any(|e| e.contains("NOT_FOUND") && e.contains("missing")),
        "{request_errors:?}"
    );
}

#[tokio::test]
async fn heartbeats_fill_silence_as_sse_comments() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 4.0,
        heartbeat: Duration::from_millis(50),
        ..Opts::default()
    })
    .await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/runs/stream", server.url))
        .body(r#"{"content":"slow"}"#)
        .send()
        .await
        .expect("request");
    let mut body = resp.bytes_stream();
    let mut seen = Vec::new();
    while let Some(chunk) = body.next().await {
        seen.extend_from_slice(&chunk.expect("chunk"));
        if seen.windows(14).any(|w| w == b": keep-alive\n\n") {
            return;
        }
        assert!(seen.len() < 100_000, "no heartbeat");
    }
    panic!("stream ended without a heartbeat");
}

#[tokio::test]
async fn websocket_tags_starts_with_request_ids_and_answers_pings() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 0.0,
        ..Opts::default()
    })
    .await;
    let ws_url = format!("{}/v1/ws", server.url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.expect("ws");
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .expect("send");
    ws.send(Message::Text(
        r#"{"type":"user_message","content":"tagged","request_id":"a1"}"#.into(),
    ))
    .await
    .expect("send");
    ws.send(Message::Text(
        r#"{"type":"user_message","content":"","request_id":"a2"}"#.into(),
    ))
    .await
    .expect("send");
    // The same start sent twice with one idempotency key (as after a reconnect) is one run.
    for request_id in ["a3", "a4"] {
        ws.send(Message::Text(
            format!(r#"{{"type":"user_message","content":"keyed","request_id":"{request_id}","idempotency_key":"w-1"}}"#)
                .into(),
        ))
        .await
        .expect("send");
    }
    let mut seen = Vec::new();
    let mut accepted = None;
    let mut refused = None;
    let mut started = std::collections::HashMap::new();
    let mut keyed = std::collections::HashMap::new();
    let first_started =
        |accepted: &Option<serde_json::Value>,
         started: &std::collections::HashMap<String, serde_json::Value>| {
            accepted
                .as_ref()
                .is_some_and(|a| started.contains_key(&a["run_id"].to_string()))
        };
    while !first_started(&accepted, &started)
        || refused.is_none()
        || seen.is_empty()
        || keyed.len() < 2
    {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a reply")
            .expect("open")
            .expect("message");
        let v: serde_json::Value =
            serde_json::from_str(msg.to_text().expect("text")).expect("json");
        match v["type"].as_str() {
            Some("pong") => seen.push("pong"),
            Some("run_accepted") if v["request_id"] == "a1" => accepted = Some(v),
            Some("run_accepted") => {
                keyed.insert(v["request_id"].to_string(), v["run_id"].to_string());
            }
            Some("request_error") => refused = Some(v),
            Some("run_started") => {
                started.insert(v["run_id"].to_string(), v);
            }
            _ => {}
        }
    }
    let accepted = accepted.expect("accepted");
    let started = &started[&accepted["run_id"].to_string()];
    assert_eq!(accepted["request_id"], "a1");
    assert_eq!(accepted["run_id"], started["run_id"]);
    assert_eq!(accepted["thread_id"], started["thread_id"]);
    let refused = refused.expect("refused");
    assert_eq!(refused["request_id"], "a2");
    let runs: std::collections::HashSet<&String> = keyed.values().collect();
    assert_eq!(runs.len(), 1, "one run for one key: {keyed:?}");
    assert_ne!(
        keyed.values().next().map(String::as_str),
        Some(accepted["run_id"].to_string().as_str())
    );
    assert_eq!(refused["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn the_web_page_is_served_with_a_strict_content_security_policy() {
    let server = TestServer::start(Opts::default()).await;
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
    ] {
        let r = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(header("content-security-policy").contains("script-src 'self'"));
        assert_eq!(header("x-content-type-options"), "nosniff");
    }
    let page = http
        .get(format!("{}/", server.url))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert!(page.contains(r#"<script type="module" src="/assets/app.js">"#));

    // The script goes gzipped to clients that accept it, and as it is to those that do not.
    let script = |encoding: &'static str| {
        let http = http.clone();
        let url = format!("{}/assets/app.js", server.url);
        async move {
            let r = http
                .get(url)
                .header("accept-encoding", encoding)
                .send()
                .await
                .expect("get");
            let coding = r
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let vary = r.headers().get("vary").is_some();
            (coding, vary, r.bytes().await.expect("body"))
        }
    };
    let (coding, vary, gz) = script("br, gzip;q=0.8").await;
    assert_eq!(coding.as_deref(), Some("gzip"));
    assert!(vary);
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "a gzip stream");
    let (coding, _, plain) = script("identity").await;
    assert_eq!(coding, None);
    assert!(gz.len() * 2 < plain.len());
    let (coding, _, _) = script("gzip;q=0").await;
    assert_eq!(coding, None, "q=0 refuses gzip");
}
