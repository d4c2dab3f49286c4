//! The WebSocket: several runs on one socket, the same event objects as SSE.
//!
//! One task reads client messages; each followed run gets a forwarding task that reads its
//! subscription and hands frames to the socket writer through a small bounded channel. When the
//! socket is slow the forwarders wait on that channel and their cursors simply stay behind: the
//! run's log is the buffer, never a queue per subscriber.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use sluice_engine::event_log::Subscription;
use sluice_protocol::api::{RunRequest, WsClientMessage, WsRequestError, WsRunAccepted};
use sluice_protocol::{Cursor, ErrorCode};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::AppState;
use crate::auth::Owner;
use crate::sse::StreamGauge;

/// Frames waiting for the socket writer, across all runs of one socket.
const OUTBOX: usize = 32;
/// The socket's write buffer; tungstenite's default (128 KiB) is far more than a stream needs.
const WRITE_BUFFER: usize = 8 * 1024;

pub async fn upgrade(
    State(st): State<Arc<AppState>>,
    Owner(owner): Owner,
    ws: WebSocketUpgrade,
) -> Response {
    ws.write_buffer_size(WRITE_BUFFER)
        .max_message_size(st.http.max_body_bytes)
        .on_upgrade(move |socket| session(st, owner, socket))
}

async fn session(st: Arc<AppState>, owner: String, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(OUTBOX);
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if sink.send(msg).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut follows: HashMap<String, JoinHandle<()>> = HashMap::new();
    let mut shutting_down = false;
    loop {
        let msg = tokio::select! {
            msg = incoming.next() => msg,
            _ = st.shutdown.cancelled() => {
                shutting_down = true;
                break;
            }
        };
        let Some(Ok(msg)) = msg else { break };
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        follows.retain(|_, h| !h.is_finished());
        let request: WsClientMessage = match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                reply_error(
                    &tx,
                    ErrorCode::InvalidRequest,
                    format!("unreadable message: {e}"),
                    None,
                    None,
                )
                .await;
                continue;
            }
        };
        match request {
            WsClientMessage::UserMessage {
                thread_id,
                content,
                model,
                on_busy,
                agent,
                request_id,
                idempotency_key,
            } => {
                let req = RunRequest {
                    content,
                    model,
                    on_busy,
                    on_disconnect: Default::default(),
                    agent,
                };
                let started = st
                    .engine
                    .start_run_keyed(
                        &owner,
                        thread_id.as_deref(),
                        req,
                        idempotency_key.as_deref(),
                    )
                    .await;
                // `run_accepted` acknowledges the run: it is sent once the run is committed.
                let started = match started {
                    Ok(run) => st.engine.acknowledge(&run).await.map(|()| run),
                    Err(e) => Err(e),
                };
                match started {
                    Ok(run) => {
                        if let Some(request_id) = request_id {
                            let accepted = WsRunAccepted {
                                request_id,
                                run_id: run.id.to_string(),
                                thread_id: run.thread_id.to_string(),
                            };
                            send_json(&tx, &accepted).await;
                        }
                        let sub = st
                            .engine
                            .subscribe(&owner, &run.id, Cursor::new(0), None)
                            .await;
                        follow(&st, &tx, &mut follows, run.id.to_string(), sub);
                    }
                    Err(e) => reply_error(&tx, e.code(), e.to_string(), None, request_id).await,
                }
            }
            WsClientMessage::Subscribe { run_id, after } => {
                let sub = st
                    .engine
                    .subscribe(&owner, &run_id, Cursor::new(after), None)
                    .await;
                follow(&st, &tx, &mut follows, run_id, sub);
            }
            WsClientMessage::Unsubscribe { run_id } => {
                if let Some(h) = follows.remove(&run_id) {
                    h.abort();
                }
            }
            WsClientMessage::Ping => {
                let _ = tx.send(Message::Text(r#"{"type":"pong"}"#.into())).await;
            }
            WsClientMessage::Cancel { run_id } => {
                if let Err(e) = st.engine.cancel(&owner, &run_id).await {
                    reply_error(&tx, e.code(), e.to_string(), Some(run_id), None).await;
                }
            }
        }
    }
    if shutting_down {
        // Every run is being ended with run_interrupted: let the forwarders deliver it, then close.
        let drain = futures_util::future::join_all(follows.into_values());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
    } else {
        for (_, h) in follows {
            h.abort();
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn follow(
    st: &Arc<AppState>,
    tx: &mpsc::Sender<Message>,
    follows: &mut HashMap<String, JoinHandle<()>>,
    run_id: String,
    sub: Result<Subscription, sluice_engine::EngineError>,
) {
    let mut sub = match sub {
        Ok(s) => s,
        Err(e) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                reply_error(&tx, e.code(), e.to_string(), Some(run_id), None).await
            });
            return;
        }
    };
    if let Some(old) = follows.remove(&run_id) {
        old.abort();
    }
    let tx = tx.clone();
    let gauge = StreamGauge::new(st.engine.metrics().clone());
    let handle = tokio::spawn(async move {
        let _gauge = gauge;
        while let Some(frame) = sub.next().await {
            let Ok(text) = Utf8Bytes::try_from(frame.json()) else {
                continue;
            };
            _gauge.metrics().chunk_sent(frame.kind());
            if tx.send(Message::Text(text)).await.is_err() {
                return;
            }
        }
    });
    follows.insert(run_id, handle);
}

async fn reply_error(
    tx: &mpsc::Sender<Message>,
    code: ErrorCode,
    message: String,
    run_id: Option<String>,
    request_id: Option<String>,
) {
    let body = WsRequestError {
        code,
        message,
        run_id,
        request_id,
    };
    send_json(tx, &body).await;
}

async fn send_json(tx: &mpsc::Sender<Message>, body: &impl serde::Serialize) {
    if let Ok(text) = serde_json::to_string(body) {
        let _ = tx.send(Message::Text(text.into())).await;
    }
}
