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

use crate::decode::{Decoder, Flow, error_from, parse_json, str_field, u64_at};
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
        let v = parse_json("OpenAI-compatible server", data)?;
        if event == "error" || v.get("error").is_some_and(|e| !e.is_null()) {
            return Err(error_from("OpenAI-compatible server", &v));
        }
        if let Some(choices) = v.get("choices").and_then(|c| c.as_array()) {
            for choice in choices {
                if choice.get("index").and_then(|i| i.as_u64()).unwrap_or(0) != 0 {
                    continue;
                }
                let Some(delta) = choice.get("delta") else {
                    continue;
                };
                let reasoning =
                    str_field(delta, "reasoning").or_else(|| str_field(delta, "reasoning_content"));
                if let Some(r) = reasoning {
                    self.reasoning_open = true;
                    out.push(ModelEvent::ReasoningDelta(r.to_string()));
                }
                if let Some(text) = str_field(delta, "content") {
                    if self.reasoning_open {
                        self.reasoning_open = false;
                        out.push(ModelEvent::ReasoningDone);
                    }
                    self.text_open = true;
                    out.push(ModelEvent::TextDelta(text.to_string()));
                }
                if let Some(calls) = delta.get("tool_calls").and_then(|t| t.as_array()) {
                    for (pos, tc) in calls.iter().enumerate() {
                        let index = tc
                            .get("index")
                            .and_then(|i| i.as_u64())
                            .unwrap_or(pos as u64);
                        let call = self.calls.entry(index).or_default();
                        if let Some(id) = str_field(tc, "id") {
                            call.id = id.to_string();
                        }
                        if call.id.is_empty() {
                            call.id = format!("call_{index}");
                        }
                        let function = tc.get("function");
                        if let Some(name) = function.and_then(|f| str_field(f, "name")) {
                            call.name.push_str(name);
                        }
                        if let Some(args) = function.and_then(|f| str_field(f, "arguments")) {
                            call.arguments.push_str(args);
                            out.push(ModelEvent::FunctionCallDelta {
                                call_id: call.id.clone(),
                                name: call.name.clone(),
                                delta: args.to_string(),
                            });
                        }
                    }
                }
                if let Some(reason) = str_field(choice, "finish_reason") {
                    self.finish_reason = Some(reason.to_string());
                }
            }
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(Usage {
                input_tokens: u64_at(u, &["prompt_tokens"]),
                output_tokens: u64_at(u, &["completion_tokens"]),
                reasoning_tokens: u64_at(u, &["completion_tokens_details", "reasoning_tokens"]),
                total_tokens: u64_at(u, &["total_tokens"]),
            });
        }
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
pub fn request_body(
    model: &str,
    messages: &[ChatMessage],
    tools: &[ToolSpec],
) -> serde_json::Value {
    let messages: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| match m.role {
            Role::Tool => serde_json::json!({
                "role": "tool",
                "tool_call_id": m.tool_call_id,
                "content": m.content,
            }),
            Role::Assistant if !m.tool_calls.is_empty() => serde_json::json!({
                "role": "assistant",
                "content": if m.content.is_empty() { serde_json::Value::Null } else { m.content.clone().into() },
                "tool_calls": m.tool_calls.iter().map(|c| serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })).collect::<Vec<_>>(),
            }),
            role => serde_json::json!({"role": role.as_str(), "content": m.content}),
        })
        .collect();
    let mut body = serde_json::json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if !tools.is_empty() {
        body["tools"] = crate::function_tools(tools);
    }
    body
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
        let body = request_body("gpt-4o", &messages, &tools);
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
