//! HTTP by hand over real sockets on 127.0.0.1, for the tests.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The key of RFC 6455's example, and its accept value.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A `Kitestring-Hello` header line (PROTOCOL.md, section 4.1).
pub fn hello_header() -> String {
    format!(
        "Kitestring-Hello: {{\"t\":\"hello\",\"versions\":[1],\"client\":\"{}\",\"caps\":[],\"codecs\":[\"json\"]}}\r\n",
        "c1".repeat(16)
    )
}

/// An upgrade request for `path` with `extra` header lines.
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends `request` and reads the response head (and, for anything but a
/// `101`, the body up to `content-length`); the head's lines are
/// lower-cased except the status line. The socket stays open.
pub async fn exchange(addr: SocketAddr, request: &str) -> (Response, TcpStream) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response within 10 s")
            .expect("read");
        assert!(n > 0, "connection closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let mut r = Response::parse(&head);
    if r.status == 101 {
        r.rest = buf[end..].to_vec();
    } else {
        let len: usize = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[end..].to_vec();
        while body.len() < len {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
                .await
                .expect("body within 10 s")
                .expect("read");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        r.body = String::from_utf8_lossy(&body).to_string();
    }
    (r, s)
}

/// A response head.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// (lower-case name, value)
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// After a `101`: the bytes read past the head (the WebSocket stream's
    /// start).
    pub rest: Vec<u8>,
}

impl Response {
    fn parse(head: &str) -> Response {
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Response {
            status,
            headers,
            body: String::new(),
            rest: Vec::new(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Serves `router` on 127.0.0.1 (with the peer's address as connect info).
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    addr
}

/// A plain HTTP request; the whole response.
pub async fn http(addr: SocketAddr, method: &str, path: &str, extra: &str, body: &str) -> Response {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    exchange(addr, &request).await.0
}

/// Reads server frames (unmasked, unfragmented) from `socket`, starting
/// with the bytes `rest` already holds, until a close frame or `count`
/// frames: (opcode, payload) each.
pub async fn read_frames(
    socket: &mut TcpStream,
    mut rest: Vec<u8>,
    count: usize,
) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while rest.len() >= 2 {
            let opcode = rest[0] & 0x0f;
            let (len, head) = match rest[1] & 0x7f {
                126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if rest.len() < head + len {
                break;
            }
            let payload = rest[head..head + len].to_vec();
            rest.drain(..head + len);
            frames.push((opcode, payload));
            if opcode == 8 || frames.len() == count {
                return frames;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut chunk))
            .await
            .expect("a frame within 10 s")
            .expect("read");
        if n == 0 {
            return frames;
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}

/// The three forms of mounting `server` at `/ws`, each beside a page at
/// `/`: a route, a tower service, a layer.
pub fn forms(server: &kitestring::ServerHandle) -> [(&'static str, axum::Router); 3] {
    use axum::routing::get;
    use kitestring_axum::{KitestringLayer, KitestringService};
    [
        (
            "route",
            axum::Router::new()
                .route("/", get(|| async { "a page" }))
                .route("/ws", kitestring_axum::route(server.clone())),
        ),
        (
            "service",
            axum::Router::new()
                .route("/", get(|| async { "a page" }))
                .route_service("/ws", KitestringService::new(server.clone())),
        ),
        (
            "layer",
            axum::Router::new()
                .route("/", get(|| async { "a page" }))
                .layer(KitestringLayer::new(server.clone(), "/ws")),
        ),
    ]
}
