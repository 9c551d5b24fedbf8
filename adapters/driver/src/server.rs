//! The server: one task owns the core [`Server`] machine; every connection
//! has its own task that reads and writes its socket. They talk through
//! bounded channels only.
//!
//! ```text
//!  accept ──► handshake task (TLS, HTTP upgrade, auth) ──► connection task
//!                                                            │  ▲
//!             inputs: bounded, shared (`inbound_buffer`)     ▼  │ frames: bounded per
//!                                                     server task  connection (`outbound_queue`)
//! ```
//!
//! # Backpressure policy
//!
//! * Inbound: connection tasks wait when the shared input channel is full,
//!   so they stop reading their sockets and TCP pushes back on the peers.
//! * Outbound: what a connection can owe its peer is bounded first by the
//!   core: a session holds at most its send window of unacknowledged
//!   messages (`ReliabilityConfig::window_messages` / `window_bytes`) plus its
//!   waiting queue. A peer that stops reading fills both; then
//!   [`ServerHandle::send`] is refused with `SendError::QueueFull` (nothing
//!   accepted is dropped), a room broadcast evicts that member with 4009 so
//!   the others are not held up, and a peer that also stops sending is closed
//!   by the heartbeat (4008) with its session kept for a resume.
//!   Each connection task also has a frame queue of
//!   [`ServerOptions::outbound_queue`] (at least the send window plus 64, so
//!   a resume retransmitting a whole window fits), plus tungstenite's bounded
//!   write buffer; should that queue still fill, the connection is closed
//!   with 4009 and its session kept.
//! * Events: the server task waits while the application leaves the event
//!   stream ([`ServerOptions::event_buffer`]) full. Keep consuming it.
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

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{HeaderMap, StatusCode};
use async_tungstenite::tungstenite::{Error as WsError, Message};
use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use kitestring_core::close::CloseCode;
use kitestring_core::config::ServerConfig;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::rooms::{Member, RoomPolicy};
use kitestring_core::server::{
    ConnectionId, RoomError, Server, ServerEvent, ServerMetrics, ServerOutput, SessionEnd,
    SessionInfo,
};
use kitestring_core::wire::{Codec, Incoming, Payload, SessionId};
use serde::Serialize;
use tracing::{debug, trace, warn, Instrument};

use crate::error::{ServeError, ServerError};
use crate::runtime::{AsyncListener, BoxIo, Budget, Clock, DriveTimer, ReadyFlag, Runtime};
use crate::util;
use crate::ws::{self, ServerTls};

/// The per-connection outbound queue: the configured size, but always room
/// for a resume's burst (a whole send window) plus control frames.
fn outbound_capacity(options: &ServerOptions) -> usize {
    options.outbound_queue.max(
        options
            .config
            .reliability
            .window_messages
            .saturating_add(64),
    )
}

/// What the upgrade authenticator sees of the HTTP request.
#[derive(Debug)]
pub struct AuthRequest<'a> {
    /// The request path, e.g. `/ws`.
    pub path: &'a str,
    /// The query string without `?`, if any.
    pub query: Option<&'a str>,
    /// Every request header.
    pub headers: &'a HeaderMap,
}

impl AuthRequest<'_> {
    /// Cookies from the `Cookie` headers, as `(name, value)` pairs.
    pub fn cookies(&self) -> Vec<(String, String)> {
        self.headers
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim().to_owned(), v.trim().to_owned()))
            })
            .collect()
    }

    /// The value of cookie `name`, if present.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.cookies()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The token of an `Authorization: Bearer <token>` header, if present.
    pub fn bearer_token(&self) -> Option<&str> {
        let v = self.headers.get("authorization")?.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }

    /// The value of query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// Why an upgrade is refused; the peer gets the HTTP status and no
/// WebSocket frame ever flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthReject {
    /// 401: credentials missing, invalid or expired (the client retries
    /// once with a fresh token, then fails).
    Unauthorized,
    /// 403: authenticated but not allowed (the client fails at once).
    Forbidden,
}

/// Decides, from the upgrade request, who the peer is: `Ok(Some(identity))`,
/// `Ok(None)` for anonymous, or a rejection.
pub type Authenticator =
    Arc<dyn Fn(&AuthRequest<'_>) -> Result<Option<String>, AuthReject> + Send + Sync>;

/// Validates a token a client sent in answer to
/// [`ServerHandle::request_reauth`]: `Ok(identity)` keeps the connection
/// (the identity, if given, must match the session's), an error closes it
/// with 4401 (unauthorized) or 4403 (forbidden).
pub type TokenValidator = Arc<dyn Fn(&str) -> Result<Option<String>, AuthReject> + Send + Sync>;

/// Server settings.
#[derive(Clone)]
pub struct ServerOptions {
    /// The core machine's settings.
    pub config: ServerConfig,
    /// TLS (`wss://`); `None` serves plain `ws://`.
    pub tls: Option<ServerTls>,
    /// Checks every upgrade request; `None` accepts everyone anonymously.
    pub auth: Option<Authenticator>,
    /// Checks tokens sent for re-authentication. `None` falls back to
    /// [`auth`](Self::auth), called with a request whose only header is
    /// `authorization: Bearer <token>` (empty path, no query); with neither,
    /// the application decides through [`ServerHandle::accept_token`] or
    /// [`ServerHandle::disconnect`].
    pub reauth: Option<TokenValidator>,
    /// Frames queued per connection before it counts as a slow consumer and
    /// is closed with 4009. Default 256, and never less than the core's send
    /// window plus 64: a resume retransmits up to a whole window at once,
    /// and that burst must not look like a slow reader. (The window is what
    /// really bounds a connection: it cannot hold more unacknowledged
    /// messages than that, so this queue only guards against control frames
    /// piling up.)
    pub outbound_queue: usize,
    /// Inputs (frames, closes) from all connections waiting for the server
    /// task. Default 1024.
    pub inbound_buffer: usize,
    /// Commands from handles waiting for the server task. Default 256.
    pub command_buffer: usize,
    /// Events waiting for the application. Default 4096.
    pub event_buffer: usize,
    /// Time allowed for the TLS handshake and HTTP upgrade. Default 10 s.
    pub handshake_timeout: Duration,
    /// Time allowed for a close handshake before the socket is dropped. Default 2 s.
    pub close_timeout: Duration,
    /// Authorizes clients' joins and publishes; `None` lets everyone do
    /// anything. Can be replaced later with [`ServerHandle::set_policy`].
    pub policy: Option<Arc<dyn RoomPolicy>>,
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
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            config: ServerConfig::default(),
            tls: None,
            auth: None,
            reauth: None,
            outbound_queue: 256,
            inbound_buffer: 1024,
            command_buffer: 256,
            event_buffer: 4096,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(2),
            policy: None,
        }
    }
}

impl fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerOptions")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth.is_some())
            .field("outbound_queue", &self.outbound_queue)
            .field("policy", &self.policy.is_some())
            .finish()
    }
}

/// How a connection task is told to close.
struct CloseOrder {
    code: CloseCode,
    reason: &'static str,
    /// Write the queued frames first (a `goaway` before its close).
    flush: bool,
}

enum Input {
    Open {
        identity: Option<String>,
        out: mpsc::Sender<Message>,
        close: oneshot::Sender<CloseOrder>,
        reply: oneshot::Sender<ConnectionId>,
    },
    Frame(ConnectionId, Message),
    Closed(ConnectionId, Option<CloseCode>),
}

enum Command {
    Send {
        session: SessionId,
        payload: Payload,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
    },
    Datagram {
        session: SessionId,
        data: Bytes,
        reply: oneshot::Sender<Result<(), SendError>>,
    },
    CloseSession {
        session: SessionId,
        reply: oneshot::Sender<Result<(), SendError>>,
    },
    Disconnect {
        connection: ConnectionId,
        code: CloseCode,
    },
    GoAway {
        connection: ConnectionId,
        code: CloseCode,
        retry_after: Option<Duration>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    RequestReauth {
        connection: ConnectionId,
        within: Duration,
    },
    AcceptToken {
        connection: ConnectionId,
    },
    Respond {
        session: SessionId,
        request: MessageId,
        payload: Payload,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
    },
    Join {
        session: SessionId,
        room: String,
        reply: oneshot::Sender<Result<(), RoomError>>,
    },
    Leave {
        session: SessionId,
        room: String,
        reply: oneshot::Sender<bool>,
    },
    Broadcast {
        room: String,
        payload: Payload,
        exclude: Option<SessionId>,
        reply: oneshot::Sender<Result<usize, SendError>>,
    },
    Query {
        query: Query,
    },
    SetPolicy {
        policy: Box<dyn RoomPolicy>,
    },
}

/// Read-only questions to the server task, answered from the core's state.
enum Query {
    Members(String, oneshot::Sender<Vec<Member>>),
    MemberSessions(String, oneshot::Sender<Vec<SessionId>>),
    RoomSize(String, oneshot::Sender<usize>),
    RoomsOf(SessionId, oneshot::Sender<Vec<Arc<str>>>),
    Metrics(oneshot::Sender<ServerMetrics>),
    Session(SessionId, oneshot::Sender<Option<SessionInfo>>),
}

/// The codec negotiated by each session's latest connection, kept by the
/// server task (set when a session opens or resumes, removed when it ends)
/// and read by handles to encode typed values. Bounded by the number of
/// sessions the core holds (`ServerConfig::max_sessions`).
type SessionCodecs = Arc<RwLock<HashMap<SessionId, Codec>>>;

/// A cloneable handle to a running server. Dropping every handle shuts the
/// server down as [`ServerHandle::shutdown`] does.
#[derive(Clone)]
pub struct ServerHandle {
    commands: mpsc::Sender<Command>,
    inputs: mpsc::Sender<Input>,
    runtime: Arc<dyn Runtime>,
    local_addr: Option<SocketAddr>,
    codec: Codec,
    codecs: SessionCodecs,
    outbound_queue: usize,
    close_timeout: Duration,
    options: Arc<ServerOptions>,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

/// The stream of [`ServerEvent`]s. Ends when the server stops.
pub struct ServerEvents {
    rx: mpsc::Receiver<ServerEvent>,
}

impl fmt::Debug for ServerEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerEvents")
    }
}

impl Stream for ServerEvents {
    type Item = ServerEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServerEvent>> {
        self.rx.poll_next_unpin(cx)
    }
}

/// Binds `addr` and serves WebSocket connections on it.
pub fn bind(
    runtime: Arc<dyn Runtime>,
    addr: SocketAddr,
    options: ServerOptions,
) -> Result<(ServerHandle, ServerEvents), ServeError> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let listener = runtime.wrap_listener(listener)?;
    start_inner(runtime, Some(listener), options)
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
    let mut server = Server::new(options.config.clone())?;
    if let Some(policy) = &options.policy {
        server.set_policy(Box::new(SharedPolicy(policy.clone())));
    }
    let local_addr = match &listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let (cmd_tx, cmd_rx) = mpsc::channel(options.command_buffer.max(1));
    let (in_tx, in_rx) = mpsc::channel(options.inbound_buffer.max(1));
    let (ev_tx, ev_rx) = mpsc::channel(options.event_buffer.max(1));
    let handle = ServerHandle {
        commands: cmd_tx,
        inputs: in_tx,
        runtime: runtime.clone(),
        local_addr,
        codec: options
            .config
            .codecs
            .first()
            .copied()
            .unwrap_or(Codec::Json),
        codecs: SessionCodecs::default(),
        outbound_queue: outbound_capacity(&options),
        close_timeout: options.close_timeout,
        options: Arc::new(options.clone()),
    };
    let task = ServerTask {
        clock: Clock::new(&*runtime),
        timer: DriveTimer::new(&*runtime),
        runtime: runtime.clone(),
        server,
        listener,
        options: handle.options.clone(),
        inputs_tx: handle.inputs.clone(),
        inputs: in_rx,
        commands: cmd_rx,
        commands_done: false,
        events: ev_tx,
        conns: HashMap::new(),
        codecs: handle.codecs.clone(),
        shutdown: None,
    };
    let span = tracing::info_span!("kitestring_server", addr = ?local_addr);
    runtime.spawn(Box::pin(task.run().instrument(span)));
    Ok((handle, ServerEvents { rx: ev_rx }))
}

impl ServerHandle {
    /// The bound address, for servers started with [`bind`].
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ServerError> {
        let (tx, rx) = oneshot::channel();
        let mut commands = self.commands.clone();
        commands
            .send(make(tx))
            .await
            .map_err(|_| ServerError::Stopped)?;
        rx.await.map_err(|_| ServerError::Stopped)
    }

    /// The codec typed values for `session` are encoded with: the one its
    /// latest connection negotiated (kept while it is detached), or the
    /// server's preferred codec for a session not seen yet.
    pub fn codec_for(&self, session: SessionId) -> Codec {
        self.codecs
            .read()
            .ok()
            .and_then(|m| m.get(&session).copied())
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

    /// Sends a payload to a session.
    pub async fn send_payload(
        &self,
        session: SessionId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        Ok(self
            .call(|reply| Command::Send {
                session,
                payload,
                reply,
            })
            .await??)
    }

    /// Sends an unsequenced datagram to a session's client, if connected.
    pub async fn send_datagram(
        &self,
        session: SessionId,
        data: impl Into<Bytes>,
    ) -> Result<(), ServerError> {
        let data = data.into();
        Ok(self
            .call(|reply| Command::Datagram {
                session,
                data,
                reply,
            })
            .await??)
    }

    /// Ends a session now (its client gets 1000 and stops).
    pub async fn close_session(&self, session: SessionId) -> Result<(), ServerError> {
        Ok(self
            .call(|reply| Command::CloseSession { session, reply })
            .await??)
    }

    /// Closes a connection with `code`; its session waits out its grace period.
    pub async fn disconnect(
        &self,
        connection: ConnectionId,
        code: CloseCode,
    ) -> Result<(), ServerError> {
        let mut commands = self.commands.clone();
        commands
            .send(Command::Disconnect { connection, code })
            .await
            .map_err(|_| ServerError::Stopped)
    }

    /// Asks a connection's client to reconnect elsewhere or later.
    pub async fn go_away(
        &self,
        connection: ConnectionId,
        code: CloseCode,
        retry_after: Option<Duration>,
    ) -> Result<(), ServerError> {
        let mut commands = self.commands.clone();
        commands
            .send(Command::GoAway {
                connection,
                code,
                retry_after,
            })
            .await
            .map_err(|_| ServerError::Stopped)
    }

    /// Asks a connection's client for a fresh token within `within`; the
    /// answer is checked by [`ServerOptions::reauth`] (or `auth`), and a
    /// client that does not answer in time is closed with 4401.
    pub async fn request_reauth(
        &self,
        connection: ConnectionId,
        within: Duration,
    ) -> Result<(), ServerError> {
        self.command(Command::RequestReauth { connection, within })
            .await
    }

    /// Accepts the token of a [`ServerEvent::TokenReceived`] (only needed
    /// when no validator is configured).
    pub async fn accept_token(&self, connection: ConnectionId) -> Result<(), ServerError> {
        self.command(Command::AcceptToken { connection }).await
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
            .call(|reply| Command::Respond {
                session,
                request,
                payload,
                reply,
            })
            .await??)
    }

    /// Puts a session in a room (the application decided: the room policy
    /// is not consulted). The other members get a presence diff and the
    /// session gets the member list; [`ServerEvent::Joined`] follows.
    /// Joining a room the session is already in only resends the list.
    pub async fn join(&self, session: SessionId, room: &str) -> Result<(), ServerError> {
        let room = room.to_owned();
        Ok(self
            .call(|reply| Command::Join {
                session,
                room,
                reply,
            })
            .await??)
    }

    /// Takes a session out of a room; `false` if it was not in it. The
    /// remaining members get a presence diff.
    pub async fn leave(&self, session: SessionId, room: &str) -> Result<bool, ServerError> {
        let room = room.to_owned();
        self.call(|reply| Command::Leave {
            session,
            room,
            reply,
        })
        .await
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
        let room = room.to_owned();
        Ok(self
            .call(|reply| Command::Broadcast {
                room,
                payload,
                exclude,
                reply,
            })
            .await??)
    }

    async fn query<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Query,
    ) -> Result<T, ServerError> {
        self.call(|reply| Command::Query { query: make(reply) })
            .await
    }

    /// Who is in `room`, as members see each other (client id and identity,
    /// sorted; never session ids).
    pub async fn members(&self, room: &str) -> Result<Vec<Member>, ServerError> {
        let room = room.to_owned();
        self.query(|reply| Query::Members(room, reply)).await
    }

    /// The sessions in `room` (for the application's own bookkeeping; do
    /// not show session ids to other clients, they are resume secrets).
    pub async fn member_sessions(&self, room: &str) -> Result<Vec<SessionId>, ServerError> {
        let room = room.to_owned();
        self.query(|reply| Query::MemberSessions(room, reply)).await
    }

    /// How many members `room` has (0 for a room that does not exist).
    pub async fn room_size(&self, room: &str) -> Result<usize, ServerError> {
        let room = room.to_owned();
        self.query(|reply| Query::RoomSize(room, reply)).await
    }

    /// The rooms a session is in (empty for an unknown session).
    pub async fn rooms_of(&self, session: SessionId) -> Result<Vec<Arc<str>>, ServerError> {
        self.query(|reply| Query::RoomsOf(session, reply)).await
    }

    /// A session's state (its connection, identity, buffers), if it exists.
    pub async fn session(&self, session: SessionId) -> Result<Option<SessionInfo>, ServerError> {
        self.query(|reply| Query::Session(session, reply)).await
    }

    /// A snapshot of the server's gauges and counters, taken by the server
    /// task between two inputs (so it is consistent). Round-trip times are
    /// measured by clients (their pings), not by the server: see
    /// [`ClientHandle::stats`](crate::ClientHandle::stats) and
    /// [`Event::Rtt`](kitestring_core::client::Event::Rtt).
    pub async fn metrics(&self) -> Result<ServerMetrics, ServerError> {
        self.query(Query::Metrics).await
    }

    /// Replaces the policy that authorizes clients' joins and publishes
    /// (default: everyone may do anything; see also
    /// [`ServerOptions::policy`]). The application's own
    /// [`join`](Self::join) and [`broadcast`](Self::broadcast) are never
    /// checked.
    pub async fn set_policy(&self, policy: Box<dyn RoomPolicy>) -> Result<(), ServerError> {
        self.command(Command::SetPolicy { policy }).await
    }

    async fn command(&self, command: Command) -> Result<(), ServerError> {
        let mut commands = self.commands.clone();
        commands
            .send(command)
            .await
            .map_err(|_| ServerError::Stopped)
    }

    /// Stops accepting, sends every connection a `goaway` and closes it with
    /// 1001, waits (bounded by the close timeout) for the sockets to close,
    /// and stops the server task. Sessions are detached, not ended (rooms
    /// see no one leave), but they live in this task's memory and end with
    /// it: a restarted server does not know them, so clients resume into new
    /// sessions and rejoin their rooms by themselves.
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        self.call(|reply| Command::Shutdown { reply }).await
    }

    /// Serves a WebSocket that another HTTP server already upgraded (and
    /// authenticated: `identity` is who it is). See the module docs.
    pub fn accept_websocket<S>(&self, ws: WebSocketStream<S>, identity: Option<String>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let inputs = self.inputs.clone();
        let queue = self.outbound_queue;
        let runtime = self.runtime.clone();
        let close_timeout = self.close_timeout;
        self.runtime.spawn(Box::pin(async move {
            connection(runtime, ws, identity, inputs, queue, close_timeout).await;
        }));
    }

    /// Serves a raw byte stream (e.g. from a listener of your own): runs the
    /// TLS handshake if configured, the HTTP upgrade with authentication,
    /// then the session.
    pub fn accept_io(&self, io: BoxIo) {
        let inputs = self.inputs.clone();
        let runtime = self.runtime.clone();
        let options = self.options.clone();
        self.runtime
            .spawn(Box::pin(handshake(runtime, io, options, inputs)));
    }
}

/// Per connection, as the server task sees it.
struct Slot {
    out: mpsc::Sender<Message>,
    close: Option<oneshot::Sender<CloseOrder>>,
}

struct ServerTask {
    runtime: Arc<dyn Runtime>,
    clock: Clock,
    timer: DriveTimer,
    server: Server,
    listener: Option<Box<dyn AsyncListener>>,
    options: Arc<ServerOptions>,
    /// For handshake tasks spawned on accept. Not a [`ServerHandle`]: the
    /// task must not keep its own command channel open.
    inputs_tx: mpsc::Sender<Input>,
    inputs: mpsc::Receiver<Input>,
    commands: mpsc::Receiver<Command>,
    commands_done: bool,
    events: mpsc::Sender<ServerEvent>,
    /// Connection tasks that registered and have not reported their end.
    conns: HashMap<ConnectionId, Slot>,
    codecs: SessionCodecs,
    /// Set by `shutdown`: the replies to send, and when to give up waiting.
    shutdown: Option<(Vec<oneshot::Sender<()>>, std::time::Instant)>,
}

enum Wake {
    Input(Input),
    Command(Option<Command>),
    Accepted(std::io::Result<(BoxIo, SocketAddr)>),
    Timeout,
}

impl ServerTask {
    async fn run(mut self) {
        let mut budget = Budget::default();
        loop {
            self.drain().await;
            if let Some((_, give_up)) = &self.shutdown {
                if self.conns.is_empty() || self.runtime.now() >= *give_up {
                    break;
                }
            }
            if self.commands_done && self.listener.is_none() && self.conns.is_empty() {
                break;
            }
            let wake = budget.run(|cx| self.poll_wake(cx)).await;
            self.handle_wake(wake);
        }
        if let Some((replies, _)) = self.shutdown.take() {
            for r in replies {
                let _ = r.send(());
            }
        }
        debug!("server task stopped");
    }

    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if let Poll::Ready(Some(input)) = self.inputs.poll_next_unpin(cx) {
            return Poll::Ready(Wake::Input(input));
        }
        if !self.commands_done {
            if let Poll::Ready(c) = self.commands.poll_next_unpin(cx) {
                return Poll::Ready(Wake::Command(c));
            }
        }
        if let Some(listener) = &self.listener {
            if let Poll::Ready(r) = listener.poll_accept(cx) {
                return Poll::Ready(Wake::Accepted(r));
            }
        }
        let mut deadline = self.server.poll_timeout().map(|d| self.clock.std(d.at));
        if let Some((_, give_up)) = &self.shutdown {
            deadline = Some(deadline.map_or(*give_up, |d| d.min(*give_up)));
        }
        if self.timer.poll(&*self.runtime, deadline, cx).is_ready() {
            return Poll::Ready(Wake::Timeout);
        }
        Poll::Pending
    }

    fn handle_wake(&mut self, wake: Wake) {
        let now = self.clock.now(&*self.runtime);
        match wake {
            Wake::Timeout => self.server.handle_timeout(now),
            Wake::Accepted(Ok((io, addr))) => {
                trace!(%addr, "accepted");
                let inputs = self.inputs_tx.clone();
                self.runtime.spawn(Box::pin(handshake(
                    self.runtime.clone(),
                    io,
                    self.options.clone(),
                    inputs,
                )));
            }
            Wake::Accepted(Err(e)) => {
                // Out of file descriptors and the like: keep serving the
                // connections we have.
                warn!(error = %e, "accept failed");
            }
            Wake::Input(Input::Open {
                identity,
                out,
                close,
                reply,
            }) => {
                if self.shutdown.is_some() {
                    let _ = close.send(CloseOrder {
                        code: CloseCode::GOING_AWAY,
                        reason: "shutting down",
                        flush: false,
                    });
                    return;
                }
                let fresh = match util::random16() {
                    Ok(b) => SessionId(b),
                    Err(e) => {
                        warn!(error = %e, "no randomness for a session id; refusing the connection");
                        let _ = close.send(CloseOrder {
                            code: CloseCode::INTERNAL_ERROR,
                            reason: "no randomness",
                            flush: false,
                        });
                        return;
                    }
                };
                let id = self.server.handle_connection(now, identity, fresh);
                self.conns.insert(
                    id,
                    Slot {
                        out,
                        close: Some(close),
                    },
                );
                let _ = reply.send(id);
            }
            Wake::Input(Input::Frame(id, msg)) => match &msg {
                Message::Text(t) => self
                    .server
                    .handle_message(now, id, Incoming::Text(t.as_str())),
                Message::Binary(b) => self.server.handle_message(now, id, Incoming::Binary(b)),
                _ => {}
            },
            Wake::Input(Input::Closed(id, code)) => {
                self.conns.remove(&id);
                self.server.handle_connection_closed(now, id, code);
            }
            Wake::Command(None) => {
                // Every handle is gone: nobody can send or shut down any
                // more, so shut down now.
                self.commands_done = true;
                let (reply, _) = oneshot::channel();
                self.command(now, Command::Shutdown { reply });
            }
            Wake::Command(Some(cmd)) => self.command(now, cmd),
        }
    }

    fn command(&mut self, now: kitestring_core::Instant, cmd: Command) {
        match cmd {
            Command::Send {
                session,
                payload,
                reply,
            } => {
                let _ = reply.send(self.server.send(now, session, payload));
            }
            Command::Datagram {
                session,
                data,
                reply,
            } => {
                let _ = reply.send(self.server.send_datagram(now, session, data));
            }
            Command::CloseSession { session, reply } => {
                let _ = reply.send(self.server.close_session(now, session));
            }
            Command::Disconnect { connection, code } => {
                self.server.disconnect_connection(now, connection, code);
            }
            Command::GoAway {
                connection,
                code,
                retry_after,
            } => self.server.go_away(now, connection, code, retry_after),
            Command::RequestReauth { connection, within } => {
                self.server.request_reauth(now, connection, within);
            }
            Command::AcceptToken { connection } => self.server.accept_token(now, connection),
            Command::Respond {
                session,
                request,
                payload,
                reply,
            } => {
                let _ = reply.send(self.server.respond(now, session, request, payload));
            }
            Command::Join {
                session,
                room,
                reply,
            } => {
                let _ = reply.send(self.server.join(now, session, &room));
            }
            Command::Leave {
                session,
                room,
                reply,
            } => {
                let _ = reply.send(self.server.leave(now, session, &room));
            }
            Command::Broadcast {
                room,
                payload,
                exclude,
                reply,
            } => {
                let _ = reply.send(self.server.broadcast(now, &room, payload, exclude));
            }
            Command::Query { query } => self.query(query),
            Command::SetPolicy { policy } => self.server.set_policy(policy),
            Command::Shutdown { reply } => {
                self.listener = None;
                // The core flushes pending batches and acknowledgments, then
                // sends every connection a goaway and a 1001. Sessions are
                // detached, not ended: members are not told anyone left.
                self.server.shutdown(now, None);
                let give_up =
                    self.runtime.now() + self.options.close_timeout + Duration::from_millis(500);
                match &mut self.shutdown {
                    Some((replies, _)) => replies.push(reply),
                    None => self.shutdown = Some((vec![reply], give_up)),
                }
            }
        }
    }

    async fn drain(&mut self) {
        while let Some(output) = self.server.poll_output() {
            match output {
                ServerOutput::Transmit(id, t) => {
                    let Some(slot) = self.conns.get_mut(&id) else {
                        continue;
                    };
                    if slot.close.is_none() {
                        continue; // closing: nothing more goes out
                    }
                    match slot.out.try_send(ws::to_message(t)) {
                        Ok(()) => {}
                        Err(e) if e.is_full() => {
                            warn!(
                                connection = id.0,
                                session = self.server.session_of(id).map(|s| s.to_hex()).as_deref(),
                                "outbound queue full: closing a slow consumer with 4009"
                            );
                            if let Some(close) = slot.close.take() {
                                let _ = close.send(CloseOrder {
                                    code: CloseCode::SLOW_CONSUMER,
                                    reason: "slow consumer",
                                    flush: false,
                                });
                            }
                            let now = self.clock.now(&*self.runtime);
                            self.server
                                .disconnect_connection(now, id, CloseCode::SLOW_CONSUMER);
                        }
                        Err(_) => {} // the task ended; its Closed input is on the way
                    }
                }
                ServerOutput::Disconnect(id, code, reason) => {
                    if code == CloseCode::SLOW_CONSUMER {
                        warn!(connection = id.0, %code, reason, "closing a slow consumer");
                    } else {
                        debug!(connection = id.0, %code, reason, "closing connection");
                    }
                    if let Some(slot) = self.conns.get_mut(&id) {
                        if let Some(close) = slot.close.take() {
                            let _ = close.send(CloseOrder {
                                code,
                                reason,
                                flush: true,
                            });
                        }
                    }
                }
                ServerOutput::Event(event) => {
                    log_event(&event);
                    self.track_codec(&event);
                    if let ServerEvent::TokenReceived {
                        connection,
                        session,
                        token,
                    } = &event
                    {
                        self.check_token(*connection, *session, token);
                    }
                    let _ = self.events.send(event).await;
                }
            }
        }
    }
}

impl ServerTask {
    /// Keeps [`SessionCodecs`] in step with the sessions.
    fn track_codec(&self, event: &ServerEvent) {
        let Ok(mut codecs) = self.codecs.write() else {
            return;
        };
        match event {
            ServerEvent::SessionOpened { session, .. } => {
                if let Some(codec) = self.server.session_codec(*session) {
                    codecs.insert(*session, codec);
                }
            }
            ServerEvent::SessionEnded { session, .. } => {
                codecs.remove(session);
            }
            _ => {}
        }
    }

    fn query(&self, query: Query) {
        match query {
            Query::Members(room, reply) => {
                let _ = reply.send(self.server.members(&room));
            }
            Query::MemberSessions(room, reply) => {
                let _ = reply.send(self.server.member_sessions(&room));
            }
            Query::RoomSize(room, reply) => {
                let _ = reply.send(self.server.room_size(&room));
            }
            Query::RoomsOf(session, reply) => {
                let _ = reply.send(self.server.rooms_of(session));
            }
            Query::Metrics(reply) => {
                let _ = reply.send(self.server.metrics());
            }
            Query::Session(session, reply) => {
                let _ = reply.send(self.server.session(session));
            }
        }
    }

    /// Validates a re-authentication token with the configured validator.
    fn check_token(&mut self, connection: ConnectionId, session: SessionId, token: &str) {
        let verdict = if let Some(validate) = &self.options.reauth {
            validate(token)
        } else if let Some(auth) = &self.options.auth {
            let mut headers = HeaderMap::new();
            match async_tungstenite::tungstenite::http::HeaderValue::from_str(&format!(
                "Bearer {token}"
            )) {
                Ok(v) => {
                    headers.insert("authorization", v);
                    auth(&AuthRequest {
                        path: "",
                        query: None,
                        headers: &headers,
                    })
                }
                Err(_) => Err(AuthReject::Unauthorized),
            }
        } else {
            return; // the application decides
        };
        let now = self.clock.now(&*self.runtime);
        let bound = self.server.session(session).and_then(|s| s.identity);
        match verdict {
            Ok(identity) if identity.is_none() || identity == bound => {
                trace!(connection = connection.0, "fresh token accepted");
                self.server.accept_token(now, connection);
            }
            Ok(_) => {
                debug!(
                    connection = connection.0,
                    "fresh token names another identity"
                );
                self.server
                    .disconnect_connection(now, connection, CloseCode::FORBIDDEN);
            }
            Err(reject) => {
                debug!(connection = connection.0, ?reject, "fresh token refused");
                let code = match reject {
                    AuthReject::Forbidden => CloseCode::FORBIDDEN,
                    AuthReject::Unauthorized => CloseCode::UNAUTHORIZED,
                };
                self.server.disconnect_connection(now, connection, code);
            }
        }
    }
}

/// Logs what the application should see in its logs, with the ids that
/// tie a line to a client and a session.
fn log_event(event: &ServerEvent) {
    match event {
        ServerEvent::SessionOpened {
            connection,
            session,
            client,
            identity,
            resumed,
        } => {
            let verb = if *resumed {
                "session resumed"
            } else {
                "session opened"
            };
            debug!(
                connection = connection.0,
                session = %session.to_hex(),
                client = %client.to_hex(),
                identity = identity.as_deref(),
                resumed,
                "{verb}"
            );
        }
        ServerEvent::SessionDetached { session, code } => {
            debug!(session = %session.to_hex(), %code, "session detached; waiting for a resume");
        }
        ServerEvent::SessionEnded {
            session,
            reason,
            unconfirmed,
        } => match reason {
            SessionEnd::SlowConsumer | SessionEnd::Overflow => warn!(
                session = %session.to_hex(),
                ?reason,
                unconfirmed = unconfirmed.len(),
                "session ended: it could not keep up"
            ),
            _ => debug!(
                session = %session.to_hex(),
                ?reason,
                unconfirmed = unconfirmed.len(),
                "session ended"
            ),
        },
        ServerEvent::Rejected {
            connection,
            code,
            reason,
        } => {
            if *reason == "session_forbidden" {
                warn!(
                    connection = connection.0,
                    %code,
                    reason,
                    "resume refused: the session belongs to another identity"
                );
            } else {
                debug!(connection = connection.0, %code, reason, "hello rejected");
            }
        }
        ServerEvent::ConnectionClosed { connection, code } => {
            debug!(connection = connection.0, %code, "connection closed without a session");
        }
        ServerEvent::RateLimited {
            session,
            message,
            limit,
        } => {
            warn!(session = %session.to_hex(), message = message.0, ?limit, "rate limited");
        }
        ServerEvent::Refused {
            session,
            room,
            op,
            reason,
        } => {
            debug!(session = %session.to_hex(), %room, ?op, %reason, "room operation refused");
        }
        ServerEvent::Joined { session, room } => {
            trace!(session = %session.to_hex(), %room, "joined");
        }
        ServerEvent::Left { session, room } => {
            trace!(session = %session.to_hex(), %room, "left");
        }
        ServerEvent::DecodeFailed { connection, error } => {
            debug!(connection = connection.0, %error, "undecodable frame");
        }
        _ => {}
    }
}

/// TLS handshake (if configured) and HTTP upgrade with authentication, then
/// the connection task.
async fn handshake(
    runtime: Arc<dyn Runtime>,
    io: BoxIo,
    options: Arc<ServerOptions>,
    inputs: mpsc::Sender<Input>,
) {
    let limit = options.handshake_timeout;
    let opts = options.clone();
    let upgraded = util::timeout(&*runtime, limit, async move {
        let io: BoxIo = match &opts.tls {
            Some(tls) => match tls.acceptor.accept(io).await {
                Ok(s) => Box::new(s),
                Err(e) => {
                    debug!(error = %e, "TLS handshake failed");
                    return None;
                }
            },
            None => io,
        };
        let mut identity = None;
        let auth = opts.auth.clone();
        // The signature is tungstenite's `Callback`.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            let Some(auth) = auth else {
                return Ok(resp);
            };
            let view = AuthRequest {
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
            };
            match auth(&view) {
                Ok(id) => {
                    identity = id;
                    Ok(resp)
                }
                Err(reject) => {
                    let status = match reject {
                        AuthReject::Forbidden => StatusCode::FORBIDDEN,
                        AuthReject::Unauthorized => StatusCode::UNAUTHORIZED,
                    };
                    let mut r = ErrorResponse::new(Some(
                        status.canonical_reason().unwrap_or("").to_owned(),
                    ));
                    *r.status_mut() = status;
                    Err(r)
                }
            }
        };
        let config = ws::websocket_config(opts.config.max_message_size);
        match async_tungstenite::accept_hdr_async_with_config(io, callback, Some(config)).await {
            Ok(ws) => Some((ws, identity)),
            Err(e) => {
                debug!(error = %e, "upgrade refused or failed");
                None
            }
        }
    })
    .await
    .flatten();
    if let Some((ws, identity)) = upgraded {
        connection(
            runtime,
            ws,
            identity,
            inputs,
            outbound_capacity(&options),
            options.close_timeout,
        )
        .await;
    }
}

/// One connection's task: reads frames into the server task, writes the
/// frames it is given, closes when told or when the peer goes.
async fn connection<S>(
    runtime: Arc<dyn Runtime>,
    mut ws: WebSocketStream<S>,
    identity: Option<String>,
    mut inputs: mpsc::Sender<Input>,
    queue: usize,
    close_timeout: Duration,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(queue);
    let (close_tx, mut close_rx) = oneshot::channel::<CloseOrder>();
    let (reply_tx, reply_rx) = oneshot::channel();
    let registered = inputs
        .send(Input::Open {
            identity,
            out: out_tx,
            close: close_tx,
            reply: reply_tx,
        })
        .await;
    let id = match (registered, reply_rx.await) {
        (Ok(()), Ok(id)) => id,
        _ => {
            // Shutting down (or gone): close politely, bounded.
            let order = close_rx.try_recv().ok().flatten();
            let code = order.map_or(CloseCode::GOING_AWAY, |o| o.code);
            let _ = util::timeout(&*runtime, close_timeout, async {
                let _ = ws.close(Some(ws::close_frame(code, "going away"))).await;
            })
            .await;
            return;
        }
    };
    let span = tracing::debug_span!("connection", id = id.0);
    async move {
        enum Step {
            Frame(Option<Result<Message, WsError>>),
            Close(Option<CloseOrder>),
            WriteFailed,
        }
        let mut needs_flush = false;
        let mut pending: Option<Message> = None;
        // Read only when the socket signalled: this task also wakes for every
        // outgoing frame, and a read attempt is not free.
        let readable = ReadyFlag::new();
        let step = loop {
            let step = futures_util::future::poll_fn(|cx| {
                if let Poll::Ready(order) = close_rx.poll_unpin(cx) {
                    return Poll::Ready(Step::Close(order.ok()));
                }
                // Writes: take a frame only when the socket can accept it, so
                // a stalled peer leaves frames in the bounded queue.
                loop {
                    match Pin::new(&mut ws).poll_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => return Poll::Ready(Step::WriteFailed),
                        Poll::Pending => break,
                    }
                    let next = match pending.take() {
                        Some(m) => Some(m),
                        None => match out_rx.poll_next_unpin(cx) {
                            Poll::Ready(Some(m)) => Some(m),
                            _ => None,
                        },
                    };
                    let Some(m) = next else { break };
                    if Pin::new(&mut ws).start_send(m).is_err() {
                        return Poll::Ready(Step::WriteFailed);
                    }
                    needs_flush = true;
                }
                if needs_flush {
                    match Pin::new(&mut ws).poll_flush(cx) {
                        Poll::Ready(Ok(())) => needs_flush = false,
                        Poll::Ready(Err(_)) => return Poll::Ready(Step::WriteFailed),
                        Poll::Pending => {}
                    }
                }
                readable
                    .poll(cx, |cx| ws.poll_next_unpin(cx))
                    .map(Step::Frame)
            })
            .await;
            match step {
                Step::Frame(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => {
                    if inputs.send(Input::Frame(id, m)).await.is_err() {
                        break Step::Close(None);
                    }
                }
                // Pings and pongs: tungstenite answers pings itself.
                Step::Frame(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                other => break other,
            }
        };
        match step {
            Step::Frame(Some(Ok(Message::Close(frame)))) => {
                let (code, _) = ws::close_code(&frame);
                let _ = inputs.send(Input::Closed(id, code)).await;
                let _ = util::timeout(&*runtime, close_timeout, async {
                    let _ = ws.flush().await;
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
            }
            Step::Close(order) => {
                let (code, reason, flush) = order
                    .map_or((CloseCode::GOING_AWAY, "going away", false), |o| {
                        (o.code, o.reason, o.flush)
                    });
                let limit = if flush {
                    close_timeout
                } else {
                    close_timeout / 4
                };
                let _ = util::timeout(&*runtime, limit, async {
                    if flush {
                        if let Some(m) = pending.take() {
                            let _ = ws.feed(m).await;
                        }
                        while let Ok(m) = out_rx.try_recv() {
                            if ws.feed(m).await.is_err() {
                                break;
                            }
                        }
                    }
                    let _ = ws.close(Some(ws::close_frame(code, reason))).await;
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                let _ = inputs.send(Input::Closed(id, Some(code))).await;
            }
            _ => {
                let _ = inputs.send(Input::Closed(id, None)).await;
            }
        }
        trace!("connection task ended");
    }
    .instrument(span)
    .await;
}
