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
pub mod http;
pub mod ollama;
pub mod openai_chat;
pub mod openai_responses;
pub mod registry;
pub mod simulator;

use std::pin::Pin;

use futures_util::Stream;
use sluice_protocol::{ErrorCode, Usage};

pub use demo::{DemoConfig, DemoModel};

/// One turn of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// What a run asks of a model.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// The model name within its provider (`demo`, `gpt-5`, …).
    pub model: String,
    /// The thread so far, oldest first, ending with the new user message.
    pub messages: Vec<ChatMessage>,
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
