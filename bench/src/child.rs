//! The server processes of scenarios 4 to 7, run as `inner server ...` in
//! a child process so that their memory and CPU time are their own, and so
//! that neither side of 10 000 connections needs more than 20 000 files.
//! The peers scenarios' servers live in [`crate::peers`]'s `serve`.
//!
//! Protocol: the child prints `port P`, then obeys lines on stdin and
//! answers each with one line; it exits when stdin ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use kitestring::{CloseCode, ConnectionId, Payload, ServerEvent, ServerOptions, SessionId};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{self, say};

/// The room every session joins when the server is started with rooms on.
pub(crate) const ROOM: &str = "fanout";

/// `inner server ours <ping_ms> <rooms 0|1|2> <outbound_queue> [<redis url> <node>]`,
/// `inner server base`, or a peers server
/// (`kitestring|socketioxide|socketio-node [<redis url>]|floor`). Rooms: 0, the default room policy (presence on);
/// 1, no presence and the server joins every new session to [`ROOM`];
/// 2, no presence, clients join themselves.
pub(crate) fn run(args: &[String]) -> std::process::ExitCode {
    let rt = net::tokio_runtime();
    match args.first().map(String::as_str) {
        Some("ours") => {
            let num =
                |i: usize, d: u64| args.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(d);
            let ping = Duration::from_millis(num(1, 30_000));
            let rooms = num(2, 0);
            let queue = num(3, 256) as usize;
            // A node of a cluster: `<redis url> <node name>` after the rest.
            let cluster = match (args.get(4), args.get(5)) {
                (Some(url), Some(name)) => Some((url.clone(), name.clone())),
                _ => None,
            };
            // Both servers run as a task on the runtime's workers: a
            // future driven by `block_on` lives on the main thread, where
            // every wake-up (each server event, for ours) crosses threads.
            let _ = rt.block_on(async { tokio::spawn(ours(ping, rooms, queue, cluster)).await });
        }
        Some("base") => {
            let _ = rt.block_on(async { tokio::spawn(baseline()).await });
        }
        Some(peer) => {
            drop(rt);
            return crate::peers::serve::run(peer, &args[1..])
                .unwrap_or(std::process::ExitCode::FAILURE);
        }
        None => return std::process::ExitCode::FAILURE,
    }
    std::process::ExitCode::SUCCESS
}

fn any_addr() -> SocketAddr {
    "0.0.0.0:0".parse().expect("address")
}

/// The sequence number carried by a storm message.
pub(crate) fn seq_of(payload: &Payload) -> u64 {
    let d = payload.data();
    let mut b = [0u8; 8];
    if d.len() >= 8 {
        b.copy_from_slice(&d[..8]);
    }
    u64::from_le_bytes(b)
}

/// A storm message: `seq` in 8 bytes, padded to 32.
pub(crate) fn seq_payload(seq: u64) -> Payload {
    let mut v = vec![0u8; 32];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    Payload::binary(v)
}

/// The fan-out room is a broadcast channel: its members need no presence
/// (member lists and join/leave diffs), which would cost about N²/2
/// messages to fill a room of N.
pub(crate) struct NoPresence;

impl kitestring::RoomPolicy for NoPresence {
    fn presence(&self, _room: &str) -> bool {
        false
    }
}

async fn ours(ping: Duration, rooms: u64, queue: usize, cluster: Option<(String, String)>) {
    let mut options = ServerOptions::default();
    if let Some((url, name)) = cluster {
        let backplane = kitestring_redis::RedisBackplane::connect(&url, name)
            .await
            .expect("redis");
        options.backplane = Some(Arc::new(backplane));
        options.config.resume_secret =
            kitestring::kitestring_core::config::ResumeSecret(*b"bench cluster 16");
    }
    if rooms > 0 {
        options.policy = Some(Arc::new(NoPresence));
    }
    options.config.ping_interval = ping;
    options.config.pong_timeout = ping.min(Duration::from_secs(10));
    // The idle timeout must exceed the ping interval (the default's 30 s
    // goes with the default 20 s pings).
    options.config.idle_timeout = ping + ping / 2;
    options.outbound_queue = queue;
    // Load generators send faster than any interactive client: flood
    // protection (on by default) would measure the limit, not the server.
    options.config.rate_limit = None;
    let runtime = kitestring_tokio::runtime();
    let (server, mut events) = kitestring::bind(runtime, any_addr(), options).expect("bind");
    say(&format!(
        "port {}",
        server.local_addr().expect("local address").port()
    ));
    let mut lines = net::stdin_lines();
    let mut live: HashMap<SessionId, ConnectionId> = HashMap::new();
    let mut received: HashMap<SessionId, Vec<u64>> = HashMap::new();
    let mut joined = 0usize;
    let mut broadcast_seq = 0u64;
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(ServerEvent::SessionOpened { connection, session, resumed, .. }) => {
                    live.insert(session, connection);
                    if rooms == 1 && !resumed {
                        let s = server.clone();
                        tokio::spawn(async move { let _ = s.join(session, ROOM).await; });
                    }
                }
                Some(ServerEvent::SessionDetached { session, .. }) => {
                    live.remove(&session);
                }
                Some(ServerEvent::SessionEnded { session, .. }) => {
                    live.remove(&session);
                }
                Some(ServerEvent::Joined { .. }) => joined += 1,
                Some(ServerEvent::Message { session, message }) => {
                    received.entry(session).or_default().push(seq_of(&message.payload));
                }
                Some(_) => {}
                None => break,
            },
            line = lines.recv() => {
                let Some(line) = line else { break };
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("count") => say(&format!("count {} {joined}", live.len())),
                    Some("sendall") => {
                        let seq: u64 = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let sessions: Vec<SessionId> = live.keys().copied().collect();
                        // In a task of its own: this loop must keep taking
                        // events, or the server task waits on a full event
                        // stream and never answers these calls.
                        let server = server.clone();
                        tokio::spawn(async move {
                            for s in sessions {
                                let _ = server.send_payload(s, seq_payload(seq)).await;
                            }
                            say("sent");
                        });
                    }
                    Some("cut") => {
                        // Drop every connection (`abort`: the transport at
                        // once, as a network failure would; `close`: a clean
                        // close with 1012), then send each session a message
                        // while it is detached.
                        let abort = words.next() == Some("abort");
                        let seq: u64 = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let all: Vec<(SessionId, ConnectionId)> =
                            live.iter().map(|(s, c)| (*s, *c)).collect();
                        let server = server.clone();
                        tokio::spawn(async move {
                            for (_, c) in &all {
                                if abort {
                                    let _ = server.abort(*c).await;
                                } else {
                                    let _ = server.disconnect(*c, CloseCode::SERVICE_RESTART).await;
                                }
                            }
                            for (s, _) in &all {
                                let _ = server.send_payload(*s, seq_payload(seq)).await;
                            }
                            say("cut");
                        });
                    }
                    Some("broadcast") => {
                        // 32-byte payloads numbered by this process, as the
                        // peers' servers send them (the load generator of
                        // `crate::peers` checks their order).
                        let n: u64 = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let first = broadcast_seq + 1;
                        broadcast_seq += n;
                        let server = server.clone();
                        tokio::spawn(async move {
                            for seq in first..first + n {
                                let data = crate::peers::fanout_payload(seq);
                                let _ = server
                                    .broadcast_payload(ROOM, Payload::binary(data), None)
                                    .await;
                            }
                            say("sent");
                        });
                    }
                    Some("report") => {
                        // Every session should hold exactly 1..=n, in order.
                        let n: u64 = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let want: Vec<u64> = (1..=n).collect();
                        let (mut ok, mut lost, mut dup) = (0u64, 0u64, 0u64);
                        for seqs in received.values() {
                            if *seqs == want {
                                ok += 1;
                            } else {
                                let mut sorted = seqs.clone();
                                sorted.sort_unstable();
                                let before = sorted.len();
                                sorted.dedup();
                                dup += (before - sorted.len()) as u64;
                                lost += want.iter().filter(|w| !sorted.contains(w)).count() as u64;
                            }
                        }
                        say(&format!("report {ok} {lost} {dup} {}", received.len()));
                    }
                    _ => say("?"),
                }
            }
        }
    }
    let _ = server.shutdown().await;
}

/// tokio-tungstenite: every connection has a task that reads its socket
/// and forwards everything sent on a tokio broadcast channel.
async fn baseline() {
    // The same accept queue as Kitestring's listener (its default
    // `ServerOptions::listen_backlog`), not tokio's 1024.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(any_addr()).expect("bind");
    let listener = socket
        .listen(kitestring::ServerOptions::default().listen_backlog)
        .expect("listen");
    say(&format!(
        "port {}",
        listener.local_addr().expect("local address").port()
    ));
    let (tx, _) = tokio::sync::broadcast::channel::<Bytes>(4096);
    let tx = Arc::new(tx);
    let mut lines = net::stdin_lines();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let mut rx = tx.subscribe();
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async_with_config(
                        stream,
                        Some(net::baseline_config()),
                    )
                    .await
                    else {
                        return;
                    };
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (mut sink, mut stream) = ws.split();
                    loop {
                        tokio::select! {
                            m = stream.next() => match m {
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                            b = rx.recv() => match b {
                                Ok(b) => {
                                    if sink.send(Message::Binary(b)).await.is_err() {
                                        break;
                                    }
                                }
                                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                                Err(_) => break,
                            },
                        }
                    }
                    count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                });
            }
            line = lines.recv() => {
                let Some(line) = line else { break };
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("count") => {
                        let c = count.load(std::sync::atomic::Ordering::Relaxed);
                        say(&format!("count {c} {c}"));
                    }
                    Some("broadcast") => {
                        let n: u64 = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        let data = Bytes::from(vec![7u8; 32]);
                        for _ in 0..n {
                            let _ = tx.send(data.clone());
                        }
                        say("sent");
                    }
                    _ => say("?"),
                }
            }
        }
    }
}
