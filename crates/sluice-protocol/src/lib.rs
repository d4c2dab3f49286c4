//! Sluice's wire types: the only crate that decides what goes on the wire.
//!
//! `event` holds the run event vocabulary and its encoding into shared wire bytes
//! (one SSE frame per event, whose `data` slice is also the WebSocket text).
//! `api` holds the HTTP request and response bodies, `error` the stable error codes, and `sse` a
//! WHATWG-exact server-sent-events parser (pure; used by the client and the provider adapters).
//! No IO and no async here: the engine, the server and the client all build on these types.

pub mod api;
pub mod error;
pub mod event;
pub mod sse;

pub use error::{ErrorCode, ErrorInfo};
pub use event::{Cursor, EventBody, EventKind, Frame, Usage, WireEvent};
