//! The HTTP routes. Each handler extracts, calls the engine and converts; nothing else.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use sluice_engine::Coalesce;
use sluice_protocol::api::{CreateThread, OnDisconnect, RunRequest, ThreadList};
use sluice_protocol::{Cursor, ErrorCode};

use crate::AppState;
use crate::auth::Owner;
use crate::error::{ApiError, ApiJson, parse_json};
use crate::sse::{DisconnectGuard, sse_response};

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.http.max_body_bytes;
    let router = Router::new()
        .route("/", get(crate::web::index))
        .route("/assets/app.js", get(crate::web::app_js))
        .route("/assets/app.css", get(crate::web::app_css))
        .route("/v1/threads", post(create_thread).get(list_threads))
        .route("/v1/threads/{id}", get(get_thread).delete(delete_thread))
        .route("/v1/threads/{id}/runs", on_thread(Answer::Background))
        .route("/v1/threads/{id}/runs/stream", on_thread(Answer::Stream))
        .route("/v1/threads/{id}/runs/wait", on_thread(Answer::Wait))
        .route("/v1/runs", on_new_thread(Answer::Background))
        .route("/v1/runs/stream", on_new_thread(Answer::Stream))
        .route("/v1/runs/wait", on_new_thread(Answer::Wait))
        .route("/v1/runs/{id}", get(get_run))
        .route("/v1/runs/{id}/events", get(run_events))
        .route("/v1/runs/{id}/cancel", post(cancel_run))
        .route("/v1/models", get(list_models))
        .route("/v1/artifacts/{id}", get(get_artifact))
        .route(
            "/v1/artifacts/{id}/versions/{version}",
            get(get_artifact_version),
        )
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit));
    // With no origins configured nothing is allowed cross-origin, and no request pays for the
    // layer (it would still inspect every request and add `Vary` to every response).
    let router = if state.http.cors_origins.is_empty() {
        router
    } else {
        router.layer(cors(&state.http.cors_origins))
    };
    router.with_state(state)
}

/// Cross-origin access for the configured origins: the headers a client sends (auth, resume
/// cursor, idempotency key) are allowed; no cookies are involved, so no credentials mode.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| axum::http::HeaderValue::from_str(o).ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::POST,
            axum::http::Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("last-event-id"),
            header::HeaderName::from_static("idempotency-key"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no route {}", uri.path()))
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} does not take this method", uri.path()),
    )
}

async fn create_thread(
    State(st): St,
    Owner(owner): Owner,
    body: Bytes,
) -> Result<Response, ApiError> {
    // The body is optional: an empty POST creates an untitled thread.
    let req: CreateThread = if body.iter().all(u8::is_ascii_whitespace) {
        CreateThread::default()
    } else {
        parse_json(&body)?
    };
    let thread = st.engine.create_thread(&owner, req.title).await?;
    Ok((StatusCode::CREATED, axum::Json(thread)).into_response())
}

async fn list_threads(State(st): St, Owner(owner): Owner) -> Result<Response, ApiError> {
    let threads = st.engine.list_threads(&owner, 1000).await?;
    Ok(axum::Json(ThreadList { threads }).into_response())
}

async fn get_thread(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(st.engine.get_thread(&owner, &id).await?).into_response())
}

async fn delete_thread(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    st.engine.delete_thread(&owner, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// How a run-starting request answers.
#[derive(Clone, Copy)]
enum Answer {
    /// The run's SSE stream.
    Stream,
    /// 202 with the run; it goes on in the background.
    Background,
    /// The finished assistant message, once the run ended.
    Wait,
}

async fn start_run(
    st: Arc<AppState>,
    owner: String,
    thread: Option<String>,
    key: IdempotencyKey,
    req: RunRequest,
    answer: Answer,
) -> Result<Response, ApiError> {
    let on_disconnect = req.on_disconnect;
    let run = st
        .engine
        .start_run_keyed(&owner, thread.as_deref(), req, key.0.as_deref())
        .await?;
    match answer {
        Answer::Stream => {
            // Let the run's task go first: it sends the upstream request (the first token's
            // critical path) before this task writes the response head, and the head then leaves
            // together with `run_started` in one write instead of two.
            tokio::task::yield_now().await;
            let sub = st
                .engine
                .subscribe(&owner, &run.id, Cursor::new(0), None)
                .await?;
            let guard = (on_disconnect == OnDisconnect::Cancel).then(|| DisconnectGuard::new(run));
            Ok(sse_response(sub, &st, guard))
        }
        Answer::Background => {
            // 202 acknowledges the run: it is answered once the run is committed.
            st.engine.acknowledge(&run).await?;
            let view = st.engine.get_run(&owner, &run.id).await?;
            Ok((StatusCode::ACCEPTED, axum::Json(view)).into_response())
        }
        Answer::Wait => Ok(axum::Json(st.engine.wait(&run).await?).into_response()),
    }
}

/// A run start's `Idempotency-Key` header, if it has one (read without copying the other headers).
struct IdempotencyKey(Option<String>);

impl<S: Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get("idempotency-key") {
            None => Ok(IdempotencyKey(None)),
            Some(v) => match v.to_str() {
                Ok(key) => Ok(IdempotencyKey(Some(key.to_string()))),
                Err(_) => Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "the Idempotency-Key header must be visible ASCII",
                )),
            },
        }
    }
}

fn on_thread(answer: Answer) -> axum::routing::MethodRouter<Arc<AppState>> {
    post(
        move |State(st): St,
              Owner(owner): Owner,
              Path(id): Path<String>,
              key: IdempotencyKey,
              ApiJson(req): ApiJson<RunRequest>| {
            start_run(st, owner, Some(id), key, req, answer)
        },
    )
}

fn on_new_thread(answer: Answer) -> axum::routing::MethodRouter<Arc<AppState>> {
    post(
        move |State(st): St,
              Owner(owner): Owner,
              key: IdempotencyKey,
              ApiJson(req): ApiJson<RunRequest>| {
            start_run(st, owner, None, key, req, answer)
        },
    )
}

async fn get_run(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(st.engine.get_run(&owner, &id).await?).into_response())
}

async fn cancel_run(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(st.engine.cancel(&owner, &id).await?).into_response())
}

/// `GET /v1/runs/{id}/events`: attach or resume. The cursor comes from `Last-Event-ID` (what an
/// SSE client sends on reconnect) or `?after=`; `?coalesce_ms=` asks for delta batching.
async fn run_events(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let query = uri.query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let header_cursor = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let cursor = match header_cursor.or(param("after")) {
        None | Some("") => Cursor::new(0),
        Some(raw) => Cursor::parse(raw).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("the resume cursor {raw:?} is not `<seq>` or `<seq>.<epoch>`"),
            )
        })?,
    };
    let coalesce = match param("coalesce_ms") {
        None => None,
        Some(ms) => {
            let ms: u64 = ms.parse().ok().filter(|ms| *ms <= 10_000).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidRequest,
                    "`coalesce_ms` must be a whole number of milliseconds up to 10000",
                )
            })?;
            Some(Coalesce {
                max_delay: std::time::Duration::from_millis(ms),
                ..st.engine.config().coalesce
            })
        }
    };
    let sub = st.engine.subscribe(&owner, &id, cursor, coalesce).await?;
    Ok(sse_response(sub, &st, None))
}

/// `GET /v1/artifacts/{id}` (the latest version), or `{id}.csv` for a table as CSV.
async fn get_artifact(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(id) = id.strip_suffix(".csv") {
        let artifact = st.engine.get_artifact(&owner, id, None).await?;
        if artifact.kind != sluice_protocol::api::ArtifactKind::Table {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "artifact {id:?} is a {}, and only tables have a CSV form",
                    artifact.kind.as_str()
                ),
            ));
        }
        let filename = artifact
            .title
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect::<String>();
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{filename}.csv\""),
                ),
            ],
            sluice_engine::artifacts::table_csv(&artifact.data),
        )
            .into_response());
    }
    Ok(axum::Json(st.engine.get_artifact(&owner, &id, None).await?).into_response())
}

async fn get_artifact_version(
    State(st): St,
    Owner(owner): Owner,
    Path((id, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let version: u32 = version.parse().map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("version {version:?} is not a positive number"),
        )
    })?;
    Ok(axum::Json(st.engine.get_artifact(&owner, &id, Some(version)).await?).into_response())
}

async fn list_models(State(st): St, Owner(_): Owner) -> Response {
    let default = st.engine.config().default_model.clone();
    let models: Vec<serde_json::Value> = st
        .engine
        .models()
        .into_iter()
        .map(|m| serde_json::json!({ "id": m.id, "kind": m.kind, "default": m.id == default }))
        .collect();
    axum::Json(serde_json::json!({ "models": models, "default": default })).into_response()
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// Ready when the store commits: 503 with the reason while shutting down or while the
/// database cannot be written (or does not answer within a second).
async fn readyz(State(st): St) -> Response {
    if st.shutdown.is_cancelled() {
        return ApiError::new(ErrorCode::Unavailable, "shutting down").into_response();
    }
    if let Some(why) = st.engine.not_ready() {
        return ApiError::new(ErrorCode::Unavailable, why).into_response();
    }
    let flushed =
        tokio::time::timeout(std::time::Duration::from_secs(1), st.engine.store().flush()).await;
    match flushed {
        Ok(Ok(())) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        Ok(Err(err)) => {
            ApiError::new(ErrorCode::Unavailable, format!("store not ready: {err}")).into_response()
        }
        Err(_) => ApiError::new(
            ErrorCode::Unavailable,
            "store not ready: the database did not commit within 1 s",
        )
        .into_response(),
    }
}

async fn metrics(State(st): St) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.engine.render_metrics(),
    )
        .into_response()
}
