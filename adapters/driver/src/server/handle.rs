//! What the application holds: [`ServerHandle`], whose calls run the core
//! directly under the state's short lock and return its answer, and the
//! [`ServerEvents`] stream (in `events.rs`).
//!
//! A handle call never waits for a task or for the application (only
//! [`ServerHandle::ready`], the sends that wait for it, and
//! [`ServerHandle::shutdown`] wait, for what they were asked), and never
//! touches a socket.

use std::fmt;
use std::net::SocketAddr;

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_tungstenite::WebSocketStream;
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_io::{AsyncRead, AsyncWrite};

use kitestring_core::close::CloseCode;
use kitestring_core::hlc::HlcTimestamp;
use kitestring_core::reliable::{MessageId, SendError};
use kitestring_core::rooms::{Member, RoomPolicy};
#[cfg(doc)]
use kitestring_core::server::ServerEvent;
use kitestring_core::server::{ConnectionId, MapError, MapOptions, ServerMetrics, SessionInfo};
use kitestring_core::wire::{Codec, Payload, SessionId};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{room_label, ServerError};
use crate::runtime::BoxIo;
use crate::util;

use super::cluster::{SentTo, SessionLocation};
use super::conn::connection;
use super::shared::{lock_slot, ServerShared};
use super::upgrade::serve_accepted;

/// A cloneable handle to a running server. Every call runs the core machine
/// directly, under a short lock, and returns without waiting for any task.
/// Dropping every handle shuts the server down as
/// [`ServerHandle::shutdown`] does.
#[derive(Clone)]
pub struct ServerHandle {
    pub(super) shared: Arc<ServerShared>,
    /// Held by every handle: the server task sees when the last one goes.
    pub(super) _alive: mpsc::Sender<()>,
    pub(super) local_addr: Option<SocketAddr>,
    pub(super) codec: Codec,
}

impl fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl ServerHandle {
    /// The bound address, for servers started with [`bind`].
    ///
    /// [`bind`]: super::bind
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// The codec typed values for `session` are encoded with: the one its
    /// latest connection negotiated (kept while it is detached), or the
    /// server's preferred codec for a session not seen yet.
    pub fn codec_for(&self, session: SessionId) -> Codec {
        self.shared
            .lock()
            .server
            .last_codec(session)
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
    ///
    /// Never waits for the client or the network. It may wait a few
    /// microseconds for another task that holds the server's state: the
    /// send is then handed to that task, which runs it before letting go
    /// of the state, and this future completes with its answer. Dropping
    /// the future after its first poll does not take the send back: it may
    /// already be queued, and is then delivered as any other.
    pub async fn send_payload(
        &self,
        session: SessionId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        self.shared
            .send(session, payload)
            .await?
            .map_err(|error| ServerError::Send { session, error })
    }

    /// [`send`](Self::send) without awaiting, for an inline event handler
    /// ([`ServerEvents::handle_inline`]) or other code that cannot await.
    /// It takes the server's state at once, waiting for it (microseconds)
    /// if another thread holds it.
    ///
    /// [`ServerEvents::handle_inline`]: super::ServerEvents::handle_inline
    pub fn send_now<T: Serialize + ?Sized>(
        &self,
        session: SessionId,
        value: &T,
    ) -> Result<MessageId, ServerError> {
        let payload = util::encode(value, self.codec_for(session))?;
        self.send_payload_now(session, payload)
    }

    /// [`send_payload`](Self::send_payload) without awaiting: see
    /// [`send_now`](Self::send_now). Called from an inline handler on a
    /// connection's task, the frame goes out in that task's next write.
    pub fn send_payload_now(
        &self,
        session: SessionId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        self.shared
            .call(|st, now| st.server.send(now, session, payload))?
            .map_err(|error| ServerError::Send { session, error })
    }

    /// Waits until a message sent to `session` now would go into its send
    /// window at once ([`Server::has_room`]). With this before each send, an
    /// application feeding a client faster than its link is paced by the
    /// client's acknowledgments instead of filling the session's buffers.
    ///
    /// # Errors
    ///
    /// [`ServerError::Send`] with `SendError::UnknownSession` once the
    /// session is gone; [`ServerError::Stopped`].
    ///
    /// [`Server::has_room`]: kitestring_core::server::Server::has_room
    pub async fn ready(&self, session: SessionId) -> Result<(), ServerError> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if st.stopped {
                return Poll::Ready(Err(ServerError::Stopped));
            }
            match st.server.has_room(session) {
                None => Poll::Ready(Err(ServerError::Send {
                    session,
                    error: SendError::UnknownSession,
                })),
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
                r => return r.map_err(|error| ServerError::Send { session, error }),
            }
        }
    }

    /// Sends an unsequenced datagram to a session's client, if connected.
    /// Refused with `SendError::QueueFull` while
    /// [`DATAGRAM_BACKLOG`](crate::client::DATAGRAM_BACKLOG) frames (or half
    /// [`ServerOptions::outbound_queue`], if less) already wait for that
    /// connection's socket: datagrams are not queued without
    /// bound, and never make a connection a slow consumer.
    ///
    /// [`ServerOptions::outbound_queue`]: super::ServerOptions::outbound_queue
    pub async fn send_datagram(
        &self,
        session: SessionId,
        data: impl Into<Bytes>,
    ) -> Result<(), ServerError> {
        let data = data.into();
        // Half the frame queue at most, so datagrams alone never make a
        // connection a slow consumer.
        let limit = crate::client::DATAGRAM_BACKLOG.min(self.shared.outbound / 2);
        self.shared
            .call(|st, now| {
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
            })?
            .map_err(|error| ServerError::Send { session, error })
    }

    /// The application handled `session`'s messages up to `through` (the
    /// [`Received::seq`](kitestring_core::server::Received::seq) of the
    /// last one). With [`Acknowledge::AfterHandled`] in the server's
    /// configuration, only this lets the client's messages be
    /// acknowledged, so a server process that dies before the application
    /// handled a message leaves it unacknowledged and the client sends it
    /// again; with the default it does nothing. Cumulative.
    ///
    /// [`Acknowledge::AfterHandled`]: kitestring_core::config::Acknowledge::AfterHandled
    pub async fn handled(&self, session: SessionId, through: u64) -> Result<(), ServerError> {
        self.handled_now(session, through)
    }

    /// [`handled`](Self::handled) without awaiting, for an inline event
    /// handler ([`ServerEvents::handle_inline`]) that acknowledges what it
    /// handled.
    ///
    /// [`ServerEvents::handle_inline`]: super::ServerEvents::handle_inline
    pub fn handled_now(&self, session: SessionId, through: u64) -> Result<(), ServerError> {
        self.shared
            .call(|st, now| st.server.handled(now, session, through))?
            .map_err(|error| ServerError::Send { session, error })
    }

    /// Where `session` is: on this server, on another node of the cluster
    /// (with a [backplane](super::ServerOptions::backplane)), or `None`
    /// if no node has it. Without a backplane the node is `"local"`.
    pub async fn locate(&self, session: SessionId) -> Result<Option<SessionLocation>, ServerError> {
        let here = self
            .shared
            .call(|st, _| st.server.session(session).is_some())?;
        let node = self.node_name();
        if here {
            return Ok(Some(SessionLocation {
                session,
                node,
                alive: true,
            }));
        }
        match &self.shared.cluster {
            Some(cluster) => cluster
                .locate(session)
                .await
                .map_err(|e| ServerError::Cluster {
                    reason: format!("locating session {}: {e}", session.to_hex()),
                }),
            None => Ok(None),
        }
    }

    /// Every session of `identity` (as authentication named it), on this
    /// server and, with a backplane, on every node, each with where it is.
    pub async fn sessions_of(&self, identity: &str) -> Result<Vec<SessionLocation>, ServerError> {
        let node = self.node_name();
        let local: Vec<SessionLocation> = self.shared.call(|st, _| {
            st.server
                .session_ids()
                .into_iter()
                .filter(|&s| {
                    st.server
                        .session(s)
                        .is_some_and(|i| i.identity.as_deref() == Some(identity))
                })
                .map(|session| SessionLocation {
                    session,
                    node: node.clone(),
                    alive: true,
                })
                .collect()
        })?;
        let Some(cluster) = &self.shared.cluster else {
            return Ok(local);
        };
        let mut all = cluster
            .sessions_of(identity)
            .await
            .map_err(|e| ServerError::Cluster {
                reason: format!("looking up identity {identity:?}: {e}"),
            })?;
        for l in local {
            if !all.iter().any(|a| a.session == l.session) {
                all.push(l);
            }
        }
        Ok(all)
    }

    /// Sends `value` to `session` wherever it is: queued here if this
    /// server holds it, else by the node that does (with a backplane),
    /// which answers with the id it gave the message. That node's
    /// application hears the message's fate (`Acked`, or its id among a
    /// `SessionEnded`'s unconfirmed). A session that moves meanwhile is
    /// looked up once more.
    pub async fn send_to<T: Serialize + ?Sized>(
        &self,
        session: SessionId,
        value: &T,
    ) -> Result<SentTo, ServerError> {
        let payload = util::encode(value, self.codec_for(session))?;
        self.send_payload_to(session, payload).await
    }

    /// [`send_to`](Self::send_to) with a payload already encoded.
    pub async fn send_payload_to(
        &self,
        session: SessionId,
        payload: Payload,
    ) -> Result<SentTo, ServerError> {
        for _ in 0..2 {
            let sent = self.shared.call(|st, now| {
                if st.server.session(session).is_some() {
                    Some(st.server.send(now, session, payload.clone()))
                } else {
                    None
                }
            })?;
            if let Some(sent) = sent {
                return sent
                    .map(|id| SentTo {
                        node: self.node_name(),
                        id,
                    })
                    .map_err(|error| ServerError::Send { session, error });
            }
            let Some(cluster) = &self.shared.cluster else {
                break;
            };
            let Some(location) = self.locate(session).await? else {
                break;
            };
            if location.node == self.node_name() {
                continue; // it arrived here meanwhile
            }
            match cluster
                .deliver_remote(&self.shared, &location.node, session, &payload)
                .await
            {
                Ok(id) => {
                    return Ok(SentTo {
                        node: location.node,
                        id: MessageId(id),
                    })
                }
                Err(e) if e == SendError::UnknownSession.to_string() => continue,
                Err(reason) => {
                    return Err(ServerError::Cluster {
                        reason: format!(
                            "sending to session {} on node {}: {reason}",
                            session.to_hex(),
                            location.node
                        ),
                    })
                }
            }
        }
        Err(ServerError::Send {
            session,
            error: SendError::UnknownSession,
        })
    }

    /// This node's name in its cluster, or `"local"`.
    fn node_name(&self) -> String {
        self.shared
            .options
            .backplane
            .as_ref()
            .map_or_else(|| "local".to_owned(), |b| b.node().to_owned())
    }

    /// Ends a session now (its client gets 1000 and stops).
    pub async fn close_session(&self, session: SessionId) -> Result<(), ServerError> {
        self.shared
            .call(|st, now| st.server.close_session(now, session))?
            .map_err(|error| ServerError::Send { session, error })
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
    ///
    /// [`ServerOptions::reauth`]: super::ServerOptions::reauth
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
        self.respond_now(session, request, value)
    }

    /// [`respond`](Self::respond) with a ready payload.
    pub async fn respond_payload(
        &self,
        session: SessionId,
        request: MessageId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        self.respond_payload_now(session, request, payload)
    }

    /// [`respond`](Self::respond) without awaiting, for an inline event
    /// handler ([`ServerEvents::handle_inline`]): see
    /// [`send_now`](Self::send_now).
    ///
    /// [`ServerEvents::handle_inline`]: super::ServerEvents::handle_inline
    pub fn respond_now<T: Serialize + ?Sized>(
        &self,
        session: SessionId,
        request: MessageId,
        value: &T,
    ) -> Result<MessageId, ServerError> {
        let payload = util::encode(value, self.codec_for(session))?;
        self.respond_payload_now(session, request, payload)
    }

    /// [`respond_payload`](Self::respond_payload) without awaiting.
    pub fn respond_payload_now(
        &self,
        session: SessionId,
        request: MessageId,
        payload: Payload,
    ) -> Result<MessageId, ServerError> {
        self.shared
            .call(|st, now| st.server.respond(now, session, request, payload))?
            .map_err(|error| ServerError::Send { session, error })
    }

    /// Puts a session in a room (the application decided: the room policy
    /// is not consulted). The other members get a presence diff and the
    /// session gets the member list; [`ServerEvent::Joined`] follows.
    /// Joining a room the session is already in only resends the list.
    ///
    /// In a cluster ([`ServerOptions::backplane`](crate::ServerOptions::backplane))
    /// the room is the cluster's: this returns once the backplane took the
    /// join (the room's size checked cluster-wide), and fails with
    /// [`RoomError::Unavailable`](kitestring_core::server::RoomError::Unavailable)
    /// if it could not.
    pub async fn join(&self, session: SessionId, room: &str) -> Result<(), ServerError> {
        let error = |error| ServerError::Room {
            session,
            room: room_label(room),
            error,
        };
        let Some(cluster) = &self.shared.cluster else {
            return self
                .shared
                .call(|st, now| st.server.join(now, session, room))?
                .map_err(error);
        };
        let (tx, rx) = oneshot::channel();
        self.shared
            .call(|st, now| {
                // Registered before the output it waits for is drained.
                cluster.rooms.expect_join(tx);
                let r = st.server.join(now, session, room);
                if r.is_err() {
                    cluster.rooms.cancel_join();
                }
                r
            })?
            .map_err(error)?;
        let limit = self.shared.options.handshake_timeout;
        match util::timeout(&*self.shared.runtime, limit, rx).await {
            Some(Ok(r)) => r.map_err(error),
            Some(Err(_)) => Err(ServerError::Stopped),
            None => Err(error(kitestring_core::server::RoomError::Unavailable(
                format!(
                "not confirmed within {limit:?}: the backplane does not answer; the join stays \
                 queued and takes effect when it does"
            ),
            ))),
        }
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
    ///
    /// In a cluster the broadcast goes to the backplane, which numbers it
    /// in the room's stream and hands it to every node with members (this
    /// one too): this returns once the backplane took it, with the room's
    /// member count cluster-wide. It fails with [`ServerError::Cluster`]
    /// when the backplane is known to be unreachable (nothing was sent to
    /// anyone), or when it does not answer within the handshake timeout:
    /// then the broadcast stays queued and reaches every member once, when
    /// the backplane answers again. Broadcasts from one caller reach every
    /// member in the order they were made.
    pub async fn broadcast_payload(
        &self,
        room: &str,
        payload: Payload,
        exclude: Option<SessionId>,
    ) -> Result<usize, ServerError> {
        let error = |error| ServerError::Broadcast {
            room: room_label(room),
            error,
        };
        let Some(cluster) = &self.shared.cluster else {
            return self
                .shared
                .call(|st, now| st.server.broadcast(now, room, payload, exclude))?
                .map_err(error);
        };
        let (tx, rx) = oneshot::channel();
        self.shared
            .call(|st, now| {
                cluster.rooms.expect_publish(tx);
                let r = st.server.broadcast(now, room, payload, exclude);
                if r.is_err() {
                    cluster.rooms.cancel_publish();
                }
                r
            })?
            .map_err(error)?;
        let limit = self.shared.options.handshake_timeout;
        match util::timeout(&*self.shared.runtime, limit, rx).await {
            Some(Ok(Ok(members))) => Ok(members.saturating_sub(usize::from(exclude.is_some()))),
            Some(Ok(Err(reason))) => Err(ServerError::Cluster {
                reason: format!("broadcast to room `{}`: {reason}", room_label(room)),
            }),
            Some(Err(_)) => Err(ServerError::Stopped),
            None => Err(ServerError::Cluster {
                reason: format!(
                    "broadcast to room `{}` not confirmed within {limit:?}: the backplane does not \
                     answer; it stays queued and is delivered once when it does",
                    room_label(room)
                ),
            }),
        }
    }

    /// Sets `room`'s latest value of `key` to a typed value and sends it to
    /// every member (PROTOCOL.md, section 3.5): each member gets the newest
    /// value of each key, not a backlog. A member whose connection is not
    /// writable when a newer value comes gets only the newer one; one that
    /// is away gets every key's newest value when it comes back, and so
    /// does one that joins. Members whose clients do not take latest
    /// values get each as a room message. Returns how many members it
    /// went to (0 for a room without members, which keeps nothing).
    ///
    /// A room holds at most `ServerConfig::max_latest_keys` keys (256);
    /// past that a new key is refused with `SendError::TooManyKeys`. The
    /// servers of a cluster do not share latest values yet: with a
    /// backplane this fails with `SendError::Unsupported`.
    pub async fn broadcast_latest<T: Serialize + ?Sized>(
        &self,
        room: &str,
        key: &str,
        value: &T,
    ) -> Result<usize, ServerError> {
        let payload = util::encode(value, self.codec)?;
        self.broadcast_latest_payload(room, key, payload).await
    }

    /// [`broadcast_latest`](Self::broadcast_latest) with a ready payload.
    pub async fn broadcast_latest_payload(
        &self,
        room: &str,
        key: &str,
        payload: Payload,
    ) -> Result<usize, ServerError> {
        self.shared
            .call(|st, now| st.server.broadcast_latest(now, room, key, payload))?
            .map_err(|error| ServerError::Broadcast {
                room: room_label(room),
                error,
            })
    }

    /// The latest values `room` holds, oldest first, as
    /// [`broadcast_latest`](Self::broadcast_latest) set them.
    pub async fn latest_values(
        &self,
        room: &str,
    ) -> Result<Vec<(std::sync::Arc<str>, Payload)>, ServerError> {
        self.shared.call(|st, _| st.server.latest_values(room))
    }

    /// Opens the synced map `map` of `room` (or changes who writes and who
    /// stamps an open one; its bounds and entries stay): members of the
    /// room, now and later, get its entries and every change, and write to
    /// it as `options` and the room policy
    /// ([`RoomPolicy::authorize_map_write`](crate::RoomPolicy::authorize_map_write))
    /// allow (PROTOCOL.md, section 3.6). Maps are the application's state:
    /// they stay open, with their entries, until [`close_map`](Self::close_map),
    /// whether or not the room has members. In a cluster, open the map on
    /// every node (as the application's start-up does): each keeps a copy,
    /// reads what the cluster has, and shares every change (last writer
    /// wins by stamp, so the copies converge).
    pub async fn open_map(
        &self,
        room: &str,
        map: &str,
        options: MapOptions,
    ) -> Result<(), ServerError> {
        self.shared
            .call(|st, now| st.server.open_map(now, room, map, options))?
            .map_err(|error| map_error(room, map, error))?;
        if let Some(cluster) = &self.shared.cluster {
            // What the cluster has of it comes in as the other nodes'
            // changes do.
            cluster.maps.load(room, map);
        }
        Ok(())
    }

    /// Closes `room`'s map `map`: its entries are dropped and members see
    /// it empty. `false` if it was not open.
    pub async fn close_map(&self, room: &str, map: &str) -> Result<bool, ServerError> {
        self.shared
            .call(|st, now| st.server.close_map(now, room, map))
    }

    /// Sets `key` of `room`'s map `map` to a typed value, stamped by the
    /// server now, and sends the change to the members (and the
    /// application's [`ServerEvent::MapChanged`]). Returns the stamp.
    pub async fn map_set<T: Serialize + ?Sized>(
        &self,
        room: &str,
        map: &str,
        key: &str,
        value: &T,
    ) -> Result<HlcTimestamp, ServerError> {
        let payload = util::encode(value, self.codec)?;
        self.map_set_payload(room, map, key, payload).await
    }

    /// [`map_set`](Self::map_set) with a ready payload (JSON or
    /// MessagePack).
    pub async fn map_set_payload(
        &self,
        room: &str,
        map: &str,
        key: &str,
        value: Payload,
    ) -> Result<HlcTimestamp, ServerError> {
        self.shared
            .call(|st, now| st.server.map_set(now, room, map, key, value))?
            .map_err(|error| map_error(room, map, error))
    }

    /// Deletes `key` of `room`'s map `map`, stamped by the server now.
    pub async fn map_delete(
        &self,
        room: &str,
        map: &str,
        key: &str,
    ) -> Result<HlcTimestamp, ServerError> {
        self.shared
            .call(|st, now| st.server.map_delete(now, room, map, key))?
            .map_err(|error| map_error(room, map, error))
    }

    /// The value of `key` in `room`'s map `map`, decoded; `None` if it
    /// holds none (or the map is not open).
    pub async fn map_get<T: DeserializeOwned>(
        &self,
        room: &str,
        map: &str,
        key: &str,
    ) -> Result<Option<T>, ServerError> {
        let value = self
            .shared
            .call(|st, _| st.server.map_get(room, map, key))?;
        Ok(value.map(|p| util::decode(&p)).transpose()?)
    }

    /// Every entry of `room`'s map `map`, in key order; `None` if it is
    /// not open.
    pub async fn map_entries(
        &self,
        room: &str,
        map: &str,
    ) -> Result<Option<Vec<(std::sync::Arc<str>, Payload)>>, ServerError> {
        self.shared.call(|st, _| st.server.map_entries(room, map))
    }

    /// Who is in `room`, as members see each other (client id and identity,
    /// sorted; never session ids). In a cluster, every node's members, as
    /// the backplane records them.
    pub async fn members(&self, room: &str) -> Result<Vec<Member>, ServerError> {
        let Some(cluster) = &self.shared.cluster else {
            return self.shared.call(|st, _| st.server.members(room));
        };
        let mut members: Vec<Member> = self
            .cluster_members(cluster, room)
            .await?
            .iter()
            .filter_map(|m| serde_json::from_slice(&m.member).ok())
            .collect();
        members.sort();
        Ok(members)
    }

    async fn cluster_members(
        &self,
        cluster: &super::cluster::Cluster,
        room: &str,
    ) -> Result<Vec<crate::backplane::RoomMember>, ServerError> {
        cluster
            .backplane
            .room_members(room.to_owned())
            .await
            .map_err(|e| ServerError::Cluster {
                reason: format!("members of room `{}`: {e}", room_label(room)),
            })
    }

    /// The sessions in `room` (for the application's own bookkeeping; do
    /// not show session ids to other clients, they are resume secrets).
    /// In a cluster, every node's.
    pub async fn member_sessions(&self, room: &str) -> Result<Vec<SessionId>, ServerError> {
        let Some(cluster) = &self.shared.cluster else {
            return self.shared.call(|st, _| st.server.member_sessions(room));
        };
        let mut sessions: Vec<SessionId> = self
            .cluster_members(cluster, room)
            .await?
            .iter()
            .filter_map(|m| SessionId::from_hex(&m.session))
            .collect();
        sessions.sort_by_key(|s| s.0);
        Ok(sessions)
    }

    /// How many members `room` has (0 for a room that does not exist). In
    /// a cluster, on every node.
    pub async fn room_size(&self, room: &str) -> Result<usize, ServerError> {
        match &self.shared.cluster {
            None => self.shared.call(|st, _| st.server.room_size(room)),
            Some(cluster) => Ok(self.cluster_members(cluster, room).await?.len()),
        }
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
        let shared = &self.shared;
        shared.call(|st, _| st.metrics(shared))
    }

    /// Replaces the policy that authorizes clients' joins and publishes
    /// (default: everyone may do anything; see also
    /// [`ServerOptions::policy`]). The application's own
    /// [`join`](Self::join) and [`broadcast`](Self::broadcast) are never
    /// checked. The policy runs under the server's lock: it must not call
    /// back into this server.
    ///
    /// [`ServerOptions::policy`]: super::ServerOptions::policy
    pub async fn set_policy(&self, policy: Box<dyn RoomPolicy>) -> Result<(), ServerError> {
        self.shared.call(|st, _| st.server.set_policy(policy))
    }

    /// Stops accepting, sends every connection a `goaway` and closes it with
    /// 1001, waits (bounded by the close timeout) for the sockets to close,
    /// and stops the server task. Sessions are detached, not ended (rooms
    /// see no one leave).
    ///
    /// Without a backplane they live in this process's memory and end with
    /// it: a restarted server does not know them, so clients resume into
    /// new sessions and rejoin their rooms by themselves. With one
    /// ([`ServerOptions::backplane`](super::ServerOptions::backplane)),
    /// every session is handed over: its image is stored for the node its
    /// client reconnects to, which resumes it with nothing lost or
    /// duplicated (`SessionMoved` reports each here).
    pub async fn shutdown(&self) -> Result<(), ServerError> {
        let (tx, rx) = oneshot::channel();
        let shared = &self.shared;
        shared.call(|st, now| st.begin_shutdown(shared, now, Some(tx)))?;
        shared.wake_task();
        if let Some(cluster) = &shared.cluster {
            cluster.hand_over_all(shared).await;
        }
        // The node's liveness key is left to expire (one node timeout):
        // until then the others do not take the handed-over sessions'
        // memberships for a crashed node's, while their clients resume.
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
        self.shared.runtime.spawn(serve_accepted(shared, io, None));
    }
}

fn map_error(room: &str, map: &str, error: MapError) -> ServerError {
    ServerError::Map {
        room: room_label(room),
        map: room_label(map),
        error,
    }
}
