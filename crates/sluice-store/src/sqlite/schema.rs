//! The database's schema, its versioned migrations, and crash recovery.
//!
//! `PRAGMA user_version` is the schema's version. Each migration runs once, in its own
//! transaction, at start-up; a database newer than this binary knows is refused rather than
//! written to.

use std::collections::HashSet;
use std::sync::Arc;

use rusqlite::{Connection, Transaction, params};
use sluice_protocol::api::{MessageStatus, RunStatus};
use sluice_protocol::{EventBody, EventKind, Frame, Usage};

use super::{db, exec, now_ms};
use crate::{RecoveredRun, StoreError};

/// Version 1: the schema as it was before versions were counted (`CREATE … IF NOT EXISTS`, so
/// it also adopts a database made then, with or without the `turns` column).
fn v1(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        r#"
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
"#,
    )?;
    let has_turns = tx
        .prepare("SELECT 1 FROM pragma_table_info('messages') WHERE name = 'turns'")?
        .exists([])?;
    if !has_turns {
        tx.execute_batch("ALTER TABLE messages ADD COLUMN turns TEXT")?;
    }
    Ok(())
}

/// Version 2: artifacts by run, for removing the drafts of runs that did not finish; a table
/// of the store's own (the writer's probe while writes fail).
fn v2(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS artifacts_by_run ON artifacts(run_id, status);
         CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    )
}

type Migration = fn(&Transaction<'_>) -> rusqlite::Result<()>;

/// Every migration, in order: the schema's version is the number applied.
const MIGRATIONS: &[Migration] = &[v1, v2];

/// The schema version this binary writes.
pub(super) const LATEST: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to `LATEST`, one transaction per version; refuses a newer database.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db)?;
    if found > LATEST {
        return Err(StoreError::SchemaTooNew {
            found,
            known: LATEST,
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version <= found {
            continue;
        }
        let tx = conn.transaction().map_err(db)?;
        migration(&tx).map_err(db)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(db)?;
        tx.commit().map_err(db)?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(())
}

/// Closes the runs left unfinished: at start-up every one (`only` = `None`: the process before
/// this one died with them), or the runs whose writes this process gave up (see `writer.rs`).
///
/// A run whose stored log already ends with a terminal event gets its status from that event
/// and nothing appended. Any other gets a `run_interrupted` event in the next epoch right after
/// its last stored event (`durable_seq`), and its assistant message ends `incomplete` with the
/// content that was checkpointed. The intermediate states of artifacts the run never finished are
/// removed (an artifact never made is not kept).
pub(super) fn recover(
    tx: &Transaction<'_>,
    only: Option<&HashSet<Arc<str>>>,
) -> rusqlite::Result<Vec<RecoveredRun>> {
    let mut found = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT r.id, r.thread_id, r.message_id, r.epoch,
                    COALESCE((SELECT MAX(seq) FROM events e WHERE e.run_id = r.id), 0),
                    (SELECT type FROM events e WHERE e.run_id = r.id ORDER BY seq DESC LIMIT 1),
                    (SELECT data FROM events e WHERE e.run_id = r.id ORDER BY seq DESC LIMIT 1)
             FROM runs r WHERE r.status IN ('queued', 'running')",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, u32>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, Option<Vec<u8>>>(6)?,
            ))
        })?;
        for row in rows {
            let row = row?;
            if only.is_none_or(|ids| ids.contains(row.0.as_str())) {
                found.push(row);
            }
        }
    }
    let now = now_ms();
    let mut recovered = Vec::new();
    for (run_id, thread_id, message_id, epoch, durable, last_kind, last_data) in found {
        let durable = u64::try_from(durable).unwrap_or(0);
        let last_kind = last_kind.as_deref().map(EventKind::parse);
        let interrupted = match last_kind {
            Some(kind) if kind.is_terminal() => {
                close_from_terminal(tx, &run_id, &message_id, kind, last_data.as_deref(), now)?;
                false
            }
            _ => {
                interrupt(tx, &run_id, &message_id, epoch, durable, now)?;
                true
            }
        };
        exec(
            tx,
            "DELETE FROM artifacts WHERE run_id = ?1 AND status = 'intermediate'",
            params![run_id],
        )?;
        recovered.push(RecoveredRun {
            run_id,
            thread_id,
            durable_seq: durable,
            interrupted,
        });
    }
    if only.is_none() {
        // Nothing runs yet: any intermediate state left is a draft that never became final.
        tx.execute("DELETE FROM artifacts WHERE status = 'intermediate'", [])?;
    }
    Ok(recovered)
}

/// Appends `run_interrupted` in the next epoch and closes the run and its message.
fn interrupt(
    tx: &Transaction<'_>,
    run_id: &str,
    message_id: &str,
    epoch: u32,
    durable: u64,
    now: i64,
) -> rusqlite::Result<()> {
    let epoch = epoch.saturating_add(1);
    let seq = durable + 1;
    let frame = Frame::encode_in_epoch(
        run_id,
        seq,
        epoch,
        &EventBody::RunInterrupted {
            reason: "the server stopped while the run was in flight".into(),
            durable_seq: durable,
        },
    );
    exec(
        tx,
        "INSERT INTO events (run_id, seq, epoch, type, data) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            run_id,
            seq as i64,
            epoch,
            frame.kind().as_str(),
            &frame.json()[..]
        ],
    )?;
    exec(
        tx,
        "UPDATE runs SET status = 'interrupted', last_seq = ?2, epoch = ?3, durable_seq = ?4,
                ended_at = ?5 WHERE id = ?1",
        params![run_id, seq as i64, epoch, durable as i64, now],
    )?;
    exec(
        tx,
        "UPDATE messages SET status = 'incomplete' WHERE id = ?1",
        params![message_id],
    )?;
    Ok(())
}

/// A run whose terminal event is stored but whose end is not: the end is read from the event.
fn close_from_terminal(
    tx: &Transaction<'_>,
    run_id: &str,
    message_id: &str,
    kind: EventKind,
    data: Option<&[u8]>,
    now: i64,
) -> rusqlite::Result<()> {
    let (status, message) = match kind {
        EventKind::RunCompleted => (RunStatus::Completed, MessageStatus::Complete),
        EventKind::RunFailed => (RunStatus::Failed, MessageStatus::Incomplete),
        EventKind::RunCancelled => (RunStatus::Cancelled, MessageStatus::Incomplete),
        _ => (RunStatus::Interrupted, MessageStatus::Incomplete),
    };
    let body: Option<serde_json::Value> = data.and_then(|d| serde_json::from_slice(d).ok());
    let usage = body
        .as_ref()
        .and_then(|b| serde_json::from_value::<Usage>(b["usage"].clone()).ok())
        .and_then(|u| serde_json::to_string(&u).ok());
    let error = body
        .as_ref()
        .map(|b| b["error"].clone())
        .filter(|e| !e.is_null())
        .map(|e| e.to_string());
    exec(
        tx,
        "UPDATE runs SET status = ?2, usage = COALESCE(?3, usage), error = COALESCE(?4, error),
                last_seq = (SELECT MAX(seq) FROM events WHERE run_id = ?1), ended_at = ?5
         WHERE id = ?1",
        params![run_id, status.as_str(), usage, error, now],
    )?;
    exec(
        tx,
        "UPDATE messages SET status = ?2 WHERE id = ?1",
        params![message_id, message.as_str()],
    )?;
    Ok(())
}
