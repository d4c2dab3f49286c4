//! Model providers behind one streaming trait.
//!
//! A [`Model`] turns a conversation into a stream of [`ModelEvent`]s as the provider produces them.
//! The engine maps each one to a protocol event the moment it arrives. Cancellation is dropping the
//! stream: an implementation must release its upstream request when dropped.
//!
//! `demo` is the built-in deterministic model that makes Sluice useful with no provider configured.

pub mod anthropic;
pub mod decode;
pub mod demo;
pub mod h1;
pub mod http;
mod lenient;
pub mod ollama;
pub mod openai_chat;
pub mod openai_responses;
pub mod registry;
pub mod simulator;

use std::pin::Pin;

use futures_util::Stream;
use sluice_protocol::{ErrorCode, Usage};

pub use demo::{DemoConfig, DemoModel};

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, answering one of the assistant's calls.
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// A function call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (JSON text).
    pub arguments: String,
}

/// One turn of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    /// The text (for a tool message: its result, usually JSON).
    pub content: String,
    /// For an assistant message: the calls it made.
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the call it answers, and that call's tool.
    pub tool_call_id: Option<String>,
    pub tool_name: Option<String>,
}

impl ChatMessage {
    /// A plain text message.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            tool_name: None,
        }
    }

    /// An assistant turn that called tools (with whatever text came before the calls).
    pub fn assistant_calls(content: impl Into<String>, calls: Vec<ToolCall>) -> Self {
        ChatMessage {
            tool_calls: calls,
            ..ChatMessage::text(Role::Assistant, content)
        }
    }

    /// A tool's result.
    pub fn tool_result(
        call_id: impl Into<String>,
        tool: impl Into<String>,
        result: impl Into<String>,
    ) -> Self {
        ChatMessage {
            tool_call_id: Some(call_id.into()),
            tool_name: Some(tool.into()),
            ..ChatMessage::text(Role::Tool, result)
        }
    }
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub parameters: serde_json::Value,
}

/// What a run asks of a model.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// The model name within its provider (`demo`, `gpt-5`, …).
    pub model: String,
    /// The thread so far, oldest first, ending with the new user message (or tool results).
    pub messages: Vec<ChatMessage>,
    /// The tools the model may call (shared: every run of an agent offers the same list).
    pub tools: std::sync::Arc<[ToolSpec]>,
}

/// Tools in the `{"type":"function","function":{name, description, parameters}}` form that Chat
/// Completions and Ollama share.
pub(crate) fn function_tools(tools: &[ToolSpec]) -> serde_json::Value {
    tools
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
            })
        })
        .collect()
}

/// A request body as JSON text. Serializing cannot fail for the bodies built here (string keys
/// only, no custom serializers); were it to, the empty body is refused by the provider with a
/// clear error rather than panicking here.
pub(crate) fn json(body: &impl serde::Serialize) -> String {
    serde_json::to_string(body).unwrap_or_default()
}

/// Parses a call's arguments for the providers that want a JSON object rather than text;
/// unparseable arguments are sent as an empty object (the model's own text is still in the history).
pub(crate) fn arguments_object(arguments: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(arguments) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => serde_json::Value::Object(Default::default()),
    }
}

/// A piece of model output, in the order the provider produced it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    ReasoningDelta(String),
    ReasoningDone,
    TextDelta(String),
    TextDone,
    FunctionCallDelta {
        call_id: String,
        name: String,
        delta: String,
    },
    FunctionCallDone {
        call_id: String,
        name: String,
        arguments: String,
    },
    Usage(Usage),
    /// Why the model stopped, in the provider's words (`stop`, `length`, `tool_calls`, `end_turn`…).
    StopReason(String),
}

/// A provider failure, classified for the protocol's stable codes.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProviderError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProviderError {
            code,
            message: message.into(),
        }
    }
}

pub type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelEvent, ProviderError>> + Send>>;

/// A model that streams. Implementations are cheap to share (`Arc<dyn Model>`).
pub trait Model: Send + Sync + 'static {
    /// Starts the request. Nothing is awaited here: connection and errors surface in the stream.
    fn stream(&self, request: ModelRequest) -> ModelStream;
}
