//! Clients that drop at random points — between frames and in the middle of one — and resume with
//! `Last-Event-ID` end with exactly the uninterrupted event sequence.

use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use sluice_client::SseParser;

use crate::{Opts, TestServer, req};

/// Follows a run over raw HTTP, cutting each connection after a random number of bytes (the
/// parser only ever sees the bytes before the cut, so a cut inside a frame loses that frame, as a
/// real network drop does) and resuming from the last complete event. Returns the event payloads.
async fn follow_with_cuts(
    url: &str,
    run_id: &str,
    rng: &mut rand::rngs::StdRng,
) -> (Vec<String>, u32) {
    let http = reqwest::Client::new();
    let mut last_id = String::new();
    let mut events = Vec::new();
    let mut connections = 0;
    loop {
        connections += 1;
        assert!(connections < 10_000, "no progress");
        let mut r = http.get(format!("{url}/v1/runs/{run_id}/events"));
        if !last_id.is_empty() {
            r = r.header("Last-Event-ID", &last_id);
        }
        let resp = r.send().await.expect("connect");
        assert_eq!(resp.status(), 200);
        // Up to 2,000 bytes: more than the largest frame (an artifact), so every run makes progress.
        let mut budget: usize = rng.random_range(1..2000);
        let mut parser = SseParser::new();
        let mut body = resp.bytes_stream();
        let mut finished = false;
        'conn: while let Some(chunk) = body.next().await {
            let chunk = chunk.expect("chunk");
            let take = chunk.len().min(budget);
            budget -= take;
            for ev in parser.feed(&chunk[..take]) {
                last_id = ev.id.clone();
                let terminal = ev.event.starts_with("run_");
                events.push(ev.data);
                if terminal && ev.event != "run_started" {
                    finished = true;
                    break 'conn;
                }
            }
            if budget == 0 {
                break;
            }
        }
        if finished {
            return (events, connections);
        }
    }
}

#[tokio::test]
async fn random_disconnects_resume_to_exactly_the_uninterrupted_sequence() {
    // Coalescing off: a resumed client must see the very same events, one for one.
    let server = TestServer::start(Opts {
        tokens_per_sec: 600.0,
        coalesce_bytes: 0,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let mut trials = Vec::new();
    for trial in 0..24u64 {
        let url = server.url.clone();
        let client = client.clone();
        trials.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(trial);
            let run = client
                .start_run(None, &req(&format!("trial {trial}")))
                .await
                .expect("run");
            // Live: the cuts happen while the run streams.
            let (cut, connections) = follow_with_cuts(&url, &run.id, &mut rng).await;
            let whole: Vec<String> =
                crate::collect(client.follow(&run.id, "").await.expect("follow"))
                    .await
                    .into_iter()
                    .map(|e| e.data)
                    .collect();
            assert_eq!(cut, whole, "trial {trial}");
            connections
        }));
    }
    let mut total = 0;
    for t in trials {
        total += t.await.expect("trial");
    }
    assert!(
        total > 24 * 5,
        "the trials must actually reconnect many times ({total})"
    );
}

#[tokio::test]
async fn with_coalescing_a_resumed_client_still_gets_every_seq_once_and_the_same_text() {
    let server = TestServer::start(Opts {
        tokens_per_sec: 0.0,
        ..Opts::default()
    })
    .await;
    let client = server.client();
    let run = client.start_run(None, &req("merge me")).await.expect("run");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (cut, _) = follow_with_cuts(&server.url, &run.id, &mut rng).await;
    let parse = |s: &String| serde_json::from_str::<serde_json::Value>(s).expect("json");
    let mut prev = 0;
    let mut text = String::new();
    for e in cut.iter().map(parse) {
        let seq = e["seq"].as_u64().expect("seq");
        assert!(seq > prev, "no duplicates, in order");
        prev = seq;
        if e["type"] == "text_delta" {
            text.push_str(e["delta"].as_str().expect("delta"));
        }
    }
    let run = client.get_run(&run.id).await.expect("run");
    assert_eq!(prev, run.last_seq);
    let thread = client.get_thread(&run.thread_id).await.expect("thread");
    assert_eq!(thread.messages.expect("messages")[1].content, text);
}
