//! Anthropic Messages streaming (`POST /v1/messages`, `stream: true`).
//!
//! `message_start` (input usage), then content blocks by `index`: `content_block_start` names the
//! block (`text`, `thinking`, `tool_use`, `server_tool_use`, `redacted_thinking`),
//! `content_block_delta` carries `text_delta`, `thinking_delta`, `signature_delta` or
//! `input_json_delta`, `content_block_stop` closes it; `message_delta` carries the stop reason and
//! the output usage; `message_stop` ends. `ping` keeps the connection alive; `event: error` (such as
//! `overloaded_error`) ends the stream with an error.

use std::collections::HashMap;

use sluice_protocol::{ErrorCode, Usage};

use serde::{Deserialize, Serialize};

use crate::decode::{Decoder, Flow, error_from, parse_json, read_typed};
use crate::lenient::{Num, Obj, Str};
use crate::{ChatMessage, ModelEvent, ProviderError, Role, ToolSpec};

#[derive(Debug)]
enum Block {
    Text,
    Thinking,
    Tool {
        id: String,
        name: String,
        input: String,
    },
    Other,
}

#[derive(Debug, Default)]
pub struct AnthropicDecoder {
    blocks: HashMap<u64, Block>,
    usage: Usage,
    stop_reason: Option<String>,
}

/// The fields of an event the decoder reads; the rest are skipped unread.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Str<'a>,
    #[serde(default)]
    index: Num,
    #[serde(default)]
    message: Obj<MessageStart>,
    #[serde(default, borrow)]
    content_block: Obj<ContentBlock<'a>>,
    #[serde(default, borrow)]
    delta: Obj<Delta<'a>>,
    #[serde(default)]
    usage: Obj<AnthropicUsage>,
}

#[derive(Deserialize)]
struct MessageStart {
    #[serde(default)]
    usage: Obj<AnthropicUsage>,
}

#[derive(Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Num,
    #[serde(default)]
    cache_creation_input_tokens: Num,
    #[serde(default)]
    cache_read_input_tokens: Num,
    #[serde(default)]
    output_tokens: Num,
}

#[derive(Deserialize)]
struct ContentBlock<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Str<'a>,
    #[serde(default, borrow)]
    text: Str<'a>,
    #[serde(default, borrow)]
    id: Str<'a>,
    #[serde(default, borrow)]
    name: Str<'a>,
}

/// A content block's delta (`text_delta`, `thinking_delta`, `input_json_delta`, …) or the
/// message's (`stop_reason`).
#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Str<'a>,
    #[serde(default, borrow)]
    text: Str<'a>,
    #[serde(default, borrow)]
    thinking: Str<'a>,
    #[serde(default, borrow)]
    partial_json: Str<'a>,
    #[serde(default, borrow)]
    stop_reason: Str<'a>,
}

impl Decoder for AnthropicDecoder {
    fn message(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        let mut whole = None;
        let v = read_typed("Anthropic", data, &mut whole)?;
        self.event(v, event, data, out)
    }

    fn end(&mut self, out: &mut Vec<ModelEvent>) -> Result<(), ProviderError> {
        // A stop reason (message_delta) means the message is complete even if the connection
        // closed before message_stop was dispatched.
        if self.stop_reason.is_some() {
            self.finish(out);
            return Ok(());
        }
        Err(ProviderError::new(
            ErrorCode::UpstreamError,
            "the Anthropic stream ended before message_stop",
        ))
    }
}

impl AnthropicDecoder {
    fn event(
        &mut self,
        v: Event<'_>,
        event: &str,
        data: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        let kind = v.kind.get().unwrap_or(event);
        let index = v.index.or0();
        match kind {
            "message_start" => {
                if let Some(u) = v.message.0.and_then(|m| m.usage.0) {
                    self.usage.input_tokens = u.input_tokens.or0()
                        + u.cache_creation_input_tokens.or0()
                        + u.cache_read_input_tokens.or0();
                    self.usage.output_tokens = u.output_tokens.or0();
                }
            }
            "content_block_start" => {
                let block = v.content_block.0;
                let b = match block.as_ref().and_then(|b| b.kind.get()) {
                    Some("text") => {
                        if let Some(t) = block.as_ref().and_then(|b| b.text.get()) {
                            out.push(ModelEvent::TextDelta(t.to_string()));
                        }
                        Block::Text
                    }
                    Some("thinking") => Block::Thinking,
                    Some("tool_use") | Some("server_tool_use") => Block::Tool {
                        id: block
                            .as_ref()
                            .and_then(|b| b.id.get())
                            .unwrap_or_default()
                            .to_string(),
                        name: block
                            .as_ref()
                            .and_then(|b| b.name.get())
                            .unwrap_or_default()
                            .to_string(),
                        input: String::new(),
                    },
                    _ => Block::Other,
                };
                self.blocks.insert(index, b);
            }
            "content_block_delta" => {
                let Some(delta) = v.delta.0 else {
                    return Ok(Flow::More);
                };
                match (delta.kind.get(), self.blocks.get_mut(&index)) {
                    (Some("text_delta"), _) => {
                        if let Some(t) = delta.text.get() {
                            out.push(ModelEvent::TextDelta(t.to_string()));
                        }
                    }
                    (Some("thinking_delta"), _) => {
                        if let Some(t) = delta.thinking.get() {
                            out.push(ModelEvent::ReasoningDelta(t.to_string()));
                        }
                    }
                    (Some("input_json_delta"), Some(Block::Tool { id, name, input })) => {
                        if let Some(p) = delta.partial_json.get() {
                            input.push_str(p);
                            out.push(ModelEvent::FunctionCallDelta {
                                call_id: id.clone(),
                                name: name.clone(),
                                delta: p.to_string(),
                            });
                        }
                    }
                    // signature_delta (kept by the provider for multi-turn thinking), citations…
                    _ => {}
                }
            }
            "content_block_stop" => match self.blocks.remove(&index) {
                Some(Block::Text) => out.push(ModelEvent::TextDone),
                Some(Block::Thinking) => out.push(ModelEvent::ReasoningDone),
                Some(Block::Tool { id, name, input }) => out.push(ModelEvent::FunctionCallDone {
                    call_id: id,
                    name,
                    arguments: if input.is_empty() { "{}".into() } else { input },
                }),
                _ => {}
            },
            "message_delta" => {
                if let Some(r) = v.delta.0.as_ref().and_then(|d| d.stop_reason.get()) {
                    self.stop_reason = Some(r.to_string());
                }
                if let Some(u) = v.usage.0 {
                    let output = u.output_tokens.or0();
                    if output > 0 {
                        self.usage.output_tokens = output;
                    }
                }
            }
            "message_stop" => {
                self.finish(out);
                return Ok(Flow::Done);
            }
            // Rare: the error object is read whole.
            "error" => return Err(error_from("Anthropic", &parse_json("Anthropic", data)?)),
            _ => {}
        }
        Ok(Flow::More)
    }

    fn finish(&mut self, out: &mut Vec<ModelEvent>) {
        self.usage.total_tokens = self.usage.input_tokens + self.usage.output_tokens;
        out.push(ModelEvent::Usage(self.usage));
        if let Some(r) = self.stop_reason.take() {
            out.push(ModelEvent::StopReason(r));
        }
    }
}

/// The request body. System messages go in `system`; an assistant's tool calls become `tool_use`
/// blocks (input as a JSON object) and tool results `tool_result` blocks in a user turn (adjacent
/// results share one turn, as the API requires alternating roles); tools use `input_schema`.
pub fn request_body<'a>(
    model: &'a str,
    messages: &'a [ChatMessage],
    tools: &[ToolSpec],
    max_tokens: u32,
) -> RequestBody<'a> {
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let mut msgs: Vec<OutMessage<'a>> = Vec::new();
    for m in messages.iter().filter(|m| m.role != Role::System) {
        match m.role {
            Role::Tool => {
                let block = OutBlock::ToolResult {
                    tool_use_id: m.tool_call_id.as_deref(),
                    content: &m.content,
                };
                // Results of one turn's calls go together in one user message.
                match msgs.last_mut() {
                    Some(OutMessage {
                        role: "user",
                        content: OutContent::Blocks(blocks),
                    }) if blocks
                        .iter()
                        .all(|b| matches!(b, OutBlock::ToolResult { .. })) =>
                    {
                        blocks.push(block)
                    }
                    _ => msgs.push(OutMessage {
                        role: "user",
                        content: OutContent::Blocks(vec![block]),
                    }),
                }
            }
            Role::Assistant if !m.tool_calls.is_empty() => {
                let mut blocks = Vec::new();
                if !m.content.is_empty() {
                    blocks.push(OutBlock::Text { text: &m.content });
                }
                for c in &m.tool_calls {
                    blocks.push(OutBlock::ToolUse {
                        id: &c.id,
                        name: &c.name,
                        input: crate::arguments_object(&c.arguments),
                    });
                }
                msgs.push(OutMessage {
                    role: "assistant",
                    content: OutContent::Blocks(blocks),
                });
            }
            role => msgs.push(OutMessage {
                role: role.as_str(),
                content: OutContent::Text(&m.content),
            }),
        }
    }
    RequestBody {
        model,
        max_tokens,
        messages: msgs,
        stream: true,
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        tools: (!tools.is_empty()).then(|| tools_json(tools)),
    }
}

/// A Messages API request body, written straight to JSON.
#[derive(Serialize)]
pub struct RequestBody<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<OutMessage<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: OutContent<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutContent<'a> {
    Text(&'a str),
    Blocks(Vec<OutBlock<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutBlock<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: serde_json::Value,
    },
    ToolResult {
        tool_use_id: Option<&'a str>,
        content: &'a str,
    },
}

/// The request's `tools`.
pub fn tools_json(tools: &[ToolSpec]) -> serde_json::Value {
    tools
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Framing;
    use crate::decode::testing::*;

    fn make() -> Box<dyn Decoder> {
        Box::new(AnthropicDecoder::default())
    }

    /// Written from the Messages streaming reference: thinking with a signature, text, a tool_use
    /// block whose input arrives as input_json_delta fragments, ping, an unknown event type, and
    /// message_delta usage with the stop reason.
    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Need the weather.\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBCgIYAhIM\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Let me \"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"check.\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: brand_new_event\ndata: {\"type\":\"brand_new_event\",\"x\":1}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"location\\\": \\\"San Fra\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"ncisco, CA\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    #[test]
    fn thinking_text_tool_use_and_usage_at_every_split() {
        let (events, res) = decode_every_split(Framing::Sse, &make, STREAM.as_bytes());
        res.expect("ok");
        let (text, reasoning, calls) = summarize(&events);
        assert_eq!(reasoning, "Need the weather.");
        assert_eq!(text, "Let me check.");
        assert_eq!(
            calls,
            vec![(
                "toolu_1".into(),
                "get_weather".into(),
                "{\"location\": \"San Francisco, CA\"}".into()
            )]
        );
        assert_fragments_match(&events);
        assert!(events.contains(&ModelEvent::Usage(Usage {
            input_tokens: 25,
            output_tokens: 89,
            reasoning_tokens: 0,
            total_tokens: 114
        })));
        assert_eq!(
            events.last(),
            Some(&ModelEvent::StopReason("tool_use".into()))
        );
    }

    #[test]
    fn overloaded_error_event_ends_with_a_retryable_error() {
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Par\"}}\n\n",
            "event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n",
        );
        let (events, res) = decode_every_split(Framing::Sse, &make, s.as_bytes());
        assert_eq!(summarize(&events).0, "Par");
        let e = res.expect_err("error");
        assert_eq!(e.code, ErrorCode::UpstreamError);
        assert!(
            e.code.retryable() && e.message.contains("overloaded_error"),
            "{}",
            e.message
        );
    }

    /// Fields of unexpected types read as absent, a repeated key counts once (the last), escaped
    /// text is unescaped: the event is read, not refused.
    #[test]
    fn odd_but_readable_events_are_read_not_refused() {
        let odd = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":\"9\",\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":5}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Caf\\u00e9 \\\"x\\\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"first\",\"text\":\" last\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":[\"not\",\"an object\"]}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":4}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        let (events, res) = decode_every_split(Framing::Sse, &make, odd.as_bytes());
        res.expect("odd events decode");
        assert_eq!(summarize(&events).0, "Caf\u{e9} \"x\" last");
        assert!(
            events.contains(&ModelEvent::Usage(Usage {
                input_tokens: 0,
                output_tokens: 4,
                reasoning_tokens: 0,
                total_tokens: 4,
            })),
            "{events:?}"
        );
    }

    #[test]
    fn conformance_fixtures() {
        let Some(files) = fixtures("anthropic") else {
            eprintln!("skipped: shared/conformance not found beside the checkout (see its README)");
            return;
        };
        for (name, bytes) in files {
            let (events, res) = decode_every_split(Framing::Sse, &make, &bytes);
            assert_fragments_match(&events);
            let (text, reasoning, calls) = summarize(&events);
            if name.starts_with("error") {
                assert!(res.is_err(), "{name}");
                continue;
            }
            res.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                events
                    .iter()
                    .any(|e| matches!(e, ModelEvent::Usage(u) if u.output_tokens > 0)),
                "{name}"
            );
            if name.contains("tool-use") {
                assert!(!calls.is_empty(), "{name}");
                for (_, _, args) in &calls {
                    serde_json::from_str::<serde_json::Value>(args)
                        .unwrap_or_else(|e| panic!("{name}: {e}: {args}"));
                }
            } else {
                assert!(!text.is_empty(), "{name}");
            }
            if name.starts_with("thinking") {
                assert!(!reasoning.is_empty(), "{name}");
            }
        }
    }

    #[test]
    fn request_body_carries_tool_use_and_grouped_tool_results() {
        let (messages, tools) = conversation();
        let body = serde_json::to_value(request_body("claude-sonnet-4-5", &messages, &tools, 1024))
            .unwrap();
        assert_eq!(
            (body["system"].as_str(), body["max_tokens"].as_u64()),
            (Some("Be brief."), Some(1024))
        );
        let m = body["messages"].as_array().expect("messages");
        let roles: Vec<&str> = m.iter().filter_map(|x| x["role"].as_str()).collect();
        assert_eq!(
            roles,
            ["user", "assistant", "user", "assistant", "user"],
            "roles alternate"
        );
        assert_eq!(
            m[1]["content"][0],
            serde_json::json!({"type":"text","text":"Checking both."})
        );
        assert_eq!(
            m[1]["content"][2]["input"],
            serde_json::json!({"city":"Oslo"})
        );
        let results = m[2]["content"].as_array().expect("results");
        assert_eq!(results.len(), 2, "both results share one user turn");
        assert_eq!(results[1]["tool_use_id"], "call_2");
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
    }
}
