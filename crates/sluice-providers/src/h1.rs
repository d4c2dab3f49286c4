//! A small HTTP/1.1 client for plain-HTTP upstreams (a local Ollama, vLLM or llama.cpp server, the
//! simulator), driven entirely inside the run's own task.
//!
//! Why not reqwest here: on the first-token path every hop between tasks and every extra system
//! call is time the user waits. reqwest (through hyper's pooled client) hands the request to a
//! connection task and the response back through channels; measured against the simulator on a
//! kept-alive connection that costs ~150 µs before the first token over writing the request on
//! the socket and reading the answer from it (docs/BENCHMARKS.md). This client writes the whole
//! request with one system call and decodes the response (Content-Length, chunked, or until
//! close) from the socket as the caller reads it. HTTPS and proxied upstreams keep using reqwest
//! (TLS, proxies), where the network dwarfs this difference.
//!
//! Connections are kept alive in a per-provider pool. A pooled connection the server closed while
//! idle is noticed on checkout (a read that does not block) or, in the race where it closes as the
//! request is written, by the answer ending before a single byte: then the request is sent once
//! more on a fresh connection, as hyper's client does.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head accepted (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// The most headers a response may carry.
const MAX_HEADERS: usize = 100;
/// The longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;
/// How much is read from the socket at a time.
const READ_SIZE: usize = 16 * 1024;

/// What went wrong talking to the upstream.
#[derive(Debug)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connection could not be made.
    Connect,
    /// The connection was not made within the connect timeout.
    ConnectTimeout,
    /// Reading or writing failed, or the connection closed early.
    Io,
    /// The upstream's answer is not valid HTTP/1.1.
    Protocol,
    /// The request cannot be sent as given (a header value with a line break, say).
    Request,
}

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether `url` can go through this client: plain HTTP, no credentials in the URL, and no proxy
/// configured in the environment for plain HTTP (those stay with reqwest, which honours them).
pub fn eligible(url: &reqwest::Url) -> bool {
    let proxied = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    url.scheme() == "http"
        && url.username().is_empty()
        && url.password().is_none()
        && url.host().is_some()
        && !proxied
}

/// Where requests go: one upstream URL.
#[derive(Debug)]
struct Endpoint {
    /// A host name to resolve, or an IP address.
    host: Host,
    port: u16,
    /// The `Host` header.
    authority: String,
    /// The request target: path and query.
    target: String,
}

#[derive(Debug)]
enum Host {
    Name(String),
    Ip(IpAddr),
}

/// A kept-alive connection waiting in the pool.
struct Idle {
    stream: TcpStream,
    since: Instant,
}

/// Connections to one upstream URL.
pub struct Pool {
    endpoint: Endpoint,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("endpoint", &self.endpoint)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    /// A pool for `url`, which must be [`eligible`].
    pub fn new(url: &reqwest::Url, max_idle: usize, idle_timeout: Duration) -> Result<Pool, Error> {
        let host = match url.host() {
            Some(url::Host::Domain(d)) => Host::Name(d.to_string()),
            Some(url::Host::Ipv4(ip)) => Host::Ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Host::Ip(IpAddr::V6(ip)),
            None => return Err(Error::new(ErrorKind::Request, "the URL has no host")),
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let host_str = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(p) => format!("{host_str}:{p}"),
            None => host_str.to_string(),
        };
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        Ok(Pool {
            endpoint: Endpoint {
                host,
                port,
                authority,
                target,
            },
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        })
    }

    /// Connections waiting in the pool.
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// POSTs `body` with `headers` (besides Host, Content-Length and User-Agent) and answers once
    /// the response head has arrived; the body is read from the [`Response`].
    pub async fn post(
        self: &Arc<Self>,
        headers: &[(&str, &str)],
        body: &[u8],
        connect_timeout: Duration,
    ) -> Result<Response, Error> {
        let request = self.encode(headers, body)?;
        let mut stale = 0;
        loop {
            let (stream, reused) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect(connect_timeout).await?, false),
            };
            match exchange(stream, &request).await {
                Ok((stream, buf, head)) => {
                    return Ok(Response::new(self.clone(), stream, buf, head));
                }
                // A kept-alive connection the server closed just as it was reused: nothing was
                // answered, so the request is sent again on a fresh connection (once; a server
                // that keeps doing this gets the error).
                Err(Exchange::Silent(_)) if reused && stale == 0 => {
                    stale += 1;
                    self.idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                }
                Err(Exchange::Silent(e) | Exchange::Failed(e)) => return Err(e),
            }
        }
    }

    fn encode(&self, headers: &[(&str, &str)], body: &[u8]) -> Result<Vec<u8>, Error> {
        let ep = &self.endpoint;
        let mut out = Vec::with_capacity(256 + body.len());
        out.extend_from_slice(b"POST ");
        out.extend_from_slice(ep.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(ep.authority.as_bytes());
        out.extend_from_slice(b"\r\nUser-Agent: sluice/");
        out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        for (name, value) in headers {
            let bad = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0);
            if name.is_empty() || bad(name) || name.contains(':') || bad(value) {
                // Never quote the value: it may be a credential.
                return Err(Error::new(
                    ErrorKind::Request,
                    format!("the {name} header's value contains a line break or NUL"),
                ));
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
        Ok(out)
    }

    /// A live idle connection, if there is one. Connections idle too long, or that the server
    /// closed (or sent something unasked) while idle, are dropped.
    fn checkout(&self) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.since.elapsed() >= self.idle_timeout {
                continue;
            }
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(conn.stream),
                _ => continue,
            }
        }
        None
    }

    fn checkin(&self, stream: TcpStream) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|c| c.since.elapsed() < self.idle_timeout);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                stream,
                since: Instant::now(),
            });
        }
    }

    async fn connect(&self, timeout: Duration) -> Result<TcpStream, Error> {
        let ep = &self.endpoint;
        let connect = async {
            match &ep.host {
                Host::Ip(ip) => TcpStream::connect(SocketAddr::new(*ip, ep.port)).await,
                Host::Name(name) => TcpStream::connect((name.as_str(), ep.port)).await,
            }
        };
        let stream = match tokio::time::timeout(timeout, connect).await {
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::ConnectTimeout,
                    format!("connecting to {} timed out", ep.authority),
                ));
            }
            Ok(Err(e)) => {
                return Err(Error::new(
                    ErrorKind::Connect,
                    format!("connecting to {} failed: {e}", ep.authority),
                ));
            }
            Ok(Ok(s)) => s,
        };
        // Tokens are small writes that must not wait for an ACK.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

enum Exchange {
    /// The connection ended before any byte of an answer.
    Silent(Error),
    Failed(Error),
}

/// A response's status line and the headers this client needs.
#[derive(Debug)]
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    keep_alive: bool,
}

/// Writes `request` and reads until a final (non-1xx) response head has arrived.
async fn exchange(
    mut stream: TcpStream,
    request: &[u8],
) -> Result<(TcpStream, BytesMut, Head), Exchange> {
    if let Err(e) = stream.write_all(request).await {
        return Err(Exchange::Silent(io_error("sending the request", &e)));
    }
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut received = false;
    loop {
        if !buf.is_empty() {
            match parse_head(&buf).map_err(Exchange::Failed)? {
                Some((len, head)) if (100..200).contains(&head.status) => {
                    // An interim answer (100 Continue, 103 Early Hints): the real one follows.
                    buf.advance(len);
                    continue;
                }
                Some((len, head)) => {
                    buf.advance(len);
                    return Ok((stream, buf, head));
                }
                None if buf.len() >= MAX_HEAD => {
                    return Err(Exchange::Failed(Error::new(
                        ErrorKind::Protocol,
                        format!("the response head is larger than {} KiB", MAX_HEAD / 1024),
                    )));
                }
                None => {}
            }
        }
        buf.reserve(READ_SIZE);
        match stream.read_buf(&mut buf).await {
            Ok(0) if received => {
                return Err(Exchange::Failed(Error::new(
                    ErrorKind::Io,
                    "the connection closed in the middle of the response head",
                )));
            }
            Ok(0) => {
                return Err(Exchange::Silent(Error::new(
                    ErrorKind::Io,
                    "the connection closed before any response",
                )));
            }
            Ok(_) => received = true,
            Err(e) if received => {
                return Err(Exchange::Failed(io_error("reading the response", &e)));
            }
            Err(e) => return Err(Exchange::Silent(io_error("reading the response", &e))),
        }
    }
}

fn io_error(doing: &str, e: &std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{doing} failed: {e}"))
}

/// Parses a response head from the start of `buf`: its length and what it says, or `None` when
/// more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, Error> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut storage);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("the upstream's answer is not HTTP/1.1: {e}"),
            ));
        }
    };
    let status = resp.code.unwrap_or(0);
    let version = resp.version.unwrap_or(0);
    let mut headers = Vec::with_capacity(resp.headers.len());
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut close = version == 0;
    for h in resp.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(h.value).trim().to_string();
        match name.as_str() {
            "transfer-encoding" => {
                // The last coding decides; anything but chunked is not something we asked for.
                let last = value.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        format!("unsupported Transfer-Encoding `{value}`"),
                    ));
                }
                chunked = true;
            }
            "content-length" => {
                let n = value.parse::<u64>().map_err(|_| {
                    Error::new(
                        ErrorKind::Protocol,
                        format!("invalid Content-Length `{value}`"),
                    )
                })?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        "two different Content-Length headers",
                    ));
                }
                length = Some(n);
            }
            "connection" => {
                for token in value.split(',') {
                    let token = token.trim();
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") && version == 0 {
                        close = false;
                    }
                }
            }
            _ => {}
        }
        headers.push((name, value));
    }
    let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked(Chunk::Size)
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some((
        len,
        Head {
            status,
            headers,
            framing,
            keep_alive: !close,
        },
    )))
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// The body ends when the connection does.
    UntilClose,
}

/// Where the chunked decoder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data: this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last (empty) chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// What decoding the buffered bytes gave.
enum Step {
    Data(Bytes),
    NeedMore,
    Complete,
}

/// An upstream's answer: its status and headers now, its body as it arrives.
pub struct Response {
    pool: Arc<Pool>,
    status: u16,
    headers: Vec<(String, String)>,
    /// `None` once the body is complete (the connection went back to the pool or was closed).
    stream: Option<TcpStream>,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("framing", &self.framing)
            .finish()
    }
}

impl Response {
    fn new(pool: Arc<Pool>, stream: TcpStream, buf: BytesMut, head: Head) -> Response {
        let mut resp = Response {
            pool,
            status: head.status,
            headers: head.headers,
            stream: Some(stream),
            buf,
            framing: head.framing,
            keep_alive: head.keep_alive,
        };
        if resp.framing == Framing::Length(0) {
            resp.finish();
        }
        resp
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// A header's value (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next piece of the body as it arrives; `None` at its end. After the end the connection
    /// is back in the pool (when the server keeps it alive); dropping the response before closes
    /// it, which is how the upstream learns a run was cancelled.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, Error>> {
        loop {
            match self.decode() {
                Err(e) => {
                    self.stream = None;
                    return Some(Err(e));
                }
                Ok(Step::Data(bytes)) => return Some(Ok(bytes)),
                Ok(Step::Complete) => {
                    self.finish();
                    return None;
                }
                Ok(Step::NeedMore) => {}
            }
            let stream = self.stream.as_mut()?;
            self.buf.reserve(READ_SIZE);
            match stream.read_buf(&mut self.buf).await {
                Ok(0) if self.framing == Framing::UntilClose => {
                    self.stream = None;
                    return None;
                }
                Ok(0) => {
                    self.stream = None;
                    return Some(Err(Error::new(
                        ErrorKind::Io,
                        "the connection closed before the end of the response",
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    self.stream = None;
                    return Some(Err(io_error("reading the response", &e)));
                }
            }
        }
    }

    /// The body is complete: the connection goes back to the pool if it can be reused.
    fn finish(&mut self) {
        if let Some(stream) = self.stream.take()
            && self.keep_alive
            && self.buf.is_empty()
        {
            self.pool.checkin(stream);
        }
    }

    fn decode(&mut self) -> Result<Step, Error> {
        let buf = &mut self.buf;
        loop {
            match &mut self.framing {
                Framing::Length(0) => return Ok(Step::Complete),
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Framing::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Framing::Chunked(state) => match *state {
                    Chunk::Done => return Ok(Step::Complete),
                    Chunk::Size => {
                        let Some(line) = take_line(buf, "chunk size")? else {
                            return Ok(Step::NeedMore);
                        };
                        let size = parse_chunk_size(&line)?;
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Step::NeedMore);
                        }
                        let n = left.min(buf.len() as u64) as usize;
                        *state = if left == n as u64 {
                            Chunk::DataEnd
                        } else {
                            Chunk::Data(left - n as u64)
                        };
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        let Some(line) = take_line(buf, "chunk end")? else {
                            return Ok(Step::NeedMore);
                        };
                        if !line.is_empty() {
                            return Err(Error::new(
                                ErrorKind::Protocol,
                                "a chunk's data is longer than its size says",
                            ));
                        }
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        let Some(line) = take_line(buf, "trailer")? else {
                            return Ok(Step::NeedMore);
                        };
                        if line.is_empty() {
                            *state = Chunk::Done;
                        }
                    }
                },
            }
        }
    }
}

/// Takes one line (without its CRLF or LF) off the front of `buf`, or `None` if it has not all
/// arrived.
fn take_line(buf: &mut BytesMut, what: &str) -> Result<Option<BytesMut>, Error> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err(Error::new(
            ErrorKind::Protocol,
            format!("a {what} line longer than {MAX_LINE} bytes"),
        )),
        None => Ok(None),
    }
}

/// `1a;name=value` → 26.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = std::str::from_utf8(digits)
        .unwrap_or("")
        .trim_matches([' ', '\t']);
    if digits.is_empty() || digits.len() > 15 {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "invalid chunk size line `{}`",
                String::from_utf8_lossy(&line[..line.len().min(40)])
            ),
        ));
    }
    u64::from_str_radix(digits, 16).map_err(|_| {
        Error::new(
            ErrorKind::Protocol,
            format!("invalid chunk size `{digits}`"),
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::net::TcpListener;

    const T: Duration = Duration::from_secs(5);

    async fn listener() -> (TcpListener, reqwest::Url) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/chat?x=1", l.local_addr().unwrap());
        (l, reqwest::Url::parse(&url).unwrap())
    }

    fn pool(url: &reqwest::Url) -> Arc<Pool> {
        Arc::new(Pool::new(url, 8, Duration::from_secs(60)).unwrap())
    }

    /// Reads one request: its head (as text) and its body.
    async fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.ok()? == 0 {
                return None;
            }
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        Some((head, body))
    }

    /// Writes `bytes` in pieces of `step`, each flushed on its own.
    async fn dribble(s: &mut TcpStream, bytes: &[u8], step: usize) {
        for piece in bytes.chunks(step) {
            s.write_all(piece).await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
    }

    async fn body_of(resp: &mut Response) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        while let Some(piece) = resp.chunk().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n6;ext=1\r\ndata: \r\nB\r\nhello world\r\n0\r\nx-trailer: y\r\n\r\n";

    #[tokio::test]
    async fn sends_one_well_formed_request_and_decodes_a_chunked_answer_split_anywhere() {
        let (l, url) = listener().await;
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // One connection serves every request: the client keeps it alive.
            let (mut s, _) = l.accept().await.unwrap();
            let mut heads = Vec::new();
            for step in [1, 2, 3, 7, 1000] {
                let (head, body) = read_request(&mut s).await.unwrap();
                assert_eq!(body, b"{\"a\":1}");
                heads.push(head);
                dribble(&mut s, CHUNKED, step).await;
            }
            heads
        });
        let pool = pool(&url);
        for _ in 0..5 {
            let mut resp = pool
                .post(&[("Authorization", "Bearer k")], b"{\"a\":1}", T)
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.header("content-type"), Some("text/event-stream"));
            assert_eq!(body_of(&mut resp).await.unwrap(), b"data: hello world");
            assert_eq!(pool.idle_count(), 1, "the connection went back to the pool");
        }
        let heads = server.await.unwrap();
        let first = &heads[0];
        assert!(
            first.starts_with("POST /v1/chat?x=1 HTTP/1.1\r\n"),
            "{first}"
        );
        assert!(first.contains(&format!("\r\nHost: {addr}\r\n")), "{first}");
        assert!(first.contains("\r\nContent-Length: 7\r\n"), "{first}");
        assert!(first.contains("\r\nAuthorization: Bearer k\r\n"), "{first}");
    }

    #[tokio::test]
    async fn content_length_and_read_until_close_bodies() {
        let (l, url) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            read_request(&mut s).await.unwrap();
            dribble(
                &mut s,
                b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\nbusy",
                5,
            )
            .await;
            read_request(&mut s).await.unwrap();
            // No length and no chunking: the body is everything until the connection closes.
            dribble(&mut s, b"HTTP/1.1 200 OK\r\n\r\n{\"done\":true}\n", 4).await;
        });
        let pool = pool(&url);
        let mut resp = pool.post(&[], b"", T).await.unwrap();
        assert_eq!(
            (resp.status(), resp.header("retry-after")),
            (503, Some("2"))
        );
        assert_eq!(body_of(&mut resp).await.unwrap(), b"busy");
        assert_eq!(pool.idle_count(), 1);
        let mut resp = pool.post(&[], b"", T).await.unwrap();
        assert_eq!(body_of(&mut resp).await.unwrap(), b"{\"done\":true}\n");
        assert_eq!(
            pool.idle_count(),
            0,
            "a body ended by closing is not reusable"
        );
    }

    #[tokio::test]
    async fn connection_close_and_interim_answers() {
        let (l, url) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            read_request(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        });
        let pool = pool(&url);
        let mut resp = pool.post(&[], b"x", T).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body_of(&mut resp).await.unwrap(), b"ok");
        assert_eq!(pool.idle_count(), 0, "Connection: close is honoured");
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_replaced_without_an_error() {
        let (l, url) = listener().await;
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            // The first connection answers once and is closed by the server while idle; the
            // second answers once and is closed as the next request is written (the race);
            // the third answers.
            for close_after_read in [false, true, false] {
                let (mut s, _) = l.accept().await.unwrap();
                accepted += 1;
                read_request(&mut s).await.unwrap();
                if close_after_read {
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
                        .await
                        .unwrap();
                    read_request(&mut s).await.unwrap();
                    drop(s);
                    continue;
                }
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
                    .await
                    .unwrap();
                drop(s);
            }
            accepted
        });
        let pool = pool(&url);
        let mut resp = pool.post(&[], b"", T).await.unwrap();
        assert_eq!(body_of(&mut resp).await.unwrap(), b"1");
        // Let the close arrive: the checkout probe sees it and connects afresh.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut resp = pool.post(&[], b"", T).await.unwrap();
        assert_eq!(body_of(&mut resp).await.unwrap(), b"2");
        // This connection looks alive at checkout but closes without answering.
        let mut resp = pool.post(&[], b"", T).await.unwrap();
        assert_eq!(body_of(&mut resp).await.unwrap(), b"1");
        assert_eq!(server.await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_fresh_connection_closed_without_an_answer_is_an_error_not_a_retry_loop() {
        let (l, url) = listener().await;
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok(Ok((mut s, _))) =
                tokio::time::timeout(Duration::from_millis(300), l.accept()).await
            {
                accepted += 1;
                read_request(&mut s).await;
            }
            accepted
        });
        let err = pool(&url).post(&[], b"", T).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Io);
        assert!(err.message.contains("closed before any response"), "{err}");
        assert_eq!(server.await.unwrap(), 1);
    }

    async fn answer_with(raw: &'static [u8]) -> Result<Vec<u8>, Error> {
        let (l, url) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            read_request(&mut s).await.unwrap();
            s.write_all(raw).await.unwrap();
            // Keep the connection open a moment so "closed" is not what the client reports.
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        let mut resp = pool(&url).post(&[], b"", T).await?;
        body_of(&mut resp).await
    }

    #[tokio::test]
    async fn malformed_answers_are_clear_errors() {
        let cases: [(&[u8], &str); 6] = [
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not HTTP/1.1"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "invalid chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
                "longer than its size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                "unsupported Transfer-Encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "two different",
            ),
        ];
        for (raw, want) in cases {
            let err = answer_with(raw).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Protocol, "{err}");
            assert!(err.message.contains(want), "{want}: {err}");
        }
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_io_error_and_the_connection_is_not_reused() {
        let (l, url) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            read_request(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nonly part")
                .await
                .unwrap();
        });
        let pool = pool(&url);
        let mut resp = pool.post(&[], b"", T).await.unwrap();
        assert_eq!(&resp.chunk().await.unwrap().unwrap()[..], b"only part");
        let err = resp.chunk().await.unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Io);
        assert!(err.message.contains("before the end"), "{err}");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_head_too_large_is_refused() {
        let (l, url) = listener().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            read_request(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
            let header = format!("x-big: {}\r\n", "a".repeat(1000));
            for _ in 0..80 {
                if s.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let err = pool(&url).post(&[], b"", T).await.unwrap_err();
        assert!(err.message.contains("larger than 64 KiB"), "{err}");
    }

    #[tokio::test]
    async fn header_values_cannot_smuggle_lines_and_are_not_quoted() {
        let (_l, url) = listener().await;
        let err = pool(&url)
            .post(&[("Authorization", "Bearer sk-1\r\nX-Evil: 1")], b"", T)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Request);
        assert!(!err.message.contains("sk-1"), "{err}");
    }

    #[tokio::test]
    async fn dropping_a_response_midway_closes_the_connection() {
        let (l, url) = listener().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            read_request(&mut s).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                .await
                .unwrap();
            // The client reads one piece and drops the response: this read sees the close.
            let mut rest = [0u8; 16];
            tokio::time::timeout(T, s.read(&mut rest))
                .await
                .unwrap()
                .unwrap()
        });
        let pool = pool(&url);
        let mut resp = pool.post(&[], b"", T).await.unwrap();
        assert_eq!(&resp.chunk().await.unwrap().unwrap()[..], b"abc");
        drop(resp);
        assert_eq!(
            server.await.unwrap(),
            0,
            "the server saw the connection close"
        );
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let url = reqwest::Url::parse("http://127.0.0.1:1/v1").unwrap();
        let err = pool(&url).post(&[], b"", T).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Connect);
        assert!(err.message.contains("127.0.0.1:1"), "{err}");
    }

    #[test]
    fn only_plain_http_without_credentials_is_eligible() {
        let ok = |u: &str| eligible(&reqwest::Url::parse(u).unwrap());
        // (No proxy variables are set in the test environment; with one set, none is eligible.)
        if ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .all(|v| std::env::var_os(v).is_none())
        {
            assert!(ok("http://127.0.0.1:11434"));
            assert!(ok("http://[::1]:8000/v1"));
        }
        assert!(!ok("https://api.openai.com/v1"));
        assert!(!ok("http://user:pw@127.0.0.1:8000/v1"));
    }
}
