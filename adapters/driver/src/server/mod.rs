//! The server: the core [`Server`] machine sits behind one short-held lock
//! that every task and handle shares; each connection has a task that reads
//! and writes its socket, and one server task accepts connections and fires
//! the core's timers.
//!
//! ```text
//!  accept ──► handshake task (TLS, HTTP upgrade, auth) ──► connection task ─┐
//!                                                                            │ lock: feed
//!  ServerHandle calls ──────────────────────────────────► core Server ◄─────┘ frames in,
//!                                                          │    │           queue frames
//!                              frames, per connection ◄────┘    └──► events ──► ServerEvents
//! ```
//!
//! A connection task that reads a frame runs it through the core itself,
//! under the lock, and the frames and events that result are queued for
//! their connection tasks and the application, which are woken once the
//! lock is released. A handle call (`send`, `broadcast`, `join`, ...) runs
//! the core the same way and returns at once with the core's answer: no
//! message passes through an intermediate task, and nothing waits for a
//! reply. Several frames read together go through the core under one lock,
//! and a task woken for many queued frames writes them all in one turn.
//! Room policies and synchronous token validators run under the lock: they
//! must not call back into the server. Authenticators and asynchronous
//! token validators never do: they run in a task of their own.
//!
//! # Backpressure policy
//!
//! * Inbound: while the application leaves [`ServerOptions::event_buffer`]
//!   events unconsumed, connection tasks stop reading their sockets, so
//!   TCP pushes back on the peers. Keep consuming [`ServerEvents`]. Events
//!   caused by timers and handle calls are queued regardless (a few per
//!   session at most), so no handle call ever waits for the application.
//!   With [`ServerOptions::event_shards`] the events are queued per shard
//!   (a session's always in the same one) and [`ServerEvents::split`]
//!   gives a stream per shard, so the application can handle sessions on
//!   as many tasks; the bound holds for all shards together.
//!   [`ServerEvents::handle_inline`] hands the events to a handler called
//!   by the connection tasks themselves, which then read no more than it
//!   keeps up with.
//! * Outbound: what a connection can owe its peer is bounded first by the
//!   core: a session holds at most its send window of unacknowledged
//!   messages (`ReliabilityConfig::window_messages` / `window_bytes`) plus its
//!   waiting queue. A peer that stops reading fills both; then
//!   [`ServerHandle::send`] is refused with `SendError::QueueFull` (nothing
//!   accepted is dropped), a room broadcast evicts that member with 4009 so
//!   the others are not held up, and a peer that also stops sending is closed
//!   by the heartbeat (4008) with its session kept for a resume.
//!   Each connection also has a frame queue of
//!   [`ServerOptions::outbound_queue`] (at least twice the send window plus
//!   64, so a resume retransmitting a whole window of large messages fits,
//!   each a detached pair), plus tungstenite's bounded
//!   write buffer; should that queue still fill, the connection is closed
//!   with 4009 and its session kept.
//!
//! # Sharing a port with an HTTP server
//!
//! A hyper-based server (hyper, axum, ...) hands its requests for the
//! endpoint to [`ServerHandle::serve`] (or serves connections with
//! [`ServerHandle::hyper_service`]): an upgrade is checked,
//! authenticated and answered exactly as the built-in listener would,
//! `Kitestring-Welcome` included, and the upgraded connection is served
//! with the configured limits. The authenticator also sees the request's
//! extensions. `kitestring-axum` wraps it as an axum route, a tower service
//! and a layer.
//!
//! # The HTTP fallback
//!
//! Clients whose upgrades a proxy blocks reach the same server over plain
//! HTTP on the same port and path ([`ServerOptions::http_fallback`],
//! PROTOCOL.md section 1.1): an `open` is admitted as an upgrade is, and
//! the connection runs in the same connection task over a link fed by
//! polls and sends (`fallback`), with the same limits and backpressure.
//!
//! A socket some other HTTP server upgraded by itself can still be handed
//! over with [`ServerHandle::accept_websocket`] (authenticated by that
//! server; no handshake in the upgrade, so one more round trip).
//!
//! # Where things are
//!
//! This module holds the options, [`bind`] and [`start`], which build the
//! shared state and spawn the server task. The rest lives in private modules
//! beside it: `auth` (who may upgrade), `shared` (the locked state, the
//! connection slots and the lock order), `feed` (room feeds), `events`
//! (the event shards and [`ServerEvents`]), `handle` ([`ServerHandle`]),
//! `accept` (the server task), `upgrade` and `http` (an
//! upgrade, read by the built-in listener or handed over by `hyper`, and
//! its admission), `fallback` (the HTTP fallback's requests and link),
//! `conn` (the connection task) and `metrics` (the export
//! through the `metrics` facade).

mod accept;
mod auth;
mod cluster;
mod conn;
mod events;
mod fallback;
mod feed;
mod handle;
mod http;
mod hyper;
mod metrics;
mod shared;
mod shared_maps;
mod shared_rooms;
mod upgrade;

pub use auth::{AuthReject, AuthRequest, AuthResult, Authenticator, OriginPolicy, TokenValidator};
pub use cluster::{SentTo, SessionLocation};
pub use events::ServerEvents;
pub use handle::ServerHandle;
pub use hyper::{FallbackBody, UpgradeService};

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::mpsc;
use futures_util::task::AtomicWaker;
use kitestring_core::config::ServerConfig;
use kitestring_core::rooms::{Member, RoomPolicy};
use kitestring_core::server::Server;
use kitestring_core::wire::Codec;
use tracing::Instrument;

use crate::drive::{Clock, DriveTimer};
use crate::error::ServeError;
use crate::runtime::{AsyncListener, Runtime};
use crate::ws::ServerTls;

use self::accept::ServerTask;
use self::shared::{FxHashMap, LockedState, ServerShared};

/// The per-connection outbound queue: the configured size, but always room
/// for a resume's burst (a whole send window, two frames per message if the
/// payloads go detached) plus control frames.
fn outbound_capacity(options: &ServerOptions) -> usize {
    options.outbound_queue.max(
        options
            .config
            .reliability
            .window_messages
            .saturating_mul(2)
            .saturating_add(64),
    )
}

/// Server settings.
#[derive(Clone)]
pub struct ServerOptions {
    /// The core machine's settings.
    pub config: ServerConfig,
    /// TLS (`wss://`); `None` serves plain `ws://`.
    pub tls: Option<ServerTls>,
    /// Checks every upgrade request, the built-in listener's and those
    /// handed over by an HTTP server ([`ServerHandle::upgrade`]); `None`
    /// accepts everyone anonymously.
    pub auth: Option<Authenticator>,
    /// How long an asynchronous [`auth`](Self::auth) or
    /// [`reauth`](Self::reauth) check may take: past it, the upgrade is
    /// answered 503 (the client retries later) and a re-authenticating
    /// connection is closed with 1013. Default 5 s.
    pub auth_timeout: Duration,
    /// Which web pages may connect, by the request's `Origin` header
    /// (cross-site WebSocket hijacking). Default [`OriginPolicy::SameHost`]:
    /// requests without `Origin` (non-browser clients) and pages served by
    /// the host the request names pass, other origins get 403 before
    /// [`auth`](Self::auth) runs.
    pub origins: OriginPolicy,
    /// Checks tokens sent for re-authentication. `None` falls back to
    /// [`auth`](Self::auth), called with a request whose only header is
    /// `authorization: Bearer <token>` (empty path, no query); with neither,
    /// the application decides through [`ServerHandle::accept_token`] or
    /// [`ServerHandle::disconnect`].
    pub reauth: Option<TokenValidator>,
    /// Frames queued per connection before it counts as a slow consumer and
    /// is closed with 4009. Default 256, and never less than twice the
    /// core's send window plus 64: a resume retransmits up to a whole window
    /// at once, two frames per message whose payload goes detached
    /// (PROTOCOL.md, section 2.1), and that burst must not look like a slow
    /// reader. (The window is what
    /// really bounds a connection: it cannot hold more unacknowledged
    /// messages than that, so this queue only guards against control frames
    /// piling up.)
    pub outbound_queue: usize,
    /// Events waiting for the application (in all shards together) before
    /// connection tasks stop reading their sockets. Default 4096.
    pub event_buffer: usize,
    /// Event queues, each with its stream ([`ServerEvents::split`]), for
    /// an application that handles sessions on several tasks: a session's
    /// events all go to one shard, chosen from its id. Default 1; at least 1.
    pub event_shards: usize,
    /// Time allowed for the TLS handshake and HTTP upgrade. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time allowed for a close handshake before the socket is dropped. Default 2 s.
    pub close_timeout: Duration,
    /// Authorizes clients' joins and publishes; `None` lets everyone do
    /// anything. Can be replaced later with [`ServerHandle::set_policy`].
    pub policy: Option<Arc<dyn RoomPolicy>>,
    /// Connections the kernel holds waiting for `accept` on a listener that
    /// [`bind`] opens. Default 4096 (the kernel caps it at
    /// `net.core.somaxconn`). When every client of a restarted or cut
    /// server reconnects at once, a short queue overflows and the kernel
    /// drops their SYNs, which clients retry only after one second, then
    /// three: the standard library's default of 128 made a resume storm of
    /// 10 000 sessions take half again as long.
    pub listen_backlog: u32,
    /// How often the server's gauges and counters are published through
    /// the `metrics` facade (to whatever recorder the application
    /// installed; README.md lists the names). Each time, the core's
    /// snapshot is taken under the server's lock, a walk over the sessions.
    /// Default 1 s; `None` publishes nothing.
    pub metrics_interval: Option<Duration>,
    /// How an upgrade refused by its origin or by [`auth`](Self::auth) is
    /// answered: with an HTTP status, or accepted and then refused in-band
    /// (a `reject` and a close with 4401, 4403 or 4429), which browser
    /// pages can see and statuses they cannot. Default
    /// [`Refusals::InBandForPages`].
    pub refusals: Refusals,
    /// How long a client refused for now waits before its next attempt:
    /// the `retry` of an in-band 4429, and the `Retry-After` (in whole
    /// seconds, rounded up) of a 503 when authentication is unavailable
    /// or timed out. A resume refused while its session moves between
    /// servers gets no `Retry-After`: the client backs off as after a
    /// failure, since a move takes a few round trips to the shared store.
    /// Default 10 s.
    pub retry_after: Duration,
    /// What this server shares with the other servers of its cluster
    /// (`kitestring-redis` provides one on Redis); `None`, the default,
    /// serves alone. With one, a client may resume its session on any
    /// node (the node it reaches claims the session from the one holding
    /// it), and [`ServerHandle::shutdown`] hands every session over
    /// instead of letting them end with the process. The nodes must share
    /// `config.resume_secret`.
    pub backplane: Option<Arc<dyn crate::backplane::Backplane>>,
    /// With a [`backplane`](Self::backplane): how long a node may go
    /// silent before the others count it gone (it refreshes its liveness
    /// every third of this). Default 10 s.
    pub node_timeout: Duration,
    /// The HTTP fallback for clients whose WebSocket upgrades are blocked
    /// on the way (PROTOCOL.md, section 1.1): served on the same port and
    /// path, with the same admission, limits and sessions. `None` answers
    /// its requests as stray ones (426, 405). Default on.
    pub http_fallback: Option<HttpFallback>,
}

/// The HTTP fallback's settings ([`ServerOptions::http_fallback`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HttpFallback {
    /// How long a poll is held open while nothing is queued before it is
    /// answered empty: below the idle timeouts of the proxies on the way.
    /// Default 25 s.
    pub wait: Duration,
    /// How long a connection may go without a poll waiting (between the
    /// answer to one and the next) before the server counts it dropped.
    /// Default 20 s.
    pub gap: Duration,
    /// Largest request body (a send's frames), and the size past which a
    /// poll's answer takes no more frames; raised to hold at least one
    /// message of the largest size. Default 1 MiB.
    pub max_body: usize,
}

impl Default for HttpFallback {
    fn default() -> Self {
        HttpFallback {
            wait: Duration::from_secs(25),
            gap: Duration::from_secs(20),
            max_body: 1024 * 1024,
        }
    }
}

/// How refused upgrades are answered ([`ServerOptions::refusals`]).
///
/// A browser page sees an HTTP 401, 403 or 503 only as a close with 1006,
/// indistinguishable from a network failure, so it would back off through
/// every attempt; an in-band refusal tells it (PROTOCOL.md, section 1). The
/// request's form (400, 405, 426, 431) is always answered with a status:
/// such a request is not one a Kitestring client makes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusals {
    /// Always an HTTP status (401, 403, 503), as before this option.
    Status,
    /// Always in-band: a `101`, then a `reject` (in the `101`'s
    /// `Kitestring-Welcome` header for a request whose `hello` was in its
    /// header, otherwise as the first frame) and a close with its code:
    /// 4401 for 401, 4403 for 403, 4429 with a `retry` hint for 503.
    InBand,
    /// In-band for requests whose `hello` is in the URL (clients that
    /// cannot read a status, such as pages), a status for the others.
    #[default]
    InBandForPages,
}

/// A policy shared through [`ServerOptions`] (which is `Clone`).
struct SharedPolicy(Arc<dyn RoomPolicy>);

impl RoomPolicy for SharedPolicy {
    fn authorize_join(&self, who: &Member, room: &str) -> Result<(), String> {
        self.0.authorize_join(who, room)
    }

    fn authorize_publish(&self, who: &Member, room: &str) -> Result<(), String> {
        self.0.authorize_publish(who, room)
    }

    fn presence(&self, room: &str) -> bool {
        self.0.presence(room)
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            config: ServerConfig::default(),
            tls: None,
            auth: None,
            origins: OriginPolicy::SameHost,
            reauth: None,
            outbound_queue: 256,
            event_buffer: 4096,
            event_shards: 1,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            policy: None,
            listen_backlog: 4096,
            auth_timeout: Duration::from_secs(5),
            metrics_interval: Some(Duration::from_secs(1)),
            refusals: Refusals::InBandForPages,
            retry_after: Duration::from_secs(10),
            backplane: None,
            node_timeout: Duration::from_secs(10),
            http_fallback: Some(HttpFallback::default()),
        }
    }
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth)
            .field("auth_timeout", &self.auth_timeout)
            .field("reauth", &self.reauth)
            .field("origins", &self.origins)
            .field("refusals", &self.refusals)
            .field("retry_after", &self.retry_after)
            .field("http_fallback", &self.http_fallback)
            .field("outbound_queue", &self.outbound_queue)
            .field("event_buffer", &self.event_buffer)
            .field("event_shards", &self.event_shards)
            .field("listen_backlog", &self.listen_backlog)
            .field("policy", &self.policy.is_some())
            .field("metrics_interval", &self.metrics_interval)
            .field(
                "backplane",
                &self.backplane.as_ref().map(|b| b.node().to_owned()),
            )
            .field("node_timeout", &self.node_timeout)
            .finish()
    }
}

/// Binds `addr` and serves WebSocket connections on it.
pub fn bind(
    runtime: Arc<dyn Runtime>,
    addr: SocketAddr,
    options: ServerOptions,
) -> Result<(ServerHandle, ServerEvents), ServeError> {
    let cannot = |source| ServeError::Listen { addr, source };
    let listener = listen(addr, options.listen_backlog).map_err(cannot)?;
    let listener = runtime.wrap_listener(listener).map_err(cannot)?;
    start_inner(runtime, Some((listener, addr)), options)
}

/// A non-blocking listener on `addr` with room for `backlog` connections
/// waiting to be accepted (and `SO_REUSEADDR` on Unix, as the standard
/// library sets it, so a restarted server can bind at once).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX).max(1))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Starts a server without a listener: connections come only through
/// [`ServerHandle::accept_websocket`] (sockets upgraded by another HTTP
/// server) or [`ServerHandle::accept_io`].
pub fn start(
    runtime: Arc<dyn Runtime>,
    options: ServerOptions,
) -> Result<(ServerHandle, ServerEvents), ServeError> {
    start_inner(runtime, None, options)
}

fn start_inner(
    runtime: Arc<dyn Runtime>,
    listener: Option<(Box<dyn AsyncListener>, SocketAddr)>,
    options: ServerOptions,
) -> Result<(ServerHandle, ServerEvents), ServeError> {
    let mut config = options.config.clone();
    if options.backplane.is_some() && config.resume_secret.is_unset() {
        return Err(ServeError::NoClusterSecret);
    }
    if config.resume_secret.is_unset() {
        // Resume keys must not be computable from session ids: a secret of
        // this process's own unless the application shares one.
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).map_err(|e| ServeError::Random(e.to_string()))?;
        config.resume_secret = kitestring_core::config::ResumeSecret(secret);
    }
    let mut server = Server::new(config)?;
    // The driver's clock starts at about this moment (`Clock::new`).
    server.set_wall_clock(kitestring_core::Instant::ZERO, crate::util::unix_ms());
    // Room-stream members read each broadcast from one shared feed.
    server.set_room_feeds(true);
    // Latest values wait in each connection's slot, the newest of each key.
    server.set_latest_slots(true);
    server.set_shared_rooms(options.backplane.is_some());
    // Each node stamps its maps' writes with a node id of its own.
    let node = crate::util::random16().map_err(|e| ServeError::Random(e.to_string()))?;
    server.set_map_node(u64::from_le_bytes([
        node[0], node[1], node[2], node[3], node[4], node[5], node[6], node[7],
    ]));
    if let Some(policy) = &options.policy {
        server.set_policy(Box::new(SharedPolicy(policy.clone())));
    }
    let (listener, local_addr) = match listener {
        Some((l, addr)) => {
            let local = l
                .local_addr()
                .map_err(|source| ServeError::Listen { addr, source })?;
            (Some(l), Some(local))
        }
        None => (None, None),
    };
    let codec = options
        .config
        .codecs
        .first()
        .copied()
        .unwrap_or(Codec::Json);
    let shared = Arc::new(ServerShared {
        state: Mutex::new(LockedState {
            server,
            conns: FxHashMap::default(),
            paused: Vec::new(),
            room_waiters: FxHashMap::default(),
            armed: None,
            shutdown: None,
            stopped: false,
            feeds: FxHashMap::default(),
            stamp: 0,
            token_checks: Vec::new(),
            acked: 0,
        }),
        task: AtomicWaker::new(),
        look: AtomicBool::new(true),
        stop_listening: AtomicBool::new(false),
        clock: Clock::new(&*runtime),
        runtime: runtime.clone(),
        outbound: outbound_capacity(&options),
        feed_frames: AtomicU64::new(0),
        feed_bytes: AtomicU64::new(0),
        feed_bounds: kitestring_core::stream::HistoryConfig {
            max_entries: options
                .config
                .history
                .max_entries
                .max(outbound_capacity(&options)),
            max_bytes: options.config.history.max_bytes,
        },
        published: AtomicU64::new(0),
        event_room: options.event_buffer.max(1),
        events: (0..options.event_shards.max(1))
            .map(|_| events::Shard::default())
            .collect(),
        readers_paused: AtomicBool::new(false),
        links: Mutex::new(Default::default()),
        handed: Mutex::new(Default::default()),
        event_backlog: AtomicUsize::new(0),
        cluster: options.backplane.clone().map(|bp| {
            Arc::new(cluster::Cluster::new(
                bp,
                options.node_timeout,
                options.config.session_grace,
            ))
        }),
        options: Arc::new(options),
    });
    cluster::spawn(shared.clone());
    let (alive_tx, alive_rx) = mpsc::channel(1);
    let task = ServerTask {
        timer: DriveTimer::new(&*runtime),
        shared: shared.clone(),
        listener,
        alive: alive_rx,
        handles_gone: false,
        deadline: None,
    };
    let span = tracing::info_span!("kitestring_server", addr = ?local_addr);
    if let Some(interval) = shared.options.metrics_interval {
        let export = metrics::export(shared.clone(), interval).instrument(span.clone());
        runtime.spawn(Box::pin(export));
    }
    runtime.spawn(Box::pin(task.run().instrument(span)));
    Ok((
        ServerHandle {
            shared: shared.clone(),
            _alive: alive_tx,
            local_addr,
            codec,
        },
        ServerEvents::new(shared),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;

    /// Connects `n` sockets to `addr`, which nobody accepts on; counts those
    /// whose TCP handshake completed within `limit`.
    fn queued(addr: SocketAddr, n: usize, limit: Duration) -> (usize, Vec<TcpStream>) {
        let mut held = Vec::new();
        for _ in 0..n {
            match TcpStream::connect_timeout(&addr, limit) {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        (held.len(), held)
    }

    #[test]
    fn the_listener_queues_as_many_connections_as_its_backlog() {
        // The kernel caps the backlog at net.core.somaxconn (4096 since
        // Linux 5.4); 600 is far above the standard library's 128, which
        // this test is there to catch.
        let n = 600;
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        if cap > n {
            let listener = listen("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
            let addr = listener.local_addr().unwrap();
            let (ok, _held) = queued(addr, n, Duration::from_millis(500));
            assert_eq!(ok, n, "connections beyond the accept queue were dropped");
        }
        // And a small backlog is honored too (this is what makes the
        // check above able to fail): the queue holds backlog + 1.
        let listener = listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let (ok, _held) = queued(addr, 64, Duration::from_millis(300));
        assert!(ok < 64, "a backlog of 16 queued {ok} connections");
    }
}
