//! Compression over real sockets: a client and a server that both turn it
//! on exchange JSON in a fraction of the bytes, whichever way the
//! handshake travels (the upgrade's header, the URL, the first frame) and
//! in either codec; with it on one side only, nothing changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{
    ClientConfig, ClientOptions, Codec, CompressionConfig, Event, Payload, ServerConfig,
    ServerEvent, ServerOptions,
};

/// About 8 KB of JSON, numbered `n`.
fn json(n: usize) -> Payload {
    let rows: Vec<String> = (0..100)
        .map(|i| {
            format!(
                r#"{{"id":{},"name":"item {i}","price":{}.99,"tags":["a","b"]}}"#,
                n * 1000 + i,
                i % 50
            )
        })
        .collect();
    Payload::json(format!(r#"{{"n":{n},"rows":[{}]}}"#, rows.join(","))).unwrap()
}

/// Sends 20 messages up, each echoed back down; returns the bytes the
/// client wrote and read.
async fn echo(server_on: bool, client_on: bool, codec: Codec, handshake: &str) -> (u64, u64) {
    let rt = kitestring_tokio::runtime();
    let compression = |on: bool| on.then(CompressionConfig::default);
    let options = ServerOptions {
        config: ServerConfig {
            compression: compression(server_on),
            ..ServerConfig::default()
        },
        ..ServerOptions::default()
    };
    let (server, mut events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
    let url = format!("ws://{}/", server.local_addr().unwrap());
    let options = ClientOptions {
        config: ClientConfig {
            compression: compression(client_on),
            codecs: vec![codec, Codec::Json],
            hello_in_upgrade: handshake == "header",
            ..ClientConfig::default()
        },
        hello_in_url: handshake == "url",
        ..ClientOptions::default()
    };
    let (client, mut c_events) = kitestring::connect(rt, &url, options).unwrap();
    let echo = tokio::spawn(async move {
        while let Some(e) = events.next().await {
            if let ServerEvent::Message { session, message } = e {
                server.send_payload(session, message.payload).await.unwrap();
            }
        }
    });
    for n in 0..20 {
        client.send_payload(json(n)).await.unwrap();
    }
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        let mut got = Vec::new();
        while got.len() < 20 {
            match c_events.next().await.unwrap() {
                Event::Message(m) => got.push(m.payload),
                Event::Connected { codec: c, .. } => assert_eq!(c, codec),
                _ => {}
            }
        }
        got
    })
    .await
    .expect("every echo arrives");
    assert_eq!(got, (0..20).map(json).collect::<Vec<_>>());
    let traffic = client.stats().await.unwrap().stats.traffic;
    client.close().await.unwrap();
    echo.abort();
    (traffic.bytes_out, traffic.bytes_in)
}

#[tokio::test]
async fn json_travels_in_a_fraction_of_the_bytes_when_both_sides_agree() {
    let payloads: u64 = (0..20).map(|n| json(n).len() as u64).sum();
    for codec in [Codec::MsgPack, Codec::Json] {
        for handshake in ["header", "url", "frame"] {
            let (out, back) = echo(true, true, codec, handshake).await;
            let what = format!("{codec:?}, hello in the {handshake}");
            assert!(out * 4 < payloads, "{what}: {out} bytes for {payloads}");
            assert!(back * 4 < payloads, "{what}: {back} bytes for {payloads}");
        }
    }
    // One side alone changes nothing.
    for (server_on, client_on) in [(true, false), (false, true)] {
        let (out, back) = echo(server_on, client_on, Codec::MsgPack, "header").await;
        assert!(out > payloads && back > payloads, "{out} {back}");
    }
}
