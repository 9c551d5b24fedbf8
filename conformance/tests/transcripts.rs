//! Golden transcripts: the exact output sequence of the standard client
//! lifecycles, pinned in `tests/golden/`. A behaviour change shows up as a
//! diff; rerun with `KITESTRING_BLESS=1` only when the change is intended.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;

use kitestring_conformance::script::{assert_golden, Script};
use kitestring_conformance::sim::{LinkConfig, Reachability, Sim};
use kitestring_core::client::{Event, FailReason, State, TransportError};
use kitestring_core::close::CloseCode;
use kitestring_core::config::{ClientConfig, QueueConfig, ServerConfig};
use kitestring_core::reliable::SendError;
use kitestring_core::wire::{Codec, Frame, Payload, Reject, SessionId};

const SESSION: SessionId = SessionId([0x5e; 16]);

fn json(s: &str) -> Payload {
    Payload::json(s.as_bytes().to_vec()).unwrap()
}

#[test]
fn connect_open_ping_pong() {
    let mut s = Script::new(ClientConfig::default());
    s.client.connect(s.now).unwrap();
    s.drain();
    s.advance(Duration::from_millis(20));
    s.open();
    s.advance(Duration::from_millis(20));
    s.welcome(SESSION, false, 0);
    s.advance(Duration::from_secs(30));
    let Some(Frame::Ping { nonce }) = s.sent.last().cloned() else {
        panic!("expected a ping, sent {:?}", s.sent.last())
    };
    s.advance(Duration::from_millis(35));
    s.recv(&Frame::Pong { nonce }, Codec::Json);
    s.advance(Duration::from_secs(30));
    assert!(matches!(s.client.state(), State::Open));
    assert_eq!(s.client.rtt(), Some(Duration::from_millis(35)));
    assert_golden("connect_open_ping_pong", &s.transcript());
}

#[test]
fn drop_backoff_reconnect() {
    let mut s = Script::new(ClientConfig::default());
    s.client.connect(s.now).unwrap();
    s.drain();
    s.open();
    s.welcome(SESSION, false, 0);
    s.advance(Duration::from_secs(20));
    // The server goes away; the first retry is refused, the second succeeds.
    s.closed(Some(CloseCode::SERVICE_RESTART));
    s.next_timeout();
    s.error(TransportError::Io("connection refused".into()));
    s.next_timeout();
    s.open();
    s.welcome(SESSION, true, 0);
    assert_eq!(s.client.state(), &State::Open);
    assert_golden("drop_backoff_reconnect", &s.transcript());
}

/// How long after its failure the client's next attempt starts.
fn next_attempt_after(s: &Script) -> Duration {
    match s.client.state() {
        State::Reconnecting { at, .. } => at.saturating_duration_since(s.now),
        other => panic!("reconnecting expected, the client is {other:?}"),
    }
}

/// A client making its first attempt.
fn connecting() -> Script {
    let mut s = Script::new(ClientConfig::default());
    s.client.connect(s.now).unwrap();
    s.drain();
    s
}

#[test]
fn a_server_that_says_later_is_waited_for_as_its_answer_says() {
    // The first backoff: 1 s plus up to 50 % jitter.
    let backoff = Duration::from_millis(1_500);
    // A 503 without Retry-After (a session moving between servers, a
    // proxy's) backs off as any failed attempt.
    let mut s = connecting();
    s.error(TransportError::Http {
        status: 503,
        retry_after: None,
    });
    assert!(
        next_attempt_after(&s) <= backoff,
        "{:?}",
        next_attempt_after(&s)
    );
    let mut s = connecting();
    s.error(TransportError::Http {
        status: 429,
        retry_after: None,
    });
    assert!(next_attempt_after(&s) <= backoff);
    // With Retry-After, no sooner.
    let mut s = connecting();
    s.error(TransportError::Http {
        status: 503,
        retry_after: Some(Duration::from_secs(7)),
    });
    let wait = next_attempt_after(&s);
    assert!(
        wait >= Duration::from_secs(7) && wait <= Duration::from_secs(11),
        "{wait:?}"
    );
    // In-band, "later" without a hint waits at least `try_later_delay`.
    let mut s = connecting();
    s.open();
    s.closed(Some(CloseCode::TRY_AGAIN_LATER));
    assert!(next_attempt_after(&s) >= Duration::from_secs(10));
    // A 4429 `reject` waits its `retry`, not the 10 s.
    let mut s = connecting();
    s.open();
    s.recv(
        &Frame::Reject(Reject {
            code: 4429,
            reason: "try_later".into(),
            message: "the session is moving".into(),
            versions: vec![],
            retry_after_ms: Some(1_000),
        }),
        Codec::Json,
    );
    let wait = next_attempt_after(&s);
    assert!(
        wait >= Duration::from_secs(1) && wait <= backoff,
        "{wait:?}"
    );
}

#[test]
fn version_mismatch_fails_without_retrying() {
    let mut s = Script::new(ClientConfig::default());
    s.client.connect(s.now).unwrap();
    s.drain();
    s.open();
    s.recv(
        &Frame::Reject(Reject {
            code: 4001,
            reason: "unsupported_version".into(),
            message: "client offered [1], server speaks [2]".into(),
            versions: vec![2],
            retry_after_ms: None,
        }),
        Codec::Json,
    );
    let lines = s.lines.len();
    s.advance(Duration::from_secs(3600));
    assert_eq!(
        s.lines.len(),
        lines,
        "no retry storm: nothing happens after failing"
    );
    assert_eq!(
        s.client.state(),
        &State::Failed {
            reason: FailReason::UnsupportedVersion {
                offered: vec![1],
                supported: vec![2]
            }
        }
    );
    assert_golden("version_mismatch", &s.transcript());
}

#[test]
fn heartbeat_timeout_detects_a_half_open_link() {
    let mut sim = Sim::new(
        ServerConfig {
            codecs: vec![Codec::Json],
            ..ServerConfig::default()
        },
        LinkConfig::default(),
        3,
    );
    let c = sim.add_client(ClientConfig::default(), 3);
    sim.peers[c].record = true;
    sim.connect(c);
    sim.run_for(Duration::from_secs(1));
    let cut_at = sim.now;
    sim.blackhole(c);
    let detected = sim.run_while(Duration::from_secs(120), |sim| sim.state(c) == &State::Open);
    assert!(detected);
    // Interval 20 s + pong timeout 10 s + grace 1 s, counted from the last
    // ping before the link went silent.
    let took = sim.now.saturating_duration_since(cut_at);
    assert!(took <= Duration::from_secs(31), "detected after {took:?}");
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.state(c), &State::Open, "recovered on a new connection");
    let transcript = sim.peers[c].transcript.join("\n") + "\n";
    assert_golden("heartbeat_timeout", &transcript);
}

#[test]
fn flapping_server_backs_off_and_fails() {
    let mut s = Script::new(ClientConfig::default());
    s.client.connect(s.now).unwrap();
    s.drain();
    let mut starts = Vec::new();
    loop {
        s.open();
        let resumed = s.client.session().is_some();
        s.welcome(SESSION, resumed, 0);
        // Accepted, then dropped at once.
        s.closed(None);
        if matches!(s.client.state(), State::Failed { .. }) {
            break;
        }
        let before = s.now;
        s.next_timeout();
        starts.push(s.now.saturating_duration_since(before));
        assert!(starts.len() <= 10, "more than max_attempts retries");
    }
    assert_eq!(starts.len(), 10);
    let cfg = ClientConfig::default().backoff;
    for (i, d) in starts.iter().enumerate() {
        let (lo, hi) = cfg.bounds(i as u32 + 1);
        assert!(
            lo <= *d && *d <= hi,
            "retry {}: {d:?} outside {lo:?}..={hi:?}",
            i + 1
        );
    }
    assert!(matches!(
        s.client.state(),
        State::Failed {
            reason: FailReason::TooManyAttempts { attempts: 10, .. }
        }
    ));
    assert_golden("flapping_server", &s.transcript());
}

#[test]
fn offline_queue_full_refuses_and_flushes_in_order() {
    let mut s = Script::new(ClientConfig {
        queue: QueueConfig {
            max_messages: 3,
            max_bytes: 1 << 20,
        },
        ..ClientConfig::default()
    });
    for i in 1..=3 {
        s.client
            .send(s.now, json(&format!("{{\"n\":{i}}}")))
            .unwrap();
    }
    let err = s.client.send(s.now, json("{\"n\":4}")).unwrap_err();
    assert_eq!(
        err,
        SendError::QueueFull {
            messages: 3,
            bytes: 21
        }
    );
    s.client.connect(s.now).unwrap();
    s.drain();
    s.open();
    s.welcome(SESSION, false, 0);
    let sent: Vec<u64> = s
        .sent
        .iter()
        .filter_map(|f| match f {
            Frame::Msg(m) => Some(m.id),
            _ => None,
        })
        .collect();
    assert_eq!(sent, vec![1, 2, 3]);
    assert_golden("offline_queue_full", &s.transcript());
}

#[test]
fn connect_timeout_counts_as_a_failed_attempt() {
    let mut sim = Sim::new(ServerConfig::default(), LinkConfig::default(), 5);
    sim.reachability = Reachability::Hang;
    let c = sim.add_client(ClientConfig::default(), 5);
    sim.connect(c);
    sim.run_for(Duration::from_secs(10));
    assert!(
        matches!(sim.state(c), State::Reconnecting { attempt: 1, .. }),
        "{:?}",
        sim.state(c)
    );
    sim.reachability = Reachability::Up;
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.state(c), &State::Open);
}

#[test]
fn auth_failure_is_terminal_without_a_token_source() {
    let mut sim = Sim::new(ServerConfig::default(), LinkConfig::default(), 6);
    sim.reachability = Reachability::Http(401);
    let c = sim.add_client(ClientConfig::default(), 6);
    sim.connect(c);
    sim.run_for(Duration::from_secs(60));
    assert_eq!(
        sim.state(c),
        &State::Failed {
            reason: FailReason::Unauthorized
        }
    );
    // With a token source, one immediate retry, then terminal.
    let d = sim.add_client(
        ClientConfig {
            can_refresh_token: true,
            ..ClientConfig::default()
        },
        7,
    );
    sim.connect(d);
    sim.run_for(Duration::from_secs(60));
    let connects = sim.peers[d]
        .events
        .iter()
        .filter(|(_, e)| {
            matches!(
                e,
                Event::StateChanged {
                    new: State::Connecting { .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(connects, 2);
    assert_eq!(
        sim.state(d),
        &State::Failed {
            reason: FailReason::Unauthorized
        }
    );
}
