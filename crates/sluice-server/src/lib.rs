//! Sluice's front end: HTTP routes, SSE streams and the WebSocket, over the engine.
//!
//! Handlers are thin (extract, call the engine, convert); every failure becomes a response in
//! `error.rs`. Streaming routes write each event's shared frame as soon as the subscription yields
//! it: no compression or buffering layer, TCP_NODELAY on every accepted socket.

pub mod auth;
pub mod error;
mod routes;
mod sse;
mod web;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use sluice_engine::Engine;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::ApiKeys;

/// What the HTTP layer needs besides the engine.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// An SSE comment goes out after this much silence on a stream.
    pub heartbeat: Duration,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
    /// Origins whose pages may call the API from a browser (CORS); `*` allows any. Empty: none
    /// (the page at `/` is same-origin and needs none).
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            heartbeat: Duration::from_secs(15),
            max_body_bytes: 1024 * 1024,
            cors_origins: Vec::new(),
        }
    }
}

pub struct AppState {
    pub engine: Engine,
    pub keys: ApiKeys,
    pub http: HttpConfig,
    /// Cancelled when the server starts shutting down: `/readyz` turns 503.
    pub shutdown: CancellationToken,
}

/// The whole API as a router.
pub fn router(state: Arc<AppState>) -> Router {
    routes::router(state)
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting, ends the
/// runs in flight (`run_interrupted`), lets their streams finish and flushes the store.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let engine = state.engine.clone();
    let app = router(state);
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::warn!(error = %err, "could not set TCP_NODELAY");
        }
    });
    let stopping = shutdown.clone();
    let drain = async move {
        stopping.cancelled().await;
        // End the runs first so that their streams close and connections can drain.
        engine.shutdown(Duration::from_secs(10)).await;
    };
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(drain)
    .await
}
