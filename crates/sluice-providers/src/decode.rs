//! From provider bytes to [`ModelEvent`]s: framing (SSE or NDJSON) plus one [`Decoder`] per wire
//! protocol. Everything here is pure and synchronous, so the adapters are tested from byte streams
//! split anywhere, and nothing is held back: each message is decoded the moment its frame completes.

use sluice_protocol::ErrorCode;
use sluice_protocol::sse::SseParser;

use crate::{ModelEvent, ProviderError};

/// Whether a decoder wants more messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    More,
    /// The provider said the response is complete; anything after is ignored.
    Done,
}

/// One wire protocol's message decoder.
pub trait Decoder: Send {
    /// One SSE event (its `event` name, possibly empty, and `data`), or one NDJSON line (`event` empty).
    fn message(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError>;
    /// The body ended without the decoder saying `Done`.
    fn end(&mut self, out: &mut Vec<ModelEvent>) -> Result<(), ProviderError>;
}

/// How messages are framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Sse,
    Ndjson,
}

/// The longest NDJSON line accepted (a provider sending more without a newline is broken).
const MAX_LINE: usize = 16 * 1024 * 1024;

/// Bytes in, model events out.
pub struct ByteDecoder {
    framing: Framing,
    sse: SseParser,
    line: Vec<u8>,
    decoder: Box<dyn Decoder>,
    done: bool,
}

impl ByteDecoder {
    pub fn new(framing: Framing, decoder: Box<dyn Decoder>) -> Self {
        ByteDecoder {
            framing,
            sse: SseParser::new(),
            line: Vec::new(),
            decoder,
            done: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<ModelEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        match self.framing {
            Framing::Sse => {
                for ev in self.sse.feed(bytes) {
                    if self
                        .decoder
                        .message(&ev.event_name_or_empty(), &ev.data, out)?
                        == Flow::Done
                    {
                        self.done = true;
                        return Ok(());
                    }
                }
            }
            Framing::Ndjson => {
                let mut rest = bytes;
                while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
                    self.line.extend_from_slice(&rest[..pos]);
                    rest = &rest[pos + 1..];
                    let line = std::mem::take(&mut self.line);
                    if self.ndjson_line(&line, out)? == Flow::Done {
                        self.done = true;
                        return Ok(());
                    }
                }
                self.line.extend_from_slice(rest);
                if self.line.len() > MAX_LINE {
                    return Err(ProviderError::new(
                        ErrorCode::UpstreamError,
                        "malformed stream: an NDJSON line longer than 16 MiB",
                    ));
                }
            }
        }
        Ok(())
    }

    fn ndjson_line(
        &mut self,
        line: &[u8],
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        let text = std::str::from_utf8(line).map_err(|_| {
            ProviderError::new(
                ErrorCode::UpstreamError,
                "malformed stream: a line is not UTF-8",
            )
        })?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(Flow::More);
        }
        self.decoder.message("", text, out)
    }

    /// The body ended.
    pub fn finish(&mut self, out: &mut Vec<ModelEvent>) -> Result<(), ProviderError> {
        if self.done {
            return Ok(());
        }
        if self.framing == Framing::Ndjson && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            if self.ndjson_line(&line, out)? == Flow::Done {
                self.done = true;
                return Ok(());
            }
        }
        self.done = true;
        self.decoder.end(out)
    }
}

trait EventName {
    fn event_name_or_empty(&self) -> String;
}

impl EventName for sluice_protocol::sse::SseEvent {
    /// The parser reports `message` for frames without an `event:` line; the decoders want "".
    fn event_name_or_empty(&self) -> String {
        if self.event == "message" {
            String::new()
        } else {
            self.event.clone()
        }
    }
}

/// Parses one message's JSON, or says clearly what was wrong.
pub(crate) fn parse_json(provider: &str, data: &str) -> Result<serde_json::Value, ProviderError> {
    serde_json::from_str(data).map_err(|e| malformed(provider, data, e))
}

/// Reads one message into the decoder's typed view `T` (see `lenient`): straight from the text,
/// or, when the typed reading refuses it (a repeated key), through a `Value` (where the last of
/// the repeated keys counts), which `whole` keeps for `T` to borrow from.
pub(crate) fn read_typed<'a, T: serde::Deserialize<'a>>(
    provider: &str,
    data: &'a str,
    whole: &'a mut Option<serde_json::Value>,
) -> Result<T, ProviderError> {
    if let Ok(typed) = serde_json::from_str(data) {
        return Ok(typed);
    }
    let value = whole.insert(parse_json(provider, data)?);
    T::deserialize(&*value).map_err(|e| malformed(provider, data, e))
}

/// The error for a chunk that could not be read, naming what was wrong and where.
pub(crate) fn malformed(provider: &str, data: &str, e: impl std::fmt::Display) -> ProviderError {
    let snippet: String = data.chars().take(120).collect();
    ProviderError::new(
        ErrorCode::UpstreamError,
        format!("malformed chunk from {provider}: {e} in {snippet:?}"),
    )
}

/// Maps a provider's error type or code to a stable code.
pub(crate) fn classify(kind: &str) -> ErrorCode {
    let k = kind.to_ascii_lowercase();
    if k.contains("rate_limit") || k.contains("insufficient_quota") || k.contains("too_many") {
        ErrorCode::RateLimited
    } else if k.contains("timeout") {
        ErrorCode::UpstreamTimeout
    } else {
        ErrorCode::UpstreamError
    }
}

/// An error object as most providers send it: `{"error": {"type"|"code", "message"}}` or
/// `{"error": "message"}`.
pub(crate) fn error_from(provider: &str, v: &serde_json::Value) -> ProviderError {
    let err = v.get("error").unwrap_or(v);
    if let Some(msg) = err.as_str() {
        return ProviderError::new(ErrorCode::UpstreamError, format!("{provider}: {msg}"));
    }
    let kind = err
        .get("type")
        .and_then(|t| t.as_str())
        .or_else(|| err.get("code").and_then(|c| c.as_str()))
        .unwrap_or("error");
    let message = err
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("no message");
    ProviderError::new(classify(kind), format!("{provider} {kind}: {message}"))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Drives a decoder over a byte stream, whole and split at every offset into two reads.

    use super::*;

    pub fn decode_all(
        framing: Framing,
        make: &dyn Fn() -> Box<dyn Decoder>,
        chunks: &[&[u8]],
    ) -> (Vec<ModelEvent>, Result<(), ProviderError>) {
        let mut d = ByteDecoder::new(framing, make());
        let mut out = Vec::new();
        for c in chunks {
            if let Err(e) = d.feed(c, &mut out) {
                return (out, Err(e));
            }
        }
        let res = d.finish(&mut out);
        (out, res)
    }

    /// Decodes `bytes` whole, then split at every byte offset into two reads, and checks that every
    /// split gives the same events and the same outcome. Returns the whole-stream result.
    pub fn decode_every_split(
        framing: Framing,
        make: &dyn Fn() -> Box<dyn Decoder>,
        bytes: &[u8],
    ) -> (Vec<ModelEvent>, Result<(), ProviderError>) {
        let (whole, res) = decode_all(framing, make, &[bytes]);
        // Every offset for streams up to 8 KiB (all of our own); for the few larger recorded ones, every offset
        // next to a line break (where framing is delicate) and every 61st byte, to stay quadratic
        // in something small.
        // Beyond 64 KiB (one recorded stream), only the frame boundaries and every 997th byte.
        let offsets: Vec<usize> = if bytes.len() <= 8 * 1024 {
            (0..=bytes.len()).collect()
        } else {
            let stride = if bytes.len() <= 64 * 1024 { 61 } else { 997 };
            let near_break = |i: usize| {
                if bytes.len() <= 64 * 1024 {
                    bytes.get(i).is_some_and(|b| *b == b'\n') || (i > 0 && bytes[i - 1] == b'\n')
                } else {
                    bytes[..i].ends_with(b"\n\n")
                        || bytes[..i].ends_with(b"\n") && bytes.get(i) == Some(&b'\n')
                }
            };
            (0..=bytes.len())
                .filter(|&i| i % stride == 0 || near_break(i))
                .collect()
        };
        for i in offsets {
            let (split, split_res) = decode_all(framing, make, &[&bytes[..i], &bytes[i..]]);
            assert_eq!(split, whole, "split at byte {i}");
            assert_eq!(
                split_res.as_ref().map_err(|e| e.code),
                res.as_ref().map_err(|e| e.code),
                "outcome at split {i}"
            );
        }
        (whole, res)
    }

    /// The concatenated text, reasoning, and finished calls `(id, name, arguments)`.
    pub fn summarize(events: &[ModelEvent]) -> (String, String, Vec<(String, String, String)>) {
        let mut text = String::new();
        let mut reasoning = String::new();
        let mut calls = Vec::new();
        for e in events {
            match e {
                ModelEvent::TextDelta(t) => text.push_str(t),
                ModelEvent::ReasoningDelta(t) => reasoning.push_str(t),
                ModelEvent::FunctionCallDone {
                    call_id,
                    name,
                    arguments,
                } => calls.push((call_id.clone(), name.clone(), arguments.clone())),
                _ => {}
            }
        }
        (text, reasoning, calls)
    }

    /// Every call's streamed argument fragments concatenate to its final arguments.
    pub fn assert_fragments_match(events: &[ModelEvent]) {
        let mut acc: std::collections::HashMap<String, String> = Default::default();
        for e in events {
            match e {
                ModelEvent::FunctionCallDelta { call_id, delta, .. } => {
                    acc.entry(call_id.clone()).or_default().push_str(delta)
                }
                ModelEvent::FunctionCallDone {
                    call_id, arguments, ..
                } => {
                    let streamed = acc.get(call_id).cloned().unwrap_or_default();
                    if !streamed.is_empty() {
                        assert_eq!(&streamed, arguments, "fragments of {call_id}");
                    }
                }
                _ => {}
            }
        }
    }

    /// A conversation with every kind of turn: system, user, an assistant turn with text and two
    /// parallel tool calls, both results, and a follow-up question; and one tool.
    pub fn conversation() -> (Vec<crate::ChatMessage>, Vec<crate::ToolSpec>) {
        use crate::{ChatMessage, Role, ToolCall, ToolSpec};
        let messages = vec![
            ChatMessage::text(Role::System, "Be brief."),
            ChatMessage::text(Role::User, "Weather in Paris and Oslo?"),
            ChatMessage::assistant_calls(
                "Checking both.",
                vec![
                    ToolCall {
                        id: "call_1".into(),
                        name: "get_weather".into(),
                        arguments: "{\"city\":\"Paris\"}".into(),
                    },
                    ToolCall {
                        id: "call_2".into(),
                        name: "get_weather".into(),
                        arguments: "{\"city\":\"Oslo\"}".into(),
                    },
                ],
            ),
            ChatMessage::tool_result("call_1", "get_weather", "{\"c\":18}"),
            ChatMessage::tool_result("call_2", "get_weather", "{\"c\":9}"),
            ChatMessage::text(Role::Assistant, "Paris 18, Oslo 9."),
            ChatMessage::text(Role::User, "Thanks"),
        ];
        let tools = vec![ToolSpec {
            name: "get_weather".into(),
            description: "Current weather for a city".into(),
            parameters: serde_json::json!({"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}),
        }];
        (messages, tools)
    }

    /// The conformance fixtures beside the checkout, if present.
    pub fn fixtures(dir: &str) -> Option<Vec<(String, Vec<u8>)>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/conformance/fixtures")
            .join(dir);
        let entries = std::fs::read_dir(&path).ok()?;
        let mut files: Vec<(String, Vec<u8>)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                std::fs::read(e.path()).ok().map(|b| (name, b))
            })
            .collect();
        files.sort();
        Some(files)
    }
}
