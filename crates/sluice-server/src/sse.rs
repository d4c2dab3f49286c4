//! SSE responses: a subscription's shared frames written as they come, heartbeats in silence.
//!
//! The body is a stream over the subscription's cursor; hyper writes each frame when the stream
//! yields it. Nothing here buffers events: a slow client simply leaves its cursor behind.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream;
use sluice_engine::event_log::Subscription;
use sluice_engine::{Metrics, RunHandle};
use tokio::time::{Instant, Sleep};

use crate::AppState;

/// Cancels the run it holds when dropped before the run ended: `on_disconnect: "cancel"`.
pub struct DisconnectGuard {
    run: Arc<RunHandle>,
}

impl DisconnectGuard {
    pub fn new(run: Arc<RunHandle>) -> Self {
        DisconnectGuard { run }
    }
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if !self.run.is_finished() {
            self.run.cancel("the client disconnected");
        }
    }
}

/// Counts an open stream in `active_streams` for as long as it lives.
pub struct StreamGauge(Arc<Metrics>);

impl StreamGauge {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.stream_opened();
        StreamGauge(metrics)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.stream_closed();
    }
}

struct SseState {
    sub: Subscription,
    heartbeat: Duration,
    /// Fires for a heartbeat. It is moved only when it fires, so that a busy stream costs no timer
    /// work per frame: then it is set again to `heartbeat` after the last frame sent.
    quiet: Pin<Box<Sleep>>,
    last_sent: Instant,
    gauge: StreamGauge,
    _guard: Option<DisconnectGuard>,
}

const HEARTBEAT: Bytes = Bytes::from_static(b": keep-alive\n\n");

/// `at + d`, or a century from `at` where that would overflow (`heartbeat_ms` may be huge).
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 86_400))
}

pub fn sse_response(sub: Subscription, st: &AppState, guard: Option<DisconnectGuard>) -> Response {
    let now = Instant::now();
    let state = SseState {
        sub,
        heartbeat: st.http.heartbeat,
        quiet: Box::pin(tokio::time::sleep_until(after(now, st.http.heartbeat))),
        last_sent: now,
        gauge: StreamGauge::new(st.engine.metrics().clone()),
        _guard: guard,
    };
    let body = stream::unfold(state, |mut st| async move {
        let item = loop {
            tokio::select! {
                biased;
                frame = st.sub.next() => {
                    let frame = frame?;
                    st.gauge.0.chunk_sent(frame.kind());
                    st.last_sent = Instant::now();
                    break frame.sse().clone();
                }
                () = st.quiet.as_mut() => {
                    let due = after(st.last_sent, st.heartbeat);
                    let now = Instant::now();
                    if now >= due {
                        st.last_sent = now;
                        st.quiet.as_mut().reset(after(now, st.heartbeat));
                        break HEARTBEAT;
                    }
                    st.quiet.as_mut().reset(due);
                }
            }
        };
        Some((Ok::<Bytes, std::convert::Infallible>(item), st))
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_heartbeat_does_not_overflow_the_clock() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400));
        assert_eq!(
            after(now, Duration::from_millis(15)),
            now + Duration::from_millis(15)
        );
    }
}
