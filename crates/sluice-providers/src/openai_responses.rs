//! OpenAI Responses API streaming (`POST /v1/responses`, `stream: true`).
//!
//! Typed SSE events: `response.output_text.delta`, `response.reasoning_summary_text.delta` (and
//! `response.reasoning_text.delta`), `response.output_item.added` announcing a `function_call` item
//! (its `call_id` and `name`), `response.function_call_arguments.delta`/`.done` keyed by `item_id`,
//! then `response.completed` (or `.incomplete`) carrying usage, or `response.failed` / `error`.
//! Everything else (`response.created`, `content_part`, …) is ignored.

use std::collections::HashMap;

use sluice_protocol::{ErrorCode, Usage};

use serde::{Deserialize, Serialize};

use crate::decode::{Decoder, Flow, classify, read_typed};
use crate::lenient::{Num, Obj, Str};
use crate::{ChatMessage, ModelEvent, ProviderError, Role, ToolSpec};

#[derive(Debug)]
struct Call {
    call_id: String,
    name: String,
    arguments: String,
    done: bool,
}

#[derive(Debug, Default)]
pub struct ResponsesDecoder {
    /// Function calls by output item id.
    calls: HashMap<String, Call>,
    /// Reasoning summary parts seen in the current reasoning item (parts are separated by a blank line).
    summary_parts: u32,
    reasoning_open: bool,
}

impl ResponsesDecoder {
    fn event(
        &mut self,
        v: Event<'_>,
        event: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        let kind = v.kind.get().unwrap_or(event);
        match kind {
            "response.output_text.delta" => {
                self.close_reasoning(out);
                if let Some(d) = v.delta.get() {
                    out.push(ModelEvent::TextDelta(d.to_string()));
                }
            }
            "response.output_text.done" => out.push(ModelEvent::TextDone),
            "response.reasoning_summary_part.added" => {
                if self.summary_parts > 0 {
                    out.push(ModelEvent::ReasoningDelta("\n\n".into()));
                }
                self.summary_parts += 1;
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => {
                if let Some(d) = v.delta.get() {
                    self.reasoning_open = true;
                    out.push(ModelEvent::ReasoningDelta(d.to_string()));
                }
            }
            "response.output_item.added" => {
                let Some(item) = v.item.0 else {
                    return Ok(Flow::More);
                };
                match item.kind.get() {
                    Some("function_call") => {
                        let id = item.id.get().unwrap_or_default().to_string();
                        let call_id = item.call_id.get().unwrap_or(&id).to_string();
                        self.calls.insert(
                            id,
                            Call {
                                call_id,
                                name: item.name.get().unwrap_or_default().to_string(),
                                arguments: String::new(),
                                done: false,
                            },
                        );
                    }
                    Some("reasoning") => self.summary_parts = 0,
                    _ => {}
                }
            }
            "response.function_call_arguments.delta" => {
                let item_id = v.item_id.get().unwrap_or_default();
                if let (Some(call), Some(d)) = (self.calls.get_mut(item_id), v.delta.get()) {
                    call.arguments.push_str(d);
                    out.push(ModelEvent::FunctionCallDelta {
                        call_id: call.call_id.clone(),
                        name: call.name.clone(),
                        delta: d.to_string(),
                    });
                }
            }
            "response.function_call_arguments.done" => {
                let item_id = v.item_id.get().unwrap_or_default();
                self.finish_call(item_id, v.arguments.get(), out);
            }
            "response.output_item.done" => {
                let Some(item) = v.item.0 else {
                    return Ok(Flow::More);
                };
                match item.kind.get() {
                    Some("reasoning") => self.close_reasoning(out),
                    Some("function_call") => {
                        let id = item.id.get().unwrap_or_default();
                        self.finish_call(id, item.arguments.get(), out);
                    }
                    _ => {}
                }
            }
            "response.completed" | "response.incomplete" => {
                self.close_reasoning(out);
                let response = v.response.0;
                if let Some(u) = response.as_ref().and_then(|r| r.usage.0.as_ref()) {
                    out.push(ModelEvent::Usage(u.usage()));
                }
                let reason = if kind == "response.incomplete" {
                    response
                        .as_ref()
                        .and_then(|r| r.incomplete_details.0.as_ref())
                        .and_then(|d| d.reason.get())
                        .unwrap_or("incomplete")
                        .to_string()
                } else {
                    "completed".to_string()
                };
                out.push(ModelEvent::StopReason(reason));
                return Ok(Flow::Done);
            }
            "response.failed" => {
                let err = v.response.0.and_then(|r| r.error.0);
                let code = err.as_ref().and_then(|e| e.code.get()).unwrap_or("failed");
                let message = err
                    .as_ref()
                    .and_then(|e| e.message.get())
                    .unwrap_or("the response failed");
                return Err(ProviderError::new(
                    classify(code),
                    format!("OpenAI {code}: {message}"),
                ));
            }
            "error" => {
                let code = v.code.get().or(v.kind.get()).unwrap_or("error");
                let message = v.message.get().unwrap_or("no message");
                return Err(ProviderError::new(
                    classify(code),
                    format!("OpenAI {code}: {message}"),
                ));
            }
            _ => {}
        }
        Ok(Flow::More)
    }

    fn close_reasoning(&mut self, out: &mut Vec<ModelEvent>) {
        if self.reasoning_open {
            self.reasoning_open = false;
            out.push(ModelEvent::ReasoningDone);
        }
    }

    fn finish_call(&mut self, item_id: &str, arguments: Option<&str>, out: &mut Vec<ModelEvent>) {
        if let Some(call) = self.calls.get_mut(item_id)
            && !call.done
        {
            call.done = true;
            if let Some(a) = arguments {
                call.arguments = a.to_string();
            }
            out.push(ModelEvent::FunctionCallDone {
                call_id: call.call_id.clone(),
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            });
        }
    }
}

/// The fields of an event the decoder reads; the rest (a whole response object in
/// `response.completed`, say) are skipped unread.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Str<'a>,
    #[serde(default, borrow)]
    delta: Str<'a>,
    #[serde(default, borrow)]
    item_id: Str<'a>,
    #[serde(default, borrow)]
    arguments: Str<'a>,
    #[serde(default, borrow)]
    item: Obj<Item<'a>>,
    #[serde(default, borrow)]
    response: Obj<Response<'a>>,
    #[serde(default, borrow)]
    code: Str<'a>,
    #[serde(default, borrow)]
    message: Str<'a>,
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Str<'a>,
    #[serde(default, borrow)]
    id: Str<'a>,
    #[serde(default, borrow)]
    call_id: Str<'a>,
    #[serde(default, borrow)]
    name: Str<'a>,
    #[serde(default, borrow)]
    arguments: Str<'a>,
}

#[derive(Deserialize)]
struct Response<'a> {
    #[serde(default)]
    usage: Obj<ResponseUsage>,
    #[serde(default, borrow)]
    incomplete_details: Obj<Incomplete<'a>>,
    #[serde(default, borrow)]
    error: Obj<ResponseError<'a>>,
}

#[derive(Deserialize)]
struct ResponseUsage {
    #[serde(default)]
    input_tokens: Num,
    #[serde(default)]
    output_tokens: Num,
    #[serde(default)]
    total_tokens: Num,
    #[serde(default)]
    output_tokens_details: Obj<OutputDetails>,
}

#[derive(Deserialize)]
struct OutputDetails {
    #[serde(default)]
    reasoning_tokens: Num,
}

#[derive(Deserialize)]
struct Incomplete<'a> {
    #[serde(default, borrow)]
    reason: Str<'a>,
}

#[derive(Deserialize)]
struct ResponseError<'a> {
    #[serde(default, borrow)]
    code: Str<'a>,
    #[serde(default, borrow)]
    message: Str<'a>,
}

impl ResponseUsage {
    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input_tokens.or0(),
            output_tokens: self.output_tokens.or0(),
            reasoning_tokens: self
                .output_tokens_details
                .0
                .as_ref()
                .map_or(0, |d| d.reasoning_tokens.or0()),
            total_tokens: self.total_tokens.or0(),
        }
    }
}

impl Decoder for ResponsesDecoder {
    fn message(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        let mut whole = None;
        let v = read_typed("OpenAI", data, &mut whole)?;
        self.event(v, event, out)
    }

    fn end(&mut self, _out: &mut Vec<ModelEvent>) -> Result<(), ProviderError> {
        Err(ProviderError::new(
            ErrorCode::UpstreamError,
            "the OpenAI stream ended before response.completed",
        ))
    }
}

/// The request body. System messages become `instructions`; an assistant's tool calls become
/// `function_call` items and tool results `function_call_output` items; tools are flat
/// `{"type":"function","name",…}` objects.
pub fn request_body<'a>(
    model: &'a str,
    messages: &'a [ChatMessage],
    tools: &[ToolSpec],
) -> RequestBody<'a> {
    let instructions: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let mut input = Vec::new();
    for m in messages.iter().filter(|m| m.role != Role::System) {
        match m.role {
            Role::Tool => input.push(OutItem::Output {
                kind: "function_call_output",
                call_id: m.tool_call_id.as_deref(),
                output: &m.content,
            }),
            _ => {
                if !m.content.is_empty() || m.tool_calls.is_empty() {
                    input.push(OutItem::Message {
                        role: m.role.as_str(),
                        content: &m.content,
                    });
                }
                for c in &m.tool_calls {
                    input.push(OutItem::Call {
                        kind: "function_call",
                        call_id: &c.id,
                        name: &c.name,
                        arguments: &c.arguments,
                    });
                }
            }
        }
    }
    RequestBody {
        model,
        input,
        stream: true,
        instructions: (!instructions.is_empty()).then(|| instructions.join("\n\n")),
        tools: (!tools.is_empty()).then(|| tools_json(tools)),
    }
}

/// A Responses API request body, written straight to JSON.
#[derive(Serialize)]
pub struct RequestBody<'a> {
    model: &'a str,
    input: Vec<OutItem<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    instructions: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutItem<'a> {
    Output {
        #[serde(rename = "type")]
        kind: &'static str,
        call_id: Option<&'a str>,
        output: &'a str,
    },
    Message {
        role: &'static str,
        content: &'a str,
    },
    Call {
        #[serde(rename = "type")]
        kind: &'static str,
        call_id: &'a str,
        name: &'a str,
        arguments: &'a str,
    },
}

/// The request's `tools`.
pub fn tools_json(tools: &[ToolSpec]) -> serde_json::Value {
    tools
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Framing;
    use crate::decode::testing::*;

    fn make() -> Box<dyn Decoder> {
        Box::new(ResponsesDecoder::default())
    }

    /// Written from the Responses streaming reference: a reasoning item with two summary parts,
    /// a message, two parallel function calls with argument deltas, an unknown event type, and
    /// `response.completed` with usage including reasoning tokens.
    const STREAM: &str = concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"output\":[]}}\n\n",
        "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"output_index\":0,\"item\":{\"id\":\"rs_1\",\"type\":\"reasoning\",\"summary\":[]}}\n\n",
        "event: response.reasoning_summary_part.added\ndata: {\"type\":\"response.reasoning_summary_part.added\",\"item_id\":\"rs_1\",\"summary_index\":0}\n\n",
        "event: response.reasoning_summary_text.delta\ndata: {\"type\":\"response.reasoning_summary_text.delta\",\"item_id\":\"rs_1\",\"delta\":\"**Plan** \"}\n\n",
        "event: response.reasoning_summary_part.added\ndata: {\"type\":\"response.reasoning_summary_part.added\",\"item_id\":\"rs_1\",\"summary_index\":1}\n\n",
        "event: response.reasoning_summary_text.delta\ndata: {\"type\":\"response.reasoning_summary_text.delta\",\"item_id\":\"rs_1\",\"delta\":\"look up both\"}\n\n",
        "event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"item\":{\"id\":\"rs_1\",\"type\":\"reasoning\"}}\n\n",
        "event: response.something_new\ndata: {\"type\":\"response.something_new\",\"x\":1}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"Looking \"}\n\n",
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"them up.\"}\n\n",
        "event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"item_id\":\"msg_1\",\"text\":\"Looking them up.\"}\n\n",
        "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"item\":{\"id\":\"fc_1\",\"type\":\"function_call\",\"call_id\":\"call_1\",\"name\":\"get_capital\",\"arguments\":\"\"}}\n\n",
        "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"item\":{\"id\":\"fc_2\",\"type\":\"function_call\",\"call_id\":\"call_2\",\"name\":\"get_capital\",\"arguments\":\"\"}}\n\n",
        "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"item_id\":\"fc_1\",\"delta\":\"{\\\"country\\\":\"}\n\n",
        "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"item_id\":\"fc_2\",\"delta\":\"{\\\"country\\\":\\\"Peru\\\"}\"}\n\n",
        "event: response.function_call_arguments.delta\ndata: {\"type\":\"response.function_call_arguments.delta\",\"item_id\":\"fc_1\",\"delta\":\"\\\"Chile\\\"}\"}\n\n",
        "event: response.function_call_arguments.done\ndata: {\"type\":\"response.function_call_arguments.done\",\"item_id\":\"fc_1\",\"arguments\":\"{\\\"country\\\":\\\"Chile\\\"}\"}\n\n",
        "event: response.function_call_arguments.done\ndata: {\"type\":\"response.function_call_arguments.done\",\"item_id\":\"fc_2\",\"arguments\":\"{\\\"country\\\":\\\"Peru\\\"}\"}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":12,\"output_tokens\":40,\"output_tokens_details\":{\"reasoning_tokens\":16},\"total_tokens\":52}}}\n\n",
    );

    #[test]
    fn reasoning_text_parallel_calls_and_usage_at_every_split() {
        let (events, res) = decode_every_split(Framing::Sse, &make, STREAM.as_bytes());
        res.expect("ok");
        let (text, reasoning, calls) = summarize(&events);
        assert_eq!(reasoning, "**Plan** \n\nlook up both");
        assert_eq!(text, "Looking them up.");
        assert_eq!(
            calls,
            vec![
                (
                    "call_1".into(),
                    "get_capital".into(),
                    "{\"country\":\"Chile\"}".into()
                ),
                (
                    "call_2".into(),
                    "get_capital".into(),
                    "{\"country\":\"Peru\"}".into()
                ),
            ]
        );
        assert_fragments_match(&events);
        let reasoning_done = events
            .iter()
            .position(|e| *e == ModelEvent::ReasoningDone)
            .expect("done");
        let first_text = events
            .iter()
            .position(|e| matches!(e, ModelEvent::TextDelta(_)))
            .expect("text");
        assert!(reasoning_done < first_text);
        assert!(events.contains(&ModelEvent::Usage(Usage {
            input_tokens: 12,
            output_tokens: 40,
            reasoning_tokens: 16,
            total_tokens: 52
        })));
    }

    #[test]
    fn failed_incomplete_and_error_events() {
        let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"rate_limit_exceeded\",\"message\":\"Slow down\"}}}\n\n";
        let (_, res) = decode_every_split(Framing::Sse, &make, failed.as_bytes());
        let e = res.expect_err("failed");
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.message.contains("Slow down"));

        let incomplete = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Half\"}\n\nevent: response.incomplete\ndata: {\"type\":\"response.incomplete\",\"response\":{\"incomplete_details\":{\"reason\":\"max_output_tokens\"},\"usage\":{\"input_tokens\":1,\"output_tokens\":2,\"total_tokens\":3}}}\n\n";
        let (events, res) = decode_every_split(Framing::Sse, &make, incomplete.as_bytes());
        res.expect("incomplete is an ending, not a failure");
        assert_eq!(
            events.last(),
            Some(&ModelEvent::StopReason("max_output_tokens".into()))
        );

        let error = "event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"boom\",\"param\":null}\n\n";
        let (_, res) = decode_every_split(Framing::Sse, &make, error.as_bytes());
        assert_eq!(res.expect_err("error").code, ErrorCode::UpstreamError);
    }

    /// Fields of unexpected types read as absent, a repeated key counts once (the last), escaped
    /// text is unescaped, and a large unread `response` object is skipped: read, not refused.
    #[test]
    fn odd_but_readable_events_are_read_not_refused() {
        let odd = concat!(
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"\\u00bfQu\\u00e9? \",\"item_id\":7}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"first\",\"delta\":\"last\"}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":{\"text\":\"no\"}}\n\n",
            "event: response.output_item.added\ndata: {\"type\":\"response.output_item.added\",\"item\":\"not an object\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"type\":\"message\",\"content\":[{\"text\":\"whole\"}]}],\"usage\":{\"input_tokens\":5,\"output_tokens\":2,\"total_tokens\":7,\"output_tokens_details\":{\"reasoning_tokens\":null}}}}\n\n",
        );
        let (events, res) = decode_every_split(Framing::Sse, &make, odd.as_bytes());
        res.expect("odd events decode");
        assert_eq!(summarize(&events).0, "\u{bf}Qu\u{e9}? last");
        assert!(
            events.contains(&ModelEvent::Usage(Usage {
                input_tokens: 5,
                output_tokens: 2,
                reasoning_tokens: 0,
                total_tokens: 7,
            })),
            "{events:?}"
        );
    }

    #[test]
    fn conformance_fixtures() {
        let Some(files) = fixtures("openai-responses") else {
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
                    .any(|e| matches!(e, ModelEvent::Usage(u) if u.total_tokens > 0)),
                "{name}"
            );
            if name.contains("function-call") {
                assert!(!calls.is_empty(), "{name}");
            } else {
                assert!(!text.is_empty(), "{name}");
            }
            if name.starts_with("reasoning-summary") {
                assert!(!reasoning.is_empty(), "{name}");
            }
        }
    }

    #[test]
    fn request_body_carries_function_calls_outputs_and_tools() {
        let (messages, tools) = conversation();
        let body = serde_json::to_value(request_body("gpt-5", &messages, &tools)).unwrap();
        assert_eq!(body["instructions"], "Be brief.");
        let input = body["input"].as_array().expect("input");
        let kinds: Vec<String> = input
            .iter()
            .map(|i| {
                i["type"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| i["role"].as_str().unwrap_or("?").to_string())
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "user",
                "assistant",
                "function_call",
                "function_call",
                "function_call_output",
                "function_call_output",
                "assistant",
                "user"
            ]
        );
        assert_eq!(input[2]["call_id"], "call_1");
        assert_eq!(
            input[5],
            serde_json::json!({"type":"function_call_output","call_id":"call_2","output":"{\"c\":9}"})
        );
        assert_eq!(
            body["tools"][0],
            serde_json::json!({"type":"function","name":"get_weather","description":"Current weather for a city","parameters":tools[0].parameters})
        );
    }
}
