//! HTTP and WebSocket bodies: what clients send and what the API answers (other than events).
//!
//! Requests are strict (`deny_unknown_fields`): a misspelt field is an `INVALID_REQUEST` that names it,
//! not a silently ignored option.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::event::Usage;

/// What to do when a message arrives for a thread whose run is still going.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBusy {
    /// Answer 409 CONFLICT (the default).
    #[default]
    Reject,
    /// Start the new run when the current one ends.
    Queue,
    /// Cancel the current run, then start the new one.
    Interrupt,
}

/// What a client disconnect means for the run it was watching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// The run goes on (the default): a disconnect is not a cancel.
    #[default]
    Continue,
    /// The run is cancelled when the client that started it goes away before it ends.
    Cancel,
}

/// `POST /v1/threads`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateThread {
    #[serde(default)]
    pub title: Option<String>,
}

/// The body of every run-starting request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The user's message.
    pub content: String,
    /// The model, e.g. `demo`. The configured default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub on_busy: OnBusy,
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// The agent to run (its model, system prompt, tools and step limit); the default agent when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
            RunStatus::Interrupted,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// The assistant message of a run still going; its content is a checkpoint.
    Streaming,
    /// Final.
    Complete,
    /// The run failed, was cancelled or interrupted; the content is what had been produced.
    Incomplete,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Streaming => "streaming",
            MessageStatus::Complete => "complete",
            MessageStatus::Incomplete => "incomplete",
        }
    }

    pub fn parse(s: &str) -> Option<MessageStatus> {
        [
            MessageStatus::Streaming,
            MessageStatus::Complete,
            MessageStatus::Incomplete,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageView {
    pub id: String,
    pub thread_id: String,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    #[serde(default)]
    pub reasoning: String,
    pub status: MessageStatus,
    #[serde(default)]
    pub run_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// For an assistant message whose run called tools: the run's turns in order —
    /// `{"role":"assistant","content","tool_calls":[{"id","name","arguments"}]}` and
    /// `{"role":"tool","tool_call_id","tool_name","content"}`, ending with the final answer.
    /// Later runs send these to the model as the thread's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turns: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadView {
    pub id: String,
    #[serde(default)]
    pub title: Option<String>,
    pub created_at: i64,
    /// Present on `GET /v1/threads/{id}`; absent in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<MessageView>>,
    /// The thread's artifacts, latest version of each, on `GET /v1/threads/{id}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Vec<ArtifactView>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    Table,
    Chart,
    Document,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Table => "table",
            ArtifactKind::Chart => "chart",
            ArtifactKind::Document => "document",
        }
    }

    pub fn parse(s: &str) -> Option<ArtifactKind> {
        [
            ArtifactKind::Table,
            ArtifactKind::Chart,
            ArtifactKind::Document,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactStatus {
    /// Still being written.
    Intermediate,
    Final,
}

impl ArtifactStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactStatus::Intermediate => "intermediate",
            ArtifactStatus::Final => "final",
        }
    }

    pub fn parse(s: &str) -> Option<ArtifactStatus> {
        match s {
            "intermediate" => Some(ArtifactStatus::Intermediate),
            "final" => Some(ArtifactStatus::Final),
            _ => None,
        }
    }
}

/// One version of an artifact: what `artifact_intermediate`/`artifact_final` carry and what
/// `GET /v1/artifacts/{id}` answers. `data` depends on `kind`: a table is
/// `{"columns": [..], "rows": [[..]]}`, a chart `{"chart_type", "labels": [..], "series": [{"name", "values"}]}`,
/// a document `{"markdown": ".."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactView {
    pub id: String,
    pub thread_id: String,
    pub run_id: String,
    pub kind: ArtifactKind,
    pub title: String,
    /// 1, 2, … — every update is a new version; all are kept.
    pub version: u32,
    pub status: ArtifactStatus,
    pub data: serde_json::Value,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadList {
    pub threads: Vec<ThreadView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub thread_id: String,
    pub model: String,
    pub status: RunStatus,
    /// The user message the run answers.
    pub user_message_id: String,
    /// The assistant message the run writes.
    pub message_id: String,
    #[serde(default)]
    pub usage: Usage,
    #[serde(default)]
    pub time_to_first_token_ms: Option<f64>,
    /// The highest `seq` in the run's log so far.
    pub last_seq: u64,
    #[serde(default)]
    pub error: Option<crate::error::ErrorInfo>,
    pub created_at: i64,
    #[serde(default)]
    pub ended_at: Option<i64>,
}

/// `POST …/runs/wait`: the finished assistant message and its run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaitResponse {
    pub run: RunView,
    pub message: MessageView,
}

/// Every HTTP failure: `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

/// What a WebSocket client sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WsClientMessage {
    /// Start a run on a thread (a new thread when `thread_id` is absent) and follow it.
    UserMessage {
        #[serde(default)]
        thread_id: Option<String>,
        content: String,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        on_busy: OnBusy,
        #[serde(default)]
        agent: Option<String>,
        /// The client's own tag for this request: the server answers `run_accepted` (or a
        /// `request_error`) carrying it, so a client with several starts in flight can tell them
        /// apart.
        #[serde(default)]
        request_id: Option<String>,
        /// As the `Idempotency-Key` header of `POST …/runs`: a start re-sent with the same key
        /// (after a reconnect) gets the run the first one made.
        #[serde(default)]
        idempotency_key: Option<String>,
    },
    /// Follow a run from after `after` (0 = from the start).
    Subscribe {
        run_id: String,
        #[serde(default)]
        after: u64,
    },
    /// Stop following a run (the run goes on).
    Unsubscribe { run_id: String },
    /// Cancel a run.
    Cancel { run_id: String },
    /// Liveness probe: the server answers `{"type":"pong"}` (browsers cannot see WebSocket pings).
    Ping,
}

/// The answer to a `user_message` that named a `request_id`: the run it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "run_accepted")]
pub struct WsRunAccepted {
    pub request_id: String,
    pub run_id: String,
    pub thread_id: String,
}

/// A WebSocket reply that is not a run event: a request the server could not carry out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "request_error")]
pub struct WsRequestError {
    pub code: ErrorCode,
    pub message: String,
    /// The run the failed request named, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The failed `user_message`'s `request_id`, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}
