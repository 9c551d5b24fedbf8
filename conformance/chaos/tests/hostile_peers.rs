//! Peers that speak raw TCP to the server and break the rules: messages
//! over the limit, text that is not UTF-8, bad framing, requests that are
//! not (good) WebSocket upgrades, oversized headers, foreign origins, a
//! `hello` frame sent before the `101`. Each test checks the exact close
//! code the peer receives in a close frame (and that the server reports the
//! same code) or the exact HTTP status, within a few seconds, while a
//! well-behaved client on the same server keeps exchanging messages without
//! loss, duplicate, reordering or latency spike.
//!
//! Everything runs on tokio with plain `tokio::net::TcpStream`s on
//! loopback; frames are written by hand (helpers in `hostile/mod.rs`,
//! shared with `hostile_protocol.rs`, `hostile_flood.rs` and
//! `hostile_memory.rs`). Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod hostile;

use std::sync::Arc;

use kitestring::{CloseCode, ServerEvent, ServerOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use hostile::*;

const MIB: u64 = 1024 * 1024;

/// A single binary frame declaring 2 MiB (the limit is 1 MiB): 1009 as soon
/// as the header is read. Only 4 KiB of the body is ever sent, so a server
/// that read the body before checking would never answer.
#[test]
fn oversized_frame_is_closed_with_1009() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
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
        with_bystander(&rt, echo.target(), async {
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
        with_bystander(&rt, echo.target(), async {
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
        with_bystander(&rt, echo.target(), async {
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

/// Requests that are not WebSocket upgrades, or malformed ones, get a
/// status, never a silent drop.
#[test]
fn bad_upgrade_requests_get_an_http_status() {
    run(|rt| async move {
        let echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, echo.target(), async {
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
        with_bystander(&rt, echo.target(), async {
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

/// A `hello` in the upgrade header that joins a room: the `welcome` in
/// the `101` lists the feature `join`, and the room's `sub` is the first
/// frame, there as soon as the `101` is (the server writes them together;
/// the driver's unit test of `take_queued` checks what goes with it).
#[test]
fn the_joins_of_a_hello_header_are_answered_in_the_101s_write() {
    run(|rt| async move {
        let echo = echo_server(&rt, ServerOptions::default());
        let addr = echo.addr;
        with_bystander(&rt, echo.target(), async {
            let hello = format!(
                r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"caps":["stream"],"join":["lobby"]}}"#,
                client_id()
            );
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = upgrade_request(addr, &format!("Kitestring-Hello: {hello}\r\n"));
            stream.write_all(request.as_bytes()).await.unwrap();
            let (status, head, rest) = read_response(&mut stream).await;
            assert_eq!(status, 101, "{head}");
            let welcome = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with("kitestring-welcome:")
                        .then(|| l["kitestring-welcome:".len()..].trim())
                })
                .unwrap_or_else(|| panic!("no welcome: {head}"));
            assert!(welcome.contains(r#""join""#), "{welcome}");
            // A whole text frame, unmasked, under 126 bytes, read with the
            // head.
            assert!(rest.len() >= 2, "nothing came with the 101: {rest:?}");
            assert_eq!((rest[0], rest[1] & 0x80), (0x81, 0));
            let len = usize::from(rest[1] & 0x7f);
            assert!(len < 126 && rest.len() >= 2 + len, "{rest:?}");
            let sub = std::str::from_utf8(&rest[2..2 + len]).unwrap();
            assert!(
                sub.starts_with(r#"{"t":"sub""#) && sub.contains(r#""r":"lobby""#),
                "the first frame: {sub}"
            );
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
        with_bystander(&rt, echo.target(), async {
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
            auth: Some(kitestring::Authenticator::sync(
                move |_req: &kitestring::AuthRequest| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok(None)
                },
            )),
            ..ServerOptions::default()
        };
        let echo = echo_server(&rt, options);
        let addr = echo.addr;
        with_bystander(&rt, echo.target(), async {
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
        with_bystander(&rt, echo.target(), async {
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
