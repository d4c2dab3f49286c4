//! Ollama's native chat API (`POST /api/chat`), streamed as NDJSON: one JSON object per line with
//! `message.content`, `message.thinking` and whole `message.tool_calls`, then a last line with
//! `done: true`, `done_reason` and the token counts (`prompt_eval_count`, `eval_count`). A line
//! `{"error": "…"}` is an error. `/api/generate`'s `response` field is read as text too.

use sluice_protocol::{ErrorCode, Usage};

use serde::{Deserialize, Serialize};

use crate::decode::{Decoder, Flow, parse_json, read_typed};
use crate::lenient::{Flag, List, Num, Obj, Present, Str};
use crate::{ChatMessage, ModelEvent, ProviderError, Role, ToolSpec};

#[derive(Debug, Default)]
pub struct OllamaDecoder {
    reasoning_open: bool,
    text_open: bool,
    calls: u32,
}

impl OllamaDecoder {
    fn line(
        &mut self,
        v: Line<'_>,
        data: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        if v.error.0 {
            // Rare: the error is read whole.
            let whole = parse_json("Ollama", data)?;
            let err = whole.get("error").cloned().unwrap_or_default();
            let msg = err
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| err.to_string());
            return Err(ProviderError::new(
                ErrorCode::UpstreamError,
                format!("Ollama: {msg}"),
            ));
        }
        let message = v.message.0;
        let thinking = message.as_ref().and_then(|m| m.thinking.get());
        if let Some(t) = thinking.or(v.thinking.get()) {
            self.reasoning_open = true;
            out.push(ModelEvent::ReasoningDelta(t.to_string()));
        }
        let content = message.as_ref().and_then(|m| m.content.get());
        if let Some(t) = content.or(v.response.get()) {
            if self.reasoning_open {
                self.reasoning_open = false;
                out.push(ModelEvent::ReasoningDone);
            }
            self.text_open = true;
            out.push(ModelEvent::TextDelta(t.to_string()));
        }
        for call in message.into_iter().flat_map(|m| m.tool_calls.0) {
            let call_id = call
                .id
                .get()
                .map(str::to_string)
                .unwrap_or_else(|| format!("call_{}", self.calls));
            self.calls += 1;
            let function = call.function.0;
            let name = function
                .as_ref()
                .and_then(|f| f.name.get())
                .unwrap_or_default()
                .to_string();
            let arguments = match function.and_then(|f| f.arguments) {
                Some(serde_json::Value::String(s)) => s,
                Some(serde_json::Value::Null) | None => "{}".to_string(),
                Some(a) => a.to_string(),
            };
            // Ollama sends a call whole: one fragment, then done.
            out.push(ModelEvent::FunctionCallDelta {
                call_id: call_id.clone(),
                name: name.clone(),
                delta: arguments.clone(),
            });
            out.push(ModelEvent::FunctionCallDone {
                call_id,
                name,
                arguments,
            });
        }
        if v.done.0 {
            if self.reasoning_open {
                out.push(ModelEvent::ReasoningDone);
            }
            if self.text_open {
                out.push(ModelEvent::TextDone);
            }
            let input = v.prompt_eval_count.or0();
            let output = v.eval_count.or0();
            out.push(ModelEvent::Usage(Usage {
                input_tokens: input,
                output_tokens: output,
                reasoning_tokens: 0,
                total_tokens: input + output,
            }));
            if let Some(r) = v.done_reason.get() {
                out.push(ModelEvent::StopReason(r.to_string()));
            }
            return Ok(Flow::Done);
        }
        Ok(Flow::More)
    }
}

/// The fields of a line the decoder reads; the rest are skipped unread.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(default)]
    error: Present,
    #[serde(default, borrow)]
    message: Obj<Message<'a>>,
    #[serde(default, borrow)]
    thinking: Str<'a>,
    #[serde(default, borrow)]
    response: Str<'a>,
    #[serde(default)]
    done: Flag,
    #[serde(default)]
    prompt_eval_count: Num,
    #[serde(default)]
    eval_count: Num,
    #[serde(default, borrow)]
    done_reason: Str<'a>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    thinking: Str<'a>,
    #[serde(default, borrow)]
    content: Str<'a>,
    #[serde(default, borrow)]
    tool_calls: List<ToolCall<'a>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(default, borrow)]
    id: Str<'a>,
    #[serde(default, borrow)]
    function: Obj<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(default, borrow)]
    name: Str<'a>,
    /// An object in Ollama's own API; some servers send it as a JSON string.
    #[serde(default)]
    arguments: Option<serde_json::Value>,
}

impl Decoder for OllamaDecoder {
    fn message(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        let mut whole = None;
        let line = read_typed("Ollama", data, &mut whole)?;
        self.line(line, data, out)
    }

    fn end(&mut self, _out: &mut Vec<ModelEvent>) -> Result<(), ProviderError> {
        Err(ProviderError::new(
            ErrorCode::UpstreamError,
            "the Ollama stream ended before its done line",
        ))
    }
}

/// The request body: tool calls with their arguments as objects, tool results as `tool` messages
/// naming their tool, tools in the OpenAI function form.
pub fn request_body<'a>(
    model: &'a str,
    messages: &'a [ChatMessage],
    tools: &[ToolSpec],
) -> RequestBody<'a> {
    let messages = messages
        .iter()
        .map(|m| match m.role {
            Role::Tool => OutMessage::Tool {
                role: "tool",
                content: &m.content,
                tool_name: m.tool_name.as_deref(),
            },
            Role::Assistant if !m.tool_calls.is_empty() => OutMessage::Calls {
                role: "assistant",
                content: &m.content,
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| OutCall {
                        function: OutFunction {
                            name: &c.name,
                            arguments: crate::arguments_object(&c.arguments),
                        },
                    })
                    .collect(),
            },
            role => OutMessage::Text {
                role: role.as_str(),
                content: &m.content,
            },
        })
        .collect();
    RequestBody {
        model,
        messages,
        stream: true,
        tools: (!tools.is_empty()).then(|| crate::function_tools(tools)),
    }
}

/// An Ollama chat request body, written straight to JSON.
#[derive(Serialize)]
pub struct RequestBody<'a> {
    model: &'a str,
    messages: Vec<OutMessage<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<serde_json::Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutMessage<'a> {
    Tool {
        role: &'static str,
        content: &'a str,
        tool_name: Option<&'a str>,
    },
    Calls {
        role: &'static str,
        content: &'a str,
        tool_calls: Vec<OutCall<'a>>,
    },
    Text {
        role: &'static str,
        content: &'a str,
    },
}

#[derive(Serialize)]
struct OutCall<'a> {
    function: OutFunction<'a>,
}

#[derive(Serialize)]
struct OutFunction<'a> {
    name: &'a str,
    arguments: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Framing;
    use crate::decode::testing::*;

    fn make() -> Box<dyn Decoder> {
        Box::new(OllamaDecoder::default())
    }

    /// Written from Ollama's API reference (docs/api.md, chat with thinking and tools).
    const STREAM: &str = concat!(
        "{\"model\":\"qwen3\",\"created_at\":\"2025-05-01T00:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":\"User wants \"},\"done\":false}\n",
        "{\"model\":\"qwen3\",\"created_at\":\"2025-05-01T00:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":\"weather.\"},\"done\":false}\n",
        "{\"model\":\"qwen3\",\"created_at\":\"2025-05-01T00:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"Checking.\"},\"done\":false,\"unknown_field\":[1]}\n",
        "{\"model\":\"qwen3\",\"created_at\":\"2025-05-01T00:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"function\":{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Tokyo\"}}},{\"function\":{\"name\":\"get_time\",\"arguments\":{\"tz\":\"JST\"}}}]},\"done\":false}\n",
        "{\"model\":\"qwen3\",\"created_at\":\"2025-05-01T00:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"stop\",\"done\":true,\"total_duration\":1,\"prompt_eval_count\":26,\"eval_count\":18}\n",
    );

    /// Fields of unexpected types read as absent, a repeated key counts once (the last), a
    /// `done` that is not `true` does not end the stream, arguments sent as a JSON string pass as
    /// they are: read, not refused.
    #[test]
    fn odd_but_readable_lines_are_read_not_refused() {
        let odd = concat!(
            "{\"message\":{\"content\":\"Gr\\u00fc\\u00dfe \",\"thinking\":7},\"done\":\"no\"}\n",
            "{\"message\":{\"content\":\"first\",\"content\":\"last\"},\"done\":0,\"error\":null}\n",
            "{\"message\":{\"tool_calls\":[\"junk\",{\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\":1}\"}}]},\"done\":false}\n",
            "{\"message\":[],\"done\":true,\"prompt_eval_count\":\"3\",\"eval_count\":2}\n",
        );
        let (events, res) = decode_every_split(Framing::Ndjson, &make, odd.as_bytes());
        res.expect("odd lines decode");
        let (text, reasoning, calls) = summarize(&events);
        assert_eq!(text, "Gr\u{fc}\u{df}e last");
        assert_eq!(reasoning, "");
        assert_eq!(
            calls,
            vec![("call_0".into(), "f".into(), "{\"a\":1}".into())]
        );
        assert!(
            events.contains(&ModelEvent::Usage(Usage {
                input_tokens: 0,
                output_tokens: 2,
                reasoning_tokens: 0,
                total_tokens: 2,
            })),
            "{events:?}"
        );
    }

    #[test]
    fn thinking_text_parallel_tool_calls_and_counts_at_every_split() {
        let (events, res) = decode_every_split(Framing::Ndjson, &make, STREAM.as_bytes());
        res.expect("ok");
        let (text, reasoning, calls) = summarize(&events);
        assert_eq!(
            (text.as_str(), reasoning.as_str()),
            ("Checking.", "User wants weather.")
        );
        assert_eq!(
            calls,
            vec![
                (
                    "call_0".into(),
                    "get_weather".into(),
                    "{\"city\":\"Tokyo\"}".into()
                ),
                (
                    "call_1".into(),
                    "get_time".into(),
                    "{\"tz\":\"JST\"}".into()
                ),
            ]
        );
        assert!(events.contains(&ModelEvent::Usage(Usage {
            input_tokens: 26,
            output_tokens: 18,
            reasoning_tokens: 0,
            total_tokens: 44
        })));
    }

    #[test]
    fn an_error_line_mid_stream_is_an_error_and_a_missing_done_line_too() {
        let s = "{\"message\":{\"content\":\"Yes\"},\"done\":false}\n{\"error\":\"an error was encountered while running the model\"}\n";
        let (events, res) = decode_every_split(Framing::Ndjson, &make, s.as_bytes());
        assert_eq!(summarize(&events).0, "Yes");
        assert!(
            res.expect_err("error")
                .message
                .contains("an error was encountered")
        );
        let cut = "{\"message\":{\"content\":\"Yes\"},\"done\":false}\n";
        let (_, res) = decode_every_split(Framing::Ndjson, &make, cut.as_bytes());
        assert!(res.expect_err("cut").message.contains("ended before"));
    }

    #[test]
    fn conformance_fixtures() {
        let Some(files) = fixtures("ollama") else {
            eprintln!("skipped: shared/conformance not found beside the checkout (see its README)");
            return;
        };
        for (name, bytes) in files {
            let (events, res) = decode_every_split(Framing::Ndjson, &make, &bytes);
            let (text, _, calls) = summarize(&events);
            if name.contains("error") {
                assert!(res.is_err(), "{name}");
                assert!(!text.is_empty(), "{name}: text before the error is kept");
                continue;
            }
            res.unwrap_or_else(|e| panic!("{name}: {e}"));
            if name.contains("tool-calls") {
                assert!(!calls.is_empty(), "{name}");
            } else {
                assert!(!text.is_empty(), "{name}");
            }
        }
    }

    #[test]
    fn request_body_carries_tool_calls_as_objects_and_named_results() {
        let (messages, tools) = conversation();
        let body = serde_json::to_value(request_body("llama3.2", &messages, &tools)).unwrap();
        let m = body["messages"].as_array().expect("messages");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            serde_json::json!({"city":"Paris"})
        );
        assert_eq!(
            m[4],
            serde_json::json!({"role":"tool","content":"{\"c\":9}","tool_name":"get_weather"})
        );
        assert_eq!(body["tools"][0]["function"]["name"], "get_weather");
    }
}
