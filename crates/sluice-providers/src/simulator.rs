//! The upstream simulator: a local server that speaks the four providers' streaming wire protocols
//! (OpenAI Responses and Chat Completions, Anthropic Messages, Ollama chat) with scripted output
//! and faults, for the tests and the benchmarks. `sluice simulate --listen ADDR` runs it.
//!
//! Each request's behaviour comes from its model name: everything after `?` is a query string of
//! knobs, so a test picks a scenario per run, e.g. `openai/sim?tokens=50&gap_ms=2&fault=drop&after=10`.
//!
//! | knob | meaning | default |
//! |---|---|---|
//! | `tokens` | answer tokens (`tok0 tok1 …`) | 20 |
//! | `para` | end a paragraph (a blank line) after every N answer tokens, as prose does | 0 (never) |
//! | `reasoning` | reasoning tokens before the answer | 0 |
//! | `tools` | parallel function calls after the answer, arguments in pieces | 0 |
//! | `ttft_ms` | delay before the first token | 0 |
//! | `gap_ms` / `gap_us` | delay between tokens | 0 |
//! | `fault` | `status`, `drop`, `malformed`, `stall` | none |
//! | `status` | HTTP status for `fault=status` | 503 |
//! | `retry_after` | `Retry-After` seconds with `fault=status` | none |
//! | `times` | apply the status fault to the first N requests of this model name only | always |
//! | `after` | tokens sent before `drop`, `malformed` or `stall` | 0 |
//! | `echo_auth` | `1`: the status fault's message quotes the credentials received, as some providers do | 0 |
//! | `bad_args` | `1`: the first call's arguments break its schema (`query` is a number) | 0 |
//! | `tool` | the function called: `lookup`, `create_table`, `create_chart`, `create_document`, `update_artifact` | lookup |
//! | `artifact` | with `tool=update_artifact`: the artifact id to update (appends a row) | |
//! | `describe` | `1`: answer `system=<prompt, spaces as _> tools=<names> history_results=<n>` (what the request carried); `history`: answer `history=<items>:<FNV-1a of the messages' JSON>` | 0 |
//! | `empty_args` | `1`: calls carry `{}` as their arguments | 0 |
//! | `id` | a label with no effect but to make a model name (and so its `times` count) unique | |
//!
//! Tools make it a multi-step model: a request whose conversation already holds tool results is
//! answered with text that says how many results it got (`Using 2 results. tok0 …`) and no calls;
//! with `bad_args=1`, a conversation holding only the first round of results (one of them the
//! error) is answered with one corrected call first.
//!
//! `GET /sim/stats` reports requests, streams in progress, streams completed, and streams whose
//! client went away before the end (how tests see that a cancel closed the upstream connection).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::sync::mpsc;

/// The wire protocol of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Responses,
    Chat,
    Anthropic,
    Ollama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Status,
    Drop,
    Malformed,
    Stall,
}

/// One request's script, from the knobs in its model name.
#[derive(Debug, Clone)]
pub struct Scenario {
    tokens: u32,
    /// A blank line after every `para` answer tokens (0 = one paragraph).
    para: u32,
    reasoning: u32,
    tools: u32,
    ttft: Duration,
    gap: Duration,
    fault: Fault,
    status: u16,
    retry_after: Option<u32>,
    times: Option<u32>,
    after: u32,
    echo_auth: bool,
    bad_args: bool,
    /// Answer with a description of the request (its system prompt and tools) instead of tokens.
    describe: bool,
    /// `describe=history`: answer a fingerprint of the conversation sent.
    fingerprint: bool,
    /// The function the calls name, and so the shape of their arguments.
    tool: String,
    /// For `tool=update_artifact`: the artifact to update.
    artifact: String,
    /// Calls with `{}` as their arguments.
    empty_args: bool,
    /// The answer's tokens, decided per request (a follow-up after tool results answers differently).
    answer: Vec<String>,
    /// The calls to make: (call id, arguments).
    calls: Vec<(String, String)>,
}

impl Scenario {
    fn parse(model: &str) -> Result<Scenario, String> {
        let mut s = Scenario {
            tokens: 20,
            para: 0,
            reasoning: 0,
            tools: 0,
            ttft: Duration::ZERO,
            gap: Duration::ZERO,
            fault: Fault::None,
            status: 503,
            retry_after: None,
            times: None,
            after: 0,
            echo_auth: false,
            bad_args: false,
            describe: false,
            fingerprint: false,
            tool: "lookup".into(),
            artifact: String::new(),
            empty_args: false,
            answer: Vec::new(),
            calls: Vec::new(),
        };
        let Some((_, query)) = model.split_once('?') else {
            return Ok(s);
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let num = || {
                v.parse::<u64>()
                    .map_err(|_| format!("knob {k}={v:?} is not a number"))
            };
            match k {
                "tokens" => s.tokens = num()? as u32,
                "para" => s.para = num()? as u32,
                "reasoning" => s.reasoning = num()? as u32,
                "tools" => s.tools = num()? as u32,
                "ttft_ms" => s.ttft = Duration::from_millis(num()?),
                "gap_ms" => s.gap = Duration::from_millis(num()?),
                "gap_us" => s.gap = Duration::from_micros(num()?),
                "status" => s.status = num()? as u16,
                "retry_after" => s.retry_after = Some(num()? as u32),
                "times" => s.times = Some(num()? as u32),
                "after" => s.after = num()? as u32,
                "id" => {}
                "echo_auth" => s.echo_auth = v == "1",
                "bad_args" => s.bad_args = v == "1",
                "describe" => {
                    s.describe = v == "1";
                    s.fingerprint = v == "history";
                }
                "tool" => s.tool = v.to_string(),
                "artifact" => s.artifact = v.to_string(),
                "empty_args" => s.empty_args = v == "1",
                "fault" => {
                    s.fault = match v {
                        "none" => Fault::None,
                        "status" => Fault::Status,
                        "drop" => Fault::Drop,
                        "malformed" => Fault::Malformed,
                        "stall" => Fault::Stall,
                        other => return Err(format!("unknown fault {other:?}")),
                    }
                }
                other => return Err(format!("unknown knob {other:?}")),
            }
        }
        Ok(s)
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    active: AtomicU64,
    completed: AtomicU64,
    client_closed: AtomicU64,
    /// Requests per model name, for `times`.
    per_model: Mutex<HashMap<String, u32>>,
}

/// Counts a stream as active while it lives; notes whether the client left first.
struct StreamGuard {
    stats: Arc<Stats>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        if self.finished {
            self.stats.completed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.client_closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub fn router() -> Router {
    let stats = Arc::new(Stats::default());
    Router::new()
        .route(
            "/v1/responses",
            post(|s, h, b| handle(s, h, b, Dialect::Responses)),
        )
        .route(
            "/v1/chat/completions",
            post(|s, h, b| handle(s, h, b, Dialect::Chat)),
        )
        .route(
            "/v1/messages",
            post(|s, h, b| handle(s, h, b, Dialect::Anthropic)),
        )
        .route(
            "/api/chat",
            post(|s, h, b| handle(s, h, b, Dialect::Ollama)),
        )
        .route("/sim/stats", get(stats_handler))
        .with_state(stats)
}

/// Serves the simulator on `listener` (TCP_NODELAY on every socket) until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router()).await
}

async fn stats_handler(State(stats): State<Arc<Stats>>) -> Response {
    axum::Json(serde_json::json!({
        "requests": stats.requests.load(Ordering::Relaxed),
        "active": stats.active.load(Ordering::Relaxed),
        "completed": stats.completed.load(Ordering::Relaxed),
        "client_closed": stats.client_closed.load(Ordering::Relaxed),
    }))
    .into_response()
}

fn error_response(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({"error": {"message": message, "type": "simulated_error"}});
    (status, axum::Json(body)).into_response()
}

async fn handle(
    State(stats): State<Arc<Stats>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
    dialect: Dialect,
) -> Response {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error_response(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let model = req
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("sim")
        .to_string();
    let scenario = match Scenario::parse(&model) {
        Ok(s) => s,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e),
    };
    let nth = {
        let mut per = match stats.per_model.lock() {
            Ok(p) => p,
            Err(p) => p.into_inner(),
        };
        let n = per.entry(model.clone()).or_insert(0);
        *n += 1;
        *n
    };
    if scenario.fault == Fault::Status && scenario.times.is_none_or(|t| nth <= t) {
        let status =
            StatusCode::from_u16(scenario.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        // Like providers that quote a bad key back, optionally echo the credentials received.
        let credentials = headers
            .get(header::AUTHORIZATION)
            .or_else(|| headers.get("x-api-key"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        let message = if scenario.echo_auth {
            format!("simulated upstream failure; credentials received: {credentials}")
        } else {
            "simulated upstream failure".to_string()
        };
        let mut resp = error_response(status, &message);
        if let Some(s) = scenario.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        return resp;
    }
    let mut scenario = scenario;
    plan(&mut scenario, &req);
    if scenario.describe || scenario.fingerprint {
        scenario.answer = if scenario.fingerprint {
            vec![fingerprint(&req)]
        } else {
            describe(&req)
        };
        scenario.tokens = scenario.answer.len() as u32;
        scenario.calls.clear();
    }
    stats.active.fetch_add(1, Ordering::Relaxed);
    let guard = StreamGuard {
        stats: stats.clone(),
        finished: false,
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(produce(dialect, model, scenario, tx, guard));
    let body = Body::from_stream(tokio_stream_from(rx));
    let content_type = match dialect {
        Dialect::Ollama => "application/x-ndjson",
        _ => "text/event-stream",
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn tokio_stream_from(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// What a request carried, in any dialect: its system prompt and its tools' names.
fn describe(req: &serde_json::Value) -> Vec<String> {
    let system = req["instructions"]
        .as_str()
        .or_else(|| req["system"].as_str())
        .or_else(|| {
            req["messages"]
                .as_array()?
                .iter()
                .find(|m| m["role"] == "system")
                .and_then(|m| m["content"].as_str())
        })
        .unwrap_or("");
    let tools: Vec<&str> = req["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| {
                    t["function"]["name"]
                        .as_str()
                        .or_else(|| t["name"].as_str())
                })
                .collect()
        })
        .unwrap_or_default();
    let items = req["messages"]
        .as_array()
        .or_else(|| req["input"].as_array());
    let results: usize = items
        .map(|items| {
            items
                .iter()
                .map(|i| {
                    if i["role"] == "tool" || i["type"] == "function_call_output" {
                        1
                    } else {
                        i["content"].as_array().map_or(0, |c| {
                            c.iter().filter(|b| b["type"] == "tool_result").count()
                        })
                    }
                })
                .sum()
        })
        .unwrap_or(0);
    vec![
        format!("system={} ", system.replace(' ', "_")),
        format!("tools={} ", tools.join(",")),
        format!("history_results={results} "),
    ]
}

/// `history=<items>:<hash>`: the conversation's items (`messages` or `input`) and an FNV-1a hash
/// of their JSON, so that a test can tell two requests' conversations apart.
fn fingerprint(req: &serde_json::Value) -> String {
    let items = req
        .get("messages")
        .or_else(|| req.get("input"))
        .cloned()
        .unwrap_or_default();
    let n = items.as_array().map_or(0, Vec::len);
    let hash = items
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("history={n}:{hash:016x} ")
}

/// Tool results in the conversation since the user's last message, in any dialect.
fn results_since_last_user(req: &serde_json::Value) -> u32 {
    let items = req["messages"]
        .as_array()
        .or_else(|| req["input"].as_array());
    let Some(items) = items else { return 0 };
    let tool_results = |item: &serde_json::Value| -> u32 {
        if item["role"] == "tool" || item["type"] == "function_call_output" {
            return 1;
        }
        item["content"]
            .as_array()
            .map(|c| c.iter().filter(|b| b["type"] == "tool_result").count() as u32)
            .unwrap_or(0)
    };
    let last_user = items
        .iter()
        .rposition(|i| i["role"] == "user" && tool_results(i) == 0)
        .map_or(0, |p| p + 1);
    items[last_user..].iter().map(tool_results).sum()
}

/// Decides the answer and the calls from what the conversation holds since the user's last message.
fn plan(sc: &mut Scenario, req: &serde_json::Value) {
    let results = results_since_last_user(req);
    let tool = sc.tool.clone();
    let artifact = sc.artifact.clone();
    let empty = sc.empty_args;
    let args = move |i: u32| match tool.as_str() {
        _ if empty => "{}".to_string(),
        "create_table" => format!(
            "{{\"title\":\"Table {i}\",\"columns\":[\"item\",\"value\"],\"rows\":[[\"alpha\",1],[\"beta, b\",2],[\"gamma\",3],[\"delta\",4]]}}"
        ),
        "create_chart" => format!(
            "{{\"title\":\"Chart {i}\",\"chart_type\":\"bar\",\"labels\":[\"q1\",\"q2\",\"q3\"],\"series\":[{{\"name\":\"sales\",\"values\":[3,5,8]}}]}}"
        ),
        "create_document" => {
            format!("{{\"title\":\"Doc {i}\",\"markdown\":\"# Report {i}\\n\\nAll good.\"}}")
        }
        "update_artifact" => {
            format!("{{\"artifact_id\":\"{artifact}\",\"append_rows\":[[\"epsilon\",5]]}}")
        }
        _ => format!("{{\"query\":\"item {i}\",\"limit\":{i}}}"),
    };
    let para = sc.para;
    let toks = |n: u32| {
        (0..n)
            .map(|t| {
                let end = if para > 0 && (t + 1) % para == 0 {
                    "\n\n"
                } else {
                    " "
                };
                format!("tok{t}{end}")
            })
            .collect::<Vec<_>>()
    };
    if results == 0 {
        sc.answer = toks(sc.tokens);
        sc.calls = (0..sc.tools)
            .map(|i| {
                let a = if sc.bad_args && i == 0 {
                    "{\"query\":5}".to_string()
                } else {
                    args(i)
                };
                (format!("call_{i}"), a)
            })
            .collect();
    } else if sc.bad_args && results == sc.tools {
        sc.answer = ["Retrying ", "with ", "valid ", "arguments. "]
            .map(String::from)
            .to_vec();
        sc.calls = vec![("call_retry".to_string(), args(0))];
    } else {
        sc.answer = vec![
            "Using ".to_string(),
            format!("{results} "),
            "results. ".to_string(),
        ];
        sc.answer.extend(toks(sc.tokens));
        sc.calls = Vec::new();
    }
    sc.tokens = sc.answer.len() as u32;
}

/// Writes the scripted stream; ends early when the client goes away (a send fails).
async fn produce(
    dialect: Dialect,
    model: String,
    sc: Scenario,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    mut guard: StreamGuard,
) {
    let w = Writer {
        dialect,
        model: &model,
    };
    let send = |b: String| {
        let tx = tx.clone();
        async move { tx.send(Ok(Bytes::from(b))).await.is_ok() }
    };
    macro_rules! emit {
        ($e:expr) => {
            if !send($e).await {
                return;
            }
        };
    }
    emit!(w.start());
    let mut next_at = tokio::time::Instant::now() + sc.ttft;
    let total = sc.reasoning + sc.tokens;
    for i in 0..total {
        // `i` tokens have been sent so far.
        if i == sc.after && sc.fault != Fault::None && sc.fault != Fault::Status {
            match sc.fault {
                Fault::Drop => {
                    // Let what was sent reach the client, then abort the connection mid-body (an
                    // error from the body stream), as a real drop does.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(Err(std::io::Error::other("simulated drop"))).await;
                    return;
                }
                Fault::Malformed | Fault::Stall => {
                    if sc.fault == Fault::Malformed {
                        emit!(w.malformed());
                    }
                    // Hold the connection open (the client must notice, not see an end) until the
                    // client goes away.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                        _ = tx.closed() => {}
                    }
                    return;
                }
                _ => {}
            }
        }
        // Zero delays do not touch the timer (its 1 ms granularity would pace tokens at 1 kHz).
        if next_at > tokio::time::Instant::now() {
            tokio::time::sleep_until(next_at).await;
        }
        next_at = tokio::time::Instant::now().max(next_at) + sc.gap;
        if i < sc.reasoning {
            if i == 0 {
                emit!(w.reasoning_start());
            }
            emit!(w.reasoning_delta(&format!("think{i} ")));
            if i + 1 == sc.reasoning {
                emit!(w.reasoning_done());
            }
        } else {
            let t = i - sc.reasoning;
            if t == 0 {
                emit!(w.text_start());
            }
            emit!(w.text_delta(&sc.answer[t as usize]));
            if t + 1 == sc.tokens {
                emit!(w.text_done());
            }
        }
    }
    for (i, (call_id, args)) in sc.calls.iter().enumerate() {
        let i = i as u32;
        emit!(w.tool_start(i, call_id, &sc.tool));
        for p in split_in(args, (args.len() / 12).max(4)) {
            // Argument fragments are paced like tokens, so a client sees a call being written.
            if next_at > tokio::time::Instant::now() {
                tokio::time::sleep_until(next_at).await;
            }
            next_at = tokio::time::Instant::now().max(next_at) + sc.gap;
            emit!(w.tool_delta(i, p));
        }
        emit!(w.tool_done(i, call_id, &sc.tool, args));
    }
    let calls = !sc.calls.is_empty();
    let stop = if calls { "tool_calls" } else { "stop" };
    emit!(w.finish(stop, sc.tokens, sc.reasoning, calls));
    guard.finished = true;
}

fn split_in(s: &str, n: usize) -> Vec<&str> {
    let step = s.len().div_ceil(n).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < s.len() {
        let mut end = (start + step).min(s.len());
        while !s.is_char_boundary(end) {
            end += 1;
        }
        out.push(&s[start..end]);
        start = end;
    }
    out
}

/// Frames in one dialect.
struct Writer<'a> {
    dialect: Dialect,
    model: &'a str,
}

fn sse(event: Option<&str>, data: serde_json::Value) -> String {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

fn ndjson(v: serde_json::Value) -> String {
    format!("{v}\n")
}

use serde_json::json;

impl Writer<'_> {
    fn chat_chunk(&self, delta: serde_json::Value, finish: Option<&str>) -> String {
        sse(
            None,
            json!({"id":"chatcmpl-sim","object":"chat.completion.chunk","created":0,"model":self.model,
                   "choices":[{"index":0,"delta":delta,"finish_reason":finish}]}),
        )
    }

    fn typed(&self, kind: &str, mut v: serde_json::Value) -> String {
        v["type"] = json!(kind);
        sse(Some(kind), v)
    }

    fn ollama_line(&self, message: serde_json::Value) -> String {
        ndjson(
            json!({"model":self.model,"created_at":"2026-01-01T00:00:00Z","message":message,"done":false}),
        )
    }

    fn start(&self) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.created",
                json!({"response":{"id":"resp_sim","status":"in_progress","model":self.model,"output":[]}}),
            ),
            Dialect::Chat => self.chat_chunk(json!({"role":"assistant","content":""}), None),
            Dialect::Anthropic => {
                self.typed(
                    "message_start",
                    json!({"message":{"id":"msg_sim","type":"message","role":"assistant","content":[],"model":self.model,
                           "stop_reason":null,"usage":{"input_tokens":10,"output_tokens":1}}}),
                ) + &self.typed("ping", json!({}))
            }
            Dialect::Ollama => String::new(),
        }
    }

    fn reasoning_start(&self) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.output_item.added",
                json!({"output_index":0,"item":{"id":"rs_sim","type":"reasoning","summary":[]}}),
            ) + &self.typed(
                "response.reasoning_summary_part.added",
                json!({"item_id":"rs_sim","summary_index":0}),
            ),
            Dialect::Anthropic => self.typed(
                "content_block_start",
                json!({"index":0,"content_block":{"type":"thinking","thinking":""}}),
            ),
            _ => String::new(),
        }
    }

    fn reasoning_delta(&self, t: &str) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.reasoning_summary_text.delta",
                json!({"item_id":"rs_sim","delta":t}),
            ),
            Dialect::Chat => self.chat_chunk(json!({"reasoning_content":t}), None),
            Dialect::Anthropic => self.typed(
                "content_block_delta",
                json!({"index":0,"delta":{"type":"thinking_delta","thinking":t}}),
            ),
            Dialect::Ollama => {
                self.ollama_line(json!({"role":"assistant","content":"","thinking":t}))
            }
        }
    }

    fn reasoning_done(&self) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.output_item.done",
                json!({"item":{"id":"rs_sim","type":"reasoning"}}),
            ),
            Dialect::Anthropic => {
                self.typed(
                    "content_block_delta",
                    json!({"index":0,"delta":{"type":"signature_delta","signature":"sim"}}),
                ) + &self.typed("content_block_stop", json!({"index":0}))
            }
            _ => String::new(),
        }
    }

    fn text_start(&self) -> String {
        match self.dialect {
            Dialect::Anthropic => self.typed(
                "content_block_start",
                json!({"index":1,"content_block":{"type":"text","text":""}}),
            ),
            _ => String::new(),
        }
    }

    fn text_delta(&self, t: &str) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.output_text.delta",
                json!({"item_id":"msg_sim","delta":t}),
            ),
            Dialect::Chat => self.chat_chunk(json!({"content":t}), None),
            Dialect::Anthropic => self.typed(
                "content_block_delta",
                json!({"index":1,"delta":{"type":"text_delta","text":t}}),
            ),
            Dialect::Ollama => self.ollama_line(json!({"role":"assistant","content":t})),
        }
    }

    fn text_done(&self) -> String {
        match self.dialect {
            Dialect::Responses => {
                self.typed("response.output_text.done", json!({"item_id":"msg_sim"}))
            }
            Dialect::Anthropic => self.typed("content_block_stop", json!({"index":1})),
            _ => String::new(),
        }
    }

    fn tool_start(&self, i: u32, call_id: &str, name: &str) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.output_item.added",
                json!({"item":{"id":format!("fc_{i}"),"type":"function_call","call_id":call_id,"name":name,"arguments":""}}),
            ),
            Dialect::Chat => self.chat_chunk(
                json!({"tool_calls":[{"index":i,"id":call_id,"type":"function","function":{"name":name,"arguments":""}}]}),
                None,
            ),
            Dialect::Anthropic => self.typed(
                "content_block_start",
                json!({"index":2+i,"content_block":{"type":"tool_use","id":call_id,"name":name,"input":{}}}),
            ),
            Dialect::Ollama => String::new(),
        }
    }

    fn tool_delta(&self, i: u32, piece: &str) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.function_call_arguments.delta",
                json!({"item_id":format!("fc_{i}"),"delta":piece}),
            ),
            Dialect::Chat => self.chat_chunk(
                json!({"tool_calls":[{"index":i,"function":{"arguments":piece}}]}),
                None,
            ),
            Dialect::Anthropic => self.typed(
                "content_block_delta",
                json!({"index":2+i,"delta":{"type":"input_json_delta","partial_json":piece}}),
            ),
            Dialect::Ollama => String::new(),
        }
    }

    fn tool_done(&self, i: u32, call_id: &str, name: &str, args: &str) -> String {
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.function_call_arguments.done",
                json!({"item_id":format!("fc_{i}"),"arguments":args}),
            ),
            Dialect::Anthropic => self.typed("content_block_stop", json!({"index":2+i})),
            Dialect::Ollama => {
                let parsed: serde_json::Value = serde_json::from_str(args).unwrap_or_default();
                self.ollama_line(json!({"role":"assistant","content":"","tool_calls":[{"id":call_id,"function":{"name":name,"arguments":parsed}}]}))
            }
            Dialect::Chat => String::new(),
        }
    }

    fn finish(&self, stop: &str, tokens: u32, reasoning: u32, tools: bool) -> String {
        let output = u64::from(tokens + reasoning);
        match self.dialect {
            Dialect::Responses => self.typed(
                "response.completed",
                json!({"response":{"id":"resp_sim","status":"completed","usage":{"input_tokens":10,"output_tokens":output,
                       "output_tokens_details":{"reasoning_tokens":reasoning},"total_tokens":10+output}}}),
            ),
            Dialect::Chat => {
                self.chat_chunk(json!({}), Some(stop))
                    + &sse(None, json!({"id":"chatcmpl-sim","object":"chat.completion.chunk","choices":[],
                        "usage":{"prompt_tokens":10,"completion_tokens":output,"total_tokens":10+output,
                                 "completion_tokens_details":{"reasoning_tokens":reasoning}}}))
                    + "data: [DONE]\n\n"
            }
            Dialect::Anthropic => {
                let reason = if tools { "tool_use" } else { "end_turn" };
                self.typed("message_delta", json!({"delta":{"stop_reason":reason,"stop_sequence":null},"usage":{"output_tokens":output}}))
                    + &self.typed("message_stop", json!({}))
            }
            Dialect::Ollama => ndjson(json!({"model":self.model,"created_at":"2026-01-01T00:00:00Z",
                "message":{"role":"assistant","content":""},"done":true,"done_reason":stop,
                "prompt_eval_count":10,"eval_count":output})),
        }
    }

    fn malformed(&self) -> String {
        match self.dialect {
            Dialect::Ollama => "{\"message\": {\"content\": \"unterminated\n".to_string(),
            Dialect::Responses => "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\n\n".to_string(),
            _ => "data: {\"choices\": [{\"delta\": \n\n".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn para_breaks_the_answer_into_paragraphs() {
        let mut sc = Scenario::parse("openai-chat/sim?tokens=7&para=3").expect("knobs");
        plan(&mut sc, &serde_json::json!({"messages": []}));
        assert_eq!(
            sc.answer.concat(),
            "tok0 tok1 tok2\n\ntok3 tok4 tok5\n\ntok6 "
        );
        let mut one = Scenario::parse("openai-chat/sim?tokens=3").expect("knobs");
        plan(&mut one, &serde_json::json!({"messages": []}));
        assert_eq!(one.answer.concat(), "tok0 tok1 tok2 ");
        assert!(Scenario::parse("x?para=many").is_err());
    }
}
