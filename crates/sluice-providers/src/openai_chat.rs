//! OpenAI Chat Completions streaming (`POST /v1/chat/completions`, `stream: true`), which vLLM,
//! llama.cpp's server, LM Studio, Ollama's `/v1` and many gateways also speak.
//!
//! `data: {chunk}` frames end with `data: [DONE]`. Text is `choices[0].delta.content`; reasoning,
//! where a server streams it, is `delta.reasoning` or `delta.reasoning_content`; tool calls arrive
//! as `delta.tool_calls[]` fragments keyed by `index` (the first carries `id` and `name`), several
//! in parallel. Usage comes in a last chunk with empty `choices` when
//! `stream_options.include_usage` is set. Errors come as a chunk `{"error": …}` or an
//! `event: error` frame.

use std::collections::BTreeMap;

use sluice_protocol::Usage;

use serde::{Deserialize, Serialize};

use crate::decode::{Decoder, Flow, error_from, parse_json, read_typed};
use crate::lenient::{List, Num, Obj, Present, Str};
use crate::{ChatMessage, ModelEvent, ProviderError, Role, ToolSpec};

#[derive(Debug, Default)]
struct Call {
    id: String,
    name: String,
    arguments: String,
}

#[derive(Debug, Default)]
pub struct ChatDecoder {
    calls: BTreeMap<u64, Call>,
    reasoning_open: bool,
    text_open: bool,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl ChatDecoder {
    fn finalize(&mut self, out: &mut Vec<ModelEvent>) {
        if self.reasoning_open {
            self.reasoning_open = false;
            out.push(ModelEvent::ReasoningDone);
        }
        if self.text_open {
            self.text_open = false;
            out.push(ModelEvent::TextDone);
        }
        for (_, call) in std::mem::take(&mut self.calls) {
            out.push(ModelEvent::FunctionCallDone {
                call_id: call.id,
                name: call.name,
                arguments: call.arguments,
            });
        }
        if let Some(u) = self.usage.take() {
            out.push(ModelEvent::Usage(u));
        }
        if let Some(r) = self.finish_reason.take() {
            out.push(ModelEvent::StopReason(r));
        }
    }
}

/// The fields of a chunk the decoder reads; the rest are skipped unread.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: List<Choice<'a>>,
    #[serde(default)]
    usage: Obj<ChatUsage>,
    #[serde(default)]
    error: Present,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: Num,
    #[serde(default, borrow)]
    delta: Obj<Delta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Str<'a>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    reasoning: Str<'a>,
    #[serde(default, borrow)]
    reasoning_content: Str<'a>,
    #[serde(default, borrow)]
    content: Str<'a>,
    #[serde(default, borrow)]
    tool_calls: List<ToolCallDelta<'a>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default)]
    index: Num,
    #[serde(default, borrow)]
    id: Str<'a>,
    #[serde(default, borrow)]
    function: Obj<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Str<'a>,
    #[serde(default, borrow)]
    arguments: Str<'a>,
}

#[derive(Deserialize)]
struct ChatUsage {
    #[serde(default)]
    prompt_tokens: Num,
    #[serde(default)]
    completion_tokens: Num,
    #[serde(default)]
    total_tokens: Num,
    #[serde(default)]
    completion_tokens_details: Obj<UsageDetails>,
}

#[derive(Deserialize)]
struct UsageDetails {
    #[serde(default)]
    reasoning_tokens: Num,
}

const PROVIDER: &str = "OpenAI-compatible server";

impl ChatDecoder {
    fn chunk(&mut self, chunk: Chunk<'_>, out: &mut Vec<ModelEvent>) {
        for choice in chunk.choices.0 {
            if choice.index.or0() != 0 {
                continue;
            }
            if let Some(delta) = choice.delta.0 {
                self.delta(delta, out);
            }
            if let Some(reason) = choice.finish_reason.get() {
                self.finish_reason = Some(reason.to_string());
            }
        }
        if let Some(u) = chunk.usage.0 {
            self.usage = Some(Usage {
                input_tokens: u.prompt_tokens.or0(),
                output_tokens: u.completion_tokens.or0(),
                reasoning_tokens: u
                    .completion_tokens_details
                    .0
                    .map_or(0, |d| d.reasoning_tokens.or0()),
                total_tokens: u.total_tokens.or0(),
            });
        }
    }

    fn delta(&mut self, delta: Delta<'_>, out: &mut Vec<ModelEvent>) {
        if let Some(r) = delta.reasoning.get().or(delta.reasoning_content.get()) {
            self.reasoning_open = true;
            out.push(ModelEvent::ReasoningDelta(r.to_string()));
        }
        if let Some(text) = delta.content.get() {
            if self.reasoning_open {
                self.reasoning_open = false;
                out.push(ModelEvent::ReasoningDone);
            }
            self.text_open = true;
            out.push(ModelEvent::TextDelta(text.to_string()));
        }
        for (pos, tc) in delta.tool_calls.0.into_iter().enumerate() {
            let index = tc.index.0.unwrap_or(pos as u64);
            let call = self.calls.entry(index).or_default();
            if let Some(id) = tc.id.get() {
                call.id = id.to_string();
            }
            if call.id.is_empty() {
                call.id = format!("call_{index}");
            }
            let Some(function) = tc.function.0 else {
                continue;
            };
            if let Some(name) = function.name.get() {
                call.name.push_str(name);
            }
            if let Some(args) = function.arguments.get() {
                call.arguments.push_str(args);
                out.push(ModelEvent::FunctionCallDelta {
                    call_id: call.id.clone(),
                    name: call.name.clone(),
                    delta: args.to_string(),
                });
            }
        }
    }
}

impl Decoder for ChatDecoder {
    fn message(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<ModelEvent>,
    ) -> Result<Flow, ProviderError> {
        if data.trim() == "[DONE]" {
            self.finalize(out);
            return Ok(Flow::Done);
        }
        // An error object is read whole (rare).
        if event == "error" {
            return Err(error_from(PROVIDER, &parse_json(PROVIDER, data)?));
        }
        let mut whole = None;
        let chunk: Chunk = read_typed(PROVIDER, data, &mut whole)?;
        if chunk.error.0 {
            return Err(error_from(PROVIDER, &parse_json(PROVIDER, data)?));
        }
        self.chunk(chunk, out);
        Ok(Flow::More)
    }

    fn end(&mut self, out: &mut Vec<ModelEvent>) -> Result<(), ProviderError> {
        // Some servers omit [DONE]; a finish reason is as good an ending.
        if self.finish_reason.is_some() {
            self.finalize(out);
            return Ok(());
        }
        Err(ProviderError::new(
            sluice_protocol::ErrorCode::UpstreamError,
            "the OpenAI-compatible stream ended before [DONE]",
        ))
    }
}

/// The request body: the conversation with its tool calls and results in Chat Completions form,
/// and the tools as `{"type":"function","function":{…}}`.
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
                tool_call_id: m.tool_call_id.as_deref(),
                content: &m.content,
            },
            Role::Assistant if !m.tool_calls.is_empty() => OutMessage::Calls {
                role: "assistant",
                content: (!m.content.is_empty()).then_some(m.content.as_str()),
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| OutCall {
                        id: &c.id,
                        kind: "function",
                        function: OutFunction {
                            name: &c.name,
                            arguments: &c.arguments,
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
        stream_options: StreamOptions {
            include_usage: true,
        },
        tools: (!tools.is_empty()).then(|| crate::function_tools(tools)),
    }
}

/// A Chat Completions request body, written straight to JSON.
#[derive(Serialize)]
pub struct RequestBody<'a> {
    model: &'a str,
    messages: Vec<OutMessage<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutMessage<'a> {
    Tool {
        role: &'static str,
        tool_call_id: Option<&'a str>,
        content: &'a str,
    },
    Calls {
        role: &'static str,
        content: Option<&'a str>,
        tool_calls: Vec<OutCall<'a>>,
    },
    Text {
        role: &'static str,
        content: &'a str,
    },
}

#[derive(Serialize)]
struct OutCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunction<'a>,
}

#[derive(Serialize)]
struct OutFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Framing;
    use crate::decode::testing::*;
    use sluice_protocol::ErrorCode;

    fn make() -> Box<dyn Decoder> {
        Box::new(ChatDecoder::default())
    }

    /// Written from the Chat Completions streaming reference: role chunk, content chunks, two
    /// parallel tool calls whose arguments arrive in fragments, an unknown field and an unknown
    /// top-level object, a finish reason, the usage chunk, `[DONE]`.
    const PARALLEL: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"reasoning_content\":\"Two cities\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Checking \"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"both.\"},\"finish_reason\":null}],\"brand_new\":{\"x\":1}}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_b\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{\\\"city\\\":\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"arguments\":\"\\\"Oslo\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":30,\"total_tokens\":50,\"completion_tokens_details\":{\"reasoning_tokens\":4}}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn parallel_tool_calls_reasoning_and_usage_at_every_split() {
        let (events, res) = decode_every_split(Framing::Sse, &make, PARALLEL.as_bytes());
        res.expect("ok");
        let (text, reasoning, calls) = summarize(&events);
        assert_eq!(text, "Checking both.");
        assert_eq!(reasoning, "Two cities");
        assert_eq!(
            calls,
            vec![
                (
                    "call_a".into(),
                    "get_weather".into(),
                    "{\"city\":\"Paris\"}".into()
                ),
                (
                    "call_b".into(),
                    "get_weather".into(),
                    "{\"city\":\"Oslo\"}".into()
                ),
            ]
        );
        assert_fragments_match(&events);
        // Fragments are forwarded as they come, interleaved as the provider interleaved them.
        let deltas: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                ModelEvent::FunctionCallDelta { call_id, .. } => Some(call_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deltas, ["call_a", "call_b", "call_a", "call_b"]);
        assert!(events.contains(&ModelEvent::Usage(Usage {
            input_tokens: 20,
            output_tokens: 30,
            reasoning_tokens: 4,
            total_tokens: 50
        })));
        assert_eq!(
            events.last(),
            Some(&ModelEvent::StopReason("tool_calls".into()))
        );
    }

    #[test]
    fn error_chunks_and_malformed_chunks_are_clear_errors() {
        let err = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\ndata: [DONE]\n\n";
        let (events, res) = decode_every_split(Framing::Sse, &make, err.as_bytes());
        assert_eq!(summarize(&events).0, "Hi");
        let e = res.expect_err("error");
        assert_eq!(e.code, ErrorCode::UpstreamError);
        assert!(
            e.message.contains("The server had an error"),
            "{}",
            e.message
        );

        let limited = "event: error\ndata: {\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_exceeded\"}}\n\n";
        let (_, res) = decode_every_split(Framing::Sse, &make, limited.as_bytes());
        assert_eq!(res.expect_err("error").code, ErrorCode::RateLimited);

        let bad = "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: {not json\n\n";
        let (_, res) = decode_every_split(Framing::Sse, &make, bad.as_bytes());
        let e = res.expect_err("malformed");
        assert!(
            e.message.contains("malformed chunk") && e.message.contains("{not json"),
            "{}",
            e.message
        );

        let cut =
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";
        let (_, res) = decode_every_split(Framing::Sse, &make, cut.as_bytes());
        assert!(res.expect_err("cut").message.contains("ended before"));
    }

    /// What servers that only mostly follow the format send: fields of unexpected types (read as
    /// absent, not fatal), escaped text, a repeated key (the last one counts, as JSON readers
    /// do), and a finish reason in a choice without a delta.
    #[test]
    fn odd_but_readable_chunks_are_read_not_refused() {
        let odd = concat!(
            "data: {\"choices\":[{\"index\":\"0\",\"delta\":{\"content\":\"A\\\"b\\u00e9 \",\"role\":7,\"tool_calls\":null}}],\"usage\":null}\n\n",
            "data: {\"choices\":[7,{\"index\":0,\"delta\":{\"content\":5,\"reasoning\":[\"x\"]}},{\"index\":1,\"delta\":{\"content\":\"other choice\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\",\"content\":\"last\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"f\",\"arguments\":\"{}\"}},\"junk\"]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"finish_reason\":\"tool_calls\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":\"4\",\"total_tokens\":7,\"completion_tokens_details\":null}}\n\n",
            "data: [DONE]\n\n",
        );
        let (events, res) = decode_every_split(Framing::Sse, &make, odd.as_bytes());
        res.expect("odd chunks decode");
        let (text, reasoning, calls) = summarize(&events);
        assert_eq!(text, "A\"bé last");
        assert_eq!(reasoning, "");
        assert_eq!(calls, vec![("c1".into(), "f".into(), "{}".into())]);
        assert!(
            events.contains(&ModelEvent::StopReason("tool_calls".into())),
            "{events:?}"
        );
        assert!(
            events.contains(&ModelEvent::Usage(Usage {
                input_tokens: 3,
                output_tokens: 0,
                reasoning_tokens: 0,
                total_tokens: 7,
            })),
            "{events:?}"
        );
    }

    #[test]
    fn conformance_fixtures() {
        let Some(files) = fixtures("openai-chat") else {
            eprintln!("skipped: shared/conformance not found beside the checkout (see its README)");
            return;
        };
        for (name, bytes) in files {
            let (events, res) = decode_every_split(Framing::Sse, &make, &bytes);
            assert_fragments_match(&events);
            let (text, reasoning, calls) = summarize(&events);
            if name.starts_with("error")
                || name.contains("error-event")
                || name.contains("error-in-chunk")
            {
                assert!(res.is_err(), "{name} ends in an error");
            } else {
                res.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(
                    !text.is_empty() || !calls.is_empty() || !reasoning.is_empty(),
                    "{name}"
                );
            }
            if name.contains("parallel") {
                assert!(calls.len() >= 2, "{name}: {calls:?}");
            }
            if name.contains("usage") {
                assert!(
                    events
                        .iter()
                        .any(|e| matches!(e, ModelEvent::Usage(u) if u.input_tokens > 0)),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn request_body_carries_tool_calls_results_and_tools() {
        let (messages, tools) = conversation();
        let body = serde_json::to_value(request_body("gpt-4o", &messages, &tools)).unwrap();
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        let m = body["messages"].as_array().expect("messages");
        assert_eq!(m.len(), 7);
        assert_eq!(
            m[0],
            serde_json::json!({"role":"system","content":"Be brief."})
        );
        assert_eq!(m[2]["content"], "Checking both.");
        assert_eq!(m[2]["tool_calls"][1]["id"], "call_2");
        assert_eq!(
            m[2]["tool_calls"][1]["function"]["arguments"],
            "{\"city\":\"Oslo\"}"
        );
        assert_eq!(
            m[3],
            serde_json::json!({"role":"tool","tool_call_id":"call_1","content":"{\"c\":18}"})
        );
        assert_eq!(body["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(
            body["tools"][0]["function"]["parameters"]["required"][0],
            "city"
        );
    }
}
