//! The per-run event log and the subscribers that read it.
//!
//! The log is the buffer. The run's task is its only appender; every subscriber is a cursor into it
//! plus a `watch` of its length, so a slow subscriber costs nothing but its cursor and the server
//! never queues copies of events per subscriber. Frames are encoded once and shared (`Bytes`).
//!
//! `seq` starts at 1 and has no gaps, so event `seq` lives at index `seq - 1`.
//!
//! A subscriber that trails the log (more events are already waiting behind the one it is about to
//! send) gets adjacent text or reasoning deltas merged into one event carrying the last part's `seq`
//! — resume stays exact and the concatenated text is unchanged. A caught-up subscriber gets each
//! event as it is appended, unless it asked for a coalescing delay.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sluice_protocol::Frame;
use sluice_store::Store;
use tokio::sync::watch;
use tokio::time::Instant;

/// An in-memory run log.
pub struct EventLog {
    run_id: Arc<str>,
    frames: RwLock<Vec<Frame>>,
    /// The number of frames; subscribers wait on changes.
    len: watch::Sender<u64>,
    /// Set (before the last length change) once the terminal event is in.
    closed: AtomicBool,
}

impl EventLog {
    pub fn new(run_id: Arc<str>) -> Self {
        EventLog {
            run_id,
            frames: RwLock::new(Vec::with_capacity(16)),
            len: watch::Sender::new(0),
            closed: AtomicBool::new(false),
        }
    }

    pub fn run_id(&self) -> &Arc<str> {
        &self.run_id
    }

    /// Appends a frame whose seq is `len + 1` and wakes every subscriber.
    pub fn push(&self, frame: Frame) {
        let terminal = frame.kind().is_terminal();
        let len = {
            let mut frames = match self.frames.write() {
                Ok(f) => f,
                Err(poisoned) => poisoned.into_inner(),
            };
            frames.push(frame);
            frames.len() as u64
        };
        if terminal {
            self.closed.store(true, Ordering::Release);
        }
        self.len.send_replace(len);
    }

    pub fn len(&self) -> u64 {
        *self.len.borrow()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the terminal event is in the log.
    pub async fn wait_closed(&self) {
        let mut rx = self.len.subscribe();
        while !self.is_closed() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn read<R>(&self, f: impl FnOnce(&[Frame]) -> R) -> R {
        let frames = match self.frames.read() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&frames)
    }
}

/// How a subscriber merges deltas.
#[derive(Debug, Clone, Copy)]
pub struct Coalesce {
    /// The most escaped delta bytes merged into one event (0 disables merging).
    pub max_bytes: usize,
    /// How long a caught-up subscriber may hold a delta waiting for more (zero: never hold).
    pub max_delay: Duration,
}

impl Default for Coalesce {
    fn default() -> Self {
        Coalesce {
            max_bytes: 16 * 1024,
            max_delay: Duration::ZERO,
        }
    }
}

enum Source {
    /// A run whose log is in memory (running, or recently ended).
    Live {
        log: Arc<EventLog>,
        len: watch::Receiver<u64>,
    },
    /// A run whose log has left memory: read from the store in pages.
    Stored {
        store: Arc<dyn Store>,
        page: VecDeque<Frame>,
        exhausted: bool,
    },
}

/// A cursor into one run's log.
pub struct Subscription {
    run_id: Arc<str>,
    cursor: u64,
    coalesce: Coalesce,
    source: Source,
    done: bool,
}

const STORE_PAGE: u32 = 512;

/// How far ahead a lagging subscriber looks for a later state of an artifact.
const LOOKAHEAD: usize = 256;

impl Subscription {
    /// Follows an in-memory log from after `after`.
    pub fn live(log: Arc<EventLog>, after: u64, coalesce: Coalesce) -> Self {
        let len = log.len.subscribe();
        Subscription {
            run_id: log.run_id.clone(),
            cursor: after,
            coalesce,
            source: Source::Live { log, len },
            done: false,
        }
    }

    /// Replays a finished run from the store from after `after`.
    pub fn stored(run_id: Arc<str>, store: Arc<dyn Store>, after: u64, coalesce: Coalesce) -> Self {
        Subscription {
            run_id,
            cursor: after,
            coalesce,
            source: Source::Stored {
                store,
                page: VecDeque::new(),
                exhausted: false,
            },
            done: false,
        }
    }

    pub fn run_id(&self) -> &Arc<str> {
        &self.run_id
    }

    /// The seq of the last event handed out.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The next event (possibly several merged deltas), waiting for it if needed; `None` after the
    /// terminal event. Cancel-safe: the cursor only moves when an event is returned.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            let frame = self.next_frame().await?;
            self.cursor = frame.seq();
            // A subscriber that is behind skips an artifact's intermediate state when a later state
            // of the same artifact is already waiting: it gets the current state, not every step.
            if self.coalesce.max_bytes > 0
                && frame.kind() == sluice_protocol::EventKind::ArtifactIntermediate
                && self.superseded(&frame)
            {
                continue;
            }
            if frame.kind().is_terminal() {
                self.done = true;
            }
            return Some(frame);
        }
    }

    /// Whether a later state of `frame`'s artifact is already available to this subscriber.
    fn superseded(&self, frame: &Frame) -> bool {
        let id_of = |f: &Frame| {
            serde_json::from_slice::<serde_json::Value>(&f.json())
                .ok()
                .and_then(|v| v["artifact"]["id"].as_str().map(str::to_string))
        };
        let Some(id) = id_of(frame) else { return false };
        let later = |f: &Frame| {
            matches!(
                f.kind(),
                sluice_protocol::EventKind::ArtifactIntermediate
                    | sluice_protocol::EventKind::ArtifactFinal
            ) && id_of(f).as_deref() == Some(id.as_str())
        };
        match &self.source {
            Source::Live { log, .. } => log.read(|frames| {
                let from = (frame.seq() as usize).min(frames.len());
                frames[from..].iter().take(LOOKAHEAD).any(later)
            }),
            Source::Stored { page, .. } => page.iter().take(LOOKAHEAD).any(later),
        }
    }

    async fn next_frame(&mut self) -> Option<Frame> {
        if self.done {
            return None;
        }
        let frame = match &mut self.source {
            Source::Live { log, len } => {
                next_live(log, len, self.cursor, self.coalesce, &self.run_id).await?
            }
            Source::Stored {
                store,
                page,
                exhausted,
            } => {
                if page.is_empty() && !*exhausted {
                    match store
                        .read_events(self.run_id.to_string(), self.cursor, STORE_PAGE)
                        .await
                    {
                        Ok(frames) => {
                            *exhausted = frames.len() < STORE_PAGE as usize;
                            page.extend(frames);
                        }
                        Err(err) => {
                            tracing::error!(run_id = %self.run_id, error = %err, "replay from store failed");
                            *exhausted = true;
                        }
                    }
                }
                if page.is_empty() {
                    return None;
                }
                let (frame, covered) = coalesced(
                    &self.run_id,
                    page.make_contiguous(),
                    self.coalesce.max_bytes,
                );
                page.drain(..covered);
                frame
            }
        };
        Some(frame)
    }
}

async fn next_live(
    log: &Arc<EventLog>,
    len: &mut watch::Receiver<u64>,
    cursor: u64,
    coalesce: Coalesce,
    run_id: &Arc<str>,
) -> Option<Frame> {
    let mut hold_until: Option<Instant> = None;
    loop {
        let available = *len.borrow_and_update();
        if cursor < available {
            let (frame, at_end) = log.read(|frames| {
                let start = cursor as usize;
                let (frame, covered) = coalesced(run_id, &frames[start..], coalesce.max_bytes);
                (frame, start + covered == frames.len())
            });
            let holdable = at_end
                && !coalesce.max_delay.is_zero()
                && frame.kind().is_mergeable_delta()
                && frame.delta_len() < coalesce.max_bytes
                && !log.is_closed();
            if holdable {
                let deadline =
                    *hold_until.get_or_insert_with(|| Instant::now() + coalesce.max_delay);
                if Instant::now() < deadline {
                    // Wait for more deltas until the deadline, then send what we have.
                    let _ = tokio::time::timeout_at(deadline, len.changed()).await;
                    continue;
                }
            }
            return Some(frame);
        }
        if log.is_closed() && cursor >= available {
            return None;
        }
        if len.changed().await.is_err() {
            return None;
        }
    }
}

/// What to send for `frames[0]`: the frame itself, or it merged with the deltas of its kind that
/// directly follow, within `max_bytes`; and how many frames that covers. Nothing is allocated
/// unless there is something to merge.
fn coalesced(run_id: &str, frames: &[Frame], max_bytes: usize) -> (Frame, usize) {
    let first = &frames[0];
    let kind = first.kind();
    let mut covered = 1;
    if max_bytes > 0 && kind.is_mergeable_delta() {
        let mut bytes = first.delta_len();
        for f in &frames[1..] {
            if f.kind() != kind || bytes + f.delta_len() > max_bytes {
                break;
            }
            bytes += f.delta_len();
            covered += 1;
        }
    }
    if covered > 1
        && let Some(merged) = Frame::merge_deltas(run_id, &frames[..covered])
    {
        return (merged, covered);
    }
    (first.clone(), 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::EventBody;

    fn delta(seq: u64, s: &str) -> Frame {
        Frame::encode("r", seq, &EventBody::TextDelta { delta: s.into() })
    }

    #[tokio::test]
    async fn a_caught_up_subscriber_gets_each_event_and_a_lagging_one_gets_merges() {
        let log = Arc::new(EventLog::new("r".into()));
        let mut fast = Subscription::live(log.clone(), 0, Coalesce::default());
        let mut slow = Subscription::live(log.clone(), 0, Coalesce::default());
        log.push(delta(1, "a"));
        assert_eq!(fast.next().await.map(|f| f.seq()), Some(1));
        log.push(delta(2, "b"));
        assert_eq!(fast.next().await.map(|f| f.seq()), Some(2));
        log.push(delta(3, "c"));
        log.push(Frame::encode("r", 4, &EventBody::TextDone {}));
        log.push(Frame::encode(
            "r",
            5,
            &EventBody::RunCancelled { reason: "x".into() },
        ));
        // The slow one reads 1..3 merged, then the rest, then the end.
        let merged = slow.next().await.expect("merged");
        assert_eq!(
            (merged.seq(), merged.delta_text().as_deref()),
            (3, Some("abc"))
        );
        assert_eq!(slow.next().await.map(|f| f.seq()), Some(4));
        assert_eq!(slow.next().await.map(|f| f.seq()), Some(5));
        assert!(slow.next().await.is_none());
        // Resuming from the middle of a merge is exact.
        let mut resumed = Subscription::live(
            log.clone(),
            1,
            Coalesce {
                max_bytes: 0,
                ..Coalesce::default()
            },
        );
        assert_eq!(resumed.next().await.map(|f| f.seq()), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_coalescing_delay_holds_deltas_until_the_deadline() {
        let log = Arc::new(EventLog::new("r".into()));
        let coalesce = Coalesce {
            max_bytes: 1024,
            max_delay: Duration::from_millis(50),
        };
        let mut sub = Subscription::live(log.clone(), 0, coalesce);
        log.push(delta(1, "x"));
        let pusher = {
            let log = log.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                log.push(delta(2, "y"));
            })
        };
        let f = sub.next().await.expect("frame");
        assert_eq!((f.seq(), f.delta_text().as_deref()), (2, Some("xy")));
        pusher.await.expect("join");
    }

    #[tokio::test]
    async fn a_late_subscriber_gets_an_artifacts_current_state_not_every_intermediate() {
        let log = Arc::new(EventLog::new("r".into()));
        let state = |seq: u64, status: &str, rows: u32| {
            let artifact = serde_json::json!({"id": "a1", "status": status, "rows": rows});
            let body = if status == "final" {
                EventBody::ArtifactFinal { artifact }
            } else {
                EventBody::ArtifactIntermediate { artifact }
            };
            Frame::encode("r", seq, &body)
        };
        log.push(state(1, "intermediate", 1));
        log.push(state(2, "intermediate", 2));
        log.push(Frame::encode("r", 3, &EventBody::TextDone {}));
        log.push(state(4, "intermediate", 3));
        let mut late = Subscription::live(log.clone(), 0, Coalesce::default());
        // 1 and 2 are superseded by 4, which is the newest state so far.
        assert_eq!(late.next().await.map(|f| f.seq()), Some(3));
        assert_eq!(late.next().await.map(|f| f.seq()), Some(4));
        log.push(state(5, "final", 3));
        assert_eq!(late.next().await.map(|f| f.seq()), Some(5));
        // With merging off, everything is delivered.
        let mut exact = Subscription::live(
            log.clone(),
            0,
            Coalesce {
                max_bytes: 0,
                ..Coalesce::default()
            },
        );
        for seq in 1..=5 {
            assert_eq!(exact.next().await.map(|f| f.seq()), Some(seq));
        }
    }
}
