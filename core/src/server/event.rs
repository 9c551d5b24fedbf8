//! What the server application sees: the outputs the driver drains
//! ([`ServerOutput`]), the events they carry ([`ServerEvent`], with
//! [`SessionEnd`], [`RoomOp`] and [`RoomError`]), the read-only views and
//! counters ([`SessionInfo`], [`ServerMetrics`], [`ServerStats`]) and the
//! timers ([`ServerTimer`], [`ServerDeadline`]).
//!
//! Plain data, re-exported by the server module: nothing here holds or
//! changes the machine's state; the other files fill these in.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::close::CloseCode;
use crate::link::{DeliveryStats, Received, TrafficStats};
use crate::ratelimit::Limit;
use crate::reliable::MessageId;
use crate::stream::RoomEntry;
use crate::time::Instant;
use crate::wire::{ClientId, Codec, DecodeError, Payload, SessionId, Transmit};

use super::{ClusterOutput, ConnectionId, LatestOut, SessionState};

// Named only in links in the docs.
#[cfg(doc)]
use super::{Server, RATE_REPORT_INTERVAL};
#[cfg(doc)]
use crate::{ratelimit::RateLimitPolicy, reliable::OverflowPolicy};

/// What the driver must do next. Drain with [`Server::poll_output`].
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub enum ServerOutput {
    /// Write this message on the connection.
    Transmit(ConnectionId, Transmit),
    /// Close the connection with this code after writing what was queued
    /// before, and forget it. The machine has already forgotten it.
    Disconnect(ConnectionId, CloseCode, &'static str),
    /// Tell the application.
    Event(ServerEvent),
    /// Room feeds: only when the driver turned them on with
    /// [`Server::set_room_feeds`].
    Feed(FeedOutput),
    /// Shared rooms: only when the driver turned them on with
    /// [`Server::set_shared_rooms`].
    Cluster(ClusterOutput),
    /// Write this latest value on the connection, unless a newer one of
    /// the same room and key comes before it is written: only when the
    /// driver turned them on with [`Server::set_latest_slots`] (otherwise
    /// they come as [`ServerOutput::Transmit`]).
    Latest(ConnectionId, LatestOut),
    /// Shared rooms: an entry of a synced map changed here (a write of
    /// the application or of a member); the cluster keeps it if its stamp
    /// beats the one it has, and hands it to the other servers
    /// ([`Server::map_merge`]). Only with [`Server::set_shared_rooms`].
    Map(MapUpdate),
}

/// An entry of a synced map as servers exchange it: the last-writer-wins
/// update, with where it belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUpdate {
    /// The room.
    pub room: Arc<str>,
    /// The map.
    pub map: Arc<str>,
    /// The entry's key.
    pub key: Arc<str>,
    /// The write's stamp: of two updates of a key, the greater wins.
    pub stamp: crate::hlc::HlcTimestamp,
    /// The value; `None`: deleted.
    pub value: Option<Payload>,
}

/// What a driver that serves stream members from shared room feeds must do
/// ([`Server::set_room_feeds`]).
///
/// A feed mirrors a room stream's history: the entries the history holds,
/// kept once for every connection that follows the room. The driver trims
/// it as the history is trimmed ([`HistoryConfig`]: at most
/// `max_entries` entries and `max_bytes` payload bytes, the newest always
/// kept), so that a follower can be started anywhere the history still
/// reaches. A follower writes each entry after its position in offset
/// order: [`RoomEntry::transmit_for`] its session, which is the entry's
/// `skip` for the one session an entry is not for.
///
/// The driver keeps each connection's frames in the order of the outputs:
/// an entry published before a [`ServerOutput::Transmit`] for a follower
/// goes out before that frame, one published after it, after. A follower
/// that falls further behind than the feed holds is a slow consumer: the
/// driver closes it (4009) rather than skip entries, and its session
/// recovers from the history when it resumes.
///
/// [`HistoryConfig`]: crate::stream::HistoryConfig
#[derive(Clone, Debug, PartialEq)]
pub enum FeedOutput {
    /// Append `entry` to its room's feed (making the feed if there is none
    /// of this `epoch`) and trim the feed as the history is trimmed.
    Publish {
        /// The entry, shared with the history.
        entry: RoomEntry,
        /// The room stream's epoch: a feed of another epoch is replaced.
        epoch: u64,
    },
    /// From now on `connection` writes the entries of `room`'s feed after
    /// offset `after` (the `sub` it was just sent names that offset): those
    /// the feed holds already, then every one published.
    Follow {
        /// The connection.
        connection: ConnectionId,
        /// The session it carries (its entries' `skip`s).
        session: SessionId,
        /// The room.
        room: Arc<str>,
        /// The room stream's epoch (a feed of another epoch is replaced by
        /// an empty one starting after `after`).
        epoch: u64,
        /// The offset the connection's stream stands at.
        after: u64,
        /// The connection's codec.
        codec: Codec,
    },
    /// `connection` stops following `room` once it has written the entries
    /// published so far.
    Unfollow {
        /// The connection.
        connection: ConnectionId,
        /// The room.
        room: Arc<str>,
    },
    /// `room`'s stream ended (the room has no member left): forget its
    /// feed. Followers still writing its last entries finish them.
    Close {
        /// The room.
        room: Arc<str>,
    },
}

/// Something the server application should hear about.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A connection completed the handshake and carries `session`.
    SessionOpened {
        /// The connection.
        connection: ConnectionId,
        /// The session.
        session: SessionId,
        /// The client instance.
        client: ClientId,
        /// The identity authenticated at the HTTP upgrade, if any.
        identity: Option<String>,
        /// Whether an existing session was resumed.
        resumed: bool,
    },
    /// A session lost its connection and waits out its grace period.
    SessionDetached {
        /// The session.
        session: SessionId,
        /// How the connection ended.
        code: CloseCode,
    },
    /// The session was taken out of this server for another to carry
    /// ([`Server::export_session`](super::Server::export_session)): it did
    /// not end and nothing was lost; this server forgets it.
    SessionMoved {
        /// The session.
        session: SessionId,
    },
    /// A session another server exported was taken in
    /// ([`Server::import_session`](super::Server::import_session)),
    /// detached: its client resumes it here. Its rooms came with it.
    SessionArrived {
        /// The session.
        session: SessionId,
        /// The client instance.
        client: ClientId,
        /// The identity that owns it.
        identity: Option<String>,
        /// Taken up from its [`SessionRecord`](super::SessionRecord) after
        /// the server holding it was lost
        /// ([`Server::recover_session`](super::Server::recover_session)):
        /// only its ids, identity and rooms came; messages that server had
        /// accepted for the client and not delivered are gone, and the
        /// client's unacknowledged messages come again (with their ids).
        recovered: bool,
    },
    /// A session ended: the client closed it, the grace period ran out, or
    /// its buffers overflowed. `unconfirmed` messages were accepted for it
    /// and never acknowledged by the client.
    SessionEnded {
        /// The session.
        session: SessionId,
        /// Why.
        reason: SessionEnd,
        /// Accepted, never acknowledged.
        unconfirmed: Vec<MessageId>,
    },
    /// A message from a session's client, in order, exactly once.
    Message {
        /// The session.
        session: SessionId,
        /// The message.
        message: Received,
    },
    /// An unsequenced datagram from a session's client.
    Datagram {
        /// The session.
        session: SessionId,
        /// The bytes.
        data: Bytes,
    },
    /// The client acknowledged every message of this session with an id in
    /// `first..=last`. Ids are unique across the server and increase in send
    /// order, so the range may span ids of other sessions; only this
    /// session's are covered.
    Acked {
        /// The session.
        session: SessionId,
        /// First id.
        first: MessageId,
        /// Last id.
        last: MessageId,
    },
    /// A session joined a room (by its own request, or the application's).
    Joined {
        /// The session.
        session: SessionId,
        /// The room.
        room: Arc<str>,
    },
    /// A session left a room (by request, or because the session ended).
    Left {
        /// The session.
        session: SessionId,
        /// The room.
        room: Arc<str>,
    },
    /// A client's join or publish was refused (the client is told why).
    Refused {
        /// The session.
        session: SessionId,
        /// The room.
        room: Arc<str>,
        /// What was refused.
        op: RoomOp,
        /// Why.
        reason: String,
    },
    /// An entry of a synced map changed (PROTOCOL.md, section 3.6): by a
    /// member's write (`by`) or the application's. The members that take
    /// maps were sent the change.
    MapChanged {
        /// The room.
        room: Arc<str>,
        /// The map.
        map: Arc<str>,
        /// The entry's key.
        key: Arc<str>,
        /// Its value now; `None`: deleted.
        value: Option<Payload>,
        /// The session whose write it was; `None`: the application's.
        by: Option<SessionId>,
    },
    /// A hello was refused.
    Rejected {
        /// The connection.
        connection: ConnectionId,
        /// The close code sent.
        code: CloseCode,
        /// The machine-readable reason sent.
        reason: &'static str,
    },
    /// A connection closed before or without carrying a session.
    ConnectionClosed {
        /// The connection.
        connection: ConnectionId,
        /// The code.
        code: CloseCode,
    },
    /// A connection exceeded its rate limit during the last interval
    /// ([`RATE_REPORT_INTERVAL`]): one event per connection and interval,
    /// with counts, however many messages it concerned. Under the `Close`
    /// policy the connection is closed with 1008 instead.
    RateLimited {
        /// The connection.
        connection: ConnectionId,
        /// Its session.
        session: SessionId,
        /// Messages processed late: reading paused until the limits
        /// allowed them ([`RateLimitPolicy::Throttle`]).
        delayed: u64,
        /// Messages refused (the client was told each one's id:
        /// [`RateLimitPolicy::Refuse`]).
        refused: u64,
        /// Datagrams dropped ([`RateLimitPolicy::Refuse`]).
        datagrams_dropped: u64,
        /// The limit exceeded last.
        limit: Limit,
    },
    /// A client sent a fresh credential (answering
    /// [`Server::request_reauth`]). Validate it, then call
    /// [`Server::accept_token`] or close with [`CloseCode::UNAUTHORIZED`].
    TokenReceived {
        /// The connection.
        connection: ConnectionId,
        /// Its session.
        session: SessionId,
        /// The credential.
        token: String,
    },
    /// An incoming frame could not be decoded.
    DecodeFailed {
        /// The connection.
        connection: ConnectionId,
        /// What was wrong.
        error: DecodeError,
    },
}

impl ServerEvent {
    /// The session the event concerns, if it names one.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            ServerEvent::SessionOpened { session, .. }
            | ServerEvent::SessionDetached { session, .. }
            | ServerEvent::SessionMoved { session }
            | ServerEvent::SessionArrived { session, .. }
            | ServerEvent::SessionEnded { session, .. }
            | ServerEvent::Message { session, .. }
            | ServerEvent::Datagram { session, .. }
            | ServerEvent::Acked { session, .. }
            | ServerEvent::Joined { session, .. }
            | ServerEvent::Left { session, .. }
            | ServerEvent::Refused { session, .. }
            | ServerEvent::RateLimited { session, .. }
            | ServerEvent::TokenReceived { session, .. } => Some(*session),
            ServerEvent::Rejected { .. }
            | ServerEvent::MapChanged { .. }
            | ServerEvent::ConnectionClosed { .. }
            | ServerEvent::DecodeFailed { .. } => None,
        }
    }

    /// The connection the event names, if any.
    pub fn connection(&self) -> Option<ConnectionId> {
        match self {
            ServerEvent::SessionOpened { connection, .. }
            | ServerEvent::Rejected { connection, .. }
            | ServerEvent::ConnectionClosed { connection, .. }
            | ServerEvent::RateLimited { connection, .. }
            | ServerEvent::TokenReceived { connection, .. }
            | ServerEvent::DecodeFailed { connection, .. } => Some(*connection),
            _ => None,
        }
    }
}

/// A room operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoomOp {
    /// Joining.
    Join,
    /// Leaving (refused only when the cluster's store cannot take it).
    Leave,
    /// Publishing.
    Publish,
    /// Writing to one of the room's synced maps.
    MapWrite,
}

impl RoomOp {
    /// The operation as a refusal names it (`op`, PROTOCOL.md section 3.3).
    pub fn as_str(self) -> &'static str {
        match self {
            RoomOp::Join => "join",
            RoomOp::Leave => "leave",
            RoomOp::Publish => "publish",
            RoomOp::MapWrite => "mset",
        }
    }
}

/// Why a room operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    /// No such session.
    #[error("no such session")]
    UnknownSession,
    /// The policy refused it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The room holds its maximum number of members.
    #[error("the room is full ({max} members)")]
    RoomFull {
        /// The limit.
        max: usize,
    },
    /// The session is in its maximum number of rooms.
    #[error("in too many rooms (at most {max})")]
    TooManyRooms {
        /// The limit.
        max: usize,
    },
    /// The room name is empty or longer than 256 bytes.
    #[error("room names are 1 to 256 bytes")]
    BadName,
    /// Shared rooms: the cluster could not take the operation (its store
    /// unreachable); nothing was done.
    #[error("the cluster cannot take room operations now: {0}")]
    Unavailable(String),
}

impl RoomError {
    /// The machine-readable `code` a refusal carries (PROTOCOL.md, section
    /// 3.3).
    pub fn code(&self) -> &'static str {
        match self {
            RoomError::UnknownSession => "invalid",
            RoomError::Forbidden(_) => "forbidden",
            RoomError::RoomFull { .. } => "room_full",
            RoomError::TooManyRooms { .. } => "too_many_rooms",
            RoomError::BadName => "invalid",
            RoomError::Unavailable(_) => "unavailable",
        }
    }
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The client closed it (1000).
    ClientClosed,
    /// The server application closed it.
    ServerClosed,
    /// The grace period ran out with no resume.
    Expired,
    /// Its outbound buffer overflowed under [`OverflowPolicy::FailSession`].
    Overflow,
    /// It did not read fast enough to keep up: its buffers filled during a
    /// broadcast or presence update, or its connection, while the client
    /// kept sending, had not read up to what was written
    /// [`ServerConfig::max_lag`] before (a lag probe went unanswered that
    /// long). Its connection was closed with 4009 and the session ended,
    /// leaving the other members unaffected; `unconfirmed` lists what it
    /// had not acknowledged.
    ///
    /// [`ServerConfig::max_lag`]: crate::config::ServerConfig::max_lag
    SlowConsumer,
}

/// Read-only view of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionInfo {
    /// The session.
    pub id: SessionId,
    /// Its client instance.
    pub client: ClientId,
    /// The identity it is bound to.
    pub identity: Option<String>,
    /// Where it is in its life.
    pub state: SessionState,
    /// Its connection, if attached (from `state`).
    pub connection: Option<ConnectionId>,
    /// When it expires, if detached (from `state`).
    pub expires_at: Option<Instant>,
    /// Messages sent and unacknowledged.
    pub in_flight: usize,
    /// Messages waiting behind the send window.
    pub queued: usize,
    /// Last sequence number delivered from the client.
    pub delivered: u64,
    /// How far behind its connection reads: the delay of the last lag
    /// probe it answered, or how long the outstanding one has waited if
    /// that is longer ([`ServerConfig::max_lag`]). `None` while detached,
    /// before a first probe, or with `max_lag` off.
    ///
    /// [`ServerConfig::max_lag`]: crate::config::ServerConfig::max_lag
    pub lag: Option<core::time::Duration>,
}

/// Gauges and counters at one instant, for dashboards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerMetrics {
    /// Open connections.
    pub connections: usize,
    /// Sessions held.
    pub sessions: usize,
    /// Sessions in their grace period, without a connection.
    pub detached_sessions: usize,
    /// Rooms with at least one member.
    pub rooms: usize,
    /// Room memberships, summed over rooms.
    pub memberships: usize,
    /// Messages sent and not yet acknowledged, over all sessions.
    pub messages_in_flight: usize,
    /// Messages waiting behind send windows, over all sessions.
    pub messages_queued: usize,
    /// Room stream entries kept for members that are away, over all rooms
    /// ([`ServerConfig::history`](crate::config::ServerConfig::history)).
    pub history_entries: usize,
    /// Payload bytes of those entries.
    pub history_bytes: usize,
    /// Counters since start.
    pub counters: ServerStats,
}

/// Counters for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections accepted.
    pub connections_opened: u64,
    /// Connections closed.
    pub connections_closed: u64,
    /// Sessions created.
    pub sessions_created: u64,
    /// Sessions resumed.
    pub sessions_resumed: u64,
    /// Resume attempts that could not be honoured.
    pub resumes_failed: u64,
    /// Sessions that expired.
    pub sessions_expired: u64,
    /// Sessions exported to another server.
    pub sessions_moved_out: u64,
    /// Sessions imported from another server.
    pub sessions_moved_in: u64,
    /// Hellos rejected.
    pub rejected: u64,
    /// Messages sent to clients, resent, delivered from clients,
    /// duplicated and skipped: the same counters as the client's.
    pub delivery: DeliveryStats,
    /// Frames and bytes in and out, and frames that failed to decode: the
    /// same counters as the client's.
    pub traffic: TrafficStats,
    /// Connections closed for missing heartbeats.
    pub heartbeat_timeouts: u64,
    /// Sessions ended as slow consumers, for either reason (buffers full
    /// during a broadcast, or a lag probe unanswered for
    /// [`ServerConfig::max_lag`]).
    ///
    /// [`ServerConfig::max_lag`]: crate::config::ServerConfig::max_lag
    pub slow_consumers: u64,
    /// Of `slow_consumers`, those ended for lag (a probe unanswered for
    /// `max_lag` while the client kept sending).
    pub lag_evictions: u64,
    /// Lag probes (`ping`s) sent.
    pub lag_probes: u64,
    /// Broadcasts made.
    pub broadcasts: u64,
    /// Latest values set ([`Server::broadcast_latest`]).
    pub latest_values: u64,
    /// Synced-map entries changed, by members and by the application.
    pub map_writes: u64,
    /// Synced-map snapshots sent (on joins and on connections opening).
    pub map_snapshots: u64,
    /// Synced-map entries from other servers that did not fit this
    /// server's bounds for the map ([`Server::map_merge`]).
    pub map_merges_refused: u64,
    /// Connections rotated for age.
    pub rotations: u64,
    /// Messages over a rate limit.
    pub rate_limited: u64,
    /// Client messages refused by id (invalid, over a rate limit, or
    /// refused by the room policy).
    pub refused: u64,
    /// Connections closed, by close code.
    pub close_codes: BTreeMap<u16, u64>,
}

/// The server's timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ServerTimer {
    /// A connection must send its hello by now.
    Hello(ConnectionId),
    /// A connection that sent nothing since is dead (after a grace).
    Idle(ConnectionId),
    /// A session's standalone acknowledgment is due.
    AckDelay(SessionId),
    /// A session's oldest unacknowledged message has waited too long.
    AckTimeout(SessionId),
    /// A detached session's grace period ends.
    Expiry(SessionId),
    /// A connection asked to re-authenticate must have done so by now.
    Reauth(ConnectionId),
    /// A session's batch goes out.
    Batch(SessionId),
    /// A connection reached its maximum age.
    Rotate(ConnectionId),
    /// A connection's rate limiting is reported.
    RateReport(ConnectionId),
    /// A connection whose client asked to be pinged gets its `ping`.
    Ping(ConnectionId),
    /// A connection's lag probe is due, or its outstanding one has waited
    /// `max_lag` ([`ServerConfig::max_lag`]).
    ///
    /// [`ServerConfig::max_lag`]: crate::config::ServerConfig::max_lag
    Lag(ConnectionId),
}

/// The next deadline and why it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerDeadline {
    /// When to call `handle_timeout`.
    pub at: Instant,
    /// Which timer (the earliest; others may be due at the same instant).
    pub timer: ServerTimer,
}
