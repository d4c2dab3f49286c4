//! The real binary as a child process: kill -9 mid-run, restart on the same data directory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_client::Client;
use sluice_protocol::api::{MessageStatus, RunStatus};
use sluice_protocol::{EventBody, EventKind};

use crate::{collect, req, text_of};

/// Starts `sluice serve` on a free port; answers the child and its base URL (read from its log).
pub(crate) fn spawn(data_dir: &std::path::Path, tokens_per_sec: &str) -> (Child, String) {
    spawn_with(data_dir, tokens_per_sec, &[])
}

/// `spawn` with more arguments for `serve` (`--config FILE`, say).
pub(crate) fn spawn_with(
    data_dir: &std::path::Path,
    tokens_per_sec: &str,
    args: &[&std::ffi::OsStr],
) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("SLUICE_DEMO_TOKENS_PER_SEC", tokens_per_sec)
        .env("SLUICE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("server log ended before it listened")
            .expect("log line");
        if let Some(rest) = line.split("sluice listening on ").nth(1) {
            break rest.split_whitespace().next().expect("url").to_string();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

#[tokio::test]
async fn kill_9_mid_run_then_restart_interrupts_the_run_and_keeps_everything_else() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut child, url) = spawn(dir.path(), "50");
    let client = Client::new(url);

    // A finished thread that must survive untouched.
    let done = collect(
        client
            .stream_run(None, &req("finished before the crash"))
            .await
            .expect("run"),
    )
    .await;
    let done_thread = crate::thread_of(&done);
    let before = client.get_thread(&done_thread).await.expect("thread");

    // A run in flight: read until some answer text has arrived, then kill -9.
    let mut stream = client
        .stream_run(None, &req("crash during this one"))
        .await
        .expect("stream");
    let mut seen = Vec::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.expect("event");
        seen.push(ev);
        if seen
            .iter()
            .filter(|e| e.event.body.kind() == EventKind::TextDelta)
            .count()
            >= 5
        {
            break;
        }
    }
    let run_id = seen[0].event.run_id.clone();
    let last_seen = seen.last().expect("events").event.seq;
    // Give the writer a moment so that some of what was seen is durable (it commits continuously).
    tokio::time::sleep(Duration::from_millis(100)).await;
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    drop(stream);

    let (mut child, url) = spawn(dir.path(), "50");
    let client = Client::new(url.clone());
    let run = client.get_run(&run_id).await.expect("run after restart");
    assert_eq!(run.status, RunStatus::Interrupted);
    let thread = client.get_thread(&run.thread_id).await.expect("thread");
    let message = &thread.messages.expect("messages")[1];
    assert_eq!(message.status, MessageStatus::Incomplete);
    let replay = collect(client.follow(&run_id, "").await.expect("replay")).await;
    let last = replay.last().expect("replayed");
    let EventBody::RunInterrupted { durable_seq, .. } = last.event.body else {
        panic!("ends with run_interrupted: {:?}", last.event.body);
    };
    assert_eq!(last.event.seq, durable_seq + 1);
    assert_eq!(
        last.id,
        format!("{}.2", durable_seq + 1),
        "the recovery event is in epoch 2"
    );
    // The kept content is exactly the stored deltas, and a prefix of what the client saw.
    assert_eq!(message.content, text_of(&replay));
    assert!(!message.content.is_empty());
    assert!(
        text_of(&seen).starts_with(&message.content)
            || message.content.starts_with(&text_of(&seen))
    );
    assert_eq!(
        replay[0].data, seen[0].data,
        "stored events are the events that were sent"
    );
    // A client resuming from what it saw: exact when its cursor survived, told to reset otherwise.
    let resumed = client.follow(&run_id, &last_seen.to_string()).await;
    if last_seen <= durable_seq {
        let rest = collect(resumed.expect("resume")).await;
        assert_eq!(rest.last().map(|e| e.event.seq), Some(durable_seq + 1));
    } else {
        match resumed {
            Err(sluice_client::ClientError::Api {
                status: 409, code, ..
            }) => assert_eq!(code, "STREAM_RESET"),
            Err(e) => panic!("expected STREAM_RESET, got {e}"),
            Ok(_) => panic!("expected STREAM_RESET, got a stream"),
        }
    }
    // A cursor from before the crash that is past what survived is always a reset.
    let past = reqwest::Client::new()
        .get(format!("{url}/v1/runs/{run_id}/events"))
        .header("Last-Event-ID", (durable_seq + 1).to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(past.status(), 409);
    // The epoch-2 id of the terminal event itself resumes to an immediate, empty end.
    let at_end = reqwest::Client::new()
        .get(format!("{url}/v1/runs/{run_id}/events"))
        .header("Last-Event-ID", &last.id)
        .send()
        .await
        .expect("request");
    assert_eq!(at_end.status(), 200);
    assert_eq!(at_end.text().await.expect("body"), "");

    let after = client.get_thread(&done_thread).await.expect("thread");
    assert_eq!(after, before, "the other thread is intact");
    // And the restarted server works.
    let fresh = collect(
        client
            .stream_run(None, &req("after restart"))
            .await
            .expect("run"),
    )
    .await;
    assert_eq!(
        fresh.last().map(|e| e.event.body.kind()),
        Some(EventKind::RunCompleted)
    );
    child.kill().expect("stop");
    child.wait().expect("reaped");
}

#[tokio::test]
async fn sigterm_interrupts_runs_in_flight_flushes_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut child, url) = spawn(dir.path(), "40");
    let client = Client::new(url);
    let mut stream = client
        .stream_run(None, &req("stop the server"))
        .await
        .expect("stream");
    let first = stream.next().await.expect("first").expect("ok");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
    let mut events = vec![first];
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => events.push(ev),
            // After the terminal event nothing is read; a network error before it is a failure.
            Err(e) => panic!("stream broke before its terminal event: {e}"),
        }
    }
    let last = events.last().expect("events");
    let EventBody::RunInterrupted { durable_seq, .. } = last.event.body else {
        panic!(
            "a clean shutdown ends runs with run_interrupted: {:?}",
            last.event.body
        );
    };
    assert_eq!(durable_seq + 1, last.event.seq);
    assert_eq!(
        last.id,
        last.event.seq.to_string(),
        "a clean shutdown stays in epoch 1"
    );
    let exit = child.wait().expect("exit");
    assert!(exit.success(), "exit status {exit:?}");

    // Nothing was lost: after a restart the run and its every event are there, unchanged.
    let (mut child, url) = spawn(dir.path(), "40");
    let client = Client::new(url);
    let run = client.get_run(&last.event.run_id).await.expect("run");
    assert_eq!(run.status, RunStatus::Interrupted);
    assert_eq!(run.last_seq, last.event.seq);
    let replay = collect(client.follow(&run.id, "").await.expect("replay")).await;
    assert_eq!(text_of(&replay), text_of(&events));
    assert_eq!(
        replay.last().map(|e| e.data.clone()),
        Some(last.data.clone())
    );
    child.kill().expect("stop");
    child.wait().expect("reaped");
}

#[tokio::test]
async fn sluice_chat_streams_a_run_to_the_terminal() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut child, url) = spawn(dir.path(), "0");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "chat",
            "--color",
            "always",
            "--url",
            &url,
            "hello from the terminal",
        ])
        .output()
        .await
        .expect("run chat");
    child.kill().expect("stop");
    child.wait().expect("reaped");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let answer = sluice_providers::demo::script("hello from the terminal")
        .1
        .concat();
    assert!(text.contains(&answer), "{text}");
    assert!(
        text.contains("\x1b[2mThe user wrote"),
        "reasoning is dimmed: {text}"
    );
    assert!(text.contains("done ·"), "{text}");
}
