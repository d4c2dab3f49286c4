//! Prometheus metrics, kept in atomics and rendered as text for `GET /metrics`.
//!
//! Hand-rolled on purpose: a handful of counters, gauges and fixed-bucket histograms cost a few
//! atomic adds on the hot path and no dependency.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use sluice_protocol::EventKind;

/// A histogram with fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// Cumulative counts are computed at render time; each slot counts its own bucket.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// How a run ended, for `sluice_runs_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    Failed,
    Cancelled,
    Interrupted,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Completed,
        Outcome::Failed,
        Outcome::Cancelled,
        Outcome::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Interrupted => "interrupted",
        }
    }
}

pub struct Metrics {
    /// Frames written to client sockets, by event type (seed 000 §7's stream_chunks_sent_total).
    chunks_sent: Vec<AtomicU64>,
    /// Events appended to run logs, by event type.
    events_appended: Vec<AtomicU64>,
    /// Time between consecutive events of one run.
    pub chunk_latency: Histogram,
    /// Run accepted → first text or reasoning token.
    pub time_to_first_token: Histogram,
    /// Open SSE and WebSocket subscriptions.
    active_streams: AtomicI64,
    /// Runs queued or running.
    active_runs: AtomicI64,
    runs_total: Vec<AtomicU64>,
    /// Tokens as providers reported them: input, output, reasoning.
    tokens: [AtomicU64; 3],
    /// Runs on an existing thread whose history came from memory, and from the store.
    history_reads: [AtomicU64; 2],
}

const LATENCY_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];
const TTFT_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            chunks_sent: EventKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            events_appended: EventKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            chunk_latency: Histogram::new(LATENCY_BOUNDS),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            active_streams: AtomicI64::new(0),
            active_runs: AtomicI64::new(0),
            runs_total: Outcome::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            tokens: Default::default(),
            history_reads: Default::default(),
        }
    }
}

impl Metrics {
    pub fn chunk_sent(&self, kind: EventKind) {
        self.chunks_sent[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn event_appended(&self, kind: EventKind) {
        self.events_appended[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_opened(&self) {
        self.active_streams.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_closed(&self) {
        self.active_streams.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn active_streams(&self) -> i64 {
        self.active_streams.load(Ordering::Relaxed)
    }

    pub fn run_started(&self) {
        self.active_runs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn run_ended(&self, outcome: Outcome) {
        self.active_runs.fetch_sub(1, Ordering::Relaxed);
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.runs_total[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds a finished run's token counts.
    pub fn add_usage(&self, usage: &sluice_protocol::Usage) {
        self.tokens[0].fetch_add(usage.input_tokens, Ordering::Relaxed);
        self.tokens[1].fetch_add(usage.output_tokens, Ordering::Relaxed);
        self.tokens[2].fetch_add(usage.reasoning_tokens, Ordering::Relaxed);
    }

    /// A run on an existing thread got its history from memory (`true`) or the store.
    pub fn history_read(&self, from_memory: bool) {
        self.history_reads[usize::from(!from_memory)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn runs_total(&self, outcome: Outcome) -> u64 {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.runs_total[i].load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP stream_chunks_sent_total Events written to client streams, by event type.\n# TYPE stream_chunks_sent_total counter"
        );
        for kind in EventKind::ALL {
            let v = self.chunks_sent[kind.index()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "stream_chunks_sent_total{{event_type=\"{}\"}} {v}",
                kind.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_events_appended_total Events appended to run logs, by event type.\n# TYPE sluice_events_appended_total counter"
        );
        for kind in EventKind::ALL {
            let v = self.events_appended[kind.index()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "sluice_events_appended_total{{event_type=\"{}\"}} {v}",
                kind.as_str()
            );
        }
        self.chunk_latency.render(
            &mut out,
            "stream_chunk_latency_seconds",
            "Time between consecutive events of a run.",
        );
        self.time_to_first_token.render(
            &mut out,
            "sluice_time_to_first_token_seconds",
            "Time from a run's acceptance to its first token.",
        );
        let _ = writeln!(
            out,
            "# HELP active_streams Open SSE and WebSocket run subscriptions.\n# TYPE active_streams gauge\nactive_streams {}",
            self.active_streams()
        );
        let _ = writeln!(
            out,
            "# HELP sluice_active_runs Runs queued or running.\n# TYPE sluice_active_runs gauge\nsluice_active_runs {}",
            self.active_runs.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP sluice_runs_total Finished runs by outcome.\n# TYPE sluice_runs_total counter"
        );
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "sluice_runs_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.runs_total(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_tokens_total Tokens used by finished runs, as the providers reported them.\n# TYPE sluice_tokens_total counter"
        );
        for (i, kind) in ["input", "output", "reasoning"].iter().enumerate() {
            let _ = writeln!(
                out,
                "sluice_tokens_total{{kind=\"{kind}\"}} {}",
                self.tokens[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sluice_history_reads_total Runs on an existing thread, by where their history came from.\n# TYPE sluice_history_reads_total counter"
        );
        for (i, from) in ["memory", "store"].iter().enumerate() {
            let _ = writeln!(
                out,
                "sluice_history_reads_total{{from=\"{from}\"}} {}",
                self.history_reads[i].load(Ordering::Relaxed)
            );
        }
        out
    }
}
