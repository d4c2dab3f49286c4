//! The demo model: deterministic, offline, and honest about being a demo.
//!
//! It streams a short reasoning passage, then a markdown answer that quotes the question, one word
//! (token) at a time at a configurable pace, then usage. When the artifact tools are offered, its
//! first answer in a thread (or any answer asked for a table or a chart) ends with a `create_table`
//! or `create_chart` call whose arguments stream in pieces, and its next step, seeing the result,
//! adds a closing paragraph: a newcomer sees the whole pipeline with no provider configured. Asked to
//! "add a row" once a table exists in the thread, it calls `update_artifact`, which makes version 2. The same question always gives the same
//! output, which the tests rely on. Pace 0 streams as fast as possible (benchmarks).

use std::borrow::Cow;
use std::time::Duration;

use futures_util::stream;
use sluice_protocol::Usage;

use crate::{Model, ModelEvent, ModelRequest, ModelStream, Role};

#[derive(Debug, Clone, Copy)]
pub struct DemoConfig {
    /// Tokens per second; 0 = no pause between tokens.
    pub tokens_per_sec: f64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            tokens_per_sec: 30.0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DemoModel {
    config: DemoConfig,
}

impl DemoModel {
    pub fn new(config: DemoConfig) -> Self {
        DemoModel { config }
    }
}

/// The scripted reasoning and answer texts for one question.
fn texts(question: &str) -> (String, String) {
    let quoted: String = question.chars().take(200).collect();
    let quoted = quoted.replace(['\n', '\r'], " ");
    let words = quoted.split_whitespace().count();
    let reasoning = format!(
        "The user wrote {words} words. This is the demo model, so I will not really think: \
         I will show how reasoning streams before the answer, then write a short markdown reply \
         that echoes the question."
    );
    let answer = format!(
        "## Demo answer\n\nYou asked: *{quoted}*\n\nThis reply comes from Sluice's built-in **demo** model. \
         It streams word by word so you can watch every part of the pipeline:\n\n\
         1. the run starts in the background and gets an id;\n\
         2. reasoning streams first, then this answer;\n\
         3. every event has a sequence number, so a client that drops can resume exactly where it left off.\n\n\
         ```text\nsluice serve   # embedded store, demo model\n```\n\n\
         Configure a real provider to get real answers. That is all for now."
    );
    (reasoning, answer)
}

/// The whole scripted output for one question: reasoning tokens, then answer tokens.
pub fn script(question: &str) -> (Vec<String>, Vec<String>) {
    let (reasoning, answer) = texts(question);
    let all = |text: &str| {
        let mut pos = 0;
        std::iter::from_fn(|| next_token(text, &mut pos).map(str::to_string)).collect()
    };
    (all(&reasoning), all(&answer))
}

/// The token at `*pos`: a word and the whitespace after it, so tokens concatenate to the text.
fn next_token<'a>(text: &'a str, pos: &mut usize) -> Option<&'a str> {
    let rest = &text[*pos..];
    if rest.is_empty() {
        return None;
    }
    let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    let space_end = rest[word_end..]
        .find(|c: char| !c.is_whitespace())
        .map_or(rest.len(), |i| word_end + i);
    *pos += space_end;
    Some(&rest[..space_end])
}

/// The table the demo shows in a thread's first answer (or when asked for a table).
const DEMO_TABLE: &str = r#"{"title":"What a Sluice run streams","columns":["event","what it carries"],"rows":[["run_started","the run, thread and message ids"],["reasoning_delta","the model's thinking, token by token"],["text_delta","the answer, token by token"],["function_call_delta","a tool call's arguments as they are written"],["tool_execution_progress","a running tool's current step"],["artifact_intermediate","a table, chart or document filling in"],["run_completed","usage and time to first token"]]}"#;

/// The row the demo adds when asked to "add a row" to its table.
const DEMO_ROW: [&str; 2] = ["usage", "token counts as the provider reported them"];

/// The id of the newest table a `create_table` call made in this conversation, from its result.
fn last_table(history: &[crate::ChatMessage]) -> Option<String> {
    history.iter().rev().find_map(|m| {
        if m.role != Role::Tool {
            return None;
        }
        let result: serde_json::Value = serde_json::from_str(&m.content).ok()?;
        (result["kind"] == "table")
            .then(|| result["artifact_id"].as_str().map(str::to_string))
            .flatten()
    })
}

/// The chart the demo draws when asked for one.
const DEMO_CHART: &str = r#"{"title":"Tokens per second through the week","chart_type":"bar","labels":["Mon","Tue","Wed","Thu","Fri"],"series":[{"name":"demo","values":[28,31,30,33,29]},{"name":"target","values":[30,30,30,30,30]}]}"#;

/// Where a demo stream is. Tokens are cut from the texts as they are sent, so a run costs its
/// strings, not a list of prepared events.
struct Cursor {
    reasoning: String,
    answer: String,
    /// A tool call to write after the answer: (name, arguments).
    call: Option<(&'static str, Cow<'static, str>)>,
    phase: u8,
    pos: usize,
    usage: Usage,
    stop: &'static str,
    pause: Option<Duration>,
    next_at: Option<tokio::time::Instant>,
}

/// Argument fragments are about this long, like a model writing a few tokens at a time.
const FRAGMENT: usize = 12;

impl Cursor {
    fn next_event(&mut self) -> Option<ModelEvent> {
        loop {
            let event = match self.phase {
                0 => match next_token(&self.reasoning, &mut self.pos) {
                    Some(t) => ModelEvent::ReasoningDelta(t.to_string()),
                    None => {
                        self.phase = 1;
                        self.pos = 0;
                        if self.reasoning.is_empty() {
                            continue;
                        }
                        ModelEvent::ReasoningDone
                    }
                },
                1 => match next_token(&self.answer, &mut self.pos) {
                    Some(t) => ModelEvent::TextDelta(t.to_string()),
                    None => {
                        self.phase = 2;
                        self.pos = 0;
                        ModelEvent::TextDone
                    }
                },
                2 => match &self.call {
                    Some((name, args)) if self.pos < args.len() => {
                        let mut end = (self.pos + FRAGMENT).min(args.len());
                        while !args.is_char_boundary(end) {
                            end += 1;
                        }
                        let delta = args[self.pos..end].to_string();
                        self.pos = end;
                        ModelEvent::FunctionCallDelta {
                            call_id: "demo_call_1".into(),
                            name: (*name).into(),
                            delta,
                        }
                    }
                    Some((name, args)) => {
                        self.phase = 3;
                        ModelEvent::FunctionCallDone {
                            call_id: "demo_call_1".into(),
                            name: (*name).into(),
                            arguments: args.to_string(),
                        }
                    }
                    None => {
                        self.phase = 3;
                        continue;
                    }
                },
                3 => {
                    self.phase = 4;
                    ModelEvent::Usage(self.usage)
                }
                4 => {
                    self.phase = 5;
                    ModelEvent::StopReason(self.stop.into())
                }
                _ => return None,
            };
            return Some(event);
        }
    }
}

impl Model for DemoModel {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let last_user = request.messages.iter().rposition(|m| m.role == Role::User);
        let question = last_user
            .map(|i| request.messages[i].content.clone())
            .unwrap_or_default();
        let (before, after) = request.messages.split_at(last_user.unwrap_or(0));
        let has_results = after.iter().any(|m| m.role == Role::Tool);
        let first_answer = !before.iter().any(|m| m.role == Role::Assistant);
        let offered = |name: &str| request.tools.iter().any(|t| t.name == name);
        let asks = |word: &str| question.to_lowercase().contains(word);
        let updated = after
            .iter()
            .any(|m| m.tool_name.as_deref() == Some("update_artifact"));
        let call: Option<(&'static str, Cow<'static, str>)> = if has_results {
            None
        } else if asks("add a row") && offered("update_artifact") {
            last_table(before).map(|id| {
                let args = serde_json::json!({"artifact_id": id, "append_rows": [DEMO_ROW]});
                ("update_artifact", Cow::Owned(args.to_string()))
            })
        } else if asks("chart") && offered("create_chart") {
            Some(("create_chart", Cow::Borrowed(DEMO_CHART)))
        } else if (asks("table") || first_answer) && offered("create_table") {
            Some(("create_table", Cow::Borrowed(DEMO_TABLE)))
        } else {
            None
        };
        let (reasoning, answer) = if updated {
            (
                String::new(),
                "\n\nThe table has a new version with one more row; every version is kept, so the \
                 earlier one is still there to compare."
                    .to_string(),
            )
        } else if has_results {
            (
                String::new(),
                "\n\nThat artifact arrived as a tool call: it filled in while its arguments streamed, \
                 then became final once the tool ran. Ask for a chart to watch one build up too."
                    .to_string(),
            )
        } else {
            texts(&question)
        };
        let count = |t: &str| {
            let mut pos = 0;
            std::iter::from_fn(|| next_token(t, &mut pos)).count() as u64
        };
        let input_tokens = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u64)
            .sum::<u64>();
        let call_tokens = call
            .as_ref()
            .map_or(0, |(_, args)| args.len().div_ceil(FRAGMENT) as u64);
        let (reasoning_tokens, output_tokens) = (count(&reasoning), count(&answer) + call_tokens);
        let usage = Usage {
            input_tokens,
            output_tokens,
            reasoning_tokens,
            total_tokens: input_tokens + output_tokens + reasoning_tokens,
        };
        let pause = if self.config.tokens_per_sec > 0.0 {
            Some(Duration::from_secs_f64(1.0 / self.config.tokens_per_sec))
        } else {
            None
        };
        let stop = if call.is_some() { "tool_calls" } else { "stop" };
        let cursor = Cursor {
            reasoning,
            answer,
            call,
            phase: 0,
            pos: 0,
            usage,
            stop,
            pause,
            next_at: None,
        };
        Box::pin(stream::unfold(cursor, |mut cur| async move {
            let event = cur.next_event()?;
            let paced = matches!(
                event,
                ModelEvent::TextDelta(_)
                    | ModelEvent::ReasoningDelta(_)
                    | ModelEvent::FunctionCallDelta { .. }
            );
            if paced {
                match cur.pause {
                    // Pace against a schedule, not "sleep after each token", so the rate holds
                    // whatever time the consumer spends between polls.
                    Some(p) => {
                        let now = tokio::time::Instant::now();
                        let floor = now.checked_sub(p).unwrap_or(now);
                        let at = cur.next_at.map_or(now, |t| t.max(floor));
                        tokio::time::sleep_until(at).await;
                        cur.next_at = Some(at + p);
                    }
                    None => tokio::task::yield_now().await,
                }
            }
            Some((Ok(event), cur))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_concatenate_to_the_text_and_the_script_is_deterministic() {
        let (r1, a1) = script("What is  streaming?\nTell me.");
        let (r2, a2) = script("What is  streaming?\nTell me.");
        assert_eq!((r1.clone(), a1.clone()), (r2, a2));
        assert!(
            a1.concat()
                .starts_with("## Demo answer\n\nYou asked: *What is  streaming? Tell me.*")
        );
        assert!(r1.len() > 10 && a1.len() > 50);
        assert!(a1.iter().all(|t| !t.is_empty()));
    }

    fn calls(messages: Vec<crate::ChatMessage>) -> Vec<(String, String)> {
        use futures_util::StreamExt;
        let tools: std::sync::Arc<[crate::ToolSpec]> = ["create_table", "update_artifact"]
            .iter()
            .map(|n| crate::ToolSpec {
                name: n.to_string(),
                description: String::new(),
                parameters: serde_json::json!({}),
            })
            .collect();
        let model = DemoModel::new(DemoConfig {
            tokens_per_sec: 0.0,
        });
        let stream = model.stream(ModelRequest {
            model: "demo".into(),
            messages,
            tools,
        });
        let events = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(stream.collect::<Vec<_>>());
        events
            .into_iter()
            .filter_map(|e| match e {
                Ok(ModelEvent::FunctionCallDone {
                    name, arguments, ..
                }) => Some((name, arguments)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn asked_to_add_a_row_it_updates_the_threads_table() {
        use crate::ChatMessage;
        let first = calls(vec![ChatMessage::text(Role::User, "hello")]);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].0, "create_table");
        let history = vec![
            ChatMessage::text(Role::User, "hello"),
            ChatMessage::text(Role::Assistant, "here"),
            ChatMessage::tool_result(
                "demo_call_1",
                "create_table",
                r#"{"artifact_id":"a1","kind":"table","version":1}"#,
            ),
            ChatMessage::text(Role::Assistant, "done"),
            ChatMessage::text(Role::User, "Please add a row"),
        ];
        let update = calls(history.clone());
        assert_eq!(update.len(), 1);
        assert_eq!(update[0].0, "update_artifact");
        let args: serde_json::Value = serde_json::from_str(&update[0].1).expect("json");
        assert_eq!(args["artifact_id"], "a1");
        assert_eq!(args["append_rows"][0][0], "usage");
        // With no table in the thread there is nothing to update.
        let mut no_table = history;
        no_table.remove(2);
        assert!(calls(no_table).is_empty());
    }
}
