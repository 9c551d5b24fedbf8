//! Drives a client and a server machine against each other over the
//! simulated in-memory network and prints the lifecycle: handshake,
//! messages both ways, a cut mid-stream, backoff, resume, a half-open link
//! found by the heartbeat, a server restart that loses its sessions, and a
//! clean close (set `TRACE=1` to also print every client output). Ends with `lost: N` and `duplicated: N`; exits non-zero if
//! either is not zero.

use core::time::Duration;
use std::collections::BTreeMap;

use kitestring_conformance::sim::{LinkConfig, Sim};
use kitestring_core::client::Event;
use kitestring_core::config::{ClientConfig, ServerConfig};
use kitestring_core::server::ServerEvent;
use kitestring_core::wire::{Codec, Payload};

fn main() {
    let mut sim = Sim::new(
        ServerConfig {
            codecs: vec![Codec::Json],
            ..ServerConfig::default()
        },
        LinkConfig {
            latency: Duration::from_millis(25),
            jitter: Duration::from_millis(10),
            bandwidth: None,
        },
        2024,
    );
    let c = sim.add_client(ClientConfig::default(), 7);
    sim.peers[c].record = std::env::var_os("TRACE").is_some();
    sim.connect(c);
    sim.run_for(Duration::from_millis(200));
    let mut sent_up = Vec::new();
    let mut sent_down = Vec::new();
    let mut n = 0u64;
    let mut exchange = |sim: &mut Sim, count: u64, up: &mut Vec<u64>, down: &mut Vec<u64>| {
        for _ in 0..count {
            n += 1;
            let p = Payload::json(format!("{{\"n\":{n}}}").into_bytes()).expect("valid JSON");
            if sim.client_send(c, p.clone()).is_ok() {
                up.push(n);
            }
            if let Some(s) = sim.session(c) {
                if sim.server_send(s, p).is_ok() {
                    down.push(n);
                }
            }
            sim.run_for(Duration::from_millis(7));
        }
    };

    println!("== messages both ways");
    exchange(&mut sim, 20, &mut sent_up, &mut sent_down);
    println!("== the connection is cut mid-stream");
    sim.cut_after(c, 200);
    exchange(&mut sim, 20, &mut sent_up, &mut sent_down);
    sim.run_for(Duration::from_secs(5));
    println!("== the link goes half-open: nothing arrives, nothing closes");
    sim.blackhole(c);
    exchange(&mut sim, 5, &mut sent_up, &mut sent_down);
    sim.run_for(Duration::from_secs(60));
    println!("== the server restarts and loses its sessions");
    sim.restart_server(false);
    sim.run_for(Duration::from_secs(5));
    exchange(&mut sim, 10, &mut sent_up, &mut sent_down);
    sim.run_for(Duration::from_secs(2));
    println!("== the client closes");
    sim.close(c);
    sim.run_for(Duration::from_secs(1));

    for l in &sim.peers[c].transcript {
        eprintln!("{l}");
    }
    let mut lines: BTreeMap<_, Vec<String>> = BTreeMap::new();
    let mut got_down = Vec::new();
    let mut unconfirmed_up = 0;
    for (t, e) in &sim.peers[c].events {
        let line = match e {
            Event::StateChanged { old, new } => {
                Some(format!("client  {} -> {}", old.name(), new.name()))
            }
            Event::Connected {
                session, resumed, ..
            } => Some(format!("client  session {session:?} resumed={resumed}")),
            Event::SessionLost {
                reason,
                unconfirmed,
                unsent,
            } => {
                unconfirmed_up += unconfirmed.len() + unsent.len();
                Some(format!(
                    "client  session lost ({reason:?}): {} unconfirmed, {} unsent",
                    unconfirmed.len(),
                    unsent.len()
                ))
            }
            Event::Message(m) => {
                got_down.push(n_of(&m.payload));
                None
            }
            _ => None,
        };
        if let Some(l) = line {
            lines.entry(*t).or_default().push(l);
        }
    }
    let mut got_up = Vec::new();
    let mut unconfirmed_down = 0;
    for (t, e) in &sim.server_events {
        let line = match e {
            ServerEvent::SessionOpened {
                session, resumed, ..
            } => Some(format!(
                "server  session {session:?} opened, resumed={resumed}"
            )),
            ServerEvent::SessionDetached { session, code } => {
                Some(format!("server  session {session:?} detached ({code})"))
            }
            ServerEvent::SessionEnded {
                session,
                reason,
                unconfirmed,
            } => {
                unconfirmed_down += unconfirmed.len();
                Some(format!(
                    "server  session {session:?} ended ({reason:?}), {} unconfirmed",
                    unconfirmed.len()
                ))
            }
            ServerEvent::Message { message, .. } => {
                got_up.push(n_of(&message.payload));
                None
            }
            _ => None,
        };
        if let Some(l) = line {
            lines.entry(*t).or_default().push(l);
        }
    }
    for (t, ls) in lines {
        for l in ls {
            println!("{t:>16?}  {l}");
        }
    }
    let (lost_up, dup_up) = compare(&sent_up, &got_up);
    let (lost_down, dup_down) = compare(&sent_down, &got_down);
    // Messages a session-lost event named are reported, not lost.
    let lost =
        (lost_up.saturating_sub(unconfirmed_up)) + lost_down.saturating_sub(unconfirmed_down);
    let duplicated = dup_up + dup_down;
    println!();
    println!("sent: {} up, {} down", sent_up.len(), sent_down.len());
    println!("delivered: {} up, {} down", got_up.len(), got_down.len());
    println!(
        "reported unconfirmed: {} up, {} down",
        unconfirmed_up, unconfirmed_down
    );
    println!("lost: {lost}");
    println!("duplicated: {duplicated}");
    if lost != 0 || duplicated != 0 {
        std::process::exit(1);
    }
}

fn n_of(p: &Payload) -> u64 {
    let s = String::from_utf8_lossy(p.data());
    s.trim_start_matches("{\"n\":")
        .trim_end_matches('}')
        .parse()
        .unwrap_or(0)
}

/// Messages sent but never delivered, and deliveries beyond one per message.
fn compare(sent: &[u64], got: &[u64]) -> (usize, usize) {
    let mut seen = BTreeMap::new();
    for g in got {
        *seen.entry(*g).or_insert(0usize) += 1;
    }
    let lost = sent.iter().filter(|s| !seen.contains_key(s)).count();
    let dup = seen.values().map(|c| c.saturating_sub(1)).sum();
    (lost, dup)
}
