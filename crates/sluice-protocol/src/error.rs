//! Stable error codes and the error object carried by `error` events, terminal events and HTTP errors.
//!
//! A code is a promise to clients and dashboards: it is low-cardinality, never renamed, and says what
//! kind of thing went wrong; the `message` says what exactly, for a human.

use serde::{Deserialize, Serialize};

/// What kind of failure happened. Serialized as SCREAMING_SNAKE_CASE (`RATE_LIMITED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The upstream provider, or Sluice's own limits, refused for rate.
    RateLimited,
    /// The upstream provider failed or sent something unreadable.
    UpstreamError,
    /// The upstream provider did not answer in time.
    UpstreamTimeout,
    /// The request was malformed or named something that makes no sense.
    InvalidRequest,
    /// The request body was larger than the configured limit.
    PayloadTooLarge,
    /// No API key, or an unknown one.
    Unauthorized,
    /// The key is known but may not do this.
    Forbidden,
    /// The id names nothing this caller can see.
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// The thread already has a run going and the request did not ask to queue or interrupt.
    Conflict,
    /// A resume cursor is ahead of what survived a server crash: recover from the stored state.
    StreamReset,
    /// A tool failed.
    ToolError,
    /// The run was cancelled.
    Cancelled,
    /// The server is shutting down or not ready (its database cannot be written, say): try again.
    Unavailable,
    /// A run could not be stored (the database failed for longer than the configured bound):
    /// it ended with `run_failed`; what it showed was not kept.
    StoreUnavailable,
    /// A bug or an environment failure inside Sluice.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::UpstreamError => "UPSTREAM_ERROR",
            ErrorCode::UpstreamTimeout => "UPSTREAM_TIMEOUT",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::StreamReset => "STREAM_RESET",
            ErrorCode::ToolError => "TOOL_ERROR",
            ErrorCode::Cancelled => "CANCELLED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::StoreUnavailable => "STORE_UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    /// Whether trying the same thing again later may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::UpstreamError
                | ErrorCode::UpstreamTimeout
                | ErrorCode::Unavailable
                | ErrorCode::StoreUnavailable
        )
    }
}

/// The error object inside `error`, `run_failed` and `tool_execution_failed` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl ErrorInfo {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorInfo {
            code,
            message: message.into(),
            retryable: code.retryable(),
        }
    }
}
