//! Floods (PROTOCOL.md 9): a raw client that sends messages and datagrams
//! as fast as TCP takes them, against the default limits (throttled:
//! nothing refused or lost) and against a low limit that refuses (each
//! message over it refused by id, never acknowledged before its refusal,
//! reported to the application once a second with counts), while a
//! well-behaved Kitestring client on the same server keeps exchanging
//! messages without loss, duplicate, reordering or latency spike
//! (`hostile::with_bystander`). Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod hostile;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kitestring::kitestring_core::ratelimit::{RateLimitConfig, RateLimitPolicy};
use kitestring::{DecodeExt, ServerEvent, ServerOptions};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use hostile::*;

/// Builds `msgs` `msg` frames (seq = id = payload = 1..=msgs) with a
/// datagram (kind 0x02, its number in 8 bytes) after every `every`-th.
fn flood_bytes(msgs: u64, every: u64) -> (Vec<u8>, u64) {
    let (batches, datagrams) = flood_batches(msgs, every);
    (batches.concat(), datagrams)
}

/// The same flood as `flood_bytes`, cut into batches of whole frames of
/// about 16 KiB: a writer that shares the socket (the acknowledgments of
/// refusals) may write between two batches without landing inside a
/// frame.
fn flood_batches(msgs: u64, every: u64) -> (Vec<Vec<u8>>, u64) {
    const BATCH: usize = 16 * 1024;
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut datagrams = 0u64;
    for i in 1..=msgs {
        let mut frames = text(&msg(i, i, &json!(i)));
        if i % every == 0 {
            datagrams += 1;
            frames.extend(binary(&kitestring_binary(0x02, &datagrams.to_le_bytes())));
        }
        if batch.len() + frames.len() > BATCH {
            batches.push(std::mem::take(&mut batch));
        }
        batch.extend(frames);
    }
    batches.push(batch);
    (batches, datagrams)
}

/// A flood against the default limits (1 000 messages a second, bursts of
/// 2 000, throttled; PROTOCOL.md 9): 3 000 messages and 1 000 datagrams
/// written as fast as TCP takes them. Nothing is refused or lost: every
/// message reaches the application exactly once and in order, every
/// datagram arrives, reading is paused instead (at least one
/// `RateLimited` report with messages `delayed`), and the reports come
/// once a second, not per message. Catches a throttle that drops or
/// refuses, a limit that never engages, and a report per message.
///
/// The sizes keep the test at about 2 s: the 2 000 units over the burst
/// take 2 s at 1 000 a second (20 000 messages and 20 000 datagrams would
/// take 38 s under the default limit, which is the point of it).
#[test]
fn a_flood_under_the_default_throttle_is_slowed_not_refused() {
    const MSGS: u64 = 3000;
    run(|rt| async move {
        let mut echo = echo_server(&rt, ServerOptions::default());
        with_bystander(&rt, echo.target(), async {
            let (raw, welcome) = Raw::open(echo.addr, &[]).await;
            let session = echo
                .session_opened(welcome["session"].as_str().unwrap())
                .await;
            let (bytes, datagrams) = flood_bytes(MSGS, 3);
            let start = Instant::now();
            let Raw {
                mut reader, writer, ..
            } = raw;
            write_behind(writer, bytes);
            // What the server sends the flooder: acknowledgments only.
            let watcher = tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut last_ack = 0;
                while last_ack < MSGS {
                    let Some((op, p)) = read_frame(&mut reader, &mut buf).await else {
                        panic!("the flooder's connection ended at ack {last_ack}");
                    };
                    assert_eq!(op, 0x1, "{p:?}");
                    let v: Value = serde_json::from_slice(&p).unwrap();
                    assert_eq!(v["t"], "ack", "only acknowledgments expected: {v}");
                    let ack = v["ack"].as_u64().unwrap();
                    assert!(ack >= last_ack, "{ack} after {last_ack}");
                    last_ack = ack;
                }
            });
            let mut seqs = Vec::new();
            let mut grams = Vec::new();
            let mut reports = Vec::new();
            within(15_000, "the flood delivered", async {
                while seqs.len() < MSGS as usize || grams.len() < datagrams as usize {
                    match echo.events.recv().await.unwrap() {
                        ServerEvent::Message {
                            session: s,
                            message,
                        } if s == session => {
                            assert_eq!(message.id.0, message.seq);
                            assert_eq!(message.decode::<u64>().unwrap(), message.seq);
                            seqs.push(message.seq);
                        }
                        ServerEvent::Datagram { session: s, data } if s == session => {
                            grams.push(u64::from_le_bytes(data[..].try_into().unwrap()));
                        }
                        e @ ServerEvent::RateLimited { .. } => reports.push(e),
                        _ => {}
                    }
                }
            })
            .await;
            let elapsed = start.elapsed();
            within(3000, "every message acknowledged", watcher)
                .await
                .unwrap();
            // The last interval's report.
            for e in echo.drain(1300).await {
                if let e @ ServerEvent::RateLimited { .. } = e {
                    reports.push(e);
                }
            }
            assert_eq!(seqs, (1..=MSGS).collect::<Vec<_>>(), "lost or reordered");
            assert_eq!(grams, (1..=datagrams).collect::<Vec<_>>(), "datagrams lost");
            let mut delayed = 0;
            for r in &reports {
                let ServerEvent::RateLimited {
                    session: s,
                    delayed: d,
                    refused,
                    datagrams_dropped,
                    ..
                } = r
                else {
                    unreachable!()
                };
                assert_eq!(*s, session);
                assert_eq!((*refused, *datagrams_dropped), (0, 0), "{r:?}");
                delayed += d;
            }
            eprintln!(
                "throttled flood: {MSGS} messages and {datagrams} datagrams in {elapsed:?}, \
                 {} reports, {delayed} delayed",
                reports.len()
            );
            assert!(delayed > 0, "the limit never engaged: {reports:?}");
            assert!(
                !reports.is_empty() && reports.len() as u64 <= elapsed.as_secs() + 3,
                "one report per second expected, got {} in {elapsed:?}",
                reports.len()
            );
            // 4 000 over a burst of 2 000 at 1 000 a second: about 2 s.
            assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
        })
        .await;
        drop(echo.server);
    });
}

/// What the flooder read under a refusing limit, in order: each
/// refusal's id, its own seq and its position among the frames read, and
/// each acknowledgment with its position.
#[derive(Default)]
struct Readings {
    refusals: Vec<(u64, u64, usize)>,
    acks: Vec<(u64, usize)>,
}
/// Server options whose rate limit refuses (by id) past 50 messages a
/// second, with bursts of 50.
fn refusing_at_50_a_second() -> ServerOptions {
    let mut options = ServerOptions::default();
    options.config.rate_limit = Some(RateLimitConfig {
        messages_per_sec: 50,
        message_burst: 50,
        bytes_per_sec: 4 << 20,
        byte_burst: 8 << 20,
        policy: RateLimitPolicy::Refuse,
    });
    options
}

/// A flood against a limit of 50 messages a second that refuses (PROTOCOL.md
/// 3.3 and 9): 1 000 messages and 200 datagrams. Every message is either
/// delivered to the application (in order) or refused by id with
/// `code: rate_limited`, never both, never neither; no acknowledgment
/// covers a refused message before its refusal reached the client; the
/// datagrams over the limit are dropped and counted; the application gets
/// a report per second with counts, not an event per refusal. Catches a
/// limit that drops messages silently, acknowledges refused ones (the
/// client would count them delivered), or floods the application with
/// events.
#[test]
fn a_flood_over_a_refusing_limit_is_refused_by_id() {
    const MSGS: u64 = 1000;
    run(|rt| async move {
        let mut echo = echo_server(&rt, refusing_at_50_a_second());
        // 25 messages a second: under the limit.
        let target = echo.target().every(Duration::from_millis(40));
        with_bystander(&rt, target, async {
            let (raw, welcome) = Raw::open(echo.addr, &[]).await;
            let session = echo
                .session_opened(welcome["session"].as_str().unwrap())
                .await;
            let (batches, datagrams) = flood_batches(MSGS, 5);
            let start = Instant::now();
            let Raw {
                mut reader, writer, ..
            } = raw;
            let writer = Arc::new(tokio::sync::Mutex::new(writer));
            let flood = {
                let writer = writer.clone();
                tokio::spawn(async move {
                    for batch in &batches {
                        writer.lock().await.write_all(batch).await.unwrap();
                    }
                })
            };
            // Reads everything, acknowledges each refusal as it comes,
            // until the server acknowledges the whole flood.
            let reader = tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut seen = Readings::default();
                let mut position = 0;
                while seen.acks.last().is_none_or(|&(a, _)| a < MSGS) {
                    let Some((op, p)) = read_frame(&mut reader, &mut buf).await else {
                        panic!("the flooder's connection ended");
                    };
                    assert_eq!(op, 0x1, "{p:?}");
                    for v in envelopes(serde_json::from_slice(&p).unwrap()) {
                        position += 1;
                        if let Some(a) = ack_of(&v) {
                            seen.acks.push((a, position));
                        }
                        if v["t"] == "msg" {
                            let id = v["rs"].as_u64().unwrap_or(0);
                            assert_refusal(&v, id, "rate_limited", "over the limit");
                            assert_eq!(v["j"]["op"], "message", "{v}");
                            let seq = v["seq"].as_u64().unwrap();
                            seen.refusals.push((id, seq, position));
                            let ack = format!(r#"{{"t":"ack","ack":{seq}}}"#);
                            writer.lock().await.write_all(&text(&ack)).await.unwrap();
                        }
                    }
                }
                (seen, reader, writer)
            });
            within(10_000, "the flood written", flood).await.unwrap();
            let (seen, reader, writer) = within(10_000, "the whole flood acknowledged", reader)
                .await
                .unwrap();
            let flooder = (reader, writer);
            let elapsed = start.elapsed();
            // The last interval's report (the connection stays open till
            // then: see `a_flood_and_run_is_still_reported`). Reports come
            // once a second: taken until they account for every refusal
            // and datagram, or 5 s, however slow the machine.
            let counted = |events: &[ServerEvent]| {
                let (mut refused, mut grams) = (0u64, 0u64);
                for e in events {
                    match e {
                        ServerEvent::Datagram { session: s, .. } if *s == session => grams += 1,
                        ServerEvent::RateLimited {
                            session: s,
                            refused: n,
                            datagrams_dropped,
                            ..
                        } if *s == session => {
                            refused += n;
                            grams += datagrams_dropped;
                        }
                        _ => {}
                    }
                }
                refused == seen.refusals.len() as u64 && grams == datagrams
            };
            let mut events = echo.drain(1300).await;
            let waited = Instant::now();
            while !counted(&events) && waited.elapsed() < Duration::from_secs(5) {
                events.extend(echo.drain(200).await);
            }
            drop(flooder);
            let mut delivered = Vec::new();
            let mut grams = 0u64;
            let mut reports = Vec::new();
            for e in events {
                match e {
                    ServerEvent::Message {
                        session: s,
                        message,
                    } if s == session => {
                        delivered.push(message.id.0);
                    }
                    ServerEvent::Datagram { session: s, .. } if s == session => grams += 1,
                    e @ ServerEvent::RateLimited { .. } => reports.push(e),
                    _ => {}
                }
            }
            let refused: Vec<u64> = seen.refusals.iter().map(|r| r.0).collect();
            eprintln!(
                "refused flood: {} delivered, {} refused, {grams} of {datagrams} datagrams \
                 in {elapsed:?}, {} reports",
                delivered.len(),
                refused.len(),
                reports.len()
            );
            assert!(delivered.is_sorted(), "delivered out of order");
            assert!(refused.is_sorted(), "refused out of order");
            let d: BTreeSet<u64> = delivered.iter().copied().collect();
            let r: BTreeSet<u64> = refused.iter().copied().collect();
            assert_eq!(d.len(), delivered.len(), "delivered twice");
            assert_eq!(r.len(), refused.len(), "refused twice");
            assert!(d.is_disjoint(&r), "delivered and refused");
            assert_eq!(
                d.union(&r).copied().collect::<Vec<_>>(),
                (1..=MSGS).collect::<Vec<_>>(),
                "neither delivered nor refused"
            );
            // The burst, then 50 a second (datagrams count too).
            let allowed = 50 + 50 * (elapsed.as_millis() as usize / 1000 + 1);
            assert!(
                delivered.len() >= 40 && delivered.len() <= allowed,
                "{} delivered in {elapsed:?}",
                delivered.len()
            );
            // No acknowledgment covered a refused message before its refusal.
            let refusal_at: BTreeMap<u64, usize> =
                seen.refusals.iter().map(|&(id, _, p)| (id, p)).collect();
            for &(ack, at) in &seen.acks {
                for (&id, &p) in refusal_at.range(..=ack) {
                    assert!(
                        p < at,
                        "ack {ack} (frame {at}) before the refusal of {id} (frame {p})"
                    );
                }
            }
            let (mut n_refused, mut dropped) = (0, 0);
            for e in &reports {
                if let ServerEvent::RateLimited {
                    session: s,
                    refused,
                    datagrams_dropped,
                    delayed,
                    ..
                } = e
                {
                    assert_eq!(*s, session);
                    assert_eq!(*delayed, 0, "{e:?}");
                    n_refused += refused;
                    dropped += datagrams_dropped;
                }
            }
            assert_eq!(n_refused, refused.len() as u64, "{reports:?}");
            assert_eq!(grams + dropped, datagrams, "{reports:?}");
            assert!(
                !reports.is_empty() && reports.len() as u64 <= elapsed.as_secs() + 3,
                "one report per second expected, got {}",
                reports.len()
            );
        })
        .await;
        drop(echo.server);
    });
}

/// A flood over a refusing limit by a client that leaves at once, before
/// the report interval (1 s) ends: the application must still hear of it,
/// with the counts, since `ServerEvent::RateLimited` promises one report
/// per connection and interval in which the limit was exceeded. Catches a
/// server that forgets a connection's pending report when it closes, so
/// that a hit-and-run flood is never reported at all.
#[test]
fn a_flood_and_run_is_still_reported() {
    const MSGS: u64 = 500;
    run(|rt| async move {
        let mut echo = echo_server(&rt, refusing_at_50_a_second());
        let target = echo.target().every(Duration::from_millis(40));
        with_bystander(&rt, target, async {
            let (mut raw, welcome) = Raw::open(echo.addr, &[]).await;
            let session = echo
                .session_opened(welcome["session"].as_str().unwrap())
                .await;
            let (bytes, _) = flood_bytes(MSGS, MSGS + 1);
            raw.send_bytes(&bytes).await;
            // Every message was taken off the stream: the last one's
            // refusal came.
            let mut refusals = 0u64;
            within(5000, "the refusal of the last message", async {
                loop {
                    let v = raw.next(5000).await.json();
                    if v["op"] == "refused" {
                        refusals += 1;
                        if v["rs"] == MSGS {
                            return;
                        }
                    }
                }
            })
            .await;
            drop(raw);
            let mut reported = 0;
            for e in echo.drain(2000).await {
                if let ServerEvent::RateLimited {
                    session: s,
                    refused,
                    ..
                } = e
                {
                    if s == session {
                        reported += refused;
                    }
                }
            }
            assert_eq!(
                reported, refusals,
                "{refusals} messages refused, {reported} reported to the application"
            );
        })
        .await;
        drop(echo.server);
    });
}
