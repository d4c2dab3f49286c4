//! One run's task: the only writer of its log, so `seq` is a total order.
//!
//! It waits for the run ahead of it on the thread (if queued), emits `run_started`, reads the
//! thread's history, streams the model and maps each model event to a protocol event the moment it
//! arrives, and ends with exactly one terminal event. Every await on the model also waits on the
//! run's cancellation token; cancelling drops the model stream, which closes the upstream request.

use std::sync::Arc;

use futures_util::StreamExt;
use sluice_protocol::api::{MessageStatus, RunStatus};
use sluice_protocol::{ErrorCode, ErrorInfo, EventBody, Frame, Usage};
use sluice_providers::{ChatMessage, Model, ModelEvent, ModelRequest, Role};
use sluice_store::RunEnd;
use tokio::time::Instant;

use crate::metrics::Outcome;
use crate::{Inner, RunHandle, StopReason, now_ms};

pub(crate) struct RunTask {
    pub inner: Arc<Inner>,
    pub handle: Arc<RunHandle>,
    /// The run ahead of this one on the thread, when this one was queued behind it.
    pub predecessor: Option<Arc<RunHandle>>,
    /// Whether the thread was created for this run (no history to read).
    pub new_thread: bool,
    pub model: Arc<dyn Model>,
    /// The model as the run named it (`openai/gpt-5`, an alias, `demo`).
    pub model_name: String,
    /// The model name sent to the provider (`gpt-5`).
    pub upstream_model: String,
    pub content: String,
    /// When the run was accepted: the zero of time to first token.
    pub accepted: Instant,
}

/// How the model part of a run ended.
enum Ending {
    Completed,
    Failed(ErrorInfo),
    Stopped,
}

/// Appends events: encodes once, pushes to the log, queues the store write, counts.
struct Appender {
    handle: Arc<RunHandle>,
    inner: Arc<Inner>,
    seq: u64,
    last_append: Option<Instant>,
}

impl Appender {
    fn append(&mut self, body: &EventBody) {
        self.seq += 1;
        let frame = Frame::encode(&self.handle.id, self.seq, body);
        let kind = frame.kind();
        self.handle.log.push(frame.clone());
        self.inner.store.append_event(
            self.handle.id.clone(),
            self.handle.message_id.clone(),
            frame,
        );
        let now = Instant::now();
        if let Some(prev) = self.last_append.replace(now) {
            self.inner.metrics.chunk_latency.observe(now - prev);
        }
        self.inner.metrics.event_appended(kind);
    }
}

impl RunTask {
    pub(crate) async fn drive(self) {
        let handle = self.handle.clone();
        let mut out = Appender {
            handle: handle.clone(),
            inner: self.inner.clone(),
            seq: 0,
            last_append: None,
        };
        let mut usage = Usage::default();
        let mut ttft: Option<f64> = None;
        let mut stop_reason: Option<String> = None;

        let ending = self
            .run_model(&mut out, &mut usage, &mut ttft, &mut stop_reason)
            .await;
        let ending = match ending {
            // A cancel that races the model's last event still counts as a completion.
            Ending::Stopped => match handle.stop_reason.lock().ok().and_then(|r| r.clone()) {
                Some(reason) => Err(reason),
                None => Ok(Ending::Completed),
            },
            other => Ok(other),
        };
        let duration_ms = self.accepted.elapsed().as_secs_f64() * 1000.0;
        let (status, message_status, outcome, error) = match ending {
            Ok(Ending::Completed) | Ok(Ending::Stopped) => {
                out.append(&EventBody::RunCompleted {
                    usage,
                    time_to_first_token_ms: ttft,
                    duration_ms,
                    stop_reason: stop_reason.clone(),
                });
                (
                    RunStatus::Completed,
                    MessageStatus::Complete,
                    Outcome::Completed,
                    None,
                )
            }
            Ok(Ending::Failed(error)) => {
                out.append(&EventBody::Error {
                    error: error.clone(),
                });
                out.append(&EventBody::RunFailed {
                    error: error.clone(),
                });
                (
                    RunStatus::Failed,
                    MessageStatus::Incomplete,
                    Outcome::Failed,
                    Some(error),
                )
            }
            Err(StopReason::Cancelled(reason)) => {
                out.append(&EventBody::RunCancelled { reason });
                (
                    RunStatus::Cancelled,
                    MessageStatus::Incomplete,
                    Outcome::Cancelled,
                    None,
                )
            }
            Err(StopReason::Shutdown) => {
                let durable_seq = out.seq;
                out.append(&EventBody::RunInterrupted {
                    reason: "the server shut down while the run was in flight".into(),
                    durable_seq,
                });
                (
                    RunStatus::Interrupted,
                    MessageStatus::Incomplete,
                    Outcome::Interrupted,
                    None,
                )
            }
        };
        let _ = handle.outcome.set((status, usage, ttft, error.clone()));
        let _ = handle.ended.set(Instant::now());
        self.inner.store.finish_run(RunEnd {
            run_id: handle.id.clone(),
            message_id: handle.message_id.clone(),
            status,
            message_status,
            usage,
            time_to_first_token_ms: ttft,
            error,
            ended_at: now_ms(),
        });
        if let Ok(mut busy) = self.inner.busy.lock()
            && let Some(queue) = busy.get_mut(&handle.thread_id)
        {
            queue.retain(|r| !Arc::ptr_eq(r, &handle));
            if queue.is_empty() {
                busy.remove(&handle.thread_id);
            }
        }
        self.inner.metrics.run_ended(outcome);
        self.inner.metrics.add_usage(&usage);
        self.inner.release_run_slot(&handle.owner);
        let secs = duration_ms / 1000.0;
        tracing::info!(
            run_id = %handle.id,
            thread_id = %handle.thread_id,
            model = %self.model_name,
            outcome = outcome.as_str(),
            chunks = out.seq,
            duration_ms = format_args!("{duration_ms:.1}"),
            chunks_per_sec = format_args!("{:.1}", if secs > 0.0 { out.seq as f64 / secs } else { 0.0 }),
            ttft_ms = ttft.map(|t| format!("{t:.2}")).unwrap_or_default(),
            input_tokens = usage.input_tokens,
            output_tokens = usage.output_tokens,
            "run ended"
        );
    }

    async fn run_model(
        &self,
        out: &mut Appender,
        usage: &mut Usage,
        ttft: &mut Option<f64>,
        stop_reason: &mut Option<String>,
    ) -> Ending {
        let cancel = self.handle.cancel.clone();
        if let Some(prev) = &self.predecessor {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = prev.log.wait_closed() => {}
            }
            self.inner.store.start_run(self.handle.id.clone());
        }
        out.append(&EventBody::RunStarted {
            thread_id: self.handle.thread_id.clone(),
            message_id: self.handle.message_id.to_string(),
            model: self.model_name.clone(),
        });
        if cancel.is_cancelled() {
            return Ending::Stopped;
        }
        let messages = match self.history().await {
            Ok(m) => m,
            Err(error) => return Ending::Failed(error),
        };
        tracing::debug!(run_id = %self.handle.id, since_accepted_us = self.accepted.elapsed().as_micros() as u64, "calling the model");
        let mut stream = self.model.stream(ModelRequest {
            model: self.upstream_model.clone(),
            messages,
            tools: Vec::new(),
        });
        loop {
            let item = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ending::Stopped,
                item = stream.next() => item,
            };
            let event = match item {
                None => return Ending::Completed,
                Some(Ok(event)) => event,
                Some(Err(err)) => return Ending::Failed(ErrorInfo::new(err.code, err.message)),
            };
            let body = match event {
                ModelEvent::ReasoningDelta(delta) => {
                    ttft.get_or_insert_with(|| self.first_token());
                    EventBody::ReasoningDelta { delta }
                }
                ModelEvent::TextDelta(delta) => {
                    ttft.get_or_insert_with(|| self.first_token());
                    EventBody::TextDelta { delta }
                }
                ModelEvent::ReasoningDone => EventBody::ReasoningDone {},
                ModelEvent::TextDone => EventBody::TextDone {},
                ModelEvent::FunctionCallDelta {
                    call_id,
                    name,
                    delta,
                } => EventBody::FunctionCallDelta {
                    call_id,
                    name,
                    delta,
                },
                ModelEvent::FunctionCallDone {
                    call_id,
                    name,
                    arguments,
                } => EventBody::FunctionCallDone {
                    call_id,
                    name,
                    arguments,
                },
                ModelEvent::StopReason(reason) => {
                    *stop_reason = Some(reason);
                    continue;
                }
                ModelEvent::Usage(u) => {
                    *usage = u;
                    EventBody::Usage { usage: u }
                }
            };
            out.append(&body);
        }
    }

    fn first_token(&self) -> f64 {
        let elapsed = self.accepted.elapsed();
        self.inner.metrics.time_to_first_token.observe(elapsed);
        elapsed.as_secs_f64() * 1000.0
    }

    /// The conversation for the model: the thread's messages up to this run's user message.
    async fn history(&self) -> Result<Vec<ChatMessage>, ErrorInfo> {
        if self.new_thread {
            return Ok(vec![ChatMessage::text(Role::User, self.content.clone())]);
        }
        let thread = self
            .inner
            .store
            .get_thread(self.handle.owner.clone(), self.handle.thread_id.clone())
            .await
            .map_err(|e| {
                ErrorInfo::new(
                    ErrorCode::Internal,
                    format!("reading the thread failed: {e}"),
                )
            })?
            .ok_or_else(|| ErrorInfo::new(ErrorCode::NotFound, "the thread was deleted"))?;
        let mut messages = Vec::new();
        for m in thread.messages.unwrap_or_default() {
            let role = Role::parse(&m.role).unwrap_or(Role::User);
            if m.id == self.handle.user_message_id {
                messages.push(ChatMessage::text(role, m.content));
                break;
            }
            if !m.content.is_empty() {
                messages.push(ChatMessage::text(role, m.content));
            }
        }
        Ok(messages)
    }
}
