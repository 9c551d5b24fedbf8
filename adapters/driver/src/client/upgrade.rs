//! The client's side of the HTTP upgrade (RFC 6455, section 4.1), written
//! and read by hand: the request goes out as one buffer with the headers
//! the connector asks for (the `hello`, a token); the answer's head is read
//! into one bounded buffer (`head.rs`), parsed by `httparse` without
//! copying and checked as the RFC says a client must; the bytes the server
//! sent behind its `101` (frames it had queued for a resumed session) are
//! handed to tungstenite as the start of the WebSocket stream.
//!
//! tungstenite's own client handshake builds an `http::Request`, formats it
//! through `fmt`, and copies every header of the answer into a header map:
//! about thirty allocations per connection, where this makes five (the key
//! and the accept key, the buffer and its growth, the `welcome`).
//!
//! It owns the upgrade's bytes only: which headers go in is the
//! connector's choice, what an answer means for the session the core's. It
//! never reads or writes a WebSocket frame.

use std::io;
use std::time::Duration;

use async_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use async_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use async_tungstenite::WebSocketStream;
use kitestring_core::wire;

use crate::head::{self, has_token, HeadError, MAX_HEADERS};
use crate::runtime::BoxIo;
use crate::ws::Ws;

/// Why an upgrade did not open a WebSocket.
#[derive(Debug)]
pub(super) enum UpgradeError {
    /// The server (or something on the way) answered with another status
    /// than `101`.
    Status {
        /// The HTTP status.
        status: u16,
        /// The `Retry-After` header, in seconds, if present and a number.
        retry_after: Option<Duration>,
        /// Whether the answer carries [`wire::records::REFUSAL_HEADER`]: the
        /// Kitestring server itself refused, rather than a proxy.
        refusal: bool,
    },
    /// Writing the request or reading the answer failed.
    Io(io::Error),
    /// The answer is not a valid upgrade: what is wrong with it.
    Invalid(&'static str),
}

/// An upgrade request to write, and the accept key its answer must carry.
pub(super) struct Request {
    bytes: Vec<u8>,
    accept: String,
}

impl Request {
    /// The request for `target` (the path and query) on `host` (the URL's
    /// authority without user information), with `headers` added as they
    /// are. A header whose value is not a valid header value is left out.
    pub(super) fn new(target: &str, host: &str, headers: &[(&str, &[u8])]) -> Request {
        let key = generate_key();
        let accept = derive_accept_key(key.as_bytes());
        let target = if target.is_empty() { "/" } else { target };
        let extra: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
        let mut bytes = Vec::with_capacity(160 + target.len() + host.len() + extra);
        for part in [
            "GET ",
            target,
            " HTTP/1.1\r\nHost: ",
            host,
            "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
            &key,
            "\r\n",
        ] {
            bytes.extend_from_slice(part.as_bytes());
        }
        for (name, value) in headers {
            if !valid_value(value) {
                continue;
            }
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(b": ");
            bytes.extend_from_slice(value);
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"\r\n");
        Request { bytes, accept }
    }
}

/// Whether `value` may stand as a header value as `http` accepts one:
/// visible characters, spaces and tabs, no control character.
fn valid_value(value: &[u8]) -> bool {
    // Without an early exit, which vectorizes (a `hello` is a few hundred
    // bytes).
    value.iter().fold(true, |ok, &b| {
        ok & ((b == b'\t') | ((b >= 0x20) & (b != 0x7f)))
    })
}

/// Writes `request` on `io`, reads the answer, and opens the WebSocket
/// with `config`: returns it and the answer's
/// [`wire::WELCOME_HEADER`], if it has one.
pub(super) async fn upgrade(
    mut io: BoxIo,
    request: Request,
    config: WebSocketConfig,
) -> Result<(Ws, Option<String>), UpgradeError> {
    head::write_all(&mut io, &request.bytes)
        .await
        .map_err(UpgradeError::Io)?;
    // The request's buffer holds the answer.
    let mut buf = request.bytes;
    let end = match head::read_head(&mut io, &mut buf).await {
        Ok(end) => end,
        Err(HeadError::TooLarge) => {
            return Err(UpgradeError::Invalid("the answer's head is over 64 KiB"))
        }
        Err(HeadError::Closed(Some(e))) => return Err(UpgradeError::Io(e)),
        Err(HeadError::Closed(None)) => {
            return Err(UpgradeError::Invalid(
                "the connection closed before the answer to the upgrade",
            ))
        }
    };
    let welcome = check(&buf[..end], &request.accept)?;
    let ws = if buf.len() == end {
        WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await
    } else {
        buf.drain(..end);
        WebSocketStream::from_partially_read(io, buf, Role::Client, Some(config)).await
    };
    Ok((ws, welcome))
}

/// Checks the answer's `head` to a request whose key gives `accept`
/// (RFC 6455, section 4.1, the client's checks 1 to 6): returns its
/// [`wire::WELCOME_HEADER`], if it has one that is visible ASCII.
fn check(head: &[u8], accept: &str) -> Result<Option<String>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut answer = httparse::Response::new(&mut headers);
    match answer.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(UpgradeError::Invalid("the answer's head is incomplete"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpgradeError::Invalid("the answer has too many headers"))
        }
        Err(_) => return Err(UpgradeError::Invalid("the answer is not HTTP/1.1")),
    }
    if answer.version != Some(1) {
        return Err(UpgradeError::Invalid("the answer is not HTTP/1.1"));
    }
    let value = |name: &str| {
        answer
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let status = answer.code.unwrap_or(0);
    if status != 101 {
        let retry_after = value("retry-after")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(UpgradeError::Status {
            status,
            retry_after,
            refusal: value(wire::records::REFUSAL_HEADER).is_some(),
        });
    }
    if !value("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return Err(UpgradeError::Invalid(
            "no `Upgrade: websocket` in the answer",
        ));
    }
    if !value("connection").is_some_and(|v| has_token(v, "upgrade")) {
        return Err(UpgradeError::Invalid(
            "no `Connection: Upgrade` in the answer",
        ));
    }
    if value("sec-websocket-accept").map(<[u8]>::trim_ascii) != Some(accept.as_bytes()) {
        return Err(UpgradeError::Invalid(
            "the answer's Sec-WebSocket-Accept does not match the key",
        ));
    }
    // Neither was asked for: a server that chose one speaks something else.
    if value("sec-websocket-extensions").is_some() {
        return Err(UpgradeError::Invalid(
            "the answer chose an extension that was not offered",
        ));
    }
    if value("sec-websocket-protocol").is_some() {
        return Err(UpgradeError::Invalid(
            "the answer chose a subprotocol that was not offered",
        ));
    }
    Ok(value(wire::WELCOME_HEADER)
        .filter(|v| head::is_visible_ascii(v))
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use async_tungstenite::tungstenite::Message;
    use futures_io::{AsyncRead, AsyncWrite};
    use futures_util::{FutureExt, StreamExt};

    use super::*;

    /// A peer that answers with `answer`, `chunk` bytes per read (never
    /// waiting), and keeps what it is sent.
    struct Scripted {
        answer: Vec<u8>,
        at: usize,
        chunk: usize,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.chunk.min(buf.len()).min(self.answer.len() - self.at);
            buf[..n].copy_from_slice(&self.answer[self.at..self.at + n]);
            self.at += n;
            Poll::Ready(Ok(n))
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn the_frames_behind_the_101_are_the_streams_start_whatever_the_reads() {
        for chunk in [1, 5, 4096] {
            let request = Request::new("/", "h", &[("Kitestring-Hello", b"{}")]);
            let sent = request.bytes.clone();
            let mut answer = answer(&format!(
                "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\nKitestring-Welcome: w\r\n",
                request.accept
            ))
            .into_bytes();
            // Two unmasked server frames: binary "abc", text "d".
            answer.extend_from_slice(b"\x82\x03abc\x81\x01d");
            let written = Arc::new(Mutex::new(Vec::new()));
            let io = Scripted {
                answer,
                at: 0,
                chunk,
                written: written.clone(),
            };
            let config = crate::ws::websocket_config(1 << 20);
            let (mut ws, welcome) = upgrade(Box::new(io), request, config)
                .now_or_never()
                .expect("no waiting")
                .expect("upgraded");
            assert_eq!(welcome.as_deref(), Some("w"));
            assert_eq!(*written.lock().unwrap(), sent);
            let next = |ws: &mut Ws| ws.next().now_or_never().flatten().map(Result::unwrap);
            assert_eq!(next(&mut ws), Some(Message::binary(&b"abc"[..])), "{chunk}");
            assert_eq!(next(&mut ws), Some(Message::text("d")), "{chunk}");
        }
    }

    #[test]
    fn an_answer_cut_short_is_an_error_not_a_wait() {
        let request = Request::new("/", "h", &[]);
        let io = Scripted {
            answer: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: webs".to_vec(),
            at: 0,
            chunk: 8,
            written: Arc::default(),
        };
        let config = crate::ws::websocket_config(1 << 20);
        match upgrade(Box::new(io), request, config).now_or_never() {
            Some(Err(UpgradeError::Invalid(why))) => assert!(why.contains("closed"), "{why}"),
            other => panic!("{:?}", other.map(|r| r.map(|(_, w)| w))),
        }
    }

    /// The RFC's example key and its accept value.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    fn answer(lines: &str) -> String {
        format!("HTTP/1.1 101 Switching Protocols\r\n{lines}\r\n")
    }

    const GOOD: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
                        Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n";

    fn invalid(head: &str) -> &'static str {
        match check(head.as_bytes(), ACCEPT) {
            Err(UpgradeError::Invalid(why)) => why,
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn the_accept_key_is_the_rfcs() {
        assert_eq!(derive_accept_key(KEY.as_bytes()), ACCEPT);
    }

    #[test]
    fn a_valid_answer_gives_its_welcome() {
        assert_eq!(check(answer(GOOD).as_bytes(), ACCEPT).unwrap(), None);
        let with = answer(&format!(
            "{GOOD}Kitestring-Welcome: {{\"t\":\"welcome\"}}\r\n"
        ));
        assert_eq!(
            check(with.as_bytes(), ACCEPT).unwrap().as_deref(),
            Some("{\"t\":\"welcome\"}")
        );
        // Names in any case, tokens in lists.
        let lower = answer(
            "upgrade: WebSocket\r\nconnection: keep-alive, upgrade\r\n\
             sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n",
        );
        assert!(check(lower.as_bytes(), ACCEPT).is_ok());
        // A welcome that is not visible ASCII is not taken.
        let bad = answer(&format!("{GOOD}Kitestring-Welcome: caf\u{e9}\r\n"));
        assert_eq!(check(bad.as_bytes(), ACCEPT).unwrap(), None);
    }

    #[test]
    fn an_answer_missing_what_the_rfc_asks_for_is_refused() {
        let without = |name: &str| {
            answer(
                &GOOD
                    .split_inclusive("\r\n")
                    .filter(|l| !l.starts_with(name))
                    .collect::<String>(),
            )
        };
        assert!(invalid(&without("Upgrade")).contains("Upgrade"));
        assert!(invalid(&without("Connection")).contains("Connection"));
        assert!(invalid(&without("Sec-WebSocket-Accept")).contains("Accept"));
        let other_key = answer(&GOOD.replace("s3pPL", "AAAAA"));
        assert!(invalid(&other_key).contains("Accept"));
        assert!(invalid(&answer(&format!(
            "{GOOD}Sec-WebSocket-Extensions: permessage-deflate\r\n"
        )))
        .contains("extension"));
        assert!(
            invalid(&answer(&format!("{GOOD}Sec-WebSocket-Protocol: chat\r\n")))
                .contains("subprotocol")
        );
        assert!(invalid(&answer(GOOD).replace("HTTP/1.1", "HTTP/1.0")).contains("HTTP/1.1"));
        assert!(invalid("SSH-2.0-OpenSSH\r\n\r\n").contains("HTTP/1.1"));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert!(invalid(&answer(&format!("{GOOD}{many}"))).contains("too many"));
    }

    #[test]
    fn another_status_is_reported_with_its_retry_after_and_whose_it_is() {
        let refused = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\n\
                       Kitestring-Refusal: 1\r\nContent-Length: 0\r\n\r\n";
        match check(refused.as_bytes(), ACCEPT) {
            Err(UpgradeError::Status {
                status: 503,
                retry_after: Some(d),
                refusal: true,
            }) => assert_eq!(d, Duration::from_secs(7)),
            other => panic!("{other:?}"),
        }
        let proxy = "HTTP/1.1 200 OK\r\nRetry-After: soon\r\n\r\n";
        assert!(matches!(
            check(proxy.as_bytes(), ACCEPT),
            Err(UpgradeError::Status {
                status: 200,
                retry_after: None,
                refusal: false
            })
        ));
    }

    #[test]
    fn the_request_carries_the_upgrade_and_the_valid_headers() {
        let r = Request::new(
            "/ws?a=1",
            "example.com:8080",
            &[
                ("Kitestring-Hello", b"{\"t\":\"hello\"}"),
                ("X-Bad", b"a\r\nb"),
            ],
        );
        let text = String::from_utf8(r.bytes.clone()).unwrap();
        assert!(text.starts_with("GET /ws?a=1 HTTP/1.1\r\nHost: example.com:8080\r\n"));
        assert!(
            text.ends_with("Kitestring-Hello: {\"t\":\"hello\"}\r\n\r\n"),
            "{text}"
        );
        assert!(!text.contains("X-Bad"));
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(&r.bytes).unwrap().is_complete());
        let key = req
            .headers
            .iter()
            .find(|h| h.name == "Sec-WebSocket-Key")
            .unwrap()
            .value;
        assert_eq!(derive_accept_key(key), r.accept);
        assert!(Request::new("", "h", &[])
            .bytes
            .starts_with(b"GET / HTTP/1.1\r\n"));
    }
}
