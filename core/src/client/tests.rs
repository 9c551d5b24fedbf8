//! Unit tests of the client machine, through its public API.

use super::*;
use crate::wire::Welcome;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

fn client() -> Client {
    Client::new(ClientConfig::default(), ClientId([1; 16]), 9).unwrap()
}

fn drain(c: &mut Client) -> Vec<Output> {
    core::iter::from_fn(|| c.poll_output()).collect()
}

/// The transport the machine asks for next, reported open (no `welcome`
/// in the upgrade): what it writes next is its `hello` frame.
fn opened(c: &mut Client, now: Instant) -> TransportId {
    let t = drain(c)
        .into_iter()
        .find_map(|o| match o {
            Output::Connect(t) => Some(t),
            _ => None,
        })
        .unwrap();
    c.handle_transport_opened(now, t);
    t
}

/// The frames among `out`, decoded.
fn frames(out: &[Output]) -> Vec<Frame> {
    let limits = wire::Limits {
        max_message: 1 << 20,
        version: 1,
    };
    out.iter()
        .filter_map(|o| match o {
            Output::Transmit(_, t) => wire::decode(t.as_incoming(), &limits).ok(),
            _ => None,
        })
        .collect()
}

/// A `welcome` of a new session from a server with `features`, encoded.
fn welcome(features: &[&str]) -> wire::Transmit {
    let w = Frame::Welcome(Welcome {
        version: 1,
        codec: Codec::Json,
        session: SessionId([3; 16]),
        resumed: false,
        lost: None,
        delivered: 0,
        features: features.iter().map(|f| f.to_string().into()).collect(),
        ping_interval_ms: 30_000,
        pong_timeout_ms: 10_000,
        max_message: 1 << 20,
        key: None,
        recovered: false,
    });
    wire::encode(&w, Codec::Json, 1).unwrap()
}

fn open(c: &mut Client, now: Instant) -> TransportId {
    c.connect(now).unwrap();
    let t = opened(c, now);
    c.handle_message(now, t, welcome(&[]).as_incoming());
    assert_eq!(c.state(), &State::Open);
    drain(c);
    t
}

#[test]
fn stale_transport_inputs_are_ignored() {
    let mut c = client();
    let t = open(&mut c, Instant::ZERO);
    c.reconnect(Instant::from_secs(1)).unwrap();
    drain(&mut c);
    // The old transport reports closing and a frame: neither matters.
    c.handle_transport_closed(Instant::from_secs(1), t, None, "");
    c.handle_message(
        Instant::from_secs(1),
        t,
        Incoming::Text("{\"t\":\"ping\",\"nonce\":1}"),
    );
    assert_eq!(c.state(), &State::Connecting { attempt: 0 });
    assert!(drain(&mut c).is_empty());
}

#[test]
fn time_never_moves_backwards() {
    let mut c = client();
    open(&mut c, Instant::from_secs(100));
    c.handle_timeout(Instant::from_secs(5));
    let d = c.poll_timeout().unwrap();
    assert!(d.at >= Instant::from_secs(100));
}

#[test]
fn consecutive_decode_failures_trigger_resync() {
    let mut c = client();
    let t = open(&mut c, Instant::ZERO);
    for _ in 0..4 {
        c.handle_message(Instant::ZERO, t, Incoming::Text("not json"));
    }
    let events: Vec<_> = drain(&mut c)
        .into_iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::DecodeFailed(_)))
            .count(),
        4
    );
    assert_eq!(
        events.last(),
        Some(&Event::Resync),
        "resync on the fourth failure"
    );
    // A good frame in between resets the count.
    c.handle_message(Instant::ZERO, t, Incoming::Text("x"));
    c.handle_message(
        Instant::ZERO,
        t,
        Incoming::Text("{\"t\":\"pong\",\"nonce\":0}"),
    );
    for _ in 0..3 {
        c.handle_message(Instant::ZERO, t, Incoming::Text("x"));
    }
    assert!(!drain(&mut c).contains(&Output::Event(Event::Resync)));
}

/// An open client that takes messages of at most 1 KiB, and its
/// transport.
fn open_with_1_kib_limit() -> (Client, TransportId) {
    let mut c = Client::new(
        ClientConfig {
            max_message_size: 1024,
            ..ClientConfig::default()
        },
        ClientId([1; 16]),
        1,
    )
    .unwrap();
    let t = open(&mut c, Instant::ZERO);
    (c, t)
}

#[test]
fn oversized_frames_close_with_1009() {
    let (mut c, t) = open_with_1_kib_limit();
    let big = format!(
        "{{\"t\":\"ping\",\"nonce\":1,\"pad\":\"{}\"}}",
        "x".repeat(2000)
    );
    c.handle_message(Instant::ZERO, t, Incoming::Text(&big));
    let out = drain(&mut c);
    assert!(out.contains(&Output::Disconnect(
        t,
        CloseCode::MESSAGE_TOO_BIG,
        "message too big"
    )));
    assert!(matches!(c.state(), State::Reconnecting { .. }));
}

/// Found by the `client_machine` fuzz target once it ran with debug
/// assertions: after `close()`, an oversized frame still arriving on the
/// closing transport ended the connection as a failure and asked to
/// reconnect (`Closing -> Reconnecting`, not in the transition table).
/// Whatever ends the connection while closing only finishes the close.
#[test]
fn an_oversized_frame_while_closing_finishes_the_close() {
    let (mut c, t) = open_with_1_kib_limit();
    c.close(Instant::ZERO).unwrap();
    assert_eq!(c.state(), &State::Closing);
    drain(&mut c);
    let big = format!(
        "{{\"t\":\"ping\",\"nonce\":1,\"pad\":\"{}\"}}",
        "x".repeat(2000)
    );
    c.handle_message(Instant::ZERO, t, Incoming::Text(&big));
    let out = drain(&mut c);
    assert!(matches!(c.state(), State::Closed { .. }), "{:?}", c.state());
    assert!(
        !out.iter().any(|o| matches!(o, Output::Connect(_))),
        "a closing client reconnected: {out:?}"
    );
    assert_eq!(c.poll_timeout(), None, "nothing left to wait for");
}

#[test]
fn commands_check_the_state() {
    let mut c = client();
    assert_eq!(c.close(Instant::ZERO), Ok(()));
    assert_eq!(c.close(Instant::ZERO), Err(UsageError::AlreadyClosed));
    assert!(matches!(
        c.send(Instant::ZERO, Payload::binary(vec![1])),
        Err(SendError::NotConnected("closed"))
    ));
    c.connect(Instant::ZERO).unwrap();
    assert_eq!(
        c.connect(Instant::ZERO),
        Err(UsageError::AlreadyActive("connecting"))
    );
    assert_eq!(
        c.send_datagram(Instant::ZERO, Bytes::from_static(b"x")),
        Err(SendError::NotOpen)
    );
}

#[test]
fn stability_window_resets_the_attempt_counter() {
    let mut c = client();
    let t = open(&mut c, Instant::ZERO);
    c.handle_transport_closed(Instant::from_secs(1), t, None, "");
    assert_eq!(c.failures(), 1);
    // Retry, open, stay up past the window, drop again: counter starts over.
    c.handle_timeout(Instant::from_secs(3));
    let t2 = drain(&mut c)
        .into_iter()
        .find_map(|o| match o {
            Output::Connect(t) => Some(t),
            _ => None,
        })
        .unwrap();
    c.handle_transport_opened(Instant::from_secs(3), t2);
    let w = Frame::Welcome(Welcome {
        version: 1,
        codec: Codec::Json,
        session: SessionId([3; 16]),
        resumed: true,
        lost: None,
        delivered: 0,
        features: Vec::new().into(),
        ping_interval_ms: 30_000,
        pong_timeout_ms: 10_000,
        max_message: 1 << 20,
        key: None,
        recovered: false,
    });
    c.handle_message(
        Instant::from_secs(3),
        t2,
        wire::encode(&w, Codec::Json, 1).unwrap().as_incoming(),
    );
    c.handle_timeout(Instant::from_secs(14));
    c.handle_transport_closed(Instant::from_secs(15), t2, None, "");
    assert_eq!(c.failures(), 1);
}

#[test]
fn unsendable_reject_codes_are_never_echoed() {
    for code in [0u16, 1005, 1006, 1015, 2000, 5000] {
        let mut c = client();
        c.connect(Instant::ZERO).unwrap();
        let t = drain(&mut c)
            .into_iter()
            .find_map(|o| match o {
                Output::Connect(t) => Some(t),
                _ => None,
            })
            .unwrap();
        c.handle_transport_opened(Instant::ZERO, t);
        let reject = format!(r#"{{"t":"reject","versions":[1],"code":{code},"reason":"x"}}"#);
        c.handle_message(Instant::ZERO, t, Incoming::Text(&reject));
        for o in drain(&mut c) {
            if let Output::Disconnect(_, close, _) = o {
                assert!(close.is_sendable(), "reject {code} closes with {close:?}");
            }
        }
    }
}

#[test]
fn transition_table_rejects_nonsense() {
    assert!(!State::Open.can_become(&State::Handshaking { attempt: 0 }));
    assert!(!State::Disconnected.can_become(&State::Open));
    assert!(!State::Closing.can_become(&State::Open));
    assert!(State::Open.can_become(&State::Closing));
}

/// Joins asked for before the first connection ride in the `hello`: a
/// server that announces `join` takes them (acknowledged, no `join`
/// message; a refusal by id 0 is reported with the join's id), one that
/// does not gets them as messages after the `welcome`, and a connection
/// that ends before its `welcome` leaves them for the next `hello`.
#[test]
fn joins_waiting_for_a_new_session_ride_in_its_hello() {
    let joins_in = |frames: &[Frame]| -> Vec<String> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Msg(m) if m.kind == MsgKind::Join => m.room.as_deref().map(String::from),
                _ => None,
            })
            .collect()
    };
    // Connects and returns the transport and the `hello`'s `join`.
    let start = |c: &mut Client, now: Instant| {
        if c.state() == &State::Disconnected {
            c.connect(now).unwrap();
        }
        let t = opened(c, now);
        let join = frames(&drain(c))
            .into_iter()
            .find_map(|f| match f {
                Frame::Hello(h) => Some(h.join.iter().map(|r| r.to_string()).collect::<Vec<_>>()),
                _ => None,
            })
            .unwrap();
        (t, join)
    };
    let now = Instant::ZERO;

    // A server with `join`.
    let mut c = client();
    let lobby = c.join(now, "lobby").unwrap();
    let feed = c.join(now, "feed").unwrap();
    c.send(now, Payload::json(b"1".to_vec()).unwrap()).unwrap();
    let (t, join) = start(&mut c, now);
    assert_eq!(join, ["lobby", "feed"]);
    c.handle_message(now, t, welcome(&["join"]).as_incoming());
    let out = drain(&mut c);
    assert!(joins_in(&frames(&out)).is_empty(), "{out:?}");
    let acked: Vec<(MessageId, MessageId)> = out
        .iter()
        .filter_map(|o| match o {
            Output::Event(Event::Acked { first, last }) => Some((*first, *last)),
            _ => None,
        })
        .collect();
    assert_eq!(acked, [(lobby, lobby), (feed, feed)]);
    // The message queued behind the joins is the session's first.
    assert!(frames(&out)
        .iter()
        .any(|f| matches!(f, Frame::Msg(m) if m.seq == 1 && m.kind == MsgKind::Plain)));
    let refusal = r#"{"t":"msg","seq":1,"id":1,"op":"refused","rs":0,"r":"feed","j":{"op":"join","reason":"no","code":"forbidden"}}"#;
    c.handle_message(now, t, Incoming::Text(refusal));
    let refused: Vec<Option<MessageId>> = drain(&mut c)
        .iter()
        .filter_map(|o| match o {
            Output::Event(Event::Refused { id, .. }) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(refused, [Some(feed)]);
    assert!(c.rooms().eq(["lobby"]));

    // A server without it: the joins go as messages, in order, first.
    let mut c = client();
    c.join(now, "lobby").unwrap();
    let (t, join) = start(&mut c, now);
    assert_eq!(join, ["lobby"]);
    c.handle_message(now, t, welcome(&[]).as_incoming());
    assert_eq!(joins_in(&frames(&drain(&mut c))), ["lobby"]);

    // A connection that ends before its welcome: the next hello has them.
    let mut c = client();
    c.join(now, "lobby").unwrap();
    let (t, _) = start(&mut c, now);
    c.handle_transport_closed(now, t, None, "");
    let later = now + Duration::from_secs(60);
    c.handle_timeout(later);
    let (t, join) = start(&mut c, later);
    assert_eq!(join, ["lobby"]);
    c.handle_message(later, t, welcome(&["join"]).as_incoming());
    assert!(joins_in(&frames(&drain(&mut c))).is_empty());

    // Closed before its welcome: the join is reported never sent.
    let mut c = client();
    let lobby = c.join(now, "lobby").unwrap();
    let (t, _) = start(&mut c, now);
    c.close(now).unwrap();
    c.handle_transport_closed(now, t, Some(crate::close::CloseCode::NORMAL), "");
    let unsent: Vec<MessageId> = drain(&mut c)
        .into_iter()
        .filter_map(|o| match o {
            Output::Event(Event::SessionLost { unsent, .. }) => Some(unsent),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(unsent, [lobby]);
}

/// A resuming `hello` lists the rooms the client is in: a server that
/// finds the session lost and announces `join` joins them in the new
/// session, and no `join` message goes for them; without the feature
/// they are joined again with messages, first thing.
#[test]
fn a_resuming_hello_lists_the_rooms_for_a_lost_session() {
    for features in [&["join"][..], &[]] {
        let now = Instant::ZERO;
        let mut c = client();
        let t = open(&mut c, now);
        c.join(now, "lobby").unwrap();
        drain(&mut c);
        c.handle_transport_closed(now, t, None, "");
        let later = now + Duration::from_secs(60);
        c.handle_timeout(later);
        let t = opened(&mut c, later);
        let hello = frames(&drain(&mut c))
            .into_iter()
            .find_map(|f| match f {
                Frame::Hello(h) => Some(h),
                _ => None,
            })
            .unwrap();
        assert!(hello.resume.is_some());
        assert_eq!(hello.join, [std::sync::Arc::from("lobby")]);
        // Not resumed: the session is lost.
        c.handle_message(later, t, welcome(features).as_incoming());
        let out = drain(&mut c);
        assert!(out
            .iter()
            .any(|o| matches!(o, Output::Event(Event::SessionLost { .. }))));
        let joins: Vec<Frame> = frames(&out)
            .into_iter()
            .filter(|f| matches!(f, Frame::Msg(m) if m.kind == MsgKind::Join))
            .collect();
        assert_eq!(
            joins.len(),
            usize::from(features.is_empty()),
            "{features:?}: {joins:?}"
        );
        assert!(c.rooms().eq(["lobby"]));
    }
}
