//! The client driver: one task that owns the WebSocket and the core
//! [`Client`] machine, and the handle and event stream the application uses.
//!
//! The task runs the core's loop: wait for the first of (a command from a
//! handle, a frame or error on the socket, a connection attempt finishing,
//! an old socket finishing its close, the core's deadline), feed it in, then
//! carry out every output. Sockets are keyed by the core's `TransportId`:
//! a socket whose transport the core has left is closed and dropped, and any
//! late report about it is ignored by the core, so nothing from a dead
//! connection (a frame, an error, a timer) can touch a new one. There is a
//! single deadline timer, re-armed from `poll_timeout` after every step, and
//! the clock is checked before the timer is trusted.
//!
//! Bounds: commands travel through a channel of
//! [`ClientOptions::command_buffer`] entries (a handle's `send().await`
//! waits while it is full); events through one of
//! [`ClientOptions::event_buffer`] entries, and the task pauses (reading
//! nothing) while the application leaves it full, so keep consuming events.
//! Frames waiting for the socket are bounded by the core's send window.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::{Error as WsError, Message};
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use kitestring_core::client::{
    Client, ClientStats, Event, LostReason, Output, Received, RequestError, State, TransportError,
    TransportId,
};
use kitestring_core::close::CloseCode;
use kitestring_core::config::ClientConfig;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::wire::{ClientId, Codec, Incoming, Payload, SessionId};
use serde::Serialize;
use tracing::{debug, trace, warn, Instrument};

use crate::error::{ClientError, ConnectError};
use crate::runtime::{BoxFuture, BoxIo, Budget, Clock, DriveTimer, ReadyFlag, Runtime};
use crate::util::{self, Target};
use crate::ws::{self, ClientTls, Ws};

/// Asked for a fresh token before every connection attempt (it goes in the
/// upgrade request) and whenever the server asks for re-authentication
/// ([`Event::TokenExpiring`]; the driver answers with the token at once).
/// `None` means "no token".
pub type TokenProvider = Arc<dyn Fn() -> BoxFuture<'static, Option<String>> + Send + Sync>;

/// Wraps an async closure as a [`TokenProvider`].
pub fn token_provider<F, Fut>(f: F) -> TokenProvider
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<String>> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// How a client connects.
#[derive(Clone)]
pub struct ClientOptions {
    /// The core machine's settings.
    pub config: ClientConfig,
    /// TLS settings; required for `wss://` URLs.
    pub tls: Option<ClientTls>,
    /// Called for a fresh token at every connect and reconnect. Setting it
    /// also sets [`ClientConfig::can_refresh_token`], so an HTTP 401 is
    /// retried once with a fresh token before the client fails.
    pub token: Option<TokenProvider>,
    /// The request header that carries the token. Default `authorization`.
    pub token_header: String,
    /// Put before the token in that header. Default `"Bearer "`.
    pub token_prefix: String,
    /// Commands (sends, closes) waiting for the driver task. Default 64.
    pub command_buffer: usize,
    /// Events waiting for the application. Default 1024.
    pub event_buffer: usize,
    /// How long closing a socket may take before it is dropped. Default 2 s.
    pub close_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            config: ClientConfig::default(),
            tls: None,
            token: None,
            token_header: "authorization".into(),
            token_prefix: "Bearer ".into(),
            command_buffer: 64,
            event_buffer: 1024,
            close_timeout: Duration::from_secs(2),
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("config", &self.config)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .field("command_buffer", &self.command_buffer)
            .field("event_buffer", &self.event_buffer)
            .finish()
    }
}

type AckReply = oneshot::Sender<Result<(), ClientError>>;

enum Command {
    Send {
        payload: Payload,
        timestamp: Option<u64>,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
        ack: Option<AckReply>,
    },
    Datagram {
        data: Bytes,
        reply: oneshot::Sender<Result<(), SendError>>,
    },
    Close {
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Reconnect {
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Token {
        token: String,
        reply: oneshot::Sender<Result<(), SendError>>,
    },
    Join {
        room: String,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
    },
    Leave {
        room: String,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
    },
    Publish {
        room: String,
        payload: Payload,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
    },
    Request {
        payload: Payload,
        timeout: Duration,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
        response: ResponseReply,
    },
    CancelRequest {
        request: MessageId,
        reply: oneshot::Sender<bool>,
    },
    Respond {
        request: MessageId,
        payload: Payload,
        reply: oneshot::Sender<Result<MessageId, SendError>>,
    },
    Latest {
        key: String,
        payload: Payload,
        reply: oneshot::Sender<Result<(), SendError>>,
    },
    Stats {
        reply: oneshot::Sender<ClientSnapshot>,
    },
}

type ResponseReply = oneshot::Sender<Result<Received, ClientError>>;

/// The response to a request, once it comes ([`ClientHandle::start_request`]).
#[must_use = "a response future does nothing unless awaited"]
pub struct PendingResponse {
    id: MessageId,
    rx: oneshot::Receiver<Result<Received, ClientError>>,
}

impl PendingResponse {
    /// The request's id.
    pub fn id(&self) -> MessageId {
        self.id
    }
}

impl fmt::Debug for PendingResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingResponse")
            .field("id", &self.id)
            .finish()
    }
}

impl std::future::Future for PendingResponse {
    type Output = Result<Received, ClientError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.rx
            .poll_unpin(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Stopped)))
    }
}

/// A consistent picture of a client, taken by its driver task between two
/// inputs ([`ClientHandle::stats`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ClientSnapshot {
    /// The core's counters.
    pub stats: ClientStats,
    /// The connection state.
    pub state: State,
    /// The current session, once one was opened.
    pub session: Option<SessionId>,
    /// The smoothed round-trip time from heartbeats, once measured.
    pub rtt: Option<Duration>,
    /// The rooms this client asked to be in (sorted).
    pub rooms: Vec<String>,
    /// Requests waiting for a response.
    pub pending_requests: usize,
    /// Messages waiting to be sent, and their payload bytes.
    pub queued: (usize, usize),
    /// Messages sent and not yet acknowledged, and their payload bytes.
    pub unacknowledged: (usize, usize),
}

const CODEC_JSON: u8 = 0;
const CODEC_MSGPACK: u8 = 1;

fn codec_tag(c: Codec) -> u8 {
    match c {
        Codec::MsgPack => CODEC_MSGPACK,
        _ => CODEC_JSON,
    }
}

/// A cloneable handle to a running client. Dropping every handle closes the
/// session (1000) and stops the driver task.
#[derive(Clone)]
pub struct ClientHandle {
    commands: mpsc::Sender<Command>,
    codec: Arc<AtomicU8>,
    client_id: ClientId,
}

impl fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHandle")
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// The stream of [`Event`]s from a client. Ends when the driver stops.
pub struct ClientEvents {
    rx: mpsc::Receiver<Event>,
}

impl fmt::Debug for ClientEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientEvents")
    }
}

impl Stream for ClientEvents {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_next_unpin(cx)
    }
}

impl ClientHandle {
    /// This client instance's id, as the server sees it.
    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// The codec typed sends use: the negotiated one once connected, the
    /// first configured preference before.
    pub fn codec(&self) -> Codec {
        if self.codec.load(Ordering::Relaxed) == CODEC_MSGPACK {
            Codec::MsgPack
        } else {
            Codec::Json
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        let mut commands = self.commands.clone();
        commands
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)
    }

    /// Sends a typed value for reliable, ordered, exactly-once delivery,
    /// encoded with [`codec`](Self::codec). While reconnecting, the core
    /// queues it; a full queue returns the core's [`SendError::QueueFull`].
    pub async fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<MessageId, ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.send_payload(payload).await
    }

    /// Sends raw bytes (a binary payload) reliably.
    pub async fn send_bytes(&self, data: impl Into<Bytes>) -> Result<MessageId, ClientError> {
        self.send_payload(Payload::binary(data)).await
    }

    /// Sends a payload reliably.
    pub async fn send_payload(&self, payload: Payload) -> Result<MessageId, ClientError> {
        let r = self
            .call(|reply| Command::Send {
                payload,
                timestamp: None,
                reply,
                ack: None,
            })
            .await?;
        Ok(r?)
    }

    /// Sends a payload carrying the sender's wall-clock timestamp (ms).
    pub async fn send_with_timestamp(
        &self,
        payload: Payload,
        timestamp_ms: u64,
    ) -> Result<MessageId, ClientError> {
        let r = self
            .call(|reply| Command::Send {
                payload,
                timestamp: Some(timestamp_ms),
                reply,
                ack: None,
            })
            .await?;
        Ok(r?)
    }

    /// Sends a typed value and waits until the server acknowledges it.
    /// Fails with [`ClientError::Lost`] if its session is given up first,
    /// or [`ClientError::NotAcknowledged`] if the client closes or fails.
    pub async fn send_acked<T: Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<MessageId, ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.send_payload_acked(payload).await
    }

    /// [`send_acked`](Self::send_acked) for a ready payload.
    pub async fn send_payload_acked(&self, payload: Payload) -> Result<MessageId, ClientError> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let id = self
            .call(|reply| Command::Send {
                payload,
                timestamp: None,
                reply,
                ack: Some(ack_tx),
            })
            .await??;
        match ack_rx.await {
            Ok(r) => r.map(|()| id),
            Err(_) => Err(ClientError::NotAcknowledged(id)),
        }
    }

    /// Sends an unsequenced datagram: no ack, no retry, only while open.
    pub async fn send_datagram(&self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        let data = data.into();
        let r = self.call(|reply| Command::Datagram { data, reply }).await?;
        Ok(r?)
    }

    /// Sends a fresh credential on the open connection, answering
    /// [`Event::TokenExpiring`]. With a [`ClientOptions::token`] provider
    /// the driver does this by itself; this is for applications that manage
    /// tokens on their own.
    pub async fn send_token(&self, token: impl Into<String>) -> Result<(), ClientError> {
        let token = token.into();
        let r = self.call(|reply| Command::Token { token, reply }).await?;
        Ok(r?)
    }

    /// Joins a room. The server checks its policy and answers on the event
    /// stream with [`Event::Presence`] (a snapshot of the members, then
    /// diffs) or [`Event::Refused`]. Membership belongs to the session: it
    /// survives reconnects, and if the session is lost the client rejoins
    /// its rooms in the new one by itself. Returns the id of the join
    /// message.
    pub async fn join(&self, room: &str) -> Result<MessageId, ClientError> {
        let room = room.to_owned();
        Ok(self.call(|reply| Command::Join { room, reply }).await??)
    }

    /// Leaves a room.
    pub async fn leave(&self, room: &str) -> Result<MessageId, ClientError> {
        let room = room.to_owned();
        Ok(self.call(|reply| Command::Leave { room, reply }).await??)
    }

    /// Publishes a typed value to a room this client has joined: the server
    /// checks its policy and delivers it to every other member, each
    /// exactly once and in order. A refusal comes back as [`Event::Refused`].
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        room: &str,
        value: &T,
    ) -> Result<MessageId, ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.publish_payload(room, payload).await
    }

    /// [`publish`](Self::publish) with a ready payload.
    pub async fn publish_payload(
        &self,
        room: &str,
        payload: Payload,
    ) -> Result<MessageId, ClientError> {
        let room = room.to_owned();
        Ok(self
            .call(|reply| Command::Publish {
                room,
                payload,
                reply,
            })
            .await??)
    }

    /// Sends a typed request and waits for its response (the server answers
    /// with [`ServerHandle::respond`](crate::ServerHandle::respond)). A
    /// request in flight across a reconnect is answered once the session
    /// resumes. Fails with [`ClientError::Request`] when no response comes
    /// within `timeout` (a response arriving later is reported on the event
    /// stream as [`Event::LateResponse`] and dropped), or when the session
    /// is lost or closed. [`Event::Response`] and [`Event::RequestFailed`]
    /// still reach the event stream.
    pub async fn request<T: Serialize + ?Sized>(
        &self,
        value: &T,
        timeout: Duration,
    ) -> Result<Received, ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.request_payload(payload, timeout).await
    }

    /// [`request`](Self::request) with a ready payload.
    pub async fn request_payload(
        &self,
        payload: Payload,
        timeout: Duration,
    ) -> Result<Received, ClientError> {
        self.start_request(payload, timeout).await?.await
    }

    /// Sends a request and returns once the core accepted it, with the
    /// request's id and a future for its response (see
    /// [`request`](Self::request)). Dropping the future does not cancel the
    /// request; [`cancel_request`](Self::cancel_request) does.
    pub async fn start_request(
        &self,
        payload: Payload,
        timeout: Duration,
    ) -> Result<PendingResponse, ClientError> {
        let (tx, rx) = oneshot::channel();
        let id = self
            .call(|reply| Command::Request {
                payload,
                timeout,
                reply,
                response: tx,
            })
            .await??;
        Ok(PendingResponse { id, rx })
    }

    /// Stops waiting for a request's response; `true` if it was pending.
    /// Its [`PendingResponse`] resolves to [`ClientError::RequestCancelled`],
    /// and a response arriving later is reported as [`Event::LateResponse`].
    pub async fn cancel_request(&self, request: MessageId) -> Result<bool, ClientError> {
        self.call(|reply| Command::CancelRequest { request, reply })
            .await
    }

    /// Answers a request the server sent (a [`Received`] with
    /// `request: true`, quoting its `id`).
    pub async fn respond<T: Serialize + ?Sized>(
        &self,
        request: MessageId,
        value: &T,
    ) -> Result<MessageId, ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.respond_payload(request, payload).await
    }

    /// [`respond`](Self::respond) with a ready payload.
    pub async fn respond_payload(
        &self,
        request: MessageId,
        payload: Payload,
    ) -> Result<MessageId, ClientError> {
        Ok(self
            .call(|reply| Command::Respond {
                request,
                payload,
                reply,
            })
            .await??)
    }

    /// Sends the latest value for `key` (a cursor, a position): at most one
    /// message per key per [`ClientConfig::coalesce_interval`], the newest
    /// value replacing any that waited, the last one always sent. A value
    /// that cannot be queued when its time comes is reported as
    /// [`Event::LatestFailed`].
    pub async fn send_latest<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.send_latest_payload(key, payload).await
    }

    /// [`send_latest`](Self::send_latest) with a ready payload.
    pub async fn send_latest_payload(
        &self,
        key: &str,
        payload: Payload,
    ) -> Result<(), ClientError> {
        let key = key.to_owned();
        Ok(self
            .call(|reply| Command::Latest {
                key,
                payload,
                reply,
            })
            .await??)
    }

    /// A snapshot of the client's counters, state, round-trip time, rooms
    /// and buffers, read by the driver task.
    pub async fn stats(&self) -> Result<ClientSnapshot, ClientError> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Connects again now (skipping a backoff delay, or leaving `Failed`).
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        self.call(|reply| Command::Reconnect { reply }).await?
    }

    /// Closes the session with 1000 and stops the driver; resolves once the
    /// close has completed (or timed out).
    pub async fn close(&self) -> Result<(), ClientError> {
        self.call(|reply| Command::Close { reply }).await?
    }
}

/// Starts a client for `url` (`ws://` or `wss://`) on `runtime` and returns
/// at once: connecting happens in the background and is reported on the
/// event stream. Messages sent before the session opens are queued.
pub fn connect(
    runtime: Arc<dyn Runtime>,
    url: &str,
    mut options: ClientOptions,
) -> Result<(ClientHandle, ClientEvents), ConnectError> {
    let target = util::parse_url(url)?;
    if target.tls && options.tls.is_none() {
        return Err(ConnectError::MissingTls);
    }
    options.config.can_refresh_token = options.token.is_some();
    let client_id = ClientId(util::random16().map_err(|e| ConnectError::Random(e.to_string()))?);
    let client = Client::new(options.config.clone(), client_id, util::random_seed())?;
    let preferred = options
        .config
        .codecs
        .first()
        .copied()
        .unwrap_or(Codec::Json);
    let codec = Arc::new(AtomicU8::new(codec_tag(preferred)));
    let (cmd_tx, cmd_rx) = mpsc::channel(options.command_buffer.max(1));
    let (ev_tx, ev_rx) = mpsc::channel(options.event_buffer.max(1));
    let ws_config = ws::websocket_config(options.config.max_message_size);
    let span = tracing::info_span!(
        "kitestring_client",
        client = %client_id.to_hex(),
        url = %target.url,
        session = tracing::field::Empty,
    );
    let driver = Driver {
        clock: Clock::new(&*runtime),
        timer: DriveTimer::new(&*runtime),
        runtime: runtime.clone(),
        client,
        connector: Arc::new(Connector {
            runtime: runtime.clone(),
            target,
            tls: options.tls.clone(),
            token: options.token.clone(),
            token_header: options.token_header.clone(),
            token_prefix: options.token_prefix.clone(),
            ws_config,
        }),
        close_timeout: options.close_timeout,
        commands: cmd_rx,
        commands_done: false,
        events: ev_tx,
        connecting: None,
        live: None,
        closing: FuturesUnordered::new(),
        waiters: BTreeMap::new(),
        requests: BTreeMap::new(),
        codec: codec.clone(),
        close_replies: Vec::new(),
        stop_when_closed: false,
        reads_in_a_row: 0,
        token_fetch: None,
    };
    runtime.spawn(Box::pin(driver.run().instrument(span)));
    Ok((
        ClientHandle {
            commands: cmd_tx,
            codec,
            client_id,
        },
        ClientEvents { rx: ev_rx },
    ))
}

/// Everything needed to open one WebSocket.
struct Connector {
    runtime: Arc<dyn Runtime>,
    target: Target,
    tls: Option<ClientTls>,
    token: Option<TokenProvider>,
    token_header: String,
    token_prefix: String,
    ws_config: async_tungstenite::tungstenite::protocol::WebSocketConfig,
}

impl Connector {
    async fn open(self: Arc<Self>) -> Result<Ws, TransportError> {
        let mut request = (&*self.target.url)
            .into_client_request()
            .map_err(|e| TransportError::WebSocket(e.to_string()))?;
        if let Some(provider) = &self.token {
            if let Some(token) = provider().await {
                let value = HeaderValue::from_str(&format!("{}{}", self.token_prefix, token))
                    .map_err(|e| TransportError::Io(format!("token is not a valid header: {e}")))?;
                let name = async_tungstenite::tungstenite::http::HeaderName::from_bytes(
                    self.token_header.as_bytes(),
                )
                .map_err(|e| TransportError::Io(format!("bad token header name: {e}")))?;
                request.headers_mut().insert(name, value);
            }
        }
        let tcp = self
            .runtime
            .connect_tcp(self.target.host.clone(), self.target.port)
            .await
            .map_err(|e| TransportError::Io(e.to_string()))?;
        let io: BoxIo = match (&self.tls, self.target.tls) {
            (Some(tls), true) => {
                let name = rustls_pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                let stream = futures_rustls::TlsConnector::from(tls.config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| TransportError::Tls(e.to_string()))?;
                Box::new(stream)
            }
            _ => tcp,
        };
        let (ws, _response) =
            async_tungstenite::client_async_with_config(request, io, Some(self.ws_config))
                .await
                .map_err(transport_error)?;
        Ok(ws)
    }
}

/// A tungstenite error as the core's transport error.
pub(crate) fn transport_error(e: WsError) -> TransportError {
    match e {
        WsError::Http(response) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            TransportError::Http {
                status: response.status().as_u16(),
                retry_after,
            }
        }
        WsError::Io(e) => TransportError::Io(e.to_string()),
        WsError::Tls(e) => TransportError::Tls(e.to_string()),
        other => TransportError::WebSocket(other.to_string()),
    }
}

/// The open socket of the core's current transport.
struct Live {
    tid: TransportId,
    ws: Ws,
    /// Polls the socket's read side only when it has signalled.
    readable: ReadyFlag,
    /// Frames the core emitted that the socket has not taken yet. Bounded by
    /// the core's send window plus a few control frames.
    out: VecDeque<Message>,
    needs_flush: bool,
}

type Closing = BoxFuture<'static, (TransportId, Option<CloseCode>, String)>;

// Transient: built and consumed within one loop turn, never stored.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Command(Option<Command>),
    Opened(TransportId, Result<Ws, TransportError>),
    Frame(TransportId, Option<Result<Message, WsError>>),
    WriteFailed(TransportId, WsError),
    Closed(TransportId, Option<CloseCode>, String),
    Token(Option<String>),
    Timeout,
}

struct Driver {
    runtime: Arc<dyn Runtime>,
    clock: Clock,
    timer: DriveTimer,
    client: Client,
    connector: Arc<Connector>,
    close_timeout: Duration,
    commands: mpsc::Receiver<Command>,
    commands_done: bool,
    events: mpsc::Sender<Event>,
    connecting: Option<(TransportId, BoxFuture<'static, Result<Ws, TransportError>>)>,
    live: Option<Live>,
    closing: FuturesUnordered<Closing>,
    /// Messages whose sender waits for the acknowledgment. Bounded by the
    /// core's queue and window: only accepted messages get an entry.
    waiters: BTreeMap<MessageId, AckReply>,
    /// Requests whose sender waits for the response. Bounded by the core's
    /// `max_pending_requests`: only accepted requests get an entry, and an
    /// entry leaves with the core's `Response` or `RequestFailed`.
    requests: BTreeMap<MessageId, ResponseReply>,
    codec: Arc<AtomicU8>,
    close_replies: Vec<oneshot::Sender<Result<(), ClientError>>>,
    stop_when_closed: bool,
    reads_in_a_row: u32,
    /// A fresh token being fetched to answer `TokenExpiring`.
    token_fetch: Option<BoxFuture<'static, Option<String>>>,
}

impl Driver {
    async fn run(mut self) {
        let now = self.clock.now(&*self.runtime);
        if let Err(e) = self.client.connect(now) {
            warn!(error = %e, "connect refused by the core");
        }
        let mut budget = Budget::default();
        loop {
            self.drain().await;
            if self.finished() {
                break;
            }
            let wake = budget.run(|cx| self.poll_wake(cx)).await;
            self.handle(wake);
        }
        // Let sockets still closing finish their handshake, bounded by their timeouts.
        while self.closing.next().await.is_some() {}
        for reply in self.close_replies.drain(..) {
            let _ = reply.send(Ok(()));
        }
        self.fail_waiters(ClientError::NotAcknowledged);
        self.fail_requests(RequestError::Closed);
        debug!("client driver stopped");
    }

    fn finished(&self) -> bool {
        let terminal = matches!(
            self.client.state(),
            State::Closed { .. } | State::Failed { .. } | State::Disconnected
        );
        terminal && (self.stop_when_closed || self.commands_done)
    }

    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        // Writes first, so frames the core produced go out before we wait.
        if let Some(live) = &mut self.live {
            if let Err(e) = pump_writes(live, cx) {
                return Poll::Ready(Wake::WriteFailed(live.tid, e));
            }
        }
        // Commands get a turn at least every 32 reads, so a flood of
        // incoming frames cannot starve the application.
        if self.reads_in_a_row >= 32 {
            self.reads_in_a_row = 0;
            if let Poll::Ready(c) = self.poll_command(cx) {
                return Poll::Ready(c);
            }
        }
        if let Some(live) = &mut self.live {
            let ws = &mut live.ws;
            if let Poll::Ready(item) = live.readable.poll(cx, |cx| ws.poll_next_unpin(cx)) {
                self.reads_in_a_row += 1;
                return Poll::Ready(Wake::Frame(live.tid, item));
            }
        }
        self.reads_in_a_row = 0;
        if let Some((tid, fut)) = &mut self.connecting {
            if let Poll::Ready(r) = fut.poll_unpin(cx) {
                let tid = *tid;
                self.connecting = None;
                return Poll::Ready(Wake::Opened(tid, r));
            }
        }
        if !self.closing.is_empty() {
            if let Poll::Ready(Some((tid, code, reason))) = self.closing.poll_next_unpin(cx) {
                return Poll::Ready(Wake::Closed(tid, code, reason));
            }
        }
        if let Some(fetch) = &mut self.token_fetch {
            if let Poll::Ready(token) = fetch.poll_unpin(cx) {
                self.token_fetch = None;
                return Poll::Ready(Wake::Token(token));
            }
        }
        if let Poll::Ready(c) = self.poll_command(cx) {
            return Poll::Ready(c);
        }
        let deadline = self.client.poll_timeout().map(|d| self.clock.std(d.at));
        if self.timer.poll(&*self.runtime, deadline, cx).is_ready() {
            return Poll::Ready(Wake::Timeout);
        }
        Poll::Pending
    }

    fn poll_command(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if self.commands_done {
            return Poll::Pending;
        }
        self.commands.poll_next_unpin(cx).map(Wake::Command)
    }

    fn now(&self) -> kitestring_core::Instant {
        self.clock.now(&*self.runtime)
    }

    fn handle(&mut self, wake: Wake) {
        let now = self.now();
        match wake {
            Wake::Timeout => self.client.handle_timeout(now),
            Wake::Command(None) => {
                self.commands_done = true;
                let _ = self.client.close(now);
            }
            Wake::Command(Some(cmd)) => self.command(now, cmd),
            Wake::Opened(tid, Ok(ws)) => {
                if let Some(old) = self.live.take() {
                    self.start_close(old, CloseCode::RETRY, "superseded");
                }
                trace!(transport = tid.0, "transport opened");
                self.live = Some(Live {
                    tid,
                    ws,
                    readable: ReadyFlag::new(),
                    out: VecDeque::new(),
                    needs_flush: false,
                });
                self.client.handle_transport_opened(now, tid);
            }
            Wake::Opened(tid, Err(e)) => {
                debug!(transport = tid.0, error = ?e, "connection attempt failed");
                self.client.handle_transport_error(now, tid, e);
            }
            Wake::Frame(tid, item) => self.frame(now, tid, item),
            Wake::WriteFailed(tid, e) => {
                self.live = None;
                self.client
                    .handle_transport_error(now, tid, transport_error(e));
            }
            Wake::Closed(tid, code, reason) => {
                self.client.handle_transport_closed(now, tid, code, &reason);
            }
            Wake::Token(Some(token)) => {
                if let Err(e) = self.client.send_token(now, token) {
                    // Not open any more: the next connection carries a fresh
                    // token in its upgrade anyway.
                    debug!(error = %e, "fresh token not sent");
                }
            }
            Wake::Token(None) => {
                debug!("token provider had no token; the server will close with 4401")
            }
        }
    }

    fn frame(
        &mut self,
        now: kitestring_core::Instant,
        tid: TransportId,
        item: Option<Result<Message, WsError>>,
    ) {
        match item {
            Some(Ok(Message::Text(text))) => {
                self.client
                    .handle_message(now, tid, Incoming::Text(text.as_str()));
            }
            Some(Ok(Message::Binary(data))) => {
                self.client
                    .handle_message(now, tid, Incoming::Binary(&data));
            }
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = ws::close_code(&frame);
                debug!(transport = tid.0, ?code, %reason, "peer closed");
                // tungstenite has queued the close reply; finish it aside.
                if let Some(live) = self.live.take() {
                    self.finish_close(live);
                }
                self.client.handle_transport_closed(now, tid, code, &reason);
            }
            Some(Ok(_)) => {} // pings are answered by tungstenite; pongs ignored
            None => {
                self.live = None;
                self.client.handle_transport_closed(now, tid, None, "");
            }
            Some(Err(e)) => {
                debug!(transport = tid.0, error = %e, "transport error");
                self.live = None;
                self.client
                    .handle_transport_error(now, tid, transport_error(e));
            }
        }
    }

    fn command(&mut self, now: kitestring_core::Instant, cmd: Command) {
        match cmd {
            Command::Send {
                payload,
                timestamp,
                reply,
                ack,
            } => {
                let r = match timestamp {
                    Some(ts) => self.client.send_with_timestamp(now, payload, ts),
                    None => self.client.send(now, payload),
                };
                if let (Ok(id), Some(ack)) = (&r, ack) {
                    self.waiters.insert(*id, ack);
                }
                let _ = reply.send(r);
            }
            Command::Datagram { data, reply } => {
                let _ = reply.send(self.client.send_datagram(now, data));
            }
            Command::Token { token, reply } => {
                let _ = reply.send(self.client.send_token(now, token));
            }
            Command::Reconnect { reply } => {
                let _ = reply.send(self.client.reconnect(now).map_err(ClientError::from));
            }
            Command::Join { room, reply } => {
                let r = self.client.join(now, &room);
                trace!(%room, ok = r.is_ok(), "join");
                let _ = reply.send(r);
            }
            Command::Leave { room, reply } => {
                let r = self.client.leave(now, &room);
                trace!(%room, ok = r.is_ok(), "leave");
                let _ = reply.send(r);
            }
            Command::Publish {
                room,
                payload,
                reply,
            } => {
                let _ = reply.send(self.client.publish(now, &room, payload));
            }
            Command::Request {
                payload,
                timeout,
                reply,
                response,
            } => {
                let r = self.client.request(now, payload, timeout);
                if let Ok(id) = &r {
                    self.requests.insert(*id, response);
                }
                let _ = reply.send(r);
            }
            Command::CancelRequest { request, reply } => {
                let was = self.client.cancel_request(now, request);
                if let Some(w) = self.requests.remove(&request) {
                    let _ = w.send(Err(ClientError::RequestCancelled(request)));
                }
                let _ = reply.send(was);
            }
            Command::Respond {
                request,
                payload,
                reply,
            } => {
                let _ = reply.send(self.client.respond(now, request, payload));
            }
            Command::Latest {
                key,
                payload,
                reply,
            } => {
                let _ = reply.send(self.client.send_latest(now, &key, payload));
            }
            Command::Stats { reply } => {
                let _ = reply.send(ClientSnapshot {
                    stats: self.client.stats().clone(),
                    state: self.client.state().clone(),
                    session: self.client.session(),
                    rtt: self.client.rtt(),
                    rooms: self.client.rooms().map(str::to_owned).collect(),
                    pending_requests: self.client.pending_requests(),
                    queued: self.client.queued(),
                    unacknowledged: self.client.unacknowledged(),
                });
            }
            Command::Close { reply } => {
                self.stop_when_closed = true;
                match self.client.close(now) {
                    Ok(()) => self.close_replies.push(reply),
                    Err(kitestring_core::client::UsageError::Closing) => {
                        self.close_replies.push(reply)
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
        }
    }

    /// Carries out every output of the core, in order.
    async fn drain(&mut self) {
        while let Some(output) = self.client.poll_output() {
            match output {
                Output::Connect(tid) => {
                    debug!(transport = tid.0, "connecting");
                    if let Some(old) = self.live.take() {
                        self.start_close(old, CloseCode::RETRY, "superseded");
                    }
                    let fut = self.connector.clone().open();
                    self.connecting = Some((tid, Box::pin(fut)));
                }
                Output::Transmit(tid, t) => match &mut self.live {
                    Some(live) if live.tid == tid => live.out.push_back(ws::to_message(t)),
                    _ => trace!(
                        transport = tid.0,
                        "dropped a frame for a transport that is gone"
                    ),
                },
                Output::Disconnect(tid, code, reason) => {
                    debug!(transport = tid.0, %code, reason, "closing transport");
                    if matches!(&self.live, Some(l) if l.tid == tid) {
                        if let Some(live) = self.live.take() {
                            self.start_close(live, code, reason);
                        }
                    } else {
                        if matches!(&self.connecting, Some((t, _)) if *t == tid) {
                            self.connecting = None;
                        }
                        let done: Closing =
                            Box::pin(async move { (tid, Some(code), String::new()) });
                        self.closing.push(done);
                    }
                }
                Output::Event(event) => self.event(event).await,
            }
        }
    }

    async fn event(&mut self, event: Event) {
        match &event {
            Event::Connected {
                codec,
                session,
                resumed,
                ..
            } => {
                self.codec.store(codec_tag(*codec), Ordering::Relaxed);
                // Later log lines of this client carry the session id.
                tracing::Span::current()
                    .record("session", tracing::field::display(session.to_hex()));
                if *resumed {
                    debug!(?codec, "session resumed");
                } else {
                    debug!(?codec, "session opened");
                }
            }
            Event::Acked { first, last } => {
                let done: Vec<MessageId> = self
                    .waiters
                    .range(*first..=*last)
                    .map(|(id, _)| *id)
                    .collect();
                for id in done {
                    if let Some(w) = self.waiters.remove(&id) {
                        let _ = w.send(Ok(()));
                    }
                }
            }
            Event::SessionLost {
                reason,
                unconfirmed,
                unsent,
            } => {
                warn!(
                    ?reason,
                    unconfirmed = unconfirmed.len(),
                    unsent = unsent.len(),
                    "session lost"
                );
                for id in unconfirmed.iter().chain(unsent) {
                    if let Some(w) = self.waiters.remove(id) {
                        let _ = w.send(Err(ClientError::Lost {
                            id: *id,
                            reason: reason.clone(),
                        }));
                    }
                }
            }
            Event::SendFailed { id, error } => {
                if let Some(w) = self.waiters.remove(id) {
                    let _ = w.send(Err(ClientError::SendFailed {
                        id: *id,
                        error: error.clone(),
                    }));
                }
            }
            Event::Response { request, response } => {
                if let Some(w) = self.requests.remove(request) {
                    let _ = w.send(Ok(response.clone()));
                }
            }
            Event::RequestFailed { request, error } => {
                debug!(request = request.0, %error, "request failed");
                if let Some(w) = self.requests.remove(request) {
                    let _ = w.send(Err(ClientError::Request {
                        id: *request,
                        error: *error,
                    }));
                }
            }
            Event::LateResponse { request } => {
                debug!(request = request.0, "late response dropped");
            }
            Event::Refused { room, refusal } => {
                warn!(%room, op = %refusal.op, reason = %refusal.reason, "refused by the server");
            }
            Event::LatestFailed { key, error } => {
                debug!(%key, %error, "latest value not sent");
            }
            Event::TokenExpiring { within } => {
                debug!(?within, "server asks for a fresh token");
                if let Some(provider) = &self.connector.token {
                    self.token_fetch = Some(provider());
                }
            }
            Event::StateChanged { new, .. } => {
                match new {
                    State::Failed { .. } => warn!(state = ?new, "client failed"),
                    State::Closed { .. } => debug!(state = ?new, "session ended"),
                    _ => debug!(state = new.name(), "state changed"),
                }
                if matches!(new, State::Closed { .. } | State::Failed { .. }) {
                    self.fail_waiters(|id| ClientError::Lost {
                        id,
                        reason: LostReason::Closed,
                    });
                    for reply in self.close_replies.drain(..) {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            _ => {}
        }
        // The application's event stream may be gone; the session goes on.
        let _ = self.events.send(event).await;
    }

    fn fail_requests(&mut self, error: RequestError) {
        for (id, w) in std::mem::take(&mut self.requests) {
            let _ = w.send(Err(ClientError::Request { id, error }));
        }
    }

    fn fail_waiters(&mut self, error: impl Fn(MessageId) -> ClientError) {
        for (id, w) in std::mem::take(&mut self.waiters) {
            let _ = w.send(Err(error(id)));
        }
    }

    /// Writes what is queued, then a close frame, then waits (bounded) for
    /// the peer's close; reports the transport closed either way.
    fn start_close(&mut self, mut live: Live, code: CloseCode, reason: &'static str) {
        live.out.push_back(ws::close_message(code, reason));
        let runtime = self.runtime.clone();
        let limit = self.close_timeout;
        let tid = live.tid;
        self.closing.push(Box::pin(async move {
            let _ = util::timeout(&*runtime, limit, close_live(live)).await;
            (tid, Some(code), reason.to_owned())
        }));
    }

    /// The peer sent a close: flush tungstenite's reply and wait for EOF.
    fn finish_close(&mut self, live: Live) {
        let runtime = self.runtime.clone();
        let limit = self.close_timeout;
        let tid = live.tid;
        self.closing.push(Box::pin(async move {
            let _ = util::timeout(&*runtime, limit, close_live(live)).await;
            // Already reported; the core ignores a second report.
            (tid, None, String::new())
        }));
    }
}

async fn close_live(mut live: Live) {
    while let Some(m) = live.out.pop_front() {
        if live.ws.feed(m).await.is_err() {
            return;
        }
    }
    let _ = live.ws.flush().await;
    // Read until the peer's close (or EOF) so the close handshake completes.
    while let Some(Ok(_)) = live.ws.next().await {}
}

/// Moves queued frames into the socket as far as it accepts them.
fn pump_writes(live: &mut Live, cx: &mut Context<'_>) -> Result<(), WsError> {
    let mut ws = Pin::new(&mut live.ws);
    while !live.out.is_empty() {
        match ws.as_mut().poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                if let Some(m) = live.out.pop_front() {
                    ws.as_mut().start_send(m)?;
                    live.needs_flush = true;
                }
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    if live.needs_flush {
        match ws.as_mut().poll_flush(cx) {
            Poll::Ready(Ok(())) => live.needs_flush = false,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => {}
        }
    }
    Ok(())
}
