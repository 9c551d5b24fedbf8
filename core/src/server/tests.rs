//! Unit tests of the server machine: through its public API, and where
//! a test says so, its internals (the deadline heap).

use super::*;
use std::sync::Arc;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use crate::close::CloseCode;
use crate::config::ServerConfig;
use crate::link::Received;
use crate::reliable::{MessageId, SendError};
use crate::rooms::Refusal;
use crate::time::Instant;
use crate::wire::{
    self, ClientId, Codec, Frame, Incoming, Limits, Msg, MsgKind, Payload, Reject, ResumeKey,
    SessionId, Transmit, Welcome,
};

/// The session table says what it says: each move, one by one.
#[test]
fn session_transition_table() {
    let a = SessionState::Attached(ConnectionId(1));
    let b = SessionState::Attached(ConnectionId(2));
    let d = SessionState::Detached {
        code: CloseCode::ABNORMAL,
        expires_at: Instant::from_secs(5),
    };
    assert!(
        a.can_become(&b),
        "a resume takes over from a half-open connection"
    );
    assert!(
        !a.can_become(&a),
        "attached to the connection it already has"
    );
    assert!(a.can_become(&d));
    assert!(d.can_become(&a), "resumed");
    assert!(!d.can_become(&d), "detached twice");
    assert_eq!(a.connection(), Some(ConnectionId(1)));
    assert_eq!(d.connection(), None);
    assert_eq!((a.name(), d.name()), ("attached", "detached"));
}

/// A session's life through the public view: attached, detached with
/// the code that ended its connection, attached to the resuming one,
/// and gone when the client closes with 1000.
#[test]
fn a_session_is_attached_detached_resumed_and_ended() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let now = Instant::ZERO;
    let c1 = s.handle_connection(now, None, SessionId([1; 16]));
    s.handle_message(now, c1, Incoming::Text(&hello(&[1], &["json"])));
    let welcome = welcome_of(&drain(&mut s)).unwrap();
    let id = welcome.session;
    assert_eq!(s.session(id).unwrap().state, SessionState::Attached(c1));
    s.handle_connection_closed(now, c1, None);
    let state = s.session(id).unwrap().state;
    let grace = s.config().session_grace;
    assert_eq!(
        state,
        SessionState::Detached {
            code: CloseCode::ABNORMAL,
            expires_at: now + grace
        }
    );
    let c2 = s.handle_connection(now, None, SessionId([2; 16]));
    let resume = format!(
        r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":0,"key":"{}"}}"#,
        ClientId([2; 16]).to_hex(),
        id.to_hex(),
        welcome.key.unwrap().to_hex()
    );
    s.handle_message(now, c2, Incoming::Text(&resume));
    assert!(welcome_of(&drain(&mut s)).unwrap().resumed);
    assert_eq!(s.session(id).unwrap().state, SessionState::Attached(c2));
    s.handle_connection_closed(now, c2, Some(CloseCode::NORMAL));
    assert!(s.session(id).is_none());
}

fn hello(versions: &[u8], codecs: &[&str]) -> String {
    format!(
        "{{\"t\":\"hello\",\"versions\":{versions:?},\"client\":\"{}\",\"codecs\":{codecs:?}}}",
        ClientId([2; 16]).to_hex()
    )
}

fn drain(s: &mut Server) -> Vec<ServerOutput> {
    core::iter::from_fn(|| s.poll_output()).collect()
}

fn welcome_of(out: &[ServerOutput]) -> Option<Welcome> {
    out.iter().find_map(|o| match o {
        ServerOutput::Transmit(_, t) => match wire::decode(
            t.as_incoming(),
            &Limits {
                max_message: 1 << 20,
                version: 1,
            },
        ) {
            Ok(Frame::Welcome(w)) => Some(w),
            _ => None,
        },
        _ => None,
    })
}

/// A broadcast of a large payload to members that take detached
/// payloads sends each its own small envelope and the one shared
/// payload, never a copy; a member that did not announce `detach` gets
/// the payload inside its envelope.
#[test]
fn a_large_broadcast_shares_one_payload_among_its_members() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let mut members = Vec::new();
    for (i, caps) in [r#"["detach"]"#, r#"["batch","detach"]"#, "[]"]
        .iter()
        .enumerate()
    {
        let session = SessionId([i as u8 + 1; 16]);
        let c = s.handle_connection(Instant::ZERO, None, session);
        let hello = format!(
            "{{\"t\":\"hello\",\"versions\":[1],\"client\":\"{}\",\"codecs\":[\"msgpack\"],\"caps\":{caps}}}",
            ClientId([i as u8 + 1; 16]).to_hex()
        );
        s.handle_message(Instant::ZERO, c, Incoming::Text(&hello));
        assert!(welcome_of(&drain(&mut s)).is_some());
        s.join(Instant::ZERO, session, "big").unwrap();
        members.push(c);
    }
    drain(&mut s);
    let payload = Payload::binary(vec![3u8; 16 * 1024]);
    assert_eq!(
        s.broadcast(Instant::ZERO, "big", payload.clone(), None),
        Ok(3)
    );
    let sent: Vec<(ConnectionId, Transmit)> = drain(&mut s)
        .into_iter()
        .filter_map(|o| match o {
            ServerOutput::Transmit(c, t) => Some((c, t)),
            _ => None,
        })
        .collect();
    for (i, c) in members.iter().enumerate() {
        let mine: Vec<&Transmit> = sent
            .iter()
            .filter(|(x, _)| x == c)
            .map(|(_, t)| t)
            .collect();
        let shared = mine
            .iter()
            .filter(|t| t.data().as_ptr() == payload.data().as_ptr())
            .count();
        if i < 2 {
            assert_eq!(mine.len(), 2, "member {i}: an envelope and the payload");
            assert!(mine[0].len() < 100);
            assert_eq!(shared, 1, "member {i} got a copy");
        } else {
            assert_eq!(mine.len(), 1, "member {i}: one message");
            assert!(mine[0].len() > 16 * 1024);
            assert_eq!(shared, 0);
        }
    }
}

#[test]
fn client_codec_preference_wins() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(
        Instant::ZERO,
        c,
        Incoming::Text(&hello(&[1], &["json", "msgpack"])),
    );
    assert_eq!(welcome_of(&drain(&mut s)).unwrap().codec, Codec::Json);
    let c = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    s.handle_message(
        Instant::ZERO,
        c,
        Incoming::Text(&hello(&[1], &["cbor", "msgpack"])),
    );
    assert_eq!(welcome_of(&drain(&mut s)).unwrap().codec, Codec::MsgPack);
}

#[test]
fn the_negotiated_codec_is_known_per_session() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["json"])));
    let session = s.session_of(c).unwrap();
    assert_eq!(s.session_codec(session), Some(Codec::Json));
    s.handle_connection_closed(Instant::ZERO, c, None);
    assert_eq!(s.session_codec(session), None, "detached");
}

#[test]
fn no_common_version_or_codec_is_rejected() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[7, 9], &["json"])));
    let out = drain(&mut s);
    assert!(out.contains(&ServerOutput::Disconnect(
        c,
        CloseCode::UNSUPPORTED_VERSION,
        "unsupported_version"
    )));
    let c = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["cbor"])));
    let out = drain(&mut s);
    assert!(out.contains(&ServerOutput::Disconnect(
        c,
        CloseCode::UNSUPPORTED_CODEC,
        "unsupported_codec"
    )));
    assert_eq!(s.session_count(), 0);
}

#[test]
fn silence_before_hello_and_after_open_is_detected() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let quiet = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    let c = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["json"])));
    drain(&mut s);
    s.handle_timeout(Instant::from_secs(10));
    assert!(drain(&mut s).contains(&ServerOutput::Disconnect(
        quiet,
        CloseCode::BAD_HANDSHAKE,
        "no hello in time"
    )));
    // 45 s idle, then 1 s grace.
    s.handle_timeout(Instant::from_secs(45));
    assert_eq!(s.connection_count(), 1);
    s.handle_timeout(Instant::from_secs(46));
    let out = drain(&mut s);
    assert!(out.contains(&ServerOutput::Disconnect(
        c,
        CloseCode::HEARTBEAT_TIMEOUT,
        "heartbeat timeout"
    )));
    assert_eq!(
        s.session_count(),
        1,
        "the session waits out its grace period"
    );
    s.handle_timeout(Instant::from_secs(106));
    assert_eq!(s.session_count(), 0);
}

fn frames_of(out: &[ServerOutput]) -> Vec<Frame> {
    let limits = Limits {
        max_message: 1 << 20,
        version: 1,
    };
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Transmit(_, t) => wire::decode(t.as_incoming(), &limits).ok(),
            _ => None,
        })
        .collect()
}

fn reject_of(out: &[ServerOutput]) -> Option<Reject> {
    frames_of(out).into_iter().find_map(|f| match f {
        Frame::Reject(r) => Some(r),
        _ => None,
    })
}

/// Anything but a usable hello first is answered at once with a
/// `reject` naming the problem, then closed with 4002: never left to the
/// hello timeout.
#[test]
fn a_first_frame_that_is_not_a_usable_hello_is_rejected_at_once() {
    let client = ClientId([2; 16]).to_hex();
    let cases = [
        r#"{"t":"ping","nonce":1}"#.to_owned(),
        r#"{"t":"mystery"}"#.to_owned(),
        "{not json".to_owned(),
        format!(
            r#"{{"t":"hello","versions":[{}],"client":"{client}"}}"#,
            ["1"; 33].join(",")
        ),
        r#"{"t":"hello","versions":[1],"client":"zz"}"#.to_owned(),
        format!(r#"{{"t":"hello","versions":[1],"client":"{client}","session":"{client}"}}"#),
    ];
    for (i, text) in cases.iter().enumerate() {
        let mut s = Server::new(ServerConfig::default()).unwrap();
        let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
        s.handle_message(Instant::ZERO, c, Incoming::Text(text));
        let out = drain(&mut s);
        let reject = reject_of(&out).unwrap_or_else(|| panic!("case {i}: no reject"));
        assert_eq!(reject.code, 4002, "case {i}");
        assert_eq!(reject.reason, "bad_hello", "case {i}");
        assert!(!reject.message.is_empty());
        assert!(
            out.contains(&ServerOutput::Disconnect(
                c,
                CloseCode::BAD_HANDSHAKE,
                "bad_hello"
            )),
            "case {i}: {out:?}"
        );
    }
    // A MessagePack hello (binary): handshake frames are JSON only.
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    let body = rmp_serde::to_vec_named(
        &serde_json::json!({"t": "hello", "versions": [1], "client": client}),
    )
    .unwrap();
    let mut bin = vec![wire::KIND_MSGPACK, 1];
    bin.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bin.extend_from_slice(&body);
    s.handle_message(Instant::ZERO, c, Incoming::Binary(&bin));
    assert_eq!(reject_of(&drain(&mut s)).map(|r| r.code), Some(4002));
}

/// A hello without `codecs` gets JSON, which every peer speaks.
#[test]
fn a_hello_without_codecs_gets_json() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    let text = format!(
        r#"{{"t":"hello","versions":[1],"client":"{}"}}"#,
        ClientId([2; 16]).to_hex()
    );
    s.handle_message(Instant::ZERO, c, Incoming::Text(&text));
    assert_eq!(
        welcome_of(&drain(&mut s)).map(|w| w.codec),
        Some(Codec::Json)
    );
}

fn open_json(s: &mut Server, id: u8) -> (ConnectionId, SessionId) {
    let c = s.handle_connection(Instant::ZERO, None, SessionId([id; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["json"])));
    drain(s);
    (c, s.session_of(c).unwrap())
}

fn messages(out: &[ServerOutput]) -> Vec<Received> {
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Event(ServerEvent::Message { message, .. }) => Some(message.clone()),
            _ => None,
        })
        .collect()
}

/// The acknowledgments a client would read from these outputs.
fn acks(out: &[ServerOutput]) -> Vec<u64> {
    frames_of(out)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Ack { ack } => Some(ack),
            Frame::Msg(m) => m.ack,
            _ => None,
        })
        .collect()
}

fn refusals(out: &[ServerOutput]) -> Vec<(u64, u64, Refusal)> {
    frames_of(out)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Msg(Msg {
                seq,
                kind: MsgKind::RefusedMessage(id),
                payload,
                ..
            }) => Some((seq, id, serde_json::from_slice(payload.data()).unwrap())),
            _ => None,
        })
        .collect()
}

/// A numbered message the server can never accept (a bad room, an
/// unknown `op`, `op` without `r`, a field of the wrong type, a bad
/// payload, JSON nested too deep) is consumed and refused by id: the
/// stream carries on, and no acknowledgment covers the message before
/// the client has acknowledged its refusal.
#[test]
fn a_message_that_can_never_be_accepted_is_refused_by_id_and_the_stream_goes_on() {
    #[cfg(feature = "json-serde")]
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let long = "x".repeat(257);
    #[allow(unused_mut)]
    let mut poison = Vec::from([
        format!(r#"{{"t":"msg","seq":1,"id":41,"j":1,"r":"{long}"}}"#),
        r#"{"t":"msg","seq":1,"id":41,"j":1,"r":""}"#.to_owned(),
        r#"{"t":"msg","seq":1,"id":41,"j":1,"op":"dance","r":"a"}"#.to_owned(),
        r#"{"t":"msg","seq":1,"id":41,"j":1,"op":"join"}"#.to_owned(),
        r#"{"t":"msg","seq":1,"id":41,"b":"!!"}"#.to_owned(),
        r#"{"t":"msg","seq":1,"id":41,"j":1,"op":"presence","r":"a"}"#.to_owned(),
    ]);
    // A field of the wrong type, and a payload nested deeper than the
    // hand-written reader goes, are serde's to read as numbered messages.
    #[cfg(feature = "json-serde")]
    poison.extend([
        r#"{"t":"msg","seq":1,"id":41,"j":1,"r":5}"#.to_owned(),
        format!(r#"{{"t":"msg","seq":1,"id":41,"j":{deep}}}"#),
    ]);
    for (i, bad) in poison.iter().enumerate() {
        let mut s = Server::new(ServerConfig::default()).unwrap();
        let (c, _) = open_json(&mut s, 1);
        s.handle_message(Instant::ZERO, c, Incoming::Text(bad));
        let good = r#"{"t":"msg","seq":2,"id":42,"j":"fine"}"#;
        s.handle_message(Instant::ZERO, c, Incoming::Text(good));
        s.handle_timeout(Instant::from_secs(1));
        let out = drain(&mut s);
        let refused = refusals(&out);
        assert_eq!(refused.len(), 1, "case {i}: {out:?}");
        let (refusal_seq, id, refusal) = &refused[0];
        assert_eq!(*id, 41, "case {i}");
        assert_eq!(refusal.code.as_deref(), Some("invalid"), "case {i}");
        let got = messages(&out);
        assert_eq!(got.len(), 1, "case {i}: the next message is delivered");
        assert_eq!(got[0].id, MessageId(42));
        assert!(
            acks(&out).iter().all(|&a| a == 0),
            "case {i}: nothing acknowledged before the refusal is: {:?}",
            acks(&out)
        );
        // The client acknowledges the refusal: both messages are
        // acknowledged at once.
        let ack = format!(r#"{{"t":"ack","ack":{refusal_seq}}}"#);
        s.handle_message(Instant::from_secs(1), c, Incoming::Text(&ack));
        assert_eq!(acks(&drain(&mut s)), vec![2], "case {i}");
        assert_eq!(s.stats().refused, 1);
    }
}

/// A poison message inside a batch: refused by id, its neighbours
/// delivered.
#[test]
fn a_poison_message_in_a_batch_is_refused_and_its_neighbours_delivered() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let (c, _) = open_json(&mut s, 1);
    let batch = r#"{"t":"batch","f":[{"t":"msg","seq":1,"id":1,"j":1},{"t":"msg","seq":2,"id":2,"j":1,"op":"nope","r":"a"},{"t":"msg","seq":3,"id":3,"j":1}]}"#;
    s.handle_message(Instant::ZERO, c, Incoming::Text(batch));
    let out = drain(&mut s);
    let ids: Vec<u64> = messages(&out).iter().map(|m| m.id.0).collect();
    assert_eq!(ids, vec![1, 3]);
    assert_eq!(
        refusals(&out).iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![2]
    );
}

/// A resume whose `delivered` is below what the client already
/// acknowledged cannot be served (those messages are gone): a new
/// session, `lost: "inconsistent"`, never a stalled stream.
#[test]
fn a_resume_below_what_the_client_acknowledged_is_inconsistent() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let (c, session) = open_json(&mut s, 1);
    for n in 0..3 {
        s.send(
            Instant::ZERO,
            session,
            Payload::json(format!("{n}").into_bytes()).unwrap(),
        )
        .unwrap();
    }
    s.handle_message(Instant::ZERO, c, Incoming::Text(r#"{"t":"ack","ack":2}"#));
    s.handle_connection_closed(Instant::ZERO, c, None);
    drain(&mut s);
    let key = s.resume_key(session);
    let resume = |session: SessionId, delivered: u64| {
        format!(
            r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":{delivered},"key":"{}"}}"#,
            ClientId([2; 16]).to_hex(),
            session.to_hex(),
            key.to_hex()
        )
    };
    let c2 = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    s.handle_message(Instant::ZERO, c2, Incoming::Text(&resume(session, 1)));
    let w = welcome_of(&drain(&mut s)).unwrap();
    assert!(!w.resumed);
    assert_eq!(w.lost.as_deref(), Some("inconsistent"));
    // At and above the acknowledged point, it resumes.
    let mut s2 = Server::new(ServerConfig::default()).unwrap();
    let (c, session) = open_json(&mut s2, 1);
    s2.send(Instant::ZERO, session, Payload::null()).unwrap();
    s2.handle_message(Instant::ZERO, c, Incoming::Text(r#"{"t":"ack","ack":1}"#));
    s2.handle_connection_closed(Instant::ZERO, c, None);
    let c2 = s2.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    s2.handle_message(Instant::ZERO, c2, Incoming::Text(&resume(session, 1)));
    assert!(welcome_of(&drain(&mut s2)).unwrap().resumed);
}

/// Knowing a session's id is not enough to resume it: without the key
/// from its welcome, or with another one, the resume is refused as an
/// unknown session (whether the session exists is not revealed), and the
/// session is left untouched for its owner.
#[test]
fn a_resume_needs_the_key_from_the_welcome() {
    let config = ServerConfig {
        resume_secret: crate::config::ResumeSecret([7; 16]),
        ..ServerConfig::default()
    };
    let mut s = Server::new(config.clone()).unwrap();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["json"])));
    let w = welcome_of(&drain(&mut s)).unwrap();
    let key = w.key.expect("a welcome carries the session's key");
    s.handle_connection_closed(Instant::ZERO, c, None);
    let attempt = |s: &mut Server, fresh: u8, key: Option<ResumeKey>| {
        let c = s.handle_connection(Instant::ZERO, None, SessionId([fresh; 16]));
        let key = key
            .map(|k| format!(r#","key":"{}""#, k.to_hex()))
            .unwrap_or_default();
        let text = format!(
            r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":0{key}}}"#,
            ClientId([2; 16]).to_hex(),
            w.session.to_hex()
        );
        s.handle_message(Instant::ZERO, c, Incoming::Text(&text));
        welcome_of(&drain(s)).unwrap()
    };
    for (fresh, wrong) in [
        (2, None),
        (4, Some(ResumeKey([0; 16]))),
        (5, Some(ResumeKey(w.session.0))),
    ] {
        let answer = attempt(&mut s, fresh, wrong);
        assert!(!answer.resumed);
        assert_eq!(answer.lost.as_deref(), Some("unknown_session"));
        assert_ne!(answer.session, w.session);
    }
    assert!(s.session(w.session).is_some(), "the session is untouched");
    let answer = attempt(&mut s, 3, Some(key));
    assert!(answer.resumed);
    assert_eq!(answer.session, w.session);
    // Another process with the same secret takes the same key; one with
    // another secret does not.
    assert!(Server::new(config)
        .unwrap()
        .resume_key(w.session)
        .matches(&key));
    assert!(!Server::new(ServerConfig::default())
        .unwrap()
        .resume_key(w.session)
        .matches(&key));
    assert_eq!(format!("{key:?}"), "ResumeKey(…)", "never logged");
}

/// Found by the `server_machine` fuzz target ("gap in what the server
/// sends"): messages sent to a detached session are numbered into the
/// window but never went out; a resume claiming one of them delivered
/// was taken as an acknowledgment of messages the client never had
/// (reported `Acked` to the application), and the server went on from
/// there, leaving a gap. Only what went out on a connection can have
/// been delivered: a claim above it is inconsistent (PROTOCOL.md,
/// section 6).
#[test]
fn a_resume_claiming_messages_that_never_went_out_is_inconsistent() {
    let resume = |s: &Server, session: SessionId, delivered: u64| {
        format!(
            r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":{delivered},"key":"{}"}}"#,
            ClientId([2; 16]).to_hex(),
            session.to_hex(),
            s.resume_key(session).to_hex()
        )
    };
    for (sent_before, claim, resumed) in [(0, 1, false), (1, 2, false), (1, 1, true)] {
        let mut s = Server::new(ServerConfig::default()).unwrap();
        let (c, session) = open_json(&mut s, 1);
        for n in 0..sent_before {
            s.send(
                Instant::ZERO,
                session,
                Payload::json(format!("{n}").into_bytes()).unwrap(),
            )
            .unwrap();
        }
        s.handle_connection_closed(Instant::ZERO, c, None);
        // Numbered while detached, never sent.
        for _ in 0..2 {
            s.send(Instant::ZERO, session, Payload::null()).unwrap();
        }
        drain(&mut s);
        let c2 = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
        s.handle_message(
            Instant::ZERO,
            c2,
            Incoming::Text(&resume(&s, session, claim)),
        );
        let out = drain(&mut s);
        let w = welcome_of(&out).unwrap();
        let case = (sent_before, claim);
        assert_eq!(w.resumed, resumed, "{case:?}: {w:?}");
        if resumed {
            // Everything after the claim goes out again, from claim + 1.
            let seqs: Vec<u64> = frames_of(&out)
                .iter()
                .filter_map(|f| match f {
                    Frame::Msg(m) => Some(m.seq),
                    _ => None,
                })
                .collect();
            assert_eq!(seqs, vec![claim + 1, claim + 2], "{case:?}");
        } else {
            assert_eq!(w.lost.as_deref(), Some("inconsistent"), "{case:?}");
            assert!(
                !out.iter()
                    .any(|o| matches!(o, ServerOutput::Event(ServerEvent::Acked { .. }))),
                "{case:?}: messages never sent were reported acknowledged: {out:?}"
            );
        }
    }
}

fn limited(policy: crate::ratelimit::RateLimitPolicy) -> Server {
    Server::new(ServerConfig {
        rate_limit: Some(crate::ratelimit::RateLimitConfig {
            messages_per_sec: 10,
            message_burst: 10,
            bytes_per_sec: 1 << 20,
            byte_burst: 1 << 20,
            policy,
        }),
        ..ServerConfig::default()
    })
    .unwrap()
}

fn flood(s: &mut Server, c: ConnectionId, n: u64) -> Vec<ServerOutput> {
    let mut out = Vec::new();
    for seq in 1..=n {
        let m = format!(r#"{{"t":"msg","seq":{seq},"id":{seq},"j":{seq}}}"#);
        s.handle_message(Instant::ZERO, c, Incoming::Text(&m));
        out.extend(drain(s));
    }
    out
}

/// Over the limit under `Refuse`: each message is refused by id and
/// never acknowledged before its refusal; the application gets one
/// report per interval with the count, not one event per message.
#[test]
fn messages_over_a_refusing_rate_limit_are_refused_by_id_and_reported_per_interval() {
    let mut s = limited(crate::ratelimit::RateLimitPolicy::Refuse);
    let (c, _) = open_json(&mut s, 1);
    let mut out = flood(&mut s, c, 1000);
    assert_eq!(messages(&out).len(), 10);
    let refused: Vec<u64> = refusals(&out).iter().map(|r| r.1).collect();
    assert_eq!(refused, (11..=1000).collect::<Vec<_>>());
    assert!(refusals(&out)
        .iter()
        .all(|r| r.2.code.as_deref() == Some("rate_limited") && r.2.op == "message"));
    // Acknowledgments never pass a refusal the client has not seen.
    assert!(acks(&out).iter().all(|&a| a <= 10), "{:?}", acks(&out));
    // A refusal names the operation as the room's own refusals do.
    for (seq, extra, op) in [
        (1001, r#","r":"lobby""#, "publish"),
        (1002, r#","r":"lobby","op":"mset""#, "mset"),
        (1003, r#","r":"lobby","op":"join""#, "join"),
        (1004, r#","r":"lobby","op":"leave""#, "leave"),
    ] {
        let m = format!(r#"{{"t":"msg","seq":{seq},"id":{seq},"j":null{extra}}}"#);
        s.handle_message(Instant::ZERO, c, Incoming::Text(&m));
        let got = drain(&mut s);
        let r = refusals(&got);
        assert_eq!(r.len(), 1, "{op}: {got:?}");
        assert_eq!(
            (r[0].1, r[0].2.code.as_deref(), r[0].2.op.as_str()),
            (seq, Some("rate_limited"), op)
        );
        out.extend(got);
    }
    s.handle_timeout(Instant::from_secs(2));
    out.extend(drain(&mut s));
    let reports: Vec<&ServerEvent> = out
        .iter()
        .filter_map(|o| match o {
            ServerOutput::Event(e @ ServerEvent::RateLimited { .. }) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(matches!(
        reports[0],
        ServerEvent::RateLimited {
            refused: 994,
            delayed: 0,
            ..
        }
    ));
}

/// Over the limit under `Throttle` (the default policy): every message
/// is delivered, and reading pauses as long as the limits need.
#[test]
fn messages_over_a_throttling_rate_limit_are_all_delivered_and_reading_pauses() {
    let mut s = limited(crate::ratelimit::RateLimitPolicy::Throttle);
    let (c, _) = open_json(&mut s, 1);
    assert_eq!(s.read_paused_until(c), None);
    let out = flood(&mut s, c, 30);
    assert_eq!(messages(&out).len(), 30);
    assert!(refusals(&out).is_empty());
    // 20 messages over a 10/s limit: two seconds of reading paused.
    assert_eq!(s.read_paused_until(c), Some(Instant::from_secs(2)));
    s.handle_timeout(Instant::from_secs(2));
    assert_eq!(s.read_paused_until(c), None);
}

#[test]
fn flood_protection_is_on_by_default() {
    let config = ServerConfig::default();
    let limit = config.rate_limit.expect("a default rate limit");
    assert_eq!(limit.policy, crate::ratelimit::RateLimitPolicy::Throttle);
    assert!(
        limit.messages_per_sec >= 500,
        "an interactive client never meets it"
    );
}

#[test]
fn garbage_closes_with_1007_after_the_threshold() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["json"])));
    drain(&mut s);
    for _ in 0..3 {
        s.handle_message(Instant::ZERO, c, Incoming::Binary(&[0xff; 3]));
    }
    assert_eq!(s.connection_count(), 1);
    s.handle_message(Instant::ZERO, c, Incoming::Binary(&[0xff; 3]));
    assert!(drain(&mut s).contains(&ServerOutput::Disconnect(
        c,
        CloseCode::INVALID_PAYLOAD,
        "too many undecodable frames"
    )));
}

#[test]
fn session_limit_rejects_with_try_again_later() {
    let mut s = Server::new(ServerConfig {
        max_sessions: 1,
        ..ServerConfig::default()
    })
    .unwrap();
    let a = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(Instant::ZERO, a, Incoming::Text(&hello(&[1], &["json"])));
    let b = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    s.handle_message(Instant::ZERO, b, Incoming::Text(&hello(&[1], &["json"])));
    assert!(drain(&mut s).contains(&ServerOutput::Disconnect(
        b,
        CloseCode::TRY_AGAIN_LATER,
        "overloaded"
    )));
}

#[test]
fn many_sessions_keep_timer_work_small() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    for i in 0..5_000u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        let c = s.handle_connection(Instant::ZERO, None, SessionId(id));
        s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["json"])));
    }
    drain(&mut s);
    // One hello deadline and one idle deadline per connection at most.
    assert!(s.timers.len() <= 10_000, "{}", s.timers.len());
    assert_eq!(s.poll_timeout().unwrap().at, Instant::from_secs(10));
}

/// A server with one attached session holding `n` unacknowledged
/// messages; returns the server, the session and its connection.
fn session_with_messages(n: u64) -> (Server, SessionId, ConnectionId) {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let now = Instant::ZERO;
    let c = s.handle_connection(now, None, SessionId([1; 16]));
    s.handle_message(now, c, Incoming::Text(&hello(&[1], &["json"])));
    let id = welcome_of(&drain(&mut s)).unwrap().session;
    for k in 0..n {
        let p = Payload::json(format!("{k}").into_bytes()).unwrap();
        s.send(now, id, p).unwrap();
    }
    drain(&mut s);
    (s, id, c)
}

/// An exported session closes its connection with 4011 and is gone; the
/// image carries its messages through JSON and MessagePack alike, and
/// another server imports it detached, with ids above the image's.
#[test]
fn a_session_moves_between_servers() {
    let (mut a, id, conn) = session_with_messages(3);
    let now = Instant::from_secs(1);
    let image = a.export_session(now, id).unwrap();
    let out = drain(&mut a);
    let closed = out.iter().position(|o| {
        matches!(o,
        ServerOutput::Disconnect(c, code, _) if *c == conn && *code == CloseCode::ROTATE)
    });
    // A `goaway` 4011 before the close, so that the client resumes at once.
    let told = out.iter().position(|o| match o {
        ServerOutput::Transmit(c, t) if *c == conn => matches!(
            wire::decode(
                t.as_incoming(),
                &Limits {
                    max_message: 1 << 20,
                    version: 1,
                }
            ),
            Ok(Frame::GoAway {
                code: 4011,
                retry_after_ms: None
            })
        ),
        _ => false,
    });
    assert!(
        matches!((told, closed), (Some(t), Some(c)) if t < c),
        "{out:?}"
    );
    assert!(out.iter().any(|o| matches!(o,
        ServerOutput::Event(ServerEvent::SessionMoved { session }) if *session == id)));
    assert!(a.session(id).is_none());
    assert_eq!(a.stats().sessions_moved_out, 1);
    assert_eq!(
        image.unconfirmed(),
        vec![MessageId(1), MessageId(2), MessageId(3)]
    );
    assert_eq!(image.session(), Some(id));

    let json: SessionImage = serde_json::from_slice(&serde_json::to_vec(&image).unwrap()).unwrap();
    let packed: SessionImage =
        rmp_serde::from_slice(&rmp_serde::to_vec_named(&image).unwrap()).unwrap();
    assert_eq!((&json, &packed), (&image, &image));

    let mut b = Server::new(ServerConfig::default()).unwrap();
    let resume = |key: ResumeKey| {
        format!(
            r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":0,"key":"{}"}}"#,
            ClientId([2; 16]).to_hex(),
            id.to_hex(),
            key.to_hex()
        )
    };
    let key = a.resume_key(id);
    assert_eq!(
        b.session_to_claim(&resume(key)),
        Some(id),
        "b must claim it"
    );
    assert_eq!(
        b.session_to_claim(&resume(ResumeKey([0; 16]))),
        None,
        "a wrong key claims nothing"
    );
    assert_eq!(b.session_to_claim("{not a hello"), None);
    assert_eq!(b.import_session(now, &json), Ok(id));
    assert_eq!(b.session_to_claim(&resume(key)), None, "b holds it now");
    let info = b.session(id).unwrap();
    assert!(
        matches!(info.state, SessionState::Detached { code, expires_at }
        if code == CloseCode::ROTATE && expires_at == now + b.config().session_grace)
    );
    assert_eq!(info.in_flight, 3);
    assert!(drain(&mut b).iter().any(|o| matches!(o,
        ServerOutput::Event(ServerEvent::SessionArrived { session, .. }) if *session == id)));
    assert_eq!(b.import_session(now, &json), Err(ImportError::Exists(id)));
    let next = b.send(now, id, Payload::null()).unwrap();
    assert!(
        next > MessageId(3),
        "ids keep rising across servers: {next:?}"
    );
}

/// A malformed or oversized image is refused with a typed error, and
/// nothing changes.
#[test]
fn a_bad_image_is_refused() {
    let (mut a, id, _) = session_with_messages(3);
    let image = serde_json::to_value(a.export_session(Instant::ZERO, id).unwrap()).unwrap();
    let edited = |f: &dyn Fn(&mut serde_json::Value)| -> SessionImage {
        let mut v = image.clone();
        f(&mut v);
        serde_json::from_value(v).unwrap()
    };
    let mut b = Server::new(ServerConfig::default()).unwrap();
    let cases: Vec<(SessionImage, &str)> = vec![
        (edited(&|v| v["format"] = 9.into()), "format 9"),
        (edited(&|v| v["session"] = "xyz".into()), "session is not"),
        (edited(&|v| v["next_seq"] = 9.into()), "next_seq"),
        (edited(&|v| v["sent_through"] = 7.into()), "sent_through"),
        (
            edited(&|v| v["sent"][1]["seq"] = 5.into()),
            "not contiguous",
        ),
        (edited(&|v| v["sent"][1]["seq"] = 1.into()), "out of order"),
        (edited(&|v| v["sent"][0]["data"] = "!!".into()), "base64"),
        (
            edited(&|v| v["sent"][0]["kind"] = "gossip".into()),
            "unknown kind",
        ),
        (
            edited(&|v| {
                v["sent"][0]["enc"] = "msgpack".into();
                v["sent"][0]["data"] = "wQ==".into(); // 0xc1, never used
            }),
            "MessagePack",
        ),
        (edited(&|v| v["next_id"] = 2.into()), "next_id"),
        (edited(&|v| v["held"] = serde_json::json!([[1, 1]])), "held"),
        (
            edited(&|v| v["rooms"] = serde_json::json!([["", 0]])),
            "room names",
        ),
        (
            edited(&|v| v["rooms"] = serde_json::json!([["r", 0], ["r", 0]])),
            "twice",
        ),
    ];
    for (image, want) in cases {
        let Err(e) = b.import_session(Instant::ZERO, &image) else {
            panic!("{want}: imported");
        };
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    let small = ServerConfig {
        reliability: crate::reliable::ReliabilityConfig {
            window_messages: 2,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let mut c = Server::new(small).unwrap();
    let e = c
        .import_session(Instant::ZERO, &edited(&|_| {}))
        .unwrap_err();
    assert!(
        matches!(
            e,
            ImportError::TooLarge {
                what: "unacknowledged messages",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!((b.session_count(), c.session_count()), (0, 0));
    assert!(b.import_session(Instant::ZERO, &edited(&|_| {})).is_ok());
}

/// With `Acknowledge::AfterHandled`, a client's message is acknowledged
/// only once the application says it handled it, and the welcome of a
/// resume says as much; a gap's `replay` acknowledges nothing more.
#[test]
fn after_handled_acknowledges_only_what_the_application_handled() {
    let config = ServerConfig {
        acknowledge: crate::config::Acknowledge::AfterHandled,
        ..ServerConfig::default()
    };
    let mut s = Server::new(config).unwrap();
    let t = Instant::ZERO;
    let c = s.handle_connection(t, None, SessionId([1; 16]));
    s.handle_message(t, c, Incoming::Text(&hello(&[1], &["json"])));
    let welcome = welcome_of(&drain(&mut s)).unwrap();
    let id = welcome.session;
    for seq in 1..=3 {
        let m = format!(r#"{{"t":"msg","seq":{seq},"id":{seq},"j":{seq}}}"#);
        s.handle_message(t, c, Incoming::Text(&m));
    }
    let out = drain(&mut s);
    let delivered = out
        .iter()
        .filter(|o| matches!(o, ServerOutput::Event(ServerEvent::Message { .. })))
        .count();
    assert_eq!(delivered, 3, "handed to the application at once");
    s.handle_timeout(Instant::from_secs(1));
    assert!(
        acks(&drain(&mut s)).iter().all(|&a| a == 0),
        "nothing handled, nothing acknowledged"
    );

    // A gap: the replay asks from the first unacknowledged, not the first missing.
    s.handle_message(t, c, Incoming::Text(r#"{"t":"msg","seq":5,"id":5,"j":5}"#));
    assert!(frames_of(&drain(&mut s)).contains(&Frame::Replay { from: 1 }));

    s.handled(Instant::from_secs(1), id, 2).unwrap();
    s.handle_timeout(Instant::from_secs(2));
    assert_eq!(acks(&drain(&mut s)), vec![2]);

    // A resume hears the same: `delivered` is what was handled.
    s.handle_connection_closed(Instant::from_secs(2), c, None);
    let c2 = s.handle_connection(Instant::from_secs(2), None, SessionId([2; 16]));
    let resume = format!(
        r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":0,"key":"{}"}}"#,
        ClientId([2; 16]).to_hex(),
        id.to_hex(),
        welcome.key.unwrap().to_hex()
    );
    s.handle_message(Instant::from_secs(2), c2, Incoming::Text(&resume));
    assert_eq!(welcome_of(&drain(&mut s)).unwrap().delivered, 2);
    // Message 3 comes again: a duplicate, not delivered twice.
    s.handle_message(
        Instant::from_secs(2),
        c2,
        Incoming::Text(r#"{"t":"msg","seq":3,"id":3,"j":3}"#),
    );
    assert!(!drain(&mut s)
        .iter()
        .any(|o| matches!(o, ServerOutput::Event(ServerEvent::Message { .. }))));
    s.handled(Instant::from_secs(2), id, 3).unwrap();
    s.handle_timeout(Instant::from_secs(3));
    assert_eq!(acks(&drain(&mut s)), vec![3]);
    assert_eq!(
        s.handled(Instant::from_secs(3), SessionId([9; 16]), 1),
        Err(SendError::UnknownSession)
    );
}

/// A session whose server was lost is taken up from its record: the
/// client's resuming `hello` brings the numbers (`delivered`, `acked`),
/// the welcome says `recovered` and acknowledges only what the client saw
/// acknowledged, the client's later messages are delivered (again), and
/// numbering to the client carries on after what it received. A client
/// that does not say `acked` cannot be taken up.
#[test]
fn a_session_is_taken_up_from_its_record_after_its_server_was_lost() {
    let (a, id, _) = session_with_messages(0);
    let record: SessionRecord =
        serde_json::from_str(&serde_json::to_string(&a.session_record(id).unwrap()).unwrap())
            .unwrap();
    assert_eq!(record.session(), Some(id));
    let key = a.resume_key(id);
    drop(a); // the server is lost, with whatever it held
    let hello = |acked: Option<u64>| {
        let acked = acked.map_or(String::new(), |a| format!(r#","acked":{a}"#));
        format!(
            r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":5,"key":"{}"{acked}}}"#,
            ClientId([2; 16]).to_hex(),
            id.to_hex(),
            key.to_hex()
        )
    };

    let mut b = Server::new(ServerConfig::default()).unwrap();
    let now = Instant::from_secs(1);
    assert_eq!(b.recover_session(now, &record), Ok(id));
    assert!(drain(&mut b).iter().any(|o| matches!(o,
        ServerOutput::Event(ServerEvent::SessionArrived { session, recovered: true, .. }) if *session == id)));
    assert_eq!(
        b.recover_session(now, &record),
        Err(ImportError::Exists(id))
    );
    let c = b.handle_connection(now, None, SessionId([3; 16]));
    b.handle_message(now, c, Incoming::Text(&hello(Some(3))));
    let w = welcome_of(&drain(&mut b)).unwrap();
    assert!(w.resumed && w.recovered, "{w:?}");
    assert_eq!(w.delivered, 3, "what the client saw acknowledged");
    // The client sends 4 again: delivered. Numbering to it goes on after 5.
    b.handle_message(
        now,
        c,
        Incoming::Text(r#"{"t":"msg","seq":4,"id":4,"j":4}"#),
    );
    assert_eq!(
        messages(&drain(&mut b))
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>(),
        vec![4]
    );
    b.send(now, id, Payload::null()).unwrap();
    let seqs: Vec<u64> = frames_of(&drain(&mut b))
        .into_iter()
        .filter_map(|f| match f {
            Frame::Msg(m) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, vec![6]);

    // Without `acked` the numbers cannot be known: a new session.
    let mut b = Server::new(ServerConfig::default()).unwrap();
    b.recover_session(now, &record).unwrap();
    let c = b.handle_connection(now, None, SessionId([4; 16]));
    b.handle_message(now, c, Incoming::Text(&hello(None)));
    let w = welcome_of(&drain(&mut b)).unwrap();
    assert!(!w.resumed && !w.recovered);
    assert_eq!(w.lost.as_deref(), Some("inconsistent"));
}

/// A hello announcing `caps`, resuming `resume` (session, key) if given.
fn hello_caps(caps: &[&str], resume: Option<(SessionId, ResumeKey)>) -> String {
    let resume = resume
        .map(|(s, k)| {
            format!(
                r#","session":"{}","delivered":0,"key":"{}""#,
                s.to_hex(),
                k.to_hex()
            )
        })
        .unwrap_or_default();
    format!(
        r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"caps":{caps:?}{resume}}}"#,
        ClientId([2; 16]).to_hex()
    )
}

/// The `lv` frames among `out`: (connection, room, key, version, payload).
fn latest_of(out: &[ServerOutput]) -> Vec<(ConnectionId, String, String, u64, String)> {
    let limits = Limits {
        max_message: 1 << 20,
        version: 1,
    };
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Transmit(c, t) => match wire::decode(t.as_incoming(), &limits) {
                Ok(Frame::Latest(v)) => Some((
                    *c,
                    v.room.to_string(),
                    v.key.to_string(),
                    v.version,
                    String::from_utf8(v.payload.data().to_vec()).unwrap(),
                )),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The room messages among `out` sent on `connection`: (room, payload).
fn room_msgs_to(out: &[ServerOutput], connection: ConnectionId) -> Vec<(String, String)> {
    let to: Vec<ServerOutput> = out
        .iter()
        .filter(|o| matches!(o, ServerOutput::Transmit(c, _) if *c == connection))
        .cloned()
        .collect();
    frames_of(&to)
        .into_iter()
        .flat_map(|f| match f {
            Frame::Msg(m) => vec![m],
            Frame::Batch(ms) => ms,
            _ => Vec::new(),
        })
        .filter_map(|m| {
            let room = m.room?.to_string();
            Some((room, String::from_utf8(m.payload.data().to_vec()).ok()?))
        })
        .collect()
}

/// Latest values: a member that announced `latest` gets each as an `lv`
/// frame, a member that did not as a room message; a member that joins
/// gets every key's newest value, and so does one whose connection comes
/// back (what it missed while away is never queued).
#[test]
fn latest_values_reach_members_as_frames_or_messages_and_snapshots() {
    let t0 = Instant::ZERO;
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let open = |s: &mut Server, id: u8, caps: &[&str]| {
        let c = s.handle_connection(t0, None, SessionId([id; 16]));
        s.handle_message(t0, c, Incoming::Text(&hello_caps(caps, None)));
        let w = welcome_of(&drain(s)).unwrap();
        (c, w.session, w.key.unwrap())
    };
    let (c1, s1, k1) = open(&mut s, 1, &["latest"]);
    let (c2, s2, _) = open(&mut s, 2, &[]);
    s.join(t0, s1, "dash").unwrap();
    s.join(t0, s2, "dash").unwrap();
    drain(&mut s);
    let json = |v: &str| Payload::json(v.as_bytes().to_vec()).unwrap();
    assert_eq!(s.broadcast_latest(t0, "dash", "cpu", json("1")), Ok(2));
    let out = drain(&mut s);
    assert_eq!(
        latest_of(&out),
        vec![(c1, "dash".into(), "cpu".into(), 1, "1".into())]
    );
    assert_eq!(
        room_msgs_to(&out, c2),
        vec![("dash".to_owned(), "1".to_owned())],
        "the member without `latest` gets a message"
    );

    // Away: nothing is queued for the `latest` member; back, it gets the
    // newest value of each key, oldest version first.
    s.handle_connection_closed(t0, c1, None);
    drain(&mut s);
    s.broadcast_latest(t0, "dash", "cpu", json("2")).unwrap();
    s.broadcast_latest(t0, "dash", "mem", json("7")).unwrap();
    s.broadcast_latest(t0, "dash", "cpu", json("3")).unwrap();
    let out = drain(&mut s);
    assert!(latest_of(&out).is_empty());
    assert_eq!(
        room_msgs_to(&out, c2).len(),
        3,
        "the other member gets every one"
    );
    let c1b = s.handle_connection(t0, None, SessionId([9; 16]));
    s.handle_message(
        t0,
        c1b,
        Incoming::Text(&hello_caps(&["latest"], Some((s1, k1)))),
    );
    let out = drain(&mut s);
    assert!(welcome_of(&out).unwrap().resumed);
    assert_eq!(
        latest_of(&out),
        vec![
            (c1b, "dash".into(), "mem".into(), 3, "7".into()),
            (c1b, "dash".into(), "cpu".into(), 4, "3".into()),
        ]
    );

    // A member that joins gets the room's values.
    let (c3, s3, _) = open(&mut s, 3, &["latest"]);
    s.join(t0, s3, "dash").unwrap();
    let out = drain(&mut s);
    assert_eq!(latest_of(&out).len(), 2);
    assert!(latest_of(&out).iter().all(|l| l.0 == c3));
    assert_eq!(s.latest_values("dash").len(), 2);

    // The room's values go with its last member.
    for m in [s1, s2, s3] {
        s.leave(t0, m, "dash");
    }
    drain(&mut s);
    assert!(s.latest_values("dash").is_empty());
    assert_eq!(s.broadcast_latest(t0, "dash", "cpu", json("4")), Ok(0));
    assert!(
        s.latest_values("dash").is_empty(),
        "a room without members keeps nothing"
    );
}

/// Keys are 1 to 256 bytes and a room holds at most `max_latest_keys` of
/// them; the ones it holds can still be set; servers of a cluster refuse.
#[test]
fn latest_values_are_bounded_and_refused_with_typed_errors() {
    let t0 = Instant::ZERO;
    let mut s = Server::new(ServerConfig {
        max_latest_keys: 2,
        ..ServerConfig::default()
    })
    .unwrap();
    let (_, s1) = open_json(&mut s, 1);
    s.join(t0, s1, "dash").unwrap();
    drain(&mut s);
    let p = || Payload::json(b"1".to_vec()).unwrap();
    assert_eq!(
        s.broadcast_latest(t0, "dash", "", p()),
        Err(SendError::BadKey)
    );
    let long = "k".repeat(257);
    assert_eq!(
        s.broadcast_latest(t0, "dash", &long, p()),
        Err(SendError::BadKey)
    );
    assert_eq!(
        s.broadcast_latest(t0, "", "k", p()),
        Err(SendError::BadRoom)
    );
    s.broadcast_latest(t0, "dash", "a", p()).unwrap();
    s.broadcast_latest(t0, "dash", "b", p()).unwrap();
    assert_eq!(
        s.broadcast_latest(t0, "dash", "c", p()),
        Err(SendError::TooManyKeys { max: 2 })
    );
    assert_eq!(s.broadcast_latest(t0, "dash", "a", p()), Ok(1));
    let big = Payload::binary(vec![0; s.config().max_message_size + 1]);
    assert!(matches!(
        s.broadcast_latest(t0, "dash", "a", big),
        Err(SendError::TooLarge { .. })
    ));
    s.set_shared_rooms(true);
    assert!(matches!(
        s.broadcast_latest(t0, "dash", "a", p()),
        Err(SendError::Unsupported(_))
    ));
}

/// With slots on, latest values come as `ServerOutput::Latest`, naming
/// the room and key a newer value would supersede.
#[test]
fn latest_slots_hand_values_to_the_driver_by_key() {
    let t0 = Instant::ZERO;
    let mut s = Server::new(ServerConfig::default()).unwrap();
    s.set_latest_slots(true);
    let c = s.handle_connection(t0, None, SessionId([1; 16]));
    s.handle_message(t0, c, Incoming::Text(&hello_caps(&["latest"], None)));
    let session = s.session_of(c).unwrap();
    s.join(t0, session, "dash").unwrap();
    drain(&mut s);
    s.broadcast_latest(t0, "dash", "cpu", Payload::json(b"5".to_vec()).unwrap())
        .unwrap();
    let out = drain(&mut s);
    let latest: Vec<&LatestOut> = out
        .iter()
        .filter_map(|o| match o {
            ServerOutput::Latest(to, v) if *to == c => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(latest.len(), 1);
    assert_eq!((&*latest[0].room, &*latest[0].key), ("dash", "cpu"));
    assert!(!out.iter().any(|o| matches!(o, ServerOutput::Transmit(..))));
}

// ---- the lag bound (lag.rs) ------------------------------------------------

/// A server with a 4 s lag bound (so probes every 1 s at most) and the
/// default heartbeat (client pings every 20 s, idle after 30 s).
fn lag_server() -> Server {
    Server::new(ServerConfig {
        max_lag: Some(Duration::from_secs(4)),
        ..ServerConfig::default()
    })
    .unwrap()
}

fn at_ms(ms: u64) -> Instant {
    Instant::from_millis(ms)
}

/// The lag probes (`ping`s with a nonce from `2^52`) in these outputs,
/// by connection.
fn probes_in(out: &[ServerOutput]) -> Vec<(ConnectionId, u64)> {
    let limits = Limits {
        max_message: 1 << 20,
        version: 1,
    };
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Transmit(c, t) => match wire::decode(t.as_incoming(), &limits) {
                Ok(Frame::Ping { nonce }) => Some((*c, nonce)),
                _ => None,
            },
            _ => None,
        })
        .inspect(|(_, nonce)| assert!((1 << 52..1 << 53).contains(nonce), "{nonce}"))
        .collect()
}

/// The messages (seq, id) these outputs carry.
fn msgs_in(out: &[ServerOutput]) -> Vec<(u64, u64)> {
    frames_of(out)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Msg(m) => Some((m.seq, m.id)),
            _ => None,
        })
        .collect()
}

fn pong(s: &mut Server, now: Instant, c: ConnectionId, nonce: u64) -> Vec<ServerOutput> {
    let text = format!(r#"{{"t":"pong","nonce":{nonce}}}"#);
    s.handle_message(now, c, Incoming::Text(&text));
    drain(s)
}

fn ack(s: &mut Server, now: Instant, c: ConnectionId, seq: u64) -> Vec<ServerOutput> {
    let text = format!(r#"{{"t":"ack","ack":{seq}}}"#);
    s.handle_message(now, c, Incoming::Text(&text));
    drain(s)
}

fn ended(out: &[ServerOutput]) -> Vec<(SessionId, SessionEnd, Vec<MessageId>)> {
    out.iter()
        .filter_map(|o| match o {
            ServerOutput::Event(ServerEvent::SessionEnded {
                session,
                reason,
                unconfirmed,
            }) => Some((*session, reason.clone(), unconfirmed.clone())),
            _ => None,
        })
        .collect()
}

/// A member that reads, and acknowledges, but answers the lag probe only
/// after `max_lag` is a slow consumer: at the probe's `max_lag` its
/// connection is closed with 4009 and its session ends with every
/// message it had not acknowledged.
#[test]
fn a_member_that_keeps_sending_but_reads_too_far_behind_is_evicted_at_max_lag() {
    let mut s = lag_server();
    let (c, session) = open_json(&mut s, 1);
    s.join(Instant::ZERO, session, "room").unwrap();
    let mut out = drain(&mut s);
    let mut ids = Vec::new();
    for k in 0..3 {
        let p = Payload::json(format!("{k}").into_bytes()).unwrap();
        ids.push(s.send(Instant::ZERO, session, p).unwrap());
    }
    out.extend(drain(&mut s));
    let sent = msgs_in(&out);
    assert!(sent.len() >= 3, "{sent:?}");
    assert!(probes_in(&out).is_empty(), "no probe before max_lag / 4");
    // The first probe goes out `max_lag / 4` after the member joined.
    assert_eq!(s.poll_timeout().unwrap().at, Instant::from_secs(1));
    s.handle_timeout(Instant::from_secs(1));
    let probes = probes_in(&drain(&mut s));
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].0, c);
    assert_eq!(s.stats().lag_probes, 1);
    // The client reads on slowly: it acknowledges the first message at
    // 2 s and 4.5 s (never reaching the probe).
    ack(&mut s, at_ms(2_000), c, sent[0].0);
    assert_eq!(
        s.session(session).unwrap().lag,
        Some(Duration::from_secs(1)),
        "the outstanding probe's wait"
    );
    ack(&mut s, at_ms(4_500), c, sent[0].0);
    s.handle_timeout(at_ms(4_999));
    assert!(s.session(session).is_some());
    s.handle_timeout(Instant::from_secs(5));
    let out = drain(&mut s);
    assert!(
        out.iter().any(|o| matches!(o,
            ServerOutput::Disconnect(x, CloseCode::SLOW_CONSUMER, _) if *x == c)),
        "{out:?}"
    );
    let ends = ended(&out);
    assert_eq!(ends.len(), 1, "{out:?}");
    let (who, reason, mut unconfirmed) = ends[0].clone();
    assert_eq!((who, reason), (session, SessionEnd::SlowConsumer));
    unconfirmed.sort();
    let mut expected: Vec<MessageId> = sent[1..].iter().map(|(_, id)| MessageId(*id)).collect();
    expected.sort();
    assert_eq!(unconfirmed, expected);
    for id in &ids {
        assert!(unconfirmed.contains(id), "{id:?} not reported");
    }
    assert!(s.session(session).is_none());
    assert_eq!(s.stats().slow_consumers, 1);
    assert_eq!(s.stats().lag_evictions, 1);
}

/// A member that answers every probe within `max_lag` is never evicted,
/// however long it runs, and its lag is what the probes measured.
#[test]
fn a_member_that_answers_probes_in_time_is_never_evicted() {
    let mut s = lag_server();
    let (c, session) = open_json(&mut s, 1);
    s.join(Instant::ZERO, session, "room").unwrap();
    drain(&mut s);
    let mut now = Instant::ZERO;
    // Probes waiting for their answer, 3.5 s after they came.
    let mut waiting: Vec<(Instant, u64)> = Vec::new();
    let mut answered = 0;
    let mut seq = 0;
    while now < Instant::from_secs(600) {
        now += Duration::from_millis(250);
        let p = Payload::json(b"1".to_vec()).unwrap();
        s.send(now, session, p).unwrap();
        s.handle_timeout(now);
        let out = drain(&mut s);
        assert!(
            !out.iter()
                .any(|o| matches!(o, ServerOutput::Disconnect(..))),
            "at {now:?}: {out:?}"
        );
        seq = msgs_in(&out).iter().map(|(q, _)| *q).max().unwrap_or(seq);
        waiting.extend(probes_in(&out).into_iter().map(|(_, n)| (now, n)));
        // The client acknowledges what it reads, and answers each probe
        // 3.5 s after it came: behind, but within the bound.
        ack(&mut s, now, c, seq);
        while let Some(&(sent, nonce)) = waiting.first() {
            if now.saturating_duration_since(sent) < Duration::from_millis(3_500) {
                break;
            }
            waiting.remove(0);
            let out = pong(&mut s, now, c, nonce);
            assert!(ended(&out).is_empty());
            answered += 1;
        }
    }
    let info = s.session(session).unwrap();
    assert_eq!(info.state, SessionState::Attached(c));
    assert!(answered > 100, "{answered} probes answered");
    assert_eq!(s.stats().lag_evictions, 0);
    assert!(
        info.lag.unwrap() >= Duration::from_millis(3_500)
            && info.lag.unwrap() < Duration::from_secs(4),
        "{:?}",
        info.lag
    );
}

/// A peer that falls silent (a laptop's lid closed) is never evicted by
/// the probe, whatever it sent just before: the idle timeout detaches it
/// (4008) and its session waits for it to resume.
#[test]
fn a_silent_member_is_detached_by_the_idle_timeout_not_evicted() {
    let mut s = lag_server();
    let c = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(Instant::ZERO, c, Incoming::Text(&hello(&[1], &["json"])));
    let welcome = welcome_of(&drain(&mut s)).unwrap();
    let session = welcome.session;
    s.join(Instant::ZERO, session, "room").unwrap();
    drain(&mut s);
    s.handle_timeout(Instant::from_secs(1));
    assert_eq!(probes_in(&drain(&mut s)).len(), 1);
    // An acknowledgment just after the probe went out, then the lid closes.
    ack(&mut s, at_ms(1_010), c, 0);
    let mut t = Instant::from_secs(1);
    while t < Instant::from_secs(31) {
        t += Duration::from_millis(500);
        s.handle_timeout(t);
        let out = drain(&mut s);
        assert!(ended(&out).is_empty(), "at {t:?}: {out:?}");
        assert!(
            !out.iter()
                .any(|o| matches!(o, ServerOutput::Disconnect(_, CloseCode::SLOW_CONSUMER, _))),
            "at {t:?}: {out:?}"
        );
    }
    // Idle from 1.01 s: 30 s, then the 1 s grace.
    s.handle_timeout(at_ms(32_010));
    let out = drain(&mut s);
    assert!(ended(&out).is_empty());
    assert_eq!(s.session(session).unwrap().state.name(), "attached");
    s.handle_timeout(at_ms(33_010));
    let out = drain(&mut s);
    assert!(out.contains(&ServerOutput::Disconnect(
        c,
        CloseCode::HEARTBEAT_TIMEOUT,
        "heartbeat timeout"
    )));
    assert!(ended(&out).is_empty());
    assert_eq!(s.stats().lag_evictions, 0);
    // The laptop wakes and resumes its session.
    let now = Instant::from_secs(40);
    let c2 = s.handle_connection(now, None, SessionId([2; 16]));
    let resume = format!(
        r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"],"session":"{}","delivered":0,"key":"{}"}}"#,
        ClientId([2; 16]).to_hex(),
        session.to_hex(),
        welcome.key.unwrap().to_hex()
    );
    s.handle_message(now, c2, Incoming::Text(&resume));
    assert!(welcome_of(&drain(&mut s)).unwrap().resumed);
    assert_eq!(
        s.session(session).unwrap().state,
        SessionState::Attached(c2)
    );
}

/// A laptop that sleeps through its probe's bound on an open connection
/// and wakes (its first frames come before the probe's `pong`, as its
/// overdue timers run before it reads) gets the bound anew: it keeps its
/// session and answers; a client still behind after that is evicted.
#[test]
fn a_client_waking_from_a_pause_gets_the_bound_anew() {
    for (sleep_ms, still_behind) in [(6_000, false), (26_000, false), (6_000, true)] {
        let mut s = lag_server();
        let (c, session) = open_json(&mut s, 1);
        s.join(Instant::ZERO, session, "room").unwrap();
        drain(&mut s);
        s.handle_timeout(Instant::from_secs(1));
        let nonce = probes_in(&drain(&mut s))[0].1;
        ack(&mut s, at_ms(1_010), c, 0);
        let wake = at_ms(1_010 + sleep_ms);
        s.handle_timeout(wake);
        assert!(ended(&drain(&mut s)).is_empty());
        // Awake: its own ping first, then (unless still behind) the pong.
        s.handle_message(wake, c, Incoming::Text(r#"{"t":"ping","nonce":7}"#));
        assert!(ended(&drain(&mut s)).is_empty(), "{sleep_ms} ms");
        if !still_behind {
            assert!(ended(&pong(&mut s, wake + Duration::from_millis(5), c, nonce)).is_empty());
            s.handle_timeout(wake + Duration::from_secs(10));
            assert!(s.session(session).is_some(), "{sleep_ms} ms");
            continue;
        }
        // Still behind 4 s after waking, and sending: evicted.
        let late = wake + Duration::from_secs(3);
        ack(&mut s, late, c, 0);
        s.handle_timeout(wake + Duration::from_secs(4));
        let ends = ended(&drain(&mut s));
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0].1, SessionEnd::SlowConsumer);
    }
}

/// An overdue probe with nothing heard lately: a first gap longer than
/// `max_lag / 2` may be a pause and gives the bound anew; after that the
/// client's next frame shows it awake and behind, and it is evicted then.
#[test]
fn an_overdue_probe_is_judged_at_the_next_frame() {
    let mut s = lag_server();
    let (c, session) = open_json(&mut s, 1);
    s.join(Instant::ZERO, session, "room").unwrap();
    drain(&mut s);
    s.handle_timeout(Instant::from_secs(1));
    assert_eq!(probes_in(&drain(&mut s)).len(), 1);
    let ping = |s: &mut Server, ms: u64| {
        s.handle_message(at_ms(ms), c, Incoming::Text(r#"{"t":"ping","nonce":1}"#));
        s.handle_timeout(at_ms(ms));
        ended(&drain(s))
    };
    // Its own pings only, every 2.4 s or so.
    assert!(ping(&mut s, 500).is_empty());
    assert!(ping(&mut s, 2_900).is_empty());
    s.handle_timeout(Instant::from_secs(5));
    assert!(
        ended(&drain(&mut s)).is_empty(),
        "not heard in the last 2 s"
    );
    assert!(ping(&mut s, 5_300).is_empty(), "a gap of 2.4 s: a pause");
    assert!(ping(&mut s, 7_200).is_empty());
    s.handle_timeout(at_ms(9_300));
    assert!(
        ended(&drain(&mut s)).is_empty(),
        "not heard in the last 2 s"
    );
    assert_eq!(
        s.session(session).unwrap().lag,
        Some(Duration::from_millis(8_300))
    );
    let ends = ping(&mut s, 9_600);
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].1, SessionEnd::SlowConsumer);
    assert_eq!(s.stats().lag_evictions, 1);
}

/// A connection in no room with nothing in flight is never probed, nor
/// woken for it; one with a message in flight is, until it has nothing
/// to measure again.
#[test]
fn an_idle_connection_gets_no_probe() {
    let mut s = lag_server();
    let (c, session) = open_json(&mut s, 1);
    // Only the idle deadline.
    assert_eq!(s.timers.len(), 2, "the hello's (stale) and the idle one");
    let mut t = Instant::ZERO;
    while t < Instant::from_secs(120) {
        t += Duration::from_secs(5);
        s.handle_message(t, c, Incoming::Text(r#"{"t":"ping","nonce":1}"#));
        s.handle_timeout(t);
        assert!(probes_in(&drain(&mut s)).is_empty());
        assert!(!s
            .timers
            .iter()
            .any(|std::cmp::Reverse((_, timer))| matches!(timer, ServerTimer::Lag(_))));
    }
    assert_eq!(s.stats().lag_probes, 0);
    assert_eq!(s.session(session).unwrap().lag, None);
    // A message in flight: probed.
    let p = Payload::json(b"1".to_vec()).unwrap();
    s.send(t, session, p).unwrap();
    let seq = msgs_in(&drain(&mut s))[0].0;
    s.handle_timeout(t + Duration::from_secs(1));
    let nonce = probes_in(&drain(&mut s))[0].1;
    ack(&mut s, t + Duration::from_secs(2), c, seq);
    pong(&mut s, t + Duration::from_secs(2), c, nonce);
    assert_eq!(
        s.session(session).unwrap().lag,
        Some(Duration::from_secs(1))
    );
    // Nothing to measure any more: one last look, then no timer.
    s.handle_timeout(t + Duration::from_secs(10));
    assert!(probes_in(&drain(&mut s)).is_empty());
    assert!(!s
        .timers
        .iter()
        .any(|std::cmp::Reverse((_, timer))| matches!(timer, ServerTimer::Lag(_))));
    assert_eq!(s.stats().lag_probes, 1);
}

/// `max_lag: None`: no probes, and a member as far behind as it likes
/// keeps its session.
#[test]
fn no_max_lag_no_probes() {
    let mut s = Server::new(ServerConfig {
        max_lag: None,
        ..ServerConfig::default()
    })
    .unwrap();
    let (c, session) = open_json(&mut s, 1);
    s.join(Instant::ZERO, session, "room").unwrap();
    drain(&mut s);
    let mut t = Instant::ZERO;
    let mut seq = 0;
    while t < Instant::from_secs(300) {
        t += Duration::from_secs(5);
        let p = Payload::json(b"1".to_vec()).unwrap();
        s.send(t, session, p).unwrap();
        seq += 1;
        // Reading far behind: acknowledging only the first half.
        ack(&mut s, t, c, seq / 2);
        s.handle_timeout(t);
        let out = drain(&mut s);
        assert!(probes_in(&out).is_empty());
        assert!(ended(&out).is_empty());
    }
    assert_eq!(s.stats().lag_probes, 0);
    assert_eq!(s.session(session).unwrap().lag, None);
}

/// A `pong` with another nonce (forged, or answering a server ping)
/// does not answer the probe: the member is still evicted.
#[test]
fn a_pong_with_another_nonce_does_not_answer_the_probe() {
    let mut s = lag_server();
    let (c, session) = open_json(&mut s, 1);
    s.join(Instant::ZERO, session, "room").unwrap();
    drain(&mut s);
    s.handle_timeout(Instant::from_secs(1));
    let nonce = probes_in(&drain(&mut s))[0].1;
    for forged in [0, 1, nonce - 1, nonce + 1, nonce ^ (1 << 52), 1_000] {
        pong(&mut s, at_ms(2_000), c, forged);
    }
    assert_eq!(
        s.session(session).unwrap().lag,
        Some(Duration::from_secs(1))
    );
    pong(&mut s, at_ms(4_900), c, nonce + 2);
    s.handle_timeout(Instant::from_secs(5));
    let ends = ended(&drain(&mut s));
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].1, SessionEnd::SlowConsumer);
}

/// What a connection's messages do is the same whether the server decodes
/// them ([`Server::handle_message`]) or a driver does with the decoder it
/// took ([`Server::take_decoder`], [`Server::handle_decoded`]), whatever
/// message the decoder is taken after: in the middle of a detached payload,
/// between undecodable frames, before one over the limit.
#[test]
fn messages_decoded_by_a_taken_decoder_do_what_they_do_in_the_server() {
    enum M {
        Text(String),
        Binary(Vec<u8>),
    }
    let text = |t: &str| M::Text(t.to_owned());
    let payload = r#"{"detached":true}"#;
    let sequence = [
        text(r#"{"t":"msg","seq":1,"id":1,"j":1}"#),
        M::Text(format!(
            r#"{{"t":"msg","seq":2,"id":2,"dj":{}}}"#,
            payload.len()
        )),
        M::Binary(payload.as_bytes().to_vec()),
        text(r#"{"t":"msg","seq":3,"id":3,"j":1,"op":"nope","r":"a"}"#),
        M::Binary(vec![0xff; 3]),
        text(
            r#"{"t":"batch","f":[{"t":"msg","seq":4,"id":4,"j":1},{"t":"msg","seq":5,"id":5,"j":2}]}"#,
        ),
        M::Binary(vec![0xff; 3]),
        text(r#"{"t":"msg","seq":6,"id":6,"j":1}"#),
        M::Binary(vec![0xff; 3]),
        M::Binary(vec![0xff; 3]),
        M::Text(format!(
            r#"{{"t":"msg","seq":7,"id":7,"j":"{}"}}"#,
            "x".repeat(5000)
        )),
    ];
    fn incoming(m: &M) -> Incoming<'_> {
        match m {
            M::Text(t) => Incoming::Text(t),
            M::Binary(b) => Incoming::Binary(b),
        }
    }
    let config = || ServerConfig {
        max_message_size: 4096,
        ..ServerConfig::default()
    };
    for split in 0..=sequence.len() {
        let mut by_server = Server::new(config()).unwrap();
        let mut by_driver = Server::new(config()).unwrap();
        let (a, _) = open_json(&mut by_server, 1);
        let b = by_driver.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
        assert!(
            by_driver.take_decoder(b).is_none(),
            "no decoder before the hello"
        );
        let hello = hello(&[1], &["json"]);
        by_driver.handle_message(Instant::ZERO, b, Incoming::Text(&hello));
        drain(&mut by_driver);
        let mut decoder = None;
        let mut delivered = Vec::new();
        for (i, m) in sequence.iter().enumerate() {
            let now = Instant::from_millis(i as u64 + 1);
            if i == split {
                decoder = by_driver.take_decoder(b);
                assert!(
                    decoder.is_some(),
                    "split {split}: the decoder of an open connection"
                );
                assert!(by_driver.take_decoder(b).is_none(), "taken once");
            }
            by_server.handle_message(now, a, incoming(m));
            match decoder.as_mut() {
                Some(d) => by_driver.handle_decoded(now, b, d.decode(incoming(m))),
                None => by_driver.handle_message(now, b, incoming(m)),
            }
            let (x, y) = (drain(&mut by_server), drain(&mut by_driver));
            assert_eq!(
                format!("{x:?}"),
                format!("{y:?}"),
                "split {split}, message {i}"
            );
            delivered.extend(messages(&y).iter().map(|m| m.id.0));
        }
        assert_eq!(delivered, [1, 2, 4, 5, 6], "split {split}");
        assert_eq!(
            format!("{:?}", by_server.stats()),
            format!("{:?}", by_driver.stats()),
            "split {split}"
        );
    }
}

/// A join or leave the server took itself is acknowledged in the same
/// outputs as its answer (a stream member's `sub`), not by a standalone
/// `ack` after the delay: the connection that opens and joins writes once.
/// Not a refused one (its refusal reaches the client first), and not one
/// behind a message the application has yet to handle.
#[test]
fn a_room_operation_the_server_took_is_acknowledged_with_its_answer() {
    struct Quiet;
    impl crate::rooms::RoomPolicy for Quiet {
        fn authorize_join(&self, _: &crate::rooms::Member, room: &str) -> Result<(), String> {
            match room {
                "secret" => Err("members only".into()),
                _ => Ok(()),
            }
        }
        fn presence(&self, _: &str) -> bool {
            false
        }
    }
    let op = |seq: u64, op: &str, room: &str| {
        format!(r#"{{"t":"msg","seq":{seq},"id":{seq},"j":null,"r":"{room}","op":"{op}"}}"#)
    };
    let t = Instant::ZERO;
    let open = |config: ServerConfig| {
        let mut s = Server::new(config).unwrap();
        s.set_policy(Box::new(Quiet));
        let c = s.handle_connection(t, None, SessionId([1; 16]));
        s.handle_message(t, c, Incoming::Text(&hello_caps(&["stream"], None)));
        let id = welcome_of(&drain(&mut s)).unwrap().session;
        (s, c, id)
    };
    let (mut s, c, _) = open(ServerConfig::default());

    s.handle_message(t, c, Incoming::Text(&op(1, "join", "feed")));
    let frames = frames_of(&drain(&mut s));
    assert!(
        matches!(frames.as_slice(), [Frame::Sub(_), Frame::Ack { ack: 1 }]),
        "the join's `sub`, then its acknowledgment: {frames:?}"
    );
    s.handle_message(t, c, Incoming::Text(&op(2, "leave", "feed")));
    assert_eq!(acks(&drain(&mut s)), vec![2], "a leave, at once");

    // An application message still waits for the delay.
    s.handle_message(t, c, Incoming::Text(r#"{"t":"msg","seq":3,"id":3,"j":3}"#));
    assert_eq!(acks(&drain(&mut s)), Vec::<u64>::new());
    // A join after it acknowledges both.
    s.handle_message(t, c, Incoming::Text(&op(4, "join", "feed")));
    assert_eq!(acks(&drain(&mut s)), vec![4]);

    // A refused join: its refusal, and no acknowledgment covering it.
    s.handle_message(t, c, Incoming::Text(&op(5, "join", "secret")));
    let out = drain(&mut s);
    assert_eq!(refusals(&out).len(), 1);
    assert!(acks(&out).iter().all(|&a| a < 5), "{:?}", acks(&out));

    // Behind a message the application has not handled, nothing is
    // acknowledged until it has.
    let (mut s, c, id) = open(ServerConfig {
        acknowledge: crate::config::Acknowledge::AfterHandled,
        ..ServerConfig::default()
    });
    s.handle_message(t, c, Incoming::Text(r#"{"t":"msg","seq":1,"id":1,"j":1}"#));
    s.handle_message(t, c, Incoming::Text(&op(2, "join", "feed")));
    assert_eq!(acks(&drain(&mut s)), Vec::<u64>::new());
    s.handled(t, id, 1).unwrap();
    s.handle_timeout(Instant::from_secs(1));
    assert_eq!(acks(&drain(&mut s)), vec![2]);
}

/// The rooms a `hello` lists are joined when it opens a new session:
/// their answers follow the `welcome`, nothing is acknowledged for them,
/// a refusal names id 0, a resumed session keeps the rooms it had and
/// ignores the list, and one whose session was lost gets them in the new
/// session.
#[test]
fn the_rooms_a_hello_lists_are_joined_with_a_new_session() {
    struct Policy;
    impl crate::rooms::RoomPolicy for Policy {
        fn authorize_join(&self, _: &crate::rooms::Member, room: &str) -> Result<(), String> {
            match room {
                "secret" => Err("members only".into()),
                _ => Ok(()),
            }
        }
        fn presence(&self, room: &str) -> bool {
            room == "lobby"
        }
    }
    let hello = |join: &str, resume: Option<(SessionId, ResumeKey)>| {
        let h = hello_caps(&["stream"], resume);
        format!(r#"{},"join":{join}}}"#, &h[..h.len() - 1])
    };
    let t = Instant::ZERO;
    let mut s = Server::new(ServerConfig::default()).unwrap();
    s.set_policy(Box::new(Policy));
    let c = s.handle_connection(t, None, SessionId([1; 16]));
    s.handle_message(
        t,
        c,
        Incoming::Text(&hello(r#"["feed","secret","lobby"]"#, None)),
    );
    let out = drain(&mut s);
    let w = welcome_of(&out).unwrap();
    assert!(w.features.iter().any(|f| f == wire::FEATURE_JOIN));
    let frames = frames_of(&out);
    // The welcome, then each room's answer in the order listed: `feed`'s
    // `sub`; `secret` refused by id 0; `lobby`'s `sub`, the skip of the
    // diff announcing the joiner, and the snapshot.
    match frames.as_slice() {
        [Frame::Welcome(_), Frame::Sub(feed), Frame::Msg(refused), Frame::Sub(lobby), Frame::Skip { .. }, Frame::Msg(snapshot)] =>
        {
            assert_eq!((&*feed.room, &*lobby.room), ("feed", "lobby"));
            assert_eq!(refused.kind, MsgKind::RefusedMessage(0));
            assert_eq!(refused.room.as_deref(), Some("secret"));
            assert_eq!(snapshot.kind, MsgKind::Presence);
            assert_eq!(
                snapshot.ack,
                Some(0),
                "nothing of the client's acknowledged"
            );
        }
        other => panic!("{other:?}"),
    }
    let (_, id, refusal) = refusals(&out).remove(0);
    assert_eq!((id, refusal.op.as_str()), (0, "join"));
    let joined: Vec<String> = out
        .iter()
        .filter_map(|o| match o {
            ServerOutput::Event(ServerEvent::Joined { room, .. }) => Some(room.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(joined, ["feed", "lobby"]);
    assert!(out.iter().any(|o| matches!(
        o,
        ServerOutput::Event(ServerEvent::Refused {
            op: RoomOp::Join,
            ..
        })
    )));
    // The client's first message is its number 1, and is acknowledged as
    // such: the joins took no number.
    s.handle_message(t, c, Incoming::Text(r#"{"t":"msg","seq":1,"id":1,"j":1}"#));
    assert_eq!(messages(&drain(&mut s)).len(), 1);
    s.handle_timeout(Instant::from_secs(1));
    assert_eq!(acks(&drain(&mut s)), vec![1]);

    // Resumed: the session keeps `feed` and `lobby`, and `other` is not
    // joined.
    let session = w.session;
    let key = w.key.unwrap();
    s.handle_connection_closed(t, c, None);
    drain(&mut s);
    let c2 = s.handle_connection(t, None, SessionId([2; 16]));
    s.handle_message(
        t,
        c2,
        Incoming::Text(&hello(r#"["other"]"#, Some((session, key)))),
    );
    let out = drain(&mut s);
    assert!(welcome_of(&out).unwrap().resumed);
    assert!(!out.iter().any(|o| matches!(
        o,
        ServerOutput::Event(ServerEvent::Joined { .. } | ServerEvent::Refused { .. })
    )));
    let mut rooms = s.rooms_of(session);
    rooms.sort_unstable();
    assert_eq!(rooms, [Arc::from("feed"), Arc::from("lobby")]);

    // Lost (a wrong key): the new session joins what the hello lists.
    let c3 = s.handle_connection(t, None, SessionId([3; 16]));
    s.handle_message(
        t,
        c3,
        Incoming::Text(&hello(r#"["other"]"#, Some((session, ResumeKey([9; 16]))))),
    );
    let out = drain(&mut s);
    let w3 = welcome_of(&out).unwrap();
    assert_eq!(
        (w3.resumed, w3.lost.as_deref()),
        (false, Some("unknown_session"))
    );
    assert_eq!(s.rooms_of(w3.session), [Arc::from("other")]);
}

#[test]
fn a_rooms_sessions_are_listed_in_order_whatever_the_order_of_joins() {
    let mut s = Server::new(ServerConfig::default()).unwrap();
    // Opened and joined in an order that is neither the ids' nor its
    // reverse, with a leave and a join again among them.
    let order = [7u8, 2, 9, 4, 1, 8, 3, 6, 5];
    let sessions: Vec<SessionId> = order.iter().map(|&i| open_json(&mut s, i).1).collect();
    for &session in &sessions {
        s.join(Instant::ZERO, session, "lobby").unwrap();
    }
    s.leave(Instant::ZERO, sessions[3], "lobby");
    s.join(Instant::ZERO, sessions[3], "lobby").unwrap();
    drain(&mut s);
    let mut expected = sessions.clone();
    expected.sort();
    assert_eq!(s.member_sessions("lobby"), expected);
    assert_eq!(s.room_size("lobby"), sessions.len());
    let members = s.members("lobby");
    assert_eq!(members.len(), sessions.len());
    assert!(members.windows(2).all(|w| w[0] <= w[1]), "{members:?}");
}
