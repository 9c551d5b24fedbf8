//! Slow links are not dead links (PROTOCOL.md, sections 5 and 7): a sender
//! far above its link's rate keeps its connection as long as
//! acknowledgments make progress, and a sender that waits for room in its
//! window (`ClientHandle::send_when_ready`) never fills its queue.
//!
//! Through the chaos proxy with each direction throttled, on tokio.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::{ClientOptions, Event, Payload, ServerEvent, ServerOptions};
use kitestring_chaos::Proxy;

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A payload of about 1 KiB carrying its number.
fn numbered(n: u64) -> Payload {
    Payload::json(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(1000)).into_bytes()).unwrap()
}

fn number_of(p: &Payload) -> u64 {
    let text = std::str::from_utf8(p.data()).unwrap();
    text.trim_start_matches("{\"n\":")
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// How a run sends.
struct Run {
    /// Messages of about 1 KiB.
    count: u64,
    /// Bytes a second each way through the proxy.
    rate: u64,
    /// The client's window, in messages.
    window: usize,
    /// Both sides' acknowledgment timeout.
    ack_timeout: Duration,
    /// With `send_when_ready`; else with `send` as fast as the queue allows.
    paced: bool,
}

/// Sends through the throttled proxy. Returns the numbers the server
/// received, how many connections the client made, and the largest queue
/// the client had.
async fn run(r: Run) -> (Vec<u64>, u64, usize) {
    let Run {
        count,
        rate,
        window,
        ack_timeout,
        paced,
    } = r;
    let rt = kitestring_tokio::runtime();
    let mut options = ServerOptions::default();
    options.config.reliability.ack_timeout = ack_timeout;
    let (server, mut events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
    let proxy = Proxy::start(server.local_addr().unwrap()).unwrap();
    proxy.set_throttle(Some(rate));
    proxy.set_delay(Duration::from_millis(50));
    let mut client_options = ClientOptions::default();
    client_options.config.reliability.ack_timeout = ack_timeout;
    client_options.config.reliability.window_messages = window;
    client_options.config.queue.max_messages = 100_000;
    client_options.config.queue.max_bytes = 1 << 30;
    let url = format!("ws://{}/", proxy.local_addr());
    let (client, mut client_events) =
        kitestring::connect(rt.clone(), &url, client_options).unwrap();
    let opened = async {
        while let Some(e) = client_events.next().await {
            if matches!(e, Event::Connected { .. }) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), opened)
        .await
        .expect("connected");
    let client = Arc::new(client);
    let sender = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut deepest = 0;
            for n in 1..=count {
                if paced {
                    client.send_payload_when_ready(numbered(n)).await.unwrap();
                } else {
                    client.send_payload(numbered(n)).await.unwrap();
                }
                deepest = deepest.max(client.stats().await.unwrap().queued.0);
            }
            deepest
        })
    };
    // Keep the client's events read, as an application would.
    tokio::spawn(async move { while client_events.next().await.is_some() {} });
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while (got.len() as u64) < count && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), events.next()).await {
            Ok(Some(ServerEvent::Message { message, .. })) => got.push(number_of(&message.payload)),
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
    }
    let deepest = sender.await.unwrap();
    let connects = client.stats().await.unwrap().stats.connects;
    client.close().await.unwrap();
    server.shutdown().await.unwrap();
    (got, connects, deepest)
}

/// 1 000 KiB through 256 KB/s, all of it in the window at once, with a 2 s
/// acknowledgment timeout (a loaded machine can stall a second; still half
/// the wait below): the oldest message waits about four seconds,
/// yet acknowledgments keep coming (the proxy forwards in chunks of about a
/// quarter of a second), so the connection is never recycled. Timed by the
/// age of the oldest message, as before, it was closed with 4010 again and
/// again (this test then fails). Everything arrives once, in order.
#[test]
fn a_slow_link_is_not_closed_while_acknowledgments_progress() {
    let (got, connects, _) = block_on(run(Run {
        count: 1000,
        rate: 256_000,
        window: 1024,
        ack_timeout: Duration::from_secs(2),
        paced: false,
    }));
    assert_eq!(got, (1..=1000).collect::<Vec<_>>());
    assert_eq!(connects, 1, "the connection was recycled");
}

/// Through 64 KB/s with a window of 64 messages: a sender that waits for
/// room keeps at most the one message waiting for the window in its queue;
/// one that does not piles the rest of its messages there.
#[test]
fn a_sender_that_waits_for_room_never_fills_its_queue() {
    let paced = |paced| Run {
        count: 300,
        rate: 64_000,
        window: 64,
        ack_timeout: Duration::from_secs(45),
        paced,
    };
    let (got, connects, deepest) = block_on(run(paced(true)));
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
    assert_eq!(connects, 1);
    assert!(deepest <= 1, "queue grew to {deepest}");
    let (got, _, unpaced) = block_on(run(paced(false)));
    assert_eq!(got, (1..=300).collect::<Vec<_>>());
    assert!(unpaced > 100, "without waiting the queue holds {unpaced}");
}

/// The server's side of the same: an application feeding a client through
/// 64 KB/s with `ServerHandle::send_when_ready` keeps at most one message
/// waiting behind the session's window (of 64 here), and the client gets
/// everything once, in order.
#[test]
fn a_server_that_waits_for_room_never_fills_a_sessions_queue() {
    block_on(async {
        let rt = kitestring_tokio::runtime();
        let mut options = ServerOptions::default();
        options.config.reliability.window_messages = 64;
        let (server, mut events) =
            kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
        let proxy = Proxy::start(server.local_addr().unwrap()).unwrap();
        proxy.set_throttle(Some(64_000));
        proxy.set_delay(Duration::from_millis(50));
        let url = format!("ws://{}/", proxy.local_addr());
        let (client, mut client_events) =
            kitestring::connect(rt.clone(), &url, ClientOptions::default()).unwrap();
        let session = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(ServerEvent::SessionOpened { session, .. }) = events.next().await {
                    return session;
                }
            }
        })
        .await
        .expect("session opened");
        tokio::spawn(async move { while events.next().await.is_some() {} });
        let feeder = {
            let server = server.clone();
            tokio::spawn(async move {
                let mut deepest = 0;
                for n in 1..=300 {
                    server
                        .send_payload_when_ready(session, numbered(n))
                        .await
                        .unwrap();
                    let info = server.session(session).await.unwrap().unwrap();
                    deepest = deepest.max(info.queued);
                }
                deepest
            })
        };
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < 300 && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(500), client_events.next()).await {
                Ok(Some(Event::Message(m))) => got.push(number_of(&m.payload)),
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => break,
            }
        }
        let deepest = feeder.await.unwrap();
        assert_eq!(got, (1..=300).collect::<Vec<_>>());
        assert!(deepest <= 1, "the session's queue grew to {deepest}");
        client.close().await.unwrap();
        server.shutdown().await.unwrap();
    });
}
