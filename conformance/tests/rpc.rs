//! Request and response over reliable messages: correlation, timeouts,
//! cancellation, late responses, resume and session loss.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;

use kitestring_conformance::sim::{LinkConfig, Reachability, Sim};
use kitestring_core::client::{Event, RequestError, State};
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::server::ServerEvent;
use kitestring_core::wire::{Codec, Payload, SessionId};

fn json(s: &str) -> Payload {
    Payload::json(s.as_bytes().to_vec()).unwrap()
}

fn pair(seed: u64) -> (Sim, usize, SessionId) {
    let mut sim = Sim::new(
        ServerConfig {
            codecs: vec![Codec::Json],
            ..ServerConfig::default()
        },
        LinkConfig::default(),
        seed,
    );
    let c = sim.add_client(ClientConfig::default(), seed);
    sim.connect(c);
    sim.run_for(Duration::from_secs(1));
    let s = sim.session(c).unwrap();
    (sim, c, s)
}

/// Requests the server application received, not yet answered.
fn server_requests(sim: &Sim) -> Vec<(SessionId, MessageId)> {
    sim.server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::Message { session, message } if message.request => {
                Some((*session, message.id))
            }
            _ => None,
        })
        .collect()
}

fn responses(sim: &Sim, c: usize) -> Vec<(MessageId, String)> {
    sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Response { request, response } => Some((
                *request,
                String::from_utf8_lossy(response.payload.data()).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn failures(sim: &Sim, c: usize) -> Vec<(MessageId, RequestError)> {
    sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::RequestFailed { request, error } => Some((*request, *error)),
            _ => None,
        })
        .collect()
}

#[test]
fn responses_are_correlated() {
    let (mut sim, c, session) = pair(1);
    let a = sim
        .with_client(c, |cl, now| {
            cl.request(now, json("\"a\""), Duration::from_secs(5))
        })
        .unwrap();
    let b = sim
        .with_client(c, |cl, now| {
            cl.request(now, json("\"b\""), Duration::from_secs(5))
        })
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    let reqs = server_requests(&sim);
    assert_eq!(reqs, vec![(session, a), (session, b)]);
    // Answer out of order.
    sim.with_server(|s, now| s.respond(now, session, b, json("\"B\"")))
        .unwrap();
    sim.with_server(|s, now| s.respond(now, session, a, json("\"A\"")))
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    assert_eq!(
        responses(&sim, c),
        vec![(b, "\"B\"".into()), (a, "\"A\"".into())]
    );
    assert_eq!(sim.peers[c].client.pending_requests(), 0);
    // Responses are not also delivered as plain messages.
    assert!(!sim.peers[c]
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::Message(_))));
}

#[test]
fn timeout_then_late_response_is_discarded_with_an_event() {
    let (mut sim, c, session) = pair(2);
    let r = sim
        .with_client(c, |cl, now| {
            cl.request(now, json("1"), Duration::from_secs(2))
        })
        .unwrap();
    sim.run_for(Duration::from_secs(3));
    assert_eq!(failures(&sim, c), vec![(r, RequestError::TimedOut)]);
    sim.with_server(|s, now| s.respond(now, session, r, json("2")))
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    assert!(responses(&sim, c).is_empty());
    assert!(sim.peers[c]
        .events
        .iter()
        .any(|(_, e)| matches!(e, Event::LateResponse { request } if *request == r)));
}

#[test]
fn cancelled_requests_get_no_response() {
    let (mut sim, c, session) = pair(3);
    let r = sim
        .with_client(c, |cl, now| {
            cl.request(now, json("1"), Duration::from_secs(2))
        })
        .unwrap();
    assert!(sim.with_client(c, |cl, now| cl.cancel_request(now, r)));
    assert!(!sim.with_client(c, |cl, now| cl.cancel_request(now, r)));
    sim.run_for(Duration::from_millis(100));
    sim.with_server(|s, now| s.respond(now, session, r, json("2")))
        .unwrap();
    sim.run_for(Duration::from_secs(5));
    assert!(responses(&sim, c).is_empty());
    assert!(failures(&sim, c).is_empty(), "cancelling is not a failure");
}

#[test]
fn a_request_in_flight_across_a_reconnect_is_answered_after_resume() {
    let (mut sim, c, session) = pair(4);
    let r = sim
        .with_client(c, |cl, now| {
            cl.request(now, json("1"), Duration::from_secs(30))
        })
        .unwrap();
    sim.run_for(Duration::from_millis(50));
    sim.cut(c);
    // The server answers while the client is away.
    sim.with_server(|s, now| s.respond(now, session, r, json("\"late but fine\"")))
        .unwrap();
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.state(c), &State::Open);
    assert_eq!(responses(&sim, c), vec![(r, "\"late but fine\"".into())]);
}

#[test]
fn session_loss_fails_sent_requests_and_keeps_queued_ones() {
    let (mut sim, c, _session) = pair(5);
    sim.reachability = Reachability::Refused;
    let sent = sim
        .with_client(c, |cl, now| {
            cl.request(now, json("1"), Duration::from_secs(600))
        })
        .unwrap();
    sim.run_for(Duration::from_millis(50));
    sim.restart_server(false);
    sim.run_for(Duration::from_millis(1));
    assert!(matches!(sim.state(c), State::Reconnecting { .. }));
    // Queued while disconnected: it will go out in the new session.
    let queued = sim
        .with_client(c, |cl, now| {
            cl.request(now, json("2"), Duration::from_secs(600))
        })
        .unwrap();
    sim.reachability = Reachability::Up;
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.state(c), &State::Open);
    for (t, e) in &sim.peers[c].events {
        eprintln!("{t:?} {e:?}");
    }
    assert_eq!(failures(&sim, c), vec![(sent, RequestError::SessionLost)]);
    let new_session = sim.session(c).unwrap();
    let in_new: Vec<_> = server_requests(&sim)
        .into_iter()
        .filter(|(s, _)| *s == new_session)
        .collect();
    assert_eq!(in_new, vec![(new_session, queued)]);
    sim.with_server(|s, now| s.respond(now, new_session, queued, json("3")))
        .unwrap();
    sim.run_for(Duration::from_millis(100));
    assert_eq!(responses(&sim, c), vec![(queued, "3".into())]);
}

#[test]
fn pending_requests_are_bounded() {
    let mut sim = Sim::new(ServerConfig::default(), LinkConfig::default(), 6);
    let c = sim.add_client(
        ClientConfig {
            max_pending_requests: 2,
            ..ClientConfig::default()
        },
        6,
    );
    for _ in 0..2 {
        sim.with_client(c, |cl, now| {
            cl.request(now, json("1"), Duration::from_secs(1))
        })
        .unwrap();
    }
    assert_eq!(
        sim.with_client(c, |cl, now| cl.request(
            now,
            json("1"),
            Duration::from_secs(1)
        )),
        Err(SendError::TooManyRequests { max: 2 })
    );
}
