//! End-to-end scenarios over real loopback TCP, written once against
//! [`kitestring::Runtime`] and run on every runtime by the [`scenarios!`]
//! macro (each runtime crate's `tests/scenarios.rs` invokes it).
//!
//! Every await is bounded ([`within`]), so a bug fails a test instead of
//! hanging it, and every scenario checks counts, order and close codes.
#![deny(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kitestring::async_tungstenite::tungstenite::Message;
use kitestring::kitestring_core::backoff::Jitter;
use kitestring::kitestring_core::client::Cause;
use kitestring::kitestring_core::wire::{self, ClientId, Frame, Hello, Incoming, Limits};
use kitestring::{
    AuthReject, ClientConfig, ClientEvents, ClientHandle, ClientOptions, ClientTls, CloseCode,
    Codec, DecodeExt, Event, FailReason, PayloadKind, Runtime, ServerConfig, ServerEvent,
    ServerEvents, ServerHandle, ServerOptions, ServerTls, SessionEnd, SessionId, State,
};
use serde::{Deserialize, Serialize};

mod fallback;
mod rooms;
pub use fallback::{
    fallback_admission, fallback_bad_input, fallback_flood_is_throttled,
    fallback_moves_to_websocket_and_back, fallback_not_for_refusals, fallback_random_faults,
    fallback_stripped_upgrade, fallback_through_cuts,
};
pub use rooms::{
    broadcast_through_cuts, feeds_keep_order, joins_ride_in_the_hello, presence_after_resume,
    request_across_cut, rotation_without_loss, send_latest_coalesces, shutdown_keeps_rooms,
    slow_member_evicted, stream_member_falls_behind, typed_sends_use_session_codec,
    unauthorized_join_refused, Peer, Recorder,
};

/// Generates one `#[test]` per scenario. `$block_on` runs a future to
/// completion on the runtime under test; `$runtime` is an expression
/// (evaluated inside that runtime) giving its `Arc<dyn Runtime>`.
#[macro_export]
macro_rules! scenarios {
    ($block_on:path, $runtime:expr) => {
        $crate::scenarios!(@one $block_on, $runtime,
            exchange_json, exchange_msgpack, resume_after_drops, server_abort_resumes, half_open_detected,
            auth_rejected_401, auth_rejected_403, version_mismatch_rejected, hello_in_upgrade,
            shutdown_goes_away, client_close_ends_session, wss_exchange, reauth_in_session, reauth_async,
            handover_upgraded_socket, event_shards_keep_sessions_in_order, inline_handler_answers_in_order,
            slow_consumer_closed, broadcast_through_cuts, slow_member_evicted, feeds_keep_order,
            stream_member_falls_behind,
            unauthorized_join_refused, joins_ride_in_the_hello, presence_after_resume, rotation_without_loss,
            shutdown_keeps_rooms, request_across_cut, typed_sends_use_session_codec,
            send_latest_coalesces, unread_events_pause_reading, client_unread_events_pause_reading,
            fallback_through_cuts, fallback_stripped_upgrade, fallback_moves_to_websocket_and_back,
            fallback_bad_input, fallback_admission, fallback_flood_is_throttled,
            fallback_not_for_refusals, fallback_random_faults);
    };
    (@one $block_on:path, $runtime:expr, $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $block_on(async {
                    let rt = $runtime;
                    $crate::run(rt.clone(), stringify!($name), $crate::$name(rt)).await
                })
            }
        )*
    };
}

/// Runs a whole scenario under a 20 s limit and reports its wall time.
pub async fn run(rt: Arc<dyn Runtime>, name: &str, scenario: impl Future<Output = ()>) {
    let start = Instant::now();
    within(&rt, 20_000, name, scenario).await;
    eprintln!("{name}: {:?}", start.elapsed());
}

/// Awaits `fut` for at most `ms` milliseconds; panics naming `what` on timeout.
pub async fn within<F: Future>(rt: &Arc<dyn Runtime>, ms: u64, what: &str, fut: F) -> F::Output {
    match kitestring::util::timeout(&**rt, Duration::from_millis(ms), fut).await {
        Some(v) => v,
        None => panic!("timed out after {ms} ms: {what}"),
    }
}

/// Waits for the first client event matching `pick`, skipping others.
pub async fn client_wait<T>(
    rt: &Arc<dyn Runtime>,
    events: &mut ClientEvents,
    ms: u64,
    what: &str,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> T {
    within(rt, ms, what, async {
        loop {
            let e = events
                .next()
                .await
                .unwrap_or_else(|| panic!("client events ended: {what}"));
            if let Some(t) = pick(&e) {
                return t;
            }
        }
    })
    .await
}

/// Waits for the first server event matching `pick`, skipping others.
pub async fn server_wait<T>(
    rt: &Arc<dyn Runtime>,
    events: &mut ServerEvents,
    ms: u64,
    what: &str,
    mut pick: impl FnMut(&ServerEvent) -> Option<T>,
) -> T {
    within(rt, ms, what, async {
        loop {
            let e = events
                .next()
                .await
                .unwrap_or_else(|| panic!("server events ended: {what}"));
            if let Some(t) = pick(&e) {
                return t;
            }
        }
    })
    .await
}

/// The message the scenarios exchange.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Note {
    /// Position in the stream.
    pub n: u32,
    /// Some text.
    pub text: String,
}

pub(crate) fn note(n: u32) -> Note {
    Note {
        n,
        text: format!("note {n}"),
    }
}

/// Short heartbeats so a dead link is found in about a second.
pub fn fast_server() -> ServerOptions {
    ServerOptions {
        config: ServerConfig {
            ping_interval: Duration::from_millis(500),
            pong_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            grace: Duration::from_millis(200),
            session_grace: Duration::from_secs(10),
            ..ServerConfig::default()
        },
        close_timeout: Duration::from_millis(500),
        ..ServerOptions::default()
    }
}

/// Fast backoff, short liveness grace.
pub fn fast_client(codecs: Vec<Codec>) -> ClientOptions {
    let mut config = ClientConfig {
        codecs,
        ..ClientConfig::default()
    };
    config.backoff.base = Duration::from_millis(50);
    config.backoff.max = Duration::from_millis(200);
    config.backoff.jitter = Jitter::None;
    config.heartbeat.grace = Duration::from_millis(200);
    config.stability_window = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(2);
    ClientOptions {
        config,
        close_timeout: Duration::from_millis(500),
        ..ClientOptions::default()
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub(crate) fn serve(
    rt: &Arc<dyn Runtime>,
    options: ServerOptions,
) -> (ServerHandle, ServerEvents, SocketAddr) {
    let (server, events) = kitestring::bind(rt.clone(), loopback(), options).unwrap();
    let addr = server.local_addr().unwrap();
    (server, events, addr)
}

pub(crate) async fn opened(
    rt: &Arc<dyn Runtime>,
    events: &mut ClientEvents,
) -> (SessionId, bool, Codec) {
    client_wait(rt, events, 3000, "client Connected", |e| match e {
        Event::Connected {
            session,
            resumed,
            codec,
            ..
        } => Some((*session, *resumed, *codec)),
        _ => None,
    })
    .await
}

pub(crate) async fn session_opened(
    rt: &Arc<dyn Runtime>,
    events: &mut ServerEvents,
) -> (kitestring::ConnectionId, SessionId, Option<String>, bool) {
    server_wait(rt, events, 3000, "server SessionOpened", |e| match e {
        ServerEvent::SessionOpened {
            connection,
            session,
            identity,
            resumed,
            ..
        } => Some((*connection, *session, identity.clone(), *resumed)),
        _ => None,
    })
    .await
}

/// Scenario 1 (JSON): typed messages both ways, acks, raw bytes, datagram.
pub async fn exchange_json(rt: Arc<dyn Runtime>) {
    exchange(rt, Codec::Json).await;
}

/// Scenario 1 (MessagePack): typed messages both ways, acks, raw bytes, datagram.
pub async fn exchange_msgpack(rt: Arc<dyn Runtime>) {
    exchange(rt, Codec::MsgPack).await;
}

async fn exchange(rt: Arc<dyn Runtime>, codec: Codec) {
    let mut options = fast_server();
    options.config.codecs = vec![codec, Codec::Json];
    options.config.codecs.dedup();
    let (server, mut sev, addr) = serve(&rt, options);
    let mut codecs = vec![codec, Codec::Json];
    codecs.dedup();
    let (client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/ws"), fast_client(codecs)).unwrap();
    let (session, resumed, negotiated) = opened(&rt, &mut cev).await;
    assert!(!resumed);
    assert_eq!(negotiated, codec);
    assert_eq!(client.codec(), codec);
    let (_, s_session, _, _) = session_opened(&rt, &mut sev).await;
    assert_eq!(session, s_session);
    let kind = match codec {
        Codec::MsgPack => PayloadKind::MsgPack,
        _ => PayloadKind::Json,
    };

    const N: u32 = 50;
    for n in 0..N {
        within(&rt, 2000, "client send", client.send(&note(n)))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < N as usize {
        let m = server_wait(&rt, &mut sev, 3000, "server Message", |e| match e {
            ServerEvent::Message {
                session: s,
                message,
            } if *s == session => Some(message.clone()),
            _ => None,
        })
        .await;
        assert_eq!(m.payload.kind(), kind);
        got.push(m.decode::<Note>().unwrap());
    }
    assert_eq!(got, (0..N).map(note).collect::<Vec<_>>());

    for n in 0..N {
        within(&rt, 2000, "server send", server.send(session, &note(n)))
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < N as usize {
        let m = client_wait(&rt, &mut cev, 3000, "client Message", |e| match e {
            Event::Message(m) => Some(m.clone()),
            _ => None,
        })
        .await;
        assert_eq!(m.payload.kind(), kind);
        got.push(m.decode::<Note>().unwrap());
    }
    assert_eq!(got, (0..N).map(note).collect::<Vec<_>>());

    // Acknowledged send: resolves once the server has it.
    let acked = async {
        let id = client.send_acked(&note(1000)).await.unwrap();
        id
    };
    let pump = async {
        server_wait(&rt, &mut sev, 3000, "acked message", |e| match e {
            ServerEvent::Message { message, .. } => {
                (message.decode::<Note>().ok() == Some(note(1000))).then_some(())
            }
            _ => None,
        })
        .await
    };
    let (id, ()) = within(
        &rt,
        3000,
        "send_acked",
        futures_util::future::join(acked, pump),
    )
    .await;
    assert!(id.0 > N as u64);

    // Raw bytes and a datagram.
    client.send_bytes(vec![1u8, 2, 3]).await.unwrap();
    let raw = server_wait(&rt, &mut sev, 3000, "raw bytes", |e| match e {
        ServerEvent::Message { message, .. } if message.payload.kind() == PayloadKind::Binary => {
            Some(message.payload.data().to_vec())
        }
        _ => None,
    })
    .await;
    assert_eq!(raw, vec![1, 2, 3]);

    // Large payloads go detached (the envelope, then the payload as a
    // message of its own), mixed with small ones, both ways: each arrives
    // once, in order, intact.
    let sizes = [64 * 1024, 5, 4096, 20_000, 4095, 300_000];
    let big = |i: usize, len: usize| -> Vec<u8> { (0..len).map(|j| (i * 7 + j) as u8).collect() };
    for (i, len) in sizes.iter().enumerate() {
        client.send_bytes(big(i, *len)).await.unwrap();
        server
            .send_bytes(session, big(i + 100, *len))
            .await
            .unwrap();
    }
    for (i, len) in sizes.iter().enumerate() {
        let got = server_wait(&rt, &mut sev, 3000, "large bytes", |e| match e {
            ServerEvent::Message { message, .. }
                if message.payload.kind() == PayloadKind::Binary =>
            {
                Some(message.payload.data().to_vec())
            }
            _ => None,
        })
        .await;
        assert!(
            got == big(i, *len),
            "payload {i} of {len} bytes to the server"
        );
        let got = client_wait(&rt, &mut cev, 3000, "large bytes", |e| match e {
            Event::Message(m) if m.payload.kind() == PayloadKind::Binary => {
                Some(m.payload.data().to_vec())
            }
            _ => None,
        })
        .await;
        assert!(
            got == big(i + 100, *len),
            "payload {i} of {len} bytes to the client"
        );
    }
    let stats = client.stats().await.unwrap().stats;
    assert_eq!(stats.traffic.decode_failures, 0);

    client.send_datagram(vec![9u8; 4]).await.unwrap();
    let dg = server_wait(&rt, &mut sev, 3000, "datagram", |e| match e {
        ServerEvent::Datagram { data, .. } => Some(data.to_vec()),
        _ => None,
    })
    .await;
    assert_eq!(dg, vec![9; 4]);
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// An application that leaves server events unread: the server stops
/// reading sockets (the client's messages stay unacknowledged, nothing is
/// dropped), while the application's own sends still go out at once; once
/// the events are read, every message arrives in order.
pub async fn unread_events_pause_reading(rt: Arc<dyn Runtime>) {
    let options = ServerOptions {
        event_buffer: 8,
        close_timeout: Duration::from_millis(500),
        ..ServerOptions::default()
    };
    let (server, mut sev, addr) = serve(&rt, options);
    let (client, mut cev) = kitestring::connect(
        rt.clone(),
        &format!("ws://{addr}/ws"),
        fast_client(vec![Codec::MsgPack, Codec::Json]),
    )
    .unwrap();
    opened(&rt, &mut cev).await;
    let (_, session, _, _) = session_opened(&rt, &mut sev).await;

    const IN: u32 = 500;
    const OUT: u32 = 300;
    for n in 0..IN {
        within(&rt, 2000, "client send", client.send(&note(n)))
            .await
            .unwrap();
    }
    kitestring::util::sleep(&*rt, Duration::from_millis(300)).await;
    // The event stream is full and unread: the server's own sends still
    // complete at once and reach the client.
    for n in 0..OUT {
        within(
            &rt,
            2000,
            "server send while events are unread",
            server.send(session, &note(n)),
        )
        .await
        .unwrap();
    }
    let got = client_notes(&rt, &mut cev, OUT).await;
    assert_eq!(got, (0..OUT).map(note).collect::<Vec<_>>());
    let stats = within(&rt, 2000, "stats", client.stats()).await.unwrap();
    assert!(
        stats.unacknowledged.0 > (IN / 2) as usize,
        "the server kept reading with its event stream full: {} of {IN} unacknowledged",
        stats.unacknowledged.0
    );
    // The socket backs up behind the paused server: datagrams, which the
    // session does not queue, are refused instead of piling up.
    let mut sent = 0;
    let mut refused = false;
    for _ in 0..5000 {
        match client.send_datagram(vec![5u8; 16 * 1024]).await {
            Ok(()) => sent += 1,
            Err(kitestring::ClientError::Send(kitestring::SendError::QueueFull { .. })) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected datagram error {e}"),
        }
        // Let the driver write (a handle call never yields by itself).
        kitestring::util::sleep(&*rt, Duration::from_millis(1)).await;
    }
    assert!(refused, "{sent} datagrams queued behind a stalled socket");
    // Reading the events lets the server read again: everything arrives.
    let got = server_notes(&rt, &mut sev, IN).await;
    assert_eq!(got, (0..IN).map(note).collect::<Vec<_>>());
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// `n` clients of the server at `addr`, each with its events and session,
/// once each is open.
async fn open_clients(
    rt: &Arc<dyn Runtime>,
    addr: SocketAddr,
    n: usize,
) -> Vec<(ClientHandle, ClientEvents, SessionId)> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let (client, mut cev) = kitestring::connect(
            rt.clone(),
            &format!("ws://{addr}/ws"),
            fast_client(vec![Codec::MsgPack, Codec::Json]),
        )
        .unwrap();
        let (session, _, _) = opened(rt, &mut cev).await;
        clients.push((client, cev, session));
    }
    clients
}

/// An application that handles its events inline
/// ([`ServerEvents::handle_inline`]) on three shards: the events the
/// stream had taken and those queued before the handler was set reach it
/// first; every session's messages reach it once each and in order, and
/// its sends ([`ServerHandle::send_now`]) reach the clients in order, as
/// its answers to requests do ([`ServerHandle::respond_now`]); a panic in
/// the handler loses only the event it was called with.
pub async fn inline_handler_answers_in_order(rt: Arc<dyn Runtime>) {
    const CLIENTS: usize = 6;
    const N: u32 = 120;
    const EARLY: u32 = 5;
    /// The message whose handling panics.
    const PANIC: u32 = 60;
    let options = ServerOptions {
        // Room for the early messages' events, so that they are read.
        event_buffer: 64,
        event_shards: 3,
        ..fast_server()
    };
    let (server, mut events, addr) = serve(&rt, options);
    let mut clients = open_clients(&rt, addr, CLIENTS).await;
    // Messages sent before the handler exists: the stream takes the
    // queued events at once and hands out the first.
    for (client, cev, _) in &mut clients {
        let mut last = None;
        for n in 0..EARLY {
            last = Some(
                within(&rt, 2000, "send", client.send(&note(n)))
                    .await
                    .unwrap(),
            );
        }
        // Acknowledged: its events are queued.
        client_wait(&rt, cev, 5000, "the early messages' ack", |e| match e {
            Event::Acked { last: up_to, .. } if Some(*up_to) >= last => Some(()),
            _ => None,
        })
        .await;
    }
    let first = server_wait(&rt, &mut events, 5000, "a first event", |e| Some(e.clone())).await;
    let log = Arc::new(std::sync::Mutex::new(Vec::<(SessionId, u32)>::new()));
    let panics = Arc::new(AtomicUsize::new(0));
    {
        let (server, log, panics) = (server.clone(), log.clone(), panics.clone());
        events.handle_inline(move |event| {
            if let ServerEvent::Message { session, message } = event {
                let n = message.decode::<Note>().unwrap().n;
                server.handled_now(session, message.seq).unwrap();
                if message.request {
                    server
                        .respond_now(session, message.id, &note(n + 1))
                        .unwrap();
                    return;
                }
                log.lock().unwrap().push((session, n));
                if n == PANIC {
                    panics.fetch_add(1, Ordering::SeqCst);
                    panic!("the handler fails on message {PANIC}");
                }
                server.send_now(session, &note(n)).unwrap();
            }
        });
    }
    for n in EARLY..N {
        for (client, _, _) in &clients {
            within(&rt, 2000, "send", client.send(&note(n)))
                .await
                .unwrap();
        }
    }
    // Every client gets its answers, in order, but the one that panicked.
    let want: Vec<u32> = (0..N).filter(|&n| n != PANIC).collect();
    for (_, cev, _) in &mut clients {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let n = client_wait(&rt, cev, 10_000, "an answer", |e| match e {
                Event::Message(m) => Some(m.decode::<Note>().unwrap().n),
                _ => None,
            })
            .await;
            got.push(n);
        }
        assert_eq!(got, want, "answers in order");
    }
    assert_eq!(panics.load(Ordering::SeqCst), CLIENTS);
    // A request is answered from the handler too.
    for (client, _, _) in &clients {
        let response = within(
            &rt,
            5000,
            "a response",
            client.request(&note(1000), Duration::from_secs(5)),
        )
        .await
        .unwrap();
        assert_eq!(response.decode::<Note>().unwrap().n, 1001);
    }
    // The handler saw each session's messages once each, in order: all of
    // them, unless the first event the stream handed out was one.
    let log = log.lock().unwrap().clone();
    for &(_, _, session) in &clients {
        let seen: Vec<u32> = log
            .iter()
            .filter(|(s, _)| *s == session)
            .map(|(_, n)| *n)
            .collect();
        let expected: Vec<u32> = match &first {
            ServerEvent::Message { session: s, .. } if *s == session => (1..N).collect(),
            _ => (0..N).collect(),
        };
        assert_eq!(seen, expected, "each message once, in order");
    }
    let _ = server.shutdown().await;
}

/// With three event shards, each taken by a task of its own: every
/// session's events arrive on one shard, in order, and the sessions spread
/// over the shards. With a small event buffer the connection tasks pause
/// and resume as the shards are read. Dropping one shard's stream discards
/// its events and holds up no one else.
pub async fn event_shards_keep_sessions_in_order(rt: Arc<dyn Runtime>) {
    const CLIENTS: usize = 12;
    const N: u32 = 150;
    let options = ServerOptions {
        event_buffer: 32,
        event_shards: 3,
        ..fast_server()
    };
    let (server, events, addr) = serve(&rt, options);
    let streams = events.split();
    assert_eq!(streams.len(), 3);
    let mut logs = Vec::new();
    let mut stops = Vec::new();
    for mut stream in streams {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sink, halt) = (log.clone(), stop.clone());
        rt.spawn(Box::pin(async move {
            while let Some(e) = stream.next().await {
                sink.lock().unwrap().push(e);
                if halt.load(Ordering::SeqCst) {
                    return; // drops the stream
                }
            }
        }));
        logs.push(log);
        stops.push(stop);
    }
    let clients = open_clients(&rt, addr, CLIENTS).await;
    for n in 0..N {
        for (client, _, _) in &clients {
            within(&rt, 2000, "send", client.send(&note(n)))
                .await
                .unwrap();
        }
    }
    // Every message arrives, each session's on one shard, in order.
    let per_shard = |logs: &[Arc<std::sync::Mutex<Vec<ServerEvent>>>], session: SessionId| {
        logs.iter()
            .map(|log| {
                log.lock()
                    .unwrap()
                    .iter()
                    .filter_map(|e| match e {
                        ServerEvent::Message {
                            session: s,
                            message,
                        } if *s == session => Some(message.decode::<Note>().unwrap().n),
                        _ => None,
                    })
                    .collect::<Vec<u32>>()
            })
            .collect::<Vec<_>>()
    };
    within(&rt, 10_000, "every message", async {
        loop {
            let all = clients.iter().all(|(_, _, s)| {
                per_shard(&logs, *s).iter().map(Vec::len).sum::<usize>() >= N as usize
            });
            if all {
                break;
            }
            kitestring::util::sleep(&*rt, Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut shard_of = Vec::new();
    for (_, _, session) in &clients {
        let got = per_shard(&logs, *session);
        let on: Vec<usize> = (0..3).filter(|&i| !got[i].is_empty()).collect();
        assert_eq!(on.len(), 1, "one shard per session: {on:?}");
        assert_eq!(got[on[0]], (0..N).collect::<Vec<_>>(), "in order");
        // Its opening is on the same shard, before its messages.
        let opened_on = logs
            .iter()
            .position(|log| {
                log.lock().unwrap().iter().any(
                    |e| matches!(e, ServerEvent::SessionOpened { session: s, .. } if s == session),
                )
            })
            .expect("SessionOpened");
        assert_eq!(opened_on, on[0]);
        shard_of.push(on[0]);
    }
    let mut used = shard_of.clone();
    used.sort_unstable();
    used.dedup();
    assert!(
        used.len() >= 2,
        "sessions spread over the shards: {shard_of:?}"
    );
    // The stream of the first session's shard stops at its next event and
    // is dropped: its sessions' events are discarded; the others' go on.
    let gone = shard_of[0];
    stops[gone].store(true, Ordering::SeqCst);
    for n in N..2 * N {
        for (client, _, _) in &clients {
            within(&rt, 2000, "send", client.send(&note(n)))
                .await
                .unwrap();
        }
    }
    within(&rt, 10_000, "the other shards' messages", async {
        loop {
            let all = clients
                .iter()
                .zip(&shard_of)
                .filter(|(_, &i)| i != gone)
                .all(|((_, _, s), &i)| per_shard(&logs, *s)[i].len() >= 2 * N as usize);
            if all {
                break;
            }
            kitestring::util::sleep(&*rt, Duration::from_millis(10)).await;
        }
    })
    .await;
    for ((_, _, s), &i) in clients.iter().zip(&shard_of) {
        if i != gone {
            assert_eq!(per_shard(&logs, *s)[i], (0..2 * N).collect::<Vec<_>>());
        }
    }
    for (client, _, _) in clients {
        let _ = within(&rt, 3000, "close", client.close()).await;
    }
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// The next `n` application messages the server receives, as notes.
async fn server_notes(rt: &Arc<dyn Runtime>, events: &mut ServerEvents, n: u32) -> Vec<Note> {
    let mut got = Vec::new();
    while got.len() < n as usize {
        let m = server_wait(rt, events, 3000, "server Message", |e| match e {
            ServerEvent::Message { message, .. } => Some(message.decode::<Note>().unwrap()),
            _ => None,
        })
        .await;
        got.push(m);
    }
    got
}

/// The next `n` application messages the client receives, as notes.
async fn client_notes(rt: &Arc<dyn Runtime>, events: &mut ClientEvents, n: u32) -> Vec<Note> {
    let mut got = Vec::new();
    while got.len() < n as usize {
        let m = client_wait(rt, events, 3000, "client Message", |e| match e {
            Event::Message(m) => Some(m.decode::<Note>().unwrap()),
            _ => None,
        })
        .await;
        got.push(m);
    }
    got
}

/// Messages from the server still to be acknowledged by the client.
async fn unacknowledged(rt: &Arc<dyn Runtime>, server: &ServerHandle, session: SessionId) -> usize {
    let info = within(rt, 2000, "session info", server.session(session))
        .await
        .unwrap()
        .expect("session held");
    info.in_flight + info.queued
}

/// A client application that leaves its events unread: the client stops
/// reading its socket (the server's messages stay unacknowledged, nothing is
/// dropped) while its own sends still go out; once the events are read,
/// every message arrives in order. Dropping the event stream lets the
/// session go on: the client reads and acknowledges again.
pub async fn client_unread_events_pause_reading(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());
    let options = ClientOptions {
        event_buffer: 8,
        ..fast_client(vec![Codec::MsgPack, Codec::Json])
    };
    let (client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/ws"), options).unwrap();
    opened(&rt, &mut cev).await;
    let (_, session, _, _) = session_opened(&rt, &mut sev).await;

    const IN: u32 = 500;
    const OUT: u32 = 50;
    for n in 0..IN {
        within(&rt, 2000, "server send", server.send(session, &note(n)))
            .await
            .unwrap();
    }
    kitestring::util::sleep(&*rt, Duration::from_millis(300)).await;
    let waiting = unacknowledged(&rt, &server, session).await;
    assert!(
        waiting > (IN / 2) as usize,
        "the client kept reading with its event stream full: {waiting} of {IN} unacknowledged"
    );
    // Its own sends still reach the server.
    for n in 0..OUT {
        within(&rt, 2000, "client send", client.send(&note(n)))
            .await
            .unwrap();
    }
    let got = server_notes(&rt, &mut sev, OUT).await;
    assert_eq!(got, (0..OUT).map(note).collect::<Vec<_>>());
    // Reading the events lets the client read again: everything arrives.
    let got = client_notes(&rt, &mut cev, IN).await;
    assert_eq!(got, (0..IN).map(note).collect::<Vec<_>>());
    // Without an event stream, the client goes on reading and acknowledging.
    drop(cev);
    for n in 0..IN {
        within(&rt, 2000, "server send", server.send(session, &note(n)))
            .await
            .unwrap();
    }
    let mut waiting = usize::MAX;
    for _ in 0..200 {
        waiting = unacknowledged(&rt, &server, session).await;
        if waiting == 0 {
            break;
        }
        kitestring::util::sleep(&*rt, Duration::from_millis(10)).await;
    }
    assert_eq!(
        waiting, 0,
        "messages unacknowledged after the stream was dropped"
    );
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario 2: the connection drops mid-stream, twice (a proxy cut, then a
/// server-side disconnect); the session resumes and every message arrives
/// exactly once, in order, both ways.
pub async fn resume_after_drops(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());
    let proxy = kitestring_chaos::Proxy::start(addr).unwrap();
    let url = format!("ws://{}/", proxy.local_addr());
    let (client, mut cev) = kitestring::connect(
        rt.clone(),
        &url,
        fast_client(vec![Codec::MsgPack, Codec::Json]),
    )
    .unwrap();
    let (session, _, _) = opened(&rt, &mut cev).await;
    let (conn, _, _, _) = session_opened(&rt, &mut sev).await;

    const N: u32 = 300;
    let mut to_server = Vec::new();
    let mut to_client = Vec::new();
    let mut resumes_seen = 0;
    let mut last_conn = conn;
    for n in 0..N {
        // The core's queue is bounded (100 while offline): a full queue is
        // reported, and the application retries after a moment.
        let mut full = 0;
        loop {
            match within(&rt, 2000, "client send", client.send(&note(n))).await {
                Ok(_) => break,
                Err(kitestring::ClientError::Send(kitestring::SendError::QueueFull { .. }))
                    if full < 200 =>
                {
                    full += 1;
                    kitestring::util::sleep(&*rt, Duration::from_millis(10)).await;
                }
                Err(e) => panic!("send {n}: {e}"),
            }
        }
        within(&rt, 2000, "server send", server.send(session, &note(n)))
            .await
            .unwrap();
        if n == 100 {
            proxy.cut_all();
        }
        if n == 200 {
            // Wait for the resume after the cut, then drop it from the server
            // side. Every event goes through `collect_server` on the way:
            // messages retransmitted around the resume must not be skipped.
            let deadline = Instant::now() + Duration::from_secs(3);
            while resumes_seen == 0 && Instant::now() < deadline {
                let next = kitestring::util::timeout(&*rt, Duration::from_millis(50), sev.next());
                if let Some(Some(e)) = next.await {
                    collect_server(
                        &e,
                        session,
                        &mut to_server,
                        &mut resumes_seen,
                        &mut last_conn,
                    );
                }
            }
            assert!(resumes_seen >= 1, "the session resumed after the cut");
            server
                .disconnect(last_conn, CloseCode::INTERNAL_ERROR)
                .await
                .unwrap();
        }
        // Drain whatever is ready without waiting, to keep both sides moving.
        while let Some(Some(e)) = futures_util::FutureExt::now_or_never(sev.next()) {
            collect_server(
                &e,
                session,
                &mut to_server,
                &mut resumes_seen,
                &mut last_conn,
            );
        }
        while let Some(Some(e)) = futures_util::FutureExt::now_or_never(cev.next()) {
            if let Event::Message(m) = e {
                to_client.push(m.decode::<Note>().unwrap().n);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    while (to_server.len() < N as usize || to_client.len() < N as usize)
        && Instant::now() < deadline
    {
        let r = kitestring::util::timeout(&*rt, Duration::from_millis(50), async {
            futures_util::future::select(sev.next(), cev.next()).await
        })
        .await;
        match r {
            Some(futures_util::future::Either::Left((Some(e), _))) => collect_server(
                &e,
                session,
                &mut to_server,
                &mut resumes_seen,
                &mut last_conn,
            ),
            Some(futures_util::future::Either::Right((Some(Event::Message(m)), _))) => {
                to_client.push(m.decode::<Note>().unwrap().n)
            }
            _ => {}
        }
    }
    let want: Vec<u32> = (0..N).collect();
    assert_eq!(
        to_server, want,
        "client to server: every message once, in order"
    );
    assert_eq!(
        to_client, want,
        "server to client: every message once, in order"
    );
    assert!(
        resumes_seen >= 2,
        "two drops, two resumes (saw {resumes_seen})"
    );
    assert!(proxy.links().len() >= 2, "reconnected through the proxy");
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

pub(crate) fn collect_server(
    e: &ServerEvent,
    session: SessionId,
    to_server: &mut Vec<u32>,
    resumes: &mut u32,
    last_conn: &mut kitestring::ConnectionId,
) {
    match e {
        ServerEvent::Message {
            session: s,
            message,
        } if *s == session => {
            to_server.push(message.decode::<Note>().unwrap().n);
        }
        ServerEvent::SessionOpened {
            resumed: true,
            session: s,
            connection,
            ..
        } if *s == session => {
            *resumes += 1;
            *last_conn = *connection;
        }
        _ => {}
    }
}

/// Scenario 3: a proxy that silently stops forwarding is detected by the
/// heartbeat (server settings adopted from the welcome) and the session
/// resumes on a new connection; a message sent meanwhile arrives once.
pub async fn half_open_detected(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());
    let proxy = kitestring_chaos::Proxy::start(addr).unwrap();
    let url = format!("ws://{}/", proxy.local_addr());
    let (client, mut cev) =
        kitestring::connect(rt.clone(), &url, fast_client(vec![Codec::Json])).unwrap();
    let (session, _, _) = opened(&rt, &mut cev).await;
    session_opened(&rt, &mut sev).await;

    proxy.black_hole_all();
    let holed = Instant::now();
    client.send(&note(1)).await.unwrap();
    let cause = client_wait(&rt, &mut cev, 6000, "heartbeat timeout", |e| match e {
        Event::StateChanged {
            new: State::Reconnecting { cause, .. },
            ..
        } => Some(cause.clone()),
        _ => None,
    })
    .await;
    let detected = holed.elapsed();
    assert_eq!(cause, Cause::HeartbeatTimeout);
    assert!(
        detected < Duration::from_millis(3500),
        "detected after {detected:?}; ping 500 ms + pong 500 ms + grace should be ~1.2 s \
         (the bound leaves a loaded machine's timers 2 s)"
    );
    let (s2, resumed, _) = opened(&rt, &mut cev).await;
    assert!(resumed && s2 == session);
    let got = server_wait(&rt, &mut sev, 3000, "message after resume", |e| match e {
        ServerEvent::Message { message, .. } => Some(message.decode::<Note>().unwrap()),
        _ => None,
    })
    .await;
    assert_eq!(got, note(1));
    // Exactly once: nothing else arrives.
    let extra = kitestring::util::timeout(&*rt, Duration::from_millis(300), async {
        loop {
            if let Some(ServerEvent::Message { .. }) = sev.next().await {
                return;
            }
        }
    })
    .await;
    assert!(extra.is_none(), "duplicate delivery");
    assert_eq!(proxy.forwarding(), 1, "one live link: the new one");
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

pub(crate) fn auth_server(rt: &Arc<dyn Runtime>) -> (ServerHandle, ServerEvents, SocketAddr) {
    let mut options = fast_server();
    options.auth = Some(kitestring::Authenticator::sync(
        |req: &kitestring::AuthRequest| match req.bearer_token() {
            Some("good") => Ok(Some("alice".to_owned())),
            Some("forbidden") => Err(AuthReject::Forbidden),
            _ => Err(AuthReject::Unauthorized),
        },
    ));
    serve(rt, options)
}

pub(crate) fn counting_token(token: &'static str) -> (kitestring::TokenProvider, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let provider = kitestring::token_provider(move || {
        c.fetch_add(1, Ordering::SeqCst);
        async move { Some(token.to_owned()) }
    });
    (provider, calls)
}

async fn auth_case(
    rt: Arc<dyn Runtime>,
    token: &'static str,
) -> (FailReason, usize, Arc<AtomicUsize>) {
    let (server, mut sev, addr) = auth_server(&rt);
    let (provider, calls) = counting_token(token);
    let mut options = fast_client(vec![Codec::Json]);
    options.token = Some(provider);
    let (_client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/"), options).unwrap();
    let reason = client_wait(&rt, &mut cev, 3000, "Failed", |e| match e {
        Event::StateChanged {
            new: State::Failed { reason },
            ..
        } => Some(reason.clone()),
        Event::Connected { .. } => panic!("connected with a bad token"),
        _ => None,
    })
    .await;
    let at_failure = calls.load(Ordering::SeqCst);
    // No retry storm: nothing more happens after Failed.
    kitestring::util::sleep(&*rt, Duration::from_millis(400)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        at_failure,
        "no attempts after Failed"
    );
    // No WebSocket frame ever flowed: the server saw no connection.
    let seen = futures_util::FutureExt::now_or_never(sev.next());
    assert!(
        !matches!(seen, Some(Some(ServerEvent::SessionOpened { .. }))),
        "rejected upgrades open no session"
    );
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
    (reason, at_failure, calls)
}

/// Scenario 4a: HTTP 401 at the upgrade: one immediate retry with a fresh
/// token, then `Failed(Unauthorized)`. A good token is accepted with its identity.
pub async fn auth_rejected_401(rt: Arc<dyn Runtime>) {
    let (reason, calls, _) = auth_case(rt.clone(), "bad").await;
    assert_eq!(reason, FailReason::Unauthorized);
    assert_eq!(
        calls, 2,
        "the first attempt and one retry with a fresh token"
    );

    let (server, mut sev, addr) = auth_server(&rt);
    let (provider, calls) = counting_token("good");
    let mut options = fast_client(vec![Codec::Json]);
    options.token = Some(provider);
    let (client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/"), options).unwrap();
    opened(&rt, &mut cev).await;
    let (_, _, identity, _) = session_opened(&rt, &mut sev).await;
    assert_eq!(identity.as_deref(), Some("alice"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario 4b: HTTP 403 at the upgrade: `Failed(Forbidden)` at once, no retry.
pub async fn auth_rejected_403(rt: Arc<dyn Runtime>) {
    let (reason, calls, _) = auth_case(rt, "forbidden").await;
    assert_eq!(reason, FailReason::Forbidden);
    assert_eq!(calls, 1, "403 is never retried");
}

/// A bare WebSocket client (no Kitestring driver) upgraded to `addr`, and
/// the JSON `hello` text it would send as client `[id; 16]`, version 1.
async fn raw_client(
    rt: &Arc<dyn Runtime>,
    addr: SocketAddr,
    id: u8,
) -> (
    kitestring::async_tungstenite::WebSocketStream<kitestring::BoxIo>,
    String,
) {
    let (ws, _) = raw_upgrade(rt, addr, None).await;
    (ws, hello_text(id))
}

/// A bare WebSocket upgraded to `addr`, with `hello` (if any) in the
/// request's hello header; returns the socket and the response's answer
/// header.
async fn raw_upgrade(
    rt: &Arc<dyn Runtime>,
    addr: SocketAddr,
    hello: Option<&str>,
) -> (
    kitestring::async_tungstenite::WebSocketStream<kitestring::BoxIo>,
    Option<String>,
) {
    use kitestring::async_tungstenite::tungstenite::client::IntoClientRequest;
    let io = within(
        rt,
        2000,
        "tcp",
        rt.connect_tcp(addr.ip().to_string(), addr.port()),
    )
    .await
    .unwrap();
    let mut request = format!("ws://{addr}/").into_client_request().unwrap();
    if let Some(hello) = hello {
        request
            .headers_mut()
            .insert(wire::HELLO_HEADER, hello.parse().unwrap());
    }
    let (ws, response) = within(
        rt,
        2000,
        "upgrade",
        // Boxed: the handshake's state would otherwise sit in every
        // scenario future that upgrades, on the test thread's stack.
        Box::pin(kitestring::async_tungstenite::client_async(request, io)),
    )
    .await
    .unwrap();
    let answer = response
        .headers()
        .get(wire::WELCOME_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    (ws, answer)
}

/// The JSON `hello` of client `[id; 16]`: version 1, JSON only.
fn hello_text(id: u8) -> String {
    let hello = wire::encode(
        &Frame::Hello(Hello {
            versions: vec![1],
            client: ClientId([id; 16]),
            resume: None,
            caps: Vec::new(),
            codecs: vec![Codec::Json],
            join: Vec::new(),
        }),
        Codec::Json,
        1,
    )
    .unwrap();
    std::str::from_utf8(hello.data()).unwrap().to_owned()
}

const LIMITS: Limits = Limits {
    max_message: 1 << 20,
    version: 1,
};

/// The next message on a bare WebSocket is a close with `code`.
async fn expect_close(
    rt: &Arc<dyn Runtime>,
    ws: &mut kitestring::async_tungstenite::WebSocketStream<kitestring::BoxIo>,
    code: u16,
) {
    match within(rt, 2000, "close frame", ws.next())
        .await
        .unwrap()
        .unwrap()
    {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), code),
        other => panic!("expected close {code}, got {other:?}"),
    }
}

/// Scenario 5b: a `hello` in the upgrade request is answered in the `101`
/// response. The session is open without a handshake frame, messages flow
/// both ways at once, and a `hello` the server refuses gets its `reject`
/// in the response and the close right after.
pub async fn hello_in_upgrade(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());
    let (mut ws, answer) = raw_upgrade(&rt, addr, Some(&hello_text(6))).await;
    let answer = answer.expect("the 101 carries the welcome");
    let session = match wire::decode(Incoming::Text(&answer), &LIMITS).unwrap() {
        Frame::Welcome(w) => {
            assert_eq!((w.codec, w.resumed, w.delivered), (Codec::Json, false, 0));
            w.session
        }
        other => panic!("expected a welcome, got {other:?}"),
    };
    let (_, opened, _, resumed) = session_opened(&rt, &mut sev).await;
    assert_eq!((opened, resumed), (session, false));
    // The first frame is already a message.
    ws.send(Message::text(
        r#"{"t":"msg","seq":1,"id":1,"j":{"n":1,"text":"up"}}"#,
    ))
    .await
    .unwrap();
    let up = server_wait(&rt, &mut sev, 2000, "message up", |e| match e {
        ServerEvent::Message {
            session: s,
            message,
        } if *s == session => Some(message.decode::<Note>().unwrap()),
        _ => None,
    })
    .await;
    assert_eq!(up.text, "up");
    server.send(session, &note(2)).await.unwrap();
    let down = within(&rt, 2000, "message down", async {
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Text(t) => {
                    match wire::decode(Incoming::Text(t.as_str()), &LIMITS).unwrap() {
                        Frame::Msg(m) => return m,
                        _ => continue, // acknowledgments, pings
                    }
                }
                _ => continue,
            }
        }
    })
    .await;
    assert_eq!(down.seq, 1);

    // Refused: the reject comes in the response, then the close.
    let hello = hello_text(7).replace("\"versions\":[1]", "\"versions\":[99]");
    let (mut refused, answer) = raw_upgrade(&rt, addr, Some(&hello)).await;
    match wire::decode(Incoming::Text(&answer.unwrap()), &LIMITS).unwrap() {
        Frame::Reject(r) => assert_eq!(r.code, 4001),
        other => panic!("expected a reject, got {other:?}"),
    }
    expect_close(&rt, &mut refused, 4001).await;
    drop(ws);
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario 2b: the server aborts a connection (no close handshake, as a
/// network failure would end it). A bare WebSocket sees the stream end
/// without a close frame; a Kitestring client resumes, and what the server
/// sent while the session was detached arrives exactly once, in order.
pub async fn server_abort_resumes(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());

    // A bare WebSocket: no close frame, just the end of the stream.
    let (mut ws, _) = raw_upgrade(&rt, addr, Some(&hello_text(8))).await;
    let (raw_conn, raw_session, _, _) = session_opened(&rt, &mut sev).await;
    assert!(within(&rt, 2000, "abort", server.abort(raw_conn))
        .await
        .unwrap());
    let end = within(&rt, 2000, "end of the aborted stream", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return Err(f),
                Some(Ok(_)) => continue, // a ping sent before the abort
                Some(Err(_)) | None => return Ok(()),
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "an aborted connection sent a close frame: {end:?}"
    );
    let code = server_wait(&rt, &mut sev, 2000, "raw SessionDetached", |e| match e {
        ServerEvent::SessionDetached { session, code } if *session == raw_session => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(code, CloseCode::ABNORMAL);
    // Gone already: a second abort finds nothing.
    assert!(!within(&rt, 2000, "abort again", server.abort(raw_conn))
        .await
        .unwrap());

    // A Kitestring client resumes, and nothing is lost or repeated.
    let (client, mut cev) = kitestring::connect(
        rt.clone(),
        &format!("ws://{addr}/ws"),
        fast_client(vec![Codec::MsgPack, Codec::Json]),
    )
    .unwrap();
    let (session, _, _) = opened(&rt, &mut cev).await;
    let (conn, _, _, _) = session_opened(&rt, &mut sev).await;
    for n in 0..5 {
        server.send(session, &note(n)).await.unwrap();
    }
    assert!(within(&rt, 2000, "abort", server.abort(conn))
        .await
        .unwrap());
    // Sent while detached, and by the client while it is down.
    for n in 5..10 {
        server.send(session, &note(n)).await.unwrap();
    }
    let mut got = Vec::new();
    let mut resumed = false;
    within(&rt, 5000, "resume and every message", async {
        while !resumed || got.len() < 10 {
            match cev.next().await.expect("client events") {
                Event::Message(m) => got.push(m.decode::<Note>().unwrap().n),
                Event::Connected { resumed: r, .. } => {
                    assert!(r, "the session was not resumed after an abort");
                    resumed = true;
                }
                Event::StateChanged {
                    old: State::Open, ..
                } => {
                    client.send(&note(100)).await.unwrap();
                }
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    let (code, reopened, up) = within(&rt, 3000, "server sees the resume", async {
        let mut code = None;
        let mut reopened = false;
        loop {
            match sev.next().await.expect("server events") {
                ServerEvent::SessionDetached {
                    session: s,
                    code: c,
                } if s == session => {
                    code = Some(c);
                }
                ServerEvent::SessionOpened {
                    session: s,
                    resumed,
                    ..
                } if s == session => {
                    assert!(resumed);
                    reopened = true;
                }
                ServerEvent::Message {
                    session: s,
                    message,
                } if s == session => {
                    return (code, reopened, message.decode::<Note>().unwrap().n);
                }
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(code, Some(CloseCode::ABNORMAL));
    assert!(reopened);
    assert_eq!(up, 100);
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario 5: a raw WebSocket client offering only version 99 gets a
/// `reject` frame with 4001 and a close with 4001.
pub async fn version_mismatch_rejected(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());
    let (mut ws, text) = raw_client(&rt, addr, 5).await;
    assert!(text.contains("\"versions\":[1]"), "{text}");
    let text = text.replace("\"versions\":[1]", "\"versions\":[99]");
    ws.send(Message::text(text)).await.unwrap();

    let reject = within(&rt, 2000, "reject frame", ws.next())
        .await
        .unwrap()
        .unwrap();
    let Message::Text(t) = reject else {
        panic!("expected a text reject frame, got {reject:?}")
    };
    match wire::decode(Incoming::Text(t.as_str()), &LIMITS).unwrap() {
        Frame::Reject(r) => {
            assert_eq!(r.code, 4001);
            assert_eq!(r.versions, vec![1]);
        }
        other => panic!("expected reject, got {other:?}"),
    }
    expect_close(&rt, &mut ws, 4001).await;
    let rejected = server_wait(&rt, &mut sev, 2000, "Rejected event", |e| match e {
        ServerEvent::Rejected { code, .. } => Some(*code),
        _ => None,
    })
    .await;
    assert_eq!(rejected, CloseCode::UNSUPPORTED_VERSION);
    drop(ws);
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Scenario 6a: server shutdown closes clients with 1001 (after a goaway)
/// and they go to `Reconnecting`; the server's event stream ends.
pub async fn shutdown_goes_away(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());
    let mut clients: Vec<(ClientHandle, ClientEvents)> = Vec::new();
    for _ in 0..3 {
        let (c, mut e) = kitestring::connect(
            rt.clone(),
            &format!("ws://{addr}/"),
            fast_client(vec![Codec::Json]),
        )
        .unwrap();
        opened(&rt, &mut e).await;
        clients.push((c, e));
    }
    let start = Instant::now();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        start.elapsed()
    );
    for (_, events) in &mut clients {
        let cause = client_wait(
            &rt,
            events,
            3000,
            "reconnecting after goaway",
            |e| match e {
                Event::StateChanged {
                    new: State::Reconnecting { cause, .. },
                    ..
                } => Some(cause.clone()),
                _ => None,
            },
        )
        .await;
        let code = match cause {
            Cause::GoAway { code } => code,
            Cause::PeerClosed { code, .. } => code,
            other => panic!("unexpected cause {other:?}"),
        };
        assert_eq!(code, CloseCode::GOING_AWAY);
    }
    // The server task has stopped: its stream ends and sends fail.
    within(&rt, 3000, "server events end", async {
        while sev.next().await.is_some() {}
    })
    .await;
    assert!(server.send(SessionId([0; 16]), &1).await.is_err());
    for (c, _) in clients {
        let _ = within(&rt, 3000, "client close", c.close()).await;
    }
}

/// Scenario 6b: `close()` ends the session on the server (1000,
/// `ClientClosed`) and the client ends `Closed(1000)`.
pub async fn client_close_ends_session(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = serve(&rt, fast_server());
    let (client, mut cev) = kitestring::connect(
        rt.clone(),
        &format!("ws://{addr}/"),
        fast_client(vec![Codec::Json]),
    )
    .unwrap();
    let (session, _, _) = opened(&rt, &mut cev).await;
    session_opened(&rt, &mut sev).await;
    within(&rt, 3000, "close", client.close()).await.unwrap();
    let end = server_wait(&rt, &mut sev, 3000, "SessionEnded", |e| match e {
        ServerEvent::SessionEnded {
            session: s, reason, ..
        } if *s == session => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert_eq!(end, SessionEnd::ClientClosed);
    let mut closed = None;
    within(&rt, 3000, "client events end", async {
        while let Some(e) = cev.next().await {
            if let Event::StateChanged {
                new: State::Closed { code },
                ..
            } = e
            {
                closed = Some(code);
            }
        }
    })
    .await;
    assert_eq!(closed, Some(CloseCode::NORMAL));
    assert!(client.send(&1).await.is_err(), "sends after close fail");
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// `wss://` with a self-signed certificate from rcgen, trusted through a
/// custom root store.
pub async fn wss_exchange(rt: Arc<dyn Runtime>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let mut options = fast_server();
    options.tls = Some(ServerTls::new(vec![der.clone()], key).unwrap());
    let (server, mut sev, addr) = serve(&rt, options);
    let mut roots = kitestring::rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut copts = fast_client(vec![Codec::MsgPack, Codec::Json]);
    copts.tls = Some(ClientTls::with_roots(roots).unwrap());
    let url = format!("wss://localhost:{}/secure", addr.port());
    let (client, mut cev) = kitestring::connect(rt.clone(), &url, copts).unwrap();
    let (session, _, _) = opened(&rt, &mut cev).await;
    client.send(&note(7)).await.unwrap();
    let got = server_wait(&rt, &mut sev, 3000, "message over TLS", |e| match e {
        ServerEvent::Message { message, .. } => Some(message.decode::<Note>().unwrap()),
        _ => None,
    })
    .await;
    assert_eq!(got, note(7));
    server.send(session, &note(8)).await.unwrap();
    let got = client_wait(&rt, &mut cev, 3000, "reply over TLS", |e| match e {
        Event::Message(m) => Some(m.decode::<Note>().unwrap()),
        _ => None,
    })
    .await;
    assert_eq!(got, note(8));

    // A client that does not trust the certificate never opens a session.
    let mut untrusting = fast_client(vec![Codec::Json]);
    untrusting.tls =
        Some(ClientTls::with_roots(kitestring::rustls::RootCertStore::empty()).unwrap());
    let (_c2, mut e2) = kitestring::connect(rt.clone(), &url, untrusting).unwrap();
    let cause = client_wait(&rt, &mut e2, 3000, "TLS failure", |e| match e {
        Event::StateChanged {
            new: State::Reconnecting { cause, .. },
            ..
        } => Some(cause.clone()),
        Event::Connected { .. } => panic!("connected without trusting the certificate"),
        _ => None,
    })
    .await;
    assert!(
        matches!(
            cause,
            Cause::Transport(kitestring::kitestring_core::client::TransportError::Tls(_))
        ),
        "{cause:?}"
    );
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Re-authentication: the server asks for a fresh token; the driver fetches
/// one from the provider and answers. A good token keeps the connection
/// past the deadline; a bad one closes it with 4401, and the client (one
/// fresh-token retry, refused with 401) ends `Failed(Unauthorized)`.
pub async fn reauth_in_session(rt: Arc<dyn Runtime>) {
    let (server, mut sev, addr) = auth_server(&rt);
    let current = Arc::new(std::sync::Mutex::new("good"));
    let calls = Arc::new(AtomicUsize::new(0));
    let (cur, c) = (current.clone(), calls.clone());
    let mut options = fast_client(vec![Codec::Json]);
    options.token = Some(kitestring::token_provider(move || {
        c.fetch_add(1, Ordering::SeqCst);
        let token = *cur.lock().unwrap();
        async move { Some(token.to_owned()) }
    }));
    let (client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/"), options).unwrap();
    opened(&rt, &mut cev).await;
    let (conn, session, identity, _) = session_opened(&rt, &mut sev).await;
    assert_eq!(identity.as_deref(), Some("alice"));

    // Deadlines a loaded machine meets: the client has 3 s to answer.
    server
        .request_reauth(conn, Duration::from_secs(3))
        .await
        .unwrap();
    client_wait(&rt, &mut cev, 5000, "TokenExpiring", |e| {
        matches!(e, Event::TokenExpiring { .. }).then_some(())
    })
    .await;
    let token = server_wait(&rt, &mut sev, 5000, "TokenReceived", |e| match e {
        ServerEvent::TokenReceived {
            token, connection, ..
        } if *connection == conn => Some(token.clone()),
        _ => None,
    })
    .await;
    assert_eq!(token, "good");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Past the deadline the connection is still there and carries messages.
    kitestring::util::sleep(&*rt, Duration::from_millis(3200)).await;
    client.send(&note(5)).await.unwrap();
    let got = server_wait(&rt, &mut sev, 2000, "message after reauth", |e| match e {
        ServerEvent::SessionDetached { code, .. } => {
            panic!("detached with {code:?} after a good token")
        }
        ServerEvent::Message { message, .. } => Some(message.decode::<Note>().unwrap()),
        _ => None,
    })
    .await;
    assert_eq!(got, note(5));

    *current.lock().unwrap() = "bad";
    server
        .request_reauth(conn, Duration::from_secs(3))
        .await
        .unwrap();
    let code = server_wait(
        &rt,
        &mut sev,
        5000,
        "detached after a bad token",
        |e| match e {
            ServerEvent::SessionDetached { session: s, code } if *s == session => Some(*code),
            _ => None,
        },
    )
    .await;
    assert_eq!(code, CloseCode::UNAUTHORIZED);
    let reason = client_wait(&rt, &mut cev, 3000, "Failed", |e| match e {
        Event::StateChanged {
            new: State::Failed { reason },
            ..
        } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert_eq!(reason, FailReason::Unauthorized);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "connect, two reauths, one fresh-token retry"
    );
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// Re-authentication with an asynchronous validator: the check runs in a
/// task of its own, outside the server's lock, so the connection carries
/// messages while it is pending; a good verdict keeps the connection, and a
/// check that outlives `auth_timeout` closes it with 1013 (the client comes
/// back later).
pub async fn reauth_async(rt: Arc<dyn Runtime>) {
    let mut options = fast_server();
    options.auth = Some(kitestring::Authenticator::sync(
        |req: &kitestring::AuthRequest| match req.bearer_token() {
            Some(_) => Ok(Some("alice".to_owned())),
            None => Err(AuthReject::Unauthorized),
        },
    ));
    let clock = rt.clone();
    options.reauth = Some(kitestring::TokenValidator::new(move |token: String| {
        let clock = clock.clone();
        async move {
            let ms = if token == "slow" { 5_000 } else { 1_000 };
            kitestring::util::sleep(&*clock, Duration::from_millis(ms)).await;
            Ok(Some("alice".to_owned()))
        }
    }));
    options.auth_timeout = Duration::from_millis(1_500);
    let (server, mut sev, addr) = serve(&rt, options);
    let current = Arc::new(std::sync::Mutex::new("good"));
    let cur = current.clone();
    let mut client_options = fast_client(vec![Codec::Json]);
    client_options.token = Some(kitestring::token_provider(move || {
        let token = *cur.lock().unwrap();
        async move { Some(token.to_owned()) }
    }));
    let (client, mut cev) =
        kitestring::connect(rt.clone(), &format!("ws://{addr}/"), client_options).unwrap();
    opened(&rt, &mut cev).await;
    let (conn, session, _, _) = session_opened(&rt, &mut sev).await;

    server
        .request_reauth(conn, Duration::from_secs(10))
        .await
        .unwrap();
    server_wait(&rt, &mut sev, 2000, "TokenReceived", |e| {
        matches!(e, ServerEvent::TokenReceived { .. }).then_some(())
    })
    .await;
    // The check takes a second; the session does not wait for it.
    let asked = Instant::now();
    client.send(&note(1)).await.unwrap();
    let got = server_wait(
        &rt,
        &mut sev,
        2000,
        "message during the check",
        |e| match e {
            ServerEvent::Message { message, .. } => Some(message.decode::<Note>().unwrap()),
            _ => None,
        },
    )
    .await;
    assert_eq!(got, note(1));
    assert!(
        asked.elapsed() < Duration::from_millis(800),
        "a message waited {:?} behind the token check",
        asked.elapsed()
    );
    // After the verdict the connection is still there.
    kitestring::util::sleep(&*rt, Duration::from_millis(1_200)).await;
    client.send(&note(2)).await.unwrap();
    let got = server_wait(
        &rt,
        &mut sev,
        2000,
        "message after the check",
        |e| match e {
            ServerEvent::SessionDetached { code, .. } => {
                panic!("detached with {code:?} after a good token")
            }
            ServerEvent::Message { message, .. } => Some(message.decode::<Note>().unwrap()),
            _ => None,
        },
    )
    .await;
    assert_eq!(got, note(2));

    // A check that outlives the timeout closes the connection with 1013.
    *current.lock().unwrap() = "slow";
    server
        .request_reauth(conn, Duration::from_secs(10))
        .await
        .unwrap();
    let code = server_wait(
        &rt,
        &mut sev,
        4000,
        "detached after a timed-out check",
        |e| match e {
            ServerEvent::SessionDetached { session: s, code } if *s == session => Some(*code),
            _ => None,
        },
    )
    .await;
    assert_eq!(code, CloseCode::TRY_AGAIN_LATER);
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// A peer that reads nothing costs bounded memory: the session's window and
/// queue fill, then sends are refused with `QueueFull` (nothing accepted is
/// dropped), and the silent peer is closed by the heartbeat (4008) with its
/// session kept for a resume. (Room members that stop reading are evicted
/// with 4009 instead: see the room scenarios.)
pub async fn slow_consumer_closed(rt: Arc<dyn Runtime>) {
    let mut options = fast_server();
    options.outbound_queue = 8;
    options.config.reliability.window_messages = 16;
    options.config.reliability.window_bytes = 1 << 20;
    options.config.queue.max_messages = 16;
    options.config.queue.max_bytes = 1 << 20;
    let (server, mut sev, addr) = serve(&rt, options);
    let (mut ws, text) = raw_client(&rt, addr, 6).await;
    ws.send(Message::text(text)).await.unwrap();
    let welcome = within(&rt, 2000, "welcome", ws.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(welcome, Message::Text(_)));
    let (_, session, _, _) = session_opened(&rt, &mut sev).await;
    // Now the peer reads nothing and sends nothing.
    let chunk = vec![7u8; 64 * 1024];
    let mut accepted = 0;
    let mut refused = false;
    for _ in 0..1000 {
        match server.send_bytes(session, chunk.clone()).await {
            Ok(_) => accepted += 1,
            Err(kitestring::ServerError::Send {
                error: kitestring::SendError::QueueFull { .. },
                ..
            }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected send error {e}"),
        }
    }
    assert!(
        refused,
        "a peer that reads nothing must not absorb {accepted} messages"
    );
    assert!(
        accepted <= 32,
        "accepted {accepted}: more than the window plus the queue"
    );
    // Datagrams are not queued without bound either: refused once the
    // connection's frame queue holds its share, without closing it.
    let mut sent = 0;
    let mut refused = false;
    for _ in 0..2000 {
        match server.send_datagram(session, chunk.clone()).await {
            Ok(()) => sent += 1,
            Err(kitestring::ServerError::Send {
                error: kitestring::SendError::QueueFull { .. },
                ..
            }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected datagram error {e}"),
        }
    }
    assert!(
        refused,
        "{sent} datagrams queued for a peer that reads nothing"
    );
    let start = Instant::now();
    let mut detached = None;
    while detached.is_none() && start.elapsed() < Duration::from_secs(5) {
        match within(&rt, 5000, "server event", sev.next()).await {
            Some(ServerEvent::SessionDetached { session: s, code }) if s == session => {
                detached = Some(code)
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(detached, Some(CloseCode::HEARTBEAT_TIMEOUT));
    drop(ws);
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}

/// A socket upgraded by another HTTP stack (here: a bare listener and
/// `async_tungstenite::accept_async`) is handed to a listener-less server
/// with the identity that stack authenticated.
pub async fn handover_upgraded_socket(rt: Arc<dyn Runtime>) {
    let (server, mut sev) = kitestring::start(rt.clone(), fast_server()).unwrap();
    let std_listener = std::net::TcpListener::bind(loopback()).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    let listener = rt.wrap_listener(std_listener).unwrap();
    let (client, mut cev) = kitestring::connect(
        rt.clone(),
        &format!("ws://{addr}/elsewhere"),
        fast_client(vec![Codec::Json]),
    )
    .unwrap();
    let (io, _) = within(
        &rt,
        2000,
        "accept",
        futures_util::future::poll_fn(|cx| listener.poll_accept(cx)),
    )
    .await
    .unwrap();
    // The foreign stack does not know the hello header: it answers without
    // one, and the client says hello in its first frame instead.
    use kitestring::async_tungstenite::tungstenite::handshake::server::{
        ErrorResponse, Request, Response,
    };
    let mut offered = None;
    // The signature is tungstenite's `Callback`.
    #[allow(clippy::result_large_err)]
    let record = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        offered = req.headers().get(wire::HELLO_HEADER).cloned();
        Ok(resp)
    };
    let ws = within(
        &rt,
        2000,
        "foreign upgrade",
        kitestring::async_tungstenite::accept_hdr_async(io, record),
    )
    .await
    .unwrap();
    let offered = offered.expect("the client offers its hello in the upgrade");
    assert!(matches!(
        wire::decode(Incoming::Text(offered.to_str().unwrap()), &LIMITS),
        Ok(Frame::Hello(_))
    ));
    server.accept_websocket(ws, Some("bob".to_owned()));
    let (session, _, _) = opened(&rt, &mut cev).await;
    let (_, s, identity, _) = session_opened(&rt, &mut sev).await;
    assert_eq!((s, identity.as_deref()), (session, Some("bob")));
    server.send(session, &note(3)).await.unwrap();
    let got = client_wait(
        &rt,
        &mut cev,
        2000,
        "message over the handed-over socket",
        |e| match e {
            Event::Message(m) => Some(m.decode::<Note>().unwrap()),
            _ => None,
        },
    )
    .await;
    assert_eq!(got, note(3));
    within(&rt, 3000, "close", client.close()).await.unwrap();
    within(&rt, 3000, "shutdown", server.shutdown())
        .await
        .unwrap();
}
