//! Peers that complete the WebSocket upgrade by hand and then break the
//! Kitestring protocol: poison messages (alone, in a batch, detached
//! payloads that do not match), malformed `hello`s, resumes that cannot be
//! reconciled, duplicates and gaps, acknowledgments and replays beyond
//! anything sent, frames only a server sends, unknown frame types and runs
//! of undecodable frames. Each test checks the exact outcome PROTOCOL.md
//! documents (sections 2.1, 3, 3.3, 4, 5, 6, 8 and 9): the refusal by id
//! and its code, the held acknowledgments, the `reject` and its close
//! code, the `welcome`'s `lost`, the close code; while a well-behaved
//! Kitestring client on the same server keeps exchanging messages without
//! loss, duplicate, reordering or latency spike
//! (`hostile::with_bystander`). Floods are in `hostile_flood.rs`, memory
//! in `hostile_memory.rs`.
//!
//! The raw client (`hostile::Raw`) writes masked frames and parses the
//! server's JSON envelopes with serde_json. Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod hostile;

use std::time::{Duration, Instant};

use kitestring::{CloseCode, DecodeExt, MessageId, ServerEvent, ServerOptions, SessionId};
use serde_json::{json, Value};

use hostile::*;

/// The next `msg` from the server; standalone `ack`s before it must
/// acknowledge nothing (seq 1 is refused, so nothing may be).
async fn next_msg(raw: &mut Raw) -> Value {
    within(3000, "a msg from the server", async {
        loop {
            for v in envelopes(raw.next(3000).await.json()) {
                if v["t"] == "msg" {
                    return v;
                }
                assert_eq!(v["t"], "ack", "{v}");
                assert_eq!(v["ack"], 0, "acknowledged before the refusal: {v}");
            }
        }
    })
    .await
}

/// Poison messages (PROTOCOL.md 3.3 and 9): a numbered `msg` the server
/// can never accept is consumed and refused by id with `code: invalid`,
/// the next message is delivered, no acknowledgment covers the poison
/// message before the client acknowledged its refusal, and then both are
/// acknowledged at once; the connection stays open. Catches a server that
/// drops a poison message silently, stalls the stream behind it, closes
/// the connection, acknowledges it before the refusal (the client would
/// count it delivered), or overflows its stack on deep JSON.
#[test]
fn poison_messages_are_refused_by_id_and_the_stream_goes_on() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let long = "x".repeat(257);
            let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
            let cases: Vec<(&str, String)> = vec![
                (
                    "room name of 257 bytes",
                    format!(r#"{{"t":"msg","seq":1,"id":41,"j":1,"r":"{long}"}}"#),
                ),
                (
                    "room name of 0 bytes",
                    r#"{"t":"msg","seq":1,"id":41,"j":1,"r":""}"#.to_owned(),
                ),
                (
                    "unknown op",
                    r#"{"t":"msg","seq":1,"id":41,"j":1,"op":"dance","r":"a"}"#.to_owned(),
                ),
                (
                    "join without r",
                    r#"{"t":"msg","seq":1,"id":41,"j":null,"op":"join"}"#.to_owned(),
                ),
                (
                    "r a number",
                    r#"{"t":"msg","seq":1,"id":41,"j":1,"r":5}"#.to_owned(),
                ),
                (
                    "bad base64 in b",
                    r#"{"t":"msg","seq":1,"id":41,"b":"!!not base64"}"#.to_owned(),
                ),
                (
                    "JSON nested 200 000 levels deep",
                    format!(r#"{{"t":"msg","seq":1,"id":41,"j":{deep}}}"#),
                ),
                (
                    "rq and op together",
                    r#"{"t":"msg","seq":1,"id":41,"j":null,"rq":true,"op":"join","r":"a"}"#.to_owned(),
                ),
                (
                    "ts of the wrong type",
                    r#"{"t":"msg","seq":1,"id":41,"j":1,"ts":"yesterday"}"#.to_owned(),
                ),
                (
                    "presence from the client",
                    r#"{"t":"msg","seq":1,"id":41,"j":{"snapshot":true,"joined":[]},"op":"presence","r":"a"}"#
                        .to_owned(),
                ),
            ];
            for (what, bad) in cases {
                let (mut raw, welcome) = Raw::open(echo.addr, &[]).await;
                let session = echo
                    .session_opened(welcome["session"].as_str().unwrap())
                    .await;
                raw.send(&bad).await;
                raw.send(&msg(2, 42, &json!("fine"))).await;

                let refusal = next_msg(&mut raw).await;
                assert_refusal(&refusal, 41, "invalid", what);
                assert_eq!(refusal["j"]["op"], "message", "{what}: {refusal}");
                assert_eq!(ack_of(&refusal).unwrap_or(0), 0, "{what}: {refusal}");

                let m = message_from(&mut echo, session).await;
                assert_eq!((m.seq, m.id), (2, MessageId(42)), "{what}");
                assert_eq!(m.decode::<String>().unwrap(), "fine", "{what}");

                // The server acknowledges within 100 ms of a delivery: give
                // it three times that, and nothing may cover seq 1 yet.
                let early = raw.collect(300).await;
                for g in &early {
                    match g {
                        Got::Json(v) => assert_eq!(
                            ack_of(v).unwrap_or(0),
                            0,
                            "{what}: acknowledged before the refusal was: {v}"
                        ),
                        other => panic!("{what}: {other:?}"),
                    }
                }
                // Acknowledging the refusal releases both at once.
                raw.send(&format!(r#"{{"t":"ack","ack":{}}}"#, refusal["seq"]))
                    .await;
                let ack = raw.next(3000).await.json();
                assert_eq!(ack, json!({"t":"ack","ack":2}), "{what}");
                // Still open and reading.
                raw.ping(7).await;
            }
            let m = echo.server.metrics().await.unwrap();
            assert_eq!(m.counters.refused, 10);
        })
        .await;
        drop(echo.server);
    });
}

/// A poison message inside a `batch` (PROTOCOL.md 3 and 9): the batch is
/// handled as if its messages had come one by one, so its neighbours are
/// delivered in order and the bad ones refused by id. Catches a server
/// that drops or refuses a whole batch for one bad member.
#[test]
fn poison_messages_in_a_batch_are_refused_and_their_neighbours_delivered() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let (mut raw, welcome) = Raw::open(echo.addr, &["batch"]).await;
            let session = echo
                .session_opened(welcome["session"].as_str().unwrap())
                .await;
            let batch = json!({"t": "batch", "f": [
                {"t": "msg", "seq": 1, "id": 1, "j": 1},
                {"t": "msg", "seq": 2, "id": 2, "j": 1, "op": "nope", "r": "a"},
                {"t": "msg", "seq": 3, "id": 3, "j": 3},
                {"t": "msg", "seq": 4, "id": 4, "b": "!!"},
                {"t": "msg", "seq": 5, "id": 5, "j": 5},
            ]});
            raw.send(&batch.to_string()).await;

            let mut delivered = Vec::new();
            for _ in 0..3 {
                let m = message_from(&mut echo, session).await;
                delivered.push((m.seq, m.id.0, m.decode::<u64>().unwrap()));
            }
            assert_eq!(delivered, vec![(1, 1, 1), (3, 3, 3), (5, 5, 5)]);

            let mut refusals = Vec::new();
            let mut acks = Vec::new();
            while refusals.len() < 2 {
                for v in envelopes(raw.next(3000).await.json()) {
                    acks.extend(ack_of(&v));
                    if v["op"] == "refused" {
                        refusals.push(v);
                    }
                }
            }
            assert_refusal(&refusals[0], 2, "invalid", "op nope");
            assert_refusal(&refusals[1], 4, "invalid", "bad base64");
            for g in raw.collect(300).await {
                acks.extend(ack_of(&g.json()));
            }
            // Only seq 1 may be acknowledged before the refusal of seq 2 is.
            assert!(acks.iter().all(|&a| a <= 1), "{acks:?}");
            raw.send(&format!(r#"{{"t":"ack","ack":{}}}"#, refusals[1]["seq"]))
                .await;
            let ack = raw.next(3000).await.json();
            assert_eq!(ack, json!({"t":"ack","ack":5}));
            raw.ping(1).await;
        })
        .await;
        drop(echo.server);
    });
}

/// A MessagePack `hello` (kind 0x01): `{"t":"hello","versions":[1],
/// "client":<32 hex>}`, written by hand.
fn msgpack_hello() -> Vec<u8> {
    let mut body = vec![0x83];
    body.extend_from_slice(&[0xa1, b't', 0xa5]);
    body.extend_from_slice(b"hello");
    body.push(0xa8);
    body.extend_from_slice(b"versions");
    body.extend_from_slice(&[0x91, 0x01]);
    body.push(0xa6);
    body.extend_from_slice(b"client");
    body.extend_from_slice(&[0xd9, 32]);
    body.extend_from_slice(client_id().as_bytes());
    kitestring_binary(0x01, &body)
}

/// A first frame that is not a usable `hello` (PROTOCOL.md 4 and 9) gets
/// a `reject` with `reason: bad_hello` and code 4002 at once, then a close
/// frame with 4002. Catches a server that waits out the 10 s hello
/// timeout, closes without saying why, or takes a bad `hello` (too many
/// versions, a malformed client id, half a resume) as good.
#[test]
fn malformed_hellos_are_rejected_with_4002_at_once() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let versions = vec![1; 33];
            let hello = |fields: Value| {
                let mut h = json!({"t": "hello", "versions": [1], "client": client_id(), "codecs": ["json"]});
                for (k, v) in fields.as_object().unwrap() {
                    h[k] = v.clone();
                }
                text(&h.to_string())
            };
            // What the reject's `message` must name: the problem.
            let cases: Vec<(&str, Vec<u8>, &str)> = vec![
                ("33 versions", hello(json!({"versions": versions})), "versions"),
                (
                    "client of 31 hex digits",
                    hello(json!({"client": "0".repeat(31)})),
                    "client",
                ),
                (
                    "client of 33 hex digits",
                    hello(json!({"client": "0".repeat(33)})),
                    "client",
                ),
                ("client not hex", hello(json!({"client": "g".repeat(32)})), "client"),
                ("client a number", hello(json!({"client": 5})), "string"),
                ("no client", text(r#"{"t":"hello","versions":[1]}"#), "client"),
                (
                    "session without delivered",
                    hello(json!({"session": "5e".repeat(16)})),
                    "delivered",
                ),
                (
                    "delivered without session",
                    hello(json!({"delivered": 0})),
                    "session",
                ),
                ("a MessagePack hello", binary(&msgpack_hello()), "JSON"),
                ("an unknown frame type", text(r#"{"t":"mystery"}"#), "mystery"),
                ("a ping", text(r#"{"t":"ping","nonce":1}"#), "ping"),
                ("a msg", text(&msg(1, 1, &json!(1))), "msg"),
                ("not JSON", text("{not json"), "JSON"),
            ];
            for (what, first, names) in cases {
                let mut raw = Raw::upgrade(echo.addr).await;
                let start = Instant::now();
                raw.send_bytes(&first).await;
                let reject = match raw.next(2000).await {
                    Got::Json(v) => v,
                    other => panic!("{what}: expected a reject, got {other:?}"),
                };
                assert_eq!(reject["t"], "reject", "{what}: {reject}");
                assert_eq!(reject["reason"], "bad_hello", "{what}: {reject}");
                assert_eq!(reject["code"], 4002, "{what}: {reject}");
                assert!(
                    reject["message"].as_str().is_some_and(|m| m.contains(names)),
                    "{what}: the message should name {names:?}: {reject}"
                );
                assert_eq!(raw.next(2000).await, Got::Close(4002), "{what}");
                assert!(
                    start.elapsed() < Duration::from_secs(2),
                    "{what}: took {:?}",
                    start.elapsed()
                );
                let code = echo
                    .wait_for(2000, "Rejected", |e| match e {
                        ServerEvent::Rejected { code, reason, .. } => Some((code, reason)),
                        _ => None,
                    })
                    .await;
                assert_eq!(code, (CloseCode::BAD_HANDSHAKE, "bad_hello"), "{what}");
            }
        })
        .await;
        drop(echo.server);
    });
}

/// A `hello` resuming `session` (with its resume `key`) with `delivered`,
/// JSON codec.
fn resume_hello(client: &str, (session, key): &(String, String), delivered: u64) -> String {
    json!({
        "t": "hello", "versions": [1], "client": client, "codecs": ["json"],
        "session": session, "delivered": delivered, "key": key,
    })
    .to_string()
}

/// A session whose client received three messages from the application
/// and acknowledged two, then lost its TCP connection (no close frame):
/// its client id, and its session id and resume key.
async fn session_with_three_sent_two_acked(echo: &mut Echo) -> (String, (String, String)) {
    let client = client_id();
    let hello = json!({"t": "hello", "versions": [1], "client": client, "codecs": ["json"]});
    let (mut raw, welcome) = Raw::open_with(echo.addr, &hello.to_string()).await;
    let hex = welcome["session"].as_str().unwrap().to_owned();
    let key = welcome["key"].as_str().unwrap().to_owned();
    let session = echo.session_opened(&hex).await;
    for n in 0..3u64 {
        echo.server.send(session, &n).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        for v in envelopes(raw.next(3000).await.json()) {
            if v["t"] == "msg" {
                got.push((v["seq"].as_u64().unwrap(), v["j"].as_u64().unwrap()));
            }
        }
    }
    assert_eq!(got, vec![(1, 0), (2, 1), (3, 2)]);
    raw.send(r#"{"t":"ack","ack":2}"#).await;
    echo.wait_for(3000, "Acked", |e| match e {
        ServerEvent::Acked { session: s, .. } if s == session => Some(()),
        _ => None,
    })
    .await;
    drop(raw);
    echo.session_detached(session).await;
    (client, (hex, key))
}

/// Knowing a session's id (it is in logs and events) is not enough to take
/// the session over (PROTOCOL.md 6, resume keys): a resume without the key
/// from the welcome, or with another key, gets a new session as for an
/// unknown one, and the owner still resumes with the right key afterwards.
#[test]
fn a_resume_without_the_session_key_cannot_take_the_session_over() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let (client, (hex, key)) = session_with_three_sent_two_acked(&mut echo).await;
            let wrong = "0".repeat(32);
            for (what, attempt) in [
                ("no key", json!({"t": "hello", "versions": [1], "client": client, "codecs": ["json"], "session": hex, "delivered": 2}).to_string()),
                ("another key", resume_hello(&client, &(hex.clone(), wrong.clone()), 2)),
                ("the id as key", resume_hello(&client, &(hex.clone(), hex.clone()), 2)),
            ] {
                let (_raw, welcome) = Raw::open_with(echo.addr, &attempt).await;
                assert_eq!(welcome["resumed"], false, "{what}: {welcome}");
                assert_eq!(welcome["lost"], "unknown_session", "{what}: {welcome}");
                assert_ne!(welcome["session"], hex.as_str(), "{what}: {welcome}");
            }
            let (_raw, welcome) =
                Raw::open_with(echo.addr, &resume_hello(&client, &(hex.clone(), key), 2)).await;
            assert_eq!(welcome["resumed"], true, "{welcome}");
            assert_eq!(welcome["session"], hex.as_str(), "{welcome}");
        })
        .await;
        drop(echo.server);
    });
}

/// A resume whose `delivered` cannot be reconciled (PROTOCOL.md 6): below
/// what the client already acknowledged (those messages are gone) or above
/// the last `seq` sent gets a new session, `resumed: false`,
/// `lost: "inconsistent"`. Control: `delivered` at the acknowledged point
/// resumes and the unacknowledged message comes again. Catches a server
/// that resumes anyway (a stream that would stall or deliver twice) or
/// answers with the wrong reason.
#[test]
fn resumes_with_an_irreconcilable_delivered_are_inconsistent() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            for (what, delivered) in [("below the acknowledged", 1), ("above the sent", 5)] {
                let (client, hex) = session_with_three_sent_two_acked(&mut echo).await;
                let (mut raw, welcome) =
                    Raw::open_with(echo.addr, &resume_hello(&client, &hex, delivered)).await;
                assert_eq!(welcome["resumed"], false, "{what}: {welcome}");
                assert_eq!(welcome["lost"], "inconsistent", "{what}: {welcome}");
                assert_ne!(welcome["session"], hex.0.as_str(), "{what}: {welcome}");
                assert_eq!(welcome["delivered"], 0, "{what}: {welcome}");
                // The new session is empty: nothing of the old one comes.
                let after = raw.ping(1).await;
                assert!(after.is_empty(), "{what}: {after:?}");
            }
            let (client, hex) = session_with_three_sent_two_acked(&mut echo).await;
            let (mut raw, welcome) =
                Raw::open_with(echo.addr, &resume_hello(&client, &hex, 2)).await;
            assert_eq!(welcome["resumed"], true, "{welcome}");
            assert_eq!(welcome["session"], hex.0.as_str(), "{welcome}");
            let again = raw.next(3000).await.json();
            assert_eq!(
                (again["seq"].as_u64(), again["j"].as_u64()),
                (Some(3), Some(2))
            );
        })
        .await;
        drop(echo.server);
    });
}

/// Opens a JSON session and has the application send it `n` messages,
/// which the raw client reads (without acknowledging them).
async fn session_with_sent(echo: &mut Echo, n: u64) -> (Raw, SessionId) {
    let (mut raw, welcome) = Raw::open(echo.addr, &[]).await;
    let session = echo
        .session_opened(welcome["session"].as_str().unwrap())
        .await;
    for i in 0..n {
        echo.server.send(session, &i).await.unwrap();
    }
    let mut got = 0;
    while got < n {
        for v in envelopes(raw.next(3000).await.json()) {
            if v["t"] == "msg" {
                got += 1;
            }
        }
    }
    (raw, session)
}

/// Acknowledgments and replays beyond the last `seq` the server sent are
/// protocol errors (PROTOCOL.md 5): close 1002, and the session waits for a
/// resume. A standalone `ack`, an `ack` carried by a `msg`, and a `replay`
/// (`from = n` acknowledges `n - 1`) each count; at the last `seq` sent they
/// are fine. Catches a server that trusts an acknowledgment for messages it
/// never sent (it would release, or lose, what it still has to send).
#[test]
fn acknowledgments_and_replays_beyond_anything_sent_close_with_1002() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let cases = [
                (
                    "ack with nothing sent",
                    0,
                    r#"{"t":"ack","ack":1}"#.to_owned(),
                ),
                ("ack beyond", 2, r#"{"t":"ack","ack":3}"#.to_owned()),
                (
                    "ack in a msg beyond",
                    2,
                    r#"{"t":"msg","seq":1,"id":1,"ack":9,"j":1}"#.to_owned(),
                ),
                ("replay beyond", 2, r#"{"t":"replay","from":4}"#.to_owned()),
                (
                    "replay far beyond",
                    0,
                    r#"{"t":"replay","from":1000000}"#.to_owned(),
                ),
            ];
            for (what, sent, bad) in cases {
                let (mut raw, session) = session_with_sent(&mut echo, sent).await;
                // At the last seq sent: fine.
                raw.send(&format!(r#"{{"t":"ack","ack":{sent}}}"#)).await;
                raw.send(&format!(r#"{{"t":"replay","from":{}}}"#, sent + 1))
                    .await;
                raw.ping(1).await;
                raw.send(&bad).await;
                closed_with_1002(&mut raw, &mut echo, session, what).await;
            }
        })
        .await;
        drop(echo.server);
    });
}

/// The connection is closed with 1002 and the server reports the session
/// detached with the same code.
async fn closed_with_1002(raw: &mut Raw, echo: &mut Echo, session: SessionId, what: &str) {
    assert_eq!(raw.close_code(3000).await, 1002, "{what}");
    let code = echo.session_detached(session).await;
    assert_eq!(code, CloseCode::PROTOCOL_ERROR, "{what}");
}

/// Undecodable frames after the handshake (PROTOCOL.md 9): each is dropped
/// and counted (a `replay` with `from: 0` among them), the count restarts
/// at every good frame, and the fourth in a row closes the connection with
/// 1007. Catches a server that closes on the first bad frame, never closes
/// (a peer could send garbage forever), or counts non-consecutive ones.
#[test]
fn undecodable_frames_are_counted_and_more_than_three_in_a_row_close_with_1007() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let garbage: Vec<(&str, Vec<u8>)> = vec![
                ("replay from 0", text(r#"{"t":"replay","from":0}"#)),
                ("not JSON", text("{not json")),
                ("not an object", text("[1,2,3]")),
                ("ack without a number", text(r#"{"t":"ack","ack":"many"}"#)),
                (
                    "binary of unknown kind",
                    binary(&kitestring_binary(0x07, b"abc")),
                ),
                ("binary of another version", {
                    let mut b = kitestring_binary(0x02, b"abc");
                    b[1] = 9;
                    binary(&b)
                }),
                ("binary shorter than its header", binary(&[0x02, 1, 0])),
                ("binary whose length disagrees", {
                    let mut b = kitestring_binary(0x02, b"abc");
                    b[2] = 4;
                    binary(&b)
                }),
                (
                    "malformed MessagePack",
                    binary(&kitestring_binary(0x01, &[0xc1])),
                ),
            ];
            // One replay from 0: counted, and nothing else happens.
            let (mut raw, _) = Raw::open(echo.addr, &[]).await;
            let before = echo
                .server
                .metrics()
                .await
                .unwrap()
                .counters
                .traffic
                .decode_failures;
            raw.send_bytes(&garbage[0].1).await;
            raw.ping(1).await;
            let after = echo
                .server
                .metrics()
                .await
                .unwrap()
                .counters
                .traffic
                .decode_failures;
            assert_eq!(
                after - before,
                1,
                "a replay from 0 is one undecodable frame"
            );
            echo.wait_for(3000, "DecodeFailed", |e| match e {
                ServerEvent::DecodeFailed { .. } => Some(()),
                _ => None,
            })
            .await;

            // Three in a row, then a good frame, three more, a good frame:
            // still open. Every kind of garbage takes its turn.
            for (i, round) in garbage.chunks(3).enumerate() {
                let mut bytes = Vec::new();
                for (_, g) in round {
                    bytes.extend_from_slice(g);
                }
                raw.send_bytes(&bytes).await;
                raw.ping(10 + i as u64).await;
            }
            // Four in a row: 1007.
            let mut bytes = Vec::new();
            for (_, g) in garbage.iter().skip(1).take(4) {
                bytes.extend_from_slice(g);
            }
            raw.send_bytes(&bytes).await;
            assert_eq!(raw.close_code(3000).await, 1007);

            // Every kind on its own, four times in a row: 1007 each.
            for (what, g) in &garbage {
                let (mut raw, _) = Raw::open(echo.addr, &[]).await;
                raw.send_bytes(&g.repeat(3)).await;
                raw.ping(1).await;
                raw.send_bytes(&g.repeat(4)).await;
                assert_eq!(raw.close_code(3000).await, 1007, "{what}");
            }
        })
        .await;
        drop(echo.server);
    });
}

/// Every message the application receives from `session` within `ms`:
/// `(seq, id)`.
async fn delivered_within(echo: &mut Echo, session: SessionId, ms: u64) -> Vec<(u64, u64)> {
    echo.drain(ms)
        .await
        .into_iter()
        .filter_map(|e| match e {
            ServerEvent::Message {
                session: s,
                message,
            } if s == session => Some((message.seq, message.id.0)),
            _ => None,
        })
        .collect()
}

/// A client that sends duplicates and skips sequence numbers (PROTOCOL.md
/// 5): a duplicate is dropped and acknowledged at once, a gap drops every
/// frame until it closes and asks for a replay once per gap, so the
/// application gets each message exactly once and in order. Catches a
/// server that delivers a duplicate, delivers across a gap (out of order),
/// buffers out-of-order frames, or sends a replay per dropped frame.
#[test]
fn duplicates_and_gaps_are_never_delivered() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let (mut raw, welcome) = Raw::open(echo.addr, &[]).await;
            let session = echo
                .session_opened(welcome["session"].as_str().unwrap())
                .await;
            for _ in 0..3 {
                raw.send(&msg(1, 1, &json!(1))).await;
            }
            let m = message_from(&mut echo, session).await;
            assert_eq!((m.seq, m.id), (1, MessageId(1)));
            within(3000, "the duplicates acknowledged", async {
                while envelopes(raw.next(3000).await.json())
                    .iter()
                    .all(|v| ack_of(v) != Some(1))
                {}
            })
            .await;
            // Everything sent so far was read once the pong comes.
            raw.ping(1).await;
            assert_eq!(delivered_within(&mut echo, session, 200).await, vec![]);

            for seq in 5..=7 {
                raw.send(&msg(seq, seq, &json!(seq))).await;
            }
            let replay = within(3000, "a replay", async {
                loop {
                    let v = raw.next(3000).await.json();
                    if v["t"] == "replay" {
                        return v;
                    }
                }
            })
            .await;
            assert_eq!(replay, json!({"t":"replay","from":2}));
            let more = raw.ping(2).await;
            assert!(
                more.iter().all(|v| v["t"] != "replay"),
                "one replay per gap, not per frame: {more:?}"
            );
            assert_eq!(delivered_within(&mut echo, session, 200).await, vec![]);

            for seq in 2..=7 {
                raw.send(&msg(seq, seq, &json!(seq))).await;
            }
            // A duplicate of what was just delivered.
            raw.send(&msg(3, 3, &json!(3))).await;
            let mut got = Vec::new();
            for _ in 2..=7 {
                let m = message_from(&mut echo, session).await;
                got.push((m.seq, m.id.0));
            }
            assert_eq!(got, (2..=7).map(|s| (s, s)).collect::<Vec<_>>());
            raw.ping(3).await;
            assert_eq!(delivered_within(&mut echo, session, 200).await, vec![]);
        })
        .await;
        drop(echo.server);
    });
}

/// Frames only a server sends, and a second `hello`, from a client whose
/// session is open (PROTOCOL.md 3, 4.1 and 8): a protocol error, close
/// 1002. Catches a server that acts on a client's `welcome` or `goaway`,
/// or re-runs a handshake on an open session.
#[test]
fn server_only_frames_and_a_second_hello_close_with_1002() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let welcome = json!({
                "t": "welcome", "version": 1, "codec": "json", "session": client_id(),
                "resumed": false, "delivered": 0, "features": [], "ping_ms": 30000,
                "pong_ms": 10000, "max": 1048576,
            });
            let cases = [
                ("a second hello", json_hello(&[])),
                ("welcome", welcome.to_string()),
                (
                    "reject",
                    r#"{"t":"reject","code":4002,"reason":"bad_hello","message":"no","versions":[1]}"#
                        .to_owned(),
                ),
                ("goaway", r#"{"t":"goaway","code":1001}"#.to_owned()),
                ("reauth", r#"{"t":"reauth","within":1000}"#.to_owned()),
            ];
            for (what, frame) in cases {
                let (mut raw, welcome) = Raw::open(echo.addr, &[]).await;
                let session = echo
                    .session_opened(welcome["session"].as_str().unwrap())
                    .await;
                raw.send(&frame).await;
                closed_with_1002(&mut raw, &mut echo, session, what).await;
            }
        })
        .await;
        drop(echo.server);
    });
}

/// Unknown frame types in well-formed envelopes (PROTOCOL.md 3) are
/// ignored and never count as undecodable, however many come: a later
/// version may send them. Catches a server that closes a newer client
/// with 1007 for speaking a frame type it does not know.
#[test]
fn unknown_frame_types_are_ignored_not_undecodable() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let (mut raw, welcome) = Raw::open(echo.addr, &[]).await;
            let session = echo
                .session_opened(welcome["session"].as_str().unwrap())
                .await;
            let before = echo
                .server
                .metrics()
                .await
                .unwrap()
                .counters
                .traffic
                .decode_failures;
            let mut bytes = Vec::new();
            for n in 0..10 {
                bytes.extend(text(&format!(r#"{{"t":"mystery{n}","x":{n}}}"#)));
            }
            raw.send_bytes(&bytes).await;
            let before_pong = raw.ping(1).await;
            assert!(before_pong.is_empty(), "{before_pong:?}");
            let after = echo
                .server
                .metrics()
                .await
                .unwrap()
                .counters
                .traffic
                .decode_failures;
            assert_eq!(after, before, "unknown frame types counted as undecodable");
            raw.send(&msg(1, 1, &json!(1))).await;
            assert_eq!(message_from(&mut echo, session).await.seq, 1);
        })
        .await;
        drop(echo.server);
    });
}

/// Sends each `(what, bytes)` (a detached envelope with seq 1 and id 41,
/// and what follows it) on a fresh session that announced `detach`, then a
/// good message with seq 2: the envelope must be refused by id
/// (`invalid`), the message after it consumed with it, seq 2 delivered.
async fn detached_cases_are_refused(echo: &mut Echo, cases: Vec<(&str, Vec<u8>)>) {
    for (what, bytes) in cases {
        let (mut raw, welcome) = Raw::open(echo.addr, &["detach"]).await;
        let session = echo
            .session_opened(welcome["session"].as_str().unwrap())
            .await;
        raw.send_bytes(&bytes).await;
        raw.send(&msg(2, 42, &json!("fine"))).await;
        let refusal = next_msg(&mut raw).await;
        assert_refusal(&refusal, 41, "invalid", what);
        let m = message_from(echo, session).await;
        assert_eq!((m.seq, m.id), (2, MessageId(42)), "{what}");
        raw.send(&format!(r#"{{"t":"ack","ack":{}}}"#, refusal["seq"]))
            .await;
        // A text message eaten as a payload is not answered.
        let before_pong = raw.ping(1).await;
        assert!(
            before_pong
                .iter()
                .all(|v| v["t"] == "ack" && v["ack"].as_u64() <= Some(2)),
            "{what}: {before_pong:?}"
        );
    }
}

/// A `dj` detached payload that is not JSON (PROTOCOL.md 2.1 and 3.3): the
/// envelope is numbered, so it is refused by id (`invalid`) and the next
/// message is delivered. Catches a server that hands the application a
/// JSON payload that does not parse, or stalls the stream.
#[test]
fn a_detached_json_payload_that_is_not_json_is_refused_by_id() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let cases = vec![(
                "a dj payload that is not JSON",
                [
                    text(r#"{"t":"msg","seq":1,"id":41,"dj":5}"#),
                    binary(b"{not "),
                ]
                .concat(),
            )];
            detached_cases_are_refused(&mut echo, cases).await;
        })
        .await;
        drop(echo.server);
    });
}

/// Detached payloads that do not follow their envelope as announced
/// (PROTOCOL.md 2.1, 3.3 and 9): the next message is text, or binary of
/// another length. PROTOCOL.md 3.3 lists "a detached payload that does
/// not match" among the `invalid` refusals and section 9 says a `msg`
/// whose `seq` and `id` can be read is never just dropped; the server
/// drops the envelope instead (a `DecodeFailed` with `DetachedMismatch`),
/// so the good message after it meets a gap, is dropped too, and the
/// client gets `replay` from 1: its stream stalls on a message it can
/// only send again. Catches that.
#[test]
fn mismatched_detached_payloads_are_refused_by_id() {
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let cases = vec![
                (
                    "text after the envelope",
                    [
                        text(r#"{"t":"msg","seq":1,"id":41,"db":3}"#),
                        text(r#"{"t":"ping","nonce":99}"#),
                    ]
                    .concat(),
                ),
                (
                    "a payload of another length",
                    [
                        text(r#"{"t":"msg","seq":1,"id":41,"db":3}"#),
                        binary(b"12345"),
                    ]
                    .concat(),
                ),
            ];
            detached_cases_are_refused(&mut echo, cases).await;
        })
        .await;
        drop(echo.server);
    });
}
