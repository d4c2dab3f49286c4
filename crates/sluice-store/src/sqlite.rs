//! The embedded store: one SQLite database file in WAL mode, owned by one writer thread.
//!
//! Every operation, read or write, is a message on one ordered queue. The writer thread takes
//! everything that has piled up, applies it inside one transaction (reads answer from inside it, so
//! they see every write queued before them), and commits. A write does not wake the writer: the
//! first write of a burst arms a timer that wakes it `COMMIT_DELAY` later, so a streaming run
//! costs one commit per few milliseconds, and neither the wake-up (a futex call and a thread
//! switch) nor the commit lands on the latency-critical first exchange with the provider. Reads and
//! flushes wake it at once. With `synchronous=NORMAL` in WAL mode a
//! commit survives the process being killed (it is in the OS's page cache); only a power loss can
//! take back the last commits.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use sluice_protocol::api::{
    ArtifactKind, ArtifactStatus, ArtifactView, MessageStatus, MessageView, RunStatus, RunView,
    ThreadView,
};
use sluice_protocol::{ErrorInfo, EventBody, EventKind, Frame, Usage};
use tokio::sync::oneshot;

use crate::{NewRun, NewThread, RecoveredRun, Reply, RunEnd, Store, StoreError, StoredRun};

/// The most operations applied in one transaction; bounds how long a read waits behind writes.
const MAX_BATCH: usize = 4096;

/// How long the writer lets a burst of writes gather before committing it.
const COMMIT_DELAY: Duration = Duration::from_millis(2);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS threads (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    title       TEXT,
    created_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS threads_by_owner ON threads(owner, created_at);
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT PRIMARY KEY,
    thread_id   TEXT NOT NULL REFERENCES threads(id) ON DELETE CASCADE,
    role        TEXT NOT NULL,
    content     TEXT NOT NULL DEFAULT '',
    reasoning   TEXT NOT NULL DEFAULT '',
    status      TEXT NOT NULL,
    run_id      TEXT,
    created_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_thread ON messages(thread_id, created_at);
CREATE TABLE IF NOT EXISTS runs (
    id               TEXT PRIMARY KEY,
    thread_id        TEXT NOT NULL REFERENCES threads(id) ON DELETE CASCADE,
    model            TEXT NOT NULL,
    status           TEXT NOT NULL,
    user_message_id  TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    usage            TEXT,
    ttft_ms          REAL,
    last_seq         INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    epoch            INTEGER NOT NULL DEFAULT 1,
    durable_seq      INTEGER,
    created_at       INTEGER NOT NULL,
    ended_at         INTEGER
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs(status);
CREATE TABLE IF NOT EXISTS artifacts (
    id          TEXT NOT NULL,
    version     INTEGER NOT NULL,
    thread_id   TEXT NOT NULL REFERENCES threads(id) ON DELETE CASCADE,
    run_id      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    title       TEXT NOT NULL,
    status      TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (id, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS artifacts_by_thread ON artifacts(thread_id);
CREATE TABLE IF NOT EXISTS events (
    run_id  TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    epoch   INTEGER NOT NULL DEFAULT 1,
    type    TEXT NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
"#;

enum Op {
    /// With no reply channel, a failure is logged.
    CreateThread(NewThread, Option<oneshot::Sender<Result<(), StoreError>>>),
    CreateRun(NewRun),
    StartRun(Arc<str>),
    Append {
        run_id: Arc<str>,
        message_id: Arc<str>,
        frame: Frame,
    },
    Finish(RunEnd),
    DeleteThread(String, String, oneshot::Sender<Result<bool, StoreError>>),
    GetThread(
        String,
        String,
        oneshot::Sender<Result<Option<ThreadView>, StoreError>>,
    ),
    ThreadExists(String, String, oneshot::Sender<Result<bool, StoreError>>),
    ListThreads(
        String,
        u32,
        oneshot::Sender<Result<Vec<ThreadView>, StoreError>>,
    ),
    GetRun(
        String,
        String,
        oneshot::Sender<Result<Option<StoredRun>, StoreError>>,
    ),
    ReadEvents(
        String,
        u64,
        u32,
        oneshot::Sender<Result<Vec<Frame>, StoreError>>,
    ),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Writes one version of an artifact (an intermediate state is replaced by its final one).
    PutArtifact(ArtifactView),
    DiscardDraft(String),
    GetArtifact(
        String,
        String,
        Option<u32>,
        oneshot::Sender<Result<Option<ArtifactView>, StoreError>>,
    ),
}

/// The embedded store. Cheap to clone; the writer thread stops when the last clone is dropped,
/// after applying everything queued.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    /// Closes the queue when the last clone goes.
    _open: Arc<OpenHandle>,
}

/// What the writer thread and the store's handles share.
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Operations sent and not yet applied.
    depth: AtomicUsize,
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// The writer should take what is queued now (a read or flush is waiting, or a burst's timer
    /// fired).
    ready: bool,
    /// A timer is armed for the writes queued since the last batch.
    armed: bool,
    /// Set instead of a runtime timer when the write came from outside a tokio runtime: the
    /// writer waits until then.
    deadline: Option<Instant>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // No code panics while holding the lock; the queue is whole even if one did.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets the writer take what is queued.
    fn mark_ready(&self) {
        let mut q = self.lock();
        if q.ops.is_empty() {
            return;
        }
        q.ready = true;
        drop(q);
        self.wake.notify_one();
    }
}

/// Marks the queue ready when dropped: when its timer fires, and also when the runtime drops the
/// timer's task unfired (shutting down), so that no write waits for a wake that never comes.
struct ReadyOnDrop(Arc<Shared>);

impl Drop for ReadyOnDrop {
    fn drop(&mut self) {
        self.0.mark_ready();
    }
}

struct OpenHandle(Arc<Shared>);

impl Drop for OpenHandle {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.wake.notify_one();
    }
}

impl SqliteStore {
    /// Opens (or creates) `sluice.db` in `data_dir`, closes the runs a crash left in flight, and
    /// starts the writer thread. Returns the runs it closed.
    pub fn open(data_dir: &Path) -> Result<(SqliteStore, Vec<RecoveredRun>), StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let mut conn = Connection::open(data_dir.join("sluice.db"))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        // Every statement the writer runs stays prepared (`exec`, `prepare_cached`).
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&conn)?;
        let recovered = recover(&mut conn)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            depth: AtomicUsize::new(0),
        });
        let writer = shared.clone();
        thread::Builder::new()
            .name("sluice-store".into())
            .spawn(move || writer_loop(conn, writer))
            .map_err(|source| StoreError::DataDir {
                path: "writer thread".into(),
                source,
            })?;
        Ok((
            SqliteStore {
                _open: Arc::new(OpenHandle(shared.clone())),
                shared,
            },
            recovered,
        ))
    }

    /// Queues a write; the first of a burst arms the timer that hands the burst to the writer.
    fn submit(&self, op: Op) {
        self.shared.depth.fetch_add(1, Ordering::Relaxed);
        let mut q = self.shared.lock();
        q.ops.push(op);
        if std::mem::replace(&mut q.armed, true) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                drop(q);
                // The runtime's timer costs no thread wake-up now; the writer is woken from the
                // timer, off this task's path.
                let ready = ReadyOnDrop(self.shared.clone());
                runtime.spawn(async move {
                    tokio::time::sleep(COMMIT_DELAY).await;
                    drop(ready);
                });
            }
            Err(_) => {
                q.deadline = Some(Instant::now() + COMMIT_DELAY);
                drop(q);
                self.shared.wake.notify_one();
            }
        }
    }

    /// Queues a read (or a write with a reply) and wakes the writer at once.
    fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Reply<T> {
        let (tx, rx) = oneshot::channel();
        self.shared.depth.fetch_add(1, Ordering::Relaxed);
        {
            let mut q = self.shared.lock();
            q.ops.push(make(tx));
            q.ready = true;
        }
        self.shared.wake.notify_one();
        Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }
}

impl Store for SqliteStore {
    fn create_thread(&self, thread: NewThread) -> Reply<()> {
        self.ask(|tx| Op::CreateThread(thread, Some(tx)))
    }
    fn queue_thread(&self, thread: NewThread) {
        self.submit(Op::CreateThread(thread, None));
    }
    fn create_run(&self, run: NewRun) {
        self.submit(Op::CreateRun(run));
    }
    fn start_run(&self, run_id: Arc<str>) {
        self.submit(Op::StartRun(run_id));
    }
    fn append_event(&self, run_id: Arc<str>, message_id: Arc<str>, frame: Frame) {
        self.submit(Op::Append {
            run_id,
            message_id,
            frame,
        });
    }
    fn finish_run(&self, end: RunEnd) {
        self.submit(Op::Finish(end));
    }
    fn delete_thread(&self, owner: String, thread_id: String) -> Reply<bool> {
        self.ask(|tx| Op::DeleteThread(owner, thread_id, tx))
    }
    fn get_thread(&self, owner: String, thread_id: String) -> Reply<Option<ThreadView>> {
        self.ask(|tx| Op::GetThread(owner, thread_id, tx))
    }
    fn thread_exists(&self, owner: String, thread_id: String) -> Reply<bool> {
        self.ask(|tx| Op::ThreadExists(owner, thread_id, tx))
    }
    fn list_threads(&self, owner: String, limit: u32) -> Reply<Vec<ThreadView>> {
        self.ask(|tx| Op::ListThreads(owner, limit, tx))
    }
    fn get_run(&self, owner: String, run_id: String) -> Reply<Option<StoredRun>> {
        self.ask(|tx| Op::GetRun(owner, run_id, tx))
    }
    fn read_events(&self, run_id: String, after: u64, limit: u32) -> Reply<Vec<Frame>> {
        self.ask(|tx| Op::ReadEvents(run_id, after, limit, tx))
    }
    fn flush(&self) -> Reply<()> {
        self.ask(Op::Flush)
    }
    fn put_artifact(&self, artifact: ArtifactView) {
        self.submit(Op::PutArtifact(artifact));
    }
    fn discard_artifact_draft(&self, artifact_id: String) {
        self.submit(Op::DiscardDraft(artifact_id));
    }
    fn get_artifact(
        &self,
        owner: String,
        id: String,
        version: Option<u32>,
    ) -> Reply<Option<ArtifactView>> {
        self.ask(|tx| Op::GetArtifact(owner, id, version, tx))
    }
    fn queue_depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }
}

/// Closes every run that was queued or running when the last process died: appends a terminal
/// `run_interrupted` event in epoch 2 right after the last stored event, marks the run interrupted
/// and its assistant message incomplete (its content is what had been checkpointed).
/// Brings a database made by an earlier version up to date (columns added since).
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let has_turns = conn
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'turns'")?
        .exists([])?;
    if !has_turns {
        conn.execute_batch("ALTER TABLE messages ADD COLUMN turns TEXT")?;
    }
    Ok(())
}

fn recover(conn: &mut Connection) -> Result<Vec<RecoveredRun>, StoreError> {
    let tx = conn.transaction()?;
    let mut found = Vec::new();
    {
        let mut stmt = tx.prepare(
            "SELECT r.id, r.thread_id, r.message_id, r.epoch,
                    COALESCE((SELECT MAX(seq) FROM events e WHERE e.run_id = r.id), 0)
             FROM runs r WHERE r.status IN ('queued', 'running')",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, u32>(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            found.push(row?);
        }
    }
    let now = now_ms();
    let mut recovered = Vec::new();
    for (run_id, thread_id, message_id, epoch, durable) in found {
        let durable = u64::try_from(durable).unwrap_or(0);
        let epoch = epoch.saturating_add(1);
        let seq = durable + 1;
        let frame = Frame::encode_in_epoch(
            &run_id,
            seq,
            epoch,
            &EventBody::RunInterrupted {
                reason: "the server stopped while the run was in flight".into(),
                durable_seq: durable,
            },
        );
        tx.execute(
            "INSERT INTO events (run_id, seq, epoch, type, data) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                run_id,
                seq as i64,
                epoch,
                frame.kind().as_str(),
                &frame.json()[..]
            ],
        )?;
        tx.execute(
            "UPDATE runs SET status = 'interrupted', last_seq = ?2, epoch = ?3, durable_seq = ?4,
                    ended_at = ?5 WHERE id = ?1",
            params![run_id, seq as i64, epoch, durable as i64, now],
        )?;
        tx.execute(
            "UPDATE messages SET status = 'incomplete' WHERE id = ?1",
            params![message_id],
        )?;
        recovered.push(RecoveredRun {
            run_id,
            thread_id,
            durable_seq: durable,
        });
    }
    tx.commit()?;
    Ok(recovered)
}

fn writer_loop(mut conn: Connection, shared: Arc<Shared>) {
    let mut batch = Vec::with_capacity(256);
    loop {
        {
            let mut q = shared.lock();
            loop {
                if q.ops.is_empty() {
                    if q.closed {
                        tracing::debug!("store writer stopped");
                        return;
                    }
                } else if q.ready || q.closed {
                    break;
                } else if let Some(at) = q.deadline {
                    let now = Instant::now();
                    if now >= at {
                        break;
                    }
                    q = shared
                        .wake
                        .wait_timeout(q, at - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    continue;
                }
                q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
            if q.ops.len() <= MAX_BATCH {
                // The emptied batch goes back as the queue's buffer.
                std::mem::swap(&mut batch, &mut q.ops);
                q.ready = false;
                q.armed = false;
                q.deadline = None;
            } else {
                // The rest stays ready and is taken right after this batch.
                batch.extend(q.ops.drain(..MAX_BATCH));
            }
        }
        let n = batch.len();
        if let Err(err) = apply_batch(&mut conn, &mut batch) {
            tracing::error!(error = %err, code = err.code(), "store batch failed");
        }
        shared.depth.fetch_sub(n, Ordering::Relaxed);
        batch.clear();
    }
}

/// Deltas accumulated per assistant message within one batch, applied with one UPDATE each.
#[derive(Default)]
struct Checkpoint {
    content: String,
    reasoning: String,
}

fn apply_batch(conn: &mut Connection, batch: &mut Vec<Op>) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let mut checkpoints: HashMap<Arc<str>, Checkpoint> = HashMap::new();
    let mut last_seq: HashMap<Arc<str>, u64> = HashMap::new();
    let mut flushes = Vec::new();
    for op in batch.drain(..) {
        match op {
            Op::Flush(reply) => flushes.push(reply),
            Op::Append {
                run_id,
                message_id,
                frame,
            } => {
                let res = exec(
                    &tx,
                    "INSERT OR IGNORE INTO events (run_id, seq, type, data) VALUES (?1, ?2, ?3, ?4)",
                    params![
                        &*run_id,
                        frame.seq() as i64,
                        frame.kind().as_str(),
                        &frame.json()[..]
                    ],
                );
                if let Err(err) = res {
                    tracing::error!(error = %err, run_id = %run_id, seq = frame.seq(), "event not stored");
                    continue;
                }
                if let Some(text) = frame.delta_text() {
                    let cp = checkpoints.entry(message_id).or_default();
                    if frame.kind() == EventKind::TextDelta {
                        cp.content.push_str(&text);
                    } else {
                        cp.reasoning.push_str(&text);
                    }
                }
                last_seq.insert(run_id, frame.seq());
            }
            Op::Finish(end) => {
                // Deltas of this run that are still pending must land before the message's final status.
                flush_progress(&tx, &mut checkpoints, &mut last_seq);
                log_err(finish_run(&tx, &end), "finish run");
            }
            Op::CreateThread(t, reply) => {
                let res = exec(
                    &tx,
                    "INSERT INTO threads (id, owner, title, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![t.id, t.owner, t.title, t.created_at],
                )
                .map(|_| ())
                .map_err(StoreError::from);
                match reply {
                    Some(reply) => {
                        let _ = reply.send(res);
                    }
                    None => log_err(res, "create thread"),
                }
            }
            Op::CreateRun(r) => log_err(create_run(&tx, &r), "create run"),
            Op::StartRun(id) => log_err(
                exec(
                    &tx,
                    "UPDATE runs SET status = 'running' WHERE id = ?1 AND status = 'queued'",
                    params![&*id],
                ),
                "start run",
            ),
            Op::DeleteThread(owner, id, reply) => {
                let _ = reply.send(
                    exec(
                        &tx,
                        "DELETE FROM threads WHERE id = ?1 AND owner = ?2",
                        params![id, owner],
                    )
                    .map(|n| n > 0)
                    .map_err(StoreError::from),
                );
            }
            // Reads see the progress of deltas queued before them.
            Op::GetThread(owner, id, reply) => {
                flush_progress(&tx, &mut checkpoints, &mut last_seq);
                let _ = reply.send(get_thread(&tx, &owner, &id));
            }
            Op::ThreadExists(owner, id, reply) => {
                let _ = reply.send(
                    tx.prepare_cached("SELECT 1 FROM threads WHERE id = ?1 AND owner = ?2")
                        .and_then(|mut st| st.exists(params![id, owner]))
                        .map_err(StoreError::from),
                );
            }
            Op::ListThreads(owner, limit, reply) => {
                let _ = reply.send(list_threads(&tx, &owner, limit));
            }
            Op::GetRun(owner, id, reply) => {
                flush_progress(&tx, &mut checkpoints, &mut last_seq);
                let _ = reply.send(get_run(&tx, &owner, &id));
            }
            Op::PutArtifact(a) => log_err(put_artifact(&tx, &a), "artifact"),
            Op::DiscardDraft(id) => log_err(
                exec(
                    &tx,
                    "DELETE FROM artifacts WHERE id = ?1 AND status = 'intermediate'",
                    params![id],
                ),
                "discard artifact draft",
            ),
            Op::GetArtifact(owner, id, version, reply) => {
                let _ = reply.send(get_artifact(&tx, &owner, &id, version));
            }
            Op::ReadEvents(run_id, after, limit, reply) => {
                let _ = reply.send(read_events(&tx, &run_id, after, limit));
            }
        }
    }
    flush_progress(&tx, &mut checkpoints, &mut last_seq);
    tx.commit()?;
    for reply in flushes {
        let _ = reply.send(Ok(()));
    }
    Ok(())
}

/// Runs one statement through the connection's statement cache: the writer runs the same few
/// statements for every run, and parsing them each time was a fifth of its work.
fn exec(tx: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

fn log_err<T>(res: Result<T, impl std::fmt::Display>, what: &'static str) {
    if let Err(err) = res {
        tracing::error!(error = %err, what, "store write failed");
    }
}

/// Applies the pending message checkpoints and `last_seq` updates. A failure is logged and does
/// not abort the batch: the events themselves must still commit.
fn flush_progress(
    tx: &Transaction<'_>,
    checkpoints: &mut HashMap<Arc<str>, Checkpoint>,
    last_seq: &mut HashMap<Arc<str>, u64>,
) {
    for (message_id, cp) in checkpoints.drain() {
        log_err(
            exec(
                tx,
                "UPDATE messages SET content = content || ?2, reasoning = reasoning || ?3 WHERE id = ?1",
                params![&*message_id, cp.content, cp.reasoning],
            ),
            "message checkpoint",
        );
    }
    for (run_id, seq) in last_seq.drain() {
        log_err(
            exec(
                tx,
                "UPDATE runs SET last_seq = MAX(last_seq, ?2) WHERE id = ?1",
                params![&*run_id, seq as i64],
            ),
            "run last_seq",
        );
    }
}

fn create_run(tx: &Transaction<'_>, r: &NewRun) -> rusqlite::Result<()> {
    exec(
        tx,
        "INSERT INTO messages (id, thread_id, role, content, status, run_id, created_at)
         VALUES (?1, ?2, 'user', ?3, 'complete', ?4, ?5)",
        params![
            r.user_message_id,
            r.thread_id,
            r.user_content,
            &*r.id,
            r.created_at
        ],
    )?;
    exec(
        tx,
        "INSERT INTO messages (id, thread_id, role, content, status, run_id, created_at)
         VALUES (?1, ?2, 'assistant', '', 'streaming', ?3, ?4)",
        params![&*r.message_id, r.thread_id, &*r.id, r.created_at],
    )?;
    exec(
        tx,
        "INSERT INTO runs (id, thread_id, model, status, user_message_id, message_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            &*r.id,
            r.thread_id,
            r.model,
            r.status.as_str(),
            r.user_message_id,
            &*r.message_id,
            r.created_at
        ],
    )?;
    Ok(())
}

fn finish_run(tx: &Transaction<'_>, end: &RunEnd) -> Result<(), StoreError> {
    let usage =
        serde_json::to_string(&end.usage).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let error = match &end.error {
        Some(e) => Some(serde_json::to_string(e).map_err(|e| StoreError::Corrupt(e.to_string()))?),
        None => None,
    };
    exec(
        tx,
        "UPDATE runs SET status = ?2, usage = ?3, ttft_ms = ?4, error = ?5, ended_at = ?6 WHERE id = ?1",
        params![
            &*end.run_id,
            end.status.as_str(),
            usage,
            end.time_to_first_token_ms,
            error,
            end.ended_at
        ],
    )?;
    exec(
        tx,
        "UPDATE messages SET status = ?2, turns = COALESCE(?3, turns) WHERE id = ?1",
        params![&*end.message_id, end.message_status.as_str(), end.turns],
    )?;
    Ok(())
}

fn get_thread(
    tx: &Transaction<'_>,
    owner: &str,
    id: &str,
) -> Result<Option<ThreadView>, StoreError> {
    let thread = tx
        .prepare_cached("SELECT id, title, created_at FROM threads WHERE id = ?1 AND owner = ?2")?
        .query_row(params![id, owner], thread_row)
        .optional()?;
    let Some(mut thread) = thread else {
        return Ok(None);
    };
    let mut stmt = tx.prepare_cached(
        "SELECT id, thread_id, role, content, reasoning, status, run_id, created_at, turns
         FROM messages WHERE thread_id = ?1 ORDER BY created_at, rowid",
    )?;
    let rows = stmt.query_map(params![id], |row| {
        Ok((
            MessageView {
                id: row.get(0)?,
                thread_id: row.get(1)?,
                role: row.get(2)?,
                content: row.get(3)?,
                reasoning: row.get(4)?,
                status: MessageStatus::Complete,
                run_id: row.get(6)?,
                created_at: row.get(7)?,
                turns: row
                    .get::<_, Option<String>>(8)?
                    .and_then(|t| serde_json::from_str(&t).ok()),
            },
            row.get::<_, String>(5)?,
        ))
    })?;
    let mut messages = Vec::new();
    for row in rows {
        let (mut m, status) = row?;
        m.status = MessageStatus::parse(&status).ok_or_else(|| {
            StoreError::Corrupt(format!("message {} has status {status:?}", m.id))
        })?;
        messages.push(m);
    }
    thread.messages = Some(messages);
    let mut stmt = tx.prepare_cached(
        "SELECT a.id, a.version, a.thread_id, a.run_id, a.kind, a.title, a.status, a.data, a.created_at
         FROM artifacts a
         WHERE a.thread_id = ?1
           AND a.version = (SELECT MAX(version) FROM artifacts b WHERE b.id = a.id)
         ORDER BY a.created_at, a.id",
    )?;
    let rows = stmt.query_map(params![id], artifact_row)?;
    let mut artifacts = Vec::new();
    for row in rows {
        artifacts.push(row??);
    }
    thread.artifacts = Some(artifacts);
    Ok(Some(thread))
}

fn list_threads(
    tx: &Transaction<'_>,
    owner: &str,
    limit: u32,
) -> Result<Vec<ThreadView>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT id, title, created_at FROM threads WHERE owner = ?1
         ORDER BY created_at DESC, id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![owner, limit], thread_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn get_run(tx: &Transaction<'_>, owner: &str, id: &str) -> Result<Option<StoredRun>, StoreError> {
    let row = tx.prepare_cached("SELECT r.id, r.thread_id, r.model, r.status, r.user_message_id, r.message_id, r.usage,
                    r.ttft_ms, r.last_seq, r.error, r.created_at, r.ended_at, r.epoch, r.durable_seq,
                    t.owner
             FROM runs r JOIN threads t ON t.id = r.thread_id
             WHERE r.id = ?1 AND t.owner = ?2")?
        .query_row(params![id, owner],
            |row| {
                Ok((
                    (
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, Option<String>>(6)?,
                    ),
                    (
                        row.get::<_, Option<f64>>(7)?,
                        row.get::<_, i64>(8)?,
                        row.get::<_, Option<String>>(9)?,
                        row.get::<_, i64>(10)?,
                        row.get::<_, Option<i64>>(11)?,
                        row.get::<_, u32>(12)?,
                        row.get::<_, Option<i64>>(13)?,
                        row.get::<_, String>(14)?,
                    ),
                ))
            },
        )
        .optional()?;
    let Some((
        (id, thread_id, model, status, user_message_id, message_id, usage),
        (ttft, last_seq, error, created_at, ended_at, epoch, durable_seq, owner),
    )) = row
    else {
        return Ok(None);
    };
    let status = RunStatus::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("run {id} has status {status:?}")))?;
    let usage: Usage = match usage {
        Some(u) => serde_json::from_str(&u).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        None => Usage::default(),
    };
    let error: Option<ErrorInfo> = match error {
        Some(e) => Some(serde_json::from_str(&e).map_err(|e| StoreError::Corrupt(e.to_string()))?),
        None => None,
    };
    Ok(Some(StoredRun {
        view: RunView {
            id,
            thread_id,
            model,
            status,
            user_message_id,
            message_id,
            usage,
            time_to_first_token_ms: ttft,
            last_seq: u64::try_from(last_seq).unwrap_or(0),
            error,
            created_at,
            ended_at,
        },
        owner,
        epoch,
        durable_seq: durable_seq.and_then(|d| u64::try_from(d).ok()),
    }))
}

type ArtifactResult = Result<ArtifactView, StoreError>;

/// A thread without its messages and artifacts, from `SELECT id, title, created_at`.
fn thread_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ThreadView> {
    Ok(ThreadView {
        id: row.get(0)?,
        title: row.get(1)?,
        created_at: row.get(2)?,
        messages: None,
        artifacts: None,
    })
}

fn artifact_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ArtifactResult> {
    let id: String = row.get(0)?;
    let kind: String = row.get(4)?;
    let status: String = row.get(6)?;
    let data: String = row.get(7)?;
    let parsed = (|| {
        Ok(ArtifactView {
            kind: ArtifactKind::parse(&kind)
                .ok_or_else(|| StoreError::Corrupt(format!("artifact {id} has kind {kind:?}")))?,
            status: ArtifactStatus::parse(&status).ok_or_else(|| {
                StoreError::Corrupt(format!("artifact {id} has status {status:?}"))
            })?,
            data: serde_json::from_str(&data)
                .map_err(|e| StoreError::Corrupt(format!("artifact {id}: {e}")))?,
            id: id.clone(),
            version: row.get(1)?,
            thread_id: row.get(2)?,
            run_id: row.get(3)?,
            title: row.get(5)?,
            created_at: row.get(8)?,
        })
    })();
    Ok(parsed)
}

fn put_artifact(tx: &Transaction<'_>, a: &ArtifactView) -> Result<(), StoreError> {
    exec(tx,
        "INSERT OR REPLACE INTO artifacts (id, version, thread_id, run_id, kind, title, status, data, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            a.id,
            a.version,
            a.thread_id,
            a.run_id,
            a.kind.as_str(),
            a.title,
            a.status.as_str(),
            a.data.to_string(),
            a.created_at
        ],
    )?;
    Ok(())
}

fn get_artifact(
    tx: &Transaction<'_>,
    owner: &str,
    id: &str,
    version: Option<u32>,
) -> Result<Option<ArtifactView>, StoreError> {
    let row = tx.prepare_cached("SELECT a.id, a.version, a.thread_id, a.run_id, a.kind, a.title, a.status, a.data, a.created_at
             FROM artifacts a JOIN threads t ON t.id = a.thread_id
             WHERE a.id = ?1 AND t.owner = ?2
               AND a.version = COALESCE(?3, (SELECT MAX(version) FROM artifacts b WHERE b.id = a.id))")?
        .query_row(params![id, owner, version],
            artifact_row,
        )
        .optional()?;
    row.transpose()
}

fn read_events(
    tx: &Transaction<'_>,
    run_id: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<Frame>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT seq, epoch, type, data FROM events WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![run_id, after as i64, limit], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, u32>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, Vec<u8>>(3)?,
        ))
    })?;
    let mut frames = Vec::new();
    for row in rows {
        let (seq, epoch, kind, data) = row?;
        frames.push(Frame::from_json(
            u64::try_from(seq).unwrap_or(0),
            epoch,
            EventKind::parse(&kind),
            &data,
        ));
    }
    Ok(frames)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_run(thread_id: &str, id: &str) -> NewRun {
        NewRun {
            id: id.into(),
            thread_id: thread_id.into(),
            model: "demo".into(),
            status: RunStatus::Running,
            user_message_id: format!("{id}-u"),
            user_content: "hi".into(),
            message_id: format!("{id}-m").into(),
            created_at: 1,
        }
    }

    fn thread(id: &str) -> NewThread {
        NewThread {
            id: id.into(),
            owner: "o".into(),
            title: None,
            created_at: 1,
        }
    }

    /// Waits (up to 10 s) until another connection to the file sees `id` committed.
    fn committed_soon(dir: &Path, id: &str) -> bool {
        let other = Connection::open(dir.join("sluice.db")).expect("second connection");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let n: i64 = other
                .query_row("SELECT count(*) FROM threads WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .expect("count");
            if n == 1 {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[tokio::test]
    async fn a_write_alone_is_committed_by_its_timer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = SqliteStore::open(dir.path()).expect("open");
        store.queue_thread(thread("t1"));
        // Nothing reads or flushes: only the runtime timer can hand the write to the writer.
        let path = dir.path().to_path_buf();
        let seen = tokio::task::spawn_blocking(move || committed_soon(&path, "t1"))
            .await
            .expect("join");
        assert!(seen, "a queued write was never committed");
        assert_eq!(store.queue_depth(), 0);
    }

    #[test]
    fn a_write_from_outside_a_runtime_is_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = SqliteStore::open(dir.path()).expect("open");
        store.queue_thread(thread("t1"));
        assert!(committed_soon(dir.path(), "t1"));
    }

    #[test]
    fn a_write_whose_timer_dies_with_its_runtime_is_still_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = SqliteStore::open(dir.path()).expect("open");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // The timer task is spawned on a runtime that is dropped before it ever runs.
        runtime.block_on(async { store.queue_thread(thread("t1")) });
        drop(runtime);
        assert!(committed_soon(dir.path(), "t1"));
        // And the next burst arms a timer of its own.
        store.queue_thread(thread("t2"));
        assert!(committed_soon(dir.path(), "t2"));
    }

    #[tokio::test]
    async fn dropping_the_store_applies_what_is_queued() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = SqliteStore::open(dir.path()).expect("open");
        let clone = store.clone();
        for i in 0..100 {
            clone.queue_thread(thread(&format!("t{i}")));
        }
        drop(clone);
        drop(store);
        let path = dir.path().to_path_buf();
        let seen = tokio::task::spawn_blocking(move || committed_soon(&path, "t99"))
            .await
            .expect("join");
        assert!(seen);
    }

    #[tokio::test]
    async fn deltas_checkpoint_the_message_and_recovery_interrupts_in_flight_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, recovered) = SqliteStore::open(dir.path()).expect("open");
            assert!(recovered.is_empty());
            store
                .create_thread(NewThread {
                    id: "t".into(),
                    owner: "o".into(),
                    title: None,
                    created_at: 1,
                })
                .await
                .expect("thread");
            let run = new_run("t", "r");
            store.create_run(run.clone());
            for (i, part) in ["Hel", "lo ", "wörld"].iter().enumerate() {
                let frame = Frame::encode(
                    "r",
                    i as u64 + 1,
                    &EventBody::TextDelta {
                        delta: (*part).into(),
                    },
                );
                store.append_event(run.id.clone(), run.message_id.clone(), frame);
            }
            let thread = store
                .get_thread("o".into(), "t".into())
                .await
                .expect("read")
                .expect("exists");
            let messages = thread.messages.expect("messages");
            assert_eq!(messages[1].content, "Hello wörld");
            assert_eq!(messages[1].status, MessageStatus::Streaming);
            // Another owner sees nothing.
            assert!(
                store
                    .get_thread("x".into(), "t".into())
                    .await
                    .expect("read")
                    .is_none()
            );
            store.flush().await.expect("flush");
        }
        // Re-open as after a crash: the run was still running.
        let (store, recovered) = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].durable_seq, 3);
        let run = store
            .get_run("o".into(), "r".into())
            .await
            .expect("read")
            .expect("run");
        assert_eq!(run.view.status, RunStatus::Interrupted);
        assert_eq!(run.view.last_seq, 4);
        assert_eq!(run.epoch, 2);
        assert_eq!(run.durable_seq, Some(3));
        let events = store.read_events("r".into(), 2, 100).await.expect("events");
        assert_eq!(
            events.iter().map(|f| f.seq()).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(events[1].kind(), EventKind::RunInterrupted);
        assert!(events[1].sse().starts_with(b"id: 4.2\n"));
        let thread = store
            .get_thread("o".into(), "t".into())
            .await
            .expect("read")
            .expect("t");
        let m = &thread.messages.expect("messages")[1];
        assert_eq!(
            (m.content.as_str(), m.status),
            ("Hello wörld", MessageStatus::Incomplete)
        );
    }
}
