//! A run's turns (assistant calls, tool results, the final answer) as stored with its assistant
//! message, so that later runs send the whole exchange back to the model. The JSON shape is
//! documented with `MessageView::turns` in the protocol crate.

use serde_json::{Value, json};
use sluice_providers::{ChatMessage, Role, ToolCall};

pub fn to_json(turns: &[ChatMessage]) -> Value {
    Value::Array(
        turns
            .iter()
            .map(|m| match m.role {
                Role::Tool => json!({
                    "role": "tool",
                    "tool_call_id": m.tool_call_id,
                    "tool_name": m.tool_name,
                    "content": m.content,
                }),
                role => {
                    let mut v = json!({"role": role.as_str(), "content": m.content});
                    if !m.tool_calls.is_empty() {
                        v["tool_calls"] = m
                            .tool_calls
                            .iter()
                            .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
                            .collect();
                    }
                    v
                }
            })
            .collect(),
    )
}

/// Reads stored turns back; entries it cannot read are skipped.
pub fn from_json(v: &Value) -> Vec<ChatMessage> {
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    v.as_array()
        .map(|turns| {
            turns
                .iter()
                .filter_map(|t| {
                    let role = Role::parse(t["role"].as_str()?)?;
                    Some(match role {
                        Role::Tool => ChatMessage::tool_result(
                            s(t, "tool_call_id"),
                            s(t, "tool_name"),
                            s(t, "content"),
                        ),
                        _ => {
                            let calls: Vec<ToolCall> = t["tool_calls"]
                                .as_array()
                                .map(|c| {
                                    c.iter()
                                        .map(|c| ToolCall {
                                            id: s(c, "id"),
                                            name: s(c, "name"),
                                            arguments: s(c, "arguments"),
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            ChatMessage {
                                tool_calls: calls,
                                ..ChatMessage::text(role, s(t, "content"))
                            }
                        }
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_round_trip() {
        let turns = vec![
            ChatMessage::assistant_calls(
                "Checking.",
                vec![ToolCall {
                    id: "c1".into(),
                    name: "lookup".into(),
                    arguments: "{\"q\":1}".into(),
                }],
            ),
            ChatMessage::tool_result("c1", "lookup", "{\"hits\":2}"),
            ChatMessage::text(Role::Assistant, "Two hits."),
        ];
        assert_eq!(from_json(&to_json(&turns)), turns);
        assert!(from_json(&json!([{"role": "wizard"}, "x"])).is_empty());
    }
}
