//! Latest values over real sockets (PROTOCOL.md, section 3.5): a member
//! whose application reads slowly gets the newest value of each key, not a
//! backlog, while its client keeps reading the socket; a member that does
//! not take latest values gets every one as a room message; a connection
//! that is not writable gets the newest value once it is, not every value
//! set meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{ClientConfig, ClientOptions, Event, Payload, ServerHandle, ServerOptions};

/// Values set per key; the last one is `SETS`.
const SETS: u64 = 2_000;

fn value(p: &Payload) -> u64 {
    std::str::from_utf8(p.data()).unwrap().parse().unwrap()
}

async fn server() -> (ServerHandle, String) {
    let rt = kitestring_tokio::runtime();
    let (server, mut events) =
        kitestring::bind(rt, "127.0.0.1:0".parse().unwrap(), ServerOptions::default()).unwrap();
    // Nothing to do with the events but take them.
    tokio::spawn(async move { while events.next().await.is_some() {} });
    let url = format!("ws://{}/", server.local_addr().unwrap());
    (server, url)
}

/// What one member read: per key, every value it was handed, in order.
type Read = BTreeMap<String, Vec<u64>>;

/// A member of "dash" that takes `every` between events, until it has
/// read `SETS` for both keys; `latest`: whether its client takes latest
/// values.
async fn member(url: &str, every: Duration, latest: bool) -> tokio::task::JoinHandle<Read> {
    let options = ClientOptions {
        config: ClientConfig {
            latest_values: latest,
            ..ClientConfig::default()
        },
        ..ClientOptions::default()
    };
    let (client, mut events) =
        kitestring::connect(kitestring_tokio::runtime(), url, options).unwrap();
    client.join("dash").await.unwrap();
    tokio::spawn(async move {
        let mut read = Read::new();
        let done = |r: &Read| {
            ["cpu", "mem"]
                .iter()
                .all(|k| r.get(*k).and_then(|v| v.last()) == Some(&SETS))
        };
        while !done(&read) {
            let (key, v) = match events.next().await.unwrap() {
                Event::Latest { room, key, payload } => {
                    assert_eq!(&*room, "dash");
                    (key.to_string(), value(&payload))
                }
                // Without latest values: "cpu:N" or "mem:N" messages.
                Event::Message(m) if m.room.as_deref() == Some("dash") => {
                    let text = std::str::from_utf8(m.payload.data()).unwrap().to_owned();
                    let text = text.trim_matches('"').to_owned();
                    let (k, v) = text.split_once(':').unwrap();
                    (k.to_owned(), v.parse().unwrap())
                }
                _ => continue,
            };
            read.entry(key).or_default().push(v);
            if !every.is_zero() {
                tokio::time::sleep(every).await;
            }
        }
        client.close().await.unwrap();
        read
    })
}

/// Each key's values strictly increase: nothing twice, nothing older
/// after something newer.
fn increasing(read: &Read) {
    for (k, vs) in read {
        assert!(vs.windows(2).all(|w| w[0] < w[1]), "{k}: {vs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_member_reads_the_newest_value_not_a_backlog() {
    let (server, url) = server().await;
    let fast = member(&url, Duration::ZERO, true).await;
    let slow = member(&url, Duration::from_millis(50), true).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.room_size("dash").await.unwrap() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("three members");
    for n in 1..=SETS {
        for key in ["cpu", "mem"] {
            let members = server
                .broadcast_latest_payload("dash", key, Payload::json(format!("{n}")).unwrap())
                .await
                .unwrap();
            assert_eq!(members, 2);
        }
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // The room's values, while it has members.
    let values = server.latest_values("dash").await.unwrap();
    let values: Vec<(String, u64)> = values
        .into_iter()
        .map(|(k, p)| (k.to_string(), value(&p)))
        .collect();
    assert_eq!(values.len(), 2);
    assert!(values.iter().all(|(_, v)| *v == SETS));
    let limit = Duration::from_secs(60);
    let fast = tokio::time::timeout(limit, fast).await.unwrap().unwrap();
    let slow = tokio::time::timeout(limit, slow).await.unwrap().unwrap();
    increasing(&fast);
    increasing(&slow);
    // Reading one event per 50 ms for the second or so the values take,
    // the slow member was handed a few dozen: the newest each time, never
    // the 2 000 each key was set to.
    let slow_count: usize = slow.values().map(Vec::len).sum();
    assert!(
        slow_count < SETS as usize,
        "the slow member read {slow_count} values of {}",
        2 * SETS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_latest_values_gets_every_one_as_a_message() {
    let (server, url) = server().await;
    let all = member(&url, Duration::ZERO, false).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.room_size("dash").await.unwrap() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the member joined");
    for n in 1..=SETS {
        for key in ["cpu", "mem"] {
            server
                .broadcast_latest_payload(
                    "dash",
                    key,
                    Payload::json(format!("\"{key}:{n}\"")).unwrap(),
                )
                .await
                .unwrap();
        }
        if n % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let read = tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .unwrap()
        .unwrap();
    let want: Vec<u64> = (1..=SETS).collect();
    assert_eq!(read.get("cpu"), Some(&want));
    assert_eq!(read.get("mem"), Some(&want));
}

/// A connection whose peer stops reading: while its socket is full, each
/// key's value waits in the connection's slot and a newer one replaces
/// it, so when the peer reads again it gets a handful of frames ending
/// with the newest, not every value set meanwhile. The peer is a plain
/// WebSocket speaking the protocol by hand (PROTOCOL.md): a client of
/// this crate always reads its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_is_not_writable_gets_the_newest_value_when_it_is() {
    use kitestring::async_tungstenite::tungstenite::Message;
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (server, url) = server().await;
    let addr = server.local_addr().unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = kitestring::async_tungstenite::client_async(url.as_str(), tcp.compat())
        .await
        .unwrap();
    let hello = r#"{"t":"hello","versions":[1],"client":"0123456789abcdef0123456789abcdef","codecs":["json"],"caps":["latest"]}"#;
    ws.send(Message::text(hello)).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("\"welcome\""));
    ws.send(Message::text(
        r#"{"t":"msg","seq":1,"id":1,"ack":0,"j":null,"r":"dash","op":"join"}"#,
    ))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.room_size("dash").await.unwrap() < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("joined");
    // 200 values of 256 KiB: 50 MiB, far more than the socket buffers
    // hold, while the peer reads nothing.
    const BIG: u64 = 200;
    let pad = "x".repeat(256 * 1024);
    for n in 1..=BIG {
        server
            .broadcast_latest_payload(
                "dash",
                "frame",
                Payload::json(format!("[{n},\"{pad}\"]")).unwrap(),
            )
            .await
            .unwrap();
    }
    // Now read: every `lv` frame, until the newest.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let m = ws.next().await.unwrap().unwrap();
            let Ok(text) = m.to_text() else { continue };
            if !text.starts_with(r#"{"t":"lv""#) {
                continue;
            }
            let at = text.find(r#""j":["#).unwrap() + 5;
            let n: u64 = text[at..].split(',').next().unwrap().parse().unwrap();
            got.push(n);
            if n == BIG {
                break;
            }
        }
    })
    .await
    .expect("the newest value arrives");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert!(
        got.len() < BIG as usize / 2,
        "{} of {BIG} values written to a connection that was not writable: {got:?}",
        got.len()
    );
}
