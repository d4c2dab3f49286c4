//! What a client was told survives the process: the real binary, killed with SIGKILL at the
//! moments that matter, restarted on the same data directory, its database read directly.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use sluice_client::Client;
use sluice_protocol::EventKind;

use crate::process::{spawn, spawn_with};
use crate::{req, text_of};

fn db(dir: &Path) -> Connection {
    Connection::open_with_flags(dir.join("sluice.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the database read-only")
}

/// One number the database answers.
fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect(sql)
}

/// Every run's (id, status, epoch), and how many events each kind has.
type Snapshot = (Vec<(String, String, i64)>, Vec<(String, i64)>);

/// What a second process must not change.
fn snapshot(dir: &Path) -> Snapshot {
    let conn = db(dir);
    let runs = conn
        .prepare("SELECT id, status, epoch FROM runs ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<Vec<_>, _>>()
        .expect("rows");
    let kinds = conn
        .prepare(
            "SELECT type, count(*) FROM events
             WHERE type NOT IN ('text_delta', 'reasoning_delta', 'function_call_delta')
             GROUP BY type ORDER BY type",
        )
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<Vec<_>, _>>()
        .expect("rows");
    (runs, kinds)
}

#[tokio::test]
async fn a_second_server_on_a_data_directory_in_use_exits_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut first, url) = spawn(dir.path(), "40");
    let client = Client::new(url);
    let mut stream = client
        .stream_run(None, &req("a run that streams while another server starts"))
        .await
        .expect("stream");
    let mut seen = Vec::new();
    while seen.len() < 5 {
        seen.push(stream.next().await.expect("event").expect("ok"));
    }
    // Let the first events commit so that the snapshot has the run in it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = snapshot(dir.path());
    assert!(
        before.0.iter().any(|(_, status, _)| status == "running"),
        "{before:?}"
    );

    let second = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run a second server");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second server ran: {stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string())
            && stderr.contains(&format!("pid {}", first.id())),
        "the refusal names the directory and the holder: {stderr}"
    );
    assert_eq!(
        snapshot(dir.path()),
        before,
        "the second server changed the database"
    );

    // The first server's run is untouched: it ends normally, with one terminal event.
    while let Some(ev) = stream.next().await {
        seen.push(ev.expect("event"));
    }
    assert_eq!(
        seen.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    let terminals: i64 = db(dir.path())
        .query_row(
            "SELECT count(*) FROM events WHERE run_id = ?1 AND type IN
               ('run_completed', 'run_failed', 'run_cancelled', 'run_interrupted')",
            [&seen[0].event.run_id],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(terminals, 1);
    first.kill().expect("stop");
    first.wait().expect("reaped");
}

/// Where a trial's SIGKILL lands.
#[derive(Clone, Copy, Debug)]
enum Aim {
    /// Right after the first of several concurrent `201`s for new threads.
    AfterThreadCreated,
    /// Right after the client read `run_completed`.
    AfterRunCompleted,
    /// Right after the client read the first `artifact_intermediate` (the table is being written).
    MidArtifact,
}

/// kill -9 aimed at the moments that matter, `SLUICE_KILL_TRIALS` times (200 by default), each
/// followed by a restart (crash recovery) on the same data directory. Nothing acknowledged is
/// lost, no run has two terminal events, no draft survives, every run cut off is interrupted
/// with exactly its stored deltas as content, and the database's integrity check is clean.
#[tokio::test]
async fn kill_9_at_the_moments_that_matter_loses_nothing_a_client_was_told() {
    let trials: usize = std::env::var("SLUICE_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tmp");
    let http = reqwest::Client::new();
    let mut threads_acknowledged: Vec<String> = Vec::new();
    let mut completions_seen: Vec<String> = Vec::new();
    // Runs cut off mid-artifact, with the answer text their client had seen.
    let mut cut_off: Vec<(String, String)> = Vec::new();
    let started = Instant::now();
    for trial in 0..trials {
        let aim = match trial % 3 {
            0 => Aim::AfterThreadCreated,
            1 => Aim::AfterRunCompleted,
            _ => Aim::MidArtifact,
        };
        // As fast as the demo goes, but paced when the kill must land while a table is written.
        let pace = if matches!(aim, Aim::MidArtifact) {
            "2000"
        } else {
            "0"
        };
        let (mut child, url) = spawn(dir.path(), pace);
        match aim {
            Aim::AfterThreadCreated => {
                let mut pending = tokio::task::JoinSet::new();
                for _ in 0..16 {
                    let (http, url) = (http.clone(), url.clone());
                    pending.spawn(async move {
                        let resp = http.post(format!("{url}/v1/threads")).send().await.ok()?;
                        if resp.status() != 201 {
                            return None;
                        }
                        let body: serde_json::Value = resp.json().await.ok()?;
                        body["id"].as_str().map(str::to_string)
                    });
                }
                // The first 201 arrives: kill at once; any other 201 read before is recorded too.
                let mut killed = false;
                while let Some(joined) = pending.join_next().await {
                    if let Some(id) = joined.expect("join") {
                        threads_acknowledged.push(id);
                        if !killed {
                            child.kill().expect("kill -9");
                            killed = true;
                        }
                    }
                }
                assert!(killed, "trial {trial}: no thread was acknowledged");
            }
            Aim::AfterRunCompleted | Aim::MidArtifact => {
                let client = Client::new(url);
                let mut stream = client
                    .stream_run(None, &req(&format!("trial {trial}")))
                    .await
                    .expect("stream");
                let mut seen = Vec::new();
                let mut hit = false;
                while let Some(ev) = stream.next().await {
                    let ev = ev.expect("event");
                    let kind = ev.event.body.kind();
                    seen.push(ev);
                    let now = match aim {
                        Aim::AfterRunCompleted => kind == EventKind::RunCompleted,
                        _ => kind == EventKind::ArtifactIntermediate,
                    };
                    if now {
                        child.kill().expect("kill -9");
                        hit = true;
                        break;
                    }
                }
                assert!(hit, "trial {trial}: the {aim:?} moment never came");
                let run_id = seen[0].event.run_id.clone();
                match aim {
                    Aim::AfterRunCompleted => completions_seen.push(run_id),
                    _ => cut_off.push((run_id, text_of(&seen))),
                }
            }
        }
        child.wait().expect("reaped");
    }
    // One more start runs recovery for the last trial; then the database is read directly.
    let (mut child, _) = spawn(dir.path(), "0");
    child.kill().expect("stop");
    child.wait().expect("reaped");
    eprintln!(
        "{trials} kill -9 trials in {:.1} s: {} threads acknowledged, {} completions seen, {} runs cut off mid-artifact",
        started.elapsed().as_secs_f64(),
        threads_acknowledged.len(),
        completions_seen.len(),
        cut_off.len()
    );

    let conn = db(dir.path());
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    let mut lost_threads = Vec::new();
    for id in &threads_acknowledged {
        let n: i64 = conn
            .query_row("SELECT count(*) FROM threads WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .expect("count");
        if n != 1 {
            lost_threads.push(id.clone());
        }
    }
    assert!(
        lost_threads.is_empty(),
        "{} of {} acknowledged threads lost",
        lost_threads.len(),
        threads_acknowledged.len()
    );
    let status: HashMap<String, String> = conn
        .prepare("SELECT id, status FROM runs")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let lost_completions: Vec<&String> = completions_seen
        .iter()
        .filter(|id| status.get(*id).map(String::as_str) != Some("completed"))
        .collect();
    assert!(
        lost_completions.is_empty(),
        "{} of {} completions a client saw are not stored as completed: {:?}",
        lost_completions.len(),
        completions_seen.len(),
        lost_completions
            .iter()
            .map(|id| status.get(*id))
            .collect::<Vec<_>>()
    );
    let doubled = count(
        &conn,
        "SELECT count(*) FROM (SELECT run_id FROM events WHERE type IN
               ('run_completed', 'run_failed', 'run_cancelled', 'run_interrupted')
             GROUP BY run_id HAVING count(*) > 1)",
    );
    assert_eq!(doubled, 0, "runs with two terminal events");
    let unfinished = count(
        &conn,
        "SELECT count(*) FROM runs WHERE status IN ('queued', 'running')",
    );
    assert_eq!(unfinished, 0, "runs left in flight after recovery");
    let drafts = count(
        &conn,
        "SELECT count(*) FROM artifacts WHERE status = 'intermediate'",
    );
    assert_eq!(drafts, 0, "drafts left after recovery");
    for (run_id, seen_text) in &cut_off {
        assert_eq!(
            status.get(run_id).map(String::as_str),
            Some("interrupted"),
            "run {run_id} was cut off"
        );
        let content: String = conn
            .query_row(
                "SELECT content FROM messages WHERE run_id = ?1 AND role = 'assistant'",
                [run_id],
                |r| r.get(0),
            )
            .expect("message");
        assert!(
            seen_text.starts_with(&content) || content.starts_with(seen_text.as_str()),
            "run {run_id}: the stored answer is not what the client saw\nstored: {content:?}\nseen:   {seen_text:?}"
        );
    }
    // Every run's message is exactly its stored deltas.
    let mut stmt = conn
        .prepare("SELECT r.id, m.content FROM runs r JOIN messages m ON m.id = r.message_id")
        .expect("prepare");
    let messages: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    for (run_id, content) in messages {
        let mut stmt = conn
            .prepare_cached(
                "SELECT data FROM events WHERE run_id = ?1 AND type = 'text_delta' ORDER BY seq",
            )
            .expect("prepare");
        let deltas: String = stmt
            .query_map([&run_id], |r| r.get::<_, Vec<u8>>(0))
            .expect("query")
            .map(|d| {
                let v: serde_json::Value =
                    serde_json::from_slice(&d.expect("row")).expect("event JSON");
                v["delta"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        assert_eq!(
            content, deltas,
            "run {run_id}: content is not its stored deltas"
        );
    }
}

/// A small tmpfs mounted for one test (root only), unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts one of `size`; `None` (with the reason) where mounting is not allowed. Under
    /// `CI=true` that is a failure: CI runs as root and must run this test.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tmp");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "cannot mount a tmpfs for the full-disk test ({why}); CI must run it as root"
                );
                eprintln!("skipped: the full-disk test mounts a tmpfs and needs root ({why})");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem under `dir` with one file; answers its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 16 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
    path
}

async fn status_of(http: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = http.get(url).send().await.expect("request");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// SQLite on a full filesystem: writes fail, the server says so (`/readyz` 503, new runs 503
/// `UNAVAILABLE`), runs in flight end with `STORE_UNAVAILABLE` once the failure outlasts the
/// bound, nothing committed is lost, and once space is back it works again without a restart.
#[tokio::test]
async fn a_full_disk_fails_loudly_loses_nothing_committed_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("6m") else {
        return;
    };
    let data = fs.path().join("data");
    let config = fs.path().join("sluice.toml");
    std::fs::write(&config, "[store]\nwrite_timeout_ms = 1500\n").expect("config");
    let (mut child, url) = spawn_with(
        &data,
        "25",
        &[std::ffi::OsStr::new("--config"), config.as_os_str()],
    );
    let http = reqwest::Client::new();
    let client = Client::new(url.clone());

    // Committed before the disk fills: a thread and a finished run.
    let kept = collect_run(&client, "finished before the disk filled").await;
    assert_eq!(
        kept.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    let kept_thread = crate::thread_of(&kept);
    let kept_view = client.get_thread(&kept_thread).await.expect("thread");

    // Runs in flight while the disk fills.
    let mut streams = Vec::new();
    for i in 0..3 {
        let stream = client
            .stream_run(None, &req(&format!("in flight {i}")))
            .await
            .expect("stream");
        streams.push(tokio::spawn(async move {
            let mut events = Vec::new();
            let mut stream = stream;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => events.push(ev),
                    Err(e) => panic!("stream broke: {e}"),
                }
            }
            events
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let filler = fill(fs.path());

    // The failure shows: /readyz 503 with the reason, new runs refused with 503.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = status_of(&http, &format!("{url}/readyz")).await;
        if code == 503 {
            assert!(body.contains("database"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {code} on a full disk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = http
        .post(format!("{url}/v1/runs/stream"))
        .body(r#"{"content":"refused"}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"]["code"], "UNAVAILABLE");
    let metrics = status_of(&http, &format!("{url}/metrics")).await.1;
    assert!(metrics.contains("sluice_store_up 0"), "{metrics}");

    // Past the bound, the runs in flight end with STORE_UNAVAILABLE.
    let mut failed = Vec::new();
    for stream in streams {
        let events = tokio::time::timeout(Duration::from_secs(30), stream)
            .await
            .expect("the run ended")
            .expect("join");
        let last = events.last().expect("events");
        match &last.event.body {
            sluice_protocol::EventBody::RunFailed { error } => {
                assert_eq!(error.code, sluice_protocol::ErrorCode::StoreUnavailable);
                assert!(error.retryable);
                failed.push(last.event.run_id.clone());
            }
            other => panic!("a run in flight on a full disk ended with {other:?}"),
        }
    }

    // Space comes back: the store recovers by itself, new runs work within 5 s.
    std::fs::remove_file(&filler).expect("free the disk");
    let freed = Instant::now();
    loop {
        let (code, _) = status_of(&http, &format!("{url}/readyz")).await;
        if code == 200 {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(5),
            "/readyz still {code} 5 s after space came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = client
        .stream_run(None, &req("after the disk was freed"))
        .await
        .expect("a new run is accepted");
    let first = stream.next().await.expect("first event").expect("ok");
    assert!(
        freed.elapsed() < Duration::from_secs(5),
        "a new run started {:?} after space came back",
        freed.elapsed()
    );
    let mut fresh = vec![first];
    fresh.extend(crate::collect(stream).await);
    assert_eq!(
        fresh.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    let fresh_run = client.get_run(&fresh[0].event.run_id).await.expect("run");
    assert_eq!(fresh_run.status, sluice_protocol::api::RunStatus::Completed);

    // Nothing committed was lost; the failed runs are stored as interrupted, with exactly what
    // was committed of them.
    assert_eq!(
        client.get_thread(&kept_thread).await.expect("thread"),
        kept_view
    );
    for run_id in &failed {
        let run = client.get_run(run_id).await.expect("run");
        assert_eq!(
            run.status,
            sluice_protocol::api::RunStatus::Interrupted,
            "{run_id}"
        );
    }
    child.kill().expect("stop");
    child.wait().expect("reaped");
    let conn = db(&data);
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok");
    for run_id in &failed {
        let (content, deltas): (String, String) = conn
            .query_row(
                "SELECT m.content,
                        COALESCE((SELECT group_concat(json_extract(e.data, '$.delta'), '')
                                  FROM (SELECT data FROM events WHERE run_id = ?1
                                        AND type = 'text_delta' ORDER BY seq) e), '')
                 FROM runs r JOIN messages m ON m.id = r.message_id WHERE r.id = ?1",
                [run_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("message");
        assert_eq!(content, deltas, "run {run_id}");
    }
}

async fn collect_run(client: &Client, content: &str) -> Vec<sluice_client::StreamEvent> {
    crate::collect(
        client
            .stream_run(None, &req(content))
            .await
            .expect("stream"),
    )
    .await
}
