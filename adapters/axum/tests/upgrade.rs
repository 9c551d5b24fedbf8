//! The upgrade through axum, over real sockets: the handshake in the
//! upgrade, the same answers as the built-in listener for refused upgrades,
//! the configured limits, and asynchronous authentication that holds up no
//! other connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{exchange, hello_header, http, serve, upgrade_request, ACCEPT};
use futures_util::{SinkExt, StreamExt};
use kitestring::{AuthReject, AuthRequest, Authenticator, ServerHandle, ServerOptions};

/// Bearer `good`: alice; `slow`: bob after 1.5 s; `stuck`: never within
/// the timeout; `down`: unavailable; anything else: 401.
fn options(auth_timeout: Duration) -> ServerOptions {
    ServerOptions {
        auth: Some(Authenticator::new(|req: AuthRequest| async move {
            match req.bearer_token() {
                Some("good") => Ok(Some("alice".to_owned())),
                Some("slow") => {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok(Some("bob".to_owned()))
                }
                Some("stuck") => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok(None)
                }
                Some("down") => Err(AuthReject::Unavailable),
                Some("nope") => Err(AuthReject::Forbidden),
                _ => Err(AuthReject::Unauthorized),
            }
        })),
        auth_timeout,
        ..ServerOptions::default()
    }
}

/// The same server options behind the built-in listener and behind an
/// axum route: (listener address, axum address).
async fn both(options: ServerOptions) -> (SocketAddr, SocketAddr, ServerHandle, ServerHandle) {
    let rt = kitestring_tokio::runtime();
    let (bound, _events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options.clone()).unwrap();
    let (routed, _events) = kitestring::start(rt, options).unwrap();
    let app = Router::new()
        .route("/", get(|| async { "a page" }))
        .route("/ws", kitestring_axum::route(routed.clone()));
    let axum_addr = serve(app).await;
    (bound.local_addr().unwrap(), axum_addr, bound, routed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hello_is_answered_in_the_101_through_every_form() {
    let rt = kitestring_tokio::runtime();
    let (server, _events) = kitestring::start(rt, ServerOptions::default()).unwrap();
    let routers = common::forms(&server);
    for (form, router) in routers {
        let addr = serve(router).await;
        let page = http(addr, "GET", "/", "", "").await;
        assert_eq!((page.status, page.body.as_str()), (200, "a page"), "{form}");
        let (r, _socket) = exchange(addr, &upgrade_request("/ws", &hello_header())).await;
        assert_eq!(r.status, 101, "{form}: {r:?}");
        assert_eq!(r.header("sec-websocket-accept"), Some(ACCEPT), "{form}");
        let welcome = r
            .header("kitestring-welcome")
            .unwrap_or_else(|| panic!("{form}: no Kitestring-Welcome in {r:?}"));
        assert!(
            welcome.starts_with("{\"t\":\"welcome\""),
            "{form}: {welcome}"
        );
        // Without the header, the 101 carries no answer (the client then
        // sends its hello as a frame).
        let (r, _socket) = exchange(addr, &upgrade_request("/ws", "")).await;
        assert_eq!(r.status, 101, "{form}");
        assert_eq!(r.header("kitestring-welcome"), None, "{form}");
    }
    // The core opened a session for each hello in an upgrade.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.metrics().await.unwrap().counters.sessions_created < 3 {
        assert!(Instant::now() < deadline, "sessions were not opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_get_the_listeners_answers() {
    let (bound, routed, _b, _r) = both(options(Duration::from_millis(700))).await;
    let ok = "Authorization: Bearer good\r\n";
    let cases: Vec<(&str, String, u16)> = vec![
        (
            "a plain GET",
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".into(),
            426,
        ),
        (
            "a POST",
            upgrade_request("/ws", ok).replacen("GET", "POST", 1),
            405,
        ),
        (
            "version 8",
            upgrade_request("/ws", ok).replace("Version: 13", "Version: 8"),
            426,
        ),
        (
            "a bad key",
            upgrade_request("/ws", ok).replace(common::KEY, "AAAA"),
            400,
        ),
        (
            "two keys",
            upgrade_request(
                "/ws",
                &format!("{ok}Sec-WebSocket-Key: {}\r\n", common::KEY),
            ),
            400,
        ),
        (
            "a foreign origin",
            upgrade_request("/ws", &format!("{ok}Origin: https://evil.example\r\n")),
            403,
        ),
        ("no credentials", upgrade_request("/ws", ""), 401),
        (
            "forbidden",
            upgrade_request("/ws", "Authorization: Bearer nope\r\n"),
            403,
        ),
        (
            "authentication down",
            upgrade_request("/ws", "Authorization: Bearer down\r\n"),
            503,
        ),
        (
            "authentication too slow",
            upgrade_request("/ws", "Authorization: Bearer stuck\r\n"),
            503,
        ),
        ("accepted", upgrade_request("/ws", ok), 101),
    ];
    for (what, request, status) in cases {
        let (a, _) = exchange(bound, &request).await;
        let (b, _) = exchange(routed, &request).await;
        assert_eq!(a.status, status, "listener, {what}: {a:?}");
        assert_eq!(b.status, status, "axum, {what}: {b:?}");
        for name in [
            "upgrade",
            "sec-websocket-version",
            "allow",
            "sec-websocket-accept",
            "content-type",
            "retry-after",
        ] {
            assert_eq!(a.header(name), b.header(name), "{what}: header {name}");
        }
        // A 503 says when to come back (the default 10 s); nothing else
        // does.
        let retry = (status == 503).then_some("10");
        assert_eq!(a.header("retry-after"), retry, "{what}: retry-after");
        assert_eq!(a.body, b.body, "{what}: body");
        if status != 101 {
            assert!(!b.body.is_empty(), "{what}: a refusal says why");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_authentication_holds_up_no_other_upgrade() {
    let (bound, routed, _b, _r) = both(options(Duration::from_secs(5))).await;
    for (side, addr) in [("listener", bound), ("axum", routed)] {
        let started = Instant::now();
        let slow = tokio::spawn(async move {
            let (r, _s) = exchange(
                addr,
                &upgrade_request("/ws", "Authorization: Bearer slow\r\n"),
            )
            .await;
            (r.status, started.elapsed())
        });
        // The slow check is under way when the fast one comes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fast_started = Instant::now();
        let (fast, _s) = exchange(
            addr,
            &upgrade_request("/ws", "Authorization: Bearer good\r\n"),
        )
        .await;
        let fast_took = fast_started.elapsed();
        assert_eq!(fast.status, 101, "{side}");
        assert!(
            // Waiting behind the slow check would take 1.4 s more.
            fast_took < Duration::from_millis(1000),
            "{side}: the fast upgrade waited {fast_took:?} behind the slow one"
        );
        assert!(!slow.is_finished(), "{side}: the slow check was not slow");
        let (status, slow_took) = slow.await.unwrap();
        assert_eq!(status, 101, "{side}");
        assert!(
            slow_took >= Duration::from_millis(1400),
            "{side}: {slow_took:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_message_limit_applies_through_axum() {
    let mut options = ServerOptions::default();
    options.config.max_message_size = 2048;
    let (server, _events) = kitestring::start(kitestring_tokio::runtime(), options).unwrap();
    let addr = serve(Router::new().route("/ws", kitestring_axum::route(server))).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("upgrade");
    let big = vec![7u8; 16 * 1024];
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(big.into()))
        .await
        .expect("send");
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame))))) => {
                break u16::from(frame.code)
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, 1009, "a message over the configured limit");
}
