//! What the client machine hands out: the driver's [`Output`]s, the
//! application's [`Event`]s, and what they carry.
//!
//! Owns [`TransportId`], [`Output`], [`Event`] and the reasons it reports
//! ([`RequestError`], [`LostReason`]), the commands' [`UsageError`] and the
//! counters ([`ClientStats`]). Plain data: nothing here emits an event,
//! changes the state or decides anything; the machine builds these values
//! and queues them, in order, for `poll_output`.

use bytes::Bytes;
use core::time::Duration;

use crate::close::CloseCode;
use crate::link::{DeliveryStats, Received, TrafficStats};
use crate::reliable::{MessageId, SendError};
use crate::rooms::{Presence, Refusal};
use crate::wire::{Codec, DecodeError, Payload, SessionId, Transmit};

use super::State;

/// Identifies one transport (one WebSocket connection attempt). A new id is
/// issued for every attempt; inputs carrying an old id are ignored, so a late
/// event from a dead connection can never affect the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransportId(pub u64);

/// Why a request got no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No response within the request's timeout.
    #[error("no response within the timeout")]
    TimedOut,
    /// The session was lost; a response, if one was sent, went with it.
    #[error("the session was lost")]
    SessionLost,
    /// The session was closed.
    #[error("the session was closed")]
    Closed,
}

/// Why a session's accepted messages were given up on.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The server could not resume the session; its words (e.g.
    /// `unknown_session`, `expired`, `overflow`, `forbidden`).
    NotResumed(String),
    /// The session was closed (locally, or by the server with 1000).
    Closed,
    /// The send buffers overflowed under [`OverflowPolicy::FailSession`].
    ///
    /// [`OverflowPolicy::FailSession`]: crate::reliable::OverflowPolicy::FailSession
    Overflow,
    /// The server's view of the session contradicted ours.
    Inconsistent,
}

/// Something the application should hear about.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The connection state changed.
    StateChanged {
        /// Before.
        old: State,
        /// After.
        new: State,
    },
    /// A session is established (just before the change to `Open`).
    Connected {
        /// The session.
        session: SessionId,
        /// Whether the previous session was resumed.
        resumed: bool,
        /// Resumed by a server that took the session up after the server
        /// holding it was lost (a crashed node of a cluster): nothing this
        /// client sent is lost (what was not acknowledged is sent again,
        /// and may arrive twice, with its id), but messages that server
        /// had sent and this client never received may be gone. An
        /// application that keeps state from the server's messages should
        /// ask for it afresh.
        recovered: bool,
        /// The negotiated protocol version.
        version: u8,
        /// The negotiated codec.
        codec: Codec,
    },
    /// A message from the peer, in order, exactly once.
    Message(Received),
    /// The response to one of this side's requests.
    Response {
        /// The request it answers.
        request: MessageId,
        /// The response message.
        response: Received,
    },
    /// A response arrived for a request that timed out or was cancelled; it
    /// was discarded.
    LateResponse {
        /// The request it answered.
        request: MessageId,
    },
    /// A request will get no response.
    RequestFailed {
        /// The request.
        request: MessageId,
        /// Why.
        error: RequestError,
    },
    /// An unsequenced datagram from the peer.
    Datagram(Bytes),
    /// A room's newest value of a key (PROTOCOL.md, section 3.5): it
    /// supersedes every earlier value of the key. Each value comes at most
    /// once; values superseded while this client was away or slow are
    /// never seen, and when the connection comes back the server sends
    /// every key's newest value.
    Latest {
        /// The room.
        room: std::sync::Arc<str>,
        /// The key.
        key: std::sync::Arc<str>,
        /// The value.
        payload: Payload,
    },
    /// Entries of a room's stream this client will never get: it was away
    /// longer than the server keeps the room's history, or the room's
    /// stream started again. `from` is the first offset missed; `to` the
    /// last, or `None` when the stream started again and the count is
    /// unknown. Messages after them keep coming, in order.
    Missed {
        /// The room.
        room: std::sync::Arc<str>,
        /// First offset missed.
        from: u64,
        /// Last offset missed, if known.
        to: Option<u64>,
    },
    /// Who is in a room: a full list after joining (`snapshot`), then
    /// changes, in order with the room's messages.
    Presence {
        /// The room.
        room: std::sync::Arc<str>,
        /// The membership change.
        presence: Presence,
    },
    /// The server refused one of this client's messages: a join, a
    /// publish, or a message it could not accept (malformed, over a rate
    /// limit). The message was consumed and will not be handed to the
    /// server's application; it is reported here before any
    /// [`Event::Acked`] covers it, and its id is then not delivered.
    Refused {
        /// The refused message (absent only in refusals from servers that
        /// do not name it).
        id: Option<MessageId>,
        /// The room, for a join or publish.
        room: Option<std::sync::Arc<str>>,
        /// What was refused and why.
        refusal: Refusal,
    },
    /// The peer acknowledged every message of the current session with an
    /// id in `first..=last` (ids increase in send order; an id in the range
    /// already reported by [`Event::SendFailed`] was never sent and is not
    /// covered).
    Acked {
        /// First id acknowledged.
        first: MessageId,
        /// Last id acknowledged.
        last: MessageId,
    },
    /// A session was given up. `unconfirmed` messages were sent but never
    /// acknowledged: they may or may not have arrived. `unsent` messages were
    /// never sent and are dropped (they are carried into the next session
    /// instead when the loss comes from a failed resume, and then not listed).
    SessionLost {
        /// Why.
        reason: LostReason,
        /// Sent, fate unknown.
        unconfirmed: Vec<MessageId>,
        /// Never sent, dropped.
        unsent: Vec<MessageId>,
    },
    /// An entry of a synced map reads differently now (PROTOCOL.md,
    /// section 3.6): the server sent a change or a snapshot, this client
    /// wrote it, or one of its writes was settled the other way.
    MapChanged {
        /// The room.
        room: std::sync::Arc<str>,
        /// The map.
        map: std::sync::Arc<str>,
        /// The entry's key.
        key: std::sync::Arc<str>,
        /// What it reads as now; `None`: nothing (deleted).
        value: Option<Payload>,
    },
    /// A synced map's snapshot arrived whole, after the
    /// [`Event::MapChanged`]s it caused: the map is in step with the
    /// server's (on a join, and on every new connection).
    MapSynced {
        /// The room.
        room: std::sync::Arc<str>,
        /// The map.
        map: std::sync::Arc<str>,
    },
    /// Entries of a synced map were not kept: the client holds
    /// [`MAX_MAP_ENTRIES_KEPT`](super::MAX_MAP_ENTRIES_KEPT) already. The
    /// map reads incomplete until entries elsewhere go.
    MapOverflow {
        /// The room.
        room: std::sync::Arc<str>,
        /// The map.
        map: std::sync::Arc<str>,
    },
    /// A value held by `send_latest` could not be queued when its time came.
    LatestFailed {
        /// Its key.
        key: String,
        /// Why.
        error: SendError,
    },
    /// A message accepted earlier could not be sent after all.
    SendFailed {
        /// The message.
        id: MessageId,
        /// Why.
        error: SendError,
    },
    /// The server asks for a fresh credential within `within`; answer with
    /// [`Client::send_token`] or the server closes with 4401.
    ///
    /// [`Client::send_token`]: super::Client::send_token
    TokenExpiring {
        /// Time left.
        within: Duration,
    },
    /// A new round-trip time sample from a ping.
    Rtt(Duration),
    /// An incoming frame could not be decoded; it was dropped.
    DecodeFailed(DecodeError),
    /// More than `max_decode_failures` frames in a row failed to decode: the
    /// application should reload its full state.
    Resync,
}

/// What the driver must do next. Drain with [`Client::poll_output`] until
/// `None`, in order.
///
/// [`Client::poll_output`]: super::Client::poll_output
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub enum Output {
    /// Open a new transport (WebSocket connection) and report it with
    /// `handle_transport_opened` or `handle_transport_error`, quoting the id.
    Connect(TransportId),
    /// Write this message on the transport.
    Transmit(TransportId, Transmit),
    /// Close the transport with this code (after writing what was queued
    /// before), then report the close with `handle_transport_closed`. The
    /// machine has already moved on unless it is `Closing`, where that report
    /// completes the close.
    Disconnect(TransportId, CloseCode, &'static str),
    /// Tell the application.
    Event(Event),
}

/// A command that makes no sense in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// `connect` while already connecting or connected.
    #[error("already {0}")]
    AlreadyActive(&'static str),
    /// A command while a local close is in progress.
    #[error("closing")]
    Closing,
    /// `close` on a machine that is already closed.
    #[error("already closed")]
    AlreadyClosed,
}

/// Counters for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Transport attempts started.
    pub connects: u64,
    /// Sessions established or resumed (welcomes accepted).
    pub opens: u64,
    /// Sessions resumed.
    pub resumes: u64,
    /// Sessions lost.
    pub sessions_lost: u64,
    /// Application messages sent, resent, delivered, duplicated and
    /// skipped: the same counters as the server's.
    pub delivery: DeliveryStats,
    /// Frames and bytes in and out, and frames that failed to decode: the
    /// same counters as the server's.
    pub traffic: TrafficStats,
    /// Well-formed frames of unknown types, ignored.
    pub unknown_frames: u64,
    /// This client's messages the server refused ([`Event::Refused`]).
    pub refused: u64,
    /// Latest values delivered ([`Event::Latest`]).
    pub latest: u64,
    /// Latest values dropped because this client already had them or a
    /// newer one (the snapshot after a reconnect repeats what it has).
    pub latest_stale: u64,
    /// Synced-map snapshots received (`ms`).
    pub map_snapshots: u64,
    /// Synced-map entries received (`mv`), in snapshots and as changes.
    pub map_values: u64,
    /// Maps left incomplete for lack of room ([`Event::MapOverflow`]).
    pub map_overflows: u64,
}
