//! The embedded store: one SQLite database file in WAL mode in the data directory, which this
//! process locks for its lifetime (`lock.rs`).
//!
//! Writes go on one ordered queue to one writer thread (`writer.rs`), which applies whatever has
//! piled up inside one transaction and commits; writes that wait for an answer are answered only
//! after the commit. Reads run on read-only connections of their own (`read.rs`) and see what is
//! committed; a read by id that misses while writes are still queued flushes them and reads
//! again, so a caller that was told an id by a stream event finds it. With `synchronous=NORMAL`
//! in WAL mode a commit survives the process being killed (it is in the OS's page cache); only a
//! power loss can take back the last commits.

mod read;
mod schema;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use rusqlite::Connection;
use sluice_protocol::Frame;
use sluice_protocol::api::{ArtifactView, ThreadView};
use tokio::sync::{oneshot, watch};

use crate::{
    DirLock, NewRun, NewThread, RecoveredRun, Reply, RunEnd, Store, StoreError, StoreLimits,
    StoreStatus, StoredRun,
};
use read::Reader;
use writer::{Op, ReadyOnDrop, Shared, Writer};

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Database(err.to_string())
    }
}

fn db(err: rusqlite::Error) -> StoreError {
    err.into()
}

/// The embedded store. Cheap to clone; the writer thread stops when the last clone is dropped,
/// after applying everything queued (and only then releases the data directory).
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    reader: Arc<Reader>,
    /// Closes the queue when the last clone goes.
    _open: Arc<OpenHandle>,
}

struct OpenHandle(Arc<Shared>);

impl Drop for OpenHandle {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl SqliteStore {
    /// Locks `data_dir` (created if missing) for this process, opens (or creates) `sluice.db` in
    /// it, migrates its schema, closes the runs a crash left in flight, and starts the writer
    /// thread. Returns the runs it closed. Another process holding the directory is
    /// `StoreError::Locked`, before anything is read or written.
    pub fn open(
        data_dir: &Path,
        limits: StoreLimits,
    ) -> Result<(SqliteStore, Vec<RecoveredRun>), StoreError> {
        let lock = DirLock::acquire(data_dir)?;
        let path = data_dir.join("sluice.db");
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Every statement the writer runs stays prepared (`exec`, `prepare_cached`).
        conn.set_prepared_statement_cache_capacity(64);
        schema::migrate(&mut conn)?;
        let recovered = {
            let tx = conn.transaction()?;
            let recovered = schema::recover(&tx, None)?;
            tx.commit()?;
            recovered
        };
        let shared = Arc::new(Shared::new(limits));
        let writer = Writer::new(conn, shared.clone(), lock);
        thread::Builder::new()
            .name("sluice-store".into())
            .spawn(move || writer.run())
            .map_err(|source| StoreError::DataDir {
                path: "writer thread".into(),
                source,
            })?;
        Ok((
            SqliteStore {
                _open: Arc::new(OpenHandle(shared.clone())),
                reader: Arc::new(Reader::new(&path)),
                shared,
            },
            recovered,
        ))
    }

    /// Queues a write; the first of a burst arms the timer that hands the burst to the writer.
    fn submit(&self, op: Op) {
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                if self.shared.push(op) {
                    // The runtime's timer costs no thread wake-up now; the writer is woken from
                    // the timer, off this task's path.
                    let ready = ReadyOnDrop(self.shared.clone());
                    runtime.spawn(async move {
                        tokio::time::sleep(writer::COMMIT_DELAY).await;
                        drop(ready);
                    });
                }
            }
            Err(_) => self.shared.push_with_deadline(op),
        }
    }

    /// Queues a write whose caller waits for its commit, and wakes the writer at once.
    fn ask<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Reply<T> {
        let (tx, rx) = oneshot::channel();
        self.shared.push_now(make(tx));
        Box::pin(async move { rx.await.map_err(|_| StoreError::Closed)? })
    }

    /// Runs a read on a read connection, on tokio's blocking pool.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Reply<T> {
        let reader = self.reader.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || reader.read(f))
                .await
                .map_err(|_| StoreError::Closed)?
        })
    }

    /// A read by id: when it finds nothing while writes are queued (the id may be in one of
    /// them), the queue is committed and the read tried once more.
    fn read_own<T: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> Result<T, StoreError> + Clone + Send + 'static,
        missed: fn(&T) -> bool,
    ) -> Reply<T> {
        let store = self.clone();
        Box::pin(async move {
            let first = store.read(f.clone()).await?;
            if !missed(&first) || !store.may_flush() {
                return Ok(first);
            }
            store.flush().await?;
            store.read(f).await
        })
    }

    /// Whether waiting for the queue is worth it: there is something queued and writes work.
    fn may_flush(&self) -> bool {
        self.shared.depth.load(Ordering::Relaxed) > 0
            && !self.shared.failing.load(Ordering::Relaxed)
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
    fn finish_run(&self, end: RunEnd, terminal: Frame) -> Reply<()> {
        self.ask(|tx| Op::Finish(Box::new(end), terminal, tx))
    }
    fn delete_thread(&self, owner: String, thread_id: String) -> Reply<bool> {
        self.ask(|tx| Op::DeleteThread(owner, thread_id, tx))
    }
    fn get_thread(&self, owner: String, thread_id: String) -> Reply<Option<ThreadView>> {
        self.read_own(
            move |c| read::get_thread(c, &owner, &thread_id),
            Option::is_none,
        )
    }
    fn thread_exists(&self, owner: String, thread_id: String) -> Reply<bool> {
        self.read_own(
            move |c| read::thread_exists(c, &owner, &thread_id),
            |found| !found,
        )
    }
    fn list_threads(&self, owner: String, limit: u32) -> Reply<Vec<ThreadView>> {
        self.read(move |c| read::list_threads(c, &owner, limit))
    }
    fn get_run(&self, owner: String, run_id: String) -> Reply<Option<StoredRun>> {
        self.read_own(move |c| read::get_run(c, &owner, &run_id), Option::is_none)
    }
    fn read_events(&self, run_id: String, after: u64, limit: u32) -> Reply<Vec<Frame>> {
        self.read(move |c| read::read_events(c, &run_id, after, limit))
    }
    fn flush(&self) -> Reply<()> {
        self.ask(Op::Flush)
    }
    fn put_artifact(&self, artifact: ArtifactView) {
        self.submit(Op::PutArtifact(Box::new(artifact)));
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
        // A tool reads the version it updates: every version queued before must be in it.
        let store = self.clone();
        Box::pin(async move {
            if store.may_flush() {
                store.flush().await?;
            }
            store
                .read(move |c| read::get_artifact(c, &owner, &id, version))
                .await
        })
    }
    fn queue_depth(&self) -> usize {
        self.shared.depth.load(Ordering::Relaxed)
    }
    fn queue_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Relaxed)
    }
    fn admit(&self) -> Result<(), StoreError> {
        if self.shared.failing.load(Ordering::Relaxed) {
            let why = self
                .shared
                .status
                .borrow()
                .failing
                .clone()
                .unwrap_or_default();
            return Err(StoreError::Unavailable(format!(
                "the database cannot be written ({why}); try again shortly"
            )));
        }
        let bytes = self.queue_bytes();
        let max = self.shared.limits.max_queue_bytes;
        if bytes >= max {
            return Err(StoreError::Unavailable(format!(
                "the database is behind: {} KiB of writes are queued (the bound is {} KiB); try again shortly",
                bytes / 1024,
                max / 1024
            )));
        }
        Ok(())
    }
    fn status(&self) -> watch::Receiver<StoreStatus> {
        self.shared.status.subscribe()
    }
}

/// Runs one statement through the connection's statement cache: the writer runs the same few
/// statements for every run, and parsing them each time was a fifth of its work.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
