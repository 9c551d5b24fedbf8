//! Flow control: coalesced "latest value" sends and server rate limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::time::Duration;

use kitestring_conformance::sim::{LinkConfig, Sim};
use kitestring_core::client::{Event, State};
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::ratelimit::{Limit, RateLimitConfig, RateLimitPolicy};
use kitestring_core::server::ServerEvent;
use kitestring_core::wire::{Codec, Payload};

fn pair(server: ServerConfig) -> (Sim, usize) {
    let mut sim = Sim::new(
        ServerConfig {
            codecs: vec![Codec::Json],
            ..server
        },
        LinkConfig::default(),
        1,
    );
    let c = sim.add_client(ClientConfig::default(), 1);
    sim.connect(c);
    sim.run_for(Duration::from_secs(1));
    (sim, c)
}

fn received(sim: &Sim) -> Vec<(u64, String)> {
    sim.server_events
        .iter()
        .filter_map(|(t, e)| match e {
            ServerEvent::Message { message, .. } => Some((
                t.as_millis(),
                String::from_utf8_lossy(message.payload.data()).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn latest_values_are_paced_and_the_last_one_always_arrives() {
    let (mut sim, c) = pair(ServerConfig::default());
    // 1000 cursor positions in one second, on two keys.
    for i in 0..1000u64 {
        let key = if i % 2 == 0 { "cursor" } else { "scroll" };
        sim.with_client(c, |cl, now| {
            cl.send_latest(
                now,
                key,
                Payload::json(format!("[\"{key}\",{i}]").into_bytes()).unwrap(),
            )
        })
        .unwrap();
        sim.run_for(Duration::from_millis(1));
    }
    sim.run_for(Duration::from_secs(1));
    let got = received(&sim);
    for key in ["cursor", "scroll"] {
        let vals: Vec<(u64, u64)> = got
            .iter()
            .filter(|(_, p)| p.contains(key))
            .map(|(t, p)| {
                (
                    *t,
                    p.trim_end_matches(']')
                        .rsplit(',')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap(),
                )
            })
            .collect();
        // At most about 60 per second (plus the first, sent at once).
        assert!(
            vals.len() <= 62,
            "{key}: {} updates in a second",
            vals.len()
        );
        assert!(vals.len() >= 55, "{key}: only {} updates", vals.len());
        // Never older than one already delivered, and the final value arrives.
        assert!(
            vals.windows(2).all(|w| w[0].1 < w[1].1),
            "{key}: out of order"
        );
        assert_eq!(
            vals.last().unwrap().1,
            if key == "cursor" { 998 } else { 999 }
        );
    }
}

#[test]
fn closing_sends_the_final_values() {
    let (mut sim, c) = pair(ServerConfig::default());
    for i in 0..5u64 {
        sim.with_client(c, |cl, now| {
            cl.send_latest(
                now,
                "k",
                Payload::json(format!("{i}").into_bytes()).unwrap(),
            )
        })
        .unwrap();
    }
    sim.close(c);
    sim.run_for(Duration::from_secs(1));
    let vals: Vec<String> = received(&sim).into_iter().map(|(_, p)| p).collect();
    assert_eq!(
        vals,
        vec!["0".to_string(), "4".to_string()],
        "first at once, final on close"
    );
}

/// Over the limit under `Refuse`: every message over it is refused by id,
/// the client hears of each refusal before any acknowledgment covers it,
/// nothing refused reaches the application, and the application gets one
/// report per interval, not one event per message.
#[test]
fn rate_limit_refuses_by_id_before_any_ack_covers_the_message() {
    let (mut sim, c) = pair(ServerConfig {
        rate_limit: Some(RateLimitConfig {
            messages_per_sec: 10,
            message_burst: 5,
            bytes_per_sec: 1 << 20,
            byte_burst: 1 << 20,
            policy: RateLimitPolicy::Refuse,
        }),
        ..ServerConfig::default()
    });
    let mut ids = Vec::new();
    for i in 0..20u64 {
        ids.push(
            sim.client_send(c, Payload::json(format!("{i}").into_bytes()).unwrap())
                .unwrap(),
        );
    }
    sim.run_for(Duration::from_secs(3));
    assert_eq!(received(&sim).len(), 5, "the burst");
    let reports: Vec<u64> = sim
        .server_events
        .iter()
        .filter_map(|(_, e)| match e {
            ServerEvent::RateLimited {
                refused,
                limit: Limit::Messages,
                ..
            } => Some(*refused),
            _ => None,
        })
        .collect();
    assert_eq!(reports, vec![15], "one report for the interval");
    // In the client's order of events: each refused id before the ack
    // covering it; every message either acknowledged or refused.
    let mut refused = std::collections::BTreeSet::new();
    let mut acked = std::collections::BTreeSet::new();
    for (_, e) in &sim.peers[c].events {
        match e {
            Event::Refused {
                id: Some(id),
                refusal,
                ..
            } => {
                assert_eq!(refusal.code.as_deref(), Some("rate_limited"));
                assert!(!acked.contains(id), "{id:?} refused after its ack");
                refused.insert(*id);
            }
            Event::Acked { first, last } => {
                for id in ids.iter().filter(|id| (first.0..=last.0).contains(&id.0)) {
                    if !refused.contains(id) {
                        acked.insert(*id);
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(refused, ids[5..].iter().copied().collect());
    assert_eq!(acked, ids[..5].iter().copied().collect());
    assert_eq!(sim.state(c), &State::Open, "refusing keeps the connection");
    assert_eq!(sim.peers[c].client.unacknowledged().0, 0);
}

/// Under `Throttle`, the default, nothing is refused or lost: the core
/// processes every message (the driver pauses reading to slow the sender).
#[test]
fn rate_limit_throttles_by_default_and_loses_nothing() {
    let (mut sim, c) = pair(ServerConfig {
        rate_limit: Some(RateLimitConfig {
            messages_per_sec: 10,
            message_burst: 5,
            ..RateLimitConfig::default()
        }),
        ..ServerConfig::default()
    });
    for i in 0..20u64 {
        sim.client_send(c, Payload::json(format!("{i}").into_bytes()).unwrap())
            .unwrap();
    }
    sim.run_for(Duration::from_secs(3));
    assert_eq!(received(&sim).len(), 20);
    assert!(sim.server_events.iter().any(|(_, e)| matches!(
        e,
        ServerEvent::RateLimited {
            delayed: 15,
            refused: 0,
            ..
        }
    )));
}

#[test]
fn rate_limit_can_close_with_1008() {
    let (mut sim, c) = pair(ServerConfig {
        rate_limit: Some(RateLimitConfig {
            messages_per_sec: 10,
            message_burst: 5,
            bytes_per_sec: 1 << 20,
            byte_burst: 1 << 20,
            policy: RateLimitPolicy::Close,
        }),
        ..ServerConfig::default()
    });
    for i in 0..20u64 {
        sim.client_send(c, Payload::json(format!("{i}").into_bytes()).unwrap())
            .unwrap();
    }
    sim.run_for(Duration::from_secs(2));
    assert!(
        matches!(sim.state(c), State::Failed { .. }),
        "{:?}",
        sim.state(c)
    );
    assert_eq!(sim.server.stats().close_codes.get(&1008), Some(&1));
}
