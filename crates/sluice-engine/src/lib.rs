//! Sluice's engine: runs that do not depend on connections.
//!
//! [`Engine`] accepts a user message, creates the run and spawns its task (`run.rs`), which streams
//! the model and appends every event to the run's [`EventLog`] and to the store's write queue.
//! Clients follow a run through a [`Subscription`] — a cursor into the log — from any `seq`, as
//! often as they like; a subscriber leaving changes nothing for the run.
//!
//! No HTTP and no SQL here: the engine sees storage through [`sluice_store::Store`] and models
//! through [`sluice_providers::Model`].

pub mod artifacts;
pub mod event_log;
pub mod metrics;
pub mod partial_json;
mod run;
pub mod schema;
pub mod tools;
mod turns;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_protocol::api::{
    MessageView, OnBusy, RunRequest, RunStatus, RunView, ThreadView, WaitResponse,
};
use sluice_protocol::{Cursor, ErrorCode, Usage};
use sluice_providers::registry::{ModelCatalog, ModelInfo};
use sluice_store::{NewRun, NewThread, Store, StoreError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use event_log::{Coalesce, EventLog, Subscription};
pub use metrics::Metrics;
pub use tools::{Tool, ToolContext, ToolRegistry};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error(
        "the server restarted after a crash and kept this run's events up to seq {durable_seq}; \
         the cursor is past that: reload the run (GET /v1/runs/{{id}}) and follow it again from 0"
    )]
    StreamReset { durable_seq: u64 },
    #[error("{0}")]
    RateLimited(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EngineError::NotFound(_) => ErrorCode::NotFound,
            EngineError::Conflict(_) => ErrorCode::Conflict,
            EngineError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            EngineError::StreamReset { .. } => ErrorCode::StreamReset,
            EngineError::RateLimited(_) => ErrorCode::RateLimited,
            EngineError::ShuttingDown => ErrorCode::Unavailable,
            EngineError::Store(e) if e.is_unavailable() => ErrorCode::Unavailable,
            EngineError::Store(_) => ErrorCode::Internal,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The model a run uses when it names none.
    pub default_model: String,
    /// How subscribers merge deltas by default.
    pub coalesce: Coalesce,
    /// How long a finished run's log stays in memory for fast replay before replay reads the store.
    pub retention: Duration,
    /// The longest user message accepted, in bytes.
    pub max_content_bytes: usize,
    /// The most unfinished (running or queued) runs one owner may have; 0 = no limit.
    pub max_active_runs_per_owner: usize,
    /// The most model calls in one run (each step runs the tools the model called, then calls it again).
    pub max_steps: u32,
    /// Named agents; a run may name one.
    pub agents: HashMap<String, Agent>,
    /// The agent of runs that name none (none: all tools, the default model, no system prompt).
    pub default_agent: Option<String>,
    /// Keep each thread's conversation in memory after a run completes, so that the next
    /// message's run calls the model without reading the thread from the store first (a round
    /// trip to the writer thread on the first token's path). Only for a store no other process
    /// writes to.
    pub history_cache: bool,
}

/// A named configuration of a run: which model, with what instructions, which tools, how many steps.
#[derive(Debug, Clone, Default)]
pub struct Agent {
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    /// The tools offered, by name; all registered tools when `None`.
    pub tools: Option<Vec<String>>,
    pub max_steps: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            default_model: "demo".into(),
            coalesce: Coalesce::default(),
            retention: Duration::from_secs(60),
            max_content_bytes: 256 * 1024,
            max_active_runs_per_owner: 0,
            max_steps: 8,
            agents: HashMap::new(),
            default_agent: None,
            history_cache: true,
        }
    }
}

/// Why a run stopped before its model finished.
#[derive(Debug, Clone)]
pub(crate) enum StopReason {
    Cancelled(String),
    Shutdown,
    /// The store gave up this run's writes (it failed past its bound).
    StoreFailed(sluice_protocol::ErrorInfo),
}

/// A run the engine knows in memory: running, queued, or recently ended.
pub struct RunHandle {
    pub id: Arc<str>,
    pub thread_id: String,
    pub owner: String,
    pub model: String,
    pub message_id: Arc<str>,
    pub user_message_id: String,
    pub created_at: i64,
    log: Arc<EventLog>,
    cancel: CancellationToken,
    stop_reason: Mutex<Option<StopReason>>,
    /// When the terminal event was appended; drives eviction from memory.
    ended: OnceLock<Instant>,
    outcome: OnceLock<(
        RunStatus,
        Usage,
        Option<f64>,
        Option<sluice_protocol::ErrorInfo>,
    )>,
}

impl RunHandle {
    pub fn log(&self) -> &Arc<EventLog> {
        &self.log
    }

    pub fn is_finished(&self) -> bool {
        self.log.is_closed()
    }

    fn stop(&self, reason: StopReason) {
        if let Ok(mut r) = self.stop_reason.lock()
            && r.is_none()
        {
            *r = Some(reason);
        }
        self.cancel.cancel();
    }

    /// Cancels the run (no effect once it has ended).
    pub fn cancel(&self, reason: impl Into<String>) {
        self.stop(StopReason::Cancelled(reason.into()));
    }

    fn view(&self) -> RunView {
        let (status, usage, ttft, error) = match self.outcome.get() {
            Some((s, u, t, e)) => (*s, *u, *t, e.clone()),
            None => (RunStatus::Running, Usage::default(), None, None),
        };
        RunView {
            id: self.id.to_string(),
            thread_id: self.thread_id.clone(),
            model: self.model.clone(),
            status,
            user_message_id: self.user_message_id.clone(),
            message_id: self.message_id.to_string(),
            usage,
            time_to_first_token_ms: ttft,
            last_seq: self.log.len(),
            error,
            created_at: self.created_at,
            ended_at: None,
        }
    }
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    models: Arc<dyn ModelCatalog>,
    tools: Arc<ToolRegistry>,
    config: EngineConfig,
    /// Runs in memory by id.
    runs: Mutex<HashMap<Arc<str>, Arc<RunHandle>>>,
    /// Threads known to exist, with their owner: spares a store round trip when a run starts on an
    /// existing thread. Bounded: cleared when it reaches `KNOWN_THREADS_MAX`.
    /// The tools offered by each agent of `config.agents`.
    agent_tools: HashMap<String, Arc<[sluice_providers::ToolSpec]>>,
    known_threads: Mutex<HashMap<String, String>>,
    /// Thread id → its conversation after its last completed run (`EngineConfig::history_cache`).
    histories: Mutex<run::KeptHistories>,
    /// Unfinished runs per owner, for `max_active_runs_per_owner`.
    active_by_owner: Mutex<HashMap<String, usize>>,
    /// The unfinished runs of each thread, oldest first: the running one, then those queued.
    busy: Mutex<HashMap<String, Vec<Arc<RunHandle>>>>,
    /// Starts by (owner, idempotency key): a retried start finds the run the first one made.
    keyed_starts: Mutex<HashMap<(String, String), Arc<KeyedStart>>>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Inner {
    /// A key lives as long as its run is in memory, or while a start with it is going on.
    fn forget_keys(&self) {
        let (Ok(runs), Ok(mut keyed)) = (self.runs.lock(), self.keyed_starts.lock()) else {
            return;
        };
        keyed.retain(|_, k| match k.started.try_lock() {
            Ok(started) => started
                .as_ref()
                .is_some_and(|s| runs.contains_key(&s.run.id)),
            Err(_) => true,
        });
    }
}

/// One idempotency key: locked by the starts that carry it, holding what the first one started.
#[derive(Default)]
pub(crate) struct KeyedStart {
    started: tokio::sync::Mutex<Option<Started>>,
}

/// The request a key was first used for, and the run it made.
pub(crate) struct Started {
    thread_id: Option<String>,
    content: String,
    run: Arc<RunHandle>,
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Builds an engine over `store` with the models of `models` and starts its eviction sweep.
    pub fn new(
        store: Arc<dyn Store>,
        models: Arc<dyn ModelCatalog>,
        tools: Arc<ToolRegistry>,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        // Each agent's tools, filtered once: a run hands the same list to its model every time
        // (a provider keeps the list's JSON while it is the same list).
        let agent_tools = config
            .agents
            .iter()
            .map(|(name, agent)| {
                let specs = match &agent.tools {
                    Some(names) => tools
                        .specs()
                        .iter()
                        .filter(|t| names.contains(&t.name))
                        .cloned()
                        .collect(),
                    None => tools.specs(),
                };
                (name.clone(), specs)
            })
            .collect();
        let inner = Arc::new(Inner {
            store,
            models,
            tools,
            agent_tools,
            config,
            runs: Mutex::new(HashMap::new()),
            known_threads: Mutex::new(HashMap::new()),
            histories: Mutex::new(run::KeptHistories::default()),
            active_by_owner: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            keyed_starts: Mutex::new(HashMap::new()),
            metrics,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        let sweeper = Arc::downgrade(&inner);
        let stop = inner.shutdown.clone();
        inner.tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(inner) = sweeper.upgrade() else {
                    return;
                };
                inner.forget_keys();
                let retention = inner.config.retention;
                let expired: Vec<Arc<str>> = match inner.runs.lock() {
                    Ok(runs) => runs
                        .iter()
                        .filter(|(_, h)| h.ended.get().is_some_and(|t| t.elapsed() >= retention))
                        .map(|(id, _)| id.clone())
                        .collect(),
                    Err(_) => continue,
                };
                if expired.is_empty() {
                    continue;
                }
                // Replay moves to the store only once the store surely has every event of these runs.
                if inner.store.flush().await.is_err() {
                    continue;
                }
                if let Ok(mut runs) = inner.runs.lock() {
                    for id in expired {
                        runs.remove(&id);
                    }
                }
            }
        });
        inner.tracker.spawn(watch_store(Arc::downgrade(&inner)));
        Engine { inner }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The Prometheus text: the engine's metrics plus the store's queue and health.
    pub fn render_metrics(&self) -> String {
        let mut out = self.inner.metrics.render();
        let store = &self.inner.store;
        let status = store.status().borrow().clone();
        out.push_str(&format!(
            "# HELP sluice_store_queue_depth Store operations queued and not yet committed.\n\
             # TYPE sluice_store_queue_depth gauge\nsluice_store_queue_depth {}\n\
             # HELP sluice_store_queue_bytes Bytes of store writes queued and not yet committed.\n\
             # TYPE sluice_store_queue_bytes gauge\nsluice_store_queue_bytes {}\n\
             # HELP sluice_store_up 1 while the store's writes commit, 0 while they fail.\n\
             # TYPE sluice_store_up gauge\nsluice_store_up {}\n\
             # HELP sluice_store_give_ups_total Times queued writes were given up after failing past the bound.\n\
             # TYPE sluice_store_give_ups_total counter\nsluice_store_give_ups_total {}\n",
            store.queue_depth(),
            store.queue_bytes(),
            u8::from(status.failing.is_none()),
            status.abandoned,
        ));
        out
    }

    /// Why the engine cannot take work now, if it cannot: shutting down, or the store failing.
    pub fn not_ready(&self) -> Option<String> {
        if self.inner.shutdown.is_cancelled() {
            return Some("shutting down".into());
        }
        self.inner
            .store
            .status()
            .borrow()
            .failing
            .as_ref()
            .map(|why| format!("the database cannot be written: {why}"))
    }

    /// Resolves once everything the run's start wrote (its thread, the run, its messages) is
    /// committed: before an answer that acknowledges the start (`202`, `run_accepted`).
    pub async fn acknowledge(&self, run: &RunHandle) -> Result<(), EngineError> {
        if let Err(err) = self.inner.store.flush().await {
            run.stop(StopReason::StoreFailed(store_failure(&err)));
            return Err(err.into());
        }
        Ok(())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// What runs may ask for.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.inner.models.list()
    }

    pub async fn create_thread(
        &self,
        owner: &str,
        title: Option<String>,
    ) -> Result<ThreadView, EngineError> {
        let thread = NewThread {
            id: new_id(),
            owner: owner.to_string(),
            title,
            created_at: now_ms(),
        };
        self.inner.store.admit()?;
        let view = ThreadView {
            id: thread.id.clone(),
            title: thread.title.clone(),
            created_at: thread.created_at,
            messages: Some(Vec::new()),
            artifacts: Some(Vec::new()),
        };
        self.inner.store.create_thread(thread).await?;
        self.remember_thread(&view.id, owner);
        Ok(view)
    }

    fn remember_thread(&self, id: &str, owner: &str) {
        if let Ok(mut known) = self.inner.known_threads.lock() {
            if known.len() >= KNOWN_THREADS_MAX {
                known.clear();
            }
            known.insert(id.to_string(), owner.to_string());
        }
    }

    async fn thread_exists(&self, owner: &str, id: &str) -> Result<bool, EngineError> {
        let cached = self
            .inner
            .known_threads
            .lock()
            .ok()
            .and_then(|k| k.get(id).map(|o| o == owner));
        if let Some(mine) = cached {
            return Ok(mine);
        }
        let exists = self
            .inner
            .store
            .thread_exists(owner.to_string(), id.to_string())
            .await?;
        if exists {
            self.remember_thread(id, owner);
        }
        Ok(exists)
    }

    pub async fn get_thread(&self, owner: &str, id: &str) -> Result<ThreadView, EngineError> {
        self.inner
            .store
            .get_thread(owner.to_string(), id.to_string())
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no thread {id:?}")))
    }

    pub async fn list_threads(
        &self,
        owner: &str,
        limit: u32,
    ) -> Result<Vec<ThreadView>, EngineError> {
        Ok(self
            .inner
            .store
            .list_threads(owner.to_string(), limit)
            .await?)
    }

    /// Deletes a thread; a run still going on it is cancelled first and allowed to end.
    pub async fn delete_thread(&self, owner: &str, id: &str) -> Result<(), EngineError> {
        let active = self
            .inner
            .busy
            .lock()
            .ok()
            .and_then(|b| b.get(id).cloned())
            .unwrap_or_default();
        for run in active.iter().filter(|r| r.owner == owner) {
            run.cancel("the thread was deleted");
        }
        for run in active.iter().filter(|r| r.owner == owner) {
            run.log.wait_closed().await;
        }
        if let Ok(mut known) = self.inner.known_threads.lock() {
            known.remove(id);
        }
        self.inner.keep_history(owner, id, None);
        // The thread's finished runs must not stay reachable from memory once it is gone.
        if let Ok(mut runs) = self.inner.runs.lock() {
            runs.retain(|_, r| !(r.thread_id == id && r.owner == owner));
        }
        if self
            .inner
            .store
            .delete_thread(owner.to_string(), id.to_string())
            .await?
        {
            Ok(())
        } else {
            Err(EngineError::NotFound(format!("no thread {id:?}")))
        }
    }

    /// `start_run`, made safe to retry: the first start with an `idempotency_key` makes the run, and
    /// a later one with the same key (same owner) gets that run back instead of a second one — as
    /// long as the run is in memory (while it goes on, and `retention` after). The same key with a
    /// different thread or message is a `Conflict`.
    pub async fn start_run_keyed(
        &self,
        owner: &str,
        thread_id: Option<&str>,
        request: RunRequest,
        idempotency_key: Option<&str>,
    ) -> Result<Arc<RunHandle>, EngineError> {
        let Some(key) = idempotency_key else {
            return self.start_run(owner, thread_id, request).await;
        };
        if key.is_empty() || key.len() > 256 {
            return Err(EngineError::InvalidRequest(
                "an idempotency key is 1 to 256 characters".into(),
            ));
        }
        let slot = {
            let mut keyed = self
                .inner
                .keyed_starts
                .lock()
                .map_err(|_| EngineError::Conflict("engine state poisoned".into()))?;
            keyed
                .entry((owner.to_string(), key.to_string()))
                .or_default()
                .clone()
        };
        // Starts with the same key wait for each other; others do not wait at all.
        let mut started = slot.started.lock().await;
        if let Some(first) = started.as_ref() {
            let alive = self
                .inner
                .runs
                .lock()
                .map(|runs| runs.contains_key(&first.run.id))
                .unwrap_or(false);
            if alive {
                if first.thread_id.as_deref() != thread_id || first.content != request.content {
                    return Err(EngineError::Conflict(format!(
                        "idempotency key {key:?} was used for another request (run {})",
                        first.run.id
                    )));
                }
                return Ok(first.run.clone());
            }
        }
        let content = request.content.clone();
        let run = self.start_run(owner, thread_id, request).await?;
        *started = Some(Started {
            thread_id: thread_id.map(str::to_string),
            content,
            run: run.clone(),
        });
        Ok(run)
    }

    /// Starts a run on `thread_id` (a new thread when `None`) and returns at once; the run goes on
    /// in its own task.
    pub async fn start_run(
        &self,
        owner: &str,
        thread_id: Option<&str>,
        request: RunRequest,
    ) -> Result<Arc<RunHandle>, EngineError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        if request.content.trim().is_empty() {
            return Err(EngineError::InvalidRequest(
                "`content` must not be empty".into(),
            ));
        }
        if request.content.len() > self.inner.config.max_content_bytes {
            return Err(EngineError::InvalidRequest(format!(
                "`content` is {} bytes; the limit is {}",
                request.content.len(),
                self.inner.config.max_content_bytes
            )));
        }
        let agent_name = request
            .agent
            .clone()
            .or_else(|| self.inner.config.default_agent.clone());
        let agent = match &agent_name {
            Some(name) => self.inner.config.agents.get(name).cloned().ok_or_else(|| {
                let mut known: Vec<&str> = self
                    .inner
                    .config
                    .agents
                    .keys()
                    .map(String::as_str)
                    .collect();
                known.sort();
                EngineError::InvalidRequest(format!(
                    "unknown agent {name:?}; configured: {}",
                    known.join(", ")
                ))
            })?,
            None => Agent::default(),
        };
        let model_name = request
            .model
            .clone()
            .or_else(|| agent.model.clone())
            .unwrap_or_else(|| self.inner.config.default_model.clone());
        let resolved = self
            .inner
            .models
            .resolve(&model_name)
            .map_err(EngineError::InvalidRequest)?;
        // Output that could never be stored is not streamed: while the database cannot be
        // written (or is far behind), new runs are refused with 503.
        self.inner.store.admit()?;
        let accepted = Instant::now();
        let slot = self.take_run_slot(owner)?;
        let (thread_id, new_thread) = match thread_id {
            Some(id) => {
                // Existence and ownership; the history itself is read when the run starts.
                if !self.thread_exists(owner, id).await? {
                    return Err(EngineError::NotFound(format!("no thread {id:?}")));
                }
                (id.to_string(), false)
            }
            None => {
                // Queued, not awaited: everything read later is queued behind it.
                let id = new_id();
                self.inner.store.queue_thread(NewThread {
                    id: id.clone(),
                    owner: owner.to_string(),
                    title: None,
                    created_at: now_ms(),
                });
                self.remember_thread(&id, owner);
                (id, true)
            }
        };
        let run_id: Arc<str> = new_id().into();
        let handle = Arc::new(RunHandle {
            id: run_id.clone(),
            thread_id: thread_id.clone(),
            owner: owner.to_string(),
            model: model_name.clone(),
            message_id: new_id().into(),
            user_message_id: new_id(),
            created_at: now_ms(),
            log: Arc::new(EventLog::new(run_id.clone())),
            cancel: self.inner.shutdown.child_token(),
            stop_reason: Mutex::new(None),
            ended: OnceLock::new(),
            outcome: OnceLock::new(),
        });
        let predecessor = {
            let mut busy = self
                .inner
                .busy
                .lock()
                .map_err(|_| EngineError::Conflict("engine state poisoned".into()))?;
            let queue = busy.entry(thread_id.clone()).or_default();
            queue.retain(|r| !r.is_finished());
            let previous = queue.last().cloned();
            if let Some(prev) = &previous {
                match request.on_busy {
                    OnBusy::Reject => {
                        return Err(EngineError::Conflict(format!(
                            "thread {thread_id:?} has a run still going ({}); send on_busy \"queue\" or \"interrupt\", or cancel it",
                            prev.id
                        )));
                    }
                    OnBusy::Queue => {}
                    OnBusy::Interrupt => {
                        for run in queue.iter() {
                            run.cancel("interrupted by a newer message");
                        }
                    }
                }
            }
            queue.push(handle.clone());
            previous
        };
        self.inner.store.create_run(NewRun {
            id: run_id.clone(),
            thread_id: thread_id.clone(),
            model: model_name.clone(),
            status: if predecessor.is_some() {
                RunStatus::Queued
            } else {
                RunStatus::Running
            },
            user_message_id: handle.user_message_id.clone(),
            user_content: request.content.clone(),
            message_id: handle.message_id.clone(),
            created_at: handle.created_at,
        });
        if let Ok(mut runs) = self.inner.runs.lock() {
            runs.insert(run_id, handle.clone());
        }
        self.inner.metrics.run_started();
        slot.keep();
        let task = run::RunTask {
            inner: self.inner.clone(),
            handle: handle.clone(),
            predecessor,
            new_thread,
            model: resolved.model,
            upstream_model: resolved.upstream,
            tools: agent_name
                .as_ref()
                .and_then(|name| self.inner.agent_tools.get(name).cloned())
                .unwrap_or_else(|| self.inner.tools.specs()),
            agent,
            drafts_shown: Default::default(),
            model_name,
            content: request.content,
            accepted,
        };
        self.inner.tracker.spawn(task.drive());
        Ok(handle)
    }

    /// Counts a new unfinished run for `owner`, or refuses it with 429 when the owner is at the
    /// limit. The slot is given back when the run ends, or when the start fails (the guard drops).
    fn take_run_slot(&self, owner: &str) -> Result<RunSlot, EngineError> {
        let max = self.inner.config.max_active_runs_per_owner;
        let mut active = self
            .inner
            .active_by_owner
            .lock()
            .map_err(|_| EngineError::ShuttingDown)?;
        let n = active.entry(owner.to_string()).or_insert(0);
        if max > 0 && *n >= max {
            return Err(EngineError::RateLimited(format!(
                "{n} runs are already going for this API key (the limit is {max}); wait for one to end or cancel one"
            )));
        }
        *n += 1;
        Ok(RunSlot {
            inner: Some(self.inner.clone()),
            owner: owner.to_string(),
        })
    }

    /// A run in memory that `owner` may see.
    pub fn live_run(&self, owner: &str, run_id: &str) -> Option<Arc<RunHandle>> {
        let runs = self.inner.runs.lock().ok()?;
        runs.get(run_id).filter(|r| r.owner == owner).cloned()
    }

    /// Follows a run from after `cursor`. See docs/protocol.md, "Resume and crashes".
    pub async fn subscribe(
        &self,
        owner: &str,
        run_id: &str,
        cursor: Cursor,
        coalesce: Option<Coalesce>,
    ) -> Result<Subscription, EngineError> {
        let coalesce = coalesce.unwrap_or(self.inner.config.coalesce);
        if let Some(run) = self.live_run(owner, run_id) {
            if cursor.epoch != 1 || cursor.seq > run.log.len() {
                return Err(EngineError::StreamReset {
                    durable_seq: run.log.len(),
                });
            }
            return Ok(Subscription::live(run.log.clone(), cursor.seq, coalesce));
        }
        let stored = self
            .inner
            .store
            .get_run(owner.to_string(), run_id.to_string())
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no run {run_id:?}")))?;
        // A cursor from an earlier epoch is good only up to what survived the crash.
        let durable = stored.durable_seq.unwrap_or(stored.view.last_seq);
        let stale = (cursor.epoch < stored.epoch && cursor.seq > durable)
            || cursor.epoch > stored.epoch
            || cursor.seq > stored.view.last_seq;
        if stale {
            return Err(EngineError::StreamReset {
                durable_seq: durable,
            });
        }
        Ok(Subscription::stored(
            Arc::from(run_id),
            self.inner.store.clone(),
            cursor.seq,
            coalesce,
        ))
    }

    pub async fn get_run(&self, owner: &str, run_id: &str) -> Result<RunView, EngineError> {
        if let Some(run) = self.live_run(owner, run_id)
            && run.outcome.get().is_none()
        {
            return Ok(run.view());
        }
        let stored = self
            .inner
            .store
            .get_run(owner.to_string(), run_id.to_string())
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("no run {run_id:?}")))?;
        Ok(stored.view)
    }

    /// One version of an artifact `owner` may see (the latest when `version` is `None`).
    pub async fn get_artifact(
        &self,
        owner: &str,
        id: &str,
        version: Option<u32>,
    ) -> Result<sluice_protocol::api::ArtifactView, EngineError> {
        self.inner
            .store
            .get_artifact(owner.to_string(), id.to_string(), version)
            .await?
            .ok_or_else(|| match version {
                Some(v) => EngineError::NotFound(format!("no version {v} of artifact {id:?}")),
                None => EngineError::NotFound(format!("no artifact {id:?}")),
            })
    }

    /// Cancels a run; answers its state (a finished run is left as it is).
    pub async fn cancel(&self, owner: &str, run_id: &str) -> Result<RunView, EngineError> {
        if let Some(run) = self.live_run(owner, run_id) {
            run.cancel("cancelled by request");
            run.log.wait_closed().await;
        }
        self.get_run(owner, run_id).await
    }

    /// Waits for a run to end and answers its assistant message.
    pub async fn wait(&self, run: &RunHandle) -> Result<WaitResponse, EngineError> {
        run.log.wait_closed().await;
        self.inner.store.flush().await?;
        let view = self.get_run(&run.owner, &run.id).await?;
        let thread = self.get_thread(&run.owner, &run.thread_id).await?;
        let message: MessageView = thread
            .messages
            .unwrap_or_default()
            .into_iter()
            .find(|m| *m.id == *run.message_id)
            .ok_or_else(|| EngineError::NotFound(format!("run {} has no message", run.id)))?;
        Ok(WaitResponse { run: view, message })
    }

    /// Stops accepting runs, ends every run in flight with `run_interrupted`, waits for their tasks
    /// (at most `timeout`), and flushes the store.
    pub async fn shutdown(&self, timeout: Duration) {
        let runs: Vec<Arc<RunHandle>> = self
            .inner
            .runs
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        for run in runs {
            run.stop(StopReason::Shutdown);
        }
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        if tokio::time::timeout(timeout, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("runs did not end within the shutdown timeout");
        }
        if let Err(err) = self.inner.store.flush().await {
            tracing::error!(error = %err, "final store flush failed");
        }
    }
}

/// The error a run ends with when the store could not keep it.
pub(crate) fn store_failure(err: &StoreError) -> sluice_protocol::ErrorInfo {
    sluice_protocol::ErrorInfo::new(
        ErrorCode::StoreUnavailable,
        format!(
            "the run could not be stored ({err}); its output was not kept: send the message again"
        ),
    )
}

/// Follows the store's health: when it gives up queued writes, every run in flight has lost
/// some and is stopped (it ends with `STORE_UNAVAILABLE` and `run_failed`).
async fn watch_store(inner: std::sync::Weak<Inner>) {
    let (mut status, stop) = match inner.upgrade() {
        Some(i) => (i.store.status(), i.shutdown.clone()),
        None => return,
    };
    let mut given_up = status.borrow().abandoned;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = status.changed() => if changed.is_err() { return },
        }
        let now = status.borrow_and_update().clone();
        if now.abandoned == given_up {
            continue;
        }
        given_up = now.abandoned;
        let Some(inner) = inner.upgrade() else { return };
        let runs: Vec<Arc<RunHandle>> = inner
            .runs
            .lock()
            .map(|r| r.values().filter(|h| !h.is_finished()).cloned().collect())
            .unwrap_or_default();
        let why = now
            .failing
            .unwrap_or_else(|| "the database failed".to_string());
        tracing::error!(runs = runs.len(), reason = %why, "store gave up queued writes: failing the runs in flight");
        let error = store_failure(&StoreError::Unavailable(why));
        for run in runs {
            run.stop(StopReason::StoreFailed(error.clone()));
        }
    }
}

/// One counted unfinished run of an owner; given back on drop unless kept for the run's task.
struct RunSlot {
    inner: Option<Arc<Inner>>,
    owner: String,
}

impl RunSlot {
    /// The run started: its task gives the slot back when it ends.
    fn keep(mut self) {
        self.inner = None;
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        if let Some(inner) = &self.inner {
            inner.release_run_slot(&self.owner);
        }
    }
}

impl Inner {
    pub(crate) fn release_run_slot(&self, owner: &str) {
        if let Ok(mut active) = self.active_by_owner.lock()
            && let Some(n) = active.get_mut(owner)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                active.remove(owner);
            }
        }
    }
}

/// The most thread owners remembered in memory before the cache starts over.
const KNOWN_THREADS_MAX: usize = 100_000;

/// A new time-ordered id (UUIDv7).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
