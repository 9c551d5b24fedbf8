//! The client driver: the core [`Client`] machine, shared by the handles and
//! one task that owns the WebSocket, and the handle and event stream the
//! application uses.
//!
//! The layout is quinn's: the machine and the bookkeeping the handles need
//! (acknowledgment waiters, pending requests, close replies) sit behind one
//! mutex that every [`ClientHandle`] and the driver task share. A handle
//! call locks it, runs the core's command with the current time, records
//! what it will wait for, unlocks and wakes the task; it never waits for the
//! task, except for what it asked for (an acknowledgment, a response, the end
//! of a close). The task, on each wake-up, takes the lock once: it feeds in
//! everything that is ready (several socket frames, a connection attempt
//! finishing, an old socket finishing its close, a fresh token, the core's
//! deadline), drains every output of the core into its own queues (frames
//! for the socket, events for the application, connects and closes) and
//! settles the waiters those events resolve; then it unlocks and does the IO.
//! Sockets are keyed by the core's `TransportId`: a socket whose transport
//! the core has left is closed and dropped, and any late report about it is
//! ignored by the core, so nothing from a dead connection (a frame, an
//! error, a timer) can touch a new one. There is a single deadline timer,
//! re-armed from `poll_timeout` after every step, and the clock is checked
//! before the timer is trusted.
//!
//! Bounds: nothing queues between the handles and the task. A handle call
//! runs the core directly under a short lock and never waits for room; what
//! it leaves behind is bounded by the core (its queue and send window for
//! messages, [`ClientConfig::max_pending_requests`] for requests), and the
//! waiter maps hold one entry per message or request the core accepted.
//! Events wait for the application in a queue behind the same lock, of
//! [`ClientOptions::event_buffer`] entries; while the application leaves it
//! full the task stops reading the socket (the events of at most one batch of
//! frames, and those handle calls and timers cause, go beyond it) but keeps
//! writing, and handle calls keep working, so keep consuming events.
//! Frames waiting for the socket are bounded by the core's send window plus
//! control frames; datagrams, which the core does not queue, are refused
//! while [`DATAGRAM_BACKLOG`] frames wait.

mod connector;
mod shared;
mod task;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_tungstenite::tungstenite::http::Uri;
use bytes::Bytes;
use futures_channel::oneshot;
use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, Stream};
use kitestring_core::client::{Client, ClientStats, Event, Received, State, UsageError};
use kitestring_core::config::ClientConfig;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::wire::{ClientId, Codec, Payload, SessionId};
use serde::Serialize;
use tracing::{trace, warn, Instrument};

use crate::drive::Clock;
use crate::error::{ClientError, ConnectError};
use crate::runtime::{BoxFuture, Runtime};
use crate::util;
use crate::ws::{self, ClientTls};

use self::connector::Connector;
use self::shared::{codec_tag, Inner, Shared, CODEC_MSGPACK};
use self::task::Driver;

/// Frames waiting for the socket beyond which datagrams are refused
/// ([`ClientHandle::send_datagram`], [`ServerHandle::send_datagram`](crate::ServerHandle::send_datagram)).
pub const DATAGRAM_BACKLOG: usize = 256;

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
            .field("event_buffer", &self.event_buffer)
            .finish()
    }
}

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

/// A consistent picture of a client, taken under the lock the handles and
/// the driver task share, so between two inputs ([`ClientHandle::stats`]).
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

/// A cloneable handle to a running client. Dropping every handle closes the
/// session (1000) and stops the driver task.
pub struct ClientHandle {
    shared: Arc<Shared>,
    client_id: ClientId,
}

impl Clone for ClientHandle {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::Relaxed);
        ClientHandle {
            shared: self.shared.clone(),
            client_id: self.client_id,
        }
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.driver.wake();
        }
    }
}

impl fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHandle")
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// The stream of [`Event`]s from a client. Ends when the driver stops.
///
/// Bounded by [`ClientOptions::event_buffer`]: while that many events wait,
/// the driver stops reading the socket (TCP pushes back on the server).
/// Events caused by timers and handle calls are still queued, so the queue
/// can exceed the bound by what those produce. Dropping the stream discards
/// events from then on; the session goes on.
pub struct ClientEvents {
    shared: Arc<Shared>,
}

impl fmt::Debug for ClientEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientEvents")
    }
}

impl Stream for ClientEvents {
    type Item = Event;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let shared = &self.shared;
        let mut resume = false;
        let polled = {
            let mut inner = shared.lock();
            match inner.events.pop_front() {
                Some(event) => {
                    shared.queued.store(inner.events.len(), Ordering::Relaxed);
                    if inner.reader_paused && inner.events.len() < shared.event_room {
                        inner.reader_paused = false;
                        resume = true;
                    }
                    Poll::Ready(Some(event))
                }
                None if inner.events_ended => Poll::Ready(None),
                None => {
                    match &inner.events_waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => inner.events_waker = Some(cx.waker().clone()),
                    }
                    Poll::Pending
                }
            }
        };
        if resume {
            shared.driver.wake();
        }
        polled
    }
}

impl Drop for ClientEvents {
    fn drop(&mut self) {
        let resume = {
            let mut inner = self.shared.lock();
            inner.events_dropped = true;
            inner.events.clear();
            inner.events_waker = None;
            self.shared.queued.store(0, Ordering::Relaxed);
            std::mem::take(&mut inner.reader_paused)
        };
        if resume {
            self.shared.driver.wake();
        }
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
        if self.shared.codec.load(Ordering::Relaxed) == CODEC_MSGPACK {
            Codec::MsgPack
        } else {
            Codec::Json
        }
    }

    /// Runs `f` on the machine under the lock, then wakes the driver task to
    /// carry out what the core produced (frames, events, timers). Fails
    /// with [`ClientError::Stopped`] once the driver has stopped.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Inner, kitestring_core::Instant) -> T,
    ) -> Result<T, ClientError> {
        let shared = &*self.shared;
        // Read before locking: the core ignores a time older than its own.
        let now = shared.now();
        let out = {
            let mut inner = shared.lock();
            if inner.stopped {
                return Err(ClientError::Stopped);
            }
            f(&mut inner, now)
        };
        shared.driver.wake();
        Ok(out)
    }

    /// Sends a typed value for reliable, ordered, exactly-once delivery,
    /// encoded with [`codec`](Self::codec). While reconnecting, the core
    /// queues it; a full queue returns the core's [`SendError::QueueFull`].
    ///
    /// [`SendError::QueueFull`]: kitestring_core::reliable::SendError::QueueFull
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
        Ok(self.with(|s, now| s.client.send(now, payload))??)
    }

    /// Sends a payload carrying the sender's wall-clock timestamp (ms).
    pub async fn send_with_timestamp(
        &self,
        payload: Payload,
        timestamp_ms: u64,
    ) -> Result<MessageId, ClientError> {
        Ok(self.with(|s, now| s.client.send_with_timestamp(now, payload, timestamp_ms))??)
    }

    /// Waits until a message sent now would go into the send window at
    /// once ([`Client::has_room`](kitestring_core::client::Client::has_room)),
    /// or the client has stopped. With this before each send, a sender
    /// faster than its link is paced by acknowledgments instead of filling
    /// the window and the queue (and meeting `QueueFull`).
    pub async fn ready(&self) -> Result<(), ClientError> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if inner.stopped {
                return Poll::Ready(Err(ClientError::Stopped));
            }
            let terminal = matches!(
                inner.client.state(),
                State::Closed { .. } | State::Failed { .. } | State::Closing
            );
            if terminal || inner.client.has_room() {
                return Poll::Ready(Ok(()));
            }
            if !inner.room_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                inner.room_waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }

    /// Sends a typed value once the send window has room
    /// ([`ready`](Self::ready)): the waiting counterpart of
    /// [`send`](Self::send), which returns `QueueFull` instead of waiting.
    pub async fn send_when_ready<T: Serialize + ?Sized>(
        &self,
        value: &T,
    ) -> Result<MessageId, ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.send_payload_when_ready(payload).await
    }

    /// [`send_when_ready`](Self::send_when_ready) for a ready payload.
    pub async fn send_payload_when_ready(
        &self,
        payload: Payload,
    ) -> Result<MessageId, ClientError> {
        loop {
            self.ready().await?;
            match self.with(|s, now| s.client.send(now, payload.clone()))? {
                // Another task took the room first.
                Err(SendError::QueueFull { .. }) => continue,
                r => return Ok(r?),
            }
        }
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
        let id = self.with(|s, now| {
            let r = s.client.send(now, payload);
            if let Ok(id) = &r {
                s.waiters.insert(*id, ack_tx);
            }
            r
        })??;
        match ack_rx.await {
            Ok(r) => r.map(|()| id),
            Err(_) => Err(ClientError::NotAcknowledged(id)),
        }
    }

    /// Sends an unsequenced datagram: no ack, no retry, only while open.
    ///
    /// Datagrams are not queued by the session: while
    /// [`DATAGRAM_BACKLOG`] frames already wait for the socket (a slow
    /// network), a datagram is refused with [`SendError::QueueFull`] rather
    /// than queued without bound.
    ///
    /// [`SendError::QueueFull`]: kitestring_core::reliable::SendError::QueueFull
    pub async fn send_datagram(&self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        let waiting = self.shared.unsent.load(Ordering::Relaxed);
        if waiting >= DATAGRAM_BACKLOG {
            return Err(kitestring_core::reliable::SendError::QueueFull {
                messages: waiting,
                bytes: 0,
            }
            .into());
        }
        let data = data.into();
        Ok(self.with(|s, now| s.client.send_datagram(now, data))??)
    }

    /// Sends a fresh credential on the open connection, answering
    /// [`Event::TokenExpiring`]. With a [`ClientOptions::token`] provider
    /// the driver does this by itself; this is for applications that manage
    /// tokens on their own.
    pub async fn send_token(&self, token: impl Into<String>) -> Result<(), ClientError> {
        let token = token.into();
        Ok(self.with(|s, now| s.client.send_token(now, token))??)
    }

    /// Joins a room. The server checks its policy and answers on the event
    /// stream with [`Event::Presence`] (a snapshot of the members, then
    /// diffs) or [`Event::Refused`]. Membership belongs to the session: it
    /// survives reconnects, and if the session is lost the client rejoins
    /// its rooms in the new one by itself. Returns the id of the join
    /// message.
    pub async fn join(&self, room: &str) -> Result<MessageId, ClientError> {
        let r = self.with(|s, now| s.client.join(now, room))?;
        trace!(parent: &self.shared.span, %room, ok = r.is_ok(), "join");
        Ok(r?)
    }

    /// Leaves a room.
    pub async fn leave(&self, room: &str) -> Result<MessageId, ClientError> {
        let r = self.with(|s, now| s.client.leave(now, room))?;
        trace!(parent: &self.shared.span, %room, ok = r.is_ok(), "leave");
        Ok(r?)
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
        Ok(self.with(|s, now| s.client.publish(now, room, payload))??)
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
        let id = self.with(|s, now| {
            let r = s.client.request(now, payload, timeout);
            if let Ok(id) = &r {
                s.requests.insert(*id, tx);
            }
            r
        })??;
        Ok(PendingResponse { id, rx })
    }

    /// Stops waiting for a request's response; `true` if it was pending.
    /// Its [`PendingResponse`] resolves to [`ClientError::RequestCancelled`],
    /// and a response arriving later is reported as [`Event::LateResponse`].
    pub async fn cancel_request(&self, request: MessageId) -> Result<bool, ClientError> {
        self.with(|s, now| {
            let was = s.client.cancel_request(now, request);
            if let Some(w) = s.requests.remove(&request) {
                let _ = w.send(Err(ClientError::RequestCancelled(request)));
            }
            was
        })
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
        Ok(self.with(|s, now| s.client.respond(now, request, payload))??)
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
        Ok(self.with(|s, now| s.client.send_latest(now, key, payload))??)
    }

    /// A snapshot of the client's counters, state, round-trip time, rooms
    /// and buffers, read under the lock the driver task shares.
    pub async fn stats(&self) -> Result<ClientSnapshot, ClientError> {
        let s = self.shared.lock();
        if s.stopped {
            return Err(ClientError::Stopped);
        }
        let c = &s.client;
        Ok(ClientSnapshot {
            stats: c.stats().clone(),
            state: c.state().clone(),
            session: c.session(),
            rtt: c.rtt(),
            rooms: c.rooms().map(str::to_owned).collect(),
            pending_requests: c.pending_requests(),
            queued: c.queued(),
            unacknowledged: c.unacknowledged(),
        })
    }

    /// Connects again now (skipping a backoff delay, or leaving `Failed`).
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        Ok(self.with(|s, now| s.client.reconnect(now))??)
    }

    /// Closes the session with 1000 and stops the driver; resolves once the
    /// close has completed (or timed out).
    pub async fn close(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        self.with(|s, now| {
            s.stop_when_closed = true;
            match s.client.close(now) {
                Ok(()) | Err(UsageError::Closing) => s.close_replies.push(tx),
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                }
            }
        })?;
        rx.await.map_err(|_| ClientError::Stopped)?
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
    // Parsed once: every connection attempt builds its request from it.
    let uri: Uri = target
        .url
        .parse()
        .map_err(|e| ConnectError::InvalidUrl(format!("{url}: {e}")))?;
    options.config.can_refresh_token = options.token.is_some();
    let client_id = ClientId(util::random16().map_err(|e| ConnectError::Random(e.to_string()))?);
    let mut client = Client::new(options.config.clone(), client_id, util::random_seed())?;
    let preferred = options
        .config
        .codecs
        .first()
        .copied()
        .unwrap_or(Codec::Json);
    let ws_config = ws::websocket_config(options.config.max_message_size);
    let span = tracing::info_span!(
        "kitestring_client",
        client = %client_id.to_hex(),
        url = %target.url,
        session = tracing::field::Empty,
    );
    let clock = Clock::new(&*runtime);
    // Before any handle exists, so that no call (a close, say) comes first.
    if let Err(e) = client.connect(clock.now(&*runtime)) {
        span.in_scope(|| warn!(error = %e, "connect refused by the core"));
    }
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            client,
            waiters: BTreeMap::new(),
            requests: BTreeMap::new(),
            close_replies: Vec::new(),
            stop_when_closed: false,
            stopped: false,
            events: VecDeque::new(),
            events_waker: None,
            events_dropped: false,
            events_ended: false,
            reader_paused: false,
            room_waiters: Vec::new(),
        }),
        driver: AtomicWaker::new(),
        handles: AtomicUsize::new(1),
        runtime: runtime.clone(),
        clock,
        codec: AtomicU8::new(codec_tag(preferred)),
        unsent: AtomicUsize::new(0),
        span: span.clone(),
        event_room: options.event_buffer.max(1),
        queued: AtomicUsize::new(0),
    });
    let connector = Connector {
        runtime: runtime.clone(),
        target,
        uri,
        tls: options.tls.clone(),
        token: options.token.clone(),
        token_header: options.token_header.clone(),
        token_prefix: options.token_prefix.clone(),
        ws_config,
    };
    let driver = Driver::new(
        shared.clone(),
        runtime.clone(),
        connector,
        options.close_timeout,
    );
    runtime.spawn(Box::pin(driver.run().instrument(span)));
    Ok((
        ClientHandle {
            shared: shared.clone(),
            client_id,
        },
        ClientEvents { shared },
    ))
}
