//! What the application holds: [`ClientHandle`], whose calls run the core
//! directly under the shared lock and then wake the driver task, and the
//! [`ClientEvents`] stream, which takes events from the queue beside the
//! machine.
//!
//! A handle call never waits for the driver task except for what it asked
//! for (an acknowledgment, a response, room in the send window, the end of a
//! close), and never touches a socket.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_channel::oneshot;
use futures_util::{FutureExt, Stream};
use kitestring_core::client::{ClientStats, Event, Received, State, UsageError};
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::wire::{ClientId, Codec, Payload, SessionId};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::trace;

use crate::error::{room_label, ClientError};
use crate::util;

use super::shared::{ClientShared, Inner, CODEC_MSGPACK};
use super::DATAGRAM_BACKLOG;

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
    pub(super) shared: Arc<ClientShared>,
    pub(super) client_id: ClientId,
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
///
/// [`ClientOptions::event_buffer`]: super::ClientOptions::event_buffer
pub struct ClientEvents {
    pub(super) shared: Arc<ClientShared>,
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
                    if let Event::Latest { .. } = event {
                        inner.latest_queued -= 1;
                    }
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
            inner.latest_queued = 0;
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

    /// What carries the current connection: a WebSocket, or the HTTP
    /// fallback when upgrades are blocked on the way; `None` between
    /// connections. As of the driver's last step.
    pub fn transport(&self) -> Option<super::TransportKind> {
        match self.shared.transport.load(Ordering::Relaxed) {
            1 => Some(super::TransportKind::WebSocket),
            2 => Some(super::TransportKind::Http),
            _ => None,
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
    ///
    /// [`ClientOptions::token`]: super::ClientOptions::token
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
        r.map_err(|error| room_error(room, error))
    }

    /// Leaves a room.
    pub async fn leave(&self, room: &str) -> Result<MessageId, ClientError> {
        let r = self.with(|s, now| s.client.leave(now, room))?;
        trace!(parent: &self.shared.span, %room, ok = r.is_ok(), "leave");
        r.map_err(|error| room_error(room, error))
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
        self.with(|s, now| s.client.publish(now, room, payload))?
            .map_err(|error| room_error(room, error))
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
    ///
    /// [`ClientConfig::coalesce_interval`]: kitestring_core::config::ClientConfig::coalesce_interval
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

    /// Sets `key` of `room`'s synced map `map` to a typed value (PROTOCOL.md,
    /// section 3.6). It reads back at once ([`map_get`](Self::map_get)),
    /// goes to the server as a message of the session (queued while
    /// offline, resent after a drop, taken once), and the server's answer
    /// settles it: every member, this one too, ends up with the write that
    /// wins. A refusal comes as [`Event::Refused`] naming the returned id,
    /// and the key reads as the server has it again. Changes of what the
    /// map reads as come as [`Event::MapChanged`].
    ///
    /// Fails at once with [`ClientError::Room`] for a room this client has
    /// not joined (`SendError::NotMember`) or a bad name or key.
    pub async fn map_set<T: Serialize + ?Sized>(
        &self,
        room: &str,
        map: &str,
        key: &str,
        value: &T,
    ) -> Result<MessageId, ClientError> {
        let payload = util::encode(value, self.codec())?;
        self.map_set_payload(room, map, key, payload).await
    }

    /// [`map_set`](Self::map_set) with a ready payload (JSON or MessagePack).
    pub async fn map_set_payload(
        &self,
        room: &str,
        map: &str,
        key: &str,
        value: Payload,
    ) -> Result<MessageId, ClientError> {
        self.with(|s, now| s.client.map_set(now, room, map, key, value))?
            .map_err(|error| room_error(room, error))
    }

    /// Deletes `key` of `room`'s synced map `map`, as
    /// [`map_set`](Self::map_set) writes.
    pub async fn map_delete(
        &self,
        room: &str,
        map: &str,
        key: &str,
    ) -> Result<MessageId, ClientError> {
        self.with(|s, now| s.client.map_delete(now, room, map, key))?
            .map_err(|error| room_error(room, error))
    }

    /// What `key` of `room`'s synced map `map` reads as, decoded: this
    /// client's newest unsettled write of it, else what the server
    /// confirmed. `None` if it holds nothing.
    pub async fn map_get<T: DeserializeOwned>(
        &self,
        room: &str,
        map: &str,
        key: &str,
    ) -> Result<Option<T>, ClientError> {
        let value = self.with(|s, _| s.client.map_get(room, map, key).cloned())?;
        Ok(value.map(|p| util::decode(&p)).transpose()?)
    }

    /// Every entry of `room`'s synced map `map` as it reads now, in key
    /// order.
    pub async fn map_entries(
        &self,
        room: &str,
        map: &str,
    ) -> Result<Vec<(std::sync::Arc<str>, Payload)>, ClientError> {
        self.with(|s, _| s.client.map_entries(room, map))
    }

    /// Whether `room`'s synced map `map` arrived whole on the current
    /// session ([`Event::MapSynced`]); until then it may be out of date.
    pub async fn map_synced(&self, room: &str, map: &str) -> Result<bool, ClientError> {
        self.with(|s, _| s.client.map_synced(room, map))
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

/// A refused room operation, naming the room.
fn room_error(room: &str, error: SendError) -> ClientError {
    ClientError::Room {
        room: room_label(room),
        error,
    }
}
