//! Synced maps (PROTOCOL.md, section 3.6): clients and the server writing
//! the same and different keys through cuts (at any byte), silent links,
//! duplicated frames, sessions moved and sessions lost all end with the
//! same map, the server's; every write is taken at most once, and once
//! exactly when its session survives; what the application was told
//! (`MapChanged`) adds up to what it reads; and the design notes' race (a
//! setting written over REST and over the socket, the older broadcast
//! arriving last) ends with the latest write.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use kitestring_conformance::sim::{LinkConfig, Sim};
use kitestring_core::client::{Event, State};
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::server::{MapOptions, ServerEvent, Stamping};
use kitestring_core::wire::{Codec, Payload};

const CLIENTS: usize = 3;
const KEYS: [&str; 3] = ["volume", "theme", "speed"];
const ROOM: &str = "settings";
const MAP: &str = "app";

fn n(p: &Payload) -> u64 {
    std::str::from_utf8(p.data()).unwrap().parse().unwrap()
}

fn value(v: u64) -> Payload {
    Payload::json(format!("{v}").into_bytes()).unwrap()
}

type Entries = BTreeMap<String, u64>;

fn server_map(sim: &Sim) -> Entries {
    sim.server
        .map_entries(ROOM, MAP)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k.to_string(), n(&v)))
        .collect()
}

fn client_map(sim: &mut Sim, c: usize) -> Entries {
    sim.with_client(c, |cl, _| cl.map_entries(ROOM, MAP))
        .into_iter()
        .map(|(k, v)| (k.to_string(), n(&v)))
        .collect()
}

/// What client `c` was told, folded: each `MapChanged` sets or clears its
/// key.
fn told(sim: &Sim, c: usize) -> Entries {
    let mut m = Entries::new();
    for (_, e) in &sim.peers[c].events {
        if let Event::MapChanged {
            room,
            map,
            key,
            value,
        } = e
        {
            if &**room == ROOM && &**map == MAP {
                match value {
                    Some(v) => m.insert(key.to_string(), n(v)),
                    None => m.remove(&**key),
                };
            }
        }
    }
    m
}

/// The server application's `MapChanged` events: (key, value).
fn server_changes(sim: &Sim) -> Vec<(String, Option<u64>)> {
    sim.server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::MapChanged { key, value, .. } => {
                Some((key.to_string(), value.as_ref().map(n)))
            }
            _ => None,
        })
        .collect()
}

fn settings(seed: u64, codec: Codec, stamping: Stamping) -> Sim {
    let server = ServerConfig {
        codecs: vec![Codec::Json, Codec::MsgPack],
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(server, LinkConfig::default(), seed);
    sim.with_server(|s, now| s.open_map(now, ROOM, MAP, MapOptions::default().stamping(stamping)))
        .unwrap();
    for i in 0..CLIENTS {
        let config = ClientConfig {
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
        sim.with_client(i, |cl, now| cl.join(now, ROOM)).unwrap();
        sim.run_for(Duration::from_millis(100));
    }
    sim.run_for(Duration::from_secs(1));
    sim
}

#[derive(Clone, Debug)]
enum Op {
    /// Client writes key (a fresh value) or deletes it.
    Write(usize, usize, bool),
    /// The server application writes key (a fresh value) or deletes it.
    Server(usize, bool),
    Cut(usize),
    CutAfter(usize, u16),
    Blackhole(usize),
    Duplicate(usize),
    Bounce(usize),
    /// The client is away longer than its session is kept: it comes back
    /// to a new one.
    Lose(usize),
    Advance(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..CLIENTS, 0usize..KEYS.len(), prop::bool::weighted(0.2))
            .prop_map(|(c, k, d)| Op::Write(c, k, d)),
        3 => (0usize..KEYS.len(), prop::bool::weighted(0.2)).prop_map(|(k, d)| Op::Server(k, d)),
        1 => (0usize..CLIENTS).prop_map(Op::Cut),
        1 => (0usize..CLIENTS, 0u16..1500).prop_map(|(c, b)| Op::CutAfter(c, b)),
        1 => (0usize..CLIENTS).prop_map(Op::Blackhole),
        1 => (0usize..CLIENTS).prop_map(Op::Duplicate),
        1 => (0usize..CLIENTS).prop_map(Op::Bounce),
        1 => (0usize..CLIENTS).prop_map(Op::Lose),
        4 => (1u32..20_000).prop_map(Op::Advance),
    ]
}

fn run(seed: u64, ops: &[Op], codec: Codec, stamping: Stamping) -> Result<(), TestCaseError> {
    let mut sim = settings(seed % 1000, codec, stamping);
    let mut next = 0u64;
    // Client writes: value -> (client, the write's id).
    let mut writes: BTreeMap<u64, (usize, u64)> = BTreeMap::new();
    for o in ops {
        match *o {
            Op::Write(c, k, delete) => {
                let r = sim.with_client(c, |cl, now| {
                    if delete {
                        cl.map_delete(now, ROOM, MAP, KEYS[k])
                    } else {
                        cl.map_set(now, ROOM, MAP, KEYS[k], value(next + 1))
                    }
                });
                // A client whose session is being replaced may hold no
                // membership for a moment; anything else must be taken.
                if let Ok(id) = r {
                    if !delete {
                        next += 1;
                        writes.insert(next, (c, id.0));
                        let read =
                            sim.with_client(c, |cl, _| cl.map_get(ROOM, MAP, KEYS[k]).cloned());
                        prop_assert_eq!(
                            read.map(|p| n(&p)),
                            Some(next),
                            "a write reads back at once"
                        );
                    }
                }
            }
            Op::Server(k, delete) => {
                next += 1;
                let v = next;
                sim.with_server(|s, now| {
                    if delete {
                        s.map_delete(now, ROOM, MAP, KEYS[k])
                    } else {
                        s.map_set(now, ROOM, MAP, KEYS[k], value(v))
                    }
                })
                .unwrap();
            }
            Op::Cut(c) => sim.cut(c),
            Op::CutAfter(c, b) => sim.cut_after(c, u64::from(b)),
            Op::Blackhole(c) => sim.blackhole(c),
            Op::Duplicate(c) => sim.duplicate_next(c),
            Op::Bounce(c) => {
                sim.bounce(c);
            }
            Op::Lose(c) => {
                sim.blackhole(c);
                sim.run_for(Duration::from_secs(100));
                sim.heal();
            }
            Op::Advance(ms) => sim.run_for(Duration::from_millis(u64::from(ms))),
        }
    }
    sim.heal();
    sim.run_for(Duration::from_secs(240));

    let server = server_map(&sim);
    // The server's events add up to its map.
    let mut folded = Entries::new();
    let changes = server_changes(&sim);
    for (k, v) in &changes {
        match v {
            Some(v) => folded.insert(k.clone(), *v),
            None => folded.remove(k),
        };
    }
    prop_assert_eq!(
        &folded,
        &server,
        "the server's MapChanged events add up to its map"
    );
    // Every write taken at most once.
    let mut seen = BTreeSet::new();
    for (_, v) in &changes {
        if let Some(v) = v {
            prop_assert!(seen.insert(*v), "value {} taken twice", v);
        }
    }
    // Writes whose fate the client was not told is unknown were taken once
    // (under server stamping, every write taken wins when it is taken).
    if stamping == Stamping::Server {
        for c in 0..CLIENTS {
            let unknown: BTreeSet<u64> = sim.peers[c]
                .events
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::SessionLost {
                        unconfirmed,
                        unsent,
                        ..
                    } => Some(
                        unconfirmed
                            .iter()
                            .chain(unsent)
                            .map(|id| id.0)
                            .collect::<Vec<_>>(),
                    ),
                    _ => None,
                })
                .flatten()
                .collect();
            let refused: BTreeSet<u64> = sim.peers[c]
                .events
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::Refused { id: Some(id), .. } => Some(id.0),
                    _ => None,
                })
                .collect();
            for (v, (wc, id)) in &writes {
                if *wc == c && !unknown.contains(id) {
                    prop_assert!(
                        seen.contains(v) || refused.contains(id),
                        "client {}'s write {} (id {}) was never taken nor refused",
                        c,
                        v,
                        id
                    );
                }
            }
        }
    }
    for c in 0..CLIENTS {
        prop_assert_eq!(sim.state(c), &State::Open);
        let synced = sim.with_client(c, |cl, _| cl.map_synced(ROOM, MAP));
        prop_assert!(synced, "client {} is in step", c);
        prop_assert_eq!(&client_map(&mut sim, c), &server, "client {} converged", c);
        prop_assert_eq!(&told(&sim, c), &server, "client {}'s events add up", c);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn maps_converge_when_the_server_stamps(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..40)) {
        run(seed, &ops, Codec::Json, Stamping::Server)?;
    }

    #[test]
    fn maps_converge_when_writers_stamp(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..40)) {
        run(seed, &ops, Codec::Json, Stamping::Peers)?;
    }

    #[test]
    fn maps_converge_in_msgpack(seed in any::<u64>(), ops in prop::collection::vec(op(), 1..25)) {
        run(seed, &ops, Codec::MsgPack, Stamping::Server)?;
    }
}

/// The design notes' race: a setting is changed to 0.8 (over REST, the
/// server writes it) and then to 0.9 (a client over the socket); the
/// broadcast of 0.8 reaches a slow member after 0.9. With a synced map the
/// late 0.8 cannot win: every member ends with 0.9, and so does the server.
#[test]
fn the_late_broadcast_of_an_older_write_does_not_win() {
    let mut sim = settings(11, Codec::Json, Stamping::Server);
    // Member 2 is slow: what the server sends it is held back.
    sim.blackhole(2);
    sim.with_server(|s, now| s.map_set(now, ROOM, MAP, "volume", value(8)))
        .unwrap();
    sim.run_for(Duration::from_millis(200));
    sim.with_client(0, |cl, now| cl.map_set(now, ROOM, MAP, "volume", value(9)))
        .unwrap();
    sim.run_for(Duration::from_millis(500));
    sim.heal();
    sim.run_for(Duration::from_secs(90));
    let want: Entries = [("volume".to_owned(), 9)].into();
    assert_eq!(server_map(&sim), want);
    for c in 0..CLIENTS {
        assert_eq!(client_map(&mut sim, c), want, "client {c}");
    }
}

/// Writers' stamps: a write made offline and sent late loses to a newer
/// one the server already has, and the writer is shown the winner.
#[test]
fn a_stale_offline_write_loses_to_a_newer_one() {
    let mut sim = settings(5, Codec::Json, Stamping::Peers);
    sim.blackhole(1);
    sim.run_for(Duration::from_secs(1));
    // Client 1, offline, writes first; client 0 writes after it.
    sim.with_client(1, |cl, now| cl.map_set(now, ROOM, MAP, "theme", value(1)))
        .unwrap();
    sim.run_for(Duration::from_secs(2));
    sim.with_client(0, |cl, now| cl.map_set(now, ROOM, MAP, "theme", value(2)))
        .unwrap();
    sim.run_for(Duration::from_secs(2));
    sim.heal();
    sim.run_for(Duration::from_secs(120));
    let want: Entries = [("theme".to_owned(), 2)].into();
    assert_eq!(server_map(&sim), want);
    assert_eq!(
        client_map(&mut sim, 1),
        want,
        "the late writer is shown the winner"
    );
    assert_eq!(client_map(&mut sim, 0), want);
}

/// A map only the server writes refuses members' writes by id, and the
/// writer reads the server's value again.
#[test]
fn a_read_only_map_refuses_members_writes() {
    let mut sim = settings(3, Codec::Json, Stamping::Server);
    sim.with_server(|s, now| {
        s.open_map(
            now,
            ROOM,
            "limits",
            MapOptions::default().writers(kitestring_core::server::MapWriters::Server),
        )
    })
    .unwrap();
    sim.with_server(|s, now| s.map_set(now, ROOM, "limits", "max", value(10)))
        .unwrap();
    sim.run_for(Duration::from_secs(1));
    let id = sim
        .with_client(0, |cl, now| {
            cl.map_set(now, ROOM, "limits", "max", value(99))
        })
        .unwrap();
    assert_eq!(
        sim.with_client(0, |cl, _| cl.map_get(ROOM, "limits", "max").map(n)),
        Some(99)
    );
    sim.run_for(Duration::from_secs(2));
    let refused = sim.peers[0].events.iter().any(|(_, e)| {
        matches!(e, Event::Refused { id: Some(r), refusal, .. } if *r == id && refusal.code.as_deref() == Some("read_only"))
    });
    assert!(refused, "refused by id with the reason");
    assert_eq!(
        sim.with_client(0, |cl, _| cl.map_get(ROOM, "limits", "max").map(n)),
        Some(10)
    );
    assert_eq!(
        sim.server.map_get(ROOM, "limits", "max").map(|p| n(&p)),
        Some(10)
    );
}

/// Bounds: a map takes at most its entries and bytes, refusing the
/// application with a typed error and a member by id (`map_full`); a
/// deleted key makes room; tombstones past the map's size are compacted
/// without bringing a deleted key back; a closed map reads empty
/// everywhere.
#[test]
fn bounds_refusals_compaction_and_close() {
    use kitestring_core::server::{MapError, MapWriters};
    let mut sim = settings(9, Codec::Json, Stamping::Peers);
    sim.with_server(|s, now| {
        s.open_map(
            now,
            ROOM,
            "small",
            MapOptions::default()
                .writers(MapWriters::Members)
                .stamping(Stamping::Peers)
                .bounds(2, 64),
        )
    })
    .unwrap();
    sim.with_server(|s, now| s.map_set(now, ROOM, "small", "a", value(1)))
        .unwrap();
    sim.with_server(|s, now| s.map_set(now, ROOM, "small", "b", value(2)))
        .unwrap();
    let full = sim.with_server(|s, now| s.map_set(now, ROOM, "small", "c", value(3)));
    assert_eq!(full, Err(MapError::Full { max: 2 }));
    let big = Payload::json(format!("\"{}\"", "x".repeat(100)).into_bytes()).unwrap();
    let too_big = sim.with_server(|s, now| s.map_set(now, ROOM, "small", "a", big));
    assert_eq!(too_big, Err(MapError::TooLarge { max: 64 }));
    let opaque = sim
        .with_server(|s, now| s.map_set(now, ROOM, "small", "a", Payload::binary(vec![1, 2, 3])));
    assert_eq!(opaque, Err(MapError::BadValue));
    // A member's write past the bound is refused by id.
    sim.run_for(Duration::from_secs(1));
    let id = sim
        .with_client(0, |cl, now| cl.map_set(now, ROOM, "small", "c", value(3)))
        .unwrap();
    sim.run_for(Duration::from_secs(1));
    assert!(sim.peers[0].events.iter().any(|(_, e)| matches!(
        e,
        Event::Refused { id: Some(r), refusal, .. } if *r == id && refusal.code.as_deref() == Some("map_full")
    )));
    // Deleting makes room; many deletes are compacted, never resurrected.
    sim.with_server(|s, now| s.map_delete(now, ROOM, "small", "b"))
        .unwrap();
    for i in 0..20u64 {
        let key = format!("k{i}");
        sim.with_server(|s, now| s.map_set(now, ROOM, "small", &key, value(i)))
            .unwrap();
        sim.with_server(|s, now| s.map_delete(now, ROOM, "small", &key))
            .unwrap();
    }
    sim.run_for(Duration::from_secs(2));
    let want: Entries = [("a".to_owned(), 1u64)].into();
    assert_eq!(
        sim.server
            .map_entries(ROOM, "small")
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.to_string(), n(&v)))
            .collect::<Entries>(),
        want
    );
    for c in 0..CLIENTS {
        let got: Entries = sim
            .with_client(c, |cl, _| cl.map_entries(ROOM, "small"))
            .into_iter()
            .map(|(k, v)| (k.to_string(), n(&v)))
            .collect();
        assert_eq!(got, want, "client {c}");
    }
    // Closing: every member's copy empties.
    assert!(sim.with_server(|s, now| s.close_map(now, ROOM, "small")));
    sim.run_for(Duration::from_secs(1));
    for c in 0..CLIENTS {
        assert!(sim
            .with_client(c, |cl, _| cl.map_entries(ROOM, "small"))
            .is_empty());
    }
    assert_eq!(
        sim.with_server(|s, now| s.map_set(now, ROOM, "small", "a", value(1))),
        Err(MapError::NoMap)
    );
}
