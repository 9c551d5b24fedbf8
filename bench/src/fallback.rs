//! Scenario `fallback`: what carrying a session over the HTTP fallback
//! (PROTOCOL.md, section 1.1: polls and sends) costs against WebSocket,
//! with the same client, server and application on both.
//!
//! Ours is the fallback (`Transports::Http`); the baseline is WebSocket
//! (`Transports::WebSocket`), in the same run, repetitions alternating.
//! Figures: echoed messages per second for one connection with 16 and
//! 256 messages in flight (32 B), and the round trip of one message at a
//! time (p50 and p99). Every echo is checked: each message comes back
//! once, in order; a run that breaks it is marked failed. Medians and
//! ranges over the repetitions; no target: this measures what a client
//! behind a blocking proxy gets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use kitestring::{ClientEvents, ClientHandle, ClientOptions, Event, Payload, Runtime, Transports};

use crate::echo::ours_echo_server;
use crate::{net, Failure, Figure, Kind, Options, Range};

/// A client of `transports` on the echo server, with its session open.
async fn client(
    runtime: &Arc<dyn Runtime>,
    url: &str,
    transports: Transports,
) -> (ClientHandle, ClientEvents) {
    let options = ClientOptions {
        transports,
        ..ClientOptions::default()
    };
    net::ours_connect(runtime.clone(), url, options).await
}

/// Sends `count` numbered messages with at most `window` unanswered and
/// checks each echo is the next: messages per second, or why not.
async fn pipeline(
    client: &ClientHandle,
    events: &mut ClientEvents,
    count: u64,
    window: u64,
) -> Result<f64, String> {
    let start = Instant::now();
    let (mut sent, mut got) = (0u64, 0u64);
    while got < count {
        if sent < count && sent - got < window {
            let mut body = sent.to_be_bytes().to_vec();
            body.resize(32, 7);
            client
                .send_payload(Payload::binary(Bytes::from(body)))
                .await
                .map_err(|e| format!("send: {e}"))?;
            sent += 1;
            continue;
        }
        match events.next().await {
            Some(Event::Message(m)) => {
                let data = m.payload.data();
                let n = u64::from_be_bytes(data[..8].try_into().map_err(|_| "short echo")?);
                if n != got {
                    return Err(format!("echo {n} where {got} was due"));
                }
                got += 1;
            }
            Some(_) => {}
            None => return Err("client stopped".into()),
        }
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// Round trips of one message at a time, in microseconds.
async fn round_trips(
    client: &ClientHandle,
    events: &mut ClientEvents,
    warm: usize,
    n: usize,
) -> Result<Vec<f64>, String> {
    let mut rtts = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t = Instant::now();
        let mut body = (i as u64).to_be_bytes().to_vec();
        body.resize(32, 7);
        client
            .send_payload(Payload::binary(Bytes::from(body)))
            .await
            .map_err(|e| format!("send: {e}"))?;
        loop {
            match events.next().await {
                Some(Event::Message(m)) => {
                    let data = m.payload.data();
                    let got = u64::from_be_bytes(data[..8].try_into().map_err(|_| "short echo")?);
                    if got != i as u64 {
                        return Err(format!("echo {got} where {i} was due"));
                    }
                    break;
                }
                Some(_) => {}
                None => return Err("client stopped".into()),
            }
        }
        if i >= warm {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    Ok(rtts)
}

/// One repetition on one transport: (rate at window 16, rate at window
/// 256, p50, p99), or why it failed.
fn run_once(transports: Transports, count: u64, warm: usize, n: usize) -> Result<[f64; 4], String> {
    net::tokio_runtime().block_on(async move {
        let runtime = kitestring_tokio::runtime();
        let (server, addr) = ours_echo_server(&runtime);
        let url = format!("ws://{addr}/");
        let (c, mut events) = client(&runtime, &url, transports).await;
        let expected = match transports {
            Transports::Http => kitestring::TransportKind::Http,
            _ => kitestring::TransportKind::WebSocket,
        };
        if c.transport() != Some(expected) {
            return Err(format!("carried by {:?}", c.transport()));
        }
        let narrow = pipeline(&c, &mut events, count, 16).await?;
        let _ = c.close().await;
        let (c, mut events) = client(&runtime, &url, transports).await;
        let wide = pipeline(&c, &mut events, count, 256).await?;
        let _ = c.close().await;
        let (c, mut events) = client(&runtime, &url, transports).await;
        let mut rtts = round_trips(&c, &mut events, warm, n).await?;
        let _ = c.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), server.shutdown()).await;
        rtts.sort_by(f64::total_cmp);
        Ok([
            narrow,
            wide,
            net::percentile(&rtts, 50.0),
            net::percentile(&rtts, 99.0),
        ])
    })
}

pub(crate) fn scenario(opts: &Options) -> Vec<Figure> {
    let (reps, count, warm, n) = if opts.quick {
        (1, 2_000, 50, 300)
    } else {
        (5, 40_000, 200, 2_000)
    };
    let mut http: [Vec<f64>; 4] = Default::default();
    let mut ws: [Vec<f64>; 4] = Default::default();
    let mut failed = None;
    for _ in 0..reps {
        for (transports, into) in [
            (Transports::Http, &mut http),
            (Transports::WebSocket, &mut ws),
        ] {
            match run_once(transports, count, warm, n) {
                Ok(v) => {
                    for (i, x) in v.into_iter().enumerate() {
                        into[i].push(x);
                    }
                }
                Err(why) => {
                    eprintln!("fallback ({transports:?}): {why}");
                    failed = Some(why);
                }
            }
        }
    }
    let rows: [(&'static str, &'static str, bool); 4] = [
        ("echo 32 B, one connection, 16 in flight", "msg/s", true),
        ("echo 32 B, one connection, 256 in flight", "msg/s", true),
        ("ping-pong 32 B", "p50 round trip (us)", false),
        ("ping-pong 32 B", "p99 round trip (us)", false),
    ];
    rows.iter()
        .enumerate()
        .map(|(i, (scenario, metric, higher))| {
            let spread = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (lo, hi)
            };
            Figure {
                scenario: format!("HTTP fallback vs WebSocket: {scenario}"),
                metric,
                ours: net::median(&mut http[i].clone()),
                baseline: net::median(&mut ws[i].clone()),
                higher_is_better: *higher,
                target: None,
                kind: Kind::Ratio,
                range: Some(Range {
                    ours: spread(&http[i]),
                    baseline: spread(&ws[i]),
                    runs: http[i].len().min(ws[i].len()),
                }),
                failed: failed.clone().map(|why| Failure { why, ours: true }),
            }
        })
        .collect()
}
