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
//! Room policies and token validators run under the lock: they must not
//! call back into the server.
//!
//! # Backpressure policy
//!
//! * Inbound: while the application leaves [`ServerOptions::event_buffer`]
//!   events unconsumed, connection tasks stop reading their sockets, so
//!   TCP pushes back on the peers. Keep consuming [`ServerEvents`]. Events
//!   caused by timers and handle calls are queued regardless (a few per
//!   session at most), so no handle call ever waits for the application.
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
//! # Handing over a socket upgraded elsewhere
//!
//! An HTTP server (axum, hyper, ...) that already performed the WebSocket
//! upgrade can hand the socket over with [`ServerHandle::accept_websocket`]:
//! wrap the upgraded IO in a futures-io adapter (for hyper on tokio:
//! `hyper_util::rt::TokioIo` then `tokio_util::compat`), build
//! `async_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server,
//! Some(kitestring::ws::websocket_config(max)))`, authenticate in your HTTP
//! handler, and pass the identity along.

mod accept;
mod auth;
mod conn;
mod http;
mod shared;
mod upgrade;

pub use auth::{AuthReject, AuthRequest, Authenticator, OriginPolicy, TokenValidator};

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::task::AtomicWaker;
use futures_util::Stream;
use kitestring_core::close::CloseCode;
use kitestring_core::config::ServerConfig;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::rooms::{Member, RoomPolicy};
use kitestring_core::server::{ConnectionId, Server, ServerEvent, ServerMetrics, SessionInfo};
use kitestring_core::wire::{Codec, Payload, SessionId};
use serde::Serialize;
use tracing::Instrument;

use crate::drive::{Clock, DriveTimer};
use crate::error::{ServeError, ServerError};
use crate::runtime::{AsyncListener, BoxIo, Runtime};
use crate::util;
use crate::ws::ServerTls;

use self::accept::ServerTask;
use self::conn::connection;
use self::shared::{lock_slot, FxHashMap, LockedState, Shared, Wakes};
use self::upgrade::serve_accepted;

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
    /// Checks every upgrade request; `None` accepts everyone anonymously.
    pub auth: Option<Authenticator>,
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
    /// Events waiting for the application before connection tasks stop
    /// reading their sockets. Default 4096.
    pub event_buffer: usize,
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
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            policy: None,
            listen_backlog: 4096,
        }
    }
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth.is_some())
            .field("origins", &self.origins)
            .field("outbound_queue", &self.outbound_queue)
            .field("event_buffer", &self.event_buffer)
            .field("listen_backlog", &self.listen_backlog)
            .field("policy", &self.policy.is_some())
            .finish()
    }
}

/// A cloneable handle to a running server. Every call runs the core machine
/// directly, under a short lock, and returns without waiting for any task.
/// Dropping every handle shuts the server down as
/// [`ServerHandle::shutdown`] does.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    /// Held by every handle: the server task sees when the last one goes.
    _alive: mpsc::Sender<()>,
    local_addr: Option<SocketAddr>,
    codec: Codec,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// The stream of [`ServerEvent`]s. Ends when the server stops.
///
/// Bounded by [`ServerOptions::event_buffer`]: while that many events wait,
/// connection tasks stop reading their sockets (TCP pushes back on the
/// peers). Events caused by timers and by handle calls are still queued, so
/// the queue can exceed the bound by what those produce (a few per session
/// at most). Dropping the stream discards events from then on.
pub struct ServerEvents {
    shared: Arc<Shared>,
}

impl fmt::Debug for ServerEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerEvents")
    }
}

impl Stream for ServerEvents {
    type Item = ServerEvent;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServerEvent>> {
        let mut wakes = Wakes::default();
        let polled = {
            let mut st = self.shared.lock();
            match st.events.pop_front() {
                Some(event) => {
                    self.shared
                        .event_backlog
                        .store(st.events.len(), Ordering::Relaxed);
                    if !st.paused.is_empty() && st.events_have_room(&self.shared) {
                        st.resume_readers(&mut wakes);
                    }
                    Poll::Ready(Some(event))
                }
                None if st.stopped => Poll::Ready(None),
                None => {
                    match &st.events_waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => st.events_waker = Some(cx.waker().clone()),
                    }
                    Poll::Pending
                }
            }
        };
        wakes.wake(&self.shared);
        polled
    }
}

impl Drop for ServerEvents {
    fn drop(&mut self) {
        let mut wakes = Wakes::default();
        {
            let mut st = self.shared.lock();
            st.events_dropped = true;
            st.events.clear();
            self.shared.event_backlog.store(0, Ordering::Relaxed);
            st.events_waker = None;
            st.resume_readers(&mut wakes);
        }
        wakes.wake(&self.shared);
    }
}

/// Binds `addr` and serves WebSocket connections on it.
pub fn bind(
    runtime: Arc<dyn Runtime>,
    addr: SocketAddr,
    options: ServerOptions,
) -> Result<(ServerHandle, ServerEvents), ServeError> {
    let listener = listen(addr, options.listen_backlog)?;
    let listener = runtime.wrap_listener(listener)?;
    start_inner(runtime, Some(listener), options)
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
    listener: Option<Box<dyn AsyncListener>>,
    options: ServerOptions,
) -> Result<(ServerHandle, ServerEvents), ServeError> {
    let mut config = options.config.clone();
    if config.resume_secret.is_unset() {
        // Resume keys must not be computable from session ids: a secret of
        // this process's own unless the application shares one.
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).map_err(|e| ServeError::Random(e.to_string()))?;
        config.resume_secret = kitestring_core::config::ResumeSecret(secret);
    }
    let mut server = Server::new(config)?;
    if let Some(policy) = &options.policy {
        server.set_policy(Box::new(SharedPolicy(policy.clone())));
    }
    let local_addr = match &listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let codec = options
        .config
        .codecs
        .first()
        .copied()
        .unwrap_or(Codec::Json);
    let shared = Arc::new(Shared {
        state: Mutex::new(LockedState {
            server,
            conns: FxHashMap::default(),
            codecs: FxHashMap::default(),
            events: VecDeque::new(),
            events_waker: None,
            events_dropped: false,
            paused: Vec::new(),
            room_waiters: FxHashMap::default(),
            armed: None,
            shutdown: None,
            stopped: false,
        }),
        task: AtomicWaker::new(),
        stop_listening: AtomicBool::new(false),
        clock: Clock::new(&*runtime),
        runtime: runtime.clone(),
        outbound: outbound_capacity(&options),
        event_room: options.event_buffer.max(1),
        event_backlog: AtomicUsize::new(0),
        options: Arc::new(options),
    });
    let (alive_tx, alive_rx) = mpsc::channel(1);
    let task = ServerTask {
        timer: DriveTimer::new(&*runtime),
        shared: shared.clone(),
        listener,
        alive: alive_rx,
        handles_gone: false,
    };
    let span = tracing::info_span!("kitestring_server", addr = ?local_addr);
    runtime.spawn(Box::pin(task.run().instrument(span)));
    Ok((
        ServerHandle {
            shared: shared.clone(),
            _alive: alive_tx,
            local_addr,
            codec,
        },
        ServerEvents { shared },
    ))
}

impl ServerHandle {
    /// The bound address, for servers started with [`bind`].
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The codec typed values for `session` are encoded with: the one its
    /// latest connection negotiated (kept while it is detached), or the
    /// server's preferred codec for a session not seen yet.
    pub fn codec_for(&self, session: SessionId) -> Codec {
        self.shared
            .lock()
            .codecs
            .get(&session)
            .copied()
            .unwrap_or(self.codec)
    }

    /// Sends a typed value to a session (reliable, ordered, exactly once),
    /// encoded with the session's negotiated codec ([`codec_for`](Self::codec_for)).
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        session: SessionId,
        value: &T,
    ) -> Result<MessageId, ServerError> {
        let payload = util::encode(value, self.codec_for(session))?;
        self.send_payload(session, payload).await
    }

    /// Sends raw bytes (a binary payload) to a session.
    pub async fn send_bytes(
        &self,
        session: SessionId,
        data: impl Into<Bytes>,
    ) -> Result<MessageId, ServerError> {
        self.send_payload(session, Payload::binary(data)).await
    }

    /// Sends a payload to a session. Returns as soon as the core accepted
    /// (or refused) it; the connection's task writes it.
    pub async fn send_payload(
        &self,
        session: SessionId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        Ok(self
            .shared
            .call(|st, now| st.server.send(now, session, payload))??)
    }

    /// Waits until a message sent to `session` now would go into its send
    /// window at once ([`Server::has_room`]). With this before each send, an
    /// application feeding a client faster than its link is paced by the
    /// client's acknowledgments instead of filling the session's buffers.
    ///
    /// # Errors
    ///
    /// `SendError::UnknownSession` once the session is gone;
    /// [`ServerError::Stopped`].
    pub async fn ready(&self, session: SessionId) -> Result<(), ServerError> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.stopped {
                return Poll::Ready(Err(ServerError::Stopped));
            }
            match st.server.has_room(session) {
                None => Poll::Ready(Err(ServerError::Send(SendError::UnknownSession))),
                Some(true) => Poll::Ready(Ok(())),
                Some(false) => {
                    let waiters = st.room_waiters.entry(session).or_default();
                    if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                        waiters.push(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Sends a typed value to a session once its window has room
    /// ([`ready`](Self::ready)): the waiting counterpart of
    /// [`send`](Self::send), which returns `QueueFull` instead of waiting.
    pub async fn send_when_ready<T: Serialize + ?Sized>(
        &self,
        session: SessionId,
        value: &T,
    ) -> Result<MessageId, ServerError> {
        let payload = util::encode(value, self.codec_for(session))?;
        self.send_payload_when_ready(session, payload).await
    }

    /// [`send_when_ready`](Self::send_when_ready) for a ready payload.
    pub async fn send_payload_when_ready(
        &self,
        session: SessionId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        loop {
            self.ready(session).await?;
            match self
                .shared
                .call(|st, now| st.server.send(now, session, payload.clone()))?
            {
                // Another task took the room first.
                Err(SendError::QueueFull { .. }) => continue,
                r => return Ok(r?),
            }
        }
    }

    /// Sends an unsequenced datagram to a session's client, if connected.
    /// Refused with `SendError::QueueFull` while
    /// [`DATAGRAM_BACKLOG`](crate::client::DATAGRAM_BACKLOG) frames (or half
    /// [`ServerOptions::outbound_queue`], if less) already wait for that
    /// connection's socket: datagrams are not queued without
    /// bound, and never make a connection a slow consumer.
    pub async fn send_datagram(
        &self,
        session: SessionId,
        data: impl Into<Bytes>,
    ) -> Result<(), ServerError> {
        let data = data.into();
        // Half the frame queue at most, so datagrams alone never make a
        // connection a slow consumer.
        let limit = crate::client::DATAGRAM_BACKLOG.min(self.shared.outbound / 2);
        Ok(self.shared.call(|st, now| {
            let waiting = st
                .server
                .connection_of(session)
                .and_then(|c| st.conns.get(&c))
                .map_or(0, |slot| lock_slot(slot).out.len());
            if waiting >= limit {
                return Err(SendError::QueueFull {
                    messages: waiting,
                    bytes: 0,
                });
            }
            st.server.send_datagram(now, session, data)
        })??)
    }

    /// Ends a session now (its client gets 1000 and stops).
    pub async fn close_session(&self, session: SessionId) -> Result<(), ServerError> {
        Ok(self
            .shared
            .call(|st, now| st.server.close_session(now, session))??)
    }

    /// Closes a connection with `code`; its session waits out its grace period.
    pub async fn disconnect(
        &self,
        connection: ConnectionId,
        code: CloseCode,
    ) -> Result<(), ServerError> {
        self.shared.call(|st, now| {
            st.server.disconnect_connection(now, connection, code);
        })
    }

    /// Drops a connection's transport at once, without a close handshake,
    /// as a network failure would: nothing queued for it is written, its
    /// client sees the stream end (1006) and resumes, and its session waits
    /// out its grace period with every unacknowledged message kept for the
    /// resume. For a peer that must go now (one that stopped reading, a
    /// failed health check, a connection being drained by force) and for
    /// testing resumes. `Ok(false)`: no such connection, or one aborted already.
    pub async fn abort(&self, connection: ConnectionId) -> Result<bool, ServerError> {
        let task = self.shared.call(|st, now| {
            let task = {
                let mut slot = lock_slot(st.conns.get(&connection)?);
                if slot.aborted {
                    // Its task has not reported the end yet; it is gone
                    // for the core already.
                    return None;
                }
                slot.abort()
            };
            st.server.handle_connection_closed(now, connection, None);
            Some(task)
        })?;
        let Some(waker) = task else {
            return Ok(false);
        };
        // Woken after the lock is released, like every other wake-up.
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(true)
    }

    /// Asks a connection's client to reconnect elsewhere or later.
    pub async fn go_away(
        &self,
        connection: ConnectionId,
        code: CloseCode,
        retry_after: Option<Duration>,
    ) -> Result<(), ServerError> {
        self.shared.call(|st, now| {
            st.server.go_away(now, connection, code, retry_after);
        })
    }

    /// Asks a connection's client for a fresh token within `within`; the
    /// answer is checked by [`ServerOptions::reauth`] (or `auth`), and a
    /// client that does not answer in time is closed with 4401.
    pub async fn request_reauth(
        &self,
        connection: ConnectionId,
        within: Duration,
    ) -> Result<(), ServerError> {
        self.shared.call(|st, now| {
            st.server.request_reauth(now, connection, within);
        })
    }

    /// Accepts the token of a [`ServerEvent::TokenReceived`] (only needed
    /// when no validator is configured).
    pub async fn accept_token(&self, connection: ConnectionId) -> Result<(), ServerError> {
        self.shared
            .call(|st, now| st.server.accept_token(now, connection))
    }

    /// Answers a request a session's client sent (a [`Received`] with
    /// `request: true`, quoting its `id`), reliably and in order with the
    /// session's other messages, wherever its connection is. The client gets
    /// it as [`Event::Response`](kitestring_core::client::Event::Response).
    ///
    /// [`Received`]: kitestring_core::client::Received
    pub async fn respond<T: Serialize + ?Sized>(
        &self,
        session: SessionId,
        request: MessageId,
        value: &T,
    ) -> Result<MessageId, ServerError> {
        let payload = util::encode(value, self.codec_for(session))?;
        self.respond_payload(session, request, payload).await
    }

    /// [`respond`](Self::respond) with a ready payload.
    pub async fn respond_payload(
        &self,
        session: SessionId,
        request: MessageId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        Ok(self
            .shared
            .call(|st, now| st.server.respond(now, session, request, payload))??)
    }

    /// Puts a session in a room (the application decided: the room policy
    /// is not consulted). The other members get a presence diff and the
    /// session gets the member list; [`ServerEvent::Joined`] follows.
    /// Joining a room the session is already in only resends the list.
    pub async fn join(&self, session: SessionId, room: &str) -> Result<(), ServerError> {
        Ok(self
            .shared
            .call(|st, now| st.server.join(now, session, room))??)
    }

    /// Takes a session out of a room; `false` if it was not in it. The
    /// remaining members get a presence diff.
    pub async fn leave(&self, session: SessionId, room: &str) -> Result<bool, ServerError> {
        self.shared
            .call(|st, now| st.server.leave(now, session, room))
    }

    /// Sends a typed value to every member of `room`. The value is
    /// serialized once, with the server's preferred codec (the first of
    /// `ServerConfig::codecs`), and the bytes are shared by every member's
    /// reliable stream; a member whose connection negotiated the other codec
    /// still decodes it (payloads carry their kind). Returns how many members it
    /// was queued for. Members too slow to keep up are closed with 4009 and
    /// their sessions ended; the others are not held up.
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        room: &str,
        value: &T,
    ) -> Result<usize, ServerError> {
        let payload = util::encode(value, self.codec)?;
        self.broadcast_payload(room, payload, None).await
    }

    /// Sends a payload to every member of `room` but `exclude` (e.g. the
    /// member the message came from). Cloning a [`Payload`] shares its bytes,
    /// so a broadcast to N members costs one serialization, not N.
    pub async fn broadcast_payload(
        &self,
        room: &str,
        payload: Payload,
        exclude: Option<SessionId>,
    ) -> Result<usize, ServerError> {
        Ok(self
            .shared
            .call(|st, now| st.server.broadcast(now, room, payload, exclude))??)
    }

    /// Who is in `room`, as members see each other (client id and identity,
    /// sorted; never session ids).
    pub async fn members(&self, room: &str) -> Result<Vec<Member>, ServerError> {
        self.shared.call(|st, _| st.server.members(room))
    }

    /// The sessions in `room` (for the application's own bookkeeping; do
    /// not show session ids to other clients, they are resume secrets).
    pub async fn member_sessions(&self, room: &str) -> Result<Vec<SessionId>, ServerError> {
        self.shared.call(|st, _| st.server.member_sessions(room))
    }

    /// How many members `room` has (0 for a room that does not exist).
    pub async fn room_size(&self, room: &str) -> Result<usize, ServerError> {
        self.shared.call(|st, _| st.server.room_size(room))
    }

    /// The rooms a session is in (empty for an unknown session).
    pub async fn rooms_of(&self, session: SessionId) -> Result<Vec<Arc<str>>, ServerError> {
        self.shared.call(|st, _| st.server.rooms_of(session))
    }

    /// A session's state (its connection, identity, buffers), if it exists.
    pub async fn session(&self, session: SessionId) -> Result<Option<SessionInfo>, ServerError> {
        self.shared.call(|st, _| st.server.session(session))
    }

    /// A snapshot of the server's gauges and counters, taken between two
    /// inputs (so it is consistent). Round-trip times are measured by
    /// clients (their pings), not by the server: see
    /// [`ClientHandle::stats`](crate::ClientHandle::stats) and
    /// [`Event::Rtt`](kitestring_core::client::Event::Rtt).
    pub async fn metrics(&self) -> Result<ServerMetrics, ServerError> {
        self.shared.call(|st, _| st.server.metrics())
    }

    /// Replaces the policy that authorizes clients' joins and publishes
    /// (default: everyone may do anything; see also
    /// [`ServerOptions::policy`]). The application's own
    /// [`join`](Self::join) and [`broadcast`](Self::broadcast) are never
    /// checked. The policy runs under the server's lock: it must not call
    /// back into this server.
    pub async fn set_policy(&self, policy: Box<dyn RoomPolicy>) -> Result<(), ServerError> {
        self.shared.call(|st, _| st.server.set_policy(policy))
    }

    /// Stops accepting, sends every connection a `goaway` and closes it with
    /// 1001, waits (bounded by the close timeout) for the sockets to close,
    /// and stops the server task. Sessions are detached, not ended (rooms
    /// see no one leave), but they live in this process's memory and end
    /// with it: a restarted server does not know them, so clients resume
    /// into new sessions and rejoin their rooms by themselves.
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        let (tx, rx) = oneshot::channel();
        let shared = &self.shared;
        shared.call(|st, now| st.begin_shutdown(shared, now, Some(tx)))?;
        shared.task.wake();
        rx.await.map_err(|_| ServerError::Stopped)
    }

    /// Serves a WebSocket that another HTTP server already upgraded (and
    /// authenticated: `identity` is who it is). See the module docs.
    pub fn accept_websocket<S>(&self, ws: WebSocketStream<S>, identity: Option<String>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shared = self.shared.clone();
        self.shared.runtime.spawn(Box::pin(async move {
            connection(shared, ws, identity, None).await;
        }));
    }

    /// Serves a raw byte stream (e.g. from a listener of your own): runs the
    /// TLS handshake if configured, the HTTP upgrade with authentication,
    /// then the session.
    pub fn accept_io(&self, io: BoxIo) {
        let shared = self.shared.clone();
        self.shared
            .runtime
            .spawn(Box::pin(serve_accepted(shared, io, None)));
    }
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
