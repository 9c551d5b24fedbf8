//! Two server nodes sharing one real `redis-server` (started by the test
//! on a free port), behind a proxy that plays the load balancer: a client
//! whose reconnect reaches the other node resumes its session there, with
//! messages in flight both ways, and a node that shuts down hands its
//! sessions over. Nothing is lost or duplicated, in either direction.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use kitestring::kitestring_core::client::{Cause, TransportError};
use kitestring::kitestring_core::config::ResumeSecret;
use kitestring::{
    AuthRequest, Authenticator, ClientEvents, ClientOptions, Event, ServerConfig, ServerEvent,
    ServerEvents, ServerHandle, ServerOptions, SessionId, State,
};
use kitestring_chaos::Proxy;
use kitestring_redis::testing::RedisServer;
use kitestring_redis::RedisBackplane;

const SECRET: [u8; 16] = *b"cluster-secret!!";

async fn node(redis: &RedisServer, name: &str) -> (ServerHandle, ServerEvents, SocketAddr) {
    let backplane = RedisBackplane::connect(&redis.url(), name).await.unwrap();
    let options = ServerOptions {
        // Who the client is: `?user=` in its URL (a real application
        // checks a credential).
        auth: Some(Authenticator::sync(|req: &AuthRequest| {
            Ok(req.query_param("user").map(str::to_owned))
        })),
        config: ServerConfig {
            resume_secret: ResumeSecret(SECRET),
            ..ServerConfig::default()
        },
        backplane: Some(Arc::new(backplane)),
        node_timeout: Duration::from_secs(3),
        ..ServerOptions::default()
    };
    let (server, events) = kitestring::bind(
        kitestring_tokio::runtime(),
        "127.0.0.1:0".parse().unwrap(),
        options,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    (server, events, addr)
}

/// What a node's application saw: the client's messages (by counter) and
/// the session it carried.
#[derive(Default)]
struct Seen {
    up: Vec<u64>,
    session: Option<SessionId>,
    moved: usize,
    arrived: usize,
}

/// Drains a node's events into `seen` until `until` says stop or `limit`
/// passes.
async fn watch(
    events: &mut ServerEvents,
    seen: &mut Seen,
    limit: Duration,
    until: impl Fn(&Seen) -> bool,
) {
    let end = tokio::time::Instant::now() + limit;
    while !until(seen) {
        let Ok(Some(e)) = tokio::time::timeout_at(end, events.next()).await else {
            return;
        };
        match e {
            ServerEvent::SessionOpened { session, .. } => seen.session = Some(session),
            ServerEvent::Message { message, .. } => seen
                .up
                .push(kitestring::decode::<u64>(&message.payload).unwrap()),
            ServerEvent::SessionMoved { .. } => seen.moved += 1,
            ServerEvent::SessionArrived { .. } => seen.arrived += 1,
            _ => {}
        }
    }
}

/// The client's side: messages from the server (by counter), and whether
/// the session was ever lost.
async fn client_watch(
    events: &mut ClientEvents,
    down: &mut Vec<u64>,
    lost: &mut bool,
    limit: Duration,
    want: usize,
) {
    let end = tokio::time::Instant::now() + limit;
    while down.len() < want {
        let Ok(Some(e)) = tokio::time::timeout_at(end, events.next()).await else {
            return;
        };
        match e {
            Event::Message(m) => down.push(kitestring::decode::<u64>(&m.payload).unwrap()),
            Event::SessionLost { .. } => *lost = true,
            _ => {}
        }
    }
}

fn exactly(got: &[u64], want: std::ops::Range<u64>, what: &str) {
    let expected: Vec<u64> = want.collect();
    assert_eq!(
        got,
        expected.as_slice(),
        "{what}: lost, duplicated or reordered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_node_and_survives_a_deploy() {
    let redis = RedisServer::start().expect("redis-server");
    let (a, mut a_events, a_addr) = node(&redis, "a").await;
    let (b, mut b_events, b_addr) = node(&redis, "b").await;
    let proxy = Proxy::start(a_addr).unwrap();
    let url = format!("ws://{}/", proxy.local_addr());
    let (client, mut c_events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, ClientOptions::default()).unwrap();

    // On node a: 50 messages each way, the last of them still in flight
    // when the connection is cut.
    let mut on_a = Seen::default();
    for k in 0..50u64 {
        client.send(&k).await.unwrap();
    }
    watch(&mut a_events, &mut on_a, Duration::from_secs(10), |s| {
        s.session.is_some()
    })
    .await;
    let session = on_a.session.expect("a session on node a");
    for k in 0..50u64 {
        a.send(session, &k).await.unwrap();
    }
    let mut down = Vec::new();
    let mut lost = false;
    client_watch(
        &mut c_events,
        &mut down,
        &mut lost,
        Duration::from_secs(10),
        30,
    )
    .await;
    watch(&mut a_events, &mut on_a, Duration::from_secs(10), |s| {
        s.up.len() >= 30
    })
    .await;

    // The balancer now sends everyone to node b; the connection to a is cut
    // with traffic still flowing both ways.
    proxy.set_targets(&[b_addr]);
    for k in 50..60u64 {
        client.send(&k).await.unwrap();
        a.send(session, &k).await.unwrap();
    }
    proxy.cut_all();

    // The client resumes on b: b claims the session from a, which hands it
    // over; b sends more once it has it.
    let mut on_b = Seen::default();
    watch(&mut b_events, &mut on_b, Duration::from_secs(20), |s| {
        s.session.is_some()
    })
    .await;
    assert_eq!(
        on_b.session,
        Some(session),
        "the same session, resumed on b"
    );
    assert_eq!(on_b.arrived, 1);
    for k in 60..70u64 {
        b.send(session, &k).await.unwrap();
    }
    for k in 60..70u64 {
        client.send(&k).await.unwrap();
    }
    client_watch(
        &mut c_events,
        &mut down,
        &mut lost,
        Duration::from_secs(20),
        70,
    )
    .await;
    watch(&mut a_events, &mut on_a, Duration::from_secs(2), |s| {
        s.moved == 1
    })
    .await;
    let before = on_a.up.len();
    watch(&mut b_events, &mut on_b, Duration::from_secs(20), |s| {
        s.up.len() + before >= 70
    })
    .await;
    assert_eq!(on_a.moved, 1, "node a reported the session moved");
    assert!(!lost, "the client lost its session");
    exactly(&down, 0..70, "server to client");
    let mut up = on_a.up.clone();
    up.extend(&on_b.up);
    exactly(&up, 0..70, "client to server");

    // A deploy: node b shuts down and hands its session over; the balancer
    // sends the client back to a, where it resumes.
    proxy.set_targets(&[a_addr]);
    for k in 70..80u64 {
        b.send(session, &k).await.unwrap();
    }
    b.shutdown().await.unwrap();
    for k in 70..80u64 {
        client.send(&k).await.unwrap();
    }
    let mut again = Seen::default();
    watch(&mut a_events, &mut again, Duration::from_secs(20), |s| {
        s.session.is_some() && s.up.len() >= 10
    })
    .await;
    assert_eq!(
        again.session,
        Some(session),
        "resumed on a after b's deploy"
    );
    a.send(session, &90u64).await.unwrap();
    client_watch(
        &mut c_events,
        &mut down,
        &mut lost,
        Duration::from_secs(20),
        81,
    )
    .await;
    watch(&mut b_events, &mut on_b, Duration::from_secs(2), |s| {
        s.moved == 1
    })
    .await;
    assert!(!lost, "the client lost its session in the deploy");
    let mut want: Vec<u64> = (0..80).collect();
    want.push(90);
    assert_eq!(down, want, "server to client across the deploy");
    let mut up = on_a.up.clone();
    up.extend(&on_b.up);
    up.extend(&again.up);
    exactly(&up, 0..80, "client to server across the deploy");
    let unique: BTreeSet<u64> = up.iter().copied().collect();
    assert_eq!(unique.len(), up.len());
    client.close().await.unwrap();
}

/// Redis goes away (killed) while a client moves to another node, and
/// comes back empty: the claim is refused with "try later" meanwhile (the
/// client keeps its session and backs off), the node holding the session
/// writes its keys again when it sees them gone, and the resume then
/// succeeds with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_waits_out_a_redis_restart() {
    let mut redis = RedisServer::start().expect("redis-server");
    let (a, mut a_events, a_addr) = node(&redis, "a").await;
    let (_b, mut b_events, b_addr) = node(&redis, "b").await;
    let proxy = Proxy::start(a_addr).unwrap();
    let url = format!("ws://{}/", proxy.local_addr());
    let (client, mut c_events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, ClientOptions::default()).unwrap();
    for k in 0..20u64 {
        client.send(&k).await.unwrap();
    }
    let mut on_a = Seen::default();
    watch(&mut a_events, &mut on_a, Duration::from_secs(10), |s| {
        s.up.len() == 20
    })
    .await;
    let session = on_a.session.expect("a session on node a");
    for k in 0..20u64 {
        a.send(session, &k).await.unwrap();
    }
    let mut down = Vec::new();
    let mut lost = false;
    client_watch(
        &mut c_events,
        &mut down,
        &mut lost,
        Duration::from_secs(10),
        20,
    )
    .await;

    redis.kill();
    proxy.set_targets(&[b_addr]);
    proxy.cut_all();
    for k in 20..30u64 {
        client.send(&k).await.unwrap();
        a.send(session, &k).await.unwrap();
    }
    // The client tries b while Redis is down: refused, session kept.
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.restart().unwrap();

    let mut on_b = Seen::default();
    watch(&mut b_events, &mut on_b, Duration::from_secs(40), |s| {
        s.up.len() == 10
    })
    .await;
    assert_eq!(
        on_b.session,
        Some(session),
        "resumed on b after Redis came back"
    );
    client_watch(
        &mut c_events,
        &mut down,
        &mut lost,
        Duration::from_secs(20),
        30,
    )
    .await;
    assert!(!lost, "the client lost its session");
    exactly(&down, 0..30, "server to client");
    let mut up = on_a.up.clone();
    up.extend(&on_b.up);
    exactly(&up, 0..30, "client to server");
    client.close().await.unwrap();
}

/// The same move on smol (the `redis` crate's smol runtime): a client
/// resumes on the other node with nothing lost.
#[test]
fn a_session_moves_between_nodes_on_smol() {
    smol::block_on(async {
        let redis = RedisServer::start().expect("redis-server");
        let start = |name: &'static str| {
            let url = redis.url();
            async move {
                let backplane = RedisBackplane::connect(&url, name).await.unwrap();
                let options = ServerOptions {
                    config: ServerConfig {
                        resume_secret: ResumeSecret(SECRET),
                        ..ServerConfig::default()
                    },
                    backplane: Some(Arc::new(backplane)),
                    ..ServerOptions::default()
                };
                kitestring::bind(
                    kitestring_smol::runtime(),
                    "127.0.0.1:0".parse().unwrap(),
                    options,
                )
                .unwrap()
            }
        };
        let (a, mut a_events) = start("a").await;
        let (_b, mut b_events) = start("b").await;
        let a_addr = a.local_addr().unwrap();
        let b_addr = _b.local_addr().unwrap();
        let proxy = Proxy::start(a_addr).unwrap();
        let url = format!("ws://{}/", proxy.local_addr());
        let (client, mut c_events) =
            kitestring::connect(kitestring_smol::runtime(), &url, ClientOptions::default())
                .unwrap();
        for k in 0..10u64 {
            client.send(&k).await.unwrap();
        }
        let mut session = None;
        let mut up = Vec::new();
        while up.len() < 10 {
            match a_events.next().await.unwrap() {
                ServerEvent::SessionOpened { session: s, .. } => session = Some(s),
                ServerEvent::Message { message, .. } => {
                    up.push(kitestring::decode::<u64>(&message.payload).unwrap())
                }
                _ => {}
            }
        }
        let session = session.unwrap();
        for k in 0..10u64 {
            a.send(session, &k).await.unwrap();
        }
        proxy.set_targets(&[b_addr]);
        proxy.cut_all();
        for k in 10..20u64 {
            client.send(&k).await.unwrap();
        }
        let mut resumed = None;
        while up.len() < 20 {
            match b_events.next().await.unwrap() {
                ServerEvent::SessionOpened { session: s, .. } => resumed = Some(s),
                ServerEvent::Message { message, .. } => {
                    up.push(kitestring::decode::<u64>(&message.payload).unwrap())
                }
                _ => {}
            }
        }
        assert_eq!(resumed, Some(session));
        exactly(&up, 0..20, "client to server");
        let mut down = Vec::new();
        while down.len() < 10 {
            match c_events.next().await.unwrap() {
                Event::Message(m) => down.push(kitestring::decode::<u64>(&m.payload).unwrap()),
                Event::SessionLost { .. } => panic!("the session was lost"),
                _ => {}
            }
        }
        exactly(&down, 0..10, "server to client");
        client.close().await.unwrap();
    });
}

/// Directed messages and lookups across nodes: a node finds where a
/// session and an identity's sessions are, and sends to a session another
/// node holds; after the session moves, the lookup follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_finds_and_sends_to_a_session_on_another_node() {
    let redis = RedisServer::start().expect("redis-server");
    let (a, mut a_events, a_addr) = node(&redis, "a").await;
    let (b, mut b_events, b_addr) = node(&redis, "b").await;
    let proxy = Proxy::start(a_addr).unwrap();
    let url = format!("ws://{}/?user=alice", proxy.local_addr());
    let (client, mut c_events) =
        kitestring::connect(kitestring_tokio::runtime(), &url, ClientOptions::default()).unwrap();
    let mut on_a = Seen::default();
    watch(&mut a_events, &mut on_a, Duration::from_secs(10), |s| {
        s.session.is_some()
    })
    .await;
    let session = on_a.session.unwrap();

    // b looks alice up (the registry is written within a heartbeat).
    let mut found = Vec::new();
    for _ in 0..50 {
        found = b.sessions_of("alice").await.unwrap();
        if !found.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].session, found[0].node.as_str(), found[0].alive),
        (session, "a", true)
    );
    assert_eq!(
        b.locate(session).await.unwrap().map(|l| l.node),
        Some("a".into())
    );
    assert_eq!(
        a.locate(session).await.unwrap().map(|l| l.node),
        Some("a".into())
    );
    assert!(b.sessions_of("bob").await.unwrap().is_empty());

    // b sends to the session a holds: a queues it, the client gets it.
    let sent = b.send_to(session, &7u64).await.unwrap();
    assert_eq!(sent.node, "a");
    let sent_here = a.send_to(session, &8u64).await.unwrap();
    assert_eq!(sent_here.node, "a");
    let mut down = Vec::new();
    let mut lost = false;
    client_watch(
        &mut c_events,
        &mut down,
        &mut lost,
        Duration::from_secs(10),
        2,
    )
    .await;
    assert_eq!(down, vec![7, 8]);

    // The session moves to b; a's lookup and sends follow it.
    proxy.set_targets(&[b_addr]);
    proxy.cut_all();
    let mut on_b = Seen::default();
    watch(&mut b_events, &mut on_b, Duration::from_secs(20), |s| {
        s.session.is_some()
    })
    .await;
    assert_eq!(on_b.session, Some(session));
    let mut moved = None;
    for _ in 0..50 {
        moved = a.locate(session).await.unwrap().map(|l| l.node);
        if moved.as_deref() == Some("b") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(moved.as_deref(), Some("b"));
    let sent = a.send_to(session, &9u64).await.unwrap();
    assert_eq!(sent.node, "b");
    client_watch(
        &mut c_events,
        &mut down,
        &mut lost,
        Duration::from_secs(10),
        3,
    )
    .await;
    assert_eq!(down, vec![7, 8, 9]);
    assert!(!lost);
    let ghost = SessionId([7; 16]);
    assert!(a
        .send_to(ghost, &1u64)
        .await
        .unwrap_err()
        .is_unknown_session());
    assert_eq!(a.locate(ghost).await.unwrap(), None);
    client.close().await.unwrap();
}

/// Whether `cause` is the refusal of a claim that could not be settled,
/// as a client sending its `hello` in the `form` given sees it: a 503 for
/// one in the upgrade's header, an in-band 4429 otherwise.
fn claim_refused(cause: &Cause, form: &str) -> bool {
    match (form, cause) {
        ("header", Cause::Transport(TransportError::Http { status, .. })) => *status == 503,
        ("url" | "frame", Cause::Rejected { code, .. }) => code.0 == 4429,
        _ => false,
    }
}

/// While Redis is down, a resume that reaches the other node cannot be
/// claimed. Whichever way the client sends its `hello` (in the upgrade's
/// header, in the URL as a page does, or as the first frame), it is told
/// to try again, keeps its session, and tries again after its backoff
/// (a 503 without `Retry-After`, a 4429 with `retry` 1 s), not after the
/// 10 s that a "try again later" without a hint waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_claim_is_retried_after_the_backoff_whatever_carries_the_hello() {
    for form in ["header", "url", "frame"] {
        let mut redis = RedisServer::start().expect("redis-server");
        let (_a, _a_events, a_addr) = node(&redis, "a").await;
        let (_b, _b_events, b_addr) = node(&redis, "b").await;
        let proxy = Proxy::start(a_addr).unwrap();
        let url = format!("ws://{}/", proxy.local_addr());
        let mut options = ClientOptions::default();
        match form {
            "url" => options.hello_in_url = true,
            "frame" => options.config.hello_in_upgrade = false,
            _ => {}
        }
        let (client, mut events) =
            kitestring::connect(kitestring_tokio::runtime(), &url, options).unwrap();
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let Ok(Some(e)) = tokio::time::timeout_at(end, events.next()).await else {
                panic!("{form}: the client did not open on node a");
            };
            if let Event::StateChanged {
                new: State::Open, ..
            } = e
            {
                break;
            }
        }

        redis.kill();
        proxy.set_targets(&[b_addr]);
        proxy.cut_all();
        let (mut refused, mut retried) = (None, None);
        let end = tokio::time::Instant::now() + Duration::from_secs(30);
        while retried.is_none() {
            let Ok(Some(e)) = tokio::time::timeout_at(end, events.next()).await else {
                break;
            };
            match e {
                Event::StateChanged {
                    new: State::Reconnecting { cause, .. },
                    ..
                } if refused.is_none() && claim_refused(&cause, form) => {
                    refused = Some(tokio::time::Instant::now());
                }
                Event::StateChanged {
                    new: State::Connecting { .. },
                    ..
                } if refused.is_some() => retried = Some(tokio::time::Instant::now()),
                Event::SessionLost { .. } => panic!("{form}: the session was lost"),
                _ => {}
            }
        }
        let refused = refused.unwrap_or_else(|| panic!("{form}: no refused claim"));
        let waited =
            retried.unwrap_or_else(|| panic!("{form}: no attempt after the refusal")) - refused;
        // The second attempt's backoff: 2 s plus up to half of it (the
        // 10 s floor gave 12 to 15 s).
        assert!(
            waited <= Duration::from_secs(7),
            "{form}: the next attempt came {waited:?} after the refusal"
        );
        client.close().await.unwrap();
    }
}
