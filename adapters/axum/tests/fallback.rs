//! The HTTP fallback through axum, over real sockets: behind a proxy that
//! answers WebSocket upgrades `400`, a Kitestring client reaches the same
//! server through each of the three forms (route, service, layer) over
//! plain HTTP requests, and messages cross both ways exactly once; the
//! application's other routes stay as they were.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::serve;
use futures_util::StreamExt;
use kitestring::{ClientOptions, Event, ServerEvent, ServerOptions, TransportKind};
use kitestring_chaos::{Proxy, Upgrades};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_is_served_through_every_form() {
    let rt = kitestring_tokio::runtime();
    let (server, mut events) = kitestring::start(rt.clone(), ServerOptions::default()).unwrap();
    let routers = common::forms(&server);
    for (form, app) in routers {
        let addr = serve(app).await;
        let proxy = Proxy::start(addr).unwrap();
        proxy.set_upgrades(Upgrades::Refuse);
        let url = format!("ws://{}/ws", proxy.local_addr());
        let (client, mut cev) =
            kitestring::connect(rt.clone(), &url, ClientOptions::default()).unwrap();
        let session = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(Event::Connected { session, .. }) = cev.next().await {
                    break session;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{form}: connected over the fallback"));
        assert_eq!(client.transport(), Some(TransportKind::Http), "{form}");
        for i in 0..20u32 {
            client.send(&i).await.unwrap();
            server.send(session, &i).await.unwrap();
        }
        let mut to_server = Vec::new();
        let mut to_client = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while to_server.len() < 20 || to_client.len() < 20 {
                tokio::select! {
                    Some(e) = events.next() => if let ServerEvent::Message { session: s, message } = e {
                        if s == session {
                            to_server.push(kitestring::decode::<u32>(&message.payload).unwrap());
                        }
                    },
                    Some(e) = cev.next() => if let Event::Message(m) = e {
                        to_client.push(kitestring::decode::<u32>(&m.payload).unwrap());
                    },
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{form}: every message arrived"));
        let want: Vec<u32> = (0..20).collect();
        assert_eq!(
            to_server, want,
            "{form}: to the server, once each, in order"
        );
        assert_eq!(
            to_client, want,
            "{form}: to the client, once each, in order"
        );
        client.close().await.unwrap();
        // The page beside it is untouched.
        let (page, _) = common::exchange(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(page.status, 200, "{form}");
    }
}
