//! The `hello` in the HTTP upgrade (PROTOCOL.md, section 4): a client core
//! and a server core that meet through the upgrade headers open a session
//! without any handshake frame, resume through them, and fall back to the
//! handshake frames whenever the header goes unanswered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kitestring_core::client::{Client, Event, FailReason, Output, State, TransportId};
use kitestring_core::close::CloseCode;
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::server::{ConnectionId, Server, ServerEvent, ServerOutput};
use kitestring_core::wire::{
    self, ClientId, Codec, Frame, Incoming, Limits, Payload, SessionId, Transmit,
};
use kitestring_core::Instant;

const LIMITS: Limits = Limits {
    max_message: 1 << 20,
    version: 1,
};

fn client(config: ClientConfig) -> Client {
    Client::new(config, ClientId([1; 16]), 7).unwrap()
}

fn server() -> Server {
    Server::new(ServerConfig::default()).unwrap()
}

fn json(n: u64) -> Payload {
    Payload::json(format!("{n}").into_bytes()).unwrap()
}

fn client_out(c: &mut Client) -> Vec<Output> {
    std::iter::from_fn(|| c.poll_output()).collect()
}

fn server_out(s: &mut Server) -> Vec<ServerOutput> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

/// The transport the client asks for next.
fn connect_output(outputs: &[Output]) -> TransportId {
    outputs
        .iter()
        .find_map(|o| match o {
            Output::Connect(t) => Some(*t),
            _ => None,
        })
        .expect("the client asked for a transport")
}

fn frames_to_server(outputs: &[Output]) -> Vec<Frame> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Transmit(_, t) => Some(wire::decode(t.as_incoming(), &LIMITS).unwrap()),
            _ => None,
        })
        .collect()
}

fn frames_to_client(outputs: &[ServerOutput], conn: ConnectionId) -> Vec<Frame> {
    outputs
        .iter()
        .filter_map(|o| match o {
            ServerOutput::Transmit(c, t) if *c == conn => {
                Some(wire::decode(t.as_incoming(), &LIMITS).unwrap())
            }
            _ => None,
        })
        .collect()
}

/// A client that asked for a transport, and that transport.
fn connecting(config: ClientConfig) -> (Client, TransportId) {
    let mut c = client(config);
    c.connect(Instant::ZERO).unwrap();
    let t = connect_output(&client_out(&mut c));
    (c, t)
}

/// The client's only frame out is a `hello`.
fn assert_hello_frame(c: &mut Client) {
    assert!(matches!(
        frames_to_server(&client_out(c)).as_slice(),
        [Frame::Hello(_)]
    ));
}

/// Carries every frame in both directions until neither side has more;
/// returns the client's events and the server's.
fn pump(
    c: &mut Client,
    t: TransportId,
    s: &mut Server,
    conn: ConnectionId,
    now: Instant,
) -> (Vec<Event>, Vec<ServerEvent>) {
    let (mut events, mut server_events) = (Vec::new(), Vec::new());
    loop {
        let mut moved = false;
        for o in client_out(c) {
            match o {
                Output::Transmit(_, m) => {
                    s.handle_message(now, conn, m.as_incoming());
                    moved = true;
                }
                Output::Event(e) => events.push(e),
                _ => {}
            }
        }
        for o in server_out(s) {
            match o {
                ServerOutput::Transmit(_, m) => {
                    c.handle_message(now, t, m.as_incoming());
                    moved = true;
                }
                ServerOutput::Event(e) => server_events.push(e),
                _ => {}
            }
        }
        if !moved {
            return (events, server_events);
        }
    }
}

/// Opens a connection through the upgrade headers; returns the transport,
/// the connection, and what the client emitted once the answer was in.
fn open_by_upgrade(
    c: &mut Client,
    s: &mut Server,
    now: Instant,
    fresh: u8,
) -> (TransportId, ConnectionId, Vec<Output>) {
    let t = connect_output(&client_out(c));
    let hello = c.upgrade_hello(t).expect("the hello goes in the upgrade");
    let (conn, answer) = s.handle_upgrade(now, None, SessionId([fresh; 16]), &hello);
    let answer = answer.expect("the server answers in the upgrade");
    c.handle_upgraded(now, t, Some(&answer));
    (t, conn, client_out(c))
}

#[test]
fn a_session_opens_without_a_handshake_frame() {
    let (mut c, mut s) = (client(ClientConfig::default()), server());
    c.connect(Instant::ZERO).unwrap();
    let (t, conn, after) = open_by_upgrade(&mut c, &mut s, Instant::ZERO, 2);
    assert_eq!(c.state(), &State::Open);
    assert!(
        frames_to_server(&after).is_empty(),
        "no hello frame after an answered upgrade"
    );
    let from_server = server_out(&mut s);
    assert!(
        frames_to_client(&from_server, conn).is_empty(),
        "the welcome went in the response, not as a frame"
    );
    let opened = from_server.iter().any(|o| {
        matches!(o, ServerOutput::Event(ServerEvent::SessionOpened { connection, resumed: false, .. }) if *connection == conn)
    });
    assert!(opened);
    assert_eq!(c.session(), s.session_of(conn));
    // The codec both prefer, and messages both ways.
    assert_eq!(c.codec(), Some(Codec::MsgPack));
    c.send(Instant::ZERO, json(1)).unwrap();
    s.send(Instant::ZERO, c.session().unwrap(), json(2))
        .unwrap();
    let (events, server_events) = pump(&mut c, t, &mut s, conn, Instant::ZERO);
    let got: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.payload.data().clone()),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![bytes::Bytes::from_static(b"2")]);
    let up = server_events.iter().any(
        |e| matches!(e, ServerEvent::Message { message, .. } if message.payload.data() == "1"),
    );
    assert!(up, "the client's message reached the server");
}

#[test]
fn a_resume_through_the_upgrade_retransmits_after_it() {
    let (mut c, mut s) = (client(ClientConfig::default()), server());
    c.connect(Instant::ZERO).unwrap();
    let (t, conn, _) = open_by_upgrade(&mut c, &mut s, Instant::ZERO, 2);
    server_out(&mut s);
    let session = c.session().unwrap();
    // Three messages the client never gets: the connection dies first.
    for n in 1..=3 {
        s.send(Instant::ZERO, session, json(n)).unwrap();
    }
    server_out(&mut s);
    let now = Instant::from_secs(1);
    s.handle_connection_closed(now, conn, None);
    c.handle_transport_closed(now, t, None, "");
    server_out(&mut s);
    // The backoff runs out; the next attempt resumes in the upgrade.
    let mut now = now;
    while !matches!(c.state(), State::Connecting { .. }) {
        now = c.poll_timeout().unwrap().at;
        c.handle_timeout(now);
    }
    let (t2, conn2, after) = open_by_upgrade(&mut c, &mut s, now, 3);
    assert!(after
        .iter()
        .any(|o| matches!(o, Output::Event(Event::Connected { resumed: true, .. }))));
    assert_eq!(c.session(), Some(session));
    // The retransmissions follow the 101 as frames.
    let out = server_out(&mut s);
    let resent: Vec<u64> = frames_to_client(&out, conn2)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Msg(m) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(resent, vec![1, 2, 3]);
    for o in out {
        if let ServerOutput::Transmit(_, m) = o {
            c.handle_message(now, t2, m.as_incoming());
        }
    }
    let delivered = client_out(&mut c)
        .into_iter()
        .filter(|o| matches!(o, Output::Event(Event::Message(_))))
        .count();
    assert_eq!(delivered, 3);
}

#[test]
fn an_unanswered_upgrade_hello_falls_back_to_the_frame_for_good() {
    let ((mut c, t), mut s) = (connecting(ClientConfig::default()), server());
    assert!(c.upgrade_hello(t).is_some());
    // A server that does not know the header: a plain 101.
    c.handle_upgraded(Instant::ZERO, t, None);
    assert_eq!(c.state(), &State::Handshaking { attempt: 0 });
    let out = client_out(&mut c);
    let frames = frames_to_server(&out);
    assert!(matches!(frames.as_slice(), [Frame::Hello(_)]), "{frames:?}");
    // The classic handshake completes.
    let conn = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    for o in out {
        if let Output::Transmit(_, m) = o {
            s.handle_message(Instant::ZERO, conn, m.as_incoming());
        }
    }
    pump(&mut c, t, &mut s, conn, Instant::ZERO);
    assert_eq!(c.state(), &State::Open);
    // Later connections of this client do not offer it again.
    c.reconnect(Instant::from_secs(1)).unwrap();
    let t2 = connect_output(&client_out(&mut c));
    assert_eq!(c.upgrade_hello(t2), None);
}

#[test]
fn the_upgrade_hello_can_be_turned_off() {
    let (mut c, t) = connecting(ClientConfig {
        hello_in_upgrade: false,
        ..ClientConfig::default()
    });
    assert_eq!(c.upgrade_hello(t), None);
    // Only the transport being opened gets one, too.
    let (mut c, t) = connecting(ClientConfig::default());
    assert_eq!(c.upgrade_hello(TransportId(t.0 + 1)), None);
}

#[test]
fn an_answer_to_a_hello_never_offered_is_ignored() {
    let (mut c, t) = connecting(ClientConfig {
        hello_in_upgrade: false,
        ..ClientConfig::default()
    });
    c.handle_upgraded(Instant::ZERO, t, Some("{\"t\":\"welcome\"}"));
    assert_eq!(c.state(), &State::Handshaking { attempt: 0 });
    assert_hello_frame(&mut c);
}

#[test]
fn an_undecodable_answer_drops_the_connection() {
    let (mut c, t) = connecting(ClientConfig::default());
    c.upgrade_hello(t).unwrap();
    c.handle_upgraded(Instant::ZERO, t, Some("not json"));
    let out = client_out(&mut c);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Output::Disconnect(tr, CloseCode::PROTOCOL_ERROR, _) if *tr == t
        )),
        "{out:?}"
    );
    assert!(matches!(c.state(), State::Reconnecting { .. }));
}

#[test]
fn a_reject_goes_in_the_response_and_the_close_follows() {
    let ((mut c, t), mut s) = (connecting(ClientConfig::default()), server());
    let hello = c.upgrade_hello(t).unwrap();
    let hello = hello.replace("\"versions\":[1]", "\"versions\":[99]");
    let (conn, answer) = s.handle_upgrade(Instant::ZERO, None, SessionId([2; 16]), &hello);
    let answer = answer.unwrap();
    match wire::decode(Incoming::Text(&answer), &LIMITS).unwrap() {
        Frame::Reject(r) => assert_eq!(r.code, CloseCode::UNSUPPORTED_VERSION.0),
        other => panic!("expected a reject, got {other:?}"),
    }
    let out = server_out(&mut s);
    assert!(frames_to_client(&out, conn).is_empty());
    assert!(out.iter().any(|o| matches!(
        o,
        ServerOutput::Disconnect(c, CloseCode::UNSUPPORTED_VERSION, _) if *c == conn
    )));
    assert_eq!(s.session_count(), 0);
    c.handle_upgraded(Instant::ZERO, t, Some(&answer));
    assert!(matches!(
        c.state(),
        State::Failed {
            reason: FailReason::UnsupportedVersion { .. }
        }
    ));
}

#[test]
fn an_undecodable_upgrade_hello_leaves_the_first_frame_to_say_hello() {
    let (mut c, mut s) = (client(ClientConfig::default()), server());
    let (conn, answer) = s.handle_upgrade(Instant::ZERO, None, SessionId([2; 16]), "{nonsense");
    assert_eq!(answer, None);
    assert_eq!(s.session_of(conn), None);
    server_out(&mut s);
    // The client saw no answer, so its hello comes as a frame.
    c.connect(Instant::ZERO).unwrap();
    let t = connect_output(&client_out(&mut c));
    c.upgrade_hello(t).unwrap();
    c.handle_upgraded(Instant::ZERO, t, None);
    pump(&mut c, t, &mut s, conn, Instant::ZERO);
    assert_eq!(c.state(), &State::Open);
    assert_eq!(c.session(), s.session_of(conn));
}

#[test]
fn headers_stay_printable_ascii_and_decode_to_the_same_hello() {
    let (mut c, t) = connecting(ClientConfig {
        capabilities: vec!["café".into(), "🪁".into(), "del\u{7f}".into()],
        ..ClientConfig::default()
    });
    let hello = c.upgrade_hello(t).unwrap();
    assert!(hello.bytes().all(|b| (0x20..0x7f).contains(&b)), "{hello}");
    match wire::decode(Incoming::Text(&hello), &LIMITS).unwrap() {
        Frame::Hello(h) => {
            for cap in ["café", "🪁", "del\u{7f}"] {
                assert!(h.caps.iter().any(|c| c == cap), "{:?}", h.caps);
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_long_hello_goes_as_a_frame() {
    // With the client's own five, the 32 a hello may carry.
    let caps = (0..27).map(|i| format!("{i:0>200}")).collect();
    let (mut c, t) = connecting(ClientConfig {
        capabilities: caps,
        ..ClientConfig::default()
    });
    assert_eq!(c.upgrade_hello(t), None);
    c.handle_upgraded(Instant::ZERO, t, None);
    assert_hello_frame(&mut c);
}

#[test]
fn the_encoder_output_is_text_json() {
    // The header helpers assume the handshake frames encode as JSON text.
    let (mut c, t) = connecting(ClientConfig::default());
    c.handle_upgraded(Instant::ZERO, t, None);
    let out = client_out(&mut c);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Transmit(_, Transmit::Text(_)))));
}

// ---- the `hello` in the URL, and refusals in-band (PROTOCOL.md, 4.2, 1) ----

/// Opens a connection with the `hello` in the request's URL: the server's
/// answer is its first frame. Returns the transport, the connection, and
/// the server's outputs up to then.
fn open_by_url(
    c: &mut Client,
    s: &mut Server,
    now: Instant,
    fresh: u8,
) -> (TransportId, ConnectionId, Vec<ServerOutput>) {
    let t = connect_output(&client_out(c));
    let hello = c.url_hello(t).expect("the hello goes in the URL");
    let conn = s.handle_request_hello(now, None, SessionId([fresh; 16]), &hello);
    c.handle_transport_opened(now, t);
    assert!(
        frames_to_server(&client_out(c)).is_empty(),
        "no hello frame when the hello went in the URL"
    );
    (t, conn, server_out(s))
}

#[test]
fn a_hello_in_the_url_is_answered_by_the_first_frame_and_resumes() {
    let (mut c, mut s) = (client(ClientConfig::default()), server());
    c.connect(Instant::ZERO).unwrap();
    let (t, conn, out) = open_by_url(&mut c, &mut s, Instant::ZERO, 2);
    let frames = frames_to_client(&out, conn);
    assert!(
        matches!(frames.first(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );
    for o in out {
        if let ServerOutput::Transmit(_, m) = o {
            c.handle_message(Instant::ZERO, t, m.as_incoming());
        }
    }
    assert_eq!(c.state(), &State::Open);
    c.send(Instant::ZERO, json(1)).unwrap();
    pump(&mut c, t, &mut s, conn, Instant::ZERO);
    // The connection drops; the next one resumes through the URL too.
    s.handle_connection_closed(Instant::from_secs(1), conn, None);
    c.handle_transport_closed(Instant::from_secs(1), t, None, "");
    c.reconnect(Instant::from_secs(1)).unwrap();
    let (t2, conn2, out) = open_by_url(&mut c, &mut s, Instant::from_secs(1), 3);
    for o in out {
        if let ServerOutput::Transmit(_, m) = o {
            c.handle_message(Instant::from_secs(1), t2, m.as_incoming());
        }
    }
    let (events, _) = pump(&mut c, t2, &mut s, conn2, Instant::from_secs(1));
    let before: Vec<Event> = client_out(&mut c)
        .into_iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(c.state(), &State::Open);
    assert!(
        s.session(c.session().unwrap()).is_some(),
        "the session was resumed: {events:?} {before:?}"
    );
    assert_eq!(c.stats().resumes, 1);
}

#[test]
fn an_unanswered_url_hello_falls_back_to_the_frame() {
    // A server that does not know the parameter waits for a hello frame
    // and closes with 4002; the next attempt sends the frame.
    let (mut c, t) = connecting(ClientConfig::default());
    assert!(c.url_hello(t).is_some());
    c.handle_transport_opened(Instant::ZERO, t);
    assert!(frames_to_server(&client_out(&mut c)).is_empty());
    c.handle_transport_closed(
        Instant::from_secs(10),
        t,
        Some(CloseCode::BAD_HANDSHAKE),
        "",
    );
    c.reconnect(Instant::from_secs(11)).unwrap();
    let t2 = connect_output(&client_out(&mut c));
    assert_eq!(c.url_hello(t2), None, "the URL is not tried again");
    c.handle_transport_opened(Instant::from_secs(11), t2);
    assert_hello_frame(&mut c);
    // The connect timeout has the same effect.
    let (mut c, t) = connecting(ClientConfig::default());
    c.url_hello(t).unwrap();
    c.handle_transport_opened(Instant::ZERO, t);
    c.handle_timeout(Instant::from_secs(10));
    c.reconnect(Instant::from_secs(20)).unwrap();
    let t2 = connect_output(&client_out(&mut c));
    assert_eq!(c.url_hello(t2), None);
    // A connection that merely dropped keeps the URL.
    let (mut c, t) = connecting(ClientConfig::default());
    c.url_hello(t).unwrap();
    c.handle_transport_opened(Instant::ZERO, t);
    c.handle_transport_closed(Instant::ZERO, t, None, "");
    c.reconnect(Instant::from_secs(1)).unwrap();
    let t2 = connect_output(&client_out(&mut c));
    assert!(c.url_hello(t2).is_some());
}

#[test]
fn refusals_in_band_reach_the_client() {
    use kitestring_core::server::UpgradeRefusal;
    let cases = [
        (UpgradeRefusal::Forbidden, "forbidden"),
        (UpgradeRefusal::Origin, "forbidden"),
        (UpgradeRefusal::Unauthorized, "unauthorized"),
        (
            UpgradeRefusal::TryLater {
                retry_after: std::time::Duration::from_secs(30),
            },
            "later",
        ),
    ];
    for (refusal, expect) in cases {
        let ((mut c, t), mut s) = (connecting(ClientConfig::default()), server());
        c.url_hello(t).unwrap();
        let (conn, answer) = s.handle_refused_upgrade(Instant::ZERO, refusal, false);
        assert_eq!(answer, None);
        c.handle_transport_opened(Instant::ZERO, t);
        let out = server_out(&mut s);
        assert!(
            out.iter().any(
                |o| matches!(o, ServerOutput::Disconnect(id, code, _) if *id == conn && *code == refusal.code())
            ),
            "{out:?}"
        );
        for o in out {
            if let ServerOutput::Transmit(_, m) = o {
                c.handle_message(Instant::ZERO, t, m.as_incoming());
            }
        }
        match (expect, c.state()) {
            ("forbidden", State::Failed { reason }) => assert_eq!(reason, &FailReason::Forbidden),
            ("unauthorized", State::Failed { reason }) => {
                assert_eq!(reason, &FailReason::Unauthorized)
            }
            ("later", State::Reconnecting { at, .. }) => {
                assert!(*at >= Instant::from_secs(30), "waits out the hint: {at:?}")
            }
            (_, other) => panic!("{refusal:?}: {other:?}"),
        }
    }
    // A `hello` sent as a first frame, refused before it runs.
    let ((mut c, t), mut s) = (connecting(ClientConfig::default()), server());
    let conn = s.handle_connection(Instant::ZERO, None, SessionId([9; 16]));
    c.handle_transport_opened(Instant::ZERO, t);
    let _ = client_out(&mut c);
    let later = UpgradeRefusal::TryLater {
        retry_after: std::time::Duration::from_secs(30),
    };
    s.refuse_hello(Instant::ZERO, conn, later);
    let out = server_out(&mut s);
    assert!(out.iter().any(
        |o| matches!(o, ServerOutput::Disconnect(id, code, _) if *id == conn && code.0 == 4429)
    ));
    for o in out {
        if let ServerOutput::Transmit(_, m) = o {
            c.handle_message(Instant::ZERO, t, m.as_incoming());
        }
    }
    match c.state() {
        State::Reconnecting { at, .. } => assert!(*at >= Instant::from_secs(30), "{at:?}"),
        other => panic!("{other:?}"),
    }
    // Once open, a connection is not refused that way.
    let mut s = server();
    let conn = s.handle_connection(Instant::ZERO, None, SessionId([9; 16]));
    let (mut c, t) = connecting(ClientConfig::default());
    c.handle_transport_opened(Instant::ZERO, t);
    for o in client_out(&mut c) {
        if let Output::Transmit(_, m) = o {
            s.handle_message(Instant::ZERO, conn, m.as_incoming());
        }
    }
    assert!(server_out(&mut s)
        .iter()
        .any(|o| matches!(o, ServerOutput::Event(ServerEvent::SessionOpened { .. }))));
    s.refuse_hello(Instant::ZERO, conn, later);
    assert!(
        server_out(&mut s).is_empty(),
        "an open connection is left alone"
    );

    // In the upgrade: the reject is the 101's answer.
    let mut s = server();
    let (_, answer) = s.handle_refused_upgrade(Instant::ZERO, UpgradeRefusal::Unauthorized, true);
    assert!(answer.unwrap().contains("\"code\":4401"));
}
