//! Reads, on connections of their own beside the writer's: a read never waits for a batch of
//! writes to be applied, and sees only what is committed.
//!
//! A few read-only connections are kept in a pool; each read runs on tokio's blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sluice_protocol::api::{
    ArtifactKind, ArtifactStatus, ArtifactView, MessageStatus, MessageView, RunStatus, RunView,
    ThreadView,
};
use sluice_protocol::{ErrorInfo, EventKind, Frame, Usage};

use crate::{StoreError, StoredRun};

/// The most idle read connections kept.
const POOL: usize = 4;

/// Read-only connections to the database file.
pub(super) struct Reader {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Reader {
    pub(super) fn new(path: &Path) -> Reader {
        Reader {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }

    /// Runs `f` on an idle connection (or a new one); blocking.
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => self.open()?,
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < POOL {
            idle.push(conn);
        }
        out
    }
}

pub(super) fn get_thread(
    conn: &Connection,
    owner: &str,
    id: &str,
) -> Result<Option<ThreadView>, StoreError> {
    let thread = conn
        .prepare_cached("SELECT id, title, created_at FROM threads WHERE id = ?1 AND owner = ?2")?
        .query_row(params![id, owner], thread_row)
        .optional()?;
    let Some(mut thread) = thread else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
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
    let mut stmt = conn.prepare_cached(
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

pub(super) fn list_threads(
    conn: &Connection,
    owner: &str,
    limit: u32,
) -> Result<Vec<ThreadView>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, title, created_at FROM threads WHERE owner = ?1
         ORDER BY created_at DESC, id DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![owner, limit], thread_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(super) fn get_run(
    conn: &Connection,
    owner: &str,
    id: &str,
) -> Result<Option<StoredRun>, StoreError> {
    let row = conn.prepare_cached("SELECT r.id, r.thread_id, r.model, r.status, r.user_message_id, r.message_id, r.usage,
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
pub(super) fn thread_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ThreadView> {
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

pub(super) fn get_artifact(
    conn: &Connection,
    owner: &str,
    id: &str,
    version: Option<u32>,
) -> Result<Option<ArtifactView>, StoreError> {
    let row = conn.prepare_cached("SELECT a.id, a.version, a.thread_id, a.run_id, a.kind, a.title, a.status, a.data, a.created_at
             FROM artifacts a JOIN threads t ON t.id = a.thread_id
             WHERE a.id = ?1 AND t.owner = ?2
               AND a.version = COALESCE(?3, (SELECT MAX(version) FROM artifacts b WHERE b.id = a.id))")?
        .query_row(params![id, owner, version],
            artifact_row,
        )
        .optional()?;
    row.transpose()
}

pub(super) fn read_events(
    conn: &Connection,
    run_id: &str,
    after: u64,
    limit: u32,
) -> Result<Vec<Frame>, StoreError> {
    let mut stmt = conn.prepare_cached(
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

pub(super) fn thread_exists(conn: &Connection, owner: &str, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM threads WHERE id = ?1 AND owner = ?2")?
        .exists(params![id, owner])?)
}
