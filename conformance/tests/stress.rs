//! Stress in the simulator: a thousand sessions cut at once all resume with
//! zero gaps and zero duplicates, in both directions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

use core::time::Duration;

use kitestring_conformance::sim::{LinkConfig, Sim};
use kitestring_core::client::{Event, State};
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::server::ServerEvent;
use kitestring_core::wire::{Codec, Payload};

const CLIENTS: usize = 1000;
const PER_CLIENT: u64 = 10;

#[test]
fn a_thousand_sessions_cut_at_once_all_resume() {
    let mut sim = Sim::new(
        ServerConfig {
            codecs: vec![Codec::MsgPack, Codec::Json],
            ..ServerConfig::default()
        },
        LinkConfig {
            latency: Duration::from_millis(5),
            jitter: Duration::from_millis(5),
            bandwidth: None,
        },
        99,
    );
    for i in 0..CLIENTS {
        sim.add_client(ClientConfig::default(), i as u64);
        sim.connect(i);
    }
    sim.run_for(Duration::from_secs(1));
    assert!((0..CLIENTS).all(|i| sim.state(i) == &State::Open));
    let sessions: Vec<_> = (0..CLIENTS).map(|i| sim.session(i).unwrap()).collect();
    // Half the traffic, then every connection dies at once, then the rest,
    // sent while everyone is reconnecting.
    let payload = |i: usize, k: u64| Payload::binary(format!("{i}:{k}").into_bytes());
    for k in 0..PER_CLIENT / 2 {
        for i in 0..CLIENTS {
            sim.client_send(i, payload(i, k)).unwrap();
            sim.server_send(sessions[i], payload(i, k)).unwrap();
        }
    }
    for i in 0..CLIENTS {
        sim.cut(i);
    }
    for k in PER_CLIENT / 2..PER_CLIENT {
        for i in 0..CLIENTS {
            sim.client_send(i, payload(i, k)).unwrap();
            sim.server_send(sessions[i], payload(i, k)).unwrap();
        }
    }
    sim.run_for(Duration::from_secs(60));

    let mut up: Vec<Vec<u64>> = vec![Vec::new(); CLIENTS];
    for (_, e) in &sim.server_events {
        if let ServerEvent::Message { message, .. } = e {
            let text = String::from_utf8_lossy(message.payload.data()).into_owned();
            let (i, k) = text.split_once(':').unwrap();
            up[i.parse::<usize>().unwrap()].push(k.parse().unwrap());
        }
    }
    let want: Vec<u64> = (0..PER_CLIENT).collect();
    let mut resumed = 0;
    for i in 0..CLIENTS {
        assert_eq!(sim.state(i), &State::Open, "client {i}");
        assert_eq!(
            sim.session(i),
            Some(sessions[i]),
            "client {i} kept its session"
        );
        assert_eq!(up[i], want, "client {i} up");
        let down: Vec<u64> = sim.peers[i]
            .events
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Message(m) => {
                    let text = String::from_utf8_lossy(m.payload.data()).into_owned();
                    text.split_once(':').map(|(_, k)| k.parse().unwrap())
                }
                _ => None,
            })
            .collect();
        assert_eq!(down, want, "client {i} down");
        resumed += sim.peers[i].client.stats().resumes;
    }
    assert_eq!(resumed, CLIENTS as u64);
    assert_eq!(sim.server.stats().delivery.duplicates, 0);
}
