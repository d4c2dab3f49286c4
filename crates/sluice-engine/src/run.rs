//! One run's task: the only writer of its log, so `seq` is a total order.
//!
//! It waits for the run ahead of it on the thread (if queued), emits `run_started`, reads the
//! thread's history, streams the model and maps each model event to a protocol event the moment it
//! arrives, and ends with exactly one terminal event. Every await on the model also waits on the
//! run's cancellation token; cancelling drops the model stream, which closes the upstream request.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use sluice_protocol::api::{ArtifactKind, ArtifactStatus, ArtifactView, MessageStatus, RunStatus};
use sluice_protocol::{ErrorCode, ErrorInfo, EventBody, Frame, Usage};
use sluice_providers::{ChatMessage, Model, ModelEvent, ModelRequest, Role, ToolCall};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::tools::{Report, ToolContext};
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
    /// The agent the run uses (system prompt, step limit).
    pub agent: crate::Agent,
    /// The tools the agent offers the model.
    pub tools: Arc<[sluice_providers::ToolSpec]>,
    /// Artifacts shown as intermediate and not yet final: discarded if the run ends first.
    pub drafts_shown: std::sync::Mutex<std::collections::HashSet<String>>,
    pub content: String,
    /// When the run was accepted: the zero of time to first token.
    pub accepted: Instant,
}

/// What one model call produced: its text, its calls, and (once they ran) their results.
#[derive(Default)]
struct Turn {
    text: String,
    calls: Vec<ToolCall>,
    results: Vec<ChatMessage>,
}

/// The calls of one step in flight, and where they report.
struct Running {
    calls: JoinSet<(String, String, Result<serde_json::Value, String>)>,
    /// Which call each task runs, to answer it even if the task panics.
    tasks: HashMap<tokio::task::Id, (String, String)>,
    reports: Option<mpsc::Sender<Report>>,
    rx: Option<mpsc::Receiver<Report>>,
}

/// The next report, or never when no call has started yet.
async fn recv(rx: &mut Option<mpsc::Receiver<Report>>) -> Option<Report> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The least time between two intermediate states of an artifact being written.
const DRAFT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// An artifact-creating call whose arguments are still being written.
struct Draft {
    kind: ArtifactKind,
    artifact_id: String,
    arguments: String,
    shown_at: Option<Instant>,
    /// The data last published, so an unchanged state is not sent again.
    shown: serde_json::Value,
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
    /// The next event: shown to subscribers first (the first token's path), then queued to the
    /// store.
    fn append(&mut self, body: &EventBody) {
        let frame = self.encode(body);
        self.publish(frame.clone());
        self.store(frame);
    }

    fn encode(&mut self, body: &EventBody) -> Frame {
        self.seq += 1;
        Frame::encode(&self.handle.id, self.seq, body)
    }

    fn store(&self, frame: Frame) {
        self.inner.store.append_event(
            self.handle.id.clone(),
            self.handle.message_id.clone(),
            frame,
        );
    }

    fn publish(&mut self, frame: Frame) {
        let kind = frame.kind();
        self.handle.log.push(frame);
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

        let mut turns: Vec<ChatMessage> = Vec::new();
        let mut kept = None;
        let ending = self
            .run_model(
                &mut out,
                &mut usage,
                &mut ttft,
                &mut stop_reason,
                &mut turns,
                &mut kept,
            )
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
        let (terminal, mut status, message_status, mut outcome, error) = match ending {
            Ok(Ending::Completed) | Ok(Ending::Stopped) => (
                EventBody::RunCompleted {
                    usage,
                    time_to_first_token_ms: ttft,
                    duration_ms,
                    stop_reason: stop_reason.clone(),
                },
                RunStatus::Completed,
                MessageStatus::Complete,
                Outcome::Completed,
                None,
            ),
            Ok(Ending::Failed(error)) | Err(StopReason::StoreFailed(error)) => {
                out.append(&EventBody::Error {
                    error: error.clone(),
                });
                (
                    EventBody::RunFailed {
                        error: error.clone(),
                    },
                    RunStatus::Failed,
                    MessageStatus::Incomplete,
                    Outcome::Failed,
                    Some(error),
                )
            }
            Err(StopReason::Cancelled(reason)) => (
                EventBody::RunCancelled { reason },
                RunStatus::Cancelled,
                MessageStatus::Incomplete,
                Outcome::Cancelled,
                None,
            ),
            Err(StopReason::Shutdown) => (
                EventBody::RunInterrupted {
                    reason: "the server shut down while the run was in flight".into(),
                    durable_seq: out.seq,
                },
                RunStatus::Interrupted,
                MessageStatus::Incomplete,
                Outcome::Interrupted,
                None,
            ),
        };
        // An artifact whose creating call never ran was never made: drop its intermediate state.
        let abandoned: Vec<String> = self
            .drafts_shown
            .lock()
            .map(|mut s| s.drain().collect())
            .unwrap_or_default();
        for id in abandoned {
            self.inner.store.discard_artifact_draft(id);
        }
        // The terminal event reaches subscribers only once it and the run's end (status, usage,
        // turns) are committed, in one transaction: what a client is told has ended is durable,
        // and whatever a subscriber does on seeing it (a queued run on the thread reads the
        // history, `wait` reads the message) finds the run ended.
        let mut terminal = out.encode(&terminal);
        let mut error = error;
        let end = RunEnd {
            run_id: handle.id.clone(),
            message_id: handle.message_id.clone(),
            status,
            message_status,
            usage,
            time_to_first_token_ms: ttft,
            error: error.clone(),
            ended_at: now_ms(),
            turns: (!turns.is_empty()).then(|| crate::turns::to_json(&turns).to_string()),
        };
        if let Err(err) = self.inner.store.finish_run(end, terminal.clone()).await {
            // The end cannot be stored: the run fails, and says why, instead of claiming an
            // ending the store does not have.
            tracing::error!(run_id = %handle.id, error = %err, "run's end not stored");
            out.seq -= 1;
            let failure = crate::store_failure(&err);
            if !matches!(outcome, Outcome::Failed)
                || error.as_ref().is_none_or(|e| e.code != failure.code)
            {
                let frame = out.encode(&EventBody::Error {
                    error: failure.clone(),
                });
                out.publish(frame);
            }
            terminal = out.encode(&EventBody::RunFailed {
                error: failure.clone(),
            });
            status = RunStatus::Failed;
            outcome = Outcome::Failed;
            error = Some(failure);
        }
        // Before the terminal event: a run that starts once this one is finished must find the
        // thread's conversation as it now is. A run that did not complete leaves it to the store.
        let completed = matches!(outcome, Outcome::Completed);
        self.inner
            .keep_history(&handle.owner, &handle.thread_id, kept.filter(|_| completed));
        let _ = handle.outcome.set((status, usage, ttft, error));
        let _ = handle.ended.set(Instant::now());
        out.publish(terminal);
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
        turns: &mut Vec<ChatMessage>,
        kept: &mut Option<Vec<ChatMessage>>,
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
        let mut messages = match self.history().await {
            Ok(m) => m,
            Err(error) => return Ending::Failed(error),
        };
        // The conversation up to this run's message; what the model answers is added to it.
        let history_len = messages.len();
        let system = self.agent.system_prompt.is_some();
        if let Some(prompt) = &self.agent.system_prompt {
            messages.insert(0, ChatMessage::text(Role::System, prompt.clone()));
        }
        let max_steps = self
            .agent
            .max_steps
            .unwrap_or(self.inner.config.max_steps)
            .max(1);
        for step in 1..=max_steps {
            tracing::debug!(run_id = %self.handle.id, step, since_accepted_us = self.accepted.elapsed().as_micros() as u64, "calling the model");
            let stream = self.model.stream(ModelRequest {
                model: self.upstream_model.clone(),
                messages: messages.clone(),
                tools: self.tools.clone(),
            });
            let turn = match self.step(stream, out, usage, ttft, stop_reason).await {
                Ok(turn) => turn,
                Err(ending) => return ending,
            };
            if turn.calls.is_empty() {
                let answer = if turns.is_empty() {
                    (!turn.text.is_empty()).then(|| ChatMessage::text(Role::Assistant, turn.text))
                } else {
                    turns.push(ChatMessage::text(Role::Assistant, turn.text));
                    None
                };
                *kept = Some(conversation(messages, system, history_len, turns, answer));
                return Ending::Completed;
            }
            // The model called tools: their results go back to it for the next step, and the
            // turns are kept with the message so that later runs see them too.
            let call_turn = ChatMessage::assistant_calls(turn.text, turn.calls);
            turns.push(call_turn.clone());
            turns.extend(turn.results.iter().cloned());
            messages.push(call_turn);
            messages.extend(turn.results);
            if step == max_steps {
                tracing::warn!(run_id = %self.handle.id, max_steps, "run stopped at its step limit");
                *stop_reason = Some("max_steps".into());
            }
        }
        *kept = Some(conversation(messages, system, history_len, turns, None));
        Ending::Completed
    }

    /// One model call: streams its events while running every function call as soon as its
    /// arguments are complete (calls that come together run concurrently), and waits for the calls
    /// before returning. Only this task appends: tools report progress through a channel.
    async fn step(
        &self,
        mut stream: sluice_providers::ModelStream,
        out: &mut Appender,
        usage: &mut Usage,
        ttft: &mut Option<f64>,
        stop_reason: &mut Option<String>,
    ) -> Result<Turn, Ending> {
        let cancel = self.handle.cancel.clone();
        let mut turn = Turn::default();
        let mut results: HashMap<String, ChatMessage> = HashMap::new();
        // Dropping the set (on cancel or failure) aborts every running call. The report channel
        // is made with the first call: most steps call nothing.
        let mut running = Running {
            calls: JoinSet::new(),
            tasks: HashMap::new(),
            reports: None,
            rx: None,
        };
        let mut drafts: HashMap<String, Draft> = HashMap::new();
        let mut model_done = false;
        let step_start = out.seq;
        let mut first_shown = false;
        while !(model_done && running.calls.is_empty()) {
            // The step's first output is handed to the subscribers' tasks before this task goes
            // on: when it came with more (a short answer in one read, a burst), the rest of the
            // burst and, for an answer that is complete, the run's whole ending would otherwise
            // run first.
            if !first_shown && out.seq > step_start {
                first_shown = true;
                tokio::task::yield_now().await;
            }
            let Running { calls, rx, .. } = &mut running;
            let busy = !calls.is_empty();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Ending::Stopped),
                Some(report) = recv(rx) => self.report(out, report),
                Some(joined) = calls.join_next_with_id(), if busy => {
                    let (call_id, tool_name, result) = match joined {
                        Ok((id, r)) => {
                            running.tasks.remove(&id);
                            r
                        }
                        // A tool that panicked still answers its call, or the model's next turn
                        // would hold a call without a result (which providers reject).
                        Err(e) => {
                            tracing::error!(run_id = %self.handle.id, error = %e, "a tool task panicked");
                            let Some((call_id, name)) = running.tasks.remove(&e.id()) else { continue };
                            (call_id, name, Err("the tool crashed".to_string()))
                        }
                    };
                    let message = self.finish_call(out, &call_id, &tool_name, result);
                    results.insert(call_id, message);
                }
                item = stream.next(), if !model_done => {
                    let event = match item {
                        None => {
                            model_done = true;
                            continue;
                        }
                        Some(Ok(event)) => event,
                        Some(Err(err)) => return Err(Ending::Failed(ErrorInfo::new(err.code, err.message))),
                    };
                    let body = match event {
                        ModelEvent::ReasoningDelta(delta) => {
                            ttft.get_or_insert_with(|| self.first_token());
                            EventBody::ReasoningDelta { delta }
                        }
                        ModelEvent::TextDelta(delta) => {
                            ttft.get_or_insert_with(|| self.first_token());
                            turn.text.push_str(&delta);
                            EventBody::TextDelta { delta }
                        }
                        ModelEvent::ReasoningDone => EventBody::ReasoningDone {},
                        ModelEvent::TextDone => EventBody::TextDone {},
                        ModelEvent::FunctionCallDelta { call_id, name, delta } => {
                            let body = EventBody::FunctionCallDelta { call_id, name, delta };
                            out.append(&body);
                            if let EventBody::FunctionCallDelta { call_id, name, delta } = &body {
                                self.draft(out, &mut drafts, call_id, name, delta);
                            }
                            continue;
                        }
                        ModelEvent::FunctionCallDone { call_id, name, arguments } => {
                            out.append(&EventBody::FunctionCallDone {
                                call_id: call_id.clone(),
                                name: name.clone(),
                                arguments: arguments.clone(),
                            });
                            turn.calls.push(ToolCall { id: call_id.clone(), name: name.clone(), arguments: arguments.clone() });
                            let artifact_id = drafts.remove(&call_id).map(|d| d.artifact_id);
                            if let Some(rejected) = self.start_call(out, &mut running, call_id.clone(), name, &arguments, artifact_id) {
                                results.insert(call_id, rejected);
                            }
                            continue;
                        }
                        ModelEvent::StopReason(reason) => {
                            *stop_reason = Some(reason);
                            continue;
                        }
                        ModelEvent::Usage(u) => {
                            usage.input_tokens += u.input_tokens;
                            usage.output_tokens += u.output_tokens;
                            usage.reasoning_tokens += u.reasoning_tokens;
                            usage.total_tokens += u.total_tokens;
                            EventBody::Usage { usage: u }
                        }
                    };
                    out.append(&body);
                }
            }
        }
        // Results in the order of the calls, as the providers expect.
        turn.results = turn
            .calls
            .iter()
            .filter_map(|c| results.remove(&c.id))
            .collect();
        Ok(turn)
    }

    /// Validates a call and starts it. Answers the result message at once when the call cannot
    /// run (unknown tool, invalid arguments): the model sees why and can correct itself.
    fn start_call(
        &self,
        out: &mut Appender,
        running: &mut Running,
        call_id: String,
        name: String,
        arguments: &str,
        artifact_id: Option<String>,
    ) -> Option<ChatMessage> {
        out.append(&EventBody::ToolExecutionStarted {
            call_id: call_id.clone(),
            tool_name: name.clone(),
        });
        let offered = self
            .agent
            .tools
            .as_ref()
            .is_none_or(|names| names.contains(&name));
        let Some((tool, spec)) = self.inner.tools.get(&name).filter(|_| offered) else {
            let err = format!("there is no tool named {name:?}");
            return Some(self.finish_call(out, &call_id, &name, Err(err)));
        };
        let args: serde_json::Value = match serde_json::from_str(arguments) {
            Ok(v) => v,
            Err(e) => {
                let err = format!("the arguments are not valid JSON: {e}");
                return Some(self.finish_call(out, &call_id, &name, Err(err)));
            }
        };
        let tool = tool.clone();
        if let Err(errors) = crate::schema::validate(&spec.parameters, &args) {
            let err = format!("invalid arguments: {}", errors.join("; "));
            return Some(self.finish_call(out, &call_id, &name, Err(err)));
        }
        let reports = match &running.reports {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::channel(64);
                running.rx = Some(rx);
                running.reports.insert(tx).clone()
            }
        };
        let mut ctx = ToolContext::new(
            &self.handle,
            call_id.clone(),
            name.clone(),
            reports,
            self.handle.cancel.child_token(),
        );
        ctx.artifact_id = artifact_id;
        let task = running.calls.spawn({
            let (call_id, name) = (call_id.clone(), name.clone());
            async move {
                let result = tool.call(args, ctx).await;
                (call_id, name, result)
            }
        });
        running.tasks.insert(task.id(), (call_id, name));
        None
    }

    /// Shows an artifact while the model is still writing the call that creates it: the arguments
    /// so far are read as partial JSON and, at most every `DRAFT_INTERVAL`, published as the
    /// artifact's intermediate state (same id and version as the final one to come).
    fn draft(
        &self,
        out: &mut Appender,
        drafts: &mut HashMap<String, Draft>,
        call_id: &str,
        name: &str,
        delta: &str,
    ) {
        let Some(kind) = crate::artifacts::creates(name) else {
            return;
        };
        let draft = drafts.entry(call_id.to_string()).or_insert_with(|| Draft {
            kind,
            artifact_id: crate::new_id(),
            arguments: String::new(),
            shown_at: None,
            shown: serde_json::Value::Null,
        });
        draft.arguments.push_str(delta);
        if draft.shown_at.is_some_and(|t| t.elapsed() < DRAFT_INTERVAL) {
            return;
        }
        let Some(partial) = crate::partial_json::parse_partial(&draft.arguments) else {
            return;
        };
        let data = crate::artifacts::intermediate_data(draft.kind, &partial);
        if data == draft.shown {
            return;
        }
        draft.shown = data.clone();
        draft.shown_at = Some(Instant::now());
        let artifact = ArtifactView {
            id: draft.artifact_id.clone(),
            thread_id: self.handle.thread_id.clone(),
            run_id: self.handle.id.to_string(),
            kind: draft.kind,
            title: partial["title"].as_str().unwrap_or_default().to_string(),
            version: 1,
            status: ArtifactStatus::Intermediate,
            data,
            created_at: crate::now_ms(),
        };
        self.report(out, Report::Artifact(Box::new(artifact)));
    }

    /// Appends what a running call reported; an artifact version is also stored.
    fn report(&self, out: &mut Appender, report: Report) {
        match report {
            Report::Progress {
                call_id,
                tool_name,
                progress,
            } => out.append(&EventBody::ToolExecutionProgress {
                call_id,
                tool_name,
                step: progress.step,
                fraction: progress.fraction,
                message: progress.message,
            }),
            Report::Artifact(artifact) => {
                if let Ok(mut shown) = self.drafts_shown.lock() {
                    match artifact.status {
                        ArtifactStatus::Intermediate => shown.insert(artifact.id.clone()),
                        ArtifactStatus::Final => shown.remove(&artifact.id),
                    };
                }
                let value = serde_json::to_value(&artifact).unwrap_or_default();
                out.append(&match artifact.status {
                    ArtifactStatus::Intermediate => {
                        EventBody::ArtifactIntermediate { artifact: value }
                    }
                    ArtifactStatus::Final => EventBody::ArtifactFinal { artifact: value },
                });
                self.inner.store.put_artifact(*artifact);
            }
        }
    }

    /// Appends a call's outcome and answers the tool message that carries it back to the model.
    fn finish_call(
        &self,
        out: &mut Appender,
        call_id: &str,
        tool_name: &str,
        result: Result<serde_json::Value, String>,
    ) -> ChatMessage {
        match result {
            Ok(value) => {
                let content = value.to_string();
                out.append(&EventBody::ToolExecutionCompleted {
                    call_id: call_id.to_string(),
                    tool_name: tool_name.to_string(),
                    result: value,
                });
                ChatMessage::tool_result(call_id, tool_name, content)
            }
            Err(message) => {
                out.append(&EventBody::ToolExecutionFailed {
                    call_id: call_id.to_string(),
                    tool_name: tool_name.to_string(),
                    error: ErrorInfo::new(ErrorCode::ToolError, message.clone()),
                });
                let content = serde_json::json!({ "error": message }).to_string();
                ChatMessage::tool_result(call_id, tool_name, content)
            }
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
        let owner = &self.handle.owner;
        if let Some(kept) = self.inner.kept_history(owner, &self.handle.thread_id) {
            self.inner.metrics.history_read(true);
            let mut messages = Vec::with_capacity(kept.len() + 1);
            messages.extend(kept.iter().cloned());
            messages.push(ChatMessage::text(Role::User, self.content.clone()));
            return Ok(messages);
        }
        self.inner.metrics.history_read(false);
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
        // Reads see what is committed: everything before this run is (a run's end commits before
        // its terminal event, and the run ahead ended before this one started), but this run's
        // own message may still be queued, and then it is the last one.
        let mut messages = Vec::new();
        let mut own = Some(ChatMessage::text(Role::User, self.content.clone()));
        for m in thread.messages.unwrap_or_default() {
            let role = Role::parse(&m.role).unwrap_or(Role::User);
            if m.id == self.handle.user_message_id {
                own = Some(ChatMessage::text(role, m.content));
                break;
            }
            // A run that called tools left its turns: the model sees the calls and results too.
            match m.turns.as_ref().map(crate::turns::from_json) {
                Some(turns) if !turns.is_empty() => messages.extend(turns),
                _ if !m.content.is_empty() => messages.push(ChatMessage::text(role, m.content)),
                _ => {}
            }
        }
        messages.extend(own);
        Ok(messages)
    }
}

/// The thread's conversation after a completed run, as `RunTask::history` would read it back from
/// the store for the next run: the history the run was given (`messages` without the system
/// prompt and the tool steps), then the run's turns when it called tools, else its answer.
fn conversation(
    mut messages: Vec<ChatMessage>,
    system: bool,
    history_len: usize,
    turns: &[ChatMessage],
    answer: Option<ChatMessage>,
) -> Vec<ChatMessage> {
    if system && !messages.is_empty() {
        messages.remove(0);
    }
    messages.truncate(history_len);
    messages.extend(turns.iter().cloned());
    messages.extend(answer);
    messages
}

/// A thread's conversation as its next run will send it (without that run's own message).
pub(crate) struct KeptHistory {
    owner: String,
    messages: Arc<Vec<ChatMessage>>,
    bytes: usize,
}

/// The conversations kept in memory (`EngineConfig::history_cache`), by thread id.
#[derive(Default)]
pub(crate) struct KeptHistories {
    threads: HashMap<String, KeptHistory>,
    bytes: usize,
}

/// The most memory kept conversations may take; past it the map starts over.
const MAX_KEPT_BYTES: usize = 32 << 20;
/// A longer conversation is not kept (its thread's next run reads the store).
const MAX_KEPT_THREAD_BYTES: usize = 1 << 20;

/// About the memory `messages` take.
fn weight(messages: &[ChatMessage]) -> usize {
    messages
        .iter()
        .map(|m| {
            let calls: usize = m
                .tool_calls
                .iter()
                .map(|c| c.id.len() + c.name.len() + c.arguments.len() + 64)
                .sum();
            std::mem::size_of::<ChatMessage>()
                + m.content.len()
                + calls
                + m.tool_call_id.as_ref().map_or(0, String::len)
                + m.tool_name.as_ref().map_or(0, String::len)
        })
        .sum()
}

impl KeptHistories {
    fn get(&self, owner: &str, thread_id: &str) -> Option<Arc<Vec<ChatMessage>>> {
        self.threads
            .get(thread_id)
            .filter(|k| k.owner == owner)
            .map(|k| k.messages.clone())
    }

    /// Keeps `messages` as `thread_id`'s conversation, or forgets it (`None`).
    fn keep(&mut self, owner: &str, thread_id: &str, messages: Option<Vec<ChatMessage>>) {
        if let Some(old) = self.threads.remove(thread_id) {
            self.bytes -= old.bytes;
        }
        let Some(messages) = messages else {
            return;
        };
        let bytes = weight(&messages);
        if bytes > MAX_KEPT_THREAD_BYTES {
            return;
        }
        if self.bytes + bytes > MAX_KEPT_BYTES {
            *self = KeptHistories::default();
        }
        self.bytes += bytes;
        self.threads.insert(
            thread_id.to_string(),
            KeptHistory {
                owner: owner.to_string(),
                messages: Arc::new(messages),
                bytes,
            },
        );
    }
}

impl Inner {
    /// The conversation kept for `thread_id` after its last completed run, if `owner`'s.
    fn kept_history(&self, owner: &str, thread_id: &str) -> Option<Arc<Vec<ChatMessage>>> {
        if !self.config.history_cache {
            return None;
        }
        self.histories.lock().ok()?.get(owner, thread_id)
    }

    /// Keeps `messages` as `thread_id`'s conversation, or forgets it (`None`): the next run then
    /// reads the thread from the store.
    pub(crate) fn keep_history(
        &self,
        owner: &str,
        thread_id: &str,
        messages: Option<Vec<ChatMessage>>,
    ) {
        if let Ok(mut kept) = self.histories.lock() {
            kept.keep(
                owner,
                thread_id,
                messages.filter(|_| self.config.history_cache),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn talk(bytes: usize) -> Vec<ChatMessage> {
        vec![ChatMessage::text(Role::User, "x".repeat(bytes))]
    }

    #[test]
    fn kept_histories_stay_within_their_memory_budget() {
        let mut kept = KeptHistories::default();
        kept.keep("o", "t1", Some(talk(10)));
        assert_eq!(kept.get("o", "t1").map(|m| m[0].content.len()), Some(10));
        // Another owner does not see it; replacing it counts the new size only.
        assert!(kept.get("p", "t1").is_none());
        kept.keep("o", "t1", Some(talk(20)));
        assert_eq!(kept.bytes, weight(&talk(20)));
        // Forgetting gives the bytes back.
        kept.keep("o", "t1", None);
        assert!(kept.get("o", "t1").is_none());
        assert_eq!(kept.bytes, 0);
        // A conversation over the per-thread limit is not kept.
        kept.keep("o", "big", Some(talk(MAX_KEPT_THREAD_BYTES + 1)));
        assert!(kept.get("o", "big").is_none());
        // Past the total budget the map starts over, and never holds more than the budget.
        let n = MAX_KEPT_BYTES / weight(&talk(MAX_KEPT_THREAD_BYTES / 2)) + 2;
        for i in 0..n {
            kept.keep("o", &format!("t{i}"), Some(talk(MAX_KEPT_THREAD_BYTES / 2)));
            assert!(kept.bytes <= MAX_KEPT_BYTES);
        }
        assert!(kept.get("o", &format!("t{}", n - 1)).is_some());
        assert!(kept.get("o", "t0").is_none());
    }
}
