//! The servers of the peers scenarios, each run in a child process as
//! `inner server kitestring|socketioxide|socketio-node|floor`, all doing the
//! same work: every connection that asks joins the room [`ROOM`] (a
//! Kitestring `join`, the Socket.IO connect packet's auth payload, the
//! floor's join frame), every
//! message a connection sends goes back to it, and `broadcast N` on stdin
//! sends N payloads of 32 bytes to the room, numbered by the server from 1
//! on (the load generator checks the numbers).
//!
//! Protocol with the parent, as in [`crate::child`]: the child prints
//! `port P`, then answers `count` with `count <connections opened> <joins>`
//! and `broadcast N` with `sent` once its N sends are done; it exits when
//! stdin ends. Every server listens on 0.0.0.0 with an accept queue of 4096
//! and sets TCP_NODELAY on its connections, as the Kitestring driver does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use kitestring::{Payload, ServerEvent, ServerOptions};
use tokio_tungstenite::tungstenite::Message;

use super::wire;
use crate::child::{NoPresence, ROOM};
use crate::net::{self, say};

/// Packets socketioxide queues per connection before `emit` fails (its
/// default is 128): a burst of broadcasts must not be dropped, so this is
/// Kitestring's send window (`ReliabilityConfig::window_messages`).
pub(crate) const SOCKETIOXIDE_BUFFER: usize = 1024;

/// Broadcasts the floor's channel holds; a member that falls further behind
/// loses messages, which the load generator reports.
const FLOOR_CHANNEL: usize = 4096;

/// The folder of the Node.js socket.io server (`server.js`, its
/// `package.json` and lock file, and `node_modules` once installed).
pub(crate) fn socketio_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers/socketio")
}

/// Runs server `name`; false when there is no such server. `rest` is what
/// follows the name: for `socketio-node`, a Redis URL makes it a node of a
/// cluster (its `server.js` says how).
pub(crate) fn run(name: &str, rest: &[String]) -> Option<ExitCode> {
    if name == "socketio-node" {
        return Some(exec_node(rest));
    }
    let rt = net::tokio_runtime();
    // Each server runs as a task on the runtime's workers, as the other
    // child servers do.
    let _ = match name {
        "kitestring" => rt.block_on(async { tokio::spawn(kitestring()).await }),
        "socketioxide" => rt.block_on(async { tokio::spawn(socketioxide()).await }),
        "floor" => rt.block_on(async { tokio::spawn(floor(false)).await }),
        "floor-work" => rt.block_on(async { tokio::spawn(floor(true)).await }),
        "kitestring-inline" => rt.block_on(async { tokio::spawn(kitestring_inline(false)).await }),
        "kitestring-inline-work" => {
            rt.block_on(async { tokio::spawn(kitestring_inline(true)).await })
        }
        "kitestring-work-1" => rt.block_on(async { tokio::spawn(kitestring_work(1)).await }),
        "kitestring-work-2" => rt.block_on(async { tokio::spawn(kitestring_work(2)).await }),
        _ => return None,
    };
    Some(ExitCode::SUCCESS)
}

/// Replaces this process with `node server.js`, so that the process the
/// parent measures (memory, CPU) is node itself.
fn exec_node(args: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let dir = socketio_dir();
    let e = std::process::Command::new("node")
        .arg(dir.join("server.js"))
        .args(args)
        .current_dir(&dir)
        .exec();
    eprintln!("node: {e}");
    ExitCode::FAILURE
}

fn listen() -> tokio::net::TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    let any: SocketAddr = "0.0.0.0:0".parse().expect("address");
    socket.bind(any).expect("bind");
    let listener = socket
        .listen(ServerOptions::default().listen_backlog)
        .expect("listen");
    say(&format!(
        "port {}",
        listener.local_addr().expect("local address").port()
    ));
    listener
}

/// The count of `broadcast N` from stdin.
fn broadcast_count(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    (words.next() == Some("broadcast")).then(|| words.next()?.parse().ok())?
}

/// Binds a Kitestring server as [`kitestring`] describes it, with
/// `event_shards` event queues, and says its port.
fn start_kitestring(event_shards: usize) -> (kitestring::ServerHandle, kitestring::ServerEvents) {
    let mut options = ServerOptions {
        policy: Some(Arc::new(NoPresence)),
        event_shards,
        ..ServerOptions::default()
    };
    options.config.rate_limit = None;
    let any: SocketAddr = "0.0.0.0:0".parse().expect("address");
    let (server, events) =
        kitestring::bind(kitestring_tokio::runtime(), any, options).expect("bind");
    say(&format!(
        "port {}",
        server.local_addr().expect("local address").port()
    ));
    (server, events)
}

/// Kitestring with its defaults, but for the two settings every Kitestring
/// server in this benchmark has: no flood protection (the load generator
/// sends faster than any interactive client), and a room without presence
/// (a broadcast channel: no member lists). Clients join themselves.
async fn kitestring() {
    let (server, mut events) = start_kitestring(1);
    let mut lines = net::stdin_lines();
    let (mut opened, mut joined, mut seq) = (0usize, 0usize, 0u64);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(ServerEvent::SessionOpened { .. }) => opened += 1,
                Some(ServerEvent::Joined { .. }) => joined += 1,
                Some(ServerEvent::Message { session, message }) => {
                    let _ = server.send_payload(session, message.payload).await;
                }
                Some(_) => {}
                None => break,
            },
            line = lines.recv() => {
                let Some(line) = line else { break };
                if line.trim() == "count" {
                    say(&format!("count {opened} {joined}"));
                } else if let Some(n) = broadcast_count(&line) {
                    // In a task of its own, so this loop keeps taking events.
                    let server = server.clone();
                    let first = seq + 1;
                    seq += n;
                    tokio::spawn(async move {
                        for s in first..first + n {
                            let payload = Payload::binary(wire::fanout_payload(s));
                            let _ = server.broadcast_payload(ROOM, payload, None).await;
                        }
                        say("sent");
                    });
                } else {
                    say("?");
                }
            }
        }
    }
    let _ = server.shutdown().await;
}

/// What the `-work` servers' applications do per message before echoing
/// it: about 2 µs of computation over its payload here (an FNV-1a hash,
/// 64 times over), standing for an application's own handling.
pub(crate) const APP_WORK: u32 = 64;

/// The application work per message ([`APP_WORK`] rounds).
pub(crate) fn app_work(payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..APP_WORK {
        for &b in std::hint::black_box(payload) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    std::hint::black_box(h)
}

/// Kitestring as [`kitestring`] serves it, but whose application does
/// [`app_work`] on each message before echoing it, on `tasks` tasks: one
/// event stream, or that many event shards ([`ServerOptions::event_shards`])
/// each taken by a task of its own. No broadcasts.
async fn kitestring_work(tasks: usize) {
    let (server, events) = start_kitestring(tasks);
    let opened = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    for mut events in events.split() {
        let (server, opened, joined) = (server.clone(), opened.clone(), joined.clone());
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    ServerEvent::SessionOpened { .. } => {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerEvent::Joined { .. } => {
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                    ServerEvent::Message { session, message } => {
                        app_work(message.payload.data());
                        let _ = server.send_payload(session, message.payload).await;
                    }
                    _ => {}
                }
            }
        });
    }
    answer_counts(&opened, &joined).await;
    let _ = server.shutdown().await;
}

/// Answers `count` on stdin with the sessions opened and joins seen,
/// until stdin closes.
async fn answer_counts(opened: &AtomicUsize, joined: &AtomicUsize) {
    let mut lines = net::stdin_lines();
    while let Some(line) = lines.recv().await {
        if line.trim() == "count" {
            say_count(opened, joined);
        } else {
            say("?");
        }
    }
}

/// Kitestring whose application handles its events inline
/// ([`ServerEvents::handle_inline`]): on the connection tasks that read
/// the messages, as the floor's connection tasks do, with [`app_work`] on
/// each message if `work`. No broadcasts.
///
/// [`ServerEvents::handle_inline`]: kitestring::ServerEvents::handle_inline
async fn kitestring_inline(work: bool) {
    let (server, events) = start_kitestring(1);
    let opened = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    {
        let (server, opened, joined) = (server.clone(), opened.clone(), joined.clone());
        events.handle_inline(move |event| match event {
            ServerEvent::SessionOpened { .. } => {
                opened.fetch_add(1, Ordering::Relaxed);
            }
            ServerEvent::Joined { .. } => {
                joined.fetch_add(1, Ordering::Relaxed);
            }
            ServerEvent::Message { session, message } => {
                if work {
                    app_work(message.payload.data());
                }
                let _ = server.send_payload_now(session, message.payload);
            }
            _ => {}
        });
    }
    answer_counts(&opened, &joined).await;
    let _ = server.shutdown().await;
}

/// The Socket.IO connect packet's auth payload: the room to join.
#[derive(serde::Deserialize)]
struct Auth {
    join: Option<String>,
}

/// socketioxide with its defaults, served by hyper as its examples show,
/// but for the WebSocket transport only and a larger per-connection buffer
/// ([`SOCKETIOXIDE_BUFFER`]). The connection handler registers the echo,
/// then joins the room the connect packet names.
async fn socketioxide() {
    use socketioxide::extract::{Data, SocketRef};
    use socketioxide::{SocketIo, TransportType};

    let listener = listen();
    let (svc, io) = SocketIo::builder()
        .transports([TransportType::Websocket])
        .max_buffer_size(SOCKETIOXIDE_BUFFER)
        .build_svc();
    let opened = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    {
        let (opened, joined) = (opened.clone(), joined.clone());
        io.ns("/", async move |s: SocketRef, Data::<Auth>(auth)| {
            opened.fetch_add(1, Ordering::Relaxed);
            s.on("echo", async |s: SocketRef, Data::<String>(data)| {
                let _ = s.emit("echo", &data);
            });
            if let Some(room) = auth.join {
                s.join(room);
                joined.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut lines = net::stdin_lines();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let svc = svc.clone();
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
            line = lines.recv() => {
                let Some(line) = line else { break };
                if line.trim() == "count" {
                    say_count(&opened, &joined);
                } else if let Some(n) = broadcast_count(&line) {
                    let io = io.clone();
                    let first = seq + 1;
                    seq += n;
                    tokio::spawn(async move {
                        let mut failed = 0u64;
                        for s in first..first + n {
                            let payload = wire::text_payload(s);
                            if io.to(ROOM).emit("fanout", &payload).await.is_err() {
                                failed += 1;
                            }
                        }
                        if failed > 0 {
                            eprintln!("socketioxide: {failed} broadcasts reported an error");
                        }
                        say("sent");
                    });
                } else {
                    say("?");
                }
            }
        }
    }
}

/// The floor: tokio-tungstenite with the driver's tungstenite settings, a
/// task per connection that echoes what it reads and forwards the room's
/// `tokio::sync::broadcast` channel once the connection has joined, writing
/// every message that is ready with `feed` and flushing once.
async fn floor(work: bool) {
    let listener = listen();
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(FLOOR_CHANNEL);
    let opened = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let mut lines = net::stdin_lines();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let (tx, opened, joined) = (tx.clone(), opened.clone(), joined.clone());
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async_with_config(
                        stream,
                        Some(net::baseline_config()),
                    )
                    .await
                    else {
                        return;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    floor_conn(ws, &tx, &joined, work).await;
                });
            }
            line = lines.recv() => {
                let Some(line) = line else { break };
                if line.trim() == "count" {
                    say_count(&opened, &joined);
                } else if let Some(n) = broadcast_count(&line) {
                    for _ in 0..n {
                        seq += 1;
                        let _ = tx.send(wire::fanout_payload(seq));
                    }
                    say("sent");
                } else {
                    say("?");
                }
            }
        }
    }
}

/// One floor connection: what it reads is echoed (a join frame subscribes
/// it to the room instead), what the room sends is forwarded; everything
/// ready goes out with one flush.
async fn floor_conn(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    tx: &tokio::sync::broadcast::Sender<Bytes>,
    joined: &AtomicUsize,
    work: bool,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut room: Option<tokio::sync::broadcast::Receiver<Bytes>> = None;
    loop {
        let from_room = async {
            match &mut room {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = ws.next() => {
                let mut next = m;
                // This message, then every other one already read.
                for _ in 0..64 {
                    match next {
                        Some(Ok(Message::Binary(b))) if b.first() == Some(&wire::FLOOR_JOIN) => {
                            if room.is_none() {
                                room = Some(tx.subscribe());
                                joined.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(m @ (Message::Binary(_) | Message::Text(_)))) => {
                            if work {
                                app_work(m.clone().into_data().as_ref());
                            }
                            if ws.feed(m).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    }
                    match ws.next().now_or_never() {
                        Some(m) => next = m,
                        None => break,
                    }
                }
            }
            b = from_room => match b {
                Ok(b) => {
                    if ws.feed(Message::Binary(b)).await.is_err() {
                        return;
                    }
                    if let Some(rx) = &mut room {
                        loop {
                            match rx.try_recv() {
                                Ok(b) => {
                                    if ws.feed(Message::Binary(b)).await.is_err() {
                                        return;
                                    }
                                }
                                Err(TryRecvError::Lagged(n)) => {
                                    eprintln!("floor: a member lagged by {n} broadcasts");
                                }
                                Err(_) => break,
                            }
                        }
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    eprintln!("floor: a member lagged by {n} broadcasts");
                }
                Err(RecvError::Closed) => return,
            },
        }
        if ws.flush().await.is_err() {
            return;
        }
    }
}

/// Answers the parent's `count`: connections opened, and those in the room.
fn say_count(opened: &AtomicUsize, joined: &AtomicUsize) {
    say(&format!(
        "count {} {}",
        opened.load(Ordering::Relaxed),
        joined.load(Ordering::Relaxed)
    ));
}
