//! Bad input and other owners' data: the documented errors, and nothing stored changes.

use serde_json::Value;

use crate::{Opts, TestServer, req};

async fn call(
    method: reqwest::Method,
    url: String,
    key: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r.body(b);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

/// Everything alice can see, to compare before and after.
async fn snapshot(url: &str, key: &str) -> Value {
    let (_, list) = call(
        reqwest::Method::GET,
        format!("{url}/v1/threads"),
        Some(key),
        None,
    )
    .await;
    let mut threads = Vec::new();
    for t in list["threads"].as_array().expect("threads") {
        let id = t["id"].as_str().expect("id");
        threads.push(
            call(
                reqwest::Method::GET,
                format!("{url}/v1/threads/{id}"),
                Some(key),
                None,
            )
            .await
            .1,
        );
    }
    Value::Array(threads)
}

#[tokio::test]
async fn bad_requests_and_foreign_ids_get_documented_errors_and_change_nothing() {
    use reqwest::Method as M;
    let server = TestServer::start(Opts {
        keys: "alice:key-a,bob:key-b",
        max_body: 4096,
        ..Opts::default()
    })
    .await;
    let url = &server.url;
    let alice = server.client().with_key("key-a");
    let done = alice.start_run(None, &req("first")).await.expect("run");
    let thread = done.thread_id.clone();
    let _ = crate::collect(alice.follow(&done.id, "").await.expect("follow")).await;
    let before = snapshot(url, "key-a").await;

    let run_path = format!("{url}/v1/threads/{thread}/runs");
    /// method, url, key, body, expected status, expected code
    type Case<'a> = (M, String, Option<&'a str>, Option<Vec<u8>>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            M::GET,
            format!("{url}/v1/threads"),
            None,
            None,
            401,
            "UNAUTHORIZED",
        ),
        (
            M::GET,
            format!("{url}/v1/threads"),
            Some("wrong"),
            None,
            401,
            "UNAUTHORIZED",
        ),
        (
            M::POST,
            run_path.clone(),
            Some("key-a"),
            Some(b"{not json".to_vec()),
            400,
            "INVALID_REQUEST",
        ),
        (
            M::POST,
            run_path.clone(),
            Some("key-a"),
            Some(b"{\"contents\":\"typo\"}".to_vec()),
            400,
            "INVALID_REQUEST",
        ),
        (
            M::POST,
            run_path.clone(),
            Some("key-a"),
            Some(b"{\"content\":\"  \"}".to_vec()),
            400,
            "INVALID_REQUEST",
        ),
        (
            M::POST,
            run_path.clone(),
            Some("key-a"),
            Some(b"{\"content\":\"x\",\"model\":\"nope\"}".to_vec()),
            400,
            "INVALID_REQUEST",
        ),
        (
            M::POST,
            format!("{run_path}/stream"),
            Some("key-a"),
            Some(vec![b'x'; 10_000]),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            M::POST,
            format!("{url}/v1/threads/no-such-thread/runs"),
            Some("key-a"),
            Some(b"{\"content\":\"x\"}".to_vec()),
            404,
            "NOT_FOUND",
        ),
        (
            M::GET,
            format!("{url}/v1/runs/no-such-run"),
            Some("key-a"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::GET,
            format!("{url}/v1/runs/no-such-run/events"),
            Some("key-a"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::POST,
            format!("{url}/v1/runs/no-such-run/cancel"),
            Some("key-a"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::GET,
            format!("{url}/v1/runs/{}/events?after=abc", done.id),
            Some("key-a"),
            None,
            400,
            "INVALID_REQUEST",
        ),
        (
            M::GET,
            format!("{url}/v1/runs/{}/events?after=99999", done.id),
            Some("key-a"),
            None,
            409,
            "STREAM_RESET",
        ),
        (
            M::GET,
            format!("{url}/v1/nothing-here"),
            Some("key-a"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::PUT,
            format!("{url}/v1/threads"),
            Some("key-a"),
            None,
            405,
            "METHOD_NOT_ALLOWED",
        ),
        // Bob sees none of Alice's things, whatever he tries.
        (
            M::GET,
            format!("{url}/v1/threads/{thread}"),
            Some("key-b"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::POST,
            run_path.clone(),
            Some("key-b"),
            Some(b"{\"content\":\"mine now\"}".to_vec()),
            404,
            "NOT_FOUND",
        ),
        (
            M::DELETE,
            format!("{url}/v1/threads/{thread}"),
            Some("key-b"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::GET,
            format!("{url}/v1/runs/{}", done.id),
            Some("key-b"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::GET,
            format!("{url}/v1/runs/{}/events", done.id),
            Some("key-b"),
            None,
            404,
            "NOT_FOUND",
        ),
        (
            M::POST,
            format!("{url}/v1/runs/{}/cancel", done.id),
            Some("key-b"),
            None,
            404,
            "NOT_FOUND",
        ),
    ];
    for (method, u, key, body, status, expected) in cases {
        let what = format!("{method} {u} key={key:?}");
        let (got, v) = call(method, u, key, body).await;
        assert_eq!(got, status, "{what}: {v}");
        assert_eq!(code(&v), expected, "{what}: {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap_or("").is_empty(),
            "{what}: a message"
        );
    }
    let (_, bob_list) = call(M::GET, format!("{url}/v1/threads"), Some("key-b"), None).await;
    assert_eq!(bob_list["threads"], Value::Array(vec![]));
    assert_eq!(
        snapshot(url, "key-a").await,
        before,
        "nothing stored changed"
    );

    // And the owner can delete it, after which it is gone.
    let (status, _) = call(
        M::DELETE,
        format!("{url}/v1/threads/{thread}"),
        Some("key-a"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, v) = call(
        M::GET,
        format!("{url}/v1/threads/{thread}"),
        Some("key-a"),
        None,
    )
    .await;
    assert_eq!((status, code(&v)), (404, "NOT_FOUND"));
}

#[tokio::test]
async fn an_owner_at_the_run_limit_gets_429_until_a_run_ends() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 50.0,
        max_runs_per_owner: 2,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let a = client.start_run(None, &req("a")).await.expect("first");
    let _b = client.start_run(None, &req("b")).await.expect("second");
    let (status, v) = call(
        reqwest::Method::POST,
        format!("{}/v1/runs", server.url),
        None,
        Some(b"{\"content\":\"c\"}".to_vec()),
    )
    .await;
    assert_eq!((status, code(&v)), (429, "RATE_LIMITED"), "{v}");
    client.cancel(&a.id).await.expect("cancel");
    client
        .start_run(None, &req("c"))
        .await
        .expect("a slot is free again");
}

#[tokio::test]
async fn a_start_retried_with_its_idempotency_key_gets_the_same_run() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 50.0,
        ..Opts::default()
    })
    .await;
    let http = reqwest::Client::new();
    let start = |path: &'static str, key: Option<&'static str>, content: &'static str| {
        let mut r = http
            .post(format!("{}{path}", server.url))
            .body(format!(r#"{{"content":"{content}"}}"#));
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.send()
    };
    let first = start("/v1/runs", Some("k-1"), "once please")
        .await
        .expect("post");
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.expect("json");
    let again = start("/v1/runs", Some("k-1"), "once please")
        .await
        .expect("post");
    assert_eq!(again.status(), 202);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["id"], first["id"], "the same run, not a second one");

    // The streaming endpoint with the key follows that run from its first event.
    let stream = start("/v1/runs/stream", Some("k-1"), "once please")
        .await
        .expect("post")
        .text()
        .await
        .expect("stream");
    let started = stream
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .and_then(|d| serde_json::from_str::<Value>(d).ok())
        .expect("run_started");
    assert_eq!(started["type"], "run_started");
    assert_eq!(started["run_id"], first["id"]);

    // The same key for another message is a conflict; another key (or none) is another run.
    let conflict = start("/v1/runs", Some("k-1"), "something else")
        .await
        .expect("post");
    assert_eq!(conflict.status(), 409);
    let conflict: Value = conflict.json().await.expect("json");
    assert_eq!(code(&conflict), "CONFLICT");
    let other: Value = start("/v1/runs", Some("k-2"), "once please")
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_ne!(other["id"], first["id"]);
    let plain: Value = start("/v1/runs", None, "once please")
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_ne!(plain["id"], first["id"]);
    let bad = start("/v1/runs", Some(""), "x").await.expect("post");
    assert_eq!(bad.status(), 400);

    // Only the keyed run and the two others exist: no duplicate was made along the way.
    let (_, threads) = call(
        reqwest::Method::GET,
        format!("{}/v1/threads", server.url),
        None,
        None,
    )
    .await;
    assert_eq!(threads["threads"].as_array().map(Vec::len), Some(3));
}

#[tokio::test]
async fn cors_allows_the_configured_origins_only() {
    let server = TestServer::start(Opts {
        cors_origins: vec!["http://app.example".into()],
        ..Opts::default()
    })
    .await;
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/runs/stream", server.url),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, idempotency-key, last-event-id",
        )
        .send()
    };
    let allowed = preflight("http://app.example").await.expect("preflight");
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let h = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_lowercase()
    };
    assert_eq!(
        h(&allowed, "access-control-allow-origin"),
        "http://app.example"
    );
    let headers = h(&allowed, "access-control-allow-headers");
    for needed in ["authorization", "idempotency-key", "last-event-id"] {
        assert!(headers.contains(needed), "{needed} in {headers}");
    }
    let other = preflight("http://evil.example").await.expect("preflight");
    assert_eq!(h(&other, "access-control-allow-origin"), "");
    // An actual request from the allowed origin carries the header too.
    let get = http
        .get(format!("{}/v1/threads", server.url))
        .header("origin", "http://app.example")
        .send()
        .await
        .expect("get");
    assert_eq!(h(&get, "access-control-allow-origin"), "http://app.example");

    // With no origins configured, nothing is allowed cross-origin.
    let plain = TestServer::start(Opts::default()).await;
    let get = http
        .get(format!("{}/v1/threads", plain.url))
        .header("origin", "http://app.example")
        .send()
        .await
        .expect("get");
    assert_eq!(h(&get, "access-control-allow-origin"), "");
}

/// `POST …/runs/wait` answers once the run ended, with the run and its message as they ended:
/// never a run still "running" or a message still "streaming". The run's end is queued to the
/// store before its terminal event wakes the waiter, which on two worker threads runs at once and
/// flushes the store before reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waited_run_answers_with_the_run_and_message_as_they_ended() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 0.0,
        history_cache: false,
        ..Opts::default()
    })
    .await;
    let mut thread: Option<String> = None;
    for i in 0..40 {
        let path = match &thread {
            Some(t) => format!("/v1/threads/{t}/runs/wait"),
            None => "/v1/runs/wait".to_string(),
        };
        let (status, v) = call(
            reqwest::Method::POST,
            format!("{}{path}", server.url),
            None,
            Some(format!("{{\"content\":\"hello {i}\"}}").into_bytes()),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["run"]["status"], "completed", "run {i}: {v}");
        assert_eq!(v["message"]["status"], "complete", "run {i}: {v}");
        assert!(
            v["message"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "run {i}: {v}"
        );
        thread = v["run"]["thread_id"].as_str().map(str::to_string);
        assert!(thread.is_some(), "{v}");
    }
}
