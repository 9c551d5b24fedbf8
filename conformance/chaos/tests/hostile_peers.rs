//! Peers that speak raw TCP to the server and break the rules: messages
//! over the limit, text that is not UTF-8, bad framing, requests that are
//! not (good) WebSocket upgrades, oversized headers, foreign origins, a
//! `hello` frame sent before the `101`. Each test checks the exact close
//! code the peer receives in a close frame (and that the server reports the
//! same code) or the exact HTTP status, within a few seconds, while a
//! well-behaved client on the same server keeps exchanging messages without
//! loss or duplicate.
//!
//! Everything runs on tokio with plain `tokio::net::TcpStream`s on
//! loopback; frames are written by hand. Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{
    ClientOptions, CloseCode, DecodeExt, Event, Runtime, ServerEvent, ServerHandle, ServerOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Every test: a 2-worker tokio runtime and a 20 s limit on the whole.
fn run<F: Future<Output = ()>>(test: impl FnOnce(Arc<dyn Runtime>) -> F) {
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
async fn within<F: Future>(ms: u64, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(Duration::from_millis(ms), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {ms} ms: {what}"),
    }
}

/// A server on loopback that echoes every message back to its session;
/// every other event goes to the returned channel.
struct Echo {
    server: ServerHandle,
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<ServerEvent>,
}

fn echo_server(rt: &Arc<dyn Runtime>, options: ServerOptions) -> Echo {
    let (server, mut events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let echo = server.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                ServerEvent::Message { session, message } => {
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
    }
}

impl Echo {
    /// Waits for the core to report a connection closed without a session
    /// and returns its code.
    async fn connection_closed(&mut self) -> CloseCode {
        within(3000, "ConnectionClosed on the server", async {
            loop {
                match self.events.recv().await {
                    Some(ServerEvent::ConnectionClosed { code, .. }) => return code,
                    Some(_) => {}
                    None => panic!("server events ended"),
                }
            }
        })
        .await
    }
}

/// Runs `hostile` while a well-behaved client on the same server sends 40
/// numbered messages and gets each echoed back: every one exactly once, in
/// order, and its session never lost.
async fn with_bystander<F: Future>(
    rt: &Arc<dyn Runtime>,
    addr: SocketAddr,
    hostile: F,
) -> F::Output {
    const N: u32 = 40;
    let (client, mut events) = kitestring::connect(
        rt.clone(),
        &format!("ws://{addr}/ws"),
        ClientOptions::default(),
    )
    .unwrap();
    within(3000, "bystander connected", async {
        loop {
            match events.next().await {
                Some(Event::Connected { .. }) => return,
                Some(_) => {}
                None => panic!("bystander events ended"),
            }
        }
    })
    .await;
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            for n in 0..N {
                client.send(&n).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let out = hostile.await;
    within(5000, "bystander sends", sender).await.unwrap();
    let mut got = Vec::new();
    within(5000, "bystander echoes", async {
        while got.len() < N as usize {
            match events.next().await {
                Some(Event::Message(m)) => got.push(m.decode::<u32>().unwrap()),
                Some(Event::SessionLost { .. }) => panic!("bystander lost its session"),
                Some(_) => {}
                None => panic!("bystander events ended"),
            }
        }
    })
    .await;
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "bystander lost or duplicated"
    );
    // Nothing more arrives (no duplicate).
    let late = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            if let Some(Event::Message(m)) = events.next().await {
                return m.decode::<u32>().unwrap();
            }
        }
    })
    .await;
    assert!(late.is_err(), "bystander got a duplicate: {late:?}");
    client.close().await.ok();
    out
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// An upgrade request for `addr` with `extra` header lines (each ending in
/// `\r\n`).
fn upgrade_request(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads an HTTP response head; returns the status, the head, and the
/// bytes read after it.
async fn read_response(stream: &mut TcpStream) -> (u16, String, Vec<u8>) {
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
async fn upgraded(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(upgrade_request(addr, "").as_bytes())
        .await
        .unwrap();
    let (status, head, rest) = read_response(&mut stream).await;
    assert_eq!(status, 101, "{head}");
    (stream, rest)
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame header: `first` is FIN, RSV and opcode; `len` the declared
/// payload length; masked with [`MASK`] if `masked`.
fn frame_header(first: u8, len: u64, masked: bool) -> Vec<u8> {
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
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = frame_header(first, payload.len() as u64, true);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

/// Writes `bytes` in a task of its own, ignoring errors (the server may
/// close while it writes).
fn write_behind(mut writer: tokio::net::tcp::OwnedWriteHalf, bytes: Vec<u8>) {
    tokio::spawn(async move {
        let _ = writer.write_all(&bytes).await;
        // Keep the write half open until the test is done reading.
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
}

/// Sends `bytes` on a fresh upgraded connection and returns the close code
/// the server answers with, and the code the server reported to the core.
async fn close_code_for(echo: &mut Echo, bytes: Vec<u8>) -> (u16, CloseCode) {
    let (stream, rest) = upgraded(echo.addr).await;
    let (mut reader, writer) = stream.into_split();
    write_behind(writer, bytes);
    let code = read_close(&mut reader, rest).await;
    (code, echo.connection_closed().await)
}

/// Reads the next server frame (unmasked): its opcode and payload, or
/// `None` if the connection ended first. `buf` holds bytes already read.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
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
        let mut chunk = [0u8; 4096];
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads server frames until a close frame; returns its code. Fails if the
/// connection ends without one. `buf`: bytes already read.
async fn read_close<R: tokio::io::AsyncRead + Unpin>(reader: &mut R, mut buf: Vec<u8>) -> u16 {
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

const MIB: u64 = 1024 * 1024;

/// A single binary frame declaring 2 MiB (the limit is 1 MiB): 1009 as soon
/// as the header is read. Only 4 KiB of the body is ever sent, so a server
/// that read the body before checking would never answer.
#[test]
fn oversized_frame_is_closed_with_1009() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let mut bytes = frame_header(0x82, 2 * MIB, true);
            bytes.extend(std::iter::repeat_n(0u8, 4096));
            let (code, reported) = close_code_for(&mut echo, bytes).await;
            assert_eq!(code, 1009);
            assert_eq!(reported, CloseCode::MESSAGE_TOO_BIG);
            // 64 MiB declared, and a header declaring 2^63 bytes.
            for len in [64 * MIB, 1 << 63] {
                let mut bytes = frame_header(0x82, len, true);
                bytes.extend(std::iter::repeat_n(0u8, 4096));
                let (code, reported) = close_code_for(&mut echo, bytes).await;
                assert_eq!(code, 1009, "declared {len}");
                assert_eq!(reported, CloseCode::MESSAGE_TOO_BIG);
            }
        })
        .await;
        drop(echo.server);
    });
}

/// A 2 MiB message in 64 KiB continuation frames, each under the limit:
/// 1009 once the message passes it.
#[test]
fn oversized_fragmented_message_is_closed_with_1009() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let chunk = vec![7u8; 64 * 1024];
            let mut bytes = frame(0x02, &chunk);
            for i in 1..32 {
                let fin = if i == 31 { 0x80 } else { 0 };
                bytes.extend(frame(fin, &chunk));
            }
            let (code, reported) = close_code_for(&mut echo, bytes).await;
            assert_eq!(code, 1009);
            assert_eq!(reported, CloseCode::MESSAGE_TOO_BIG);
        })
        .await;
        drop(echo.server);
    });
}

/// A text message that is not UTF-8, whole or split across fragments: 1007.
#[test]
fn invalid_utf8_is_closed_with_1007() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let (code, reported) = close_code_for(&mut echo, frame(0x81, b"ok \xff\xfe")).await;
            assert_eq!(code, 1007);
            assert_eq!(reported, CloseCode::INVALID_PAYLOAD);
            // A fragment ending in the middle of a sequence is fine; the
            // next one that does not complete it is not.
            let mut bytes = frame(0x01, b"caf\xc3");
            bytes.extend(frame(0x80, b"\x28 no"));
            let (code, reported) = close_code_for(&mut echo, bytes).await;
            assert_eq!(code, 1007);
            assert_eq!(reported, CloseCode::INVALID_PAYLOAD);
        })
        .await;
        drop(echo.server);
    });
}

/// Framing violations: 1002 each.
#[test]
fn protocol_violations_are_closed_with_1002() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let unmasked = {
                let mut f = frame_header(0x82, 3, false);
                f.extend_from_slice(b"abc");
                f
            };
            let cases: Vec<(&str, Vec<u8>)> = vec![
                ("unmasked client frame", unmasked),
                ("RSV1 without an extension", frame(0xC2, b"abc")),
                ("RSV3 without an extension", frame(0x92, b"abc")),
                ("reserved data opcode", frame(0x83, b"abc")),
                ("reserved control opcode", frame(0x8B, b"")),
                ("control frame over 125 bytes", frame(0x89, &[1u8; 126])),
                ("fragmented control frame", frame(0x09, b"ping")),
                ("continuation without a start", frame(0x80, b"abc")),
                (
                    "data frame inside a fragmented message",
                    [frame(0x02, b"ab"), frame(0x82, b"cd")].concat(),
                ),
                ("close frame with a one-byte body", frame(0x88, &[3])),
            ];
            for (what, bytes) in cases {
                let (code, reported) = close_code_for(&mut echo, bytes).await;
                assert_eq!(code, 1002, "{what}");
                assert_eq!(reported, CloseCode::PROTOCOL_ERROR, "{what}");
            }
        })
        .await;
        drop(echo.server);
    });
}

// The HTTP upgrade.

/// Sends `request` on a fresh connection; the response's status and head
/// (header names in lower case).
async fn status_for(addr: SocketAddr, request: &[u8]) -> (u16, String) {
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
fn hello(size: usize) -> String {
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
async fn first_text(stream: &mut TcpStream, mut rest: Vec<u8>) -> String {
    let (opcode, payload) = within(3000, "first frame", read_frame(stream, &mut rest))
        .await
        .expect("the connection ended before the first frame");
    assert_eq!(opcode, 0x1, "not a text frame: {payload:?}");
    String::from_utf8(payload).unwrap()
}

/// Requests that are not WebSocket upgrades, or malformed ones, get a
/// status, never a silent drop.
#[test]
fn bad_upgrade_requests_get_an_http_status() {
    run(|rt| async move {
        let echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let plain = format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let (status, head) = status_for(addr, plain.as_bytes()).await;
            assert_eq!(status, 426, "{head}");
            assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
            let good = upgrade_request(addr, "");
            let cases = [
                (
                    "wrong version",
                    good.replace("Version: 13", "Version: 8"),
                    426,
                ),
                (
                    "no version",
                    good.replace("Sec-WebSocket-Version: 13\r\n", ""),
                    426,
                ),
                ("bad key", good.replace(KEY, "not a key at all"), 400),
                (
                    "key of 18 bytes",
                    good.replace(KEY, "AAAAAAAAAAAAAAAAAAAAAAAA"),
                    400,
                ),
                (
                    "no key",
                    good.replace(&format!("Sec-WebSocket-Key: {KEY}\r\n"), ""),
                    400,
                ),
                (
                    "no Host",
                    good.replace(&format!("Host: {addr}\r\n"), ""),
                    400,
                ),
                ("POST", good.replace("GET", "POST"), 405),
                ("not HTTP", "\x16\x03\x01\x02\x00\r\n\r\n".to_owned(), 400),
            ];
            for (what, request, expected) in cases {
                let (status, head) = status_for(addr, request.as_bytes()).await;
                assert_eq!(status, expected, "{what}: {head}");
                if expected == 426 && what.contains("version") {
                    assert!(head.contains("\r\nsec-websocket-version: 13\r\n"), "{head}");
                }
            }
        })
        .await;
        drop(echo.server);
    });
}

/// Headers over the HTTP limit (a 100 KB `Kitestring-Hello`) get 431; a
/// `hello` header over 4 KiB within the limit is not used: `101` without
/// `Kitestring-Welcome`, and the `hello` frame that follows opens the
/// session.
#[test]
fn oversized_headers_get_431_and_a_long_hello_header_falls_back_to_the_frame() {
    run(|rt| async move {
        let echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let huge = format!("Kitestring-Hello: {}\r\n", "x".repeat(100_000));
            let (status, head) = status_for(addr, upgrade_request(addr, &huge).as_bytes()).await;
            assert_eq!(status, 431, "{head}");

            let long = hello(5000);
            assert!(long.len() > 4096 && long.len() < 6000);
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = upgrade_request(addr, &format!("Kitestring-Hello: {long}\r\n"));
            stream.write_all(request.as_bytes()).await.unwrap();
            let (status, head, rest) = read_response(&mut stream).await;
            assert_eq!(status, 101, "{head}");
            assert!(
                !head.to_ascii_lowercase().contains("kitestring-welcome"),
                "a hello header over 4 KiB was used: {head}"
            );
            stream
                .write_all(&frame(0x81, long.as_bytes()))
                .await
                .unwrap();
            let welcome = first_text(&mut stream, rest).await;
            assert!(welcome.starts_with(r#"{"t":"welcome""#), "{welcome}");
        })
        .await;
        drop(echo.server);
    });
}

/// A client that writes its `hello` frame right behind the upgrade
/// request, in the same write, before the `101` came: the session opens.
#[test]
fn hello_frame_pipelined_behind_the_request_opens_the_session() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let mut bytes = upgrade_request(addr, "").into_bytes();
            bytes.extend(frame(0x81, hello(0).as_bytes()));
            stream.write_all(&bytes).await.unwrap();
            let (status, head, rest) = read_response(&mut stream).await;
            assert_eq!(status, 101, "{head}");
            let welcome = first_text(&mut stream, rest).await;
            assert!(welcome.starts_with(r#"{"t":"welcome""#), "{welcome}");
            within(3000, "SessionOpened", async {
                loop {
                    match echo.events.recv().await {
                        Some(ServerEvent::SessionOpened { .. }) => return,
                        Some(_) => {}
                        None => panic!("server events ended"),
                    }
                }
            })
            .await;
        })
        .await;
        drop(echo.server);
    });
}

/// The default origin policy: a page on another origin gets 403 before
/// the authenticator runs; the same host, and clients without `Origin`,
/// pass. An allow-list lets in exactly its origins (and clients without
/// `Origin`).
#[test]
fn foreign_origins_are_refused_with_403() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    run(|rt| async move {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let options = ServerOptions {
            auth: Some(Arc::new(move |_req: &kitestring::AuthRequest<'_>| {
                counted.fetch_add(1, Ordering::SeqCst);
                Ok(None)
            })),
            ..ServerOptions::default()
        };
        let echo = echo_server(&rt, options);
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let before = calls.load(Ordering::SeqCst);
            let evil = upgrade_request(addr, "Origin: https://evil.example\r\n");
            let (status, head) = status_for(addr, evil.as_bytes()).await;
            assert_eq!(status, 403, "{head}");
            let null = upgrade_request(addr, "Origin: null\r\n");
            assert_eq!(status_for(addr, null.as_bytes()).await.0, 403);
            let port = upgrade_request(
                addr,
                &format!("Origin: http://127.0.0.1:{}\r\n", addr.port() + 1),
            );
            assert_eq!(status_for(addr, port.as_bytes()).await.0, 403);
            assert_eq!(
                calls.load(Ordering::SeqCst),
                before,
                "the authenticator ran for a refused origin"
            );
            let same = upgrade_request(addr, &format!("Origin: http://{addr}\r\n"));
            assert_eq!(status_for(addr, same.as_bytes()).await.0, 101);
            let none = upgrade_request(addr, "");
            assert_eq!(status_for(addr, none.as_bytes()).await.0, 101);
        })
        .await;
        drop(echo.server);

        let options = ServerOptions {
            origins: kitestring::OriginPolicy::AllowList(
                vec!["https://app.example.com".to_owned()],
            ),
            ..ServerOptions::default()
        };
        let echo = echo_server(&rt, options);
        let addr = echo.addr;
        with_bystander(&rt, addr, async {
            let listed = upgrade_request(addr, "Origin: https://app.example.com\r\n");
            assert_eq!(status_for(addr, listed.as_bytes()).await.0, 101);
            let other = upgrade_request(addr, "Origin: https://evil.example\r\n");
            assert_eq!(status_for(addr, other.as_bytes()).await.0, 403);
            let same = upgrade_request(addr, &format!("Origin: http://{addr}\r\n"));
            assert_eq!(status_for(addr, same.as_bytes()).await.0, 403);
            let none = upgrade_request(addr, "");
            assert_eq!(status_for(addr, none.as_bytes()).await.0, 101);
        })
        .await;
        drop(echo.server);
    });
}
