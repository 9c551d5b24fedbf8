//! Latest values (PROTOCOL.md, section 3.5): through cuts (at any byte),
//! silent links, duplicated frames and sessions moved between servers, a
//! member that takes `lv` frames never sees a key's value after a newer
//! one, never sees one twice, and ends with every key's newest value; a
//! member that does not take them gets every value once, in order, as a
//! room message.
//!
//! Frames are lost only with their connection, as over TCP: an `lv` frame
//! is not numbered, so one dropped from a connection that stays up would
//! go unnoticed until the key's next value (the simulator's `drop_next`,
//! which the session's own numbering recovers from, is left out here).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;
use std::collections::BTreeMap;

use proptest::prelude::*;

use kitestring_conformance::sim::{LinkConfig, Sim};
use kitestring_core::client::{Event, State};
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::wire::{Codec, Payload};

const CLIENTS: usize = 4;
/// Client 3 does not take `lv` frames.
const LEGACY: usize = 3;
const KEYS: [&str; 3] = ["cpu", "mem", "net"];

fn n(p: &Payload) -> u64 {
    std::str::from_utf8(p.data()).unwrap().parse().unwrap()
}

/// The latest values client `c` was handed, in order: (key, value).
fn latest(sim: &Sim, c: usize) -> Vec<(String, u64)> {
    sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Latest { room, key, payload } if &**room == "dash" => {
                Some((key.to_string(), n(payload)))
            }
            _ => None,
        })
        .collect()
}

/// The room messages client `c` was handed, in order.
fn room_messages(sim: &Sim, c: usize) -> Vec<u64> {
    sim.peers[c]
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::Message(m) if m.room.as_deref() == Some("dash") => Some(n(&m.payload)),
            _ => None,
        })
        .collect()
}

fn dashboard(seed: u64, codec: Codec) -> Sim {
    // The server takes both; each client asks for `codec`.
    let server = ServerConfig {
        codecs: vec![Codec::Json, Codec::MsgPack],
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(server, LinkConfig::default(), seed);
    for i in 0..CLIENTS {
        let config = ClientConfig {
            latest_values: i != LEGACY,
            // Preferred first; every client also speaks JSON.
            codecs: if codec == Codec::Json {
                vec![Codec::Json]
            } else {
                vec![codec, Codec::Json]
            },
            ..ClientConfig::default()
        };
        let c = sim.add_client(config, seed + i as u64);
        sim.connect(c);
    }
    sim.run_for(Duration::from_secs(1));
    for i in 0..CLIENTS {
        sim.with_client(i, |cl, now| cl.join(now, "dash")).unwrap();
        sim.run_for(Duration::from_millis(100));
    }
    sim.run_for(Duration::from_secs(1));
    sim
}

#[derive(Clone, Debug)]
enum Op {
    Set(usize),
    Cut(usize),
    CutAfter(usize, u16),
    Blackhole(usize),
    Duplicate(usize),
    Bounce(usize),
    Advance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..KEYS.len()).prop_map(Op::Set),
        1 => (0usize..CLIENTS).prop_map(Op::Cut),
        1 => (0usize..CLIENTS, 0u16..1500).prop_map(|(c, b)| Op::CutAfter(c, b)),
        1 => (0usize..CLIENTS).prop_map(Op::Blackhole),
        1 => (0usize..CLIENTS).prop_map(Op::Duplicate),
        1 => (0usize..CLIENTS).prop_map(Op::Bounce),
        4 => (1u32..20_000).prop_map(Op::Advance),
    ]
}

/// A key's values strictly increase (values are numbered in the order
/// they were set): nothing older after something newer, nothing twice.
fn check_increasing(got: &[(String, u64)], c: usize) -> Result<(), TestCaseError> {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for (k, v) in got {
        if let Some(prev) = last.insert(k, *v) {
            prop_assert!(prev < *v, "client {} got {} {} after {}", c, k, v, prev);
        }
    }
    Ok(())
}

fn run(seed: u64, ops: &[Op], codec: Codec) -> Result<(), TestCaseError> {
    let mut sim = dashboard(seed % 1000, codec);
    let mut newest: BTreeMap<&str, u64> = BTreeMap::new();
    let mut every = Vec::new();
    let mut value = 0u64;
    for o in ops {
        match *o {
            Op::Set(k) => {
                value += 1;
                let v = value;
                let sent = sim
                    .with_server(|s, now| {
                        s.broadcast_latest(
                            now,
                            "dash",
                            KEYS[k],
                            Payload::json(format!("{v}").into_bytes()).unwrap(),
                        )
                    })
                    .unwrap();
                prop_assert_eq!(sent, CLIENTS, "every member, connected or not");
                newest.insert(KEYS[k], v);
                every.push(v);
            }
            Op::Cut(c) => sim.cut(c),
            Op::CutAfter(c, b) => sim.cut_after(c, u64::from(b)),
            Op::Blackhole(c) => sim.blackhole(c),
            Op::Duplicate(c) => sim.duplicate_next(c),
            Op::Bounce(c) => {
                sim.bounce(c);
            }
            Op::Advance(ms) => sim.run_for(Duration::from_millis(u64::from(ms))),
        }
        for c in 0..CLIENTS {
            check_increasing(&latest(&sim, c), c)?;
        }
    }
    sim.heal();
    sim.run_for(Duration::from_secs(180));
    for c in 0..CLIENTS {
        prop_assert_eq!(sim.state(c), &State::Open);
        let got = latest(&sim, c);
        check_increasing(&got, c)?;
        if c == LEGACY {
            prop_assert!(got.is_empty());
            prop_assert_eq!(room_messages(&sim, c), every.clone(), "client {}", c);
        } else {
            let mut last: BTreeMap<&str, u64> = BTreeMap::new();
            for (k, v) in &got {
                let k = KEYS.iter().find(|x| **x == k).unwrap();
                last.insert(k, *v);
            }
            prop_assert_eq!(&last, &newest, "client {} ends with every key's newest", c);
            prop_assert!(room_messages(&sim, c).is_empty());
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn latest_values_end_newest_and_never_go_back(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..40)) {
        run(seed, &ops, Codec::Json)?;
    }

    #[test]
    fn latest_values_in_msgpack(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..25)) {
        run(seed, &ops, Codec::MsgPack)?;
    }
}

/// A value set while nobody is connected reaches everyone when they come
/// back, and a value that is superseded while a member is away never
/// reaches it.
#[test]
fn a_member_away_gets_only_the_newest() {
    let mut sim = dashboard(7, Codec::Json);
    sim.blackhole(0);
    sim.cut(0);
    for v in 1..=5u64 {
        sim.with_server(|s, now| {
            s.broadcast_latest(
                now,
                "dash",
                "cpu",
                Payload::json(format!("{v}").into_bytes()).unwrap(),
            )
        })
        .unwrap();
    }
    sim.heal();
    sim.run_for(Duration::from_secs(60));
    assert_eq!(sim.state(0), &State::Open);
    assert_eq!(latest(&sim, 0), vec![("cpu".to_owned(), 5)]);
    assert_eq!(latest(&sim, 1).len(), 5, "a connected member gets each");
    assert_eq!(room_messages(&sim, LEGACY), vec![1, 2, 3, 4, 5]);
}
