//! Sluice's storage: the [`Store`] trait the engine writes through, and its embedded SQLite
//! implementation ([`SqliteStore`]).
//!
//! Writes that happen while a run streams (its creation, every event) are *submitted*, not
//! awaited: they go on an ordered queue to one writer that applies whatever has piled up in a
//! single transaction. So the stream never waits for the disk, and a burst of events costs one
//! commit. Writes that acknowledge something to a client (a thread's creation, a run's end with
//! its terminal event, a flush) answer only once their transaction has committed. Reads do not
//! queue behind the writer: they see what is committed.
//!
//! When writes fail (disk full, database unreachable) the writer keeps what it has and retries;
//! new work is refused meanwhile ([`Store::admit`]); past the configured bound
//! ([`StoreLimits`]) the queued writes are given up, the runs they belonged to are failed by the
//! engine, and once writes work again those runs are closed in the store as a crash would close
//! them (see ARCHITECTURE.md, "Storage").

mod lock;
mod sqlite;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sluice_protocol::api::{MessageStatus, RunStatus, ThreadView};
use sluice_protocol::{ErrorInfo, Frame, Usage};

pub use lock::DirLock;
pub use sqlite::SqliteStore;

/// A pending answer from the store.
pub type Reply<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused one operation (the backend's own message).
    #[error("database error: {0}")]
    Database(String),
    /// Writes cannot be made now (the disk is full, the database is unreachable, the queue is
    /// over its bound), or queued writes were given up. Trying again later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("the store's writer has stopped")]
    Closed,
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    #[error("cannot open the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    /// Another process uses this data directory.
    #[error(
        "the data directory {path} is in use by another Sluice process{}; stop it, or give this one another --data-dir",
        match pid { Some(pid) => format!(" (pid {pid})"), None => String::new() }
    )]
    Locked { path: String, pid: Option<u32> },
    /// The database was written by a newer Sluice.
    #[error(
        "the database schema is version {found}, newer than this binary knows ({known}); run the newer Sluice, or restore a backup"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

impl StoreError {
    /// Stable, low-cardinality name for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Database(_) => "database",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Closed => "closed",
            StoreError::Corrupt(_) => "corrupt",
            StoreError::DataDir { .. } => "data_dir",
            StoreError::Locked { .. } => "locked",
            StoreError::SchemaTooNew { .. } => "schema",
        }
    }

    /// Whether the failure is the store's state rather than the request: try again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Closed)
    }
}

/// How much the store may hold back while it cannot write.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// The most bytes of writes queued and not yet committed. New work is refused past it; while
    /// writes fail, reaching it gives the queued writes up at once.
    pub max_queue_bytes: usize,
    /// How long writes may keep failing before the queued ones are given up (and the runs they
    /// belong to fail with `STORE_UNAVAILABLE`).
    pub write_timeout: Duration,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_queue_bytes: 64 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// The store's health, published on a watch channel ([`Store::status`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStatus {
    /// Why writes are failing, while they are.
    pub failing: Option<String>,
    /// How many times queued writes were given up since start. Each time, every run then in
    /// flight has lost writes and must fail.
    pub abandoned: u64,
}

/// A thread to create.
#[derive(Debug, Clone)]
pub struct NewThread {
    pub id: String,
    pub owner: String,
    pub title: Option<String>,
    pub created_at: i64,
}

/// A run to create, with the user message it answers and the (empty) assistant message it writes.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: Arc<str>,
    pub thread_id: String,
    pub model: String,
    pub status: RunStatus,
    pub user_message_id: String,
    pub user_content: String,
    pub message_id: Arc<str>,
    pub created_at: i64,
}

/// How a run ended, recorded with its terminal event.
#[derive(Debug, Clone)]
pub struct RunEnd {
    pub run_id: Arc<str>,
    pub message_id: Arc<str>,
    pub status: RunStatus,
    pub message_status: MessageStatus,
    pub usage: Usage,
    pub time_to_first_token_ms: Option<f64>,
    pub error: Option<ErrorInfo>,
    pub ended_at: i64,
    /// The run's turns when it called tools (JSON), kept with the assistant message.
    pub turns: Option<String>,
}

/// A run as stored, with what resume needs besides the public view.
#[derive(Debug, Clone)]
pub struct StoredRun {
    pub view: sluice_protocol::api::RunView,
    pub owner: String,
    /// Starts at 1; a crash recovery that closes the run moves it to 2.
    pub epoch: u32,
    /// When the run was closed by crash recovery: the last `seq` the store held.
    pub durable_seq: Option<u64>,
}

/// A run found in flight at start-up and closed as interrupted.
#[derive(Debug, Clone)]
pub struct RecoveredRun {
    pub run_id: String,
    pub thread_id: String,
    pub durable_seq: u64,
    /// `false` when the stored log already ended with a terminal event (written by an older
    /// version whose run end was a separate write): the run's status was taken from that event
    /// and nothing was appended.
    pub interrupted: bool,
}

/// Everything the engine needs from storage. The SQLite implementation is the embedded default;
/// a server-backed one (Postgres) implements the same contract.
pub trait Store: Send + Sync + 'static {
    /// Creates a thread; resolves once it is committed.
    fn create_thread(&self, thread: NewThread) -> Reply<()>;
    /// Queues the creation of a thread without waiting (a run's own new thread: the stream must not
    /// wait for the disk). Reads queued after it see it.
    fn queue_thread(&self, thread: NewThread);
    /// Queues the creation of a run and its two messages.
    fn create_run(&self, run: NewRun);
    /// Queues a queued run's move to `running`.
    fn start_run(&self, run_id: Arc<str>);
    /// Queues one event of a run. Text and reasoning deltas are also appended to the assistant
    /// message in the same transaction, so the message is always the concatenation of the stored deltas.
    fn append_event(&self, run_id: Arc<str>, message_id: Arc<str>, frame: Frame);
    /// A run's terminal event and its end (status, usage, turns), written in one transaction;
    /// resolves once that transaction has committed. The terminal event must not reach a client
    /// before.
    fn finish_run(&self, end: RunEnd, terminal: Frame) -> Reply<()>;
    /// Deletes a thread with its messages, runs and events, once committed. `Ok(false)` if the
    /// owner has no such thread.
    fn delete_thread(&self, owner: String, thread_id: String) -> Reply<bool>;
    fn get_thread(&self, owner: String, thread_id: String) -> Reply<Option<ThreadView>>;
    /// Whether `owner` has this thread (without reading its messages).
    fn thread_exists(&self, owner: String, thread_id: String) -> Reply<bool>;
    fn list_threads(&self, owner: String, limit: u32) -> Reply<Vec<ThreadView>>;
    fn get_run(&self, owner: String, run_id: String) -> Reply<Option<StoredRun>>;
    /// The stored events of a run with `seq > after`, at most `limit`, in order.
    fn read_events(&self, run_id: String, after: u64, limit: u32) -> Reply<Vec<Frame>>;
    /// Resolves once every write submitted before it is committed.
    fn flush(&self) -> Reply<()>;
    /// Queues one version of an artifact (an intermediate state of a version is replaced by the next).
    fn put_artifact(&self, artifact: sluice_protocol::api::ArtifactView);
    /// Queues the removal of an artifact's intermediate state that never became final (its run ended
    /// while the call creating it was still being written).
    fn discard_artifact_draft(&self, artifact_id: String);
    /// An artifact `owner` may see: `version`, or the latest.
    fn get_artifact(
        &self,
        owner: String,
        id: String,
        version: Option<u32>,
    ) -> Reply<Option<sluice_protocol::api::ArtifactView>>;
    /// Operations queued and not yet applied (a gauge: a growing value means the disk is behind).
    fn queue_depth(&self) -> usize;
    /// Bytes of writes queued and not yet committed.
    fn queue_bytes(&self) -> usize;
    /// Whether new work may start: `Unavailable` while writes fail or the queue is over its bound.
    fn admit(&self) -> Result<(), StoreError>;
    /// The store's health as it changes.
    fn status(&self) -> tokio::sync::watch::Receiver<StoreStatus>;
}
