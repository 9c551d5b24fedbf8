//! The example application (`examples/app.rs`), started and driven over
//! real sockets on 127.0.0.1: log in over HTTP, open a Kitestring session
//! with the cookie on the same port, echo messages, and scrape `/metrics`
//! as Prometheus would, checking the names and that the values move.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[allow(dead_code, unreachable_pub, missing_docs)]
#[path = "../examples/app.rs"]
mod app;

use std::time::{Duration, Instant};

use common::{http, serve};
use futures_util::StreamExt;
use kitestring::{ClientOptions, DecodeExt, Event, ServerEvent};
use metrics_exporter_prometheus::PrometheusBuilder;

/// The next `n` numbers echoed to a client.
async fn echoes(n: usize, events: &mut kitestring::ClientEvents) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
            Ok(Some(Event::Message(m))) => got.push(m.decode::<u32>().expect("a number")),
            Ok(Some(_)) => {}
            other => panic!("no echo: {other:?}"),
        }
    }
    got
}

/// The value of the sample `name` (with no labels) in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_page_session_and_metrics_on_one_port() {
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test process");
    let app = app::build(prometheus, Duration::from_millis(100)).expect("server");
    let (mut server_events, server) = (app.events, app.server.clone());
    let addr = serve(app.router).await;

    // The page and the login, over plain HTTP.
    let page = http(addr, "GET", "/", "", "").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<form"), "{}", page.body);
    let refused = http(addr, "POST", "/login", "", "user=").await;
    assert_eq!(refused.status, 400);
    let login = http(addr, "POST", "/login", "", "user=alice").await;
    assert_eq!(login.status, 200, "{login:?}");
    let cookie = login.header("set-cookie").expect("a cookie");
    let sid = cookie
        .split(';')
        .next()
        .and_then(|kv| kv.strip_prefix("sid="))
        .expect("sid=...")
        .to_owned();

    // Without the cookie the upgrade is refused; with it, the session opens
    // for the user the middleware found.
    let (r, _) = common::exchange(addr, &common::upgrade_request("/ws", "")).await;
    assert_eq!(r.status, 401);
    let options = ClientOptions {
        token: Some(kitestring::token_provider(move || {
            let sid = sid.clone();
            async move { Some(sid) }
        })),
        token_header: "cookie".into(),
        token_prefix: "sid=".into(),
        ..ClientOptions::default()
    };
    let (client, mut events) = kitestring::connect(
        kitestring_tokio::runtime(),
        &format!("ws://{addr}/ws"),
        options,
    )
    .expect("client");
    let identity = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(ServerEvent::SessionOpened { identity, .. }) = server_events.next().await {
                return identity;
            }
        }
    })
    .await
    .expect("a session within 10 s");
    assert_eq!(identity.as_deref(), Some("alice"));
    tokio::spawn(app::echo(server, server_events));

    // Echoes, exactly once each.
    for i in 0..5u32 {
        client.send(&i).await.expect("send");
    }
    assert_eq!(echoes(5, &mut events).await, vec![0, 1, 2, 3, 4]);

    // Scraped over HTTP, as Prometheus does: the names are there, with the
    // values of this one session.
    let scrape = |min_received: f64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = http(addr, "GET", "/metrics", "", "").await;
            assert_eq!(r.status, 200);
            if sample(&r.body, "kitestring_messages_received_total")
                .is_some_and(|v| v >= min_received)
            {
                return r.body;
            }
            assert!(
                Instant::now() < deadline,
                "no {min_received} messages in:\n{}",
                r.body
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let first = scrape(5.0).await;
    for name in [
        "kitestring_connections",
        "kitestring_sessions",
        "kitestring_messages_in_flight",
        "kitestring_messages_queued",
        "kitestring_sessions_created_total",
        "kitestring_connections_opened_total",
        "kitestring_messages_sent_total",
        "kitestring_messages_retransmitted_total",
        "kitestring_bytes_in_total",
        "kitestring_bytes_out_total",
        "kitestring_frames_in_total",
        "kitestring_acks_received_total",
    ] {
        assert!(
            sample(&first, name).is_some(),
            "{name} missing from:\n{first}"
        );
    }
    assert_eq!(sample(&first, "kitestring_connections"), Some(1.0));
    assert_eq!(sample(&first, "kitestring_sessions"), Some(1.0));
    assert_eq!(
        sample(&first, "kitestring_sessions_created_total"),
        Some(1.0)
    );
    assert!(
        first.contains("kitestring_upgrades_refused_total{status=\"401\"} 1"),
        "{first}"
    );
    assert!(
        first.contains("# TYPE kitestring_auth_duration_seconds summary"),
        "{first}"
    );
    let bytes_in = sample(&first, "kitestring_bytes_in_total").unwrap_or(0.0);

    // More traffic moves the counters.
    for i in 5..10u32 {
        client.send(&i).await.expect("send");
    }
    assert_eq!(echoes(5, &mut events).await, vec![5, 6, 7, 8, 9]);
    let second = scrape(10.0).await;
    assert!(sample(&second, "kitestring_bytes_in_total").unwrap_or(0.0) > bytes_in);
    assert!(sample(&second, "kitestring_messages_sent_total").unwrap_or(0.0) >= 10.0);

    // A closed session shows in the gauges and the close codes.
    client.close().await.expect("close");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http(addr, "GET", "/metrics", "", "").await;
        if sample(&r.body, "kitestring_sessions") == Some(0.0)
            && r.body
                .contains("kitestring_close_codes_total{code=\"1000\"} 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the close never showed:\n{}",
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
