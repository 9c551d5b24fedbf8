//! Reliable delivery across reconnects: duplicates, gaps, resume in both
//! directions with messages in flight, grace expiry, full buffers, stuck
//! connections, and resume by the wrong identity.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;

use kitestring_conformance::script::{assert_golden, Script};
use kitestring_conformance::sim::{LinkConfig, Reachability, Sim};
use kitestring_core::client::{Event, FailReason, LostReason, State};
use kitestring_core::config::{ClientConfig, QueueConfig, ServerConfig};
use kitestring_core::reliable::{MessageId, OverflowPolicy, ReliabilityConfig, SendError};
use kitestring_core::server::{ServerEvent, SessionEnd};
use kitestring_core::wire::{Codec, Frame, Msg, MsgKind, Payload, SessionId};

fn json(n: u64) -> Payload {
    Payload::json(format!("{{\"n\":{n}}}").into_bytes()).unwrap()
}

fn n_of(p: &Payload) -> u64 {
    let s = std::str::from_utf8(p.data()).unwrap();
    s.trim_start_matches("{\"n\":")
        .split([',', '}'])
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn json_server() -> ServerConfig {
    ServerConfig {
        codecs: vec![Codec::Json],
        ..ServerConfig::default()
    }
}

/// What the server application received from client `session`, in order.
fn server_got(sim: &Sim, session: SessionId) -> Vec<u64> {
    sim.server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::Message {
                session: s,
                message,
            } if *s == session => Some(n_of(&message.payload)),
            _ => None,
        })
        .collect()
}

/// What client `i`'s application received, in order.
fn client_got(sim: &Sim, i: usize) -> Vec<u64> {
    sim.peers[i]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Message(m) => Some(n_of(&m.payload)),
            _ => None,
        })
        .collect()
}

fn open_pair(seed: u64, client: ClientConfig, server: ServerConfig) -> (Sim, usize, SessionId) {
    let mut sim = Sim::new(server, LinkConfig::default(), seed);
    let c = sim.add_client(client, seed);
    sim.connect(c);
    assert!(sim.run_while(Duration::from_secs(5), |s| s.state(c) != &State::Open));
    let session = sim.session(c).unwrap();
    (sim, c, session)
}

#[test]
fn duplicate_after_reconnect_is_dropped_and_acked() {
    let (mut sim, c, session) = open_pair(1, ClientConfig::default(), json_server());
    sim.client_send(c, json(1)).unwrap();
    // The message reaches the server (20 ms), the ack would come back after
    // the 100 ms ack delay: cut before it does.
    sim.run_for(Duration::from_millis(50));
    assert_eq!(server_got(&sim, session), vec![1]);
    sim.cut(c);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.state(c), &State::Open);
    // The resume handshake told the client what the server delivered, so it
    // did not even need to retransmit; a retransmission would have been
    // dropped as a duplicate. Either way: exactly once.
    assert_eq!(server_got(&sim, session), vec![1]);
    let acked: Vec<_> = sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Acked { first, last } => Some((*first, *last)),
            _ => None,
        })
        .collect();
    assert_eq!(acked, vec![(MessageId(1), MessageId(1))]);
}

#[test]
fn duplicate_frame_on_the_wire_is_dropped() {
    let mut s = Script::new(ClientConfig::default());
    s.client.connect(s.now).unwrap();
    s.drain();
    s.open();
    s.welcome(SessionId([1; 16]), false, 0);
    let m = |seq| {
        Frame::Msg(Msg {
            seq,
            id: 100 + seq,
            ack: None,
            ts: None,
            kind: MsgKind::Plain,
            room: None,
            payload: json(seq),
        })
    };
    s.recv(&m(1), Codec::Json);
    s.recv(&m(1), Codec::Json);
    s.recv(&m(2), Codec::Json);
    let delivered: Vec<u64> = s
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![1, 2]);
    assert_eq!(s.client.stats().delivery.duplicates, 1);
    // The duplicate is acknowledged at once: the sender evidently missed an ack.
    assert!(s.sent.iter().any(|f| matches!(f, Frame::Ack { ack: 1 })));
}

#[test]
fn gap_asks_for_replay_once_and_recovers() {
    let mut s = Script::new(ClientConfig::default());
    s.client.connect(s.now).unwrap();
    s.drain();
    s.open();
    s.welcome(SessionId([2; 16]), false, 0);
    let m = |seq| {
        Frame::Msg(Msg {
            seq,
            id: seq,
            ack: None,
            ts: None,
            kind: MsgKind::Plain,
            room: None,
            payload: json(seq),
        })
    };
    s.recv(&m(1), Codec::Json);
    s.recv(&m(3), Codec::Json);
    s.recv(&m(4), Codec::Json);
    s.recv(&m(2), Codec::Json);
    s.recv(&m(3), Codec::Json);
    s.recv(&m(4), Codec::Json);
    let replays: Vec<_> = s
        .sent
        .iter()
        .filter(|f| matches!(f, Frame::Replay { .. }))
        .collect();
    assert_eq!(
        replays,
        vec![&Frame::Replay { from: 2 }],
        "one request per gap"
    );
    let delivered: Vec<u64> = s
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![1, 2, 3, 4]);
    assert_golden("gap_and_replay", &s.transcript());
}

#[test]
fn sender_replays_on_request() {
    let (mut sim, c, session) = open_pair(2, ClientConfig::default(), json_server());
    for n in 1..=3 {
        sim.server_send(session, json(n)).unwrap();
    }
    sim.run_for(Duration::from_secs(1));
    // A (buggy or hostile) client asks for everything again: nothing is
    // redelivered to the app, because the receiver already has it.
    let t = sim.peers[c].client.stats().delivery.messages_received;
    assert_eq!(t, 3);
    assert_eq!(client_got(&sim, c), vec![1, 2, 3]);
}

#[test]
fn resume_both_ways_with_messages_in_flight() {
    for cut_after in [0u64, 60, 130, 250, 400, 10_000] {
        let (mut sim, c, session) = open_pair(3, ClientConfig::default(), json_server());
        sim.cut_after(c, cut_after);
        for n in 1..=20 {
            sim.client_send(c, json(n)).unwrap();
            sim.server_send(session, json(100 + n)).unwrap();
            sim.run_for(Duration::from_millis(3));
        }
        sim.cut(c);
        for n in 21..=30 {
            sim.client_send(c, json(n)).unwrap();
            sim.server_send(session, json(100 + n)).unwrap();
        }
        sim.run_for(Duration::from_secs(10));
        assert_eq!(sim.state(c), &State::Open);
        assert_eq!(sim.session(c), Some(session), "resumed, not replaced");
        assert_eq!(
            server_got(&sim, session),
            (1..=30).collect::<Vec<_>>(),
            "cut after {cut_after} bytes"
        );
        assert_eq!(
            client_got(&sim, c),
            (101..=130).collect::<Vec<_>>(),
            "cut after {cut_after} bytes"
        );
        assert_eq!(sim.peers[c].client.unacknowledged(), (0, 0));
        assert_eq!(sim.server.session(session).unwrap().in_flight, 0);
    }
}

#[test]
fn grace_expiry_loses_the_session_and_names_unconfirmed_messages() {
    let (mut sim, c, session) = open_pair(4, ClientConfig::default(), json_server());
    sim.client_send(c, json(1)).unwrap();
    sim.run_for(Duration::from_secs(1));
    // Network down for longer than the 60 s grace period.
    sim.reachability = Reachability::Refused;
    sim.blackhole(c);
    sim.client_send(c, json(2)).unwrap();
    sim.server_send(session, json(900)).unwrap();
    sim.run_for(Duration::from_secs(50));
    sim.cut(c);
    sim.run_for(Duration::from_secs(60));
    let expired = sim.server_events.iter().any(|(_, e)| {
        matches!(e, ServerEvent::SessionEnded { session: s, reason: SessionEnd::Expired, unconfirmed } if *s == session && unconfirmed.len() == 1)
    });
    assert!(
        expired,
        "server expired the session, naming its undelivered message"
    );
    // Queued while down: never sent, so it must go out in the new session.
    sim.client_send(c, json(3)).unwrap();
    sim.reachability = Reachability::Up;
    sim.with_client(c, |cl, now| cl.reconnect(now)).ok();
    assert!(sim.run_while(Duration::from_secs(60), |s| s.state(c) != &State::Open));
    let lost: Vec<_> = sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::SessionLost {
                reason,
                unconfirmed,
                unsent,
            } => Some((reason.clone(), unconfirmed.clone(), unsent.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        lost,
        vec![(
            LostReason::NotResumed("unknown_session".into()),
            vec![MessageId(2)],
            vec![]
        )]
    );
    let new_session = sim.session(c).unwrap();
    assert_ne!(new_session, session);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(
        server_got(&sim, new_session),
        vec![3],
        "queued message went out in the new session"
    );
}

#[test]
fn server_restart_without_registry_reports_the_loss() {
    let (mut sim, c, session) = open_pair(5, ClientConfig::default(), json_server());
    sim.blackhole(c);
    sim.client_send(c, json(1)).unwrap();
    sim.run_for(Duration::from_millis(10));
    sim.restart_server(false);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.state(c), &State::Open);
    assert_ne!(sim.session(c), Some(session));
    assert!(sim.peers[c].events.iter().any(|(_, e)| matches!(
        e,
        Event::SessionLost { reason: LostReason::NotResumed(r), unconfirmed, .. } if r == "unknown_session" && unconfirmed == &vec![MessageId(1)]
    )));
}

#[test]
fn server_restart_with_registry_resumes() {
    let (mut sim, c, session) = open_pair(6, ClientConfig::default(), json_server());
    sim.blackhole(c);
    sim.client_send(c, json(1)).unwrap();
    sim.server_send(session, json(2)).unwrap();
    sim.run_for(Duration::from_millis(10));
    sim.restart_server(true);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.session(c), Some(session));
    assert_eq!(server_got(&sim, session), vec![1]);
    assert_eq!(client_got(&sim, c), vec![2]);
}

#[test]
fn retransmit_buffer_full_refuses_then_recovers() {
    let cfg = ClientConfig {
        queue: QueueConfig {
            max_messages: 2,
            max_bytes: 1 << 20,
        },
        reliability: ReliabilityConfig {
            window_messages: 3,
            ..ReliabilityConfig::default()
        },
        ..ClientConfig::default()
    };
    let (mut sim, c, session) = open_pair(7, cfg, json_server());
    sim.blackhole(c);
    for n in 1..=5 {
        sim.client_send(c, json(n)).unwrap();
    }
    assert_eq!(sim.peers[c].client.unacknowledged().0, 3);
    assert_eq!(sim.peers[c].client.queued().0, 2);
    assert!(matches!(
        sim.client_send(c, json(6)),
        Err(SendError::QueueFull { messages: 2, .. })
    ));
    sim.cut(c);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(server_got(&sim, session), vec![1, 2, 3, 4, 5]);
    sim.client_send(c, json(6)).unwrap();
    sim.run_for(Duration::from_secs(1));
    assert_eq!(server_got(&sim, session), vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn overflow_can_fail_the_session_instead() {
    let cfg = ClientConfig {
        queue: QueueConfig {
            max_messages: 1,
            max_bytes: 1 << 20,
        },
        reliability: ReliabilityConfig {
            window_messages: 1,
            overflow: OverflowPolicy::FailSession,
            ..ReliabilityConfig::default()
        },
        ..ClientConfig::default()
    };
    let (mut sim, c, session) = open_pair(8, cfg, json_server());
    sim.blackhole(c);
    sim.client_send(c, json(1)).unwrap();
    sim.client_send(c, json(2)).unwrap();
    assert_eq!(sim.client_send(c, json(3)), Err(SendError::SessionFailed));
    let lost = sim.peers[c].events.iter().find_map(|(_, e)| match e {
        Event::SessionLost {
            reason: LostReason::Overflow,
            unconfirmed,
            unsent,
        } => Some((unconfirmed.clone(), unsent.clone())),
        _ => None,
    });
    assert_eq!(lost, Some((vec![MessageId(1)], vec![MessageId(2)])));
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.state(c), &State::Open);
    assert_ne!(sim.session(c), Some(session), "a fresh session");
}

/// With the default timing a dead link is found by the heartbeat, on a
/// busy connection as on an idle one, within ping + pong + grace (31 s):
/// before the acknowledgment timeout (45 s without progress).
#[test]
fn a_dead_link_with_data_in_flight_is_found_by_the_heartbeat() {
    let (mut sim, c, session) = open_pair(9, ClientConfig::default(), json_server());
    sim.peers[c].record = true;
    sim.blackhole(c);
    let t0 = sim.now;
    sim.client_send(c, json(1)).unwrap();
    assert!(sim.run_while(Duration::from_secs(60), |s| s.state(c) == &State::Open));
    let took = sim.now.saturating_duration_since(t0);
    assert!(took <= Duration::from_secs(31), "found after {took:?}");
    assert!(sim.peers[c]
        .transcript
        .iter()
        .any(|l| l.contains("disconnect #1 4008")));
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.session(c), Some(session));
    assert_eq!(server_got(&sim, session), vec![1]);
}

/// A peer that answers pings but never acknowledges data (its side of the
/// stream stopped) is recycled after 45 s without progress (4010), and the
/// session resumes.
#[test]
fn ack_timeout_recycles_a_stuck_connection() {
    let (mut sim, c, session) = open_pair(9, ClientConfig::default(), json_server());
    sim.peers[c].record = true;
    let t0 = sim.now;
    // Numbered and sent, but the server never sees it: lost on a
    // connection that otherwise works (pings are answered).
    sim.drop_next_from_client(c);
    sim.client_send(c, json(1)).unwrap();
    assert!(sim.run_while(Duration::from_secs(120), |s| s.state(c) == &State::Open));
    let took = sim.now.saturating_duration_since(t0);
    assert!(
        took >= Duration::from_secs(45) && took <= Duration::from_secs(46),
        "ack timeout after {took:?}"
    );
    assert!(sim.peers[c]
        .transcript
        .iter()
        .any(|l| l.contains("disconnect #1 4010")));
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.session(c), Some(session));
    assert_eq!(server_got(&sim, session), vec![1]);
}

/// A slow link is not a dead one: a sender far above the link's rate whose
/// oldest message waits much longer than the acknowledgment timeout is
/// never closed while acknowledgments keep coming, and everything arrives
/// once, in order.
#[test]
fn a_slow_link_whose_acks_progress_is_never_closed_as_stuck() {
    let mut sim = Sim::new(
        json_server(),
        LinkConfig {
            latency: Duration::from_millis(200),
            jitter: Duration::ZERO,
            // 32 KB/s, about 256 kbit/s.
            bandwidth: Some(32_000),
        },
        11,
    );
    let c = sim.add_client(ClientConfig::default(), 11);
    sim.peers[c].record = true;
    sim.connect(c);
    assert!(sim.run_while(Duration::from_secs(10), |s| s.state(c) != &State::Open));
    let session = sim.session(c).unwrap();
    // 3 MB: about 95 s on the link, all of it in the window at once.
    let big = |n: u64| {
        Payload::json(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(3000)).into_bytes())
            .unwrap()
    };
    for n in 1..=1000 {
        sim.client_send(c, big(n)).unwrap();
    }
    sim.run_for(Duration::from_secs(150));
    let transcript = sim.peers[c].transcript.join("\n");
    assert!(
        !transcript.contains("disconnect #"),
        "closed as stuck:\n{}",
        &transcript[..transcript.len().min(4000)]
    );
    assert_eq!(sim.state(c), &State::Open);
    assert_eq!(server_got(&sim, session), (1..=1000).collect::<Vec<_>>());
}

#[test]
fn resume_by_another_identity_is_rejected() {
    let mut sim = Sim::new(json_server(), LinkConfig::default(), 10);
    let c = sim.add_client(ClientConfig::default(), 10);
    sim.peers[c].identity = Some("alice".into());
    sim.connect(c);
    sim.run_for(Duration::from_secs(1));
    let session = sim.session(c).unwrap();
    // The same session id presented by a connection authenticated as someone else.
    sim.peers[c].identity = Some("mallory".into());
    sim.cut(c);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(
        sim.state(c),
        &State::Failed {
            reason: FailReason::Forbidden
        }
    );
    assert_eq!(sim.server.stats().resumes_failed, 1);
    let info = sim.server.session(session).unwrap();
    assert_eq!(
        info.identity.as_deref(),
        Some("alice"),
        "the session still belongs to alice"
    );
    assert!(sim.server_events.iter().any(|(_, e)| matches!(
        e,
        ServerEvent::Rejected {
            reason: "session_forbidden",
            ..
        }
    )));
}

#[test]
fn half_open_old_connection_is_replaced_on_resume() {
    let (mut sim, c, session) = open_pair(11, ClientConfig::default(), json_server());
    sim.blackhole(c);
    sim.with_client(c, |cl, now| cl.reconnect(now)).unwrap();
    sim.run_for(Duration::from_secs(2));
    assert_eq!(sim.state(c), &State::Open);
    assert_eq!(sim.session(c), Some(session));
    assert_eq!(
        sim.server.connection_count(),
        1,
        "the half-open connection was dropped"
    );
}

#[test]
fn client_close_ends_the_server_session() {
    let (mut sim, c, session) = open_pair(12, ClientConfig::default(), json_server());
    sim.close(c);
    sim.run_for(Duration::from_secs(1));
    assert!(matches!(sim.state(c), State::Closed { .. }));
    assert!(sim.server.session(session).is_none());
    assert!(sim.server_events.iter().any(|(_, e)| matches!(
        e,
        ServerEvent::SessionEnded {
            reason: SessionEnd::ClientClosed,
            ..
        }
    )));
}

#[test]
fn reauthentication_keeps_or_closes_the_connection() {
    let (mut sim, c, session) = open_pair(13, ClientConfig::default(), json_server());
    let conn = sim.server.session(session).unwrap().connection.unwrap();
    sim.with_server(|s, now| s.request_reauth(now, conn, Duration::from_secs(5)));
    sim.run_for(Duration::from_millis(100));
    assert!(sim.peers[c].events.iter().any(
        |(_, e)| matches!(e, Event::TokenExpiring { within } if *within == Duration::from_secs(5))
    ));
    sim.with_client(c, |cl, now| cl.send_token(now, "fresh".into()))
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    let got = sim.server_events.iter().find_map(|(_, e)| match e {
        ServerEvent::TokenReceived {
            connection, token, ..
        } => Some((*connection, token.clone())),
        _ => None,
    });
    assert_eq!(got, Some((conn, "fresh".to_string())));
    sim.with_server(|s, now| s.accept_token(now, conn));
    sim.run_for(Duration::from_secs(10));
    assert_eq!(
        sim.server.session(session).unwrap().connection,
        Some(conn),
        "kept"
    );

    // No answer: closed with 4401; without a token source the client fails.
    sim.with_server(|s, now| s.request_reauth(now, conn, Duration::from_secs(1)));
    sim.run_for(Duration::from_secs(3));
    assert_eq!(
        sim.state(c),
        &State::Failed {
            reason: FailReason::Unauthorized
        }
    );
}

/// A payload of `len` bytes that names `n` and whose every byte depends on it.
fn big(n: u64, len: usize) -> Payload {
    let mut data = n.to_le_bytes().to_vec();
    data.extend((8..len).map(|i| (i as u64 * 31 + n) as u8));
    Payload::binary(data)
}

/// The `n` of every large payload received, each checked byte for byte.
fn big_ns<'a>(payloads: impl Iterator<Item = &'a Payload>) -> Vec<u64> {
    payloads
        .filter(|p| p.len() >= 8)
        .map(|p| {
            let n = u64::from_le_bytes(p.data()[..8].try_into().unwrap());
            assert_eq!(p, &big(n, p.len()), "payload {n} arrived damaged");
            n
        })
        .collect()
}

/// Large payloads go detached, in a message of their own after their
/// envelope, in both codecs and both directions; a connection cut between
/// an envelope and its payload loses neither: the pair is sent again on
/// resume, and everything arrives once, in order, intact.
#[test]
fn detached_payloads_survive_cuts_between_envelope_and_payload() {
    let sizes = [5000, 32, 16 * 1024, 4096, 4095, 70_000];
    // Cuts by bytes carried (inside the first envelopes and payloads), and
    // by time: at 1 MB/s a 16 KiB payload takes 16 ms on the wire, so cuts
    // a few milliseconds after the 20 ms latency fall between an envelope's
    // arrival and its payload's.
    let mut cuts: Vec<(Option<u64>, Option<u64>)> = [0u64, 150, 5100, 9000, 30_000, 100_000]
        .iter()
        .map(|b| (Some(*b), None))
        .collect();
    cuts.extend(
        [21u64, 23, 26, 30, 36, 41, 50, 90]
            .iter()
            .map(|ms| (None, Some(*ms))),
    );
    cuts.push((None, None));
    for codec in [Codec::Json, Codec::MsgPack] {
        for &(cut_after, cut_at) in &cuts {
            let server = ServerConfig {
                codecs: vec![codec, Codec::Json],
                ..ServerConfig::default()
            };
            let link = LinkConfig {
                bandwidth: Some(1_000_000),
                ..LinkConfig::default()
            };
            let mut sim = Sim::new(server, link, 8);
            let c = sim.add_client(ClientConfig::default(), 8);
            sim.connect(c);
            assert!(sim.run_while(Duration::from_secs(5), |s| s.state(c) != &State::Open));
            let session = sim.session(c).unwrap();
            sim.peers[c].record = true;
            if let Some(bytes) = cut_after {
                sim.cut_after(c, bytes);
            }
            for (n, len) in sizes.iter().enumerate() {
                let n = n as u64 + 1;
                sim.client_send(c, big(n, *len)).unwrap();
                sim.server_send(session, big(100 + n, *len)).unwrap();
            }
            if let Some(ms) = cut_at {
                sim.run_for(Duration::from_millis(ms));
                sim.cut(c);
            }
            sim.run_for(Duration::from_secs(10));
            let what = format!("{codec:?}, cut after {cut_after:?} bytes or {cut_at:?} ms");
            assert_eq!(sim.state(c), &State::Open, "{what}");
            assert_eq!(sim.session(c), Some(session), "{what}: resumed");
            let to_server = sim.server_events.iter().filter_map(|(_, e)| match e {
                ServerEvent::Message { message, .. } => Some(&message.payload),
                _ => None,
            });
            assert_eq!(big_ns(to_server), vec![1, 2, 3, 4, 5, 6], "{what}");
            let to_client = sim.peers[c].events.iter().filter_map(|(_, e)| match e {
                Event::Message(m) => Some(&m.payload),
                _ => None,
            });
            assert_eq!(
                big_ns(to_client),
                vec![101, 102, 103, 104, 105, 106],
                "{what}"
            );
            assert_eq!(sim.peers[c].client.unacknowledged(), (0, 0), "{what}");
            assert_eq!(sim.server.session(session).unwrap().in_flight, 0, "{what}");
            // Nothing was recovered by luck: a half-received pair is
            // forgotten with its connection, never taken for the next
            // connection's first message.
            assert_eq!(
                sim.peers[c].client.stats().traffic.decode_failures,
                0,
                "{what}"
            );
            assert_eq!(sim.server.stats().traffic.decode_failures, 0, "{what}");
            // The client sent its large payloads detached: as many binary
            // messages of exactly their size as there were such payloads
            // (more if a cut made it send some again).
            let detached = sim.peers[c]
                .transcript
                .iter()
                .filter(|l| {
                    [5000, 16384, 4096, 70_000]
                        .iter()
                        .any(|n| l.ends_with(&format!("binary {n} bytes")))
                })
                .count();
            assert!(detached >= 4, "{what}: {detached} detached payloads");
            if codec == Codec::Json {
                assert!(
                    sim.peers[c]
                        .transcript
                        .iter()
                        .any(|l| l.contains("\"db\":16384")),
                    "{what}"
                );
            }
        }
    }
}
