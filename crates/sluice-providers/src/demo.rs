//! The demo model: deterministic, offline, and honest about being a demo.
//!
//! It streams a short reasoning passage, then a markdown answer that quotes the question, one word
//! (token) at a time at a configurable pace, then usage. The same question always gives the same
//! output, which the tests rely on. Pace 0 streams as fast as possible (benchmarks).

use std::time::Duration;

use futures_util::stream;
use sluice_protocol::Usage;

use crate::{Model, ModelEvent, ModelRequest, ModelStream};

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

/// The whole scripted output for one question: reasoning tokens, then answer tokens.
pub fn script(question: &str) -> (Vec<String>, Vec<String>) {
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
    (split_tokens(&reasoning), split_tokens(&answer))
}

/// Splits text into word tokens that keep their trailing whitespace, so their concatenation is the text.
fn split_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_space = false;
    for ch in text.chars() {
        if ch.is_whitespace() {
            in_space = true;
        } else if in_space {
            tokens.push(std::mem::take(&mut current));
            in_space = false;
        }
        current.push(ch);
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens
}

impl Model for DemoModel {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let question = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let (reasoning, answer) = script(&question);
        let input_tokens = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u64)
            .sum::<u64>();
        let usage = Usage {
            input_tokens,
            output_tokens: answer.len() as u64,
            reasoning_tokens: reasoning.len() as u64,
            total_tokens: input_tokens + answer.len() as u64 + reasoning.len() as u64,
        };
        let mut events = Vec::with_capacity(reasoning.len() + answer.len() + 3);
        events.extend(reasoning.into_iter().map(ModelEvent::ReasoningDelta));
        events.push(ModelEvent::ReasoningDone);
        events.extend(answer.into_iter().map(ModelEvent::TextDelta));
        events.push(ModelEvent::TextDone);
        events.push(ModelEvent::Usage(usage));
        let pause = if self.config.tokens_per_sec > 0.0 {
            Some(Duration::from_secs_f64(1.0 / self.config.tokens_per_sec))
        } else {
            None
        };
        let state = (events.into_iter(), pause, None::<tokio::time::Instant>);
        Box::pin(stream::unfold(
            state,
            |(mut events, pause, mut next_at)| async move {
                let event = events.next()?;
                let is_token = matches!(
                    event,
                    ModelEvent::TextDelta(_) | ModelEvent::ReasoningDelta(_)
                );
                if is_token {
                    match pause {
                        // Pace against a schedule, not "sleep after each token", so the rate holds
                        // whatever time the consumer spends between polls.
                        Some(p) => {
                            let now = tokio::time::Instant::now();
                            let floor = now.checked_sub(p).unwrap_or(now);
                            let at = next_at.map_or(now, |t: tokio::time::Instant| t.max(floor));
                            tokio::time::sleep_until(at).await;
                            next_at = Some(at + p);
                        }
                        None => tokio::task::yield_now().await,
                    }
                }
                Some((Ok(event), (events, pause, next_at)))
            },
        ))
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
}
