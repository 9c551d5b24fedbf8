//! What a browser page's life asks of the machines (the JavaScript driver
//! in `adapters/web` feeds these inputs): the network going away and
//! coming back, a session carried across a page reload by a snapshot, and
//! server pings for a page whose own timers are held back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;

use kitestring_conformance::sim::{LinkConfig, Reachability, Sim};
use kitestring_core::backoff::BackoffConfig;
use kitestring_core::client::{Client, Event, FailReason, Snapshot, State};
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::server::{Server, ServerEvent, ServerOutput};
use kitestring_core::wire::{self, Frame, Incoming, Limits, Payload, SessionId};
use kitestring_core::Instant;

fn config(max_attempts: u32) -> ClientConfig {
    ClientConfig {
        backoff: BackoffConfig {
            max_attempts: Some(max_attempts),
            ..BackoffConfig::default()
        },
        ..ClientConfig::default()
    }
}

fn open_sim(config: ClientConfig) -> Sim {
    let mut sim = Sim::new(ServerConfig::default(), LinkConfig::default(), 5);
    sim.add_client(config, 9);
    sim.connect(0);
    assert!(sim.run_while(Duration::from_secs(5), |s| s.state(0) != &State::Open));
    sim
}

#[test]
fn attempts_while_offline_do_not_count_and_the_network_coming_back_reconnects_at_once() {
    // The control: three refused attempts and the client gives up.
    let mut sim = open_sim(config(3));
    sim.reachability = Reachability::Refused;
    sim.cut(0);
    sim.run_for(Duration::from_secs(120));
    assert!(
        matches!(
            sim.state(0),
            State::Failed {
                reason: FailReason::TooManyAttempts { .. }
            }
        ),
        "{:?}",
        sim.state(0)
    );

    // Offline: 50 s of refused attempts (within the server's 60 s grace),
    // none counted.
    let mut sim = open_sim(config(3));
    sim.with_client(0, |c, now| c.handle_network(now, false));
    sim.reachability = Reachability::Refused;
    sim.cut(0);
    sim.run_for(Duration::from_secs(50));
    assert!(
        matches!(sim.state(0), State::Reconnecting { .. }),
        "{:?}",
        sim.state(0)
    );
    assert_eq!(sim.peers[0].client.failures(), 0);
    let attempts = sim.peers[0].client.stats().connects;
    assert!(attempts > 20, "it kept trying: {attempts}");
    // Back online: the next attempt starts now, not after the delay.
    sim.reachability = Reachability::Up;
    let back = sim.now;
    sim.with_client(0, |c, now| c.handle_network(now, true));
    assert!(
        matches!(sim.state(0), State::Connecting { .. }),
        "{:?}",
        sim.state(0)
    );
    assert!(sim.run_while(Duration::from_secs(5), |s| s.state(0) != &State::Open));
    assert!(sim.now.saturating_duration_since(back) < Duration::from_millis(200));
    let resumed = sim.peers[0]
        .events
        .iter()
        .filter(|(_, e)| matches!(e, Event::Connected { resumed: true, .. }))
        .count();
    assert_eq!(resumed, 1, "the session survived the outage");

    // An attempt begun offline that hangs is replaced as the network returns.
    let mut sim = open_sim(config(3));
    sim.with_client(0, |c, now| c.handle_network(now, false));
    sim.reachability = Reachability::Hang;
    sim.cut(0);
    sim.run_for(Duration::from_secs(3));
    assert!(
        matches!(sim.state(0), State::Connecting { .. }),
        "{:?}",
        sim.state(0)
    );
    sim.reachability = Reachability::Up;
    let back = sim.now;
    sim.with_client(0, |c, now| c.handle_network(now, true));
    assert!(sim.run_while(Duration::from_secs(5), |s| s.state(0) != &State::Open));
    assert!(sim.now.saturating_duration_since(back) < Duration::from_millis(200));
}

fn numbered(n: u64) -> Payload {
    Payload::json(format!("{{\"n\":{n}}}").into_bytes()).unwrap()
}

fn number(p: &Payload) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(p.data()).unwrap();
    v["n"].as_u64().unwrap()
}

#[test]
fn a_suspended_session_resumes_after_the_process_and_loses_nothing() {
    let mut sim = open_sim(ClientConfig::default());
    let session = sim.session(0).unwrap();
    // Two messages each way get through, then the link goes silent with
    // five more each way in flight, and three queued on the client.
    for n in 1..=2 {
        sim.client_send(0, numbered(n)).unwrap();
        sim.server_send(session, numbered(n)).unwrap();
    }
    sim.run_for(Duration::from_secs(1));
    sim.blackhole(0);
    for n in 3..=7 {
        sim.client_send(0, numbered(n)).unwrap();
        sim.server_send(session, numbered(n)).unwrap();
    }
    sim.run_for(Duration::from_millis(500));
    let snapshot = sim.with_client(0, |c, now| c.suspend(now));
    assert_eq!(sim.state(0), &State::Closed { code: 4000.into() });
    // The page is gone; a new one reads the snapshot back.
    let text = serde_json::to_string(&snapshot).unwrap();
    // The hand-written JSON form is serde's, both ways.
    assert_eq!(snapshot.to_json(), text);
    assert_eq!(Snapshot::from_json(&text).unwrap(), snapshot);
    let snapshot: Snapshot = serde_json::from_str(&text).unwrap();
    assert_eq!(snapshot.pending().len(), 5);
    let restored = Client::restore(ClientConfig::default(), &snapshot, 10).unwrap();
    sim.peers[0].client = restored;
    sim.heal();
    for n in 8..=10 {
        sim.client_send(0, numbered(n)).unwrap();
    }
    sim.connect(0);
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.state(0), &State::Open);
    assert_eq!(sim.session(0), Some(session), "the same session");
    let to_server: Vec<u64> = sim
        .server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::Message { message, .. } => Some(number(&message.payload)),
            _ => None,
        })
        .collect();
    assert_eq!(
        to_server,
        (1..=10).collect::<Vec<_>>(),
        "each once, in order"
    );
    let to_client: Vec<u64> = sim.peers[0]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Message(m) => Some(number(&m.payload)),
            _ => None,
        })
        .collect();
    assert_eq!(
        to_client,
        (1..=7).collect::<Vec<_>>(),
        "each once, in order"
    );
    assert!(!sim.peers[0]
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::SessionLost { .. })));
}

#[test]
fn a_snapshot_that_does_not_fit_is_refused() {
    let mut sim = open_sim(ClientConfig::default());
    let snapshot = sim.with_client(0, |c, now| c.suspend(now));
    let mut v = serde_json::to_value(&snapshot).unwrap();
    v["session"] = "xyz".into();
    let bad: Snapshot = serde_json::from_value(v).unwrap();
    assert!(Client::restore(ClientConfig::default(), &bad, 1).is_err());
}

#[test]
fn the_server_pings_clients_that_ask() {
    const LIMITS: Limits = Limits {
        max_message: 1 << 20,
        version: 1,
    };
    let mut s = Server::new(ServerConfig::default()).unwrap();
    let hello = |caps: &str, client: &str| {
        format!(
            r#"{{"t":"hello","versions":[1],"client":"{client}","caps":[{caps}],"codecs":["json"]}}"#
        )
    };
    let pinged = s.handle_connection(Instant::ZERO, None, SessionId([1; 16]));
    s.handle_message(
        Instant::ZERO,
        pinged,
        Incoming::Text(&hello(r#""ping""#, &"a1".repeat(16))),
    );
    let plain = s.handle_connection(Instant::ZERO, None, SessionId([2; 16]));
    s.handle_message(
        Instant::ZERO,
        plain,
        Incoming::Text(&hello("", &"b2".repeat(16))),
    );
    while s.poll_output().is_some() {}
    let mut pings = [0, 0];
    // A minute, the clients answering every ping at once.
    let mut now = Instant::ZERO;
    while now < Instant::from_secs(61) {
        now = s.poll_timeout().unwrap().at;
        s.handle_timeout(now);
        while let Some(o) = s.poll_output() {
            if let ServerOutput::Transmit(conn, t) = o {
                if let Ok(Frame::Ping { nonce }) = wire::decode(t.as_incoming(), &LIMITS) {
                    pings[usize::from(conn != pinged)] += 1;
                    let pong = format!(r#"{{"t":"pong","nonce":{nonce}}}"#);
                    s.handle_message(now, conn, Incoming::Text(&pong));
                }
            }
        }
        // The other client keeps itself alive with its own pings.
        let ping = r#"{"t":"ping","nonce":1}"#;
        s.handle_message(now, plain, Incoming::Text(ping));
    }
    assert_eq!(pings, [3, 0], "every 20 s, only to the client that asked");
    assert!(
        s.session_of(pinged).is_some(),
        "answered pings keep it open"
    );
}
