//! What a browser page's client meets, over real sockets, through the
//! built-in listener and through axum (PROTOCOL.md, sections 1 and 4.2):
//! the `hello` in the URL answered by the first frame, refusals in-band
//! (a `reject` and a close with 4401, 4403 or 4429) for requests whose
//! `hello` is in the URL while other clients keep their statuses, and the
//! Rust client taking the same path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use common::{exchange, hello_header, read_frames, serve, upgrade_request};
use futures_util::StreamExt;
use kitestring::{
    AuthReject, AuthRequest, Authenticator, ClientOptions, Event as ClientEvent, FailReason,
    Refusals, ServerHandle, ServerOptions, State,
};

const HELLO: &str = r#"{"t":"hello","versions":[1],"client":"c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1c1","caps":[],"codecs":["json"]}"#;

fn encoded(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `/ws` with the `hello` in the URL, and `extra` query parameters.
fn url_hello_path(extra: &str) -> String {
    format!("/ws?{extra}kitestring-hello={}", encoded(HELLO))
}

/// The `ticket` query parameter: `good` is alice, `nope` is forbidden,
/// `down` unavailable, anything else (or none) unauthorized.
fn options(refusals: Refusals) -> ServerOptions {
    ServerOptions {
        auth: Some(Authenticator::new(|req: AuthRequest| async move {
            match req.query_param("ticket") {
                Some("good") => Ok(Some("alice".to_owned())),
                Some("nope") => Err(AuthReject::Forbidden),
                Some("down") => Err(AuthReject::Unavailable),
                _ => Err(AuthReject::Unauthorized),
            }
        })),
        refusals,
        retry_after: Duration::from_secs(3),
        ..ServerOptions::default()
    }
}

/// The same options behind the built-in listener and an axum route, and
/// the servers' handles (kept for as long as the test runs).
async fn both(options: ServerOptions) -> ([(&'static str, SocketAddr); 2], [ServerHandle; 2]) {
    let rt = kitestring_tokio::runtime();
    let (bound, _events) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), options.clone()).unwrap();
    let (routed, _events) = kitestring::start(rt, options).unwrap();
    let app = Router::new().route("/ws", kitestring_axum::route(routed.clone()));
    let addr = serve(app).await;
    (
        [("listener", bound.local_addr().unwrap()), ("axum", addr)],
        [bound, routed],
    )
}

fn text(frame: &(u8, Vec<u8>)) -> String {
    String::from_utf8_lossy(&frame.1).into_owned()
}

fn close_code(frame: &(u8, Vec<u8>)) -> u16 {
    assert_eq!(frame.0, 8, "a close frame");
    u16::from_be_bytes([frame.1[0], frame.1[1]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_in_the_url_is_answered_by_the_first_frame() {
    let (addrs, _servers) = both(ServerOptions::default()).await;
    for (via, addr) in addrs {
        let (r, mut socket) = exchange(addr, &upgrade_request(&url_hello_path(""), "")).await;
        assert_eq!(r.status, 101, "{via}: {r:?}");
        assert_eq!(
            r.header("kitestring-welcome"),
            None,
            "{via}: not in the 101"
        );
        let frames = read_frames(&mut socket, r.rest, 1).await;
        assert_eq!(frames[0].0, 1, "{via}: a text frame");
        assert!(
            text(&frames[0]).starts_with(r#"{"t":"welcome""#),
            "{via}: {}",
            text(&frames[0])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_refused_in_band_and_other_clients_by_status() {
    let (addrs, _servers) = both(options(Refusals::InBandForPages)).await;
    for (via, addr) in addrs {
        let cases = [
            ("", 4401, "unauthorized", 401),
            ("ticket=nope&", 4403, "forbidden", 403),
            ("ticket=down&", 4429, "try_later", 503),
        ];
        for (ticket, code, reason, status) in cases {
            let (r, mut socket) =
                exchange(addr, &upgrade_request(&url_hello_path(ticket), "")).await;
            assert_eq!(r.status, 101, "{via} {reason}: {r:?}");
            let frames = read_frames(&mut socket, r.rest, 3).await;
            let reject = text(&frames[0]);
            assert!(
                reject.starts_with(r#"{"t":"reject""#)
                    && reject.contains(&format!(r#""code":{code}"#))
                    && reject.contains(&format!(r#""reason":"{reason}""#)),
                "{via}: {reject}"
            );
            if code == 4429 {
                assert!(reject.contains(r#""retry":3000"#), "{via}: {reject}");
            }
            assert_eq!(close_code(&frames[1]), code, "{via} {reason}");
            // A client with the hello in a header (or none) gets the status.
            let path = format!("/ws?{}", ticket.trim_end_matches('&'));
            let (r, _) = exchange(addr, &upgrade_request(&path, &hello_header())).await;
            assert_eq!(r.status, status, "{via} {reason}: {r:?}");
        }
        // A page of another site: refused in-band too, before any credential.
        let (r, mut socket) = exchange(
            addr,
            &upgrade_request(
                &url_hello_path("ticket=good&"),
                "Origin: http://evil.example\r\n",
            ),
        )
        .await;
        assert_eq!(r.status, 101, "{via}: {r:?}");
        let frames = read_frames(&mut socket, r.rest, 3).await;
        assert!(
            text(&frames[0]).contains(r#""reason":"origin_not_allowed""#),
            "{via}"
        );
        assert_eq!(close_code(&frames[1]), 4403, "{via}");
        // With a ticket, the page's session opens.
        let (r, mut socket) =
            exchange(addr, &upgrade_request(&url_hello_path("ticket=good&"), "")).await;
        let frames = read_frames(&mut socket, r.rest, 1).await;
        assert!(text(&frames[0]).starts_with(r#"{"t":"welcome""#), "{via}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_follow_the_option() {
    let (addrs, _servers) = both(options(Refusals::Status)).await;
    for (via, addr) in addrs {
        let (r, _) = exchange(addr, &upgrade_request(&url_hello_path(""), "")).await;
        assert_eq!(r.status, 401, "{via}: statuses only: {r:?}");
    }
    let (addrs, _servers) = both(options(Refusals::InBand)).await;
    for (via, addr) in addrs {
        // In-band for every client: a hello in the header gets its reject
        // in the 101's header, then the close.
        let (r, mut socket) = exchange(addr, &upgrade_request("/ws", &hello_header())).await;
        assert_eq!(r.status, 101, "{via}: {r:?}");
        let answer = r
            .header("kitestring-welcome")
            .expect("the reject in the 101");
        assert!(answer.contains(r#""code":4401"#), "{via}: {answer}");
        let frames = read_frames(&mut socket, r.rest, 2).await;
        assert_eq!(close_code(&frames[0]), 4401, "{via}: the close follows");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_takes_the_pages_path() {
    let rt = kitestring_tokio::runtime();
    let (server, mut server_events) = kitestring::bind(
        rt.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerOptions::default(),
    )
    .unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    let options = ClientOptions {
        hello_in_url: true,
        ..ClientOptions::default()
    };
    let (client, mut events) = kitestring::connect(rt.clone(), &url, options.clone()).unwrap();
    let echo = tokio::spawn({
        let server = server.clone();
        async move {
            while let Some(e) = server_events.next().await {
                if let kitestring::ServerEvent::Message { session, message } = e {
                    let _ = server.send_payload(session, message.payload).await;
                }
            }
        }
    });
    client.send_acked(&"one").await.unwrap();
    let mut opened = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(e) = tokio::time::timeout_at(deadline.into(), events.next())
        .await
        .expect("an echo within 10 s")
    {
        match e {
            ClientEvent::Connected { resumed, .. } => {
                assert!(!resumed);
                opened += 1;
            }
            ClientEvent::Message(_) => break,
            _ => {}
        }
    }
    assert_eq!(opened, 1);
    // One attempt, no hello frame: the answer came as the first frame.
    let snapshot = client.stats().await.unwrap();
    assert_eq!(snapshot.stats.connects, 1);
    echo.abort();

    // A banned user's page stops at the first attempt, at once.
    let banned = ServerOptions {
        auth: Some(Authenticator::sync(|_: &AuthRequest| {
            Err(AuthReject::Forbidden)
        })),
        ..ServerOptions::default()
    };
    let (server, _e) =
        kitestring::bind(rt.clone(), "127.0.0.1:0".parse().unwrap(), banned).unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    let started = Instant::now();
    let (client, mut events) = kitestring::connect(rt, &url, options).unwrap();
    let failed = loop {
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("failed within 5 s")
        {
            Some(ClientEvent::StateChanged {
                new: State::Failed { reason },
                ..
            }) => break reason,
            Some(_) => {}
            None => panic!("events ended"),
        }
    };
    assert_eq!(failed, FailReason::Forbidden);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(client.stats().await.unwrap().stats.connects, 1);
}
