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

/// Where a demo stream is. Tokens are cut from the two texts as they are sent, so a run costs its
/// two strings, not a list of prepared events.
struct Cursor {
    reasoning: String,
    answer: String,
    phase: u8,
    pos: usize,
    usage: Usage,
    pause: Option<Duration>,
    next_at: Option<tokio::time::Instant>,
}

impl Cursor {
    fn next_event(&mut self) -> Option<ModelEvent> {
        let event = match self.phase {
            0 => match next_token(&self.reasoning, &mut self.pos) {
                Some(t) => ModelEvent::ReasoningDelta(t.to_string()),
                None => {
                    self.phase = 1;
                    self.pos = 0;
                    ModelEvent::ReasoningDone
                }
            },
            1 => match next_token(&self.answer, &mut self.pos) {
                Some(t) => ModelEvent::TextDelta(t.to_string()),
                None => {
                    self.phase = 2;
                    ModelEvent::TextDone
                }
            },
            2 => {
                self.phase = 3;
                ModelEvent::Usage(self.usage)
            }
            _ => return None,
        };
        Some(event)
    }
}

impl Model for DemoModel {
    fn stream(&self, request: ModelRequest) -> ModelStream {
        let question = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == crate::Role::User)
            .map(|m| m.content.clone())
            .unwrap_or_default();
        let (reasoning, answer) = texts(&question);
        let count = |t: &str| {
            let mut pos = 0;
            std::iter::from_fn(|| next_token(t, &mut pos)).count() as u64
        };
        let input_tokens = request
            .messages
            .iter()
            .map(|m| m.content.split_whitespace().count() as u64)
            .sum::<u64>();
        let (reasoning_tokens, output_tokens) = (count(&reasoning), count(&answer));
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
        let cursor = Cursor {
            reasoning,
            answer,
            phase: 0,
            pos: 0,
            usage,
            pause,
            next_at: None,
        };
        Box::pin(stream::unfold(cursor, |mut cur| async move {
            let event = cur.next_event()?;
            let is_token = matches!(
                event,
                ModelEvent::TextDelta(_) | ModelEvent::ReasoningDelta(_)
            );
            if is_token {
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
}
