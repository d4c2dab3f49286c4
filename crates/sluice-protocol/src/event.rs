//! Run events and their wire encoding.
//!
//! Every event is one JSON object `{"type":…, "run_id":…, "seq":…, …its own fields}`. The run's task
//! encodes an event exactly once, into a [`Frame`]: the complete SSE frame
//! (`id: <seq>\nevent: <type>\ndata: <json>\n\n`) in one shared [`Bytes`] buffer, whose `data` slice is
//! also the WebSocket text. Subscribers, the store writer and the metrics all share that buffer;
//! nothing on the hot path serializes an event a second time.
//!
//! Text and reasoning deltas are written by hand (they are nearly every event of a run) and remember
//! where their escaped `delta` string lies in the buffer, so that adjacent deltas can be merged for a
//! lagging subscriber by concatenating escaped bytes, without decoding or re-escaping.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::ErrorInfo;

/// Token counts as the model reports them. Absent counts are zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// The fields of each event type. `type` is the tag; `run_id` and `seq` are added by [`Frame::encode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    RunStarted {
        thread_id: String,
        message_id: String,
        model: String,
    },
    ReasoningDelta {
        delta: String,
    },
    ReasoningDone {},
    TextDelta {
        delta: String,
    },
    TextDone {},
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
    ToolExecutionStarted {
        call_id: String,
        tool_name: String,
    },
    ToolExecutionProgress {
        call_id: String,
        tool_name: String,
        step: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fraction: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    ToolExecutionCompleted {
        call_id: String,
        tool_name: String,
        #[serde(default)]
        result: serde_json::Value,
    },
    ToolExecutionFailed {
        call_id: String,
        tool_name: String,
        error: ErrorInfo,
    },
    ArtifactIntermediate {
        artifact: serde_json::Value,
    },
    ArtifactFinal {
        artifact: serde_json::Value,
    },
    Usage {
        usage: Usage,
    },
    Error {
        error: ErrorInfo,
    },
    RunCompleted {
        usage: Usage,
        /// Milliseconds from the run's acceptance to its first text or reasoning token.
        #[serde(default)]
        time_to_first_token_ms: Option<f64>,
        duration_ms: f64,
        /// Why the model stopped, in the provider's words (`stop`, `length`, `end_turn`, …).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stop_reason: Option<String>,
    },
    RunFailed {
        error: ErrorInfo,
    },
    RunCancelled {
        reason: String,
    },
    RunInterrupted {
        reason: String,
        /// The last `seq` the store held when the run was interrupted by a crash; see docs/protocol.md.
        durable_seq: u64,
    },
    /// An event type this build does not know (a newer server): clients skip it.
    #[serde(other)]
    Unknown,
}

/// The event types, for cheap matching, metrics labels and the store's `type` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    RunStarted,
    ReasoningDelta,
    ReasoningDone,
    TextDelta,
    TextDone,
    FunctionCallDelta,
    FunctionCallDone,
    ToolExecutionStarted,
    ToolExecutionProgress,
    ToolExecutionCompleted,
    ToolExecutionFailed,
    ArtifactIntermediate,
    ArtifactFinal,
    Usage,
    Error,
    RunCompleted,
    RunFailed,
    RunCancelled,
    RunInterrupted,
    Unknown,
}

impl EventKind {
    /// Every kind, in a fixed order (used to index per-kind metrics).
    pub const ALL: [EventKind; 20] = [
        EventKind::RunStarted,
        EventKind::ReasoningDelta,
        EventKind::ReasoningDone,
        EventKind::TextDelta,
        EventKind::TextDone,
        EventKind::FunctionCallDelta,
        EventKind::FunctionCallDone,
        EventKind::ToolExecutionStarted,
        EventKind::ToolExecutionProgress,
        EventKind::ToolExecutionCompleted,
        EventKind::ToolExecutionFailed,
        EventKind::ArtifactIntermediate,
        EventKind::ArtifactFinal,
        EventKind::Usage,
        EventKind::Error,
        EventKind::RunCompleted,
        EventKind::RunFailed,
        EventKind::RunCancelled,
        EventKind::RunInterrupted,
        EventKind::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::RunStarted => "run_started",
            EventKind::ReasoningDelta => "reasoning_delta",
            EventKind::ReasoningDone => "reasoning_done",
            EventKind::TextDelta => "text_delta",
            EventKind::TextDone => "text_done",
            EventKind::FunctionCallDelta => "function_call_delta",
            EventKind::FunctionCallDone => "function_call_done",
            EventKind::ToolExecutionStarted => "tool_execution_started",
            EventKind::ToolExecutionProgress => "tool_execution_progress",
            EventKind::ToolExecutionCompleted => "tool_execution_completed",
            EventKind::ToolExecutionFailed => "tool_execution_failed",
            EventKind::ArtifactIntermediate => "artifact_intermediate",
            EventKind::ArtifactFinal => "artifact_final",
            EventKind::Usage => "usage",
            EventKind::Error => "error",
            EventKind::RunCompleted => "run_completed",
            EventKind::RunFailed => "run_failed",
            EventKind::RunCancelled => "run_cancelled",
            EventKind::RunInterrupted => "run_interrupted",
            EventKind::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> EventKind {
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or(EventKind::Unknown)
    }

    /// Position in [`EventKind::ALL`].
    pub fn index(self) -> usize {
        // A fieldless enum whose variants are listed in `ALL` in declaration order.
        self as usize
    }

    /// The four endings of a run; exactly one closes every run's log.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::RunCompleted
                | EventKind::RunFailed
                | EventKind::RunCancelled
                | EventKind::RunInterrupted
        )
    }

    /// Text and reasoning deltas: the only events that may be merged for a lagging subscriber.
    pub fn is_mergeable_delta(self) -> bool {
        matches!(self, EventKind::TextDelta | EventKind::ReasoningDelta)
    }
}

impl EventBody {
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::RunStarted { .. } => EventKind::RunStarted,
            EventBody::ReasoningDelta { .. } => EventKind::ReasoningDelta,
            EventBody::ReasoningDone {} => EventKind::ReasoningDone,
            EventBody::TextDelta { .. } => EventKind::TextDelta,
            EventBody::TextDone {} => EventKind::TextDone,
            EventBody::FunctionCallDelta { .. } => EventKind::FunctionCallDelta,
            EventBody::FunctionCallDone { .. } => EventKind::FunctionCallDone,
            EventBody::ToolExecutionStarted { .. } => EventKind::ToolExecutionStarted,
            EventBody::ToolExecutionProgress { .. } => EventKind::ToolExecutionProgress,
            EventBody::ToolExecutionCompleted { .. } => EventKind::ToolExecutionCompleted,
            EventBody::ToolExecutionFailed { .. } => EventKind::ToolExecutionFailed,
            EventBody::ArtifactIntermediate { .. } => EventKind::ArtifactIntermediate,
            EventBody::ArtifactFinal { .. } => EventKind::ArtifactFinal,
            EventBody::Usage { .. } => EventKind::Usage,
            EventBody::Error { .. } => EventKind::Error,
            EventBody::RunCompleted { .. } => EventKind::RunCompleted,
            EventBody::RunFailed { .. } => EventKind::RunFailed,
            EventBody::RunCancelled { .. } => EventKind::RunCancelled,
            EventBody::RunInterrupted { .. } => EventKind::RunInterrupted,
            EventBody::Unknown => EventKind::Unknown,
        }
    }
}

/// An event as a client reads it back: the common fields plus the typed body.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WireEvent {
    pub run_id: String,
    pub seq: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

/// A resume position: the `seq` of the last event a client has, and the stream epoch it came from.
/// Written `<seq>` in epoch 1 and `<seq>.<epoch>` after; it is what SSE `id:` lines carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub seq: u64,
    pub epoch: u32,
}

impl Cursor {
    pub fn new(seq: u64) -> Self {
        Cursor { seq, epoch: 1 }
    }

    /// Parses `<seq>` or `<seq>.<epoch>`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Cursor> {
        let s = s.trim();
        let (seq, epoch) = match s.split_once('.') {
            Some((seq, epoch)) => (seq, epoch.parse::<u32>().ok().filter(|e| *e >= 1)?),
            None => (s, 1),
        };
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Cursor {
            seq: seq.parse().ok()?,
            epoch,
        })
    }
}

/// One encoded event, shared by every subscriber. Cloning is a reference-count increment.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The whole SSE frame, `id: …\nevent: …\ndata: {json}\n\n`.
    bytes: Bytes,
    seq: u64,
    kind: EventKind,
    /// Where the JSON object lies in `bytes`.
    json: (u32, u32),
    /// For text and reasoning deltas: where the *contents* of the escaped `delta` string lie
    /// (between its quotes). `(0, 0)` for other events.
    delta: (u32, u32),
}

const DELTA_KEY: &[u8] = b",\"delta\":\"";

impl Frame {
    /// Encodes `body` as event `seq` of run `run_id`.
    pub fn encode(run_id: &str, seq: u64, body: &EventBody) -> Frame {
        Frame::encode_in_epoch(run_id, seq, 1, body)
    }

    /// Encodes an event written in a later stream epoch (after crash recovery): its SSE `id` is
    /// `<seq>.<epoch>` so a client holding a cursor from before the crash can be told apart.
    pub fn encode_in_epoch(run_id: &str, seq: u64, epoch: u32, body: &EventBody) -> Frame {
        match body {
            EventBody::TextDelta { delta } | EventBody::ReasoningDelta { delta } => {
                // Escaped straight into the frame: one allocation per token.
                Frame::delta_frame(run_id, seq, body.kind(), delta.len(), |buf| {
                    // Writing a &str into memory cannot fail.
                    let _ = serde_json::to_writer(buf.writer(), delta.as_str());
                })
            }
            _ => {
                // serde_json writes an internally tagged enum with the tag first:
                // `{"type":"name"` followed by `,` or `}`. The common fields go right after the tag.
                let body_json = match serde_json::to_vec(body) {
                    Ok(v) => v,
                    // Serializing these plain types cannot fail (no maps with non-string keys,
                    // no failing Serialize impls); keep a well-formed frame all the same.
                    Err(_) => format!("{{\"type\":\"{}\"}}", body.kind().as_str()).into_bytes(),
                };
                let kind = body.kind();
                let tag_len = "{\"type\":\"\"".len() + kind.as_str().len();
                let mut buf = BytesMut::with_capacity(body_json.len() + run_id.len() + 64);
                let json_start = write_header(&mut buf, seq, epoch, kind);
                buf.put_slice(&body_json[..tag_len.min(body_json.len())]);
                write_common(&mut buf, run_id, seq);
                buf.put_slice(&body_json[tag_len.min(body_json.len())..]);
                let json_end = buf.len();
                buf.put_slice(b"\n\n");
                Frame {
                    bytes: buf.freeze(),
                    seq,
                    kind,
                    json: (json_start as u32, json_end as u32),
                    delta: (0, 0),
                }
            }
        }
    }

    /// Builds a text or reasoning delta; `literal` writes the `delta` value, a complete JSON string
    /// literal (quotes included), whose contents the frame then remembers.
    fn delta_frame(
        run_id: &str,
        seq: u64,
        kind: EventKind,
        len_hint: usize,
        literal: impl FnOnce(&mut BytesMut),
    ) -> Frame {
        let mut buf = BytesMut::with_capacity(len_hint + run_id.len() + 96);
        let json_start = write_header(&mut buf, seq, 1, kind);
        buf.put_slice(b"{\"type\":\"");
        buf.put_slice(kind.as_str().as_bytes());
        buf.put_u8(b'"');
        write_common(&mut buf, run_id, seq);
        buf.put_slice(&DELTA_KEY[..DELTA_KEY.len() - 1]);
        let literal_start = buf.len();
        literal(&mut buf);
        let literal_end = buf.len();
        buf.put_u8(b'}');
        let json_end = buf.len();
        buf.put_slice(b"\n\n");
        Frame {
            bytes: buf.freeze(),
            seq,
            kind,
            json: (json_start as u32, json_end as u32),
            // Between the literal's quotes.
            delta: (literal_start as u32 + 1, literal_end as u32 - 1),
        }
    }

    /// Rebuilds a frame from a stored JSON object (replay from the store).
    pub fn from_json(seq: u64, epoch: u32, kind: EventKind, json: &[u8]) -> Frame {
        let mut buf = BytesMut::with_capacity(json.len() + 48);
        let json_start = write_header(&mut buf, seq, epoch, kind);
        buf.put_slice(json);
        let json_end = buf.len();
        buf.put_slice(b"\n\n");
        let mut delta = (0, 0);
        if kind.is_mergeable_delta()
            && let Some(pos) = find(json, DELTA_KEY)
            && json.len() >= pos + DELTA_KEY.len() + 2
        {
            // The delta is the last field: its contents end before the closing `"}`.
            let start = json_start + pos + DELTA_KEY.len();
            delta = (start as u32, (json_start + json.len() - 2) as u32);
        }
        Frame {
            bytes: buf.freeze(),
            seq,
            kind,
            json: (json_start as u32, json_end as u32),
            delta,
        }
    }

    /// Merges adjacent deltas of one kind into one frame that carries the `seq` of the last part,
    /// so a client that resumes from it skips exactly the merged events. Returns `None` when the
    /// frames are not all deltas of the same kind.
    pub fn merge_deltas(run_id: &str, frames: &[Frame]) -> Option<Frame> {
        let first = frames.first()?;
        let last = frames.last()?;
        if frames.len() == 1 {
            return Some(first.clone());
        }
        let kind = first.kind;
        if !kind.is_mergeable_delta() || frames.iter().any(|f| f.kind != kind || f.delta.1 == 0) {
            return None;
        }
        let len: usize = frames.iter().map(Frame::delta_len).sum();
        Some(Frame::delta_frame(run_id, last.seq, kind, len, |buf| {
            buf.put_u8(b'"');
            for f in frames {
                buf.put_slice(f.escaped_delta());
            }
            buf.put_u8(b'"');
        }))
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn kind(&self) -> EventKind {
        self.kind
    }

    /// The complete SSE frame.
    pub fn sse(&self) -> &Bytes {
        &self.bytes
    }

    /// The JSON object alone: the WebSocket text and the stored form. Shares the SSE buffer.
    pub fn json(&self) -> Bytes {
        self.bytes.slice(self.json.0 as usize..self.json.1 as usize)
    }

    /// The escaped contents of a delta's string (empty for other events).
    pub fn escaped_delta(&self) -> &[u8] {
        &self.bytes[self.delta.0 as usize..self.delta.1 as usize]
    }

    /// Length in bytes of the escaped delta contents, for coalescing limits.
    pub fn delta_len(&self) -> usize {
        (self.delta.1 - self.delta.0) as usize
    }

    /// The decoded text of a text or reasoning delta.
    pub fn delta_text(&self) -> Option<String> {
        if !self.kind.is_mergeable_delta() || self.delta.1 == 0 {
            return None;
        }
        // Re-include the quotes around the escaped contents and let serde_json unescape.
        let quoted = &self.bytes[self.delta.0 as usize - 1..self.delta.1 as usize + 1];
        serde_json::from_slice(quoted).ok()
    }

    /// Decodes the frame back into typed form (tests, the client, the store's reads).
    pub fn decode(&self) -> Result<WireEvent, serde_json::Error> {
        serde_json::from_slice(&self.bytes[self.json.0 as usize..self.json.1 as usize])
    }
}

fn write_header(buf: &mut BytesMut, seq: u64, epoch: u32, kind: EventKind) -> usize {
    buf.put_slice(b"id: ");
    put_u64(buf, seq);
    if epoch > 1 {
        buf.put_u8(b'.');
        put_u64(buf, u64::from(epoch));
    }
    buf.put_slice(b"\nevent: ");
    buf.put_slice(kind.as_str().as_bytes());
    buf.put_slice(b"\ndata: ");
    buf.len()
}

fn write_common(buf: &mut BytesMut, run_id: &str, seq: u64) {
    buf.put_slice(b",\"run_id\":");
    buf.put_slice(&escape_quoted(run_id));
    buf.put_slice(b",\"seq\":");
    put_u64(buf, seq);
}

fn put_u64(buf: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.put_slice(&digits[i..]);
}

/// A JSON string literal, quotes included.
fn escape_quoted(s: &str) -> Vec<u8> {
    // Serializing a &str into a Vec cannot fail.
    serde_json::to_vec(s).unwrap_or_else(|_| b"\"\"".to_vec())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn sample_bodies() -> Vec<EventBody> {
        vec![
            EventBody::RunStarted {
                thread_id: "t1".into(),
                message_id: "m1".into(),
                model: "demo".into(),
            },
            EventBody::ReasoningDelta {
                delta: "think \"hard\"\n".into(),
            },
            EventBody::ReasoningDone {},
            EventBody::TextDelta {
                delta: "héllo ✔ \u{1F600}\t".into(),
            },
            EventBody::TextDone {},
            EventBody::ToolExecutionProgress {
                call_id: "c".into(),
                tool_name: "t".into(),
                step: "s".into(),
                fraction: Some(0.5),
                message: None,
            },
            EventBody::Error {
                error: ErrorInfo::new(ErrorCode::RateLimited, "slow down"),
            },
            EventBody::RunCompleted {
                usage: Usage::default(),
                time_to_first_token_ms: Some(1.5),
                duration_ms: 10.0,
                stop_reason: Some("stop".into()),
            },
            EventBody::RunInterrupted {
                reason: "crash".into(),
                durable_seq: 7,
            },
        ]
    }

    #[test]
    fn every_event_round_trips_with_common_fields_and_sse_framing() {
        for (i, body) in sample_bodies().into_iter().enumerate() {
            let seq = i as u64 + 1;
            let frame = Frame::encode("run-1", seq, &body);
            let decoded = frame.decode().expect("valid json");
            assert_eq!(decoded.run_id, "run-1");
            assert_eq!(decoded.seq, seq);
            assert_eq!(decoded.body, body);
            let text = std::str::from_utf8(frame.sse()).expect("utf8");
            let expected_head = format!(
                "id: {seq}\nevent: {}\ndata: {{\"type\":\"{}\",\"run_id\":\"run-1\",\"seq\":{seq}",
                body.kind().as_str(),
                body.kind().as_str()
            );
            assert!(text.starts_with(&expected_head), "{text}");
            assert!(text.ends_with("}\n\n"));
            assert_eq!(
                text.matches('\n').count(),
                4,
                "data must be one line: {text}"
            );
        }
    }

    #[test]
    fn stored_json_rebuilds_the_same_frame() {
        for (i, body) in sample_bodies().into_iter().enumerate() {
            let frame = Frame::encode("r", i as u64 + 1, &body);
            let rebuilt = Frame::from_json(frame.seq(), 1, frame.kind(), &frame.json());
            assert_eq!(rebuilt.sse(), frame.sse());
            assert_eq!(rebuilt.escaped_delta(), frame.escaped_delta());
        }
    }

    #[test]
    fn merged_deltas_concatenate_text_and_keep_last_seq() {
        let parts = ["a\"b", "\n", "ü✔", " end"];
        let frames: Vec<Frame> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Frame::encode(
                    "r",
                    10 + i as u64,
                    &EventBody::TextDelta { delta: (*p).into() },
                )
            })
            .collect();
        let merged = Frame::merge_deltas("r", &frames).expect("mergeable");
        assert_eq!(merged.seq(), 13);
        assert_eq!(
            merged.delta_text().as_deref(),
            Some(parts.concat().as_str())
        );
        assert_eq!(
            merged.decode().expect("json").body,
            EventBody::TextDelta {
                delta: parts.concat()
            }
        );
        let mixed = [
            frames[0].clone(),
            Frame::encode("r", 20, &EventBody::ReasoningDelta { delta: "x".into() }),
        ];
        assert!(Frame::merge_deltas("r", &mixed).is_none());
    }

    #[test]
    fn later_epochs_mark_the_sse_id() {
        let body = EventBody::RunInterrupted {
            reason: "crash".into(),
            durable_seq: 4,
        };
        let frame = Frame::encode_in_epoch("r", 5, 2, &body);
        assert!(
            frame
                .sse()
                .starts_with(b"id: 5.2\nevent: run_interrupted\n")
        );
        assert_eq!(
            Frame::from_json(5, 2, frame.kind(), &frame.json()).sse(),
            frame.sse()
        );
        assert_eq!(frame.decode().expect("json").seq, 5);
    }

    #[test]
    fn cursors_parse_with_and_without_epoch() {
        assert_eq!(Cursor::parse("12"), Some(Cursor { seq: 12, epoch: 1 }));
        assert_eq!(Cursor::parse("12.2"), Some(Cursor { seq: 12, epoch: 2 }));
        for bad in [
            "",
            "-1",
            "1.0",
            "x",
            "1.x",
            "1e3",
            "99999999999999999999999",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn kind_index_is_the_position_in_all() {
        for (i, k) in EventKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
    }

    #[test]
    fn unknown_event_types_decode_as_unknown() {
        let e: WireEvent =
            serde_json::from_str(r#"{"type":"brand_new","run_id":"r","seq":3,"x":1}"#).expect("ok");
        assert_eq!(e.body, EventBody::Unknown);
        assert_eq!(EventKind::parse("brand_new"), EventKind::Unknown);
        assert_eq!(EventKind::parse("text_delta"), EventKind::TextDelta);
    }
}
