//! Batching: small messages produced close together share frames, the
//! receiver sees them one by one and in order, and a cut mid-batch loses
//! nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;

use kitestring_conformance::sim::{LinkConfig, Sim};
use kitestring_core::client::Event;
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::reliable::BatchConfig;
use kitestring_core::server::{Server, ServerEvent, ServerOutput};
use kitestring_core::wire::{self, ClientId, Codec, Frame, Incoming, Limits, Payload, SessionId};
use kitestring_core::Instant;

fn json(n: u64) -> Payload {
    Payload::json(format!("{n}").into_bytes()).unwrap()
}

fn batching_pair(codec: Codec, seed: u64) -> (Sim, usize, SessionId) {
    let batch = Some(BatchConfig {
        window: Duration::from_millis(5),
        max_messages: 16,
        max_bytes: 64 * 1024,
    });
    let mut sim = Sim::new(
        ServerConfig {
            codecs: vec![codec, Codec::Json],
            batch,
            ..ServerConfig::default()
        },
        LinkConfig::default(),
        seed,
    );
    let c = sim.add_client(
        ClientConfig {
            codecs: vec![codec, Codec::Json],
            batch,
            ..ClientConfig::default()
        },
        seed,
    );
    sim.connect(c);
    sim.run_for(Duration::from_secs(1));
    let s = sim.session(c).unwrap();
    (sim, c, s)
}

fn up(sim: &Sim) -> Vec<u64> {
    sim.server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::Message { message, .. } => Some(
                std::str::from_utf8(message.payload.data())
                    .unwrap()
                    .parse()
                    .unwrap(),
            ),
            _ => None,
        })
        .collect()
}

fn down(sim: &Sim, c: usize) -> Vec<u64> {
    sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Message(m) => Some(
                std::str::from_utf8(m.payload.data())
                    .unwrap()
                    .parse()
                    .unwrap(),
            ),
            _ => None,
        })
        .collect()
}

#[test]
fn bursts_share_frames_and_arrive_in_order() {
    for codec in [Codec::Json, Codec::MsgPack] {
        let (mut sim, c, session) = batching_pair(codec, 1);
        let frames_before = (
            sim.peers[c].client.stats().traffic.frames_out,
            sim.server.stats().traffic.frames_out,
        );
        for n in 1..=100 {
            sim.client_send(c, json(n)).unwrap();
            sim.server_send(session, json(n)).unwrap();
        }
        sim.run_for(Duration::from_secs(1));
        assert_eq!(up(&sim), (1..=100).collect::<Vec<_>>(), "{codec:?}");
        assert_eq!(down(&sim, c), (1..=100).collect::<Vec<_>>(), "{codec:?}");
        let client_frames = sim.peers[c].client.stats().traffic.frames_out - frames_before.0;
        let server_frames = sim.server.stats().traffic.frames_out - frames_before.1;
        // 100 messages in batches of at most 16, plus a few acks.
        assert!(
            client_frames <= 12,
            "{codec:?}: client sent {client_frames} frames"
        );
        assert!(
            server_frames <= 12,
            "{codec:?}: server sent {server_frames} frames"
        );
    }
}

#[test]
fn a_lone_message_waits_at_most_the_window() {
    let (mut sim, c, _) = batching_pair(Codec::Json, 2);
    let t0 = sim.now;
    sim.client_send(c, json(1)).unwrap();
    assert!(sim.run_while(Duration::from_secs(1), |s| up(s).is_empty()));
    // 5 ms window + 20 ms latency.
    assert_eq!(
        sim.now.saturating_duration_since(t0),
        Duration::from_millis(25)
    );
}

#[test]
fn a_cut_mid_batch_loses_nothing() {
    for cut_after in [0, 100, 300, 1000] {
        let (mut sim, c, session) = batching_pair(Codec::MsgPack, 3);
        sim.cut_after(c, cut_after);
        for n in 1..=40 {
            sim.client_send(c, json(n)).unwrap();
            sim.server_send(session, json(n)).unwrap();
            sim.run_for(Duration::from_millis(1));
        }
        sim.run_for(Duration::from_secs(10));
        assert_eq!(
            up(&sim),
            (1..=40).collect::<Vec<_>>(),
            "cut after {cut_after}"
        );
        assert_eq!(
            down(&sim, c),
            (1..=40).collect::<Vec<_>>(),
            "cut after {cut_after}"
        );
    }
}

#[test]
fn peers_that_did_not_announce_batching_never_get_batches() {
    let mut server = Server::new(ServerConfig {
        batch: Some(BatchConfig::default()),
        codecs: vec![Codec::Json],
        ..ServerConfig::default()
    })
    .unwrap();
    let conn = server.handle_connection(Instant::ZERO, None, SessionId([9; 16]));
    let hello = format!(
        r#"{{"t":"hello","versions":[1],"client":"{}","codecs":["json"]}}"#,
        ClientId([1; 16]).to_hex()
    );
    server.handle_message(Instant::ZERO, conn, Incoming::Text(&hello));
    let session = server.session_of(conn).unwrap();
    for n in 0..50 {
        server.send(Instant::ZERO, session, json(n)).unwrap();
    }
    server.handle_timeout(Instant::from_secs(1));
    let limits = Limits {
        max_message: 1 << 20,
        version: 1,
    };
    let mut msgs = 0;
    while let Some(o) = server.poll_output() {
        if let ServerOutput::Transmit(_, t) = o {
            match wire::decode(t.as_incoming(), &limits).unwrap() {
                Frame::Batch(_) => panic!("batch sent to a client that cannot read it"),
                Frame::Msg(_) => msgs += 1,
                _ => {}
            }
        }
    }
    assert_eq!(msgs, 50);
}
