//! The writer: one thread owns the read-write connection and applies the queued writes.
//!
//! It takes everything that has piled up, applies it inside one transaction and commits; only
//! then are the writes that wait for an answer answered (a thread's creation, a run's end, a
//! flush), so an acknowledgement always means "committed". A write does not wake the writer: the
//! first write of a burst arms a timer that wakes it `COMMIT_DELAY` later, so a streaming run
//! costs one commit per few milliseconds, and neither the wake-up (a futex call and a thread
//! switch) nor the commit lands on the latency-critical first exchange with the provider. Writes
//! that wait for an answer wake it at once.
//!
//! When a transaction fails as a whole (disk full, I/O error, database locked by something else)
//! it is rolled back and the same batch is tried again with backoff; the store reports itself
//! failing meanwhile. If writes keep failing past `StoreLimits::write_timeout`, or the queue
//! passes `max_queue_bytes`, the queued writes are given up: each waiting caller gets
//! `Unavailable`, the runs they belonged to are remembered as *lost* (their later writes are
//! dropped rather than stored with a gap) and, in the first transaction that commits again, are
//! closed the way crash recovery closes a run. One operation that fails on its own (a constraint)
//! is logged and answered with its error; the rest of the batch commits.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, params};
use sluice_protocol::api::ArtifactView;
use sluice_protocol::{EventKind, Frame};
use tokio::sync::{oneshot, watch};

use super::{exec, schema};
use crate::{DirLock, NewRun, NewThread, RunEnd, StoreError, StoreLimits, StoreStatus};

/// The most operations applied in one transaction.
const MAX_BATCH: usize = 4096;

/// How long the writer lets a burst of writes gather before committing it.
pub(super) const COMMIT_DELAY: Duration = Duration::from_millis(2);

/// The first and the longest wait between two tries of a failing batch.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub(super) type Ack = oneshot::Sender<Result<(), StoreError>>;

pub(super) enum Op {
    /// With no reply channel, a failure is logged.
    CreateThread(NewThread, Option<Ack>),
    CreateRun(NewRun),
    StartRun(Arc<str>),
    Append {
        run_id: Arc<str>,
        message_id: Arc<str>,
        frame: Frame,
    },
    /// A run's terminal event and its end.
    Finish(Box<RunEnd>, Frame, Ack),
    DeleteThread(String, String, oneshot::Sender<Result<bool, StoreError>>),
    Flush(Ack),
    /// Writes one version of an artifact (an intermediate state is replaced by its final one).
    PutArtifact(Box<ArtifactView>),
    DiscardDraft(String),
}

impl Op {
    /// The run this write belongs to, if any.
    fn run(&self) -> Option<Arc<str>> {
        match self {
            Op::CreateRun(r) => Some(r.id.clone()),
            Op::StartRun(id) => Some(id.clone()),
            Op::Append { run_id, .. } => Some(run_id.clone()),
            Op::Finish(end, ..) => Some(end.run_id.clone()),
            Op::PutArtifact(a) => Some(Arc::from(a.run_id.as_str())),
            _ => None,
        }
    }

    /// About what the operation holds in memory, for the queue's bound.
    pub(super) fn weight(&self) -> usize {
        const BASE: usize = 128;
        BASE + match self {
            Op::CreateThread(t, _) => t.title.as_ref().map_or(0, String::len),
            Op::CreateRun(r) => r.user_content.len() + r.model.len(),
            Op::Append { frame, .. } => frame.sse().len(),
            Op::Finish(end, frame, _) => {
                frame.sse().len() + end.turns.as_ref().map_or(0, String::len)
            }
            Op::PutArtifact(a) => a.title.len() + a.data.to_string().len(),
            Op::StartRun(_) | Op::DeleteThread(..) | Op::Flush(_) | Op::DiscardDraft(_) => 0,
        }
    }

    /// Answers an operation that will not be written.
    fn refuse(self, why: &str) {
        let err = || StoreError::Unavailable(why.to_string());
        match self {
            Op::CreateThread(_, Some(tx)) | Op::Finish(_, _, tx) | Op::Flush(tx) => {
                let _ = tx.send(Err(err()));
            }
            Op::DeleteThread(_, _, tx) => {
                let _ = tx.send(Err(err()));
            }
            _ => {}
        }
    }

    /// Answers an applied operation once its transaction committed.
    fn answer(self, result: Result<bool, StoreError>) {
        match self {
            Op::CreateThread(_, Some(tx)) | Op::Finish(_, _, tx) | Op::Flush(tx) => {
                let _ = tx.send(result.map(|_| ()));
            }
            Op::DeleteThread(_, _, tx) => {
                let _ = tx.send(result);
            }
            _ => {}
        }
    }
}

/// What the store's handles and the writer share.
pub(super) struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Operations sent and not yet applied.
    pub(super) depth: AtomicUsize,
    /// Their weight.
    pub(super) bytes: AtomicUsize,
    /// Writes are failing (mirrors `status`, cheap to read on every run start).
    pub(super) failing: AtomicBool,
    pub(super) status: watch::Sender<StoreStatus>,
    pub(super) limits: StoreLimits,
}

#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// The writer should take what is queued now (an answer is awaited, or a burst's timer
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
    pub(super) fn new(limits: StoreLimits) -> Shared {
        Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            depth: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            status: watch::Sender::new(StoreStatus::default()),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // No code panics while holding the lock; the queue is whole even if one did.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets the writer take what is queued.
    pub(super) fn mark_ready(&self) {
        let mut q = self.lock();
        if q.ops.is_empty() {
            return;
        }
        q.ready = true;
        drop(q);
        self.wake.notify_one();
    }

    /// Waits for a wake-up or until `at`; answers the guard and whether `at` has come.
    fn wait_until<'a>(
        &self,
        q: MutexGuard<'a, Queue>,
        at: Instant,
    ) -> (MutexGuard<'a, Queue>, bool) {
        let now = Instant::now();
        if now >= at {
            return (q, true);
        }
        let q = self
            .wake
            .wait_timeout(q, at - now)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        (q, false)
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Queues a write without waking the writer. Answers whether it is the first of a burst (the
    /// caller then arms the timer that hands the burst over).
    pub(super) fn push(&self, op: Op) -> bool {
        self.count_in(&op);
        let mut q = self.lock();
        q.ops.push(op);
        !std::mem::replace(&mut q.armed, true)
    }

    /// Queues a write outside a runtime: the writer hands the burst over by itself.
    pub(super) fn push_with_deadline(&self, op: Op) {
        self.count_in(&op);
        let mut q = self.lock();
        q.ops.push(op);
        if !std::mem::replace(&mut q.armed, true) {
            q.deadline = Some(Instant::now() + COMMIT_DELAY);
            drop(q);
            self.wake.notify_one();
        }
    }

    /// Queues a write whose caller waits for it, and wakes the writer at once.
    pub(super) fn push_now(&self, op: Op) {
        self.count_in(&op);
        {
            let mut q = self.lock();
            q.ops.push(op);
            q.ready = true;
        }
        self.wake.notify_one();
    }

    fn count_in(&self, op: &Op) {
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(op.weight(), Ordering::Relaxed);
    }

    fn count_out(&self, ops: &[Op]) {
        let weight: usize = ops.iter().map(Op::weight).sum();
        self.depth.fetch_sub(ops.len(), Ordering::Relaxed);
        self.bytes.fetch_sub(weight, Ordering::Relaxed);
    }
}

/// Marks the queue ready when dropped: when its timer fires, and also when the runtime drops the
/// timer's task unfired (shutting down), so that no write waits for a wake that never comes.
pub(super) struct ReadyOnDrop(pub(super) Arc<Shared>);

impl Drop for ReadyOnDrop {
    fn drop(&mut self) {
        self.0.mark_ready();
    }
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) shared: Arc<Shared>,
    /// Held while the writer lives: the data directory is this process's until the last write.
    pub(super) _lock: DirLock,
    /// Taken from the queue and not yet committed (kept across failed tries).
    batch: Vec<Op>,
    /// Since when writes fail, and the last error.
    failing: Option<(Instant, String)>,
    backoff: Duration,
    /// Runs whose writes were given up: what else they write is dropped, not stored with a gap.
    lost: HashSet<Arc<str>>,
    /// Runs to close in the store the next time a transaction commits.
    to_recover: HashSet<Arc<str>>,
}

impl Writer {
    pub(super) fn new(conn: Connection, shared: Arc<Shared>, lock: DirLock) -> Writer {
        Writer {
            conn,
            shared,
            _lock: lock,
            batch: Vec::with_capacity(256),
            failing: None,
            backoff: FIRST_BACKOFF,
            lost: HashSet::new(),
            to_recover: HashSet::new(),
        }
    }

    pub(super) fn run(mut self) {
        loop {
            let closed = self.take();
            if self.batch.is_empty() && self.to_recover.is_empty() && self.failing.is_none() {
                if closed {
                    tracing::debug!("store writer stopped");
                    return;
                }
                continue;
            }
            self.attempt();
            if closed && self.failing.is_some() {
                // Nothing will retry: the process is stopping.
                self.give_up("the store closed while its writes were failing");
                tracing::debug!("store writer stopped");
                return;
            }
        }
    }

    /// Waits for work and moves it into the batch. Answers whether the store was closed (the
    /// last batch is then everything that remains).
    fn take(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut q = shared.lock();
        if let Some(retry_at) = self.failing.as_ref().map(|_| Instant::now() + self.backoff) {
            // Failing: try again after the backoff, whatever arrives meanwhile.
            while !q.closed {
                match shared.wait_until(q, retry_at) {
                    (guard, false) => q = guard,
                    (guard, true) => {
                        q = guard;
                        break;
                    }
                }
            }
        } else {
            loop {
                if q.ops.is_empty() {
                    if q.closed {
                        return true;
                    }
                } else if q.ready || q.closed {
                    break;
                } else if let Some(at) = q.deadline {
                    let (guard, due) = shared.wait_until(q, at);
                    q = guard;
                    if due {
                        break;
                    }
                    continue;
                }
                q = shared.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        }
        let room = MAX_BATCH.saturating_sub(self.batch.len());
        if q.ops.len() <= room {
            if self.batch.is_empty() {
                // The emptied batch goes back as the queue's buffer.
                std::mem::swap(&mut self.batch, &mut q.ops);
            } else {
                self.batch.append(&mut q.ops);
            }
            q.ready = false;
            q.armed = false;
            q.deadline = None;
        } else {
            // The rest stays ready and is taken right after this batch.
            self.batch.extend(q.ops.drain(..room));
        }
        q.closed && q.ops.is_empty()
    }

    /// Tries to commit the batch (and to close the lost runs).
    fn attempt(&mut self) {
        // Writes of lost runs are not stored: the run's log would have a gap.
        if !self.lost.is_empty() {
            let (dropped, kept): (Vec<Op>, Vec<Op>) = std::mem::take(&mut self.batch)
                .into_iter()
                .partition(|op| op.run().is_some_and(|r| self.lost.contains(&r)));
            self.batch = kept;
            self.shared.count_out(&dropped);
            for op in dropped {
                if let Op::Finish(end, ..) = &op {
                    // Nothing more comes from this run.
                    self.lost.remove(&end.run_id);
                }
                op.refuse("this run's earlier writes were given up while the store was failing");
            }
        }
        let probe = self.failing.is_some();
        match apply_batch(&mut self.conn, &self.batch, &self.to_recover, probe) {
            Ok(results) => {
                if !self.to_recover.is_empty() {
                    tracing::warn!(
                        runs = self.to_recover.len(),
                        "store: runs whose writes were given up are closed as interrupted"
                    );
                    self.to_recover.clear();
                }
                if let Some((since, _)) = self.failing.take() {
                    tracing::info!(
                        after_ms = since.elapsed().as_millis() as u64,
                        "store writes work again"
                    );
                    self.shared.failing.store(false, Ordering::Relaxed);
                    self.shared.status.send_modify(|s| s.failing = None);
                }
                self.backoff = FIRST_BACKOFF;
                let batch = std::mem::take(&mut self.batch);
                self.shared.count_out(&batch);
                for (op, result) in batch.into_iter().zip(results) {
                    op.answer(result);
                }
            }
            Err(err) => {
                let message = err.to_string();
                let since = match &self.failing {
                    Some((since, _)) => *since,
                    None => {
                        tracing::error!(error = %message, queued = self.shared.depth.load(Ordering::Relaxed),
                            "store writes are failing: retrying; new runs are refused until they work");
                        self.shared.failing.store(true, Ordering::Relaxed);
                        let reason = message.clone();
                        self.shared.status.send_modify(|s| s.failing = Some(reason));
                        Instant::now()
                    }
                };
                self.failing = Some((since, message.clone()));
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                let limits = self.shared.limits;
                let over = self.shared.bytes.load(Ordering::Relaxed) >= limits.max_queue_bytes;
                if since.elapsed() >= limits.write_timeout || over {
                    self.give_up(&format!(
                        "writes failed for {} ms ({message})",
                        since.elapsed().as_millis()
                    ));
                }
            }
        }
    }

    /// Gives up every queued write: each waiting caller is answered `Unavailable`, and the runs
    /// the writes belonged to become lost (the engine fails them on the status change).
    fn give_up(&mut self, why: &str) {
        let mut ops = std::mem::take(&mut self.batch);
        ops.append(&mut self.shared.lock().ops);
        self.shared.count_out(&ops);
        let n = ops.len();
        let mut ended = Vec::new();
        for op in ops {
            if let Some(run) = op.run() {
                if matches!(op, Op::Finish(..)) {
                    ended.push(run.clone());
                }
                self.lost.insert(run.clone());
                self.to_recover.insert(run);
            }
            op.refuse(why);
        }
        for run in ended {
            self.lost.remove(&run);
        }
        tracing::error!(
            writes = n,
            runs = self.to_recover.len(),
            reason = why,
            "store: queued writes given up; the runs they belong to fail, and are closed as interrupted once writes work again"
        );
        self.shared.status.send_modify(|s| s.abandoned += 1);
        // A fresh bound for whatever comes next.
        if let Some((since, _)) = &mut self.failing {
            *since = Instant::now();
        }
    }
}

/// Whether an error fails the whole transaction (the database cannot write now) rather than
/// one operation.
fn fails_the_batch(err: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    match err {
        rusqlite::Error::SqliteFailure(e, _) => matches!(
            e.code,
            C::DiskFull
                | C::SystemIoFailure
                | C::CannotOpen
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::ReadOnly
                | C::OutOfMemory
                | C::FileLockingProtocolFailed
                | C::DatabaseCorrupt
                | C::NotADatabase
                | C::OperationInterrupted
        ),
        _ => false,
    }
}

/// Deltas accumulated per assistant message within one batch, applied with one UPDATE each.
#[derive(Default)]
struct Checkpoint {
    content: String,
    reasoning: String,
}

/// The per-batch bookkeeping of checkpoints.
#[derive(Default)]
struct Progress {
    checkpoints: HashMap<Arc<str>, Checkpoint>,
    last_seq: HashMap<Arc<str>, u64>,
}

/// Applies the batch in one transaction. `Err` when the transaction as a whole failed (rolled
/// back: nothing of it is stored); otherwise one result per operation, in order.
fn apply_batch(
    conn: &mut Connection,
    batch: &[Op],
    to_recover: &HashSet<Arc<str>>,
    probe: bool,
) -> Result<Vec<Result<bool, StoreError>>, rusqlite::Error> {
    let tx = conn.transaction()?;
    if probe {
        // While writes fail, a try always writes something: an empty transaction would commit
        // and report the store well when it still cannot write.
        exec(
            &tx,
            "INSERT OR REPLACE INTO store_meta (key, value) VALUES ('probe', ?1)",
            params![super::now_ms().to_string()],
        )?;
    }
    if !to_recover.is_empty() {
        schema::recover(&tx, Some(to_recover))?;
    }
    let mut progress = Progress::default();
    let mut results = Vec::with_capacity(batch.len());
    for op in batch {
        let result = apply(&tx, op, &mut progress);
        match result {
            Err(err) if fails_the_batch(&err) => return Err(err),
            Err(err) => {
                tracing::error!(error = %err, run_id = op.run().as_deref().unwrap_or(""), "store write failed");
                results.push(Err(StoreError::Database(err.to_string())));
            }
            Ok(v) => results.push(Ok(v)),
        }
    }
    flush_progress(&tx, &mut progress)?;
    tx.commit()?;
    Ok(results)
}

fn apply(tx: &Transaction<'_>, op: &Op, progress: &mut Progress) -> rusqlite::Result<bool> {
    match op {
        Op::Flush(_) => {}
        Op::Append {
            run_id,
            message_id,
            frame,
        } => append(tx, run_id, message_id, frame, progress)?,
        Op::Finish(end, terminal, _) => {
            // The run's pending deltas land before the message's final status, and the terminal
            // event with the end: a crash never stores one without the other.
            flush_progress(tx, progress)?;
            append(tx, &end.run_id, &end.message_id, terminal, progress)?;
            flush_progress(tx, progress)?;
            finish_run(tx, end)?;
        }
        Op::CreateThread(t, _) => {
            exec(
                tx,
                "INSERT INTO threads (id, owner, title, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![t.id, t.owner, t.title, t.created_at],
            )?;
        }
        Op::CreateRun(r) => create_run(tx, r)?,
        Op::StartRun(id) => {
            exec(
                tx,
                "UPDATE runs SET status = 'running' WHERE id = ?1 AND status = 'queued'",
                params![&**id],
            )?;
        }
        Op::DeleteThread(owner, id, _) => {
            return Ok(exec(
                tx,
                "DELETE FROM threads WHERE id = ?1 AND owner = ?2",
                params![id, owner],
            )? > 0);
        }
        Op::PutArtifact(a) => put_artifact(tx, a)?,
        Op::DiscardDraft(id) => {
            exec(
                tx,
                "DELETE FROM artifacts WHERE id = ?1 AND status = 'intermediate'",
                params![id],
            )?;
        }
    }
    Ok(true)
}

fn append(
    tx: &Transaction<'_>,
    run_id: &Arc<str>,
    message_id: &Arc<str>,
    frame: &Frame,
    progress: &mut Progress,
) -> rusqlite::Result<()> {
    exec(
        tx,
        "INSERT OR IGNORE INTO events (run_id, seq, type, data) VALUES (?1, ?2, ?3, ?4)",
        params![
            &**run_id,
            frame.seq() as i64,
            frame.kind().as_str(),
            &frame.json()[..]
        ],
    )?;
    if let Some(text) = frame.delta_text() {
        let cp = progress.checkpoints.entry(message_id.clone()).or_default();
        if frame.kind() == EventKind::TextDelta {
            cp.content.push_str(&text);
        } else {
            cp.reasoning.push_str(&text);
        }
    }
    progress.last_seq.insert(run_id.clone(), frame.seq());
    Ok(())
}

/// Applies the pending message checkpoints and `last_seq` updates.
fn flush_progress(tx: &Transaction<'_>, progress: &mut Progress) -> rusqlite::Result<()> {
    for (message_id, cp) in progress.checkpoints.drain() {
        exec(
            tx,
            "UPDATE messages SET content = content || ?2, reasoning = reasoning || ?3 WHERE id = ?1",
            params![&*message_id, cp.content, cp.reasoning],
        )?;
    }
    for (run_id, seq) in progress.last_seq.drain() {
        exec(
            tx,
            "UPDATE runs SET last_seq = MAX(last_seq, ?2) WHERE id = ?1",
            params![&*run_id, seq as i64],
        )?;
    }
    Ok(())
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

fn finish_run(tx: &Transaction<'_>, end: &RunEnd) -> rusqlite::Result<()> {
    let usage = serde_json::to_string(&end.usage).ok();
    let error = end
        .error
        .as_ref()
        .and_then(|e| serde_json::to_string(e).ok());
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

fn put_artifact(tx: &Transaction<'_>, a: &ArtifactView) -> rusqlite::Result<()> {
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
