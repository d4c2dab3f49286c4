//! The SQLite store's own tests: group commit, recovery, acknowledgements after commit.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use sluice_protocol::api::{MessageStatus, RunStatus};
use sluice_protocol::{EventBody, EventKind, Frame};

use super::SqliteStore;
use crate::{NewRun, NewThread, Store, StoreLimits};

/// Opens the store, waiting for a store just dropped in this process to let the directory go
/// (its writer thread releases the lock once it has applied what was queued).
fn open(dir: &Path) -> (SqliteStore, Vec<crate::RecoveredRun>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match SqliteStore::open(dir, StoreLimits::default()) {
            Err(crate::StoreError::Locked { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5))
            }
            other => return other.expect("open"),
        }
    }
}

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
    let (store, _) = open(dir.path());
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
    let (store, _) = open(dir.path());
    store.queue_thread(thread("t1"));
    assert!(committed_soon(dir.path(), "t1"));
}

#[test]
fn a_write_whose_timer_dies_with_its_runtime_is_still_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
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
    let (store, _) = open(dir.path());
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
        let (store, recovered) = open(dir.path());
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
        // Reads see what is committed.
        store.flush().await.expect("flush");
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
    let (store, recovered) = open(dir.path());
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

/// Another connection's view of one count.
fn count(dir: &Path, sql: &str) -> i64 {
    let other = Connection::open(dir.join("sluice.db")).expect("second connection");
    other.query_row(sql, [], |r| r.get(0)).expect("count")
}

fn run_end(run: &NewRun, status: RunStatus) -> crate::RunEnd {
    crate::RunEnd {
        run_id: run.id.clone(),
        message_id: run.message_id.clone(),
        status,
        message_status: MessageStatus::Complete,
        usage: Default::default(),
        time_to_first_token_ms: None,
        error: None,
        ended_at: 2,
        turns: None,
    }
}

fn completed(run_id: &str, seq: u64) -> Frame {
    Frame::encode(
        run_id,
        seq,
        &EventBody::RunCompleted {
            usage: Default::default(),
            time_to_first_token_ms: None,
            duration_ms: 1.0,
            stop_reason: None,
        },
    )
}

#[tokio::test]
async fn acknowledged_writes_are_committed_when_they_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store.create_thread(thread("t")).await.expect("thread");
    // No wait, no flush: the answer itself means committed.
    assert_eq!(
        count(dir.path(), "SELECT count(*) FROM threads WHERE id = 't'"),
        1
    );
    let run = new_run("t", "r");
    store.create_run(run.clone());
    let delta = Frame::encode("r", 1, &EventBody::TextDelta { delta: "hi".into() });
    store.append_event(run.id.clone(), run.message_id.clone(), delta);
    store
        .finish_run(run_end(&run, RunStatus::Completed), completed("r", 2))
        .await
        .expect("finish");
    assert_eq!(
        count(
            dir.path(),
            "SELECT count(*) FROM runs WHERE id = 'r' AND status = 'completed' AND last_seq = 2"
        ),
        1
    );
    assert_eq!(
        count(
            dir.path(),
            "SELECT count(*) FROM events WHERE run_id = 'r' AND type = 'run_completed'"
        ),
        1
    );
    assert_eq!(
        count(
            dir.path(),
            "SELECT count(*) FROM messages WHERE id = 'r-m' AND content = 'hi' AND status = 'complete'"
        ),
        1
    );
    assert!(
        store
            .delete_thread("o".into(), "t".into())
            .await
            .expect("delete")
    );
    assert_eq!(count(dir.path(), "SELECT count(*) FROM threads"), 0);
}

#[tokio::test]
async fn reads_find_an_id_that_is_still_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(dir.path());
    store.queue_thread(thread("t"));
    // The read connection sees only commits; a miss with writes queued commits them and reads again.
    assert!(
        store
            .thread_exists("o".into(), "t".into())
            .await
            .expect("read")
    );
    let run = new_run("t", "r");
    store.create_run(run);
    let found = store.get_run("o".into(), "r".into()).await.expect("read");
    assert_eq!(found.map(|r| r.view.status), Some(RunStatus::Running));
}

/// A database written by an older version could hold a run's terminal event without its end
/// (they were two writes); recovery takes the end from the event and appends nothing.
#[tokio::test]
async fn recovery_never_adds_a_second_terminal_event_and_removes_drafts() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (store, _) = open(dir.path());
        store.create_thread(thread("t")).await.expect("thread");
        for id in ["done", "cut"] {
            let run = new_run("t", id);
            store.create_run(run.clone());
            let delta = Frame::encode(id, 1, &EventBody::TextDelta { delta: "x".into() });
            store.append_event(run.id.clone(), run.message_id.clone(), delta);
        }
        // `done`'s terminal event is stored, its end is not.
        let run = new_run("t", "done");
        store.append_event(run.id.clone(), run.message_id.clone(), completed("done", 2));
        for (id, status) in [("a1", "intermediate"), ("a2", "final")] {
            store.put_artifact(sluice_protocol::api::ArtifactView {
                id: id.into(),
                thread_id: "t".into(),
                run_id: "cut".into(),
                kind: sluice_protocol::api::ArtifactKind::Document,
                title: "doc".into(),
                version: 1,
                status: sluice_protocol::api::ArtifactStatus::parse(status).expect("status"),
                data: serde_json::json!({"markdown": "# hi"}),
                created_at: 1,
            });
        }
        store.flush().await.expect("flush");
    }
    let (store, recovered) = open(dir.path());
    let mut by_id: Vec<(String, bool)> = recovered
        .iter()
        .map(|r| (r.run_id.clone(), r.interrupted))
        .collect();
    by_id.sort();
    assert_eq!(by_id, vec![("cut".into(), true), ("done".into(), false)]);
    let done = store
        .get_run("o".into(), "done".into())
        .await
        .expect("read")
        .expect("run");
    assert_eq!(
        (done.view.status, done.view.last_seq, done.epoch),
        (RunStatus::Completed, 2, 1)
    );
    let terminals = count(
        dir.path(),
        "SELECT count(*) FROM events WHERE run_id = 'done' AND type IN
           ('run_completed', 'run_failed', 'run_cancelled', 'run_interrupted')",
    );
    assert_eq!(terminals, 1, "recovery added a second terminal event");
    let cut = store
        .get_run("o".into(), "cut".into())
        .await
        .expect("read")
        .expect("run");
    assert_eq!(cut.view.status, RunStatus::Interrupted);
    assert_eq!(
        count(
            dir.path(),
            "SELECT count(*) FROM artifacts WHERE status = 'intermediate'"
        ),
        0
    );
    assert_eq!(
        count(dir.path(), "SELECT count(*) FROM artifacts WHERE id = 'a2'"),
        1
    );
}

#[test]
fn a_database_newer_than_the_binary_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path()));
    let newer = super::schema::LATEST + 1;
    Connection::open(dir.path().join("sluice.db"))
        .expect("open")
        .pragma_update(None, "user_version", newer)
        .expect("set version");
    match SqliteStore::open(dir.path(), StoreLimits::default()) {
        Err(crate::StoreError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (newer, super::schema::LATEST));
        }
        Err(other) => panic!("expected SchemaTooNew, got {other}"),
        Ok(_) => panic!("a newer schema was opened"),
    }
    // Opening an up-to-date database again migrates nothing.
    Connection::open(dir.path().join("sluice.db"))
        .expect("open")
        .pragma_update(None, "user_version", super::schema::LATEST)
        .expect("set version");
    drop(open(dir.path()));
    assert_eq!(
        count(dir.path(), "PRAGMA user_version"),
        super::schema::LATEST
    );
}

#[test]
fn a_second_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, _) = open(dir.path());
    match SqliteStore::open(dir.path(), StoreLimits::default()) {
        Err(crate::StoreError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("two stores opened one directory"),
    }
    drop(first);
    // The writer releases the directory once it has stopped.
    drop(open(dir.path()));
}
