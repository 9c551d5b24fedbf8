//! What the hostile-peer suites share: a tokio test runner with a time
//! limit, an echo server, a bystander Kitestring client that checks its
//! messages come back exactly once, in order and without a latency spike,
//! and a raw client that writes HTTP and WebSocket frames by hand and
//! speaks JSON envelopes.
//!
//! Everything runs on tokio with plain `tokio::net::TcpStream`s on
//! loopback. Every wait is bounded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub,
    missing_docs
)]

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::{
    ClientOptions, CloseCode, DecodeExt, Event, Received, Runtime, ServerEvent, ServerHandle,
    ServerOptions, SessionId,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Every test: a 2-worker tokio runtime and a 20 s limit on the whole.
pub fn run<F: Future<Output = ()>>(test: impl FnOnce(Arc<dyn Runtime>) -> F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let rt = kitestring_tokio::runtime();
            tokio::time::timeout(Duration::from_secs(20), test(rt))
                .await
                .expect("test timed out");
        });
}

/// Awaits `fut` for at most `ms`; panics naming `what` on timeout.
pub async fn within<F: Future>(ms: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_millis(ms), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {ms} ms: {what}"),
    }
}

// The server.

/// A server on loopback that echoes the bystanders' messages back to their
/// sessions; every other event (the hostile clients' messages included)
/// goes to `events`.
pub struct Echo {
    pub server: ServerHandle,
    pub addr: SocketAddr,
    pub events: mpsc::UnboundedReceiver<ServerEvent>,
    bystanders: Arc<Mutex<HashSet<SessionId>>>,
}

/// What a bystander needs to know about the server: where it is, and
/// where to register its session for echoes.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    bystanders: Arc<Mutex<HashSet<SessionId>>>,
    /// Time between the bystander's messages. Default 5 ms.
    pub interval: Duration,
}

impl Target {
    /// The bystander sends a message every `interval` (to stay under a
    /// low rate limit).
    pub fn every(self, interval: Duration) -> Target {
        Target { interval, ..self }
    }
}

pub fn echo_server(rt: &Arc<dyn Runtime>, options: ServerOptions) -> Echo {
    let (server, mut events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let echo = server.clone();
    let bystanders: Arc<Mutex<HashSet<SessionId>>> = Arc::default();
    let echoed = bystanders.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                ServerEvent::Message { session, message }
                    if echoed.lock().unwrap().contains(&session) =>
                {
                    let _ = echo.send_payload(session, message.payload.clone()).await;
                }
                other => {
                    let _ = tx.send(other);
                }
            }
        }
    });
    Echo {
        server,
        addr,
        events: rx,
        bystanders,
    }
}

impl Echo {
    /// Where a bystander connects.
    pub fn target(&self) -> Target {
        Target {
            addr: self.addr,
            bystanders: self.bystanders.clone(),
            interval: Duration::from_millis(5),
        }
    }

    /// Waits up to `ms` for an event that `pick` maps to `Some`, skipping
    /// the others.
    pub async fn wait_for<T>(
        &mut self,
        ms: u64,
        what: &str,
        mut pick: impl FnMut(ServerEvent) -> Option<T>,
    ) -> T {
        within(ms, what, async {
            loop {
                match self.events.recv().await {
                    Some(event) => {
                        if let Some(v) = pick(event) {
                            return v;
                        }
                    }
                    None => panic!("server events ended"),
                }
            }
        })
        .await
    }

    /// Waits for the core to report a connection closed without a session
    /// and returns its code.
    pub async fn connection_closed(&mut self) -> CloseCode {
        self.wait_for(3000, "ConnectionClosed on the server", |e| match e {
            ServerEvent::ConnectionClosed { code, .. } => Some(code),
            _ => None,
        })
        .await
    }

    /// Waits for `session` to lose its connection; returns the close code.
    pub async fn session_detached(&mut self, session: SessionId) -> CloseCode {
        self.wait_for(3000, "SessionDetached", |e| match e {
            ServerEvent::SessionDetached { session: s, code } if s == session => Some(code),
            _ => None,
        })
        .await
    }

    /// Waits for the session whose id is `hex` to open; returns it.
    pub async fn session_opened(&mut self, hex: &str) -> SessionId {
        self.wait_for(3000, "SessionOpened", |e| match e {
            ServerEvent::SessionOpened { session, .. } if session.to_hex() == hex => Some(session),
            _ => None,
        })
        .await
    }

    /// Every event that arrives within `ms`.
    pub async fn drain(&mut self, ms: u64) -> Vec<ServerEvent> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_millis(ms), async {
            while let Some(e) = self.events.recv().await {
                out.push(e);
            }
        })
        .await;
        out
    }
}

// The bystander.

/// Round-trip times of a bystander's echoes.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub messages: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// The bystander's p99 echo round trip must stay under this while the
/// hostile peers run: a server busy with them must not stall the others.
pub const LATENCY_BOUND: Duration = Duration::from_millis(500);

/// Runs `hostile` while a well-behaved client on the same server sends a
/// numbered message every [`Target::interval`] (at least 40, for as long as `hostile`
/// runs) and gets each echoed back: every one exactly once, in order, its
/// session never lost, and the p99 of the echo round trips under
/// [`LATENCY_BOUND`]. Prints the round-trip figures.
pub async fn with_bystander<F: Future>(
    rt: &Arc<dyn Runtime>,
    target: Target,
    hostile: F,
) -> F::Output {
    let (out, latency) = measured_bystander(rt, target, hostile).await;
    eprintln!(
        "bystander of {}: {} messages, echo round trip p50 {:?}, p99 {:?}, max {:?}",
        std::thread::current().name().unwrap_or("?"),
        latency.messages,
        latency.p50,
        latency.p99,
        latency.max
    );
    assert!(
        latency.p99 < LATENCY_BOUND,
        "bystander latency spike: {latency:?}"
    );
    out
}

/// [`with_bystander`] without the latency assertion: the output and the
/// figures.
pub async fn measured_bystander<F: Future>(
    rt: &Arc<dyn Runtime>,
    target: Target,
    hostile: F,
) -> (F::Output, Latency) {
    const MIN: u32 = 40;
    const MAX: u32 = 4000;
    let (client, mut events) = kitestring::connect(
        rt.clone(),
        &format!("ws://{}/ws", target.addr),
        ClientOptions::default(),
    )
    .unwrap();
    let session = within(3000, "bystander connected", async {
        loop {
            match events.next().await {
                Some(Event::Connected { session, .. }) => return session,
                Some(_) => {}
                None => panic!("bystander events ended"),
            }
        }
    })
    .await;
    target.bystanders.lock().unwrap().insert(session);

    // Echoes as they come, with the time each arrived.
    let received: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let lost = Arc::new(AtomicBool::new(false));
    let receiver = {
        let received = received.clone();
        let lost = lost.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Event::Message(m) => received
                        .lock()
                        .unwrap()
                        .push((m.decode::<u32>().unwrap(), Instant::now())),
                    Event::SessionLost { .. } => lost.store(true, Ordering::SeqCst),
                    _ => {}
                }
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let client = client.clone();
        let stop = stop.clone();
        let interval = target.interval;
        tokio::spawn(async move {
            let mut sent_at = Vec::new();
            let mut n = 0u32;
            while n < MIN || (!stop.load(Ordering::SeqCst) && n < MAX) {
                sent_at.push(Instant::now());
                client.send(&n).await.unwrap();
                n += 1;
                tokio::time::sleep(interval).await;
            }
            sent_at
        })
    };
    let out = hostile.await;
    stop.store(true, Ordering::SeqCst);
    let sent_at = within(5000, "bystander sends", sender).await.unwrap();
    let n = sent_at.len();
    within(10_000, "bystander echoes", async {
        while received.lock().unwrap().len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Nothing more arrives (no duplicate).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!lost.load(Ordering::SeqCst), "bystander lost its session");
    let received = std::mem::take(&mut *received.lock().unwrap());
    let got: Vec<u32> = received.iter().map(|&(v, _)| v).collect();
    assert_eq!(
        got,
        (0..n as u32).collect::<Vec<_>>(),
        "bystander lost, duplicated or reordered"
    );
    let mut rtts: Vec<Duration> = received
        .iter()
        .map(|&(v, at)| at.duration_since(sent_at[v as usize]))
        .collect();
    rtts.sort();
    let pick = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    let latency = Latency {
        messages: n,
        p50: pick(0.5),
        p99: pick(0.99),
        max: rtts[rtts.len() - 1],
    };
    client.close().await.ok();
    receiver.abort();
    (out, latency)
}

// HTTP and WebSocket by hand.

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An upgrade request for `addr` with `extra` header lines (each ending in
/// `\r\n`).
pub fn upgrade_request(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads an HTTP response head; returns the status, the head, and the
/// bytes read after it.
pub async fn read_response<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    within(3000, "HTTP response", async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                let rest = buf[end + 4..].to_vec();
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
                return (status, head, rest);
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            assert!(
                n > 0,
                "connection ended without an HTTP response (read {:?})",
                String::from_utf8_lossy(&buf)
            );
            assert!(buf.len() < 64 * 1024, "response head too long");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
}

/// Connects and upgrades (no `hello`): the stream and any bytes read past
/// the `101`.
pub async fn upgraded(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(upgrade_request(addr, "").as_bytes())
        .await
        .unwrap();
    let (status, head, rest) = read_response(&mut stream).await;
    assert_eq!(status, 101, "{head}");
    (stream, rest)
}

pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame header: `first` is FIN, RSV and opcode; `len` the declared
/// payload length; masked with [`MASK`] if `masked`.
pub fn frame_header(first: u8, len: u64, masked: bool) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    let mut h = vec![first];
    if len < 126 {
        h.push(m | len as u8);
    } else if len <= u64::from(u16::MAX) {
        h.push(m | 126);
        h.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        h.push(m | 127);
        h.extend_from_slice(&len.to_be_bytes());
    }
    if masked {
        h.extend_from_slice(&MASK);
    }
    h
}

/// A whole client frame, masked.
pub fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_header(first, payload.len() as u64, true);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

/// A masked text frame.
pub fn text(s: &str) -> Vec<u8> {
    frame(0x81, s.as_bytes())
}

/// A masked binary frame.
pub fn binary(b: &[u8]) -> Vec<u8> {
    frame(0x82, b)
}

/// A binary Kitestring message: the 6-byte header (`kind`, version 1, the
/// body's length) and `body`.
pub fn kitestring_binary(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![kind, 1];
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(body);
    b
}

/// Writes `bytes` in a task of its own, ignoring errors (the server may
/// close while it writes).
pub fn write_behind(mut writer: OwnedWriteHalf, bytes: Vec<u8>) {
    tokio::spawn(async move {
        let _ = writer.write_all(&bytes).await;
        // Keep the write half open until the test is done reading.
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
}

/// Sends `bytes` on a fresh upgraded connection and returns the close code
/// the server answers with, and the code the server reported to the core.
pub async fn close_code_for(echo: &mut Echo, bytes: Vec<u8>) -> (u16, CloseCode) {
    let (stream, rest) = upgraded(echo.addr).await;
    let (mut reader, writer) = stream.into_split();
    write_behind(writer, bytes);
    let code = read_close(&mut reader, rest).await;
    (code, echo.connection_closed().await)
}

/// Reads the next server frame (unmasked): its opcode and payload, or
/// `None` if the connection ended first. `buf` holds bytes already read.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Option<(u8, Vec<u8>)> {
    loop {
        if buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if len != usize::MAX && buf.len() >= at + len {
                let opcode = buf[0] & 0x0f;
                let payload = buf[at..at + len].to_vec();
                buf.drain(..at + len);
                return Some((opcode, payload));
            }
        }
        let mut chunk = [0u8; 16384];
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads server frames until a close frame; returns its code. Fails if the
/// connection ends without one. `buf`: bytes already read.
pub async fn read_close<R: tokio::io::AsyncRead + Unpin>(reader: &mut R, mut buf: Vec<u8>) -> u16 {
    within(3000, "close frame", async {
        loop {
            match read_frame(reader, &mut buf).await {
                Some((0x8, payload)) => {
                    assert!(payload.len() >= 2, "close frame without a code");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some(_) => {}
                None => panic!("the connection ended without a close frame"),
            }
        }
    })
    .await
}

/// Sends `request` on a fresh connection; the response's status and head
/// (header names in lower case).
pub async fn status_for(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let request = request.to_vec();
    // Written in a task of its own: the server may answer (and stop
    // reading) before a long request is all sent.
    tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let mut buf = Vec::new();
    let head = within(3000, "HTTP response", async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return String::from_utf8_lossy(&buf[..end + 4]).to_ascii_lowercase();
            }
            let mut chunk = [0u8; 4096];
            let n = reader.read(&mut chunk).await.unwrap_or(0);
            assert!(
                n > 0,
                "connection ended without an HTTP response (read {:?})",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    (status, head)
}

/// A `hello` as JSON text: `caps` padded to make it about `size` bytes.
pub fn hello(size: usize) -> String {
    let mut caps = Vec::new();
    let base = r#"{"t":"hello","versions":[1],"client":"c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1","codecs":["json"],"caps":[]}"#;
    let mut len = base.len();
    while len + 203 <= size {
        caps.push(format!("\"{}\"", "x".repeat(200)));
        len += 203;
    }
    format!(
        r#"{{"t":"hello","versions":[1],"client":"c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1","codecs":["json"],"caps":[{}]}}"#,
        caps.join(",")
    )
}

/// The first server frame on `stream` after `rest`: must be a text frame;
/// returns its text.
pub async fn first_text(stream: &mut TcpStream, mut rest: Vec<u8>) -> String {
    let (opcode, payload) = within(3000, "first frame", read_frame(stream, &mut rest))
        .await
        .expect("the connection ended before the first frame");
    assert_eq!(opcode, 0x1, "not a text frame: {payload:?}");
    String::from_utf8(payload).unwrap()
}

// A raw client speaking JSON envelopes.

/// A fresh client id: 32 hex digits, different for every call in the
/// process.
pub fn client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{:016x}{:016x}",
        u64::from(std::process::id()),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `hello` for a new session, JSON codec, with `caps`.
pub fn json_hello(caps: &[&str]) -> String {
    serde_json::json!({
        "t": "hello",
        "versions": [1],
        "client": client_id(),
        "codecs": ["json"],
        "caps": caps,
    })
    .to_string()
}

/// A server frame as the raw client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    /// A text frame, parsed.
    Json(Value),
    /// A binary frame.
    Binary(Vec<u8>),
    /// A close frame and its code.
    Close(u16),
    /// The connection ended without a close frame.
    Ended,
}

impl Got {
    /// The envelope, or a panic naming what came instead.
    pub fn json(self) -> Value {
        match self {
            Got::Json(v) => v,
            other => panic!("expected a JSON envelope, got {other:?}"),
        }
    }
}

/// A raw WebSocket client: an upgraded TCP stream, split.
pub struct Raw {
    pub reader: OwnedReadHalf,
    pub writer: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and upgrades; sends nothing else.
    pub async fn upgrade(addr: SocketAddr) -> Raw {
        let (stream, rest) = upgraded(addr).await;
        let (reader, writer) = stream.into_split();
        Raw {
            reader,
            writer,
            buf: rest,
        }
    }

    /// Connects, upgrades and sends `hello` as the first frame; returns
    /// the `welcome`.
    pub async fn open_with(addr: SocketAddr, hello: &str) -> (Raw, Value) {
        let mut raw = Raw::upgrade(addr).await;
        raw.send(hello).await;
        let welcome = raw.next(3000).await.json();
        assert_eq!(welcome["t"], "welcome", "{welcome}");
        (raw, welcome)
    }

    /// A new JSON session announcing `caps`; returns the `welcome`.
    pub async fn open(addr: SocketAddr, caps: &[&str]) -> (Raw, Value) {
        Raw::open_with(addr, &json_hello(caps)).await
    }

    /// Sends a text frame.
    pub async fn send(&mut self, s: &str) {
        self.writer.write_all(&text(s)).await.unwrap();
    }

    /// Sends raw bytes (frames already built).
    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.writer.write_all(b).await.unwrap();
    }

    /// The next data or close frame within `ms` (WebSocket pings and pongs
    /// are skipped); panics on timeout.
    pub async fn next(&mut self, ms: u64) -> Got {
        match self.try_next(ms).await {
            Some(g) => g,
            None => panic!("no frame from the server within {ms} ms"),
        }
    }

    /// The next data or close frame, or `None` if none came within `ms`.
    pub async fn try_next(&mut self, ms: u64) -> Option<Got> {
        let read = async {
            loop {
                match read_frame(&mut self.reader, &mut self.buf).await {
                    None => return Got::Ended,
                    Some((0x1, p)) => {
                        return Got::Json(serde_json::from_slice(&p).unwrap_or_else(|e| {
                            panic!(
                                "server text not JSON ({e}): {}",
                                String::from_utf8_lossy(&p)
                            )
                        }))
                    }
                    Some((0x2, p)) => return Got::Binary(p),
                    Some((0x8, p)) => {
                        assert!(p.len() >= 2, "close frame without a code");
                        return Got::Close(u16::from_be_bytes([p[0], p[1]]));
                    }
                    Some(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(ms), read)
            .await
            .ok()
    }

    /// Everything the server sends within `ms`, up to the end of the
    /// connection.
    pub async fn collect(&mut self, ms: u64) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_next(left.as_millis() as u64).await {
                None => return out,
                Some(g) => {
                    let end = matches!(g, Got::Ended);
                    out.push(g);
                    if end {
                        return out;
                    }
                }
            }
        }
    }

    /// Reads until a close frame and returns its code, skipping envelopes;
    /// fails if the connection ends without one or nothing comes within
    /// `ms`.
    pub async fn close_code(&mut self, ms: u64) -> u16 {
        within(ms, "close frame", async {
            loop {
                match self.next(ms).await {
                    Got::Close(code) => return code,
                    Got::Ended => panic!("the connection ended without a close frame"),
                    _ => {}
                }
            }
        })
        .await
    }

    /// Sends a `ping` and waits for its `pong`: the connection is open and
    /// the server reads it. Returns the envelopes that came before the
    /// pong.
    pub async fn ping(&mut self, nonce: u64) -> Vec<Value> {
        self.send(&format!(r#"{{"t":"ping","nonce":{nonce}}}"#))
            .await;
        let mut before = Vec::new();
        within(3000, "pong", async {
            loop {
                match self.next(3000).await {
                    Got::Json(v) if v["t"] == "pong" => {
                        assert_eq!(v["nonce"], nonce, "{v}");
                        return;
                    }
                    Got::Json(v) => before.push(v),
                    other => panic!("expected a pong, got {other:?}"),
                }
            }
        })
        .await;
        before
    }
}

/// A `msg` envelope (JSON codec) with `seq`, `id` and a JSON payload.
pub fn msg(seq: u64, id: u64, j: &Value) -> String {
    serde_json::json!({"t": "msg", "seq": seq, "id": id, "j": j}).to_string()
}

/// The `ack` a server envelope carries (a standalone `ack`, or a `msg`'s
/// piggybacked one), if any.
pub fn ack_of(v: &Value) -> Option<u64> {
    match v["t"].as_str() {
        Some("ack") | Some("msg") => v["ack"].as_u64(),
        Some("batch") => v["f"]
            .as_array()
            .and_then(|f| f.iter().filter_map(|m| m["ack"].as_u64()).max()),
        _ => None,
    }
}

/// The envelopes in a server frame: a `batch` flattened, anything else as
/// is.
pub fn envelopes(v: Value) -> Vec<Value> {
    if v["t"] == "batch" {
        v["f"].as_array().cloned().unwrap_or_default()
    } else {
        vec![v]
    }
}

/// Waits for the application to receive a message from `session`.
pub async fn message_from(echo: &mut Echo, session: SessionId) -> Received {
    echo.wait_for(
        3000,
        "a message delivered to the application",
        |e| match e {
            ServerEvent::Message {
                session: s,
                message,
            } if s == session => Some(message),
            _ => None,
        },
    )
    .await
}

/// Asserts `v` is a refusal of the message with id `id`, with `code`.
#[track_caller]
pub fn assert_refusal(v: &Value, id: u64, code: &str, what: &str) {
    assert_eq!(v["t"], "msg", "{what}: {v}");
    assert_eq!(v["op"], "refused", "{what}: {v}");
    assert_eq!(v["rs"], id, "{what}: {v}");
    assert_eq!(v["j"]["code"], code, "{what}: {v}");
    assert!(v["seq"].as_u64().is_some_and(|s| s >= 1), "{what}: {v}");
}

/// The server process's resident set, in bytes (Linux).
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}
