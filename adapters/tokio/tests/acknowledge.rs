//! `Acknowledge::AfterHandled` over real sockets: the client hears no
//! acknowledgment for a message until the server's application says it
//! handled it, then hears it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::StreamExt;
use kitestring::{Acknowledge, ClientOptions, Event, ServerConfig, ServerEvent, ServerOptions};

#[tokio::test]
async fn a_message_is_acknowledged_once_handled() {
    let rt = kitestring_tokio::runtime();
    let options = ServerOptions {
        config: ServerConfig {
            acknowledge: Acknowledge::AfterHandled,
            ..ServerConfig::default()
        },
        ..ServerOptions::default()
    };
    let (server, mut events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options).unwrap();
    let url = format!("ws://{}/", server.local_addr().unwrap());
    let (client, mut c_events) = kitestring::connect(rt, &url, ClientOptions::default()).unwrap();
    let sent = client.send(&"handle me").await.unwrap();
    let (session, seq) = loop {
        match events.next().await.unwrap() {
            ServerEvent::Message { session, message } => break (session, message.seq),
            _ => continue,
        }
    };
    // Nothing is acknowledged while the application holds the message
    // (the acknowledgment delay is 100 ms).
    let early = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Some(Event::Acked { .. }) = c_events.next().await {
                return;
            }
        }
    })
    .await;
    assert!(early.is_err(), "acknowledged before it was handled");
    server.handled(session, seq).await.unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Event::Acked { first, last }) = c_events.next().await {
                return (first, last);
            }
        }
    })
    .await
    .expect("acknowledged once handled");
    assert_eq!(acked, (sent, sent));
    client.close().await.unwrap();
}
