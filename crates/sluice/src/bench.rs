//! `sluice bench`: many concurrent demo runs against a real `sluice serve` child process.
//!
//! It starts the server (this same binary) on a free port with a fresh data directory, then:
//! 1. **baseline** — sequential `GET /healthz` round trips and sequential `POST /v1/runs/stream`
//!    requests on the same kind of connection; the difference of their time to first byte/event is
//!    what opening a run adds (store write queued, task spawned, first frame written);
//! 2. **load** — opens `--streams` runs at once (each its own TCP connection, a minimal HTTP/1.1
//!    client so that the client's own cost stays small), reads every stream to its terminal
//!    event, and samples the server's resident memory while all streams are open.
//!
//! It reports time to first event p50/p99, events/s, server CPU, and resident memory per open
//! stream (RSS with all streams open minus RSS before, divided by the count).

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Concurrent streams to open in the load phase.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// The demo model's pace during the load phase (tokens/s per run). Runs must outlast the time
    /// it takes to open every stream for the memory sample to see them all open.
    #[arg(long, default_value_t = 10.0)]
    pub tokens_per_sec: f64,
    /// Sequential requests in the baseline phase.
    #[arg(long, default_value_t = 200)]
    pub baseline: usize,
    /// Connections being opened at the same moment.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Instead: compare each provider adapter with calling the upstream simulator directly
    /// (time to first token, time per token), this many runs per adapter and path; then run the
    /// concurrent phase (`--streams`, 0 to skip) through each adapter.
    #[arg(long)]
    pub providers: Option<usize>,
    /// Tokens per run in the provider comparison.
    #[arg(long, default_value_t = 200)]
    pub provider_tokens: u32,
    /// Microseconds the simulator waits between tokens in the comparison (0 = as fast as it can;
    /// a real model's gap keeps the rest of the answer from racing the first token).
    #[arg(long, default_value_t = 0)]
    pub provider_gap_us: u64,
    /// Microseconds of quiet before each request in the comparison. 0 sends the requests back to
    /// back (a closed loop that keeps this machine about half busy); a few milliseconds measures
    /// low load, where each run's background work (the store's group commit follows a run's first
    /// write by 2 ms) is done before the next request comes.
    #[arg(long, default_value_t = 0)]
    pub provider_pause_us: u64,
    /// Print each first token in the comparison slower than this many microseconds, with the
    /// CLOCK_MONOTONIC time its request was sent (to match against `perf record -k
    /// CLOCK_MONOTONIC -a -e sched:sched_switch`: what ran on the machine during the slow ones).
    #[arg(long)]
    pub trace_slow_us: Option<u64>,
    /// Pin the server (all its threads) to these CPUs (`taskset` list, e.g. `1`), so that it does
    /// not share cores with the load generator and the simulator (pinned with `--others-cpus`).
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// Pin this load generator and the simulator to these CPUs (e.g. `0`).
    #[arg(long)]
    pub others_cpus: Option<String>,
    /// Pin the simulator to these CPUs instead of `--others-cpus` (e.g. `--others-cpus 0
    /// --sim-cpus 1 --server-cpus 1`: the load generator alone on one core, as a remote client
    /// would be, the upstream and the proxy under test on the other).
    #[arg(long)]
    pub sim_cpus: Option<String>,
}

/// Pins every thread of process `pid` to `cpus` (a `taskset` CPU list).
fn pin(pid: u32, cpus: Option<&str>) -> anyhow::Result<()> {
    let Some(cpus) = cpus else { return Ok(()) };
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux) to pin a process")?;
    if !status.success() {
        bail!("taskset could not pin process {pid} to CPUs {cpus}");
    }
    Ok(())
}

struct Server {
    child: tokio::process::Child,
    addr: String,
    pid: u32,
    _dir: tempfile::TempDir,
}

async fn spawn_server(tokens_per_sec: f64) -> anyhow::Result<Server> {
    let tps = tokens_per_sec.to_string();
    spawn_child(
        &["serve"],
        &[("SLUICE_DEMO_TOKENS_PER_SEC", tps.as_str())],
        "sluice listening on http://",
    )
    .await
}

/// Starts this binary with `args` (plus a fresh data directory and port 0 for `serve`) and waits
/// for the log line that names its address.
async fn spawn_child(args: &[&str], envs: &[(&str, &str)], marker: &str) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(args).args(["--listen", "127.0.0.1:0"]);
    if args.first() == Some(&"serve") {
        cmd.arg("--data-dir").arg(dir.path());
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .env("SLUICE_LOG", "warn,sluice=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting a sluice child process")?;
    let pid = child.id().context("child pid")?;
    let stderr = child.stderr.take().context("child stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(line) = lines.next_line().await? else {
            bail!("the child process exited before listening");
        };
        if let Some(rest) = line.split(marker).nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Server {
        child,
        addr,
        pid,
        _dir: dir,
    })
}

/// Resident memory of a process in KiB (Linux /proc).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let ticks = {
        #[allow(unsafe_code)]
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

/// What one stream saw.
struct StreamResult {
    first_event: Duration,
    /// The first `text_delta` (the first token of the answer), if any came.
    first_text: Option<Duration>,
    events: u64,
}

/// Matches `\nevent: ` across reads and captures the type that follows.
#[derive(Default)]
struct FrameCounter {
    state: usize,
    capturing: Option<Vec<u8>>,
    events: u64,
    terminal: bool,
    /// Whether a `text_delta` has been seen.
    saw_text: bool,
}

const PATTERN: &[u8] = b"\nevent: ";

impl FrameCounter {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(cap) = &mut self.capturing {
                if b == b'\n' {
                    let kind = std::mem::take(cap);
                    self.capturing = None;
                    self.events += 1;
                    self.saw_text |= &kind[..] == b"text_delta";
                    if matches!(
                        &kind[..],
                        b"run_completed" | b"run_failed" | b"run_cancelled" | b"run_interrupted"
                    ) {
                        self.terminal = true;
                    }
                    self.state = 1;
                } else {
                    cap.push(b);
                }
                continue;
            }
            if b == PATTERN[self.state] {
                self.state += 1;
                if self.state == PATTERN.len() {
                    self.capturing = Some(Vec::with_capacity(24));
                    self.state = 0;
                }
            } else {
                self.state = usize::from(b == b'\n');
            }
        }
    }
}

async fn open_stream(addr: &str, body: &str) -> anyhow::Result<(TcpStream, Instant)> {
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let started = Instant::now();
    let req = format!(
        "POST /v1/runs/stream HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await?;
    Ok((sock, started))
}

/// Reads a stream to its terminal event; `opened` is called once the first event arrived.
async fn read_stream(
    mut sock: TcpStream,
    started: Instant,
    opened: impl FnOnce(),
) -> anyhow::Result<StreamResult> {
    let mut buf = vec![0u8; 4096];
    let mut counter = FrameCounter::default();
    let mut first = None;
    let mut first_text = None;
    let mut opened = Some(opened);
    while !counter.terminal {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed before the terminal event");
        }
        counter.feed(&buf[..n]);
        if first_text.is_none() && counter.saw_text {
            first_text = Some(started.elapsed());
        }
        if first.is_none() && counter.events > 0 {
            first = Some(started.elapsed());
            if let Some(f) = opened.take() {
                f();
            }
        }
    }
    Ok(StreamResult {
        first_event: first.unwrap_or_default(),
        first_text,
        events: counter.events,
    })
}

async fn healthz_rtt(addr: &str) -> anyhow::Result<Duration> {
    let mut sock = TcpStream::connect(addr).await?;
    sock.set_nodelay(true)?;
    let started = Instant::now();
    sock.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = [0u8; 512];
    let n = sock.read(&mut buf).await?;
    if n == 0 {
        bail!("healthz: connection closed");
    }
    Ok(started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(runs) = args.providers {
        return providers(runs, &args).await;
    }
    raise_fd_limit(args.streams as u64 * 2 + 256);
    let body = r#"{"content":"benchmark"}"#;

    // Phase 1: baseline at low load, on a fast server (pace 0: every token as soon as possible).
    let server = spawn_server(0.0).await?;
    let mut rtt = Vec::with_capacity(args.baseline);
    let mut ttfe = Vec::with_capacity(args.baseline);
    for _ in 0..args.baseline {
        rtt.push(healthz_rtt(&server.addr).await?);
        let (sock, started) = open_stream(&server.addr, body).await?;
        ttfe.push(read_stream(sock, started, || {}).await?.first_event);
    }
    rtt.sort();
    ttfe.sort();
    println!("# sluice bench — {} streams", args.streams);
    println!("## low load ({} sequential requests)", args.baseline);
    println!(
        "healthz round trip        p50 {}  p99 {}",
        ms(percentile(&rtt, 0.5)),
        ms(percentile(&rtt, 0.99))
    );
    println!(
        "run stream, first event   p50 {}  p99 {}",
        ms(percentile(&ttfe, 0.5)),
        ms(percentile(&ttfe, 0.99))
    );
    let added50 = percentile(&ttfe, 0.5).saturating_sub(percentile(&rtt, 0.5));
    let added99 = percentile(&ttfe, 0.99).saturating_sub(percentile(&rtt, 0.99));
    println!(
        "added by opening a run    p50 {}  p99 {}",
        ms(added50),
        ms(added99)
    );
    drop(server);

    // Phase 2: all streams open at once.
    let mut server = spawn_server(args.tokens_per_sec).await?;
    let c = concurrent(&server, body, args.streams, args.connect_concurrency).await?;
    c.print(&format!(
        "{} concurrent streams (demo at {} tokens/s per run)",
        args.streams, args.tokens_per_sec
    ));
    let _ = server.child.kill().await;
    if c.failures > 0 {
        bail!("{} streams failed", c.failures);
    }
    Ok(())
}

/// What the concurrent phase measured.
struct Concurrent {
    streams: usize,
    all_open: Duration,
    first_event: Vec<Duration>,
    first_text: Vec<Duration>,
    events: u64,
    failures: usize,
    wall: Duration,
    cpu: f64,
    rss_idle: u64,
    rss_open: u64,
}

impl Concurrent {
    fn print(&self, title: &str) {
        println!("## {title}");
        println!("all streams open after    {}", ms(self.all_open));
        println!(
            "first event               p50 {}  p99 {}",
            ms(percentile(&self.first_event, 0.5)),
            ms(percentile(&self.first_event, 0.99))
        );
        if !self.first_text.is_empty() {
            println!(
                "first token               p50 {}  p99 {}",
                ms(percentile(&self.first_text, 0.5)),
                ms(percentile(&self.first_text, 0.99))
            );
        }
        println!(
            "events delivered          {} in {:.2} s = {:.0} events/s",
            self.events,
            self.wall.as_secs_f64(),
            self.events as f64 / self.wall.as_secs_f64()
        );
        println!(
            "server CPU                {:.2} s = {:.1}% of one core",
            self.cpu,
            100.0 * self.cpu / self.wall.as_secs_f64()
        );
        println!(
            "server RSS                idle {} KiB, all open {} KiB => {:.1} KiB per open stream",
            self.rss_idle,
            self.rss_open,
            (self.rss_open.saturating_sub(self.rss_idle)) as f64 / self.streams as f64
        );
        println!("failed streams            {}", self.failures);
    }
}

/// Opens `streams` runs at once against `server` and reads each to its end, sampling the server's
/// memory once every stream has its first event.
async fn concurrent(
    server: &Server,
    body: &str,
    streams: usize,
    connect_concurrency: usize,
) -> anyhow::Result<Concurrent> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_kib(server.pid);
    let cpu_before = cpu_secs(server.pid);
    let body: Arc<str> = Arc::from(body);
    let gate = Arc::new(Semaphore::new(connect_concurrency));
    let opened = Arc::new(tokio::sync::Notify::new());
    let open_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let addr = server.addr.clone();
        let (gate, opened, open_count, body) = (
            gate.clone(),
            opened.clone(),
            open_count.clone(),
            body.clone(),
        );
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await?;
            let (sock, t0) = open_stream(&addr, &body).await?;
            read_stream(sock, t0, move || {
                drop(permit);
                if open_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == streams {
                    opened.notify_one();
                }
            })
            .await
        });
    }
    opened.notified().await;
    let all_open = started.elapsed();
    let rss_open = rss_kib(server.pid);
    let (mut first_event, mut first_text) = (Vec::with_capacity(streams), Vec::new());
    let (mut events, mut failures) = (0, 0);
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(Ok(r)) => {
                first_event.push(r.first_event);
                first_text.extend(r.first_text);
                events += r.events;
            }
            _ => failures += 1,
        }
    }
    first_event.sort();
    first_text.sort();
    Ok(Concurrent {
        streams,
        all_open,
        first_event,
        first_text,
        events,
        failures,
        wall: started.elapsed(),
        cpu: cpu_secs(server.pid) - cpu_before,
        rss_idle,
        rss_open,
    })
}

/// Lifts the soft open-files limit toward `want` (up to the hard limit): each stream is a socket.
fn raise_fd_limit(want: u64) {
    #[allow(unsafe_code)]
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Finds `tok<digit>` across reads: each is one token of the simulator's answer.
#[derive(Default)]
struct TokenScanner {
    state: u8,
}

impl TokenScanner {
    /// How many tokens start in `bytes`.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        let mut found = 0;
        for &b in bytes {
            self.state = match (self.state, b) {
                (3, b'0'..=b'9') => {
                    found += 1;
                    0
                }
                (_, b't') => 1,
                (1, b'o') => 2,
                (2, b'k') => 3,
                _ => 0,
            };
        }
        found
    }
}

/// What one measured request saw.
struct Timed {
    /// Each token's arrival after the request was written.
    times: Vec<Duration>,
    /// Through Sluice: the run's own `time_to_first_token_ms`.
    inside: Option<Duration>,
    /// Through Sluice: the thread the run is on (from `run_started`).
    thread_id: Option<String>,
}

/// Sends `body` to `path` and answers each token's arrival time after the request was written.
async fn token_times(
    addr: &str,
    path: &str,
    body: &str,
    tokens: u32,
) -> anyhow::Result<Vec<Duration>> {
    Ok(token_times_and_tail(addr, path, body, tokens, false)
        .await?
        .times)
}

/// `token_times`, and with `run_end` it reads on to Sluice's terminal event and also answers the
/// run's own `time_to_first_token_ms` (from accepting the run to the upstream's first token).
///
/// The client is a blocking socket on a thread of its own: each arrival costs it one wake-up and
/// one `read`, the least a client can perturb the processes it measures (an async client would
/// add a hand-off between the runtime's threads for every read).
async fn token_times_and_tail(
    addr: &str,
    path: &str,
    body: &str,
    tokens: u32,
    run_end: bool,
) -> anyhow::Result<Timed> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (addr, path) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || blocking_token_times(&addr, &path, &req, tokens, run_end))
        .await
        .context("the measuring thread failed")?
}

/// `--trace-slow-us`: first tokens slower than this are printed with the moment they were asked.
static TRACE_SLOW: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();

/// CLOCK_MONOTONIC now, in nanoseconds: the clock `perf record -k CLOCK_MONOTONIC` stamps events
/// with, so a slow request can be matched with what the machine was doing at the time.
fn monotonic_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a pointer to a live local.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `token_times_and_tail` on the measuring thread; `req` is the whole HTTP request.
fn blocking_token_times(
    addr: &str,
    path: &str,
    req: &str,
    tokens: u32,
    run_end: bool,
) -> anyhow::Result<Timed> {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mono = TRACE_SLOW.get().map(|_| monotonic_ns());
    let started = Instant::now();
    sock.write_all(req.as_bytes())?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut scanner = TokenScanner::default();
    let mut times = Vec::with_capacity(tokens as usize);
    // The last bytes received, to say what the stream looked like if it stops short.
    let mut tail: Vec<u8> = Vec::new();
    // The first bytes received, where `run_started` names the thread.
    let mut head: Vec<u8> = Vec::new();
    while times.len() < tokens as usize {
        let n = match sock.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "{path}: nothing for 10 s after {} of {tokens} tokens; the stream ended with:\n{}",
                    times.len(),
                    String::from_utf8_lossy(&tail)
                )
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            bail!("{path}: closed after {} of {tokens} tokens", times.len());
        }
        if head.len() < 4096 {
            head.extend_from_slice(&buf[..n.min(4096 - head.len())]);
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2048 {
            tail.drain(..tail.len() - 2048);
        }
        let at = started.elapsed();
        for _ in 0..scanner.feed(&buf[..n]) {
            times.push(at);
        }
    }
    if let (Some(slow), Some(mono), Some(first)) = (TRACE_SLOW.get(), mono, times.first())
        && first > slow
    {
        eprintln!(
            "slow first token: {path} on {addr} at {mono} ns took {} µs",
            first.as_micros()
        );
    }
    const THREAD: &[u8] = b"\"thread_id\":\"";
    let thread_id = head
        .windows(THREAD.len())
        .position(|w| w == THREAD)
        .map(|i| {
            head[i + THREAD.len()..]
                .iter()
                .take_while(|&&b| b != b'"')
                .map(|&b| b as char)
                .collect::<String>()
        });
    if !run_end {
        return Ok(Timed {
            times,
            inside: None,
            thread_id,
        });
    }
    const MARK: &[u8] = b"\"time_to_first_token_ms\":";
    let at = loop {
        if let Some(i) = tail.windows(MARK.len()).position(|w| w == MARK)
            && tail[i..].windows(13).any(|w| w == b"\"duration_ms\"")
        {
            break i + MARK.len();
        }
        let n = sock.read(&mut buf).context("waiting for run_completed")?;
        if n == 0 {
            bail!("{path}: closed before run_completed");
        }
        tail.extend_from_slice(&buf[..n]);
    };
    let number: String = tail[at..]
        .iter()
        .map(|&b| b as char)
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let ms: f64 = number.parse().context("time_to_first_token_ms")?;
    Ok(Timed {
        times,
        inside: Some(Duration::from_secs_f64(ms / 1000.0)),
        thread_id,
    })
}

#[derive(Default)]
struct PathStats {
    ttft: Vec<Duration>,
    per_token: Vec<Duration>,
    /// Through Sluice: the run's own time to first token (accepted → upstream's first token).
    inside: Vec<Duration>,
    /// Through Sluice: the client's time to first token minus the run's own.
    outside: Vec<Duration>,
}

impl PathStats {
    fn add(&mut self, times: &[Duration]) {
        if let (Some(first), Some(last)) = (times.first(), times.last()) {
            self.ttft.push(*first);
            if times.len() > 1 {
                self.per_token
                    .push((*last - *first) / (times.len() as u32 - 1));
            }
        }
    }

    fn add_inside(&mut self, client_ttft: Option<Duration>, inside: Option<Duration>) {
        if let (Some(client), Some(inside)) = (client_ttft, inside) {
            self.inside.push(inside);
            self.outside.push(client.saturating_sub(inside));
        }
    }

    fn sorted(mut self) -> (Vec<Duration>, Vec<Duration>) {
        self.ttft.sort();
        self.per_token.sort();
        (self.ttft, self.per_token)
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// The `p` percentile of `sorted`, or a dash where there is nothing to measure (one token per run
/// has no gap between tokens).
fn us_of(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        "—".to_string()
    } else {
        us(percentile(sorted, p))
    }
}

/// How much later `a`'s `p` percentile is than `b`'s.
fn added(a: &[Duration], b: &[Duration], p: f64) -> String {
    let (a, b) = (percentile(a, p), percentile(b, p));
    format!("{:+.1} µs", (a.as_secs_f64() - b.as_secs_f64()) * 1e6)
}

/// The provider paths the relay passes on.
const PROVIDER_PATHS: [&str; 4] = [
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/messages",
    "/api/chat",
];

/// `sluice bench-relay`: an HTTP server that passes each request on to `upstream` and streams the
/// answer back, with the same server stack (axum on hyper, TCP_NODELAY) and the same upstream
/// client (keep-alive `h1::Pool`) as Sluice, and none of Sluice's work. What it adds is what one
/// more process on the path costs on this machine: the floor under what Sluice adds.
pub async fn relay(listen: std::net::SocketAddr, upstream: &str) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    let base = reqwest::Url::parse(upstream).context("--to must be a URL")?;
    let mut pools = HashMap::new();
    for path in PROVIDER_PATHS {
        let url = base.join(path)?;
        let pool = sluice_providers::h1::Pool::new(&url, 16, Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        pools.insert(path, Arc::new(pool));
    }
    let pools = Arc::new(pools);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: bytes::Bytes| {
        let pools = pools.clone();
        async move {
            use axum::response::IntoResponse;
            let Some(pool) = pools.get(uri.path()) else {
                return (axum::http::StatusCode::NOT_FOUND, "not a provider path").into_response();
            };
            let headers = [("Content-Type", "application/json")];
            match pool.post(&headers, &body, Duration::from_secs(5)).await {
                Ok(resp) => {
                    let status = axum::http::StatusCode::from_u16(resp.status())
                        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
                    let kind = resp
                        .header("content-type")
                        .unwrap_or("application/octet-stream")
                        .to_string();
                    let chunks = futures_util::stream::unfold(resp, |mut resp| async move {
                        resp.chunk()
                            .await
                            .map(|c| (c.map_err(|e| std::io::Error::other(e.to_string())), resp))
                    });
                    (
                        status,
                        [(axum::http::header::CONTENT_TYPE, kind)],
                        axum::body::Body::from_stream(chunks),
                    )
                        .into_response()
                }
                Err(e) => (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "sluice relay listening on http://{addr}");
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

/// Each adapter against the simulator: the simulator called directly, through a relay that does
/// nothing (one more process on the path, the floor under what any proxy adds here), through
/// Sluice on a new thread, and through Sluice as a later message of a thread (its run needs the
/// thread's history first), in a rotating order so all paths see the same conditions.
/// Persistence is on.
async fn providers(runs: usize, args: &BenchArgs) -> anyhow::Result<()> {
    let (tokens, concurrent_streams) = (args.provider_tokens, args.streams);
    pin(std::process::id(), args.others_cpus.as_deref())?;
    let sim = spawn_child(&["simulate"], &[], "sluice simulator listening on http://").await?;
    pin(
        sim.pid,
        args.sim_cpus.as_deref().or(args.others_cpus.as_deref()),
    )?;
    let sim_url = format!("http://{}", sim.addr);
    let v1 = format!("{sim_url}/v1");
    // The same request both ways: one user message and no tools (the default agent would offer
    // the built-in artifact tools, which the direct request does not carry).
    let config_dir = tempfile::tempdir()?;
    let config = config_dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "default_agent = \"bench\"\n[agents.bench]\ntools = []\n",
    )?;
    let config = config.to_string_lossy().to_string();
    let server = spawn_child(
        &["serve", "--config", &config],
        &[
            ("OPENAI_BASE_URL", v1.as_str()),
            ("OPENAI_API_KEY", "sk-bench"),
            ("ANTHROPIC_BASE_URL", sim_url.as_str()),
            ("ANTHROPIC_API_KEY", "sk-bench"),
            ("OLLAMA_HOST", sim_url.as_str()),
        ],
        "sluice listening on http://",
    )
    .await?;
    pin(server.pid, args.server_cpus.as_deref())?;
    let relay = spawn_child(
        &["bench-relay", "--to", &sim_url],
        &[],
        "sluice relay listening on http://",
    )
    .await?;
    pin(relay.pid, args.server_cpus.as_deref())?;
    let gap = args.provider_gap_us;
    let pause = Duration::from_micros(args.provider_pause_us);
    if let Some(us) = args.trace_slow_us {
        TRACE_SLOW.get_or_init(|| Duration::from_micros(us));
    }
    let model = format!("sim?tokens={tokens}&gap_us={gap}");
    let pace = if gap == 0 {
        "as fast as possible".to_string()
    } else {
        format!("{gap} µs between tokens")
    };
    let quiet = if pause.is_zero() {
        "back to back".to_string()
    } else {
        format!("{} µs of quiet before each", args.provider_pause_us)
    };
    println!(
        "# sluice bench --providers {runs} — {tokens} tokens per run, simulator pace: {pace}; requests {quiet}"
    );
    let cpus = |c: Option<&String>| c.map_or("any".to_string(), |c| c.clone());
    if args.server_cpus.is_some() || args.others_cpus.is_some() || args.sim_cpus.is_some() {
        println!(
            "# pinned to CPUs: Sluice and the relay {}, the simulator {}, the load generator {}",
            cpus(args.server_cpus.as_ref()),
            cpus(args.sim_cpus.as_ref().or(args.others_cpus.as_ref())),
            cpus(args.others_cpus.as_ref()),
        );
    }
    println!("| adapter | path | first token p50 | p99 | per token p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    let adapters = [
        ("openai", PROVIDER_PATHS[0]),
        ("openai-chat", PROVIDER_PATHS[1]),
        ("anthropic", PROVIDER_PATHS[2]),
        ("ollama", PROVIDER_PATHS[3]),
    ];
    let mut summary = Vec::new();
    let mut followups = Vec::new();
    let mut split = Vec::new();
    for (provider, path) in adapters {
        let direct_body = serde_json::json!({
            "model": model, "stream": true, "max_tokens": 4096,
            "messages": [{"role": "user", "content": "bench"}],
            "input": [{"role": "user", "content": "bench"}],
        })
        .to_string();
        let sluice_body =
            serde_json::json!({"content": "bench", "model": format!("{provider}/{model}")})
                .to_string();
        let (mut direct, mut relayed, mut through, mut follow): (
            PathStats,
            PathStats,
            PathStats,
            PathStats,
        ) = Default::default();
        // Warm every path (connection pools, caches) before measuring.
        token_times(&sim.addr, path, &direct_body, tokens).await?;
        token_times(&relay.addr, path, &direct_body, tokens).await?;
        let warm =
            token_times_and_tail(&server.addr, "/v1/runs/stream", &sluice_body, tokens, false)
                .await?;
        // The thread of the latest new-thread run through Sluice, for the next second message.
        let mut thread = warm.thread_id.context("run_started named no thread")?;
        for i in 0..runs {
            // The four paths in a rotating order: a process that just served a request is warmer
            // (caches, scheduler) than one that waited, and no path should always come first.
            for which in (0..4).map(|k| (k + i) % 4) {
                if pause > Duration::ZERO {
                    tokio::time::sleep(pause).await;
                }
                match which {
                    0 | 1 => {
                        // The provider's own request, to the simulator or through the relay.
                        let (addr, stats) = if which == 0 {
                            (&sim.addr, &mut direct)
                        } else {
                            (&relay.addr, &mut relayed)
                        };
                        stats.add(&token_times(addr, path, &direct_body, tokens).await?);
                    }
                    2 => {
                        let new = token_times_and_tail(
                            &server.addr,
                            "/v1/runs/stream",
                            &sluice_body,
                            tokens,
                            true,
                        )
                        .await?;
                        through.add(&new.times);
                        through.add_inside(new.times.first().copied(), new.inside);
                        thread = new.thread_id.context("run_started named no thread")?;
                    }
                    _ => {
                        // A second message on a thread: its run needs the thread's history
                        // before it calls the model (kept in memory after the thread's last run).
                        let followed = format!("/v1/threads/{thread}/runs/stream");
                        follow.add(
                            &token_times(&server.addr, &followed, &sluice_body, tokens).await?,
                        );
                    }
                }
            }
        }
        let (mut inside, mut outside) = (
            std::mem::take(&mut through.inside),
            std::mem::take(&mut through.outside),
        );
        inside.sort();
        outside.sort();
        split.push(format!(
            "| {provider} | {} | {} | {} | {} |",
            us(percentile(&inside, 0.5)),
            us(percentile(&inside, 0.99)),
            us(percentile(&outside, 0.5)),
            us(percentile(&outside, 0.99)),
        ));
        let (d_ttft, d_tok) = direct.sorted();
        let (r_ttft, r_tok) = relayed.sorted();
        let (s_ttft, s_tok) = through.sorted();
        let (f_ttft, f_tok) = follow.sorted();
        for (name, ttft, tok) in [
            ("direct", &d_ttft, &d_tok),
            ("through a no-op relay", &r_ttft, &r_tok),
            ("through Sluice", &s_ttft, &s_tok),
            (
                "through Sluice, a later message of a thread",
                &f_ttft,
                &f_tok,
            ),
        ] {
            println!(
                "| {provider} | {name} | {} | {} | {} | {} |",
                us(percentile(ttft, 0.5)),
                us(percentile(ttft, 0.99)),
                us_of(tok, 0.5),
                us_of(tok, 0.99)
            );
        }
        summary.push(format!(
            "| {provider} | {} | {} | {} | {} | {} | {} | {} |",
            added(&s_ttft, &d_ttft, 0.5),
            added(&s_ttft, &d_ttft, 0.99),
            if s_tok.is_empty() {
                "—".to_string()
            } else {
                added(&s_tok, &d_tok, 0.5)
            },
            added(&r_ttft, &d_ttft, 0.5),
            added(&r_ttft, &d_ttft, 0.99),
            added(&s_ttft, &r_ttft, 0.5),
            added(&s_ttft, &r_ttft, 0.99),
        ));
        followups.push(format!(
            "| {provider} | {} | {} | {} | {} |",
            added(&f_ttft, &d_ttft, 0.5),
            added(&f_ttft, &d_ttft, 0.99),
            added(&f_ttft, &s_ttft, 0.5),
            added(&f_ttft, &s_ttft, 0.99),
        ));
    }
    println!();
    println!(
        "| adapter | Sluice adds to first token p50 | p99 | per token p50 | a no-op relay adds p50 | p99 | Sluice over the relay p50 | p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in summary {
        println!("{line}");
    }
    println!();
    println!(
        "| adapter | a later message of a thread: Sluice adds to first token p50 | p99 | over a new thread p50 | p99 |"
    );
    println!("|---|---|---|---|---|");
    for line in followups {
        println!("{line}");
    }
    println!();
    println!(
        "| adapter | inside the run: accepted → upstream's first token p50 | p99 | the rest (HTTP in, first frame out) p50 | p99 |"
    );
    println!("|---|---|---|---|---|");
    for line in split {
        println!("{line}");
    }
    // The core benchmark through each adapter: many concurrent runs, each streaming from the
    // simulator at 20 tokens/s for 5 s.
    if concurrent_streams > 0 {
        println!();
        for (provider, _) in adapters {
            let body = serde_json::json!({"content": "bench", "model": format!("{provider}/sim?tokens=100&gap_ms=50")}).to_string();
            let c = concurrent(&server, &body, concurrent_streams, 200).await?;
            c.print(&format!("{concurrent_streams} concurrent streams through {provider} (simulator: 100 tokens at 20/s)"));
            if c.failures > 0 {
                bail!("{} streams failed through {provider}", c.failures);
            }
        }
    }
    drop(server);
    drop(relay);
    drop(sim);
    Ok(())
}
